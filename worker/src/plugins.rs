//! The Proxy-Wasm plugins of this worker and how a request runs through them.
//!
//! One VM per `wasm.plugins` entry (its VMContext, `proxy_on_vm_start` at worker start). A
//! PluginContext per (route or global rule revision × plugin), created by the first request that
//! needs it (`proxy_on_configure` with the route's `conf`); a changed route gets a new one and
//! the old one is finished once its in-flight requests end. An HttpContext per plugin hit.
//!
//! Order: rewrite-phase plugins before access-phase ones; in a phase, global rules before the
//! route, then higher `priority` first. A fault (trap, time or memory limit) discards the VM —
//! the next request gets a fresh one — and fails the request with 503 unless the plugin is
//! `fail_open`.
//!
//! **Pausing.** A headers callback that returns Pause after dispatching `proxy_http_call`s
//! waits — without holding the VM, other requests go on — until a call's answer
//! (`proxy_on_http_call_response`) resumes the stream (`proxy_continue_stream`) or answers it
//! (`proxy_send_local_response`). Call-outs of contexts that did not pause, of root contexts
//! (ticks, `proxy_on_configure`), left over after a resume or of a request its client
//! abandoned are delivered by a task of their own, to the root context (as every answer); a
//! root context retired meanwhile no longer receives them.
//!
//! **Bodies** go through [`Plugins::on_body`] chunk by chunk (see `wasm_body`), only for
//! plugins that export body callbacks.
//!
//! **Ticks**: [`Plugins::tick_loop`] calls `proxy_on_tick` on every root context that set a
//! period.

use crate::live::GlobalRuleEntry;
use crate::lock;
use crate::router::RouteEntry;
use crate::FastMap;
use futures_util::stream::{FuturesUnordered, StreamExt};
use smallvec::SmallVec;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};
use wasmgate_shared::clock::{lap, Tick};
use wasmgate_shared::config::{GatewayConfig, RequestPhase, WasmPluginDecl};
use wasmgate_shared::model::PluginConf;
use wasmgate_shared::shm::Segment;
use wasmgate_shared::stats::ContextStats;
use wasmgate_wasm::{
    Action, BodyBuf, CallResponse, CallTargets, Fault, Foreign, HttpCall, HttpCtx, LocalReply,
    Outcome, PluginModule, PluginVm, Settings, Stream, Targets, Totals,
};

/// A PluginContext in a VM.
struct Root {
    /// None when `proxy_on_configure` refused the configuration.
    id: Option<u32>,
    inflight: usize,
    stale: bool,
    /// Its object's statistics record (see [`Plugins::record`]), kept here so a request
    /// finds it in the same lookup as the context.
    record: Option<usize>,
}

struct VmState {
    vm: Option<PluginVm>,
    /// Bumped whenever the VM is replaced, so contexts of a discarded VM are not touched.
    generation: u64,
    roots: FastMap<String, Root>,
    /// Call-outs in flight: token → the root context that gets the answer (Envoy makes
    /// every call on the root context: it outlives the HttpContext that dispatched it, and
    /// its calls go with it when it is retired).
    calls: HashMap<u32, u32>,
    /// Root contexts with a tick period: (period, next tick).
    ticks: HashMap<u32, (Duration, Instant)>,
    /// Set when `ticks` changed, until the tick loop is told.
    ticks_dirty: bool,
    /// Shared queues registered by root contexts: (token, context, enqueue count seen).
    queues: Vec<(u32, u32, u64)>,
    /// Statistics record of each route / global rule (`route:<id>`), kept across revisions and
    /// instances.
    records: FastMap<String, usize>,
    /// Objects gone from the configuration whose records wait for their last contexts to go
    /// (then released: [`Plugins::release_departed`]).
    departed: Vec<String>,
    /// Root contexts finished whose `proxy_on_done` returned false, with the time their
    /// `proxy_done` is waited for until: they tick, call out and answer meanwhile.
    finishing: HashMap<u32, Instant>,
    /// Those that called `proxy_done`, to delete (by the tick loop, after the callback).
    done: Vec<u32>,
    /// Call-outs dispatched where nothing sends them (a retired root's `proxy_on_done`): the
    /// tick loop sends them.
    unsent: Vec<HttpCall>,
    /// HttpContexts paused, by id and phase (true: the response's): how another callback's
    /// resume or local reply for one reaches its request ([`Parked`]). A context may wait in
    /// both phases at once (an upstream that answers before the request body is let go).
    paused: HashMap<(u32, bool), tokio::sync::oneshot::Sender<Foreign>>,
    /// The streams paused requests had left with an instance that a fault discarded, by
    /// (that instance's generation, HttpContext id): their requests take them back to fail
    /// (or, with `fail_open`, go on).
    orphans: HashMap<(u64, u32), Box<Stream>>,
    /// The time its `proxy_on_tick` callbacks took in the current window: a plugin that
    /// ticks often and long holds up every route's requests, attached to them or not.
    tick_time: TickTime,
}

/// How long a window [`TickTime`] measures over.
const TICK_WINDOW: Duration = Duration::from_secs(10);
/// The share of a window above which a plugin's ticks are reported.
const TICK_SHARE_REPORTED: f64 = 0.25;

/// The time a plugin's ticks took since `since`.
struct TickTime {
    since: Instant,
    spent: Duration,
}

impl TickTime {
    fn new() -> TickTime {
        TickTime {
            since: Instant::now(),
            spent: Duration::ZERO,
        }
    }

    /// Adds one tick's time; at the end of a window, the share the ticks took if it was
    /// over [`TICK_SHARE_REPORTED`].
    fn add(&mut self, spent: Duration, now: Instant) -> Option<f64> {
        self.spent += spent;
        let window = now.saturating_duration_since(self.since);
        if window < TICK_WINDOW {
            return None;
        }
        let share = self.spent.as_secs_f64() / window.as_secs_f64();
        *self = TickTime {
            since: now,
            spent: Duration::ZERO,
        };
        (share > TICK_SHARE_REPORTED).then_some(share)
    }
}

/// One `wasm.plugins` entry in this worker.
pub struct Plugin {
    pub decl: WasmPluginDecl,
    module: PluginModule,
    state: Mutex<VmState>,
    /// Whether the module exports `proxy_on_request_body` / `proxy_on_response_body`.
    request_body: bool,
    response_body: bool,
    /// Whether it exports `proxy_on_request_trailers` / `proxy_on_response_trailers`.
    request_trailers: bool,
    response_trailers: bool,
    /// Caps the gateway's own lines about this plugin's faults (a plugin trapping on every
    /// request must not flood the error log).
    fault_log: wasmgate_wasm::rate::LogGate,
}

/// Fault lines (and "new instance" lines) written per plugin per second at most.
const FAULT_LINES_PER_SECOND: u32 = 10;

/// Performs the plugins' `proxy_http_call`s (the worker's upstream client).
pub trait Callout: Send + Sync {
    /// Whether `target` names something [`Callout::call`] can reach (asked at dispatch).
    fn knows(&self, target: &str) -> bool;
    /// The answer, or None when the call failed. The caller applies the call's timeout.
    fn call(&self, call: HttpCall) -> Pin<Box<dyn Future<Output = Option<CallResponse>> + Send>>;
}

/// The call-out client's [`Callout::knows`], as the plugins' instances ask it.
struct ByCallout(Arc<dyn Callout>);

impl CallTargets for ByCallout {
    fn knows(&self, target: &str) -> bool {
        self.0.knows(target)
    }
}

/// Every plugin of this worker.
pub struct Plugins {
    list: Vec<Plugin>,
    by_name: FastMap<String, usize>,
    /// The worker's status slot: faults and per-context statistics are counted there.
    slot: Option<(Arc<Segment>, usize)>,
    callout: OnceLock<Arc<dyn Callout>>,
    /// What call-outs may target, shared with every plugin's instances.
    targets: Targets,
    /// Set when a PluginContext was made: the housekeeping then checks its owner is still in
    /// the configuration (a request that began under an older generation may make one for a
    /// route the newer one removed).
    roots_added: AtomicBool,
    /// Woken when a tick period changed.
    ticks_changed: tokio::sync::Notify,
    /// Statistics records released by objects gone from the configuration, for the next new
    /// context to take: a worker that lives through thousands of routes created and deleted
    /// keeps a record for each that exists.
    released_stats: Mutex<Vec<usize>>,
}

/// One plugin to run for a request (borrowing the route's configuration).
pub struct Link<'a> {
    plugin: usize,
    owner: &'a Arc<str>,
    conf: &'a str,
}

/// The plugins a request runs, in order (see [`Plugins::chain`]).
pub type Chain<'a> = SmallVec<[Link<'a>; 4]>;

/// A route's or a global rule's plugins resolved against the worker's: which plugin each
/// entry runs, in their order. Made on the entry's first request and kept with it — the
/// worker's plugins are fixed for its life and an entry's list for the entry's (a change
/// compiles a new entry) — instead of each request looking every name up and sorting.
#[derive(Debug, Default)]
pub struct Resolved(OnceLock<Box<[Slot]>>);

/// One entry of a [`Resolved`] list.
#[derive(Debug, Clone, Copy)]
pub struct Slot {
    plugin: usize,
    /// Its entry in the owner's `plugins`.
    conf: usize,
    /// The order key within one owner: the request phase, then the priority, highest first.
    phase: u8,
    priority: std::cmp::Reverse<i64>,
}

impl Slot {
    fn key(&self) -> (u8, std::cmp::Reverse<i64>) {
        (self.phase, self.priority)
    }
}

/// An HttpContext created for the current request.
pub struct Active {
    plugin: usize,
    owner: Arc<str>,
    http: HttpCtx,
    vm_generation: u64,
    /// Its context's statistics record in this worker's slot.
    record: Option<usize>,
    /// Nanoseconds spent in this context's callbacks for this request.
    spent: u64,
}

/// The Proxy-Wasm state of one request: the request as plugins see it and its HttpContexts.
/// Dropping it runs the log phase (`proxy_on_log`, done, delete) if that has not happened, so
/// a request abandoned half-way (client gone) never leaks contexts.
pub struct WasmRequest {
    plugins: Arc<Plugins>,
    pub stream: Option<Box<Stream>>,
    /// A `Vec`, not kept inline: the list moves in and out of the request's shared state in
    /// each phase, and an inline list copied each time cost more than the allocation it saves
    /// (300 instructions per request with one plugin, 500 with three).
    pub active: Vec<Active>,
}

impl WasmRequest {
    /// `links`: how many plugins the request may run (room for their contexts).
    pub fn new(plugins: Arc<Plugins>, stream: Box<Stream>, links: usize) -> WasmRequest {
        WasmRequest {
            plugins,
            stream: Some(stream),
            active: Vec::with_capacity(links),
        }
    }

    /// Whether any HttpContext of this request has body callbacks in `dir` (or a trailers
    /// callback: the body is then watched for its trailers).
    pub fn wants_body(&self, dir: Dir) -> bool {
        self.active.iter().any(|a| {
            let p = &self.plugins.list[a.plugin];
            p.has_body(dir) || p.has_trailers(dir)
        })
    }

    /// The log phase, once.
    pub fn finish(&mut self) {
        // Dropping a finished request reads no clock.
        if !self.active.is_empty() {
            self.finish_at(Tick::now(), None);
        }
    }

    /// [`WasmRequest::finish`] with a clock reading just taken (`now`), which starts the
    /// phase's plugin timing, and what is known of the finished request (none when it was
    /// abandoned).
    pub fn finish_at(&mut self, now: Tick, totals: Option<Totals>) {
        let active = std::mem::take(&mut self.active);
        if active.is_empty() {
            return;
        }
        if let Some(stream) = self.stream.as_mut() {
            stream.totals = totals;
        }
        self.plugins.on_log(active, &mut self.stream, now);
    }
}

impl Drop for WasmRequest {
    fn drop(&mut self) {
        self.finish();
    }
}

/// How a phase ended.
pub enum Verdict {
    Continue,
    /// A plugin answered itself.
    Reply(LocalReply),
    /// A plugin failed (configure refused, fault): 503.
    Fail,
}

/// Request or response body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    Request,
    Response,
}

/// What a body chunk became.
pub enum BodyStep {
    /// Bytes every plugin let through (possibly none: a plugin is buffering).
    Release(BodyBuf),
    Reply(LocalReply),
    Fail,
    /// A plugin's buffer would exceed the cap.
    TooLarge,
    /// A plugin paused with call-outs of its own in flight, or at the end of the body with
    /// none: the body waits for their answers or for another callback's resume
    /// ([`Plugins::body_wait`]), as Envoy holds a body a filter stopped until it continues.
    Wait(BodyWait),
}

/// A body held by the plugin of the request's `at`-th context until its call-outs answer.
pub struct BodyWait {
    at: usize,
    calls: FuturesUnordered<CallFuture>,
    end_of_stream: bool,
}

/// The body buffers of a request's contexts, one each.
pub type BodyBufs = SmallVec<[BodyBuf; 2]>;

impl Plugin {
    fn has_body(&self, dir: Dir) -> bool {
        match dir {
            Dir::Request => self.request_body,
            Dir::Response => self.response_body,
        }
    }

    fn has_trailers(&self, dir: Dir) -> bool {
        match dir {
            Dir::Request => self.request_trailers,
            Dir::Response => self.response_trailers,
        }
    }

    fn lock(&self) -> MutexGuard<'_, VmState> {
        lock(&self.state)
    }
}

type CallFuture = Pin<Box<dyn Future<Output = (u32, u32, Option<CallResponse>)> + Send>>;

/// A new HttpContext: (http id, VM generation), or None when the plugin refused its
/// configuration.
/// A request's HttpContext and its VM's generation; none when its PluginContext refused its
/// configuration. A fault names what failed.
type Opened = Result<Option<(HttpCtx, u64)>, (Fault, &'static str)>;

/// What failed when there was no instance to make a context in.
fn no_instance() -> (Fault, &'static str) {
    (Fault::Trap("no instance".into()), "creating a context")
}

/// A headers callback's outcome and the call-outs it dispatched.
type Step = (Result<Outcome, Fault>, Vec<HttpCall>);

/// Which headers callback a step runs.
#[derive(Clone, Copy)]
enum Phase {
    Request,
    Response,
}

impl Plugins {
    /// Loads every plugin from the modules the master compiled (one memfd per `wasm.plugins`
    /// entry, in order) and starts its VM.
    pub fn load(
        config: &GatewayConfig,
        artifacts: &[std::fs::File],
        slot: Option<(Arc<Segment>, usize)>,
    ) -> anyhow::Result<Plugins> {
        use std::os::unix::fs::FileExt;
        let level = config.nginx_config.error_log_level;
        anyhow::ensure!(
            artifacts.len() == config.wasm.plugins.len(),
            "the master passed {} compiled plugins for {} declared",
            artifacts.len(),
            config.wasm.plugins.len()
        );
        let mut list = Vec::new();
        let targets = Targets::default();
        for (d, f) in config.wasm.plugins.iter().zip(artifacts) {
            // Positional reads: the memfd's file offset is shared with every other worker.
            let mut bytes = vec![0; f.metadata()?.len() as usize];
            f.read_exact_at(&mut bytes, 0)?;
            // SAFETY: the bytes are the master's own `PluginModule::serialize` output, passed
            // through an inherited memfd (see master/src/lib.rs: compile_plugins).
            let settings = Settings {
                targets: targets.clone(),
                ..Settings::from_decl(d, level)
            };
            let module = unsafe { PluginModule::from_serialized(settings, &bytes) }
                .map_err(anyhow::Error::msg)?;
            let vm = PluginVm::new(&module)
                .map_err(|f| anyhow::anyhow!("wasm plugin {:?}: start failed: {f}", d.name))?;
            let (request_body, response_body) = (vm.has_request_body(), vm.has_response_body());
            let (request_trailers, response_trailers) =
                (vm.has_trailers(false), vm.has_trailers(true));
            // What `proxy_on_vm_start` asked for (ticks, call-outs) is picked up by
            // `set_callout`.
            let st = VmState {
                vm: Some(vm),
                generation: 0,
                roots: FastMap::default(),
                calls: HashMap::new(),
                ticks: HashMap::new(),
                ticks_dirty: false,
                queues: Vec::new(),
                records: FastMap::default(),
                departed: Vec::new(),
                finishing: HashMap::new(),
                done: Vec::new(),
                unsent: Vec::new(),
                paused: HashMap::new(),
                orphans: HashMap::new(),
                tick_time: TickTime::new(),
            };
            list.push(Plugin {
                decl: d.clone(),
                module,
                state: Mutex::new(st),
                request_body,
                response_body,
                request_trailers,
                response_trailers,
                fault_log: Default::default(),
            });
        }
        let by_name = list
            .iter()
            .enumerate()
            .map(|(i, p)| (p.decl.name.clone(), i))
            .collect();
        if let Some((seg, i)) = &slot {
            // A respawned worker starts its statistics afresh: nothing of the previous process
            // is reported as its own.
            seg.slot(*i).contexts.store(0, Ordering::Release);
            let stats = seg.stats(*i);
            for (n, p) in list.iter().enumerate() {
                if let (Some(cell), Some(vm)) = (stats.plugin_memory(n), p.lock().vm.as_ref()) {
                    cell.store(vm.memory_bytes(), Ordering::Relaxed);
                }
            }
        }
        Ok(Plugins {
            list,
            by_name,
            slot,
            callout: OnceLock::new(),
            targets,
            roots_added: AtomicBool::new(false),
            ticks_changed: tokio::sync::Notify::new(),
            released_stats: Mutex::new(Vec::new()),
        })
    }

    /// Installs the client that performs call-outs (once, at worker start), and sends the
    /// calls the plugins dispatched while starting.
    pub fn set_callout(self: &Arc<Self>, c: Arc<dyn Callout>) {
        self.targets.set(Arc::new(ByCallout(c.clone())));
        let _ = self.callout.set(c);
        for (i, p) in self.list.iter().enumerate() {
            let (calls, generation) = {
                let mut st = p.lock();
                let generation = st.generation;
                (st.collect(self), generation)
            };
            for c in calls {
                self.spawn_call(i, generation, c);
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// The plugins a request on `route` runs, in order.
    pub fn chain<'a>(&self, globals: &'a [GlobalRuleEntry], route: &'a RouteEntry) -> Chain<'a> {
        let link = |owner: &'a Arc<str>, plugins: &'a [PluginConf], s: &Slot| Link {
            plugin: s.plugin,
            owner,
            conf: &plugins[s.conf].conf,
        };
        let own = self.resolve(&route.resolved, &route.plugins);
        if globals.is_empty() {
            return (own.iter())
                .map(|s| link(&route.owner, &route.plugins, s))
                .collect();
        }
        // As APISIX's `http_access_phase`: the global rules' plugins (their rewrite phase,
        // then access) before any of the route's, so that a global auth plugin runs first;
        // then the route's rewrite-phase plugins, then its access-phase ones. The response
        // phases keep this order (APISIX's `common_phase`: global rules, then the route).
        // Each list is in order already; the global rules' are merged by a stable sort.
        let mut slots: SmallVec<[(&'a GlobalRuleEntry, Slot); 4]> = SmallVec::new();
        for g in globals {
            slots.extend(
                self.resolve(&g.resolved, &g.plugins)
                    .iter()
                    .map(|s| (g, *s)),
            );
        }
        slots.sort_by_key(|(_, s)| s.key());
        let mut chain: Chain<'a> = (slots.iter())
            .map(|(g, s)| link(&g.owner, &g.plugins, s))
            .collect();
        chain.extend(own.iter().map(|s| link(&route.owner, &route.plugins, s)));
        chain
    }

    /// `plugins` resolved against this worker's (see [`Resolved`]): kept in `cell`.
    fn resolve<'c>(&self, cell: &'c Resolved, plugins: &[PluginConf]) -> &'c [Slot] {
        cell.0.get_or_init(|| {
            let mut slots: Vec<Slot> = (plugins.iter().enumerate())
                .filter_map(|(conf, pc)| {
                    let plugin = *self.by_name.get(&pc.name)?;
                    let d = &self.list[plugin].decl;
                    let phase = match d.http_request_phase {
                        RequestPhase::Rewrite => 0,
                        RequestPhase::Access => 1,
                    };
                    Some(Slot {
                        plugin,
                        conf,
                        phase,
                        priority: std::cmp::Reverse(d.priority),
                    })
                })
                .collect();
            slots.sort_by_key(Slot::key);
            slots.into()
        })
    }

    /// Request headers through every link, waiting out pauses. `end_of_stream`: the request
    /// has no body.
    pub async fn on_request(
        self: &Arc<Self>,
        chain: &[Link<'_>],
        req: &mut WasmRequest,
        end_of_stream: bool,
    ) -> Verdict {
        // Time per plugin: see `lap`.
        let mut started = Tick::now();
        for link in chain {
            let p = &self.list[link.plugin];
            let (first, calls) = {
                let mut st = p.lock();
                let (record, opened) = self.open(p, &mut st, link);
                let (http, generation) = match opened {
                    Ok(Some(ids)) => ids,
                    Ok(None) => {
                        self.count(record, |r| &r.errors);
                        return Verdict::Fail;
                    }
                    Err((f, phase)) => {
                        self.fault(p, &mut st, &f, phase, record);
                        if p.decl.fail_open {
                            started = Tick::now();
                            continue;
                        }
                        return Verdict::Fail;
                    }
                };
                req.active.push(Active {
                    plugin: link.plugin,
                    owner: link.owner.clone(),
                    http,
                    vm_generation: generation,
                    record,
                    spent: 0,
                });
                let Some(vm) = st.vm.as_mut() else {
                    return Verdict::Fail;
                };
                let r = vm.on_request_headers(http, &mut req.stream, end_of_stream);
                (r, st.collect(self))
            };
            let Some(active) = req.active.last_mut() else {
                return Verdict::Fail;
            };
            let (verdict, waited) = match settled(first, calls, false) {
                Ok(verdict) => (verdict, Duration::ZERO),
                Err((first, calls)) => {
                    self.settle(active, first, calls, &mut req.stream, Phase::Request)
                        .await
                }
            };
            active.spent += lap(&mut started).saturating_sub(nanos(waited));
            match verdict {
                Verdict::Continue => {}
                other => return other,
            }
        }
        Verdict::Continue
    }

    /// Response headers through the contexts of this request, waiting out pauses; each
    /// context's `spent` gets the time its callbacks took, counted from `since` (a clock
    /// reading taken as the answer's head came, when there is one: the clock is not read
    /// again for nothing in between).
    pub async fn on_response(
        self: &Arc<Self>,
        active: &mut [Active],
        stream: &mut Option<Box<Stream>>,
        end_of_stream: bool,
        since: Option<Tick>,
    ) -> Verdict {
        let mut started = since.unwrap_or_else(Tick::now);
        for a in active.iter_mut() {
            let p = &self.list[a.plugin];
            let (first, calls) = {
                let mut st = p.lock();
                if st.generation != a.vm_generation {
                    continue;
                }
                let Some(vm) = st.vm.as_mut() else { continue };
                let r = vm.on_response_headers(a.http, stream, end_of_stream);
                (r, st.collect(self))
            };
            let (verdict, waited) = match settled(first, calls, true) {
                Ok(verdict) => (verdict, Duration::ZERO),
                Err((first, calls)) => self.settle(a, first, calls, stream, Phase::Response).await,
            };
            a.spent += lap(&mut started).saturating_sub(nanos(waited));
            match verdict {
                Verdict::Continue => {}
                other => return other,
            }
        }
        Verdict::Continue
    }

    /// What a headers callback's outcome means for the request: a fault fails it (unless
    /// `fail_open`), a local reply answers it, a pause waits for the context's call-outs or
    /// another callback's resume. Paused headers hold the whole message, its body included,
    /// as Envoy holds it (proxy-wasm-cpp-host turns a headers callback's StopIteration into
    /// StopAllIterationAndWatermark): no body callback runs until the stream is resumed, so
    /// that a plugin holding a request (a rate limiter, an admission queue) holds a POST too.
    async fn settle(
        self: &Arc<Self>,
        a: &Active,
        first: Result<Outcome, Fault>,
        calls: Vec<HttpCall>,
        stream: &mut Option<Box<Stream>>,
        phase: Phase,
    ) -> (Verdict, Duration) {
        let p = &self.list[a.plugin];
        // Made on the first call-out: most callbacks dispatch none, and an empty set still
        // allocates.
        let mut mine: Option<FuturesUnordered<CallFuture>> = None;
        let mut outcome = first;
        let mut calls = calls;
        let mut delivered = false;
        let mut waited = Duration::ZERO;
        let mut parked_slot: Option<Parked> = None;
        let mut limit: Option<Instant> = None;
        let failed = |me: &Self| match me.fails_open(p, a.record) {
            true => Verdict::Continue,
            false => Verdict::Fail,
        };
        loop {
            for c in calls.drain(..) {
                if c.context == a.http.id {
                    mine.get_or_insert_with(FuturesUnordered::new)
                        .push(self.waited_call(a.plugin, a.vm_generation, c));
                } else {
                    self.spawn_call(a.plugin, a.vm_generation, c);
                }
            }
            let o = match outcome {
                Err(f) => {
                    // A fault in a delivered answer was handled by `deliver`.
                    if !delivered {
                        self.fault(p, &mut p.lock(), &f, phase.callback(), a.record);
                    }
                    return (failed(self), waited);
                }
                Ok(o) => o,
            };
            if let Some(reply) = o.reply {
                // Calls still in flight answer on their own (`waited_call`).
                drop(mine);
                self.count(a.record, |r| &r.local_replies);
                return (Verdict::Reply(reply), waited);
            }
            if goes_on(&o, matches!(phase, Phase::Response)) {
                drop(mine);
                return (Verdict::Continue, waited);
            }
            // Paused: it waits for its call-outs' answers, or for another callback — a tick, a
            // queue, another request's — to resume or answer it through
            // `proxy_set_effective_context`, as in Envoy; up to the plugin's pause_timeout.
            let wait = Instant::now();
            let until = *limit.get_or_insert(wait + p.decl.pause_timeout);
            let parked = parked_slot.get_or_insert_with(|| {
                let response = matches!(phase, Phase::Response);
                Parked::new(p, a.http.id, a.vm_generation, response)
            });
            let woken = {
                // Back in `stream` when this ends — or when the request is abandoned
                // meanwhile, for its log phase.
                let _left = Left::new(parked, stream);
                tokio::select! {
                    Some(answer) = next_answer(&mut mine) => Woken::Answer(answer),
                    foreign = &mut parked.rx => Woken::Foreign(foreign.ok()),
                    _ = tokio::time::sleep_until(until.into()) => Woken::Timeout,
                }
            };
            waited += wait.elapsed();
            let (ctx, token, resp) = match woken {
                Woken::Answer(answer) => answer,
                Woken::Foreign(action) => {
                    // Registered again if it is still paused after this.
                    parked_slot = None;
                    outcome = match action {
                        Some(action) => Ok(foreign_outcome(action)),
                        // The instance was replaced meanwhile (a fault).
                        None => return (failed(self), waited),
                    };
                    continue;
                }
                Woken::Timeout => {
                    let what = match phase {
                        Phase::Response => "response",
                        Phase::Request => "request",
                    };
                    let calls = mine.as_ref().map_or(0, FuturesUnordered::len);
                    pause_timed_out(p, what, phase.callback(), calls);
                    return (failed(self), waited);
                }
            };
            let r = self.deliver(
                a.plugin,
                a.vm_generation,
                ctx,
                token,
                a.http.id,
                resp,
                stream,
                a.record,
            );
            match r {
                Some((r, more)) => {
                    delivered = true;
                    outcome = r.map(|mut o| {
                        // Still paused unless the callback resumed or answered.
                        o.action = Action::Pause;
                        o
                    });
                    calls = more;
                }
                // The VM was replaced meanwhile (another request's fault).
                None => return (failed(self), waited),
            }
        }
    }

    /// A call-out a paused context waits for, run in a task of its own: the answer comes
    /// through the returned future while the context waits, and is delivered on its own
    /// (to the root context, as every answer) once nothing waits for it — the context
    /// resumed, or its request was abandoned by the client. No call is lost half-way, so
    /// the SDKs' tables of pending calls are always cleared.
    fn waited_call(self: &Arc<Self>, plugin: usize, generation: u64, c: HttpCall) -> CallFuture {
        let (ctx, token) = (c.root, c.token);
        let fut = self.call_future(c);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let me = self.clone();
        tokio::spawn(async move {
            if let Err((ctx, token, resp)) = tx.send(fut.await) {
                me.deliver_detached(plugin, generation, ctx, token, resp);
            }
        });
        Box::pin(async move { rx.await.unwrap_or((ctx, token, None)) })
    }

    /// The future of one call-out, with its timeout applied: (context, token, answer).
    fn call_future(&self, c: HttpCall) -> CallFuture {
        // The answer goes to the dispatcher's root context (`PluginVm::on_http_call_response`).
        let (ctx, token, timeout) = (c.root, c.token, c.timeout);
        // The call's room in its plugin's budget is held until its answer is in.
        let slot = c.slot.clone();
        let fut = self.callout.get().map(|co| co.call(c));
        Box::pin(async move {
            let resp = match fut {
                Some(f) => match timeout {
                    // Envoy's router answers 504 when a call's timeout ends first.
                    Some(t) => match tokio::time::timeout(t, f).await {
                        Ok(answer) => answer,
                        Err(_) => Some(CallResponse::timed_out()),
                    },
                    None => f.await,
                },
                None => None,
            };
            drop(slot);
            (ctx, token, resp)
        })
    }

    /// Performs a call-out in a task of its own and delivers the answer.
    fn spawn_call(self: &Arc<Self>, plugin: usize, generation: u64, c: HttpCall) {
        // A waited call nobody waits for: its task delivers the answer.
        drop(self.waited_call(plugin, generation, c));
    }

    /// Delivers an answer to a context whose request does not wait on it (no stream lent).
    fn deliver_detached(
        self: &Arc<Self>,
        plugin: usize,
        generation: u64,
        ctx: u32,
        token: u32,
        resp: Option<CallResponse>,
    ) {
        let mut none = None;
        if let Some((_, calls)) =
            self.deliver(plugin, generation, ctx, token, 0, resp, &mut none, None)
        {
            for c in calls {
                self.spawn_call(plugin, generation, c);
            }
        }
    }

    /// `proxy_on_http_call_response`, if the VM and the call are still current (`owner`: the
    /// HttpContext that waits for the answer, its stream lent, or 0). Returns the
    /// callback's outcome and the calls it dispatched.
    #[allow(clippy::too_many_arguments)]
    fn deliver(
        self: &Arc<Self>,
        plugin: usize,
        generation: u64,
        ctx: u32,
        token: u32,
        owner: u32,
        resp: Option<CallResponse>,
        stream: &mut Option<Box<Stream>>,
        record: Option<usize>,
    ) -> Option<(Result<Outcome, Fault>, Vec<HttpCall>)> {
        let p = &self.list[plugin];
        let mut st = p.lock();
        if st.generation != generation || st.calls.remove(&token).is_none() {
            return None;
        }
        if resp.is_none() {
            tracing::warn!("{}: http call {token} broke off (0 headers)", p.decl.name);
        }
        let vm = st.vm.as_mut()?;
        let r = vm.on_http_call_response(ctx, token, owner, stream, resp);
        let calls = st.collect(self);
        if let Err(f) = &r {
            self.fault(p, &mut st, f, "proxy_on_http_call_response", record);
        }
        Some((r, calls))
    }

    /// Ensures the VM and the PluginContext, then creates an HttpContext: the statistics
    /// record, and (http id, VM generation) or None when the plugin refused its configuration.
    fn open(&self, p: &Plugin, st: &mut VmState, link: &Link) -> (Option<usize>, Opened) {
        // A known PluginContext of a live VM (nearly every request): one lookup.
        if st.vm.is_some() {
            if let Some(root) = st.roots.get_mut(&**link.owner) {
                if let Some(root_id) = root.id {
                    root.inflight += 1;
                    let record = root.record;
                    return (record, self.http_context(st, root_id, record));
                }
            }
        }
        let record = self.record(link.plugin, st, link.owner);
        (record, self.open_slow(p, st, link, record))
    }

    /// [`Plugins::open`] for a new VM, a new PluginContext, or one that refused its
    /// configuration.
    fn open_slow(
        &self,
        p: &Plugin,
        st: &mut VmState,
        link: &Link,
        record: Option<usize>,
    ) -> Opened {
        if st.vm.is_none() {
            let vm = PluginVm::new(&p.module).map_err(|f| (f, "starting an instance"))?;
            st.generation += 1;
            st.clear_contexts();
            // Ticks and call-outs of its `proxy_on_vm_start` are collected after this request's
            // first callback.
            st.vm = Some(vm);
            if p.fault_log.pass(FAULT_LINES_PER_SECOND) != wasmgate_wasm::rate::Pass::No {
                tracing::warn!("{}: new instance started", p.decl.name);
            }
        }
        if !st.roots.contains_key(&**link.owner) {
            self.retire_older(p, st, link.owner);
            let vm = st.vm.as_mut().ok_or_else(no_instance)?;
            let id = vm
                .create_plugin_context(link.conf.as_bytes())
                .map_err(|f| (f, "proxy_on_context_create or proxy_on_configure"))?;
            if let Some(r) = self.stats(record) {
                ContextStats::add(&r.configures);
                let generation = self.slot.as_ref().map(|(seg, _)| seg.generation());
                r.generation
                    .store(generation.unwrap_or(0), Ordering::Relaxed);
            }
            if id.is_none() {
                tracing::error!(
                    "{}: failed to configure the plugin for {} (proxy_on_configure returned false)",
                    p.decl.name,
                    describe(link.owner)
                );
            }
            self.roots_added.store(true, Ordering::Relaxed);
            st.roots.insert(
                link.owner.to_string(),
                Root {
                    id,
                    inflight: 0,
                    stale: false,
                    record,
                },
            );
        }
        let root = st.roots.get_mut(&**link.owner).expect("inserted above");
        let Some(root_id) = root.id else {
            tracing::error!(
                "{}: failed to configure the plugin for {}; answering 503",
                p.decl.name,
                describe(link.owner)
            );
            // A request it failed, counted as one (its error is counted by the caller): a
            // route whose every request fails must not look idle.
            self.count(record, |r| &r.requests);
            return Ok(None);
        };
        root.inflight += 1;
        self.http_context(st, root_id, record)
    }

    /// A new HttpContext under the PluginContext `root_id` (its `inflight` already counted).
    fn http_context(&self, st: &mut VmState, root_id: u32, record: Option<usize>) -> Opened {
        self.count(record, |r| &r.requests);
        let vm = st.vm.as_mut().ok_or_else(no_instance)?;
        let id = vm
            .create_http_context(root_id)
            .map_err(|f| (f, "proxy_on_context_create"))?;
        Ok(Some((id, st.generation)))
    }

    /// Finishes the PluginContexts whose route or global rule is gone from the configuration
    /// or was changed (a new revision is another owner): at once when idle, else with their
    /// last request. Their ticks, queue registrations and call-outs end with them. `live`:
    /// the owners of the current configuration.
    /// `exists(object)`: whether the configuration still holds a route or global rule (a
    /// disabled route too: its statistics are kept while it does).
    pub fn retire_gone(
        self: &Arc<Self>,
        live: &foldhash::HashSet<&str>,
        exists: impl Fn(&str) -> bool,
    ) {
        self.roots_added.store(false, Ordering::Relaxed);
        for p in &self.list {
            let mut st = p.lock();
            let mut any = false;
            for (key, root) in st.roots.iter_mut() {
                if !root.stale && !live.contains(key.as_str()) {
                    root.stale = true;
                    any = true;
                }
            }
            st.departed = (st.records.keys())
                .filter(|o| !exists(o.as_str()))
                .cloned()
                .collect();
            if any {
                self.collect_stale(p, &mut st);
            }
            self.release_departed(&mut st);
        }
    }

    /// Releases the statistics records of objects gone from the configuration once none of
    /// their contexts is left (the last one goes with its last request): no longer reported,
    /// and taken by the next new context.
    fn release_departed(&self, st: &mut VmState) {
        let Some((seg, slot)) = &self.slot else {
            return;
        };
        for object in std::mem::take(&mut st.departed) {
            if st.roots.keys().any(|k| object_of(k) == object) {
                st.departed.push(object);
            } else if let Some(i) = st.records.remove(&object) {
                seg.stats(*slot).release(i);
                lock(&self.released_stats).push(i);
            }
        }
    }

    /// Whether a PluginContext was made since [`Plugins::retire_gone`] last ran.
    pub fn roots_added(&self) -> bool {
        self.roots_added.load(Ordering::Relaxed)
    }

    /// A new revision of `owner`'s object: older PluginContexts of the same object are finished
    /// now if idle, or when their last request ends.
    fn retire_older(&self, p: &Plugin, st: &mut VmState, owner: &str) {
        let object = object_of(owner);
        for (key, root) in st.roots.iter_mut() {
            if object_of(key) == object && key != owner {
                root.stale = true;
            }
        }
        self.collect_stale(p, st);
    }

    fn collect_stale(&self, p: &Plugin, st: &mut VmState) {
        self.collect_stale_roots(p, st);
        if !st.departed.is_empty() {
            self.release_departed(st);
        }
    }

    fn collect_stale_roots(&self, p: &Plugin, st: &mut VmState) {
        let done: Vec<String> = st
            .roots
            .iter()
            .filter(|(_, r)| r.stale && r.inflight == 0)
            .map(|(k, _)| k.clone())
            .collect();
        for key in done {
            let Some(root) = st.roots.remove(&key) else {
                continue;
            };
            if let Some(id) = root.id {
                if !self.finish_root(p, st, id, Instant::now() + DONE_WAIT) {
                    return;
                }
            }
        }
    }

    /// `proxy_on_done` of the root context `id`: deleted at once, or — when the plugin has
    /// work to finish — waited for until it calls `proxy_done`, or until `until`. False when
    /// the plugin faulted (its instance is gone).
    fn finish_root(&self, p: &Plugin, st: &mut VmState, id: u32, until: Instant) -> bool {
        let Some(vm) = st.vm.as_mut() else {
            return false;
        };
        let finished = vm.finish(id);
        // Call-outs `proxy_on_done` dispatched (a last flush) go out from the tick loop.
        let mut calls = st.collect(self);
        let waits = match finished {
            Err(f) => {
                self.fault(p, st, &f, "finishing a plugin context", None);
                return false;
            }
            Ok(true) => {
                calls.retain(|c| c.root != id);
                st.forget_root(id);
                false
            }
            Ok(false) => {
                st.finishing.insert(id, until);
                true
            }
        };
        // The tick loop sends the calls and wakes at the end of the wait.
        if waits || !calls.is_empty() {
            st.unsent.extend(calls);
            self.ticks_changed.notify_one();
        }
        true
    }

    /// Deletes the finishing root contexts that called `proxy_done`, and those waited for
    /// long enough (`now` past their time). False when the plugin faulted.
    fn reap_finished(&self, p: &Plugin, st: &mut VmState, now: Instant) -> bool {
        let mut gone = std::mem::take(&mut st.done);
        for (id, until) in &st.finishing {
            if *until <= now && !gone.contains(id) {
                tracing::warn!(
                    "{}: plugin context {id} did not call proxy_done in time after proxy_on_done returned false; deleted",
                    p.decl.name
                );
                gone.push(*id);
            }
        }
        for id in gone {
            st.finishing.remove(&id);
            let Some(vm) = st.vm.as_mut() else {
                return false;
            };
            let r = vm.delete(id);
            // Ticks changed by the deletion are picked up; call-outs of `proxy_on_delete` end
            // with the context, as its others do.
            st.collect(self);
            st.forget_root(id);
            if let Err(f) = r {
                self.fault(p, st, &f, "proxy_on_delete", None);
                return false;
            }
        }
        true
    }

    /// Worker exit: `proxy_on_done` for every root context, the VM's own included (as Envoy
    /// at shutdown); those with work to finish are waited for until `until`
    /// ([`Plugins::finishing`]).
    pub fn finish_all(&self, until: Instant) {
        for p in &self.list {
            let mut st = p.lock();
            let roots: Vec<u32> = st.roots.drain().filter_map(|(_, r)| r.id).collect();
            for id in roots.into_iter().chain([wasmgate_wasm::VM_ROOT]) {
                if !self.finish_root(p, &mut st, id, until) {
                    break;
                }
            }
        }
    }

    /// How many root contexts are finishing (waited for until they call `proxy_done`).
    pub fn finishing(&self) -> usize {
        self.list.iter().map(|p| p.lock().finishing.len()).sum()
    }

    /// One body chunk through the request's contexts that have body callbacks, each with its
    /// own buffer (`bufs`, one per active context): a plugin that pauses keeps the bytes (the
    /// next call sees them all, `body_size` cumulative); bytes it lets through go to the next
    /// plugin and finally to the peer. `end_of_stream` is true on the last call.
    pub fn on_body(
        self: &Arc<Self>,
        req: &mut WasmRequest,
        dir: Dir,
        bufs: &mut [BodyBuf],
        data: BodyBuf,
        end_of_stream: bool,
    ) -> BodyStep {
        self.on_body_from(req, dir, bufs, data, end_of_stream, 0)
    }

    /// [`Plugins::on_body`] from the request's `start`-th context on (the ones before it let
    /// `data` through already).
    fn on_body_from(
        self: &Arc<Self>,
        req: &mut WasmRequest,
        dir: Dir,
        bufs: &mut [BodyBuf],
        mut data: BodyBuf,
        end_of_stream: bool,
        start: usize,
    ) -> BodyStep {
        let mut started = Tick::now();
        // By index, each context's fields copied out: `req` lends its stream to the VM below.
        for i in start..req.active.len().min(bufs.len()) {
            let a = &req.active[i];
            let (plugin, http, vm_generation, record) =
                (a.plugin, a.http, a.vm_generation, a.record);
            let buf = &mut bufs[i];
            let p = &self.list[plugin];
            if !p.has_body(dir) {
                continue;
            }
            if req.stream.is_none() {
                // The stream is lent to a waiting headers phase: nothing to show the plugin.
                continue;
            }
            // Joins what this plugin held back; into an empty buffer the chunk moves as it
            // is, not copied.
            buf.append(std::mem::take(&mut data));
            let cap = p.decl.body_buffer_limit as usize;
            if buf.len() > cap {
                tracing::error!(
                    "{}: buffered {} body bytes, over the {cap}-byte cap",
                    p.decl.name,
                    buf.len()
                );
                return BodyStep::TooLarge;
            }
            lend_body(&mut req.stream, dir, buf);
            let r = {
                let mut st = p.lock();
                if st.generation != vm_generation || st.vm.is_none() {
                    None
                } else {
                    let vm = st.vm.as_mut().expect("checked");
                    let r = match dir {
                        Dir::Request => vm.on_request_body(http, &mut req.stream, end_of_stream),
                        Dir::Response => vm.on_response_body(http, &mut req.stream, end_of_stream),
                    };
                    let calls = st.collect(self);
                    if let Err(f) = &r {
                        self.fault(p, &mut st, f, dir.callback(), record);
                    }
                    Some((r, calls))
                }
            };
            lend_body(&mut req.stream, dir, buf);
            let spent = lap(&mut started);
            if let Some(a) = req.active.get_mut(i) {
                a.spent += spent;
            }
            let Some((r, calls)) = r else {
                // The VM was replaced: this context is gone, the bytes pass.
                data = std::mem::take(buf);
                continue;
            };
            // The context's own call-outs hold the body when it paused for them.
            let response = dir == Dir::Response;
            let holds = matches!(&r, Ok(o) if o.reply.is_none() && !goes_on(o, response));
            let mut mine: Option<FuturesUnordered<CallFuture>> = None;
            for c in calls {
                if holds && c.context == http.id {
                    mine.get_or_insert_with(FuturesUnordered::new)
                        .push(self.waited_call(plugin, vm_generation, c));
                } else {
                    self.spawn_call(plugin, vm_generation, c);
                }
            }
            // Paused at the end of the message with nothing in flight, the body waits for
            // another callback's resume, as Envoy holds a body a filter stopped until it
            // continues (before that, only more of the body could come).
            let held = holds && end_of_stream && mine.is_none();
            if held || mine.is_some() {
                return BodyStep::Wait(BodyWait {
                    at: i,
                    calls: mine.unwrap_or_default(),
                    end_of_stream,
                });
            }
            match self.ended(p, record, r) {
                Err(step) => return step,
                Ok(Some(o)) if o.action == Action::Pause && !end_of_stream => {
                    return BodyStep::Release(BodyBuf::default());
                }
                Ok(_) => {}
            }
            data = std::mem::take(buf);
        }
        BodyStep::Release(data)
    }

    /// A message's trailers through the request's contexts (`proxy_on_request_trailers` /
    /// `proxy_on_response_trailers`, after the last body callback): each plugin reads and may
    /// change them (map types 1 and 3); a local reply or a fault cuts the message as in a
    /// body callback. Nothing follows trailers, so a pause is not waited on.
    pub fn on_trailers(
        self: &Arc<Self>,
        req: &mut WasmRequest,
        dir: Dir,
        trailers: &mut http::HeaderMap,
    ) -> BodyStep {
        let response = dir == Dir::Response;
        let wanted = |a: &Active| self.list[a.plugin].has_trailers(dir);
        let Some(stream) = req.stream.as_mut() else {
            return BodyStep::Release(BodyBuf::default());
        };
        // Kept for the log phase, whether or not a plugin reads them now.
        *trailers_of(stream, response) = crate::wasm_glue::header_pairs(trailers);
        if !req.active.iter().any(wanted) {
            return BodyStep::Release(BodyBuf::default());
        }
        let mut step = BodyStep::Release(BodyBuf::default());
        for i in 0..req.active.len() {
            let a = &req.active[i];
            if !wanted(a) {
                continue;
            }
            let (plugin, http, generation, record) = (a.plugin, a.http, a.vm_generation, a.record);
            let p = &self.list[plugin];
            let (r, calls) = {
                let mut st = p.lock();
                if st.generation != generation {
                    continue;
                }
                let Some(vm) = st.vm.as_mut() else { continue };
                let r = vm.on_trailers(http, &mut req.stream, response);
                let calls = st.collect(self);
                if let Err(f) = &r {
                    let during = match response {
                        true => "proxy_on_response_trailers",
                        false => "proxy_on_request_trailers",
                    };
                    self.fault(p, &mut st, f, during, record);
                }
                (r, calls)
            };
            for c in calls {
                self.spawn_call(plugin, generation, c);
            }
            if let Err(ended) = self.ended(p, record, r) {
                step = ended;
                break;
            }
        }
        // Copied, not taken: the log phase still reads them (`response.trailers`, map 3 in
        // `proxy_on_log`, as Envoy keeps them for its access log).
        if let Some(stream) = req.stream.as_mut() {
            trailers.clear();
            let what = match response {
                true => "the plugins' response trailers",
                false => "the plugins' request trailers",
            };
            crate::wasm_glue::append_pairs(trailers, trailers_of(stream, response), what);
        }
        step
    }

    /// Whether a request whose context of plugin `p` failed goes on without it (`fail_open`);
    /// when it does not, the failure is counted in the context's statistics.
    fn fails_open(&self, p: &Plugin, record: Option<usize>) -> bool {
        if !p.decl.fail_open {
            self.count(record, |r| &r.errors);
        }
        p.decl.fail_open
    }

    /// What a body or trailers callback's result (its fault already logged) does to the
    /// message: ends it (`Err`: a fault, unless the plugin fails open; a local reply), each
    /// counted in the context's statistics, or lets it go on (`Ok`: the outcome, None for a
    /// fault let pass).
    fn ended(
        &self,
        p: &Plugin,
        record: Option<usize>,
        r: Result<Outcome, Fault>,
    ) -> Result<Option<Outcome>, BodyStep> {
        match r {
            Err(_) => match self.fails_open(p, record) {
                true => Ok(None),
                false => Err(BodyStep::Fail),
            },
            Ok(Outcome {
                reply: Some(reply), ..
            }) => {
                self.count(record, |r| &r.local_replies);
                Err(BodyStep::Reply(reply))
            }
            Ok(o) => Ok(Some(o)),
        }
    }

    /// Waits out a [`BodyStep::Wait`]: each answer goes to the plugin's root context with the
    /// request's stream and the held bytes lent; a local reply answers the request, a resume
    /// lets the held bytes on through the contexts after it. With no call-out left and no
    /// resume, the bytes stay held until more of the body comes — or, at its end, go on (a
    /// pause with nothing to wait for, as in the headers phase).
    pub async fn body_wait(
        self: Arc<Self>,
        req: Arc<Mutex<WasmRequest>>,
        dir: Dir,
        mut bufs: BodyBufs,
        wait: BodyWait,
    ) -> (BodyBufs, BodyStep) {
        let BodyWait {
            at,
            mut calls,
            end_of_stream,
        } = wait;
        // The waiting context: a request's contexts stay as they are while its body flows.
        let Some((plugin, generation, record, id)) = lock(&req)
            .active
            .get(at)
            .map(|a| (a.plugin, a.vm_generation, a.record, a.http.id))
        else {
            return (bufs, BodyStep::Fail);
        };
        loop {
            let Some((ctx, token, resp)) = calls.next().await else {
                if !end_of_stream {
                    return (bufs, BodyStep::Release(BodyBuf::default()));
                }
                let Some(buf) = bufs.get_mut(at) else {
                    return (bufs, BodyStep::Fail);
                };
                let held = (plugin, generation, record, id);
                match self.held_body(&req, held, dir, buf).await {
                    Held::Resumed => break,
                    Held::Reply(reply) => {
                        self.count(record, |r| &r.local_replies);
                        return (bufs, BodyStep::Reply(reply));
                    }
                    Held::Failed => return (bufs, BodyStep::Fail),
                }
            };
            let mut guard = lock(&req);
            let req_now = &mut *guard;
            let Some(buf) = bufs.get_mut(at) else {
                return (bufs, BodyStep::Fail);
            };
            lend_body(&mut req_now.stream, dir, buf);
            let delivered = self.deliver(
                plugin,
                generation,
                ctx,
                token,
                id,
                resp,
                &mut req_now.stream,
                record,
            );
            lend_body(&mut req_now.stream, dir, buf);
            let Some((r, more)) = delivered else {
                // The VM was replaced meanwhile (another request's fault): the context is
                // gone, and the body goes on only if the plugin fails open.
                if self.fails_open(&self.list[plugin], record) {
                    break;
                }
                return (bufs, BodyStep::Fail);
            };
            for c in more {
                if c.context == id {
                    calls.push(self.waited_call(plugin, generation, c));
                } else {
                    self.spawn_call(plugin, generation, c);
                }
            }
            match r {
                Err(_) if self.fails_open(&self.list[plugin], record) => break,
                Err(_) => return (bufs, BodyStep::Fail),
                Ok(o) => {
                    if let Some(reply) = o.reply {
                        self.count(record, |r| &r.local_replies);
                        return (bufs, BodyStep::Reply(reply));
                    }
                    if goes_on_resumed(&o, dir == Dir::Response) {
                        break;
                    }
                }
            }
        }
        // Resumed: what the plugin held goes on through the contexts after it; answers still
        // to come are delivered on their own (`waited_call`).
        drop(calls);
        let mut guard = lock(&req);
        let data = bufs.get_mut(at).map(std::mem::take).unwrap_or_default();
        let step = self.on_body_from(&mut guard, dir, &mut bufs, data, end_of_stream, at + 1);
        drop(guard);
        (bufs, step)
    }

    /// A body paused at its end with nothing in flight: waits for another callback to resume
    /// or answer its context (`proxy_set_effective_context`), up to the plugin's
    /// `pause_timeout`. Meanwhile the request's stream, with the held body lent to it, waits
    /// with the instance, where that callback reads and changes it.
    async fn held_body(
        &self,
        req: &Arc<Mutex<WasmRequest>>,
        (plugin, generation, record, id): (usize, u64, Option<usize>, u32),
        dir: Dir,
        buf: &mut BodyBuf,
    ) -> Held {
        let p = &self.list[plugin];
        let until = Instant::now() + p.decl.pause_timeout;
        let failed = || match self.fails_open(p, record) {
            true => Held::Resumed,
            false => Held::Failed,
        };
        loop {
            let mut parked = Parked::new(p, id, generation, dir == Dir::Response);
            let woken = {
                let mut home = StreamHome::take(req, dir, buf);
                let _left = Left::new(&parked, &mut home.stream);
                tokio::select! {
                    foreign = &mut parked.rx => Some(foreign.ok()),
                    _ = tokio::time::sleep_until(until.into()) => None,
                }
            };
            match woken.map(|action| action.map(foreign_outcome)) {
                Some(Some(Outcome {
                    reply: Some(reply), ..
                })) => return Held::Reply(reply),
                Some(Some(o)) if goes_on_resumed(&o, dir == Dir::Response) => return Held::Resumed,
                // Resumed the other stream: still held.
                Some(Some(_)) => {}
                // The instance was replaced meanwhile (a fault).
                Some(None) => return failed(),
                None => {
                    pause_timed_out(p, "body", dir.callback(), 0);
                    return failed();
                }
            }
        }
    }

    /// The log phase: `proxy_on_log`, then done and delete for every HttpContext.
    fn on_log(self: &Arc<Self>, active: Vec<Active>, stream: &mut Option<Box<Stream>>, now: Tick) {
        let mut started = now;
        for a in active {
            let p = &self.list[a.plugin];
            let mut st = p.lock();
            if st.generation != a.vm_generation || st.vm.is_none() {
                // The instance faulted during this request (and was replaced): the time its
                // callbacks took still counts — a callback ended by `callback_timeout` is the
                // slowest there is, and p99 must show it.
                if let Some(rec) = self.stats(a.record) {
                    rec.record_time(a.spent);
                }
                continue;
            }
            let vm = st.vm.as_mut().expect("checked");
            let r = vm
                .on_log(a.http, stream)
                .map_err(|f| (f, "proxy_on_log"))
                .and_then(|_| vm.finish_http(a.http));
            let memory = vm.memory_bytes();
            let ns = a.spent + lap(&mut started);
            if let Some(rec) = self.stats(a.record) {
                rec.record_time(ns);
            }
            if let Some((seg, slot)) = &self.slot {
                if let Some(cell) = seg.stats(*slot).plugin_memory(a.plugin) {
                    cell.store(memory, Ordering::Relaxed);
                }
            }
            // Call-outs dispatched in `proxy_on_log` or `proxy_on_done` go out now: they are
            // the root context's, whose callback gets the answer (as in Envoy).
            for c in st.collect(self) {
                self.spawn_call(a.plugin, a.vm_generation, c);
            }
            if let Err((f, callback)) = r {
                self.fault(p, &mut st, &f, callback, a.record);
                continue;
            }
            let collectable = match st.roots.get_mut(&*a.owner) {
                Some(root) => {
                    root.inflight = root.inflight.saturating_sub(1);
                    root.stale && root.inflight == 0
                }
                None => false,
            };
            // A PluginContext retired by a newer revision goes with its last request.
            if collectable {
                self.collect_stale(p, &mut st);
            }
        }
    }

    /// Runs forever: `proxy_on_tick` on each root context whose period elapsed.
    pub async fn tick_loop(self: Arc<Self>) {
        loop {
            let now = Instant::now();
            let mut next: Option<Instant> = None;
            for (i, p) in self.list.iter().enumerate() {
                let calls = {
                    let mut st = p.lock();
                    let due: Vec<u32> = st
                        .ticks
                        .iter()
                        .filter(|(_, (_, at))| *at <= now)
                        .map(|(id, _)| *id)
                        .collect();
                    let mut calls = Vec::new();
                    for id in due {
                        if let Some((period, at)) = st.ticks.get_mut(&id) {
                            *at = now + *period;
                        }
                        let Some(vm) = st.vm.as_mut() else { break };
                        let started = Instant::now();
                        let r = vm.on_tick(id);
                        let ended = Instant::now();
                        // Late ticks are not made up for: the next one is a period after this
                        // one's end, as Envoy arms its timer again once `proxy_on_tick` returns.
                        if let Some((period, at)) = st.ticks.get_mut(&id) {
                            *at = ended + *period;
                        }
                        if let Some(share) = st.tick_time.add(ended - started, ended) {
                            tracing::warn!(
                                "{}: proxy_on_tick took {:.0}% of this worker's time over the \
                                 last {}s; requests on every route wait while it runs",
                                p.decl.name,
                                share * 100.0,
                                TICK_WINDOW.as_secs()
                            );
                        }
                        calls.extend(st.collect(&self));
                        if let Err(f) = r {
                            self.fault(p, &mut st, &f, "proxy_on_tick", None);
                            break;
                        }
                    }
                    calls.extend(self.poll_queues(p, &mut st));
                    calls.append(&mut st.unsent);
                    if !st.finishing.is_empty() || !st.done.is_empty() {
                        self.reap_finished(p, &mut st, now);
                    }
                    for at in st
                        .ticks
                        .values()
                        .map(|(_, at)| at)
                        .chain(st.finishing.values())
                    {
                        next = Some(next.map_or(*at, |n| n.min(*at)));
                    }
                    if !st.queues.is_empty() {
                        let at = now + QUEUE_POLL;
                        next = Some(next.map_or(at, |n| n.min(at)));
                    }
                    (calls, st.generation)
                };
                for c in calls.0 {
                    self.spawn_call(i, calls.1, c);
                }
            }
            let sleep = match next {
                Some(at) => tokio::time::sleep_until(at.into()),
                None => tokio::time::sleep(Duration::from_secs(3600)),
            };
            tokio::select! {
                _ = sleep => {}
                _ = self.ticks_changed.notified() => {}
            }
        }
    }
}

impl Plugins {
    /// The statistics record of `owner`'s object (`route:<id>`) for this plugin, claimed on
    /// first use.
    fn record(&self, plugin: usize, st: &mut VmState, owner: &str) -> Option<usize> {
        let object = object_of(owner);
        if let Some(r) = st.records.get(object) {
            return Some(*r);
        }
        let (seg, slot) = self.slot.as_ref()?;
        let (stats, name) = (seg.stats(*slot), &self.list[plugin].decl.name);
        let released = lock(&self.released_stats).pop();
        let r = match released {
            Some(i) => {
                stats.reclaim(i, name, object);
                Some(i)
            }
            None => stats.claim(name, object),
        };
        match r {
            Some(r) => {
                st.records.insert(object.to_string(), r);
            }
            None => tracing::warn!(
                "statistics: more than {} plugin contexts in this worker; {object} is not counted",
                wasmgate_shared::stats::CONTEXTS_PER_SLOT
            ),
        }
        r
    }

    fn stats(&self, record: Option<usize>) -> Option<&ContextStats> {
        let (seg, slot) = self.slot.as_ref()?;
        seg.stats(*slot).get(record?)
    }

    /// Adds one to the counter `which` picks in `record`.
    fn count(&self, record: Option<usize>, which: impl Fn(&ContextStats) -> &AtomicU64) {
        if let Some(r) = self.stats(record) {
            ContextStats::add(which(r));
        }
    }
}

/// How often registered shared queues are checked for new items (they are filled by any worker).
const QUEUE_POLL: Duration = Duration::from_millis(5);

/// How long a retired root context whose `proxy_on_done` returned false is waited for (its
/// `proxy_done`) before it is deleted anyway. Envoy waits without a limit; a plugin that never
/// calls `proxy_done` would keep one context per route change alive here.
const DONE_WAIT: Duration = Duration::from_secs(60);

/// Most time one look spends in `proxy_on_queue_ready` calls, all queues together: the calls
/// run on the worker's thread, between requests. Items beyond get theirs at the next look.
const QUEUE_READY_BUDGET: Duration = Duration::from_millis(2);

impl Plugins {
    /// `proxy_on_queue_ready` on the registering root context of each queue that received items
    /// since the last look: once per item, as proxy-wasm-cpp-host calls it once per enqueue
    /// (the Go SDK's example dequeues one item a call), while items are left — another
    /// worker's context may take them first, or the plugin take several in one call — and
    /// within [`QUEUE_READY_BUDGET`].
    fn poll_queues(&self, p: &Plugin, st: &mut VmState) -> Vec<HttpCall> {
        let Some(shm) = wasmgate_wasm::shared::shm() else {
            return Vec::new();
        };
        let mut calls = Vec::new();
        let until = Instant::now() + QUEUE_READY_BUDGET;
        for i in 0..st.queues.len() {
            let (token, ctx, seen) = st.queues[i];
            let seq = shm.queue_seq(token).unwrap_or(seen);
            let due = seq.saturating_sub(seen);
            let mut told = 0;
            while told < due
                && shm.queue_len(token).unwrap_or(0) > 0
                && (told == 0 || Instant::now() < until)
            {
                told += 1;
                let Some(vm) = st.vm.as_mut() else {
                    return calls;
                };
                let r = vm.on_queue_ready(ctx, token);
                calls.extend(st.collect(self));
                if let Err(f) = r {
                    self.fault(p, st, &f, "proxy_on_queue_ready", None);
                    return calls;
                }
            }
            // Items taken elsewhere need no call; items left when the time ran out get theirs
            // at the next look.
            let left = told < due && shm.queue_len(token).unwrap_or(0) > 0;
            st.queues[i].2 = match left {
                true => seen + told,
                false => seq,
            };
        }
        calls
    }
}

/// A paused HttpContext's entry in its plugin's `VmState::paused`: another callback's resume
/// or local reply for it comes through `rx`. The entry goes when this is dropped — the wait
/// over, or the request abandoned.
struct Parked<'a> {
    plugin: &'a Plugin,
    id: u32,
    /// Whether it waits in the response's phase.
    response: bool,
    /// The instance's generation: a new instance numbers its contexts afresh, and the entry
    /// of one of its own with the same id is not this one's to remove.
    generation: u64,
    rx: tokio::sync::oneshot::Receiver<Foreign>,
}

impl<'a> Parked<'a> {
    /// Registers HttpContext `id` of the instance of `generation`. When that instance is gone
    /// already, nothing is registered and `rx` reports it at once (its sender dropped).
    fn new(plugin: &'a Plugin, id: u32, generation: u64, response: bool) -> Parked<'a> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let mut st = plugin.lock();
        if st.generation == generation {
            st.paused.insert((id, response), tx);
        }
        Parked {
            plugin,
            id,
            response,
            generation,
            rx,
        }
    }
}

impl Drop for Parked<'_> {
    fn drop(&mut self) {
        let mut st = self.plugin.lock();
        if st.generation == self.generation {
            st.paused.remove(&(self.id, self.response));
        }
    }
}

/// A paused request's stream left with its instance while it waits, where another callback
/// that makes its context effective reads and changes it (as Envoy lets a plugin change the
/// request it holds before letting it go). Dropped, it takes the stream back into its place:
/// from the instance, or from the orphans of one a fault discarded meanwhile.
struct Left<'a, 's> {
    plugin: &'a Plugin,
    id: u32,
    generation: u64,
    home: &'s mut Option<Box<Stream>>,
    left: bool,
}

impl<'a, 's> Left<'a, 's> {
    fn new(parked: &Parked<'a>, home: &'s mut Option<Box<Stream>>) -> Left<'a, 's> {
        let mut left = Left {
            plugin: parked.plugin,
            id: parked.id,
            generation: parked.generation,
            home,
            left: false,
        };
        let mut st = left.plugin.lock();
        if st.generation == left.generation && left.home.is_some() {
            if let Some(vm) = st.vm.as_mut() {
                let s = left.home.take().expect("checked");
                // Refused when the context's stream is already parked: kept here then.
                match vm.park(left.id, s) {
                    Ok(()) => left.left = true,
                    Err(s) => *left.home = Some(s),
                }
            }
        }
        drop(st);
        left
    }
}

impl Drop for Left<'_, '_> {
    fn drop(&mut self) {
        if !self.left {
            return;
        }
        let mut st = self.plugin.lock();
        *self.home = match st.generation == self.generation {
            true => st.vm.as_mut().and_then(|vm| vm.unpark(self.id)),
            false => st.orphans.remove(&(self.generation, self.id)),
        };
    }
}

/// Another callback's resume or reply for a paused context, as the outcome of its own
/// callback would say it: still paused unless it resumed the stream or answered.
fn foreign_outcome(action: Foreign) -> Outcome {
    let (reply, resumed) = match action {
        Foreign::Resume(bits) => (None, bits),
        Foreign::Reply(reply) => (Some(reply), 0),
    };
    Outcome {
        action: Action::Pause,
        reply,
        resumed,
    }
}

/// The error line of a pause no callback ended within the plugin's `pause_timeout`: `what`
/// (the request, the response, the body) paused in `callback`, with `calls` call-outs of its
/// own still in flight.
fn pause_timed_out(p: &Plugin, what: &str, callback: &str, calls: usize) {
    let calls = match calls {
        0 => String::new(),
        n => format!("; {n} call-outs still in flight"),
    };
    tracing::error!(
        "{}: paused the {what} in {callback} and did not resume it within {:?} (pause_timeout){calls}",
        p.decl.name,
        p.decl.pause_timeout
    );
}

/// How a body held at its end with nothing in flight came out of its wait.
enum Held {
    Resumed,
    Reply(LocalReply),
    Failed,
}

/// A request's stream taken out of its shared state while its held body waits, with the body
/// lent to it: on drop — the wait over, or the request abandoned, whose log phase then still
/// finds it — the body goes back to its buffer and the stream to its place. When another phase
/// holds the stream meanwhile (the response's, an upstream having answered early), nothing is
/// taken, nothing is put back.
struct StreamHome<'r, 'b> {
    req: &'r Arc<Mutex<WasmRequest>>,
    dir: Dir,
    buf: &'b mut BodyBuf,
    stream: Option<Box<Stream>>,
}

impl<'r, 'b> StreamHome<'r, 'b> {
    fn take(req: &'r Arc<Mutex<WasmRequest>>, dir: Dir, buf: &'b mut BodyBuf) -> Self {
        let mut guard = lock(req);
        let mut stream = guard.stream.take();
        lend_body(&mut stream, dir, buf);
        StreamHome {
            req,
            dir,
            buf,
            stream,
        }
    }
}

impl Drop for StreamHome<'_, '_> {
    fn drop(&mut self) {
        if self.stream.is_none() {
            return;
        }
        lend_body(&mut self.stream, self.dir, self.buf);
        let mut guard = lock(self.req);
        if guard.stream.is_none() {
            guard.stream = self.stream.take();
        }
    }
}

/// The object (`route:<id>`, `global_rule:<id>`) a PluginContext's owner
/// (`route:<id>:<revision>`) belongs to.
fn object_of(owner: &str) -> &str {
    owner.rsplit_once(':').map_or(owner, |(o, _)| o)
}

/// What woke a paused context.
enum Woken {
    Answer((u32, u32, Option<CallResponse>)),
    /// Another callback's resume or reply; None when the instance went away.
    Foreign(Option<Foreign>),
    Timeout,
}

/// The next answer to a paused context's call-outs; None when none is in flight.
async fn next_answer(
    mine: &mut Option<FuturesUnordered<CallFuture>>,
) -> Option<(u32, u32, Option<CallResponse>)> {
    match mine {
        Some(m) => m.next().await,
        None => None,
    }
}

/// A headers callback's verdict when it needs no waiting and no bookkeeping — it continued (or
/// resumed) without a reply and dispatched no call-out, as nearly every one does; otherwise
/// its outcome and calls back for [`Plugins::settle`].
fn settled(
    first: Result<Outcome, Fault>,
    calls: Vec<HttpCall>,
    response: bool,
) -> Result<Verdict, Step> {
    match &first {
        Ok(o) if calls.is_empty() && o.reply.is_none() && goes_on(o, response) => {
            Ok(Verdict::Continue)
        }
        _ => Err((first, calls)),
    }
}

/// Whether a headers or body callback of the request's (`response` false) or the response's
/// stream lets it go on: it continued, or resumed that stream. In the response phase the
/// request's stream is over, so resuming it can only mean the response (the AssemblyScript
/// SDK's contexts offer `continueRequest` alone); in the request phase there is no response
/// to resume yet, and resuming it leaves the request paused, as in Envoy.
fn goes_on(o: &Outcome, response: bool) -> bool {
    o.action == Action::Continue || goes_on_resumed(o, response)
}

/// Whether the callback resumed the stream of its phase (see [`goes_on`]).
fn goes_on_resumed(o: &Outcome, response: bool) -> bool {
    o.resumed(response) || (response && o.resumed(false))
}

/// The stream's request trailers, or its response trailers (`response`).
fn trailers_of(stream: &mut Stream, response: bool) -> &mut wasmgate_wasm::map::Pairs {
    match response {
        true => &mut stream.response_trailers,
        false => &mut stream.request_trailers,
    }
}

/// Swaps `buf` with the stream's body buffer of `dir` (lent to a callback, then taken back).
fn lend_body(stream: &mut Option<Box<Stream>>, dir: Dir, buf: &mut BodyBuf) {
    if let Some(stream) = stream.as_mut() {
        let lent = match dir {
            Dir::Request => &mut stream.request_body,
            Dir::Response => &mut stream.response_body,
        };
        std::mem::swap(lent, buf);
    }
}

fn nanos(d: Duration) -> u64 {
    d.as_nanos() as u64
}

impl VmState {
    /// After any call into the VM: registers the call-outs it dispatched (returned for the
    /// caller to perform) and picks up changed tick periods.
    fn collect(&mut self, plugins: &Plugins) -> Vec<HttpCall> {
        // Nearly every callback dispatches nothing: one look, no bookkeeping.
        if !self.vm.as_ref().is_some_and(PluginVm::has_effects) {
            return Vec::new();
        }
        let Some(mut vm) = self.vm.take() else {
            return Vec::new();
        };
        let calls = self.absorb(&mut vm);
        self.vm = Some(vm);
        if self.ticks_changed_flag() {
            plugins.ticks_changed.notify_one();
        }
        calls
    }

    fn absorb(&mut self, vm: &mut PluginVm) -> Vec<HttpCall> {
        let calls = vm.take_calls();
        for c in &calls {
            self.calls.insert(c.token, c.root);
        }
        if let Some((periods, restarted)) = vm.changed_ticks() {
            let now = Instant::now();
            let old = std::mem::take(&mut self.ticks);
            for (id, ms) in periods {
                let period = Duration::from_millis(ms as u64);
                // A period set again starts again, as Envoy's new timer does: a plugin that
                // sets it on each request ticks once they stop coming.
                let at = match old.get(&id) {
                    Some((p, at)) if *p == period && !restarted.contains(&id) => *at,
                    _ => now + period,
                };
                self.ticks.insert(id, (period, at));
            }
            self.ticks_dirty = true;
        }
        for (ctx, action) in vm.take_foreign() {
            if !self.tell_paused(ctx, action) {
                // Envoy would answer the request at once, even one that went on: here only a
                // paused request can be answered from outside its own callbacks.
                tracing::warn!(
                    "{}: a local reply for context {ctx} from another callback was ignored: its \
                     request is not paused (pause it to answer it from there)",
                    vm.name()
                );
            }
        }
        let done = vm.take_done();
        if !done.is_empty() {
            self.done.extend(done);
            self.ticks_dirty = true;
        }
        if let Some(regs) = vm.changed_queues() {
            for (token, ctx) in regs {
                if !self.queues.iter().any(|(t, c, _)| (*t, *c) == (token, ctx)) {
                    self.queues.push((token, ctx, 0));
                    self.ticks_dirty = true;
                }
            }
        }
        calls
    }

    /// Hands another callback's resume or reply to the wait of context `ctx` it is for. A
    /// stream that is not paused (any more) has nothing to resume, as in Envoy. A resume names
    /// its stream — the request's (1), the response's (2) — except that with no request
    /// waiting, the request's means the response (the AssemblyScript SDK's contexts offer
    /// `continueRequest` alone); a reply goes to the response's wait first. False: a reply
    /// found no wait to go to.
    fn tell_paused(&mut self, ctx: u32, action: Foreign) -> bool {
        match action {
            Foreign::Resume(bits) => {
                let request = bits & 1 != 0 && self.paused.contains_key(&(ctx, false));
                if request {
                    if let Some(tx) = self.paused.remove(&(ctx, false)) {
                        let _ = tx.send(Foreign::Resume(bits));
                    }
                }
                if bits & 2 != 0 || (bits & 1 != 0 && !request) {
                    if let Some(tx) = self.paused.remove(&(ctx, true)) {
                        let _ = tx.send(Foreign::Resume(bits));
                    }
                }
                true
            }
            Foreign::Reply(reply) => {
                let wait = self.paused.remove(&(ctx, true));
                match wait.or_else(|| self.paused.remove(&(ctx, false))) {
                    Some(tx) => {
                        let _ = tx.send(Foreign::Reply(reply));
                        true
                    }
                    None => false,
                }
            }
        }
    }

    fn ticks_changed_flag(&mut self) -> bool {
        std::mem::take(&mut self.ticks_dirty)
    }

    /// A root context deleted: its call-outs, ticks and queue registrations end with it.
    fn forget_root(&mut self, id: u32) {
        self.calls.retain(|_, c| *c != id);
        self.ticks.remove(&id);
        self.queues.retain(|(_, c, _)| *c != id);
        self.finishing.remove(&id);
    }

    /// The instance is gone: so are all its contexts.
    fn clear_contexts(&mut self) {
        self.roots.clear();
        self.calls.clear();
        self.ticks.clear();
        self.queues.clear();
        self.finishing.clear();
        self.done.clear();
        self.unsent.clear();
        // Their requests, woken with nothing, fail as the instance's requests do.
        self.paused.clear();
    }
}

impl Phase {
    fn callback(self) -> &'static str {
        match self {
            Phase::Request => "proxy_on_request_headers",
            Phase::Response => "proxy_on_response_headers",
        }
    }
}

impl Dir {
    fn callback(self) -> &'static str {
        match self {
            Dir::Request => "proxy_on_request_body",
            Dir::Response => "proxy_on_response_body",
        }
    }
}

impl Plugins {
    /// Discards the VM after a fault (later requests get a new one), logs and counts it.
    fn fault(&self, p: &Plugin, st: &mut VmState, f: &Fault, during: &str, record: Option<usize>) {
        let open = if p.decl.fail_open {
            " (fail_open: the request continues)"
        } else {
            ""
        };
        use wasmgate_wasm::rate::Pass;
        match p.fault_log.pass(FAULT_LINES_PER_SECOND) {
            Pass::No => {}
            pass => {
                let dropped = match pass {
                    Pass::Yes { dropped } if dropped > 0 => {
                        format!(" ({dropped} similar lines suppressed)")
                    }
                    Pass::Last => " (further fault lines this second suppressed)".into(),
                    _ => String::new(),
                };
                // Which route or global rule the callback ran for: the operator's first question.
                let serving = record
                    .and_then(|r| st.records.iter().find(|(_, i)| **i == r))
                    .map(|(object, _)| format!(" (serving {})", describe(object)))
                    .unwrap_or_default();
                tracing::error!(
                    "{}: {f} in {during}{serving}; instance discarded, a new one serves later requests{open}{dropped}",
                    p.decl.name
                );
            }
        }
        if let Some((seg, slot)) = &self.slot {
            seg.slot(*slot)
                .plugin_faults
                .fetch_add(1, Ordering::Relaxed);
        }
        self.count(record, |r| match f {
            Fault::Trap(_) => &r.traps,
            Fault::Timeout => &r.timeouts,
            Fault::Memory => &r.memory_hits,
        });
        if let Some(vm) = st.vm.as_mut() {
            for (id, stream) in vm.take_parked() {
                st.orphans.insert((st.generation, id), stream);
            }
        }
        st.vm = None;
        st.clear_contexts();
        st.generation += 1;
    }
}

fn describe(owner: &str) -> String {
    let mut parts = owner.splitn(3, ':');
    match (parts.next(), parts.next()) {
        (Some("route"), Some(id)) => format!("route {id}"),
        (Some(_), Some(id)) => format!("global rule {id}"),
        _ => owner.to_string(),
    }
}

/// Shared by every connection.
pub type SharedPlugins = Arc<Plugins>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_reported_when_they_take_over_a_quarter_of_a_window() {
        let start = Instant::now();
        let mut t = TickTime {
            since: start,
            spent: Duration::ZERO,
        };
        assert_eq!(
            t.add(Duration::from_secs(2), start + Duration::from_secs(5)),
            None
        );
        // The window ends: 3 s of 10 s.
        let share = t.add(Duration::from_secs(1), start + TICK_WINDOW).unwrap();
        assert!((share - 0.3).abs() < 1e-9, "{share}");
        // A new window: 1 s of 10 s is not reported.
        let later = start + 2 * TICK_WINDOW;
        assert_eq!(t.add(Duration::from_secs(1), later), None);
    }
}
