//! `wasmgate_shared::snapshot::Snapshot::decode` and `Delta::decode`: the postcard records a
//! worker reads from the shared-memory journal the master publishes.
//!
//! Arbitrary bytes must decode or be refused without panicking or allocating without bound; a
//! snapshot that decodes must survive encode → decode unchanged; its objects are then parsed the
//! way a worker parses them (JSON text into the typed object), which must not panic either.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wasmgate_shared::model::{GlobalRule, Kind, PluginConfig, Route, Service, Ssl, Upstream};
use wasmgate_shared::snapshot::{Delta, Snapshot};

fuzz_target!(|data: &[u8]| {
    // The same bytes as a delta: refused or decoded, and a decoded one survives a round trip.
    if let Ok(d) = Delta::decode(data) {
        assert_eq!(Delta::decode(&d.encode()).as_ref(), Ok(&d), "delta changed");
    }
    let Ok(snap) = Snapshot::decode(data) else {
        return;
    };
    let enc = snap.encode();
    assert!(!enc.is_empty());
    assert_eq!(
        Snapshot::decode(&enc).as_ref(),
        Ok(&snap),
        "encode → decode changed it"
    );
    for obj in &snap.objects {
        let json = obj.json.as_str();
        match Kind::from(obj.kind) {
            Kind::Routes => {
                if let Ok(r) = serde_json::from_str::<Route>(json) {
                    let _ = (
                        r.paths(),
                        r.host_patterns(),
                        r.remote_patterns(),
                        r.enabled(),
                    );
                }
            }
            Kind::Services => {
                let _ = serde_json::from_str::<Service>(json);
            }
            Kind::Upstreams => {
                if let Ok(u) = serde_json::from_str::<Upstream>(json) {
                    for n in u.normalized_nodes().unwrap_or_default() {
                        let _ = n.authority();
                    }
                }
            }
            Kind::GlobalRules => {
                let _ = serde_json::from_str::<GlobalRule>(json);
            }
            Kind::Ssls => {
                if let Ok(s) = serde_json::from_str::<Ssl>(json) {
                    let _ = (s.names(), s.identities());
                }
            }
            Kind::PluginConfigs => {
                let _ = serde_json::from_str::<PluginConfig>(json);
            }
        }
    }
});
