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
    healthy: Statuses,
    unhealthy: Statuses,
    thresholds: Thresholds,
}

/// A set of statuses from 200 to 599 (what `http_statuses` may hold), one bit each: looked up
/// for every answer.
#[derive(Debug)]
struct Statuses([u64; 7]);

impl Statuses {
    fn of(list: &[u16]) -> Statuses {
        let mut bits = [0u64; 7];
        for &s in list.iter().filter(|s| (200..600).contains(*s)) {
            let i = usize::from(s - 200);
            bits[i / 64] |= 1 << (i % 64);
        }
        Statuses(bits)
    }

    fn contains(&self, status: u16) -> bool {
        let Some(i) = status.checked_sub(200).map(usize::from) else {
            return false;
        };
        self.0.get(i / 64).is_some_and(|w| w & (1 << (i % 64)) != 0)
    }
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
            change.log(node, &self.owner, "passive", &seen);
        }
    }
}

impl PassiveRules {
    fn new(p: &Passive) -> PassiveRules {
        PassiveRules {
            tcp_only: p.kind == ProbeType::Tcp,
            healthy: Statuses::of(&p.healthy.http_statuses),
            unhealthy: Statuses::of(&p.unhealthy.http_statuses),
            thresholds: p.thresholds(),
        }
    }

    fn outcome(&self, attempt: Attempt) -> Option<Outcome> {
        Some(match attempt {
            Attempt::Answered(_) if self.tcp_only => Outcome::Success,
            Attempt::Answered(s) if self.healthy.contains(s) => Outcome::Success,
            Attempt::Answered(s) if self.unhealthy.contains(s) => Outcome::HttpFailure,
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
        assert_eq!(r.outcome(Attempt::Answered(599)), None);
        assert_eq!(r.outcome(Attempt::Answered(100)), None);
        assert_eq!(r.outcome(Attempt::Answered(308)), Some(Outcome::Success));
        assert_eq!(r.outcome(Attempt::ConnectFailed), Some(Outcome::TcpFailure));
        assert_eq!(r.outcome(Attempt::TimedOut), Some(Outcome::Timeout));
        let p: Passive = serde_json::from_value(serde_json::json!({"type": "tcp"})).unwrap();
        let r = PassiveRules::new(&p);
        assert_eq!(r.outcome(Attempt::Answered(503)), Some(Outcome::Success));
        assert_eq!(r.outcome(Attempt::Broken), Some(Outcome::TcpFailure));
    }
}
