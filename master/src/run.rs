//! The master's main loop: signals, worker exits, reload requests, respawn timers.

use crate::listeners;
use crate::state::{Control, LoadedConfig, Master, Reloaded};
use crate::supervisor::Supervisor;
use crate::Options;
use anyhow::Context;
use nix::sys::signal::Signal;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc::UnboundedReceiver;
use wasmgate_shared::config::GatewayConfig;
use wasmgate_shared::plugin_shm::PluginShm;
use wasmgate_shared::shm::Segment;
use wasmgate_shared::tls_sessions::{SessionShm as TlsSessions, TICKET_KEY_LIFETIME};

/// How long new workers may take to report ready before a start or reload is abandoned.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

struct Loop {
    opts: Options,
    master: Arc<Master>,
    sup: Supervisor,
    /// The Admin API's server and the Prometheus export's, moved by a reload that moves them.
    admin: Served,
    metrics: Option<Served>,
    /// The pid file written last (a reload may move it, as nginx's does).
    pid_path: std::path::PathBuf,
    /// The data directory's lock, whose record names the Admin API's address.
    lock: crate::lock::MasterLock,
    exits: UnboundedReceiver<(u32, String)>,
    control: Option<UnboundedReceiver<Control>>,
    signals: Option<Signals>,
}

/// The master's signal handlers, installed before anything can report the gateway ready (the
/// Admin API's status, the daemon's readiness): a signal that arrives during the boot is kept
/// for the main loop instead of killing the master by its default action.
struct Signals {
    hup: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    quit: tokio::signal::unix::Signal,
    usr1: tokio::signal::unix::Signal,
    /// nginx's binary switch, which wasmgate does not have: logged, not fatal (its default
    /// action would end the master and, with it, every worker).
    usr2: tokio::signal::unix::Signal,
    winch: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> std::io::Result<Signals> {
        Ok(Signals {
            hup: signal(SignalKind::hangup())?,
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            quit: signal(SignalKind::quit())?,
            usr1: signal(SignalKind::user_defined1())?,
            usr2: signal(SignalKind::user_defined2())?,
            winch: signal(SignalKind::window_change())?,
        })
    }
}

/// A server of the master's own — the Admin API, the Prometheus export — and the task that
/// accepts its connections. Dropping it stops accepting (the port is free again at once), and
/// its connections close once the request in progress is answered: a client kept alive on
/// the old address is not served there any more (moving the Admin API off an exposed
/// address moves it).
struct Served {
    addr: std::net::SocketAddr,
    accept: tokio::task::AbortHandle,
    /// Dropped with this: its connections close once their request in progress is answered.
    _stop: tokio::sync::watch::Sender<()>,
}

#[derive(Clone, Copy)]
enum Server {
    Admin,
    Metrics,
}

impl Served {
    fn start(
        l: std::net::TcpListener,
        what: Server,
        master: &Arc<Master>,
    ) -> anyhow::Result<Served> {
        l.set_nonblocking(true)?;
        let addr = l.local_addr()?;
        let l = tokio::net::TcpListener::from_std(l)?;
        let master = master.clone();
        let (stop, told) = tokio::sync::watch::channel(());
        let accept = match what {
            Server::Admin => tokio::spawn(crate::admin::http::serve(l, master, told)),
            Server::Metrics => tokio::spawn(crate::metrics::serve(l, master, told)),
        };
        Ok(Served {
            addr,
            accept: accept.abort_handle(),
            _stop: stop,
        })
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

pub fn run(
    opts: Options,
    parts: crate::Parts,
    pid_path: std::path::PathBuf,
    lock: crate::lock::MasterLock,
    readiness: &mut crate::daemon::Readiness,
) -> anyhow::Result<()> {
    let crate::Parts {
        loaded,
        store,
        keys,
        proxy,
        plugins,
        admin,
        metrics,
        etcd,
        notes,
        etcd_read,
    } = parts;
    for note in notes {
        tracing::error!("{note}");
    }
    if let Some(summary) = etcd_read {
        crate::etcd::log_summary(&summary);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the master's runtime")?;
    rt.block_on(async move {
        let signals = Signals::install()?;
        let segment = Arc::new(Segment::create(loaded.config.wasmgate.shm_size)?);
        let plugin_shm = Arc::new(
            PluginShm::create(loaded.config.wasmgate.plugin_shm_size as usize)
                .context("cannot create the plugins' shared memory")?,
        );
        let (control_tx, control_rx) = tokio::sync::mpsc::unbounded_channel();
        let master = Arc::new(Master::new(
            store,
            loaded,
            segment,
            plugin_shm,
            opts.prefix.clone(),
            keys,
            control_tx,
            etcd.clone(),
            crate::health::Checker::new().context("cannot create the health segment")?,
        ));
        master.publish_current().map_err(anyhow::Error::msg)?;
        let admin = Served::start(admin, Server::Admin, &master)?;
        if let Some(etcd) = etcd {
            tokio::spawn(crate::etcd::follow(master.clone(), etcd));
        }
        let metrics = match metrics {
            Some(l) => Some(Served::start(l, Server::Metrics, &master)?),
            None => None,
        };
        let shm_fd = listeners::dup_high(&master.plugin_shm.fd().try_clone_to_owned()?)?;
        let sessions = TlsSessions::create().context("cannot create the TLS session cache")?;
        let sessions_fd = listeners::dup_high(&sessions.fd().try_clone_to_owned()?)?;
        tokio::spawn(rotate_ticket_keys(sessions));
        let health_fd = listeners::dup_high(&master.health.shm().fd().try_clone_to_owned()?)?;
        tokio::spawn(crate::health::run(master.clone()));
        let (sup, exits) = Supervisor::new(
            master.clone(),
            proxy,
            plugins,
            shm_fd,
            (sessions_fd, health_fd),
            opts.prefix.clone(),
            opts.foreground,
        );
        let mut l = Loop {
            opts,
            master,
            sup,
            admin,
            metrics,
            pid_path,
            lock,
            exits,
            control: Some(control_rx),
            signals: Some(signals),
        };
        l.boot().await?;
        readiness.ready();
        let result = l.main().await;
        crate::cli::remove_pid_file(&l.pid_path);
        result
    })
}

/// Gives the workers a new TLS ticket key every [`TICKET_KEY_LIFETIME`] and erases the one
/// before: tickets stop decrypting after two lifetimes, whoever learns a worker's memory later.
async fn rotate_ticket_keys(sessions: TlsSessions) {
    let mut every = tokio::time::interval(TICKET_KEY_LIFETIME);
    every.tick().await;
    loop {
        every.tick().await;
        if let Err(e) = sessions.rotate_ticket_keys() {
            tracing::error!("TLS ticket keys not rotated: {e}");
        }
    }
}

impl Loop {
    async fn boot(&mut self) -> anyhow::Result<()> {
        let admin_addr = self.admin.addr;
        let config = self.master.config();
        for w in config.config.warnings() {
            tracing::warn!("{w}");
        }
        let n = config.config.nginx_config.worker_processes.resolve();
        self.sup
            .start_set(n, 0, &config)
            .map_err(anyhow::Error::msg)?;
        if !self.wait_ready(0).await {
            anyhow::bail!("workers {}", self.sup.failure());
        }
        // The listeners in `proxy_listen`'s order: node_listen's, then the TLS listener's.
        let plain = config.config.apisix.node_listen.len();
        let shown = |l: &[crate::supervisor::Listener]| {
            l.iter()
                .map(|l| l.addr.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let (http, tls) = self
            .sup
            .listeners()
            .split_at(plain.min(self.sup.listeners().len()));
        let tls = match tls.is_empty() {
            true => String::new(),
            false => format!(", TLS on {}", shown(tls)),
        };
        tracing::warn!(
            "wasmgate {} started: {n} workers, proxy on {}{tls}, Admin API on {admin_addr}, \
             config {}",
            wasmgate_shared::VERSION,
            shown(http),
            config.origin
        );
        if config.origin.starts_with('<') {
            // A mistyped `-p` lands here too: say it where the operator looks.
            tracing::warn!(
                "no conf/config.yaml under the prefix {}: running the embedded default \
                 configuration; write that file (or pass -c FILE) to configure this gateway",
                self.master.prefix.display()
            );
        }
        Ok(())
    }

    async fn main(&mut self) -> anyhow::Result<()> {
        let Signals {
            mut hup,
            mut term,
            mut int,
            mut quit,
            mut usr1,
            mut usr2,
            mut winch,
        } = self.signals.take().context("main loop started twice")?;
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        let mut control = self.control.take().context("main loop started twice")?;
        loop {
            tokio::select! {
                _ = hup.recv() => {
                    tracing::warn!("SIGHUP received: reloading configuration");
                    let _ = self.reload().await;
                }
                // The control channel goes first: an Admin API reload asked during the stop
                // gets 503 at once rather than waiting for an answer that never comes.
                _ = term.recv() => { drop(control); return self.stop(false).await }
                _ = int.recv() => { drop(control); return self.stop(false).await }
                _ = quit.recv() => { drop(control); return self.stop(true).await }
                _ = usr2.recv() => {
                    tracing::warn!(
                        "SIGUSR2 ignored: there is no binary switch; upgrade with \
                         `wasmgate stop --graceful` then `wasmgate start` (docs/operations.md)"
                    );
                }
                _ = winch.recv() => {
                    tracing::warn!(
                        "SIGWINCH ignored: the master does not stop its workers on it as \
                         nginx's does; stop gracefully with SIGQUIT (`wasmgate stop --graceful`)"
                    );
                }
                _ = usr1.recv() => {
                    // logrotate moved the files: reopen ours, then the workers' (nginx's way).
                    match wasmgate_shared::logging::reopen() {
                        Ok(()) => tracing::warn!(
                            "SIGUSR1 received: the error log reopened; telling the workers"
                        ),
                        Err(e) => tracing::error!(
                            "SIGUSR1 received: reopening the error log failed: {e}; still \
                             writing to the file it had open; telling the workers"
                        ),
                    }
                    self.sup.signal_live(Signal::SIGUSR1);
                }
                Some(c) = control.recv() => match c {
                    Control::Reload(reply) => {
                        tracing::warn!("reload requested through the Admin API");
                        let _ = reply.send(self.reload().await);
                    }
                    // SIGWINCH: ignored by default, so a worker that has not installed its
                    // handler yet is not harmed (SIGUSR2's default would end it).
                    Control::Published => self.sup.signal_live(Signal::SIGWINCH),
                },
                Some((pid, status)) = self.exits.recv() => self.sup.on_exit(pid, &status, false),
                _ = tick.tick() => self.sup.tick(&self.master.config()),
            }
        }
    }

    /// Waits until every worker of `epoch` is ready; false if one died or time ran out.
    async fn wait_ready(&mut self, epoch: u64) -> bool {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            while let Ok((pid, status)) = self.exits.try_recv() {
                self.sup.on_exit(pid, &status, false);
            }
            if self.sup.epoch_failed(epoch) {
                return false;
            }
            if self.sup.epoch_ready(epoch) {
                return true;
            }
            if Instant::now() >= deadline {
                tracing::error!("workers of epoch {epoch} not ready after {READY_TIMEOUT:?}");
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Re-reads config.yaml and replaces the workers; the old set keeps serving on any error.
    async fn reload(&mut self) -> Result<Reloaded, String> {
        let started_ms = crate::now_ms();
        let result = self.try_reload().await;
        match &result {
            Ok(Reloaded { epoch, .. }) => {
                tracing::warn!("reload applied: epoch {epoch} serving, previous workers draining")
            }
            Err(e) => {
                tracing::error!("reload refused, the previous configuration keeps serving: {e}")
            }
        }
        if result.is_ok() {
            // The commands find this master by the configuration it runs.
            self.lock.set_config(&self.master.config().origin);
        }
        // For `wasmgate reload` when it signalled: it reads the outcome there.
        let outcome = result.as_ref().map(|r| r.epoch).map_err(String::clone);
        if let Err(e) = self.lock.record_reload(started_ms, &outcome) {
            tracing::error!("cannot record the reload's outcome in the data directory's lock: {e}");
        }
        result
    }

    async fn try_reload(&mut self) -> Result<Reloaded, String> {
        let mut new = self.opts.load_config().map_err(|e| e.to_string())?;
        let mut notes = new.config.warnings();
        for w in &notes {
            tracing::warn!("reload: {w}");
        }
        // The stored keys are checked with the new keyring (the new workers open them with
        // it); writes keep sealing with the running one until the reload applies.
        let keyring = Arc::new((new.config.apisix.keyring()).map_err(|e| format!("keyring: {e}"))?);
        // A log file the new workers could not open would only show as workers failing.
        crate::check_logs(&self.opts, &new.config).map_err(|e| format!("{e:#}"))?;
        crate::check_trusted_cas(&self.opts, &new.config).map_err(|e| format!("{e:#}"))?;
        // Off the master's thread: its Admin API is served meanwhile (a Go plugin compiles
        // for seconds).
        let plugins = {
            let (config, opts) = (new.clone(), self.opts.clone());
            tokio::task::spawn_blocking(move || crate::compile_plugins(&config, &opts))
                .await
                .map_err(|e| format!("compiling the plugins: {e}"))??
        };
        wasmgate_shared::keyring::checking_with(keyring.clone(), || {
            crate::admin::objects::check_all(&self.master.store(), &new.catalog())
        })?;
        let old = self.master.config();
        if new.config.wasmgate.shm_size != old.config.wasmgate.shm_size {
            crate::publish::check_shm_size(&self.master.store(), new.config.wasmgate.shm_size)?;
        }
        notes.extend(keep_restart_only(&old, &mut new));
        self.try_etcd_credentials(&old, &new).await?;
        let data_dir = self.opts.resolve(&new.config.wasmgate.data_dir);
        let keys = crate::keys::resolve(&new.config, &data_dir).map_err(|e| format!("{e:#}"))?;
        let moves = self.prepare_moves(&old.config, &new.config)?;
        let listeners = listeners::rebind(self.sup.listeners(), &new.config.apisix.proxy_listen())
            .map_err(|e| format!("{e:#}"));
        let listeners = match listeners {
            Ok(l) => l,
            Err(e) => {
                moves.undo();
                return Err(e);
            }
        };
        let old_listeners = self.sup.replace_listeners(listeners);
        let old_plugins = self.sup.replace_plugins(plugins);
        let epoch = self.master.epoch.load(Ordering::Relaxed) + 1;
        let n = new.config.nginx_config.worker_processes.resolve();
        self.sup.clear_failure();
        let started = self.sup.start_set(n, epoch, &new);
        let ready = match started {
            Ok(()) if self.wait_ready(epoch).await => Ok(()),
            Ok(()) => Err(format!("the new workers {}", self.sup.failure())),
            Err(e) => Err(e),
        };
        // Checked again, and the new plugin list put in place, under the store's lock: an
        // Admin API write while the new workers started was checked against the old list
        // (a route naming a plugin the new config drops would pass, then run without it and
        // make the next start refuse the store). Writes wait for the lock meanwhile.
        let timeout = new.config.nginx_config.worker_shutdown_timeout;
        let log = (
            self.opts.resolve(&new.config.nginx_config.error_log),
            new.config.nginx_config.error_log_level,
        );
        let applied = ready.and_then(|()| {
            let store = self.master.store();
            wasmgate_shared::keyring::checking_with(keyring.clone(), || {
                crate::admin::objects::check_all(&store, &new.catalog())
            })?;
            // Writes seal with the new keyring from here on, as the new workers open with it.
            wasmgate_shared::keyring::install(keyring);
            self.master.set_config(new, keys);
            Ok(())
        });
        if let Err(e) = applied {
            self.sup.abort_epoch(epoch);
            self.sup.replace_listeners(old_listeners);
            self.sup.replace_plugins(old_plugins);
            moves.undo();
            return Err(e);
        }
        self.master.epoch.store(epoch, Ordering::Relaxed);
        self.sup.drain_others(epoch, timeout);
        // The master's own lines follow the new workers' (nginx's master opens the new
        // cycle's error log too); a file that cannot be opened leaves them where they were.
        if let Err(e) = wasmgate_shared::logging::retarget(&log.0, log.1) {
            tracing::error!(
                "reload: the master keeps writing to its previous error log: cannot open {}: {e}",
                log.0.display()
            );
        }
        self.apply_moves(moves);
        Ok(Reloaded { epoch, notes })
    }

    /// A reload's new etcd user or password (or their removal), tried before anything
    /// changes: signed in with and one read of the prefix made. What etcd refuses (the
    /// password, the user's permission, no user while authentication is on) would take a
    /// serving node off etcd, so it refuses the reload and the running ones stay. When no
    /// endpoint can be asked now, the reload goes on with a warning.
    async fn try_etcd_credentials(
        &self,
        old: &LoadedConfig,
        new: &LoadedConfig,
    ) -> Result<(), String> {
        let (Some(etcd), Some(section)) = (&self.master.etcd, &new.config.deployment.etcd) else {
            return Ok(());
        };
        let credentials = section.credentials()?;
        let running = old.config.deployment.etcd.as_ref().map(|s| s.credentials());
        if running == Some(Ok(credentials.clone())) {
            return Ok(());
        }
        match etcd.try_credentials(credentials.as_ref()).await {
            Ok(()) => Ok(()),
            Err(e @ crate::etcd::EtcdError::Auth { .. }) => {
                Err(format!("{e}; the running user and password are kept"))
            }
            Err(e) => {
                tracing::warn!(
                    "reload: the new etcd user and password could not be tried ({e}); taken as \
                     they are"
                );
                Ok(())
            }
        }
    }

    /// Binds the Admin API's and the Prometheus export's new addresses and writes the new pid
    /// file, before any worker starts: a reload that cannot do them is refused whole.
    fn prepare_moves(&self, old: &GatewayConfig, new: &GatewayConfig) -> Result<Moves, String> {
        let mut moves = Moves::default();
        let admin = new.deployment.admin.admin_listen.addr();
        if admin != old.deployment.admin.admin_listen.addr() {
            let l = listeners::bind(admin).map_err(|e| {
                format!("cannot listen on {admin} (deployment.admin.admin_listen): {e}")
            })?;
            moves.admin = Some(l);
        }
        let export = |c: &GatewayConfig| {
            let p = &c.plugin_attr.prometheus;
            p.enable_export_server.then(|| p.export_addr.addr())
        };
        if export(old) != export(new) {
            moves.metrics = Some(match export(new) {
                None => None,
                Some(addr) => Some(listeners::bind(addr).map_err(|e| {
                    format!("cannot listen on {addr} (plugin_attr.prometheus.export_addr): {e}")
                })?),
            });
        }
        let pid_path = self.opts.resolve(&new.wasmgate.pid_file);
        if pid_path != self.pid_path {
            let data_dir = self.opts.resolve(&new.wasmgate.data_dir);
            crate::lock::check_pid_file(&pid_path, &data_dir)?;
            moves.made_dirs = write_pid_file(&pid_path)?;
            moves.pid_path = Some(pid_path);
        }
        Ok(moves)
    }

    /// Puts a reload's moves in place once its workers serve.
    fn apply_moves(&mut self, moves: Moves) {
        let Moves {
            admin,
            metrics,
            pid_path,
            ..
        } = moves;
        if let Some(l) = admin {
            match Served::start(l, Server::Admin, &self.master) {
                Ok(served) => {
                    tracing::warn!(
                        "reload: the Admin API moved from {} to {}",
                        self.admin.addr,
                        served.addr
                    );
                    self.admin = served;
                    if let Err(e) = self.lock.record(self.admin.addr) {
                        tracing::error!(
                            "reload: cannot record the Admin API's address in the data \
                             directory's lock ({e}): the command line asks config.yaml's"
                        );
                    }
                }
                Err(e) => tracing::error!("reload: the Admin API stays where it was: {e:#}"),
            }
        }
        if let Some(l) = metrics {
            // The old server stops first: its replacement listens elsewhere already.
            self.metrics = None;
            match l.map(|l| Served::start(l, Server::Metrics, &self.master)) {
                None => tracing::warn!("reload: the Prometheus export server stopped"),
                Some(Ok(served)) => {
                    tracing::warn!(
                        "reload: the Prometheus export server listens on {}",
                        served.addr
                    );
                    self.metrics = Some(served);
                }
                Some(Err(e)) => {
                    tracing::error!("reload: the Prometheus export server stopped: {e:#}")
                }
            }
        }
        if let Some(path) = pid_path {
            crate::cli::remove_pid_file(&self.pid_path);
            tracing::warn!(
                "reload: the pid file moved from {} to {}",
                self.pid_path.display(),
                path.display()
            );
            self.pid_path = path;
        } else if crate::cli::running_pid(&self.pid_path) != Some(std::process::id() as i32) {
            // Removed (or overwritten) since: a reload writes it again, as the command line
            // says when it finds the master through the data directory's lock instead.
            match write_pid_file(&self.pid_path) {
                Ok(_) => tracing::warn!(
                    "reload: the pid file {} did not name this master: written again",
                    self.pid_path.display()
                ),
                Err(e) => tracing::error!("reload: {e}"),
            }
        }
    }

    /// Stops the workers (gracefully: let them drain) and returns.
    async fn stop(&mut self, graceful: bool) -> anyhow::Result<()> {
        let (sig, grace) = if graceful {
            (
                Signal::SIGQUIT,
                self.master
                    .config()
                    .config
                    .nginx_config
                    .worker_shutdown_timeout
                    + Duration::from_secs(5),
            )
        } else {
            (Signal::SIGTERM, Duration::from_secs(5))
        };
        tracing::warn!(
            "{} stop: signalling {} workers",
            if graceful { "graceful" } else { "fast" },
            self.sup.live()
        );
        self.sup.signal_all(sig);
        let deadline = Instant::now() + grace;
        while self.sup.live() > 0 && Instant::now() < deadline {
            if let Ok(Some((pid, status))) =
                tokio::time::timeout(Duration::from_millis(100), self.exits.recv()).await
            {
                self.sup.on_exit(pid, &status, true);
            }
        }
        if self.sup.live() > 0 {
            tracing::warn!(
                "killing {} workers that did not stop in time",
                self.sup.live()
            );
            self.sup.signal_all(Signal::SIGKILL);
        }
        tracing::warn!("wasmgate stopped");
        Ok(())
    }
}

/// What a reload moves besides its workers, prepared before they start (listeners bound, the
/// pid file written) and put in place once they serve — or undone.
#[derive(Default)]
struct Moves {
    /// The Admin API's new listener, when `admin_listen` changed.
    admin: Option<std::net::TcpListener>,
    /// When the Prometheus export changed: its new listener, or None to stop it.
    metrics: Option<Option<std::net::TcpListener>>,
    /// The new pid file, already written.
    pid_path: Option<std::path::PathBuf>,
    /// The folders made for it, deepest first.
    made_dirs: Vec<std::path::PathBuf>,
}

impl Moves {
    /// A refused reload: the new listeners close with the drop, the new pid file goes.
    fn undo(self) {
        if let Some(path) = &self.pid_path {
            crate::cli::remove_pid_file(path);
        }
        remove_empty(&self.made_dirs);
    }
}

/// Writes this process's pid to `path`, refusing to take over another live master's file.
/// Returns the folders it made for it, deepest first (removed again when it fails).
fn write_pid_file(path: &std::path::Path) -> Result<Vec<std::path::PathBuf>, String> {
    let ours = std::process::id() as i32;
    if let Some(pid) = crate::cli::running_pid(path).filter(|p| *p != ours) {
        return Err(format!(
            "wasmgate.pid_file {} names another running master (pid {pid})",
            path.display()
        ));
    }
    let made: Vec<_> = path
        .ancestors()
        .skip(1)
        .take_while(|d| !d.as_os_str().is_empty() && !d.exists())
        .map(std::path::Path::to_path_buf)
        .collect();
    let written = match path.parent() {
        Some(dir) => std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {} (wasmgate.pid_file): {e}", dir.display())),
        None => Ok(()),
    }
    .and_then(|()| {
        std::fs::write(path, format!("{ours}\n")).map_err(|e| {
            format!(
                "cannot write pid file {} (wasmgate.pid_file): {e}",
                path.display()
            )
        })
    });
    match written {
        Ok(()) => Ok(made),
        Err(e) => {
            remove_empty(&made);
            Err(e)
        }
    }
}

/// Removes folders a refused reload made, deepest first, each only if still empty.
fn remove_empty(dirs: &[std::path::PathBuf]) {
    for dir in dirs {
        let _ = std::fs::remove_dir(dir);
    }
}

/// Settings a reload cannot change in place — what lives in the master's shared memory and
/// its store — : say so, and keep the running values, so that nothing of them applies
/// half-way.
fn keep_restart_only(old: &LoadedConfig, new: &mut LoadedConfig) -> Option<String> {
    let (o, n) = (&old.config, &mut new.config);
    let mut changed = Vec::new();
    // The etcd user and password apply at once (`Master::set_config`): a password rotated in
    // etcd is then followed with a reload. Where the objects live does not change in place.
    let mut etcd = o.deployment.etcd.clone();
    match (&mut etcd, &n.deployment.etcd) {
        (Some(kept), Some(new)) => {
            kept.user = new.user.clone();
            kept.password = new.password.clone();
            for (key, differs) in [
                ("deployment.etcd.host", kept.host != new.host),
                ("deployment.etcd.prefix", kept.prefix != new.prefix),
                ("deployment.etcd.timeout", kept.timeout != new.timeout),
            ] {
                if differs {
                    changed.push(key);
                }
            }
        }
        (None, None) => {}
        _ => changed.push("deployment.etcd"),
    }
    let (ow, nw) = (&o.wasmgate, &mut n.wasmgate);
    for (name, differs) in [
        ("wasmgate.shm_size", ow.shm_size != nw.shm_size),
        (
            "wasmgate.plugin_shm_size",
            ow.plugin_shm_size != nw.plugin_shm_size,
        ),
        ("wasmgate.data_dir", ow.data_dir != nw.data_dir),
    ] {
        if differs {
            changed.push(name);
        }
    }
    let note = (!changed.is_empty()).then(|| {
        format!(
            "changes to {} take effect at the next restart",
            changed.join(", ")
        )
    });
    if let Some(note) = &note {
        tracing::warn!("reload: {note}");
    }
    n.deployment.etcd = etcd;
    nw.shm_size = ow.shm_size;
    nw.plugin_shm_size = ow.plugin_shm_size;
    nw.data_dir = ow.data_dir.clone();
    note
}
