//! Cluster mode: a real etcd (Debian's `etcd-server`) and two wasmgate nodes on loopback that
//! share their routes through it, APISIX-written etcd data, and an etcd outage.
//!
//! Without an `etcd` binary these tests say so and pass, unless `WASMGATE_REQUIRE_ETCD=1`
//! (set by `.ci/run`, which installs etcd-server) makes that a failure.

mod common;

use common::{eventually, free_port, http, Gateway, Setup, TestUpstream, KEY};
use serde_json::{json, Value};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A single-member etcd in a temporary directory.
struct Etcd {
    dir: tempfile::TempDir,
    port: u16,
    peer: u16,
    child: Option<Child>,
    /// With authentication on: the root user's token (`call` signs in again when it dies).
    root: std::sync::Mutex<Option<String>>,
}

impl Etcd {
    /// None when no etcd binary is installed (and it is not required).
    fn start() -> Option<Etcd> {
        let found = Command::new("etcd")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_ok();
        if !found {
            assert!(
                std::env::var("WASMGATE_REQUIRE_ETCD").is_err(),
                "WASMGATE_REQUIRE_ETCD is set but no etcd binary is installed (apt-get install etcd-server)"
            );
            eprintln!("no etcd binary (apt-get install etcd-server): cluster tests skipped");
            return None;
        }
        let mut e = Etcd {
            dir: tempfile::tempdir().unwrap(),
            port: free_port(),
            peer: free_port(),
            child: None,
            root: Default::default(),
        };
        e.run();
        Some(e)
    }

    fn run(&mut self) {
        let client = format!("http://127.0.0.1:{}", self.port);
        let peer = format!("http://127.0.0.1:{}", self.peer);
        let child = Command::new("etcd")
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &format!("default={peer}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        // Any answer will do: with authentication on, an unsigned read is refused.
        eventually(Duration::from_secs(20), "etcd answers", || {
            self.send("/v3/kv/range", &json!({"key": b64("/")}), None)
                .is_ok()
        });
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn send(
        &self,
        path: &str,
        body: &Value,
        token: Option<&str>,
    ) -> Result<common::client::Resp, String> {
        let mut headers = vec![("content-type", "application/json")];
        headers.extend(token.map(|t| ("authorization", t)));
        common::client::request(
            "POST",
            &format!("http://127.0.0.1:{}{path}", self.port),
            &headers,
            Some(body.to_string().as_bytes()),
        )
    }

    /// One call, as root once authentication is on.
    fn call(&self, path: &str, body: Value) -> Result<Value, String> {
        let token = self.root.lock().unwrap().clone();
        let mut r = self.send(path, &body, token.as_deref())?;
        if r.status == 401 && token.is_some() {
            // A restarted etcd forgot its tokens.
            let token = self.sign_in("root", "rootpw");
            r = self.send(path, &body, Some(&token))?;
            *self.root.lock().unwrap() = Some(token);
        }
        if r.status != 200 {
            return Err(format!("{}: {}", r.status, r.text()));
        }
        serde_json::from_slice(&r.body).map_err(|e| e.to_string())
    }

    fn sign_in(&self, user: &str, password: &str) -> String {
        let r = self
            .send(
                "/v3/auth/authenticate",
                &json!({"name": user, "password": password}),
                None,
            )
            .unwrap();
        let v: Value = serde_json::from_slice(&r.body).unwrap();
        v["token"].as_str().unwrap().to_string()
    }

    /// Turns authentication on with users `root` (rootpw), `gw` (gwpw: reads and writes
    /// `/apisix/`) and `ro` (ropw: only reads it); `call` goes on as root.
    fn enable_auth(&self) {
        let prefix = json!({"key": b64("/apisix/"), "range_end": b64("/apisix0")});
        let perm = |t: &str| {
            let mut p = prefix.clone();
            p["permType"] = json!(t);
            p
        };
        for (path, body) in [
            ("/v3/auth/role/add", json!({"name": "root"})),
            ("/v3/auth/role/add", json!({"name": "gw"})),
            ("/v3/auth/role/add", json!({"name": "ro"})),
            (
                "/v3/auth/role/grant",
                json!({"name": "gw", "perm": perm("READWRITE")}),
            ),
            (
                "/v3/auth/role/grant",
                json!({"name": "ro", "perm": perm("READ")}),
            ),
        ] {
            self.call(path, body).unwrap();
        }
        for (user, password) in [("root", "rootpw"), ("gw", "gwpw"), ("ro", "ropw")] {
            self.call(
                "/v3/auth/user/add",
                json!({"name": user, "password": password}),
            )
            .unwrap();
            self.call("/v3/auth/user/grant", json!({"user": user, "role": user}))
                .unwrap();
        }
        // A user with no role: it signs in and may read nothing.
        self.call(
            "/v3/auth/user/add",
            json!({"name": "none", "password": "nonepw"}),
        )
        .unwrap();
        self.call("/v3/auth/enable", json!({})).unwrap();
        *self.root.lock().unwrap() = Some(self.sign_in("root", "rootpw"));
    }

    /// Writes a raw value, as APISIX (or etcdctl) would.
    fn put(&self, key: &str, value: &str) {
        self.call("/v3/kv/put", json!({"key": b64(key), "value": b64(value)}))
            .unwrap();
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}

fn b64(s: &str) -> String {
    const T: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let b = s.as_bytes();
    let mut out = String::new();
    for c in b.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A node whose objects live in `etcd`.
fn node(etcd: &Etcd) -> Gateway {
    Gateway::start_with(node_setup(etcd, ""))
}

/// A node's set-up, with `etcd_extra` (whole lines) under `deployment.etcd`.
fn node_setup(etcd: &Etcd, etcd_extra: &str) -> Setup {
    node_setup_at(&etcd.endpoint(), etcd_extra)
}

/// A node's set-up with etcd at `endpoint`.
fn node_setup_at(endpoint: &str, etcd_extra: &str) -> Setup {
    Setup {
        raw_yaml: Some(format!(
            "apisix:\n  node_listen: [{{ip: 127.0.0.1, port: {{proxy}}}}]\n\
             deployment:\n  admin:\n    admin_key: [{{name: admin, key: {KEY}}}]\n    admin_listen: {{ip: 127.0.0.1, port: {{admin}}}}\n\
             \x20 etcd:\n    host: [\"{endpoint}\"]\n    prefix: /apisix\n    timeout: 5\n{etcd_extra}\
             nginx_config:\n  worker_processes: 1\n"
        )),
        workers: 1,
        ..Setup::default()
    }
}

/// Starts a node with `setup` that must fail to start; what it said on standard error.
fn failed_start(setup: &Setup) -> String {
    let dir = tempfile::tempdir().unwrap();
    let yaml = (setup.raw_yaml.clone().unwrap())
        .replace("{proxy}", &free_port().to_string())
        .replace("{admin}", &free_port().to_string());
    std::fs::create_dir_all(dir.path().join("conf")).unwrap();
    std::fs::write(dir.path().join("conf/config.yaml"), yaml).unwrap();
    let out = Command::new(common::bin())
        .args(["start", "--foreground", "-p"])
        .arg(dir.path())
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{said}");
    said
}

/// A TCP relay to etcd that can stop passing bytes on the connections it holds — as a NAT or
/// a load balancer that forgot them without closing them — while new ones go through.
struct Relay {
    port: u16,
    cut_before: std::sync::Arc<std::sync::Mutex<Option<Instant>>>,
}

impl Relay {
    fn start(to: u16) -> Relay {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut_before = std::sync::Arc::new(std::sync::Mutex::new(None::<Instant>));
        let cut = cut_before.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = std::net::TcpStream::connect(("127.0.0.1", to)) else {
                    continue;
                };
                let born = Instant::now();
                let pairs = [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ];
                for (mut from, mut into) in pairs {
                    let cut = cut.clone();
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 16384];
                        while let Ok(n @ 1..) = from.read(&mut buf) {
                            let forgotten = cut.lock().unwrap().is_some_and(|t| born < t);
                            if !forgotten && into.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = into.shutdown(std::net::Shutdown::Write);
                    });
                }
            }
        });
        Relay { port, cut_before }
    }

    /// From now on, the connections open so far pass nothing (and stay open).
    fn forget_open_connections(&self) {
        *self.cut_before.lock().unwrap() = Some(Instant::now());
    }
}

/// The lines of an etcd user and password.
fn signed_in(user: &str, password: &str) -> String {
    format!("    user: {user}\n    password: {password}\n")
}

/// A route `/{id}` to `app`, written through `gw`'s Admin API: its status and answer.
fn put_route(gw: &Gateway, id: &str, app: &TestUpstream) -> (u16, Value) {
    gw.admin(
        "PUT",
        &format!("/apisix/admin/routes/{id}"),
        Some(json!({"uri": format!("/{id}"), "upstream": {"nodes": {app.addr(): 1}}})),
    )
}

fn status_of(gw: &Gateway, path: &str) -> u16 {
    http("GET", &gw.url(path), &[], None).status
}

/// `startup_retry` (APISIX's key): a start tries etcd that many times, a second apart, so a
/// gateway started along with its etcd (at boot) waits for it; one whose etcd does not come
/// stops, saying how many attempts it made.
#[test]
fn a_start_waits_for_etcd_as_startup_retry_says() {
    let Some(mut etcd) = Etcd::start() else {
        return;
    };
    let app = TestUpstream::start("app");
    let first = node(&etcd);
    let (s, v) = put_route(&first, "r", &app);
    assert_eq!(s, 201, "{v}");
    drop(first);
    etcd.kill();

    // etcd down for good: two attempts, then the start fails and says why.
    let started = Instant::now();
    let said = failed_start(&node_setup(&etcd, "    startup_retry: 2\n"));
    assert!(
        said.contains("trying again in 1 s (attempt 1 of 2"),
        "{said}"
    );
    assert!(
        said.contains("cannot read the configuration from etcd")
            && said.contains("2 attempts of 2"),
        "{said}"
    );
    assert!(started.elapsed() >= Duration::from_secs(1), "{said}");

    // etcd up 2 s after the start: the gateway waits for it and serves what it holds.
    let endpoint = etcd.endpoint();
    let later = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(2));
        etcd.run();
        etcd
    });
    let gw = Gateway::start_with(node_setup_at(&endpoint, "    startup_retry: 30\n"));
    let _etcd = later.join().unwrap();
    assert_eq!(status_of(&gw, "/r"), 200);
    assert!(
        gw.stderr().contains("trying again in 1 s"),
        "{}",
        gw.stderr()
    );
}

/// A route written on one node is served by both; a change on the other node reaches the
/// first; a delete on either ends it everywhere; both list the same objects with etcd's
/// revisions as indexes.
/// A node on a fresh prefix whose config.yaml leaves a key to generate keeps it in its data
/// directory, which it makes (private) even though its objects live in etcd.
#[test]
fn a_node_on_a_fresh_prefix_generates_its_keys() {
    let Some(etcd) = Etcd::start() else { return };
    let mut setup = node_setup(&etcd, "");
    let yaml = setup.raw_yaml.take().unwrap().replace(
        &format!("admin_key: [{{name: admin, key: {KEY}}}]"),
        &format!(
            "admin_key: [{{name: admin, key: {KEY}}}, {{name: viewer, key: \"\", role: viewer}}]"
        ),
    );
    assert!(yaml.contains("role: viewer"), "{yaml}");
    setup.raw_yaml = Some(yaml);
    let gw = Gateway::start_with(setup);
    let keys = gw.prefix().join("data/admin_key");
    let stored: serde_json::Value = serde_json::from_slice(&std::fs::read(&keys).unwrap()).unwrap();
    assert!(
        stored["viewer"].as_str().is_some_and(|k| !k.is_empty()),
        "{stored}"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(gw.prefix().join("data"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "data/ is private: {mode:o}");
}

#[test]
fn two_nodes_share_their_configuration_through_etcd() {
    let Some(etcd) = Etcd::start() else { return };
    let app = TestUpstream::start("app");
    let a = node(&etcd);
    let b = node(&etcd);
    a.route("shop", json!({"uri": "/shop/*"}), Some(&app));
    assert_eq!(status_of(&a, "/shop/x"), 200);
    eventually(Duration::from_secs(5), "node b serves the route", || {
        status_of(&b, "/shop/x") == 200
    });

    let (s, v) = b.admin(
        "PATCH",
        "/apisix/admin/routes/shop",
        Some(json!({"uri": "/store/*"})),
    );
    assert_eq!(s, 200, "{v}");
    eventually(
        Duration::from_secs(5),
        "node a serves the patched route",
        || status_of(&a, "/store/x") == 200 && status_of(&a, "/shop/x") == 404,
    );
    let (_, la) = a.admin("GET", "/apisix/admin/routes", None);
    let (_, lb) = b.admin("GET", "/apisix/admin/routes", None);
    assert_eq!(la, lb);
    assert_eq!(la["total"], 1);
    let idx = &la["list"][0];
    assert!(
        idx["modifiedIndex"].as_u64() > idx["createdIndex"].as_u64(),
        "{idx}"
    );

    let (s, v) = a.admin("DELETE", "/apisix/admin/routes/shop", None);
    assert_eq!(s, 200, "{v}");
    eventually(Duration::from_secs(5), "node b dropped the route", || {
        status_of(&b, "/store/x") == 404
    });
    let (s, _) = b.admin("GET", "/apisix/admin/routes/shop", None);
    assert_eq!(s, 404);
}

/// Keys and values as APISIX writes them in etcd are served: an upstream and a route that
/// refers to it, next to a directory marker, a resource kind wasmgate does not serve, and an
/// invalid route (left out, with an error-log line naming the key).
#[test]
fn apisix_written_etcd_data_is_served() {
    let Some(etcd) = Etcd::start() else { return };
    let app = TestUpstream::start("app");
    etcd.put("/apisix/routes", "init_dir");
    etcd.put(
        "/apisix/upstreams/1",
        &json!({"id": "1", "type": "roundrobin", "nodes": {app.addr(): 1}}).to_string(),
    );
    etcd.put(
        "/apisix/routes/1",
        &json!({"id": "1", "uri": "/legacy/*", "upstream_id": "1", "create_time": 1700000000, "update_time": 1700000000}).to_string(),
    );
    // Plugin configs and routes that take them: one this node can serve (these nodes declare
    // no wasm plugins), one naming an APISIX plugin it does not have, refused — its route
    // answers 503 rather than run without it.
    etcd.put("/apisix/plugin_configs/pc", r#"{"id":"pc","plugins":{}}"#);
    etcd.put(
        "/apisix/plugin_configs/lua",
        r#"{"id":"lua","plugins":{"limit-count":{"count":2,"time_window":60}}}"#,
    );
    for (id, path, config) in [("2", "/shared/*", "pc"), ("3", "/lua/*", "lua")] {
        etcd.put(
            &format!("/apisix/routes/{id}"),
            &json!({"id": id, "uri": path, "upstream_id": "1", "plugin_config_id": config})
                .to_string(),
        );
    }
    etcd.put("/apisix/consumers/jack", r#"{"username":"jack"}"#);
    etcd.put("/apisix/routes/broken", r#"{"upstream_id":"1"}"#);
    // An SSL object as APISIX 3 stores it: its key encrypted with the default keyring.
    let ca = common::tls::Ca::new("etcd CA");
    let (cert, key) = ca.issue("api.test", &["api.test"]);
    let sealed = wasmgate_shared::keyring::Keyring::apisix_default()
        .seal(&key.serialize_pem())
        .unwrap();
    etcd.put(
        "/apisix/ssls/1",
        &json!({"id": "1", "cert": cert.pem(), "key": sealed, "snis": ["api.test"]}).to_string(),
    );
    let gw = node(&etcd);
    let (s, v) = gw.admin("GET", "/apisix/admin/ssls/1", None);
    assert_eq!((s, &v["value"]["key"]), (200, &json!(sealed)), "{v}");
    let r = http("GET", &gw.url("/legacy/a"), &[], None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-upstream"), Some("app"));
    let (s, v) = gw.admin("GET", "/apisix/admin/routes/1", None);
    assert_eq!(s, 200);
    assert_eq!(v["value"]["create_time"], 1700000000);
    let r = http("GET", &gw.url("/shared/a"), &[], None);
    assert_eq!(
        (r.status, r.header("x-upstream")),
        (200, Some("app")),
        "{}",
        r.text()
    );
    assert_eq!(http("GET", &gw.url("/lua/a"), &[], None).status, 503);
    let (_, list) = gw.admin("GET", "/apisix/admin/routes", None);
    assert_eq!(list["total"], 3, "{list}");
    // Read at start, before the error log is open: the line is on the master's stderr.
    let logs = gw.stderr() + &gw.error_log();
    assert!(logs.contains("/apisix/routes/broken refused"), "{logs}");
    assert!(
        logs.contains("/apisix/plugin_configs/lua refused: unknown plugin [limit-count]"),
        "{logs}"
    );
}

/// etcd goes away: the node keeps serving its last configuration, says so in its status and
/// metrics, and refuses writes with 503; etcd comes back: the node resynchronises, and writes
/// made on another node reach it again.
#[test]
fn an_etcd_outage_keeps_the_last_configuration_serving() {
    let Some(mut etcd) = Etcd::start() else {
        return;
    };
    let app = TestUpstream::start("app");
    let a = node(&etcd);
    let b = node(&etcd);
    a.route("r", json!({"uri": "/r"}), Some(&app));
    eventually(Duration::from_secs(5), "node b serves r", || {
        status_of(&b, "/r") == 200
    });

    etcd.kill();
    let down = Instant::now();
    eventually(Duration::from_secs(10), "node a reports etcd down", || {
        a.status()["store"]["reachable"] == false
    });
    eprintln!("etcd loss noticed after {:?}", down.elapsed());
    for _ in 0..20 {
        assert_eq!(status_of(&a, "/r"), 200);
        assert_eq!(status_of(&b, "/r"), 200);
    }
    let (s, v) = put_route(&a, "r2", &app);
    assert_eq!(s, 503, "{v}");
    assert!(
        v["error_msg"]
            .as_str()
            .unwrap()
            .contains("etcd unreachable"),
        "{v}"
    );
    let metrics = http(
        "GET",
        &a.admin_url("/wasmgate/metrics"),
        &[("X-API-KEY", KEY)],
        None,
    )
    .text();
    assert!(metrics.contains("apisix_etcd_reachable 0"), "{metrics}");

    etcd.run();
    eventually(Duration::from_secs(15), "both nodes see etcd again", || {
        a.status()["store"]["reachable"] == true && b.status()["store"]["reachable"] == true
    });
    let (s, v) = put_route(&b, "r2", &app);
    assert_eq!(s, 201, "{v}");
    eventually(
        Duration::from_secs(10),
        "node a serves the new route",
        || status_of(&a, "/r2") == 200,
    );
    assert_eq!(status_of(&a, "/r"), 200);
}

/// What an operator does to etcd behind the gateway's back, and what the gateway makes of it:
/// an object overwritten with a value it refuses (dropped, as a full read would drop it, so
/// every node agrees), a refused key deleted through the Admin API, a key whose id it cannot
/// take (said in the log), writes to one object at once through one node (taken one after
/// the other, no 409), a reload that adds the plugin an object wanted, an etcd wiped and
/// started again (its revisions start again too), and an etcd that turns authentication on.
#[test]
fn etcd_changed_behind_the_gateways_back() {
    let Some(mut etcd) = Etcd::start() else {
        return;
    };
    let app = TestUpstream::start("app");
    let a = node(&etcd);
    let route = |uri: &str| {
        json!({"uri": uri, "upstream": {"type": "roundrobin", "nodes": {app.addr(): 1}}})
            .to_string()
    };
    etcd.put("/apisix/routes/good", &route("/good"));
    eventually(Duration::from_secs(10), "good served", || {
        status_of(&a, "/good") == 200
    });

    // Overwritten with what the gateway refuses: no longer served, and said.
    etcd.put("/apisix/routes/good", "{\"uri\": \"/good\", ");
    eventually(
        Duration::from_secs(10),
        "the refused version drops good",
        || status_of(&a, "/good") == 404,
    );
    assert!(
        a.error_log().contains("/apisix/routes/good is not JSON")
            && a.error_log()
                .contains("its previous version is no longer served"),
        "{}",
        a.error_log()
    );
    // The Admin API deletes the refused key from etcd, as APISIX's does.
    let (s, v) = a.admin("DELETE", "/apisix/admin/routes/good", None);
    assert_eq!(s, 200, "{v}");
    let left = etcd
        .call("/v3/kv/range", json!({"key": b64("/apisix/routes/good")}))
        .unwrap();
    assert!(left["kvs"].is_null(), "{left}");

    // The key names the object, whatever `id` its value holds (as in APISIX).
    let mut named = serde_json::from_str::<Value>(&route("/named")).unwrap();
    named["id"] = json!("999");
    etcd.put("/apisix/routes/405", &named.to_string());
    eventually(Duration::from_secs(10), "405 served", || {
        status_of(&a, "/named") == 200
    });
    let (_, v) = a.admin("GET", "/apisix/admin/routes/405", None);
    assert_eq!(v["value"]["id"], "405", "{v}");

    // An id the gateway cannot take is left out with a line saying why.
    etcd.put("/apisix/routes/a b", &route("/ab"));
    eventually(Duration::from_secs(10), "the bad id is logged", || {
        a.error_log()
            .contains("/apisix/routes/a b left out: \"a b\" is not a route id")
    });

    // Writes to one object through one node go one after the other.
    a.route("pc", json!({"uri": "/pc"}), Some(&app));
    let writers: Vec<_> = (0..8)
        .map(|i| {
            let url = a.admin_url("/apisix/admin/routes/pc");
            std::thread::spawn(move || {
                let body = json!({"desc": format!("writer {i}")}).to_string();
                http("PATCH", &url, &[("X-API-KEY", KEY)], Some(body.as_bytes())).status
            })
        })
        .collect();
    let statuses: Vec<u16> = writers.into_iter().map(|w| w.join().unwrap()).collect();
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");

    // An object refused for a plugin config.yaml lacks is served once a reload adds it.
    let with_plugin = json!({"uri": "/plug", "plugins": {"hdr": {"conf": {"response_set": {"x-from": "hdr"}}}},
                             "upstream": {"type": "roundrobin", "nodes": {app.addr(): 1}}});
    etcd.put("/apisix/routes/plug", &with_plugin.to_string());
    eventually(Duration::from_secs(10), "plug refused", || {
        a.error_log().contains("unknown plugin [hdr]")
    });
    let mut yaml = std::fs::read_to_string(a.config_path()).unwrap();
    yaml.push_str(&format!(
        "wasm:\n  plugins:\n    - {{name: hdr, priority: 1, file: {}}}\n",
        common::fixture("header_rewrite")
    ));
    std::fs::write(a.config_path(), yaml).unwrap();
    a.signal(nix::sys::signal::Signal::SIGHUP);
    eventually(
        Duration::from_secs(20),
        "plug served after the reload",
        || http("GET", &a.url("/plug"), &[], None).header("x-from") == Some("hdr"),
    );
    // An object served after a reload is no sign of another etcd history.
    assert!(
        !a.error_log().contains("an etcd wiped"),
        "{}",
        a.error_log()
    );

    // etcd wiped: its revisions start again below the ones the gateway saw. What the new
    // etcd holds is served, and nothing of the old one.
    for i in 0..30 {
        etcd.put("/apisix/routes/old", &route(&format!("/old{}", i % 2)));
    }
    eventually(Duration::from_secs(10), "old served", || {
        status_of(&a, "/old1") == 200
    });
    etcd.kill();
    std::fs::remove_dir_all(etcd.dir.path().join("data")).unwrap();
    etcd.run();
    etcd.put("/apisix/routes/fresh", &route("/fresh"));
    eventually(
        Duration::from_secs(20),
        "the new etcd's route served",
        || status_of(&a, "/fresh") == 200 && status_of(&a, "/old1") == 404,
    );
    assert!(
        a.error_log().contains("its revision went back from"),
        "{}",
        a.error_log()
    );
    let (s, v) = a.admin("GET", "/apisix/admin/routes", None);
    assert_eq!((s, v["total"].as_u64()), (200, Some(1)), "{v}");

    // Wiped again while the master could not see it (stopped, as a host that hangs), and
    // filled until its revisions reach the old ones: a route of the same id and revision
    // with other content, and one last changed before the revision known. Another history,
    // though the revision did not go back.
    etcd.put("/apisix/routes/same", &route("/same-a"));
    eventually(Duration::from_secs(10), "same-a served", || {
        status_of(&a, "/same-a") == 200
    });
    let master = nix::unistd::Pid::from_raw(a.master_pid());
    nix::sys::signal::kill(master, nix::sys::signal::Signal::SIGSTOP).unwrap();
    etcd.kill();
    std::fs::remove_dir_all(etcd.dir.path().join("data")).unwrap();
    etcd.run();
    etcd.put("/apisix/routes/pad", &route("/pad"));
    etcd.put("/apisix/routes/same", &route("/same-b"));
    nix::sys::signal::kill(master, nix::sys::signal::Signal::SIGCONT).unwrap();
    eventually(Duration::from_secs(20), "the other history served", || {
        status_of(&a, "/same-b") == 200
            && status_of(&a, "/same-a") == 404
            && status_of(&a, "/fresh") == 404
    });
    assert!(
        a.error_log().contains("is not what was read at revision"),
        "{}",
        a.error_log()
    );

    // A value emptied (or APISIX's init_dir written over it): no object any more.
    etcd.put("/apisix/routes/pad", "init_dir");
    eventually(Duration::from_secs(10), "pad dropped", || {
        status_of(&a, "/pad") == 404
    });
    assert!(a
        .error_log()
        .contains("/apisix/routes/pad holds no object any more"));

    // A refused upstream that a route names is still in use: DELETE says so, as APISIX's.
    etcd.put(
        "/apisix/upstreams/hc",
        &json!({"nodes": {app.addr(): 1}, "checks": {"active": {"http_path": "/"}}}).to_string(),
    );
    etcd.put(
        "/apisix/routes/uses-hc",
        &json!({"uri": "/uses-hc", "upstream_id": "hc"}).to_string(),
    );
    eventually(Duration::from_secs(10), "uses-hc read", || {
        a.admin("GET", "/apisix/admin/routes/uses-hc", None).0 == 200
    });
    let (s, v) = a.admin("DELETE", "/apisix/admin/upstreams/hc", None);
    assert_eq!(s, 400, "{v}");
    assert!(v.to_string().contains("is still using it"), "{v}");

    // Authentication turned on: etcd answers, but not this node. Not reachable, and why.
    for (path, body) in [
        ("/v3/auth/role/add", json!({"name": "root"})),
        (
            "/v3/auth/user/add",
            json!({"name": "root", "password": "pw"}),
        ),
        (
            "/v3/auth/user/grant",
            json!({"user": "root", "role": "root"}),
        ),
        ("/v3/auth/enable", json!({})),
    ] {
        etcd.call(path, body).unwrap();
    }
    eventually(Duration::from_secs(20), "etcd reported unreachable", || {
        a.status()["store"]["reachable"] == false
    });
    let logged = Instant::now() + Duration::from_secs(10);
    while !a.error_log().contains("user name is empty") && Instant::now() < logged {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        a.error_log()
            .contains("user name is empty (etcd has authentication on: set deployment.etcd.user and password)"),
        "{}",
        a.error_log()
    );
    assert_eq!(status_of(&a, "/same-b"), 200);
    // Writes are refused at once, not after etcd's timeout.
    let asked = Instant::now();
    let (s, v) = put_route(&a, "late", &app);
    assert_eq!(s, 503, "{v}");
    assert!(
        v["error_msg"]
            .as_str()
            .unwrap()
            .contains("etcd unreachable or refusing"),
        "{v}"
    );
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "{:?}",
        asked.elapsed()
    );
    // `wasmgate status` says so too.
    let out = Command::new(common::bin())
        .args(["status", "-p"])
        .arg(a.prefix())
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.contains(&format!(
            "store etcd {} prefix /apisix  UNREACHABLE",
            etcd.endpoint()
        )),
        "{out}"
    );
}

/// etcd with authentication on: a node signs in with `deployment.etcd.user` and `password`
/// (also when etcd turns authentication on while it runs), serves what etcd holds and writes
/// through it; a wrong password stops the start with etcd's
/// reason; an etcd restarted (its tokens gone) is signed in to again; a user that may only
/// read gets writes refused with the reason; a password changed in etcd is said in the log
/// and taken from config.yaml by a reload.
#[test]
fn etcd_with_authentication() {
    let Some(mut etcd) = Etcd::start() else {
        return;
    };
    let app = TestUpstream::start("app");
    // A node with a user, started while etcd has authentication off: it goes in without a
    // token, and signs in once etcd turns authentication on.
    let mut a = Gateway::start_with(node_setup(&etcd, &signed_in("gw", "gwpw")));
    etcd.enable_auth();
    let route = |uri: &str| json!({"uri": uri, "upstream": {"nodes": {app.addr(): 1}}}).to_string();
    etcd.put("/apisix/routes/before", &route("/before"));

    // The wrong password: the start stops, and says why.
    let err = failed_start(&node_setup(&etcd, &signed_in("gw", "wrong")));
    assert!(
        err.contains(r#"etcd refused user "gw": etcdserver: authentication failed, invalid user ID or password (deployment.etcd.user and password)"#),
        "{err}"
    );

    // The right one: served, and written through.
    eventually(Duration::from_secs(10), "node a serves /before", || {
        status_of(&a, "/before") == 200
    });
    // Quiet for longer than a health check's wait: the checks read where the user may read
    // (inside /apisix/, not the key /apisix), so etcd stays reachable.
    std::thread::sleep(Duration::from_millis(4500));
    assert_eq!(a.status()["store"]["reachable"], true);
    assert!(
        !a.error_log().contains("permission denied"),
        "{}",
        a.error_log()
    );
    let (s, v) = put_route(&a, "put-a", &app);
    assert_eq!(s, 201, "{v}");
    assert_eq!(status_of(&a, "/put-a"), 200);
    let stored = etcd
        .call("/v3/kv/range", json!({"key": b64("/apisix/routes/put-a")}))
        .unwrap();
    assert_eq!(stored["count"], "1", "{stored}");

    // etcd restarted: its simple tokens are gone; the node signs in again, watches again and
    // writes again.
    etcd.kill();
    etcd.run();
    etcd.put("/apisix/routes/after", &route("/after"));
    eventually(Duration::from_secs(20), "the node serves /after", || {
        status_of(&a, "/after") == 200
    });
    let (s, v) = put_route(&a, "put-b", &app);
    assert_eq!(s, 201, "{v}");

    // A reload with a password etcd refuses is refused, and the node keeps its user; so is
    // one with a user etcd lets sign in but not read, or with no user at all while etcd has
    // authentication on.
    let yaml = std::fs::read_to_string(a.config_path()).unwrap();
    let reload_with = |etcd_lines: &str| {
        let changed = yaml.replace(&signed_in("gw", "gwpw"), etcd_lines);
        assert_ne!(changed, yaml);
        std::fs::write(a.config_path(), changed).unwrap();
        let out = Command::new(common::bin())
            .args(["reload", "-p"])
            .arg(a.prefix())
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
        (out.status.success(), said.into_owned())
    };
    let (ok, said) = reload_with(&signed_in("gw", "nope"));
    assert!(
        !ok && said.contains(r#"etcd refused user "gw""#)
            && said.contains("the running user and password are kept"),
        "{said}"
    );
    let (ok, said) = reload_with(&signed_in("none", "nonepw"));
    assert!(!ok && said.contains("permission denied"), "{said}");
    let (ok, said) = reload_with("");
    assert!(
        !ok && said.contains("etcd refused this node without a user"),
        "{said}"
    );
    std::fs::write(a.config_path(), &yaml).unwrap();
    assert_eq!(a.status()["store"]["reachable"], true);
    let (s, v) = put_route(&a, "put-c", &app);
    assert_eq!(s, 201, "{v}");
    // Users added in etcd meanwhile do not get in the way of writes (a token etcd calls
    // "old" after such a change is renewed: `token_refused`'s unit test).
    for i in 0..3 {
        etcd.call(
            "/v3/auth/user/add",
            json!({"name": format!("extra{i}"), "password": "x"}),
        )
        .unwrap();
        let (s, v) = put_route(&a, &format!("put-d{i}"), &app);
        assert_eq!(s, 201, "{v}");
    }

    // A user that may only read: served, and writes refused with the reason.
    let r = Gateway::start_with(node_setup(&etcd, &signed_in("ro", "ropw")));
    assert_eq!(status_of(&r, "/after"), 200);
    let (s, v) = put_route(&r, "put-ro", &app);
    assert_eq!(s, 503, "{v}");
    let msg = v["error_msg"].as_str().unwrap();
    assert!(
        msg.contains("etcdserver: permission denied (the etcd user needs read and write permission on the keys under /apisix/)"),
        "{v}"
    );

    // The password changed in etcd: the node's token dies with it, and signing in again
    // fails; the log says so, and etcd is reported unreachable. A reload with the new one
    // brings it back.
    etcd.call(
        "/v3/auth/user/changepw",
        json!({"name": "gw", "password": "gwpw2"}),
    )
    .unwrap();
    eventually(
        Duration::from_secs(20),
        "node a reports etcd refusing",
        || a.status()["store"]["reachable"] == false,
    );
    let said = r#"etcd refused user "gw": etcdserver: authentication failed"#;
    eventually(Duration::from_secs(10), "the refusal logged", || {
        a.error_log().contains(said)
    });
    // The status says why, not only that etcd is away.
    let why = a.status()["store"]["error"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert!(why.contains(said), "{why}");
    let yaml = std::fs::read_to_string(a.config_path()).unwrap();
    std::fs::write(
        a.config_path(),
        yaml.replace("password: gwpw", "password: gwpw2"),
    )
    .unwrap();
    a.signal(nix::sys::signal::Signal::SIGHUP);
    eventually(Duration::from_secs(20), "node a back", || {
        a.status()["store"]["reachable"] == true
    });
    etcd.put("/apisix/routes/rotated", &route("/rotated"));
    eventually(Duration::from_secs(10), "the node serves /rotated", || {
        status_of(&a, "/rotated") == 200
    });
    // Where the objects live is not changed by a reload; who signs in is, without a warning.
    assert!(
        !a.error_log().contains("take effect at the next restart"),
        "{}",
        a.error_log()
    );
    a.wait_ready();
}

/// A watch whose connection stays open but passes nothing (a NAT or load balancer that forgot
/// it) is found by the health checks — a key under the prefix changed after what the copy has,
/// seen twice — and the node reads etcd again, rather than serve a stale copy as reachable.
#[test]
fn a_watch_that_stops_delivering_is_found() {
    let Some(etcd) = Etcd::start() else { return };
    let app = TestUpstream::start("app");
    let relay = Relay::start(etcd.port);
    let gw = Gateway::start_with(node_setup_at(
        &format!("http://127.0.0.1:{}", relay.port),
        "",
    ));
    let route = |uri: &str| json!({"uri": uri, "upstream": {"nodes": {app.addr(): 1}}}).to_string();
    etcd.put("/apisix/routes/before", &route("/before"));
    eventually(Duration::from_secs(10), "/before served", || {
        status_of(&gw, "/before") == 200
    });
    relay.forget_open_connections();
    etcd.put("/apisix/routes/unseen", &route("/unseen"));
    let asked = Instant::now();
    eventually(Duration::from_secs(30), "/unseen served", || {
        status_of(&gw, "/unseen") == 200
    });
    eprintln!("the stalled watch was replaced after {:?}", asked.elapsed());
    assert!(
        gw.error_log().contains("the watch delivers nothing"),
        "{}",
        gw.error_log()
    );
    // The new watch delivers.
    etcd.put("/apisix/routes/after", &route("/after"));
    eventually(Duration::from_secs(10), "/after served", || {
        status_of(&gw, "/after") == 200
    });
}
