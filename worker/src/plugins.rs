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

use crate::live::GlobalRuleEntry;
use crate::router::RouteEntry;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use wasmgate_shared::config::{GatewayConfig, RequestPhase, WasmPluginDecl};
use wasmgate_shared::shm::Segment;
use wasmgate_wasm::{Action, Fault, LocalReply, PluginModule, PluginVm, Settings, Stream};

/// A PluginContext in a VM.
struct Root {
    /// None when `proxy_on_configure` refused the configuration.
    id: Option<u32>,
    inflight: usize,
    stale: bool,
}

struct VmState {
    vm: Option<PluginVm>,
    /// Bumped whenever the VM is replaced, so contexts of a discarded VM are not touched.
    generation: u64,
    roots: HashMap<String, Root>,
}

/// One `wasm.plugins` entry in this worker.
pub struct Plugin {
    pub decl: WasmPluginDecl,
    module: PluginModule,
    state: Mutex<VmState>,
}

/// Every plugin of this worker.
pub struct Plugins {
    list: Vec<Plugin>,
    by_name: HashMap<String, usize>,
    /// Where faults are counted (the worker's status slot).
    faults: Option<(Arc<Segment>, usize)>,
}

/// One plugin to run for a request.
pub struct Link {
    plugin: usize,
    owner: String,
    conf: String,
}

/// An HttpContext created for the current request.
pub struct Active {
    plugin: usize,
    owner: String,
    http_id: u32,
    vm_generation: u64,
}

/// How a phase ended.
pub enum Verdict {
    Continue,
    /// A plugin answered itself.
    Reply(LocalReply),
    /// A plugin failed (configure refused, fault): 503.
    Fail,
}

impl Plugins {
    /// Loads every plugin from the modules the master compiled (one memfd per `wasm.plugins`
    /// entry, in order) and starts its VM.
    pub fn load(
        config: &GatewayConfig,
        artifacts: &[std::fs::File],
        faults: Option<(Arc<Segment>, usize)>,
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
        for (d, f) in config.wasm.plugins.iter().zip(artifacts) {
            // Positional reads: the memfd's file offset is shared with every other worker.
            let mut bytes = vec![0; f.metadata()?.len() as usize];
            f.read_exact_at(&mut bytes, 0)?;
            // SAFETY: the bytes are the master's own `PluginModule::serialize` output, passed
            // through an inherited memfd (see master/src/lib.rs: compile_plugins).
            let module =
                unsafe { PluginModule::from_serialized(Settings::from_decl(d, level), &bytes) }
                    .map_err(anyhow::Error::msg)?;
            let vm = PluginVm::new(&module)
                .map_err(|f| anyhow::anyhow!("wasm plugin {:?}: start failed: {f}", d.name))?;
            list.push(Plugin {
                decl: d.clone(),
                module,
                state: Mutex::new(VmState {
                    vm: Some(vm),
                    generation: 0,
                    roots: HashMap::new(),
                }),
            });
        }
        let by_name = list
            .iter()
            .enumerate()
            .map(|(i, p)| (p.decl.name.clone(), i))
            .collect();
        Ok(Plugins {
            list,
            by_name,
            faults,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// The plugins a request on `route` runs, in order.
    pub fn chain(&self, globals: &[GlobalRuleEntry], route: &RouteEntry) -> Vec<Link> {
        let mut links = Vec::new();
        let mut push = |owner: String, plugins: &[wasmgate_shared::model::PluginConf], rank: u8| {
            for pc in plugins {
                if let Some(&i) = self.by_name.get(&pc.name) {
                    links.push((
                        rank,
                        Link {
                            plugin: i,
                            owner: owner.clone(),
                            conf: pc.conf.clone(),
                        },
                    ));
                }
            }
        };
        for g in globals {
            push(
                format!("global_rule:{}:{}", g.id, g.revision),
                &g.plugins,
                0,
            );
        }
        push(
            format!("route:{}:{}", route.id, route.revision),
            &route.plugins,
            1,
        );
        links.sort_by_key(|(rank, l)| {
            let d = &self.list[l.plugin].decl;
            let phase = match d.http_request_phase {
                RequestPhase::Rewrite => 0,
                RequestPhase::Access => 1,
            };
            (phase, *rank, std::cmp::Reverse(d.priority))
        });
        links.into_iter().map(|(_, l)| l).collect()
    }

    /// Request headers through every link; `stream` is the request as plugins see it.
    pub fn on_request(
        &self,
        chain: &[Link],
        stream: &mut Option<Stream>,
        active: &mut Vec<Active>,
    ) -> Verdict {
        for link in chain {
            let p = &self.list[link.plugin];
            let mut st = p.state.lock().unwrap_or_else(|e| e.into_inner());
            let (http_id, generation) = match self.open(p, &mut st, link) {
                Ok(Some(ids)) => ids,
                Ok(None) => return Verdict::Fail,
                Err(f) => {
                    self.fault(p, &mut st, &f, "creating a context");
                    if p.decl.fail_open {
                        continue;
                    }
                    return Verdict::Fail;
                }
            };
            active.push(Active {
                plugin: link.plugin,
                owner: link.owner.clone(),
                http_id,
                vm_generation: generation,
            });
            let vm = st.vm.as_mut().expect("opened above");
            let (s, r) = vm.on_request_headers(http_id, stream.take().expect("stream present"));
            *stream = Some(s);
            match r {
                Ok((_, Some(reply))) => return Verdict::Reply(reply),
                Ok((Action::Pause, None)) => {
                    tracing::warn!("{}: paused the request in proxy_on_request_headers; resuming (pausing needs an http_call)", p.decl.name);
                }
                Ok((Action::Continue, None)) => {}
                Err(f) => {
                    self.fault(p, &mut st, &f, "proxy_on_request_headers");
                    if !p.decl.fail_open {
                        return Verdict::Fail;
                    }
                }
            }
        }
        Verdict::Continue
    }

    /// Ensures the VM and the PluginContext, then creates an HttpContext: (http id, VM generation),
    /// or None when the plugin refused its configuration.
    fn open(&self, p: &Plugin, st: &mut VmState, link: &Link) -> Result<Option<(u32, u64)>, Fault> {
        if st.vm.is_none() {
            st.vm = Some(PluginVm::new(&p.module)?);
            st.generation += 1;
            st.roots.clear();
            tracing::warn!("{}: new instance started", p.decl.name);
        }
        if !st.roots.contains_key(&link.owner) {
            self.retire_older(p, st, &link.owner);
            let vm = st.vm.as_mut().expect("ensured above");
            let id = vm.create_plugin_context(link.conf.as_bytes())?;
            if id.is_none() {
                tracing::error!(
                    "{}: failed to configure the plugin for {} (proxy_on_configure returned false)",
                    p.decl.name,
                    describe(&link.owner)
                );
            }
            st.roots.insert(
                link.owner.clone(),
                Root {
                    id,
                    inflight: 0,
                    stale: false,
                },
            );
        }
        let root = st.roots.get_mut(&link.owner).expect("inserted above");
        let Some(root_id) = root.id else {
            tracing::error!(
                "{}: failed to configure the plugin for {}; answering 503",
                p.decl.name,
                describe(&link.owner)
            );
            return Ok(None);
        };
        root.inflight += 1;
        let vm = st.vm.as_mut().expect("ensured above");
        let id = vm.create_http_context(root_id)?;
        Ok(Some((id, st.generation)))
    }

    /// A new revision of `owner`'s object: older PluginContexts of the same object are finished
    /// now if idle, or when their last request ends.
    fn retire_older(&self, p: &Plugin, st: &mut VmState, owner: &str) {
        let object = owner.rsplit_once(':').map(|(o, _)| o).unwrap_or(owner);
        for (key, root) in st.roots.iter_mut() {
            if key.rsplit_once(':').map(|(o, _)| o) == Some(object) && key != owner {
                root.stale = true;
            }
        }
        self.collect(p, st);
    }

    fn collect(&self, p: &Plugin, st: &mut VmState) {
        let done: Vec<String> = st
            .roots
            .iter()
            .filter(|(_, r)| r.stale && r.inflight == 0)
            .map(|(k, _)| k.clone())
            .collect();
        for key in done {
            if let (Some(root), Some(vm)) = (st.roots.remove(&key), st.vm.as_mut()) {
                if let Some(id) = root.id {
                    if let Err(f) = vm.finish(id) {
                        self.fault(p, st, &f, "finishing a plugin context");
                        return;
                    }
                }
            }
        }
    }

    /// Response headers through the contexts of this request.
    pub fn on_response(&self, active: &[Active], stream: &mut Option<Stream>) -> Verdict {
        for a in active {
            let p = &self.list[a.plugin];
            let mut st = p.state.lock().unwrap_or_else(|e| e.into_inner());
            if st.generation != a.vm_generation {
                continue;
            }
            let Some(vm) = st.vm.as_mut() else { continue };
            let (s, r) = vm.on_response_headers(a.http_id, stream.take().expect("stream present"));
            *stream = Some(s);
            match r {
                Ok((_, Some(reply))) => return Verdict::Reply(reply),
                Ok(_) => {}
                Err(f) => {
                    self.fault(p, &mut st, &f, "proxy_on_response_headers");
                    if !p.decl.fail_open {
                        return Verdict::Fail;
                    }
                }
            }
        }
        Verdict::Continue
    }

    /// The log phase: `proxy_on_log`, then done and delete for every HttpContext.
    pub fn on_log(&self, active: Vec<Active>, mut stream: Stream) {
        for a in active {
            let p = &self.list[a.plugin];
            let mut st = p.state.lock().unwrap_or_else(|e| e.into_inner());
            if st.generation != a.vm_generation || st.vm.is_none() {
                continue;
            }
            let vm = st.vm.as_mut().expect("checked");
            let (s, r) = vm.on_log(a.http_id, stream);
            stream = s;
            let r = r.and_then(|_| vm.finish(a.http_id));
            if let Err(f) = r {
                self.fault(p, &mut st, &f, "proxy_on_log");
                continue;
            }
            if let Some(root) = st.roots.get_mut(&a.owner) {
                root.inflight = root.inflight.saturating_sub(1);
            }
            self.collect(p, &mut st);
        }
    }
}

impl Plugins {
    /// Discards the VM after a fault (later requests get a new one), logs and counts it.
    fn fault(&self, p: &Plugin, st: &mut VmState, f: &Fault, during: &str) {
        let open = if p.decl.fail_open {
            " (fail_open: the request continues)"
        } else {
            ""
        };
        tracing::error!(
            "{}: {f} in {during}; instance discarded, a new one serves later requests{open}",
            p.decl.name
        );
        if let Some((seg, slot)) = &self.faults {
            seg.slot(*slot)
                .plugin_faults
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        st.vm = None;
        st.roots.clear();
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
