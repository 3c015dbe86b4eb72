//! Plugins' `proxy_http_call`s, performed with the worker's upstream connection pool.
//!
//! The call's target ("cluster" in Envoy's words) is an upstream object id of the current
//! configuration — a node is picked by its balancer — or a literal `host:port`. The headers
//! must carry `:method`, `:path` and `:authority` (the host checks that before dispatching);
//! `:authority` becomes the `Host` header. A target that is neither is refused when the plugin
//! dispatches (BadArgument, as Envoy answers for an unknown cluster). The answer's body is read up to
//! [`MAX_RESPONSE_BODY`]. A call that fails before its node answers gets the answer Envoy's
//! async client makes then ([`CallResponse::local`]: 503 when the node cannot be reached or
//! drops the call, 504 when its read timeout ends); one that breaks after (or whose answer is
//! too long) gets an answer with no headers, as Envoy's reset.

use crate::body::{self, ProxyBody};
use crate::plugins::Callout;
use crate::upstream::h1::ResponseBody;
use crate::upstream::pool::{Conn, ConnectError};
use crate::upstream::tls::Handshake;
use crate::Worker;
use http::header::{HeaderName, HeaderValue};
use http::Request;
use http_body::Body as _;
use http_body_util::BodyExt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::time::Duration;
use wasmgate_wasm::{CallResponse, HttpCall};

/// Largest call-out answer body kept; a longer one fails the call.
pub const MAX_RESPONSE_BODY: usize = 4 << 20;
/// Connect timeout towards a literal `host:port` target (upstream objects have their own).
const LITERAL_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The worker's call-out client.
pub struct WorkerCallout {
    worker: Weak<Worker>,
}

impl WorkerCallout {
    pub fn new(worker: Weak<Worker>) -> WorkerCallout {
        WorkerCallout { worker }
    }
}

impl Callout for WorkerCallout {
    /// An upstream of the current configuration, or a literal `host:port`.
    fn knows(&self, target: &str) -> bool {
        is_literal(target)
            || self
                .worker
                .upgrade()
                .is_some_and(|w| w.live.current().upstream(target).is_some())
    }

    fn call(&self, c: HttpCall) -> Pin<Box<dyn Future<Output = Option<CallResponse>> + Send>> {
        let w = self.worker.upgrade();
        Box::pin(async move {
            let w = w?;
            let target = c.target.clone();
            match perform(&w, c).await {
                Ok(r) => Some(r),
                Err(Failure::Answered(answer, why)) => {
                    tracing::warn!("http call to {target:?} failed: {why}");
                    Some(answer)
                }
                Err(Failure::Reset(why)) => {
                    tracing::warn!("http call to {target:?} failed: {why}");
                    None
                }
            }
        })
    }
}

/// A `host:port` target (as opposed to an upstream id).
fn is_literal(target: &str) -> bool {
    // A host is a name or an address: no scheme, user or path may come with it.
    let plain_host = |h: &str| {
        !h.is_empty()
            && !h
                .bytes()
                .any(|b| matches!(b, b'/' | b'@' | b'?' | b'#') || b.is_ascii_whitespace())
    };
    target
        .rsplit_once(':')
        .is_some_and(|(h, p)| plain_host(h) && p.parse::<u16>().is_ok())
}

/// Where a call goes: the node, the handshake a new connection to it makes, its timeouts.
struct Destination {
    authority: Arc<str>,
    tls: Option<Handshake>,
    connect_timeout: Duration,
    read_timeout: Duration,
}

/// Where a target points. An upstream's node is reached as the upstream says (over TLS for
/// `scheme: https`, the call's `:authority` as the name); a `host:port` one over plain HTTP.
fn resolve(w: &Worker, target: &str, host: Option<&HeaderValue>) -> Result<Destination, Failure> {
    let cfg = w.live.current();
    if let Some(up) = cfg.upstream(target) {
        let idx = up.pick(None, &[]).ok_or_else(|| {
            let why = format!("upstream {target} has no node");
            Failure::Answered(CallResponse::local(503, "no healthy upstream"), why)
        })?;
        let tls = up
            .handshake(idx, host)
            .map_err(|e| unreached("connection failure", e.to_string()))?;
        return Ok(Destination {
            authority: up.authorities[idx].clone(),
            tls,
            connect_timeout: up.connect_timeout,
            read_timeout: up.read_timeout,
        });
    }
    if !is_literal(target) {
        // Checked when the call was dispatched: the upstream was deleted since.
        let why = format!("{target}: neither an upstream id nor host:port");
        return Err(Failure::Answered(
            CallResponse::local(503, "no healthy upstream"),
            why,
        ));
    }
    Ok(Destination {
        authority: Arc::from(target),
        tls: None,
        connect_timeout: LITERAL_CONNECT_TIMEOUT,
        read_timeout: Duration::from_secs(60),
    })
}

fn request(c: &HttpCall) -> Result<Request<ProxyBody>, String> {
    let pseudo = |n: &str| {
        c.headers
            .iter()
            .find(|(k, _)| k == n)
            .map(|(_, v)| v.as_slice())
            .unwrap_or_default()
    };
    let mut req = Request::new(body::full(c.body.clone()));
    *req.method_mut() =
        http::Method::from_bytes(pseudo(":method")).map_err(|_| "invalid :method".to_string())?;
    *req.uri_mut() = http::Uri::try_from(pseudo(":path")).map_err(|_| "invalid :path")?;
    let h = req.headers_mut();
    h.insert(
        http::header::HOST,
        HeaderValue::from_bytes(pseudo(":authority")).map_err(|_| "invalid :authority")?,
    );
    for (k, v) in c.headers.iter().filter(|(k, _)| !k.starts_with(':')) {
        let name = HeaderName::from_bytes(k.as_bytes()).map_err(|_| format!("bad header {k}"))?;
        let value = HeaderValue::from_bytes(v).map_err(|_| format!("bad value for {k}"))?;
        // Fallible: `append` panics past 32768 entries.
        h.try_append(name, value)
            .map_err(|_| format!("{} headers: too many", c.headers.len()))?;
    }
    if !c.body.is_empty() {
        h.insert(
            http::header::CONTENT_LENGTH,
            HeaderValue::from(c.body.len()),
        );
    }
    Ok(req)
}

/// Why a call has no answer of its node's.
enum Failure {
    /// Before the node answered: the answer Envoy's router makes then, and what happened.
    Answered(CallResponse, String),
    /// After its answer began, or before it was sent: no answer at all.
    Reset(String),
}

/// A call that never reached its node, or that the node dropped before answering.
fn unreached(reason: &str, why: String) -> Failure {
    let body = format!(
        "upstream connect error or disconnect/reset before headers. reset reason: {reason}"
    );
    Failure::Answered(CallResponse::local(503, &body), why)
}

async fn perform(w: &Worker, c: HttpCall) -> Result<CallResponse, Failure> {
    let req = request(&c).map_err(Failure::Reset)?;
    let Destination {
        authority,
        tls,
        connect_timeout,
        read_timeout,
    } = resolve(w, &c.target, req.headers().get(http::header::HOST))?;
    let now = std::time::Instant::now();
    let conn = match tls {
        Some(tls) => {
            w.pool
                .checkout_tls(&authority, tls, connect_timeout, now)
                .await
        }
        None => w.pool.checkout(&authority, connect_timeout, now).await,
    };
    let Conn { mut link, .. } = conn.map_err(|e| {
        let reason = match e {
            ConnectError::Timeout(_) => "connection timeout",
            _ => "connection failure",
        };
        unreached(reason, format!("connect to {authority}: {e}"))
    })?;
    let (parts, body) = req.into_parts();
    let out = link
        .wire
        .encode_head(&parts.method, &parts.uri, &parts.headers, &[], &body);
    let body = (!body.is_end_stream()).then_some(body);
    let exchange = async {
        link.wire.write_head().await?;
        link.wire.exchange(body, out).await
    };
    let head = tokio::time::timeout(read_timeout, exchange)
        .await
        .map_err(|_| {
            let why = format!("{authority}: no answer within {read_timeout:?}");
            Failure::Answered(CallResponse::timed_out(), why)
        })?
        .map_err(|e| unreached("connection termination", format!("{authority}: {e}")))?;
    // Through the pool's body so the connection is reused once the answer is read.
    let body = ResponseBody::new(link, &head, w.pool.clone(), authority, read_timeout);
    let collected = http_body_util::Limited::new(body, MAX_RESPONSE_BODY)
        .collect()
        .await
        .map_err(|e| Failure::Reset(format!("reading the answer: {e}")))?;
    let trailers = collected
        .trailers()
        .map(crate::wasm_glue::header_pairs)
        .unwrap_or_default();
    let mut headers = vec![(
        ":status".to_string(),
        head.status.as_str().as_bytes().to_vec(),
    )];
    headers.extend(crate::wasm_glue::header_pairs(&head.headers));
    Ok(CallResponse {
        headers,
        body: collected.to_bytes().to_vec(),
        trailers,
    })
}
