//! Admin API keys: configured ones, and generated ones for entries left empty.
//!
//! A generated key is stored in `<data_dir>/admin_key` (mode 0600) and printed once, the first
//! time; later starts read it back, so the key stays stable across restarts.

use crate::state::ApiKey;
use anyhow::Context;
use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use wasmgate_shared::config::GatewayConfig;

pub fn resolve(cfg: &GatewayConfig, data_dir: &Path) -> anyhow::Result<Vec<ApiKey>> {
    let path = data_dir.join("admin_key");
    let mut stored = stored(&path)?;
    let mut generated = Vec::new();
    let mut keys = Vec::new();
    for k in &cfg.deployment.admin.admin_key {
        let key = if !k.key.is_empty() {
            k.key.clone()
        } else if let Some(s) = stored.get(&k.name) {
            s.clone()
        } else {
            let key: String = rand::random::<[u8; 16]>()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            stored.insert(k.name.clone(), key.clone());
            generated.push((k.name.clone(), key.clone()));
            key
        };
        keys.push(ApiKey {
            name: k.name.clone(),
            key,
            role: k.role,
        });
    }
    if !generated.is_empty() {
        let bytes = serde_json::to_vec_pretty(&stored)?;
        crate::store::write_atomic(&path, &bytes)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        for (name, key) in generated {
            // The error log gets the fact, not the key (at start it is not open yet).
            tracing::warn!(
                "generated an Admin API key for {name:?}, stored in {}",
                path.display()
            );
            eprintln!(
                "wasmgate: generated Admin API key for {name:?}: {key}\n          (stored in {}; set deployment.admin.admin_key in config.yaml to choose one)",
                path.display()
            );
        }
    }
    Ok(keys)
}

/// The generated keys kept in `path` (`<data_dir>/admin_key`), by name; none when it does not
/// exist yet. `wasmgate test` reads it too: a file `start` would refuse is refused there.
pub fn stored(path: &Path) -> anyhow::Result<BTreeMap<String, String>> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b)
            .with_context(|| format!("{}: not a JSON map of key names to keys", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}
