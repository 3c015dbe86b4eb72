//! SSL objects: the certificates the TLS listener (`apisix.ssl`) shows clients, chosen by the
//! name a client asks for (SNI), as APISIX's `/apisix/admin/ssls`.

use super::common::{Id, Labels};
use serde::{Deserialize, Serialize};

/// Most names one SSL object may serve.
const MAX_SNIS: usize = 1024;

/// An SSL object: a certificate and its key (more pairs in `certs`/`keys`, e.g. an ECDSA one
/// beside an RSA one) for the names in `snis`.
#[derive(Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Ssl {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Id>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desc: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<Labels>,
    /// `server` (the default): a certificate shown to clients. APISIX's `client` kind (a
    /// certificate for mTLS to nodes) is refused: upstreams carry theirs in `tls`.
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// The certificate (PEM), its chain after it.
    #[serde(default)]
    pub cert: String,
    /// Its private key (PEM).
    #[serde(default)]
    pub key: String,
    /// More certificates, each with the key at the same place in `keys`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certs: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys: Option<Vec<String>>,
    /// The names it serves: `example.com`, or `*.example.com` for every name under it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snis: Option<Vec<String>>,
    /// One name (APISIX 2's form of `snis`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sni: Option<String>,
    /// 1 in use (default), 0 kept but not served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u8>,
    /// TLS versions offered to clients that reach it (`TLSv1.2`, `TLSv1.3`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssl_protocols: Option<Vec<String>>,
    /// Client certificates (mTLS from clients): the CAs they must chain to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<SslClient>,
    /// The certificate's validity, filled by the Admin API from `cert` when written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validity_start: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validity_end: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub create_time: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_time: Option<u64>,
}

/// APISIX's `client` of an SSL object: clients of its names must show a certificate issued
/// by `ca`, except, when `skip_mtls_uri_regex` is set, for the paths it matches.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SslClient {
    /// The CAs (PEM, one or more) a client's certificate must chain to.
    #[serde(default)]
    pub ca: String,
    /// The most intermediate CAs between a client's certificate and a CA of `ca` (nginx's
    /// `ssl_verify_depth`, as OpenSSL counts it; APISIX's default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub depth: Option<u32>,
    /// Paths (regular expressions matched against the path without its query, as APISIX's)
    /// served to clients without a certificate; for any other path such a client is answered
    /// 400. Unset: the handshake itself needs a certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skip_mtls_uri_regex: Option<Vec<String>>,
}

/// Largest `client.depth` (OpenSSL's chains rarely pass a handful).
pub const MAX_CLIENT_DEPTH: u32 = 16;
/// Most patterns in `client.skip_mtls_uri_regex`.
const MAX_SKIP_PATTERNS: usize = 64;

/// `client.skip_mtls_uri_regex` compiled: the paths open to clients without a certificate.
#[derive(Debug)]
pub struct MtlsSkip(regex::RegexSet);

impl MtlsSkip {
    /// Whether `path` (without its query) is one of them.
    pub fn is_match(&self, path: &str) -> bool {
        self.0.is_match(path)
    }
}

impl SslClient {
    /// APISIX's default depth, 1, when unset.
    pub fn depth(&self) -> u32 {
        self.depth.unwrap_or(1)
    }

    /// The CAs, parsed, and as the handshake's trust anchors; the error names the field.
    pub fn roots(
        &self,
    ) -> Result<
        (
            Vec<rustls_pki_types::CertificateDer<'static>>,
            rustls::RootCertStore,
        ),
        String,
    > {
        use rustls_pki_types::pem::PemObject;
        if self.ca.len() > crate::tls::MAX_PEM {
            return Err(invalid(
                "client.ca",
                format!("longer than {} bytes", crate::tls::MAX_PEM),
            ));
        }
        let certs = rustls_pki_types::CertificateDer::pem_slice_iter(self.ca.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid("client.ca", format!("not a PEM certificate: {e}")))?;
        if certs.is_empty() {
            return Err(invalid("client.ca", "no PEM certificate in it"));
        }
        let mut store = rustls::RootCertStore::empty();
        for (i, c) in certs.iter().enumerate() {
            store.add(c.clone()).map_err(|e| {
                invalid(
                    "client.ca",
                    format!("certificate {i} is not one a CA can sign with: {e}"),
                )
            })?;
        }
        Ok((certs, store))
    }

    /// `skip_mtls_uri_regex` compiled (None: unset); the error names the pattern.
    pub fn skip(&self) -> Result<Option<MtlsSkip>, String> {
        let Some(list) = &self.skip_mtls_uri_regex else {
            return Ok(None);
        };
        if list.is_empty() {
            return Err(invalid(
                "client.skip_mtls_uri_regex",
                "must list at least one pattern",
            ));
        }
        if list.len() > MAX_SKIP_PATTERNS {
            return Err(invalid(
                "client.skip_mtls_uri_regex",
                format!("more than {MAX_SKIP_PATTERNS} patterns"),
            ));
        }
        let set = crate::model::vars::regex_set(list)
            .map_err(|e| invalid("client.skip_mtls_uri_regex", e))?;
        Ok(Some(MtlsSkip(set)))
    }

    fn check(&self) -> Result<(), String> {
        if self.ca.is_empty() {
            return Err(invalid("client", "property \"ca\" is required"));
        }
        self.roots()?;
        if self.depth() > MAX_CLIENT_DEPTH {
            return Err(invalid(
                "client.depth",
                format!("at most {MAX_CLIENT_DEPTH}"),
            ));
        }
        self.skip().map(drop)
    }
}

/// The private keys stay out of logs and panics.
impl std::fmt::Debug for Ssl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ssl")
            .field("id", &self.id)
            .field("snis", &self.names())
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

fn invalid(field: &str, why: impl std::fmt::Display) -> String {
    format!("invalid configuration: property \"{field}\" validation failed: {why}")
}

/// TLS versions a listener or an SSL object may name; TLSv1 and TLSv1.1 are not offered
/// (rustls has neither: both are deprecated by RFC 8996).
pub fn tls_version(v: &str) -> Result<&'static rustls::SupportedProtocolVersion, String> {
    match v {
        "TLSv1.2" => Ok(&rustls::version::TLS12),
        "TLSv1.3" => Ok(&rustls::version::TLS13),
        "TLSv1" | "TLSv1.1" => Err(format!(
            "{v} is not offered (deprecated by RFC 8996): use TLSv1.2 and TLSv1.3"
        )),
        _ => Err(format!("{v:?} is not a TLS version (TLSv1.2, TLSv1.3)")),
    }
}

impl Ssl {
    /// The names it serves, lower-cased (`snis`, or `sni`).
    pub fn names(&self) -> Vec<String> {
        let names = match (&self.snis, &self.sni) {
            (Some(list), _) => list.clone(),
            (None, Some(one)) => vec![one.clone()],
            (None, None) => Vec::new(),
        };
        names.into_iter().map(|n| n.to_ascii_lowercase()).collect()
    }

    /// Whether it is served (`status` 1, the default).
    pub fn enabled(&self) -> bool {
        self.status != Some(0)
    }

    /// Every certificate and key pair: `cert`/`key` first, then `certs`/`keys`.
    pub fn pairs(&self) -> impl Iterator<Item = (&str, &str)> {
        let more = self.certs.iter().flatten().zip(self.keys.iter().flatten());
        std::iter::once((self.cert.as_str(), self.key.as_str()))
            .chain(more.map(|(c, k)| (c.as_str(), k.as_str())))
    }

    /// The pairs parsed, each ready to sign handshakes; the error names the field.
    pub fn identities(&self) -> Result<Vec<crate::tls::Identity>, String> {
        self.pairs()
            .enumerate()
            .map(|(i, (cert, key))| {
                crate::tls::identity(cert, key).map_err(|(half, why)| {
                    let field = match (i, half) {
                        (0, crate::tls::Half::Cert) => "cert".to_string(),
                        (0, crate::tls::Half::Key) => "key".to_string(),
                        (i, crate::tls::Half::Cert) => format!("certs[{}]", i - 1),
                        (i, crate::tls::Half::Key) => format!("keys[{}]", i - 1),
                    };
                    invalid(&field, why)
                })
            })
            .collect()
    }

    /// Semantic checks beyond the types; the error is the complete `error_msg`.
    pub fn check(&self) -> Result<(), String> {
        match self.kind.as_deref() {
            None | Some("server") => {}
            Some("client") => {
                return Err(invalid(
                    "type",
                    "client SSL objects are not supported: give an upstream its client \
                     certificate in its tls.client_cert and tls.client_key",
                ))
            }
            Some(other) => return Err(invalid("type", format!("{other:?} is not server"))),
        }
        if let Some(client) = &self.client {
            client.check()?;
        }
        if self.cert.is_empty() {
            return Err("invalid configuration: property \"cert\" is required".into());
        }
        if self.key.is_empty() {
            return Err("invalid configuration: property \"key\" is required".into());
        }
        let (certs, keys) = (self.certs.as_deref(), self.keys.as_deref());
        if certs.map_or(0, <[String]>::len) != keys.map_or(0, <[String]>::len) {
            return Err(invalid("keys", "must list one key for each of certs"));
        }
        self.check_names()?;
        if let Some(versions) = &self.ssl_protocols {
            if versions.is_empty() {
                return Err(invalid("ssl_protocols", "must list at least one version"));
            }
            for v in versions {
                tls_version(v).map_err(|why| invalid("ssl_protocols", why))?;
            }
        }
        if !matches!(self.status, None | Some(0) | Some(1)) {
            return Err(invalid("status", "expected 0 or 1"));
        }
        self.identities().map(drop)
    }

    fn check_names(&self) -> Result<(), String> {
        let field = match (&self.snis, &self.sni) {
            (Some(_), Some(_)) => return Err("only one of sni or snis is allowed".into()),
            (None, None) => {
                return Err("invalid configuration: property \"snis\" is required".into())
            }
            (Some(_), None) => "snis",
            (None, Some(_)) => "sni",
        };
        let names = self.names();
        if names.is_empty() {
            return Err(invalid(field, "must list at least one name"));
        }
        if names.len() > MAX_SNIS {
            return Err(invalid(field, format!("more than {MAX_SNIS} names")));
        }
        for n in &names {
            if !valid_sni(n) {
                return Err(invalid(
                    field,
                    format!(
                        "{:?} is not a host name or *.<host name>",
                        super::shown_id(n)
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// A name an SSL object may serve: a DNS name, or `*.` and one (every name under it).
pub fn valid_sni(n: &str) -> bool {
    let host = n.strip_prefix("*.").unwrap_or(n);
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_host_names_or_wildcards() {
        for ok in ["example.com", "*.example.com", "a-b.c_d.io", "localhost"] {
            assert!(valid_sni(ok), "{ok}");
        }
        for bad in [
            "",
            "*.",
            "*",
            "a..b",
            "a.*.com",
            "exa mple.com",
            "*example.com",
            ".a",
        ] {
            assert!(!valid_sni(bad), "{bad}");
        }
    }

    #[test]
    fn versions_are_the_ones_offered() {
        assert!(tls_version("TLSv1.2").is_ok());
        assert!(tls_version("TLSv1.3").is_ok());
        assert!(tls_version("TLSv1.1").unwrap_err().contains("RFC 8996"));
        assert!(tls_version("SSLv3").is_err());
    }
}
