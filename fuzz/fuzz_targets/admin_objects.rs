//! Admin API object validation (`wasmgate_shared::model`) on arbitrary request bodies.
//!
//! The bytes are parsed as JSON the way the Admin API parses a body, then validated as each of
//! the four kinds. No input may panic. An object that validates must:
//! - still validate once stored: with `id`, `create_time` and `update_time` added, printed as
//!   JSON text and read back (what the master does on reload, `check_all`), and parse into its
//!   type from that text (what a worker does with a snapshot);
//! - give the worker what it relies on: `vars` compiles, every `remote_addr(s)` entry parses as a
//!   CIDR, the upstream's nodes normalize, timeouts are finite and in range.
//!
//! The value is also fed directly to the pieces a body reaches: `VarsExpr::compile` (and the
//! compiled expression evaluated), `parse_cidr` on every string in it, and `Upstream`
//! deserialization + `normalized_nodes`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::{json, Value};
use std::borrow::Cow;
use std::net::IpAddr;
use wasmgate_shared::model::vars::{parse_cidr, Cidr, VarsExpr};
use wasmgate_shared::model::{
    validate, GlobalRule, Kind, Object, PluginCatalog, PluginConfig, Route, Service, Ssl, Timeout,
    Upstream,
};

fn catalog() -> PluginCatalog {
    PluginCatalog::new(["wasm_log".to_string(), "example_headers".to_string()])
}

fn check_timeout(t: &Option<Timeout>) {
    if let Some(t) = t {
        for v in [t.connect, t.send, t.read].into_iter().flatten() {
            assert!(
                v.is_finite() && v > 0.0 && v <= 86_400.0,
                "timeout {v} accepted"
            );
        }
    }
}

fn check_upstream(u: &Upstream) {
    let nodes = u
        .normalized_nodes()
        .expect("validated upstream: nodes must normalize");
    for n in &nodes {
        assert!(n.port != 0, "port 0 accepted");
        // What the worker connects to: a name or IPv4 address, or an IPv6 address (bracketed in
        // the authority); nothing else can ever be connected to.
        assert!(
            !n.host.contains(['[', ']']),
            "node host {:?} keeps a bracket",
            n.host
        );
        if n.host.contains(':') {
            assert!(
                n.host.parse::<std::net::Ipv6Addr>().is_ok(),
                "node host {:?} has a ':' but is not an IPv6 address",
                n.host
            );
        }
        let _ = n.authority();
    }
    check_timeout(&u.timeout);
    if let Some(r) = u.retry_timeout {
        assert!(
            r.is_finite() && (0.0..=86_400.0).contains(&r),
            "retry_timeout {r}"
        );
    }
}

/// What a worker does with a validated route.
fn check_route(r: &Route) {
    assert!(!r.paths().is_empty());
    for p in r.paths() {
        assert!(p.starts_with('/'), "{p:?}");
    }
    for a in r.remote_patterns() {
        assert!(
            Cidr::parse(a).is_some(),
            "remote address {a:?} validated but does not parse"
        );
    }
    if let Some(v) = &r.vars {
        let e = VarsExpr::compile(v).expect("validated vars must compile");
        eval_all(&e);
    }
    if let Some(u) = &r.upstream {
        check_upstream(u);
    }
    check_timeout(&r.timeout);
}

fn check_object(obj: &Object) {
    match obj {
        Object::Route(r) => check_route(r),
        Object::Service(s) => {
            if let Some(u) = &s.upstream {
                check_upstream(u);
            }
        }
        Object::Upstream(u) => check_upstream(u),
        Object::GlobalRule(g) => assert!(!g.plugins.is_empty()),
        // Accepted only with a usable certificate and key, and at least one name.
        Object::Ssl(s) => assert!(!s.names().is_empty() && !s.identities().unwrap().is_empty()),
        Object::PluginConfig(p) => assert!(p.plugins.is_some()),
    }
    let _ = obj.references();
}

/// Evaluates against a few variable lookups: everything absent, everything one fixed value,
/// and a value derived from the name (so different clauses see different text).
fn eval_all(e: &VarsExpr) {
    let _ = e.eval(&|_| None);
    let _ = e.eval(&|_| Some(Cow::Borrowed("10.1.2.3")));
    let _ = e.eval(&|_| Some(Cow::Borrowed("::ffff:192.168.0.1")));
    let _ = e.eval(&|_| Some(Cow::Borrowed("1e2")));
    let _ = e.eval(&|name| Some(Cow::Owned(name.chars().rev().collect::<String>())));
}

/// Every string in the value (object keys included), depth-first, at most `limit`.
fn strings<'a>(v: &'a Value, out: &mut Vec<&'a str>, limit: usize) {
    if out.len() >= limit {
        return;
    }
    match v {
        Value::String(s) => out.push(s),
        Value::Array(a) => a.iter().for_each(|x| strings(x, out, limit)),
        Value::Object(o) => o.iter().for_each(|(k, x)| {
            out.push(k);
            strings(x, out, limit)
        }),
        _ => {}
    }
}

fn stored_form_revalidates(kind: Kind, body: &Value, catalog: &PluginCatalog) {
    let mut stored = body.clone();
    let obj = stored
        .as_object_mut()
        .expect("validated bodies are objects");
    obj.insert("id".into(), json!("1"));
    obj.insert("create_time".into(), json!(1_700_000_000u64));
    obj.insert("update_time".into(), json!(1_700_000_001u64));
    // The store writes `{"value": …, "createdIndex": …, "modifiedIndex": …}` and reads it back
    // with serde_json (128 levels at most): the wrapper must parse too.
    let file = json!({"value": &stored, "createdIndex": 1, "modifiedIndex": 2});
    let file_text = serde_json::to_string_pretty(&file).expect("a Value always prints");
    if let Err(e) = serde_json::from_str::<Value>(&file_text) {
        panic!("accepted, but its store file does not read back: {e}");
    }
    let text = serde_json::to_string(&stored).expect("a Value always prints");
    let back: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("stored text does not parse back: {e}: {text}"));
    if let Err(e) = validate(kind, &back, catalog) {
        panic!("accepted, but its stored form is refused: {e}: {text}");
    }
    match kind {
        Kind::Routes => drop(serde_json::from_str::<Route>(&text).expect("worker parse")),
        Kind::Services => drop(serde_json::from_str::<Service>(&text).expect("worker parse")),
        Kind::Upstreams => drop(serde_json::from_str::<Upstream>(&text).expect("worker parse")),
        Kind::GlobalRules => drop(serde_json::from_str::<GlobalRule>(&text).expect("worker parse")),
        Kind::Ssls => drop(serde_json::from_str::<Ssl>(&text).expect("worker parse")),
        Kind::PluginConfigs => {
            drop(serde_json::from_str::<PluginConfig>(&text).expect("worker parse"))
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(body) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let catalog = catalog();
    for kind in Kind::ALL {
        match validate(kind, &body, &catalog) {
            Ok(obj) => {
                check_object(&obj);
                stored_form_revalidates(kind, &body, &catalog);
            }
            Err(e) => assert!(!e.is_empty()),
        }
    }
    if let Ok(e) = VarsExpr::compile(&body) {
        eval_all(&e);
    }
    if let Ok(u) = serde_json::from_value::<Upstream>(body.clone()) {
        if let Ok(nodes) = u.normalized_nodes() {
            for n in nodes {
                let _ = n.authority();
            }
        }
        let _ = u.check();
    }
    let mut texts = Vec::new();
    strings(&body, &mut texts, 64);
    let probes: [IpAddr; 3] = [
        "10.1.2.3".parse().unwrap(),
        "::ffff:10.1.2.3".parse().unwrap(),
        "2001:db8::1".parse().unwrap(),
    ];
    for s in texts {
        if let Some((addr, prefix)) = parse_cidr(s) {
            let max = if addr.is_ipv4() { 32 } else { 128 };
            assert!(prefix <= max, "{s:?} gave prefix {prefix}");
            let c = Cidr::parse(s).expect("parse_cidr and Cidr::parse agree");
            // A network contains its own address.
            assert!(c.contains(addr), "{s:?} does not contain its own address");
            for p in probes {
                let _ = c.contains(p);
            }
        }
    }
});
