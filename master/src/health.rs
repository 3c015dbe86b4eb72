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
//! `https_verify_certificate` (the default), and showing the upstream's `tls.client_cert` to
//! a node that asks for one. The whole probe must end within `timeout`.

use crate::state::Master;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use wasmgate_shared::config::TrustedCas;
use wasmgate_shared::health::{self, HealthShm, NodeState, Outcome, Thresholds};
use wasmgate_shared::model::checks::{Active, ProbeType};
use wasmgate_shared::model::Kind;
use wasmgate_shared::model::{PassHost, Route, Service, Upstream, UpstreamTls};

/// How often the checker looks for probes that are due and for a changed store.
const TICK: Duration = Duration::from_millis(100);
/// The longest status line read from a node.
const MAX_STATUS_LINE: usize = 1024;

/// A checked node, as the metrics and the status API list it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// The object that owns the upstream: `upstreams/1`, `routes/7`, `services/2`.
    pub owner: String,
    /// The node as its upstream lists it: `host:port` (`NodeAddr::authority`), and its host
    /// (brackets off an IPv6 address) and port.
    pub node: String,
    pub host: String,
    pub port: u16,
    /// The port probed (`checks.active.port`, else the node's).
    pub probe_port: u16,
    /// How the node is probed: `http`, `https` or `tcp`.
    pub kind: &'static str,
    slot: usize,
    tag: u64,
}

/// The health segment and what the master checks in it.
pub struct Checker {
    shm: HealthShm,
    listed: Mutex<Vec<Listed>>,
    /// The trusted CAs `https` probes check certificates against, with where they came from
    /// (read again when `apisix.ssl.ssl_trusted_certificate` changes).
    roots: Mutex<Option<(TrustedCas, Arc<rustls::RootCertStore>)>>,
}

impl Checker {
    pub fn new() -> Result<Checker, health::Error> {
        Ok(Checker {
            shm: HealthShm::create()?,
            listed: Mutex::default(),
            roots: Mutex::default(),
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

/// How the nodes of one upstream are probed; one for all of an upstream's nodes.
struct Probe {
    active: Active,
    thresholds: Thresholds,
    /// The `Host` of HTTP probes: `active.host`, else the upstream's `upstream_host` when it
    /// rewrites the Host, else each node's host.
    host: Option<String>,
    /// The upstream's `tls` (its client certificate): a node that asks for one is probed
    /// with it, as the requests it serves are.
    client: Option<UpstreamTls>,
    tls: Option<Result<tokio_rustls::TlsConnector, String>>,
    /// Probes of this upstream in flight (at most `active.concurrency`).
    busy: AtomicU32,
}

struct Target {
    listed: Listed,
    probe: Arc<Probe>,
    next_at: Instant,
    /// The probe in flight, by its serial number: a report for another is stale.
    in_flight: Option<u64>,
}

/// What a finished probe reports: the node's tag and the probe's serial number, its outcome
/// (none for a status in neither list) and what was seen, for the log.
type Report = (u64, u64, Option<Outcome>, String);

/// Runs the checks for as long as the master runs.
pub async fn run(master: Arc<Master>) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Report>();
    let mut targets: HashMap<u64, Target> = HashMap::new();
    let mut seen = None;
    let mut serial = 0;
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                // A reload (another config.yaml: trusted CAs) makes every probe anew.
                let epoch = master.epoch.load(Ordering::Relaxed);
                let now = (master.store().revision(), epoch);
                if seen != Some(now) {
                    let reloaded = seen.is_some_and(|(_, before)| before != epoch);
                    seen = Some(now);
                    reconcile(&master, &mut targets, reloaded);
                }
                start_due(&mut targets, &tx, &mut serial);
            }
            Some((tag, serial, outcome, seen)) = rx.recv() => {
                match targets.get_mut(&tag) {
                    Some(t) if t.in_flight == Some(serial) => {
                        finished(&master.health, t, outcome, &seen);
                    }
                    _ => {}
                }
            }
        }
    }
}

/// Counts a probe's outcome and schedules the next one by the node's state.
fn finished(checker: &Checker, t: &mut Target, outcome: Option<Outcome>, seen: &str) {
    let Listed { slot, tag, .. } = t.listed;
    t.in_flight = None;
    match outcome {
        Some(o) => {
            if let Some(change) = checker.shm.report(slot, tag, o, &t.probe.thresholds) {
                change.log(&t.listed.node, &t.listed.owner, "active", seen);
            }
        }
        None => tracing::debug!(
            "health check of {} of {}: {seen}, counted neither way",
            t.listed.node,
            t.listed.owner
        ),
    }
    t.next_at = Instant::now() + interval(&t.probe, checker.shm.healthy(slot, tag));
}

/// How long after a probe the next one is due, by the node's state.
fn interval(probe: &Probe, healthy: bool) -> Duration {
    let a = &probe.active;
    let every = match healthy {
        true => a.healthy.interval,
        false => a.unhealthy.interval,
    };
    Duration::from_secs(u64::from(every))
}

/// Starts the probes that are due, within each upstream's concurrency.
fn start_due(
    targets: &mut HashMap<u64, Target>,
    tx: &tokio::sync::mpsc::UnboundedSender<Report>,
    serial: &mut u64,
) {
    let now = Instant::now();
    for t in targets.values_mut() {
        if t.in_flight.is_some() || t.next_at > now {
            continue;
        }
        let probe = t.probe.clone();
        if probe.busy.load(Ordering::Relaxed) >= probe.active.concurrency {
            continue;
        }
        probe.busy.fetch_add(1, Ordering::Relaxed);
        *serial += 1;
        t.in_flight = Some(*serial);
        let (tx, tag, serial) = (tx.clone(), t.listed.tag, *serial);
        let (host, port) = (t.listed.host.clone(), t.listed.probe_port);
        tokio::spawn(async move {
            let (outcome, seen) = probe_node(&probe, &host, port).await;
            probe.busy.fetch_sub(1, Ordering::Relaxed);
            let _ = tx.send((tag, serial, outcome, seen));
        });
    }
}

/// A node the store says to check.
struct Wanted {
    owner: String,
    node: String,
    host: String,
    port: u16,
    probe: Arc<Probe>,
}

/// Lists the checked nodes again from the store: new ones get a record, gone ones lose
/// theirs, and a changed `checks.active` takes effect at once (a shorter interval is not
/// waited out). After a reload every probe is made anew (the trusted CAs may have changed).
fn reconcile(master: &Master, targets: &mut HashMap<u64, Target>, reloaded: bool) {
    let shm = &master.health.shm;
    // Each upstream's probe as it was, so that an unchanged one stays shared by its nodes,
    // old and new (its `busy` counts them all); none after a reload.
    let mut probes: HashMap<String, Arc<Probe>> = HashMap::new();
    for t in targets.values().filter(|_| !reloaded) {
        probes.insert(t.listed.owner.clone(), t.probe.clone());
    }
    let wanted = checked_nodes(master, &probes);
    targets.retain(|tag, t| {
        let keep = wanted.contains_key(tag);
        if !keep {
            shm.remove(t.listed.slot, *tag);
        }
        keep
    });
    let mut full = 0;
    let now = Instant::now();
    for (tag, w) in wanted {
        let probe_port = w.probe.active.port.map_or(w.port, |p| p as u16);
        let kind = w.probe.active.kind.as_str();
        if let Some(t) = targets.get_mut(&tag) {
            if !Arc::ptr_eq(&t.probe, &w.probe) {
                let healthy = shm.healthy(t.listed.slot, tag);
                t.next_at = t.next_at.min(now + interval(&w.probe, healthy));
                (t.listed.probe_port, t.listed.kind, t.probe) = (probe_port, kind, w.probe);
                // A probe in flight under the old settings no longer counts.
                t.in_flight = None;
            }
            continue;
        }
        let Some(slot) = shm.insert(tag) else {
            full += 1;
            continue;
        };
        let Wanted {
            owner,
            node,
            host,
            port,
            probe,
        } = w;
        let listed = Listed {
            owner,
            node,
            host,
            port,
            probe_port,
            kind,
            slot,
            tag,
        };
        targets.insert(
            tag,
            Target {
                listed,
                probe,
                next_at: now,
                in_flight: None,
            },
        );
    }
    if full > 0 {
        tracing::error!(
            "health checks: {full} nodes left unchecked: the health segment holds {} checked \
             nodes, fewer where their hashes collide",
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

/// Every node of every upstream with `checks.active` the workers use, by tag: upstream
/// objects, and upstreams written in routes and services that do not name an `upstream_id`
/// (which the workers take first). An upstream whose probe is unchanged keeps its `known` one.
fn checked_nodes(master: &Master, known: &HashMap<String, Arc<Probe>>) -> HashMap<u64, Wanted> {
    // The texts are copied under the store's lock and parsed after it: the Admin API waits
    // on that lock.
    let texts: Vec<(Kind, String, String)> = {
        let store = master.store();
        (store.iter_json())
            // Most objects have no checks: not parsed at all.
            .filter(|(kind, _, _, json)| {
                matches!(kind, Kind::Upstreams | Kind::Routes | Kind::Services)
                    && json.contains("\"checks\"")
            })
            .map(|(kind, id, _, json)| (kind, id.to_string(), json.to_string()))
            .collect()
    };
    let mut wanted = HashMap::new();
    for (kind, id, json) in texts {
        let up = match kind {
            Kind::Upstreams => serde_json::from_str::<Upstream>(&json).ok(),
            Kind::Routes => serde_json::from_str::<Route>(&json)
                .ok()
                .filter(|r| r.enabled() && r.upstream_id.is_none())
                .and_then(|r| r.upstream),
            _ => serde_json::from_str::<Service>(&json)
                .ok()
                .filter(|s| s.upstream_id.is_none())
                .and_then(|s| s.upstream),
        };
        let Some(up) = up else { continue };
        let Some(active) = up.checks.as_ref().and_then(|c| c.active.clone()) else {
            continue;
        };
        let owner = format!("{}/{id}", kind.as_str());
        let host = probe_host(&active, &up);
        let probe = match known.get(&owner) {
            // Unchanged, and its TLS settings could be made (else they are tried again): the
            // probe in use, its TLS settings not made again.
            Some(p)
                if p.active == active
                    && p.host == host
                    && p.client == up.tls
                    && !matches!(p.tls, Some(Err(_))) =>
            {
                p.clone()
            }
            _ => Arc::new(Probe::new(active, host, up.tls.clone(), master, &owner)),
        };
        for node in up.normalized_nodes().unwrap_or_default() {
            let authority = node.authority();
            let tag = health::tag(&owner, &authority);
            let host = node
                .host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let (owner, probe, port) = (owner.clone(), probe.clone(), node.port);
            wanted.insert(
                tag,
                Wanted {
                    owner,
                    node: authority,
                    host,
                    port,
                    probe,
                },
            );
        }
    }
    wanted
}

/// The `Host` of an upstream's HTTP probes: `active.host`, else its `upstream_host` when it
/// rewrites the Host (none: each node's host).
fn probe_host(active: &Active, up: &Upstream) -> Option<String> {
    active.host.clone().or_else(|| match up.pass_host {
        PassHost::Rewrite => up.upstream_host.clone(),
        _ => None,
    })
}

impl Probe {
    fn new(
        active: Active,
        host: Option<String>,
        client: Option<UpstreamTls>,
        master: &Master,
        owner: &str,
    ) -> Probe {
        let tls = (active.kind == ProbeType::Https)
            .then(|| tls_connector(active.https_verify_certificate, client.as_ref(), master));
        if let Some(Err(why)) = &tls {
            // The gateway's own settings: no probe runs, and none counts against the nodes.
            tracing::error!("health checks of {owner}: https probes cannot run: {why}");
        }
        Probe {
            thresholds: active.thresholds(),
            active,
            host,
            client,
            tls,
            busy: AtomicU32::new(0),
        }
    }
}

/// The TLS side of `https` probes: the node's certificate checked against the trusted CAs,
/// or not at all; the upstream's client certificate shown to a node that asks for one (a
/// node that requires it would otherwise refuse every probe, and be taken out of service).
fn tls_connector(
    verify: bool,
    client: Option<&UpstreamTls>,
    master: &Master,
) -> Result<tokio_rustls::TlsConnector, String> {
    let roots = verify.then(|| roots(master)).transpose()?;
    let config = wasmgate_shared::tls::upstream_client(roots, client)?;
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// The CAs of `apisix.ssl.ssl_trusted_certificate`, read when a probe first needs them and
/// again when the setting changes (a failure is not kept: the next change of the store tries
/// again).
fn roots(master: &Master) -> Result<Arc<rustls::RootCertStore>, String> {
    let cas = master.config().config.apisix.ssl.trusted_cas();
    let mut kept = master
        .health
        .roots
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some((from, roots)) = kept.as_ref() {
        if *from == cas {
            return Ok(roots.clone());
        }
    }
    let roots = Arc::new(wasmgate_shared::tls::trusted_roots(&master.prefix, &cas)?);
    *kept = Some((cas, roots.clone()));
    Ok(roots)
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
    if let Some(Err(why)) = &p.tls {
        return (None, format!("TLS settings: {why}"));
    }
    let tcp = match tokio::net::TcpStream::connect((host, port)).await {
        Ok(s) => s,
        Err(e) => return (Some(Outcome::TcpFailure), format!("connect() failed ({e})")),
    };
    let _ = tcp.set_nodelay(true);
    let name = p.host.as_deref().unwrap_or(host);
    match (&p.tls, p.active.kind) {
        (_, ProbeType::Tcp) => (Some(Outcome::Success), "connected".into()),
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
        // Plain HTTP (TLS settings that cannot be used were answered above).
        _ => http_probe(p, tcp, name, port).await,
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
