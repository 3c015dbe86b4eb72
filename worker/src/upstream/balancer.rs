//! Load balancing over an upstream's nodes, following Apache APISIX / nginx.
//!
//! Three strategies are supported:
//! - smooth weighted round robin (nginx `ngx_http_upstream_round_robin`),
//! - consistent hashing on a ring of virtual points (APISIX `chash`),
//! - least connections weighted by node weight (nginx `least_conn`).
//!
//! The balancer only chooses node indexes; retries are driven by the caller,
//! which passes the indexes it already tried so they are skipped.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

/// Virtual ring points per unit of weight; enough points to spread keys
/// evenly while keeping the ring small for typical weights.
const POINTS_PER_WEIGHT: u128 = 160;

/// Upper bound on ring points so huge weights cannot blow up memory; weights
/// are scaled down proportionally when the ring would exceed it.
const MAX_RING_POINTS: u128 = 65_536;

/// One upstream node as the balancer sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BalancerNode {
    /// Node address as `host:port`; also the identity hashed onto the ring.
    pub addr: String,
    /// Relative weight; a node with weight 0 is never picked.
    pub weight: u32,
    /// Only the highest priority among the nodes not yet tried is picked from (APISIX's
    /// backup nodes: a lower priority serves once the higher ones have failed).
    pub priority: i64,
}

/// Which load-balancing strategy a [`Balancer`] uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BalancerKind {
    /// nginx smooth weighted round robin.
    RoundRobin,
    /// Consistent hashing on a key; round robin when no key is given.
    Chash,
    /// Fewest active requests relative to weight.
    LeastConn,
}

/// One virtual point of the consistent-hash ring.
#[derive(Debug, Clone, Copy)]
struct RingPoint {
    hash: u64,
    node: usize,
}

/// Picks upstream nodes for requests; shared between tasks (`Send + Sync`).
#[derive(Debug)]
pub struct Balancer {
    kind: BalancerKind,
    nodes: Vec<BalancerNode>,
    /// Smooth WRR `current_weight` per node; a mutex because one pick reads
    /// and updates every node's value as a single step.
    current: Mutex<Vec<i64>>,
    /// Sorted consistent-hash ring; empty unless the kind is `Chash`.
    ring: Vec<RingPoint>,
    /// Active requests per node; empty unless the kind is `LeastConn`.
    active: Vec<AtomicU64>,
    /// Rotating scan start so least-conn ties are spread round robin.
    cursor: AtomicUsize,
}

impl Balancer {
    /// Builds a balancer of `kind` over `nodes`; node indexes are positions
    /// in `nodes`.
    #[must_use]
    pub fn new(kind: BalancerKind, nodes: Vec<BalancerNode>) -> Balancer {
        let ring = match kind {
            BalancerKind::Chash => build_ring(&nodes),
            _ => Vec::new(),
        };
        let active = match kind {
            BalancerKind::LeastConn => nodes.iter().map(|_| AtomicU64::new(0)).collect(),
            _ => Vec::new(),
        };
        Balancer {
            kind,
            current: Mutex::new(vec![0; nodes.len()]),
            nodes,
            ring,
            active,
            cursor: AtomicUsize::new(0),
        }
    }

    /// Picks a node index for one attempt.
    ///
    /// `hash_key` is used by `Chash` only (without a key it falls back to
    /// round robin). Indexes in `tried` are skipped; out-of-range ones are
    /// ignored. Returns `None` when no node with weight > 0 is left untried —
    /// except that a lone node is always picked.
    pub fn pick(&self, hash_key: Option<&[u8]>, tried: &[usize]) -> Option<usize> {
        // One node (the common upstream: a service's name): every attempt goes to it, tried
        // or not and whatever its weight, as APISIX's `pick_server` takes a lone node — so
        // `retries` try it again.
        if self.nodes.len() == 1 {
            return Some(0);
        }
        let eligible = Eligible::new(&self.nodes, tried)?;
        match (self.kind, hash_key) {
            (BalancerKind::Chash, Some(key)) => self.pick_chash(key, &eligible),
            (BalancerKind::LeastConn, _) => self.pick_least_conn(&eligible),
            _ => self.pick_round_robin(&eligible),
        }
    }

    /// Records that a request started using node `i` (`LeastConn` only;
    /// a no-op otherwise or for an out-of-range index).
    pub fn on_start(&self, i: usize) {
        if let Some(count) = self.active.get(i) {
            // Saturating so a buggy caller can never wrap the count.
            let _ = count.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                Some(v.saturating_add(1))
            });
        }
    }

    /// Records that a request using node `i` finished (`LeastConn` only;
    /// a no-op otherwise or for an out-of-range index).
    pub fn on_finish(&self, i: usize) {
        if let Some(count) = self.active.get(i) {
            // `checked_sub` leaves 0 unchanged, so unmatched finishes are harmless.
            let _ = count.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| v.checked_sub(1));
        }
    }

    /// The nodes this balancer was built from, in index order.
    pub fn nodes(&self) -> &[BalancerNode] {
        &self.nodes
    }

    /// Number of nodes, including those with weight 0.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the balancer has no nodes at all.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// nginx smooth WRR: every eligible node gains its weight, the largest
    /// `current_weight` wins (first on ties) and pays back the total.
    fn pick_round_robin(&self, eligible: &Eligible) -> Option<usize> {
        let mut current = lock(&self.current);
        let mut total: i64 = 0;
        let mut best: Option<(usize, i64)> = None;
        let candidates = self.nodes.iter().zip(current.iter_mut());
        for (i, (node, cw)) in candidates.enumerate() {
            if !eligible.get(i) {
                continue;
            }
            let weight = i64::from(node.weight);
            *cw = cw.saturating_add(weight);
            total = total.saturating_add(weight);
            if best.is_none_or(|(_, value)| *cw > value) {
                best = Some((i, *cw));
            }
        }
        let (chosen, _) = best?;
        if let Some(cw) = current.get_mut(chosen) {
            *cw = cw.saturating_sub(total);
        }
        Some(chosen)
    }

    /// First ring point at or after the key's hash (wrapping), then onwards
    /// to the first point whose node is still eligible.
    fn pick_chash(&self, key: &[u8], eligible: &Eligible) -> Option<usize> {
        let hash = hash_bytes(key);
        let start = self.ring.partition_point(|p| p.hash < hash);
        self.ring
            .iter()
            .cycle()
            .skip(start)
            .take(self.ring.len())
            .map(|p| p.node)
            .find(|&n| eligible.get(n))
    }

    /// Lowest `active / weight` among eligible nodes; the scan starts at a
    /// rotating offset so equally loaded nodes share traffic.
    fn pick_least_conn(&self, eligible: &Eligible) -> Option<usize> {
        let n = self.nodes.len();
        if n == 0 {
            return None;
        }
        let start = self.cursor.fetch_add(1, Ordering::Relaxed) % n;
        let mut best: Option<(usize, Load)> = None;
        for i in (0..n).map(|k| (start + k) % n) {
            if !eligible.get(i) {
                continue;
            }
            let load = self.load(i);
            if best.is_none_or(|(_, b)| load.lighter_than(b)) {
                best = Some((i, load));
            }
        }
        best.map(|(i, _)| i)
    }

    /// Active count and weight of node `i`, for least-conn comparison.
    fn load(&self, i: usize) -> Load {
        let active = self.active.get(i).map_or(0, |a| a.load(Ordering::Acquire));
        let weight = self.nodes.get(i).map_or(0, |n| n.weight);
        Load {
            active: u128::from(active),
            weight: u128::from(weight),
        }
    }
}

/// A node's load as a fraction `active / weight`, kept as integers so the
/// comparison is exact and cannot overflow.
#[derive(Debug, Clone, Copy)]
struct Load {
    active: u128,
    weight: u128,
}

impl Load {
    /// `self.active / self.weight < other.active / other.weight`, cross-multiplied
    /// (u64 * u32 always fits in u128).
    fn lighter_than(self, other: Load) -> bool {
        self.active * other.weight < other.active * self.weight
    }
}

/// Which nodes an attempt may use: weight > 0 and not yet tried for this request (`tried` holds
/// a few indexes at most, so it is scanned rather than turned into a per-request mask).
struct Eligible<'a> {
    nodes: &'a [BalancerNode],
    tried: &'a [usize],
    /// The highest priority among the untried nodes: only its nodes are picked.
    top: i64,
}

impl<'a> Eligible<'a> {
    /// The nodes an attempt may use, None when every usable one has been tried.
    fn new(nodes: &'a [BalancerNode], tried: &'a [usize]) -> Option<Eligible<'a>> {
        let top = (0..nodes.len())
            .filter(|&i| usable(nodes, tried, i))
            .map(|i| nodes[i].priority)
            .max()?;
        Some(Eligible { nodes, tried, top })
    }

    /// Bounds-checked: an index past the nodes is not eligible.
    fn get(&self, i: usize) -> bool {
        usable(self.nodes, self.tried, i) && self.nodes[i].priority == self.top
    }
}

/// Whether node `i` may take an attempt whatever its priority: it exists, has a weight, and
/// has not been tried for this request.
fn usable(nodes: &[BalancerNode], tried: &[usize], i: usize) -> bool {
    nodes.get(i).is_some_and(|n| n.weight > 0) && !tried.contains(&i)
}

/// Locks a mutex, recovering from poisoning: the guarded weights stay valid
/// even if a holder panicked, and picking must never panic.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Builds the sorted ring. A point's hash depends only on its node's address
/// and its virtual index, so adding or removing a node leaves the other
/// nodes' points (and therefore their keys) in place.
fn build_ring(nodes: &[BalancerNode]) -> Vec<RingPoint> {
    let total_weight: u128 = nodes.iter().map(|n| u128::from(n.weight)).sum();
    let mut ring = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let base = fnv1a(FNV_OFFSET, node.addr.as_bytes());
        for v in 0..points_for(node.weight, total_weight) {
            let hash = fmix64(fnv1a(base, &v.to_le_bytes()));
            ring.push(RingPoint { hash, node: i });
        }
    }
    // Node index breaks hash ties so the ring order is fully deterministic.
    ring.sort_unstable_by_key(|p| (p.hash, p.node));
    ring
}

/// Virtual points for a node: `POINTS_PER_WEIGHT` per unit of weight, scaled
/// down when the whole ring would exceed `MAX_RING_POINTS` (at least one point
/// for any weighted node so it stays reachable).
fn points_for(weight: u32, total_weight: u128) -> u64 {
    if weight == 0 {
        return 0;
    }
    let wanted = u128::from(weight) * POINTS_PER_WEIGHT;
    let ring_size = total_weight * POINTS_PER_WEIGHT;
    let points = if ring_size <= MAX_RING_POINTS {
        wanted
    } else {
        wanted * MAX_RING_POINTS / ring_size
    };
    // `points <= MAX_RING_POINTS`, so the conversion cannot fail.
    u64::try_from(points.max(1)).unwrap_or(1)
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// Hash of a request key, comparable with ring point hashes.
fn hash_bytes(bytes: &[u8]) -> u64 {
    fmix64(fnv1a(FNV_OFFSET, bytes))
}

/// FNV-1a 64 continuing from `state`; stable across runs and builds, unlike
/// std's randomly seeded hasher, which keys must not depend on.
fn fnv1a(state: u64, bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(state, |h, &b| (h ^ u64::from(b)).wrapping_mul(FNV_PRIME))
}

/// `MurmurHash3` finalizer: FNV's high bits mix poorly for short inputs, and
/// the ring is ordered by the whole 64-bit value.
fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn nodes(weights: &[u32]) -> Vec<BalancerNode> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &weight)| BalancerNode {
                addr: format!("10.0.0.{i}:80"),
                weight,
                priority: 0,
            })
            .collect()
    }

    fn picks(b: &Balancer, key: Option<&[u8]>, tried: &[usize], count: usize) -> Vec<usize> {
        (0..count).map(|_| b.pick(key, tried).unwrap()).collect()
    }

    fn histogram(seq: &[usize], n: usize) -> Vec<usize> {
        let mut h = vec![0; n];
        for &i in seq {
            h[i] += 1;
        }
        h
    }

    #[test]
    fn balancer_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Balancer>();
    }

    #[test]
    fn smooth_wrr_5_1_1_sequence_and_proportions() {
        let b = Balancer::new(BalancerKind::RoundRobin, nodes(&[5, 1, 1]));
        assert_eq!(picks(&b, None, &[], 7), vec![0, 0, 1, 0, 2, 0, 0]);
        // The cycle repeats exactly, so proportions are exact over whole cycles.
        let seq = picks(&b, None, &[], 7000);
        assert_eq!(histogram(&seq, 3), vec![5000, 1000, 1000]);
    }

    #[test]
    fn smooth_wrr_1_1_alternates() {
        let b = Balancer::new(BalancerKind::RoundRobin, nodes(&[1, 1]));
        assert_eq!(picks(&b, None, &[], 4), vec![0, 1, 0, 1]);
        let seq = picks(&b, None, &[], 1000);
        assert_eq!(histogram(&seq, 2), vec![500, 500]);
    }

    #[test]
    fn smooth_wrr_is_exact_under_concurrency() {
        let b = Arc::new(Balancer::new(BalancerKind::RoundRobin, nodes(&[5, 1, 1])));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let b = Arc::clone(&b);
                std::thread::spawn(move || picks(&b, None, &[], 700))
            })
            .collect();
        let all: Vec<usize> = handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        assert_eq!(histogram(&all, 3), vec![2000, 400, 400]);
    }

    #[test]
    fn weight_zero_is_never_picked() {
        for kind in [
            BalancerKind::RoundRobin,
            BalancerKind::Chash,
            BalancerKind::LeastConn,
        ] {
            let b = Balancer::new(kind, nodes(&[0, 2, 0, 1]));
            for k in 0..500u32 {
                let key = k.to_le_bytes();
                let i = b.pick(Some(&key), &[]).unwrap();
                assert!(i == 1 || i == 3, "{kind:?} picked {i}");
            }
        }
    }

    #[test]
    fn rr_skips_tried_and_exhausts() {
        let b = Balancer::new(BalancerKind::RoundRobin, nodes(&[5, 1, 1]));
        assert!(picks(&b, None, &[0], 50).iter().all(|&i| i != 0));
        assert_eq!(b.pick(None, &[0, 2]), Some(1));
        assert_eq!(b.pick(None, &[0, 1, 2]), None);
        // Out-of-range and duplicate indexes are ignored.
        assert_eq!(b.pick(None, &[0, 0, 2, 99, usize::MAX]), Some(1));
    }

    #[test]
    fn retries_walk_through_every_node_once() {
        for kind in [
            BalancerKind::RoundRobin,
            BalancerKind::Chash,
            BalancerKind::LeastConn,
        ] {
            let b = Balancer::new(kind, nodes(&[3, 0, 1, 2]));
            let mut tried = Vec::new();
            while let Some(i) = b.pick(Some(b"user-42"), &tried) {
                assert!(!tried.contains(&i), "{kind:?} repeated {i}");
                tried.push(i);
            }
            tried.sort_unstable();
            assert_eq!(tried, vec![0, 2, 3], "{kind:?}");
        }
    }

    #[test]
    fn chash_is_stable_across_calls_and_instances() {
        let a = Balancer::new(BalancerKind::Chash, nodes(&[1, 2, 1, 1]));
        let b = Balancer::new(BalancerKind::Chash, nodes(&[1, 2, 1, 1]));
        let mut seen = [0usize; 4];
        for k in 0..2000 {
            let key = format!("client-{k}");
            let first = a.pick(Some(key.as_bytes()), &[]).unwrap();
            assert_eq!(a.pick(Some(key.as_bytes()), &[]), Some(first));
            assert_eq!(b.pick(Some(key.as_bytes()), &[]), Some(first));
            seen[first] += 1;
        }
        // Keys spread over all nodes, the weight-2 node taking the most.
        assert!(seen.iter().all(|&c| c > 200), "{seen:?}");
        assert!(seen[1] > seen[0] && seen[1] > seen[2] && seen[1] > seen[3]);
    }

    #[test]
    fn chash_removing_a_node_only_remaps_its_keys() {
        let full = nodes(&[1; 10]);
        let mut reduced = full.clone();
        let removed = reduced.remove(3);
        let before = Balancer::new(BalancerKind::Chash, full);
        let after = Balancer::new(BalancerKind::Chash, reduced);
        let addr =
            |b: &Balancer, key: &[u8]| b.nodes()[b.pick(Some(key), &[]).unwrap()].addr.clone();
        let (mut kept, mut total) = (0, 0);
        for k in 0..10_000 {
            let key = format!("key-{k}");
            let old = addr(&before, key.as_bytes());
            if old == removed.addr {
                continue;
            }
            total += 1;
            kept += usize::from(old == addr(&after, key.as_bytes()));
        }
        assert!(kept * 10 >= total * 9, "kept {kept} of {total}");
    }

    #[test]
    fn chash_tried_moves_to_next_node_deterministically() {
        let b = Balancer::new(BalancerKind::Chash, nodes(&[1, 1, 1]));
        let first = b.pick(Some(b"k"), &[]).unwrap();
        let second = b.pick(Some(b"k"), &[first]).unwrap();
        assert_ne!(first, second);
        assert_eq!(b.pick(Some(b"k"), &[first]), Some(second));
        assert_eq!(b.pick(Some(b"k"), &[0, 1, 2]), None);
    }

    #[test]
    fn chash_without_key_falls_back_to_round_robin() {
        let b = Balancer::new(BalancerKind::Chash, nodes(&[5, 1, 1]));
        assert_eq!(picks(&b, None, &[], 7), vec![0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn chash_ring_is_capped_for_huge_weights() {
        let b = Balancer::new(BalancerKind::Chash, nodes(&[u32::MAX, u32::MAX, 1]));
        assert!(b.ring.len() <= MAX_RING_POINTS as usize + b.len());
        // Even a node scaled down to almost nothing keeps a point on the ring.
        assert!(b.ring.iter().any(|p| p.node == 2));
        assert_eq!(b.pick(Some(b"x"), &[0, 1]), Some(2));
    }

    #[test]
    fn least_conn_picks_least_loaded() {
        let b = Balancer::new(BalancerKind::LeastConn, nodes(&[1, 1, 1]));
        b.on_start(0);
        b.on_start(0);
        b.on_start(1);
        assert!(picks(&b, None, &[], 10).iter().all(|&i| i == 2));
        assert_eq!(b.pick(None, &[2]), Some(1));
        b.on_finish(0);
        b.on_finish(0);
        assert_eq!(b.pick(None, &[2]), Some(0));
    }

    #[test]
    fn least_conn_weighs_load_by_weight() {
        // 1/1 active per weight vs 2/3: the heavier node is less loaded.
        let b = Balancer::new(BalancerKind::LeastConn, nodes(&[1, 3]));
        b.on_start(0);
        b.on_start(1);
        b.on_start(1);
        assert_eq!(b.pick(None, &[]), Some(1));
    }

    #[test]
    fn least_conn_spreads_ties_and_saturates() {
        let b = Balancer::new(BalancerKind::LeastConn, nodes(&[1, 1, 1]));
        let seq = picks(&b, None, &[], 300);
        assert_eq!(histogram(&seq, 3), vec![100, 100, 100]);
        // Unmatched finishes and out-of-range indexes are harmless.
        b.on_finish(0);
        b.on_start(7);
        b.on_finish(usize::MAX);
        assert_eq!(b.load(0).active, 0);
        b.active[1].store(u64::MAX, Ordering::Release);
        b.on_start(1);
        assert_eq!(b.load(1).active, u128::from(u64::MAX));
    }

    #[test]
    fn bookkeeping_is_a_no_op_for_other_kinds() {
        let b = Balancer::new(BalancerKind::RoundRobin, nodes(&[1, 1]));
        b.on_start(0);
        b.on_finish(1);
        assert_eq!(picks(&b, None, &[], 4), vec![0, 1, 0, 1]);
    }

    #[test]
    fn empty_and_all_zero_return_none() {
        for kind in [
            BalancerKind::RoundRobin,
            BalancerKind::Chash,
            BalancerKind::LeastConn,
        ] {
            let empty = Balancer::new(kind, Vec::new());
            assert!(empty.is_empty());
            assert_eq!(empty.len(), 0);
            assert_eq!(empty.pick(Some(b"k"), &[]), None);
            assert_eq!(empty.pick(None, &[0]), None);
            let zeros = Balancer::new(kind, nodes(&[0, 0]));
            assert!(!zeros.is_empty());
            assert_eq!(zeros.pick(Some(b"k"), &[]), None);
            assert_eq!(zeros.pick(None, &[]), None);
        }
    }

    /// APISIX's node priorities: the backup (lower priority) nodes serve only once every
    /// node above them has been tried, under every policy.
    #[test]
    fn lower_priorities_serve_once_higher_ones_were_tried() {
        for kind in [
            BalancerKind::RoundRobin,
            BalancerKind::Chash,
            BalancerKind::LeastConn,
        ] {
            let mut list = nodes(&[1, 1, 1]);
            list[0].priority = 1;
            list[1].priority = 1;
            list[2].priority = -1;
            let b = Balancer::new(kind, list);
            for _ in 0..20 {
                assert_ne!(b.pick(Some(b"k"), &[]), Some(2), "{kind:?}");
            }
            assert_eq!(b.pick(Some(b"k"), &[0]), Some(1), "{kind:?}");
            assert_eq!(b.pick(Some(b"k"), &[0, 1]), Some(2), "{kind:?}");
        }
    }

    #[test]
    fn huge_weights_do_not_overflow() {
        let b = Balancer::new(BalancerKind::RoundRobin, nodes(&[u32::MAX; 3]));
        let seq = picks(&b, None, &[], 3000);
        assert_eq!(histogram(&seq, 3), vec![1000, 1000, 1000]);
        let b = Balancer::new(BalancerKind::RoundRobin, nodes(&[u32::MAX, 1]));
        let seq = picks(&b, None, &[1], 100);
        assert!(seq.iter().all(|&i| i == 0));
        let b = Balancer::new(BalancerKind::LeastConn, nodes(&[u32::MAX, 1]));
        b.active[0].store(u64::MAX, Ordering::Release);
        assert_eq!(b.pick(None, &[]), Some(1));
    }
}
