//! `scheme: https` upstreams through a real gateway: the handshake, the name it sends, the
//! pooled sessions, certificate checks against `apisix.ssl.ssl_trusted_certificate`, client
//! certificates, and the refusals of what cannot work.
//!
//! The nodes are TLS servers of the test's own (rustls), with certificates made here (rcgen):
//! each answer says what the node saw — the name the handshake asked for, the `Host`, the
//! client certificate — and which of its connections carried it.

mod common;

use common::client::http;
use common::tls::{private_key, provider, Ca};
use common::{eventually, Gateway, Setup};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A TLS node answering every request with what it saw, as JSON.
struct TlsNode {
    port: u16,
    connections: Arc<AtomicUsize>,
    /// Connections open now (accepted and not yet ended by either side).
    open: Arc<AtomicUsize>,
}

impl TlsNode {
    /// `client_ca`: client certificates are required and must chain to it.
    fn start(ca: &Ca, names: &[&str], client_ca: Option<&Ca>) -> TlsNode {
        let (cert, key) = ca.issue("node", names);
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = match client_ca {
            Some(c) => {
                let mut roots = rustls::RootCertStore::empty();
                roots
                    .add(CertificateDer::from_pem_slice(c.pem.as_bytes()).unwrap())
                    .unwrap();
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider(),
                )
                .build()
                .unwrap();
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let chain = vec![cert.der().clone()];
        let config = Arc::new(builder.with_single_cert(chain, private_key(&key)).unwrap());
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let connections = Arc::new(AtomicUsize::new(0));
        let open = Arc::new(AtomicUsize::new(0));
        let (count, now_open) = (connections.clone(), open.clone());
        std::thread::spawn(move || {
            for tcp in listener.incoming() {
                let Ok(tcp) = tcp else { continue };
                let n = count.fetch_add(1, Ordering::SeqCst) + 1;
                let config = config.clone();
                let now_open = now_open.clone();
                now_open.fetch_add(1, Ordering::SeqCst);
                std::thread::spawn(move || {
                    serve(config, tcp, n);
                    now_open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        TlsNode {
            port,
            connections,
            open,
        }
    }

    fn open_now(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

/// One connection's requests (GET, no body), each answered with what the node saw.
fn serve(config: Arc<rustls::ServerConfig>, tcp: std::net::TcpStream, connection: usize) {
    let _ = tcp.set_read_timeout(Some(Duration::from_secs(30)));
    let Ok(session) = rustls::ServerConnection::new(config) else {
        return;
    };
    let mut tls = rustls::StreamOwned::new(session, tcp);
    // Finishes the handshake (a refused one ends here).
    while tls.conn.is_handshaking() {
        if tls.conn.complete_io(&mut tls.sock).is_err() {
            return;
        }
    }
    let sni = tls.conn.server_name().unwrap_or("").to_string();
    let client = tls
        .conn
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| format!("{} bytes", c.len()))
        .unwrap_or_default();
    let mut reader = BufReader::new(tls);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let path = line.split(' ').nth(1).unwrap_or("").to_string();
        let mut headers = serde_json::Map::new();
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            if h == "\r\n" {
                break;
            }
            if let Some((name, value)) = h.split_once(':') {
                headers.insert(name.to_ascii_lowercase(), value.trim().into());
            }
        }
        if headers.get("upgrade").is_some_and(|u| u == "websocket") {
            // Switched: what comes next is echoed, over the same TLS session.
            let tls = reader.get_mut();
            let _ = tls.write_all(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
            );
            let _ = tls.flush();
            loop {
                let data = match reader.fill_buf() {
                    Ok([]) | Err(_) => return,
                    Ok(data) => data.to_vec(),
                };
                reader.consume(data.len());
                let tls = reader.get_mut();
                let echo = [b"echo:".as_slice(), &data].concat();
                if tls.write_all(&echo).is_err() || tls.flush().is_err() {
                    return;
                }
            }
        }
        let tls = reader.get_mut();
        match path.as_str() {
            // A body delimited by the close, and a close without TLS's close_notify.
            "/close" => {
                let _ = tls.write_all(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nall of it");
                let _ = tls.flush();
                return;
            }
            // An answer of 8192 bytes with a stray answer behind it in the same record.
            "/stray" => {
                let head = "HTTP/1.1 200 OK\r\ncontent-length: ";
                let len = 8192 - head.len() - "8142\r\n\r\n".len();
                let mut out = format!("{head}{len}\r\n\r\n").into_bytes();
                out.resize(8192, b'a');
                out.extend_from_slice(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nSTALE");
                let _ = tls.write_all(&out);
                let _ = tls.flush();
                continue;
            }
            _ => {}
        }
        let host = headers.get("host").cloned().unwrap_or_default();
        let body = json!({
            "sni": sni, "host": host, "path": path, "headers": headers,
            "connection": connection, "client_cert": client,
        })
        .to_string();
        let answer = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        let tls = reader.get_mut();
        if tls.write_all(answer.as_bytes()).is_err() || tls.flush().is_err() {
            return;
        }
        if path == "/key-update" {
            // A record with no data after the answer: the session's keys renewed.
            tls.conn.refresh_traffic_keys().unwrap();
            if tls.conn.complete_io(&mut tls.sock).is_err() {
                return;
            }
        }
    }
}

fn put_route(gw: &Gateway, id: &str, uri: &str, upstream: Value) {
    let body = json!({"uri": uri, "upstream": upstream});
    let (status, v) = gw.admin("PUT", &format!("/apisix/admin/routes/{id}"), Some(body));
    assert!(status == 200 || status == 201, "route {id}: {status} {v}");
    gw.wait_propagated();
}

fn get(gw: &Gateway, path: &str, host: &str) -> (u16, Value) {
    let r = http("GET", &gw.url(path), &[("Host", host)], None);
    let v = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
    (r.status, v)
}

/// A gateway whose `ssl_trusted_certificate` is `ca` (and the system's store), with one
/// worker: connection reuse is then one pool's.
fn gateway_trusting(ca: &Ca) -> (Gateway, tempfile::TempDir) {
    gateway_trusting_with(ca, &[])
}

/// [`gateway_trusting`] with more lines under `nginx_config.http`.
fn gateway_trusting_with(ca: &Ca, http_extra: &[&str]) -> (Gateway, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("test-ca.pem");
    std::fs::write(&file, &ca.pem).unwrap();
    let setup = Setup {
        workers: 1,
        http_extra: [
            r#"access_log_format: "$request $upstream_scheme://$upstream_host$upstream_uri""#,
        ]
        .iter()
        .chain(http_extra)
        .map(|l| l.to_string())
        .collect(),
        apisix_extra: vec![
            "ssl:".into(),
            "  enable: false".into(),
            format!("  ssl_trusted_certificate: system, {}", file.display()),
        ],
        ..Setup::default()
    };
    (Gateway::start_with(setup), dir)
}

#[test]
fn https_nodes_are_reached_over_tls_with_the_requests_host_as_the_name() {
    let ca = Ca::new("test CA");
    let node = TlsNode::start(&ca, &["api.test", "127.0.0.1"], None);
    let (gw, _cas) = gateway_trusting(&ca);
    // Not verified (APISIX's default): any certificate, but TLS all the same.
    put_route(
        &gw,
        "tls",
        "/tls/*",
        json!({"scheme": "https", "nodes": {node.addr(): 1}}),
    );
    let mut seen = Vec::new();
    for i in 0..5 {
        let (status, v) = get(&gw, &format!("/tls/{i}"), "api.test:9080");
        assert_eq!(status, 200, "{v}");
        assert_eq!(
            v["sni"], "api.test",
            "the Host's name, without its port: {v}"
        );
        assert_eq!(v["host"], "api.test:9080");
        assert_eq!(v["path"], format!("/tls/{i}"));
        seen.push(v["connection"].as_u64().unwrap());
    }
    // One worker, one request at a time: the session is pooled and carries them all.
    assert!(seen.iter().all(|c| *c == seen[0]), "{seen:?}");
    assert_eq!(node.connections(), 1);
    // Another name is another session: one made for api.test must not carry it.
    let (status, v) = get(&gw, "/tls/x", "other.test");
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["sni"], "other.test");
    assert_ne!(v["connection"].as_u64().unwrap(), seen[0]);
    // `pass_host: node`: the node's address is the Host, and an IP address sends no SNI.
    put_route(
        &gw,
        "tls",
        "/tls/*",
        json!({"scheme": "https", "pass_host": "node", "nodes": {node.addr(): 1}}),
    );
    let (status, v) = get(&gw, "/tls/n", "api.test");
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["sni"], "");
    assert_eq!(v["host"], node.addr());
    // The access log's `$upstream_scheme` says https.
    let log = || std::fs::read_to_string(gw.prefix().join("logs/access.log")).unwrap_or_default();
    eventually(Duration::from_secs(5), "the access log line", || {
        log().contains("/tls/n")
    });
    let log = log();
    let line = log.lines().find(|l| l.contains("/tls/n")).unwrap();
    assert!(
        line.ends_with(&format!("https://{}/tls/n", node.addr())),
        "{line}"
    );
}

/// A WebSocket route's tunnel runs over the node's TLS session; a plugin's call-out to an
/// `https` upstream goes over TLS too, its `:authority` the name.
#[test]
fn tunnels_and_call_outs_speak_tls_to_https_upstreams() {
    let ca = Ca::new("test CA");
    let node = TlsNode::start(&ca, &["api.test"], None);
    let (gw, _cas) = gateway_trusting(&ca);
    let upstream = json!({"scheme": "https", "nodes": {node.addr(): 1}});
    let (status, v) = gw.admin(
        "PUT",
        "/apisix/admin/upstreams/auth-svc",
        Some(upstream.clone()),
    );
    assert_eq!(status, 201, "{v}");
    put_route(
        &gw,
        "ws",
        "/ws",
        json!({"scheme": "https", "nodes": {node.addr(): 1}}),
    );
    let (status, v) = gw.admin(
        "PATCH",
        "/apisix/admin/routes/ws",
        Some(json!({"enable_websocket": true})),
    );
    assert_eq!(status, 200, "{v}");
    gw.wait_propagated();
    let conf = json!({"conf": json!({"upstream": "auth-svc", "timeout_ms": 5000}).to_string()});
    let (status, v) = gw.admin(
        "PUT",
        "/apisix/admin/routes/auth",
        Some(json!({"uri": "/private", "plugins": {"http_auth": conf}, "upstream": upstream})),
    );
    assert_eq!(status, 201, "{v}");
    gw.wait_propagated();

    let mut c = std::net::TcpStream::connect(
        gw.url("")
            .trim_start_matches("http://")
            .trim_end_matches('/'),
    )
    .unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    common::client::websocket_echo(&mut c, "api.test");

    // http_auth asks auth-svc (the TLS node) and passes its answer's body on as x-auth-body.
    let (status, v) = get(&gw, "/private", "api.test");
    assert_eq!(status, 200, "{v}");
    let call: Value = serde_json::from_str(v["headers"]["x-auth-body"].as_str().unwrap()).unwrap();
    assert_eq!(call["sni"], "auth.local", "{call}");
    assert_eq!(call["path"], "/auth", "{call}");
    assert_eq!(v["sni"], "api.test", "{v}");
}

#[test]
fn verified_nodes_must_chain_to_a_trusted_ca_and_carry_the_name() {
    let ca = Ca::new("trusted CA");
    let stranger = Ca::new("unknown CA");
    let good = TlsNode::start(&ca, &["api.test"], None);
    let bad = TlsNode::start(&stranger, &["api.test"], None);
    let (gw, _cas) = gateway_trusting(&ca);
    let verified = |node: &TlsNode| json!({"scheme": "https", "tls": {"verify": true}, "nodes": {node.addr(): 1}});
    put_route(&gw, "good", "/good", verified(&good));
    put_route(&gw, "bad", "/bad", verified(&bad));
    let (status, v) = get(&gw, "/good", "api.test");
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["sni"], "api.test");
    // Signed by a CA not in ssl_trusted_certificate.
    let (status, _) = get(&gw, "/bad", "api.test");
    assert_eq!(status, 502);
    // The certificate is not for the name the request goes to.
    let (status, _) = get(&gw, "/good", "elsewhere.test");
    assert_eq!(status, 502);
    let log = gw.error_log();
    let lines = common::log_lines(&log, "SSL handshaking to upstream");
    assert!(
        lines.iter().any(|l| l.contains(&bad.addr())
            && l.contains("UnknownIssuer")
            && l.contains(&format!("upstream: \"https://{}/bad\"", bad.addr()))),
        "{log}"
    );
    assert!(
        lines.iter().any(
            |l| l.contains(&good.addr()) && l.contains("not valid for name \"elsewhere.test\"")
        ),
        "{log}"
    );
    // Unverified, the stranger's node is reached.
    put_route(
        &gw,
        "bad",
        "/bad",
        json!({"scheme": "https", "tls": {"verify": false}, "nodes": {bad.addr(): 1}}),
    );
    assert_eq!(get(&gw, "/bad", "api.test").0, 200);
}

#[test]
fn a_client_certificate_is_shown_to_nodes_that_ask_for_one() {
    let ca = Ca::new("node CA");
    let clients = Ca::new("client CA");
    let node = TlsNode::start(&ca, &["api.test"], Some(&clients));
    let (gw, _cas) = gateway_trusting(&ca);
    put_route(
        &gw,
        "anon",
        "/anon",
        json!({"scheme": "https", "nodes": {node.addr(): 1}}),
    );
    let (cert, key) = clients.issue("gateway", &["gateway.test"]);
    let cert_pem = cert.pem();
    put_route(
        &gw,
        "mtls",
        "/mtls",
        json!({"scheme": "https", "nodes": {node.addr(): 1},
               "tls": {"verify": true, "client_cert": cert_pem, "client_key": key.serialize_pem()}}),
    );
    assert_eq!(
        get(&gw, "/anon", "api.test").0,
        502,
        "no certificate, no entry"
    );
    let (status, v) = get(&gw, "/mtls", "api.test");
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["client_cert"], format!("{} bytes", cert.der().len()));
    // The key is kept as given: an upstream read back is one that can be written back.
    let (_, got) = gw.admin("GET", "/apisix/admin/routes/mtls", None);
    assert_eq!(got["value"]["upstream"]["tls"]["client_cert"], cert_pem);
}

#[test]
fn what_cannot_work_is_refused_with_the_reason() {
    let gw = Gateway::start_with(Setup {
        workers: 1,
        ..Setup::default()
    });
    let put = |fields: Value| {
        let mut upstream = json!({"nodes": {"127.0.0.1:1": 1}});
        for (k, v) in fields.as_object().unwrap() {
            upstream[k] = v.clone();
        }
        gw.admin("PUT", "/apisix/admin/upstreams/u", Some(upstream))
    };
    let refused = |upstream: Value, field: &str, says: &str| {
        let (status, v) = put(upstream.clone());
        assert_eq!(status, 400, "{upstream}: {v}");
        let msg = v["error_msg"].as_str().unwrap_or_default();
        assert!(
            msg.contains(field) && msg.contains(says),
            "{upstream}: {msg}"
        );
    };
    refused(json!({"scheme": "grpcs"}), "scheme", "gRPC");
    refused(json!({"scheme": "tcp"}), "scheme", "TCP or UDP");
    refused(json!({"scheme": "ftp"}), "scheme", "unknown scheme");
    refused(
        json!({"scheme": "https", "tls": {"client_cert_id": "1"}}),
        "tls.client_cert_id",
        "SSL objects of type client are not supported",
    );
    refused(
        json!({"scheme": "https", "tls": {"client_cert": "x"}}),
        "tls.client_key",
        "required",
    );
    refused(
        json!({"scheme": "https", "tls": {"client_cert": "not pem", "client_key": "not pem"}}),
        "tls.client_cert",
        "no PEM certificate",
    );
    // A key that is not the certificate's.
    let ca = Ca::new("some CA");
    let (cert, _) = ca.issue("one", &["one.test"]);
    let (_, other_key) = ca.issue("two", &["two.test"]);
    refused(
        json!({"scheme": "https", "tls": {"client_cert": cert.pem(), "client_key": other_key.serialize_pem()}}),
        "tls.client_key",
        "cannot be used with client_cert",
    );
    refused(
        json!({"scheme": "https", "tls": {"verify": "yes"}}),
        "tls.verify",
        "",
    );
    let (status, v) = put(json!({"scheme": "https", "tls": {"verify": true}}));
    assert_eq!(status, 201, "{v}");
    // A CA file that is not there stops `wasmgate test` (and so a start or reload) with
    // its name.
    let cfg = gw.config_yaml().replace(
        "apisix:\n",
        "apisix:\n  ssl:\n    ssl_trusted_certificate: system, cas/missing.pem\n",
    );
    std::fs::write(gw.config_path(), cfg).unwrap();
    let out = std::process::Command::new(common::bin())
        .args(["test", "-p"])
        .arg(gw.prefix())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("ssl_trusted_certificate") && err.contains("missing.pem"),
        "{err}"
    );
}

/// Sessions are pooled by node and by what opened them: another upstream's settings (a
/// client certificate, no certificate check) never lend their session to a request that
/// would not have opened it; clients sending many names keep no more idle connections than
/// `upstream_keepalive`; records a node sends after an answer (a key update) do not cost the
/// session, while an answer nobody asked for does.
#[test]
fn pooled_sessions_go_only_to_requests_that_would_open_them() {
    let ca = Ca::new("node CA");
    let stranger = Ca::new("unknown CA");
    let clients = Ca::new("client CA");
    let mtls = TlsNode::start(&ca, &["api.test"], Some(&clients));
    let untrusted = TlsNode::start(&stranger, &["api.test"], None);
    let (gw, _cas) = gateway_trusting_with(&ca, &["upstream_keepalive: 4"]);
    let (cert, key) = clients.issue("gateway", &["gateway.test"]);
    let with_cert =
        json!({"verify": true, "client_cert": cert.pem(), "client_key": key.serialize_pem()});
    let tls_route = |id: &str, node: &TlsNode, tls: Value| {
        put_route(
            &gw,
            id,
            &format!("/{id}"),
            json!({"scheme": "https", "nodes": {node.addr(): 1}, "tls": tls}),
        )
    };
    tls_route("cert", &mtls, with_cert);
    tls_route("nocert", &mtls, json!({"verify": true}));
    tls_route("lax", &untrusted, json!({"verify": false}));
    tls_route("strict", &untrusted, json!({"verify": true}));
    assert_eq!(get(&gw, "/cert", "api.test").0, 200);
    assert_eq!(
        get(&gw, "/nocert", "api.test").0,
        502,
        "the certificate's session lent"
    );
    assert_eq!(get(&gw, "/lax", "api.test").0, 200);
    assert_eq!(
        get(&gw, "/strict", "api.test").0,
        502,
        "an unchecked session lent"
    );

    // A name per request: each opens a session, but the pool keeps at most 4 of them.
    for i in 0..30 {
        assert_eq!(get(&gw, "/lax", &format!("h{i}.example")).0, 200);
    }
    eventually(Duration::from_secs(10), "idle sessions capped", || {
        untrusted.open_now() <= 4
    });
    // Names as clients write them are one name: no new session for `API.Test.`.
    let (_, a) = get(&gw, "/lax", "api.test");
    let (_, b) = get(&gw, "/lax", "API.Test.");
    assert_eq!(a["connection"], b["connection"], "{a} {b}");

    // A key update after the answer: the session carries the next request all the same.
    let plain = |id: &str, uri: &str| {
        put_route(
            &gw,
            id,
            uri,
            json!({"scheme": "https", "nodes": {untrusted.addr(): 1}}),
        )
    };
    plain("ku", "/key-update");
    let (_, first) = get(&gw, "/key-update", "ku.test");
    std::thread::sleep(Duration::from_millis(200));
    let (status, second) = get(&gw, "/key-update", "ku.test");
    assert_eq!(status, 200, "{second}");
    assert_eq!(first["connection"], second["connection"]);

    // An answer nobody asked for, left in the session: the connection is not used again.
    plain("stray", "/stray");
    plain("after", "/after");
    let r = http("GET", &gw.url("/stray"), &[("Host", "stray.test")], None);
    assert_eq!(r.status, 200);
    assert!(r.body.iter().all(|b| *b == b'a'), "{}", r.text());
    let r = http("GET", &gw.url("/after"), &[("Host", "stray.test")], None);
    assert_eq!(r.status, 200);
    assert!(!r.text().contains("STALE"), "{}", r.text());
}

/// A body delimited by the node's close arrives whole when the node closes without TLS's
/// `close_notify`, as many servers do.
#[test]
fn a_close_without_close_notify_ends_the_body() {
    let ca = Ca::new("test CA");
    let node = TlsNode::start(&ca, &["api.test"], None);
    let (gw, _cas) = gateway_trusting(&ca);
    put_route(
        &gw,
        "close",
        "/close",
        json!({"scheme": "https", "nodes": {node.addr(): 1}}),
    );
    let r = http("GET", &gw.url("/close"), &[("Host", "api.test")], None);
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "all of it");
    assert!(
        !gw.error_log().contains("close_notify"),
        "{}",
        gw.error_log()
    );
}

/// `https` health checks probe over TLS, with the name `checks.active.host` gives, and check
/// the node's certificate against `apisix.ssl.ssl_trusted_certificate` unless told not to.
#[test]
fn https_health_checks_check_the_nodes_certificate() {
    let ca = Ca::new("trusted CA");
    let stranger = Ca::new("unknown CA");
    let good = TlsNode::start(&ca, &["api.test"], None);
    let bad = TlsNode::start(&stranger, &["api.test"], None);
    let (gw, _cas) = gateway_trusting(&ca);
    let checked = |verify: bool| {
        json!({"scheme": "https", "nodes": {good.addr(): 1, bad.addr(): 1}, "checks": {"active": {
            "type": "https", "host": "api.test", "https_verify_certificate": verify,
            "healthy": {"interval": 1, "successes": 1},
            "unhealthy": {"interval": 1, "tcp_failures": 1}
        }}})
    };
    for (id, verify) in [("verified", true), ("unverified", false)] {
        let (s, v) = gw.admin(
            "PUT",
            &format!("/apisix/admin/upstreams/{id}"),
            Some(checked(verify)),
        );
        assert_eq!(s, 201, "{v}");
    }
    // Each node's state in each upstream, by port.
    let states = || {
        let (_, hc) = gw.admin("GET", "/wasmgate/healthcheck", None);
        let mut out = Vec::new();
        for u in hc.as_array().into_iter().flatten() {
            for n in u["nodes"].as_array().into_iter().flatten() {
                let node = format!("127.0.0.1:{}", n["port"]);
                let status = n["status"].as_str().unwrap_or("").to_string();
                out.push((u["name"].as_str().unwrap_or("").to_string(), node, status));
            }
        }
        out.sort();
        out
    };
    let want = |name: &str, node: &TlsNode, status: &str| {
        (
            format!("/apisix/upstreams/{name}"),
            node.addr(),
            status.to_string(),
        )
    };
    let mut expected = vec![
        want("unverified", &bad, "healthy"),
        want("unverified", &good, "healthy"),
        want("verified", &bad, "unhealthy"),
        want("verified", &good, "healthy"),
    ];
    expected.sort();
    eventually(
        Duration::from_secs(6),
        "the stranger's node found unhealthy",
        || states() == expected,
    );
    let log = gw.error_log();
    let lines = common::log_lines(
        &log,
        &format!("upstream node {} of upstreams/verified", bad.addr()),
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("TLS handshake failed") && l.contains("UnknownIssuer")),
        "{log}"
    );
    assert!(good.connections() > 0 && bad.connections() > 0);
}

/// A node that requires a client certificate is probed with the upstream's `tls.client_cert`,
/// as its requests are: without it every probe's handshake is refused and the node is taken
/// out of service while it serves the gateway's requests well.
#[test]
fn https_health_checks_show_the_upstreams_client_certificate() {
    let ca = Ca::new("node CA");
    let clients = Ca::new("client CA");
    let node = TlsNode::start(&ca, &["api.test"], Some(&clients));
    let (gw, _cas) = gateway_trusting(&ca);
    let (cert, key) = clients.issue("gateway", &["gateway.test"]);
    let checks = json!({"active": {
        "type": "https", "host": "api.test",
        "healthy": {"interval": 1, "successes": 1},
        "unhealthy": {"interval": 1, "tcp_failures": 1}
    }});
    let with_cert = json!({"scheme": "https", "nodes": {node.addr(): 1}, "checks": checks,
        "tls": {"verify": true, "client_cert": cert.pem(), "client_key": key.serialize_pem()}});
    let without = json!({"scheme": "https", "nodes": {node.addr(): 1}, "checks": checks});
    for (id, upstream) in [("mtls", with_cert), ("anonymous", without)] {
        let (s, v) = gw.admin(
            "PUT",
            &format!("/apisix/admin/upstreams/{id}"),
            Some(upstream),
        );
        assert_eq!(s, 201, "{v}");
    }
    let states = || {
        let (_, hc) = gw.admin("GET", "/wasmgate/healthcheck", None);
        let mut out = Vec::new();
        for u in hc.as_array().into_iter().flatten() {
            for n in u["nodes"].as_array().into_iter().flatten() {
                let name = u["name"].as_str().unwrap_or("").to_string();
                out.push((name, n["status"].as_str().unwrap_or("").to_string()));
            }
        }
        out.sort();
        out
    };
    let expected = vec![
        (
            "/apisix/upstreams/anonymous".to_string(),
            "unhealthy".to_string(),
        ),
        ("/apisix/upstreams/mtls".to_string(), "healthy".to_string()),
    ];
    eventually(
        Duration::from_secs(6),
        "the node healthy to probes with the certificate",
        || states() == expected,
    );
    // And it stays so: the probes after the first keep finding it (the node saw the
    // certificate on more than one connection).
    let seen = node.connections();
    eventually(Duration::from_secs(4), "more probes", || {
        node.connections() >= seen + 2
    });
    assert_eq!(states(), expected);
}
