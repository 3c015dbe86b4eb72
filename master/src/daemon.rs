//! Becoming a daemon, the way service managers expect (`Type=forking`): the process that the
//! user started exits only once the daemon is serving — with status 0 — or has failed — with
//! status 1 and the reason on its stderr. So `wasmgate start && curl …` works, and the pid file
//! exists when `start` returns.

use anyhow::Context;
use nix::unistd::{fork, setsid, ForkResult};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;

/// Forks. In the parent, waits for the daemon's word and exits. In the daemon, returns the
/// pipe on which to report readiness through [`Readiness`].
pub fn daemonize() -> anyhow::Result<Readiness> {
    let (read_end, write_end) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("pipe")?;
    // SAFETY: called before any thread or runtime exists (start() runs it before run::run),
    // so the child holds no lock another thread could own.
    match unsafe { fork() }.context("fork")? {
        ForkResult::Parent { .. } => {
            drop(write_end);
            let mut msg = String::new();
            let _ = File::from(read_end).read_to_string(&mut msg);
            match msg.strip_prefix("ok") {
                Some(_) => std::process::exit(0),
                None if msg.is_empty() => {
                    eprintln!("wasmgate: the daemon exited during start; see the error log");
                    std::process::exit(1)
                }
                None => {
                    eprintln!("wasmgate: {msg}");
                    std::process::exit(1)
                }
            }
        }
        ForkResult::Child => {
            drop(read_end);
            setsid().context("setsid")?;
            let null = File::options().read(true).write(true).open("/dev/null")?;
            for fd in 0..=2 {
                // SAFETY: dup2 onto the standard descriptors of this process.
                unsafe { libc::dup2(null.as_raw_fd(), fd) };
            }
            Ok(Readiness(Some(File::from(write_end))))
        }
    }
}

/// The daemon's side of the start-up pipe; a no-op in the foreground.
pub struct Readiness(pub Option<File>);

impl Readiness {
    /// Tells the waiting parent the gateway is serving.
    pub fn ready(&mut self) {
        if let Some(mut f) = self.0.take() {
            let _ = f.write_all(b"ok");
        }
    }

    /// Tells the waiting parent why the start failed.
    pub fn failed(&mut self, why: &str) {
        if let Some(mut f) = self.0.take() {
            let _ = f.write_all(why.as_bytes());
        }
    }
}
