//! Session resumption that works whichever worker a client reconnects to: rustls's session
//! store and ticket encryption backed by the segment every worker maps
//! ([`wasmgate_shared::tls_sessions`]), in place of rustls's per-process ones.
//!
//! Each SSL object (in one content) has its own `salt`: its sessions are stored under it, and
//! its ticket key is derived from the master's current key with it (HKDF-SHA256), so a ticket
//! made for one certificate never opens under another, nor after the object changed.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use ring::hkdf;
use rustls::server::{ProducesTickets, StoresServerSessions};
use std::sync::Arc;
use wasmgate_shared::tls::provider;
use wasmgate_shared::tls_sessions::{SessionShm, TICKET_KEY_LIFETIME};

/// One SSL object's sessions in the shared cache.
#[derive(Debug)]
pub struct SharedSessions {
    pub shm: Arc<SessionShm>,
    pub salt: u64,
}

impl StoresServerSessions for SharedSessions {
    fn put(&self, key: Vec<u8>, value: Vec<u8>) -> bool {
        self.shm.put(self.salt, &key, &value)
    }

    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.shm.get(self.salt, key)
    }

    fn take(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.shm.take(self.salt, key)
    }

    fn can_cache(&self) -> bool {
        true
    }
}

/// One SSL object's resumption tickets, sealed with a key every worker derives alike.
#[derive(Debug)]
pub struct SharedTickets {
    pub shm: Arc<SessionShm>,
    pub salt: u64,
}

/// A ticket: the key epoch (4 bytes, little-endian), the nonce, the sealed session and tag.
const EPOCH_LEN: usize = 4;

impl SharedTickets {
    /// The key of epoch `epoch` for this object, from the master's key `secret`.
    fn key(&self, secret: &[u8; 32], epoch: u32) -> Option<LessSafeKey> {
        let info = [&self.salt.to_le_bytes()[..], &epoch.to_le_bytes()];
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, b"wasmgate tls ticket").extract(secret);
        let okm = prk.expand(&info, &CHACHA20_POLY1305).ok()?;
        let mut bytes = [0u8; 32];
        okm.fill(&mut bytes).ok()?;
        let key = UnboundKey::new(&CHACHA20_POLY1305, &bytes).ok();
        bytes.fill(0);
        key.map(LessSafeKey::new)
    }

    fn aad(&self, epoch: u32) -> [u8; 12] {
        let mut aad = [0u8; 12];
        aad[..4].copy_from_slice(&epoch.to_le_bytes());
        aad[4..].copy_from_slice(&self.salt.to_le_bytes());
        aad
    }
}

impl ProducesTickets for SharedTickets {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        TICKET_KEY_LIFETIME.as_secs() as u32
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        let keys = self.shm.ticket_keys()?;
        let epoch = keys.epoch as u32;
        let key = self.key(&keys.current, epoch)?;
        let mut nonce = [0u8; NONCE_LEN];
        provider().secure_random.fill(&mut nonce).ok()?;
        let mut sealed = plain.to_vec();
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(self.aad(epoch)),
            &mut sealed,
        )
        .ok()?;
        let mut ticket = Vec::with_capacity(EPOCH_LEN + NONCE_LEN + sealed.len());
        ticket.extend_from_slice(&epoch.to_le_bytes());
        ticket.extend_from_slice(&nonce);
        ticket.extend_from_slice(&sealed);
        Some(ticket)
    }

    fn decrypt(&self, ticket: &[u8]) -> Option<Vec<u8>> {
        let (epoch, rest) = ticket.split_first_chunk::<EPOCH_LEN>()?;
        let (nonce, sealed) = rest.split_first_chunk::<NONCE_LEN>()?;
        let epoch = u32::from_le_bytes(*epoch);
        let keys = self.shm.ticket_keys()?;
        let current = keys.epoch as u32;
        // The current key, or the one before it; older keys are erased.
        let secret = match current.wrapping_sub(epoch) {
            0 => keys.current,
            1 => keys.previous?,
            _ => return None,
        };
        let key = self.key(&secret, epoch)?;
        let mut open = sealed.to_vec();
        let len = key
            .open_in_place(
                Nonce::assume_unique_for_key(*nonce),
                Aad::from(self.aad(epoch)),
                &mut open,
            )
            .ok()?
            .len();
        open.truncate(len);
        Some(open)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tickets_open_in_another_process_with_the_same_salt_only() {
        let shm = Arc::new(SessionShm::create().unwrap());
        let other = SessionShm::open(shm.fd().try_clone_to_owned().unwrap()).unwrap();
        let mine = SharedTickets {
            shm: shm.clone(),
            salt: 7,
        };
        let theirs = SharedTickets {
            shm: Arc::new(other),
            salt: 7,
        };
        let ticket = mine.encrypt(b"a session").unwrap();
        assert!(!ticket.windows(9).any(|w| w == b"a session"));
        assert_eq!(theirs.decrypt(&ticket).as_deref(), Some(&b"a session"[..]));
        let stranger = SharedTickets {
            shm: shm.clone(),
            salt: 8,
        };
        assert_eq!(stranger.decrypt(&ticket), None);
        // A changed byte, a cut ticket, garbage: nothing.
        let mut bad = ticket.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert_eq!(theirs.decrypt(&bad), None);
        assert_eq!(theirs.decrypt(&ticket[..10]), None);
        assert_eq!(theirs.decrypt(b""), None);
        // After one rotation the ticket still opens; after two it does not.
        shm.rotate_ticket_keys().unwrap();
        assert_eq!(theirs.decrypt(&ticket).as_deref(), Some(&b"a session"[..]));
        let newer = mine.encrypt(b"newer").unwrap();
        shm.rotate_ticket_keys().unwrap();
        assert_eq!(theirs.decrypt(&ticket), None);
        assert_eq!(theirs.decrypt(&newer).as_deref(), Some(&b"newer"[..]));
    }
}
