//! The Admin API through a running gateway: APISIX 3.x shapes, status codes, errors, auth.

mod common;

use common::{admin, http, Gateway, TestUpstream, KEY, VIEWER_KEY};
use serde_json::{json, Value};
use std::time::Duration;

/// The seed's call, verbatim apart from the upstream address, then a proxied request.
#[test]
fn seed_route_is_created_and_proxied() {
    let up = TestUpstream::start("u1");
    let gw = Gateway::start();
    let body = json!({
        "uri": "/index.html",
        "plugins": {"wasm_log": {"conf": "blahblah"}},
        "upstream": {"type": "roundrobin", "nodes": {up.addr(): 1}}
    });
    let (status, v) = gw.admin("PUT", "/apisix/admin/routes/1", Some(body.clone()));
    assert_eq!(status, 201, "{v}");
    assert_eq!(v["key"], "/apisix/routes/1");
    assert_eq!(v["value"]["id"], "1");
    assert_eq!(v["value"]["uri"], "/index.html");
    assert!(v["value"]["create_time"].as_u64().unwrap() > 0);
    gw.wait_propagated();

    let r = http("GET", &gw.url("/index.html?a=1"), &[], None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-upstream"), Some("u1"));
    let echo = r.json();
    assert_eq!(echo["uri"], "/index.html?a=1");
    assert_eq!(echo["headers"]["x-real-ip"], "127.0.0.1");
    assert_eq!(echo["headers"]["x-forwarded-for"], "127.0.0.1");

    // Replacing is 200 and keeps create_time.
    let (status, v2) = gw.admin("PUT", "/apisix/admin/routes/1", Some(body.clone()));
    assert_eq!(status, 200);
    assert_eq!(v2["value"]["create_time"], v["value"]["create_time"]);
    // Timestamps the body gives are kept, as APISIX keeps them (a restored export keeps its
    // dates); a PATCH without update_time sets it to now.
    let mut dated = body.clone();
    dated["create_time"] = json!(1_600_000_000u64);
    dated["update_time"] = json!(1_600_000_001u64);
    let (status, v3) = gw.admin("PUT", "/apisix/admin/routes/dated", Some(dated));
    assert_eq!(status, 201, "{v3}");
    assert_eq!(v3["value"]["create_time"], 1_600_000_000u64);
    assert_eq!(v3["value"]["update_time"], 1_600_000_001u64);
    let (status, v4) = gw.admin(
        "PATCH",
        "/apisix/admin/routes/dated",
        Some(json!({"name": "d"})),
    );
    assert_eq!(status, 200, "{v4}");
    assert_eq!(v4["value"]["create_time"], 1_600_000_000u64);
    assert!(
        v4["value"]["update_time"].as_u64() > Some(1_700_000_000),
        "{v4}"
    );
    assert_eq!(
        gw.admin("DELETE", "/apisix/admin/routes/dated", None).0,
        200
    );

    let r = http("GET", &gw.url("/nothing-here"), &[], None);
    assert_eq!(r.status, 404);
    assert_eq!(r.json(), json!({"error_msg": "404 Route Not Found"}));
}

#[test]
fn crud_for_every_resource() {
    let up = TestUpstream::start("crud");
    let gw = Gateway::start();
    let upstream = json!({"type": "roundrobin", "nodes": {up.addr(): 1}});

    // upstreams: POST generates an id.
    let (s, v) = gw.admin("POST", "/apisix/admin/upstreams", Some(upstream.clone()));
    assert_eq!(s, 201, "{v}");
    let uid = v["value"]["id"].as_str().unwrap().to_string();
    assert_eq!(v["key"], format!("/apisix/upstreams/{uid}"));

    // services referencing it.
    let (s, v) = gw.admin(
        "PUT",
        "/apisix/admin/services/s1",
        Some(json!({"upstream_id": uid, "plugins": {"wasm_log": {"conf": {"level": "info"}}}})),
    );
    assert_eq!(s, 201, "{v}");

    // a route through the service; PUT to the collection with the id in the body.
    let (s, v) = gw.admin(
        "PUT",
        "/apisix/admin/routes",
        Some(json!({"id": "r1", "uri": "/svc/*", "service_id": "s1"})),
    );
    assert_eq!(s, 201, "{v}");

    // global rules.
    let (s, v) = gw.admin(
        "PUT",
        "/apisix/admin/global_rules/g1",
        Some(json!({"plugins": {"wasm_log": {"conf": "x"}}})),
    );
    assert_eq!(s, 201, "{v}");

    gw.wait_propagated();
    let r = http("GET", &gw.url("/svc/a"), &[], None);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-upstream"), Some("crud"));

    // GET one and list shapes.
    let (s, v) = gw.admin("GET", "/apisix/admin/routes/r1", None);
    assert_eq!(s, 200);
    assert_eq!(v["key"], "/apisix/routes/r1");
    assert!(v["createdIndex"].as_u64().is_some() && v["modifiedIndex"].as_u64().is_some());
    let (s, v) = gw.admin("GET", "/apisix/admin/services", None);
    assert_eq!(s, 200);
    assert_eq!(v["total"], 1);
    assert_eq!(v["list"][0]["value"]["id"], "s1");
    let (_, v) = gw.admin("GET", "/apisix/admin/global_rules", None);
    assert_eq!(v["total"], 1);

    // PATCH merges; PATCH of a sub path replaces one field.
    let (s, v) = gw.admin(
        "PATCH",
        "/apisix/admin/routes/r1",
        Some(json!({"methods": ["GET"], "name": "patched"})),
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["value"]["uri"], "/svc/*");
    assert_eq!(v["value"]["name"], "patched");
    let (s, v) = gw.admin(
        "PATCH",
        "/apisix/admin/routes/r1/methods",
        Some(json!(["POST"])),
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["value"]["methods"], json!(["POST"]));
    gw.wait_propagated();
    assert_eq!(http("GET", &gw.url("/svc/a"), &[], None).status, 404);
    assert_eq!(http("POST", &gw.url("/svc/a"), &[], Some(b"x")).status, 200);

    // Deleting what is still used is refused; in order it works.
    let (s, v) = gw.admin("DELETE", &format!("/apisix/admin/upstreams/{uid}"), None);
    assert_eq!(s, 400);
    assert_eq!(
        v["error_msg"],
        format!("can not delete this upstream, service [s1] is still using it now")
    );
    let (s, _) = gw.admin("DELETE", "/apisix/admin/services/s1", None);
    assert_eq!(s, 400);
    // APISIX's `?force=true` deletes it all the same: the route's requests then get 503,
    // with APISIX's error line.
    let forced = format!("/apisix/admin/upstreams/{uid}?force=true");
    let (s, v) = gw.admin("DELETE", &forced, None);
    assert_eq!(s, 200, "{v}");
    gw.wait_propagated();
    let r = http("POST", &gw.url("/svc/a"), &[], Some(b"x"));
    assert_eq!(r.status, 503, "{}", r.text());
    common::eventually(Duration::from_secs(5), "the error line", || {
        gw.error_log()
            .contains("route r1: missing upstream configuration in Route or Service")
    });
    let (s, v) = gw.admin("DELETE", "/apisix/admin/routes/r1", None);
    assert_eq!(s, 200);
    assert_eq!(v, json!({"deleted": "r1", "key": "/apisix/routes/r1"}));
    assert_eq!(gw.admin("DELETE", "/apisix/admin/services/s1", None).0, 200);
    assert_eq!(
        gw.admin("DELETE", &format!("/apisix/admin/upstreams/{uid}"), None)
            .0,
        404
    );
    assert_eq!(
        gw.admin("DELETE", "/apisix/admin/global_rules/g1", None).0,
        200
    );

    let (s, v) = gw.admin("GET", "/apisix/admin/routes/r1", None);
    assert_eq!(s, 404);
    assert_eq!(v, json!({"message": "Key not found"}));
    assert_eq!(gw.admin("DELETE", "/apisix/admin/routes/r1", None).0, 404);
    let (_, v) = gw.admin("GET", "/apisix/admin/routes", None);
    assert_eq!(v, json!({"list": [], "total": 0}));
    gw.wait_propagated();
    assert_eq!(http("POST", &gw.url("/svc/a"), &[], Some(b"x")).status, 404);
}

#[test]
fn paging_and_unknown_resources() {
    let gw = Gateway::start();
    for i in 1..=12 {
        let (s, _) = gw.admin(
            "PUT",
            &format!("/apisix/admin/routes/{i}"),
            Some(json!({"uri": format!("/p{i}"), "plugins": {"wasm_log": {"conf": "c"}}})),
        );
        assert_eq!(s, 201);
    }
    let (_, v) = gw.admin("GET", "/apisix/admin/routes?page=2&page_size=10", None);
    assert_eq!(v["total"], 12);
    assert_eq!(v["list"].as_array().unwrap().len(), 2);
    assert_eq!(v["list"][0]["value"]["id"], "11");
    // Pages follow creation order, as APISIX's: route 1, replaced, stays first.
    let (s, _) = gw.admin(
        "PUT",
        "/apisix/admin/routes/1",
        Some(
            json!({"uri": "/p1", "name": "billing-api", "labels": {"team": "pay"},
                    "plugins": {"wasm_log": {"conf": "c"}}}),
        ),
    );
    assert_eq!(s, 200);
    let (_, v) = gw.admin("GET", "/apisix/admin/routes?page=1&page_size=10", None);
    assert_eq!(v["list"][0]["value"]["id"], "1");
    // APISIX's filters: `name` and `uri` are regular expressions, `label` a key of labels;
    // `total` counts what they keep.
    let ids = |q: &str| {
        let (s, v) = gw.admin("GET", &format!("/apisix/admin/routes?{q}"), None);
        assert_eq!(s, 200, "{q}: {v}");
        let ids: Vec<String> = v["list"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["value"]["id"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(v["total"], ids.len(), "{q}");
        ids
    };
    assert_eq!(ids("name=^billing"), ["1"]);
    assert_eq!(ids("name=nothing-like-it"), Vec::<String>::new());
    assert_eq!(ids("label=team"), ["1"]);
    assert_eq!(ids("uri=^/p1"), ["1", "10", "11", "12"]);
    assert_eq!(ids("uri=p1$&label=team"), ["1"]);
    for (q, says) in [
        ("page=1&page_size=5", "page_size must be between 10 and 500"),
        (
            "page=1&page_size=501",
            "page_size must be between 10 and 500",
        ),
        ("name=(unclosed", "invalid name filter"),
    ] {
        let (s, v) = gw.admin("GET", &format!("/apisix/admin/routes?{q}"), None);
        assert_eq!(s, 400, "{q}: {v}");
        assert!(v["error_msg"].as_str().unwrap().contains(says), "{q}: {v}");
    }
    let (s, v) = gw.admin("GET", "/apisix/admin/consumers_typo", None);
    assert_eq!(s, 404);
    assert_eq!(v["error_msg"], "Unsupported resource type: consumers_typo");
}

fn assert_400(gw: &Gateway, path: &str, body: Value, expect: &str) {
    let (s, v) = gw.admin("PUT", path, Some(body.clone()));
    assert_eq!(s, 400, "{body} -> {v}");
    let msg = v["error_msg"].as_str().unwrap_or_default();
    assert!(
        msg.contains(expect),
        "{body}: expected {expect:?} in {msg:?}"
    );
}

#[test]
fn bad_input_is_refused_and_nothing_is_stored() {
    let gw = Gateway::start();
    let r = "/apisix/admin/routes/bad";
    // Malformed JSON.
    let resp = http(
        "PUT",
        &gw.admin_url(r),
        &[("X-API-KEY", KEY)],
        Some(b"{\"uri\": "),
    );
    assert_eq!(resp.status, 400);
    assert!(resp.json()["error_msg"]
        .as_str()
        .unwrap()
        .starts_with("invalid request body"));
    // Types, unknown fields, nodes, hosts, regexes, plugins.
    assert_400(
        &gw,
        r,
        json!({"uri": "/", "upstream_id": 1, "methods": "GET"}),
        "property \"methods\" validation failed",
    );
    assert_400(
        &gw,
        r,
        json!({"uri": "/", "upstream_id": 1, "colour": "red"}),
        "additional properties forbidden, found colour",
    );
    assert_400(
        &gw,
        r,
        json!({"uri": "/", "methods": ["FETCH"], "upstream": {"nodes": {"127.0.0.1:1": 1}}}),
        "methods[0]",
    );
    assert_400(
        &gw,
        r,
        json!({"uri": "/", "upstream": {"nodes": {"127.0.0.1:99999": 1}}}),
        "upstream.nodes",
    );
    assert_400(
        &gw,
        r,
        json!({"uri": "/", "upstream": {"nodes": {"127.0.0.1:80": "heavy"}}}),
        "upstream.nodes",
    );
    assert_400(
        &gw,
        r,
        json!({"uri": "/", "upstream": {"nodes": {"a:1": 1}, "timeout": {"read": -1}}}),
        "upstream.timeout.read",
    );
    assert_400(
        &gw,
        r,
        json!({"uri": "/", "host": "bad host!", "upstream": {"nodes": {"a:1": 1}}}),
        "property \"host\"",
    );
    assert_400(
        &gw,
        r,
        json!({"uri": "/", "hosts": ["ok.com", "*"], "upstream": {"nodes": {"a:1": 1}}}),
        "hosts[1]",
    );
    assert_400(
        &gw,
        r,
        json!({"uri": "/", "host": "a.com", "hosts": ["b.com"], "upstream": {"nodes": {"a:1": 1}}}),
        "only one of host or hosts is allowed",
    );
    assert_400(
        &gw,
        r,
        json!({"uri": "/", "vars": [["arg_x", "~~", "("]], "upstream": {"nodes": {"a:1": 1}}}),
        "invalid regex",
    );
    assert_400(
        &gw,
        r,
        json!({"uri": "/a*b", "upstream": {"nodes": {"a:1": 1}}}),
        "only allowed at the end",
    );
    assert_400(
        &gw,
        r,
        json!({"uri": "no-slash", "upstream": {"nodes": {"a:1": 1}}}),
        "must start with '/'",
    );
    assert_400(
        &gw,
        r,
        json!({"uri": "/", "upstream_id": "missing"}),
        "failed to fetch upstream info by upstream id [missing]",
    );
    assert_400(
        &gw,
        r,
        json!({"uri": "/", "plugins": {"nope": {"conf": "x"}}}),
        "unknown plugin [nope]",
    );
    assert_400(
        &gw,
        r,
        json!({"uri": "/", "plugins": {"wasm_log": {}}}),
        "property \"conf\" is required",
    );
    assert_400(
        &gw,
        r,
        json!({"uri": "/", "plugins": {"wasm_log": {"conf": ""}}}),
        "value should match only one schema, but matches none",
    );
    assert_400(
        &gw,
        r,
        json!({"uri": "/", "plugins": {"wasm_log": {"conf": {}}}}),
        "value should match only one schema, but matches none",
    );
    assert_400(
        &gw,
        "/apisix/admin/routes/1",
        json!({"id": "2", "uri": "/", "plugins": {"wasm_log": {"conf": "x"}}}),
        "wrong route id",
    );
    // A leading dot would name the store's own files (`.tmp-*`, removed at start) or `..`.
    for id in [".tmp-x", ".hidden"] {
        assert_400(
            &gw,
            &format!("/apisix/admin/routes/{id}"),
            json!({"uri": "/", "plugins": {"wasm_log": {"conf": "x"}}}),
            "not starting with .",
        );
    }
    // Objects do not expire: a ttl is refused, not ignored.
    let (s, v) = gw.admin(
        "PUT",
        "/apisix/admin/routes/t?ttl=2",
        Some(json!({"uri": "/", "plugins": {"wasm_log": {"conf": "x"}}})),
    );
    assert_eq!(s, 400, "{v}");
    assert!(v["error_msg"].as_str().unwrap().contains("ttl"), "{v}");
    assert_400(
        &gw,
        "/apisix/admin/routes/bad$id",
        json!({"uri": "/", "plugins": {"wasm_log": {"conf": "x"}}}),
        "invalid id",
    );
    // A huge body is refused before parsing.
    let huge = vec![b' '; 2 << 20];
    let resp = http("PUT", &gw.admin_url(r), &[("X-API-KEY", KEY)], Some(&huge));
    assert_eq!(resp.status, 413);
    assert!(resp.json()["error_msg"]
        .as_str()
        .unwrap()
        .contains("too large"));
    // Nothing was stored.
    let (_, v) = gw.admin("GET", "/apisix/admin/routes", None);
    assert_eq!(v["total"], 0, "{v}");
}

#[test]
fn keys_and_roles() {
    let gw = Gateway::start();
    let url = gw.admin_url("/apisix/admin/routes");
    let (s, v) = admin(&url, "GET", None, None);
    assert_eq!(s, 401);
    assert_eq!(
        v,
        json!({"error_msg": "failed to check token", "description": "missing apikey"})
    );
    let (s, v) = admin(&url, "GET", Some("wrong"), None);
    assert_eq!(s, 401);
    assert_eq!(v["description"], "wrong apikey");
    // The key may also come as a query argument or a cookie.
    let (s, _) = admin(&format!("{url}?api_key={KEY}"), "GET", None, None);
    assert_eq!(s, 200);
    let r = http(
        "GET",
        &url,
        &[("Cookie", &format!("x_api_key={KEY}"))],
        None,
    );
    assert_eq!(r.status, 200);
    // A viewer reads but cannot write.
    assert_eq!(admin(&url, "GET", Some(VIEWER_KEY), None).0, 200);
    let (s, v) = admin(
        &url,
        "POST",
        Some(VIEWER_KEY),
        Some(json!({"uri": "/", "plugins": {"wasm_log": {"conf": "x"}}})),
    );
    assert_eq!(s, 401);
    assert_eq!(v["description"], "invalid method for role viewer");
    assert_eq!(gw.admin("GET", "/apisix/admin/routes", None).1["total"], 0);

    // CORS, APISIX's `enable_admin_cors` (on by default): a preflight is answered without a
    // key, allowing what it asks; answers carry the headers; the key is still asked for.
    let preflight = [
        ("Origin", "http://dashboard.example"),
        ("Access-Control-Request-Method", "PUT"),
        ("Access-Control-Request-Headers", "x-api-key, content-type"),
    ];
    let r = http("OPTIONS", &url, &preflight, None);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("access-control-allow-origin"), Some("*"));
    assert_eq!(r.header("access-control-allow-methods"), Some("PUT"));
    assert_eq!(
        r.header("access-control-allow-headers"),
        Some("x-api-key, content-type")
    );
    let from_page = [("Origin", "http://dashboard.example")];
    let r = http("GET", &url, &from_page, None);
    assert_eq!(
        (r.status, r.header("access-control-allow-origin")),
        (401, Some("*"))
    );
    let r = http("GET", &url, &[from_page[0], ("X-API-KEY", KEY)], None);
    assert_eq!(
        (r.status, r.header("access-control-allow-origin")),
        (200, Some("*"))
    );
    // Turned off: no headers, and a preflight is a request like any other.
    let yaml = std::fs::read_to_string(gw.config_path()).unwrap();
    let off = yaml.replace("  admin:\n", "  admin:\n    enable_admin_cors: false\n");
    assert_ne!(off, yaml);
    std::fs::write(gw.config_path(), off).unwrap();
    let (s, v) = gw.admin("POST", "/wasmgate/reload", None);
    assert_eq!(s, 200, "{v}");
    let r = http("OPTIONS", &url, &preflight, None);
    assert_eq!(
        (r.status, r.header("access-control-allow-origin")),
        (401, None)
    );
}

/// Workers follow the configuration through its shared-memory journal: hundreds of edits in
/// the smallest area (1 MiB) fill it again and again, and each time the master starts a new
/// journal with a whole snapshot without a worker missing an edit. A change after which the
/// whole configuration would no longer fit the area is refused with 507 and not stored.
#[test]
fn edits_fill_the_journal_and_a_configuration_too_large_is_refused() {
    let up = TestUpstream::start("u1");
    let gw = Gateway::start_with(common::Setup {
        extra_yaml: "wasmgate:\n  shm_size: 1m\n".into(),
        ..common::Setup::default()
    });
    gw.route("keep", json!({"uri": "/keep"}), Some(&up));
    // A route about 20 KB long, its uri changing with each edit.
    let padded = |uri: String, kb: usize| {
        let pad = "p".repeat(kb << 10);
        json!({
            "uri": uri,
            "plugins": {
                "rewrite": {"conf": {"response_set": {"x-edit": uri}}},
                "rec_a": {"conf": pad},
            },
            "upstream": {"type": "roundrobin", "nodes": {up.addr(): 1}},
        })
    };
    for i in 0..200 {
        let (status, v) = gw.admin(
            "PUT",
            "/apisix/admin/routes/e",
            Some(padded(format!("/e/{i}"), 20)),
        );
        assert!(status == 200 || status == 201, "edit {i}: {status} {v}");
        if i % 40 == 39 {
            gw.wait_propagated();
            for _ in 0..4 {
                let r = http("GET", &gw.url(&format!("/e/{i}")), &[], None);
                assert_eq!(r.status, 200, "edit {i}: {}", gw.error_log());
                assert_eq!(r.header("x-edit"), Some(format!("/e/{i}").as_str()));
                assert_eq!(
                    http("GET", &gw.url(&format!("/e/{}", i - 1)), &[], None).status,
                    404
                );
            }
        }
    }
    // Routes of 200 KB until the whole configuration no longer fits.
    let mut stored = 0;
    let (status, v) = loop {
        let id = format!("big{stored}");
        let (status, v) = gw.admin(
            "PUT",
            &format!("/apisix/admin/routes/{id}"),
            Some(padded(format!("/big/{stored}"), 200)),
        );
        if status != 201 {
            break (status, v);
        }
        stored += 1;
        assert!(stored < 10, "1 MiB holds fewer than ten routes of 200 KB");
    };
    assert_eq!(status, 507, "{v}");
    let msg = v["error_msg"].as_str().unwrap();
    assert!(
        msg.contains("exceeds wasmgate.shm_size") && msg.contains("raise wasmgate.shm_size"),
        "{msg}"
    );
    // The status says how full the area is: the stored routes' 200 KB each, within 1 MiB.
    let shm = gw.admin("GET", "/wasmgate/status", None).1["master"]["shm"].clone();
    let snapshot = shm["snapshot_bytes"].as_u64().unwrap();
    let capacity = shm["capacity_bytes"].as_u64().unwrap();
    assert!(
        snapshot > stored * (200 << 10) && snapshot <= capacity,
        "{shm}"
    );
    assert!(capacity > 1_000_000 && capacity <= 1 << 20, "{shm}");
    assert!(shm["journal_bytes"].as_u64().unwrap() >= snapshot, "{shm}");
    let refused = format!("/apisix/admin/routes/big{stored}");
    assert_eq!(
        gw.admin("GET", &refused, None).0,
        404,
        "a refused route is not stored"
    );
    // Everything stored is served; after a deletion the route fits.
    gw.wait_propagated();
    for path in ["/keep", "/e/199", "/big/0"] {
        assert_eq!(http("GET", &gw.url(path), &[], None).status, 200, "{path}");
    }
    assert_eq!(gw.admin("DELETE", "/apisix/admin/routes/big0", None).0, 200);
    gw.route(
        &format!("big{stored}"),
        padded(format!("/big/{stored}"), 200),
        Some(&up),
    );
    assert_eq!(http("GET", &gw.url("/big/0"), &[], None).status, 404);
    assert_eq!(
        http("GET", &gw.url(&format!("/big/{stored}")), &[], None).status,
        200
    );
    // Nothing was lost on the way: no record failed to publish, decode or parse.
    let log = gw.error_log();
    for failure in [
        "publish of generation",
        "corrupt configuration",
        "unreadable in snapshot",
    ] {
        assert!(!log.contains(failure), "{failure}");
    }
}

/// A plugin with `_meta.disable` stays in the object and does not run; the stored objects,
/// which hold plugin settings (tokens), are readable by their owner only.
#[test]
fn disabled_plugins_do_not_run_and_objects_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let up = TestUpstream::start("u1");
    let gw = Gateway::start();
    let set = json!({"response_set": {"x-edit": "yes"}});
    gw.route(
        "on",
        json!({"uri": "/on", "plugins": {"rewrite": {"conf": set}}}),
        Some(&up),
    );
    gw.route(
        "off",
        json!({"uri": "/off", "plugins": {"rewrite": {"conf": set, "_meta": {"disable": true}}}}),
        Some(&up),
    );
    assert_eq!(
        http("GET", &gw.url("/on"), &[], None).header("x-edit"),
        Some("yes")
    );
    let r = http("GET", &gw.url("/off"), &[], None);
    assert_eq!((r.status, r.header("x-edit")), (200, None));
    let (_, v) = gw.admin("GET", "/apisix/admin/routes/off", None);
    assert_eq!(v["value"]["plugins"]["rewrite"]["_meta"]["disable"], true);
    let file = gw.prefix().join("data/routes/off.json");
    let mode = std::fs::metadata(&file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{}", file.display());
}

/// An upstream needs `nodes` (APISIX's schema) when written; one stored without them by an
/// earlier version still loads and can still be changed.
#[test]
fn upstreams_need_nodes_but_older_ones_stay_editable() {
    let gw = Gateway::start();
    let (s, v) = gw.admin(
        "PUT",
        "/apisix/admin/upstreams/legacy",
        Some(json!({"type": "roundrobin", "nodes": {"127.0.0.1:1": 1}})),
    );
    assert_eq!(s, 201, "{v}");
    let (s, v) = gw.admin(
        "PUT",
        "/apisix/admin/upstreams/new",
        Some(json!({"type": "roundrobin"})),
    );
    assert_eq!(s, 400, "{v}");
    assert!(
        v["error_msg"]
            .as_str()
            .unwrap()
            .contains("property \"nodes\" is required"),
        "{v}"
    );
    let (s, v) = gw.admin(
        "PUT",
        "/apisix/admin/routes/r",
        Some(json!({"uri": "/r", "upstream": {"type": "roundrobin"}})),
    );
    assert_eq!(s, 400, "{v}");
    assert!(
        v["error_msg"].as_str().unwrap().contains("upstream.nodes"),
        "{v}"
    );
    // As an earlier version stored it: no nodes.
    gw.signal(nix::sys::signal::Signal::SIGTERM);
    let file = gw.prefix().join("data/upstreams/legacy.json");
    let mut stored: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    fn strip(v: &mut serde_json::Value) {
        if let Some(o) = v.as_object_mut() {
            o.remove("nodes");
            o.values_mut().for_each(strip);
        }
    }
    strip(&mut stored);
    std::fs::write(&file, stored.to_string()).unwrap();
    let gw = gw.restart();
    let (s, v) = gw.admin(
        "PATCH",
        "/apisix/admin/upstreams/legacy",
        Some(json!({"desc": "still editable"})),
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["value"]["desc"], "still editable");
    // Replaced whole, it must say its nodes.
    let (s, v) = gw.admin(
        "PUT",
        "/apisix/admin/upstreams/legacy",
        Some(json!({"type": "roundrobin"})),
    );
    assert_eq!(s, 400, "{v}");
}

/// A body that stops coming is answered 408 within `client_body_timeout` (and nothing is
/// stored); the connection and its task are not held for ever.
#[test]
fn a_stalled_body_is_answered_408() {
    use std::io::{Read, Write};
    let gw = Gateway::start_with(common::Setup {
        http_extra: vec!["client_body_timeout: 1s".into()],
        ..common::Setup::default()
    });
    let mut s = std::net::TcpStream::connect(("127.0.0.1", gw.admin_port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let started = std::time::Instant::now();
    write!(
        s,
        "PUT /apisix/admin/routes/slow HTTP/1.1\r\nHost: admin\r\nX-API-KEY: {KEY}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"uri\""
    )
    .unwrap();
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("client_body_timeout"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(5));
    let (s, _) = gw.admin("GET", "/apisix/admin/routes/slow", None);
    assert_eq!(s, 404);
}
