//! The health of an upstream's nodes as a worker uses it (`checks`): nodes the health segment
//! holds unhealthy are left out of the choice while a healthy one remains (when none does,
//! every node is tried, as APISIX does), and with `checks.passive` each attempt's outcome is
//! counted into the node's record. The master's active checks count into the same records
//! (master/src/health.rs), and bring nodes back.

use std::sync::{Arc, OnceLock};
use wasmgate_shared::health::{self, HealthShm, Outcome, Thresholds};
use wasmgate_shared::model::checks::{Checks, Passive, ProbeType};
use wasmgate_shared::model::NodeAddr;

/// The segment every process shares, mapped at start.
static SHM: OnceLock<HealthShm> = OnceLock::new();

/// Reads nodes' health from `shm` (the master's segment) from now on.
pub fn install(shm: HealthShm) {
    let _ = SHM.set(shm);
}

/// The checked nodes of one upstream.
#[derive(Debug)]
pub struct NodeHealth {
    /// The object that owns the upstream (`upstreams/1`, `routes/7`), for the log.
    owner: Arc<str>,
    /// Each node's tag, in the upstream's node order.
    tags: Vec<u64>,
    passive: Option<PassiveRules>,
}

#[derive(Debug)]
struct PassiveRules {
    /// `tcp`: only connection failures and timeouts count, and any answer is a success.
    tcp_only: bool,
    healthy: Vec<u16>,
    unhealthy: Vec<u16>,
    thresholds: Thresholds,
}

/// What one attempt on a node came to, for passive checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    Answered(u16),
    ConnectFailed,
    TimedOut,
    /// The connection broke, or what came back was not HTTP.
    Broken,
}

impl NodeHealth {
    /// The health of `nodes`, when `checks` has active checks (passive ones alone are
    /// refused when written: nothing would bring a node back).
    pub fn new(owner: &str, nodes: &[NodeAddr], checks: Option<&Checks>) -> Option<NodeHealth> {
        let checks = checks?;
        checks.active.as_ref()?;
        Some(NodeHealth {
            tags: (nodes.iter())
                .map(|n| health::tag(owner, &n.authority()))
                .collect(),
            owner: owner.into(),
            passive: checks.passive.as_ref().map(PassiveRules::new),
        })
    }

    /// Adds the indexes of the nodes found unhealthy to `out`.
    pub fn unhealthy(&self, out: &mut Vec<usize>) {
        let Some(shm) = SHM.get() else { return };
        for (i, &tag) in self.tags.iter().enumerate() {
            // A node both tried and unhealthy is listed twice: the balancer does not mind.
            if shm.find(tag).is_some_and(|slot| !shm.healthy(slot, tag)) {
                out.push(i);
            }
        }
    }

    /// Counts `attempt` on node `i` (`checks.passive` only).
    pub fn observe(&self, i: usize, attempt: Attempt, node: &str) {
        let (Some(rules), Some(shm), Some(&tag)) = (&self.passive, SHM.get(), self.tags.get(i))
        else {
            return;
        };
        let Some(outcome) = rules.outcome(attempt) else {
            return;
        };
        let Some(slot) = shm.find(tag) else { return };
        if let Some(change) = shm.report(slot, tag, outcome, &rules.thresholds) {
            let seen = match attempt {
                Attempt::Answered(s) => format!("status {s}"),
                Attempt::ConnectFailed => "connect() failed".into(),
                Attempt::TimedOut => "timed out".into(),
                Attempt::Broken => "connection broken".into(),
            };
            let line = change.describe(node, &self.owner, "passive", &seen);
            match change.healthy {
                true => tracing::warn!("{line}"),
                false => tracing::error!("{line}"),
            }
        }
    }
}

impl PassiveRules {
    fn new(p: &Passive) -> PassiveRules {
        let u = &p.unhealthy;
        PassiveRules {
            tcp_only: p.kind == ProbeType::Tcp,
            healthy: p.healthy.http_statuses.clone(),
            unhealthy: u.http_statuses.clone(),
            thresholds: Thresholds {
                successes: p.healthy.successes as u8,
                http_failures: u.http_failures as u8,
                tcp_failures: u.tcp_failures as u8,
                timeouts: u.timeouts as u8,
            },
        }
    }

    fn outcome(&self, attempt: Attempt) -> Option<Outcome> {
        Some(match attempt {
            Attempt::Answered(_) if self.tcp_only => Outcome::Success,
            Attempt::Answered(s) if self.healthy.contains(&s) => Outcome::Success,
            Attempt::Answered(s) if self.unhealthy.contains(&s) => Outcome::HttpFailure,
            Attempt::Answered(_) => return None,
            Attempt::ConnectFailed | Attempt::Broken => Outcome::TcpFailure,
            Attempt::TimedOut => Outcome::Timeout,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passive_rules_classify_as_lua_resty_healthcheck() {
        let p: Passive = serde_json::from_value(serde_json::json!({})).unwrap();
        let r = PassiveRules::new(&p);
        assert_eq!(r.outcome(Attempt::Answered(200)), Some(Outcome::Success));
        assert_eq!(
            r.outcome(Attempt::Answered(503)),
            Some(Outcome::HttpFailure)
        );
        assert_eq!(r.outcome(Attempt::Answered(404)), None);
        assert_eq!(r.outcome(Attempt::ConnectFailed), Some(Outcome::TcpFailure));
        assert_eq!(r.outcome(Attempt::TimedOut), Some(Outcome::Timeout));
        let p: Passive = serde_json::from_value(serde_json::json!({"type": "tcp"})).unwrap();
        let r = PassiveRules::new(&p);
        assert_eq!(r.outcome(Attempt::Answered(503)), Some(Outcome::Success));
        assert_eq!(r.outcome(Attempt::Broken), Some(Outcome::TcpFailure));
    }
}
