//! The one type that holds a secret's plaintext.

use std::fmt;

use zeroize::Zeroizing;

/// A secret's plaintext bytes: zeroed when dropped, redacted in `Debug`, and
/// deliberately without `Display`, `Clone` or `Serialize`, so a value cannot
/// reach a log line, an error message or the audit log by accident.
pub struct SecretValue(Zeroizing<Vec<u8>>);

impl SecretValue {
    pub fn new(bytes: Zeroizing<Vec<u8>>) -> Self {
        SecretValue(bytes)
    }

    /// The plaintext. Callers keep what they derive from it in `Zeroizing`
    /// buffers too.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretValue([redacted {} bytes])", self.0.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_redacts() {
        let v = SecretValue::new(Zeroizing::new(b"canary-4242".to_vec()));
        let shown = format!("{v:?} {v:#?}");
        assert!(!shown.contains("canary"), "{shown}");
        assert!(shown.contains("redacted 11 bytes"));
    }
}
