//! Active health checks (`checks.active` of an upstream): the master probes every node of
//! every checked upstream on its interval — once for the whole gateway, however many workers
//! serve, as APISIX lets one worker probe for all — and counts what it finds into the
//! node's record in the health segment (`wasmgate_shared::health`), where the workers' passive
//! checks count too and from which they choose nodes.
//!
//! The set of checked nodes follows the store: every change of its revision lists the
//! upstreams with `checks.active` again (upstream objects, and those written inside routes and
//! services), places records for new nodes and removes those of nodes gone. A node keeps its
//! record, and so its state, while its upstream changes in other ways.
//!
//! A probe (`type`): `tcp` connects; `http` connects and sends `GET http_path HTTP/1.0` with
//! the `Host` and `req_headers`, and reads the status line; `https` does the same over TLS,
//! checking the node's certificate against `apisix.ssl.ssl_trusted_certificate` when
//! `https_verify_certificate` (the default). The whole probe must end within `timeout`.

use crate::state::Master;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use wasmgate_shared::health::{self, HealthShm, NodeState, Outcome, Thresholds};
use wasmgate_shared::model::checks::{Active, ProbeType};
use wasmgate_shared::model::Kind;
use wasmgate_shared::model::{PassHost, Route, Service, Upstream};

/// How often the checker looks for probes that are due and for a changed store.
const TICK: Duration = Duration::from_millis(100);
/// The longest status line read from a node.
const MAX_STATUS_LINE: usize = 1024;

/// A checked node, as the metrics and the status API list it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// The object that owns the upstream: `upstreams/1`, `routes/7`, `services/2`.
    pub owner: String,
    pub host: String,
    pub port: u16,
    /// How the node is probed: `http`, `https` or `tcp`.
    pub kind: &'static str,
    slot: usize,
    tag: u64,
}

/// The health segment and what the master checks in it.
pub struct Checker {
    shm: HealthShm,
    listed: Mutex<Vec<Listed>>,
}

impl Checker {
    pub fn new() -> Result<Checker, health::Error> {
        Ok(Checker {
            shm: HealthShm::create()?,
            listed: Mutex::default(),
        })
    }

    /// The segment, for the workers to inherit.
    pub fn shm(&self) -> &HealthShm {
        &self.shm
    }

    /// Every checked node with its state, by owner and address.
    pub fn nodes(&self) -> Vec<(Listed, NodeState)> {
        let listed = self.listed.lock().unwrap_or_else(|p| p.into_inner());
        (listed.iter())
            .filter_map(|l| Some((l.clone(), self.shm.state(l.slot, l.tag)?)))
            .collect()
    }
}

/// How the nodes of one upstream are probed.
struct Probe {
    active: Active,
    thresholds: Thresholds,
    /// The `Host` of HTTP probes: `active.host`, else the upstream's `upstream_host` when it
    /// rewrites the Host, else each node's host.
    host: Option<String>,
    tls: Option<Result<tokio_rustls::TlsConnector, String>>,
    /// Probes of this upstream in flight (at most `active.concurrency`).
    busy: AtomicU32,
}

struct Target {
    listed: Listed,
    probe: Arc<Probe>,
    next_at: Instant,
    in_flight: bool,
}

/// What a finished probe reports: the node's tag, its outcome (none for a status in
/// neither list) and what was seen, for the log.
type Report = (u64, Option<Outcome>, String);

/// Runs the checks for as long as the master runs.
pub async fn run(master: Arc<Master>) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Report>();
    let mut targets: HashMap<u64, Target> = HashMap::new();
    let mut seen = None;
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let revision = master.store().revision();
                if seen != Some(revision) {
                    seen = Some(revision);
                    reconcile(&master, &mut targets);
                }
                start_due(&mut targets, &tx);
            }
            Some((tag, outcome, seen)) = rx.recv() => {
                if let Some(t) = targets.get_mut(&tag) {
                    finished(&master.health, t, outcome, &seen);
                }
            }
        }
    }
}

/// Counts a probe's outcome and schedules the next one by the node's state.
fn finished(checker: &Checker, t: &mut Target, outcome: Option<Outcome>, seen: &str) {
    let Listed { slot, tag, .. } = t.listed;
    t.in_flight = false;
    match outcome {
        Some(o) => {
            if let Some(change) = checker.shm.report(slot, tag, o, &t.probe.thresholds) {
                log_change(&t.listed, change, "active", seen);
            }
        }
        None => tracing::debug!(
            "health check of {} of {}: {seen}, counted neither way",
            node_name(&t.listed),
            t.listed.owner
        ),
    }
    let a = &t.probe.active;
    let every = match checker.shm.healthy(slot, tag) {
        true => a.healthy.interval,
        false => a.unhealthy.interval,
    };
    t.next_at = Instant::now() + Duration::from_secs(u64::from(every));
}

/// Says that a node changed state, as an operator needs to read it.
fn log_change(l: &Listed, change: health::Change, by: &str, seen: &str) {
    let line = change.describe(&node_name(l), &l.owner, by, seen);
    match change.healthy {
        true => tracing::warn!("{line}"),
        false => tracing::error!("{line}"),
    }
}

fn node_name(l: &Listed) -> String {
    match l.host.contains(':') {
        true => format!("[{}]:{}", l.host, l.port),
        false => format!("{}:{}", l.host, l.port),
    }
}

/// Starts the probes that are due, within each upstream's concurrency.
fn start_due(targets: &mut HashMap<u64, Target>, tx: &tokio::sync::mpsc::UnboundedSender<Report>) {
    let now = Instant::now();
    for t in targets.values_mut() {
        if t.in_flight || t.next_at > now {
            continue;
        }
        let probe = t.probe.clone();
        if probe.busy.load(Ordering::Relaxed) >= probe.active.concurrency {
            continue;
        }
        probe.busy.fetch_add(1, Ordering::Relaxed);
        t.in_flight = true;
        let (tx, tag) = (tx.clone(), t.listed.tag);
        let (host, port) = (t.listed.host.clone(), t.listed.port);
        tokio::spawn(async move {
            let (outcome, seen) = probe_node(&probe, &host, port).await;
            probe.busy.fetch_sub(1, Ordering::Relaxed);
            let _ = tx.send((tag, outcome, seen));
        });
    }
}

/// Lists the checked nodes again from the store: new ones get a record, gone ones lose
/// theirs, and a changed `checks.active` takes effect from the next probe.
fn reconcile(master: &Master, targets: &mut HashMap<u64, Target>) {
    let wanted = checked_nodes(master);
    let shm = &master.health.shm;
    targets.retain(|tag, t| {
        let keep = wanted.contains_key(tag);
        if !keep {
            shm.remove(t.listed.slot, *tag);
        }
        keep
    });
    let mut full = 0;
    for (tag, (owner, host, port, probe)) in wanted {
        if let Some(t) = targets.get_mut(&tag) {
            if !same_probe(&t.probe, &probe) {
                t.listed.kind = kind_name(probe.active.kind);
                t.probe = probe;
            }
            continue;
        }
        let Some(slot) = shm.insert(tag) else {
            full += 1;
            continue;
        };
        let kind = kind_name(probe.active.kind);
        let listed = Listed {
            owner,
            host,
            port,
            kind,
            slot,
            tag,
        };
        let next_at = Instant::now();
        let in_flight = false;
        targets.insert(
            tag,
            Target {
                listed,
                probe,
                next_at,
                in_flight,
            },
        );
    }
    if full > 0 {
        tracing::error!(
            "health checks: {full} nodes left unchecked: the health segment holds {} checked nodes",
            health::SLOTS
        );
    }
    let mut listed: Vec<Listed> = targets.values().map(|t| t.listed.clone()).collect();
    listed.sort_by(|a, b| (&a.owner, &a.host, a.port).cmp(&(&b.owner, &b.host, b.port)));
    *master
        .health
        .listed
        .lock()
        .unwrap_or_else(|p| p.into_inner()) = listed;
}

fn kind_name(k: ProbeType) -> &'static str {
    match k {
        ProbeType::Http => "http",
        ProbeType::Https => "https",
        ProbeType::Tcp => "tcp",
    }
}

fn same_probe(a: &Probe, b: &Probe) -> bool {
    a.active == b.active && a.host == b.host
}

type Wanted = HashMap<u64, (String, String, u16, Arc<Probe>)>;

/// Every node of every upstream with `checks.active`, by tag.
fn checked_nodes(master: &Master) -> Wanted {
    let mut upstreams = Vec::new();
    {
        let store = master.store();
        for (kind, id, _, json) in store.iter_json() {
            // Most objects have no checks: not parsed at all.
            if !json.contains("\"checks\"") {
                continue;
            }
            let up = match kind {
                Kind::Upstreams => serde_json::from_str::<Upstream>(json).ok(),
                Kind::Routes => serde_json::from_str::<Route>(json)
                    .ok()
                    .filter(Route::enabled)
                    .and_then(|r| r.upstream),
                Kind::Services => serde_json::from_str::<Service>(json)
                    .ok()
                    .and_then(|s| s.upstream),
                _ => None,
            };
            if let Some(up) = up {
                upstreams.push((format!("{}/{id}", kind.as_str()), up));
            }
        }
    }
    let mut wanted = Wanted::new();
    for (owner, up) in upstreams {
        let Some(active) = up.checks.as_ref().and_then(|c| c.active.clone()) else {
            continue;
        };
        let probe = Arc::new(Probe::new(active, &up, master));
        for node in up.normalized_nodes().unwrap_or_default() {
            let tag = health::tag(&owner, &node.authority());
            let port = probe.active.port.map_or(node.port, |p| p as u16);
            let host = node
                .host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            wanted.insert(tag, (owner.clone(), host, port, probe.clone()));
        }
    }
    wanted
}

impl Probe {
    fn new(active: Active, up: &Upstream, master: &Master) -> Probe {
        let u = &active.unhealthy;
        let thresholds = Thresholds {
            successes: active.healthy.successes as u8,
            http_failures: u.http_failures as u8,
            tcp_failures: u.tcp_failures as u8,
            timeouts: u.timeouts as u8,
        };
        let host = active.host.clone().or_else(|| match up.pass_host {
            PassHost::Rewrite => up.upstream_host.clone(),
            _ => None,
        });
        let tls = (active.kind == ProbeType::Https)
            .then(|| tls_connector(active.https_verify_certificate, master));
        Probe {
            active,
            thresholds,
            host,
            tls,
            busy: AtomicU32::new(0),
        }
    }
}

/// The TLS side of `https` probes: the node's certificate checked against the trusted CAs,
/// or not at all.
fn tls_connector(verify: bool, master: &Master) -> Result<tokio_rustls::TlsConnector, String> {
    let provider = wasmgate_shared::tls::provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match verify {
        true => builder.with_root_certificates(roots(master)?),
        false => builder
            .dangerous()
            .with_custom_certificate_verifier(wasmgate_shared::tls::unverified()),
    };
    let mut config = builder.with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// The CAs of `apisix.ssl.ssl_trusted_certificate`, read once, when a probe first needs them.
fn roots(master: &Master) -> Result<Arc<rustls::RootCertStore>, String> {
    static ROOTS: OnceLock<Result<Arc<rustls::RootCertStore>, String>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let cas = master.config().config.apisix.ssl.trusted_cas();
            wasmgate_shared::tls::trusted_roots(&master.prefix, &cas).map(Arc::new)
        })
        .clone()
}

/// One probe of `host:port`, within the probe's timeout.
async fn probe_node(p: &Probe, host: &str, port: u16) -> (Option<Outcome>, String) {
    let limit = Duration::from_secs_f64(p.active.timeout);
    match tokio::time::timeout(limit, attempt(p, host, port)).await {
        Ok(found) => found,
        Err(_) => (
            Some(Outcome::Timeout),
            format!("no answer within {limit:?}"),
        ),
    }
}

async fn attempt(p: &Probe, host: &str, port: u16) -> (Option<Outcome>, String) {
    let tcp = match tokio::net::TcpStream::connect((host, port)).await {
        Ok(s) => s,
        Err(e) => return (Some(Outcome::TcpFailure), format!("connect() failed ({e})")),
    };
    let _ = tcp.set_nodelay(true);
    let name = p.host.as_deref().unwrap_or(host);
    match (&p.tls, p.active.kind) {
        (_, ProbeType::Tcp) => (Some(Outcome::Success), "connected".into()),
        (None, _) => http_probe(p, tcp, name, port).await,
        (Some(Err(why)), _) => (Some(Outcome::TcpFailure), format!("TLS settings: {why}")),
        (Some(Ok(tls)), _) => {
            let server =
                rustls::pki_types::ServerName::try_from(name.to_string()).unwrap_or_else(|_| {
                    rustls::pki_types::ServerName::try_from("invalid").expect("a DNS name")
                });
            match tls.connect(server, tcp).await {
                Ok(s) => http_probe(p, s, name, port).await,
                Err(e) => (
                    Some(Outcome::TcpFailure),
                    format!("TLS handshake failed ({e})"),
                ),
            }
        }
    }
}

/// Sends the probe's request on `s` and classifies the status it is answered.
async fn http_probe<S: AsyncRead + AsyncWrite + Unpin>(
    p: &Probe,
    mut s: S,
    host: &str,
    port: u16,
) -> (Option<Outcome>, String) {
    let a = &p.active;
    let request = request(a, host, port);
    if let Err(e) = s.write_all(request.as_bytes()).await {
        return (
            Some(Outcome::TcpFailure),
            format!("sending the probe failed ({e})"),
        );
    }
    let status = match status_line(&mut s).await {
        Ok(status) => status,
        Err(why) => return (Some(Outcome::TcpFailure), why),
    };
    let seen = format!("status {status}");
    if a.healthy.http_statuses.contains(&status) {
        (Some(Outcome::Success), seen)
    } else if a.unhealthy.http_statuses.contains(&status) {
        (Some(Outcome::HttpFailure), seen)
    } else {
        (None, seen)
    }
}

/// The probe's request: HTTP/1.0, so that the node closes when it has answered.
fn request(a: &Active, host: &str, port: u16) -> String {
    let default_port = match a.kind {
        ProbeType::Https => 443,
        _ => 80,
    };
    let mut r = format!("GET {} HTTP/1.0\r\n", a.http_path);
    if !a.headers().any(|(n, _)| n.eq_ignore_ascii_case("host")) {
        let host = match host.contains(':') {
            true => format!("[{host}]"),
            false => host.to_string(),
        };
        match port == default_port {
            true => r.push_str(&format!("Host: {host}\r\n")),
            false => r.push_str(&format!("Host: {host}:{port}\r\n")),
        }
    }
    if !a
        .headers()
        .any(|(n, _)| n.eq_ignore_ascii_case("user-agent"))
    {
        r.push_str(concat!(
            "User-Agent: wasmgate/",
            env!("CARGO_PKG_VERSION"),
            " (health check)\r\n"
        ));
    }
    for (name, value) in a.headers() {
        r.push_str(&format!("{name}: {value}\r\n"));
    }
    r.push_str("\r\n");
    r
}

/// The status of the answer's first line (`HTTP/1.x NNN …`).
async fn status_line<S: AsyncRead + Unpin>(s: &mut S) -> Result<u16, String> {
    let mut buf = Vec::with_capacity(128);
    let mut chunk = [0u8; 256];
    while !buf.contains(&b'\n') {
        if buf.len() >= MAX_STATUS_LINE {
            return Err("no status line in the first 1024 bytes".into());
        }
        let n =
            (s.read(&mut chunk).await).map_err(|e| format!("reading the answer failed ({e})"))?;
        if n == 0 {
            return Err("closed without an answer".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let line = buf.split(|b| *b == b'\n').next().unwrap_or_default();
    let text = String::from_utf8_lossy(line);
    let mut parts = text.split_ascii_whitespace();
    match (parts.next(), parts.next().map(str::parse::<u16>)) {
        (Some(v), Some(Ok(status)))
            if v.starts_with("HTTP/1.") && (100..=999).contains(&status) =>
        {
            Ok(status)
        }
        _ => Err(format!("not an HTTP answer: {:?}", text.trim_end())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn active(v: serde_json::Value) -> Active {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn the_request_names_the_host_and_the_headers() {
        let a = active(serde_json::json!({"http_path": "/ping", "req_headers": ["X-Probe: 1"]}));
        let r = request(&a, "example.com", 8080);
        assert!(
            r.starts_with("GET /ping HTTP/1.0\r\nHost: example.com:8080\r\nUser-Agent: wasmgate/")
        );
        assert!(r.ends_with("X-Probe: 1\r\n\r\n"), "{r}");
        let r = request(&a, "::1", 80);
        assert!(r.contains("Host: [::1]\r\n"), "{r}");
        let a = active(serde_json::json!({"req_headers": ["host: other", "User-Agent: me"]}));
        let r = request(&a, "example.com", 80);
        assert_eq!(r, "GET / HTTP/1.0\r\nhost: other\r\nUser-Agent: me\r\n\r\n");
    }

    #[tokio::test]
    async fn status_lines_are_read_and_garbage_is_not_taken() {
        let read = |bytes: &'static [u8]| async move {
            let mut s = bytes;
            status_line(&mut s).await
        };
        assert_eq!(read(b"HTTP/1.1 204 No Content\r\n\r\n").await, Ok(204));
        assert_eq!(read(b"HTTP/1.0 500\r\n").await, Ok(500));
        assert!(read(b"SSH-2.0-OpenSSH\r\n")
            .await
            .unwrap_err()
            .contains("not an HTTP answer"));
        assert!(read(b"HTTP/1.1 2").await.unwrap_err().contains("closed"));
        assert!(read(&[b'x'; 2000])
            .await
            .unwrap_err()
            .contains("first 1024 bytes"));
    }
}
