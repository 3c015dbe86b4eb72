//! The snapshot seeds in `corpus/snapshot_decode/` are real `Snapshot::encode` output. This test
//! checks the committed files still equal what the current code produces (so a change of the
//! snapshot format shows up here) and, with `WRITE_SEEDS=1`, rewrites them:
//!
//! ```text
//! WRITE_SEEDS=1 cargo test --manifest-path fuzz/Cargo.toml --test seeds
//! ```

use std::path::PathBuf;
use wasmgate_shared::snapshot::{KindTag, Snapshot, SnapshotObject};

fn obj(kind: KindTag, id: &str, revision: u64, json: &str) -> SnapshotObject {
    SnapshotObject::new(kind, id, revision, json)
}

/// One snapshot per file: what the master publishes after typical Admin API writes.
fn seeds() -> Vec<(&'static str, Snapshot)> {
    vec![
        ("empty", Snapshot::default()),
        (
            "one_route",
            Snapshot {
                generation: 1,
                objects: vec![obj(
                    KindTag::Route,
                    "1",
                    1,
                    r#"{"uri":"/index.html","plugins":{"wasm_log":{"conf":"blahblah"}},"upstream":{"type":"roundrobin","nodes":{"127.0.0.1:1980":1}},"id":"1","create_time":1700000000,"update_time":1700000000}"#,
                )],
            },
        ),
        (
            "every_kind",
            Snapshot {
                generation: 42,
                objects: vec![
                    obj(
                        KindTag::Upstream,
                        "u1",
                        3,
                        r#"{"type":"chash","key":"remote_addr","nodes":[{"host":"10.0.0.1","port":8080,"weight":5}],"id":"u1"}"#,
                    ),
                    obj(
                        KindTag::Service,
                        "s1",
                        5,
                        r#"{"upstream_id":"u1","hosts":["*.example.com"],"plugins":{"example_headers":{"conf":{"response_set":{"x-hello":"wasm"}}}},"id":"s1"}"#,
                    ),
                    obj(
                        KindTag::Route,
                        "r1",
                        41,
                        r#"{"uris":["/api/*"],"methods":["GET"],"service_id":"s1","vars":[["arg_v","==","2"]],"remote_addrs":["10.0.0.0/8"],"id":"r1"}"#,
                    ),
                    obj(
                        KindTag::GlobalRule,
                        "g1",
                        42,
                        r#"{"plugins":{"wasm_log":{"conf":"x"}},"id":"g1"}"#,
                    ),
                ],
            },
        ),
        (
            "large_revisions",
            Snapshot {
                generation: u64::MAX,
                objects: vec![obj(KindTag::Upstream, "x", u64::MAX - 1, "{}")],
            },
        ),
    ]
}

#[test]
fn snapshot_seeds_are_current() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("corpus/snapshot_decode");
    let write = std::env::var_os("WRITE_SEEDS").is_some();
    for (name, snap) in seeds() {
        let bytes = snap.encode();
        assert_eq!(Snapshot::decode(&bytes).unwrap(), snap);
        let path = dir.join(name);
        if write {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(&path, &bytes).unwrap();
        } else {
            let committed = std::fs::read(&path)
                .unwrap_or_else(|e| panic!("{}: {e} (run with WRITE_SEEDS=1)", path.display()));
            assert!(
                committed == bytes,
                "{} is stale: rerun with WRITE_SEEDS=1",
                path.display()
            );
        }
    }
}
