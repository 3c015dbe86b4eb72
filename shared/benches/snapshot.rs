//! Micro-benchmarks of the configuration snapshot path from the master to the workers, for
//! 1, 100 and 10,000 routes:
//!
//! - `encode`: the master encoding the whole object set (postcard) after an Admin API write;
//! - `publish`: the master copying it into the shared-memory segment under the seqlock;
//! - `read`: a worker copying it out again (`Segment::read`, the seqlock reader);
//! - `decode`: a worker decoding the copied bytes into a `Snapshot`;
//! - `read + decode`: both worker-side steps together.
//!
//! These are the fixed costs of every configuration change, whatever changed: the master pays
//! `encode + publish` before the Admin API answers, and every worker pays `read + decode` (then
//! compiles the router, see `worker/benches/router.rs`) on the first request after it. Throughput
//! is the encoded snapshot size.
//!
//! `cargo bench -p wasmgate-shared --bench snapshot`

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;
use wasmgate_shared::shm::Segment;
use wasmgate_shared::snapshot::{KindTag, Snapshot, SnapshotObject};

/// The route counts measured.
const SIZES: [usize; 3] = [1, 100, 10_000];

/// A snapshot of `n` routes as the master builds it: each object's stored JSON text.
fn snapshot(n: usize) -> Snapshot {
    Snapshot {
        generation: n as u64 + 1,
        objects: (0..n)
            .map(|i| SnapshotObject {
                kind: KindTag::Route,
                id: format!("r{i}"),
                revision: i as u64 + 1,
                json: format!(
                    r#"{{"id":"r{i}","uri":"/api/r{i}/*","methods":["GET"],"upstream":{{"type":"roundrobin","nodes":{{"127.0.0.1:1980":1}}}},"plugins":{{"example_headers":{{"conf":{{"response_set":{{"x-hello":"wasm"}}}}}}}}}}"#
                ),
            })
            .collect(),
    }
}

fn snapshot_path(c: &mut Criterion) {
    let mut g = c.benchmark_group("snapshot");
    // Large enough for 10,000 routes (about 2 MB encoded) with room to spare.
    let seg = Segment::create(16 << 20).expect("creating a shared-memory segment");
    for n in SIZES {
        let snap = snapshot(n);
        let bytes = snap.encode();
        assert_eq!(Snapshot::decode(&bytes).as_ref(), Ok(&snap));
        g.throughput(Throughput::Bytes(bytes.len() as u64));

        g.bench_with_input(BenchmarkId::new("encode", n), &snap, |b, s| {
            b.iter(|| black_box(s.encode()))
        });
        g.bench_with_input(BenchmarkId::new("publish", n), &bytes, |b, bytes| {
            b.iter(|| seg.publish(snap.generation, black_box(bytes)).unwrap())
        });
        seg.publish(snap.generation, &bytes).unwrap();
        let read = seg.read_since(None);
        assert_eq!(read.generation, snap.generation);
        assert_eq!(read.records().next().unwrap().unwrap(), &bytes[..]);
        g.bench_function(BenchmarkId::new("read", n), |b| {
            b.iter(|| black_box(seg.read_since(None)))
        });
        g.bench_with_input(BenchmarkId::new("decode", n), &bytes, |b, bytes| {
            b.iter(|| black_box(Snapshot::decode(black_box(bytes)).unwrap()))
        });
        g.bench_function(BenchmarkId::new("read + decode", n), |b| {
            b.iter(|| {
                let read = seg.read_since(None);
                let bytes = read.records().next().unwrap().unwrap();
                black_box(Snapshot::decode(bytes).unwrap())
            })
        });
    }
    g.finish();
}

criterion_group!(benches, snapshot_path);
criterion_main!(benches);
