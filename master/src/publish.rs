//! Publication of the store to the workers, through the shared-memory journal (see
//! `wasmgate_shared::shm`).
//!
//! The first publication writes a whole snapshot of the store. Each change after it appends a
//! [`Delta`] holding only the objects it changed, so an edit among 10,000 routes costs the
//! master, and each worker, one object's bytes rather than the whole 2 MB snapshot. The journal
//! starts again with a whole snapshot when the area has no room left, or when the deltas since
//! the last snapshot outweigh it (a worker starting then reads the snapshot and every delta,
//! so their bytes are kept within the snapshot's own size).
//!
//! The publisher remembers what the workers were told (each object's revision and encoded
//! size), so that it can say before a write is persisted whether the whole snapshot would still
//! fit the area (the Admin API's 507), and find what changed when the store was changed as a
//! whole (an etcd resynchronisation).

use crate::store::Store;
use std::collections::HashMap;
use std::sync::Arc;
use wasmgate_shared::model::Kind;
use wasmgate_shared::shm::{Segment, ShmError};
use wasmgate_shared::snapshot::{Change, Delta, ObjectRef, SnapshotRef};

/// Deltas may take this many bytes before a new snapshot, however small the snapshot is:
/// below it, starting again would cost more than reading the deltas.
const MIN_DELTAS: usize = 64 << 10;

/// What was published, and where the journal stands.
pub struct Publisher {
    segment: Arc<Segment>,
    /// Every object the workers were told about: revision and bytes in a whole snapshot.
    told: HashMap<(Kind, String), (u64, usize)>,
    /// The bytes a whole snapshot of `told` takes (an upper bound of a few bytes).
    whole: usize,
    /// Bytes of deltas since the last whole snapshot; None before the first.
    deltas: Option<usize>,
    /// Added to the store's revisions in what the workers are told. Workers know an object
    /// by its id and revision, and a generation by its number: when etcd's revisions start
    /// again (an etcd wiped, restored from a backup, or another cluster), [`Publisher::rebase`]
    /// moves every number the workers see past all those they saw before.
    base: u64,
}

impl Publisher {
    pub fn new(segment: Arc<Segment>) -> Publisher {
        Publisher {
            segment,
            told: HashMap::new(),
            whole: 0,
            deltas: None,
            base: 0,
        }
    }

    /// Makes the next publication a whole snapshot whose generation and object revisions are
    /// all above every one published so far, whatever the store's revisions: for a store
    /// whose revisions went back (see [`Publisher::base`]).
    pub fn rebase(&mut self) {
        self.base = self.segment.generation() + 1;
        self.told.clear();
        self.whole = 0;
        self.deltas = None;
    }

    /// The generation the workers are told for the store as it is.
    fn generation(&self, store: &Store) -> u64 {
        self.base + store.revision()
    }

    /// How full the area is: `(whole snapshot, journal, capacity)` in bytes. The 507 comes
    /// when the whole snapshot would pass the capacity; the journal starts again when it fills.
    pub fn usage(&self) -> (usize, usize, usize) {
        (self.whole, self.segment.journal_len(), self.capacity())
    }

    /// The most a whole snapshot may take in this area.
    fn capacity(&self) -> usize {
        snapshot_room(self.segment.capacity())
    }

    /// Whether a whole snapshot would still fit the area with object `(kind, id)` put with
    /// `json` (None: deleted); the error is the message for the Admin API's 507.
    pub fn check_fits(&self, kind: Kind, id: &str, json: Option<&str>) -> Result<(), String> {
        let old = self.told.get(&(kind, id.to_string())).map_or(0, |t| t.1);
        let new = json.map_or(0, |json| object_len(kind, id, u64::MAX, json));
        let size = self.whole - old + new;
        let capacity = self.capacity();
        if size > capacity {
            return Err(format!(
                "configuration snapshot of {size} bytes exceeds wasmgate.shm_size ({capacity} bytes); raise wasmgate.shm_size in config.yaml"
            ));
        }
        Ok(())
    }

    /// Publishes the objects `changed` as the store now holds them (absent ones as deleted),
    /// as generation `store.revision()` (plus the base).
    pub fn publish(&mut self, store: &Store, changed: &[(Kind, &str)]) -> Result<(), ShmError> {
        let generation = self.generation(store);
        let Some(deltas) = self.deltas else {
            return self.publish_whole(store);
        };
        let changes: Vec<Change> = changed
            .iter()
            .map(|&(kind, id)| {
                let now = store.get_json(kind, id);
                Change {
                    kind: kind.into(),
                    id,
                    revision: now.map_or(generation, |(s, _)| self.base + s.modified_index),
                    json: now.map(|(_, json)| json),
                }
            })
            .collect();
        let bytes = Delta {
            generation,
            changes,
        }
        .encode();
        if deltas + bytes.len() > self.whole.max(MIN_DELTAS)
            || self.segment.append(generation, &bytes).is_err()
        {
            return self.publish_whole(store);
        }
        self.deltas = Some(deltas + bytes.len());
        for &(kind, id) in changed {
            self.note(store, kind, id);
        }
        Ok(())
    }

    /// Publishes what changed between the store and what the workers were told (everything
    /// the first time). Returns whether there was anything to publish.
    pub fn publish_store(&mut self, store: &Store) -> Result<bool, ShmError> {
        if self.deltas.is_none() {
            return self.publish_whole(store).map(|()| true);
        }
        let mut keys: Vec<(Kind, &str)> = store
            .iter()
            .filter(|(kind, id, s)| {
                self.told.get(&(*kind, id.to_string())).map(|t| t.0) != Some(s.modified_index)
            })
            .map(|(kind, id, _)| (kind, id))
            .collect();
        let deleted: Vec<(Kind, String)> = self
            .told
            .keys()
            .filter(|(kind, id)| store.get(*kind, id).is_none())
            .cloned()
            .collect();
        keys.extend(deleted.iter().map(|(kind, id)| (*kind, id.as_str())));
        if keys.is_empty() {
            return Ok(false);
        }
        self.publish(store, &keys).map(|()| true)
    }

    /// Starts a new journal with a whole snapshot of the store.
    fn publish_whole(&mut self, store: &Store) -> Result<(), ShmError> {
        let mut told = HashMap::new();
        let mut whole = SNAPSHOT_HEAD;
        let objects: Vec<ObjectRef> = store
            .iter_json()
            .map(|(kind, id, s, json)| {
                let o = ObjectRef {
                    kind: kind.into(),
                    id,
                    revision: self.base + s.modified_index,
                    json,
                };
                let len = o.encoded_len();
                whole += len;
                told.insert((kind, id.to_string()), (s.modified_index, len));
                o
            })
            .collect();
        let generation = self.generation(store);
        let bytes = SnapshotRef {
            generation,
            objects,
        }
        .encode();
        self.segment.publish(generation, &bytes)?;
        (self.told, self.whole, self.deltas) = (told, whole, Some(0));
        Ok(())
    }

    /// Records object `(kind, id)` as the store holds it as told.
    fn note(&mut self, store: &Store, kind: Kind, id: &str) {
        let key = (kind, id.to_string());
        if let Some((_, size)) = self.told.remove(&key) {
            self.whole -= size;
        }
        if let Some((s, json)) = store.get_json(kind, id) {
            let size = object_len(kind, id, self.base + s.modified_index, json);
            self.whole += size;
            self.told.insert(key, (s.modified_index, size));
        }
    }
}

/// A whole snapshot's bytes besides its objects: the generation and the object count, as
/// varints of at most 10 bytes each.
const SNAPSHOT_HEAD: usize = 20;

/// Whether a whole snapshot of `store`'s objects fits an area of `shm_size` bytes (the
/// setting as config.yaml gives it): `wasmgate test` and a reload that changes the setting
/// refuse one the next start could not publish.
pub fn check_shm_size(store: &Store, shm_size: u64) -> Result<(), String> {
    let size = SNAPSHOT_HEAD
        + store
            .iter_json()
            .map(|(kind, id, s, json)| object_len(kind, id, s.modified_index, json))
            .sum::<usize>();
    let capacity = snapshot_room(Segment::data_capacity(shm_size));
    match size > capacity {
        true => Err(format!(
            "wasmgate.shm_size ({shm_size} bytes) cannot hold the stored configuration (a \
             snapshot of {size} bytes): the gateway would not start; raise wasmgate.shm_size"
        )),
        false => Ok(()),
    }
}

/// The most a whole snapshot may take in an area of `capacity` bytes: it is one record, a
/// length word and its bytes.
fn snapshot_room(capacity: usize) -> usize {
    capacity.saturating_sub(8)
}

fn object_len(kind: Kind, id: &str, revision: u64, json: &str) -> usize {
    let o = ObjectRef {
        kind: kind.into(),
        id,
        revision,
        json,
    };
    o.encoded_len()
}
