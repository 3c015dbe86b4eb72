//! The Admin API's HTTP server.

use super::{objects, status};
use crate::state::{ApiKey, Control, Master};
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::Arc;
use subtle::ConstantTimeEq;
use wasmgate_shared::config::Role;
use wasmgate_shared::model::Kind;

/// Serves the Admin API on `listener` until the process ends.
pub async fn serve(
    listener: tokio::net::TcpListener,
    master: Arc<Master>,
    stop: crate::listeners::Stop,
) {
    crate::listeners::serve_http(listener, "admin", stop, move |req, peer| {
        let master = master.clone();
        async move { handle(&master, req, peer).await }
    })
    .await
}

fn reply(status: u16, body: Value) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp.headers_mut().insert(
        http::header::SERVER,
        http::HeaderValue::from_static(concat!("wasmgate/", env!("CARGO_PKG_VERSION"))),
    );
    resp
}

fn err(status: u16, msg: impl Into<String>) -> Response<Full<Bytes>> {
    reply(status, json!({ "error_msg": msg.into() }))
}

async fn handle(m: &Master, req: Request<Incoming>, peer: SocketAddr) -> Response<Full<Bytes>> {
    if !m.config().config.deployment.admin.enable_admin_cors {
        return answer(m, req, peer).await;
    }
    // APISIX's `enable_admin_cors`: what the preflight asks for is allowed (the key is still
    // checked on the request itself, and `*` lets no browser send cookies).
    let asked = |name: &str| {
        req.headers()
            .get(name)
            .filter(|v| !v.is_empty())
            .cloned()
            .unwrap_or(http::HeaderValue::from_static("*"))
    };
    let cors = [
        (
            "access-control-allow-origin",
            http::HeaderValue::from_static("*"),
        ),
        (
            "access-control-allow-methods",
            asked("access-control-request-method"),
        ),
        (
            "access-control-allow-headers",
            asked("access-control-request-headers"),
        ),
        (
            "access-control-max-age",
            http::HeaderValue::from_static("3600"),
        ),
    ];
    let mut resp = match req.method() == Method::OPTIONS {
        true => Response::new(Full::new(Bytes::new())),
        false => answer(m, req, peer).await,
    };
    for (name, value) in cors {
        resp.headers_mut()
            .insert(http::HeaderName::from_static(name), value);
    }
    resp
}

/// Answers one request (its key checked).
async fn answer(m: &Master, req: Request<Incoming>, peer: SocketAddr) -> Response<Full<Bytes>> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = parse_query(req.uri().query());
    let who = match authenticate(m, &req, &query) {
        Ok(k) => k,
        Err(desc) => {
            return reply(
                401,
                json!({"error_msg": "failed to check token", "description": desc}),
            )
        }
    };
    if who.as_ref().is_some_and(|k| k.role == Role::Viewer) && method != Method::GET {
        return reply(
            401,
            json!({"error_msg": "failed to check token", "description": "invalid method for role viewer"}),
        );
    }
    let config = m.config();
    let limit = config.config.deployment.admin.max_body_size as usize;
    // A body that stops coming would hold its connection and task for ever (hyper times out
    // heads only): the whole body within `client_body_timeout`, as the proxy's 408 says.
    // At least 100 ms, as the workers take it: `0s` would refuse nearly every body.
    let wait = (config.config.nginx_config.http.client_body_timeout)
        .max(std::time::Duration::from_millis(100));
    drop(config);
    let collected = tokio::time::timeout(wait, Limited::new(req.into_body(), limit).collect());
    let Ok(collected) = collected.await else {
        return err(
            408,
            format!(
                "request body not received within {wait:?} (nginx_config.http.client_body_timeout)"
            ),
        );
    };
    let body = match collected {
        Ok(b) => b.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return err(
                413,
                format!(
                    "request body too large (limit {limit} bytes, deployment.admin.max_body_size)"
                ),
            )
        }
        Err(e) => return err(400, format!("invalid request body: {e}")),
    };
    let resp = dispatch(m, &method, &path, &query, body).await;
    if method != Method::GET {
        let name = who.as_ref().map(|k| k.name.as_str()).unwrap_or("-");
        tracing::info!(
            "admin: {method} {path} by {name} from {} -> {}",
            peer.ip(),
            resp.status().as_u16()
        );
    }
    resp
}

/// Longest a write waits for the writes before it through this node (cluster mode).
const WRITE_QUEUE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// 405 naming the method and the path, with the methods the path takes in `Allow` (RFC 9110
/// §15.5.6: a 405 says what is allowed).
fn not_allowed(method: &Method, path: &str, allow: &'static str) -> Response<Full<Bytes>> {
    let mut r = err(405, format!("method {method} is not allowed on {path}"));
    r.headers_mut().insert(
        hyper::header::ALLOW,
        hyper::header::HeaderValue::from_static(allow),
    );
    r
}

/// APISIX's plugin endpoints, for dashboards and linters: `plugins/list` (the names of the
/// plugins routes may use: the `wasm.plugins` of config.yaml, by priority), `plugins/<name>`
/// (the schema of its configuration on a route: a `conf`, as APISIX's wasm plugins take it),
/// and `plugins` (each plugin with its priority, phase and schema).
fn plugins_endpoint(m: &Master, method: &Method, what: &str) -> Response<Full<Bytes>> {
    if method != Method::GET {
        return not_allowed(method, "plugins", "GET");
    }
    let cfg = m.config();
    let mut list: Vec<_> = cfg.config.wasm.plugins.iter().collect();
    list.sort_by(|a, b| b.priority.cmp(&a.priority).then(a.name.cmp(&b.name)));
    let schema = || {
        json!({
            "type": "object",
            "properties": {
                "conf": {"oneOf": [
                    {"type": "object", "minProperties": 1},
                    {"type": "string", "minLength": 1}
                ]},
                "_meta": {"type": "object", "properties": {"disable": {"type": "boolean"}}}
            },
            "required": ["conf"]
        })
    };
    match what {
        "list" => reply(200, json!(list.iter().map(|p| &p.name).collect::<Vec<_>>())),
        "" => reply(
            200,
            Value::Object(
                list.iter()
                    .map(|p| {
                        let about = json!({"name": p.name, "priority": p.priority,
                                           "http_request_phase": p.http_request_phase.as_str(),
                                           "schema": schema()});
                        (p.name.clone(), about)
                    })
                    .collect(),
            ),
        ),
        name => match list.iter().any(|p| p.name == name) {
            true => reply(200, schema()),
            false => err(404, format!("plugin not found: {name}")),
        },
    }
}

async fn dispatch(
    m: &Master,
    method: &Method,
    path: &str,
    query: &[(String, String)],
    body: Bytes,
) -> Response<Full<Bytes>> {
    if let Some(rest) = path.strip_prefix("/wasmgate/") {
        return wasmgate_endpoint(m, method, rest, query).await;
    }
    let Some(rest) = path.strip_prefix("/apisix/admin/") else {
        return err(404, format!("not found: {path}"));
    };
    if rest.trim_end_matches('/') == "plugins" || rest.starts_with("plugins/") {
        return plugins_endpoint(m, method, rest["plugins".len()..].trim_matches('/'));
    }
    let mut parts = rest.trim_end_matches('/').splitn(3, '/');
    let kind_seg = parts.next().unwrap_or("");
    // APISIX 2's path for SSL objects is `ssl`.
    let kind = match kind_seg {
        "ssl" => Some(Kind::Ssls),
        _ => Kind::parse(kind_seg),
    };
    let Some(kind) = kind else {
        return err(404, format!("Unsupported resource type: {kind_seg}"));
    };
    let id = parts.next().filter(|s| !s.is_empty());
    let sub = parts.next().filter(|s| !s.is_empty());
    if method != Method::GET && query.iter().any(|(n, _)| n == "ttl") {
        // Objects that expire are not kept: refused rather than stored for ever.
        return err(400, "ttl is not supported: objects do not expire");
    }
    let parse_body = || -> Result<Value, String> {
        if body.is_empty() {
            return Err("invalid request body: empty body".into());
        }
        serde_json::from_slice(&body).map_err(|e| format!("invalid request body: {e}"))
    };
    // In cluster mode this node's writes go one at a time (see `Etcd::writes`), and none
    // waits on an etcd known to be away or on a queue behind one that hangs.
    let _one_write =
        match &m.etcd {
            Some(etcd) if method != Method::GET => {
                if !etcd.reachable.load(std::sync::atomic::Ordering::Relaxed) {
                    return err(
                        503,
                        "the change was not stored: etcd unreachable or refusing this node (see \
                     the error log and GET /wasmgate/status); writes go through again once it \
                     answers",
                    );
                }
                match tokio::time::timeout(WRITE_QUEUE_WAIT, etcd.writes.lock()).await {
                    Ok(turn) => Some(turn),
                    Err(_) => return err(
                        503,
                        "the change was not stored: an earlier write through this node is still \
                         waiting for etcd",
                    ),
                }
            }
            _ => None,
        };
    let outcome: objects::Outcome = match (method, id, sub) {
        (&Method::GET, None, None) => {
            let arg = |k: &str| query.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
            let q = objects::ListQuery {
                name: arg("name"),
                uri: arg("uri"),
                label: arg("label"),
                page: arg("page"),
                page_size: arg("page_size"),
            };
            objects::list(m, kind, &q).into()
        }
        (&Method::GET, Some(id), None) => objects::get(m, kind, id).into(),
        (&Method::PUT, id, None) => match parse_body() {
            Ok(b) => objects::put(m, kind, id, b),
            Err(e) => return err(400, e),
        },
        // APISIX takes no POST for plugin configs: their id is required.
        (&Method::POST, None, None) if !kind.takes_post() => {
            return not_allowed(method, path, "GET, PUT");
        }
        (&Method::POST, None, None) => match parse_body() {
            Ok(b) => objects::post(m, kind, b),
            Err(e) => return err(400, e),
        },
        (&Method::PATCH, Some(id), sub) => match parse_body() {
            Ok(b) => objects::patch(m, kind, id, sub, b),
            Err(e) => return err(400, e),
        },
        (&Method::DELETE, Some(id), None) => {
            // APISIX's `?force=true`: deletes an upstream, service or plugin config that routes
            // still use (their requests then get 503, or 404 for a service's).
            let force = query.iter().any(|(n, v)| n == "force" && v == "true");
            objects::delete(m, kind, id, force)
        }
        _ => {
            let allow = match (id, sub) {
                (None, _) if !kind.takes_post() => "GET, PUT",
                (None, _) => "GET, PUT, POST",
                (Some(_), None) => "GET, PUT, PATCH, DELETE",
                (Some(_), Some(_)) => "PATCH",
            };
            return not_allowed(method, path, allow);
        }
    };
    let (status, value) = match (outcome, &m.etcd) {
        (objects::Outcome::Done(r), _) => r,
        (objects::Outcome::Commit(change), Some(etcd)) => {
            crate::etcd::commit(m, etcd, change).await
        }
        (objects::Outcome::Commit(_), None) => (500, json!({"error_msg": "no etcd configured"})),
    };
    reply(status, value)
}

async fn wasmgate_endpoint(
    m: &Master,
    method: &Method,
    rest: &str,
    query: &[(String, String)],
) -> Response<Full<Bytes>> {
    match (method, rest.trim_end_matches('/')) {
        (&Method::GET, "status") | (&Method::GET, "workers") => reply(200, status::gateway(m)),
        (&Method::GET, "stats") => reply(200, status::stats(m)),
        (&Method::GET, "traffic") => reply(200, status::traffic(m)),
        (&Method::GET, "plugins") => reply(200, status::plugins(m)),
        (&Method::GET, "healthcheck") => reply(200, status::healthcheck(m)),
        (&Method::GET, "log") => {
            let lines = query
                .iter()
                .find(|(k, _)| k == "lines")
                .and_then(|(_, v)| v.parse().ok())
                .unwrap_or(200);
            match status::log(m, lines) {
                Ok(v) => reply(200, v),
                Err(e) => err(500, e),
            }
        }
        (&Method::GET, "metrics") => {
            let mut r = Response::new(Full::new(Bytes::from(crate::metrics::render(m))));
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
            );
            r
        }
        (&Method::POST, "reload") => {
            let (tx, rx) = tokio::sync::oneshot::channel();
            if m.control.send(Control::Reload(tx)).is_err() {
                return err(503, "the master is shutting down");
            }
            match rx.await {
                Ok(Ok(r)) => reply(
                    200,
                    json!({ "reloaded": true, "epoch": r.epoch, "notes": r.notes }),
                ),
                Ok(Err(e)) => err(400, format!("reload refused: {e}")),
                Err(_) => err(503, "the master is shutting down"),
            }
        }
        _ => err(404, format!("not found: /wasmgate/{rest}")),
    }
}

/// Finds the caller's key: `X-API-KEY` header, `api_key` query argument or `x_api_key` cookie.
/// `Ok(None)` when keys are not required.
fn authenticate(
    m: &Master,
    req: &Request<Incoming>,
    query: &[(String, String)],
) -> Result<Option<ApiKey>, &'static str> {
    let (config, keys) = m.config_and_keys();
    if !config.config.deployment.admin.admin_key_required {
        return Ok(None);
    }
    let presented = req
        .headers()
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(|| {
            query
                .iter()
                .find(|(k, _)| k == "api_key")
                .map(|(_, v)| v.clone())
        })
        .or_else(|| cookie(req, "x_api_key"));
    let Some(presented) = presented else {
        return Err("missing apikey");
    };
    // Compare against every key, without early exit, so timing reveals nothing.
    let mut found = None;
    for k in keys.iter() {
        if keys_equal(k.key.as_bytes(), presented.as_bytes()) && found.is_none() {
            found = Some(k.clone());
        }
    }
    found.map(Some).ok_or("wrong apikey")
}

/// Constant-time comparison that also hides the length of the configured key.
fn keys_equal(expected: &[u8], presented: &[u8]) -> bool {
    const MAX: usize = 256;
    if expected.is_empty() || expected.len() > MAX || presented.len() > MAX {
        return false;
    }
    let mut a = [0u8; MAX];
    let mut b = [0u8; MAX];
    a[..expected.len()].copy_from_slice(expected);
    b[..presented.len()].copy_from_slice(presented);
    let same_len = (expected.len() as u64).ct_eq(&(presented.len() as u64));
    bool::from(a.ct_eq(&b) & same_len)
}

fn cookie(req: &Request<Incoming>, name: &str) -> Option<String> {
    let values = req
        .headers()
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok());
    wasmgate_shared::cookie(values, name)
}

fn parse_query(q: Option<&str>) -> Vec<(String, String)> {
    q.map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::keys_equal;

    #[test]
    fn key_comparison() {
        assert!(keys_equal(b"abc", b"abc"));
        assert!(!keys_equal(b"abc", b"abd"));
        assert!(!keys_equal(b"abc", b"abcd"));
        assert!(!keys_equal(b"abc", b""));
        assert!(!keys_equal(b"", b""));
    }
}
