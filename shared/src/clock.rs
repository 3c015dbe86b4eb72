//! A monotonic clock read as a count of nanoseconds, for the request path's timings.
//!
//! `std::time::Instant` reads the same clock (`CLOCK_MONOTONIC`), but every difference of two
//! of them goes through `Timespec::sub_timespec` and a `Duration` (seconds and nanoseconds,
//! normalised), about 40 instructions, and most of the request path's readings are
//! subtracted: each plugin's time in each phase, the request's and the upstream's times. A
//! [`Tick`] is one integer, its difference one subtraction. `Instant` stays where a reading
//! becomes a deadline (timers, tokio's `sleep_until`).

use std::time::Duration;

/// A reading of the monotonic clock, in nanoseconds since an arbitrary origin (the system's
/// boot): comparable with other readings of the same machine, across processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Tick(u64);

impl Tick {
    /// The clock now.
    #[inline]
    pub fn now() -> Tick {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid, writable timespec. CLOCK_MONOTONIC exists on every Linux
        // the gateway runs on, so the call cannot fail (the vDSO answers it without a system
        // call); were it to, `ts` stays zero and times read as zero, never as garbage.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        Tick((ts.tv_sec as u64).wrapping_mul(1_000_000_000) + ts.tv_nsec as u64)
    }

    /// Nanoseconds from `earlier` to this reading; zero when `earlier` is later.
    #[inline]
    pub fn nanos_since(self, earlier: Tick) -> u64 {
        self.0.saturating_sub(earlier.0)
    }

    /// [`Tick::nanos_since`] as a `Duration`.
    #[inline]
    pub fn since(self, earlier: Tick) -> Duration {
        Duration::from_nanos(self.nanos_since(earlier))
    }

    /// The time since this reading.
    pub fn elapsed(self) -> Duration {
        Tick::now().since(self)
    }

    /// This reading moved `d` later.
    #[inline]
    pub fn after(self, d: Duration) -> Tick {
        Tick(
            self.0
                .saturating_add(d.as_nanos().min(u64::MAX as u128) as u64),
        )
    }
}

/// The time since `started`, which moves to now: for work done one piece after another (a
/// request's plugins), where one reading ends one piece's time and starts the next one's.
#[inline]
pub fn lap(started: &mut Tick) -> u64 {
    let now = Tick::now();
    let spent = now.nanos_since(*started);
    *started = now;
    spent
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn readings_move_forward_as_instant_does() {
        let (t0, i0) = (Tick::now(), Instant::now());
        std::thread::sleep(Duration::from_millis(20));
        let (t1, i1) = (Tick::now(), Instant::now());
        let tick = t1.since(t0);
        let instant = i1 - i0;
        assert!(tick >= Duration::from_millis(20), "{tick:?}");
        // Both read CLOCK_MONOTONIC: they agree to within the time between the two readings.
        let gap = tick.abs_diff(instant);
        assert!(
            gap < Duration::from_millis(5),
            "{tick:?} against {instant:?}"
        );
    }

    #[test]
    fn differences_saturate_at_zero() {
        let t = Tick::now();
        let later = t.after(Duration::from_millis(3));
        assert_eq!(later.since(t), Duration::from_millis(3));
        assert_eq!(t.nanos_since(later), 0);
        let mut started = t;
        let spent = lap(&mut started);
        assert!(started >= t);
        assert_eq!(spent, started.nanos_since(t));
    }
}
