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

/// The keys, in order; the first seals what is written, unless the keyring only reads (its
/// keys all came from `ssl.key_encrypt_salt`, with `data_encryption.keyring` empty).
#[derive(Clone, PartialEq, Eq)]
pub struct Keyring(Vec<[u8; 16]>, Seals);

/// Whether a keyring's first key seals what is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Seals {
    Yes,
    /// Keys are stored in clear; these keys only open what was sealed before.
    No,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Keyring({} keys)", self.0.len())
    }
}

/// The AES-128 key an entry is: its 16 bytes, or None.
pub fn key(entry: &str) -> Option<[u8; 16]> {
    <[u8; 16]>::try_from(entry.as_bytes()).ok()
}

impl Keyring {
    /// The keyring of `entries` (each 16 bytes; none: keys are stored in clear).
    pub fn new<S: AsRef<str>>(entries: &[S]) -> Result<Keyring, String> {
        let keys = entries.iter().enumerate().map(|(i, e)| {
            key(e.as_ref()).ok_or_else(|| {
                format!(
                    "entry {i} is {} bytes: AES-128 keys are 16 (APISIX's rule)",
                    e.as_ref().len()
                )
            })
        });
        keys.collect::<Result<_, _>>()
            .map(|k| Keyring(k, Seals::Yes))
    }

    /// This keyring, also opening (never sealing with) the 16-byte entries of `more` it does
    /// not have; the others are left out (see `ApisixSection::keyring`).
    pub fn reading_also<S: AsRef<str>>(mut self, more: &[S]) -> Keyring {
        if self.0.is_empty() {
            self.1 = Seals::No;
        }
        for k in more.iter().filter_map(|e| key(e.as_ref())) {
            if !self.0.contains(&k) {
                self.0.push(k);
            }
        }
        self
    }

    /// APISIX's default.
    pub fn apisix_default() -> Keyring {
        Keyring::new(&APISIX_DEFAULT).expect("16-byte entries")
    }

    /// `value` as it is to be stored, when that differs: PEM (leading blanks dropped)
    /// encrypted with the first key, and a key encrypted with a later key (a rotation)
    /// encrypted again with the first. None: keep it as it is (encrypted with the first key
    /// already, not a key this keyring opens, or an empty keyring).
    pub fn seal(&self, value: &str) -> Option<String> {
        if self.1 == Seals::No {
            return None;
        }
        let first = self.0.first()?;
        let pem = value.trim_start();
        let pem = match pem.starts_with("---") {
            true => Cow::Borrowed(pem),
            false => match self.open_with_index(value) {
                Some((i, pem)) if i > 0 => Cow::Owned(pem),
                _ => return None,
            },
        };
        let sealed = cbc::Encryptor::<aes::Aes128>::new(first.into(), first.into())
            .encrypt_padded_vec_mut::<Pkcs7>(pem.as_bytes());
        Some(base64::engine::general_purpose::STANDARD.encode(sealed))
    }

    /// The PEM of an encrypted value and the index of the key that opened it.
    fn open_with_index(&self, value: &str) -> Option<(usize, String)> {
        let sealed = base64::engine::general_purpose::STANDARD
            .decode(value.trim())
            .ok()?;
        self.0.iter().enumerate().find_map(|(i, key)| {
            let opened = cbc::Decryptor::<aes::Aes128>::new(key.into(), key.into())
                .decrypt_padded_vec_mut::<Pkcs7>(&sealed)
                .ok()?;
            let pem = String::from_utf8(opened).ok()?;
            pem.starts_with("---").then_some((i, pem))
        })
    }

    /// The PEM of a stored value: PEM as it is, else decrypted with the first key that opens
    /// it. The error never quotes the value.
    pub fn open<'a>(&self, value: &'a str) -> Result<Cow<'a, str>, String> {
        if value.trim_start().starts_with("---") {
            return Ok(Cow::Borrowed(value));
        }
        if base64::engine::general_purpose::STANDARD
            .decode(value.trim())
            .is_err()
        {
            return Err("neither PEM nor a key encrypted with the keyring (base64)".into());
        }
        if let Some((_, pem)) = self.open_with_index(value) {
            return Ok(Cow::Owned(pem));
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
    if let Ok(k) = config.apisix.keyring() {
        install(Arc::new(k));
    }
}

thread_local! {
    /// A keyring this thread checks with for a while ([`checking_with`]).
    static CHECKING: std::cell::RefCell<Option<Arc<Keyring>>> = const { std::cell::RefCell::new(None) };
}

/// The process's keyring: the installed one (or the one this thread checks with, see
/// [`checking_with`]), else APISIX's default.
pub fn current() -> Arc<Keyring> {
    if let Some(k) = CHECKING.with(|c| c.borrow().clone()) {
        return k;
    }
    let installed = CURRENT.read().unwrap_or_else(|p| p.into_inner()).clone();
    installed.unwrap_or_else(|| Arc::new(Keyring::apisix_default()))
}

/// Runs `f` with `keyring` as this thread's, then the process's again: a reload checks the
/// stored keys with its new keyring, and writes meanwhile keep sealing with the running one
/// until the reload applies.
pub fn checking_with<T>(keyring: Arc<Keyring>, f: impl FnOnce() -> T) -> T {
    struct Restore(Option<Arc<Keyring>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            CHECKING.with(|c| *c.borrow_mut() = self.0.take());
        }
    }
    let _restore = Restore(CHECKING.with(|c| c.borrow_mut().replace(keyring)));
    f()
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
        // A key sealed with a later key is sealed again with the first (a rotation); one
        // the keyring cannot open is left for the check to refuse.
        let resealed = rotated.seal(&sealed).unwrap();
        assert_eq!(rotated.open(&resealed).unwrap(), PEM);
        assert!(ring.open(&resealed).is_err());
        assert_eq!(other.seal(&sealed), None);
        // Leading blanks before the PEM: sealed all the same.
        let blank = format!("\n  {PEM}");
        assert_eq!(ring.open(&ring.seal(&blank).unwrap()).unwrap(), PEM);
        // A reload's check uses its keyring on this thread only, for as long as it runs.
        let seen = checking_with(Arc::new(other.clone()), current);
        assert_eq!(*seen, other);
        assert_ne!(*current(), other);
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
