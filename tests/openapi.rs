//! docs/openapi.yaml against a running gateway: every answer the test provokes is looked up in
//! the document by path, method and status code (a status the document does not list fails),
//! its Content-Type must be one the document gives, and its body must validate against the
//! schema the document gives. A request body the gateway accepted must validate against the
//! operation's request schema too. At the end every operation of the document must have been
//! called (or be listed in `NOT_EXERCISED` with a reason), so the document and this test stay
//! in step.

mod common;

use common::{eventually, http, Gateway, Resp, TestUpstream, KEY, VIEWER_KEY};
use serde_json::{json, Value};
use std::cell::RefCell;
use std::collections::BTreeSet;
use std::time::Duration;

/// Operations of docs/openapi.yaml this test does not call: (path, method, reason).
const NOT_EXERCISED: &[(&str, &str, &str)] = &[];

/// The HTTP methods an OpenAPI path item may hold.
const OPERATIONS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

/// How a call presents its key.
#[derive(Clone, Copy)]
enum Auth<'a> {
    None,
    Header(&'a str),
    Query(&'a str),
    Cookie(&'a str),
}

/// docs/openapi.yaml, and the operations called so far.
struct Spec {
    doc: Value,
    exercised: RefCell<BTreeSet<(String, String)>>,
}

impl Spec {
    fn load() -> Spec {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.yaml");
        let text = std::fs::read_to_string(path).unwrap();
        let doc: Value = serde_norway::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(doc["openapi"], "3.1.0");
        Spec {
            doc,
            exercised: RefCell::default(),
        }
    }

    /// Follows `$ref`s to `#/…` inside the document.
    fn resolve<'a>(&'a self, mut v: &'a Value) -> &'a Value {
        while let Some(r) = v.get("$ref").and_then(Value::as_str) {
            let pointer = r
                .strip_prefix('#')
                .unwrap_or_else(|| panic!("external $ref {r}"));
            v = self
                .doc
                .pointer(pointer)
                .unwrap_or_else(|| panic!("dangling $ref {r}"));
        }
        v
    }

    /// Every (path, method) of the document.
    fn operations(&self) -> BTreeSet<(String, String)> {
        let mut out = BTreeSet::new();
        for (path, item) in self.doc["paths"].as_object().unwrap() {
            for m in OPERATIONS {
                if item.get(m).is_some() {
                    out.insert((path.clone(), m.to_string()));
                }
            }
        }
        out
    }

    /// The path template matching a concrete path (literal segments win over parameters).
    fn template(&self, path: &str) -> Option<String> {
        let segs: Vec<&str> = path.split('/').collect();
        self.doc["paths"]
            .as_object()
            .unwrap()
            .keys()
            .filter_map(|t| {
                let tsegs: Vec<&str> = t.split('/').collect();
                if tsegs.len() != segs.len() {
                    return None;
                }
                let mut literal = 0;
                for (t, s) in tsegs.iter().zip(&segs) {
                    if t.starts_with('{') && t.ends_with('}') {
                        if s.is_empty() {
                            return None;
                        }
                    } else if t == s {
                        literal += 1;
                    } else {
                        return None;
                    }
                }
                Some((literal, t.clone()))
            })
            .max()
            .map(|(_, t)| t)
    }

    fn operation(&self, template: &str, method: &str) -> Result<&Value, String> {
        self.doc["paths"][template].get(method).ok_or_else(|| {
            format!(
                "{} {template} is not in docs/openapi.yaml",
                method.to_uppercase()
            )
        })
    }

    /// The response object the document gives for this status code.
    fn response(&self, template: &str, method: &str, status: u16) -> Result<&Value, String> {
        let op = self.operation(template, method)?;
        let responses = op["responses"].as_object().unwrap();
        match responses.get(&status.to_string()) {
            Some(r) => Ok(self.resolve(r)),
            None => Err(format!(
                "status {status} is not listed for {} {template} (listed: {:?})",
                method.to_uppercase(),
                responses.keys().collect::<Vec<_>>()
            )),
        }
    }

    /// The schema of a JSON response.
    fn response_schema(&self, template: &str, method: &str, status: u16) -> &Value {
        let r = self.response(template, method, status).unwrap();
        &r["content"]["application/json"]["schema"]
    }

    /// Query parameter names an operation declares (path- or operation-level), plus the
    /// names of the API-key security schemes that live in the query.
    fn query_names(&self, template: &str, method: &str) -> BTreeSet<String> {
        let item = &self.doc["paths"][template];
        let mut names = BTreeSet::new();
        for params in [&item["parameters"], &item[method]["parameters"]] {
            for p in params.as_array().into_iter().flatten() {
                let p = self.resolve(p);
                if p["in"] == "query" {
                    names.insert(p["name"].as_str().unwrap().to_string());
                }
            }
        }
        for s in self.doc["components"]["securitySchemes"]
            .as_object()
            .into_iter()
            .flat_map(|m| m.values())
        {
            if s["type"] == "apiKey" && s["in"] == "query" {
                names.insert(s["name"].as_str().unwrap().to_string());
            }
        }
        names
    }

    /// Validates `instance` against `schema` (JSON Schema 2020-12, the dialect of OpenAPI 3.1),
    /// with the document's `#/components/schemas/…` reachable from it.
    fn check(&self, schema: &Value, instance: &Value) -> Result<(), String> {
        let root = json!({
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "components": {"schemas": self.doc["components"]["schemas"]},
            "allOf": [schema],
        });
        let validator = jsonschema::options()
            .with_draft(jsonschema::Draft::Draft202012)
            .build(&root)
            .map_err(|e| format!("the schema does not compile: {e}"))?;
        validator.validate(instance).map_err(|errors| {
            errors
                .map(|e| format!("{e} (at {:?})", e.instance_path.to_string()))
                .collect::<Vec<_>>()
                .join("; ")
        })
    }

    /// The operation's request body schema.
    fn request_schema(&self, template: &str, method: &str) -> Option<&Value> {
        let op = self.operation(template, method).ok()?;
        let body = self.resolve(op.get("requestBody")?);
        Some(&body["content"]["application/json"]["schema"])
    }

    /// Checks one exchange against the document; returns the response body (a JSON value, or
    /// a string for a text response).
    fn check_exchange(
        &self,
        method: &str,
        path_and_query: &str,
        request: Option<&Value>,
        resp: &Resp,
    ) -> Result<Value, String> {
        let method = method.to_ascii_lowercase();
        let (path, query) = path_and_query
            .split_once('?')
            .unwrap_or((path_and_query, ""));
        let template = self
            .template(path)
            .ok_or_else(|| format!("no path of docs/openapi.yaml matches {path}"))?;
        self.operation(&template, &method)?;
        self.exercised
            .borrow_mut()
            .insert((template.clone(), method.clone()));
        let declared = self.query_names(&template, &method);
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let name = pair.split('=').next().unwrap();
            if !declared.contains(name) {
                return Err(format!(
                    "query parameter {name} is not declared for {template}"
                ));
            }
        }
        let response = self.response(&template, &method, resp.status)?;
        let content_type = resp.header("content-type").unwrap_or("");
        let media = content_type
            .split(';')
            .next()
            .unwrap()
            .trim()
            .to_ascii_lowercase();
        let Some(content) = response["content"].get(&media) else {
            return Err(format!(
                "{} answered with Content-Type {content_type:?}, the document lists {:?}",
                resp.status,
                response["content"]
                    .as_object()
                    .map(|m| m.keys().collect::<Vec<_>>())
            ));
        };
        let body = if media == "application/json" {
            serde_json::from_slice(&resp.body)
                .map_err(|e| format!("not JSON ({e}): {}", resp.text()))?
        } else {
            Value::String(resp.text())
        };
        self.check(&content["schema"], &body).map_err(|e| {
            format!(
                "the {} answer does not match the document: {e}\n{body}",
                resp.status
            )
        })?;
        // What the gateway accepted, the document's request schema must accept too.
        if let (true, Some(req), Some(schema)) = (
            (200..300).contains(&resp.status),
            request,
            self.request_schema(&template, &method),
        ) {
            self.check(schema, req).map_err(|e| {
                format!(
                    "the gateway accepted a body the document's request schema refuses: {e}\n{req}"
                )
            })?;
        }
        Ok(body)
    }
}

/// The gateway, its Admin API and the document.
struct Api<'a> {
    gw: &'a Gateway,
    spec: &'a Spec,
}

impl Api<'_> {
    /// One Admin API call; panics when the exchange disagrees with the document.
    fn call(&self, method: &str, path: &str, auth: Auth, body: Option<&[u8]>) -> (u16, Value) {
        let mut path = path.to_string();
        let mut headers: Vec<(&str, String)> = Vec::new();
        if body.is_some() {
            headers.push(("Content-Type", "application/json".into()));
        }
        match auth {
            Auth::None => {}
            Auth::Header(k) => headers.push(("X-API-KEY", k.into())),
            Auth::Cookie(k) => headers.push(("Cookie", format!("theme=dark; x_api_key={k}"))),
            Auth::Query(k) => {
                path.push(if path.contains('?') { '&' } else { '?' });
                path.push_str(&format!("api_key={k}"));
            }
        }
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let resp = http(method, &self.gw.admin_url(&path), &headers, body);
        let request: Option<Value> = body.and_then(|b| serde_json::from_slice(b).ok());
        match self
            .spec
            .check_exchange(method, &path, request.as_ref(), &resp)
        {
            Ok(v) => (resp.status, v),
            Err(e) => panic!("{method} {path}: {e}"),
        }
    }

    /// A call with the admin key in the header.
    fn admin(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let bytes = body.map(|b| b.to_string().into_bytes());
        self.call(method, path, Auth::Header(KEY), bytes.as_deref())
    }

    /// A call that must answer `want`.
    fn expect(&self, want: u16, method: &str, path: &str, body: Option<Value>) -> Value {
        let (status, v) = self.admin(method, path, body);
        assert_eq!(status, want, "{method} {path}: {v}");
        v
    }

    /// A write the gateway must refuse with 400; `schema_refuses` says whether the document's
    /// request schema can tell (semantic checks such as unknown plugins or missing references
    /// are beyond it).
    fn refused(&self, method: &str, path: &str, body: Value, schema_refuses: bool, msg: &str) {
        let v = self.expect(400, method, path, Some(body.clone()));
        let got = v["error_msg"].as_str().unwrap();
        assert!(got.contains(msg), "{method} {path}: {got:?} lacks {msg:?}");
        if schema_refuses {
            let template = self.spec.template(path.split('?').next().unwrap()).unwrap();
            let schema = self
                .spec
                .request_schema(&template, &method.to_ascii_lowercase())
                .unwrap();
            assert!(
                self.spec.check(schema, &body).is_err(),
                "the request schema of {method} {template} accepts {body}, which the gateway refuses: {got}"
            );
        }
    }
}

/// Asserts that the schema for (path, method, status) refuses `mutated`: the document is precise
/// enough to catch a renamed, missing or extra field.
fn refuses(spec: &Spec, template: &str, method: &str, status: u16, mutated: Value, what: &str) {
    let schema = spec.response_schema(template, method, status);
    assert!(
        spec.check(schema, &mutated).is_err(),
        "the schema of {method} {template} {status} does not catch {what}: {mutated}"
    );
}

/// Renames a field of the object at `pointer`.
fn renamed(mut v: Value, pointer: &str, from: &str, to: &str) -> Value {
    let obj = v.pointer_mut(pointer).unwrap().as_object_mut().unwrap();
    let x = obj
        .remove(from)
        .unwrap_or_else(|| panic!("no {from} at {pointer}"));
    obj.insert(to.into(), x);
    v
}

/// Removes a field of the object at `pointer`.
fn removed(mut v: Value, pointer: &str, field: &str) -> Value {
    let obj = v.pointer_mut(pointer).unwrap().as_object_mut().unwrap();
    obj.remove(field)
        .unwrap_or_else(|| panic!("no {field} at {pointer}"));
    v
}

/// Sets the value at `pointer` (adding the field when its object lacks it).
fn set(mut v: Value, pointer: &str, x: Value) -> Value {
    let (parent, last) = pointer.rsplit_once('/').unwrap();
    match v.pointer_mut(parent).unwrap() {
        Value::Object(obj) => {
            obj.insert(last.into(), x);
        }
        Value::Array(items) => items[last.parse::<usize>().unwrap()] = x,
        other => panic!("{parent} is {other}"),
    }
    v
}

#[test]
fn admin_api_answers_match_openapi_document() {
    let spec = Spec::load();
    let up = TestUpstream::start("u");
    let gw = Gateway::start();
    let api = Api {
        gw: &gw,
        spec: &spec,
    };
    let addr = up.addr();
    let (host, port) = (addr.split(':').next().unwrap(), up.port);

    // ---- authentication: header, query argument, cookie; no key, wrong key, viewer ----------
    let (s, v) = api.call("GET", "/apisix/admin/routes", Auth::None, None);
    assert_eq!((s, &v["description"]), (401, &json!("missing apikey")));
    let (s, v) = api.call("GET", "/apisix/admin/routes", Auth::Header("nope"), None);
    assert_eq!((s, &v["description"]), (401, &json!("wrong apikey")));
    let (s, _) = api.call("GET", "/apisix/admin/routes", Auth::Query(KEY), None);
    assert_eq!(s, 200);
    let (s, _) = api.call("GET", "/apisix/admin/routes", Auth::Cookie(KEY), None);
    assert_eq!(s, 200);
    let (s, _) = api.call(
        "GET",
        "/apisix/admin/routes",
        Auth::Header(VIEWER_KEY),
        None,
    );
    assert_eq!(s, 200);
    let body = json!({"nodes": {addr.clone(): 1}}).to_string();
    let (s, v) = api.call(
        "PUT",
        "/apisix/admin/upstreams/u1",
        Auth::Header(VIEWER_KEY),
        Some(body.as_bytes()),
    );
    assert_eq!(
        (s, &v["description"]),
        (401, &json!("invalid method for role viewer"))
    );

    // ---- upstreams --------------------------------------------------------------------------
    let u1 = json!({
        "type": "roundrobin",
        "nodes": {addr.clone(): 1},
        "timeout": {"connect": 5, "send": 5, "read": 5.5},
        "name": "main",
        "labels": {"team": "edge"},
        "checks": {"active": {"type": "tcp"}, "passive": {"unhealthy": {"http_statuses": [502]}}},
    });
    let created = api.expect(201, "PUT", "/apisix/admin/upstreams/u1", Some(u1.clone()));
    let replaced = api.expect(200, "PUT", "/apisix/admin/upstreams/u1", Some(u1));
    assert_eq!(
        created["value"]["create_time"],
        replaced["value"]["create_time"]
    );
    let v = api.expect(
        201,
        "POST",
        "/apisix/admin/upstreams",
        Some(json!({
            "type": "chash", "hash_on": "header", "key": "x-user",
            "nodes": [{"host": host, "port": port, "weight": 1}],
            "pass_host": "node", "retries": 1, "retry_timeout": 2.5,
        })),
    );
    let u2 = v["value"]["id"].as_str().unwrap().to_string();
    assert!(u2.parse::<u64>().is_ok(), "generated id {u2}");
    api.expect(
        201,
        "PUT",
        "/apisix/admin/upstreams",
        Some(json!({
            "id": "u3", "nodes": {addr.clone(): 1}, "pass_host": "rewrite",
            "upstream_host": "example.com", "scheme": "http",
            "keepalive_pool": {"size": 4, "idle_timeout": 30, "requests": 100},
        })),
    );
    let entry = api.expect(200, "GET", "/apisix/admin/upstreams/u1", None);
    assert_eq!(entry["key"], "/apisix/upstreams/u1");
    // Its node, probed (TCP) by the master: healthy.
    eventually(Duration::from_secs(5), "u1's node checked", || {
        let hc = api.expect(200, "GET", "/wasmgate/healthcheck", None);
        hc[0]["nodes"][0]["status"] == "healthy" && hc[0]["name"] == "/apisix/upstreams/u1"
    });
    let list = api.expect(200, "GET", "/apisix/admin/upstreams", None);
    assert_eq!(list["total"], 3);
    api.expect(
        200,
        "GET",
        "/apisix/admin/upstreams?page=1&page_size=10",
        None,
    );
    let v = api.expect(
        200,
        "PATCH",
        "/apisix/admin/upstreams/u1",
        Some(json!({"desc": "patched", "labels": null})),
    );
    assert_eq!(v["value"]["desc"], "patched");
    assert!(v["value"].get("labels").is_none(), "{v}");
    let v = api.expect(
        200,
        "PATCH",
        "/apisix/admin/upstreams/u1/retries",
        Some(json!(1)),
    );
    assert_eq!(v["value"]["retries"], 1);
    api.refused(
        "PUT",
        "/apisix/admin/upstreams/u9",
        json!({"type": "chash", "nodes": {addr.clone(): 1}}),
        true,
        "required when type is \"chash\"",
    );
    api.refused(
        "PUT",
        "/apisix/admin/upstreams/u9",
        json!({"nodes": {addr.clone(): 1}, "pass_host": "rewrite"}),
        true,
        "upstream_host",
    );
    // APISIX requires nodes (an empty set is allowed); stored, an upstream without them would
    // answer every request 503.
    api.refused(
        "PUT",
        "/apisix/admin/upstreams/u9",
        json!({"type": "roundrobin"}),
        true,
        "property \"nodes\" is required",
    );
    api.expect(
        201,
        "PUT",
        "/apisix/admin/upstreams/u9",
        Some(json!({"type": "roundrobin", "nodes": {}})),
    );
    api.expect(200, "DELETE", "/apisix/admin/upstreams/u9", None);
    api.expect(
        404,
        "PATCH",
        "/apisix/admin/upstreams/nope",
        Some(json!({})),
    );

    // ---- services ---------------------------------------------------------------------------
    api.expect(
        201,
        "PUT",
        "/apisix/admin/services/s1",
        Some(json!({
            "upstream_id": "u1", "name": "svc", "desc": "d", "labels": {"a": "b"},
            "plugins": {"wasm_log": {"conf": {"level": "info"}}},
        })),
    );
    let v = api.expect(
        201,
        "POST",
        "/apisix/admin/services",
        Some(json!({"upstream": {"nodes": {addr.clone(): 1}}, "enable_websocket": false})),
    );
    let s2 = v["value"]["id"].as_str().unwrap().to_string();
    api.expect(
        201,
        "PUT",
        "/apisix/admin/services",
        Some(json!({"id": "s3", "hosts": ["*.example.com"], "upstream_id": "u3"})),
    );
    api.expect(200, "GET", "/apisix/admin/services/s1", None);
    let list = api.expect(200, "GET", "/apisix/admin/services?page_size=10", None);
    assert_eq!(list["total"], 3);
    api.expect(
        200,
        "PATCH",
        "/apisix/admin/services/s1",
        Some(json!({"desc": "patched"})),
    );
    api.expect(
        200,
        "PATCH",
        "/apisix/admin/services/s1/name",
        Some(json!("renamed")),
    );
    api.refused(
        "PUT",
        "/apisix/admin/services/s9",
        json!({"upstream_id": "missing"}),
        false,
        "failed to fetch upstream info by upstream id [missing], response code: 404",
    );
    api.refused(
        "PUT",
        "/apisix/admin/services/s9",
        json!({"hosts": []}),
        true,
        "expect array to have at least 1 items",
    );
    api.expect(404, "GET", "/apisix/admin/services/missing", None);

    // ---- global rules (before the proxied requests, so the statistics show them) -----------
    api.expect(
        201,
        "PUT",
        "/apisix/admin/global_rules/g1",
        Some(json!({"plugins": {"rec_a": {"conf": "g"}}})),
    );
    let v = api.expect(
        201,
        "POST",
        "/apisix/admin/global_rules",
        Some(json!({"plugins": {"rec_b": {"conf": {"k": "v"}}}})),
    );
    let g2 = v["value"]["id"].as_str().unwrap().to_string();
    api.expect(
        201,
        "PUT",
        "/apisix/admin/global_rules",
        Some(json!({"id": "g3", "plugins": {"wasm_log": {"conf": "x"}}})),
    );
    api.expect(200, "GET", "/apisix/admin/global_rules/g1", None);
    let list = api.expect(200, "GET", "/apisix/admin/global_rules", None);
    assert_eq!(list["total"], 3);
    api.expect(
        200,
        "PATCH",
        "/apisix/admin/global_rules/g1",
        Some(json!({"plugins": {"rec_a": {"conf": "h"}}})),
    );
    api.expect(
        200,
        "PATCH",
        "/apisix/admin/global_rules/g1/plugins",
        Some(json!({"rec_a": {"conf": "i"}})),
    );
    api.refused(
        "PUT",
        "/apisix/admin/global_rules/g9",
        json!({}),
        true,
        "\"plugins\" is required",
    );
    api.refused(
        "PUT",
        "/apisix/admin/global_rules/g9",
        json!({"plugins": {}}),
        true,
        "\"plugins\" is required",
    );
    api.expect(404, "DELETE", "/apisix/admin/global_rules/missing", None);

    // ---- plugin configs -----------------------------------------------------------------------
    let pc = "/apisix/admin/plugin_configs";
    let created = api.expect(
        201,
        "PUT",
        &format!("{pc}/pc1"),
        Some(json!({"desc": "shared", "labels": {"team": "a"}, "plugins": {"wasm_log": {"conf": "p"}}})),
    );
    assert_eq!(created["key"], "/apisix/plugin_configs/pc1");
    api.expect(201, "PUT", pc, Some(json!({"id": "pc2", "plugins": {}})));
    api.expect(
        201,
        "PUT",
        &format!("{pc}/pc3"),
        Some(json!({"plugins": {"rec_a": {"conf": "q"}}})),
    );
    api.expect(200, "GET", &format!("{pc}/pc1"), None);
    let list = api.expect(200, "GET", &format!("{pc}?label=team"), None);
    assert_eq!(list["total"], 1);
    api.expect(
        200,
        "PATCH",
        &format!("{pc}/pc2"),
        Some(json!({"desc": "empty"})),
    );
    api.expect(
        200,
        "PATCH",
        &format!("{pc}/pc2/plugins"),
        Some(json!({"rec_b": {"conf": "r"}})),
    );
    api.refused(
        "PUT",
        &format!("{pc}/pc9"),
        json!({"desc": "x"}),
        true,
        "\"plugins\" is required",
    );
    api.refused(
        "PUT",
        &format!("{pc}/pc9"),
        json!({"plugins": {"nope": {"conf": "x"}}}),
        false,
        "unknown plugin [nope]",
    );
    api.refused(
        "PUT",
        "/apisix/admin/routes/rpc",
        json!({"uri": "/pc", "plugin_config_id": "missing"}),
        false,
        "failed to fetch plugin config info by plugin config id [missing], response code: 404",
    );
    api.expect(
        201,
        "PUT",
        "/apisix/admin/routes/rpc",
        Some(json!({"uri": "/pc", "plugin_config_id": "pc1"})),
    );
    let v = api.expect(400, "DELETE", &format!("{pc}/pc1"), None);
    assert_eq!(
        v["error_msg"],
        "can not delete this plugin config, route [rpc] is still using it now"
    );
    api.expect(200, "DELETE", "/apisix/admin/routes/rpc", None);
    api.expect(404, "DELETE", &format!("{pc}/missing"), None);

    // ---- SSL objects --------------------------------------------------------------------------
    let ca = common::tls::Ca::new("openapi CA");
    let pem = |names: &[&str]| {
        let (cert, key) = ca.issue(names[0], names);
        (cert.pem(), key.serialize_pem())
    };
    let (a_cert, a_key) = pem(&["a.test", "*.a.test"]);
    let (b_cert, b_key) = pem(&["b.test"]);
    let c1 = json!({
        "type": "server", "cert": a_cert, "key": a_key, "snis": ["a.test", "*.A.test"],
        "name": "a", "labels": {"env": "test"}, "ssl_protocols": ["TLSv1.2", "TLSv1.3"],
    });
    let created = api.expect(201, "PUT", "/apisix/admin/ssls/c1", Some(c1.clone()));
    assert_eq!(created["key"], "/apisix/ssls/c1");
    let replaced = api.expect(200, "PUT", "/apisix/admin/ssls/c1", Some(c1));
    assert_eq!(
        created["value"]["create_time"],
        replaced["value"]["create_time"]
    );
    let v = api.expect(
        201,
        "POST",
        "/apisix/admin/ssls",
        Some(json!({"cert": b_cert, "key": b_key, "sni": "b.test", "status": 0})),
    );
    let c2 = v["value"]["id"].as_str().unwrap().to_string();
    assert!(c2.parse::<u64>().is_ok(), "generated id {c2}");
    api.expect(
        201,
        "PUT",
        "/apisix/admin/ssls",
        Some(json!({
            "id": "c3", "cert": b_cert, "key": b_key, "certs": [a_cert], "keys": [a_key],
            "snis": ["c.test"], "desc": "two pairs", "validity_start": 1, "validity_end": 2,
        })),
    );
    let entry = api.expect(200, "GET", "/apisix/admin/ssls/c1", None);
    assert_eq!(entry["key"], "/apisix/ssls/c1");
    assert_eq!(entry["value"]["cert"], json!(a_cert));
    let list = api.expect(200, "GET", "/apisix/admin/ssls", None);
    assert_eq!(list["total"], 3, "{list}");
    let page = api.expect(200, "GET", "/apisix/admin/ssls?page=1&page_size=10", None);
    assert_eq!(page["list"].as_array().unwrap().len(), 3, "{page}");
    let v = api.expect(
        200,
        "PATCH",
        "/apisix/admin/ssls/c1",
        Some(json!({"desc": "patched", "labels": null})),
    );
    assert_eq!(v["value"]["desc"], "patched");
    assert!(v["value"].get("labels").is_none(), "{v}");
    let v = api.expect(
        200,
        "PATCH",
        "/apisix/admin/ssls/c1/snis",
        Some(json!(["a.test"])),
    );
    assert_eq!(v["value"]["snis"], json!(["a.test"]));
    // APISIX 2's path is the same endpoint (not a path of the document: called directly).
    let (s, v) = gw.admin("GET", "/apisix/admin/ssl/c1", None);
    assert_eq!((s, &v["key"]), (200, &json!("/apisix/ssls/c1")), "{v}");
    let c1_entry = api.expect(200, "GET", "/apisix/admin/ssls/c1", None);
    // (method, path, body, whether the request schema can tell, what error_msg says)
    let c = "/apisix/admin/ssls/c9";
    #[rustfmt::skip]
    let refusals = [
        ("PUT", c, json!({"cert": a_cert, "key": b_key, "snis": ["a.test"]}), false,
            "invalid configuration: property \"key\" validation failed: cannot be used with its certificate"),
        ("PUT", c, json!({"cert": "not a certificate", "key": a_key, "snis": ["a.test"]}), false,
            "property \"cert\" validation failed"),
        ("PUT", c, json!({"cert": a_cert, "key": a_key}), true,
            "invalid configuration: property \"snis\" is required"),
        ("PUT", c, json!({"cert": a_cert, "key": a_key, "snis": ["a.test"], "sni": "a.test"}), true,
            "only one of sni or snis is allowed"),
        ("PUT", c, json!({"snis": ["a.test"], "key": a_key}), true,
            "property \"cert\" is required"),
        ("PUT", c, json!({"cert": a_cert, "key": a_key, "snis": ["*"]}), true,
            "is not a host name"),
        ("PUT", c, json!({"cert": a_cert, "key": a_key, "snis": ["a.test"], "type": "client"}), true,
            "client SSL objects are not supported"),
        ("PUT", c, json!({"cert": a_cert, "key": a_key, "snis": ["a.test"], "client": {"ca": "x"}}), false,
            "property \"client.ca\" validation failed: no PEM certificate"),
        ("PUT", c, json!({"cert": a_cert, "key": a_key, "snis": ["a.test"], "ssl_protocols": ["TLSv1.1"]}), true,
            "RFC 8996"),
        ("PUT", c, json!({"cert": a_cert, "key": a_key, "snis": ["a.test"], "status": 2}), true,
            "property \"status\" validation failed"),
        ("PUT", c, json!({"cert": a_cert, "key": a_key, "snis": ["a.test"], "certs": [b_cert]}), true,
            "must list one key for each of certs"),
        ("PUT", "/apisix/admin/ssls", json!({"cert": a_cert, "key": a_key, "snis": ["a.test"]}), true,
            "missing ssl id"),
        ("POST", "/apisix/admin/ssls", json!({"id": "c9", "cert": a_cert, "key": a_key, "snis": ["a.test"]}), true,
            "wrong ssl id, do not need it"),
        ("PATCH", "/apisix/admin/ssls/c1", json!({"colour": "red"}), true, "found colour"),
        ("PATCH", "/apisix/admin/ssls/c1/key", json!(b_key), false,
            "cannot be used with its certificate"),
    ];
    for (method, path, body, schema_refuses, msg) in refusals {
        api.refused(method, path, body, schema_refuses, msg);
    }
    api.expect(404, "GET", "/apisix/admin/ssls/missing", None);
    api.expect(404, "DELETE", "/apisix/admin/ssls/missing", None);
    let list = api.expect(200, "GET", "/apisix/admin/ssls", None);
    assert_eq!(list["total"], 3, "{list}");

    // ---- routes -----------------------------------------------------------------------------
    let r1 = json!({
        "uri": "/pub", "name": "pub", "methods": ["GET"], "upstream_id": "u1",
        "plugins": {"rewrite": {"conf": {"set": {"x-a": "1"}}}},
    });
    api.expect(201, "PUT", "/apisix/admin/routes/r1", Some(r1.clone()));
    api.expect(200, "PUT", "/apisix/admin/routes/r1", Some(r1));
    api.expect(
        201,
        "PUT",
        "/apisix/admin/routes",
        Some(json!({
            "id": "r2", "uris": ["/svc/*"], "service_id": "s1", "priority": 2,
            "vars": [["arg_v", "==", "1"]], "remote_addrs": ["127.0.0.0/8"],
        })),
    );
    let v = api.expect(
        201,
        "POST",
        "/apisix/admin/routes",
        Some(json!({
            "uri": "/post", "host": "api.example.com", "status": 0,
            "upstream": {"nodes": [{"host": host, "port": port}]},
            "timeout": {"read": 3}, "enable_websocket": true,
        })),
    );
    let r3 = v["value"]["id"].as_str().unwrap().to_string();
    let r1_entry = api.expect(200, "GET", "/apisix/admin/routes/r1", None);
    assert_eq!(r1_entry["value"]["id"], "r1");
    let list = api.expect(200, "GET", "/apisix/admin/routes", None);
    assert_eq!(list["total"], 3);
    api.expect(400, "GET", "/apisix/admin/routes?page=1&page_size=1", None);
    let page = api.expect(200, "GET", "/apisix/admin/routes?page=2&page_size=10", None);
    assert_eq!((&page["total"], &page["list"]), (&json!(3), &json!([])));
    api.expect(
        200,
        "PATCH",
        "/apisix/admin/routes/r1",
        Some(json!({"desc": "patched", "labels": {"env": "test"}})),
    );
    let v = api.expect(
        200,
        "PATCH",
        "/apisix/admin/routes/r1/methods",
        Some(json!(["GET", "HEAD"])),
    );
    assert_eq!(v["value"]["methods"], json!(["GET", "HEAD"]));

    // Refused writes.
    let (s, v) = api.call(
        "PUT",
        "/apisix/admin/routes/r9",
        Auth::Header(KEY),
        Some(b"{".as_slice()),
    );
    assert_eq!(s, 400, "{v}");
    assert!(v["error_msg"]
        .as_str()
        .unwrap()
        .starts_with("invalid request body: "));
    // (method, path, body, whether the request schema can tell, what error_msg says)
    let r = "/apisix/admin/routes/r9";
    let u = json!("u1");
    #[rustfmt::skip]
    let refusals = [
        ("PUT", r, json!({"uri": "/x", "upstream_id": u, "colour": "red"}), true,
            "additional properties forbidden, found colour"),
        ("PUT", r, json!({"uri": "/x", "upstream_id": u, "methods": "GET"}), true,
            "property \"methods\" validation failed"),
        ("PUT", r, json!({"uri": "/x", "upstream_id": u, "methods": ["FETCH"]}), true,
            "property \"methods[0]\" validation failed"),
        ("PUT", r, json!({"uri": "/x", "uris": ["/y"], "upstream_id": u}), true,
            "only one of uri or uris"),
        ("PUT", r, json!({"uri": "x", "upstream_id": u}), true, "must start with '/'"),
        ("PUT", r, json!({"uri": "/a*b", "upstream_id": u}), true, "only allowed at the end"),
        ("PUT", r, json!({"uri": "/x", "hosts": ["a.com", "*"], "upstream_id": u}), true,
            "property \"hosts[1]\" validation failed: invalid host pattern \"*\""),
        ("PUT", r, json!({"uri": "/x", "status": 2, "upstream_id": u}), true,
            "property \"status\" validation failed"),
        ("PUT", r, json!({"uri": "/x", "timeout": {"read": 0}, "upstream_id": u}), true,
            "property \"timeout.read\" validation failed"),
        ("PUT", r, json!({"uri": "/x", "upstream": {"nodes": {addr.clone(): "x"}}}), true,
            "property \"upstream.nodes\" validation failed"),
        ("PUT", r, json!({"uri": "/x"}), true, "a route needs one of"),
        ("PUT", r, json!({"uri": "/x", "plugins": {"wasm_log": {}}}), true,
            "property \"conf\" is required"),
        ("PUT", r, json!({"uri": "/x", "plugins": {"wasm_log": {"conf": ""}}}), true,
            "value should match only one schema, but matches none"),
        ("PUT", r, json!({"uri": "/x", "plugins": {"nope": {"conf": "x"}}}), false,
            "unknown plugin [nope]"),
        ("PUT", r, json!({"uri": "/x", "remote_addr": "not-an-ip", "upstream_id": u}), false,
            "invalid IP or CIDR"),
        ("PUT", r, json!({"uri": "/x", "vars": [["arg_a", "?", "1"]], "upstream_id": u}), false,
            "vars"),
        ("PUT", r, json!({"uri": "/x", "service_id": "missing"}), false,
            "failed to fetch service info by service id [missing]"),
        ("PUT", r, json!({"id": "other", "uri": "/x", "upstream_id": u}), false,
            "wrong route id"),
        ("PUT", "/apisix/admin/routes/bad$id", json!({"uri": "/x", "upstream_id": u}), false,
            "invalid id"),
        ("PUT", "/apisix/admin/routes", json!({"uri": "/x", "upstream_id": u}), true,
            "missing route id"),
        ("POST", "/apisix/admin/routes", json!({"id": "x", "uri": "/x", "upstream_id": u}), true,
            "wrong route id, do not need it"),
        ("PATCH", "/apisix/admin/routes/r1", json!({"colour": "red"}), true, "found colour"),
        ("PATCH", "/apisix/admin/routes/r1/uri", json!(5), false,
            "property \"uri\" validation failed"),
    ];
    for (method, path, body, schema_refuses, msg) in refusals {
        api.refused(method, path, body, schema_refuses, msg);
    }
    let huge = vec![b' '; 2 << 20];
    let (s, v) = api.call("PUT", r, Auth::Header(KEY), Some(&huge));
    assert_eq!(s, 413, "{v}");
    let (s, v) = api.call(
        "PUT",
        "/apisix/admin/routes/r1",
        Auth::Header(VIEWER_KEY),
        Some(b"{}".as_slice()),
    );
    assert_eq!(
        (s, &v["description"]),
        (401, &json!("invalid method for role viewer"))
    );
    let v = api.expect(404, "GET", "/apisix/admin/routes/missing", None);
    assert_eq!(v, json!({"message": "Key not found"}));
    api.expect(404, "DELETE", "/apisix/admin/routes/missing", None);
    api.expect(
        404,
        "PATCH",
        "/apisix/admin/routes/missing/uri",
        Some(json!("/m")),
    );
    // Nothing refused was stored.
    let list = api.expect(200, "GET", "/apisix/admin/routes", None);
    assert_eq!(list["total"], 3, "{list}");

    // ---- traffic, then the gateway's own endpoints ------------------------------------------
    gw.wait_propagated();
    for _ in 0..10 {
        let r = http("GET", &gw.url("/pub"), &[], None);
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let stats = api.expect(200, "GET", "/wasmgate/stats", None);
    let contexts = stats["contexts"].as_array().unwrap();
    let rewrite = contexts
        .iter()
        .find(|c| c["plugin"] == "rewrite" && c["owner_id"] == "r1")
        .unwrap_or_else(|| panic!("no rewrite × r1 in {stats}"));
    assert_eq!(rewrite["owner_kind"], "route");
    assert_eq!(rewrite["requests"], 10);
    assert!(rewrite["p50_us"].is_number(), "{rewrite}");
    assert!(
        contexts.iter().any(|c| c["owner_kind"] == "global_rule"),
        "{stats}"
    );

    // Counted in each request's log phase, which may end a moment after its answer is read.
    let r1 = |traffic: &Value| {
        traffic["routes"]
            .as_array()
            .and_then(|rs| rs.iter().find(|r| r["route"] == "r1"))
            .cloned()
    };
    eventually(Duration::from_secs(5), "r1's 10 requests counted", || {
        let traffic = api.expect(200, "GET", "/wasmgate/traffic", None);
        r1(&traffic).is_some_and(|r| r["requests"] == 10)
    });
    let traffic = api.expect(200, "GET", "/wasmgate/traffic", None);
    let pub_route = r1(&traffic).unwrap_or_else(|| panic!("no r1 in {traffic}"));
    assert_eq!(pub_route["requests"], 10, "{traffic}");
    assert_eq!(pub_route["2xx"], 10, "{traffic}");
    assert_eq!(pub_route["codes"]["200"], 10, "{traffic}");

    let status = api.expect(200, "GET", "/wasmgate/status", None);
    assert_eq!(status["workers"].as_array().unwrap().len(), 2);
    assert!(
        status["master"]["requests"].as_u64().unwrap() >= 10,
        "{status}"
    );
    let (s, _) = api.call("GET", "/wasmgate/workers", Auth::Header(VIEWER_KEY), None);
    assert_eq!(s, 200);
    let (s, _) = api.call("GET", "/wasmgate/status", Auth::None, None);
    assert_eq!(s, 401);
    let (s, plugins) = api.call("GET", "/wasmgate/plugins", Auth::Query(KEY), None);
    assert_eq!(s, 200);
    assert_eq!(
        plugins["plugins"].as_array().unwrap().len(),
        common::PLUGINS.len()
    );
    // APISIX's plugin endpoints: the names by priority, each one's schema.
    let (s, names) = api.call(
        "GET",
        "/apisix/admin/plugins/list",
        Auth::Header(VIEWER_KEY),
        None,
    );
    assert_eq!(s, 200);
    let names: Vec<&str> = names
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap())
        .collect();
    assert_eq!(names.len(), common::PLUGINS.len());
    assert!(names.contains(&"wasm_log"), "{names:?}");
    let all = api.expect(200, "GET", "/apisix/admin/plugins?all=true", None);
    assert_eq!(all["wasm_log"]["name"], "wasm_log");
    let schema = api.expect(200, "GET", "/apisix/admin/plugins/wasm_log", None);
    assert_eq!(schema["required"], json!(["conf"]));
    api.expect(404, "GET", "/apisix/admin/plugins/no_such_plugin", None);
    let (s, log) = api.call("GET", "/wasmgate/log?lines=5", Auth::Cookie(KEY), None);
    assert_eq!(s, 200);
    assert_eq!(log["lines"].as_array().unwrap().len(), 5, "{log}");
    let (s, metrics) = api.call("GET", "/wasmgate/metrics", Auth::Header(KEY), None);
    assert_eq!(s, 200);
    assert!(metrics.as_str().unwrap().contains("# TYPE "), "{metrics}");
    let (s, _) = api.call("GET", "/wasmgate/metrics", Auth::Header("nope"), None);
    assert_eq!(s, 401);

    // ---- the document is strict: real answers with a field renamed, dropped or added fail ---
    let t = "/apisix/admin/routes/{id}";
    let (st, sx, pl, lg, tr) = (
        "/wasmgate/status",
        "/wasmgate/stats",
        "/wasmgate/plugins",
        "/wasmgate/log",
        "/wasmgate/traffic",
    );
    let e = &r1_entry;
    let (c, c1e) = ("/apisix/admin/ssls/{id}", &c1_entry);
    #[rustfmt::skip]
    let mutations = [
        (t, "get", 200, renamed(e.clone(), "", "createdIndex", "created_index"), "a renamed createdIndex"),
        (t, "get", 200, removed(e.clone(), "", "modifiedIndex"), "a missing modifiedIndex"),
        (t, "get", 200, removed(e.clone(), "/value", "create_time"), "a missing create_time"),
        (t, "get", 200, set(e.clone(), "/value/id", json!(1)), "a numeric value.id"),
        (t, "get", 200, set(e.clone(), "/key", json!("/apisix/services/r1")), "another kind's key"),
        (t, "get", 200, set(e.clone(), "/extra", json!(1)), "an unknown field"),
        (t, "get", 200, renamed(e.clone(), "/value", "uri", "url"), "a renamed value.uri"),
        (t, "get", 404, json!({"error_msg": "Key not found"}), "error_msg instead of message"),
        (t, "put", 400, json!({"message": "x"}), "message instead of error_msg"),
        (t, "put", 401, json!({"error_msg": "failed to check token"}), "a missing description"),
        (t, "delete", 200, json!({"deleted": "r1"}), "a missing key"),
        (st, "get", 200, renamed(status.clone(), "/master", "generation", "gen"), "a renamed master.generation"),
        (st, "get", 200, removed(status.clone(), "/workers/0", "rss_bytes"), "a missing rss_bytes"),
        (st, "get", 200, set(status.clone(), "/workers/0/state", json!("free")), "an unknown worker state"),
        (st, "get", 200, set(status.clone(), "/store/kind", json!("etcd")), "etcd without its fields"),
        (sx, "get", 200, removed(stats.clone(), "/contexts/0", "p99_us"), "a missing p99_us"),
        (sx, "get", 200, renamed(stats.clone(), "/contexts/0/workers/0", "traps", "trap"), "a renamed traps"),
        (pl, "get", 200, set(plugins.clone(), "/plugins/0/instances/0/extra", json!(1)), "an unknown field"),
        (lg, "get", 200, set(log.clone(), "/lines/0", json!(1)), "a non-string line"),
        (st, "get", 200, removed(status.clone(), "/master", "requests"), "a missing master.requests"),
        (tr, "get", 200, removed(traffic.clone(), "/routes/0", "5xx"), "a missing 5xx"),
        (c, "get", 200, set(c1e.clone(), "/key", json!("/apisix/global_rules/c1")), "another kind's key"),
        (c, "get", 200, removed(c1e.clone(), "/value", "key"), "a missing value.key"),
        (c, "get", 200, set(c1e.clone(), "/value/snis", json!([])), "an empty snis"),
        (c, "get", 200, set(c1e.clone(), "/value/sni", json!("a.test")), "both sni and snis"),
        (c, "get", 200, set(c1e.clone(), "/value/type", json!("client")), "a client SSL object"),
    ];
    for (template, method, status, mutated, what) in mutations {
        refuses(&spec, template, method, status, mutated, what);
    }
    // A status code the document does not list is an error, not a pass.
    assert!(spec.response(t, "get", 201).is_err());
    assert!(spec.response("/wasmgate/status", "get", 500).is_err());
    assert!(spec.template("/apisix/admin/consumers").is_none());

    // ---- reload: refused, then applied -------------------------------------------------------
    let (s, _) = api.call("POST", "/wasmgate/reload", Auth::Header(VIEWER_KEY), None);
    assert_eq!(s, 401);
    let config = std::fs::read_to_string(gw.config_path()).unwrap();
    std::fs::write(gw.config_path(), format!("{config}\nwasm: [\n")).unwrap();
    let v = api.expect(400, "POST", "/wasmgate/reload", None);
    assert!(
        v["error_msg"]
            .as_str()
            .unwrap()
            .starts_with("reload refused: "),
        "{v}"
    );
    std::fs::write(gw.config_path(), config).unwrap();
    let v = api.expect(200, "POST", "/wasmgate/reload", None);
    assert_eq!(
        (&v["reloaded"], &v["epoch"]),
        (&json!(true), &json!(1)),
        "{v}"
    );
    // The test configuration uses APISIX's sample key: the reload says so, as `test` does.
    assert!(
        v["notes"][0]
            .as_str()
            .is_some_and(|n| n.contains("published sample key: anyone")),
        "{v}"
    );
    api.expect(200, "GET", "/wasmgate/status", None);

    // ---- deletes: refused while referenced, then in dependency order ------------------------
    let v = api.expect(400, "DELETE", "/apisix/admin/upstreams/u1", None);
    assert!(
        v["error_msg"]
            .as_str()
            .unwrap()
            .contains("is still using it now"),
        "{v}"
    );
    let v = api.expect(400, "DELETE", "/apisix/admin/services/s1", None);
    assert_eq!(
        v["error_msg"],
        "can not delete this service, route [r2] is still using it now"
    );
    for (kind, ids) in [
        ("routes", ["r1".to_string(), "r2".into(), r3]),
        ("plugin_configs", ["pc1".into(), "pc2".into(), "pc3".into()]),
        ("services", ["s1".into(), s2, "s3".into()]),
        ("upstreams", ["u1".into(), u2, "u3".into()]),
        ("global_rules", ["g1".into(), g2, "g3".into()]),
        ("ssls", ["c1".into(), c2, "c3".into()]),
    ] {
        for id in &ids {
            let v = api.expect(200, "DELETE", &format!("/apisix/admin/{kind}/{id}"), None);
            assert_eq!(v["deleted"], json!(id));
        }
        api.expect(
            404,
            "GET",
            &format!("/apisix/admin/{kind}/{}", ids[0]),
            None,
        );
        let list = api.expect(200, "GET", &format!("/apisix/admin/{kind}"), None);
        assert_eq!(list, json!({"total": 0, "list": []}));
    }

    // ---- every operation of the document was called ------------------------------------------
    let exercised = spec.exercised.borrow();
    let exempt: BTreeSet<(String, String)> = NOT_EXERCISED
        .iter()
        .map(|(p, m, _)| (p.to_string(), m.to_string()))
        .collect();
    let all = spec.operations();
    for e in &exempt {
        assert!(
            all.contains(e),
            "NOT_EXERCISED lists {e:?}, which the document lacks"
        );
        assert!(
            !exercised.contains(e),
            "NOT_EXERCISED lists {e:?}, which the test calls"
        );
    }
    let missed: Vec<_> = all
        .iter()
        .filter(|op| !exercised.contains(*op) && !exempt.contains(*op))
        .collect();
    assert!(
        missed.is_empty(),
        "operations of docs/openapi.yaml this test never called (call them, or list them in NOT_EXERCISED with a reason): {missed:?}"
    );
}
