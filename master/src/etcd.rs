//! Cluster mode: routes, services, upstreams and global rules in etcd, shared by every node
//! whose `config.yaml` has `deployment.etcd` — with APISIX's key layout and JSON values
//! (`/apisix/routes/1` holds the route's JSON), so etcd data written by APISIX works.
//!
//! - [`Etcd`]: a small client for etcd's v3 JSON API (`/v3/kv/range`, `put`, `deleterange`,
//!   `txn`, `watch`) over plain HTTP/1.1 with hyper: no gRPC stack for five calls.
//! - [`load`]: the whole prefix at start, into a disk-less [`Store`].
//! - [`follow`]: the master's task that watches the prefix and publishes every change to the
//!   workers; when etcd goes away the last configuration keeps serving, `reachable` turns
//!   false (status and metrics say so) and, once etcd answers again, the copy is resynchronised
//!   from a full read before watching resumes.
//! - [`commit`]: an Admin API write — to etcd first, then applied to the local copy and
//!   published, so the node that took the write serves it when it answers; the others get it
//!   from their watch.

use crate::admin::objects::{Change, Reply};
use crate::state::Master;
use crate::store::{Store, Stored};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use wasmgate_shared::config::{EtcdCredentials, EtcdSection};
use wasmgate_shared::model::{self, Kind};

/// Largest answer read from etcd (a full read of a big configuration).
const MAX_ANSWER: usize = 256 << 20;

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("etcd unreachable ({0})")]
    Unreachable(String),
    #[error("etcd answered {status}: {body}")]
    Refused { status: u16, body: String },
    #[error("etcd answer unreadable: {0}")]
    Protocol(String),
    /// The request went out and no whole answer came back: etcd may have acted on it.
    #[error("etcd gave no answer ({0})")]
    Unanswered(String),
    /// etcd ended the watch for a reason other than a compaction (auth turned on, a
    /// permission taken away): it is answering, but not serving this node.
    #[error("etcd canceled the watch: {0}")]
    Canceled(String),
    /// etcd refused the configured user and password.
    #[error(
        "etcd refused {}: {why} (deployment.etcd.user and password)",
        who(user.as_deref())
    )]
    Auth { user: Option<String>, why: String },
}

impl EtcdError {
    /// Whether the same request may succeed a moment later: etcd not up yet, or not answering
    /// (a refusal of its own, credentials or a malformed answer will not change by waiting).
    pub fn may_pass(&self) -> bool {
        match self {
            EtcdError::Unreachable(_) | EtcdError::Unanswered(_) => true,
            EtcdError::Refused { status, .. } => *status >= 500,
            _ => false,
        }
    }
}

/// The user an [`EtcdError::Auth`] names, or that none was set.
fn who(user: Option<&str>) -> String {
    match user {
        None => "this node without a user".into(),
        Some(user) => format!("user {user:?}"),
    }
}

/// How long a health check waits for etcd's answer: a hung etcd (stopped, or behind a
/// firewall that drops packets) is then found within a few seconds, not after `timeout`.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// The longest a watch goes without a health check, however busy it is.
const PROBE_EVERY: Duration = Duration::from_secs(10);

/// How long the watching task waits before trying again after etcd refused the user: each
/// try costs etcd a password hash, and a wrong password stays wrong until a reload.
const AUTH_RETRY: Duration = Duration::from_secs(5);

/// Where this node stands with etcd's authentication, per endpoint: simple tokens (etcd's
/// default) are known only to the member that issued them, and die with its process.
#[derive(Debug, Clone)]
enum Session {
    /// Not asked yet, or the last token was refused.
    Unknown,
    /// The endpoint answered that authentication is off: requests go without a token.
    Open {
        endpoint: usize,
    },
    Token {
        endpoint: usize,
        token: Arc<str>,
    },
}

/// One key-value as etcd returns it.
#[derive(Debug, Clone)]
pub struct Kv {
    pub key: String,
    pub value: Vec<u8>,
    pub create_revision: u64,
    pub mod_revision: u64,
}

/// A client for one etcd cluster, with the state the master reports.
pub struct Etcd {
    endpoints: Vec<(String, u16)>,
    /// The endpoint that answered last (tried first).
    current: AtomicUsize,
    pub prefix: String,
    timeout: Duration,
    /// Whether etcd answered the last request or health check.
    pub reachable: AtomicBool,
    /// The etcd revision of the copy the workers serve.
    pub revision: AtomicU64,
    /// Admin API writes through this node, one at a time: a write reads the object it
    /// changes from the local copy (a PATCH, the revision a PUT expects), and two at once
    /// would make the second fail as if another node had changed the object.
    pub writes: tokio::sync::Mutex<()>,
    /// Asks the watching task for a full read (a reload changed which plugins exist, so
    /// objects refused before may be served now, and the reverse).
    resync: tokio::sync::Notify,
    /// That read follows a reload: an object the copy lacks may be one refused until now,
    /// not a sign of another history (see [`other_history`]).
    after_reload: AtomicBool,
    /// Who this node signs in as, and its token.
    auth: std::sync::Mutex<Auth>,
    /// Why etcd is not serving this node, while it is not (for the status).
    pub last_error: std::sync::Mutex<Option<String>>,
}

/// The user and password (`deployment.etcd.user`, `password`: a reload may change them) and
/// the session they opened. Kept together so that a token obtained for credentials a reload
/// has since replaced is not kept.
#[derive(Debug)]
struct Auth {
    credentials: Option<EtcdCredentials>,
    /// Counts the changes of `credentials`.
    generation: u64,
    session: Session,
}

impl std::fmt::Debug for Etcd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Etcd")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .finish()
    }
}

fn b64(s: &[u8]) -> String {
    B64.encode(s)
}

/// etcd's JSON API writes 64-bit integers as strings and leaves out zero values.
fn int(v: &Value) -> u64 {
    match v {
        Value::String(s) => s.parse().unwrap_or(0),
        Value::Number(n) => n.as_u64().unwrap_or(0),
        _ => 0,
    }
}

fn header_revision(v: &Value) -> u64 {
    int(&v["header"]["revision"])
}

fn parse_kv(v: &Value) -> Result<Kv, EtcdError> {
    let decode = |field: &str| -> Result<Vec<u8>, EtcdError> {
        match v[field].as_str() {
            None => Ok(Vec::new()),
            Some(s) => B64
                .decode(s)
                .map_err(|e| EtcdError::Protocol(format!("{field}: {e}"))),
        }
    };
    Ok(Kv {
        key: String::from_utf8_lossy(&decode("key")?).into_owned(),
        value: decode("value")?,
        create_revision: int(&v["create_revision"]),
        mod_revision: int(&v["mod_revision"]),
    })
}

/// The end of the key range that holds every key starting with `prefix` (etcd's convention:
/// the prefix with its last byte incremented).
fn range_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

impl Etcd {
    pub fn new(cfg: &EtcdSection) -> Result<Etcd, String> {
        Ok(Etcd {
            endpoints: cfg.endpoints()?,
            current: AtomicUsize::new(0),
            prefix: cfg.prefix.clone(),
            timeout: Duration::from_secs(cfg.timeout.max(1)),
            reachable: AtomicBool::new(false),
            revision: AtomicU64::new(0),
            writes: tokio::sync::Mutex::new(()),
            resync: tokio::sync::Notify::new(),
            after_reload: AtomicBool::new(false),
            auth: std::sync::Mutex::new(Auth {
                credentials: cfg.credentials()?,
                generation: 0,
                session: Session::Unknown,
            }),
            last_error: std::sync::Mutex::new(None),
        })
    }

    fn auth(&self) -> std::sync::MutexGuard<'_, Auth> {
        self.auth.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a reload's user and password: the next request authenticates with them.
    pub fn set_credentials(&self, credentials: Option<EtcdCredentials>) {
        let mut auth = self.auth();
        if auth.credentials != credentials {
            auth.credentials = credentials;
            auth.generation += 1;
            auth.session = Session::Unknown;
        }
    }

    /// Whether a reload's `credentials` (None: no user) would let this node in, tried before
    /// they replace the running ones: signed in with (one endpoint after the other, as every
    /// call goes), then one read of `<prefix>/` with the token. `Err(EtcdError::Auth)` when
    /// etcd refuses them — the password, or the read (no permission; no user while
    /// authentication is on); other errors say no endpoint could be asked.
    pub async fn try_credentials(
        &self,
        credentials: Option<&EtcdCredentials>,
    ) -> Result<(), EtcdError> {
        let mut last = EtcdError::Unreachable("no endpoint".into());
        for endpoint in self.endpoints_in_turn() {
            let tried = tokio::time::timeout(PROBE_TIMEOUT, self.try_at(endpoint, credentials));
            match tried.await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(e @ EtcdError::Auth { .. })) => return Err(e),
                Ok(Err(e)) => last = e,
                Err(_) => {
                    last = EtcdError::Unreachable(format!(
                        "{}: no answer within {} s",
                        self.endpoints()[endpoint],
                        PROBE_TIMEOUT.as_secs()
                    ))
                }
            }
        }
        Err(last)
    }

    async fn try_at(
        &self,
        endpoint: usize,
        credentials: Option<&EtcdCredentials>,
    ) -> Result<(), EtcdError> {
        let token = match credentials {
            Some(c) => match self.sign_in(endpoint, c).await? {
                Session::Token { token, .. } => Some(token),
                _ => None,
            },
            None => None,
        };
        let (status, incoming) = self
            .send(
                endpoint,
                "/v3/kv/range",
                &self.prefix_probe(),
                token.as_deref(),
            )
            .await?;
        match self.answer(status, incoming).await {
            Ok(_) => Ok(()),
            Err(EtcdError::Refused { body, .. })
                if body.contains("permission denied") || body.contains("user name is empty") =>
            {
                Err(EtcdError::Auth {
                    user: credentials.map(|c| c.user.clone()),
                    why: body,
                })
            }
            Err(e) => Err(e),
        }
    }

    /// Every key under `<prefix>/`, as etcd's requests name a range (`key`, `range_end`): what
    /// the node reads, watches and checks, and where its user is granted (a user granted the
    /// prefix with `--prefix` may not read the key `<prefix>` itself).
    fn prefix_range(&self) -> Value {
        let prefix = format!("{}/", self.prefix);
        json!({"key": b64(prefix.as_bytes()), "range_end": b64(&range_end(&prefix))})
    }

    /// A one-key read inside `<prefix>/`.
    fn prefix_probe(&self) -> Value {
        let mut probe = self.prefix_range();
        probe["limit"] = json!(1);
        probe["keys_only"] = json!(true);
        probe
    }

    fn forget_session(&self) {
        self.auth().session = Session::Unknown;
    }

    /// The token to send to `endpoint` (None: no user configured, or authentication is off
    /// there), asking etcd for one first when none is held for it.
    async fn token(&self, endpoint: usize) -> Result<Option<Arc<str>>, EtcdError> {
        let (credentials, generation) = {
            let auth = self.auth();
            match &auth.session {
                Session::Token { endpoint: e, token } if *e == endpoint => {
                    return Ok(Some(token.clone()))
                }
                Session::Open { endpoint: e } if *e == endpoint => return Ok(None),
                _ => {}
            }
            match &auth.credentials {
                None => return Ok(None),
                Some(c) => (c.clone(), auth.generation),
            }
        };
        let session = self.sign_in(endpoint, &credentials).await?;
        let token = match &session {
            Session::Token { token, .. } => Some(token.clone()),
            _ => None,
        };
        let mut auth = self.auth();
        // Credentials a reload replaced meanwhile: used for this request, not kept.
        if auth.generation == generation {
            auth.session = session;
        }
        Ok(token)
    }

    /// Asks `endpoint` for a token for `credentials` (`/v3/auth/authenticate`).
    async fn sign_in(
        &self,
        endpoint: usize,
        credentials: &EtcdCredentials,
    ) -> Result<Session, EtcdError> {
        let body = json!({"name": credentials.user, "password": credentials.password.0});
        let (status, incoming) = self
            .send(endpoint, "/v3/auth/authenticate", &body, None)
            .await?;
        match self.answer(status, incoming).await {
            Ok(v) => Ok(Session::Token {
                endpoint,
                token: v["token"].as_str().unwrap_or_default().into(),
            }),
            Err(EtcdError::Refused { body, .. })
                if body.contains("authentication is not enabled") =>
            {
                Ok(Session::Open { endpoint })
            }
            // The credentials themselves; anything else (a leader election, a lost quorum)
            // is etcd unable to answer now, not a refusal of the user.
            Err(EtcdError::Refused { body, .. })
                if body.contains("authentication failed")
                    || body.contains("user name not found") =>
            {
                Err(EtcdError::Auth {
                    user: Some(credentials.user.clone()),
                    why: body,
                })
            }
            Err(e) => Err(e),
        }
    }

    /// Makes the watching task read everything again, with the plugins as they are now.
    pub fn resync_soon(&self) {
        self.after_reload.store(true, Ordering::Relaxed);
        self.resync.notify_one();
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.endpoints
            .iter()
            .map(|(h, p)| format!("http://{h}:{p}"))
            .collect()
    }

    /// `<prefix>/<kind>/<id>`.
    pub fn key(&self, kind: Kind, id: &str) -> String {
        format!("{}/{}/{id}", self.prefix, kind.as_str())
    }

    /// Opens a request to one endpoint, as the configured user if there is one, and returns
    /// the answer's status and body.
    async fn open(
        &self,
        endpoint: usize,
        path: &str,
        body: &Value,
    ) -> Result<(u16, hyper::body::Incoming), EtcdError> {
        let token = self.token(endpoint).await?;
        let sent = self.send(endpoint, path, body, token.as_deref()).await;
        if let Err(EtcdError::Unanswered(_)) = &sent {
            // A token etcd cannot place (one issued before it was wiped, at a raft index it
            // has not reached again) makes it wait rather than refuse: ask for a new one.
            self.forget_session();
        }
        sent
    }

    async fn send(
        &self,
        endpoint: usize,
        path: &str,
        body: &Value,
        token: Option<&str>,
    ) -> Result<(u16, hyper::body::Incoming), EtcdError> {
        let (host, port) = &self.endpoints[endpoint];
        let unreachable = |e: &dyn std::fmt::Display| {
            EtcdError::Unreachable(format!("http://{host}:{port}: {e}"))
        };
        let connect = tokio::net::TcpStream::connect((host.as_str(), *port));
        let stream = tokio::time::timeout(self.timeout.min(Duration::from_secs(5)), connect)
            .await
            .map_err(|_| unreachable(&"connect timed out"))?
            .map_err(|e| unreachable(&e))?;
        let _ = stream.set_nodelay(true);
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| unreachable(&e))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut req = http::Request::post(path)
            .header(http::header::HOST, format!("{host}:{port}"))
            .header(http::header::CONTENT_TYPE, "application/json");
        if let Some(token) = token {
            req = req.header(http::header::AUTHORIZATION, token);
        }
        let req = req
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|e| EtcdError::Protocol(e.to_string()))?;
        let unanswered =
            |e: &dyn std::fmt::Display| EtcdError::Unanswered(format!("http://{host}:{port}: {e}"));
        let resp = tokio::time::timeout(self.timeout, sender.send_request(req))
            .await
            .map_err(|_| unanswered(&"no answer in time"))?
            .map_err(|e| unanswered(&e))?;
        Ok((resp.status().as_u16(), resp.into_body()))
    }

    /// Every endpoint once, from the one that answered last.
    fn endpoints_in_turn(&self) -> impl Iterator<Item = usize> {
        let n = self.endpoints.len();
        let first = self.current.load(Ordering::Relaxed) % n;
        (0..n).map(move |k| (first + k) % n)
    }

    /// One request/answer call, trying each endpoint from the last good one.
    async fn call(&self, path: &str, body: Value) -> Result<Value, EtcdError> {
        let mut last = EtcdError::Unreachable("no endpoint".into());
        for i in self.endpoints_in_turn() {
            match self.call_one(i, path, &body).await {
                Ok(v) => {
                    self.current.store(i, Ordering::Relaxed);
                    self.reachable.store(true, Ordering::Relaxed);
                    return Ok(v);
                }
                // A request that may have been acted on stays the error reported, whatever
                // the next endpoint says: the caller must not take it as not done.
                Err(e @ EtcdError::Unreachable(_)) => {
                    if !matches!(last, EtcdError::Unanswered(_)) {
                        last = e;
                    }
                }
                Err(e @ EtcdError::Unanswered(_)) => last = e,
                Err(e) => return Err(e),
            }
        }
        self.reachable.store(false, Ordering::Relaxed);
        Err(last)
    }

    async fn call_one(&self, i: usize, path: &str, body: &Value) -> Result<Value, EtcdError> {
        let (status, incoming) = self.open(i, path, body).await?;
        match self.answer(status, incoming).await {
            // The token died (the member restarted, or it was another member's), or etcd
            // turned authentication on since it said it was off: once more, with a new one.
            Err(EtcdError::Refused { body: why, .. }) if self.token_refused(&why) => {
                self.forget_session();
                let (status, incoming) = self.open(i, path, body).await?;
                self.answer(status, incoming).await
            }
            answer => answer,
        }
    }

    /// Whether etcd's refusal `why` asks for a new token, with a user configured.
    fn token_refused(&self, why: &str) -> bool {
        // `revision of auth store is old`: users or roles changed since the token was made
        // (etcd's own client signs in again too).
        let auth_message = why.contains("invalid auth token")
            || why.contains("user name is empty")
            || why.contains("revision of auth store is old");
        auth_message && self.auth().credentials.is_some()
    }

    /// Reads a whole answer: its JSON when etcd said 200, or its refusal.
    async fn answer(
        &self,
        status: u16,
        incoming: hyper::body::Incoming,
    ) -> Result<Value, EtcdError> {
        let limited = http_body_util::Limited::new(incoming, MAX_ANSWER);
        let bytes = tokio::time::timeout(self.timeout, limited.collect())
            .await
            .map_err(|_| EtcdError::Unanswered("answer cut short".into()))?
            .map_err(|e| EtcdError::Unanswered(format!("reading the answer: {e}")))?
            .to_bytes();
        if status != 200 {
            return Err(EtcdError::Refused {
                status,
                body: self.refusal(&bytes),
            });
        }
        serde_json::from_slice(&bytes).map_err(|e| EtcdError::Protocol(e.to_string()))
    }

    /// What a refusal says: etcd's message (its JSON's `error`), or the start of the body.
    fn refusal(&self, body: &[u8]) -> String {
        let parsed = serde_json::from_slice::<Value>(body).ok();
        let text = match parsed.as_ref().and_then(|v| v["error"].as_str()) {
            Some(error) => std::borrow::Cow::Borrowed(error),
            None => String::from_utf8_lossy(body),
        };
        let message: String = text.chars().take(300).collect();
        if message.contains("permission denied") {
            return format!(
                "{message} (the etcd user needs read and write permission on the keys under {}/)",
                self.prefix
            );
        }
        if message.contains("user name is empty") && self.auth().credentials.is_none() {
            return format!(
                "{message} (etcd has authentication on: set deployment.etcd.user and password)"
            );
        }
        message
    }

    /// Every key under the prefix, and the revision they were read at.
    pub async fn range_all(&self) -> Result<(u64, Vec<Kv>), EtcdError> {
        let v = self.call("/v3/kv/range", self.prefix_range()).await?;
        let kvs = v["kvs"]
            .as_array()
            .map(|a| a.iter().map(parse_kv).collect::<Result<Vec<_>, _>>())
            .transpose()?
            .unwrap_or_default();
        Ok((header_revision(&v), kvs))
    }

    /// Writes `value` at `key`. With `expect`, only if the key's mod revision is that
    /// (0: the key must not exist); `Ok(None)` when the comparison failed.
    pub async fn put(
        &self,
        key: &str,
        value: &[u8],
        expect: Option<u64>,
    ) -> Result<Option<u64>, EtcdError> {
        let put = json!({"key": b64(key.as_bytes()), "value": b64(value)});
        let Some(rev) = expect else {
            return Ok(Some(header_revision(&self.call("/v3/kv/put", put).await?)));
        };
        let (target, field) = if rev == 0 {
            ("CREATE", "create_revision")
        } else {
            ("MOD", "mod_revision")
        };
        let txn = json!({
            "compare": [{"key": b64(key.as_bytes()), "target": target, "result": "EQUAL", field: rev.to_string()}],
            "success": [{"request_put": put}],
        });
        let v = self.call("/v3/kv/txn", txn).await?;
        Ok(v["succeeded"]
            .as_bool()
            .unwrap_or(false)
            .then(|| header_revision(&v)))
    }

    /// Deletes `key`: the revision, and whether it existed.
    pub async fn delete(&self, key: &str) -> Result<(u64, bool), EtcdError> {
        let v = self
            .call("/v3/kv/deleterange", json!({"key": b64(key.as_bytes())}))
            .await?;
        Ok((header_revision(&v), int(&v["deleted"]) > 0))
    }

    /// Splits `<prefix>/<kind>/<id>`; None for keys wasmgate does not serve (other APISIX
    /// resources, directory markers) and for ids it cannot take (see [`Etcd::bad_id`]).
    fn split_key<'k>(&self, key: &'k str) -> Option<(Kind, &'k str)> {
        let (kind, id) = self.kind_and_id(key)?;
        (!id.is_empty() && model::valid_id(id)).then_some((kind, id))
    }

    /// `<prefix>/<kind>/<rest>` for a kind wasmgate serves.
    fn kind_and_id<'k>(&self, key: &'k str) -> Option<(Kind, &'k str)> {
        let rest = key.strip_prefix(&self.prefix)?.strip_prefix('/')?;
        let (kind, id) = rest.split_once('/')?;
        Some((Kind::parse(kind)?, id))
    }

    /// Why a key of a served kind is left out for its id (`/apisix/routes/a b`, a nested key,
    /// a 70-character id), None when the id is fine (or the key is not of a served kind).
    fn bad_id(&self, key: &str) -> Option<String> {
        let (kind, id) = self.kind_and_id(key)?;
        (!id.is_empty() && !model::valid_id(id)).then(|| {
            format!(
                "etcd: {key} left out: {id:?} is not a {} id wasmgate takes (1-64 characters \
                 among letters, digits, '-', '_' and '.')",
                kind.noun()
            )
        })
    }
}

type Object = (Kind, String, Stored);

/// An object read from etcd, checked as an Admin API write would be: `Ok(None)` for keys that
/// are not wasmgate objects, `Err` (saying why) for a value wasmgate cannot serve, which is
/// then left out.
fn object(etcd: &Etcd, catalog: &model::PluginCatalog, kv: &Kv) -> Result<Option<Object>, String> {
    let Some((kind, id)) = etcd.split_key(&kv.key) else {
        return etcd.bad_id(&kv.key).map_or(Ok(None), Err);
    };
    // APISIX marks its directories with the value "init_dir".
    if kv.value.is_empty() || kv.value == b"init_dir" {
        return Ok(None);
    }
    let mut value: Value = serde_json::from_slice(&kv.value)
        .map_err(|e| format!("etcd: {} is not JSON ({e}); ignored", kv.key))?;
    model::validate(kind, &value, catalog)
        .map_err(|e| format!("etcd: {} refused: {e}; ignored", kv.key))?;
    if let Some(obj) = value.as_object_mut() {
        // The key names the object; an `id` in the value that says otherwise is replaced,
        // as APISIX does, so that what is listed is what is served.
        obj.insert("id".into(), Value::String(id.to_string()));
    }
    Ok(Some((
        kind,
        id.to_string(),
        Stored {
            value,
            created_index: kv.create_revision,
            modified_index: kv.mod_revision,
        },
    )))
}

/// The objects among `kvs`, and why each refused one was left out.
fn objects(etcd: &Etcd, catalog: &model::PluginCatalog, kvs: &[Kv]) -> (Vec<Object>, Vec<String>) {
    let mut refused = Vec::new();
    let objects = kvs
        .iter()
        .filter_map(|kv| {
            object(etcd, catalog, kv)
                .map_err(|e| refused.push(e))
                .ok()?
        })
        .collect();
    (objects, refused)
}

/// Reads the whole configuration from etcd (master start); also returns why objects were left
/// out, for the caller to report once its log is open.
pub async fn load(etcd: &Etcd, catalog: &model::PluginCatalog) -> Result<Loaded, EtcdError> {
    let (rev, kvs) = etcd.range_all().await?;
    let (objects, refused) = objects(etcd, catalog, &kvs);
    etcd.revision.store(rev, Ordering::Relaxed);
    let summary = loaded_line(etcd, rev, &objects, refused.len(), kvs.len());
    Ok(Loaded {
        store: Store::memory(objects, rev),
        refused,
        summary,
    })
}

/// What the start's full read found.
pub struct Loaded {
    pub store: Store,
    /// Why each refused object was left out.
    pub refused: Vec<String>,
    /// What was read, for the error log (see [`log_summary`]).
    pub summary: String,
}

/// Logs what a full read found: at `info`, or as a warning when nothing at all is stored
/// under the prefix (a misspelt `prefix` serves nothing, without any other sign).
pub fn log_summary(summary: &str) {
    match summary.contains(NOTHING_STORED) {
        true => tracing::warn!("{summary}"),
        false => tracing::info!("{summary}"),
    }
}

const NOTHING_STORED: &str = "nothing is stored under this prefix";

/// What a full read found, for the error log: an operator who sees no route served can tell
/// a wrong prefix or an empty etcd from refused objects.
fn loaded_line(etcd: &Etcd, rev: u64, objects: &[Object], refused: usize, keys: usize) -> String {
    let count = |kind: Kind| objects.iter().filter(|o| o.0 == kind).count();
    let mut line = format!(
        "etcd: read {} routes, {} services, {} upstreams, {} plugin configs, {} global rules \
         and {} ssls under {}/ at revision {rev}",
        count(Kind::Routes),
        count(Kind::Services),
        count(Kind::Upstreams),
        count(Kind::PluginConfigs),
        count(Kind::GlobalRules),
        count(Kind::Ssls),
        etcd.prefix,
    );
    if refused > 0 {
        line += &format!(" ({refused} refused, said above)");
    }
    let others = keys - objects.len() - refused;
    if others > 0 {
        line += &format!(
            "; {others} other keys (APISIX resources wasmgate does not serve: consumers, \
             plugin metadata, …) not read"
        );
    }
    if keys == 0 {
        line += &format!("; {NOTHING_STORED}: check deployment.etcd.prefix");
    }
    line
}

/// The master's task: keeps the local copy equal to etcd and the workers serving it.
pub async fn follow(m: Arc<Master>, etcd: Arc<Etcd>) {
    let mut from = etcd.revision.load(Ordering::Relaxed) + 1;
    let mut outage = Outage::default();
    loop {
        if let Err(e) = watch(&m, &etcd, from).await {
            outage.failed(&etcd, &e);
            // Whatever broke the watch (a restarted or wiped etcd, a member gone) may have
            // taken the token with it: the next read signs in afresh.
            etcd.forget_session();
        }
        // Whatever ended the watch, the next one starts after a full read that succeeded:
        // nothing between the last event seen and now is missed (even across a compaction),
        // and an etcd that came back with another history is found by the read, never
        // watched from a revision of the old one.
        let mut pause = Duration::from_millis(500);
        loop {
            // A reload (new credentials, say) tries at once.
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = etcd.resync.notified() => {}
            }
            match resync(&m, &etcd).await {
                Ok(rev) => {
                    outage.ended(&etcd, rev);
                    from = rev + 1;
                    break;
                }
                Err(e) => {
                    outage.failed(&etcd, &e);
                    pause = match e {
                        EtcdError::Auth { .. } => AUTH_RETRY,
                        _ => Duration::from_millis(500),
                    };
                }
            }
        }
    }
}

/// The time etcd has not been serving this node, and what it said last: each new kind of
/// failure is logged once (unreachable, then a refused user, say), not every retry.
#[derive(Default)]
struct Outage {
    since: Option<std::time::Instant>,
    last: Option<std::mem::Discriminant<EtcdError>>,
}

impl Outage {
    fn failed(&mut self, etcd: &Etcd, e: &EtcdError) {
        etcd.reachable.store(false, Ordering::Relaxed);
        *etcd.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
        let kind = std::mem::discriminant(e);
        if self.last == Some(kind) {
            return;
        }
        self.last = Some(kind);
        self.since.get_or_insert_with(std::time::Instant::now);
        tracing::error!(
            "etcd: {e}; serving the last configuration (revision {}) until it is back",
            etcd.revision.load(Ordering::Relaxed)
        );
    }

    fn ended(&mut self, etcd: &Etcd, rev: u64) {
        self.last = None;
        *etcd.last_error.lock().unwrap_or_else(|p| p.into_inner()) = None;
        if let Some(t) = self.since.take() {
            tracing::warn!(
                "etcd: back after {:.1} s; resynchronised at revision {rev}",
                t.elapsed().as_secs_f64()
            );
        }
    }
}

/// Replaces the copy with a full read and publishes it if anything changed.
async fn resync(m: &Master, etcd: &Etcd) -> Result<u64, EtcdError> {
    // Not between an Admin API write and its answer: a read made before the write, put in
    // place after it, would take back what was just confirmed.
    let _writes = etcd.writes.lock().await;
    let (rev, kvs) = etcd.range_all().await?;
    let (objects, refused) = objects(etcd, &m.catalog(), &kvs);
    for why in &refused {
        tracing::error!("{why}");
    }
    let known = etcd.revision.load(Ordering::Relaxed);
    // Another history (an etcd wiped, restored from a backup, or another cluster at the same
    // address): what it holds now is the truth, and the workers, who know objects by
    // revision, are told it as all new.
    let lacking_counts = !etcd.after_reload.swap(false, Ordering::Relaxed);
    let other = other_history(&m.store(), known, rev, &objects, lacking_counts);
    let changed = if let Some(sign) = other {
        tracing::warn!(
            "etcd: {sign} (an etcd wiped, restored from a backup, or another cluster): \
             serving what it holds now"
        );
        log_summary(&loaded_line(etcd, rev, &objects, refused.len(), kvs.len()));
        m.store().reset(objects, rev);
        m.rebase_publication();
        true
    } else {
        m.store().replace_all(objects, rev)
    };
    etcd.revision.store(rev, Ordering::Relaxed);
    if changed {
        publish(m);
    }
    Ok(rev)
}

/// Whether a full read at revision `rev` comes from another history than the copy, read up
/// to revision `known`, and the sign of it. etcd's revisions only grow, so fewer is one sign;
/// the other is an object last changed at or before `known` that the copy holds otherwise,
/// or lacks (`lacking_counts`): in one history the copy has every such object as it is.
/// Right after a reload a lacking object is no sign: it may have been refused for a plugin
/// the reload added.
fn other_history(
    store: &Store,
    known: u64,
    rev: u64,
    objects: &[Object],
    lacking_counts: bool,
) -> Option<String> {
    if rev < known {
        return Some(format!("its revision went back from {known} to {rev}"));
    }
    objects
        .iter()
        .filter(|(_, _, s)| s.modified_index <= known)
        .find(|(kind, id, s)| match store.get(*kind, id) {
            Some(c) => (c.created_index, c.modified_index) != (s.created_index, s.modified_index),
            None => lacking_counts,
        })
        .map(|(kind, id, s)| {
            format!(
                "{} {id} at revision {} is not what was read at revision {known}",
                kind.noun(),
                s.modified_index
            )
        })
}

fn publish(m: &Master) {
    if let Err(e) = m.publish_current() {
        tracing::error!("etcd: the configuration cannot be published: {e}");
    }
}

/// Watches the prefix from revision `from` until the stream ends; returns the revision to
/// continue from.
async fn watch(m: &Master, etcd: &Etcd, from: u64) -> Result<u64, EtcdError> {
    let mut create = etcd.prefix_range();
    create["start_revision"] = json!(from.to_string());
    let req = json!({ "create_request": create });
    let n = etcd.endpoints.len();
    let i = etcd.current.load(Ordering::Relaxed) % n;
    let (status, mut body) = match etcd.open(i, "/v3/watch", &req).await {
        Ok(x) => x,
        Err(e) => {
            // Next time, the next endpoint.
            etcd.current.store((i + 1) % n, Ordering::Relaxed);
            return Err(e);
        }
    };
    if status != 200 {
        return Err(EtcdError::Refused {
            status,
            body: String::new(),
        });
    }
    let mut buf: Vec<u8> = Vec::new();
    let mut next = from;
    let mut probed = std::time::Instant::now();
    let mut stall = Stall::default();
    loop {
        // A silent watch is normal; a health check every few seconds tells a dead peer. A busy
        // one is checked too, every PROBE_EVERY: a watch goes on delivering after the node's
        // user was refused (a password changed), which only a new request finds.
        if probed.elapsed() >= PROBE_EVERY {
            stall.check(etcd).await?;
            probed = std::time::Instant::now();
        }
        let frame = tokio::select! {
            _ = etcd.resync.notified() => return Ok(next),
            frame = tokio::time::timeout(Duration::from_secs(3), body.frame()) => frame,
        };
        let frame = match frame {
            Err(_) => {
                stall.check(etcd).await?;
                probed = std::time::Instant::now();
                continue;
            }
            Ok(None) => return Err(EtcdError::Unreachable("watch stream ended".into())),
            Ok(Some(Err(e))) => return Err(EtcdError::Unreachable(format!("watch: {e}"))),
            Ok(Some(Ok(f))) => f,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        buf.extend_from_slice(&data);
        if buf.len() > MAX_ANSWER {
            return Err(EtcdError::Protocol("watch message too large".into()));
        }
        let mut consumed = 0;
        let mut stream = serde_json::Deserializer::from_slice(&buf).into_iter::<Value>();
        while let Some(msg) = stream.next() {
            let msg = match msg {
                Ok(msg) => msg,
                // The rest of the message is in frames still to come.
                Err(e) if e.is_eof() => break,
                // Bytes no frame will make JSON: every change after them would wait behind
                // them unseen. The watch starts again (from a full read).
                Err(e) => return Err(EtcdError::Protocol(format!("watch: not JSON: {e}"))),
            };
            consumed = stream.byte_offset();
            let result = &msg["result"];
            if int(&result["compact_revision"]) > 0 {
                // Compacted past `from`: resynchronise from a full read.
                return Ok(next);
            }
            if result["canceled"].as_bool().unwrap_or(false) {
                let why = result["cancel_reason"]
                    .as_str()
                    .unwrap_or("no reason given");
                return Err(EtcdError::Canceled(why.chars().take(300).collect()));
            }
            // Answering and watching: reachable (a 200 alone is not: a watch refused for
            // want of a user name is a 200 whose message says it is canceled).
            etcd.reachable.store(true, Ordering::Relaxed);
            if let Some(events) = result["events"].as_array() {
                next = apply_events(m, etcd, events, header_revision(result)).max(next);
            }
        }
        buf.drain(..consumed);
    }
}

/// Applies one batch of watch events and publishes; returns the revision to continue from.
fn apply_events(m: &Master, etcd: &Etcd, events: &[Value], revision: u64) -> u64 {
    let catalog = m.catalog();
    let mut changed = false;
    {
        let mut store = m.store();
        for ev in events {
            let Ok(kv) = parse_kv(&ev["kv"]) else {
                continue;
            };
            let deleted = ev["type"].as_str() == Some("DELETE");
            let Some((kind, id)) = etcd.split_key(&kv.key) else {
                if let Some(why) = etcd.bad_id(&kv.key).filter(|_| !deleted) {
                    tracing::error!("{why}");
                }
                continue;
            };
            if deleted {
                changed |= store.apply(kind, id, None, kv.mod_revision);
                continue;
            }
            // A refused value, or one emptied (APISIX's `init_dir` written over it), replaces
            // the previous version as a full read would leave it (and as APISIX does), so
            // every node serves the same.
            let refused = match object(etcd, &catalog, &kv) {
                Ok(Some((_, _, stored))) => {
                    changed |= store.apply(kind, id, Some(stored), kv.mod_revision);
                    continue;
                }
                Ok(None) => None,
                Err(why) => Some(why),
            };
            let dropped = store.apply(kind, id, None, kv.mod_revision);
            changed |= dropped;
            match (refused, dropped) {
                (Some(why), true) => {
                    tracing::error!("{why}; its previous version is no longer served")
                }
                (Some(why), false) => tracing::error!("{why}"),
                (None, true) => tracing::error!(
                    "etcd: {} holds no object any more (an empty value or init_dir); its \
                     previous version is no longer served",
                    kv.key
                ),
                (None, false) => {}
            }
        }
    }
    etcd.revision.fetch_max(revision, Ordering::Relaxed);
    if changed {
        publish(m);
    }
    revision + 1
}

/// A health check: one read within [`PROBE_TIMEOUT`], which sets `reachable`; the error says
/// why not (no answer, or etcd's refusal, such as authentication turned on).
async fn probe(etcd: &Etcd, request: Value) -> Result<Value, EtcdError> {
    let r = match tokio::time::timeout(PROBE_TIMEOUT, etcd.call("/v3/kv/range", request)).await {
        Ok(r) => r,
        Err(_) => {
            // A token from before etcd was wiped makes it wait rather than refuse: the next
            // try signs in again.
            etcd.forget_session();
            Err(EtcdError::Unreachable(format!(
                "health check: no answer within {} s",
                PROBE_TIMEOUT.as_secs()
            )))
        }
    };
    etcd.reachable.store(r.is_ok(), Ordering::Relaxed);
    r
}

/// A health check that also asks whether the watch keeps up: the revision of a key under the
/// prefix changed after `known` (the revision the copy has), if any.
async fn changed_after(etcd: &Etcd, known: u64) -> Result<Option<u64>, EtcdError> {
    let mut request = etcd.prefix_probe();
    request["min_mod_revision"] = json!((known + 1).to_string());
    let answer = probe(etcd, request).await?;
    Ok(answer["kvs"]
        .as_array()
        .and_then(|kvs| kvs.first())
        .map(|kv| int(&kv["mod_revision"])))
}

/// Finds a watch that stopped delivering while its connection stays open (a proxy or NAT that
/// dropped it silently): a key changed after what the copy has, seen by two health checks in
/// a row — the first may only be ahead of an event on its way.
#[derive(Default)]
struct Stall {
    unseen: Option<u64>,
}

impl Stall {
    async fn check(&mut self, etcd: &Etcd) -> Result<(), EtcdError> {
        let known = etcd.revision.load(Ordering::Relaxed);
        let newer = changed_after(etcd, known).await?;
        match (newer, self.unseen) {
            (Some(_), Some(first)) if first > known => Err(EtcdError::Unreachable(format!(
                "the watch delivers nothing: etcd changed a key at revision {first}, the copy \
                 is at {known}"
            ))),
            (newer, _) => {
                self.unseen = newer;
                Ok(())
            }
        }
    }
}

/// An Admin API write in cluster mode: etcd first, then the local copy and the workers.
pub async fn commit(m: &Master, etcd: &Etcd, change: Change) -> Reply {
    let unavailable = |e: EtcdError| {
        tracing::error!("admin: etcd write failed: {e}");
        let msg = match e {
            EtcdError::Unanswered(_) => {
                format!("the change may have been stored: {e}; read the object before trying again")
            }
            e => format!("the change was not stored: {e}"),
        };
        (503, json!({ "error_msg": msg }))
    };
    match change {
        Change::Put {
            kind,
            id,
            stored,
            expect,
            status,
        } => {
            let key = etcd.key(kind, &id);
            let bytes = stored.value.to_string();
            let rev = match etcd.put(&key, bytes.as_bytes(), expect).await {
                Ok(Some(rev)) => rev,
                Ok(None) => {
                    return (
                        409,
                        json!({ "error_msg": format!("{} {id} was changed in etcd meanwhile (by another node or client); read it again and retry", kind.noun()) }),
                    )
                }
                Err(e) => return unavailable(e),
            };
            let stored = Stored {
                created_index: if status == 201 {
                    rev
                } else {
                    stored.created_index
                },
                modified_index: rev,
                value: stored.value,
            };
            let value = stored.value.clone();
            m.store().apply(kind, &id, Some(stored), rev);
            publish(m);
            (status, json!({ "key": key, "value": value }))
        }
        Change::Delete { kind, id } => {
            let key = etcd.key(kind, &id);
            match etcd.delete(&key).await {
                Ok((rev, existed)) => {
                    m.store().apply(kind, &id, None, rev);
                    publish(m);
                    if existed {
                        (200, json!({ "deleted": id, "key": key }))
                    } else {
                        (404, json!({ "message": "Key not found" }))
                    }
                }
                Err(e) => unavailable(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// etcd's refusals that a new token cures — a token it no longer knows, one made before
    /// authentication was turned on, one made before users or roles changed (as etcd's own
    /// client renews) — and only with a user to sign in as.
    #[test]
    fn refusals_that_ask_for_a_new_token() {
        let section = |user: Option<&str>| EtcdSection {
            host: vec!["http://127.0.0.1:2379".into()],
            prefix: "/apisix".into(),
            timeout: 5,
            startup_retry: 2,
            user: user.map(String::from),
            password: user.map(|_| wasmgate_shared::config::Secret("pw".into())),
        };
        let with_user = Etcd::new(&section(Some("gw"))).unwrap();
        let without = Etcd::new(&section(None)).unwrap();
        for why in [
            "etcdserver: invalid auth token",
            "etcdserver: user name is empty",
            "etcdserver: revision of auth store is old",
        ] {
            assert!(with_user.token_refused(why), "{why}");
            assert!(!without.token_refused(why), "{why}");
        }
        for why in [
            "etcdserver: permission denied",
            "etcdserver: leader changed",
            "etcdserver: authentication failed, invalid user ID or password",
        ] {
            assert!(!with_user.token_refused(why), "{why}");
        }
    }

    #[test]
    fn range_end_is_the_prefix_incremented() {
        assert_eq!(range_end("/apisix/"), b"/apisix0".to_vec());
        assert_eq!(range_end("a\u{7f}"), b"a\x80".to_vec());
    }

    #[test]
    fn keys_outside_the_served_kinds_are_skipped() {
        let e = Etcd::new(&EtcdSection {
            host: vec!["http://127.0.0.1:2379".into()],
            prefix: "/apisix".into(),
            timeout: 5,
            startup_retry: 2,
            user: None,
            password: None,
        })
        .unwrap();
        assert_eq!(e.split_key("/apisix/routes/1"), Some((Kind::Routes, "1")));
        assert_eq!(e.split_key("/apisix/routes/"), None);
        assert_eq!(e.split_key("/apisix/ssls/1"), Some((Kind::Ssls, "1")));
        assert_eq!(e.split_key("/apisix/consumers/jack"), None);
        assert_eq!(e.split_key("/apisixx/routes/1"), None);
        assert_eq!(e.key(Kind::Upstreams, "u"), "/apisix/upstreams/u");
    }
}
