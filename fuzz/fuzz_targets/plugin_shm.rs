//! `wasmgate_shared::plugin_shm::PluginShm` against an in-memory model.
//!
//! A 64 KiB segment (the smallest: 32 KiB of shared data, 9 queues in 15 KiB, 11 metrics, so
//! every "full" path is reachable) is created, a second mapping of it is opened as a worker
//! would, and an arbitrary sequence of operations is applied through either mapping. Every answer
//! is checked against the model:
//! - shared data: a read gives the last acknowledged write and its CAS; `cas == 0` writes
//!   unconditionally, a missing key is created whatever the CAS, a mismatched CAS on an existing
//!   key is `CasMismatch`; CAS values are never 0 and grow with each write (one counter);
//! - queues: the same (vm_id, name) gives the same token, different ones different tokens;
//!   items come out FIFO; `queue_len` and `queue_seq` follow; an enqueue drops the queue's
//!   oldest items only when it is at its item limit or the arena cannot take the new one;
//! - metrics: same name and kind → same id, another kind → BadArgument; counter, gauge and
//!   histogram arithmetic as documented;
//! - every error must be justified by the model: `TooLarge` only past a limit, `Full` only when
//!   the live data (as the model counts it) plus the new record exceeds the capacity the error
//!   names (so a compaction that loses space is caught), `NotFound` only for unknown tokens/ids.
//!   `BadSegment` (a self-check failing) is never expected here.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use std::collections::{HashMap, VecDeque};
use wasmgate_shared::plugin_shm::{
    Error, MetricKind, PluginShm, HISTOGRAM_BOUNDS, MAX_KEY_LEN, MAX_METRIC_NAME_LEN,
    MAX_QUEUE_ITEMS, MAX_QUEUE_NAME_LEN, MIN_SEGMENT_SIZE,
};

/// At most this many operations per input (keeps one run short).
const MAX_OPS: usize = 300;

const KEYS: [&[u8]; 8] = [
    b"a",
    b"b",
    b"",
    b"vm1.counter",
    b"k\0",
    b"\xff\xfe",
    b"aa",
    b"A",
];
/// Chosen so that different (vm_id, name) pairs concatenate to the same bytes ("vmq").
const VMS: [&str; 4] = ["", "vm", "v", "vmq"];
const QNAMES: [&str; 4] = ["q", "mq", "", "queue"];
const METRICS: [&str; 5] = ["requests", "latency", "requests_total", "a.b-c", "0"];

#[derive(Arbitrary, Debug)]
enum Key {
    /// One of a few fixed keys, so that writes often hit an existing key.
    Pool(u8),
    Bytes(Vec<u8>),
    /// Around the 4 KiB key limit: `MAX_KEY_LEN - 2 + (n % 5)` bytes.
    NearLimit {
        byte: u8,
        n: u8,
    },
}

impl Key {
    fn bytes(&self) -> Vec<u8> {
        match self {
            Key::Pool(i) => KEYS[*i as usize % KEYS.len()].to_vec(),
            Key::Bytes(b) => b.clone(),
            Key::NearLimit { byte, n } => vec![*byte; MAX_KEY_LEN - 2 + (*n as usize % 5)],
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Data {
    Bytes(Vec<u8>),
    /// `units × 64` bytes (up to 16 KiB): a few of these fill an arena, forcing compaction and
    /// `Full`.
    Fill {
        byte: u8,
        units: u8,
    },
    /// Larger than the arenas of a 64 KiB segment: `TooLarge`.
    Huge(u16),
}

impl Data {
    fn bytes(&self) -> Vec<u8> {
        match self {
            Data::Bytes(b) => b.clone(),
            Data::Fill { byte, units } => vec![*byte; *units as usize * 64],
            Data::Huge(n) => vec![0x48; (32 << 10) + *n as usize],
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Cas {
    Zero,
    /// The key's current CAS (the last one read back after a write).
    Current,
    /// The current CAS plus a small offset (a stale or future CAS).
    Near(i8),
    Raw(u32),
}

#[derive(Arbitrary, Debug)]
enum Name {
    Pool(u8, u8),
    Raw(String, String),
    /// Around the 256-byte name limits: `254 + (n % 5)` bytes in all.
    NearLimit(u8),
}

#[derive(Arbitrary, Debug)]
enum Ref {
    /// One of those the model knows (index modulo their number).
    Known(u8),
    /// Any token or id, mostly unknown.
    Raw(u32),
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

#[derive(Arbitrary, Debug)]
enum Op {
    Set {
        h: bool,
        key: Key,
        value: Data,
        cas: Cas,
    },
    Get {
        h: bool,
        key: Key,
    },
    Register {
        h: bool,
        name: Name,
    },
    Enqueue {
        h: bool,
        q: Ref,
        data: Data,
    },
    Dequeue {
        h: bool,
        q: Ref,
    },
    Define {
        h: bool,
        kind: Kind,
        name: Name,
    },
    Increment {
        h: bool,
        m: Ref,
        delta: i64,
    },
    Record {
        h: bool,
        m: Ref,
        value: u64,
    },
    /// `n % 512` writes of distinct keys `bulk<tag>/<i>` (fills the key table: 384 keys).
    BulkSet {
        h: bool,
        n: u16,
        tag: u8,
        len: u8,
    },
    /// `n` items of `len` bytes into one queue, or `n` dequeues.
    BulkEnqueue {
        h: bool,
        q: Ref,
        n: u8,
        len: u8,
    },
    BulkDequeue {
        h: bool,
        q: Ref,
        n: u8,
    },
    /// `n % 16` queues `("bulk", "q<i>")` and metrics `bulk_<i>` (fills both tables).
    BulkRegister {
        h: bool,
        n: u8,
    },
    /// Drops the second mapping and opens the segment again.
    Reopen,
    /// Compares everything readable with the model.
    CheckAll {
        h: bool,
    },
}

fn record_size(payload: usize) -> u64 {
    ((24 + payload + 7) & !7) as u64
}

struct Queue {
    vm: String,
    name: String,
    token: u32,
    items: VecDeque<Vec<u8>>,
    /// `queue_seq` at registration.
    seq0: u64,
    enqueued: u64,
}

struct Metric {
    name: String,
    kind: MetricKind,
    id: u32,
    value: i64,
    buckets: [u64; HISTOGRAM_BOUNDS.len() + 1],
    sum: u64,
}

#[derive(Default)]
struct Model {
    kv: HashMap<Vec<u8>, (Vec<u8>, u32)>,
    max_cas: u32,
    queues: Vec<Queue>,
    metrics: Vec<Metric>,
}

impl Model {
    fn kv_live(&self) -> u64 {
        self.kv
            .iter()
            .map(|(k, (v, _))| record_size(k.len() + v.len()))
            .sum()
    }

    fn q_live(&self) -> u64 {
        self.queues
            .iter()
            .flat_map(|q| q.items.iter())
            .map(|i| record_size(i.len()))
            .sum()
    }

    fn queue_token(&self, r: &Ref) -> u32 {
        match *r {
            Ref::Known(i) if !self.queues.is_empty() => {
                self.queues[i as usize % self.queues.len()].token
            }
            Ref::Known(i) => u32::from(i),
            Ref::Raw(t) => t,
        }
    }

    fn metric_id(&self, r: &Ref) -> u32 {
        match *r {
            Ref::Known(i) if !self.metrics.is_empty() => {
                self.metrics[i as usize % self.metrics.len()].id
            }
            Ref::Known(i) => u32::from(i),
            Ref::Raw(t) => t,
        }
    }
}

fn names(n: &Name) -> (String, String) {
    match n {
        Name::Pool(a, b) => (
            VMS[*a as usize % VMS.len()].to_string(),
            QNAMES[*b as usize % QNAMES.len()].to_string(),
        ),
        Name::Raw(a, b) => (a.clone(), b.clone()),
        Name::NearLimit(n) => ("vm".to_string(), "n".repeat(252 + *n as usize % 5)),
    }
}

fn metric_name(n: &Name) -> String {
    match n {
        Name::Pool(a, _) => METRICS[*a as usize % METRICS.len()].to_string(),
        Name::Raw(a, b) => format!("{a}{b}"),
        Name::NearLimit(n) => "m".repeat(254 + *n as usize % 5),
    }
}

fn kind_of(k: Kind) -> MetricKind {
    match k {
        Kind::Counter => MetricKind::Counter,
        Kind::Gauge => MetricKind::Gauge,
        Kind::Histogram => MetricKind::Histogram,
    }
}

fn set(shm: &PluginShm, m: &mut Model, key: &[u8], value: &[u8], cas_choice: &Cas) {
    let current = m.kv.get(key).map(|(_, c)| *c);
    let cas = match *cas_choice {
        Cas::Zero => 0,
        Cas::Current => current.unwrap_or(m.max_cas),
        Cas::Near(d) => current.unwrap_or(m.max_cas).wrapping_add(d as i32 as u32),
        Cas::Raw(c) => c,
    };
    let mismatch = matches!(current, Some(c) if cas != 0 && cas != c);
    let need = record_size(key.len() + value.len());
    match shm.set(key, value, cas) {
        Ok(()) => {
            assert!(!mismatch, "CAS {cas} accepted, current is {current:?}");
            let (v, new_cas) = shm
                .get(key)
                .expect("read after write")
                .expect("acknowledged write not found");
            assert_eq!(v, value, "read after write gave another value");
            assert_ne!(new_cas, 0, "CAS 0 handed out");
            assert!(new_cas > m.max_cas, "CAS {new_cas} after {}", m.max_cas);
            if let Some(c) = current {
                assert_ne!(new_cas, c, "a write kept the CAS");
            }
            m.max_cas = new_cas;
            m.kv.insert(key.to_vec(), (value.to_vec(), new_cas));
        }
        Err(Error::TooLarge { size, limit, .. }) => {
            assert!(size > limit, "TooLarge {size} ≤ {limit}");
            assert!(
                key.len() > MAX_KEY_LEN || need as usize == size,
                "size {size}, need {need}"
            );
        }
        Err(Error::CasMismatch) => {
            assert!(mismatch, "CasMismatch for CAS {cas}, current {current:?}")
        }
        Err(Error::Full { what, capacity, .. }) => {
            assert!(!mismatch, "Full before the CAS check");
            match what {
                "shared data key table" => assert!(
                    current.is_none() && m.kv.len() as u64 >= capacity,
                    "key table full with {} keys of {capacity} (new key: {})",
                    m.kv.len(),
                    current.is_none()
                ),
                "shared data arena" => assert!(
                    m.kv_live() + need > capacity,
                    "arena full: live {} + need {need} ≤ {capacity}",
                    m.kv_live()
                ),
                other => panic!("unexpected Full: {other}"),
            }
        }
        Err(e) => panic!("set: unexpected {e}"),
    }
}

fn get(shm: &PluginShm, m: &Model, key: &[u8]) {
    let got = shm.get(key).unwrap_or_else(|e| panic!("get: {e}"));
    let want = m.kv.get(key);
    match (got, want) {
        (None, None) => {}
        (Some((v, c)), Some((mv, mc))) => {
            assert!(v == *mv, "get: stale or wrong value for {key:?}");
            assert_eq!(c, *mc, "get: CAS changed without a write");
        }
        (got, want) => panic!(
            "get {key:?}: got {:?}, model {:?}",
            got.map(|g| g.1),
            want.map(|w| w.1)
        ),
    }
}

fn register(shm: &PluginShm, m: &mut Model, vm: &str, name: &str) {
    let existing = m
        .queues
        .iter()
        .find(|q| q.vm == vm && q.name == name)
        .map(|q| q.token);
    match shm.register_queue(vm, name) {
        Ok(token) => {
            if let Some(t) = existing {
                assert_eq!(token, t, "re-registering gave another token");
                return;
            }
            assert!(
                token != 0 && m.queues.iter().all(|q| q.token != token),
                "token {token} reused"
            );
            assert!(vm.len() + name.len() <= MAX_QUEUE_NAME_LEN);
            let seq0 = shm.queue_seq(token).expect("registered queue has a seq");
            m.queues.push(Queue {
                vm: vm.to_string(),
                name: name.to_string(),
                token,
                items: VecDeque::new(),
                seq0,
                enqueued: 0,
            });
        }
        Err(Error::TooLarge { size, limit, .. }) => {
            assert!(size > limit && size == vm.len() + name.len())
        }
        Err(Error::Full { capacity, .. }) => assert!(
            existing.is_none() && m.queues.len() as u64 >= capacity,
            "queue table full with {} of {capacity}",
            m.queues.len()
        ),
        Err(e) => panic!("register_queue: unexpected {e}"),
    }
}

fn check_queue(shm: &PluginShm, q: &Queue) {
    assert_eq!(
        shm.queue_len(q.token),
        Some(q.items.len() as u64),
        "queue_len"
    );
    assert_eq!(
        shm.queue_seq(q.token),
        Some(q.seq0 + q.enqueued),
        "queue_seq"
    );
}

fn enqueue(shm: &PluginShm, m: &mut Model, token: u32, data: &[u8]) {
    let need = record_size(data.len());
    let live = m.q_live();
    let idx = m.queues.iter().position(|q| q.token == token);
    match shm.enqueue(token, data) {
        Ok(dropped) => {
            let q = &mut m.queues[idx.expect("enqueue to an unknown token accepted")];
            // Only a queue at its item limit, or one whose items keep the new one out of the
            // arena, gives up its oldest.
            if dropped > 0 {
                let cap = shm.queue_arena_capacity();
                assert!(
                    q.items.len() as u64 >= MAX_QUEUE_ITEMS || live + need > cap,
                    "dropped {dropped} with room: live {live} + need {need}, {} items",
                    q.items.len()
                );
            }
            for _ in 0..dropped {
                q.items
                    .pop_front()
                    .expect("dropped more items than the queue had");
            }
            q.items.push_back(data.to_vec());
            q.enqueued += 1;
            check_queue(shm, q);
        }
        Err(Error::NotFound) => assert!(idx.is_none(), "NotFound for token {token}"),
        Err(Error::TooLarge { size, limit, .. }) => {
            assert!(
                size > limit && size == need as usize,
                "TooLarge {size}/{limit}/{need}"
            )
        }
        Err(Error::Full { what, capacity, .. }) => {
            let i = idx.expect("Full for an unknown token");
            // Refused only when even the queue's own items would not make room.
            let own: u64 = m.queues[i]
                .items
                .iter()
                .map(|it| record_size(it.len()))
                .sum();
            match what {
                "shared queue arena" => assert!(
                    live - own + need > capacity,
                    "queue arena full: live {live} - own {own} + need {need} ≤ {capacity}"
                ),
                other => panic!("unexpected Full: {other}"),
            }
        }
        Err(e) => panic!("enqueue: unexpected {e}"),
    }
}

fn dequeue(shm: &PluginShm, m: &mut Model, token: u32) {
    let idx = m.queues.iter().position(|q| q.token == token);
    match shm.dequeue(token) {
        Ok(item) => {
            let q = &mut m.queues[idx.expect("dequeue from an unknown token accepted")];
            let want = q.items.pop_front();
            assert!(
                item == want,
                "dequeue: not FIFO ({} vs {} bytes)",
                item.map_or(0, |i| i.len()),
                want.map_or(0, |w| w.len())
            );
            check_queue(shm, q);
        }
        Err(Error::NotFound) => assert!(idx.is_none(), "NotFound for token {token}"),
        Err(e) => panic!("dequeue: unexpected {e}"),
    }
}

fn define(shm: &PluginShm, m: &mut Model, kind: MetricKind, name: &str) {
    let existing = m.metrics.iter().find(|x| x.name == name);
    match shm.define_metric(kind, name) {
        Ok(id) => {
            if let Some(x) = existing {
                assert!(
                    x.kind == kind && x.id == id,
                    "define {name:?} again: id {id}, was {}",
                    x.id
                );
                return;
            }
            assert!(!name.is_empty() && name.len() <= MAX_METRIC_NAME_LEN);
            assert!(
                id != 0 && m.metrics.iter().all(|x| x.id != id),
                "metric id {id} reused"
            );
            m.metrics.push(Metric {
                name: name.to_string(),
                kind,
                id,
                value: 0,
                buckets: [0; HISTOGRAM_BOUNDS.len() + 1],
                sum: 0,
            });
        }
        Err(Error::BadArgument(_)) => assert!(
            name.is_empty() || existing.is_some_and(|x| x.kind != kind),
            "define {name:?}: BadArgument"
        ),
        Err(Error::TooLarge { size, limit, .. }) => assert!(size > limit && size == name.len()),
        Err(Error::Full { capacity, .. }) => assert!(
            existing.is_none() && m.metrics.len() as u64 >= capacity,
            "metric table full with {} of {capacity}",
            m.metrics.len()
        ),
        Err(e) => panic!("define_metric: unexpected {e}"),
    }
}

fn metric_value(x: &Metric) -> i64 {
    match x.kind {
        MetricKind::Histogram => {
            i64::try_from(x.buckets.iter().fold(0u64, |a, b| a.wrapping_add(*b)))
                .unwrap_or(i64::MAX)
        }
        _ => x.value,
    }
}

fn increment(shm: &PluginShm, m: &mut Model, id: u32, delta: i64) {
    let x = m.metrics.iter_mut().find(|x| x.id == id);
    match (shm.increment(id, delta), x) {
        (Err(Error::NotFound), None) => {}
        (Ok(()), Some(x))
            if x.kind == MetricKind::Gauge || (x.kind == MetricKind::Counter && delta >= 0) =>
        {
            x.value = x.value.wrapping_add(delta);
            assert_eq!(shm.get_metric(id).expect("get_metric"), x.value);
        }
        (Err(Error::BadArgument(_)), Some(x))
            if x.kind == MetricKind::Histogram || (x.kind == MetricKind::Counter && delta < 0) => {}
        (r, x) => panic!(
            "increment {id} by {delta}: {r:?} for {:?}",
            x.map(|x| x.kind)
        ),
    }
}

fn record(shm: &PluginShm, m: &mut Model, id: u32, value: u64) {
    let x = m.metrics.iter_mut().find(|x| x.id == id);
    match (shm.record(id, value), x) {
        (Err(Error::NotFound), None) => {}
        (Ok(()), Some(x)) => {
            let v = i64::try_from(value).unwrap_or(i64::MAX);
            match x.kind {
                MetricKind::Counter => x.value = x.value.wrapping_add(v),
                MetricKind::Gauge => x.value = v,
                MetricKind::Histogram => {
                    let i = HISTOGRAM_BOUNDS.iter().take_while(|b| **b < value).count();
                    x.buckets[i] += 1;
                    x.sum = x.sum.wrapping_add(value);
                }
            }
            assert_eq!(shm.get_metric(id).expect("get_metric"), metric_value(x));
        }
        (r, x) => panic!("record {id}: {r:?} for {:?}", x.map(|x| x.kind)),
    }
}

fn check_all(shm: &PluginShm, m: &Model) {
    for key in m.kv.keys() {
        get(shm, m, key);
    }
    let mut listed = shm.queues();
    listed.sort();
    let mut want: Vec<_> = m
        .queues
        .iter()
        .map(|q| (q.token, q.vm.clone(), q.name.clone()))
        .collect();
    want.sort();
    assert_eq!(listed, want, "queues()");
    for q in &m.queues {
        check_queue(shm, q);
        assert_eq!(
            shm.resolve_queue(&q.vm, &q.name),
            Some(q.token),
            "resolve_queue"
        );
    }
    let snap = shm.metrics();
    assert_eq!(snap.len(), m.metrics.len(), "metrics()");
    for s in &snap {
        let x = m
            .metrics
            .iter()
            .find(|x| x.id == s.id)
            .expect("unknown metric listed");
        assert!(
            s.name == x.name && s.kind == x.kind,
            "metric {} renamed",
            s.id
        );
        assert_eq!(s.value, metric_value(x), "metric {} value", s.id);
        if let Some(h) = &s.histogram {
            assert_eq!(h.sum, x.sum);
            let mut acc = 0;
            for (i, (bound, count)) in h.buckets.iter().enumerate() {
                acc += x.buckets[i];
                assert_eq!((*bound, *count), (HISTOGRAM_BOUNDS[i], acc), "bucket {i}");
            }
            assert_eq!(h.count, acc + x.buckets[HISTOGRAM_BOUNDS.len()]);
        }
    }
    let _ = shm.metrics();
}

fuzz_target!(|ops: Vec<Op>| {
    let first = PluginShm::create(MIN_SEGMENT_SIZE).expect("create");
    let open =
        |s: &PluginShm| PluginShm::open(s.fd().try_clone_to_owned().expect("dup")).expect("open");
    let mut second = open(&first);
    let mut m = Model::default();
    for op in ops.iter().take(MAX_OPS) {
        if let Op::Reopen = op {
            second = open(&first);
            continue;
        }
        let pick = |h: bool| if h { &second } else { &first };
        match op {
            Op::Set { h, key, value, cas } => {
                set(pick(*h), &mut m, &key.bytes(), &value.bytes(), cas)
            }
            Op::BulkSet { h, n, tag, len } => {
                for i in 0..(*n % 512) {
                    let key = format!("bulk{tag}/{i}");
                    set(
                        pick(*h),
                        &mut m,
                        key.as_bytes(),
                        &vec![*tag; *len as usize],
                        &Cas::Zero,
                    )
                }
            }
            Op::BulkEnqueue { h, q, n, len } => {
                let t = m.queue_token(q);
                for _ in 0..*n {
                    enqueue(pick(*h), &mut m, t, &vec![*n; *len as usize])
                }
            }
            Op::BulkDequeue { h, q, n } => {
                let t = m.queue_token(q);
                for _ in 0..*n {
                    dequeue(pick(*h), &mut m, t)
                }
            }
            Op::BulkRegister { h, n } => {
                for i in 0..(*n % 16) {
                    register(pick(*h), &mut m, "bulk", &format!("q{i}"));
                    let kind = [
                        MetricKind::Counter,
                        MetricKind::Gauge,
                        MetricKind::Histogram,
                    ];
                    define(pick(*h), &mut m, kind[i as usize % 3], &format!("bulk_{i}"));
                }
            }
            Op::Get { h, key } => get(pick(*h), &m, &key.bytes()),
            Op::Register { h, name } => {
                let (vm, name) = names(name);
                register(pick(*h), &mut m, &vm, &name)
            }
            Op::Enqueue { h, q, data } => {
                let t = m.queue_token(q);
                enqueue(pick(*h), &mut m, t, &data.bytes())
            }
            Op::Dequeue { h, q } => {
                let t = m.queue_token(q);
                dequeue(pick(*h), &mut m, t)
            }
            Op::Define { h, kind, name } => {
                define(pick(*h), &mut m, kind_of(*kind), &metric_name(name))
            }
            Op::Increment { h, m: r, delta } => {
                let id = m.metric_id(r);
                increment(pick(*h), &mut m, id, *delta)
            }
            Op::Record { h, m: r, value } => {
                let id = m.metric_id(r);
                record(pick(*h), &mut m, id, *value)
            }
            Op::Reopen => unreachable!(),
            Op::CheckAll { h } => check_all(pick(*h), &m),
        }
    }
    check_all(&first, &m);
    check_all(&second, &m);
});
