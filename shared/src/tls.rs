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
