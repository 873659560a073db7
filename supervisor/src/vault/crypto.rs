//! Sealing secrets at rest: AES-256-GCM under a data key (DEK) that is itself
//! stored wrapped by a key-encryption key (KEK) from a key source.
//!
//! **Invariant:** every ciphertext is bound to where it belongs through its
//! associated data (the secret's row id, name and version; for the DEK, the
//! vault id), so a ciphertext copied to another row or another vault fails to
//! open with [`CryptoError::Unauthentic`] — it never decrypts to a different
//! secret. Nonces are 96 random bits, fresh for every write.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use zeroize::Zeroizing;

pub const KEY_LEN: usize = 32;
pub const NONCE_LEN: usize = 12;

#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    /// The ciphertext, its nonce or its associated data do not match: the
    /// stored bytes were modified, moved, or sealed under another key.
    #[error("ciphertext does not authenticate")]
    Unauthentic,
    #[error("the system random number generator failed")]
    Random(#[source] getrandom::Error),
    #[error("a key must be {KEY_LEN} bytes, found {0}")]
    KeyLength(usize),
}

/// 32 random bytes, zeroed on drop.
pub fn random_key() -> Result<Zeroizing<[u8; KEY_LEN]>, CryptoError> {
    let mut k = Zeroizing::new([0u8; KEY_LEN]);
    getrandom::fill(k.as_mut()).map_err(CryptoError::Random)?;
    Ok(k)
}

/// `n` random bytes as lower-case hex; for identifiers.
pub fn random_hex(n: usize) -> Result<String, CryptoError> {
    let mut b = vec![0u8; n];
    getrandom::fill(&mut b).map_err(CryptoError::Random)?;
    Ok(hex::encode(b))
}

/// An AES-256-GCM key. The cipher state zeroizes itself on drop (the
/// `zeroize` feature of `aes-gcm`).
pub struct AeadKey(Aes256Gcm);

impl std::fmt::Debug for AeadKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AeadKey([redacted])")
    }
}

/// A sealed value: the nonce and the ciphertext with its tag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    pub nonce: Vec<u8>,
    pub ciphertext: Vec<u8>,
}

impl AeadKey {
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CryptoError> {
        if bytes.len() != KEY_LEN {
            return Err(CryptoError::KeyLength(bytes.len()));
        }
        Ok(AeadKey(Aes256Gcm::new(Key::<Aes256Gcm>::from_slice(bytes))))
    }

    pub fn seal(&self, plaintext: &[u8], aad: &[u8]) -> Result<Sealed, CryptoError> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).map_err(CryptoError::Random)?;
        let ciphertext = self
            .0
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad,
                },
            )
            .map_err(|_| CryptoError::Unauthentic)?;
        Ok(Sealed {
            nonce: nonce.to_vec(),
            ciphertext,
        })
    }

    pub fn open(&self, sealed: &Sealed, aad: &[u8]) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        if sealed.nonce.len() != NONCE_LEN {
            return Err(CryptoError::Unauthentic);
        }
        self.0
            .decrypt(
                Nonce::from_slice(&sealed.nonce),
                Payload {
                    msg: &sealed.ciphertext,
                    aad,
                },
            )
            .map(Zeroizing::new)
            .map_err(|_| CryptoError::Unauthentic)
    }
}

/// Associated data for a secret value: the row it lives in, its name and its
/// version, length-prefixed so no two tuples encode alike.
pub fn secret_aad(id: i64, name: &str, version: u32) -> Vec<u8> {
    let mut aad = b"zerolease/secret/v1\0".to_vec();
    aad.extend_from_slice(&id.to_be_bytes());
    aad.extend_from_slice(&(name.len() as u64).to_be_bytes());
    aad.extend_from_slice(name.as_bytes());
    aad.extend_from_slice(&version.to_be_bytes());
    aad
}

/// Associated data for the wrapped data key.
pub fn dek_aad(vault_id: &str) -> Vec<u8> {
    let mut aad = b"zerolease/dek/v1\0".to_vec();
    aad.extend_from_slice(vault_id.as_bytes());
    aad
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_round_trip_and_tamper() {
        let k = AeadKey::from_bytes(random_key().unwrap().as_ref()).unwrap();
        let aad = secret_aad(1, "npm", 1);
        let s = k.seal(b"value", &aad).unwrap();
        assert_eq!(&k.open(&s, &aad).unwrap()[..], b"value");

        let mut flipped = s.clone();
        flipped.ciphertext[0] ^= 1;
        assert!(matches!(
            k.open(&flipped, &aad),
            Err(CryptoError::Unauthentic)
        ));
        assert!(k.open(&s, &secret_aad(2, "npm", 1)).is_err());
        assert!(k.open(&s, &secret_aad(1, "npn", 1)).is_err());
        assert!(k.open(&s, &secret_aad(1, "npm", 2)).is_err());

        let other = AeadKey::from_bytes(random_key().unwrap().as_ref()).unwrap();
        assert!(other.open(&s, &aad).is_err());
    }

    #[test]
    fn nonces_are_fresh() {
        let k = AeadKey::from_bytes(&[7u8; 32]).unwrap();
        let a = k.seal(b"x", b"").unwrap();
        let b = k.seal(b"x", b"").unwrap();
        assert_ne!(a.nonce, b.nonce);
        assert_ne!(a.ciphertext, b.ciphertext);
    }

    #[test]
    fn aad_is_unambiguous() {
        assert_ne!(secret_aad(1, "ab", 1), secret_aad(1, "a", 1));
        assert_ne!(secret_aad(1, "a\0\0\0\0", 1), secret_aad(1, "a", 0));
    }
}
