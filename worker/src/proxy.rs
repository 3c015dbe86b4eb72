//! The life of one proxied request, phase by phase (the names are APISIX's and nginx's):
//!
//! 1. **rewrite** and 2. **access** — the route is matched; plugins of each phase run on the
//!    request headers (the Proxy-Wasm host hooks in here). Requests no route matches end with
//!    404 `{"error_msg":"404 Route Not Found"}`.
//! 3. **upstream** — [`forward`]: a node is picked by the upstream's balancer, a pooled or new
//!    connection is used, a connect failure moves on to the next node (up to `retries`), and so
//!    does a failure or timeout before the answer's head for an idempotent request without a
//!    body (nginx's default `proxy_next_upstream error timeout`); no node → 502, no answer in
//!    `timeout.read` → 504.
//! 4. **header_filter** — [`header_filter`]: hop-by-hop headers go, `Server` is set, and while the
//!    worker drains, `Connection: close` tells keep-alive clients to reconnect elsewhere.
//! 5. **body_filter** — bodies stream through untouched in both directions.
//! 6. **log** — when the response body ends (or the client leaves), the access-log line is
//!    written and the upstream node's active count is released.

use crate::access_log::{AccessLog, Entry};
use crate::body::{self, Observed, ProxyBody};
use crate::live::Compiled;
use crate::plugins::{Active, Dir, Verdict, WasmRequest};
use crate::router::{RequestView, RouteEntry};
use crate::server::tls::Certs;
use crate::server::ClientBody;
use crate::tunnel::{self, Carried};
use crate::upstream::h1::{ExchangeError, ResponseBody};
use crate::upstream::health::Attempt;
use crate::upstream::pool::{Conn, ConnectError};
use crate::upstream::{Busy, UpstreamRuntime};
use crate::wasm_body::{BodyFailure, PluginBody, Primed};
use crate::wasm_glue;
use crate::Worker;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body::Body as _;
use http_body_util::BodyExt;
use smallvec::SmallVec;
use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use wasmgate_http1::codec::{self, SetField, SetFields};
use wasmgate_http1::request::{host_name, normalized_path, resolve_path, HostSeen};
use wasmgate_shared::clock::Tick;
use wasmgate_shared::logformat;
use wasmgate_shared::model::{HashOn, PassHost};
use wasmgate_shared::traffic::Observation;
use wasmgate_wasm::{flags, AnswerDetails, Downstream, Head, Stream, Totals};

/// What the log phase needs to know about the upstream exchange.
#[derive(Default)]
struct UpstreamLog {
    /// Every node tried, in order (`$upstream_addr`): one, nearly always.
    addrs: SmallVec<[Arc<str>; 1]>,
    /// The upstream speaks TLS to its nodes (`$upstream_scheme`).
    https: bool,
    /// The last attempt's status; none when the client's body failed (`$upstream_status`).
    status: Option<u16>,
    time: Option<Duration>,
    /// When the answer's head came: the response phase's plugin timing starts from it
    /// instead of reading the clock again, and `$upstream_response_time` adds the body's
    /// time from it.
    answered: Option<Tick>,
    /// The node counted busy until the request ends (least_conn).
    active: Option<Busy>,
    /// The `Host` and target the last attempt sent (`$upstream_host`, `$upstream_uri`): kept
    /// only when the access log's format shows them.
    host: Option<HeaderValue>,
    uri: Option<http::Uri>,
}

impl UpstreamLog {
    /// `$upstream_scheme`.
    fn scheme(&self) -> &'static str {
        match self.https {
            true => "https",
            false => "http",
        }
    }
}

/// The client of a connection: its address, and the address as header text (`X-Real-IP`,
/// `X-Forwarded-For`), made once per connection instead of formatted for every request.
#[derive(Clone)]
pub struct Client {
    pub addr: SocketAddr,
    pub ip: HeaderValue,
    /// The gateway's side of the connection.
    pub local: SocketAddr,
    /// The worker's count of its connections ([`Client::id`]).
    number: u32,
    /// The connection's peer is one of `apisix.trusted_addresses` (judged on the peer, before
    /// `real_ip_from` may name another client).
    pub trusted_peer: bool,
    /// The connection came over TLS (`$scheme` is `https`): the name its client asked for.
    /// One pointer, and the connection's number 32 bits: a client is moved with every
    /// request, and stays at the 120 bytes it had before TLS.
    pub tls: Option<Arc<TlsInfo>>,
}

/// What the TLS listener knows of a client connection (defined beside the plugins' view of
/// the client, which holds it too).
pub use wasmgate_wasm::TlsInfo;

impl Client {
    /// The same connection, its client at `addr` (the address a trusted proxy named).
    fn at(self, addr: SocketAddr) -> Client {
        let ip = ip_text(addr.ip());
        Client { addr, ip, ..self }
    }

    /// `$scheme`: `https` over the TLS listener.
    pub fn scheme(&self) -> &'static str {
        scheme_of(self.tls.as_deref())
    }

    /// Unique on the host while the worker lives: its pid, then a count of its connections.
    pub fn id(&self) -> u64 {
        static PID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
        let pid = *PID.get_or_init(std::process::id);
        (u64::from(pid) << 32) | u64::from(self.number)
    }

    /// `tls`: over the TLS listener, with the name (SNI) its client asked for, if any.
    pub fn new(addr: SocketAddr, local: SocketAddr, tls: Option<Arc<TlsInfo>>) -> Client {
        static CONNECTIONS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let ip = ip_text(addr.ip());
        let number = CONNECTIONS.fetch_add(1, Ordering::Relaxed);
        Client {
            addr,
            ip,
            local,
            number,
            trusted_peer: false,
            tls,
        }
    }
}

/// An address as header text (`X-Real-IP`, `X-Forwarded-For`). Its text is digits, dots,
/// colons and hex letters: always a valid value.
fn ip_text(ip: IpAddr) -> HeaderValue {
    HeaderValue::from_maybe_shared(Bytes::from(ip.to_string()))
        .unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// nginx's realip module (`real_ip_from`, `real_ip_header`, `real_ip_recursive`): a peer in
/// `from` — a load balancer or proxy the operator runs — may name the client in `header`.
pub struct RealIp {
    header: HeaderName,
    from: wasmgate_shared::model::vars::CidrList,
    recursive: bool,
}

impl RealIp {
    /// None when no peer is trusted (`real_ip_from` empty, or only `unix:`).
    pub fn new(http: &wasmgate_shared::config::HttpSection) -> Option<RealIp> {
        let from = wasmgate_shared::model::vars::CidrList::parse(&http.real_ip_from);
        let header = HeaderName::from_bytes(http.real_ip_header.as_bytes()).ok()?;
        (!from.is_empty()).then_some(RealIp {
            header,
            from,
            recursive: http.real_ip_recursive,
        })
    }

    fn trusted(&self, ip: IpAddr) -> bool {
        self.from.contains(ip)
    }

    /// The request's client: the connection's peer, or the address the header names when
    /// the peer is trusted. The header's lines form one list (as `X-Forwarded-For`'s), read
    /// from the right as nginx reads it, never further than needed: without `recursive`, the
    /// last address; with it, the last one that is not trusted itself, or the last trusted
    /// one read before the list ends or holds something that is not an address. The part of
    /// the list a client wrote is never looked at once an address is found, and nothing in
    /// it can make the trusted proxy itself the client.
    pub fn client(&self, client: Client, headers: &HeaderMap) -> Client {
        if !self.trusted(client.addr.ip()) {
            return client;
        }
        let items = headers
            .get_all(&self.header)
            .iter()
            .rev()
            .flat_map(|v| v.as_bytes().rsplit(|b| *b == b','))
            .map(<[u8]>::trim_ascii)
            .filter(|i| !i.is_empty());
        let mut chosen = None;
        for item in items {
            let Some(ip) = std::str::from_utf8(item).ok().and_then(address) else {
                break;
            };
            chosen = Some(ip);
            if !self.recursive || !self.trusted(ip) {
                break;
            }
        }
        match chosen {
            Some(ip) => {
                let port = client.addr.port();
                client.at(SocketAddr::new(ip, port))
            }
            None => client,
        }
    }
}

/// An address as headers write them: `1.2.3.4`, `1.2.3.4:5678`, `2001:db8::1`,
/// `[2001:db8::1]:443`.
fn address(item: &str) -> Option<IpAddr> {
    if let Ok(ip) = item.parse() {
        return Some(ip);
    }
    item.parse::<SocketAddr>().ok().map(|a| a.ip())
}

/// What [`handle`] gives the server for a request.
pub struct Answer {
    pub response: Response<ProxyBody>,
    /// Where the answer's headers go once written: back to the plugins.
    pub back: HeadersBack,
    /// The request's id, set on the answer as the server writes it ([`answer_fields`]).
    pub request_id: Option<HeaderValue>,
}

/// Serves one client request.
pub async fn handle(w: Arc<Worker>, req: Request<ClientBody>, mut client: Client) -> Answer {
    if !w.trusted.is_empty() {
        client.trusted_peer = w.trusted.contains(client.addr.ip());
    }
    let client = match &w.real_ip {
        Some(r) => r.client(client, req.headers()),
        None => client,
    };
    let peer = client.addr;
    w.segment
        .slot(w.slot)
        .requests
        .fetch_add(1, Ordering::Relaxed);
    let cfg = w.live.current();
    let (mut parts, body) = req.into_parts();
    // Boxed: it goes on to the log phase's closure, and moving it (some 300 bytes) from the
    // request's future into the body wrapper took several copies per request.
    let seen = body.seen();
    let mut log = Box::new(LogInfo::new(&parts, (&client, seen.host), &w.access_log));
    // The head's bytes as the client sent them (the parser refused one over
    // `client_max_header_size`).
    log.head_bytes = seen.size as u64;
    // The fields `Connection` names go as the message came, once the client's address and
    // the log's captures are read: before the request id is added and plugins run, so that
    // naming a field takes away only what the client sent. Looked up only when the parser
    // saw `Connection` name any.
    if seen.nominates {
        codec::strip_nominated(&mut parts.headers);
    }
    log.request_id = request_id(&mut parts.headers);
    log.abandoned = Some(w.clone());
    let (route, resolved) = {
        // Matched as nginx matches locations: on the path decoded and resolved (`$uri`).
        let (path, resolved) = match resolve_path(parts.uri.path()) {
            Ok(resolved) => resolved,
            Err(why) => {
                tracing::info!("bad request from {peer}: {why}");
                return refusal(w, StatusCode::BAD_REQUEST, log);
            }
        };
        if let Some(why) = client
            .tls
            .as_deref()
            .and_then(|t| mtls_refusal(t, &cfg.certs, &path, log.host.as_str()))
        {
            tracing::info!("client {peer}: {why}: answered 400");
            return refusal(w, StatusCode::BAD_REQUEST, log);
        }
        let route = {
            let lookup = |name: &str| nginx_var(&parts, &client, name);
            let view = RequestView {
                method: &parts.method,
                host: log.host.as_str(),
                path: &path,
                remote: peer.ip(),
                vars: &lookup,
            };
            cfg.router.find(&view).cloned()
        };
        (route, resolved)
    };
    // A path with dot segments goes on resolved: the node, and the plugins, see the path the
    // route was chosen by (`/admin/../public/x` is `/public/x` to them too, not a path a node
    // that keeps or resolves dot segments otherwise might read as under `/admin/`). One that
    // was only decoded or had slashes merged goes as written: the route chosen by its decoded
    // form is the one a decoding node serves, and an escaped slash (`a%2Fb`) stays escaped.
    if let Some(path) = resolved {
        if set_path(&mut parts.uri, &path).is_err() {
            return refusal(w, StatusCode::BAD_REQUEST, log);
        }
    }
    let mut wasm = None;
    let no_body = body.is_end_stream();
    // The length the client declared, as the parser framed the body (no header lookup); read
    // before the size limit wraps the body and caps its hint.
    let declared = body.size_hint().exact();
    // A request without a body (most GETs) needs no size limit or read timer around it.
    let body = match no_body {
        true => body::empty(),
        false => {
            let received = Arc::new(std::sync::atomic::AtomicU64::new(0));
            log.body_bytes = Some(received.clone());
            client_body(body, w.max_body_size, w.body_timeout, received)
        }
    };
    // Global rules run for a request no route matched too (APISIX's rule): their plugins
    // may answer it (an auth plugin's 401); otherwise it is the 404.
    let route = match route {
        Some(route) => {
            log.route = Some(route.clone());
            Some(route)
        }
        None if !cfg.global_rules.is_empty() => Some(RouteEntry::unmatched()),
        None => None,
    };
    let resp = match &route {
        None => not_found(),
        Some(route) => {
            let resp = serve_route(
                &w,
                &cfg,
                route,
                &mut parts,
                (body, no_body, declared),
                (&client, log.started),
                &mut log.upstream,
                &mut wasm,
            )
            .await;
            match &wasm {
                Some(shared) => own_answer(shared, resp),
                None => resp,
            }
        }
    };
    let mut resp = header_filter(resp);
    // Answer in the client's protocol version, whatever the upstream spoke.
    *resp.version_mut() = parts.version;
    let back = HeadersBack(wasm.clone());
    let request_id = log.request_id.clone();
    Answer {
        response: log_phase(w, resp, log, wasm),
        back,
        request_id,
    }
}

/// Replaces the path of `uri`, keeping its query (and scheme and authority, if any).
fn set_path(uri: &mut http::Uri, path: &str) -> Result<(), http::Error> {
    let target = match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    };
    let mut parts = std::mem::take(uri).into_parts();
    parts.path_and_query = Some(target.try_into()?);
    *uri = http::Uri::from_parts(parts)?;
    Ok(())
}

/// APISIX's answer when no route matches.
fn not_found() -> Response<ProxyBody> {
    let why = AnswerDetails::of("route_not_found", flags::NO_ROUTE_FOUND);
    because(
        json_error(StatusCode::NOT_FOUND, "404 Route Not Found"),
        why,
    )
}

/// A plugin failed the request (a fault, a context it could not make): Envoy's 503.
fn plugin_failed() -> Response<ProxyBody> {
    let why = AnswerDetails::of("wasm_fail_stream", 0);
    because(error_page(StatusCode::SERVICE_UNAVAILABLE), why)
}

/// Plugins left a request head HTTP cannot carry.
fn plugins_broke_request() -> Response<ProxyBody> {
    let why = AnswerDetails::of("wasm_invalid_request_headers", 0);
    because(error_page(StatusCode::INTERNAL_SERVER_ERROR), why)
}

/// The answer to a client whose request body failed: over its size limit, stalled, or not
/// HTTP.
fn client_failed(status: StatusCode) -> Response<ProxyBody> {
    let why = match status {
        StatusCode::PAYLOAD_TOO_LARGE => AnswerDetails::of("request_payload_too_large", 0),
        StatusCode::REQUEST_TIMEOUT => {
            AnswerDetails::of("stream_idle_timeout", flags::STREAM_IDLE_TIMEOUT)
        }
        _ => AnswerDetails::of(
            "downstream_protocol_error",
            flags::DOWNSTREAM_PROTOCOL_ERROR,
        ),
    };
    because(error_page(status), why)
}

/// The error page for a request refused before routing, logged.
fn refusal(w: Arc<Worker>, status: StatusCode, log: Box<LogInfo>) -> Answer {
    let resp = header_filter(error_page(status));
    let request_id = log.request_id.clone();
    Answer {
        response: log_phase(w, resp, log, None),
        back: HeadersBack(None),
        request_id,
    }
}

/// A request's Proxy-Wasm state once it is shared with its body filters and the log phase.
type SharedWasm = Arc<Mutex<WasmRequest>>;

fn lock(w: &SharedWasm) -> std::sync::MutexGuard<'_, WasmRequest> {
    w.lock().unwrap_or_else(|e| e.into_inner())
}

#[allow(clippy::too_many_arguments)]
async fn serve_route(
    w: &Worker,
    cfg: &Compiled,
    route: &Arc<RouteEntry>,
    parts: &mut http::request::Parts,
    (mut body, no_body, declared): (ProxyBody, bool, Option<u64>),
    (client, started): (&Client, Tick),
    up_log: &mut UpstreamLog,
    wasm: &mut Option<SharedWasm>,
) -> Response<ProxyBody> {
    if let Some(why) = &route.broken {
        // APISIX's answer to a route whose plugin config is gone: 503 before any plugin, the
        // global rules' included, rather than serving it without the plugins it names.
        let host = parts.headers.get(http::header::HOST);
        tracing::error!(
            "route {}: {why}{}",
            route.id,
            upstream_context(client, parts, None, host)
        );
        return because(
            error_page(StatusCode::SERVICE_UNAVAILABLE),
            AnswerDetails::of("plugin_config_not_found", 0),
        );
    }
    let max = w.max_body_size;
    if max > 0 && declared.is_some_and(|n| n > max) {
        return client_failed(StatusCode::PAYLOAD_TOO_LARGE);
    }
    let mut cut = None;
    let chain = w.plugins.chain(&cfg.global_rules, route);
    if !chain.is_empty() {
        let from = Downstream {
            peer: client.addr,
            local: client.local,
            connection: client.id(),
            version: parts.version,
            tls: client.tls.clone(),
            started,
        };
        // Made in its box: a stream is large, and the box would otherwise be filled by a copy.
        let stream = crate::boxed_in_place(|| {
            Stream::new(
                wasm_glue::request_head(parts, client.scheme()),
                route.clone(),
                from,
            )
        });
        let mut req = WasmRequest::new(w.plugins.clone(), stream, chain.len());
        let verdict = w.plugins.on_request(&chain, &mut req, no_body).await;
        let wants_body = !no_body && req.wants_body(Dir::Request);
        let early = match verdict {
            Verdict::Reply(r) => Some(wasm_glue::local_reply(r)),
            Verdict::Fail => Some(plugin_failed()),
            // The headers went into the plugins' head: they come back from it (moved, unless
            // body callbacks may read them while the request goes upstream).
            Verdict::Continue => match req.stream.as_mut() {
                Some(stream) => wasm_glue::apply_request(&mut stream.request, parts, wants_body)
                    .err()
                    .map(|e| {
                        tracing::error!("route {}: plugins left an invalid request: {e}", route.id);
                        plugins_broke_request()
                    }),
                None => {
                    tracing::error!("route {}: the request was lost in a plugin", route.id);
                    Some(plugins_broke_request())
                }
            },
        };
        let shared = Arc::new(Mutex::new(req));
        *wasm = Some(shared.clone());
        // A local reply (or an error page) made in the request phase goes through the
        // response phase of the contexts that ran, the replying one included, as Envoy sends
        // a local reply through the filters that saw the request and APISIX runs every
        // plugin's header_filter on an `ngx.exit`: a CORS plugin's headers reach an auth
        // plugin's 401.
        if let Some(resp) = early {
            restore_headers(&shared, parts);
            return response_phase(w, &shared, resp, None, &String::new).await;
        }
        if wants_body {
            match request_body(w, &shared, body, parts).await {
                Ok((b, failure)) => {
                    body = b;
                    cut = Some(failure);
                }
                Err(resp) => return response_phase(w, &shared, resp, None, &String::new).await,
            }
        }
    }
    let resp = match &route.upstream {
        None if route.is_unmatched() => not_found(),
        None => {
            // APISIX's error line for the same 503: the route names no upstream, or names an
            // upstream object that was deleted (`DELETE …?force=true`).
            let host = parts.headers.get(http::header::HOST);
            tracing::error!(
                "route {}: missing upstream configuration in Route or Service{}",
                route.id,
                upstream_context(client, parts, None, host)
            );
            because(
                json_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "missing upstream configuration in Route or Service",
                ),
                AnswerDetails::of("cluster_not_found", flags::NO_CLUSTER_FOUND),
            )
        }
        Some(up) => forward(w, up, (parts, route.websocket), body, client, up_log).await,
    };
    if let Some(shared) = wasm.as_ref() {
        if let Some(stream) = lock(shared).stream.as_mut() {
            wasm_glue::restore_request(&mut stream.request, parts);
            stream.upstream = up_log.addrs.last().cloned();
        }
    }
    // A plugin cut the request body while it streamed: its verdict, not the upstream's.
    let failure = cut.and_then(|f| f.lock().unwrap_or_else(|e| e.into_inner()).take());
    let (resp, answered) = match failure {
        Some(f) => (
            failure_response(f, StatusCode::PAYLOAD_TOO_LARGE, &String::new),
            None,
        ),
        None => (resp, up_log.answered),
    };
    // Where an error line about the answer says it happened, made only for one.
    let up_log = &*up_log;
    let at = || {
        let host = parts.headers.get(header::HOST);
        upstream_context(
            client,
            parts,
            up_log.addrs.last().map(|a| (up_log.scheme(), &**a)),
            host,
        )
    };
    match wasm.as_ref() {
        Some(shared) => response_phase(w, shared, resp, answered, &at).await,
        None => resp,
    }
}

/// An answer the gateway or a plugin made in place of the upstream's (a local reply, an error
/// page): the plugins' later callbacks read it as the response — `response.code` and its
/// headers in `proxy_on_log` — as Envoy shows a local reply. The upstream's answer, whose
/// headers the response phase lent to it, is left as it is.
fn own_answer(shared: &SharedWasm, mut resp: Response<ProxyBody>) -> Response<ProxyBody> {
    // A reset stream has no answer: the log phase finds none (not the upstream's, dropped
    // by a reset in the response phase), as after a client that left.
    if is_reset(&resp) {
        if let Some(s) = lock(shared).stream.as_mut() {
            s.response = None;
        }
        return resp;
    }
    let mut g = lock(shared);
    if let Some(s) = g.stream.as_mut() {
        if let Some(why) = resp.extensions().get::<AnswerDetails>() {
            s.details = Some(why.clone());
        }
        if !s.response.as_ref().is_some_and(Head::lent) {
            // Lent to the answer like the upstream's, and given back once written.
            let mut head = wasm_glue::response_head(&mut resp);
            wasm_glue::apply_response(&mut head, &mut resp);
            s.response = Some(head);
        }
    }
    resp
}

/// Where an error line says a request's failure happened (client, request, node, host), made
/// only for an error.
type Context<'a> = dyn Fn() -> String + Sync + 'a;

/// Gives the plugins' request head back the headers it lent to `parts`, if it did.
fn restore_headers(shared: &SharedWasm, parts: &mut http::request::Parts) {
    if let Some(stream) = lock(shared).stream.as_mut() {
        wasm_glue::restore_request(&mut stream.request, parts);
    }
}

/// The request body through plugins' `proxy_on_request_body`, primed before the upstream is
/// contacted: when the plugins are done with the whole body by then, `Content-Length` is set
/// to its final size; a buffer over its cap answers 413, a plugin's reply answers instead.
async fn request_body(
    w: &Worker,
    shared: &SharedWasm,
    body: ProxyBody,
    parts: &mut http::request::Parts,
) -> Result<(ProxyBody, Arc<Mutex<Option<BodyFailure>>>), Response<ProxyBody>> {
    let mut pb = PluginBody::new(body, shared.clone(), w.plugins.clone(), Dir::Request);
    let complete = match pb.prime().await {
        Primed::Failed(f) => {
            return Err(failure_response(
                f,
                StatusCode::PAYLOAD_TOO_LARGE,
                &String::new,
            ))
        }
        Primed::Complete(len) => Some(len),
        Primed::Streaming => None,
    };
    // Header changes the body callbacks made so far still go upstream (as in Envoy, where a
    // plugin that holds the headers until the body is in may still change them): nothing has
    // been sent yet.
    if let Some(stream) = lock(shared).stream.as_mut() {
        if stream.request.changed() {
            wasm_glue::apply_request(&mut stream.request, parts, true).map_err(|e| {
                tracing::error!("plugins left an invalid request in a body callback: {e}");
                plugins_broke_request()
            })?;
        }
    }
    if let Some(len) = complete {
        set_length(&mut parts.headers, len);
    }
    let failure = pb.failure();
    Ok((body::boxed(pb), failure))
}

/// The answer for a body a plugin cut: `too_large` for a buffer over its cap (413 for a
/// request body, 502 for a response body), the plugin's own reply, or 503 for a fault; for a
/// body its source cut, 400, or 502 / 504 (`at`: where, for the error line).
fn failure_response(f: BodyFailure, too_large: StatusCode, at: &Context) -> Response<ProxyBody> {
    match f {
        BodyFailure::TooLarge => {
            let details = match too_large {
                StatusCode::PAYLOAD_TOO_LARGE => "request_payload_too_large",
                _ => "response_payload_too_large",
            };
            because(error_page(too_large), AnswerDetails::of(details, 0))
        }
        BodyFailure::Reply(r) => wasm_glue::local_reply(r),
        BodyFailure::Fault => plugin_failed(),
        BodyFailure::Client(status) => client_failed(status),
        BodyFailure::Source(e) if too_large == StatusCode::PAYLOAD_TOO_LARGE => {
            tracing::info!("client request body failed: {e}");
            client_failed(StatusCode::BAD_REQUEST)
        }
        BodyFailure::Source(e) => body_cut(&*e, at),
    }
}

/// The answer for an upstream whose answer's body failed while plugins were reading it,
/// before its head went out: as nginx answers a node that failed before the answer was sent,
/// 504 for a stall, 502 for a cut.
fn body_cut(e: &(dyn std::error::Error + 'static), at: &Context) -> Response<ProxyBody> {
    tracing::error!(
        "upstream prematurely closed the answer's body while plugins read it ({e}){}",
        at()
    );
    let stalled = e
        .downcast_ref::<std::io::Error>()
        .is_some_and(|e| e.kind() == std::io::ErrorKind::TimedOut);
    match stalled {
        true => because(
            error_page(StatusCode::GATEWAY_TIMEOUT),
            AnswerDetails::of("upstream_response_timeout", flags::UPSTREAM_REQUEST_TIMEOUT),
        ),
        false => because(
            error_page(StatusCode::BAD_GATEWAY),
            AnswerDetails::of(BODY_CUT, flags::UPSTREAM_CONNECTION_TERMINATION),
        ),
    }
}

/// Runs `proxy_on_response_headers` (and, for plugins with body callbacks, primes the response
/// body) and applies what the plugins changed: on the upstream's answer, or on one made in
/// its place (a local reply, an error page) — but for a reset stream, which has no answer.
async fn response_phase(
    w: &Worker,
    shared: &SharedWasm,
    mut resp: Response<ProxyBody>,
    answered: Option<Tick>,
    at: &Context<'_>,
) -> Response<ProxyBody> {
    if is_reset(&resp) {
        return resp;
    }
    // The contexts and the stream are lent out of the shared state while the callbacks run
    // (they may wait for call-outs), and go back even if this future is dropped half-way.
    let mut lent = Lent::take(shared);
    if let Some(s) = lent.stream.as_mut() {
        s.response = Some(wasm_glue::response_head(&mut resp));
        s.details = match resp.extensions().get::<AnswerDetails>() {
            Some(why) => Some(why.clone()),
            None => answered.map(|_| AnswerDetails::VIA_UPSTREAM),
        };
    }
    let no_body = resp.body().is_end_stream();
    let verdict = w
        .plugins
        .on_response(&mut lent.active, &mut lent.stream, no_body, answered)
        .await;
    drop(lent);
    let wants_body = !no_body && lock(shared).wants_body(Dir::Response);
    match verdict {
        Verdict::Reply(r) => return wasm_glue::local_reply(r),
        Verdict::Fail => return plugin_failed(),
        Verdict::Continue => {}
    }
    if !wants_body {
        lend_response_headers(shared, &mut resp);
        return resp;
    }
    // Primed first: body callbacks before the head goes out still find the headers in the
    // plugins' head.
    let (parts, body) = resp.into_parts();
    // The length the upstream's own framing gave (a single `Content-Length`, no chunking).
    let declared = body.size_hint().exact();
    let mut pb = PluginBody::new(body, shared.clone(), w.plugins.clone(), Dir::Response);
    let complete = match pb.prime().await {
        Primed::Failed(f) => return failure_response(f, StatusCode::BAD_GATEWAY, at),
        Primed::Complete(len) => Some(len),
        Primed::Streaming => None,
    };
    let mut resp = Response::from_parts(parts, body::boxed(pb));
    let untouched = lend_response_headers(shared, &mut resp);
    if let Some(len) = complete {
        // Framing fields no plugin touched, over a body of the length they declare, are
        // right as they are: the three lookups of `set_length` are skipped.
        if !(untouched && declared == Some(len)) {
            set_length(resp.headers_mut(), len);
        }
    }
    resp
}

/// The headers as the plugins left them go out with `resp`, lent by the plugins' head (when
/// there is one) until the server has written them ([`HeadersBack`]). Returns whether their
/// framing fields (`Content-Length`, `Transfer-Encoding`) are the upstream's, untouched.
fn lend_response_headers(shared: &SharedWasm, resp: &mut Response<ProxyBody>) -> bool {
    let mut g = lock(shared);
    match g.stream.as_mut().and_then(|s| s.response.as_mut()) {
        Some(head) => {
            let untouched = !head.framing_changed();
            wasm_glue::apply_response(head, resp);
            untouched
        }
        None => false,
    }
}

/// Where an answer's headers go once the server has written them: back to the plugins' head
/// that lent them, for the body callbacks that follow and `proxy_on_log`.
pub struct HeadersBack(Option<SharedWasm>);

impl HeadersBack {
    /// Gives back `headers` as written, with the fields the server set on the way (`set`, see
    /// [`answer_fields`]): plugins read the answer as the client got it, as Envoy's filters
    /// see the headers its codec sent. Those fields go into the map only if a plugin reads it
    /// later ([`wasmgate_wasm::Stream::give_back_response`]).
    pub fn give(self, headers: HeaderMap, set: &AnswerFields<'_>) {
        let Some(shared) = self.0 else {
            return;
        };
        let mut g = lock(&shared);
        if let Some(stream) = g.stream.as_mut() {
            let written = set.iter().map(|(n, v)| (*n, v.cloned())).collect();
            stream.give_back_response(headers, written);
        }
    }
}

/// A request's contexts and stream, lent out of its shared state; they go back on drop.
struct Lent<'a> {
    shared: &'a SharedWasm,
    active: Vec<Active>,
    stream: Option<Box<Stream>>,
}

impl Lent<'_> {
    fn take(shared: &SharedWasm) -> Lent<'_> {
        let mut g = lock(shared);
        Lent {
            active: std::mem::take(&mut g.active),
            stream: g.stream.take(),
            shared,
        }
    }
}

impl Drop for Lent<'_> {
    fn drop(&mut self) {
        let mut g = lock(self.shared);
        g.active = std::mem::take(&mut self.active);
        g.stream = self.stream.take();
    }
}

/// Phase 3: sends the request to a node, moving to the next node on connect failures.
/// `websocket`: the route's `enable_websocket`, which lets an `Upgrade` request through.
async fn forward(
    w: &Worker,
    up: &Arc<UpstreamRuntime>,
    (parts, websocket): (&mut http::request::Parts, bool),
    body: ProxyBody,
    client: &Client,
    log: &mut UpstreamLog,
) -> Response<ProxyBody> {
    let hash_key = hash_key(up, parts, client);
    // The Host the request was routed by (a `Connection: host` does not take it away:
    // `codec::strip_nominated` leaves it).
    let client_host = parts.headers.get(header::HOST).cloned();
    let no_body = body.is_end_stream();
    let upgrade = match websocket && no_body {
        true => tunnel::asked(parts),
        false => None,
    };
    // The client's headers go upstream as they are, less the hop-by-hop ones; what the proxy
    // sets is written with them (`Forwarding`), not stored in the map.
    strip_hop_by_hop(&mut parts.headers);
    if let Some(protocol) = upgrade.clone() {
        // nginx's `proxy_set_header Upgrade $http_upgrade; Connection "upgrade"`.
        tunnel::put_upgrade(&mut parts.headers, protocol);
    }
    let port = w.listener_port(client.local.port());
    let forwarding = Forwarding::new(
        &parts.headers,
        client_host.as_ref(),
        client,
        (client.trusted_peer, port),
    );
    // Without a body, an idempotent request may go to another node after a failure past the
    // connect: nothing of it is lost, and the node may not have acted on it twice.
    let replayable = no_body && parts.method.is_idempotent();
    let mut body = Some(body);
    let mut tried = Vec::new();
    let mut stale_retries = 0;
    // One reading starts `$upstream_response_time`, the retry deadline, the idle check of
    // the pool and the first attempt's timer.
    let started = Instant::now();
    let deadline = up.retry_timeout.map(|t| started + t);
    let mut attempt_at = started;
    // Why the last attempt failed, for the answer made once no node is left.
    let mut why = AnswerDetails::of("no_healthy_upstream", flags::NO_HEALTHY_UPSTREAM);
    log.https = up.tls.is_some();
    loop {
        let Some(idx) = up.pick(hash_key.as_deref().map(str::as_bytes), &tried) else {
            // Nothing to pick at all: no node is APISIX's 503, only weight-0 ones its 502;
            // both with its line.
            let mut none = StatusCode::BAD_GATEWAY;
            if tried.is_empty() {
                let at = upstream_context(client, parts, None, client_host.as_ref());
                tracing::error!("no valid upstream node{at}");
                if up.authorities.is_empty() {
                    none = StatusCode::SERVICE_UNAVAILABLE;
                }
            }
            // Every node tried: the last attempt's answer (one that timed out stays a 504).
            let last = log.status.filter(|_| !tried.is_empty());
            let status = last.and_then(|s| StatusCode::from_u16(s).ok());
            let why = gave_up(why, &tried);
            return because(error_page(status.unwrap_or(none)), why);
        };
        let authority = up.authorities[idx].clone();
        let host = node_host(up, client_host.as_ref(), &authority);
        // A plain node's connections are pooled under its authority; a TLS one's under the
        // name its session was opened for too (the key is made only then).
        let dialed = match &up.tls {
            None => {
                w.pool
                    .checkout(&authority, up.connect_timeout, attempt_at)
                    .await
            }
            Some(_) => {
                let tls = checkout_tls(w, up, idx, host.as_ref(), attempt_at);
                Box::pin(tls).await
            }
        };
        let conn = match dialed {
            Ok(c) => c,
            Err(e) => {
                let at = upstream_context(
                    client,
                    parts,
                    Some((up.scheme(), &authority)),
                    client_host.as_ref(),
                );
                match e {
                    ConnectError::Tls(_) | ConnectError::TlsSettings(_) => tracing::error!(
                        "TLS handshake with {authority} failed ({e}) while SSL handshaking to \
                         upstream{at}"
                    ),
                    _ => tracing::error!(
                        "connect() to {authority} failed ({e}) while connecting to upstream{at}"
                    ),
                }
                // A connect that timed out is a gateway timeout, as nginx answers it.
                let (status, reason, attempt) = match e {
                    ConnectError::Timeout(_) => (
                        StatusCode::GATEWAY_TIMEOUT,
                        CONNECT_TIMEOUT,
                        Attempt::TimedOut,
                    ),
                    _ => (
                        StatusCode::BAD_GATEWAY,
                        CONNECT_FAILURE,
                        Attempt::ConnectFailed,
                    ),
                };
                // TLS settings that cannot be used are the gateway's own fault, not the node's.
                if !matches!(e, ConnectError::TlsSettings(_)) {
                    up.observe(idx, attempt);
                }
                why = AnswerDetails::of(reason, flags::UPSTREAM_CONNECTION_FAILURE);
                log.addrs.push(authority);
                log.status = Some(status.as_u16());
                match another_node(&mut tried, idx, up, deadline, status) {
                    Ok(at) => attempt_at = at,
                    Err(status) => return because(error_page(status), gave_up(why, &tried)),
                }
                continue;
            }
        };
        let Some(b) = body.take() else {
            return error_page(StatusCode::BAD_GATEWAY);
        };
        let set = forwarding.fields(host.as_ref());
        let busy = Busy::start(up, idx);
        let request = (&*parts, &set[..], upgrade.is_some());
        // Recorded before the wait: a request its client abandons names its node too.
        log.addrs.push(authority.clone());
        if w.access_log.upstream_target {
            (log.host, log.uri) = (host.clone(), Some(parts.uri.clone()));
        }
        match send(w, conn, request, (b, no_body), &authority, up).await {
            Exchange::Response(resp) => {
                log.status = Some(resp.status().as_u16());
                up.observe(idx, Attempt::Answered(resp.status().as_u16()));
                // `started` is the pool's and the timers' `Instant`; the answer's reading is
                // a `Tick`, which the later phases subtract from cheaply.
                log.time = Some(started.elapsed());
                log.answered = Some(Tick::now());
                // A switched connection keeps its node busy until the tunnel ends.
                match resp.extensions().get::<tunnel::Upstream>() {
                    Some(tunnel) => tunnel.hold(busy),
                    None => log.active = Some(busy),
                }
                return resp;
            }
            Exchange::NotSent(b) if stale_retries < 3 => {
                // The pooled connection was closed by the node while idle: trying again on
                // another connection is safe (see `send`).
                drop(busy);
                log.addrs.pop();
                stale_retries += 1;
                body = Some(b);
                attempt_at = Instant::now();
            }
            outcome => {
                drop(busy);
                // The time spent on the nodes so far, as nginx counts a failed attempt's.
                log.time = Some(started.elapsed());
                // An answer that is not HTTP is the node's answer (nginx's `invalid_header`,
                // not among its default reasons to try the next node).
                let invalid = matches!(&outcome, Exchange::Failed(e)
                    if matches!(e.downcast_ref(), Some(ExchangeError::Invalid(_))));
                let terminated =
                    || AnswerDetails::of(TERMINATED, flags::UPSTREAM_CONNECTION_TERMINATION);
                let status = match outcome {
                    Exchange::Timeout(phase) => {
                        up.observe(idx, Attempt::TimedOut);
                        let at = upstream_context(
                            client,
                            parts,
                            Some((up.scheme(), &authority)),
                            client_host.as_ref(),
                        );
                        tracing::error!("upstream {authority} timed out while {phase}{at}");
                        why = AnswerDetails::of(
                            "upstream_response_timeout",
                            flags::UPSTREAM_REQUEST_TIMEOUT,
                        );
                        StatusCode::GATEWAY_TIMEOUT
                    }
                    Exchange::Failed(e) => match body::client_fault(&*e) {
                        // The client's body went over client_max_body_size or stalled while
                        // it streamed: the client's fault (413/408), not the upstream's.
                        Some(status) => {
                            tracing::info!("client request body failed: {e}");
                            log.status = None;
                            return client_failed(status);
                        }
                        None => {
                            // A body a plugin cut is not the node's failure.
                            if !plugin_cut(&*e) {
                                up.observe(idx, Attempt::Broken);
                            }
                            let host = client_host.as_ref();
                            let at = upstream_context(
                                client,
                                parts,
                                Some((up.scheme(), &authority)),
                                host,
                            );
                            tracing::error!(
                                "upstream {authority} failed while reading response header \
                                 ({e}){at}"
                            );
                            why = match invalid {
                                true => AnswerDetails::of(NOT_HTTP, flags::UPSTREAM_PROTOCOL_ERROR),
                                false => terminated(),
                            };
                            StatusCode::BAD_GATEWAY
                        }
                    },
                    // Pooled connections found closed once too often: nothing the node did
                    // with this request, not counted against it.
                    _ => {
                        why = terminated();
                        StatusCode::BAD_GATEWAY
                    }
                };
                log.status = Some(status.as_u16());
                if !replayable || invalid {
                    return because(error_page(status), why);
                }
                match another_node(&mut tried, idx, up, deadline, status) {
                    Ok(at) => attempt_at = at,
                    Err(status) => return because(error_page(status), gave_up(why, &tried)),
                }
                body = Some(body::empty());
            }
        }
    }
}

/// Whether a plugin ended the request body (its failure, not the node's).
fn plugin_cut(e: &(dyn std::error::Error + 'static)) -> bool {
    std::iter::successors(Some(e), |c| c.source())
        .any(|c| c.is::<crate::wasm_body::PluginBodyFailed>())
}

/// The last failure's details once no further node is tried, Envoy's `URX` flag added when
/// more than one was (its retries ran out).
fn gave_up(mut why: AnswerDetails, tried: &[usize]) -> AnswerDetails {
    if tried.len() > 1 {
        why.flags |= flags::UPSTREAM_RETRY_LIMIT_EXCEEDED;
    }
    why
}

/// Envoy's details for an upstream that failed before its answer began.
const CONNECT_TIMEOUT: &str = "upstream_reset_before_response_started{connection_timeout}";
const CONNECT_FAILURE: &str = "upstream_reset_before_response_started{connection_failure}";
const TERMINATED: &str = "upstream_reset_before_response_started{connection_termination}";
const NOT_HTTP: &str = "upstream_reset_before_response_started{protocol_error}";
const BODY_CUT: &str = "upstream_reset_after_response_started{connection_termination}";

/// `resp` marked with why the gateway answered itself (`response.code_details` and
/// `response.flags` for plugins); made on error paths only, where the extension's map is
/// allocated.
fn because(mut resp: Response<ProxyBody>, why: AnswerDetails) -> Response<ProxyBody> {
    resp.extensions_mut().insert(why);
    resp
}

/// nginx's context for an upstream error line: the client, the request, the node it went to
/// and the `Host` asked for (`, client: 10.0.0.1, request: "GET /a HTTP/1.1", upstream:
/// "http://10.0.0.7:8080/a", host: "example.com"`), so that a line names the request it
/// failed. Made only on error paths.
fn upstream_context(
    client: &Client,
    parts: &http::request::Parts,
    node: Option<(&str, &str)>,
    host: Option<&HeaderValue>,
) -> String {
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let request = format!("{} {path} {:?}", parts.method, parts.version);
    let host = host.and_then(|h| h.to_str().ok()).unwrap_or("");
    let client = client.addr.ip();
    match node {
        Some((scheme, node)) => format!(
            ", client: {client}, request: \"{request}\", upstream: \"{scheme}://{node}{path}\", host: \"{host}\""
        ),
        None => format!(", client: {client}, request: \"{request}\", host: \"{host}\""),
    }
}

/// After a failed attempt on node `idx`, answered `failed`: notes it, and whether another
/// node may be tried (within `retries` and `retry_timeout`, counted to `deadline`) — the time
/// that attempt starts — else the answer's status: the failed attempt's, or APISIX's 502 and
/// line when `retry_timeout` ended the retries `retries` still allowed.
fn another_node(
    tried: &mut Vec<usize>,
    idx: usize,
    up: &UpstreamRuntime,
    deadline: Option<Instant>,
    failed: StatusCode,
) -> Result<Instant, StatusCode> {
    tried.push(idx);
    let now = Instant::now();
    if tried.len() > up.retries {
        return Err(failed);
    }
    match deadline {
        Some(d) if now >= d => {
            let retries = tried.len() - 1;
            tracing::error!("proxy retry timeout, retry count: {retries}");
            Err(StatusCode::BAD_GATEWAY)
        }
        _ => Ok(now),
    }
}

enum Exchange {
    Response(Response<ProxyBody>),
    /// The request may be sent again, with this body.
    NotSent(ProxyBody),
    /// Which timeout: `body::SENDING` or `body::READING_HEAD`.
    Timeout(&'static str),
    Failed(body::BoxError),
}

/// Sends the request and waits for the response head: the request body must keep moving
/// (`timeout.send` between two chunks taken by the upstream), and once it is all sent the
/// response head must arrive within `timeout.read`.
///
/// On a pooled connection the request may go again (`NotSent`) when writing its head failed
/// (nothing reached the node), or when a request without a body and with an idempotent method
/// found the connection closed before any answer — the node closed it while it was idle, the
/// race nginx's keepalive retries too.
async fn send(
    w: &Worker,
    conn: Conn,
    (parts, set, upgrade): (&http::request::Parts, &SetFields<'_>, bool),
    (body, no_body): (ProxyBody, bool),
    authority: &Arc<str>,
    up: &UpstreamRuntime,
) -> Exchange {
    let Conn {
        mut link,
        reused,
        at,
    } = conn;
    let mut out = link
        .wire
        .encode_head(&parts.method, &parts.uri, &parts.headers, set, &body);
    if upgrade {
        out = out.upgrading();
    }
    let (wire, timer) = link.parts();
    // A request without a body has no sending to watch: its head goes out at once (it fits
    // the socket's buffer), and with the answer's head it must take at most `timeout.read`;
    // one timer setting covers both.
    let first_wait = match no_body {
        true => up.read_timeout,
        false => up.send_timeout,
    };
    timer.as_mut().reset((at + first_wait).into());
    let wrote = tokio::select! {
        biased;
        r = wire.write_head() => r,
        _ = timer.as_mut() => return Exchange::Timeout(body::SENDING),
    };
    if let Err(e) = wrote {
        return match reused {
            true => Exchange::NotSent(body),
            false => Exchange::Failed(e.into()),
        };
    }
    let result = match no_body {
        true => {
            let r = tokio::select! {
                biased;
                r = wire.exchange(None::<ProxyBody>, out) => r,
                _ = timer.as_mut() => return Exchange::Timeout(body::READING_HEAD),
            };
            match r {
                Err(ExchangeError::Closed(_)) if reused && parts.method.is_idempotent() => {
                    return Exchange::NotSent(body);
                }
                r => r,
            }
        }
        false => {
            let progress = Arc::new(body::SendProgress::started());
            let watched = body::SendWatch::new(body, progress.clone());
            let fut = wire.exchange(Some(watched), out);
            tokio::pin!(fut);
            loop {
                let (deadline, phase) = progress.deadline(up.send_timeout, up.read_timeout);
                timer.as_mut().reset(deadline.into());
                tokio::select! {
                    biased;
                    r = &mut fut => break r,
                    _ = timer.as_mut() => {
                        if progress.deadline(up.send_timeout, up.read_timeout).0 <= Instant::now() {
                            return Exchange::Timeout(phase);
                        }
                    }
                }
            }
        }
    };
    match result {
        Ok(head) if head.status == StatusCode::SWITCHING_PROTOCOLS => {
            // The node switched: its connection is the tunnel's, once the client has the 101.
            let (io, rest) = link.into_io();
            let mut resp = Response::new(body::empty());
            *resp.status_mut() = head.status;
            *resp.headers_mut() = head.headers;
            resp.extensions_mut()
                .insert(tunnel::Upstream::new(io, rest, up.read_timeout));
            Exchange::Response(resp)
        }
        Ok(head) => {
            let body = ResponseBody::new(
                link,
                &head,
                w.pool.clone(),
                authority.clone(),
                up.read_timeout,
            );
            let mut resp = Response::new(body::boxed(body));
            *resp.status_mut() = head.status;
            *resp.version_mut() = head.version;
            *resp.headers_mut() = head.headers;
            Exchange::Response(resp)
        }
        Err(e) => Exchange::Failed(e.into_box()),
    }
}

static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The request's id: the client's `X-Request-Id` when it is a sane token (printable ASCII, at
/// most 128 bytes), otherwise a new random one set on the request. The upstream, the plugins
/// (`request.id`), the client and the access log (`$request_id`) all see the same id. The
/// value is shared, not copied, between the request, the response and the log.
fn request_id(h: &mut HeaderMap) -> Option<HeaderValue> {
    let mut given = h.get_all(&X_REQUEST_ID).iter();
    if let Some(v) = given.next() {
        let b = v.as_bytes();
        if !b.is_empty() && b.len() <= 128 && b.iter().all(|b| b.is_ascii_graphic()) {
            let (v, more) = (v.clone(), given.next().is_some());
            // One id: a second field would reach the node while everything else saw the first.
            if more {
                h.insert(X_REQUEST_ID.clone(), v.clone());
            }
            return Some(v);
        }
    }
    // One allocation holding the text, shared (not copied) by every clone of the value.
    let id = Bytes::from_owner(uuid_text(rand::random()));
    let v = HeaderValue::from_maybe_shared(id).ok()?;
    h.insert(X_REQUEST_ID.clone(), v.clone());
    Some(v)
}

/// 128 bits as a UUID's text (8-4-4-4-12 lower-case hex digits). Every request without an
/// id of its own makes one: a byte at a time through a table of digit pairs, to fixed places
/// (a loop the compiler unrolls), about a third of the instructions of a digit at a time
/// with a branch for the dashes.
fn uuid_text(r: u128) -> [u8; 36] {
    const PAIRS: [[u8; 2]; 256] = {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut t = [[0u8; 2]; 256];
        let mut i = 0;
        while i < 256 {
            t[i] = [HEX[i >> 4], HEX[i & 0xf]];
            i += 1;
        }
        t
    };
    // Where each byte's two digits go: the dashes' places are skipped.
    const AT: [usize; 16] = [0, 2, 4, 6, 9, 11, 14, 16, 19, 21, 24, 26, 28, 30, 32, 34];
    let mut out = [b'-'; 36];
    for (byte, at) in r.to_be_bytes().into_iter().zip(AT) {
        out[at..at + 2].copy_from_slice(&PAIRS[usize::from(byte)]);
    }
    out
}

/// Removes the hop-by-hop headers (the fixed list: `Connection` itself, `Keep-Alive`, `TE`,
/// `Transfer-Encoding`, `Upgrade`…). Those the `Connection` header names went earlier, as the
/// message came ([`wasmgate_http1::codec::strip_nominated`]).
fn strip_hop_by_hop(h: &mut HeaderMap) {
    // One pass over the names finds what to remove, without parsing a name or allocating.
    // Room for every name `codec::is_hop_by_hop` takes (a map's names are distinct): one more name
    // there needs one more slot here, or the last one found would cross (the unit test below
    // sends them all).
    let mut found: [Option<HeaderName>; 9] = Default::default();
    let mut n = 0;
    for k in h.keys().filter(|k| codec::is_hop_by_hop(k)) {
        if n < found.len() {
            found[n] = Some(k.clone());
            n += 1;
        }
    }
    for name in found.iter().flatten() {
        h.remove(name);
    }
}

/// A connection to node `idx` of an `https` upstream for a request sent with `host`. Kept
/// out of [`forward`]: the handshake's state would otherwise weigh on every plain request's
/// future.
async fn checkout_tls(
    w: &Worker,
    up: &UpstreamRuntime,
    idx: usize,
    host: Option<&HeaderValue>,
    now: Instant,
) -> Result<Conn, ConnectError> {
    let authority = &up.authorities[idx];
    match up.handshake(idx, host)? {
        Some(tls) => {
            w.pool
                .checkout_tls(authority, tls, up.connect_timeout, now)
                .await
        }
        None => w.pool.checkout(authority, up.connect_timeout, now).await,
    }
}

/// The `Host` sent upstream, per `pass_host`. An HTTP/1.0 client may send none; the request
/// upstream is HTTP/1.1, which must carry one (RFC 9112 §3.2), so it then names the node.
fn node_host(
    up: &UpstreamRuntime,
    client_host: Option<&HeaderValue>,
    authority: &str,
) -> Option<HeaderValue> {
    // The scheme's own port is left out, as a client writes `Host` (APISIX's
    // `parse_server_for_upstream_host`).
    let default_port = match up.tls {
        Some(_) => ":443",
        None => ":80",
    };
    let node = || {
        let host = authority.strip_suffix(default_port).unwrap_or(authority);
        HeaderValue::from_str(host).ok()
    };
    match up.pass_host {
        PassHost::Pass => client_host.cloned().or_else(node),
        PassHost::Node => node(),
        PassHost::Rewrite => up
            .upstream_host
            .as_deref()
            .and_then(|h| HeaderValue::from_str(h).ok())
            .or_else(node),
    }
}

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static X_FORWARDED_PORT: HeaderName = HeaderName::from_static("x-forwarded-port");

/// What the proxy sets on the request it sends upstream, in place of any field of the same
/// name the client sent: each attempt's `Host`, `X-Forwarded-For` (the client's list with
/// the client appended), `X-Real-IP`, `X-Forwarded-Proto`, `X-Forwarded-Host` and
/// `X-Forwarded-Port` — the last three the client's own when it is one of
/// `apisix.trusted_addresses` and sent them (a load balancer that terminated TLS says
/// `https`), the gateway's otherwise, as APISIX does. Written
/// with the head ([`wasmgate_http1::codec::put_fields_setting`]) rather than inserted into
/// the request's map, which plugins' later callbacks read as the request phase left it — as
/// nginx's `$http_*` variables stay the client's after `proxy_set_header`. Made once per
/// request.
struct Forwarding {
    xff: Option<HeaderValue>,
    real_ip: HeaderValue,
    host: Option<HeaderValue>,
    proto: HeaderValue,
    port: HeaderValue,
}

impl Forwarding {
    /// `port`: the listener's port as header text; `trusted`: the client is one of
    /// `apisix.trusted_addresses`.
    fn new(
        headers: &HeaderMap,
        client_host: Option<&HeaderValue>,
        client: &Client,
        (trusted, port): (bool, HeaderValue),
    ) -> Self {
        let ip = &client.ip;
        // Repeated X-Forwarded-For lines form one list (as nginx's
        // $proxy_add_x_forwarded_for); without one, the list is the client's address alone,
        // shared, not copied.
        let mut sent = headers.get_all(&X_FORWARDED_FOR).iter().peekable();
        let xff = match sent.peek() {
            None => Some(ip.clone()),
            Some(_) => {
                let mut xff = Vec::new();
                for v in sent {
                    xff.extend_from_slice(v.as_bytes());
                    xff.extend_from_slice(b", ");
                }
                xff.extend_from_slice(ip.as_bytes());
                HeaderValue::from_maybe_shared(Bytes::from(xff)).ok()
            }
        };
        // Looked up only for a trusted client: three map look-ups cost ~480 instructions.
        let theirs = |name: &HeaderName| match trusted {
            true => headers.get(name).cloned(),
            false => None,
        };
        Forwarding {
            xff,
            real_ip: ip.clone(),
            host: theirs(&X_FORWARDED_HOST).or_else(|| client_host.cloned()),
            proto: theirs(&X_FORWARDED_PROTO).unwrap_or_else(|| match client.tls {
                Some(_) => HTTPS_SCHEME.clone(),
                None => HTTP_SCHEME.clone(),
            }),
            port: theirs(&X_FORWARDED_PORT).unwrap_or(port),
        }
    }

    /// The fields to set on one attempt, whose `Host` is `host` (`None`: no `Host` line, as
    /// `pass_host` decided). `X-Forwarded-Host` without a value (an HTTP/1.0 request with no
    /// `Host`, from a client not trusted to say it) leaves the field out: the client's own
    /// would otherwise reach the upstream as the gateway's word.
    fn fields<'a>(&'a self, host: Option<&'a HeaderValue>) -> SmallVec<[SetField<'a>; 6]> {
        let mut set = SmallVec::new();
        set.push((&header::HOST, host));
        if let Some(xff) = &self.xff {
            set.push((&X_FORWARDED_FOR, Some(xff)));
        }
        set.push((&X_REAL_IP, Some(&self.real_ip)));
        set.push((&X_FORWARDED_PROTO, Some(&self.proto)));
        set.push((&X_FORWARDED_HOST, self.host.as_ref()));
        set.push((&X_FORWARDED_PORT, Some(&self.port)));
        set
    }
}

static HTTP_SCHEME: HeaderValue = HeaderValue::from_static("http");
static HTTPS_SCHEME: HeaderValue = HeaderValue::from_static("https");

/// Phase 4: response headers on their way to the client. An answer that switches protocols
/// keeps its `Upgrade`, with `Connection: upgrade`.
fn header_filter(mut resp: Response<ProxyBody>) -> Response<ProxyBody> {
    let protocol = tunnel::switching(&resp)
        .then(|| resp.headers().get(header::UPGRADE).cloned())
        .flatten();
    strip_hop_by_hop(resp.headers_mut());
    if let Some(protocol) = protocol {
        tunnel::put_upgrade(resp.headers_mut(), protocol);
    }
    resp
}

static SERVER: HeaderValue =
    HeaderValue::from_static(concat!("wasmgate/", env!("CARGO_PKG_VERSION")));
static CLOSE: HeaderValue = HeaderValue::from_static("close");

/// [`answer_fields`]: fields as [`SetFields`] lists them, their names the proxy's constants.
pub type AnswerFields<'a> = SmallVec<[(&'static HeaderName, Option<&'a HeaderValue>); 3]>;

/// The fields the server sets on every answer as it writes the head, in place of any of those
/// names the answer carries: `Server`, the request's `X-Request-Id` (`request_id`), and
/// `Connection: close` while the worker drains. Written with the head
/// ([`wasmgate_http1::codec::SetFields`]) rather than inserted into the answer's map (two
/// inserts of ~200 instructions per request): the plugins' response callbacks never saw them
/// (nginx too adds its `Server` in its last header filter), and the callbacks after the head
/// is sent find them in the map given back ([`HeadersBack::give`]).
pub fn answer_fields(request_id: Option<&HeaderValue>, draining: bool) -> AnswerFields<'_> {
    let mut set = SmallVec::new();
    set.push((&header::SERVER, Some(&SERVER)));
    if let Some(id) = request_id {
        set.push((&X_REQUEST_ID, Some(id)));
    }
    if draining {
        set.push((&header::CONNECTION, Some(&CLOSE)));
    }
    set
}

/// What the access log needs, captured before plugins may change the request.
struct LogInfo {
    started: Tick,
    remote: String,
    remote_port: u16,
    /// The connection's TLS (`$scheme`, `$ssl_*`); None: plain HTTP.
    tls: Option<Arc<TlsInfo>>,
    host: HostName,
    request_line: String,
    /// The access log format's captures (`$http_user_agent`, …), read off the head.
    captured: Vec<String>,
    /// The matched route, if any.
    route: Option<Arc<RouteEntry>>,
    request_id: Option<HeaderValue>,
    upstream: UpstreamLog,
    /// Size of the request head, and body bytes received (bandwidth statistics; counted only
    /// for a request with a body).
    head_bytes: u64,
    body_bytes: Option<Arc<std::sync::atomic::AtomicU64>>,
    /// Set while the answer is being made: a request dropped before its log phase (its
    /// client left, and the connection dropped the request's future) is logged from here.
    abandoned: Option<Arc<Worker>>,
}

impl Drop for LogInfo {
    fn drop(&mut self) {
        if let Some(w) = self.abandoned.take() {
            log_abandoned(&w, self);
        }
    }
}

impl LogInfo {
    /// With the access log on, the request line and what its format reads off the head are
    /// kept (formatting them costs every request otherwise). Text that is not ASCII (a UTF-8
    /// `User-Agent`) is kept, bytes that are not UTF-8 shown as U+FFFD; the log's writer
    /// escapes what could forge a line.
    /// `host`: what the parser saw of the request's `Host`.
    fn new(
        parts: &http::request::Parts,
        (client, host): (&Client, Option<HostSeen>),
        log: &AccessLog,
    ) -> LogInfo {
        let peer = client.addr;
        let full = log.enabled();
        let captured = match full {
            true => (log.format().captures.iter())
                .map(|c| logformat::captured(c, &parts.headers, parts.uri.query()))
                .collect(),
            false => Vec::new(),
        };
        let request_line = match full {
            true => format!(
                "{} {} {:?}",
                parts.method,
                parts.uri.path_and_query().map_or("/", |p| p.as_str()),
                parts.version
            ),
            false => String::new(),
        };
        LogInfo {
            started: Tick::now(),
            remote: if full {
                peer.ip().to_string()
            } else {
                String::new()
            },
            remote_port: peer.port(),
            tls: client.tls.clone(),
            host: request_host(parts, host),
            request_line,
            captured,
            route: None,
            request_id: None,
            upstream: UpstreamLog::default(),
            head_bytes: 0,
            body_bytes: None,
            abandoned: None,
        }
    }
}

/// Phase 6: wraps the body so that, when it ends, the plugins' log callbacks run and the
/// access-log line is written.
fn log_phase(
    w: Arc<Worker>,
    resp: Response<ProxyBody>,
    mut log: Box<LogInfo>,
    wasm: Option<SharedWasm>,
) -> Response<ProxyBody> {
    log.abandoned = None;
    let status = resp.status().as_u16();
    // A switched connection's request ends with its tunnel.
    let tunnel = match status {
        101 => resp.extensions().get::<tunnel::Upstream>().cloned(),
        _ => None,
    };
    resp.map(move |b| {
        body::made(|| {
            Observed::new(b, move |sent, _complete| {
                // The request's state is used where it lies (it is large: moving it into
                // another closure or a call costs copies), but for a tunnel.
                if let Some(t) = tunnel {
                    let end: tunnel::OnClose =
                        Box::new(move |c| log_request(&w, &log, wasm, (status, sent), c));
                    if let Err(end) = t.on_close(end) {
                        end(Carried::default());
                    }
                    return;
                }
                log_request(&w, &log, wasm, (status, sent), Carried::default());
            })
        })
    })
}

/// The log phase of a request whose answer (`status`, `sent` body bytes) is out, and whose
/// tunnel, if it had one, is over: plugins' `proxy_on_log`, statistics, the access log.
fn log_request(
    w: &Worker,
    log: &LogInfo,
    wasm: Option<SharedWasm>,
    (status, sent): (u16, u64),
    carried: Carried,
) {
    // One reading ends the request's time and starts the log phase's plugin timing
    // (`proxy_on_log` is not counted in `$request_time`).
    let now = Tick::now();
    let request_body = log
        .body_bytes
        .as_ref()
        .map_or(0, |b| b.load(Ordering::Relaxed));
    let sent = sent + carried.to_client;
    let totals = Totals {
        duration: now.since(log.started),
        request_body,
        request_total: log.head_bytes + request_body + carried.from_client,
        response_body: sent,
    };
    if let Some(shared) = wasm {
        lock(&shared).finish_at(now, Some(totals));
    }
    record(
        w,
        log,
        (status, sent),
        totals.request_total,
        totals.duration,
    );
}

/// Counts a request in the route's traffic and writes its access-log line.
fn record(w: &Worker, log: &LogInfo, (status, sent): (u16, u64), ingress: u64, took: Duration) {
    let up = &log.upstream;
    // `$upstream_response_time` as nginx's: from the first attempt to the answer's end (its
    // body passed on), not to its head, so that a node slow to send its body is not taken for
    // the gateway's time (`type="apisix"` is the request's time less this).
    let upstream_time = match (up.time, up.answered) {
        (Some(head), Some(at)) => Some(head + log.started.after(took).since(at)),
        (time, _) => time,
    };
    w.traffic.record(
        log.route.as_deref(),
        &Observation {
            status,
            request_us: took.as_micros() as u64,
            upstream_us: upstream_time.map(|t| t.as_micros() as u64),
            ingress,
            egress: sent,
        },
    );
    if !w.access_log.enabled() {
        return;
    }
    let upstream_uri = up.uri.as_ref().and_then(|u| u.path_and_query());
    w.access_log.log(&Entry {
        remote_addr: &log.remote,
        remote_port: log.remote_port,
        tls: log.tls.as_deref(),
        host: log.host.as_str(),
        request_line: &log.request_line,
        status,
        body_bytes_sent: sent,
        request_time: took,
        upstream_addr: &up.addrs.join(", "),
        upstream_scheme: up.scheme(),
        upstream_status: up.status,
        upstream_time,
        upstream_host: up.host.as_ref().and_then(|h| h.to_str().ok()).unwrap_or(""),
        upstream_uri: upstream_uri.map_or("", |p| p.as_str()),
        route_id: log.route.as_ref().map_or("", |r| &r.id),
        request_id: log
            .request_id
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .unwrap_or(""),
        captured: &log.captured,
    });
}

/// nginx's status for a request whose client closed the connection before the answer.
const CLIENT_CLOSED: u16 = 499;
/// nginx's status for a connection closed without an answer: a request the worker cut when
/// `worker_shutdown_timeout` ran out.
const CUT: u16 = 444;

/// A request dropped before its answer was made (waiting on its node, or paused by a
/// plugin): its client left (nginx's 499), or the worker cut it at `worker_shutdown_timeout`
/// (444). Logged and counted, its node given back to the balancer (the request's [`Busy`] goes
/// with it). The plugins' own log phase runs as their state drops.
fn log_abandoned(w: &Worker, log: &LogInfo) {
    let route = log.route.as_ref().map_or("", |r| &r.id);
    let node = match log.upstream.addrs.last() {
        Some(node) => format!("upstream: {node}"),
        None => "before its upstream".into(),
    };
    let request = match log.request_line.is_empty() {
        true => String::new(),
        false => format!(
            ", client: {}, request: \"{}\"",
            log.remote, log.request_line
        ),
    };
    let cut = w.cutting.load(Ordering::Relaxed);
    match cut {
        true => tracing::warn!(
            "request cut: worker_shutdown_timeout ran out (route {route:?}, {node}){request}"
        ),
        false => tracing::info!(
            "client prematurely closed connection, request abandoned (route {route:?}, \
             {node}){request}"
        ),
    }
    let received = log
        .body_bytes
        .as_ref()
        .map_or(0, |b| b.load(Ordering::Relaxed));
    let took = log.started.elapsed();
    let status = if cut { CUT } else { CLIENT_CLOSED };
    record(w, log, (status, 0), log.head_bytes + received, took);
}

/// A request refused before it was understood (malformed, headers too large): counted with
/// the requests no route matched, and logged in the access log with what is known of it, as
/// nginx logs its 400s, so that an operator sees them.
/// `took`: how long the client had been sending what was refused (nginx's `$request_time`).
pub fn log_refused(w: &Worker, client: &Client, (status, sent): (u16, u64), took: Duration) {
    let peer = client.addr;
    w.traffic.record(
        None,
        &Observation {
            status,
            request_us: took.as_micros() as u64,
            upstream_us: None,
            ingress: 0,
            egress: sent,
        },
    );
    if !w.access_log.enabled() {
        return;
    }
    w.access_log.log(&Entry {
        remote_addr: &peer.ip().to_string(),
        remote_port: peer.port(),
        tls: client.tls.as_deref(),
        host: "",
        request_line: "",
        status,
        body_bytes_sent: sent,
        request_time: took,
        upstream_addr: "",
        upstream_scheme: "http",
        upstream_status: None,
        upstream_time: None,
        upstream_host: "",
        upstream_uri: "",
        route_id: "",
        request_id: "",
        captured: &[],
    });
}

/// The request's host, lower-cased, without port (Host header, else the URI's authority):
/// lent from the `Host` value when that is already lower-case (the usual case). `seen`: what
/// the parser found of that value, if it is the one it checked; otherwise one pass over the
/// value's bytes, and a value that is not text (`to_str` would refuse it) is not used.
fn request_host(parts: &http::request::Parts, seen: Option<HostSeen>) -> HostName {
    let host = parts.headers.get(header::HOST);
    // The parser's look at the same value (checked then as a `host[:port]`, all visible
    // ASCII): no second pass over its bytes.
    if let (Some(v), Some(seen)) = (host, seen) {
        let len = seen.name_len as usize;
        if let Some(name) = v.as_bytes().get(..len) {
            return match seen.upper {
                false => HostName::Lent(v.clone(), len),
                true => HostName::Owned(String::from_utf8_lossy(name).to_ascii_lowercase()),
            };
        }
    }
    if let Some(v) = host {
        let bytes = v.as_bytes();
        if bytes
            .iter()
            .all(|b| (b' '..=b'~').contains(b) || *b == b'\t')
        {
            let host = host_name(bytes);
            return match host.iter().any(u8::is_ascii_uppercase) {
                false => HostName::Lent(v.clone(), host.len()),
                true => HostName::Owned(String::from_utf8_lossy(host).to_ascii_lowercase()),
            };
        }
    }
    let raw = parts.uri.host().unwrap_or("");
    HostName::Owned(raw[..host_name(raw.as_bytes()).len()].to_ascii_lowercase())
}

/// A request's host name (see [`request_host`]).
enum HostName {
    /// The first bytes of the `Host` value (visible ASCII, checked when it was read).
    Lent(HeaderValue, usize),
    Owned(String),
}

impl HostName {
    fn as_str(&self) -> &str {
        match self {
            // Checked as text when it was lent.
            HostName::Lent(v, len) => std::str::from_utf8(&v.as_bytes()[..*len]).unwrap_or(""),
            HostName::Owned(s) => s,
        }
    }
}

/// The message's `Content-Length`, read as the parsers read it (digits alone: not `+5`).
fn content_length(h: &HeaderMap) -> Option<u64> {
    codec::content_length(h.get(header::CONTENT_LENGTH)?.as_bytes())
}

/// A body the plugins are done with goes with its final length, not chunked; a message that
/// already says exactly that is left as it is.
fn set_length(h: &mut HeaderMap, len: u64) {
    let one_length = h.get_all(header::CONTENT_LENGTH).iter().count() == 1;
    if one_length && content_length(h) == Some(len) && !h.contains_key(header::TRANSFER_ENCODING) {
        return;
    }
    h.remove(header::TRANSFER_ENCODING);
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
}

/// A header's value as text, if it has one.
fn header_text(parts: &http::request::Parts, name: HeaderName) -> Option<Cow<'_, str>> {
    parts
        .headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(Cow::Borrowed)
}

/// nginx-style variables, for route `vars` and `chash` keys: the names
/// `wasmgate_shared::model::vars::known_variable` accepts.
pub fn nginx_var<'a>(
    parts: &'a http::request::Parts,
    client: &'a Client,
    name: &str,
) -> Option<Cow<'a, str>> {
    let peer = client.addr;
    if let Some(arg) = name.strip_prefix("arg_") {
        let q = parts.uri.query()?;
        return form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == arg)
            .map(|(_, v)| Cow::Owned(v.into_owned()));
    }
    if let Some(h) = name.strip_prefix("http_") {
        let h = h.replace('_', "-");
        return parts
            .headers
            .get(h.as_str())
            .and_then(|v| v.to_str().ok())
            .map(Cow::Borrowed);
    }
    if let Some(c) = name.strip_prefix("cookie_") {
        return cookie(&parts.headers, c).map(Cow::Owned);
    }
    // nginx's `$uri`: decoded and resolved, as routes match it.
    let uri = || normalized_path(parts.uri.path()).unwrap_or(Cow::Borrowed(parts.uri.path()));
    Some(match name {
        "uri" => uri(),
        // APISIX 3's: the normalized `$uri` with the query, so that `/%61dmin` or
        // `/public/../admin` cannot pass a `vars` rule on `^/admin`; the target as sent is
        // `real_request_uri`.
        "request_uri" => {
            let uri = uri();
            match parts.uri.query() {
                Some(q) => Cow::Owned(format!("{uri}?{q}")),
                None => uri,
            }
        }
        "real_request_uri" => Cow::Borrowed(
            parts
                .uri
                .path_and_query()
                .map(|p| p.as_str())
                .unwrap_or("/"),
        ),
        "args" | "query_string" => Cow::Borrowed(parts.uri.query().unwrap_or("")),
        "host" => Cow::Owned(request_host(parts, None).as_str().to_string()),
        "request_method" => Cow::Borrowed(parts.method.as_str()),
        "remote_addr" => Cow::Owned(peer.ip().to_string()),
        "remote_port" => Cow::Owned(peer.port().to_string()),
        "is_args" => Cow::Borrowed(if parts.uri.query().is_some() { "?" } else { "" }),
        "server_addr" => Cow::Owned(client.local.ip().to_string()),
        "server_port" => Cow::Owned(client.local.port().to_string()),
        "server_protocol" => Cow::Borrowed(match parts.version {
            http::Version::HTTP_10 => "HTTP/1.0",
            _ => "HTTP/1.1",
        }),
        "content_type" => return header_text(parts, header::CONTENT_TYPE),
        "content_length" => return header_text(parts, header::CONTENT_LENGTH),
        _ => return connection_var(client.tls.as_deref(), name),
    })
}

/// Why a request over TLS is refused (400) by the client certificates SSL objects ask for,
/// as APISIX refuses it: the connection's object asks for one, its client showed none, and
/// `path` (`$uri`) is not one of `client.skip_mtls_uri_regex`; or the object that serves
/// `host` asks for one and the connection was not made with it, for that name, as it is now
/// (a certificate checked for one name does not open another's routes, and a client with no
/// certificate cannot reach them by naming another host in its handshake).
fn mtls_refusal(tls: &TlsInfo, certs: &Certs, path: &str, host: &str) -> Option<String> {
    if tls.mtls && tls.peer.is_none() {
        let open = tls.mtls_skip.as_ref().is_some_and(|s| s.is_match(path));
        if !open {
            return Some(format!(
                "no client certificate, and {path:?} is not in client.skip_mtls_uri_regex"
            ));
        }
    }
    let serving = certs.asking_client_cert(host)?;
    let name = &*tls.name;
    (serving.salt() != tls.site || !name.eq_ignore_ascii_case(host)).then(|| {
        format!(
            "the host {host:?} asks for a client certificate, and the connection was made for {name:?}"
        )
    })
}

/// `$scheme`: `https` for a connection over TLS.
fn scheme_of(tls: Option<&TlsInfo>) -> &'static str {
    match tls {
        Some(_) => "https",
        None => "http",
    }
}

/// The variables of the connection rather than the request
/// (`vars::CONNECTION_VARIABLES`: `$scheme`, the `$ssl_*` ones, empty on the plain listener,
/// `$pid`), as route `vars`, the access log and plugins read them; None: `name` is none of
/// them.
pub fn connection_var<'a>(tls: Option<&'a TlsInfo>, name: &str) -> Option<Cow<'a, str>> {
    Some(Cow::Borrowed(match name {
        "scheme" => scheme_of(tls),
        "ssl_server_name" => tls.and_then(|t| t.sni.as_deref()).unwrap_or(""),
        "ssl_protocol" => tls.map_or("", |t| t.protocol),
        "ssl_cipher" => tls.map_or("", |t| t.cipher),
        "ssl_session_reused" => tls.map_or("", TlsInfo::reused_text),
        "ssl_client_verify" => tls.map_or("", TlsInfo::client_verify),
        // The certificate the client showed (empty without one, as nginx's).
        "ssl_client_s_dn" | "ssl_client_i_dn" | "ssl_client_serial" | "ssl_client_fingerprint" => {
            let Some(peer) = tls.and_then(|t| t.peer.as_deref()) else {
                return Some(Cow::Borrowed(""));
            };
            let holder = peer.holder.as_ref();
            return Some(Cow::Borrowed(match name {
                "ssl_client_s_dn" => holder.map_or("", |h| h.subject.as_str()),
                "ssl_client_i_dn" => holder.map_or("", |h| h.issuer.as_str()),
                "ssl_client_serial" => holder.map_or("", |h| h.serial.as_str()),
                _ => peer.sha1.as_str(),
            }));
        }
        "pid" => return Some(Cow::Owned(std::process::id().to_string())),
        _ => return None,
    }))
}

fn cookie(h: &HeaderMap, name: &str) -> Option<String> {
    wasmgate_shared::cookie(
        h.get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok()),
        name,
    )
}

/// The `chash` key of a request (`hash_on` + `key`), None for other balancers.
fn hash_key(up: &UpstreamRuntime, parts: &http::request::Parts, client: &Client) -> Option<String> {
    if !up.chash {
        return None;
    }
    let key = up.key.as_deref().unwrap_or_default();
    let found = match up.hash_on {
        HashOn::Vars => nginx_var(parts, client, key).map(Cow::into_owned),
        // As APISIX reads it, `$http_<key>`: `X-User-Id` is found by `x_user_id` too.
        HashOn::Header => {
            let var = format!("http_{}", key.to_ascii_lowercase().replace('-', "_"));
            nginx_var(parts, client, &var).map(Cow::into_owned)
        }
        HashOn::Cookie => cookie(&parts.headers, key),
        // No consumers in wasmgate: the client's address, as APISIX hashes a request
        // without one.
        HashOn::Consumer => None,
        HashOn::VarsCombinations => expand_vars(key, parts, client),
    };
    // A key with no value hashes the client's address (APISIX's `fetch_chash_hash_key`),
    // rather than send the request round robin.
    Some(found.unwrap_or_else(|| client.addr.ip().to_string()))
}

/// `$remote_addr$arg_x` → the concatenated values; None when no variable has one.
fn expand_vars(template: &str, parts: &http::request::Parts, client: &Client) -> Option<String> {
    let (head, vars) = wasmgate_shared::model::vars::split_template(template);
    let mut out = head.to_string();
    let mut resolved = false;
    for (name, text) in vars {
        if let Some(v) = nginx_var(parts, client, name) {
            out.push_str(&v);
            resolved = true;
        }
        out.push_str(text);
    }
    resolved.then_some(out)
}

/// The client's request body with `client_body_timeout` and `client_max_body_size` applied;
/// the bytes received are added to `received`.
fn client_body(
    body: ClientBody,
    max: u64,
    timeout: Duration,
    received: Arc<std::sync::atomic::AtomicU64>,
) -> ProxyBody {
    let body = body::boxed(body.map_err(body::BoxError::from));
    let body = body::ReadTimeout::new(body, timeout, received);
    if max == 0 {
        return body::boxed(body);
    }
    body::boxed(http_body_util::Limited::new(body, max as usize))
}

/// `{"error_msg": …}` with a status.
pub fn json_error(status: StatusCode, msg: &str) -> Response<ProxyBody> {
    let text = serde_json::json!({ "error_msg": msg }).to_string();
    own_page(status, "application/json", text)
}

/// An answer of the gateway's own, its length said in its head: a body plugin that leaves
/// it as it is (and so hides the body's size) must not turn it into a chunked one.
fn own_page(status: StatusCode, content_type: &'static str, text: String) -> Response<ProxyBody> {
    let len = text.len();
    let mut r = Response::new(body::full(Bytes::from(text)));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    r
}

/// nginx's style of error page for 4xx/5xx produced by the gateway itself.
pub fn error_page(status: StatusCode) -> Response<ProxyBody> {
    let line = format!(
        "{} {}",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    );
    let html = format!(
        "<html>\r\n<head><title>{line}</title></head>\r\n<body>\r\n<center><h1>{line}</h1></center>\r\n<hr><center>wasmgate</center>\r\n</body>\r\n</html>\r\n"
    );
    own_page(status, "text/html; charset=utf-8", html)
}

/// Marks an answer that is not to be written: a plugin reset the stream
/// (`proxy_close_stream`). The server closes the connection without a byte of it; the request
/// is logged with nginx's 444, its status for a connection closed without a response.
#[derive(Clone, Copy)]
pub struct StreamReset;

/// The answer standing for a reset stream ([`StreamReset`]).
pub fn reset_answer() -> Response<ProxyBody> {
    let mut resp = Response::new(body::empty());
    *resp.status_mut() = StatusCode::from_u16(444).unwrap_or(StatusCode::BAD_REQUEST);
    resp.extensions_mut().insert(StreamReset);
    resp
}

/// Whether `resp` stands for a reset stream.
pub fn is_reset(resp: &Response<ProxyBody>) -> bool {
    resp.extensions().get::<StreamReset>().is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every name the shared list says the gateway gives has a value here (the master warns
    /// about the others when an object uses them).
    #[test]
    fn every_known_variable_has_a_value() {
        let req = http::Request::get("/a/b?x=1")
            .header("host", "h.test")
            .header("content-type", "text/plain")
            .header("content-length", "0")
            .header("cookie", "c=1")
            .body(())
            .unwrap();
        let (parts, _) = req.into_parts();
        let client = Client::new(
            "10.0.0.1:5555".parse().unwrap(),
            "127.0.0.1:9080".parse().unwrap(),
            None,
        );
        let names = (wasmgate_shared::model::vars::VARIABLES.iter())
            .chain(&wasmgate_shared::model::vars::CONNECTION_VARIABLES)
            .copied()
            .chain(["arg_x", "http_host", "cookie_c"]);
        for name in names {
            assert!(wasmgate_shared::model::vars::known_variable(name), "{name}");
            assert!(nginx_var(&parts, &client, name).is_some(), "{name}");
        }
        assert_eq!(nginx_var(&parts, &client, "server_port").unwrap(), "9080");
        assert!(!wasmgate_shared::model::vars::known_variable("post_arg_x"));
        assert!(!wasmgate_shared::model::vars::known_variable("arg_"));
    }

    /// `pass_host: node` names the node as a client would: without its scheme's own port.
    #[test]
    fn the_node_host_leaves_out_the_schemes_port() {
        let host = |scheme: &str, node: &str| {
            let u: wasmgate_shared::model::Upstream = serde_json::from_value(serde_json::json!(
                {"scheme": scheme, "pass_host": "node", "nodes": {node: 1}}
            ))
            .unwrap();
            let up = UpstreamRuntime::new(&u, None, "upstreams/t");
            let authority = up.authorities[0].clone();
            node_host(&up, None, &authority).unwrap()
        };
        assert_eq!(host("https", "api.test"), "api.test");
        assert_eq!(host("https", "api.test:8443"), "api.test:8443");
        assert_eq!(host("http", "api.test:80"), "api.test");
        assert_eq!(host("http", "api.test:443"), "api.test:443");
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn names(h: &HeaderMap) -> Vec<&str> {
        let mut v: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        v.sort_unstable();
        v
    }

    #[test]
    fn the_host_is_lower_case_without_port() {
        let host = |uri: &str, h: Option<&str>| {
            let mut b = Request::builder().uri(uri);
            if let Some(h) = h {
                b = b.header("host", h);
            }
            let parts = b.body(()).unwrap().into_parts().0;
            let slow = request_host(&parts, None).as_str().to_string();
            // What the parser saw of the same value gives the same host.
            let seen = h.and_then(|h| wasmgate_http1::request::host_seen(h.as_bytes()));
            assert_eq!(request_host(&parts, seen).as_str(), slow, "{h:?}");
            slow
        };
        assert_eq!(host("/", Some("example.com:8080")), "example.com");
        assert_eq!(host("/", Some("Example.COM")), "example.com");
        assert_eq!(host("/", Some("[::1]:80")), "[::1]");
        assert_eq!(host("http://Abs.example:81/x", None), "abs.example");
        assert_eq!(host("/", None), "");
        // A Host value that is not text is not used: the URI's host is.
        let mut parts = Request::builder()
            .uri("http://Uri.example/")
            .body(())
            .unwrap()
            .into_parts()
            .0;
        let odd = HeaderValue::from_bytes(b"caf\xe9.example").unwrap();
        parts.headers.insert(header::HOST, odd);
        assert_eq!(request_host(&parts, None).as_str(), "uri.example");
    }

    #[test]
    fn request_ids_are_uuid_text() {
        let id = uuid_text(0x0123_4567_89ab_cdef_fedc_ba98_7654_3210);
        assert_eq!(&id, b"01234567-89ab-cdef-fedc-ba9876543210");
        for r in [0, u128::MAX, rand::random(), rand::random()] {
            let hex = format!("{r:032x}");
            let text = [
                &hex[..8],
                &hex[8..12],
                &hex[12..16],
                &hex[16..20],
                &hex[20..],
            ]
            .join("-");
            assert_eq!(std::str::from_utf8(&uuid_text(r)), Ok(text.as_str()));
        }
        let mut h = HeaderMap::new();
        let v = request_id(&mut h).unwrap();
        assert_eq!(v.len(), 36);
        assert_eq!(h.get("x-request-id"), Some(&v));
        // A sane id from the client is kept; another is replaced.
        let mut h = headers(&[("x-request-id", "abc-123")]);
        assert_eq!(request_id(&mut h).unwrap(), "abc-123");
        let mut h = headers(&[("x-request-id", "has space")]);
        assert_eq!(request_id(&mut h).unwrap().len(), 36);
    }

    #[test]
    fn hop_by_hop_headers_are_stripped() {
        let mut h = headers(&[
            ("connection", "keep-alive"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("trailer", "x-sum"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("proxy-connection", "keep-alive"),
            ("proxy-authenticate", "Basic"),
            ("expect", "100-continue"),
            ("x-kept", "1"),
            ("content-type", "text/plain"),
        ]);
        strip_hop_by_hop(&mut h);
        assert_eq!(names(&h), ["content-type", "x-kept"]);
    }

    #[test]
    fn headers_named_by_connection_go_and_later_ones_stay() {
        let raw = "GET / HTTP/1.1\r\nconnection: close, X-Private , keep-alive, host, upgrade\r\n\
                   connection: x-other\r\nx-private: secret\r\nx-other: 1\r\nx-kept: 1\r\n\
                   host: a\r\nupgrade: websocket\r\n\r\n";
        let mut buf = bytes::BytesMut::from(raw);
        let head = wasmgate_http1::request::parse_head(&mut buf, 8192);
        let head = head.ok().flatten().expect("a whole head");
        let mut h = head.headers;
        assert!(head.seen.nominates);
        codec::strip_nominated(&mut h);
        // `Host` is the gateway's to write; `Connection` and `Upgrade` go with the fixed list.
        assert_eq!(names(&h), ["connection", "host", "upgrade", "x-kept"]);
        // What is added after (a plugin's field, the request id) stays, named or not.
        h.insert(HeaderName::from_static("x-private"), "set".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(names(&h), ["host", "x-kept", "x-private"]);
    }

    #[test]
    fn messages_without_hop_by_hop_headers_are_untouched() {
        let mut h = headers(&[("x-kept", "1"), ("x-kept", "2"), ("host", "a")]);
        strip_hop_by_hop(&mut h);
        assert_eq!(h.get_all("x-kept").iter().count(), 2);
        assert_eq!(names(&h), ["host", "x-kept"]);
    }
}
