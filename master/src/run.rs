//! The master's main loop: signals, worker exits, reload requests, respawn timers.

use crate::listeners;
use crate::state::{Control, LoadedConfig, Master};
use crate::supervisor::Supervisor;
use crate::Options;
use anyhow::Context;
use nix::sys::signal::Signal;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc::UnboundedReceiver;
use wasmgate_shared::plugin_shm::PluginShm;
use wasmgate_shared::shm::Segment;

/// How long new workers may take to report ready before a start or reload is abandoned.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

struct Loop {
    opts: Options,
    master: Arc<Master>,
    sup: Supervisor,
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
        })
    }
}

pub fn run(
    opts: Options,
    parts: crate::Parts,
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
    } = parts;
    for note in notes {
        tracing::error!("{note}");
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
        ));
        master.publish_current().map_err(anyhow::Error::msg)?;
        admin.set_nonblocking(true)?;
        let admin_addr = admin.local_addr()?;
        let admin = tokio::net::TcpListener::from_std(admin)?;
        tokio::spawn(crate::admin::http::serve(admin, master.clone()));
        if let Some(etcd) = etcd {
            tokio::spawn(crate::etcd::follow(master.clone(), etcd));
        }
        if let Some(l) = metrics {
            l.set_nonblocking(true)?;
            let l = tokio::net::TcpListener::from_std(l)?;
            tokio::spawn(crate::metrics::serve(l, master.clone()));
        }
        let shm_fd = listeners::dup_high(&master.plugin_shm.fd().try_clone_to_owned()?)?;
        let (sup, exits) = Supervisor::new(
            master.clone(),
            proxy,
            plugins,
            shm_fd,
            opts.prefix.clone(),
            opts.foreground,
        );
        let mut l = Loop {
            opts,
            master,
            sup,
            exits,
            control: Some(control_rx),
            signals: Some(signals),
        };
        l.boot(admin_addr).await?;
        readiness.ready();
        l.main().await
    })
}

impl Loop {
    async fn boot(&mut self, admin_addr: std::net::SocketAddr) -> anyhow::Result<()> {
        let config = self.master.config();
        let n = config.config.nginx_config.worker_processes.resolve();
        self.sup
            .start_set(n, 0, &config)
            .map_err(anyhow::Error::msg)?;
        if !self.wait_ready(0).await {
            anyhow::bail!("workers failed to start; see the error log");
        }
        let proxy: Vec<String> = self
            .sup
            .listeners()
            .iter()
            .map(|l| l.addr.to_string())
            .collect();
        tracing::warn!(
            "wasmgate {} started: {n} workers, proxy on {}, Admin API on {admin_addr}, config {}",
            wasmgate_shared::VERSION,
            proxy.join(", "),
            config.origin
        );
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
                _ = usr1.recv() => {
                    // logrotate moved the files: reopen ours, then the workers' (nginx's way).
                    if let Err(e) = wasmgate_shared::logging::reopen() {
                        tracing::error!("reopening the error log failed: {e}");
                    }
                    tracing::warn!("SIGUSR1 received: logs reopened; telling the workers");
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
    async fn reload(&mut self) -> Result<u64, String> {
        let result = self.try_reload().await;
        match &result {
            Ok(epoch) => {
                tracing::warn!("reload applied: epoch {epoch} serving, previous workers draining")
            }
            Err(e) => {
                tracing::error!("reload refused, the previous configuration keeps serving: {e}")
            }
        }
        result
    }

    async fn try_reload(&mut self) -> Result<u64, String> {
        let mut new = self.opts.load_config().map_err(|e| e.to_string())?;
        let plugins = crate::compile_plugins(&new, &self.opts)?;
        crate::admin::objects::check_all(&self.master.store(), &new.catalog())?;
        keep_restart_only(&self.master.config(), &mut new);
        let listeners = listeners::rebind(self.sup.listeners(), &new.config.apisix.node_listen)
            .map_err(|e| format!("{e:#}"))?;
        let old_listeners = self.sup.replace_listeners(listeners);
        let old_plugins = self.sup.replace_plugins(plugins);
        let epoch = self.master.epoch.load(Ordering::Relaxed) + 1;
        let n = new.config.nginx_config.worker_processes.resolve();
        let started = self.sup.start_set(n, epoch, &new);
        let ready = match started {
            Ok(()) if self.wait_ready(epoch).await => Ok(()),
            Ok(()) => Err("the new workers failed to start; see the error log".into()),
            Err(e) => Err(e),
        };
        // Checked again, and the new plugin list put in place, under the store's lock: an
        // Admin API write while the new workers started was checked against the old list
        // (a route naming a plugin the new config drops would pass, then run without it and
        // make the next start refuse the store). Writes wait for the lock meanwhile.
        let timeout = new.config.nginx_config.worker_shutdown_timeout;
        let applied = ready.and_then(|()| {
            let store = self.master.store();
            crate::admin::objects::check_all(&store, &new.catalog())?;
            self.master.set_config(new);
            Ok(())
        });
        if let Err(e) = applied {
            self.sup.abort_epoch(epoch);
            self.sup.replace_listeners(old_listeners);
            self.sup.replace_plugins(old_plugins);
            return Err(e);
        }
        self.master.epoch.store(epoch, Ordering::Relaxed);
        self.sup.drain_others(epoch, timeout);
        Ok(epoch)
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

/// Settings a reload cannot change in place: say so, and keep the running values in the
/// master's configuration, so that nothing of them applies half-way (a reload that turned
/// `admin_key_required` off opened the Admin API at once while its keys waited).
fn keep_restart_only(old: &LoadedConfig, new: &mut LoadedConfig) {
    warn_restart_only(old, new);
    let (o, n) = (&old.config, &mut new.config);
    n.deployment.admin = o.deployment.admin.clone();
    n.deployment.etcd = o.deployment.etcd.clone();
    n.wasmgate = o.wasmgate.clone();
}

/// Names the restart-only settings a reload changed.
fn warn_restart_only(old: &LoadedConfig, new: &LoadedConfig) {
    let (o, n) = (&old.config, &new.config);
    let mut changed = Vec::new();
    if o.deployment.admin != n.deployment.admin {
        changed.push("deployment.admin");
    }
    if o.wasmgate != n.wasmgate {
        changed.push("wasmgate");
    }
    if o.deployment.etcd != n.deployment.etcd {
        changed.push("deployment.etcd");
    }
    if o.nginx_config.error_log != n.nginx_config.error_log {
        changed.push("nginx_config.error_log (of the master's own lines; new workers use it)");
    }
    if o.nginx_config.error_log_level != n.nginx_config.error_log_level {
        changed
            .push("nginx_config.error_log_level (of the master's own lines; new workers use it)");
    }
    let (op, np) = (&o.plugin_attr.prometheus, &n.plugin_attr.prometheus);
    if op.enable_export_server != np.enable_export_server || op.export_addr != np.export_addr {
        changed.push("plugin_attr.prometheus.export_addr");
    }
    if !changed.is_empty() {
        tracing::warn!(
            "reload: changes to {} take effect at the next restart",
            changed.join(", ")
        );
    }
}
