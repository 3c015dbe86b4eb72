//! The configuration snapshot the master publishes and workers read.
//!
//! A snapshot is the complete set of Admin API objects at one generation. Each object travels as
//! the JSON text the master stored (already validated) with its own revision, so a worker can
//! skip re-parsing objects whose revision it has seen. The envelope is encoded with `postcard`.
//!
//! After a snapshot, the shared-memory journal (see [`crate::shm`]) carries [`Delta`]s: the
//! objects one generation changed, so a worker applies an edit without reading every object.

use crate::model::Kind;
use serde::{Deserialize, Serialize};

/// One object inside a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotObject {
    pub kind: KindTag,
    pub id: String,
    /// The store revision at which this object last changed (APISIX's `modifiedIndex`).
    pub revision: u64,
    /// The object's JSON text.
    pub json: String,
}

impl SnapshotObject {
    pub fn new(kind: KindTag, id: &str, revision: u64, json: impl Into<String>) -> SnapshotObject {
        SnapshotObject {
            kind,
            id: id.to_string(),
            revision,
            json: json.into(),
        }
    }
}

/// [`Kind`] as a stable wire tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum KindTag {
    Route,
    Service,
    Upstream,
    GlobalRule,
    Ssl,
    PluginConfig,
}

impl From<Kind> for KindTag {
    fn from(k: Kind) -> Self {
        match k {
            Kind::Routes => KindTag::Route,
            Kind::Services => KindTag::Service,
            Kind::Upstreams => KindTag::Upstream,
            Kind::GlobalRules => KindTag::GlobalRule,
            Kind::Ssls => KindTag::Ssl,
            Kind::PluginConfigs => KindTag::PluginConfig,
        }
    }
}

impl From<KindTag> for Kind {
    fn from(k: KindTag) -> Self {
        match k {
            KindTag::Route => Kind::Routes,
            KindTag::Service => Kind::Services,
            KindTag::Upstream => Kind::Upstreams,
            KindTag::GlobalRule => Kind::GlobalRules,
            KindTag::Ssl => Kind::Ssls,
            KindTag::PluginConfig => Kind::PluginConfigs,
        }
    }
}

/// Every object at one generation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub generation: u64,
    pub objects: Vec<SnapshotObject>,
}

impl Snapshot {
    pub fn encode(&self) -> Vec<u8> {
        encode(self)
    }

    pub fn decode(bytes: &[u8]) -> Result<Snapshot, String> {
        postcard::from_bytes(bytes).map_err(|e| format!("corrupt configuration snapshot: {e}"))
    }
}

/// A snapshot with its objects' ids and JSON texts borrowed: the master encodes one from its
/// store without copying every object's text, and a worker decodes one in place, since most
/// objects are only compared by revision with what it compiled before. Same encoding as
/// [`Snapshot`] (postcard writes `String` and `&str` alike).
#[derive(Debug, Serialize, Deserialize)]
pub struct SnapshotRef<'a> {
    pub generation: u64,
    #[serde(borrow)]
    pub objects: Vec<ObjectRef<'a>>,
}

/// One object of a [`SnapshotRef`].
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ObjectRef<'a> {
    pub kind: KindTag,
    pub id: &'a str,
    pub revision: u64,
    pub json: &'a str,
}

impl<'a> SnapshotRef<'a> {
    pub fn encode(&self) -> Vec<u8> {
        encode(self)
    }

    pub fn decode(bytes: &'a [u8]) -> Result<SnapshotRef<'a>, String> {
        postcard::from_bytes(bytes).map_err(|e| format!("corrupt configuration snapshot: {e}"))
    }
}

impl ObjectRef<'_> {
    /// The bytes this object takes in an encoded snapshot, computed without encoding it.
    pub fn encoded_len(&self) -> usize {
        // The kind tag is one varint byte; each text is its length as a varint, then the text.
        1 + varint_len(self.id.len() as u64)
            + self.id.len()
            + varint_len(self.revision)
            + varint_len(self.json.len() as u64)
            + self.json.len()
    }
}

/// Bytes of `v` as a postcard varint (7 bits a byte).
fn varint_len(v: u64) -> usize {
    (64 - v.max(1).leading_zeros() as usize).div_ceil(7)
}

/// The objects one generation changed, after the snapshot or delta before it.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Delta<'a> {
    pub generation: u64,
    #[serde(borrow)]
    pub changes: Vec<Change<'a>>,
}

/// One object put (`json` is its text) or deleted (`json` is None) by a [`Delta`].
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Change<'a> {
    pub kind: KindTag,
    pub id: &'a str,
    pub revision: u64,
    pub json: Option<&'a str>,
}

impl<'a> Delta<'a> {
    pub fn encode(&self) -> Vec<u8> {
        encode(self)
    }

    pub fn decode(bytes: &'a [u8]) -> Result<Delta<'a>, String> {
        postcard::from_bytes(bytes).map_err(|e| format!("corrupt configuration change: {e}"))
    }
}

fn encode(value: &impl Serialize) -> Vec<u8> {
    // Encoding plain structs of strings and integers into a Vec cannot fail.
    postcard::to_allocvec(value).unwrap_or_default()
}

/// What a worker is told at start (on its standard input, as JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerBoot {
    /// The config.yaml text the master validated, parsed again by the worker.
    pub config_yaml: String,
    /// Where that text came from, for messages.
    pub config_origin: String,
    /// The prefix directory (logs, data).
    pub prefix: std::path::PathBuf,
    /// The logical worker number (0..worker_processes).
    pub worker_id: u32,
    /// Index of the worker's status slot in shared memory.
    pub slot: u32,
    /// The reload epoch this worker belongs to.
    pub epoch: u64,
    /// How many listening sockets follow the shared-memory fd (fds 4, 5, …).
    pub listeners: u32,
    /// How many compiled plugin modules follow the listeners, one per `wasm.plugins` entry.
    pub plugins: u32,
    /// Log to standard error too (the master runs in the foreground).
    #[serde(default)]
    pub stderr: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_corruption() {
        let s = Snapshot {
            generation: 7,
            objects: vec![SnapshotObject {
                kind: KindTag::Route,
                id: "1".into(),
                revision: 7,
                json: "{\"uri\":\"/\"}".into(),
            }],
        };
        let bytes = s.encode();
        assert_eq!(Snapshot::decode(&bytes).unwrap(), s);
        assert!(Snapshot::decode(&bytes[..bytes.len() - 3]).is_err());
        assert!(Snapshot::decode(&[0xff; 16]).is_err());
        // The borrowed reading sees the same objects, and refuses the same corruption.
        let r = SnapshotRef::decode(&bytes).unwrap();
        assert_eq!(r.generation, 7);
        assert_eq!(
            r.objects,
            [ObjectRef {
                kind: KindTag::Route,
                id: "1",
                revision: 7,
                json: "{\"uri\":\"/\"}",
            }]
        );
        assert_eq!(r.encode(), bytes, "both forms encode alike");
        assert!(SnapshotRef::decode(&bytes[..bytes.len() - 3]).is_err());
        assert!(SnapshotRef::decode(&[0xff; 16]).is_err());
    }

    /// The computed length is the encoded one, across varint widths.
    #[test]
    fn encoded_len_matches_the_encoding() {
        let long = "x".repeat(20_000);
        for (id, revision, json) in [("1", 0, ""), ("r-9", 127, "{}"), ("a", 128, &long[..300])]
            .into_iter()
            .chain([("big", u64::MAX, &long[..])])
        {
            let o = ObjectRef {
                kind: KindTag::GlobalRule,
                id,
                revision,
                json,
            };
            assert_eq!(
                o.encoded_len(),
                postcard::to_allocvec(&o).unwrap().len(),
                "{id}"
            );
        }
    }

    #[test]
    fn delta_roundtrip_and_corruption() {
        let d = Delta {
            generation: 9,
            changes: vec![
                Change {
                    kind: KindTag::Route,
                    id: "1",
                    revision: 9,
                    json: Some("{}"),
                },
                Change {
                    kind: KindTag::Upstream,
                    id: "u",
                    revision: 9,
                    json: None,
                },
            ],
        };
        let bytes = d.encode();
        assert_eq!(Delta::decode(&bytes).unwrap(), d);
        assert!(Delta::decode(&bytes[..bytes.len() - 2]).is_err());
    }
}
