//! `wasmgate_shared::config::GatewayConfig::parse` on arbitrary UTF-8 (config.yaml is read at
//! start and on every reload, and a bad file must be an error message, never a crash).
//!
//! Checks: no panic; errors are `origin:line: message`; an accepted configuration satisfies the
//! rules `validate` promises (checked again here independently); parsing is deterministic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::collections::HashSet;
use wasmgate_shared::config::GatewayConfig;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match GatewayConfig::parse(text, "fuzz") {
        Err(e) => {
            let rest =
                e.0.strip_prefix("fuzz:")
                    .unwrap_or_else(|| panic!("no origin: {e}"));
            let line = rest.split(':').next().unwrap_or("");
            assert!(line.parse::<usize>().is_ok(), "no line number: {e}");
        }
        Ok(c) => {
            assert!(!c.apisix.node_listen.is_empty());
            let mut seen = HashSet::new();
            for l in &c.apisix.node_listen {
                assert_ne!(l.0.port(), 0);
                assert!(seen.insert(l.0), "{} twice", l.0);
            }
            let admin = &c.deployment.admin;
            assert!(!admin.admin_key_required || !admin.admin_key.is_empty());
            let mut names = HashSet::new();
            for k in &admin.admin_key {
                assert!(!k.name.is_empty() && k.key.len() <= 256);
                assert!(names.insert(k.name.clone()));
            }
            assert!(c.nginx_config.http.client_max_header_size >= 1024);
            for size in [c.wasmgate.shm_size, c.wasmgate.plugin_shm_size] {
                assert!(((1 << 20)..=(4 << 30)).contains(&size), "{size}");
            }
            let mut plugins = HashSet::new();
            for p in &c.wasm.plugins {
                assert!(!p.name.is_empty() && p.name.len() <= 64, "{:?}", p.name);
                assert!(p
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
                assert!(plugins.insert(p.name.clone()));
            }
            let _ = c.nginx_config.worker_processes.resolve();
            let _ = c.nginx_config.error_log_level.as_tracing();
            let again = GatewayConfig::parse(text, "fuzz").expect("accepted once, refused twice");
            assert!(
                again == c,
                "parsing the same text twice gave different results"
            );
        }
    }
});
