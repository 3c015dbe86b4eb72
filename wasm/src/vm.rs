//! One instance of a plugin and the calls into it.
//!
//! Every call runs under an epoch deadline (`callback_timeout`, unless it is `off`) and the
//! store's memory limit.
//! A trap, a deadline or the memory limit is a [`Fault`]: the caller discards the VM and makes
//! a new one for later requests — the worker never goes down with a plugin.

use crate::head::HeaderList;
use crate::module::{PluginModule, EPOCH_TICK};
use crate::state::{CallResponse, Foreign, HostState, HttpCall, LocalReply, Stream};
use std::collections::HashMap;
use wasmtime::{Store, StoreLimitsBuilder, TypedFunc};

/// Most tables an instance may have (SDK-built modules have one).
const MAX_TABLES: usize = 4;
/// Most elements a table may hold: room for a large program's functions (a Go plugin's table
/// holds a few thousand), not for a plugin growing one without end.
pub const MAX_TABLE_ELEMENTS: usize = 1 << 20;

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
    if text.contains("forcing trap when growing table") {
        return Fault::Trap(format!(
            "a table grew past its limit of {MAX_TABLE_ELEMENTS} elements"
        ));
    }
    // The trap itself (`wasm \`unreachable\` instruction executed`), or the guest's exit
    // (`proc_exit`, as Go's runtime ends after a panic), rather than the first line of the
    // backtrace that wraps it.
    if let Some(trap) = e.downcast_ref::<wasmtime::Trap>() {
        let text = trap.to_string();
        return Fault::Trap(text.trim_start_matches("wasm trap: ").to_string());
    }
    if let Some(exit) = e.downcast_ref::<wasmtime_wasi::I32Exit>() {
        return Fault::Trap(format!("the plugin exited with status {}", exit.0));
    }
    // Another error a host function raised (a WASI argument out of the plugin's memory):
    // its cause, not the backtrace that wraps it.
    let cause = e.root_cause().to_string();
    Fault::Trap(cause.lines().next().unwrap_or("").to_string())
}

/// What a stream callback decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Continue,
    /// The plugin paused the stream (headers: until it resumes it; body: to buffer more).
    Pause,
}

/// What one stream callback produced.
#[derive(Debug)]
pub struct Outcome {
    pub action: Action,
    /// `proxy_send_local_response` was called.
    pub reply: Option<LocalReply>,
    /// Which streams `proxy_continue_stream` resumed: bit 0 the request (stream type 0,
    /// `proxy_continue_request`), bit 1 the response (type 1, `proxy_continue_response`).
    pub resumed: u8,
}

impl Outcome {
    /// What a callback the plugin does not export amounts to.
    pub const CONTINUE: Outcome = Outcome {
        action: Action::Continue,
        reply: None,
        resumed: 0,
    };

    /// Whether the callback resumed the request's (`response` false) or the response's
    /// stream: resuming one leaves the other paused, as in Envoy (`continueDecoding` /
    /// `continueEncoding`).
    pub fn resumed(&self, response: bool) -> bool {
        self.resumed & (1 << response as u8) != 0
    }
}

type Callback3 = TypedFunc<(i32, i32, i32), i32>;
/// `proxy_on_request_trailers` / `proxy_on_response_trailers`: (context, trailer count).
type Callback2 = TypedFunc<(i32, i32), i32>;
/// `proxy_on_http_call_response(context, token, headers, body size, trailers)`.
type CallResponseFn = TypedFunc<(i32, i32, i32, i32, i32), ()>;

struct Exports {
    context_create: TypedFunc<(i32, i32), ()>,
    vm_start: Option<TypedFunc<(i32, i32), i32>>,
    configure: Option<TypedFunc<(i32, i32), i32>>,
    request_headers: Option<Callback3>,
    request_body: Option<Callback3>,
    response_headers: Option<Callback3>,
    response_body: Option<Callback3>,
    request_trailers: Option<Callback2>,
    response_trailers: Option<Callback2>,
    http_call_response: Option<CallResponseFn>,
    tick: Option<TypedFunc<i32, ()>>,
    queue_ready: Option<TypedFunc<(i32, i32), ()>>,
    log: Option<TypedFunc<i32, ()>>,
    done: Option<TypedFunc<i32, i32>>,
    delete: Option<TypedFunc<i32, ()>>,
}

/// A live plugin instance.
pub struct PluginVm {
    store: Store<HostState>,
    /// Borrowed for each call, never cloned: a `TypedFunc` clone registers its type again,
    /// which showed in profiles at seven clones per request.
    f: Exports,
    next_id: u32,
    ticks: u64,
}

/// The VM root context's id (the plugin's VMContext).
pub const VM_ROOT: u32 = 1;

/// An HttpContext and the root context (PluginContext) it was created under: what the host
/// functions a stream callback calls need to know of it (call-outs, ticks and queues belong
/// to the root, as in Envoy).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpCtx {
    pub id: u32,
    pub root: u32,
}

impl PluginVm {
    /// Instantiates, runs `_initialize`/`_start`, creates the VM root context and calls
    /// `proxy_on_vm_start`.
    pub fn new(m: &PluginModule) -> Result<PluginVm, Fault> {
        let s = &m.settings;
        let monotonic = crate::wasi::Monotonic(std::time::Instant::now());
        let state = HostState {
            memory: None,
            alloc: None,
            plugin_name: s.name.clone(),
            root_id: s.root_id.clone(),
            names: Default::default(),
            values: Default::default(),
            shared_value: Vec::new(),
            log_level: s.log_level,
            // One memory, under `memory_limit`, and tables of bounded size: a table that
            // grows is host memory too (8 bytes an element), outside the memory limit.
            limits: StoreLimitsBuilder::new()
                .memory_size(s.memory_limit)
                .memories(1)
                .tables(MAX_TABLES)
                .table_elements(MAX_TABLE_ELEMENTS)
                .instances(1)
                .trap_on_grow_failure(true)
                .build(),
            plugin_config: Vec::new(),
            vm_config: s.vm_config.to_vec(),
            stream: None,
            local_reply: None,
            effective_context: 0,
            live_contexts: Default::default(),
            invoked: 0,
            stream_owner: 0,
            foreign: Vec::new(),
            hidden_stream: None,
            parked: Default::default(),
            lent: 0,
            pending_done: Default::default(),
            done_now: Vec::new(),
            root_context: 0,
            tick_periods: HashMap::new(),
            ticks_changed: false,
            ticks_restarted: Vec::new(),
            calls: Vec::new(),
            next_token: 0,
            call_response: None,
            targets: s.targets.clone(),
            call_budget: s.call_budget.clone(),
            resumed: 0,
            queue_regs: Vec::new(),
            queues_changed: false,
            log_gate: s.log_gate.clone(),
            stdio: Default::default(),
            monotonic,
            wasi: wasmtime_wasi::WasiCtxBuilder::new()
                .monotonic_clock(monotonic)
                .build_p1(),
        };
        let mut store = Store::new(m.pre.module().engine(), state);
        store.limiter(|s| &mut s.limits);
        // Without a limit the engine checks no epoch: the deadline is never looked at.
        let ticks = s.callback_timeout.map_or(u32::MAX as u64, |t| {
            (t.as_millis() as u64 / EPOCH_TICK.as_millis() as u64).max(1) + 1
        });
        store.set_epoch_deadline(ticks);
        let instance = m.pre.instantiate(&mut store).map_err(classify)?;
        // Host functions use these on every call: looked up once.
        let memory = instance.get_memory(&mut store, "memory");
        let alloc = ["malloc", "proxy_on_memory_allocate"]
            .iter()
            .find_map(|n| instance.get_typed_func::<i32, i32>(&mut store, n).ok());
        store.data_mut().memory = memory;
        store.data_mut().alloc = alloc;
        let get = |store: &mut Store<HostState>, name: &str| instance.get_func(&mut *store, name);
        for start in ["_initialize", "_start"] {
            if let Some(f) = get(&mut store, start) {
                let f = f.typed::<(), ()>(&store).map_err(classify)?;
                run(&mut store, ticks, |s| f.call(s, ()))?;
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
            request_body: typed!("proxy_on_request_body"),
            response_headers: typed!("proxy_on_response_headers"),
            response_body: typed!("proxy_on_response_body"),
            request_trailers: typed!("proxy_on_request_trailers"),
            response_trailers: typed!("proxy_on_response_trailers"),
            http_call_response: typed!("proxy_on_http_call_response"),
            tick: typed!("proxy_on_tick"),
            queue_ready: typed!("proxy_on_queue_ready"),
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
        let size = vm.store.data().vm_config.len() as i32;
        if let Some(start) = vm.f.vm_start.as_ref() {
            if run(&mut vm.store, vm.ticks, |s| {
                start.call(s, (VM_ROOT as i32, size))
            })? == 0
            {
                return Err(Fault::Trap("proxy_on_vm_start returned false".into()));
            }
        }
        Ok(vm)
    }

    fn context_create(&mut self, id: u32, parent: u32) -> Result<(), Fault> {
        // The new context is the current one: a resume or a stream lent from here is for
        // the context the plugin names, not for the last callback's.
        outside_stream(&mut self.store, id);
        let d = self.store.data_mut();
        d.root_context = if parent == 0 { id } else { parent };
        d.live_contexts.insert(id);
        let f = &self.f.context_create;
        run(&mut self.store, self.ticks, |s| {
            f.call(s, (id as i32, parent as i32))
        })
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
        let Some(configure) = self.f.configure.as_ref() else {
            return Ok(Some(id));
        };
        outside_stream(&mut self.store, id);
        self.store.data_mut().plugin_config = conf.to_vec();
        let r = run(&mut self.store, self.ticks, |s| {
            configure.call(s, (id as i32, conf.len() as i32))
        });
        self.store.data_mut().plugin_config.clear();
        if r? == 0 {
            // Refused: nothing of it is waited for, whatever its `proxy_on_done` says.
            if !self.finish(id)? {
                self.delete(id)?;
            }
            return Ok(None);
        }
        Ok(Some(id))
    }

    /// An HttpContext under the PluginContext `root`.
    pub fn create_http_context(&mut self, root: u32) -> Result<HttpCtx, Fault> {
        let id = self.new_id();
        self.context_create(id, root)?;
        Ok(HttpCtx { id, root })
    }

    /// Runs a stream callback `f(id, a, b)` with `stream` lent to the host functions (it is
    /// handed back even when the call faults).
    fn stream_call(
        &mut self,
        pick: fn(&Exports) -> Option<&Callback3>,
        ctx: HttpCtx,
        stream: &mut Option<Box<Stream>>,
        a: usize,
        b: bool,
    ) -> Result<Outcome, Fault> {
        let id = ctx.id;
        let Some(f) = pick(&self.f) else {
            return Ok(Outcome::CONTINUE);
        };
        lent_call(&mut self.store, self.ticks, ctx, stream, |s| {
            f.call(s, (id as i32, a as i32, b as i32))
        })
    }

    /// `proxy_on_request_headers`.
    pub fn on_request_headers(
        &mut self,
        ctx: HttpCtx,
        stream: &mut Option<Box<Stream>>,
        end_of_stream: bool,
    ) -> Result<Outcome, Fault> {
        let n = stream.as_ref().map_or(0, |s| s.request.count());
        self.stream_call(
            |f| f.request_headers.as_ref(),
            ctx,
            stream,
            n,
            end_of_stream,
        )
    }

    /// `proxy_on_response_headers`.
    pub fn on_response_headers(
        &mut self,
        ctx: HttpCtx,
        stream: &mut Option<Box<Stream>>,
        end_of_stream: bool,
    ) -> Result<Outcome, Fault> {
        let n = stream
            .as_ref()
            .and_then(|s| s.response.as_ref())
            .map_or(0, |h| h.count());
        self.stream_call(
            |f| f.response_headers.as_ref(),
            ctx,
            stream,
            n,
            end_of_stream,
        )
    }

    /// `proxy_on_request_body` with the buffered body in `stream.request_body`.
    pub fn on_request_body(
        &mut self,
        ctx: HttpCtx,
        stream: &mut Option<Box<Stream>>,
        end_of_stream: bool,
    ) -> Result<Outcome, Fault> {
        let n = stream.as_ref().map(|s| s.request_body.len()).unwrap_or(0);
        self.stream_call(|f| f.request_body.as_ref(), ctx, stream, n, end_of_stream)
    }

    /// `proxy_on_response_body` with the buffered body in `stream.response_body`.
    pub fn on_response_body(
        &mut self,
        ctx: HttpCtx,
        stream: &mut Option<Box<Stream>>,
        end_of_stream: bool,
    ) -> Result<Outcome, Fault> {
        let n = stream.as_ref().map(|s| s.response_body.len()).unwrap_or(0);
        self.stream_call(|f| f.response_body.as_ref(), ctx, stream, n, end_of_stream)
    }

    /// `proxy_on_request_trailers`, or `proxy_on_response_trailers` (`response`), with the
    /// stream's trailers of that side as the map the plugin reads and changes.
    pub fn on_trailers(
        &mut self,
        ctx: HttpCtx,
        stream: &mut Option<Box<Stream>>,
        response: bool,
    ) -> Result<Outcome, Fault> {
        let f = match response {
            true => self.f.response_trailers.as_ref(),
            false => self.f.request_trailers.as_ref(),
        };
        let Some(f) = f else {
            return Ok(Outcome::CONTINUE);
        };
        let n = stream.as_ref().map_or(0, |s| match response {
            true => s.response_trailers.len(),
            false => s.request_trailers.len(),
        });
        lent_call(&mut self.store, self.ticks, ctx, stream, |s| {
            f.call(s, (ctx.id as i32, n as i32))
        })
    }

    /// Whether the plugin has a trailers callback for requests, or responses (`response`).
    pub fn has_trailers(&self, response: bool) -> bool {
        match response {
            true => self.f.response_trailers.is_some(),
            false => self.f.request_trailers.is_some(),
        }
    }

    /// Whether the plugin has body callbacks at all (without them bodies stream untouched).
    pub fn has_request_body(&self) -> bool {
        self.f.request_body.is_some()
    }

    pub fn has_response_body(&self) -> bool {
        self.f.response_body.is_some()
    }

    /// `proxy_on_http_call_response` on the root context `id` of the context that dispatched
    /// call `token` (as Envoy: the SDKs find the dispatcher by the token, and the Go SDK
    /// refuses any other id), with the answer readable (None: the call was reset, 0 headers). `stream` is lent when the dispatcher is an HTTP context whose request waits
    /// on the call.
    /// `owner`: the HttpContext whose stream is lent (the one that waits for this answer), or
    /// 0.
    pub fn on_http_call_response(
        &mut self,
        id: u32,
        token: u32,
        owner: u32,
        stream: &mut Option<Box<Stream>>,
        response: Option<CallResponse>,
    ) -> Result<Outcome, Fault> {
        let Some(f) = self.f.http_call_response.as_ref() else {
            return Ok(Outcome::CONTINUE);
        };
        let resp = response.unwrap_or_default();
        let (h, b, t) = (resp.headers.len(), resp.body.len(), resp.trailers.len());
        enter(&mut self.store, HttpCtx { id, root: id }, stream);
        let d = self.store.data_mut();
        d.call_response = Some(resp);
        if d.stream.is_some() {
            // The waiting HttpContext is the current context, the root's id what the plugin is
            // told: a resume or a reply is for that request, a call-out made here is that
            // request's to wait for — what the SDKs get by making the dispatcher effective
            // (proxy-wasm-cpp-host leaves the root current and relies on them to).
            d.stream_owner = owner;
            d.invoked = owner;
            d.effective_context = owner;
        }
        let r = run(&mut self.store, self.ticks, |s| {
            f.call(s, (id as i32, token as i32, h as i32, b as i32, t as i32))
        });
        self.store.data_mut().call_response = None;
        let (reply, resumed) = leave(&mut self.store, stream);
        r?;
        Ok(Outcome {
            action: Action::Continue,
            reply,
            resumed,
        })
    }

    /// `proxy_on_tick` on the root context `id`.
    pub fn on_tick(&mut self, id: u32) -> Result<(), Fault> {
        let Some(f) = self.f.tick.as_ref() else {
            return Ok(());
        };
        outside_stream(&mut self.store, id);
        run(&mut self.store, self.ticks, |s| f.call(s, id as i32))
    }

    /// `proxy_on_queue_ready` on the root context `id`.
    pub fn on_queue_ready(&mut self, id: u32, queue: u32) -> Result<(), Fault> {
        let Some(f) = self.f.queue_ready.as_ref() else {
            return Ok(());
        };
        outside_stream(&mut self.store, id);
        run(&mut self.store, self.ticks, |s| {
            f.call(s, (id as i32, queue as i32))
        })
    }

    /// Bytes of the instance's linear memory now.
    pub fn memory_bytes(&self) -> u64 {
        let d = self.store.data();
        d.memory
            .map(|m| m.data_size(&self.store) as u64)
            .unwrap_or(0)
    }

    /// Whether the last callbacks dispatched a call-out, or changed tick periods or queue
    /// registrations: what [`PluginVm::take_calls`], [`PluginVm::changed_ticks`] and
    /// [`PluginVm::changed_queues`] would report.
    pub fn has_effects(&self) -> bool {
        let d = self.store.data();
        !d.calls.is_empty()
            || d.ticks_changed
            || d.queues_changed
            || !d.done_now.is_empty()
            || !d.foreign.is_empty()
    }

    /// Leaves the stream of HttpContext `id`, paused, with the VM while its request waits:
    /// another callback that makes `id` the effective context reads and changes it there.
    /// Refused (the stream given back) when a stream of `id` is parked already.
    pub fn park(&mut self, id: u32, stream: Box<Stream>) -> Result<(), Box<Stream>> {
        match self.store.data_mut().parked.entry(id) {
            std::collections::hash_map::Entry::Occupied(_) => Err(stream),
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(stream);
                Ok(())
            }
        }
    }

    /// Takes back the stream [`PluginVm::park`] left (None: it was never left).
    pub fn unpark(&mut self, id: u32) -> Option<Box<Stream>> {
        self.store.data_mut().parked.remove(&id)
    }

    /// Every parked stream, for an instance about to be dropped: their requests still need
    /// them.
    pub fn take_parked(&mut self) -> Vec<(u32, Box<Stream>)> {
        let d = self.store.data_mut();
        d.give_back_lent();
        d.parked.drain().collect()
    }

    /// What callbacks did to other requests' streams (by HttpContext id) since the last time
    /// this was asked.
    pub fn take_foreign(&mut self) -> Vec<(u32, Foreign)> {
        std::mem::take(&mut self.store.data_mut().foreign)
    }

    /// The root contexts that called `proxy_done` since the last time this was asked: each
    /// is to be deleted ([`PluginVm::delete`]).
    pub fn take_done(&mut self) -> Vec<u32> {
        std::mem::take(&mut self.store.data_mut().done_now)
    }

    /// The call-outs dispatched since the last time this was asked.
    pub fn take_calls(&mut self) -> Vec<HttpCall> {
        std::mem::take(&mut self.store.data_mut().calls)
    }

    /// The shared queues registered by this VM's root contexts (token, context), when they
    /// changed since the last time this was asked.
    pub fn changed_queues(&mut self) -> Option<Vec<(u32, u32)>> {
        let d = self.store.data_mut();
        if !std::mem::take(&mut d.queues_changed) {
            return None;
        }
        Some(d.queue_regs.clone())
    }

    /// The plugin's name (its `wasm.plugins` entry).
    pub fn name(&self) -> &str {
        &self.store.data().plugin_name
    }

    /// The tick periods by root context, when they changed since the last time this was
    /// asked, with the root contexts that set theirs since (their periods start again now).
    pub fn changed_ticks(&mut self) -> Option<(HashMap<u32, u32>, Vec<u32>)> {
        let d = self.store.data_mut();
        if !std::mem::take(&mut d.ticks_changed) {
            return None;
        }
        d.tick_periods.retain(|_, p| *p > 0);
        Some((
            d.tick_periods.clone(),
            std::mem::take(&mut d.ticks_restarted),
        ))
    }

    /// `proxy_on_log` with the stream readable.
    pub fn on_log(&mut self, ctx: HttpCtx, stream: &mut Option<Box<Stream>>) -> Result<(), Fault> {
        let Some(f) = self.f.log.as_ref() else {
            return Ok(());
        };
        enter(&mut self.store, ctx, stream);
        let r = run(&mut self.store, self.ticks, |s| f.call(s, ctx.id as i32));
        leave(&mut self.store, stream);
        r
    }

    /// `proxy_on_done` of the root context `id`, then `proxy_on_delete`: true when the
    /// context is gone. False when `proxy_on_done` returned false, as a plugin does that has
    /// work to finish first (a last call-out, a flush on its next tick): the context then lives
    /// on — its ticks, call-outs and queues with it — until it calls `proxy_done`
    /// ([`PluginVm::take_done`]) or the gateway stops waiting ([`PluginVm::delete`]), as in
    /// Envoy.
    pub fn finish(&mut self, id: u32) -> Result<bool, Fault> {
        outside_stream(&mut self.store, id);
        if let Some(done) = self.f.done.as_ref() {
            if run(&mut self.store, self.ticks, |s| done.call(s, id as i32))? == 0 {
                self.store.data_mut().pending_done.insert(id);
                return Ok(false);
            }
        }
        self.delete(id)?;
        Ok(true)
    }

    /// `proxy_on_delete` of the root context `id` (finished, or no longer waited for).
    pub fn delete(&mut self, id: u32) -> Result<(), Fault> {
        outside_stream(&mut self.store, id);
        let d = self.store.data_mut();
        d.pending_done.remove(&id);
        if d.tick_periods.remove(&id).is_some() {
            d.ticks_changed = true;
        }
        self.on_delete(id)
    }

    /// `proxy_on_done` then `proxy_on_delete` of an HttpContext (what `proxy_on_done` returns
    /// is not waited on for a stream, as in Envoy): what its last callbacks ask for (a
    /// call-out) is its root's, as in every other callback.
    /// A fault names the callback it came from.
    pub fn finish_http(&mut self, ctx: HttpCtx) -> Result<(), (Fault, &'static str)> {
        let id = ctx.id;
        outside_stream(&mut self.store, id);
        self.store.data_mut().root_context = ctx.root;
        if let Some(done) = self.f.done.as_ref() {
            run(&mut self.store, self.ticks, |s| done.call(s, id as i32))
                .map_err(|f| (f, "proxy_on_done"))?;
        }
        self.on_delete(id).map_err(|f| (f, "proxy_on_delete"))
    }

    /// `proxy_on_delete(id)`; the context is no longer live, whatever the callback did.
    fn on_delete(&mut self, id: u32) -> Result<(), Fault> {
        let deleted = match self.f.delete.as_ref() {
            Some(delete) => run(&mut self.store, self.ticks, |s| delete.call(s, id as i32)),
            None => Ok(()),
        };
        self.store.data_mut().live_contexts.remove(&id);
        deleted
    }
}

/// Runs `f` (a call into the plugin) under the callback deadline. A free function over the
/// store, so the caller can borrow the export it calls from the VM at the same time.
fn run<T>(
    store: &mut Store<HostState>,
    ticks: u64,
    f: impl FnOnce(&mut Store<HostState>) -> wasmtime::Result<T>,
) -> Result<T, Fault> {
    store.set_epoch_deadline(ticks);
    // A panic in a host function (a bug of the host's or of a library it calls) comes out
    // of the guest's frames here: a fault of this instance, not of the worker.
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&mut *store)));
    // A paused request's stream the callback made effective goes back to wait with the
    // others, whatever the callback was (a tick, a queue, a call-out's answer).
    store.data_mut().give_back_lent();
    // What the callback wrote short of a newline is logged with it.
    if store.data().stdio.pending() {
        let (stdio, log) = store.data_mut().stdio_and_log();
        stdio.flush(&log);
    }
    match r {
        Ok(r) => r.map_err(classify),
        Err(panic) => Err(host_panic(panic)),
    }
}

/// A host function's panic as the fault it is, with its message.
fn host_panic(panic: Box<dyn std::any::Any + Send>) -> Fault {
    let msg = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_default();
    Fault::Trap(format!("host function panicked: {msg}"))
}

/// Runs a stream callback (`call`, returning the plugin's action) on context `ctx` with
/// `stream` lent to the host functions; the stream comes back even when the call faults.
fn lent_call(
    store: &mut Store<HostState>,
    ticks: u64,
    ctx: HttpCtx,
    stream: &mut Option<Box<Stream>>,
    call: impl FnOnce(&mut Store<HostState>) -> wasmtime::Result<i32>,
) -> Result<Outcome, Fault> {
    enter(store, ctx, stream);
    let r = run(store, ticks, call);
    let (reply, resumed) = leave(store, stream);
    Ok(Outcome {
        action: if r? == 0 {
            Action::Continue
        } else {
            Action::Pause
        },
        reply,
        resumed,
    })
}

/// Lends `stream` to the host functions for a callback on context `ctx`.
fn enter(store: &mut Store<HostState>, ctx: HttpCtx, stream: &mut Option<Box<Stream>>) {
    let d = store.data_mut();
    // Swapped, not assigned: the store's side is empty between callbacks (`leave` takes
    // it back), and an assignment would call the drop code of what it replaces every time.
    std::mem::swap(&mut d.stream, stream);
    if stream.is_some() {
        *stream = None;
    }
    if d.local_reply.is_some() {
        d.local_reply = None;
    }
    if d.hidden_stream.is_some() {
        d.hidden_stream = None;
    }
    d.resumed = 0;
    d.effective_context = ctx.id;
    d.invoked = ctx.id;
    d.stream_owner = if d.stream.is_some() { ctx.id } else { 0 };
    d.root_context = ctx.root;
}

/// Readies the store for a callback on context `id` that no request's stream is lent to. A
/// stream is only ever in the store between [`enter`] and [`leave`]; one left there by a
/// callback that never returned (a panic unwound through it) goes, so that no later
/// callback can read another request's headers.
fn outside_stream(store: &mut Store<HostState>, id: u32) {
    let d = store.data_mut();
    if d.stream.is_some() {
        d.stream = None;
    }
    if d.hidden_stream.is_some() {
        d.hidden_stream = None;
    }
    d.effective_context = id;
    d.invoked = id;
    d.stream_owner = 0;
    d.root_context = id;
}

/// Takes the stream back after a callback: (its local reply, which streams it resumed).
fn leave(
    store: &mut Store<HostState>,
    stream: &mut Option<Box<Stream>>,
) -> (Option<LocalReply>, u8) {
    let d = store.data_mut();
    // A lent parked stream went back in `run`.
    if d.hidden_stream.is_some() {
        d.stream = d.hidden_stream.take();
    }
    std::mem::swap(stream, &mut d.stream);
    if d.stream.is_some() {
        d.stream = None;
    }
    (d.local_reply.take(), std::mem::take(&mut d.resumed))
}
