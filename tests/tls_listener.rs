//! The TLS listener (`apisix.ssl`) through a real gateway: certificates from SSL objects
//! chosen by the name the client asks for, `https` as the scheme everywhere the request
//! shows it, SSL objects changed and removed while serving, and the refusals of what cannot
//! work.
//!
//! The clients are rustls clients of the test's own that trust a CA made here: a handshake
//! that succeeds proves the certificate chains to it and names what was asked for.

mod common;

use common::client::{read_response, Resp};
use common::tls::{provider, Ca};
use common::{eventually, free_port, Gateway, Setup, TestUpstream};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};
use serde_json::{json, Value};
use std::io::{BufReader, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

type Tls = StreamOwned<ClientConnection, TcpStream>;

/// A client that trusts `ca` only, offering `versions`.
fn client_config(
    ca: &Ca,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca.pem.as_bytes()).unwrap())
        .unwrap();
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Arc::new(config)
}

/// [`client_config`] with a client certificate: `chain` (PEM, the client's first) and its key.
fn client_with_cert(ca: &Ca, chain: &str, key: &rcgen::KeyPair) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca.pem.as_bytes()).unwrap())
        .unwrap();
    let chain = CertificateDer::pem_slice_iter(chain.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, common::tls::private_key(key))
        .unwrap();
    Arc::new(config)
}

/// A TLS connection to `port` for `name` (an IP address: no SNI), its handshake done.
fn connect(port: u16, name: &str, config: &Arc<ClientConfig>) -> Result<Tls, String> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    handshake(tcp, name, config)
}

/// The handshake for `name` over `tcp`.
fn handshake(tcp: TcpStream, name: &str, config: &Arc<ClientConfig>) -> Result<Tls, String> {
    let server = ServerName::try_from(name.to_string()).map_err(|e| e.to_string())?;
    let conn = ClientConnection::new(config.clone(), server).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut tls = StreamOwned::new(conn, tcp);
    while tls.conn.is_handshaking() {
        tls.conn
            .complete_io(&mut tls.sock)
            .map_err(|e| format!("handshake: {e}"))?;
    }
    Ok(tls)
}

/// The certificate the server showed (the end-entity's, DER).
fn shown_cert(tls: &Tls) -> Vec<u8> {
    tls.conn.peer_certificates().unwrap()[0].to_vec()
}

/// One request on `tls`, its answer read whole (the connection stays for the next).
fn send(tls: &mut Tls, method: &str, path: &str, host: &str, body: &[u8]) -> Resp {
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    tls.write_all(head.as_bytes()).unwrap();
    tls.write_all(body).unwrap();
    tls.flush().unwrap();
    let mut r = BufReader::new(tls);
    read_response(&mut r, false).unwrap()
}

/// One GET on a new connection for `name`.
fn get(port: u16, name: &str, config: &Arc<ClientConfig>, path: &str) -> Result<Resp, String> {
    let mut tls = connect(port, name, config)?;
    Ok(send(&mut tls, "GET", path, name, b""))
}

fn der_of(pem: &str) -> Vec<u8> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

fn put_ssl(gw: &Gateway, id: &str, body: Value) {
    let (s, v) = gw.admin("PUT", &format!("/apisix/admin/ssls/{id}"), Some(body));
    assert!(s == 200 || s == 201, "ssl {id}: {s} {v}");
    gw.wait_propagated();
}

/// A certificate for `names` as an SSL object's `cert` and `key`.
fn pair(ca: &Ca, names: &[&str]) -> (String, String) {
    let (cert, key) = ca.issue(names[0], names);
    (cert.pem(), key.serialize_pem())
}

/// A gateway with the TLS listener on `tls_port`, with `more` lines under `apisix.ssl`.
fn gateway(tls_port: u16, more: &[&str]) -> Gateway {
    gateway_with(tls_port, more, &[], 2)
}

/// [`gateway`] with `http_extra` lines under `nginx_config.http` and `workers` workers.
fn gateway_with(tls_port: u16, more: &[&str], http_extra: &[&str], workers: usize) -> Gateway {
    let mut apisix_extra = vec![
        "ssl:".to_string(),
        "  enable: true".into(),
        format!("  listen: [{{port: {tls_port}}}]"),
    ];
    apisix_extra.extend(more.iter().map(|l| format!("  {l}")));
    Gateway::start_with(Setup {
        http_extra: [r#"access_log_format: "$scheme $request $status $pid $ssl_session_reused $ssl_protocol $ssl_cipher $ssl_client_verify""#]
            .iter()
            .chain(http_extra)
            .map(|l| l.to_string())
            .collect(),
        apisix_extra,
        workers,
        ..Setup::default()
    })
}

#[test]
fn https_is_served_with_the_certificate_of_the_name_asked_for() {
    let ca = Ca::new("listener CA");
    let app = TestUpstream::start("app");
    let port = free_port();
    let gw = gateway(port, &["fallback_sni: api.test"]);
    gw.route("echo", json!({"uri": "/*"}), Some(&app));
    let (api_cert, api_key) = pair(&ca, &["api.test", "127.0.0.1"]);
    let (wild_cert, wild_key) = pair(&ca, &["*.wild.test", "a.b.wild.test"]);
    put_ssl(
        &gw,
        "1",
        json!({"cert": api_cert, "key": api_key, "snis": ["api.test"]}),
    );
    put_ssl(
        &gw,
        "2",
        json!({"cert": wild_cert, "key": wild_key, "snis": ["*.wild.test"]}),
    );
    let config = client_config(&ca, rustls::DEFAULT_VERSIONS);

    // The exact name, keep-alive: several requests on one session.
    let mut tls = connect(port, "api.test", &config).unwrap();
    assert_eq!(shown_cert(&tls), der_of(&api_cert));
    assert_eq!(tls.conn.alpn_protocol(), Some(&b"http/1.1"[..]));
    for i in 0..3 {
        let r = send(&mut tls, "GET", &format!("/k/{i}"), "api.test", b"");
        assert_eq!(r.status, 200, "{}", r.text());
        let seen = r.json();
        assert_eq!(seen["headers"]["x-forwarded-proto"], "https", "{seen}");
        assert_eq!(seen["headers"]["x-forwarded-port"], port.to_string());
    }
    // A body each way, larger than a TLS record and than the socket takes at once.
    let big = vec![b'x'; 1 << 20];
    let r = send(&mut tls, "POST", "/upload", "api.test", &big);
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["body_len"], 1 << 20);
    let r = send(&mut tls, "GET", "/big/3000000", "api.test", b"");
    assert_eq!((r.status, r.body.len()), (200, 3_000_000));
    let r = send(&mut tls, "GET", "/stream/40", "api.test", b"");
    assert_eq!((r.status, r.body.len()), (200, 40 * 1024));

    // A wildcard serves every name under it, deeper ones too.
    let r = get(port, "a.b.wild.test", &config, "/w").unwrap();
    assert_eq!(r.status, 200);
    // No SNI (an IP address): `fallback_sni`'s certificate.
    let tls = connect(port, "127.0.0.1", &config).unwrap();
    assert_eq!(shown_cert(&tls), der_of(&api_cert));
    // A name no SSL object serves: no handshake, and the error log says why.
    let Err(e) = connect(port, "nope.test", &config) else {
        panic!("a handshake for a name no SSL object serves");
    };
    assert!(e.contains("handshake"), "{e}");
    eventually(
        Duration::from_secs(5),
        "the refusal in the error log",
        || {
            gw.error_log()
                .contains("no SSL object serves \"nope.test\"")
        },
    );

    // The plain listener still speaks HTTP, and says so.
    let r = common::http("GET", &gw.url("/plain"), &[], None);
    assert_eq!(r.json()["headers"]["x-forwarded-proto"], "http");
    // `$scheme` in the access log, and in a route's vars: only TLS requests match.
    let secure = TestUpstream::start("secure");
    gw.route(
        "secure",
        json!({"uri": "/secure", "vars": [["scheme", "==", "https"]]}),
        Some(&secure),
    );
    let plain = common::http("GET", &gw.url("/secure"), &[], None);
    assert_eq!(plain.header("x-upstream"), Some("app"));
    let r = get(port, "api.test", &config, "/secure").unwrap();
    assert_eq!(r.header("x-upstream"), Some("secure"));
    let log = || std::fs::read_to_string(gw.prefix().join("logs/access.log")).unwrap_or_default();
    eventually(Duration::from_secs(5), "https in the access log", || {
        log().contains("https GET /secure HTTP/1.1 200") && log().contains("http GET /plain")
    });

    // Plugins see the scheme and the name the client asked for; routes can match that name.
    gw.route(
        "plugin",
        json!({"uri": "/plugin", "vars": [["ssl_server_name", "==", "api.test"]],
               "plugins": {"echo": {"conf": "tls"}}}),
        Some(&app),
    );
    let seen = get(port, "api.test", &config, "/plugin").unwrap().json();
    assert_eq!(
        (&seen["scheme"], &seen["sni"], &seen["tls_version"]),
        (&json!("https"), &json!("api.test"), &json!("TLSv1.3")),
        "{seen}"
    );
    // The connection's nginx variables, as APISIX's plugins read them.
    assert_eq!(
        (&seen["ssl_server_name"], &seen["ssl_protocol"]),
        (&json!("api.test"), &json!("TLSv1.3")),
        "{seen}"
    );
    assert_eq!(seen["server_port"], json!(port.to_string()), "{seen}");
    gw.route(
        "plain-echo",
        json!({"uri": "/plain-echo", "plugins": {"echo": {"conf": "plain"}}}),
        Some(&app),
    );
    let seen = common::http("GET", &gw.url("/plain-echo"), &[], None).json();
    assert_eq!(
        (&seen["sni"], &seen["tls_version"], &seen["ssl_protocol"]),
        (&json!("<none>"), &json!("<none>"), &json!("<none>")),
        // (The Rust SDK reads an empty value as none.)
        "over plain HTTP, Envoy's empty name, no TLS version, nginx's empty variable: {seen}"
    );
    let plain = common::http("GET", &gw.url("/plugin"), &[], None);
    assert_eq!(
        plain.header("x-upstream"),
        Some("app"),
        "the route needs the name"
    );
    let mut no_sni = connect(port, "127.0.0.1", &config).unwrap();
    let r = send(&mut no_sni, "GET", "/plugin", "api.test", b"");
    assert_eq!(r.header("x-upstream"), Some("app"), "no name was sent");

    // A WebSocket through the TLS listener: the tunnel carries TLS on the client's side.
    let (node, _) = common::upstream::switching_node();
    let up = json!({"nodes": {node: 1}});
    let body = json!({"uri": "/ws", "enable_websocket": true, "upstream": up});
    let (s, v) = gw.admin("PUT", "/apisix/admin/routes/ws", Some(body));
    assert_eq!(s, 201, "{v}");
    gw.wait_propagated();
    let mut tls = connect(port, "api.test", &config).unwrap();
    common::client::websocket_echo(&mut tls, "api.test");
    drop(tls);

    // A new certificate for the name: new handshakes get it, at once.
    let (new_cert, new_key) = pair(&ca, &["api.test"]);
    put_ssl(
        &gw,
        "1",
        json!({"cert": new_cert, "key": new_key, "snis": ["api.test"]}),
    );
    for _ in 0..4 {
        let tls = connect(port, "api.test", &config).unwrap();
        assert_eq!(shown_cert(&tls), der_of(&new_cert));
    }
    // Disabled, then deleted: its names are served no more.
    put_ssl(
        &gw,
        "1",
        json!({"cert": new_cert, "key": new_key, "snis": ["api.test"], "status": 0}),
    );
    assert!(connect(port, "api.test", &config).is_err());
    let (s, _) = gw.admin("DELETE", "/apisix/admin/ssls/2", None);
    assert_eq!(s, 200);
    gw.wait_propagated();
    assert!(connect(port, "x.wild.test", &config).is_err());
}

/// Sessions resume whichever worker a client comes back to, and across a reload: the session
/// cache and the ticket keys are in shared memory the master owns (nginx's `ssl_session_cache
/// shared:` and its ticket keys), for TLS 1.3 and 1.2, with `ssl_session_tickets` off (the
/// default: sessions kept by the gateway) and on. The access log says which worker served
/// each connection (`$pid`) and whether it resumed (`$ssl_session_reused`).
#[test]
fn sessions_resume_on_every_worker_and_across_a_reload() {
    let ca = Ca::new("resumption CA");
    let app = TestUpstream::start("app");
    let (cert, key) = pair(&ca, &["api.test"]);
    for tickets in [false, true] {
        let port = free_port();
        let gw = gateway(port, &[&format!("ssl_session_tickets: {tickets}")]);
        gw.route("echo", json!({"uri": "/*"}), Some(&app));
        put_ssl(
            &gw,
            "1",
            json!({"cert": cert, "key": key, "snis": ["api.test"]}),
        );
        let log =
            || std::fs::read_to_string(gw.prefix().join("logs/access.log")).unwrap_or_default();
        for (version, name) in [
            (&rustls::version::TLS13, "TLSv1.3"),
            (&rustls::version::TLS12, "TLSv1.2"),
        ] {
            // A client of its own: its session cache starts empty.
            let config = client_config(&ca, &[version]);
            let case = format!("tickets {tickets}, {name}");
            let tag = format!("{tickets}-{name}");
            let connections = 24;
            for i in 0..connections {
                let mut tls = connect(port, "api.test", &config).unwrap();
                let resumed = tls.conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
                assert_eq!(resumed, i > 0, "{case}: connection {i} resumed: {resumed}");
                let r = send(&mut tls, "GET", &format!("/r/{tag}/{i}"), "api.test", b"");
                assert_eq!(r.status, 200);
            }
            // The log agrees, and names the workers: both served resumed sessions (a
            // connection goes to whichever worker accepts first; 23 to one alone would be
            // a rare draw, and the reload below checks another process deterministically).
            let mut workers = std::collections::BTreeSet::new();
            eventually(
                Duration::from_secs(5),
                "the connections in the access log",
                || log().matches(&format!("/r/{tag}/")).count() == connections,
            );
            for line in log().lines().filter(|l| l.contains(&format!("/r/{tag}/"))) {
                let fields: Vec<&str> = line.split(' ').collect();
                // https GET /r/… HTTP/1.1 200 <pid> <reused> <protocol> <cipher>
                let (pid, reused, protocol) = (fields[5], fields[6], fields[7]);
                assert_eq!(protocol, name, "{line}");
                assert!(!fields[8].is_empty(), "{line}");
                let first = line.contains(&format!("/r/{tag}/0 "));
                assert_eq!(reused, if first { "." } else { "r" }, "{line}");
                if !first {
                    workers.insert(pid.to_string());
                }
            }
            if workers.len() < 2 {
                eprintln!("{case}: every resumed connection went to one worker");
            }

            // A reload replaces both workers; the sessions are still there for the new ones.
            let before = gw.worker_pids();
            let mut tls = connect(port, "api.test", &config).unwrap();
            let _ = send(&mut tls, "GET", "/before-reload", "api.test", b"");
            drop(tls);
            gw.signal(nix::sys::signal::Signal::SIGHUP);
            eventually(
                Duration::from_secs(20),
                "new workers after the reload",
                || {
                    let now = gw.worker_pids();
                    now.len() == 2 && now.iter().all(|p| !before.contains(p))
                },
            );
            gw.wait_propagated();
            let mut tls = connect(port, "api.test", &config).unwrap();
            assert_eq!(
                tls.conn.handshake_kind(),
                Some(rustls::HandshakeKind::Resumed),
                "{case}: a session made before the reload"
            );
            let r = send(
                &mut tls,
                "GET",
                &format!("/after-reload/{tag}"),
                "api.test",
                b"",
            );
            assert_eq!(r.status, 200);
        }
        // A new certificate: no session made with the old one resumes.
        let (new_cert, new_key) = pair(&ca, &["api.test"]);
        let config = client_config(&ca, rustls::DEFAULT_VERSIONS);
        let _ = get(port, "api.test", &config, "/warm").unwrap();
        assert_eq!(
            connect(port, "api.test", &config)
                .unwrap()
                .conn
                .handshake_kind(),
            Some(rustls::HandshakeKind::Resumed)
        );
        put_ssl(
            &gw,
            "1",
            json!({"cert": new_cert, "key": new_key, "snis": ["api.test"]}),
        );
        let tls = connect(port, "api.test", &config).unwrap();
        assert_eq!(tls.conn.handshake_kind(), Some(rustls::HandshakeKind::Full));
        assert_eq!(shown_cert(&tls), der_of(&new_cert));
    }
}

/// Private keys are stored encrypted with `apisix.data_encryption.keyring`, as APISIX stores
/// them: a GET shows none in clear, a GET's answer written back still serves, keys APISIX
/// encrypted with its default keyring (APISIX 3's and APISIX 2's `key_encrypt_salt`) are
/// read, and with a keyring of the operator's own a key it cannot open is refused, saying so,
/// while one sealed with the file's `ssl.key_encrypt_salt` is read.
#[test]
fn private_keys_are_stored_encrypted_as_apisix_stores_them() {
    use wasmgate_shared::keyring::{Keyring, APISIX_DEFAULT};
    let ca = Ca::new("keyring CA");
    let app = TestUpstream::start("app");
    let port = free_port();
    let gw = gateway_with(port, &[], &[], 1);
    gw.route("echo", json!({"uri": "/*"}), Some(&app));
    let config = client_config(&ca, rustls::DEFAULT_VERSIONS);
    let (cert, key) = pair(&ca, &["api.test"]);
    put_ssl(
        &gw,
        "1",
        json!({"cert": cert, "key": key, "snis": ["api.test"]}),
    );
    let (_, v) = gw.admin("GET", "/apisix/admin/ssls/1", None);
    let stored = v["value"]["key"].as_str().unwrap().to_string();
    assert!(
        !stored.contains("PRIVATE KEY") && stored.len() > 100,
        "{stored}"
    );
    // What APISIX would have stored: its default keyring opens it.
    assert_eq!(Keyring::apisix_default().open(&stored).unwrap(), key);
    // The validity period, from the certificate (rcgen's default: 1975 to 4096), as APISIX's
    // dashboard fills it, whatever the body said.
    assert_eq!(
        (&v["value"]["validity_start"], &v["value"]["validity_end"]),
        (&json!(157766400), &json!(67090118400u64)),
        "{v}"
    );
    assert_eq!(get(port, "api.test", &config, "/a").unwrap().status, 200);
    // A GET's answer written back (a dashboard's round trip) keeps serving, stored the same.
    let mut back = v["value"].clone();
    back["validity_end"] = json!(-1);
    let (s, _) = gw.admin("PUT", "/apisix/admin/ssls/1", Some(back));
    assert_eq!(s, 200);
    gw.wait_propagated();
    let (_, again) = gw.admin("GET", "/apisix/admin/ssls/1", None);
    assert_eq!(again["value"]["key"], stored.as_str());
    assert_eq!(
        again["value"]["validity_end"], 67090118400u64,
        "the certificate's, not -1 (replaced, not checked)"
    );
    assert_eq!(get(port, "api.test", &config, "/b").unwrap().status, 200);
    // APISIX 2's default key (`ssl.key_encrypt_salt`), in a certificate pair of `keys`.
    let (two_cert, two_key) = pair(&ca, &["two.test"]);
    let (ec_cert, ec_key) = pair(&ca, &["two.test"]);
    let apisix2 = Keyring::new(&[APISIX_DEFAULT[1]]).unwrap();
    let body = json!({"cert": two_cert, "key": apisix2.seal(&two_key).unwrap(),
                      "certs": [ec_cert], "keys": [apisix2.seal(&ec_key).unwrap()],
                      "snis": ["two.test"]});
    put_ssl(&gw, "2", body);
    assert_eq!(get(port, "two.test", &config, "/c").unwrap().status, 200);
    // An upstream's client key is stored encrypted too.
    let (client_cert, client_key) = pair(&ca, &["client.test"]);
    let up = json!({"scheme": "https", "nodes": {"127.0.0.1:1": 1},
                    "tls": {"client_cert": client_cert, "client_key": client_key}});
    let (s, v) = gw.admin("PUT", "/apisix/admin/upstreams/u", Some(up));
    assert_eq!(s, 201, "{v}");
    let sealed = v["value"]["tls"]["client_key"].as_str().unwrap();
    assert_eq!(Keyring::apisix_default().open(sealed).unwrap(), client_key);

    // The operator's own keyring: keys sealed with it; one it cannot open is refused.
    let port = free_port();
    let own = Gateway::start_with(Setup {
        apisix_extra: vec![
            "ssl:".into(),
            format!("  listen: [{{port: {port}}}]"),
            "  key_encrypt_salt: fedcba9876543210".into(),
            "data_encryption:".into(),
            "  keyring: [0123456789abcdef]".into(),
        ],
        workers: 1,
        ..Setup::default()
    });
    own.route("echo", json!({"uri": "/*"}), Some(&app));
    let (s, v) = own.admin(
        "PUT",
        "/apisix/admin/ssls/1",
        Some(json!({"cert": cert, "key": stored, "snis": ["api.test"]})),
    );
    assert_eq!(s, 400, "{v}");
    let msg = v["error_msg"].as_str().unwrap();
    assert!(
        msg.contains("\"key\"") && msg.contains("not in apisix.data_encryption.keyring"),
        "{msg}"
    );
    assert!(!msg.contains(&stored[..12]), "{msg}");
    put_ssl(
        &own,
        "1",
        json!({"cert": cert, "key": key, "snis": ["api.test"]}),
    );
    let (_, v) = own.admin("GET", "/apisix/admin/ssls/1", None);
    let mine = Keyring::new(&["0123456789abcdef"]).unwrap();
    assert_eq!(mine.open(v["value"]["key"].as_str().unwrap()).unwrap(), key);
    assert_eq!(get(port, "api.test", &config, "/d").unwrap().status, 200);
    // A key APISIX 3.0 encrypted with its `ssl.key_encrypt_salt` is read, and stored
    // encrypted again with the keyring's first key.
    let salt = Keyring::new(&["fedcba9876543210"]).unwrap();
    let body = json!({"cert": two_cert, "key": salt.seal(&two_key).unwrap(), "snis": ["two.test"]});
    put_ssl(&own, "2", body);
    assert_eq!(get(port, "two.test", &config, "/e").unwrap().status, 200);
    let (_, v) = own.admin("GET", "/apisix/admin/ssls/2", None);
    assert_eq!(
        mine.open(v["value"]["key"].as_str().unwrap()).unwrap(),
        two_key
    );
}

/// One GET for `name` on a new connection; None when the gateway ends it instead of
/// answering (with TLS 1.3 a client learns that its certificate was refused only then).
fn served(port: u16, name: &str, config: &Arc<ClientConfig>, path: &str) -> Option<Resp> {
    let mut tls = connect(port, name, config).ok()?;
    let head = format!("GET {path} HTTP/1.1\r\nHost: {name}\r\n\r\n");
    tls.write_all(head.as_bytes()).ok()?;
    tls.flush().ok()?;
    read_response(&mut BufReader::new(tls), false).ok()
}

/// Client certificates (mTLS from clients), as APISIX's `client` of an SSL object: a client
/// must show one its CAs issued (within `depth`), or is let in without one only for the
/// paths of `skip_mtls_uri_regex`; a certificate checked for one name does not open another
/// name's routes; `$ssl_client_verify` and the plugins' `connection.mtls` say what was shown.
#[test]
fn client_certificates_are_checked_as_the_ssl_object_asks() {
    let ca = Ca::new("listener CA");
    let client_ca = Ca::new("client CA");
    let app = TestUpstream::start("app");
    let port = free_port();
    let gw = gateway_with(port, &["fallback_sni: other.test"], &[], 1);
    gw.route("echo", json!({"uri": "/*"}), Some(&app));
    gw.route(
        "plugin",
        json!({"uri": "/plugin", "plugins": {"echo": {"conf": "mtls"}}}),
        Some(&app),
    );
    let (cert, key) = pair(&ca, &["api.test"]);
    let ssl =
        |client: Value| json!({"cert": cert, "key": key, "snis": ["api.test"], "client": client});
    put_ssl(&gw, "1", ssl(json!({"ca": client_ca.pem})));
    // other.test asks for no certificate.
    let (other_cert, other_key) = pair(&ca, &["other.test", "127.0.0.1"]);
    put_ssl(
        &gw,
        "3",
        json!({"cert": other_cert, "key": other_key, "snis": ["other.test"]}),
    );
    let (alice_cert, alice_key) = client_ca.issue("alice", &["alice.client"]);
    let alice = client_with_cert(&ca, &alice_cert.pem(), &alice_key);
    assert_eq!(served(port, "api.test", &alice, "/a").unwrap().status, 200);
    // Without a certificate, or with one another CA issued: no answer.
    let anonymous = client_config(&ca, rustls::DEFAULT_VERSIONS);
    assert!(served(port, "api.test", &anonymous, "/b").is_none());
    let stranger = Ca::new("another CA");
    let (m_cert, m_key) = stranger.issue("mallory", &["m.client"]);
    let mallory = client_with_cert(&ca, &m_cert.pem(), &m_key);
    assert!(served(port, "api.test", &mallory, "/c").is_none());
    let log = || std::fs::read_to_string(gw.prefix().join("logs/access.log")).unwrap_or_default();
    eventually(Duration::from_secs(5), "$ssl_client_verify logged", || {
        log()
            .lines()
            .any(|l| l.contains("GET /a HTTP/1.1 200") && l.ends_with(" SUCCESS"))
    });
    // Plugins see the certificate's digest (Envoy's hex SHA-256 of its DER).
    let seen = served(port, "api.test", &alice, "/plugin").unwrap().json();
    let digest: String = ring_sha256(&der_of(&alice_cert.pem()));
    assert_eq!(
        (&seen["mtls"], &seen["peer_digest"], &seen["client_verify"]),
        (&json!("true"), &json!(digest), &json!("SUCCESS")),
        "{seen}"
    );
    // Whom it names, as Envoy's attributes and nginx's `$ssl_client_s_dn` say it.
    assert_eq!(
        (&seen["subject"], &seen["dns_san"], &seen["client_dn"]),
        (
            &json!("CN=alice"),
            &json!("alice.client"),
            &json!("CN=alice")
        ),
        "{seen}"
    );
    // A route for one client only, by its certificate's subject.
    let alice_app = TestUpstream::start("alice-app");
    gw.route(
        "alice-only",
        json!({"uri": "/mine", "vars": [["ssl_client_s_dn", "==", "CN=alice"]]}),
        Some(&alice_app),
    );
    let r = served(port, "api.test", &alice, "/mine").unwrap();
    assert_eq!(r.header("x-upstream"), Some("alice-app"));
    // api.test's routes are not reached over a connection made for another name: not for
    // other.test (which asks for no certificate), nor with no name (fallback_sni's).
    let mut tls = connect(port, "other.test", &anonymous).unwrap();
    assert_eq!(send(&mut tls, "GET", "/d", "api.test", b"").status, 400);
    assert_eq!(send(&mut tls, "GET", "/d", "other.test", b"").status, 200);
    let mut tls = connect(port, "127.0.0.1", &anonymous).unwrap();
    assert_eq!(send(&mut tls, "GET", "/d", "api.test", b"").status, 400);
    // A certificate checked for api.test may go to a name that asks for none.
    let mut tls = connect(port, "api.test", &alice).unwrap();
    assert_eq!(send(&mut tls, "GET", "/d", "other.test", b"").status, 200);
    assert_eq!(send(&mut tls, "GET", "/d", "api.test", b"").status, 200);

    // `depth`, as OpenSSL counts it: at 1 (the default) one intermediate may stand between
    // the client's certificate and the CA, two at 2.
    let mid = client_ca.intermediate("client intermediate");
    let (bob_cert, bob_key) = mid.issue("bob", &["bob.client"]);
    let bob = client_with_cert(&ca, &(bob_cert.pem() + &mid.pem), &bob_key);
    assert_eq!(served(port, "api.test", &bob, "/e").unwrap().status, 200);
    let r = served(port, "api.test", &bob, "/mine").unwrap();
    assert_eq!(r.header("x-upstream"), Some("app"), "not alice's route");
    let lower = mid.intermediate("client intermediate 2");
    let (carol_cert, carol_key) = lower.issue("carol", &["carol.client"]);
    let chain = carol_cert.pem() + &lower.pem + &mid.pem;
    let carol = client_with_cert(&ca, &chain, &carol_key);
    assert!(served(port, "api.test", &carol, "/e").is_none(), "depth 1");
    // A connection made before the object changed is not served by its new rules.
    let mut before = connect(port, "api.test", &alice).unwrap();
    put_ssl(&gw, "1", ssl(json!({"ca": client_ca.pem, "depth": 2})));
    assert_eq!(served(port, "api.test", &carol, "/f").unwrap().status, 200);
    assert_eq!(send(&mut before, "GET", "/f", "api.test", b"").status, 400);

    // `skip_mtls_uri_regex`: without a certificate, those paths only.
    put_ssl(
        &gw,
        "1",
        ssl(json!({"ca": client_ca.pem, "skip_mtls_uri_regex": ["^/public/"]})),
    );
    assert_eq!(
        served(port, "api.test", &anonymous, "/public/x")
            .unwrap()
            .status,
        200
    );
    assert_eq!(
        served(port, "api.test", &anonymous, "/private")
            .unwrap()
            .status,
        400
    );
    assert_eq!(
        served(port, "api.test", &alice, "/private").unwrap().status,
        200
    );
    assert!(
        served(port, "api.test", &mallory, "/public/y").is_none(),
        "a bad one still fails"
    );
    let seen = served(port, "api.test", &anonymous, "/plugin");
    assert_eq!(seen.unwrap().status, 400, "the plugin's path is not open");
    eventually(Duration::from_secs(5), "NONE logged", || {
        log()
            .lines()
            .any(|l| l.contains("GET /public/x HTTP/1.1 200") && l.ends_with(" NONE"))
    });

    // What cannot work is refused, naming the field.
    let refused = |client: Value, says: &str| {
        let (s, v) = gw.admin("PUT", "/apisix/admin/ssls/2", Some(ssl(client)));
        assert_eq!(s, 400, "{v}");
        let msg = v["error_msg"].as_str().unwrap();
        assert!(msg.contains(says), "{says:?} not in {msg:?}");
    };
    refused(json!({}), "property \"ca\" is required");
    refused(json!({"ca": "not pem"}), "\"client.ca\" validation failed");
    refused(
        json!({"ca": client_ca.pem, "depth": 99}),
        "\"client.depth\" validation failed",
    );
    refused(
        json!({"ca": client_ca.pem, "skip_mtls_uri_regex": ["("]}),
        "\"client.skip_mtls_uri_regex\" validation failed: invalid regex",
    );
    refused(json!({"ca": client_ca.pem, "verify": true}), "found verify");
    // The listener still serves what it did.
    assert_eq!(served(port, "api.test", &alice, "/g").unwrap().status, 200);
}

/// The SHA-256 of `der`, in lower-case hex.
fn ring_sha256(der: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, der)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// An SSL object's `ssl_protocols` replace the listener's for its names (APISIX: the object's
/// setting wins); the others keep the listener's.
#[test]
fn an_ssl_objects_protocols_replace_the_listeners() {
    let ca = Ca::new("listener CA");
    let app = TestUpstream::start("app");
    let port = free_port();
    let gw = gateway(port, &["ssl_protocols: TLSv1.3"]);
    gw.route("echo", json!({"uri": "/*"}), Some(&app));
    let (cert, key) = pair(&ca, &["old.test"]);
    put_ssl(
        &gw,
        "o",
        json!({"cert": cert, "key": key, "snis": ["old.test"], "ssl_protocols": ["TLSv1.2"]}),
    );
    let (cert, key) = pair(&ca, &["new.test"]);
    put_ssl(
        &gw,
        "n",
        json!({"cert": cert, "key": key, "snis": ["new.test"]}),
    );
    let tls13 = client_config(&ca, &[&rustls::version::TLS13]);
    let tls12 = client_config(&ca, &[&rustls::version::TLS12]);
    assert_eq!(get(port, "old.test", &tls12, "/").unwrap().status, 200);
    assert!(get(port, "old.test", &tls13, "/").is_err());
    assert_eq!(get(port, "new.test", &tls13, "/").unwrap().status, 200);
    assert!(get(port, "new.test", &tls12, "/").is_err());
}

/// A client's receive buffer made small, so that a client that stops reading fills the path
/// quickly.
fn small_rcvbuf(s: &TcpStream) {
    let _ = nix::sys::socket::setsockopt(s, nix::sys::socket::sockopt::RcvBuf, &4096);
}

/// The timeouts hold over TLS as over plain HTTP: a client that stops taking its answer is cut
/// after `send_timeout` (TLS takes small frames whole, and the flush after each is what
/// waits), and the handshake counts in the first head's `client_header_timeout`.
#[test]
fn timeouts_hold_over_tls() {
    let ca = Ca::new("listener CA");
    let up = TestUpstream::start("u");
    let port = free_port();
    let http = ["send_timeout: 1s", "client_header_timeout: 2s"];
    let gw = gateway_with(port, &[], &http, 1);
    gw.route("1", json!({"uri": "/*"}), Some(&up));
    let (cert, key) = pair(&ca, &["a.test"]);
    put_ssl(
        &gw,
        "1",
        json!({"cert": cert, "key": key, "snis": ["a.test"]}),
    );
    let config = client_config(&ca, rustls::DEFAULT_VERSIONS);
    let cuts = || common::log_lines(&gw.error_log(), "(send_timeout)").len();
    // 1 KiB every 2 ms for far longer than the test.
    let req = b"GET /stream/1000000 HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n";
    let tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
    small_rcvbuf(&tcp);
    let mut tls = handshake(tcp, "a.test", &config).unwrap();
    tls.write_all(req).unwrap();
    tls.flush().unwrap();
    eventually(
        Duration::from_secs(30),
        "the TLS client cut after send_timeout",
        || cuts() == 1,
    );
    drop(tls);

    // A head finished 3 s after the connection began, the handshake taking 1.5 s of them.
    let start = std::time::Instant::now();
    let tcp = TcpStream::connect(("127.0.0.1", port)).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let mut tls = handshake(tcp, "a.test", &config).unwrap();
    tls.write_all(b"GET /slow HTTP/1.1\r\n").unwrap();
    tls.flush().unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let _ = tls.write_all(b"Host: a.test\r\n\r\n");
    let _ = tls.flush();
    let r = read_response(&mut BufReader::new(&mut tls), false);
    assert!(
        !matches!(&r, Ok(r) if r.status == 200),
        "a head finished {:?} after the connection began was served",
        start.elapsed()
    );
}

#[test]
fn ssl_objects_are_checked_when_written() {
    let ca = Ca::new("listener CA");
    let port = free_port();
    let gw = gateway(port, &[]);
    let (cert, key) = pair(&ca, &["a.test"]);
    let (_, other_key) = pair(&ca, &["b.test"]);
    let refused = |body: Value, says: &str| {
        let (s, v) = gw.admin("PUT", "/apisix/admin/ssls/x", Some(body.clone()));
        let msg = v["error_msg"].as_str().unwrap_or_default().to_string();
        assert_eq!(s, 400, "{v}");
        assert!(msg.contains(says), "{says:?} not in {msg:?}");
    };
    refused(
        json!({"cert": cert, "key": other_key, "snis": ["a.test"]}),
        "\"key\" validation failed: cannot be used with its certificate",
    );
    refused(
        json!({"cert": "not pem", "key": key, "snis": ["a.test"]}),
        "\"cert\" validation failed",
    );
    refused(json!({"cert": cert, "key": key}), "\"snis\" is required");
    refused(
        json!({"cert": cert, "key": key, "snis": ["a b.test"]}),
        "is not a host name",
    );
    refused(
        json!({"cert": cert, "key": key, "snis": ["a.test"], "type": "client"}),
        "client SSL objects are not supported",
    );
    refused(
        json!({"cert": cert, "key": key, "snis": ["a.test"], "ssl_protocols": ["TLSv1.1"]}),
        "RFC 8996",
    );
    refused(
        json!({"cert": cert, "key": key, "snis": ["a.test"], "certs": [cert]}),
        "one key for each of certs",
    );
    // APISIX 2's path and single `sni` are taken; the object is listed under ssls.
    let (s, v) = gw.admin(
        "PUT",
        "/apisix/admin/ssl/old",
        Some(json!({"cert": cert, "key": key, "sni": "a.test"})),
    );
    assert!(s == 200 || s == 201, "{v}");
    let (_, list) = gw.admin("GET", "/apisix/admin/ssls", None);
    assert_eq!(list["total"], 1, "{list}");
    assert_eq!(list["list"][0]["value"]["sni"], "a.test");
    gw.wait_propagated();
    let config = client_config(&ca, rustls::DEFAULT_VERSIONS);
    assert!(connect(port, "a.test", &config).is_ok());
}

#[test]
fn the_listeners_settings_are_checked_by_test_and_start() {
    let port = free_port();
    let check = |ssl: &str| {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("config.yaml");
        let yaml = format!("apisix:\n  node_listen: [{port}]\n  ssl:\n{ssl}");
        std::fs::write(&conf, yaml).unwrap();
        let out = std::process::Command::new(common::bin())
            .args(["test", "-p"])
            .arg(dir.path())
            .arg("-c")
            .arg(&conf)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text)
    };
    let (ok, text) = check(&format!("    enable: true\n    listen: [{port}]\n"));
    assert!(!ok && text.contains("both want port"), "{text}");
    let (ok, text) = check("    listen:\n      - port: 9443\n        enable_http3: true\n");
    assert!(!ok && text.contains("HTTP/3"), "{text}");
    let (ok, text) = check("    enable: true\n    ssl_protocols: TLSv1 TLSv1.1\n");
    assert!(!ok && text.contains("RFC 8996"), "{text}");
    let (ok, text) = check("    enable: true\n    ssl_ciphers: HIGH\n    fallback_sni: a.test\n");
    assert!(ok && text.contains("ssl_ciphers"), "{text}");
}
