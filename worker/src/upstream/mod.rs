//! Upstreams at run time: nodes, load balancing, timeouts, the connection pool and forwarding
//! with retries.

pub mod balancer;
pub mod h1;
pub mod health;
pub mod io;
pub mod pool;
pub mod tls;

use balancer::{Balancer, BalancerKind, BalancerNode};
use std::sync::Arc;
use std::time::Duration;
use wasmgate_shared::model::NodeAddr;
use wasmgate_shared::model::{HashOn, LbType, PassHost, Timeout, Upstream};

/// APISIX's default upstream timeouts (seconds).
const DEFAULT_TIMEOUT: f64 = 60.0;

/// An upstream compiled for serving; shared by every route using it and kept across router
/// rebuilds while its revision is unchanged, so balancer state survives configuration changes.
#[derive(Debug)]
pub struct UpstreamRuntime {
    pub nodes: Vec<NodeAddr>,
    /// Each node's `host:port`, made once: it keys the connection pool and the access log.
    pub authorities: Vec<Arc<str>>,
    pub balancer: Balancer,
    pub connect_timeout: Duration,
    pub send_timeout: Duration,
    pub read_timeout: Duration,
    /// Further nodes tried after a connect failure.
    pub retries: usize,
    pub retry_timeout: Option<Duration>,
    pub pass_host: PassHost,
    pub upstream_host: Option<String>,
    /// `type: chash`: requests carry a key to hash ([`crate::proxy`]'s `hash_key`).
    pub chash: bool,
    pub hash_on: HashOn,
    pub key: Option<String>,
    /// `scheme: https`: the TLS client settings, or why they cannot be used.
    pub tls: Option<Result<tls::Settings, Arc<str>>>,
    /// `checks`: the nodes' health, read and (passive checks) counted.
    pub health: Option<health::NodeHealth>,
}

/// Node `idx` of an upstream counted busy by its balancer (`least_conn`) until this is dropped:
/// however the request ends — answered, failed, or dropped with its future when the client
/// leaves first — the count goes back down, as nginx frees the peer when it finalizes the
/// request. A tunnel keeps it for as long as it lasts.
#[derive(Debug)]
pub struct Busy(Arc<UpstreamRuntime>, usize);

impl Busy {
    pub fn start(up: &Arc<UpstreamRuntime>, idx: usize) -> Busy {
        up.balancer.on_start(idx);
        Busy(up.clone(), idx)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.balancer.on_finish(self.1);
    }
}

fn secs(v: Option<f64>) -> Duration {
    Duration::from_secs_f64(v.unwrap_or(DEFAULT_TIMEOUT).clamp(0.001, 86_400.0))
}

/// The most retries a request makes on a lone node (further nodes bound them otherwise).
pub const LONE_NODE_RETRIES: usize = 5;

impl UpstreamRuntime {
    /// `http`, or `https` when the nodes are spoken to over TLS.
    pub fn scheme(&self) -> &'static str {
        match self.tls {
            Some(_) => "https",
            None => "http",
        }
    }

    /// The handshake a new TLS connection to node `idx` makes for a request sent with
    /// `host`; None for a plain upstream.
    pub fn handshake(
        &self,
        idx: usize,
        host: Option<&http::HeaderValue>,
    ) -> Result<Option<tls::Handshake>, pool::ConnectError> {
        match &self.tls {
            None => Ok(None),
            Some(Err(why)) => Err(pool::ConnectError::TlsSettings(why.clone())),
            Some(Ok(settings)) => Ok(Some(settings.handshake(host, &self.nodes[idx].host))),
        }
    }

    /// Picks a node for one attempt, leaving out the nodes already `tried` and, while another
    /// remains, those found unhealthy.
    pub fn pick(&self, hash_key: Option<&[u8]>, tried: &[usize]) -> Option<usize> {
        // A lone node is taken whatever its health (APISIX checks none before taking it).
        let Some(health) = self.health.as_ref().filter(|_| self.nodes.len() > 1) else {
            return self.balancer.pick(hash_key, tried);
        };
        let mut skip = tried.to_vec();
        health.unhealthy(&mut skip);
        let unhealthy = &skip[tried.len()..];
        // No healthy node that may be picked (weight 0 is never picked): they are all tried
        // the same (APISIX's "all upstream nodes is unhealthy, use default"), a node may be
        // back before its checks say so. Otherwise the healthy ones alone, retries included:
        // once they are tried, the request has its answer (APISIX builds its picker from
        // the healthy nodes).
        let any_healthy =
            (self.nodes.iter().enumerate()).any(|(i, n)| n.weight > 0 && !unhealthy.contains(&i));
        match unhealthy.is_empty() || !any_healthy {
            true => self.balancer.pick(hash_key, tried),
            false => self.balancer.pick(hash_key, &skip),
        }
    }

    /// Counts one attempt on node `idx` for passive health checks.
    pub fn observe(&self, idx: usize, attempt: health::Attempt) {
        if let Some(h) = &self.health {
            h.observe(idx, attempt, &self.authorities[idx]);
        }
    }

    /// Compiles a validated upstream; `route_timeout` (a route's `timeout`) wins over the
    /// upstream's own. `owner` names the object it belongs to (`upstreams/1`, `routes/7`,
    /// `services/2`): nodes' health is kept under it.
    pub fn new(u: &Upstream, route_timeout: Option<&Timeout>, owner: &str) -> UpstreamRuntime {
        let nodes = u.normalized_nodes().unwrap_or_default();
        let kind = match u.lb {
            LbType::Roundrobin => BalancerKind::RoundRobin,
            LbType::Chash => BalancerKind::Chash,
            LbType::LeastConn => BalancerKind::LeastConn,
        };
        let bnodes = nodes
            .iter()
            .map(|n| BalancerNode {
                addr: n.authority(),
                weight: n.weight,
                priority: n.priority,
            })
            .collect();
        let t = |f: fn(&Timeout) -> Option<f64>| {
            secs(
                route_timeout
                    .and_then(f)
                    .or_else(|| u.timeout.as_ref().and_then(f)),
            )
        };
        let usable = nodes.iter().filter(|n| n.weight > 0).count();
        UpstreamRuntime {
            balancer: Balancer::new(kind, bnodes),
            connect_timeout: t(|t| t.connect),
            send_timeout: t(|t| t.send),
            read_timeout: t(|t| t.read),
            retries: match u.retries.map(|r| r as usize) {
                // A lone node is picked again for each retry: a few are worth it (a dropped
                // connection), thousands would be a loop of connects and error-log lines.
                Some(r) if nodes.len() == 1 => r.min(LONE_NODE_RETRIES),
                Some(r) => r,
                None => usable.saturating_sub(1),
            },
            retry_timeout: u
                .retry_timeout
                .filter(|t| *t > 0.0)
                .map(Duration::from_secs_f64),
            pass_host: u.pass_host,
            upstream_host: u.upstream_host.clone(),
            chash: kind == BalancerKind::Chash,
            hash_on: u.hash_on.unwrap_or_default(),
            key: u.key.clone(),
            tls: u.is_https().then(|| {
                tls::Settings::new(u.tls.as_ref()).map_err(|e| {
                    tracing::error!("upstream TLS settings cannot be used: {e}");
                    Arc::from(e)
                })
            }),
            authorities: nodes.iter().map(|n| Arc::from(n.authority())).collect(),
            health: health::NodeHealth::new(owner, &nodes, u.checks.as_ref()),
            nodes,
        }
    }
}
