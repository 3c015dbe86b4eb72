//! TLS to nodes (`scheme: https`): the client settings of each upstream, the CAs they trust,
//! and the handshake.
//!
//! As in APISIX (nginx's `proxy_ssl_verify off`), a node's certificate is checked only when
//! its upstream sets `tls.verify: true`; the handshake's signatures are checked either way.
//! The name sent (SNI) and checked is the host of the `Host` the request goes with, as
//! APISIX's `proxy_ssl_name $upstream_host`. The CAs come from
//! `apisix.ssl.ssl_trusted_certificate` (the system's store by default), read when the worker
//! compiles its first upstream with `tls.verify`: most workers never have one.

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, RootCertStore};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use wasmgate_shared::config::TrustedCas;
use wasmgate_shared::model::UpstreamTls;

/// Where this worker's trusted CAs come from (set once at start).
static TRUST: OnceLock<(PathBuf, TrustedCas)> = OnceLock::new();
/// The CAs, read on first use; an error says which file and why.
static ROOTS: OnceLock<Result<Arc<RootCertStore>, String>> = OnceLock::new();

/// Records where the CAs come from: the prefix that relative files are under, and
/// `apisix.ssl.ssl_trusted_certificate`.
pub fn configure(prefix: PathBuf, cas: TrustedCas) {
    let _ = TRUST.set((prefix, cas));
}

fn roots() -> Result<Arc<RootCertStore>, String> {
    ROOTS
        .get_or_init(|| {
            let (prefix, cas) = TRUST.get().cloned().unwrap_or_else(|| {
                let system = TrustedCas {
                    system: true,
                    files: Vec::new(),
                };
                (PathBuf::from("/"), system)
            });
            wasmgate_shared::tls::trusted_roots(&prefix, &cas).map(Arc::new)
        })
        .clone()
}

/// The client settings of an `https` upstream: its `tls` object made into rustls's
/// configuration. An error (no CA could be read, a client key rustls cannot use) fails the
/// upstream's connections with it, each one logged.
fn client_config(tls: Option<&UpstreamTls>) -> Result<Arc<ClientConfig>, String> {
    let verify = tls.is_some_and(UpstreamTls::verifies);
    let roots = verify.then(roots).transpose()?;
    wasmgate_shared::tls::upstream_client(roots, tls).map(Arc::new)
}

/// An `https` upstream's client settings, and a fingerprint of the `tls` object they were
/// made from: sessions opened with other settings are not its to reuse.
#[derive(Debug)]
pub struct Settings {
    pub config: Arc<ClientConfig>,
    fingerprint: u64,
}

impl Settings {
    /// The settings of `tls` (none: unverified, no client certificate).
    pub fn new(tls: Option<&UpstreamTls>) -> Result<Settings, String> {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        tls.map(|t| (t.verifies(), &t.client_cert, &t.client_key))
            .hash(&mut h);
        Ok(Settings {
            config: client_config(tls)?,
            fingerprint: h.finish(),
        })
    }

    /// What a new connection to a node needs for a request sent with `host`.
    pub fn handshake(&self, host: Option<&http::HeaderValue>, node_host: &str) -> Handshake {
        let name = server_name(host, node_host);
        let tag = session_tag(self.fingerprint, &name);
        Handshake {
            config: self.config.clone(),
            name,
            tag,
        }
    }
}

/// What a new connection's handshake needs: the upstream's settings and the name to send,
/// and the session's identity in the pool.
pub struct Handshake {
    pub config: Arc<ClientConfig>,
    pub name: ServerName<'static>,
    pub tag: Arc<str>,
}

/// The name a handshake sends and checks: the host of the request's `Host` (an IP address
/// is checked as one and sends no SNI); the node's own host when that is not a name.
/// A name is written in lower case and without a trailing dot, as certificates write it: a
/// client's `API.Example.com.` opens the same session as `api.example.com`.
pub fn server_name(host: Option<&http::HeaderValue>, node_host: &str) -> ServerName<'static> {
    let name = |h: &str| {
        let h = host_part(h);
        let h = h.strip_suffix('.').unwrap_or(h);
        ServerName::try_from(h.to_ascii_lowercase()).ok()
    };
    host.and_then(|h| h.to_str().ok())
        .and_then(name)
        .or_else(|| name(node_host))
        .unwrap_or_else(|| ServerName::try_from("invalid").expect("a valid DNS name"))
}

/// `host` of `host[:port]`, brackets taken off an IPv6 literal.
fn host_part(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match authority.rsplit_once(':') {
        // One colon: a port. More: an IPv6 literal without brackets.
        Some((h, p)) if !h.contains(':') && p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => authority,
    }
}

/// A TLS session's identity in the pool: the settings it was opened with and the name it was
/// opened for. A session is reused only for a request that would open the same one: with
/// other settings (`verify` on, another client certificate) or for another name it would
/// skip a check or show the wrong identity.
fn session_tag(fingerprint: u64, name: &ServerName<'_>) -> Arc<str> {
    let name = match name {
        ServerName::DnsName(d) => d.as_ref().to_string(),
        ServerName::IpAddress(ip) => std::net::IpAddr::from(*ip).to_string(),
        _ => String::new(),
    };
    Arc::from(format!("{fingerprint:016x} {name}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_name_is_the_host_of_the_host_header() {
        let v = |s: &'static str| http::HeaderValue::from_static(s);
        let name = |h: Option<&http::HeaderValue>, node: &str| match server_name(h, node) {
            ServerName::DnsName(d) => d.as_ref().to_string(),
            ServerName::IpAddress(ip) => format!("ip {}", std::net::IpAddr::from(ip)),
            _ => "?".into(),
        };
        assert_eq!(
            name(Some(&v("api.example.com:8443")), "10.0.0.1:443"),
            "api.example.com"
        );
        assert_eq!(
            name(Some(&v("127.0.0.1:9080")), "10.0.0.1:443"),
            "ip 127.0.0.1"
        );
        assert_eq!(name(Some(&v("[::1]:9080")), "10.0.0.1:443"), "ip ::1");
        assert_eq!(name(None, "node.internal:443"), "node.internal");
        // Not a name: the node's host instead.
        assert_eq!(
            name(Some(&v("bad name")), "node.internal:443"),
            "node.internal"
        );
    }
}
