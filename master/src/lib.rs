//! The wasmgate master process.
//!
//! It owns the configuration and the object store, serves the Admin API, publishes snapshots
//! to shared memory and supervises the workers. The flow, step by step, is written down in
//! `docs/ARCHITECTURE.md`; [`start`] is where it begins.

pub mod admin;
pub mod cli;
mod daemon;
pub mod etcd;
pub mod health;
mod keys;
mod listeners;
mod lock;
pub mod metrics;
pub mod prom_text;
mod publish;
pub mod retired;
mod run;
pub mod state;
pub mod store;
pub mod supervisor;

use anyhow::{bail, Context};
use state::LoadedConfig;
use std::path::{Path, PathBuf};
use wasmgate_shared::config::{ConfigError, GatewayConfig, EMBEDDED_DEFAULT};

/// Command-line options shared by `start`, `stop`, `reload` and `status`.
#[derive(Debug, Clone)]
pub struct Options {
    /// The prefix directory: logs, data and the default config live under it.
    pub prefix: PathBuf,
    /// An explicit config.yaml (default: `<prefix>/conf/config.yaml`, else the embedded one).
    pub config: Option<PathBuf>,
    /// Stay in the foreground, logging to stderr too.
    pub foreground: bool,
}

impl Options {
    /// The config file that applies, if any (None: the embedded default).
    fn config_path(&self) -> Option<PathBuf> {
        if let Some(c) = &self.config {
            return Some(self.prefix.join(c));
        }
        let p = self.prefix.join("conf/config.yaml");
        p.exists().then_some(p)
    }

    /// Reads and validates the configuration that applies.
    pub fn load_config(&self) -> Result<LoadedConfig, ConfigError> {
        match self.config_path() {
            Some(path) => {
                let yaml = std::fs::read_to_string(&path)
                    .map_err(|e| ConfigError(format!("{}: cannot read: {e}", path.display())))?;
                let origin = path.display().to_string();
                let config = GatewayConfig::parse(&yaml, &origin)?;
                Ok(LoadedConfig {
                    config,
                    yaml,
                    origin,
                })
            }
            None => {
                let origin = "<embedded conf/config.yaml>".to_string();
                let config = GatewayConfig::parse(EMBEDDED_DEFAULT, &origin)?;
                Ok(LoadedConfig {
                    config,
                    yaml: EMBEDDED_DEFAULT.to_string(),
                    origin,
                })
            }
        }
    }

    pub fn resolve(&self, p: &Path) -> PathBuf {
        self.prefix.join(p)
    }
}

/// The compiled form of each plugin file the last successful start or reload used, by the
/// file's bytes: a reload that leaves a file as it was does not compile it again (a Go plugin
/// takes seconds to compile). The engine is the process's own, so the code stays valid.
static LAST_COMPILED: std::sync::Mutex<Vec<Compiled>> = std::sync::Mutex::new(Vec::new());

/// A plugin file's bytes, whether it is compiled with interruption checks (the engine), and
/// its compiled code.
type Compiled = (Vec<u8>, bool, std::sync::Arc<Vec<u8>>);

/// Compiles and checks every `wasm.plugins` module (readable, valid, ABI marker, every import
/// known), so a bad plugin stops `start` or `reload` with a message naming it. Returns, per
/// plugin, a memfd holding the compiled module: workers load it without compiling again (a file
/// listed by several plugins is compiled once, and a file unchanged since the last start or
/// reload is not compiled again).
pub fn compile_plugins(
    config: &LoadedConfig,
    opts: &Options,
) -> Result<Vec<std::os::fd::OwnedFd>, String> {
    use std::sync::Arc;
    let level = config.config.nginx_config.error_log_level;
    // Held to the end, not copied: the master compiles on one thread.
    let mut last = LAST_COMPILED.lock().unwrap_or_else(|e| e.into_inner());
    let mut now: Vec<(Compiled, std::os::fd::OwnedFd)> = Vec::new();
    let mut out = Vec::new();
    for p in &config.config.wasm.plugins {
        let path = opts.resolve(&p.file);
        let settings = wasmgate_wasm::Settings::from_decl(p, level);
        let bytes = read_plugin(config, opts, p).map_err(|e| {
            format!(
                "{}: wasm plugin {:?}: cannot read file {}: {e}",
                config.origin,
                p.name,
                path.display()
            )
        })?;
        // The same file on the same engine: the same compiled code.
        let interrupts = settings.interrupts();
        let same = |(b, i, _): &Compiled| *b == bytes && *i == interrupts;
        if let Some((_, fd)) = now.iter().find(|(c, _)| same(c)) {
            out.push(listeners::dup_high(fd).map_err(|e| e.to_string())?);
            continue;
        }
        let code = match last.iter().find(|c| same(c)) {
            Some((_, _, code)) => {
                tracing::info!(
                    "wasm plugin {:?}: unchanged, its compiled code reused",
                    p.name
                );
                code.clone()
            }
            None => {
                let module = wasmgate_wasm::PluginModule::from_bytes(settings, &bytes)
                    .map_err(|e| format!("{}: {e} ({})", config.origin, path.display()))?;
                Arc::new(module.serialize()?)
            }
        };
        let fd = listeners::memfd_with(&code)
            .map_err(|e| format!("compiled plugin {:?}: {e}", p.name))?;
        out.push(listeners::dup_high(&fd).map_err(|e| e.to_string())?);
        now.push(((bytes, interrupts, code), fd));
    }
    *last = now.into_iter().map(|(compiled, _)| compiled).collect();
    Ok(out)
}

/// The example plugin the embedded default configuration declares, carried in the binary so
/// that the default configuration works in any prefix.
const EXAMPLE_PLUGIN: (&str, &[u8]) = (
    "plugins/example_headers.wasm",
    include_bytes!("../../plugins/example_headers.wasm"),
);

/// With the embedded default configuration, writes its example plugin into the prefix if the
/// file is not there yet (a file that exists is never overwritten).
fn install_example_plugin(loaded: &LoadedConfig, opts: &Options) -> anyhow::Result<()> {
    if !example_missing(loaded, opts) {
        return Ok(());
    }
    let path = opts.resolve(Path::new(EXAMPLE_PLUGIN.0));
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(&path, EXAMPLE_PLUGIN.1)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// A plugin's file. The embedded default configuration's example plugin, which `start`
/// writes into the prefix, is read from the binary while the prefix lacks it (`wasmgate test`
/// on a fresh prefix).
fn read_plugin(
    loaded: &LoadedConfig,
    opts: &Options,
    p: &wasmgate_shared::config::WasmPluginDecl,
) -> std::io::Result<Vec<u8>> {
    let path = opts.resolve(&p.file);
    match std::fs::read(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && example_missing(loaded, opts) => {
            Ok(EXAMPLE_PLUGIN.1.to_vec())
        }
        r => r,
    }
}

/// Whether the embedded default configuration declares the example plugin and the prefix
/// lacks its file.
fn example_missing(loaded: &LoadedConfig, opts: &Options) -> bool {
    let path = opts.resolve(Path::new(EXAMPLE_PLUGIN.0));
    opts.config_path().is_none()
        && !path.exists()
        && loaded
            .config
            .wasm
            .plugins
            .iter()
            .any(|p| p.file == Path::new(EXAMPLE_PLUGIN.0))
}

/// The log files `cfg` names can be written: opened for appending where they exist, else
/// their nearest existing folder writable (`start` makes the rest). Checked, not created:
/// files made here would belong to whoever runs the check (`wasmgate test`), and a reload
/// refused later must leave nothing behind.
/// The CA files `https` upstreams are checked against (`apisix.ssl.ssl_trusted_certificate`):
/// read here so that a missing or broken one stops `start`, `reload` and `test` with its name,
/// rather than failing verified handshakes later. (The system's store is read by the workers,
/// when a handshake first needs it.)
pub(crate) fn check_trusted_cas(opts: &Options, cfg: &GatewayConfig) -> anyhow::Result<()> {
    cfg.apisix
        .ssl
        .trusted_cas()
        .read_files(&opts.prefix)
        .map(drop)
        .map_err(anyhow::Error::msg)
}

pub(crate) fn check_logs(opts: &Options, cfg: &GatewayConfig) -> anyhow::Result<()> {
    let http = &cfg.nginx_config.http;
    let logs = [
        (
            "nginx_config.error_log",
            Some(cfg.nginx_config.error_log.as_path()),
        ),
        (
            "nginx_config.http.access_log",
            (http.access_log != "off").then(|| Path::new(&http.access_log)),
        ),
    ];
    for (key, path) in logs {
        let Some(path) = path.map(|p| opts.resolve(p)) else {
            continue;
        };
        if path.exists() {
            std::fs::OpenOptions::new()
                .append(true)
                .open(&path)
                .with_context(|| format!("{key}: cannot open {} for appending", path.display()))?;
            continue;
        }
        // The nearest folder that exists must be one, and writable: `start` makes the rest.
        let dir = path.ancestors().skip(1).find(|d| d.exists());
        let writable = dir.is_some_and(|d| {
            d.is_dir() && nix::unistd::access(d, nix::unistd::AccessFlags::W_OK).is_ok()
        });
        if !writable {
            bail!(
                "{key}: cannot create {}: {} is not a writable folder",
                path.display(),
                dir.map_or("its folder".into(), |d| d.display().to_string())
            );
        }
        // Write access is not all (a folder of /proc says writable to root): the first
        // missing part is made and removed again, as `start` would make it.
        if let Some(first) = path.ancestors().filter(|d| !d.exists()).last() {
            probe_create(first, first == path)
                .with_context(|| format!("{key}: cannot create {}", path.display()))?;
        }
    }
    Ok(())
}

/// Makes `path` (a file, or a folder) and removes it again: whether it can be made.
fn probe_create(path: &Path, file: bool) -> std::io::Result<()> {
    match file {
        true => {
            std::fs::OpenOptions::new()
                .append(true)
                .create_new(true)
                .open(path)?;
            std::fs::remove_file(path)
        }
        false => {
            std::fs::create_dir(path)?;
            std::fs::remove_dir(path)
        }
    }
}

/// The time limit `wasmgate test` starts a plugin without one under.
const CHECK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// `wasmgate test`, nginx's `-t`: everything `start` and `reload` would refuse, found without
/// touching a running gateway or leaving anything written (a missing log file is made and
/// removed again) — the file, each plugin compiled *and started* once (its
/// `proxy_on_vm_start`, under its `memory_limit`, with shared memory of `plugin_shm_size`),
/// the log files writable, and the stored objects (a local store) read, checked against the
/// plugin list and against `shm_size`. Returns what the operator should know besides.
pub fn check(opts: &Options) -> anyhow::Result<Vec<String>> {
    let loaded = opts.load_config().map_err(|e| anyhow::anyhow!("{e}"))?;
    let cfg = &loaded.config;
    // The stored objects' keys are opened with it.
    wasmgate_shared::keyring::install_from(cfg);
    let level = cfg.nginx_config.error_log_level;
    // The plugins' shared memory as large as the gateway's: a plugin filling it at start
    // must not fail here only.
    let shm = wasmgate_shared::plugin_shm::PluginShm::create(cfg.wasmgate.plugin_shm_size as usize)
        .map_err(|e| anyhow::anyhow!("wasmgate.plugin_shm_size: {e}"))?;
    wasmgate_wasm::shared::install(std::sync::Arc::new(shm));
    for p in &cfg.wasm.plugins {
        let path = opts.resolve(&p.file);
        let bytes = read_plugin(&loaded, opts, p).map_err(|e| {
            anyhow::anyhow!(
                "{}: wasm plugin {:?}: cannot read file {}: {e}",
                loaded.origin,
                p.name,
                path.display()
            )
        })?;
        let mut settings = wasmgate_wasm::Settings::from_decl(p, level);
        // `test` must end: a plugin without a time limit (`off`) is started here under one, so
        // that a `proxy_on_vm_start` that never returns is a refusal, not a hang.
        settings.callback_timeout.get_or_insert(CHECK_TIMEOUT);
        let module = wasmgate_wasm::PluginModule::from_bytes(settings, &bytes)
            .map_err(|e| anyhow::anyhow!("{}: {e} ({})", loaded.origin, path.display()))?;
        wasmgate_wasm::PluginVm::new(&module).map_err(|f| {
            anyhow::anyhow!(
                "{}: wasm plugin {:?}: start failed: {f}",
                loaded.origin,
                p.name
            )
        })?;
    }
    check_logs(opts, cfg)?;
    check_trusted_cas(opts, cfg)?;
    let mut notes = cfg.warnings();
    let data_dir = opts.resolve(&cfg.wasmgate.data_dir);
    let pid_path = opts.resolve(&cfg.wasmgate.pid_file);
    lock::check_pid_file(&pid_path, &data_dir)
        .map_err(|e| anyhow::anyhow!("{}: {e}", loaded.origin))?;
    keys::stored(&data_dir.join("admin_key"))?;
    if cfg.deployment.etcd.is_some() {
        notes.push("the objects in etcd are checked when the gateway starts".to_string());
    } else {
        let store = store::Store::read_only(&data_dir)
            .with_context(|| format!("the stored objects in {}", data_dir.display()))?;
        admin::objects::check_all(&store, &loaded.catalog()).map_err(|e| {
            anyhow::anyhow!(
                "the stored configuration does not match {}: {e}",
                loaded.origin
            )
        })?;
        publish::check_shm_size(&store, cfg.wasmgate.shm_size)
            .map_err(|e| anyhow::anyhow!("{}: {e}", loaded.origin))?;
    }
    Ok(notes)
}

/// `wasmgate start`.
pub fn start(opts: Options) -> anyhow::Result<()> {
    std::fs::create_dir_all(&opts.prefix)
        .with_context(|| format!("cannot create prefix directory {}", opts.prefix.display()))?;
    let opts = Options {
        prefix: opts.prefix.canonicalize()?,
        ..opts
    };
    let loaded = opts.load_config().map_err(|e| anyhow::anyhow!("{e}"))?;
    // Before the stored objects (or etcd's) are read: their private keys open with it.
    wasmgate_shared::keyring::install_from(&loaded.config);
    let log_path = opts.resolve(&loaded.config.nginx_config.error_log);
    let (parts, pid_path) = prepare(&opts, loaded).inspect_err(|e| emerg(&log_path, e))?;
    // Everything that can fail because of the user's input has been checked above, while
    // errors still reach the terminal; what fails later is reported through `readiness`.
    let mut readiness = if opts.foreground {
        daemon::Readiness(None)
    } else {
        daemon::daemonize()?
    };
    let result = serve(&opts, parts, &pid_path, &log_path, &mut readiness);
    if let Err(e) = &result {
        readiness.failed(&format!("{e:#}"));
        tracing::error!("master stopped on error: {e:#}");
    }
    cli::remove_pid_file(&pid_path);
    result
}

/// A start refused before the master runs goes to the error log too, as nginx writes its
/// `[emerg]` lines there as well as to the terminal: a start run by a script leaves a trace
/// where the operator looks. Best effort: a log that cannot be written is the terminal's
/// message alone.
fn emerg(log_path: &Path, e: &anyhow::Error) {
    use std::io::Write;
    let prefix = wasmgate_shared::logging::line_prefix("emerg", "master");
    // One line, as every line of the log: a plugin's compile error spans several.
    let why = format!("{e:#}").replace('\n', " ");
    let line = format!("{prefix}start refused: {why}\n");
    let file = log_path
        .parent()
        .map(std::fs::create_dir_all)
        .and_then(|_| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log_path)
                .ok()
        });
    if let Some(mut f) = file {
        let _ = f.write_all(line.as_bytes());
    }
}

/// Everything `start` checks and opens before daemonizing: the plugins compiled, the store
/// read, the listeners bound.
fn prepare(opts: &Options, loaded: LoadedConfig) -> anyhow::Result<(Parts, std::path::PathBuf)> {
    install_example_plugin(&loaded, opts)?;
    let plugins = compile_plugins(&loaded, opts).map_err(anyhow::Error::msg)?;
    let cfg = &loaded.config;
    check_trusted_cas(opts, cfg)?;
    let pid_path = opts.resolve(&cfg.wasmgate.pid_file);
    if let Some(pid) = cli::running_pid(&pid_path) {
        bail!(
            "wasmgate is already running (pid {pid}, pid file {})",
            pid_path.display()
        );
    }
    let data_dir = opts.resolve(&cfg.wasmgate.data_dir);
    if let Some(h) = lock::holder(&data_dir) {
        bail!(
            "wasmgate is already running (pid {}, config {}) on data directory {} \
             (wasmgate.data_dir)",
            h.pid,
            h.config,
            data_dir.display()
        );
    }
    lock::check_pid_file(&pid_path, &data_dir).map_err(anyhow::Error::msg)?;
    // Private, as the store makes it: in cluster mode (no store on disk) it holds the
    // generated Admin API key all the same.
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&data_dir)
            .with_context(|| format!("cannot create data directory {}", data_dir.display()))?;
    }
    let mut etcd_read = None;
    let (store, etcd, notes) = match &cfg.deployment.etcd {
        None => (store::Store::open(&data_dir)?, None, Vec::new()),
        Some(section) => {
            let etcd = etcd::Etcd::new(section).map_err(anyhow::Error::msg)?;
            let read = load_from_etcd(&etcd, &loaded)?;
            etcd_read = Some(read.summary);
            (read.store, Some(std::sync::Arc::new(etcd)), read.refused)
        }
    };
    admin::objects::check_all(&store, &loaded.catalog()).map_err(|e| {
        anyhow::anyhow!(
            "the stored configuration does not match {}: {e}",
            loaded.origin
        )
    })?;
    let keys = keys::resolve(cfg, &data_dir)?;
    let proxy = listeners::bind_all(&cfg.apisix.proxy_listen())?;
    let admin_addr = cfg.deployment.admin.admin_listen.addr();
    let admin = listeners::bind(admin_addr).with_context(|| {
        format!("cannot listen on {admin_addr} (deployment.admin.admin_listen)")
    })?;
    let prom = &cfg.plugin_attr.prometheus;
    let metrics = match prom.enable_export_server {
        false => None,
        true => Some(listeners::bind(prom.export_addr.addr()).with_context(|| {
            format!(
                "cannot listen on {} (plugin_attr.prometheus.export_addr; \
                 enable_export_server: false turns it off)",
                prom.export_addr.addr()
            )
        })?),
    };
    if let Some(d) = pid_path.parent() {
        std::fs::create_dir_all(d)?;
    }
    let parts = Parts {
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
    };
    Ok((parts, pid_path))
}

/// What `start` prepared before daemonizing.
pub(crate) struct Parts {
    pub loaded: LoadedConfig,
    pub store: store::Store,
    pub keys: Vec<state::ApiKey>,
    pub proxy: Vec<supervisor::Listener>,
    /// Compiled plugin modules (memfds), one per `wasm.plugins` entry.
    pub plugins: Vec<std::os::fd::OwnedFd>,
    pub admin: std::net::TcpListener,
    /// The Prometheus export listener, unless `enable_export_server` is false.
    pub metrics: Option<std::net::TcpListener>,
    /// Cluster mode: the etcd the store was loaded from.
    pub etcd: Option<std::sync::Arc<etcd::Etcd>>,
    /// Problems found while loading, to be written to the error log once it is open.
    pub notes: Vec<String>,
    /// Cluster mode: what the full read found (see `etcd::log_summary`).
    pub etcd_read: Option<String>,
}

/// Reads the configuration from etcd at start (a runtime of its own: the master's starts
/// later, after daemonizing), so an unreachable etcd stops the start with a clear message.
/// Objects etcd holds that cannot be served are left out and named on stderr (the error log
/// is not open yet; `Loop` logs them again once it is).
fn load_from_etcd(etcd: &etcd::Etcd, loaded: &LoadedConfig) -> anyhow::Result<etcd::Loaded> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let catalog = loaded.catalog();
    let attempts = (loaded.config.deployment.etcd.as_ref()).map_or(1, |e| e.startup_retry.max(1));
    let mut attempt = 1;
    let read = loop {
        match rt.block_on(etcd::load(etcd, &catalog)) {
            Ok(read) => break read,
            // An etcd that is not up yet (started with the gateway, at boot) may be soon; one
            // that answers with a refusal (its credentials, its permissions) will not be.
            Err(e) if attempt < attempts && e.may_pass() => {
                eprintln!(
                    "wasmgate: etcd {}: {e}; trying again in 1 s (attempt {attempt} of {attempts}, deployment.etcd.startup_retry)",
                    etcd.endpoints().join(", ")
                );
                std::thread::sleep(std::time::Duration::from_secs(1));
                attempt += 1;
            }
            Err(e) => {
                return Err(anyhow::Error::new(e).context(format!(
                    "cannot read the configuration from etcd {} (deployment.etcd; {attempt} attempt{} of {attempts})",
                    etcd.endpoints().join(", "),
                    if attempt == 1 { "" } else { "s" }
                )))
            }
        }
    };
    for why in &read.refused {
        eprintln!("wasmgate: {why}");
    }
    Ok(read)
}

fn serve(
    opts: &Options,
    parts: Parts,
    pid_path: &Path,
    log_path: &Path,
    readiness: &mut daemon::Readiness,
) -> anyhow::Result<()> {
    // Taken here, in the daemon itself: the kernel lists a lock under the pid that took it.
    let data_dir = opts.resolve(&parts.loaded.config.wasmgate.data_dir);
    let lock =
        lock::MasterLock::acquire(&data_dir, &parts.loaded.origin, parts.admin.local_addr()?)?;
    std::fs::write(pid_path, format!("{}\n", std::process::id()))
        .with_context(|| format!("cannot write pid file {}", pid_path.display()))?;
    let level = parts.loaded.config.nginx_config.error_log_level;
    wasmgate_shared::logging::init(log_path, level, "master", opts.foreground)
        .with_context(|| format!("cannot open error log {}", log_path.display()))?;
    run::run(opts.clone(), parts, pid_path.to_path_buf(), lock, readiness)
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
