//! The TLS listener (`apisix.ssl`): the certificate for each name, from the SSL objects, and
//! the handshake with clients.
//!
//! As APISIX's `radixtree_sni`: a name an SSL object lists exactly wins, then the longest
//! `*.` name that ends it (`*.example.com` serves `a.example.com` and `a.b.example.com`);
//! a client that sends no name gets `fallback_sni`'s certificate, and with no match the
//! handshake fails. The ClientHello is read first and the settings chosen from it, so each
//! SSL object has its own: its certificates (one an ECDSA client can use, one for RSA) and
//! its `ssl_protocols` (in place of the listener's, as APISIX).

use super::mtls::{peer_cert, Mtls};
use super::resume::{SharedSessions, SharedTickets};
use crate::proxy::TlsInfo;
use crate::FastMap;
use rustls::server::{Acceptor, ClientHello, ResolvesServerCert, ServerSessionMemoryCache};
use rustls::sign::CertifiedKey;
use rustls::{ServerConfig, SupportedProtocolVersion};
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_rustls::LazyConfigAcceptor;
use wasmgate_shared::config::SslSection;
use wasmgate_shared::model::{tls_version, Ssl};
use wasmgate_shared::tls::provider;
use wasmgate_shared::tls_sessions::{self, SessionShm};

/// The listener's own settings (config.yaml), shared by every SSL object's.
struct Listener {
    versions: Vec<&'static SupportedProtocolVersion>,
    fallback_sni: Option<String>,
    /// Resumption tickets (`ssl_session_tickets: true`); none by default, as APISIX.
    tickets: bool,
}

static LISTENER: OnceLock<Listener> = OnceLock::new();

/// Sessions one process remembers for resumption, per SSL object, when there is no shared
/// cache (a worker always has one; unit tests do not).
const SESSION_CACHE: usize = 1024;

/// The sessions and ticket keys every worker shares, mapped at start.
static SESSIONS: OnceLock<Arc<SessionShm>> = OnceLock::new();

/// Resumes sessions from `shm` (the master's segment) from now on.
pub fn share_sessions(shm: Arc<SessionShm>) {
    let _ = SESSIONS.set(shm);
}

/// Records the listener's settings, once at start (the configuration was checked already).
pub fn configure(ssl: &SslSection) {
    let _ = LISTENER.set(Listener {
        versions: (ssl.versions()).unwrap_or_else(|_| rustls::DEFAULT_VERSIONS.to_vec()),
        fallback_sni: ssl.fallback_sni.as_ref().map(|n| n.to_ascii_lowercase()),
        tickets: ssl.ssl_session_tickets == Some(true),
    });
}

fn listener() -> &'static Listener {
    LISTENER.get_or_init(|| Listener {
        versions: rustls::DEFAULT_VERSIONS.to_vec(),
        fallback_sni: None,
        tickets: false,
    })
}

/// One SSL object ready to serve: its id (for the log) and its server settings.
pub struct Site {
    pub id: String,
    config: Arc<ServerConfig>,
    /// Its `client`: the certificates it asks clients for.
    mtls: Option<Mtls>,
    /// Its id and content hashed (sessions are stored under it).
    salt: u64,
}

impl std::fmt::Debug for Site {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Site").field("id", &self.id).finish()
    }
}

impl Site {
    /// SSL object `id` made into server settings; an error says why it cannot serve.
    pub fn compile(id: &str, ssl: &Ssl) -> Result<Site, String> {
        let l = listener();
        // The object's own versions, when it names them, in place of the listener's (APISIX:
        // dynamic configuration has the higher priority).
        let versions: Vec<&'static SupportedProtocolVersion> = match &ssl.ssl_protocols {
            None => l.versions.clone(),
            Some(list) => list.iter().filter_map(|v| tls_version(v).ok()).collect(),
        };
        let keys = ssl.identities()?.into_iter().map(|i| i.certified).collect();
        let mtls = ssl.client.as_ref().map(Mtls::compile).transpose()?;
        let builder = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&versions)
            .map_err(|e| e.to_string())?;
        let builder = match &mtls {
            Some(m) => builder.with_client_cert_verifier(m.verifier.clone()),
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_cert_resolver(Arc::new(Keys(keys)));
        // HTTP/1.1 only, said in the handshake: a client that offers h2 must not pick it.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        // Sessions resume only with the settings they were made with: each content of an
        // SSL object has its own sessions (and ticket keys), so a new certificate is shown
        // from the next handshake on, not only to clients without a session.
        let salt = salt(id, ssl);
        match SESSIONS.get() {
            Some(shm) => {
                config.session_storage = Arc::new(SharedSessions {
                    shm: shm.clone(),
                    salt,
                });
                if l.tickets {
                    config.ticketer = Arc::new(SharedTickets {
                        shm: shm.clone(),
                        salt,
                    });
                }
            }
            None => {
                config.session_storage = ServerSessionMemoryCache::new(SESSION_CACHE);
                if l.tickets {
                    config.ticketer =
                        rustls::crypto::ring::Ticketer::new().map_err(|e| e.to_string())?;
                }
            }
        }
        Ok(Site {
            id: id.to_string(),
            config: Arc::new(config),
            mtls,
            salt,
        })
    }

    /// Whether it asks its clients for certificates (`client`).
    pub fn asks_client_cert(&self) -> bool {
        self.mtls.is_some()
    }

    /// What it is made of (its id and content, as [`salt`]): a connection made with another
    /// content of it was checked by other rules.
    pub fn salt(&self) -> u64 {
        self.salt
    }
}

/// What the request phases and the log show of a finished handshake with `site`, chosen for
/// `name` (the client's SNI, else `fallback_sni`).
fn describe(
    conn: &rustls::ServerConnection,
    (sni, name): (Option<Arc<str>>, Arc<str>),
    site: &Site,
) -> TlsInfo {
    use rustls::{CipherSuite as C, ProtocolVersion as V};
    let protocol = match conn.protocol_version() {
        Some(V::TLSv1_3) => "TLSv1.3",
        Some(V::TLSv1_2) => "TLSv1.2",
        _ => "",
    };
    // OpenSSL's names, as nginx's `$ssl_cipher` shows them, for the suites the provider has.
    let cipher = match conn.negotiated_cipher_suite().map(|s| s.suite()) {
        Some(C::TLS13_AES_128_GCM_SHA256) => "TLS_AES_128_GCM_SHA256",
        Some(C::TLS13_AES_256_GCM_SHA384) => "TLS_AES_256_GCM_SHA384",
        Some(C::TLS13_CHACHA20_POLY1305_SHA256) => "TLS_CHACHA20_POLY1305_SHA256",
        Some(C::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256) => "ECDHE-ECDSA-AES128-GCM-SHA256",
        Some(C::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384) => "ECDHE-ECDSA-AES256-GCM-SHA384",
        Some(C::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256) => "ECDHE-ECDSA-CHACHA20-POLY1305",
        Some(C::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256) => "ECDHE-RSA-AES128-GCM-SHA256",
        Some(C::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384) => "ECDHE-RSA-AES256-GCM-SHA384",
        Some(C::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256) => "ECDHE-RSA-CHACHA20-POLY1305",
        Some(other) => other.as_str().unwrap_or(""),
        None => "",
    };
    // A resumed session keeps the certificate its first handshake checked.
    let peer = (conn.peer_certificates().and_then(<[_]>::first)).map(|c| Box::new(peer_cert(c)));
    let mtls_skip = match (&site.mtls, &peer) {
        (Some(m), None) => m.skip.clone(),
        _ => None,
    };
    TlsInfo {
        sni,
        protocol,
        cipher,
        reused: conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed),
        name,
        site: site.salt,
        mtls: site.mtls.is_some(),
        peer,
        mtls_skip,
    }
}

/// The name of an SSL object's sessions: its id and everything a session depends on.
fn salt(id: &str, ssl: &Ssl) -> u64 {
    let more = ssl.certs.iter().chain(&ssl.keys).flatten();
    let protocols = ssl.ssl_protocols.iter().flatten();
    let parts = [id, ssl.cert.as_str(), ssl.key.as_str()].into_iter();
    // A session keeps the client certificate its handshake checked: new CAs, new sessions.
    let client = ssl.client.as_ref().map(|c| {
        let skip = c.skip_mtls_uri_regex.iter().flatten();
        let depth = c.depth().to_string();
        (c.ca.clone() + &depth) + &skip.map(|s| format!("\n{s}")).collect::<String>()
    });
    tls_sessions::salt(
        parts
            .chain(more.map(String::as_str))
            .chain(protocols.map(String::as_str))
            .chain(client.as_deref())
            .map(str::as_bytes),
    )
}

/// An SSL object's certificates: the first one the client can check a signature of.
#[derive(Debug)]
struct Keys(Vec<Arc<CertifiedKey>>);

impl ResolvesServerCert for Keys {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let schemes = hello.signature_schemes();
        (self.0.iter())
            .find(|k| k.key.choose_scheme(schemes).is_some())
            .or_else(|| self.0.first())
            .cloned()
    }
}

/// The sites by the names they serve.
#[derive(Debug, Default)]
pub struct Certs {
    exact: FastMap<String, Arc<Site>>,
    /// `*.example.com` under `.example.com`.
    wildcard: FastMap<String, Arc<Site>>,
    /// Some site asks its clients for certificates: requests' hosts are looked up.
    asks_client_certs: bool,
}

impl Certs {
    /// The index of `sites` (in id order: of two objects that list a name, the first serves
    /// it), each with the names it lists.
    pub fn new<'a>(sites: impl Iterator<Item = (&'a [String], &'a Arc<Site>)>) -> Certs {
        let mut c = Certs::default();
        for (names, site) in sites {
            c.asks_client_certs |= site.asks_client_cert();
            for name in names {
                let (map, key) = match name.strip_prefix('*') {
                    Some(suffix) => (&mut c.wildcard, suffix),
                    None => (&mut c.exact, name.as_str()),
                };
                map.entry(key.to_string()).or_insert_with(|| site.clone());
            }
        }
        c
    }

    /// The site that serves `name` when it asks its clients for certificates (no lookup when
    /// none does, the usual case).
    pub fn asking_client_cert(&self, name: &str) -> Option<&Arc<Site>> {
        match self.asks_client_certs {
            true => self.find(name).filter(|s| s.asks_client_cert()),
            false => None,
        }
    }

    /// The site for `name` (lower-cased already): exact, then the longest wildcard.
    fn find(&self, name: &str) -> Option<&Arc<Site>> {
        if let Some(site) = self.exact.get(name) {
            return Some(site);
        }
        let mut at = 0;
        while let Some(dot) = name[at..].find('.') {
            let suffix = &name[at + dot..];
            if let Some(site) = self.wildcard.get(suffix) {
                return Some(site);
            }
            at += dot + 1;
        }
        None
    }
}

/// Lines per second, per worker, for names no SSL object serves.
const UNKNOWN_NAME_LINES: u32 = 10;

/// Says that no SSL object serves `name`: at `warn`, as APISIX's "failed to match any SSL
/// certificate by SNI" (a name clients use and nothing serves is a configuration to mend), but
/// at most [`UNKNOWN_NAME_LINES`] a second: any client can make up names.
fn unknown_name(name: &str, peer: SocketAddr) {
    use wasmgate_wasm::rate::{LogGate, Pass};
    static GATE: std::sync::LazyLock<LogGate> = std::sync::LazyLock::new(LogGate::default);
    let more = match GATE.pass(UNKNOWN_NAME_LINES) {
        Pass::No => return,
        Pass::Yes { dropped: 0 } => String::new(),
        Pass::Yes { dropped } => format!(" ({dropped} similar lines suppressed)"),
        Pass::Last => " (further such lines this second suppressed)".into(),
    };
    tracing::warn!("no SSL object serves {name:?} (client: {peer}): handshake refused{more}");
}

/// Reads the client's hello, picks the site for the name it asks for and completes the
/// handshake, within `timeout`: the stream, and the name the client sent (None: it sent none,
/// and got `fallback_sni`'s certificate). None (logged) when the client leaves, times out,
/// asks for a name no SSL object serves, or the handshake fails.
pub async fn accept(
    stream: TcpStream,
    peer: SocketAddr,
    timeout: Duration,
    certs: impl FnOnce() -> Arc<Certs>,
) -> Option<(TlsStream<TcpStream>, TlsInfo)> {
    let handshake = async {
        let start = LazyConfigAcceptor::new(Acceptor::default(), stream)
            .await
            .map_err(|e| Some(format!("TLS handshake with client {peer} failed: {e}")))?;
        let hello = start.client_hello();
        let asked = hello.server_name().map(str::to_ascii_lowercase);
        let name = match (&asked, &listener().fallback_sni) {
            (Some(n), _) => n.clone(),
            (None, Some(fallback)) => fallback.clone(),
            (None, None) => {
                return Err(Some(format!(
                    "client {peer} sent no server name (SNI) and apisix.ssl.fallback_sni \
                     is not set: please check if the client requests via IP"
                )))
            }
        };
        let certs = certs();
        let Some(site) = certs.find(&name) else {
            unknown_name(&name, peer);
            return Err(None);
        };
        let config = site.config.clone();
        let stream = start.into_stream(config).await.map_err(|e| {
            Some(format!(
                "TLS handshake with client {peer} for {name:?} failed: {e}"
            ))
        })?;
        let asked: Option<Arc<str>> = asked.map(Arc::from);
        let name = asked.clone().unwrap_or_else(|| Arc::from(name));
        let info = describe(stream.get_ref().1, (asked, name), site);
        Ok((stream, info))
    };
    match tokio::time::timeout(timeout, handshake).await {
        Ok(Ok(done)) => Some(done),
        // None: said already, at its own level (`unknown_name`).
        Ok(Err(why)) => {
            if let Some(why) = why {
                tracing::info!("{why}");
            }
            None
        }
        Err(_) => {
            tracing::info!("client {peer} timed out in the TLS handshake");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(id: &str) -> Arc<Site> {
        Arc::new(Site {
            id: id.into(),
            config: Arc::new(
                ServerConfig::builder_with_provider(provider())
                    .with_safe_default_protocol_versions()
                    .unwrap()
                    .with_no_client_auth()
                    .with_cert_resolver(Arc::new(Keys(Vec::new()))),
            ),
            mtls: None,
            salt: 0,
        })
    }

    #[test]
    fn names_find_exact_then_the_longest_wildcard() {
        let (a, b, c) = (site("a"), site("b"), site("c"));
        let names_a = ["api.example.com".to_string()];
        let names_b = ["*.example.com".to_string()];
        let names_c = [
            "*.eu.example.com".to_string(),
            "api.example.com".to_string(),
        ];
        let certs =
            Certs::new([(&names_a[..], &a), (&names_b[..], &b), (&names_c[..], &c)].into_iter());
        let id = |n: &str| certs.find(n).map(|s| s.id.clone());
        assert_eq!(id("api.example.com").as_deref(), Some("a"));
        assert_eq!(id("www.example.com").as_deref(), Some("b"));
        assert_eq!(id("a.b.example.com").as_deref(), Some("b"));
        assert_eq!(id("x.eu.example.com").as_deref(), Some("c"));
        assert_eq!(id("example.com"), None);
        assert_eq!(id("other.org"), None);
    }
}
