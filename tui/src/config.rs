//! Where the console connects by default: the Admin API address and key of config.yaml.

use anyhow::Context;
use std::collections::BTreeMap;
use std::path::Path;
use wasmgate_shared::config::{GatewayConfig, Role};

/// `deployment.admin.admin_listen` as an address to connect to (a wildcard listen address
/// means loopback).
pub fn admin_address(cfg: &GatewayConfig) -> String {
    wasmgate_shared::config::reachable(cfg.deployment.admin.admin_listen.addr()).to_string()
}

/// The key to use: the first `admin` key of `deployment.admin.admin_key` (else the first key,
/// which may only read). A key left empty there was generated at the first start into
/// `<data_dir>/admin_key` (a JSON map of key names to keys), so it is read from there.
/// None when keys are not required.
pub fn admin_key(cfg: &GatewayConfig, data_dir: &Path) -> anyhow::Result<Option<String>> {
    let admin = &cfg.deployment.admin;
    if !admin.admin_key_required {
        return Ok(None);
    }
    let Some(k) = admin
        .admin_key
        .iter()
        .find(|k| k.role == Role::Admin)
        .or(admin.admin_key.first())
    else {
        return Ok(None);
    };
    if !k.key.is_empty() {
        return Ok(Some(k.key.clone()));
    }
    let path = data_dir.join("admin_key");
    let text = std::fs::read(&path).with_context(|| {
        format!(
            "the Admin API key of {:?} is generated at the first start into {}, which cannot be read (pass --key)",
            k.name,
            path.display()
        )
    })?;
    let stored: BTreeMap<String, String> = serde_json::from_slice(&text)
        .with_context(|| format!("{}: not a JSON map of key names to keys", path.display()))?;
    stored.get(&k.name).cloned().map(Some).with_context(|| {
        format!(
            "{} has no key for {:?} (pass --key)",
            path.display(),
            k.name
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> GatewayConfig {
        GatewayConfig::parse(yaml, "test").unwrap()
    }

    #[test]
    fn configured_keys_win() {
        let cfg = parse(
            "deployment:\n  admin:\n    admin_key:\n      - {name: v, key: viewkey, role: viewer}\n      - {name: a, key: adminkey, role: admin}\n    admin_listen: {ip: 0.0.0.0, port: 9999}\n",
        );
        assert_eq!(
            admin_key(&cfg, Path::new("/nonexistent"))
                .unwrap()
                .as_deref(),
            Some("adminkey")
        );
        assert_eq!(admin_address(&cfg), "127.0.0.1:9999");
    }

    #[test]
    fn generated_keys_are_read_from_the_data_dir() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = parse("deployment:\n  admin:\n    admin_key:\n      - {name: admin, key: \"\", role: admin}\n");
        let e = admin_key(&cfg, dir.path()).unwrap_err();
        assert!(format!("{e:#}").contains("pass --key"), "{e:#}");
        std::fs::write(dir.path().join("admin_key"), r#"{"admin": "0123abcd"}"#).unwrap();
        assert_eq!(
            admin_key(&cfg, dir.path()).unwrap().as_deref(),
            Some("0123abcd")
        );
        assert_eq!(admin_address(&cfg), "127.0.0.1:9180");
    }

    #[test]
    fn no_key_when_none_is_required() {
        let cfg =
            parse("deployment:\n  admin:\n    admin_key_required: false\n    admin_key: []\n");
        assert_eq!(admin_key(&cfg, Path::new("/x")).unwrap(), None);
    }
}
