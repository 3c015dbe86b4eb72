//! One instance of a plugin and the calls into it.
//!
//! Every call runs under an epoch deadline (`callback_timeout`) and the store's memory limit.
//! A trap, a deadline or the memory limit is a [`Fault`]: the caller discards the VM and makes
//! a new one for later requests — the worker never goes down with a plugin.

use crate::module::{PluginModule, EPOCH_TICK};
use crate::state::{HostState, LocalReply, Stream};
use wasmtime::{Store, StoreLimitsBuilder, TypedFunc};

/// Why a call into the plugin failed; the VM must be discarded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    Trap(String),
    Timeout,
    Memory,
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fault::Trap(m) => write!(f, "trap: {m}"),
            Fault::Timeout => f.write_str("callback exceeded its time limit"),
            Fault::Memory => f.write_str("instance exceeded its memory limit"),
        }
    }
}

fn classify(e: wasmtime::Error) -> Fault {
    if let Some(wasmtime::Trap::Interrupt) = e.downcast_ref::<wasmtime::Trap>() {
        return Fault::Timeout;
    }
    let text = format!("{e:#}");
    if text.contains("forcing trap when growing memory") || text.contains("memory allocation") {
        return Fault::Memory;
    }
    Fault::Trap(text.lines().next().unwrap_or("").to_string())
}

/// What a headers callback decided.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    Continue,
    /// The plugin paused the stream (without a local reply).
    Pause,
}

struct Exports {
    context_create: TypedFunc<(i32, i32), ()>,
    vm_start: Option<TypedFunc<(i32, i32), i32>>,
    configure: Option<TypedFunc<(i32, i32), i32>>,
    request_headers: Option<TypedFunc<(i32, i32, i32), i32>>,
    response_headers: Option<TypedFunc<(i32, i32, i32), i32>>,
    log: Option<TypedFunc<i32, ()>>,
    done: Option<TypedFunc<i32, i32>>,
    delete: Option<TypedFunc<i32, ()>>,
}

/// A live plugin instance.
pub struct PluginVm {
    store: Store<HostState>,
    f: Exports,
    next_id: u32,
    ticks: u64,
}

/// The VM root context's id (the plugin's VMContext).
pub const VM_ROOT: u32 = 1;

impl PluginVm {
    /// Instantiates, runs `_initialize`/`_start`, creates the VM root context and calls
    /// `proxy_on_vm_start`.
    pub fn new(m: &PluginModule) -> Result<PluginVm, Fault> {
        let s = &m.settings;
        let state = HostState {
            plugin_name: s.name.clone(),
            log_level: s.log_level,
            limits: StoreLimitsBuilder::new()
                .memory_size(s.memory_limit)
                .instances(1)
                .trap_on_grow_failure(true)
                .build(),
            plugin_config: Vec::new(),
            vm_config: Vec::new(),
            stream: None,
            local_reply: None,
            effective_context: 0,
            tick_period_ms: 0,
            log_budget: 0,
            log_window: 0,
            wasi: wasmtime_wasi::WasiCtxBuilder::new().build_p1(),
        };
        let mut store = Store::new(m.pre.module().engine(), state);
        store.limiter(|s| &mut s.limits);
        let ticks =
            (s.callback_timeout.as_millis() as u64 / EPOCH_TICK.as_millis() as u64).max(1) + 1;
        store.set_epoch_deadline(ticks);
        let instance = m.pre.instantiate(&mut store).map_err(classify)?;
        let get = |store: &mut Store<HostState>, name: &str| instance.get_func(&mut *store, name);
        for start in ["_initialize", "_start"] {
            if let Some(f) = get(&mut store, start) {
                store.set_epoch_deadline(ticks);
                f.typed::<(), ()>(&store)
                    .map_err(classify)?
                    .call(&mut store, ())
                    .map_err(classify)?;
                break;
            }
        }
        macro_rules! typed {
            ($name:expr) => {
                instance.get_typed_func(&mut store, $name).ok()
            };
        }
        let f = Exports {
            context_create: instance
                .get_typed_func(&mut store, "proxy_on_context_create")
                .map_err(|e| Fault::Trap(format!("proxy_on_context_create: {e}")))?,
            vm_start: typed!("proxy_on_vm_start"),
            configure: typed!("proxy_on_configure"),
            request_headers: typed!("proxy_on_request_headers"),
            response_headers: typed!("proxy_on_response_headers"),
            log: typed!("proxy_on_log"),
            done: typed!("proxy_on_done"),
            delete: typed!("proxy_on_delete"),
        };
        let mut vm = PluginVm {
            store,
            f,
            next_id: VM_ROOT + 1,
            ticks,
        };
        vm.context_create(VM_ROOT, 0)?;
        if let Some(start) = vm.f.vm_start.clone() {
            if vm.call(|s| start.call(s, (VM_ROOT as i32, 0)))? == 0 {
                return Err(Fault::Trap("proxy_on_vm_start returned false".into()));
            }
        }
        Ok(vm)
    }

    fn call<T>(
        &mut self,
        f: impl FnOnce(&mut Store<HostState>) -> wasmtime::Result<T>,
    ) -> Result<T, Fault> {
        self.store.set_epoch_deadline(self.ticks);
        f(&mut self.store).map_err(classify)
    }

    fn context_create(&mut self, id: u32, parent: u32) -> Result<(), Fault> {
        let f = self.f.context_create.clone();
        self.store.data_mut().effective_context = id;
        self.call(|s| f.call(s, (id as i32, parent as i32)))
    }

    fn new_id(&mut self) -> u32 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1).max(VM_ROOT + 1);
        id
    }

    /// A PluginContext: a root context configured with `conf`. `Ok(None)` when the plugin's
    /// `proxy_on_configure` returned false.
    pub fn create_plugin_context(&mut self, conf: &[u8]) -> Result<Option<u32>, Fault> {
        let id = self.new_id();
        self.context_create(id, 0)?;
        let Some(configure) = self.f.configure.clone() else {
            return Ok(Some(id));
        };
        self.store.data_mut().plugin_config = conf.to_vec();
        let r = self.call(|s| configure.call(s, (id as i32, conf.len() as i32)));
        self.store.data_mut().plugin_config.clear();
        if r? == 0 {
            self.finish(id)?;
            return Ok(None);
        }
        Ok(Some(id))
    }

    /// An HttpContext under the PluginContext `root`.
    pub fn create_http_context(&mut self, root: u32) -> Result<u32, Fault> {
        let id = self.new_id();
        self.context_create(id, root)?;
        Ok(id)
    }

    /// Runs a headers callback with `stream` lent to the host functions; returns the stream, the
    /// action and any local reply.
    fn headers_call(
        &mut self,
        f: Option<TypedFunc<(i32, i32, i32), i32>>,
        id: u32,
        stream: Stream,
        count: usize,
    ) -> (Stream, Result<(Action, Option<LocalReply>), Fault>) {
        let Some(f) = f else {
            return (stream, Ok((Action::Continue, None)));
        };
        {
            let d = self.store.data_mut();
            d.stream = Some(stream);
            d.local_reply = None;
            d.effective_context = id;
        }
        let r = self.call(|s| f.call(s, (id as i32, count as i32, 0)));
        let d = self.store.data_mut();
        let stream = d.stream.take().expect("the stream was lent for this call");
        let reply = d.local_reply.take();
        let r = r.map(|a| {
            (
                if a == 0 {
                    Action::Continue
                } else {
                    Action::Pause
                },
                reply,
            )
        });
        (stream, r)
    }

    pub fn on_request_headers(
        &mut self,
        id: u32,
        stream: Stream,
    ) -> (Stream, Result<(Action, Option<LocalReply>), Fault>) {
        let n = stream.request.len();
        self.headers_call(self.f.request_headers.clone(), id, stream, n)
    }

    pub fn on_response_headers(
        &mut self,
        id: u32,
        stream: Stream,
    ) -> (Stream, Result<(Action, Option<LocalReply>), Fault>) {
        let n = stream.response.as_ref().map(Vec::len).unwrap_or(0);
        self.headers_call(self.f.response_headers.clone(), id, stream, n)
    }

    /// `proxy_on_log` with the stream readable.
    pub fn on_log(&mut self, id: u32, stream: Stream) -> (Stream, Result<(), Fault>) {
        let Some(f) = self.f.log.clone() else {
            return (stream, Ok(()));
        };
        self.store.data_mut().stream = Some(stream);
        self.store.data_mut().effective_context = id;
        let r = self.call(|s| f.call(s, id as i32));
        let stream = self
            .store
            .data_mut()
            .stream
            .take()
            .expect("lent for this call");
        (stream, r)
    }

    /// `proxy_on_done` then `proxy_on_delete`: the context is gone.
    pub fn finish(&mut self, id: u32) -> Result<(), Fault> {
        self.store.data_mut().effective_context = id;
        if let Some(done) = self.f.done.clone() {
            self.call(|s| done.call(s, id as i32))?;
        }
        if let Some(delete) = self.f.delete.clone() {
            self.call(|s| delete.call(s, id as i32))?;
        }
        Ok(())
    }
}
