//! The `config.yaml` model (APISIX-compatible keys), parsed once and validated with messages
//! of the form `file:line: what is wrong`.
//!
//! Every section rejects unknown keys: a misspelt key is an error at start or reload, never a
//! silently ignored setting. `docs/configuration.md` lists every key.

use crate::units::{de_duration, de_limit, de_on_off, de_opt_duration, de_size};
use crate::yaml_lines::{line_of, Step, Step::Item, Step::Key};
use serde::{Deserialize, Deserializer, Serialize};
use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The configuration compiled into the binary, used when no `conf/config.yaml` exists.
/// serde's "missing field `name`" in APISIX's words, `property "name" is required`.
fn apisix_wording(msg: &str) -> String {
    match msg.split_once("missing field `") {
        Some((before, rest)) => match rest.split_once('`') {
            Some((field, after)) => format!("{before}property \"{field}\" is required{after}"),
            None => msg.to_string(),
        },
        None => msg.to_string(),
    }
}

/// The Admin API keys of APISIX's sample configuration (admin, viewer), known to everyone.
const PUBLISHED_KEYS: [&str; 2] = [
    "edd1c9f034335f136f87ad84b625c8f1",
    "4054f7cf07e344346cd3f287985e76a2",
];

pub const EMBEDDED_DEFAULT: &str = include_str!("../../conf/config.yaml");

/// A configuration error, already formatted as `file:line: message` where a line is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

/// The whole `config.yaml`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    pub apisix: ApisixSection,
    pub deployment: DeploymentSection,
    pub nginx_config: NginxConfigSection,
    pub wasm: WasmSection,
    pub plugin_attr: PluginAttrSection,
    pub wasmgate: WasmgateSection,
    /// The APISIX keys the file holds that wasmgate does not use, each with why
    /// ([`crate::apisix_keys`]): said as warnings.
    #[serde(skip)]
    pub set_aside: Vec<String>,
}

/// `plugin_attr:` — settings of built-in plugins, as APISIX names them.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PluginAttrSection {
    pub prometheus: PrometheusAttr,
}

/// `plugin_attr.prometheus:` — the Prometheus endpoint the master serves.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PrometheusAttr {
    /// Serve the metrics on their own listener (`export_addr`); when false they are only at
    /// the Admin API's `/wasmgate/metrics`.
    pub enable_export_server: bool,
    pub export_addr: AdminListen,
    pub export_uri: String,
    /// Prefix of the gateway's metric names (plugin-defined metrics keep their own names).
    pub metric_prefix: String,
}

impl Default for PrometheusAttr {
    fn default() -> Self {
        PrometheusAttr {
            enable_export_server: true,
            export_addr: AdminListen {
                ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
                port: 9091,
            },
            export_uri: "/apisix/prometheus/metrics".into(),
            metric_prefix: "apisix_".into(),
        }
    }
}

/// A list of listen addresses, or one alone (a port, `"ip:port"` or `{ip, port}`).
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<ListenAddr>, D::Error> {
    use serde::de::value::{MapAccessDeserializer, StrDeserializer, U64Deserializer};
    struct Listens;
    impl<'de> serde::de::Visitor<'de> for Listens {
        type Value = Vec<ListenAddr>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a list of listen addresses, or one")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Self::Value, A::Error> {
            let mut all = Vec::new();
            while let Some(one) = seq.next_element()? {
                all.push(one);
            }
            Ok(all)
        }
        fn visit_u64<E: serde::de::Error>(self, port: u64) -> Result<Self::Value, E> {
            Ok(vec![ListenAddr::deserialize(U64Deserializer::<E>::new(
                port,
            ))?])
        }
        fn visit_i64<E: serde::de::Error>(self, port: i64) -> Result<Self::Value, E> {
            let port = u64::try_from(port).map_err(|_| E::custom("a port is 1 to 65535"))?;
            self.visit_u64(port)
        }
        fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Self::Value, E> {
            Ok(vec![ListenAddr::deserialize(StrDeserializer::<E>::new(
                text,
            ))?])
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
            Ok(vec![ListenAddr::deserialize(MapAccessDeserializer::new(
                map,
            ))?])
        }
    }
    d.deserialize_any(Listens)
}

/// `apisix:` — the proxy listeners.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ApisixSection {
    /// `node_listen`: ports (`9080`) or `{ip, port}` items, or one port alone as APISIX 2's
    /// files write it (`node_listen: 9080`). Default `[9080]` on all addresses.
    #[serde(deserialize_with = "one_or_many")]
    pub node_listen: Vec<ListenAddr>,
    /// APISIX's switch for the Admin API: `true` only (every node serves it, on loopback by
    /// default); `false` is refused rather than ignored.
    pub enable_admin: bool,
    /// Addresses (IPs or CIDRs) whose `X-Forwarded-Proto`, `-Host` and `-Port` are passed on
    /// upstream as they came (a load balancer in front that terminates TLS); from any other
    /// client the gateway's own values replace them. APISIX's key; empty: trust none.
    pub trusted_addresses: Vec<String>,
    /// `ssl:` — the TLS listener, and the CAs `https` upstreams are checked against.
    pub ssl: SslSection,
    /// `data_encryption:` — the keyring private keys are stored encrypted with.
    pub data_encryption: DataEncryption,
}

/// `apisix.data_encryption:` — APISIX's keyring (see [`crate::keyring`]).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DataEncryption {
    /// APISIX's switch for its Lua plugins' `encrypt_fields`; private keys are encrypted
    /// whatever it says, as APISIX encrypts them. Accepted for APISIX's files.
    pub enable_encrypt_fields: bool,
    /// 16-byte keys, the first for writing (one, or a list); empty: keys stored in clear.
    #[serde(deserialize_with = "secrets_one_or_many")]
    pub keyring: Vec<Secret>,
}

impl Default for DataEncryption {
    fn default() -> Self {
        DataEncryption {
            enable_encrypt_fields: true,
            keyring: (crate::keyring::APISIX_DEFAULT.iter())
                .map(|k| Secret(k.to_string()))
                .collect(),
        }
    }
}

fn secrets_one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Secret>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(Secret),
        Many(Vec<Secret>),
        Other(serde::de::IgnoredAny),
    }
    match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => Ok(vec![s]),
        OneOrMany::Many(v) => Ok(v),
        OneOrMany::Other(_) => Err(serde::de::Error::custom(
            "expected a key of 16 characters, or a list of them ([] to store keys in clear)",
        )),
    }
}

/// `ssl.key_encrypt_salt`: its strings, whatever else the value holds (APISIX 2 took
/// anything there, and used it only when it was a 16-character key).
fn salts<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Secret>, D::Error> {
    Ok(match serde_json::Value::deserialize(d)? {
        serde_json::Value::String(s) => vec![Secret(s)],
        serde_json::Value::Array(list) => list
            .into_iter()
            .map(|v| match v {
                serde_json::Value::String(s) => Secret(s),
                other => Secret(other.to_string()),
            })
            .collect(),
        serde_json::Value::Null => Vec::new(),
        other => vec![Secret(other.to_string())],
    })
}

impl ApisixSection {
    /// Every proxy listener's address: `node_listen`'s, then the TLS listener's. Workers
    /// inherit the sockets in this order.
    pub fn proxy_listen(&self) -> Vec<ListenAddr> {
        let mut all = self.node_listen.clone();
        all.extend(self.ssl.listeners());
        all
    }

    /// The keyring (checked when the file was loaded): `data_encryption.keyring`, then the
    /// 16-character keys of `ssl.key_encrypt_salt` not in it — the setting APISIX 2 and 3.0
    /// encrypted SSL keys with — only to read what they encrypted: writes use the keyring's
    /// first key, or stay in clear when the keyring is `[]`.
    pub fn keyring(&self) -> Result<crate::keyring::Keyring, String> {
        let ring = crate::keyring::Keyring::new(&self.data_encryption.keyring)
            .map_err(|e| format!("apisix.data_encryption.keyring: {e}"))?;
        Ok(ring.reading_also(&self.ssl.key_encrypt_salt))
    }

    /// The entries of `ssl.key_encrypt_salt` that are not 16-character keys (set aside).
    fn bad_salts(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        (self.ssl.key_encrypt_salt.iter().enumerate())
            .filter(|(_, s)| crate::keyring::key(&s.0).is_none())
            .map(|(i, s)| (i, s.0.len()))
    }
}

/// `apisix.ssl:` — the TLS listener (its certificates are SSL objects, chosen by SNI) and what
/// `https` upstreams are checked against.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SslSection {
    /// The TLS listener's switch. Unset, it is on when `listen` or `listen_port` is given
    /// (APISIX's listener is on by default; wasmgate's only when the file names a port, so
    /// that an installation that never asked for TLS opens no port 9443).
    pub enable: Option<bool>,
    /// The TLS listener's addresses, as `node_listen`'s (`9443`, `{ip, port}`); `[9443]`
    /// with `enable: true` and no addresses.
    #[serde(deserialize_with = "some_one_or_many")]
    pub listen: Option<Vec<ListenAddr>>,
    /// APISIX 2's single port.
    pub listen_port: Option<u16>,
    /// TLS versions offered, space-separated (`TLSv1.2 TLSv1.3`, the default); an SSL
    /// object's own `ssl_protocols` narrows them for its names.
    pub ssl_protocols: Option<String>,
    /// Whether resumption tickets are issued (APISIX's default: no; sessions resume from the
    /// worker's cache either way).
    pub ssl_session_tickets: Option<bool>,
    /// The name whose certificate a client that sends no SNI gets (otherwise its handshake
    /// fails, as with APISIX).
    pub fallback_sni: Option<String>,
    /// The CAs a node's certificate must chain to when its upstream sets `tls.verify`:
    /// `system` (the default: the system's store), a PEM file (relative to the prefix), or
    /// both, comma-separated, as APISIX writes it.
    pub ssl_trusted_certificate: Option<String>,
    /// APISIX 2's and 3.0's keys for SSL objects' private keys (one, or a list): read after
    /// `data_encryption.keyring`'s (see [`ApisixSection::keyring`]). Taken as APISIX 2 takes
    /// it: what is not a 16-character key is set aside, with a warning.
    #[serde(deserialize_with = "salts")]
    pub key_encrypt_salt: Vec<Secret>,
}

/// The TLS listener's default port (APISIX's).
pub const DEFAULT_SSL_PORT: u16 = 9443;

impl SslSection {
    /// The TLS listener's addresses; empty when it is off.
    pub fn listeners(&self) -> Vec<ListenAddr> {
        let any = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
        let port = |p| vec![ListenAddr(SocketAddr::new(any, p))];
        let given = match (&self.listen, self.listen_port) {
            (Some(l), _) => Some(l.clone()),
            (None, Some(p)) => Some(port(p)),
            (None, None) => None,
        };
        match (self.enable, given) {
            (Some(false), _) | (None, None) => Vec::new(),
            (_, Some(l)) => l,
            (Some(true), None) => port(DEFAULT_SSL_PORT),
        }
    }

    /// The TLS versions offered (`ssl_protocols`), or what is wrong with them.
    pub fn versions(&self) -> Result<Vec<&'static rustls::SupportedProtocolVersion>, String> {
        let Some(text) = self.ssl_protocols.as_deref() else {
            return Ok(rustls::DEFAULT_VERSIONS.to_vec());
        };
        let mut out = Vec::new();
        for v in text.split_whitespace() {
            let v = crate::model::tls_version(v)?;
            if !out
                .iter()
                .any(|o: &&rustls::SupportedProtocolVersion| o.version == v.version)
            {
                out.push(v);
            }
        }
        if out.is_empty() {
            return Err("names no TLS version (TLSv1.2 TLSv1.3)".into());
        }
        Ok(out)
    }
}

/// `one_or_many` for an optional list.
fn some_one_or_many<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Vec<ListenAddr>>, D::Error> {
    one_or_many(d).map(Some)
}

/// Where the CAs that `https` upstreams are checked against come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedCas {
    /// The system's store (`system`).
    pub system: bool,
    /// PEM files, as written (relative ones are the prefix's).
    pub files: Vec<PathBuf>,
}

impl SslSection {
    /// `ssl_trusted_certificate` read: the system's store when it is not set.
    pub fn trusted_cas(&self) -> TrustedCas {
        let Some(v) = self.ssl_trusted_certificate.as_deref() else {
            return TrustedCas {
                system: true,
                files: Vec::new(),
            };
        };
        let mut cas = TrustedCas {
            system: false,
            files: Vec::new(),
        };
        for item in v.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            match item {
                "system" => cas.system = true,
                file => cas.files.push(PathBuf::from(file)),
            }
        }
        cas
    }
}

/// Largest CA file read for `ssl_trusted_certificate` (a system bundle is about 200 KiB).
const MAX_CA_FILE: u64 = 8 << 20;

impl TrustedCas {
    /// The certificates of the PEM files, read under `prefix`; an error names the file and
    /// what is wrong with it (unreadable, too large, not PEM, no certificate in it).
    pub fn read_files(
        &self,
        prefix: &Path,
    ) -> Result<Vec<rustls_pki_types::CertificateDer<'static>>, String> {
        use rustls_pki_types::pem::PemObject;
        let mut out = Vec::new();
        for file in &self.files {
            let path = prefix.join(file);
            let shown = || format!("apisix.ssl.ssl_trusted_certificate: {}", path.display());
            let meta = std::fs::metadata(&path).map_err(|e| format!("{}: {e}", shown()))?;
            if meta.len() > MAX_CA_FILE {
                return Err(format!("{}: larger than {MAX_CA_FILE} bytes", shown()));
            }
            let pem = std::fs::read(&path).map_err(|e| format!("{}: {e}", shown()))?;
            let before = out.len();
            for cert in rustls_pki_types::CertificateDer::pem_slice_iter(&pem) {
                out.push(cert.map_err(|e| format!("{}: not PEM: {e}", shown()))?);
            }
            if out.len() == before {
                return Err(format!("{}: no certificate in it", shown()));
            }
        }
        Ok(out)
    }
}

impl Default for ApisixSection {
    fn default() -> Self {
        ApisixSection {
            node_listen: vec![ListenAddr(SocketAddr::new(
                IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                9080,
            ))],
            enable_admin: true,
            trusted_addresses: Vec::new(),
            ssl: SslSection::default(),
            data_encryption: DataEncryption::default(),
        }
    }
}

/// A listen address: a bare port, `"ip:port"`, or `{ip, port}`.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq, Hash)]
pub struct ListenAddr(pub SocketAddr);

impl<'de> Deserialize<'de> for ListenAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Port(u16),
            Text(String),
            Map {
                ip: Option<String>,
                port: Option<u16>,
                enable_http2: Option<bool>,
                enable_http3: Option<bool>,
                // A misspelt key must not leave a listener on every address unnoticed.
                #[serde(flatten)]
                rest: std::collections::BTreeMap<String, serde::de::IgnoredAny>,
            },
        }
        let any = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
        let addr = match Raw::deserialize(d).map_err(|_| {
            serde::de::Error::custom("a listen address is a port, \"ip:port\" or {ip, port}")
        })? {
            Raw::Port(p) => SocketAddr::new(any, p),
            Raw::Text(t) => match t.parse::<u16>() {
                Ok(p) => SocketAddr::new(any, p),
                Err(_) => t.parse::<SocketAddr>().map_err(|_| {
                    serde::de::Error::custom(format!("invalid listen address {t:?}"))
                })?,
            },
            Raw::Map {
                ip,
                port,
                enable_http2,
                enable_http3,
                rest,
            } => {
                if let Some(key) = rest.keys().next() {
                    return Err(serde::de::Error::custom(format!(
                        "unknown key {key:?} in a listen address (expected ip, port)"
                    )));
                }
                if enable_http2 == Some(true) {
                    return Err(serde::de::Error::custom(
                        "enable_http2: HTTP/2 is not supported; listeners speak HTTP/1.1",
                    ));
                }
                if enable_http3 == Some(true) {
                    return Err(serde::de::Error::custom(
                        "enable_http3: HTTP/3 (QUIC) is not supported; listeners speak HTTP/1.1",
                    ));
                }
                let Some(port) = port else {
                    return Err(serde::de::Error::custom("a listen address needs a port"));
                };
                let ip = match ip {
                    Some(ip) => ip.parse::<IpAddr>().map_err(|_| {
                        serde::de::Error::custom(format!("invalid listen ip {ip:?}"))
                    })?,
                    None => any,
                };
                SocketAddr::new(ip, port)
            }
        };
        Ok(ListenAddr(addr))
    }
}

/// `deployment:` — the Admin API.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DeploymentSection {
    /// APISIX's deployment role: only `traditional` (proxy and Admin API on every node) is
    /// accepted; `data_plane` would leave an Admin API its operator expects off, so it is
    /// refused rather than ignored.
    pub role: Option<String>,
    pub admin: AdminSection,
    /// When present, routes, services, upstreams and global rules live in etcd (cluster
    /// mode, shared by every node pointing at it) instead of the local `data_dir`.
    pub etcd: Option<EtcdSection>,
}

/// `deployment.etcd:` — APISIX's keys.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EtcdSection {
    /// Endpoints, `http://host:port`, tried in order.
    pub host: Vec<String>,
    /// Key prefix: objects are `<prefix>/routes/<id>`, … as APISIX writes them.
    #[serde(default = "default_etcd_prefix")]
    pub prefix: String,
    /// Seconds allowed for one etcd request.
    #[serde(default = "default_etcd_timeout")]
    pub timeout: u64,
    /// How many times `start` tries its first read of etcd before giving up (APISIX's key;
    /// a second apart), so that a gateway started with its etcd (at boot) waits for it.
    #[serde(default = "default_startup_retry")]
    pub startup_retry: u32,
    /// etcd user the nodes authenticate as (etcd's `auth enable`); with `password`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<Secret>,
}

/// A value kept out of debug output and logs (the etcd password).
#[derive(Clone, Deserialize, Serialize, PartialEq)]
#[serde(transparent)]
pub struct Secret(pub String);

impl AsRef<str> for Secret {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("\"(hidden)\"")
    }
}

/// The user and password a node authenticates to etcd with.
#[derive(Debug, Clone, PartialEq)]
pub struct EtcdCredentials {
    pub user: String,
    pub password: Secret,
}

fn default_etcd_prefix() -> String {
    "/apisix".into()
}

fn default_etcd_timeout() -> u64 {
    30
}

fn default_startup_retry() -> u32 {
    2
}

/// The most `startup_retry` may ask for (an hour of attempts a second apart).
pub const MAX_STARTUP_RETRY: u32 = 3600;

impl EtcdSection {
    /// The user and password, when both are set (empty ones count as unset, as in APISIX's
    /// sample configuration); one without the other is an error.
    pub fn credentials(&self) -> Result<Option<EtcdCredentials>, String> {
        let user = self.user.as_deref().filter(|u| !u.is_empty());
        let password = self.password.as_ref().filter(|p| !p.0.is_empty());
        match (user, password) {
            (None, None) => Ok(None),
            (Some(user), Some(password)) => Ok(Some(EtcdCredentials {
                user: user.to_string(),
                password: password.clone(),
            })),
            (Some(_), None) => Err("deployment.etcd.user is set without a password: \
                                    set deployment.etcd.password too"
                .into()),
            (None, Some(_)) => Err("deployment.etcd.password is set without a user: \
                                    set deployment.etcd.user too"
                .into()),
        }
    }

    /// `(host, port)` of each endpoint; an error names the bad one.
    pub fn endpoints(&self) -> Result<Vec<(String, u16)>, String> {
        if self.host.is_empty() {
            return Err("deployment.etcd.host: at least one endpoint is needed".into());
        }
        self.host
            .iter()
            .map(|h| {
                let rest = h.strip_prefix("http://").ok_or_else(|| {
                    format!("deployment.etcd.host: {h:?}: only http:// endpoints are supported")
                })?;
                let rest = rest.trim_end_matches('/');
                let (host, port) = rest
                    .rsplit_once(':')
                    .map(|(h, p)| (h, p.parse::<u16>().ok()))
                    .unwrap_or((rest, Some(2379)));
                match port {
                    Some(p) if !host.is_empty() && !host.contains('/') => {
                        Ok((host.trim_matches(|c| c == '[' || c == ']').to_string(), p))
                    }
                    _ => Err(format!(
                        "deployment.etcd.host: {h:?} is not http://host:port"
                    )),
                }
            })
            .collect()
    }
}

/// `deployment.admin:`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AdminSection {
    /// When false, requests need no key (only sensible on a private loopback).
    pub admin_key_required: bool,
    /// Keys with a role: `admin` may write, `viewer` may only read.
    pub admin_key: Vec<AdminKey>,
    /// Where the Admin API listens; loopback by default.
    pub admin_listen: AdminListen,
    /// Largest accepted Admin API request body.
    #[serde(deserialize_with = "de_size")]
    pub max_body_size: u64,
    /// CORS headers on every answer and preflights answered, as APISIX's default: a browser
    /// page (a dashboard) may call the Admin API, with a key still asked for.
    pub enable_admin_cors: bool,
}

impl Default for AdminSection {
    fn default() -> Self {
        AdminSection {
            admin_key_required: true,
            admin_key: vec![AdminKey {
                name: "admin".into(),
                key: String::new(),
                role: Role::Admin,
            }],
            admin_listen: AdminListen::default(),
            max_body_size: 1 << 20,
            enable_admin_cors: true,
        }
    }
}

/// One Admin API key.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AdminKey {
    pub name: String,
    /// Empty: generated at first start, stored under the prefix and printed once.
    #[serde(default)]
    pub key: String,
    #[serde(default)]
    pub role: Role,
}

/// What an Admin API key may do.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    #[default]
    Admin,
    Viewer,
}

/// `deployment.admin.admin_listen`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AdminListen {
    pub ip: IpAddr,
    pub port: u16,
}

impl Default for AdminListen {
    fn default() -> Self {
        AdminListen {
            ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port: 9180,
        }
    }
}

impl AdminListen {
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(self.ip, self.port)
    }
}

/// Where a client on this host reaches a listener bound to `addr`: a wildcard address means
/// the loopback of its own family (an IPv6 listener is bound IPv6-only, so `::` is reached
/// on `::1`, not on 127.0.0.1, where something else may listen).
pub fn reachable(addr: SocketAddr) -> SocketAddr {
    let ip = match addr.ip() {
        std::net::IpAddr::V4(v4) if v4.is_unspecified() => std::net::Ipv4Addr::LOCALHOST.into(),
        std::net::IpAddr::V6(v6) if v6.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
        ip => ip,
    };
    SocketAddr::new(ip, addr.port())
}

/// `nginx_config:` — process and HTTP settings, named as nginx names them.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct NginxConfigSection {
    pub worker_processes: WorkerProcesses,
    /// Error log path, relative to the prefix.
    pub error_log: PathBuf,
    /// `debug`, `info`, `notice`, `warn`, `error`, `crit`, `alert`, `emerg`.
    pub error_log_level: LogLevel,
    /// How long old workers may drain in-flight requests on reload or graceful stop.
    #[serde(deserialize_with = "de_duration")]
    pub worker_shutdown_timeout: Duration,
    pub http: HttpSection,
}

impl Default for NginxConfigSection {
    fn default() -> Self {
        NginxConfigSection {
            worker_processes: WorkerProcesses::Auto,
            error_log: PathBuf::from("logs/error.log"),
            error_log_level: LogLevel::Warn,
            worker_shutdown_timeout: Duration::from_secs(240),
            http: HttpSection::default(),
        }
    }
}

/// `worker_processes`: `auto` (one per core) or a number.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub enum WorkerProcesses {
    Auto,
    Count(u16),
}

impl WorkerProcesses {
    /// The number of workers to run on this machine.
    pub fn resolve(self) -> usize {
        match self {
            WorkerProcesses::Auto => std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            WorkerProcesses::Count(n) => n as usize,
        }
    }
}

impl<'de> Deserialize<'de> for WorkerProcesses {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(i64),
            Text(String),
        }
        const WHAT: &str = "worker_processes must be \"auto\" or a number from 1 to 1024";
        // Anything else (1.5, a list) gets the same plain answer, not serde's "did not match
        // any variant".
        match Raw::deserialize(d).map_err(|_| serde::de::Error::custom(WHAT))? {
            Raw::N(n) if (1..=1024).contains(&n) => Ok(WorkerProcesses::Count(n as u16)),
            Raw::Text(t) if t == "auto" => Ok(WorkerProcesses::Auto),
            Raw::Text(t) if t.parse::<u16>().is_ok_and(|n| (1..=1024).contains(&n)) => {
                Ok(WorkerProcesses::Count(t.parse().unwrap_or(1)))
            }
            _ => Err(serde::de::Error::custom(WHAT)),
        }
    }
}

/// Error-log verbosity, in nginx's words.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Debug,
    Info,
    Notice,
    Warn,
    Error,
    Crit,
    Alert,
    Emerg,
}

impl LogLevel {
    /// The `tracing` filter directive for this level.
    pub fn as_tracing(self) -> &'static str {
        match self {
            LogLevel::Debug => "debug",
            LogLevel::Info | LogLevel::Notice => "info",
            LogLevel::Warn => "warn",
            _ => "error",
        }
    }
}

/// `nginx_config.http:`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSection {
    /// Access log path relative to the prefix, or `off`.
    pub access_log: String,
    /// The access log line, with nginx-style `$variables` (see `logformat::VARIABLES`).
    pub access_log_format: String,
    /// Idle keep-alive time of client connections.
    #[serde(deserialize_with = "de_duration")]
    pub keepalive_timeout: Duration,
    /// Time allowed to receive a request's headers.
    #[serde(deserialize_with = "de_duration")]
    pub client_header_timeout: Duration,
    /// Longest wait for the next piece of a request body (nginx's `client_body_timeout`: the
    /// time between two reads, not for the whole body); when it passes the client gets 408.
    #[serde(deserialize_with = "de_duration")]
    pub client_body_timeout: Duration,
    /// Longest wait for a client to take more of its answer (nginx's `send_timeout`: the time
    /// between two writes, not for the whole answer); when it passes the connection closes.
    #[serde(deserialize_with = "de_duration")]
    pub send_timeout: Duration,
    /// Largest request body (0 = unlimited); larger → 413.
    #[serde(deserialize_with = "de_size")]
    pub client_max_body_size: u64,
    /// Largest request head (request line + headers); larger → 431.
    #[serde(deserialize_with = "de_size")]
    pub client_max_header_size: u64,
    /// Idle upstream connections kept per worker per node.
    pub upstream_keepalive: usize,
    /// How long an idle upstream connection is kept.
    #[serde(deserialize_with = "de_duration")]
    pub upstream_keepalive_timeout: Duration,
    /// nginx's realip module, as APISIX configures it: from a peer in `real_ip_from` (IPs or
    /// CIDRs; APISIX's `unix:` is accepted and matches nothing, there being no unix
    /// listeners), the client address is the one `real_ip_header` gives (`X-Real-IP` by
    /// default, or `X-Forwarded-For`); with `real_ip_recursive`, the last address of the list
    /// that is not itself in `real_ip_from`. Empty `real_ip_from`: the peer is the client.
    pub real_ip_header: String,
    pub real_ip_from: Vec<String>,
    #[serde(deserialize_with = "de_on_off")]
    pub real_ip_recursive: bool,
    /// APISIX's switch for the access log: false is `access_log: off`.
    pub enable_access_log: bool,
    /// How values are escaped in access-log lines: `default` or `json` (nginx's `escape=`).
    pub access_log_format_escape: crate::logformat::Escape,
    /// APISIX's names for the upstream keep-alive settings: `keepalive` and
    /// `keepalive_timeout`, used over `upstream_keepalive` and `upstream_keepalive_timeout`
    /// when given; `keepalive_requests` is accepted (connections are reused without a count).
    pub upstream: Option<ApisixUpstreamKeepalive>,
}

/// `nginx_config.http.upstream:` as APISIX writes it.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ApisixUpstreamKeepalive {
    pub keepalive: Option<usize>,
    #[serde(deserialize_with = "de_opt_duration")]
    pub keepalive_timeout: Option<Duration>,
    pub keepalive_requests: Option<u64>,
}

impl HttpSection {
    /// Folds APISIX's spellings into the settings they stand for.
    fn settle(&mut self) {
        if !self.enable_access_log {
            self.access_log = "off".into();
        }
        if let Some(u) = &self.upstream {
            if let Some(n) = u.keepalive {
                self.upstream_keepalive = n;
            }
            if let Some(t) = u.keepalive_timeout {
                self.upstream_keepalive_timeout = t;
            }
        }
    }
}

impl Default for HttpSection {
    fn default() -> Self {
        HttpSection {
            access_log: "logs/access.log".into(),
            access_log_format: crate::logformat::DEFAULT.into(),
            keepalive_timeout: Duration::from_secs(60),
            client_header_timeout: Duration::from_secs(60),
            client_body_timeout: Duration::from_secs(60),
            // APISIX's default (nginx's own is 60 s).
            send_timeout: Duration::from_secs(10),
            client_max_body_size: 0,
            client_max_header_size: 64 << 10,
            upstream_keepalive: 320,
            upstream_keepalive_timeout: Duration::from_secs(60),
            real_ip_header: "X-Real-IP".into(),
            real_ip_from: Vec::new(),
            real_ip_recursive: false,
            enable_access_log: true,
            access_log_format_escape: crate::logformat::Escape::Default,
            upstream: None,
        }
    }
}

/// `wasm:` — the Proxy-Wasm plugins every worker loads.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct WasmSection {
    pub plugins: Vec<WasmPluginDecl>,
}

/// One `wasm.plugins` item.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WasmPluginDecl {
    pub name: String,
    pub priority: i64,
    /// Path of the `.wasm` file, relative to the prefix when not absolute.
    pub file: PathBuf,
    #[serde(default)]
    pub http_request_phase: RequestPhase,
    /// On a plugin fault (trap, time or memory limit) let the request continue without the
    /// plugin instead of answering 503.
    #[serde(default)]
    pub fail_open: bool,
    /// Longest one callback may run; None (`off`): no limit, as Envoy runs plugins, and the
    /// plugin's code compiled without the checks a limit needs.
    #[serde(default = "default_callback_timeout", deserialize_with = "de_limit")]
    pub callback_timeout: Option<Duration>,
    /// Largest linear memory of one instance.
    #[serde(default = "default_memory_limit", deserialize_with = "de_size")]
    pub memory_limit: u64,
    /// Longest a request (or response) stays paused by one of the plugin's headers callbacks
    /// waiting for a resume; then it is failed as a fault is (503, or on with `fail_open`).
    #[serde(default = "default_pause_timeout", deserialize_with = "de_duration")]
    pub pause_timeout: Duration,
    /// Most body bytes the plugin may hold back (by pausing a body callback); beyond it the
    /// request is answered 413 (request body) or 502 (response body).
    #[serde(default = "default_body_buffer_limit", deserialize_with = "de_size")]
    pub body_buffer_limit: u64,
    /// What the `plugin_root_id` property answers (Envoy's `root_id`), by which the C++ and
    /// AssemblyScript SDKs pick the root context class; default: the plugin's name, as APISIX.
    #[serde(default)]
    pub root_id: Option<String>,
    /// The VM configuration (Envoy's `vm_config.configuration`): the buffer
    /// `proxy_on_vm_start` reads (type 6) and the size it is given; default empty.
    #[serde(default)]
    pub vm_config: String,
}

fn default_body_buffer_limit() -> u64 {
    1 << 20
}

fn default_pause_timeout() -> Duration {
    Duration::from_secs(60)
}

fn default_callback_timeout() -> Option<Duration> {
    Some(Duration::from_millis(100))
}

fn default_memory_limit() -> u64 {
    64 << 20
}

/// The phase in which a plugin's `proxy_on_request_headers` runs.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum RequestPhase {
    Rewrite,
    #[default]
    Access,
}

impl RequestPhase {
    /// The name config.yaml spells it with (`http_request_phase`).
    pub fn as_str(self) -> &'static str {
        match self {
            RequestPhase::Rewrite => "rewrite",
            RequestPhase::Access => "access",
        }
    }
}

/// `wasmgate:` — settings APISIX has no word for.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct WasmgateSection {
    /// Capacity of the shared-memory area that carries configuration snapshots.
    #[serde(deserialize_with = "de_size")]
    pub shm_size: u64,
    /// Capacity of the shared memory holding plugins' shared data, shared queues and metrics
    /// (gateway-wide: every worker maps it).
    #[serde(deserialize_with = "de_size")]
    pub plugin_shm_size: u64,
    /// Where Admin API objects are stored, relative to the prefix.
    pub data_dir: PathBuf,
    /// The master's pid file, relative to the prefix.
    pub pid_file: PathBuf,
}

impl Default for WasmgateSection {
    fn default() -> Self {
        WasmgateSection {
            shm_size: 64 << 20,
            plugin_shm_size: 16 << 20,
            data_dir: PathBuf::from("data"),
            pid_file: PathBuf::from("logs/wasmgate.pid"),
        }
    }
}

impl GatewayConfig {
    /// What is allowed but dangerous, for `start`, `reload` and `test` to say (APISIX warns
    /// "Admin key is bypassed!" likewise).
    pub fn warnings(&self) -> Vec<String> {
        let admin = &self.deployment.admin;
        let addr = admin.admin_listen.addr();
        let mut out = self.set_aside.clone();
        for (i, len) in self.apisix.bad_salts() {
            out.push(format!(
                "apisix.ssl.key_encrypt_salt: entry {i} is {len} characters, not a key of 16: set aside (as APISIX 2 sets it aside)"
            ));
        }
        if !admin.admin_key_required && !addr.ip().is_loopback() {
            out.push(format!(
                "deployment.admin.admin_key_required is false and the Admin API listens on \
                 {addr}: anyone who reaches it can change the configuration"
            ));
        }
        // APISIX's sample keys are in its documentation and countless copies of its
        // config.yaml (APISIX warns about them too).
        for k in &admin.admin_key {
            if PUBLISHED_KEYS.contains(&k.key.as_str()) {
                out.push(format!(
                    "deployment.admin.admin_key {:?} uses APISIX's published sample key: anyone who can reach the Admin API can guess it; leave key empty to have one generated, or set your own",
                    k.name
                ));
            }
        }
        out
    }

    /// Parses and validates YAML text; `origin` names the file in error messages.
    pub fn parse(text: &str, origin: &str) -> Result<GatewayConfig, ConfigError> {
        GatewayConfig::parse_with_env(text, origin, |name| std::env::var(name).ok())
    }

    /// [`GatewayConfig::parse`] with `env` answering the `${{NAME}}` references
    /// ([`crate::yaml_env`]) instead of the process's environment.
    pub fn parse_with_env(
        text: &str,
        origin: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<GatewayConfig, ConfigError> {
        let at = |(line, msg): (usize, String)| ConfigError(format!("{origin}:{line}: {msg}"));
        let text = crate::yaml_env::expand(text, env).map_err(at)?;
        let (text, set_aside) = crate::apisix_keys::set_aside(&text).map_err(at)?;
        let text = &*text;
        // An empty file (or one holding only comments) means "all defaults".
        if text.lines().all(|l| {
            let l = l.trim();
            l.is_empty() || l.starts_with('#') || l == "---"
        }) {
            return Ok(GatewayConfig {
                set_aside,
                ..GatewayConfig::default()
            });
        }
        let mut config: GatewayConfig = serde_norway::from_str(text).map_err(|e| {
            let line = e.location().map(|l| l.line()).unwrap_or(0);
            // serde_norway appends "at line N column M"; the prefix already says where.
            let msg = e.to_string();
            let msg = msg.split(" at line ").next().unwrap_or(&msg).to_string();
            ConfigError(format!("{origin}:{line}: {}", apisix_wording(&msg)))
        })?;
        config.validate(text, origin)?;
        config.nginx_config.http.settle();
        config.set_aside = set_aside;
        Ok(config)
    }

    /// Reads and parses a file.
    pub fn load(path: &Path) -> Result<GatewayConfig, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("{}: cannot read: {e}", path.display())))?;
        GatewayConfig::parse(&text, &path.display().to_string())
    }

    /// Checks what serde cannot: duplicates, ranges, cross-field rules.
    fn validate(&self, text: &str, origin: &str) -> Result<(), ConfigError> {
        let err = |path: &[Step], msg: String| {
            ConfigError(format!("{origin}:{}: {msg}", line_of(text, path)))
        };
        let listen = [Key("apisix"), Key("node_listen")];
        let admin_at = |k| [Key("deployment"), Key("admin"), Key(k)];
        let key_at = |n| [Key("deployment"), Key("admin"), Key("admin_key"), Item(n)];
        let etcd_at = |k| [Key("deployment"), Key("etcd"), Key(k)];
        let prom_at = |k| [Key("plugin_attr"), Key("prometheus"), Key(k)];
        if !self.apisix.enable_admin {
            return Err(err(
                &[Key("apisix"), Key("enable_admin")],
                "apisix.enable_admin: false is not supported: the Admin API is how `wasmgate \
                 reload`, `status` and `tui` reach the master; keep it on loopback \
                 (deployment.admin.admin_listen) to keep it private"
                    .into(),
            ));
        }
        if let Some(role) = self.deployment.role.as_deref() {
            let why = match role {
                "traditional" => None,
                "data_plane" | "control_plane" => Some(format!(
                    "deployment.role: {role} is not supported: every wasmgate node is \
                     `traditional` (proxy and Admin API); nodes that share their routes take \
                     them from deployment.etcd, each with its Admin API on loopback"
                )),
                "standalone" => Some(
                    "deployment.role: standalone is not supported: routes live in the data \
                     directory (through the Admin API) or in deployment.etcd, not in an \
                     apisix.yaml; use role: traditional"
                        .to_string(),
                ),
                other => Some(format!(
                    "deployment.role: unknown role {other:?} (APISIX's are traditional, \
                     data_plane, control_plane and standalone; wasmgate runs traditional)"
                )),
            };
            if let Some(why) = why {
                return Err(err(&[Key("deployment"), Key("role")], why));
            }
        }
        let ssl_at = |k| [Key("apisix"), Key("ssl"), Key(k)];
        let ssl = &self.apisix.ssl;
        if let Err(why) = ssl.versions() {
            return Err(err(
                &ssl_at("ssl_protocols"),
                format!("apisix.ssl.ssl_protocols: {why}"),
            ));
        }
        if let Some(name) = &ssl.fallback_sni {
            if !crate::model::valid_sni(name) || name.starts_with("*.") {
                return Err(err(
                    &ssl_at("fallback_sni"),
                    format!("apisix.ssl.fallback_sni: {name:?} is not a host name"),
                ));
            }
        }
        let cas = self.apisix.ssl.trusted_cas();
        if !cas.system && cas.files.is_empty() {
            return Err(err(
                &ssl_at("ssl_trusted_certificate"),
                "apisix.ssl.ssl_trusted_certificate names no CA: write `system`, a PEM file, \
                 or both (`system, conf/ca.pem`)"
                    .into(),
            ));
        }
        let mut tls_seen = HashSet::new();
        for l in ssl.listeners() {
            let at = ssl_at(if ssl.listen.is_some() {
                "listen"
            } else {
                "listen_port"
            });
            if l.0.port() == 0 {
                return Err(err(&at, "apisix.ssl.listen: port 0 is not allowed".into()));
            }
            if !tls_seen.insert(l.0) {
                return Err(err(
                    &at,
                    format!("apisix.ssl.listen: {} is listed twice", l.0),
                ));
            }
        }
        if self.apisix.node_listen.is_empty() {
            return Err(err(
                &listen,
                "apisix.node_listen must list at least one port".into(),
            ));
        }
        let mut seen = HashSet::new();
        for (i, l) in self.apisix.node_listen.iter().enumerate() {
            let item = [listen[0], listen[1], Item(i)];
            if l.0.port() == 0 {
                return Err(err(
                    &item,
                    "apisix.node_listen: port 0 is not allowed".into(),
                ));
            }
            if !seen.insert(l.0) {
                return Err(err(
                    &item,
                    format!("apisix.node_listen: {} is listed twice", l.0),
                ));
            }
        }
        let http = &self.nginx_config.http;
        let http_at = |k| [Key("nginx_config"), Key("http"), Key(k)];
        for (i, a) in http.real_ip_from.iter().enumerate() {
            if a != "unix:" && crate::model::vars::Cidr::parse(a).is_none() {
                return Err(err(
                    &[
                        Key("nginx_config"),
                        Key("http"),
                        Key("real_ip_from"),
                        Item(i),
                    ],
                    format!("nginx_config.http.real_ip_from: {a:?} is not an IP address or CIDR"),
                ));
            }
        }
        if http::HeaderName::from_bytes(http.real_ip_header.as_bytes()).is_err() {
            return Err(err(
                &http_at("real_ip_header"),
                format!(
                    "nginx_config.http.real_ip_header: {:?} is not a header name",
                    http.real_ip_header
                ),
            ));
        }
        if let Err(e) = self.apisix.keyring() {
            return Err(err(
                &[Key("apisix"), Key("data_encryption"), Key("keyring")],
                e,
            ));
        }
        for (i, a) in self.apisix.trusted_addresses.iter().enumerate() {
            if crate::model::vars::Cidr::parse(a).is_none() {
                return Err(err(
                    &[Key("apisix"), Key("trusted_addresses"), Item(i)],
                    format!("apisix.trusted_addresses: {a:?} is not an IP address or CIDR"),
                ));
            }
        }
        let admin = &self.deployment.admin;
        // Every listener on its own port: a clash is otherwise found only when the second
        // bind fails, at start or — worse — in the middle of a reload.
        let admin_addr = admin.admin_listen.addr();
        let prom = &self.plugin_attr.prometheus;
        let mut own = vec![(
            "deployment.admin.admin_listen",
            admin_at("admin_listen"),
            admin_addr,
        )];
        if prom.enable_export_server {
            own.push((
                "plugin_attr.prometheus.export_addr",
                prom_at("export_addr"),
                prom.export_addr.addr(),
            ));
        }
        for (what, path, addr) in &own {
            if addr.port() == 0 {
                return Err(err(path, format!("{what}: port 0 is not allowed")));
            }
        }
        // IPv6 listeners are bound v6-only: `[::]` and `0.0.0.0` on one port do not clash.
        let overlap = |a: SocketAddr, b: SocketAddr| {
            a.port() == b.port()
                && a.is_ipv4() == b.is_ipv4()
                && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
        };
        let tls = ssl.listeners();
        let listeners = (self
            .apisix
            .node_listen
            .iter()
            .map(|l| ("apisix.node_listen", l.0)))
        .chain(tls.iter().map(|l| ("apisix.ssl.listen", l.0)));
        let all: Vec<(&str, SocketAddr)> = listeners
            .chain(own.iter().map(|(what, _, a)| (*what, *a)))
            .collect();
        for (i, (what, a)) in all.iter().enumerate() {
            if let Some((other, b)) = all[i + 1..].iter().find(|(_, b)| overlap(*a, *b)) {
                return Err(err(
                    &listen,
                    format!("{what} {a} and {other} {b} both want port {}", a.port()),
                ));
            }
        }
        // 0 would refuse every Admin API write (unlike `client_max_body_size`, where nginx's
        // 0 means no limit).
        if admin.max_body_size == 0 {
            return Err(err(
                &admin_at("max_body_size"),
                "deployment.admin.max_body_size must be at least 1 byte".into(),
            ));
        }
        if admin.admin_key_required && admin.admin_key.is_empty() {
            return Err(err(
                &admin_at("admin_key"),
                "deployment.admin.admin_key must hold at least one key when admin_key_required is true".into(),
            ));
        }
        let mut names = HashSet::new();
        for (n, k) in admin.admin_key.iter().enumerate() {
            if k.name.is_empty() {
                return Err(err(
                    &key_at(n),
                    "deployment.admin.admin_key: property \"name\" must not be empty".into(),
                ));
            }
            let [a, b, c, d] = key_at(n);
            if k.key.len() > 256 {
                return Err(err(
                    &[a, b, c, d, Key("key")],
                    format!(
                        "deployment.admin.admin_key: key of {:?} is longer than 256 bytes",
                        k.name
                    ),
                ));
            }
            // One key, one role: the first match would decide, so a key listed as a viewer's
            // and an admin's would write.
            let before = &admin.admin_key[..n];
            if let Some(other) = before.iter().find(|o| !k.key.is_empty() && o.key == k.key) {
                return Err(err(
                    &[a, b, c, d, Key("key")],
                    format!(
                        "deployment.admin.admin_key: {:?} and {:?} have the same key",
                        other.name, k.name
                    ),
                ));
            }
            if !names.insert(k.name.as_str()) {
                return Err(err(
                    &[a, b, c, d, Key("name")],
                    format!(
                        "deployment.admin.admin_key: name {:?} is used twice",
                        k.name
                    ),
                ));
            }
        }
        if self.nginx_config.http.client_max_header_size < 1024 {
            return Err(err(
                &[
                    Key("nginx_config"),
                    Key("http"),
                    Key("client_max_header_size"),
                ],
                "nginx_config.http.client_max_header_size must be at least 1k".into(),
            ));
        }
        if self.wasmgate.shm_size < (1 << 20) || self.wasmgate.shm_size > (4 << 30) {
            return Err(err(
                &[Key("wasmgate"), Key("shm_size")],
                "wasmgate.shm_size must be between 1m and 4g".into(),
            ));
        }
        if self.wasmgate.plugin_shm_size < (1 << 20) || self.wasmgate.plugin_shm_size > (4 << 30) {
            return Err(err(
                &[Key("wasmgate"), Key("plugin_shm_size")],
                "wasmgate.plugin_shm_size must be between 1m and 4g".into(),
            ));
        }
        if let Err(e) =
            crate::logformat::LogFormat::parse(&self.nginx_config.http.access_log_format)
        {
            return Err(err(
                &[Key("nginx_config"), Key("http"), Key("access_log_format")],
                e,
            ));
        }
        if let Some(etcd) = &self.deployment.etcd {
            etcd.endpoints()
                .map_err(|e| err(&[Key("deployment"), Key("etcd"), Key("host")], e))?;
            if !etcd.prefix.starts_with('/') || etcd.prefix.ends_with('/') && etcd.prefix.len() > 1
            {
                return Err(err(
                    &etcd_at("prefix"),
                    format!(
                        "deployment.etcd.prefix {:?}: a path like /apisix",
                        etcd.prefix
                    ),
                ));
            }
            if let Err(e) = etcd.credentials() {
                let key = if e.starts_with("deployment.etcd.user") {
                    "user"
                } else {
                    "password"
                };
                return Err(err(&etcd_at(key), e));
            }
            if etcd.timeout == 0 {
                return Err(err(
                    &etcd_at("timeout"),
                    "deployment.etcd.timeout must be at least 1 (seconds)".into(),
                ));
            }
            if !(1..=MAX_STARTUP_RETRY).contains(&etcd.startup_retry) {
                return Err(err(
                    &etcd_at("startup_retry"),
                    format!(
                        "deployment.etcd.startup_retry must be between 1 and {MAX_STARTUP_RETRY} (attempts)"
                    ),
                ));
            }
        }
        let prom = &self.plugin_attr.prometheus;
        if !prom.export_uri.starts_with('/') || prom.export_uri.contains(char::is_whitespace) {
            return Err(err(
                &prom_at("export_uri"),
                format!(
                    "plugin_attr.prometheus.export_uri must be a path starting with '/', not {:?}",
                    prom.export_uri
                ),
            ));
        }
        let name_ok = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
        if !prom.metric_prefix.chars().all(name_ok)
            || prom.metric_prefix.starts_with(|c: char| c.is_ascii_digit())
        {
            return Err(err(
                &prom_at("metric_prefix"),
                format!("plugin_attr.prometheus.metric_prefix {:?}: only letters, digits, '_' and ':', not starting with a digit", prom.metric_prefix),
            ));
        }
        let mut plugin_names = HashSet::new();
        for (i, p) in self.wasm.plugins.iter().enumerate() {
            let at = |k| [Key("wasm"), Key("plugins"), Item(i), Key(k)];
            if !valid_plugin_name(&p.name) {
                return Err(err(
                    &at("name"),
                    format!("wasm.plugins: invalid plugin name {:?} (letters, digits, '-' and '_', at most 64)", p.name),
                ));
            }
            if !plugin_names.insert(p.name.as_str()) {
                return Err(err(
                    &at("name"),
                    format!("wasm.plugins: plugin {:?} is declared twice", p.name),
                ));
            }
            if p.pause_timeout.is_zero() {
                return Err(err(
                    &at("pause_timeout"),
                    format!(
                        "wasm.plugins: plugin {:?}: pause_timeout must be above 0",
                        p.name
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The names of the declared wasm plugins.
    pub fn plugin_names(&self) -> impl Iterator<Item = &str> {
        self.wasm.plugins.iter().map(|p| p.name.as_str())
    }
}

fn valid_plugin_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Asserts that `yaml` is refused with a message that names line `line` of c.yaml and
    /// says `says`.
    fn assert_refused_at(yaml: &str, line: usize, says: &str) {
        let e = GatewayConfig::parse(yaml, "c.yaml").unwrap_err();
        assert!(
            e.0.starts_with(&format!("c.yaml:{line}:")) && e.0.contains(says),
            "{e}"
        );
    }

    #[test]
    fn a_wildcard_listener_is_reached_on_its_familys_loopback() {
        let at = |a: &str| reachable(a.parse().unwrap()).to_string();
        assert_eq!(at("0.0.0.0:9180"), "127.0.0.1:9180");
        assert_eq!(at("[::]:9180"), "[::1]:9180");
        assert_eq!(at("10.1.2.3:9180"), "10.1.2.3:9180");
    }

    #[test]
    fn the_keyring_is_apisix_s_by_default_and_its_keys_are_sixteen_bytes() {
        let c = GatewayConfig::parse("apisix:\n  node_listen: 9080\n", "c.yaml").unwrap();
        let default = c.apisix.keyring().unwrap();
        assert_eq!(default, crate::keyring::Keyring::apisix_default());
        let one = "apisix:\n  data_encryption:\n    enable_encrypt_fields: false\n    keyring: 0123456789abcdef\n";
        let c = GatewayConfig::parse(one, "c.yaml").unwrap();
        assert_eq!(
            c.apisix.keyring().unwrap(),
            crate::keyring::Keyring::new(&["0123456789abcdef"]).unwrap()
        );
        // Never in debug output.
        assert!(!format!("{c:?}").contains("0123456789abcdef"));
        let none = "apisix:\n  data_encryption:\n    keyring: []\n";
        let c = GatewayConfig::parse(none, "c.yaml").unwrap();
        assert_eq!(c.apisix.keyring().unwrap().seal("---x"), None);
        let short =
            "apisix:\n  data_encryption:\n    keyring:\n      - 0123456789abcdef\n      - short\n";
        assert_refused_at(
            short,
            3,
            "apisix.data_encryption.keyring: entry 1 is 5 bytes",
        );
        for bad in ["keyring:\n", "keyring: [1234]\n", "keyring: {a: b}\n"] {
            let y = format!("apisix:\n  data_encryption:\n    {bad}");
            let e = GatewayConfig::parse(&y, "c.yaml").unwrap_err();
            assert!(
                e.0.contains("a key of 16 characters, or a list of them"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn key_encrypt_salt_keys_are_read_after_the_keyring() {
        let both = "apisix:\n  data_encryption:\n    keyring: 0123456789abcdef\n  ssl:\n    key_encrypt_salt: [fedcba9876543210, 0123456789abcdef]\n";
        let c = GatewayConfig::parse(both, "c.yaml").unwrap();
        let ring = c.apisix.keyring().unwrap();
        assert_eq!(
            ring,
            crate::keyring::Keyring::new(&["0123456789abcdef", "fedcba9876543210"]).unwrap()
        );
        // What APISIX 3.0 sealed with the salt opens, and is sealed again with the keyring's.
        let old = crate::keyring::Keyring::new(&["fedcba9876543210"]).unwrap();
        let sealed = old.seal("-----BEGIN PRIVATE KEY-----\nx\n").unwrap();
        let resealed = ring.seal(&sealed).expect("sealed again with the first key");
        assert_eq!(
            ring.open(&resealed).unwrap(),
            "-----BEGIN PRIVATE KEY-----\nx\n"
        );
        assert!(crate::keyring::Keyring::new(&["0123456789abcdef"])
            .unwrap()
            .open(&sealed)
            .is_err());
        assert!(!format!("{c:?}").contains("fedcba9876543210"));
        // With the keyring `[]`, keys are written in clear and the salt's opened.
        let clear = "apisix:\n  data_encryption:\n    keyring: []\n  ssl:\n    key_encrypt_salt: fedcba9876543210\n";
        let ring = GatewayConfig::parse(clear, "c.yaml")
            .unwrap()
            .apisix
            .keyring()
            .unwrap();
        assert_eq!(ring.seal("---x"), None);
        assert!(ring.open(&sealed).is_ok());
        // What APISIX 2 set aside is set aside, with a warning; so are null and numbers.
        for (salt, says, read) in [
            ("short", Some("entry 0 is 5 characters"), None),
            ("", None, None),
            ("1234", Some("entry 0 is 4"), None),
            (
                "[1234567890123456, x]",
                Some("entry 1 is 1"),
                Some("1234567890123456"),
            ),
        ] {
            let y = format!("apisix:\n  ssl:\n    key_encrypt_salt: {salt}\n");
            let c = GatewayConfig::parse(&y, "c.yaml").unwrap();
            let read: Vec<&str> = read.into_iter().collect();
            let expected = crate::keyring::Keyring::apisix_default().reading_also(&read);
            assert_eq!(c.apisix.keyring().unwrap(), expected, "{salt}");
            let w = c.warnings();
            match says {
                Some(s) => assert!(w.iter().any(|l| l.contains(s)), "{salt}: {w:?}"),
                None => assert!(w.is_empty(), "{w:?}"),
            }
        }
    }

    #[test]
    fn embedded_default_parses() {
        let c = GatewayConfig::parse(EMBEDDED_DEFAULT, "conf/config.yaml").unwrap();
        assert_eq!(c.apisix.node_listen[0].0.port(), 9080);
        assert_eq!(
            c.deployment.admin.admin_listen.addr().to_string(),
            "127.0.0.1:9180"
        );
        assert_eq!(c.nginx_config.worker_processes, WorkerProcesses::Auto);
    }

    /// `${{NAME}}` and `${{NAME:=default}}` as APISIX reads them; a key whose variable is not
    /// set is refused, never taken as the literal text.
    #[test]
    fn environment_variables_fill_values() {
        let env = |n: &str| match n {
            "ADMIN_KEY" => Some("from-the-env".to_string()),
            _ => None,
        };
        let y = "apisix:\n  node_listen: ${{PORT:=9181}}\ndeployment:\n  admin:\n    admin_key:\n      - name: admin\n        key: ${{ADMIN_KEY}} # ${{NOT_READ}}\n        role: admin\n";
        let c = GatewayConfig::parse_with_env(y, "c.yaml", env).unwrap();
        assert_eq!(c.apisix.node_listen[0].0.port(), 9181);
        assert_eq!(c.deployment.admin.admin_key[0].key, "from-the-env");
        let e = GatewayConfig::parse_with_env(y, "c.yaml", |_| None).unwrap_err();
        assert!(
            e.0.starts_with("c.yaml:7:") && e.0.contains("ADMIN_KEY is not set"),
            "{e}"
        );
        assert!(c.warnings().is_empty(), "{:?}", c.warnings());
        // APISIX's sample key is accepted, with a warning.
        let sample =
            |n: &str| (n == "ADMIN_KEY").then(|| "edd1c9f034335f136f87ad84b625c8f1".into());
        let c = GatewayConfig::parse_with_env(y, "c.yaml", sample).unwrap();
        assert!(
            c.warnings()[0].contains("published sample key"),
            "{:?}",
            c.warnings()
        );
    }

    /// The TLS listener is on when asked for: `enable: true` (port 9443), or a port named
    /// without `enable`; off with `enable: false` or without an `ssl` section.
    #[test]
    fn the_tls_listener_is_on_when_asked_for() {
        let ports = |ssl: &str| {
            let c = GatewayConfig::parse(&format!("apisix:\n  ssl:\n{ssl}"), "c.yaml").unwrap();
            let l = c.apisix.ssl.listeners();
            l.iter().map(|a| a.0.port()).collect::<Vec<_>>()
        };
        assert_eq!(ports("    enable: true\n"), [DEFAULT_SSL_PORT]);
        assert_eq!(ports("    listen: [8443, 8444]\n"), [8443, 8444]);
        assert_eq!(ports("    listen_port: 8443\n"), [8443]);
        assert_eq!(ports("    enable: false\n    listen: [8443]\n"), [0u16; 0]);
        assert_eq!(ports("    ssl_trusted_certificate: system\n"), [0u16; 0]);
        let c = GatewayConfig::parse("apisix:\n  node_listen: [9080]\n", "c.yaml").unwrap();
        assert_eq!(c.apisix.proxy_listen().len(), 1);
        let e = GatewayConfig::parse(
            "apisix:\n  node_listen: [9080]\n  ssl:\n    listen: [9080]\n",
            "c.yaml",
        )
        .unwrap_err();
        assert!(e.0.contains("both want port 9080"), "{e}");
        let e = GatewayConfig::parse(
            "apisix:\n  ssl:\n    enable: true\n    ssl_protocols: TLSv1.1\n",
            "c.yaml",
        )
        .unwrap_err();
        assert!(e.0.contains("c.yaml:4") && e.0.contains("RFC 8996"), "{e}");
        let e = GatewayConfig::parse(
            "apisix:\n  ssl:\n    enable: true\n    fallback_sni: '*.a.test'\n",
            "c.yaml",
        )
        .unwrap_err();
        assert!(e.0.contains("fallback_sni"), "{e}");
    }

    /// A config.yaml as APISIX 3 installations write it loads: the keys wasmgate does not use
    /// are named in warnings; APISIX's spellings of settings wasmgate has take effect.
    #[test]
    fn an_apisix_config_yaml_loads() {
        let y = r#"apisix:
  node_listen:
    - 9080
  enable_ipv6: false
  enable_server_tokens: true
  enable_admin: true
  router:
    http: radixtree_host_uri
    ssl: radixtree_sni
  ssl:
    enable: false
nginx_config:
  error_log_level: warn
  worker_processes: auto
  worker_rlimit_nofile: 20480
  event:
    worker_connections: 10620
  meta:
    lua_shared_dict:
      prometheus-metrics: 15m
  http:
    enable_access_log: false
    access_log_format_escape: json
    keepalive_timeout: 60s
    underscores_in_headers: "on"
    real_ip_header: X-Real-IP
    real_ip_from:
      - 127.0.0.1
      - "unix:"
    lua_shared_dict:
      internal-status: 10m
    upstream:
      keepalive: 100
      keepalive_requests: 1000
      keepalive_timeout: 30s
  http_configuration_snippet: |
    # Add custom Nginx http configuration to nginx.conf.
deployment:
  role: traditional
  role_traditional:
    config_provider: etcd
  admin:
    admin_key:
      - name: admin
        key: ${{ADMIN_KEY}}
        role: admin
    allow_admin:
      - 127.0.0.0/24
    admin_listen:
      ip: 127.0.0.1
      port: 9180
    admin_api_version: v3
  etcd:
    host:
      - "http://127.0.0.1:2379"
    prefix: /apisix
    timeout: 30
    watch_timeout: 50
    startup_retry: 2
plugins:
  - wasm
  - prometheus
plugin_attr:
  prometheus:
    export_addr:
      ip: 127.0.0.1
      port: 9091
  log-rotate:
    interval: 3600
"#;
        let env = |n: &str| (n == "ADMIN_KEY").then(|| "k-0123456789".to_string());
        let c = GatewayConfig::parse_with_env(y, "c.yaml", env).unwrap();
        let http = &c.nginx_config.http;
        assert_eq!(http.access_log, "off");
        assert_eq!(
            http.access_log_format_escape,
            crate::logformat::Escape::Json
        );
        assert_eq!(http.upstream_keepalive, 100);
        assert_eq!(http.upstream_keepalive_timeout, Duration::from_secs(30));
        assert_eq!(http.real_ip_header, "X-Real-IP");
        assert_eq!(http.real_ip_from, ["127.0.0.1", "unix:"]);
        assert_eq!(c.deployment.admin.admin_key[0].key, "k-0123456789");
        assert_eq!(c.deployment.etcd.as_ref().unwrap().prefix, "/apisix");
        assert_eq!(c.deployment.etcd.as_ref().unwrap().startup_retry, 2);
        let w = c.warnings();
        for key in [
            "apisix.enable_ipv6",
            "apisix.router",
            "nginx_config.event",
            "nginx_config.http_configuration_snippet",
            "deployment.admin.allow_admin",
            "deployment.etcd.watch_timeout",
            "plugins:",
            "plugin_attr.log-rotate",
        ] {
            assert!(w.iter().any(|l| l.starts_with(key)), "{key} in {w:#?}");
        }
        // A misspelt key is still an error, on its line.
        let e =
            GatewayConfig::parse_with_env(&y.replace("enable_ipv6", "enable_ipv7"), "c.yaml", env)
                .unwrap_err();
        assert!(
            e.0.starts_with("c.yaml:4:") && e.0.contains("enable_ipv7"),
            "{e}"
        );
    }

    #[test]
    fn etcd_credentials_come_in_pairs_and_stay_out_of_debug_output() {
        let base = "deployment:\n  etcd:\n    host: [http://127.0.0.1:2379]\n";
        let env = |n: &str| (n == "ETCD_PW").then(|| "s3cret-pw".to_string());
        let c = GatewayConfig::parse_with_env(
            &format!("{base}    user: gw\n    password: ${{{{ETCD_PW}}}}\n"),
            "c.yaml",
            env,
        )
        .unwrap();
        let etcd = c.deployment.etcd.as_ref().unwrap();
        let creds = etcd.credentials().unwrap().unwrap();
        assert_eq!(
            (creds.user.as_str(), creds.password.0.as_str()),
            ("gw", "s3cret-pw")
        );
        assert!(!format!("{c:?}").contains("s3cret"), "{c:?}");
        // Empty ones are unset, as in APISIX's sample configuration.
        let blank = format!("{base}    user: \"\"\n    password: \"\"\n");
        let c = GatewayConfig::parse(&blank, "c.yaml").unwrap();
        assert_eq!(c.deployment.etcd.unwrap().credentials(), Ok(None));
        for (rest, says) in [
            (
                "    user: gw\n",
                "c.yaml:4: deployment.etcd.user is set without a password",
            ),
            (
                "    password: pw\n",
                "c.yaml:4: deployment.etcd.password is set without a user",
            ),
        ] {
            let e = GatewayConfig::parse(&format!("{base}{rest}"), "c.yaml").unwrap_err();
            assert!(e.0.starts_with(says), "{e}");
        }
    }

    #[test]
    fn a_missing_field_is_said_as_apisix_says_it() {
        let y = "wasm:\n  plugins:\n    - name: a\n      file: a.wasm\n";
        let e = GatewayConfig::parse(y, "c.yaml").unwrap_err();
        assert!(e.0.contains("property \"priority\" is required"), "{e}");
    }

    #[test]
    fn prometheus_attr_defaults_and_checks() {
        let c = GatewayConfig::parse(EMBEDDED_DEFAULT, "conf/config.yaml").unwrap();
        let p = &c.plugin_attr.prometheus;
        assert_eq!(p.export_addr.addr().to_string(), "127.0.0.1:9091");
        assert_eq!(p.export_uri, "/apisix/prometheus/metrics");
        assert!(p.enable_export_server);
        let y = "plugin_attr:\n  prometheus:\n    export_uri: metrics\n";
        assert_refused_at(y, 3, "export_uri");
        let y = "plugin_attr:\n  prometheus:\n    metric_prefix: \"my-gw\"\n";
        let e = GatewayConfig::parse(y, "c.yaml").unwrap_err();
        assert!(e.0.contains("metric_prefix"), "{e}");
        // Another plugin's settings: accepted, and said to be ignored.
        let y = "plugin_attr:\n  log-rotate:\n    interval: 3600\n";
        let c = GatewayConfig::parse(y, "c.yaml").unwrap();
        assert!(
            c.warnings()[0].contains("plugin_attr.log-rotate"),
            "{:?}",
            c.warnings()
        );
    }

    #[test]
    fn empty_file_is_defaults() {
        assert_eq!(
            GatewayConfig::parse("# nothing\n", "x").unwrap(),
            GatewayConfig::default()
        );
    }

    #[test]
    fn unknown_key_names_file_and_line() {
        let y = "apisix:\n  node_listen: [9080]\n  node_lisen: 1\n";
        assert_refused_at(y, 3, "node_lisen");
    }

    #[test]
    fn errors_name_the_line_of_the_value_at_fault() {
        // The second declaration, not the first mention of the name (here a comment's).
        let y = "# echo: the echo plugin\nwasm:\n  plugins:\n    - {name: echo, priority: 1, file: e.wasm}\n    - name: echo\n      priority: 2\n      file: e.wasm\n";
        assert_refused_at(y, 5, "declared twice");
        // shm_size, not the plugin_shm_size line above it.
        let y = "wasmgate:\n  plugin_shm_size: 16m\n  shm_size: 1k\n";
        assert_refused_at(y, 3, "wasmgate.shm_size");
        // The second of two equal ports.
        let y = "apisix:\n  node_listen:\n    - 9080\n    - 9081\n    - 9080\n";
        assert_refused_at(y, 5, "listed twice");
    }

    #[test]
    fn pause_timeout_defaults_and_must_be_positive() {
        let y = "wasm:\n  plugins:\n    - {name: a, priority: 1, file: a.wasm}\n";
        let c = GatewayConfig::parse(y, "c.yaml").unwrap();
        assert_eq!(c.wasm.plugins[0].pause_timeout, Duration::from_secs(60));
        let y =
            "wasm:\n  plugins:\n    - {name: a, priority: 1, file: a.wasm, pause_timeout: 0s}\n";
        assert_refused_at(y, 3, "pause_timeout must be above 0");
    }

    #[test]
    fn missing_plugin_priority_is_named() {
        let y = "wasm:\n  plugins:\n    - name: a\n      file: a.wasm\n";
        assert_refused_at(y, 3, "priority");
    }

    #[test]
    fn apisix_keys_that_would_turn_the_admin_api_off_are_refused_by_name() {
        assert_refused_at(
            "deployment:\n  role: data_plane\n",
            2,
            "data_plane is not supported",
        );
        assert_refused_at("deployment:\n  role: edge\n", 2, "unknown role \"edge\"");
        assert_refused_at("apisix:\n  enable_admin: false\n", 2, "enable_admin: false");
        let y = "deployment:\n  role: traditional\napisix:\n  enable_admin: true\n";
        assert!(GatewayConfig::parse(y, "c.yaml").is_ok());
    }

    #[test]
    fn one_listen_port_alone_as_apisix_2_writes_it() {
        let c = GatewayConfig::parse("apisix:\n  node_listen: 9081\n", "c.yaml").unwrap();
        assert_eq!(c.apisix.node_listen.len(), 1);
        assert_eq!(c.apisix.node_listen[0].0.port(), 9081);
        assert_refused_at("apisix:\n  node_listen: abc\n", 2, "node_listen");
    }

    #[test]
    fn a_key_has_one_role() {
        let y = "deployment:\n  admin:\n    admin_key:\n      - {name: a, key: k1, role: viewer}\n      - {name: b, key: k1, role: admin}\n";
        let e = GatewayConfig::parse(y, "c.yaml").unwrap_err();
        assert!(e.0.contains("same key"), "{e}");
    }

    #[test]
    fn listeners_need_ports_of_their_own() {
        let clash = "apisix:\n  node_listen: [9180]\ndeployment:\n  admin:\n    admin_listen: {ip: 127.0.0.1, port: 9180}\n";
        let e = GatewayConfig::parse(clash, "c.yaml").unwrap_err();
        assert!(e.0.contains("both want port 9180"), "{e}");
        let zero = "deployment:\n  admin:\n    admin_listen: {ip: 127.0.0.1, port: 0}\n";
        let e = GatewayConfig::parse(zero, "c.yaml").unwrap_err();
        assert!(e.0.contains("admin_listen: port 0"), "{e}");
        // Another address on the same port is no clash, nor the other family's wildcard.
        let apart =
            "apisix:\n  node_listen: [{ip: 127.0.0.2, port: 9180}, {ip: \"::\", port: 9180}]\n";
        assert!(GatewayConfig::parse(apart, "c.yaml").is_ok());
        let wildcard = "apisix:\n  node_listen: [9080, {ip: 127.0.0.1, port: 9080}]\n";
        let e = GatewayConfig::parse(wildcard, "c.yaml").unwrap_err();
        assert!(e.0.contains("both want port 9080"), "{e}");
    }

    #[test]
    fn duplicate_plugin_is_refused() {
        let y = "wasm:\n  plugins:\n    - name: a\n      priority: 1\n      file: a.wasm\n    - name: a\n      priority: 2\n      file: b.wasm\n";
        let e = GatewayConfig::parse(y, "c.yaml").unwrap_err();
        assert!(e.0.contains("declared twice"), "{e}");
    }

    #[test]
    fn listen_forms() {
        let y = "apisix:\n  node_listen:\n    - 9080\n    - \"127.0.0.1:9081\"\n    - {ip: \"::1\", port: 9082}\n";
        let c = GatewayConfig::parse(y, "c").unwrap();
        let v: Vec<String> = c
            .apisix
            .node_listen
            .iter()
            .map(|l| l.0.to_string())
            .collect();
        assert_eq!(v, ["0.0.0.0:9080", "127.0.0.1:9081", "[::1]:9082"]);
        // APISIX's `enable_http2: false` is taken; a misspelt key is not (it would leave the
        // listener on every address), nor HTTP/2, nor an item without a port.
        let y = "apisix:\n  node_listen:\n    - {port: 9080, enable_http2: false}\n";
        assert!(GatewayConfig::parse(y, "c").is_ok());
        for (item, says) in [
            ("{addr: 127.0.0.1, port: 9080}", "unknown key \"addr\""),
            ("{ip: 127.0.0.1, port: 9080, enable_http2: true}", "HTTP/2"),
            ("{ip: 127.0.0.1}", "needs a port"),
        ] {
            let y = format!("apisix:\n  node_listen:\n    - {item}\n");
            let e = GatewayConfig::parse(&y, "c.yaml").unwrap_err();
            assert!(
                e.0.contains(says) && e.0.starts_with("c.yaml:3"),
                "{item}: {e}"
            );
        }
    }

    #[test]
    fn an_admin_body_limit_of_zero_is_refused() {
        let y = "deployment:\n  admin:\n    max_body_size: 0\n";
        assert_refused_at(y, 3, "at least 1 byte");
    }

    #[test]
    fn worker_processes_forms() {
        let c = GatewayConfig::parse("nginx_config:\n  worker_processes: 3\n", "c").unwrap();
        assert_eq!(c.nginx_config.worker_processes, WorkerProcesses::Count(3));
        assert!(GatewayConfig::parse("nginx_config:\n  worker_processes: 0\n", "c").is_err());
        assert!(GatewayConfig::parse("nginx_config:\n  worker_processes: many\n", "c").is_err());
        let e = GatewayConfig::parse("nginx_config:\n  worker_processes: 1.5\n", "c").unwrap_err();
        assert!(e.to_string().contains("a number from 1 to 1024"), "{e}");
    }
}
