//! Client certificates (mTLS from clients), as APISIX's `client` of an SSL object: the CAs a
//! client's certificate must chain to (`client.ca`), how many certificates may stand between
//! them (`client.depth`), and the paths open to clients without one
//! (`client.skip_mtls_uri_regex`: the handshake then asks for a certificate without
//! requiring it, and each request is checked).

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName};
use rustls::{Error, SignatureScheme};
use std::sync::Arc;
use wasmgate_shared::model::{MtlsSkip, SslClient};
use wasmgate_shared::tls::provider;
use wasmgate_wasm::state::PeerCert;

/// What an SSL object asks of its clients' certificates.
#[derive(Debug)]
pub struct Mtls {
    /// The handshake's check of the certificate.
    pub verifier: Arc<dyn ClientCertVerifier>,
    /// Paths open to clients that sent none; None: the handshake needs one.
    pub skip: Option<Arc<MtlsSkip>>,
}

impl Mtls {
    /// `client` made into the handshake's check; the error says why it cannot be.
    pub fn compile(client: &SslClient) -> Result<Mtls, String> {
        let (cas, roots) = client.roots()?;
        let skip = client.skip()?.map(Arc::new);
        let builder = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
        let builder = match skip {
            Some(_) => builder.allow_unauthenticated(),
            None => builder,
        };
        let inner = builder.build().map_err(|e| format!("client.ca: {e}"))?;
        let verifier = Arc::new(Depth {
            inner,
            cas,
            most: client.depth() as usize,
        });
        Ok(Mtls { verifier, skip })
    }
}

/// webpki's check, and `client.depth`: at most `most` intermediate CAs the client sends
/// besides its own certificate (a CA of `client.ca` it sends too is not counted), as
/// OpenSSL's verify depth (since 1.1.0): 1, APISIX's default, lets one intermediate stand
/// between the client's certificate and a CA of `client.ca`; 0 none.
#[derive(Debug)]
struct Depth {
    inner: Arc<dyn ClientCertVerifier>,
    cas: Vec<CertificateDer<'static>>,
    most: usize,
}

impl ClientCertVerifier for Depth {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let between = intermediates
            .iter()
            .filter(|c| !self.cas.iter().any(|ca| ca.as_ref() == c.as_ref()))
            .count();
        if between > self.most {
            let why = format!(
                "{between} intermediate certificates, more than client.depth ({})",
                self.most
            );
            return Err(Error::InvalidCertificate(CertificateError::Other(
                rustls::OtherError(Arc::new(std::io::Error::other(why))),
            )));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// What the variables and plugins show of the certificate a client showed: its digests
/// and whom it names (read once, at the handshake).
pub fn peer_cert(cert: &CertificateDer<'_>) -> PeerCert {
    let hex = |alg| {
        let digest = ring::digest::digest(alg, cert.as_ref());
        let bytes = digest.as_ref().iter();
        bytes.map(|b| format!("{b:02x}")).collect::<String>()
    };
    PeerCert {
        sha256: hex(&ring::digest::SHA256),
        sha1: hex(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY),
        holder: wasmgate_shared::tls::holder(cert.as_ref()),
    }
}
