//! TLS pieces the master (checking what is written) and the workers (serving it) share: the
//! one choice of crypto provider, and certificates with their keys read from PEM.

use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::sync::{Arc, OnceLock};

/// ring's algorithms, for every TLS session the gateway opens or accepts: ring builds with a
/// C compiler alone (aws-lc-rs, rustls's default, needs cmake and adds minutes to a cold
/// build) and covers the TLS 1.2 and 1.3 suites clients and nodes offer. rustls deprecates it
/// for lacking post-quantum key exchange (traffic recorded now, decrypted years later); the
/// choice is made here only, so that changing it is one line.
#[allow(deprecated)]
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// Largest certificate (with its chain) or key taken from an object.
pub const MAX_PEM: usize = 64 * 1024;

/// Which half of a certificate and key pair a problem is with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Half {
    Cert,
    Key,
}

/// A certificate chain and its private key, parsed.
pub struct Identity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    /// Both, ready to sign handshakes with.
    pub certified: Arc<CertifiedKey>,
}

/// Reads a PEM certificate chain (`cert`, the end-entity's certificate first) and its PEM
/// private key (PKCS#8, PKCS#1 or SEC1; stored encrypted with the keyring, or PEM). The key
/// must be one TLS can sign with and belong to
/// the certificate: caught when the object is written, a mismatch would otherwise fail every
/// handshake that uses it.
pub fn identity(cert: &str, key: &str) -> Result<Identity, (Half, String)> {
    if cert.len() > MAX_PEM {
        return Err((Half::Cert, format!("longer than {MAX_PEM} bytes")));
    }
    // A key stored encrypted is longer than its PEM (base64 of it): bounded before opening.
    if key.len() > MAX_PEM * 2 {
        return Err((Half::Key, format!("longer than {MAX_PEM} bytes")));
    }
    let chain = CertificateDer::pem_slice_iter(cert.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| (Half::Cert, format!("not a PEM certificate: {e}")))?;
    if chain.is_empty() {
        return Err((Half::Cert, "no PEM certificate in it".into()));
    }
    // Stored encrypted, as APISIX stores keys (`crate::keyring`); PEM is taken as it is.
    let key = crate::keyring::current()
        .open(key)
        .map_err(|why| (Half::Key, why))?;
    if key.len() > MAX_PEM {
        return Err((Half::Key, format!("longer than {MAX_PEM} bytes")));
    }
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).map_err(|e| {
        (
            Half::Key,
            format!("not a PEM private key (PKCS#8, PKCS#1 or SEC1): {e}"),
        )
    })?;
    let certified =
        CertifiedKey::from_der(chain.clone(), key.clone_key(), &provider()).map_err(|e| {
            (
                Half::Key,
                format!("cannot be used with its certificate: {e}"),
            )
        })?;
    Ok(Identity {
        chain,
        key,
        certified: Arc::new(certified),
    })
}

/// When the first certificate of `pem` is valid: its notBefore and notAfter, in Unix
/// seconds.
pub fn validity(pem: &str) -> Result<(i64, i64), String> {
    let der = CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .ok_or("no PEM certificate in it")?
        .map_err(|e| format!("not a PEM certificate: {e}"))?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let v = cert.validity();
    Ok((v.not_before.timestamp(), v.not_after.timestamp()))
}

/// What a client's certificate says of its holder, as nginx's `$ssl_client_*` variables and
/// Envoy's `connection.*_peer_certificate` attributes show it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Holder {
    /// The subject, in RFC 2253's form (`CN=alice,O=Example`: the most specific first).
    pub subject: String,
    /// The issuer, the same way.
    pub issuer: String,
    /// The serial number in hex, upper-case (nginx's `$ssl_client_serial`).
    pub serial: String,
    /// The first DNS name and the first URI among its subject alternative names.
    pub dns_san: Option<String>,
    pub uri_san: Option<String>,
}

/// The holder named by a certificate (DER); None when X.509 cannot read it.
pub fn holder(der: &[u8]) -> Option<Holder> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let sans = cert.subject_alternative_name().ok().flatten();
    let names = sans.map_or(&[][..], |s| s.value.general_names.as_slice());
    let dns_san = names.iter().find_map(|n| match n {
        GeneralName::DNSName(d) => Some(d.to_string()),
        _ => None,
    });
    let uri_san = names.iter().find_map(|n| match n {
        GeneralName::URI(u) => Some(u.to_string()),
        _ => None,
    });
    Some(Holder {
        subject: rfc2253(cert.subject()),
        issuer: rfc2253(cert.issuer()),
        serial: cert
            .raw_serial()
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect(),
        dns_san,
        uri_san,
    })
}

/// A name in RFC 2253's form: its RDNs last to first, joined with `,` (several values of one
/// RDN with `+`), the usual attributes by their short names, others by their OID, values
/// escaped; a value that is not text is `#` and its DER in hex.
fn rfc2253(name: &x509_parser::x509::X509Name<'_>) -> String {
    let rdns: Vec<String> = name
        .iter_rdn()
        .map(|rdn| {
            let avas: Vec<String> = rdn
                .iter()
                .map(|ava| {
                    let oid = ava.attr_type().to_id_string();
                    let key = match oid.as_str() {
                        "2.5.4.3" => "CN",
                        "2.5.4.7" => "L",
                        "2.5.4.8" => "ST",
                        "2.5.4.10" => "O",
                        "2.5.4.11" => "OU",
                        "2.5.4.6" => "C",
                        "2.5.4.9" => "STREET",
                        "2.5.4.5" => "serialNumber",
                        "0.9.2342.19200300.100.1.25" => "DC",
                        "0.9.2342.19200300.100.1.1" => "UID",
                        "1.2.840.113549.1.9.1" => "emailAddress",
                        other => other,
                    };
                    let value = match ava.as_str() {
                        Ok(s) => escape_dn_value(s),
                        Err(_) => {
                            let hex: String =
                                ava.as_slice().iter().map(|b| format!("{b:02x}")).collect();
                            format!("#{hex}")
                        }
                    };
                    format!("{key}={value}")
                })
                .collect();
            avas.join("+")
        })
        .collect();
    rdns.into_iter().rev().collect::<Vec<_>>().join(",")
}

/// RFC 2253's escapes: `,+"\<>;` anywhere, a leading `#` or space, a trailing space.
fn escape_dn_value(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let last = s.chars().count().saturating_sub(1);
    for (i, c) in s.chars().enumerate() {
        let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';')
            || (i == 0 && (c == '#' || c == ' '))
            || (i == last && c == ' ');
        if special {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The CAs a certificate is checked against: the system's store when `cas` asks for it, then
/// the files of `apisix.ssl.ssl_trusted_certificate` (relative to `prefix`).
pub fn trusted_roots(
    prefix: &std::path::Path,
    cas: &crate::config::TrustedCas,
) -> Result<rustls::RootCertStore, String> {
    let mut store = rustls::RootCertStore::empty();
    if cas.system {
        let found = rustls_native_certs::load_native_certs();
        for e in &found.errors {
            tracing::warn!("the system's CA store: {e}");
        }
        let (added, _) = store.add_parsable_certificates(found.certs);
        if added == 0 {
            tracing::warn!("the system's CA store has no certificate");
        }
    }
    for cert in cas.read_files(prefix)? {
        store
            .add(cert)
            .map_err(|e| format!("apisix.ssl.ssl_trusted_certificate: {e}"))?;
    }
    Ok(store)
}

/// The client side of a connection to an upstream's node: its certificate checked against
/// `roots` (None: not checked, though the handshake's signatures are), the upstream's client
/// certificate (`tls.client_cert`) shown to a node that asks for one, HTTP/1.1 said in the
/// handshake (a node that offers h2 must not pick it). An error names the field at fault.
pub fn upstream_client(
    roots: Option<Arc<rustls::RootCertStore>>,
    tls: Option<&crate::model::UpstreamTls>,
) -> Result<rustls::ClientConfig, String> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match roots {
        Some(roots) => builder.with_root_certificates(roots),
        None => builder
            .dangerous()
            .with_custom_certificate_verifier(unverified()),
    };
    let identity = tls
        .map(crate::model::UpstreamTls::client_identity)
        .transpose()
        .map_err(|(field, why)| format!("tls.{field}: {why}"))?
        .flatten();
    let mut config = match identity {
        Some(id) => builder
            .with_client_auth_cert(id.chain, id.key)
            .map_err(|e| format!("tls.client_cert: {e}"))?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// A verifier that takes any certificate, for settings that turn checking off.
pub fn unverified() -> Arc<Unverified> {
    Arc::new(Unverified(provider()))
}

/// Accepts any certificate (`tls.verify` off) while still checking that the node holds the
/// key of the one it showed.
#[derive(Debug)]
pub struct Unverified(Arc<CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls_pki_types::CertificateDer<'_>,
        _intermediates: &[rustls_pki_types::CertificateDer<'_>],
        _server_name: &rustls_pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn dn_values_are_escaped_as_rfc_2253_says() {
        use super::escape_dn_value as e;
        assert_eq!(e("alice"), "alice");
        assert_eq!(e("Example, Inc."), "Example\\, Inc.");
        assert_eq!(e("#1 a+b "), "\\#1 a\\+b\\ ");
        assert_eq!(e(" x"), "\\ x");
        assert_eq!(e(""), "");
    }
}
