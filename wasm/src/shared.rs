//! Shared data (`proxy_get/set_shared_data`) with compare-and-swap, within one worker process.
//! The complete host moves this into shared memory so that all workers see one store.

use crate::state::Status;
use std::collections::HashMap;
use std::sync::Mutex;

/// Bytes of keys and values together before writes are refused.
const CAPACITY: usize = 16 << 20;

struct Store {
    map: HashMap<Vec<u8>, (Vec<u8>, u32)>,
    bytes: usize,
}

static STORE: Mutex<Option<Store>> = Mutex::new(None);

pub fn get(key: &[u8]) -> Option<(Vec<u8>, u32)> {
    let guard = STORE.lock().unwrap_or_else(|p| p.into_inner());
    guard.as_ref()?.map.get(key).cloned()
}

/// Sets `key`; `cas` 0 is unconditional, otherwise it must equal the current version.
pub fn set(key: Vec<u8>, value: Vec<u8>, cas: u32) -> Status {
    let mut guard = STORE.lock().unwrap_or_else(|p| p.into_inner());
    let store = guard.get_or_insert_with(|| Store {
        map: HashMap::new(),
        bytes: 0,
    });
    let (old_len, version) = match store.map.get(&key) {
        Some((v, ver)) => (key.len() + v.len(), *ver),
        None => (0, 0),
    };
    if cas != 0 && cas != version {
        return Status::CasMismatch;
    }
    let new_bytes = store.bytes - old_len + key.len() + value.len();
    if new_bytes > CAPACITY {
        tracing::error!("shared data full ({CAPACITY} bytes): write refused");
        return Status::InternalFailure;
    }
    store.bytes = new_bytes;
    store
        .map
        .insert(key, (value, version.wrapping_add(1).max(1)));
    Status::Ok
}
