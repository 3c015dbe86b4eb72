//! One master per data directory: `<data_dir>/master.lock`, held with `flock(2)` for the
//! master's whole life and holding its pid.
//!
//! Two masters on one store would each overwrite the other's objects; the pid file alone
//! cannot prevent it, since two config files may name two pid files. The lock also tells the
//! command line where the master is when config.yaml's `pid_file` was edited and not yet
//! reloaded: the data directory cannot change without a restart, the pid file can.
//!
//! The kernel drops the lock with the process, so a master that was killed leaves no stale
//! claim; a pid read from the file counts only while `/proc/locks` shows that very process
//! holding the lock on that very file.

use anyhow::Context;
use nix::fcntl::{Flock, FlockArg};
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The held lock; dropping it (or the process ending) releases it.
pub struct MasterLock {
    _file: Flock<File>,
}

fn lock_path(data_dir: &Path) -> PathBuf {
    data_dir.join("master.lock")
}

impl MasterLock {
    /// Takes the data directory's lock for this process and records its pid, or says which
    /// master holds it.
    pub fn acquire(data_dir: &Path) -> anyhow::Result<MasterLock> {
        let path = lock_path(data_dir);
        std::fs::create_dir_all(data_dir)
            .with_context(|| format!("cannot create data directory {}", data_dir.display()))?;
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        let mut file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(f) => f,
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                let who = holder(data_dir)
                    .map_or("another process".into(), |p| format!("wasmgate master {p}"));
                anyhow::bail!(
                    "{who} already serves data directory {} (wasmgate.data_dir): one master \
                     per store",
                    data_dir.display()
                );
            }
            Err((_, e)) => {
                return Err(e).with_context(|| format!("cannot lock {}", path.display()))
            }
        };
        file.set_len(0)?;
        file.write_all(format!("{}\n", std::process::id()).as_bytes())
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(MasterLock { _file: file })
    }
}

/// The master holding `data_dir`'s lock, if a live wasmgate master does.
pub fn holder(data_dir: &Path) -> Option<i32> {
    let path = lock_path(data_dir);
    let pid: i32 = std::fs::read_to_string(&path).ok()?.trim().parse().ok()?;
    let inode = std::fs::metadata(&path).ok()?.ino();
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    let holds = locks.lines().any(|l| holds_lock(l, pid, inode));
    (holds && crate::cli::running_pid_is_master(pid)).then_some(pid)
}

/// Whether a `/proc/locks` line is a `flock` held by `pid` on the file `inode`:
/// `1: FLOCK  ADVISORY  WRITE 4242 fd:01:1234567 0 EOF` (device in hex, then the inode).
fn holds_lock(line: &str, pid: i32, inode: u64) -> bool {
    let mut f = line.split_whitespace().skip(1);
    let (Some(kind), _, _, Some(p), Some(dev_ino)) =
        (f.next(), f.next(), f.next(), f.next(), f.next())
    else {
        return false;
    };
    kind == "FLOCK"
        && p.parse() == Ok(pid)
        && dev_ino.rsplit(':').next().and_then(|i| i.parse().ok()) == Some(inode)
}

#[cfg(test)]
mod tests {
    use super::holds_lock;

    #[test]
    fn reads_proc_locks_lines() {
        let line = "3: FLOCK  ADVISORY  WRITE 4242 fd:01:1234567 0 EOF";
        assert!(holds_lock(line, 4242, 1234567));
        assert!(!holds_lock(line, 4243, 1234567));
        assert!(!holds_lock(line, 4242, 123456));
        let posix = "3: POSIX  ADVISORY  WRITE 4242 fd:01:1234567 0 EOF";
        assert!(!holds_lock(posix, 4242, 1234567));
        // A lock others wait for is listed with "->" before its kind.
        assert!(!holds_lock(
            "3: -> FLOCK  ADVISORY  WRITE 4242 fd:01:1234567 0 EOF",
            4242,
            1234567
        ));
        assert!(!holds_lock("", 1, 1));
    }
}
