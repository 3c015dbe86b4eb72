//! Plugin modules: the engine, compilation, and the checks that make a bad module a clear
//! start/reload error instead of a runtime surprise.

use crate::state::HostState;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use wasmtime::{Config, Engine, InstancePre, Linker, Module};

/// Epoch tick: callback deadlines are counted in these.
pub const EPOCH_TICK: Duration = Duration::from_millis(5);

/// The process's engines: `interrupts` for plugins with a `callback_timeout` (their code checks
/// an epoch a thread advances, at each function entry and loop), the other for plugins that
/// run without one (`off`), whose code has no checks: about 770 instructions less per request
/// for the example plugin (docs/BENCHMARKS.md §6). A module is compiled, serialized and loaded
/// on the engine its settings name.
pub fn engine(interrupts: bool) -> &'static Engine {
    static EPOCH: OnceLock<Engine> = OnceLock::new();
    static PLAIN: OnceLock<Engine> = OnceLock::new();
    match interrupts {
        true => EPOCH.get_or_init(|| {
            let engine = new_engine(true);
            let ticker = engine.clone();
            std::thread::Builder::new()
                .name("wasm-epoch".into())
                .spawn(move || loop {
                    std::thread::sleep(EPOCH_TICK);
                    ticker.increment_epoch();
                })
                .expect("spawning the epoch thread");
            engine
        }),
        false => PLAIN.get_or_init(|| new_engine(false)),
    }
}

fn new_engine(interrupts: bool) -> Engine {
    let mut c = Config::new();
    c.epoch_interruption(interrupts);
    // One linear memory per module, as every Proxy-Wasm SDK builds and as `memory_limit`
    // accounts for: a module with more is refused when it is loaded.
    c.wasm_multi_memory(false);
    // No compile thread pool: the master compiles at start, then daemonizes (fork), then
    // compiles again on reload. A pool created before the fork has no threads after it, and
    // the reload waited on them for ever. Plugins are small; one thread compiles them.
    c.parallel_compilation(false);
    // Tables filled at instantiation rather than on first use: an indirect call (the SDKs'
    // dispatch to a context's callbacks is one) then skips the lazy-fill check. Instances
    // live as long as their worker, so the one-off cost is paid once (§6 of BENCHMARKS.md).
    c.table_lazy_init(false);
    if perf_map_wanted(std::env::var_os(PERF_MAP_ENV).as_deref()) {
        // Names the compiled plugin functions for `perf` (/tmp/perf-<pid>.map): a profile of a
        // worker then shows which function of which plugin the samples fall in.
        c.profiler(wasmtime::ProfilingStrategy::PerfMap);
    }
    Engine::new(&c).expect("the default wasmtime configuration is valid")
}

/// The environment variable that makes each process write a perf map of the plugins' code.
pub const PERF_MAP_ENV: &str = "WASMGATE_PERF_MAP";

/// Whether the value of [`PERF_MAP_ENV`] asks for the map: set, and neither empty nor `0`.
fn perf_map_wanted(value: Option<&std::ffi::OsStr>) -> bool {
    value.is_some_and(|v| !v.is_empty() && v != "0")
}

/// How a plugin is run (from its `wasm.plugins` entry).
#[derive(Debug, Clone)]
pub struct Settings {
    pub name: Arc<str>,
    /// Longest a single callback may run before it is interrupted; None: no limit.
    pub callback_timeout: Option<Duration>,
    /// Largest linear memory of one instance.
    pub memory_limit: usize,
    /// The error-log level plugins are told (`proxy_get_log_level`).
    pub log_level: u32,
    /// The plugin's `proxy_log` budget, shared by its instances (a new instance after a fault
    /// does not get a fresh one).
    pub log_gate: Arc<crate::rate::LogGate>,
    /// What its call-outs may target (the gateway fills it in; see [`crate::state::Targets`]).
    pub targets: crate::state::Targets,
    /// What its call-outs in flight may hold, shared by its instances.
    pub call_budget: Arc<crate::state::CallBudget>,
    /// The `plugin_root_id` property.
    pub root_id: Arc<str>,
    /// The buffer `proxy_on_vm_start` reads (VmConfiguration).
    pub vm_config: Arc<[u8]>,
}

/// A compiled, checked plugin, ready to instantiate.
pub struct PluginModule {
    pub settings: Settings,
    pub pre: InstancePre<HostState>,
    /// `proxy_abi_version_0_2_0` or `_0_2_1`.
    pub abi: &'static str,
}

const ABI_MARKERS: [&str; 2] = ["proxy_abi_version_0_2_1", "proxy_abi_version_0_2_0"];
const REQUIRED_EXPORTS: [&str; 2] = ["proxy_on_context_create", "memory"];

impl PluginModule {
    /// Compiles `path` and checks imports and exports; errors name the plugin and the symbol.
    pub fn load(settings: Settings, path: &Path) -> Result<PluginModule, String> {
        let name = settings.name.clone();
        let bytes = std::fs::read(path)
            .map_err(|e| format!("wasm plugin {name:?}: cannot read {}: {e}", path.display()))?;
        PluginModule::from_bytes(settings, &bytes).map_err(|e| format!("{e} ({})", path.display()))
    }

    /// Compiles wasm bytes (a `.wasm` file's content).
    pub fn from_bytes(settings: Settings, bytes: &[u8]) -> Result<PluginModule, String> {
        // Binary modules start with the magic; WebAssembly text (accepted too) with `(` or a
        // comment. Anything else gets a plain answer, not the text parser's complaint.
        let text = bytes.trim_ascii_start();
        if !(bytes.starts_with(b"\0asm") || text.starts_with(b"(") || text.starts_with(b";;")) {
            return Err(format!(
                "wasm plugin {:?}: not a WebAssembly module (a .wasm file starts with \"\\0asm\")",
                settings.name
            ));
        }
        let module = Module::new(engine(settings.interrupts()), bytes)
            .map_err(|e| format!("wasm plugin {:?}: not a valid module: {e:#}", settings.name))?;
        PluginModule::check(settings, module)
    }

    /// Loads a module serialized by [`PluginModule::serialize`] in the master, so that each
    /// worker skips compilation.
    ///
    /// # Safety
    /// `bytes` must come from `serialize` of this same binary (the master hands them to its
    /// workers through an inherited memfd); wasmtime cannot verify compiled code.
    pub unsafe fn from_serialized(
        settings: Settings,
        bytes: &[u8],
    ) -> Result<PluginModule, String> {
        // SAFETY: per this function's contract, the bytes are our own compiled artifact.
        let engine = engine(settings.interrupts());
        let module = unsafe { Module::deserialize(engine, bytes) }.map_err(|e| {
            format!(
                "wasm plugin {:?}: cannot load the compiled module: {e:#}",
                settings.name
            )
        })?;
        PluginModule::check(settings, module)
    }

    /// The compiled module, for [`PluginModule::from_serialized`].
    pub fn serialize(&self) -> Result<Vec<u8>, String> {
        self.pre
            .module()
            .serialize()
            .map_err(|e| format!("wasm plugin {:?}: {e:#}", self.settings.name))
    }

    fn check(settings: Settings, module: Module) -> Result<PluginModule, String> {
        let name = settings.name.clone();
        let abi = ABI_MARKERS
            .into_iter()
            .find(|m| module.get_export(m).is_some())
            .ok_or_else(|| format!("wasm plugin {name:?}: no Proxy-Wasm ABI marker export (expected proxy_abi_version_0_2_1 or proxy_abi_version_0_2_0)"))?;
        for e in REQUIRED_EXPORTS {
            if module.get_export(e).is_none() {
                return Err(format!("wasm plugin {name:?}: missing export {e}"));
            }
        }
        let mut linker = Linker::new(module.engine());
        crate::abi::add_to_linker(&mut linker)
            .map_err(|e| format!("linking host functions: {e:#}"))?;
        let pre = linker.instantiate_pre(&module).map_err(|e| {
            let msg = format!("{e:#}");
            match msg.split('`').nth(1) {
                Some(symbol) => format!("wasm plugin {name:?}: unknown import {symbol}"),
                None => format!("wasm plugin {name:?}: {msg}"),
            }
        })?;
        Ok(PluginModule { settings, pre, abi })
    }
}

impl Settings {
    /// Whether its callbacks are interrupted at a time limit (its code compiled with the
    /// checks, on the engine that advances an epoch).
    pub fn interrupts(&self) -> bool {
        self.callback_timeout.is_some()
    }

    /// The settings of a `wasm.plugins` entry.
    pub fn from_decl(
        d: &wasmgate_shared::config::WasmPluginDecl,
        level: wasmgate_shared::config::LogLevel,
    ) -> Settings {
        use wasmgate_shared::config::LogLevel as L;
        let log_level = match level {
            L::Debug => 1,
            L::Info | L::Notice => 2,
            L::Warn => 3,
            L::Error => 4,
            L::Crit | L::Alert | L::Emerg => 5,
        };
        Settings {
            root_id: Arc::from(d.root_id.as_deref().unwrap_or(&d.name)),
            vm_config: Arc::from(d.vm_config.as_bytes()),
            name: Arc::from(d.name.as_str()),
            callback_timeout: d.callback_timeout,
            memory_limit: d.memory_limit as usize,
            log_gate: Arc::default(),
            log_level,
            targets: Default::default(),
            call_budget: Arc::new(crate::state::CallBudget::new(d.memory_limit as usize)),
        }
    }
}
