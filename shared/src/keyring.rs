//! APISIX's `apisix.data_encryption.keyring`: private keys (an SSL object's `key` and `keys`,
//! an upstream's `tls.client_key`) are stored encrypted, as APISIX stores them, so that the
//! Admin API's answers and etcd hold no key in clear, and keys APISIX wrote into a shared etcd
//! can be read.
//!
//! APISIX's scheme, kept for compatibility: AES-128-CBC with PKCS#7 padding, each keyring
//! entry (16 bytes) both the key and the IV, the result in base64. Writes use the first
//! entry; reads try each in turn (put a new key first to rotate, keep the old one after it).
//! A value that starts with `---` is PEM and used as it is. The fixed IV makes equal keys
//! encrypt alike: this keeps keys out of sight, it does not protect them from someone who
//! holds the keyring, which every node's config.yaml does.

use aes::cipher::block_padding::Pkcs7;
use aes::cipher::{BlockDecryptMut, BlockEncryptMut, KeyIvInit};
use base64::Engine;
use std::borrow::Cow;
use std::sync::{Arc, RwLock};

/// APISIX 3's default keyring (its config-default.yaml): what an installation that never set
/// one encrypted its keys with. The second is APISIX 2's default `ssl.key_encrypt_salt`.
pub const APISIX_DEFAULT: [&str; 2] = ["qeddd145sfvddff3", "edd1c9f0985e76a2"];

/// The keys, in order.
#[derive(Clone, PartialEq, Eq)]
pub struct Keyring(Vec<[u8; 16]>);

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Keyring({} keys)", self.0.len())
    }
}

impl Keyring {
    /// The keyring of `entries` (each 16 bytes; none: keys are stored in clear).
    pub fn new<S: AsRef<str>>(entries: &[S]) -> Result<Keyring, String> {
        let keys = entries.iter().enumerate().map(|(i, e)| {
            <[u8; 16]>::try_from(e.as_ref().as_bytes()).map_err(|_| {
                format!(
                    "entry {i} is {} bytes: AES-128 keys are 16 (APISIX's rule)",
                    e.as_ref().len()
                )
            })
        });
        keys.collect::<Result<_, _>>().map(Keyring)
    }

    /// APISIX's default.
    pub fn apisix_default() -> Keyring {
        Keyring::new(&APISIX_DEFAULT).expect("16-byte entries")
    }

    /// `value` as stored: PEM encrypted with the first key; anything else (encrypted already)
    /// unchanged, and everything unchanged with an empty keyring.
    pub fn seal(&self, value: &str) -> Option<String> {
        let key = self.0.first()?;
        if !value.starts_with("---") {
            return None;
        }
        let sealed = cbc::Encryptor::<aes::Aes128>::new(key.into(), key.into())
            .encrypt_padded_vec_mut::<Pkcs7>(value.as_bytes());
        Some(base64::engine::general_purpose::STANDARD.encode(sealed))
    }

    /// The PEM of a stored value: PEM as it is, else decrypted with the first key that opens
    /// it. The error never quotes the value.
    pub fn open<'a>(&self, value: &'a str) -> Result<Cow<'a, str>, String> {
        if value.starts_with("---") || value.trim_start().starts_with("-----BEGIN") {
            return Ok(Cow::Borrowed(value));
        }
        let sealed = base64::engine::general_purpose::STANDARD
            .decode(value.trim())
            .map_err(|_| "neither PEM nor a key encrypted with the keyring (base64)".to_string())?;
        for key in &self.0 {
            let opened = cbc::Decryptor::<aes::Aes128>::new(key.into(), key.into())
                .decrypt_padded_vec_mut::<Pkcs7>(&sealed);
            if let Ok(pem) = opened.map(String::from_utf8) {
                match pem {
                    Ok(pem) if pem.starts_with("---") => return Ok(Cow::Owned(pem)),
                    _ => continue,
                }
            }
        }
        Err(match self.0.len() {
            0 => "encrypted, and apisix.data_encryption.keyring is empty".into(),
            n => format!(
                "encrypted with a key that is not in apisix.data_encryption.keyring ({n} tried): \
                 list the key it was written with"
            ),
        })
    }
}

static CURRENT: RwLock<Option<Arc<Keyring>>> = RwLock::new(None);

/// Makes `keyring` the process's (at start, and the master's at each reload).
pub fn install(keyring: Arc<Keyring>) {
    *CURRENT.write().unwrap_or_else(|p| p.into_inner()) = Some(keyring);
}

/// Installs the keyring `config` names (checked when it was loaded).
pub fn install_from(config: &crate::config::GatewayConfig) {
    if let Ok(k) = config.apisix.data_encryption.keyring() {
        install(Arc::new(k));
    }
}

/// The process's keyring: the installed one, else APISIX's default.
pub fn current() -> Arc<Keyring> {
    let installed = CURRENT.read().unwrap_or_else(|p| p.into_inner()).clone();
    installed.unwrap_or_else(|| Arc::new(Keyring::apisix_default()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PEM: &str =
        "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIP\n-----END PRIVATE KEY-----\n";

    #[test]
    fn keys_sealed_with_the_first_key_open_with_any_keyring_that_has_it() {
        let ring = Keyring::apisix_default();
        let sealed = ring.seal(PEM).unwrap();
        assert!(!sealed.contains("PRIVATE"));
        assert_eq!(ring.open(&sealed).unwrap(), PEM);
        // Rotation: a new key first, the old one after it.
        let rotated = Keyring::new(&["0123456789abcdef", APISIX_DEFAULT[0]]).unwrap();
        assert_eq!(rotated.open(&sealed).unwrap(), PEM);
        assert_ne!(rotated.seal(PEM).unwrap(), sealed);
        // Without the key: an error that quotes nothing of the value.
        let other = Keyring::new(&["fedcba9876543210"]).unwrap();
        let e = other.open(&sealed).unwrap_err();
        assert!(
            e.contains("not in apisix.data_encryption.keyring") && !e.contains(&sealed[..8]),
            "{e}"
        );
        assert!(Keyring::new::<&str>(&[]).unwrap().open(&sealed).is_err());
        // PEM stays as it is; sealing what is sealed already changes nothing.
        assert_eq!(other.open(PEM).unwrap(), PEM);
        assert_eq!(ring.seal(&sealed), None);
        assert_eq!(Keyring::new::<&str>(&[]).unwrap().seal(PEM), None);
        assert!(ring
            .open("not base64 !")
            .unwrap_err()
            .contains("neither PEM"));
    }

    #[test]
    fn an_apisix_encrypted_key_opens() {
        // What APISIX's `aes_encrypt_pkey` makes of "---x\n" with its default keyring's first
        // key (AES-128-CBC, the key as IV, PKCS#7, base64), computed independently with
        // `openssl enc -aes-128-cbc -K 71656464643134357366766464666633
        // -iv 71656464643134357366766464666633 -base64`.
        let ring = Keyring::apisix_default();
        assert_eq!(ring.open(APISIX_SEALED).unwrap(), "---x\n");
        assert_eq!(ring.seal("---x\n").unwrap(), APISIX_SEALED);
    }

    const APISIX_SEALED: &str = "Q+NXvvjRmHf1DzGEoIbIsw==";

    #[test]
    fn entries_must_be_sixteen_bytes() {
        let e = Keyring::new(&["short"]).unwrap_err();
        assert!(e.contains("entry 0 is 5 bytes"), "{e}");
        assert_eq!(
            format!("{:?}", Keyring::apisix_default()),
            "Keyring(2 keys)"
        );
    }
}
