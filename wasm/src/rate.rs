//! A per-second line budget, shared by every instance of a plugin in a worker, so that a plugin
//! that logs in a loop — or traps on every request, starting a new instance each time — cannot
//! flood the error log.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// Lines allowed per second, and how many were refused since the last allowed one.
#[derive(Debug, Default)]
pub struct LogGate {
    window: AtomicU64,
    used: AtomicU32,
    dropped: AtomicU64,
}

/// What the gate says about one line.
#[derive(Debug, PartialEq, Eq)]
pub enum Pass {
    /// Write it; `dropped` lines were refused since the last one written.
    Yes {
        dropped: u64,
    },
    /// Write it, and say the budget of this second is spent.
    Last,
    No,
}

impl LogGate {
    /// A gate with its budget whole (for a `static`).
    pub const fn new() -> LogGate {
        LogGate {
            window: AtomicU64::new(0),
            used: AtomicU32::new(0),
            dropped: AtomicU64::new(0),
        }
    }

    /// Asks for one line out of `per_second`.
    pub fn pass(&self, per_second: u32) -> Pass {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        if self.window.swap(now, Ordering::Relaxed) != now {
            self.used.store(0, Ordering::Relaxed);
        }
        let used = self.used.fetch_add(1, Ordering::Relaxed);
        if used >= per_second {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return Pass::No;
        }
        if used + 1 == per_second {
            return Pass::Last;
        }
        Pass::Yes {
            dropped: self.dropped.swap(0, Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_per_second() {
        let g = LogGate::default();
        let passed = (0..50).filter(|_| g.pass(10) != Pass::No).count();
        assert!(passed <= 20, "{passed}");
    }
}
