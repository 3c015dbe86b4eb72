//! Worker processes: spawn, watch, respawn, replace on reload, stop.
//!
//! Workers are the same binary exec'ed as `wasmgate worker` (through `/proc/self/exe`, so a
//! binary replaced on disk does not mix versions). They inherit the shared-memory segment as
//! fd 3 and the proxy listeners as fds 4, 5, …; their boot parameters arrive as JSON on stdin.
//! In the child, before exec: `PR_SET_PDEATHSIG(SIGKILL)` so a worker never outlives the master,
//! and a process group of its own so a terminal's Ctrl-C reaches only the master, which then
//! stops the workers in order.

use crate::state::{LoadedConfig, Master};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use wasmgate_shared::shm::SlotState;
use wasmgate_shared::snapshot::WorkerBoot;

/// The binary workers run: this process's own image (`/proc/self/exe`). For profiling only,
/// `WASMGATE_WORKER_EXE` names a file instead: under valgrind, `/proc/self/exe` is valgrind
/// itself (see scripts/bench/worker_instructions.py).
fn worker_exe() -> std::ffi::OsString {
    std::env::var_os("WASMGATE_WORKER_EXE").unwrap_or_else(|| "/proc/self/exe".into())
}

/// A proxy listener kept open by the master for the life of the process.
pub struct Listener {
    pub addr: std::net::SocketAddr,
    /// Kept at fd ≥ 64 so that moving fds to 3, 4, … in the child never overwrites a source.
    pub fd: OwnedFd,
}

/// One worker process the master knows about.
#[derive(Debug)]
struct WorkerProc {
    worker_id: u32,
    slot: usize,
    pid: Option<u32>,
    epoch: u64,
    draining: bool,
    started: Instant,
    restarts: u32,
    quick_failures: u32,
    respawn_at: Option<Instant>,
    drain_deadline: Option<Instant>,
}

/// Everything needed to start a worker process.
struct SpawnCtx {
    master: Arc<Master>,
    listeners: Vec<Listener>,
    /// Compiled plugin modules, passed after the listeners.
    plugins: Vec<OwnedFd>,
    /// The plugins' shared memory at fd ≥ 64, passed after the plugins.
    plugin_shm: OwnedFd,
    /// The TLS sessions every worker resumes (fd ≥ 64), passed after the plugins' memory.
    tls_sessions: OwnedFd,
    /// The upstream nodes' health (fd ≥ 64), passed last.
    health: OwnedFd,
    exits: mpsc::UnboundedSender<(u32, String)>,
    prefix: std::path::PathBuf,
    /// `start --foreground`: workers log to standard error too, as the master does.
    stderr: bool,
}

/// The worker set and everything needed to (re)spawn it.
pub struct Supervisor {
    ctx: SpawnCtx,
    master: Arc<Master>,
    workers: Vec<WorkerProc>,
    /// The reason the last worker that stopped on an error gave: a reload whose workers
    /// failed to start says it.
    last_failure: Option<String>,
}

impl Supervisor {
    pub fn new(
        master: Arc<Master>,
        listeners: Vec<Listener>,
        plugins: Vec<OwnedFd>,
        plugin_shm: OwnedFd,
        (tls_sessions, health): (OwnedFd, OwnedFd),
        prefix: std::path::PathBuf,
        stderr: bool,
    ) -> (Supervisor, mpsc::UnboundedReceiver<(u32, String)>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Supervisor {
                ctx: SpawnCtx {
                    master: master.clone(),
                    listeners,
                    plugins,
                    plugin_shm,
                    tls_sessions,
                    health,
                    exits: tx,
                    prefix,
                    stderr,
                },
                master,
                workers: Vec::new(),
                last_failure: None,
            },
            rx,
        )
    }

    /// Replaces the listeners new workers inherit (reload), returning the previous ones.
    pub fn replace_listeners(&mut self, listeners: Vec<Listener>) -> Vec<Listener> {
        std::mem::replace(&mut self.ctx.listeners, listeners)
    }

    /// Replaces the compiled plugins new workers inherit (reload), returning the previous ones.
    pub fn replace_plugins(&mut self, plugins: Vec<OwnedFd>) -> Vec<OwnedFd> {
        std::mem::replace(&mut self.ctx.plugins, plugins)
    }

    pub fn listeners(&self) -> &[Listener] {
        &self.ctx.listeners
    }

    /// Starts `count` workers of `epoch` with `config`.
    pub fn start_set(
        &mut self,
        count: usize,
        epoch: u64,
        config: &LoadedConfig,
    ) -> Result<(), String> {
        for worker_id in 0..count as u32 {
            let slot = self
                .master
                .segment
                .claim_slot()
                .ok_or("no free worker status slot (too many workers)")?;
            let mut w = WorkerProc {
                worker_id,
                slot,
                pid: None,
                epoch,
                draining: false,
                started: Instant::now(),
                restarts: 0,
                quick_failures: 0,
                respawn_at: None,
                drain_deadline: None,
            };
            self.ctx
                .spawn(&mut w, config)
                .map_err(|e| format!("cannot start worker {worker_id}: {e}"))?;
            self.workers.push(w);
        }
        Ok(())
    }

    /// Handles a worker's exit: frees a draining worker's slot, schedules a respawn otherwise.
    pub fn on_exit(&mut self, pid: u32, status: &str, stopping: bool) {
        let Some(idx) = self.workers.iter().position(|w| w.pid == Some(pid)) else {
            return;
        };
        let w = &mut self.workers[idx];
        w.pid = None;
        // What the worker said as it stopped, where its own log may not have taken it
        // (cleared: a respawn in the same slot must not inherit it).
        let slot = self.master.segment.slot(w.slot);
        let reason = slot.fatal();
        slot.set_fatal("");
        let said = reason
            .as_ref()
            .map_or(String::new(), |why| format!(" ({why})"));
        if w.draining || stopping {
            tracing::info!(
                "worker {} (pid {pid}, epoch {}) exited: {status}",
                w.worker_id,
                w.epoch
            );
            self.master.free_slot(w.slot);
            self.workers.remove(idx);
            return;
        }
        // Crash-loop backoff only for workers that cannot boot (a plugin failing at start,
        // say): doubling while they keep dying before they serve. A worker that was serving
        // is replaced at once, however short its life, as nginx does — a worker killed over
        // and over from outside must not leave the gateway with none.
        let was_serving = self.master.segment.slot(w.slot).state() == SlotState::Ready;
        if was_serving || w.started.elapsed() >= Duration::from_secs(2) {
            w.quick_failures = 0;
        } else {
            w.quick_failures += 1;
        }
        let delay = match w.quick_failures {
            0 => Duration::ZERO,
            n => Duration::from_millis(100u64 << (n - 1).min(6)).min(Duration::from_secs(5)),
        };
        w.restarts += 1;
        w.respawn_at = Some(Instant::now() + delay);
        self.master.keep_crashed_counters(w.slot);
        let slot = self.master.segment.slot(w.slot);
        slot.pid.store(0, Ordering::Relaxed);
        slot.restarts.store(w.restarts, Ordering::Relaxed);
        slot.set_state(SlotState::Starting);
        tracing::error!(
            "worker {} (pid {pid}) exited unexpectedly: {status}{said}; respawning in {} ms",
            w.worker_id,
            delay.as_millis()
        );
        if reason.is_some() {
            self.last_failure = reason;
        }
    }

    /// Respawns workers whose backoff ended; kills draining workers past their deadline.
    pub fn tick(&mut self, config: &LoadedConfig) {
        let now = Instant::now();
        for w in self
            .workers
            .iter_mut()
            .filter(|w| w.respawn_at.is_some_and(|t| t <= now))
        {
            if let Err(e) = self.ctx.spawn(w, config) {
                tracing::error!("cannot respawn worker {}: {e}", w.worker_id);
                w.respawn_at = Some(now + Duration::from_secs(1));
            }
        }
        for w in &self.workers {
            if let (Some(pid), Some(deadline)) = (w.pid, w.drain_deadline) {
                if deadline <= now {
                    tracing::warn!(
                        "worker {} (pid {pid}) did not drain in time; killing it",
                        w.worker_id
                    );
                    let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
                }
            }
        }
    }

    /// Whether every worker of `epoch` reports ready.
    pub fn epoch_ready(&self, epoch: u64) -> bool {
        self.workers
            .iter()
            .filter(|w| w.epoch == epoch && !w.draining)
            .all(|w| {
                w.pid.is_some() && self.master.segment.slot(w.slot).state() == SlotState::Ready
            })
    }

    /// Forgets the reason the last worker that stopped on an error gave (before a start).
    pub fn clear_failure(&mut self) {
        self.last_failure = None;
    }

    /// Why workers failed to start, for a refusal: the reason the last worker that stopped
    /// on an error gave, else a pointer to the error log.
    pub fn failure(&mut self) -> String {
        match self.last_failure.take() {
            Some(why) => format!("failed to start: {why}"),
            None => "failed to start; see the error log".into(),
        }
    }

    /// Whether a worker of `epoch` has died (used to abort a reload).
    pub fn epoch_failed(&self, epoch: u64) -> bool {
        self.workers
            .iter()
            .any(|w| w.epoch == epoch && w.pid.is_none())
    }

    /// Asks every worker not of `keep_epoch` to drain and exit.
    pub fn drain_others(&mut self, keep_epoch: u64, timeout: Duration) {
        for w in self
            .workers
            .iter_mut()
            .filter(|w| w.epoch != keep_epoch && !w.draining)
        {
            w.draining = true;
            w.respawn_at = None;
            w.drain_deadline = Some(Instant::now() + timeout + Duration::from_secs(5));
            self.master
                .segment
                .slot(w.slot)
                .set_state(SlotState::Draining);
            match w.pid {
                Some(pid) => {
                    let _ = kill(Pid::from_raw(pid as i32), Signal::SIGQUIT);
                }
                None => self.master.free_slot(w.slot),
            }
        }
        self.workers.retain(|w| w.pid.is_some() || !w.draining);
    }

    /// Kills the workers of `epoch` (a reload that failed to start).
    pub fn abort_epoch(&mut self, epoch: u64) {
        for w in self.workers.iter_mut().filter(|w| w.epoch == epoch) {
            w.draining = true;
            w.respawn_at = None;
            if let Some(pid) = w.pid {
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            } else {
                self.master.free_slot(w.slot);
            }
        }
        self.workers.retain(|w| w.pid.is_some() || w.epoch != epoch);
    }

    /// Sends `signal` to every live worker, changing nothing else (log reopening).
    pub fn signal_live(&self, signal: Signal) {
        for pid in self.workers.iter().filter_map(|w| w.pid) {
            let _ = kill(Pid::from_raw(pid as i32), signal);
        }
    }

    /// Sends `signal` to every live worker.
    pub fn signal_all(&mut self, signal: Signal) {
        for w in &mut self.workers {
            w.respawn_at = None;
            if let Some(pid) = w.pid {
                let _ = kill(Pid::from_raw(pid as i32), signal);
            }
        }
    }

    pub fn live(&self) -> usize {
        self.workers.iter().filter(|w| w.pid.is_some()).count()
    }
}

impl SpawnCtx {
    fn spawn(&self, w: &mut WorkerProc, config: &LoadedConfig) -> std::io::Result<()> {
        let boot = WorkerBoot {
            config_yaml: config.yaml.clone(),
            config_origin: config.origin.clone(),
            prefix: self.prefix.clone(),
            worker_id: w.worker_id,
            slot: w.slot as u32,
            epoch: w.epoch,
            listeners: self.listeners.len() as u32,
            plugins: self.plugins.len() as u32,
            stderr: self.stderr,
        };
        let mut fds: Vec<RawFd> = vec![self.master.segment.fd().as_raw_fd()];
        fds.extend(self.listeners.iter().map(|l| l.fd.as_raw_fd()));
        fds.extend(self.plugins.iter().map(|p| p.as_raw_fd()));
        // Then the plugins' shared memory, the TLS sessions and the nodes' health (see
        // worker/src/lib.rs).
        fds.push(self.plugin_shm.as_raw_fd());
        fds.push(self.tls_sessions.as_raw_fd());
        fds.push(self.health.as_raw_fd());
        let master_pid = std::process::id() as libc::pid_t;
        let mut cmd = tokio::process::Command::new(worker_exe());
        // Told by the environment, not an argument, so that `ps` shows nginx's title alone.
        cmd.arg0("wasmgate: worker process")
            .env(wasmgate_shared::WORKER_ENV, "1")
            .stdin(Stdio::piped())
            .kill_on_drop(false);
        // SAFETY: the closure runs in the forked child before exec and only calls
        // async-signal-safe functions (dup2, prctl, getppid, setpgid, signal) on values
        // captured by move; it allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                for (i, fd) in fds.iter().enumerate() {
                    if libc::dup2(*fd, 3 + i as i32) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                if libc::getppid() != master_pid {
                    libc::_exit(1);
                }
                libc::setpgid(0, 0);
                // Signals meant for the master (a reload, nginx's binary switch) that reach a
                // worker — `pkill -HUP wasmgate` — are ignored, as nginx's workers do. Ignored
                // dispositions survive exec: the worker is immune from its first instruction,
                // while it still loads its plugins too.
                libc::signal(libc::SIGHUP, libc::SIG_IGN);
                libc::signal(libc::SIGUSR2, libc::SIG_IGN);
                // USR1 (reopen the logs) is the worker's too, but its default would end a
                // worker still loading its plugins: ignored until the worker's own handler
                // takes it, after which it reopens its logs once for any it missed.
                libc::signal(libc::SIGUSR1, libc::SIG_IGN);
                Ok(())
            });
        }
        let slot = self.master.segment.slot(w.slot);
        slot.set_state(SlotState::Starting);
        let mut child = cmd.spawn()?;
        let pid = child.id().unwrap_or(0);
        slot.pid.store(pid, Ordering::Relaxed);
        slot.worker_id.store(w.worker_id, Ordering::Relaxed);
        slot.restarts.store(w.restarts, Ordering::Relaxed);
        slot.epoch.store(w.epoch, Ordering::Relaxed);
        slot.started_at_ms.store(crate::now_ms(), Ordering::Relaxed);
        slot.zero_counters();
        let json = serde_json::to_vec(&boot).unwrap_or_default();
        let mut stdin = child.stdin.take();
        let exits = self.exits.clone();
        tokio::spawn(async move {
            if let Some(s) = stdin.as_mut() {
                let _ = s.write_all(&json).await;
            }
            drop(stdin);
            let status = match child.wait().await {
                Ok(s) => describe_exit(s),
                Err(e) => format!("wait failed: {e}"),
            };
            let _ = exits.send((pid, status));
        });
        w.pid = Some(pid);
        w.started = Instant::now();
        w.respawn_at = None;
        tracing::info!(
            "worker {} started (pid {pid}, slot {}, epoch {})",
            w.worker_id,
            w.slot,
            w.epoch
        );
        Ok(())
    }
}

fn describe_exit(s: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(sig)) => format!(
            "killed by signal {}",
            Signal::try_from(sig)
                .map(|s| s.as_str().to_string())
                .unwrap_or(sig.to_string())
        ),
        _ => "unknown status".into(),
    }
}
