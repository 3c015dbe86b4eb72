//! The wasmgate worker process: one single-threaded async runtime serving proxy traffic.
//!
//! - [`live`]: the configuration snapshot from shared memory, compiled into a [`router`];
//! - [`server`]: accepting and serving client connections, draining on reload;
//! - [`proxy`]: the phases of one request, from route match to access log;
//! - [`plugins`], [`wasm_glue`]: the Proxy-Wasm plugins and how requests run through them;
//! - [`upstream`]: balancing, connection pooling and forwarding;
//! - [`access_log`], [`traffic`], [`body`]: the log phase (access log, route statistics) and
//!   body plumbing.

pub mod access_log;
pub mod body;
pub mod callout;
pub mod live;
pub mod plugins;
pub mod proxy;
pub mod router;
pub mod server;
pub mod traffic;
pub mod tunnel;
pub mod upstream;
pub mod wasm_body;
pub mod wasm_glue;

use anyhow::Context;
use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::signal::unix::{signal, SignalKind};
use wasmgate_shared::config::GatewayConfig;
use wasmgate_shared::shm::{Segment, SlotState};
use wasmgate_shared::snapshot::WorkerBoot;

/// Maps whose keys come from the configuration (route paths and ids, plugin names, node
/// addresses), never from the network: a fast hash instead of SipHash's flooding resistance.
/// A request only looks keys up (the router with its path), which cannot make them collide.
pub(crate) type FastMap<K, V> = foldhash::HashMap<K, V>;

/// `make()`'s value in a new box, written there directly. `Box::new(value)` builds the value
/// first, on the stack, and copies it into the box made after; here the box exists first, so
/// the compiler builds the value in it. It matters for large values made once per request:
/// a request's future (about 3 KB, most of it room for later phases) cost a 340-instruction
/// copy (docs/BENCHMARKS.md §6).
/// Locks `m`, whether or not a thread panicked holding it: the worker's shared state stays
/// usable (each holder leaves it whole between statements).
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub(crate) fn boxed_in_place<T>(make: impl FnOnce() -> T) -> Box<T> {
    Box::write(Box::new_uninit(), make())
}

/// State shared by every connection of this worker.
pub struct Worker {
    pub live: live::Live,
    pub plugins: Arc<plugins::Plugins>,
    pub pool: Arc<upstream::pool::Pool>,
    pub access_log: access_log::AccessLog,
    pub segment: Arc<Segment>,
    pub slot: usize,
    pub max_body_size: u64,
    /// Largest request head (request line and fields, as received); larger → 431.
    pub max_header_size: usize,
    /// `client_header_timeout`: a request head must come whole within it, counted from the
    /// connection's start for the first request and from its first bytes for the next ones.
    pub header_timeout: Duration,
    /// `keepalive_timeout`: how long a connection may stay idle between requests; zero turns
    /// keep-alive off (every answer closes its connection), as in nginx.
    pub keepalive_timeout: Duration,
    /// `client_body_timeout`: the longest wait for the next piece of a request body.
    pub body_timeout: Duration,
    /// `send_timeout`: the longest a client may leave its answer untaken before the
    /// connection closes.
    pub send_timeout: Duration,
    /// Set once the master asked this worker to drain.
    pub draining: AtomicBool,
    /// Set when `worker_shutdown_timeout` ran out with requests still open: they are cut by
    /// the gateway, not abandoned by their clients (logged 444, not 499).
    pub cutting: AtomicBool,
    /// Per-route status, latency and bandwidth statistics.
    pub traffic: traffic::Traffic,
    /// `apisix.trusted_addresses`: clients whose `X-Forwarded-Proto`, `-Host` and `-Port` go
    /// upstream as they came.
    pub trusted: wasmgate_shared::model::vars::CidrList,
    /// `real_ip_from` and its header: who may name the client (`proxy::RealIp`).
    pub real_ip: Option<proxy::RealIp>,
    /// The listeners' ports as header text (`X-Forwarded-Port`), made once.
    pub listener_ports: Vec<(u16, http::HeaderValue)>,
}

impl Worker {
    /// `port` as `X-Forwarded-Port` writes it.
    pub fn listener_port(&self, port: u16) -> http::HeaderValue {
        match self.listener_ports.iter().find(|(p, _)| *p == port) {
            Some((_, v)) => v.clone(),
            None => http::HeaderValue::from(port),
        }
    }
}

/// `wasmgate worker`: started by the master only.
pub fn run() -> anyhow::Result<()> {
    let mut input = Vec::new();
    std::io::stdin()
        .take(64 << 20)
        .read_to_end(&mut input)
        .context("reading boot parameters")?;
    let boot: WorkerBoot = serde_json::from_slice(&input)
        .context("this command is started by the wasmgate master, not by hand")?;
    let config = GatewayConfig::parse(&boot.config_yaml, &boot.config_origin)?;
    wasmgate_shared::keyring::install_from(&config);
    let log_path = boot.prefix.join(&config.nginx_config.error_log);
    let role = format!("worker-{}", boot.worker_id);
    wasmgate_shared::logging::init(
        &log_path,
        config.nginx_config.error_log_level,
        &role,
        boot.stderr,
    )?;
    // What `top`, `pidof` and `ps -C` show: the executable's name would be `exe` (workers
    // start from /proc/self/exe). Fifteen bytes at most.
    let _ = nix::sys::prctl::set_name(c"wasmgate-worker");
    // SAFETY: the master placed the shared-memory memfd at fd 3 and the listeners at 4, 5, …
    // (see master/src/supervisor.rs); nothing else in this process owns those numbers.
    let segment = Arc::new(Segment::open(unsafe { OwnedFd::from_raw_fd(3) })?);
    let listeners: Vec<std::net::TcpListener> = (0..boot.listeners as i32)
        // SAFETY: as above, fds 4.. are the inherited listening sockets.
        .map(|i| unsafe { std::net::TcpListener::from_raw_fd(4 + i) })
        .collect();
    let first_plugin = 4 + boot.listeners as i32;
    let artifacts: Vec<std::fs::File> = (0..boot.plugins as i32)
        // SAFETY: the master placed one compiled-module memfd per plugin after the listeners.
        .map(|i| unsafe { std::fs::File::from_raw_fd(first_plugin + i) })
        .collect();
    // SAFETY: the plugins' shared memory follows the plugin memfds (master/src/supervisor.rs).
    let plugin_shm = unsafe { OwnedFd::from_raw_fd(first_plugin + boot.plugins as i32) };
    let plugin_shm = wasmgate_shared::plugin_shm::PluginShm::open(plugin_shm)
        .context("mapping the plugins' shared memory")?;
    wasmgate_wasm::shared::install(Arc::new(plugin_shm));
    // SAFETY: then the TLS sessions segment (master/src/supervisor.rs).
    let sessions = unsafe { OwnedFd::from_raw_fd(first_plugin + boot.plugins as i32 + 1) };
    let sessions = wasmgate_shared::tls_sessions::SessionShm::open(sessions)
        .context("mapping the TLS session cache")?;
    server::tls::share_sessions(Arc::new(sessions));
    // SAFETY: and the nodes' health after them (master/src/supervisor.rs).
    let health = unsafe { OwnedFd::from_raw_fd(first_plugin + boot.plugins as i32 + 2) };
    let health = wasmgate_shared::health::HealthShm::open(health)
        .context("mapping the nodes' health segment")?;
    upstream::health::install(health);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let slot = boot.slot as usize;
    let result = rt.block_on(serve(boot, config, segment.clone(), listeners, artifacts));
    if let Err(e) = &result {
        tracing::error!("worker stopped on error: {e:#}");
        // For the master to say too: this error may be that the error log cannot be opened.
        segment.slot(slot).set_fatal(&format!("{e:#}"));
    }
    result
}

async fn serve(
    boot: WorkerBoot,
    config: GatewayConfig,
    segment: Arc<Segment>,
    listeners: Vec<std::net::TcpListener>,
    artifacts: Vec<std::fs::File>,
) -> anyhow::Result<()> {
    let http = &config.nginx_config.http;
    let slot = boot.slot as usize;
    upstream::tls::configure(boot.prefix.clone(), config.apisix.ssl.trusted_cas());
    server::tls::configure(&config.apisix.ssl);
    let w = Arc::new(Worker {
        live: live::Live::new(segment.clone(), slot),
        plugins: Arc::new(plugins::Plugins::load(
            &config,
            &artifacts,
            Some((segment.clone(), slot)),
        )?),
        pool: upstream::pool::Pool::new(http.upstream_keepalive, http.upstream_keepalive_timeout),
        access_log: access_log::AccessLog::open(
            &boot.prefix,
            &http.access_log,
            &http.access_log_format,
            http.access_log_format_escape,
        )
        .with_context(|| format!("cannot open access log {}", http.access_log))?,
        segment: segment.clone(),
        slot,
        max_body_size: http.client_max_body_size,
        max_header_size: http.client_max_header_size as usize,
        header_timeout: http.client_header_timeout.max(Duration::from_millis(100)),
        keepalive_timeout: http.keepalive_timeout,
        body_timeout: http.client_body_timeout.max(Duration::from_millis(100)),
        send_timeout: http.send_timeout.max(Duration::from_millis(100)),
        draining: AtomicBool::new(false),
        cutting: AtomicBool::new(false),
        traffic: traffic::Traffic::new(segment.clone(), slot),
        // Checked when the configuration was loaded.
        trusted: wasmgate_shared::model::vars::CidrList::parse(&config.apisix.trusted_addresses),
        real_ip: proxy::RealIp::new(http),
        listener_ports: (config.apisix.proxy_listen().iter())
            .map(|l| (l.0.port(), http::HeaderValue::from(l.0.port())))
            .collect(),
    });
    let (drain_tx, drain_rx) = tokio::sync::watch::channel(false);
    // The master passes node_listen's sockets, then the TLS listener's (`apisix.ssl.listen`).
    let plain = config.apisix.node_listen.len();
    for (i, l) in listeners.into_iter().enumerate() {
        l.set_nonblocking(true)?;
        let l = tokio::net::TcpListener::from_std(l)?;
        tokio::spawn(server::accept_loop(
            w.clone(),
            l,
            i >= plain,
            drain_rx.clone(),
        ));
    }
    tokio::spawn(housekeeping(w.clone()));
    w.plugins
        .set_callout(Arc::new(callout::WorkerCallout::new(Arc::downgrade(&w))));
    tokio::spawn(w.plugins.clone().tick_loop());
    // The handlers first: a signal the master sends once this worker is ready finds them.
    let mut quit = signal(SignalKind::quit())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut usr1 = signal(SignalKind::user_defined1())?;
    let mut published = signal(SignalKind::window_change())?;
    // HUP and USR2 are the master's: ignored here from the start (master/src/supervisor.rs).
    // USR1 was ignored until now: a rotation while the plugins loaded is caught up with
    // (quietly: a failure keeps the file the worker opened, as the next USR1 will say).
    let _ = wasmgate_shared::logging::reopen();
    let _ = w.access_log.reopen();
    let s = segment.slot(slot);
    if s.state() == SlotState::Starting {
        s.set_state(SlotState::Ready);
    }
    tracing::info!(
        "worker {} ready (slot {slot}, epoch {})",
        boot.worker_id,
        boot.epoch
    );

    loop {
        tokio::select! {
            _ = quit.recv() => break,
            // The master published a new configuration: apply it now rather than on the
            // next request.
            _ = published.recv() => { w.live.current(); }
            _ = term.recv() => { w.traffic.draining(); w.access_log.flush(); return Ok(()); }
            _ = int.recv() => { w.traffic.draining(); w.access_log.flush(); return Ok(()); }
            _ = usr1.recv() => reopen_logs(&w),
        }
    }
    // Graceful: stop accepting, let connections finish, then exit.
    w.draining.store(true, Ordering::Relaxed);
    w.traffic.draining();
    let _ = drain_tx.send(true);
    let deadline = Instant::now() + config.nginx_config.worker_shutdown_timeout;
    // A draining worker still writes its logs: it reopens them when told, as the others do.
    while s.active_connections.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            _ = term.recv() => break,
            _ = usr1.recv() => reopen_logs(&w),
        }
    }
    let open = s.active_connections.load(Ordering::Relaxed);
    if open > 0 {
        w.cutting.store(true, Ordering::Relaxed);
        tracing::warn!(
            "worker {}: worker_shutdown_timeout ran out with {open} connections open: their \
             requests are cut",
            boot.worker_id
        );
    }
    // The plugins finish as in Envoy at shutdown: `proxy_on_done` on every root context; one
    // with work left (a last flush) has what is left of worker_shutdown_timeout to call
    // `proxy_done`, its ticks and call-outs running meanwhile.
    w.plugins.finish_all(deadline);
    let finishing = w.plugins.finishing();
    if finishing > 0 {
        tracing::info!(
            "worker {}: waiting for {finishing} plugin contexts to call proxy_done",
            boot.worker_id
        );
    }
    while w.plugins.finishing() > 0 && Instant::now() < deadline {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(10)) => {}
            _ = term.recv() => break,
            _ = usr1.recv() => reopen_logs(&w),
        }
    }
    let left = w.plugins.finishing();
    if left > 0 {
        tracing::warn!(
            "worker {}: {left} plugin contexts had not called proxy_done",
            boot.worker_id
        );
    }
    w.access_log.flush();
    tracing::info!("worker {} drained, exiting", boot.worker_id);
    Ok(())
}

/// SIGUSR1: reopen the error and access logs by their paths (logrotate moved the files).
fn reopen_logs(w: &Worker) {
    // Each failure says so, and which file is kept open; only both done says "reopened".
    let error_log = wasmgate_shared::logging::reopen().map_err(|e| {
        tracing::error!("reopening the error log failed: {e}; still writing to the old file")
    });
    let access_log = w.access_log.reopen().map_err(|e| {
        tracing::error!("reopening the access log failed: {e}; still writing to the old file")
    });
    if error_log.is_ok() && access_log.is_ok() {
        tracing::info!("logs reopened");
    }
}

/// Keeps the generation seen current while idle, finishes the plugin contexts of routes and
/// global rules a new generation removed or changed, and flushes the access log.
async fn housekeeping(w: Arc<Worker>) {
    let mut tick = tokio::time::interval(access_log::FLUSH_EVERY);
    let mut seen = None;
    loop {
        tick.tick().await;
        let cfg = w.live.current();
        let changed = seen != Some(cfg.generation) || w.plugins.roots_added();
        if changed && !w.plugins.is_empty() {
            seen = Some(cfg.generation);
            // A route that cannot serve (its plugin config is gone) runs no plugin: its
            // contexts are finished as a deleted route's, not kept until it is written again.
            let owners: foldhash::HashSet<&str> = cfg
                .router
                .routes()
                .filter(|r| r.broken.is_none())
                .map(|r| &*r.owner)
                .chain(cfg.global_rules.iter().map(|g| &*g.owner))
                .collect();
            w.plugins
                .retire_gone(&owners, |object| w.live.has_object(object));
        }
        w.access_log.flush();
    }
}
