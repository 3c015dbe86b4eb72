//! One master per data directory: `<data_dir>/master.lock`, held with `flock(2)` for the
//! master's whole life and holding its pid.
//!
//! Two masters on one store would each overwrite the other's objects; the pid file alone
//! cannot prevent it, since two config files may name two pid files. The lock also tells the
//! command line where the master is when config.yaml's `pid_file` was edited and not yet
//! reloaded: the data directory cannot change without a restart, the pid file can.
//!
//! The file holds four lines: the pid, the configuration the master was started with, where
//! its Admin API listens now, and the outcome of its last reload (JSON: a count and the epoch
//! or the refusal), by which `wasmgate reload` reports a reload it asked by signal. The kernel drops the lock with the process, so a master
//! that was killed leaves no stale claim; a pid read from the file counts only while
//! `/proc/locks` shows that very process holding the lock on that very file.

use anyhow::Context;
use nix::fcntl::{Flock, FlockArg};
use std::fs::File;
use std::net::SocketAddr;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

/// The held lock; dropping it (or the process ending) releases it.
pub struct MasterLock {
    file: Flock<File>,
    /// What the file says besides the pid (rewritten when the Admin API moves).
    config: String,
    admin: SocketAddr,
    /// The last reload's outcome, as its line says it.
    last_reload: Option<Reloaded>,
}

/// A reload's outcome, as the lock's record keeps the last one. The outcome is written first:
/// a reader that meets the record half rewritten (new bytes, then old ones) never finds a new
/// start time next to an old outcome.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Reloaded {
    /// The epoch serving once applied, or why it was refused.
    pub outcome: Result<u64, String>,
    /// When the reload began (ms since the Unix epoch): `wasmgate reload` takes the outcome
    /// of a reload begun after its signal, not of one that was running when it sent it.
    pub started_ms: u64,
    /// How many reloads the master has run (by signal or through the Admin API), this one
    /// included.
    pub seq: u64,
}

/// What the lock file says of the master that holds it.
#[derive(Debug, Clone)]
pub struct Holder {
    pub pid: i32,
    /// The configuration it was started with (`LoadedConfig::origin`).
    pub config: String,
    /// Where its Admin API listens now: the command line asks there, not at an address
    /// config.yaml names and no reload applied yet (where something else may listen).
    pub admin: Option<SocketAddr>,
    /// Its last reload's outcome; None before the first.
    pub last_reload: Option<Reloaded>,
    /// Whether its record has the line for reloads (a master of an earlier version has not).
    pub records_reloads: bool,
}

/// The lock file's path: also what `wasmgate.pid_file` must not name.
pub fn lock_path(data_dir: &Path) -> PathBuf {
    data_dir.join("master.lock")
}

impl MasterLock {
    /// Takes the data directory's lock for this process and records its pid, configuration and
    /// Admin API address, or says which master holds it.
    pub fn acquire(data_dir: &Path, config: &str, admin: SocketAddr) -> anyhow::Result<MasterLock> {
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
        let file = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(f) => f,
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                let who = match holder(data_dir) {
                    Some(h) => format!("wasmgate master {} (config {})", h.pid, h.config),
                    None => "another wasmgate master, starting,".into(),
                };
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
        let mut lock = MasterLock {
            file,
            config: config.to_string(),
            admin,
            last_reload: None,
        };
        lock.record(admin)
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(lock)
    }

    /// Writes the record again with the Admin API's address (after a reload moved it).
    pub fn record(&mut self, admin: SocketAddr) -> std::io::Result<()> {
        self.admin = admin;
        let reload = match &self.last_reload {
            Some(r) => serde_json::to_string(r).map_err(std::io::Error::other)?,
            None => String::new(),
        };
        let text = format!(
            "{}\n{}\n{admin}\n{reload}\n",
            std::process::id(),
            self.config
        );
        // The whole record written over the old one, then the rest cut: a reader finds whole
        // lines first, never an empty file (the pid line is the same every time).
        self.file.write_all_at(text.as_bytes(), 0)?;
        self.file.set_len(text.len() as u64)
    }

    /// Notes the configuration the master runs now, written with the next record: a reload
    /// may read a config.yaml the start did not have (the embedded default ran until then).
    pub fn set_config(&mut self, config: &str) {
        self.config = config.to_string();
    }

    /// Records the outcome of a reload begun at `started_ms` (`wasmgate reload` waits for it
    /// after its signal).
    pub fn record_reload(
        &mut self,
        started_ms: u64,
        outcome: &Result<u64, String>,
    ) -> std::io::Result<()> {
        let seq = self.last_reload.as_ref().map_or(0, |r| r.seq) + 1;
        self.last_reload = Some(Reloaded {
            outcome: outcome.clone(),
            started_ms,
            seq,
        });
        self.record(self.admin)
    }
}

/// Refuses a `pid_file` that names `data_dir`'s lock file (however spelled): a pid file
/// written there would overwrite the lock's record, and removing it later would unlink the
/// lock. Asked at start and by a reload that moves the pid file.
pub fn check_pid_file(pid_file: &Path, data_dir: &Path) -> Result<(), String> {
    match is_lock_file(pid_file, data_dir) {
        false => Ok(()),
        true => Err(format!(
            "wasmgate.pid_file {} is the data directory's lock file: name another file",
            pid_file.display()
        )),
    }
}

fn is_lock_file(pid_file: &Path, data_dir: &Path) -> bool {
    let canonical = |p: &Path| -> Option<PathBuf> {
        let dir = p.parent()?.canonicalize().ok()?;
        Some(dir.join(p.file_name()?))
    };
    let lock = lock_path(data_dir);
    pid_file == lock
        || matches!((canonical(pid_file), canonical(&lock)), (Some(a), Some(b)) if a == b)
}

/// The master holding `data_dir`'s lock, if a live wasmgate master does.
pub fn holder(data_dir: &Path) -> Option<Holder> {
    let path = lock_path(data_dir);
    let text = std::fs::read_to_string(&path).ok()?;
    let mut lines = text.lines();
    let pid: i32 = lines.next()?.trim().parse().ok()?;
    let inode = std::fs::metadata(&path).ok()?.ino();
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    let holds = locks.lines().any(|l| holds_lock(l, pid, inode));
    if !holds || !crate::cli::running_pid_is_master(pid) {
        return None;
    }
    let config = lines.next().unwrap_or("").to_string();
    let admin = lines.next().and_then(|a| a.parse().ok());
    let reload = lines.next();
    Some(Holder {
        pid,
        config,
        admin,
        records_reloads: reload.is_some(),
        last_reload: reload.and_then(|r| serde_json::from_str(r).ok()),
    })
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
