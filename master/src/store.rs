//! The object store: every route, service, upstream and global rule, in memory and on disk.
//!
//! Each object is one file `data/<kind>/<id>.json` holding `{"value", "createdIndex",
//! "modifiedIndex"}`, written atomically (temporary file, fsync, rename, fsync of the directory)
//! *before* the change is acknowledged, so a `kill -9` at any instant loses nothing that was
//! acknowledged and never leaves a half-written object. `data/revision` holds the store's
//! revision counter (APISIX's etcd revision), which only grows.
//!
//! A file that cannot be parsed stops the start with a message naming it; the store never
//! rewrites or deletes a file it could not read.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use wasmgate_shared::model::{id_order, valid_id, Kind};

/// A stored object with its etcd-style indexes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Stored {
    pub value: Value,
    #[serde(rename = "createdIndex")]
    pub created_index: u64,
    #[serde(rename = "modifiedIndex")]
    pub modified_index: u64,
}

/// Store errors.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The cause is in the message, not a `source`: a report of the whole chain would say
    /// it twice.
    #[error("cannot write {path}: {error}")]
    Write {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("cannot read the object store: {0}")]
    Load(String),
}

/// The in-memory copy of the persisted objects. In cluster mode (etcd) it has no directory: it
/// is the copy of etcd that the watch keeps current (`crate::etcd`), and writes go to etcd
/// first.
pub struct Store {
    dir: Option<PathBuf>,
    objects: BTreeMap<(Kind, String), Held>,
    revision: u64,
}

/// An object with its value's JSON text, made once when the object is stored: every change
/// publishes a snapshot of all objects, and serialising 10,000 routes again for each one cost
/// the Admin API about 15 ms per write.
#[derive(Debug, PartialEq)]
struct Held {
    stored: Stored,
    json: String,
}

impl From<Stored> for Held {
    fn from(stored: Stored) -> Held {
        Held {
            json: stored.value.to_string(),
            stored,
        }
    }
}

/// `(kind, id, object)` list into the store's map.
fn held(objects: Vec<(Kind, String, Stored)>) -> BTreeMap<(Kind, String), Held> {
    objects
        .into_iter()
        .map(|(k, id, s)| ((k, id), s.into()))
        .collect()
}

impl Store {
    /// Opens (creating if needed) the store under `dir` and loads every object.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let mut loose = [false; Kind::ALL.len()];
        for (kind, loose) in Kind::ALL.into_iter().zip(&mut loose) {
            let d = dir.join(kind.as_str());
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&d)
                .map_err(|e| StoreError::Write {
                    path: d.clone(),
                    error: e,
                })?;
            // One an earlier version made readable by others is made private (best effort),
            // and so are its files, once: the files this version writes are private already.
            *loose = fs::metadata(&d).is_ok_and(|m| m.permissions().mode() & 0o077 != 0);
            if *loose {
                let _ = fs::set_permissions(&d, fs::Permissions::from_mode(0o700));
            }
        }
        let mut objects = BTreeMap::new();
        let mut revision = read_revision(dir)?;
        for (kind, loose) in Kind::ALL.into_iter().zip(loose) {
            for (id, stored) in load_kind(&dir.join(kind.as_str()), loose)? {
                revision = revision.max(stored.modified_index);
                objects.insert((kind, id), stored.into());
            }
        }
        Ok(Store {
            dir: Some(dir.to_path_buf()),
            objects,
            revision,
        })
    }

    /// The objects stored under `dir`, read without changing anything there (`wasmgate test`
    /// beside a running master: no folder made, no permission tightened, and the master's
    /// temporary files, which may be writes in progress, left alone). A folder not there
    /// holds nothing.
    pub fn read_only(dir: &Path) -> Result<Store, StoreError> {
        let mut objects = BTreeMap::new();
        let mut revision = read_revision(dir)?;
        for kind in Kind::ALL {
            let d = dir.join(kind.as_str());
            if !d.is_dir() {
                continue;
            }
            for (id, stored) in read_kind(&d, Visit::ReadOnly)? {
                revision = revision.max(stored.modified_index);
                objects.insert((kind, id), stored.into());
            }
        }
        Ok(Store {
            dir: None,
            objects,
            revision,
        })
    }

    /// A store with no disk behind it, holding `objects` at etcd revision `revision`.
    pub fn memory(objects: Vec<(Kind, String, Stored)>, revision: u64) -> Store {
        Store {
            dir: None,
            objects: held(objects),
            revision,
        }
    }

    /// Applies a change that etcd already holds (memory only): a put newer than the copy, or
    /// a delete. `revision` is etcd's; the store's revision never goes back. Returns whether
    /// the copy changed (the watch's echo of this node's own write does not change it).
    pub fn apply(&mut self, kind: Kind, id: &str, value: Option<Stored>, revision: u64) -> bool {
        let key = (kind, id.to_string());
        let changed = match value {
            Some(s) => {
                let newer = self
                    .objects
                    .get(&key)
                    .is_none_or(|old| old.stored.modified_index < s.modified_index);
                if newer {
                    self.objects.insert(key, s.into());
                }
                newer
            }
            None => {
                let older = self
                    .objects
                    .get(&key)
                    .is_some_and(|old| old.stored.modified_index < revision);
                if older {
                    self.objects.remove(&key);
                }
                older
            }
        };
        self.revision = self.revision.max(revision);
        changed
    }

    /// Replaces the whole copy (a resynchronisation with etcd); returns whether anything
    /// changed.
    pub fn replace_all(&mut self, objects: Vec<(Kind, String, Stored)>, revision: u64) -> bool {
        let new = held(objects);
        let changed = new != self.objects;
        self.objects = new;
        self.revision = self.revision.max(revision);
        changed
    }

    /// Replaces the whole copy with etcd's at `revision`, which may be lower than the
    /// copy's: another etcd history (see `etcd::resync`).
    pub fn reset(&mut self, objects: Vec<(Kind, String, Stored)>, revision: u64) {
        self.objects = held(objects);
        self.revision = revision;
    }

    pub fn revision(&self) -> u64 {
        self.revision
    }

    pub fn get(&self, kind: Kind, id: &str) -> Option<&Stored> {
        self.objects.get(&(kind, id.to_string())).map(|h| &h.stored)
    }

    /// Object `(kind, id)` with its value's JSON text.
    pub fn get_json(&self, kind: Kind, id: &str) -> Option<(&Stored, &str)> {
        self.objects
            .get(&(kind, id.to_string()))
            .map(|h| (&h.stored, h.json.as_str()))
    }

    /// Objects of one kind, in id order (numeric ids sort numerically, like APISIX's listing).
    pub fn list(&self, kind: Kind) -> Vec<(&str, &Stored)> {
        let mut v: Vec<_> = self
            .objects
            .range((kind, String::new())..)
            .take_while(|((k, _), _)| *k == kind)
            .map(|((_, id), h)| (id.as_str(), &h.stored))
            .collect();
        v.sort_by(|a, b| id_order(a.0, b.0));
        v
    }

    /// Every object.
    pub fn iter(&self) -> impl Iterator<Item = (Kind, &str, &Stored)> {
        self.objects
            .iter()
            .map(|((k, id), h)| (*k, id.as_str(), &h.stored))
    }

    /// Every object with its value's JSON text, for snapshots.
    pub fn iter_json(&self) -> impl Iterator<Item = (Kind, &str, &Stored, &str)> {
        self.objects
            .iter()
            .map(|((k, id), h)| (*k, id.as_str(), &h.stored, h.json.as_str()))
    }

    /// The revision the next write will get.
    pub fn next_revision(&self) -> u64 {
        self.revision + 1
    }

    /// Persists then applies a create/replace. `stored.modified_index` must be `next_revision()`.
    pub fn put(&mut self, kind: Kind, id: &str, stored: Stored) -> Result<(), StoreError> {
        let Some(path) = self.object_path(kind, id) else {
            self.revision = self.revision.max(stored.modified_index);
            self.objects.insert((kind, id.to_string()), stored.into());
            return Ok(());
        };
        let bytes = serde_json::to_vec_pretty(&stored).unwrap_or_default();
        // The revision first: if it cannot be written nothing has changed, and if the object
        // then fails only the counter moved on (it may skip numbers, never go back). The other
        // order left an object on disk that a 503 had said was not stored.
        self.bump_revision(stored.modified_index)?;
        write_atomic(&path, &bytes)?;
        self.objects.insert((kind, id.to_string()), stored.into());
        Ok(())
    }

    /// Persists then applies a delete.
    pub fn delete(&mut self, kind: Kind, id: &str) -> Result<Option<Stored>, StoreError> {
        if self.get(kind, id).is_none() {
            return Ok(None);
        }
        let Some(path) = self.object_path(kind, id) else {
            self.revision += 1;
            return Ok(self
                .objects
                .remove(&(kind, id.to_string()))
                .map(|h| h.stored));
        };
        // The revision first, as in `put`.
        self.bump_revision(self.revision + 1)?;
        fs::remove_file(&path).map_err(|e| StoreError::Write {
            path: path.clone(),
            error: e,
        })?;
        sync_dir(path.parent().unwrap_or(Path::new(".")))?;
        Ok(self
            .objects
            .remove(&(kind, id.to_string()))
            .map(|h| h.stored))
    }

    fn bump_revision(&mut self, to: u64) -> Result<(), StoreError> {
        if let Some(dir) = &self.dir {
            write_atomic(&dir.join("revision"), to.to_string().as_bytes())?;
        }
        self.revision = to;
        Ok(())
    }

    /// The object's file; None for a store with no disk (cluster mode).
    fn object_path(&self, kind: Kind, id: &str) -> Option<PathBuf> {
        // Ids are validated ([a-zA-Z0-9-_.], no leading dot issues below), so they are safe
        // file names; the assert guards against a future caller skipping validation.
        debug_assert!(valid_id(id));
        let dir = self.dir.as_ref()?;
        Some(dir.join(kind.as_str()).join(format!("{id}.json")))
    }

    /// The smallest free numeric id at or above the revision, like APISIX's generated ids
    /// (which are etcd revisions), so generated ids never collide with existing ones.
    pub fn generate_id(&self, kind: Kind) -> String {
        let mut n = self.revision + 1;
        while self.get(kind, &n.to_string()).is_some() {
            n += 1;
        }
        n.to_string()
    }
}

fn read_revision(dir: &Path) -> Result<u64, StoreError> {
    let path = dir.join("revision");
    match fs::read_to_string(&path) {
        Ok(t) => t.trim().parse().map_err(|_| {
            StoreError::Load(format!(
                "{}: not a revision number: {:?}",
                path.display(),
                t.trim()
            ))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(StoreError::Load(format!("{}: {e}", path.display()))),
    }
}

/// The objects in `dir`; `tighten`: make each file private (an earlier version's store).
/// How a store folder is read: by the store that owns it (leftovers of a crash removed,
/// permissions made private where `tighten`), or only read.
#[derive(Clone, Copy, PartialEq)]
enum Visit {
    Owner { tighten: bool },
    ReadOnly,
}

fn load_kind(dir: &Path, tighten: bool) -> Result<Vec<(String, Stored)>, StoreError> {
    read_kind(dir, Visit::Owner { tighten })
}

fn read_kind(dir: &Path, visit: Visit) -> Result<Vec<(String, Stored)>, StoreError> {
    let mut out = Vec::new();
    let entries =
        fs::read_dir(dir).map_err(|e| StoreError::Load(format!("{}: {e}", dir.display())))?;
    for entry in entries {
        let entry = entry.map_err(|e| StoreError::Load(format!("{}: {e}", dir.display())))?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().to_string();
        // Leftover temporary files from a crash mid-write are not objects.
        if name.starts_with(".tmp-") {
            if visit != Visit::ReadOnly {
                let _ = fs::remove_file(&path);
            }
            continue;
        }
        let Some(id) = name.strip_suffix(".json") else {
            continue;
        };
        // Plugin settings hold secrets; a failure (another owner) is no reason to refuse the
        // store.
        if visit == (Visit::Owner { tighten: true }) {
            let _ = fs::set_permissions(&path, fs::Permissions::from_mode(0o600));
        }
        let text =
            fs::read(&path).map_err(|e| StoreError::Load(format!("{}: {e}", path.display())))?;
        let stored: Stored = serde_json::from_slice(&text).map_err(|e| {
            StoreError::Load(format!(
                "{}: corrupted object file ({e}); fix or move it away, it is never overwritten",
                path.display()
            ))
        })?;
        out.push((id.to_string(), stored));
    }
    Ok(out)
}

/// Writes `bytes` to `path` so that a crash leaves either the old or the new content.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let tmp = dir.join(format!(".tmp-{name}"));
    let err = |error| StoreError::Write {
        path: path.to_path_buf(),
        error,
    };
    // Owner-only, as `data/admin_key`: plugin configurations hold secrets (tokens, keys).
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(err)?;
    let res = f.write_all(bytes).and_then(|_| f.sync_all());
    if let Err(e) = res {
        let _ = fs::remove_file(&tmp);
        return Err(err(e));
    }
    fs::rename(&tmp, path).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        err(e)
    })?;
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StoreError::Write {
            path: dir.to_path_buf(),
            error: e,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(rev: u64) -> Stored {
        Stored {
            value: json!({"uri": "/"}),
            created_index: rev,
            modified_index: rev,
        }
    }

    #[test]
    fn put_delete_reopen() {
        let d = tempfile::tempdir().unwrap();
        let mut s = Store::open(d.path()).unwrap();
        s.put(Kind::Routes, "1", obj(1)).unwrap();
        s.put(Kind::Routes, "10", obj(2)).unwrap();
        s.put(Kind::Routes, "2", obj(3)).unwrap();
        s.delete(Kind::Routes, "10").unwrap();
        let s = Store::open(d.path()).unwrap();
        assert_eq!(s.revision(), 4);
        let ids: Vec<_> = s
            .list(Kind::Routes)
            .iter()
            .map(|(id, _)| id.to_string())
            .collect();
        assert_eq!(ids, ["1", "2"]);
        assert!(s.list(Kind::Upstreams).is_empty());
    }

    /// A store an earlier version left readable by others is made private at open: its
    /// directories and the files in them.
    #[test]
    fn a_loose_store_is_made_private() {
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let d = tempfile::tempdir().unwrap();
        let mut s = Store::open(d.path()).unwrap();
        s.put(Kind::Routes, "1", obj(1)).unwrap();
        let (dir, file) = (d.path().join("routes"), d.path().join("routes/1.json"));
        assert_eq!((mode(&dir), mode(&file)), (0o700, 0o600));
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        fs::set_permissions(&file, fs::Permissions::from_mode(0o644)).unwrap();
        let s = Store::open(d.path()).unwrap();
        assert!(s.get(Kind::Routes, "1").is_some());
        assert_eq!((mode(&dir), mode(&file)), (0o700, 0o600));
    }

    #[test]
    fn corrupted_file_refuses_and_is_kept() {
        let d = tempfile::tempdir().unwrap();
        Store::open(d.path()).unwrap();
        let p = d.path().join("routes/5.json");
        fs::write(&p, b"{not json").unwrap();
        let e = Store::open(d.path()).err().unwrap().to_string();
        assert!(
            e.contains("routes/5.json") && e.contains("corrupted"),
            "{e}"
        );
        assert_eq!(fs::read(&p).unwrap(), b"{not json");
    }

    /// A revision that cannot be written fails the change before the object is touched, so
    /// disk and memory still agree (the revision file as a directory: rename over it fails).
    #[test]
    fn failed_revision_write_changes_nothing() {
        let d = tempfile::tempdir().unwrap();
        let mut s = Store::open(d.path()).unwrap();
        s.put(Kind::Routes, "1", obj(1)).unwrap();
        fs::remove_file(d.path().join("revision")).unwrap();
        fs::create_dir(d.path().join("revision")).unwrap();
        assert!(s.put(Kind::Routes, "2", obj(2)).is_err());
        assert!(s.delete(Kind::Routes, "1").is_err());
        assert!(!d.path().join("routes/2.json").exists());
        assert!(d.path().join("routes/1.json").exists());
        assert!(s.get(Kind::Routes, "1").is_some() && s.get(Kind::Routes, "2").is_none());
        fs::remove_dir(d.path().join("revision")).unwrap();
        let s = Store::open(d.path()).unwrap();
        assert!(s.get(Kind::Routes, "1").is_some() && s.get(Kind::Routes, "2").is_none());
    }

    #[test]
    fn generated_ids_skip_taken() {
        let d = tempfile::tempdir().unwrap();
        let mut s = Store::open(d.path()).unwrap();
        s.put(Kind::Routes, "2", obj(1)).unwrap();
        assert_eq!(s.generate_id(Kind::Routes), "3");
        s.put(Kind::Routes, "3", obj(2)).unwrap();
        assert_eq!(s.generate_id(Kind::Routes), "4");
    }
}
