//! Secret-carrying byte and string types.
//!
//! **Invariant:** a secret's plaintext is never printed. [`SecretBytes`] and
//! [`SecretString`] have no `Display`, their `Debug` prints `[redacted …]`,
//! and their memory is zeroized on drop. Errors raised while decoding them
//! never quote the input.
//!
//! On the wire both are a base64 string (standard alphabet, padded), so any
//! bytes — quotes, newlines, NUL, `$(...)` — round-trip exactly and never need
//! JSON escaping. Because base64 text has no characters that JSON escapes,
//! `serde_json::from_slice` hands the decoder a slice borrowed from the frame
//! buffer (which is itself zeroized) instead of an unzeroized copy.
//!
//! [`Bytes`] uses the same encoding for data that is not secret by contract
//! (agent output) but may still contain anything; its `Debug` prints only the
//! length, so a log line never reproduces what an agent printed.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::de::{self, Deserializer, Visitor};
use serde::ser::Serializer;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

/// Secret bytes (file contents, key material). Zeroized on drop.
///
/// Equality is not constant-time; it exists for tests and must not be used to
/// check a guess against a secret.
#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct SecretBytes(Vec<u8>);

impl SecretBytes {
    /// Wraps `bytes`; the vector is zeroized when the value is dropped.
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }

    /// The plaintext. Callers must not log or copy it into unzeroized memory.
    pub fn expose_secret(&self) -> &[u8] {
        &self.0
    }

    /// Number of plaintext bytes (not secret in this protocol).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the secret is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<Vec<u8>> for SecretBytes {
    fn from(bytes: Vec<u8>) -> Self {
        Self::new(bytes)
    }
}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[redacted {} bytes]", self.0.len())
    }
}

impl serde::Serialize for SecretBytes {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serialize_base64(&self.0, serializer)
    }
}

impl<'de> serde::Deserialize<'de> for SecretBytes {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer
            .deserialize_str(Base64Visitor)
            .map(|mut bytes| Self(std::mem::take(&mut *bytes)))
    }
}

/// A secret UTF-8 string (password, token). Zeroized on drop.
///
/// Equality is not constant-time; see [`SecretBytes`].
#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop)]
pub struct SecretString(String);

impl SecretString {
    /// Wraps `value`; the string is zeroized when the value is dropped.
    pub fn new(value: String) -> Self {
        Self(value)
    }

    /// The plaintext. Callers must not log or copy it into unzeroized memory.
    pub fn expose_secret(&self) -> &str {
        &self.0
    }
}

impl From<String> for SecretString {
    fn from(value: String) -> Self {
        Self::new(value)
    }
}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl serde::Serialize for SecretString {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serialize_base64(self.0.as_bytes(), serializer)
    }
}

impl<'de> serde::Deserialize<'de> for SecretString {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let mut bytes = deserializer.deserialize_str(Base64Visitor)?;
        match String::from_utf8(std::mem::take(&mut *bytes)) {
            Ok(value) => Ok(Self(value)),
            Err(err) => {
                // The rejected bytes are still plaintext: wipe them.
                err.into_bytes().zeroize();
                Err(de::Error::custom("secret string is not valid UTF-8"))
            }
        }
    }
}

/// Bytes that are not secret by contract but may contain anything (agent
/// output). Base64 on the wire; `Debug` prints only the length.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Bytes(pub Vec<u8>);

impl fmt::Debug for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{} bytes]", self.0.len())
    }
}

impl From<Vec<u8>> for Bytes {
    fn from(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }
}

impl serde::Serialize for Bytes {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serialize_base64(&self.0, serializer)
    }
}

impl<'de> serde::Deserialize<'de> for Bytes {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let mut bytes = deserializer.deserialize_str(Base64Visitor)?;
        Ok(Self(std::mem::take(&mut *bytes)))
    }
}

/// Encodes into a zeroizing buffer sized up front, so no reallocation leaves
/// a partial copy of the encoded secret behind.
fn serialize_base64<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
    let len = base64::encoded_len(bytes.len(), true)
        .ok_or_else(|| serde::ser::Error::custom("secret too large to encode"))?;
    let mut buf = Zeroizing::new(vec![0u8; len]);
    let written = STANDARD
        .encode_slice(bytes, &mut buf[..])
        .map_err(|_| serde::ser::Error::custom("base64 encoding failed"))?;
    let text = std::str::from_utf8(&buf[..written])
        .map_err(|_| serde::ser::Error::custom("base64 output is not UTF-8"))?;
    serializer.serialize_str(text)
}

/// Decodes base64 into a zeroizing buffer. Error messages never include the
/// input: a mistyped secret must not end up in a log line.
struct Base64Visitor;

impl Visitor<'_> for Base64Visitor {
    type Value = Zeroizing<Vec<u8>>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a base64 string")
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<Self::Value, E> {
        let mut buf = Zeroizing::new(vec![0u8; base64::decoded_len_estimate(text.len())]);
        let len = STANDARD
            .decode_slice(text, &mut buf[..])
            .map_err(|_| E::custom("invalid base64 in a bytes field"))?;
        buf.truncate(len);
        Ok(buf)
    }

    fn visit_string<E: de::Error>(self, text: String) -> Result<Self::Value, E> {
        let text = Zeroizing::new(text);
        self.visit_str(&text)
    }

    // Anything that is not a string is reported by serde's default
    // `invalid_type` error, which names only the JSON type, never a value
    // of a string.
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_is_redacted() {
        let bytes = SecretBytes::new(b"canary-bytes".to_vec());
        let string = SecretString::new("canary-string".to_owned());
        assert_eq!(format!("{bytes:?}"), "[redacted 12 bytes]");
        assert_eq!(format!("{string:?}"), "[redacted]");
        assert_eq!(format!("{:?}", Bytes(b"canary".to_vec())), "[6 bytes]");
    }

    #[test]
    fn serialises_as_padded_base64() {
        let json = serde_json::to_string(&SecretBytes::new(b"a\0\"\n".to_vec())).unwrap();
        assert_eq!(json, "\"YQAiCg==\"");
        let json = serde_json::to_string(&SecretString::new(String::new())).unwrap();
        assert_eq!(json, "\"\"");
    }

    #[test]
    fn decodes_exact_bytes() {
        let nasty: &[u8] = b"'\"`$(rm -rf /)`\n\r\0\\x\xff";
        let json = serde_json::to_vec(&SecretBytes::new(nasty.to_vec())).unwrap();
        let back: SecretBytes = serde_json::from_slice(&json).unwrap();
        assert_eq!(back.expose_secret(), nasty);
    }

    #[test]
    fn decoding_errors_do_not_quote_input() {
        // Each case is an invalid encoding containing a recognisable canary.
        let cases = [
            "\"canary!!\"",         // bad alphabet
            "\"Y2FuYXJ5\"",         // valid base64 ...
            "\"Y2FuYXJ5=\"",        // bad padding
            "\"/w==\"",             // valid base64 but not UTF-8 (for SecretString)
            "\"Y2FuYXJ5\\u0000!\"", // escaped NUL, then garbage
        ];
        for case in cases {
            if let Err(err) = serde_json::from_str::<SecretString>(case) {
                let text = err.to_string();
                assert!(!text.contains("canary"), "{case}: {text}");
                assert!(!text.contains("Y2FuYXJ5"), "{case}: {text}");
            }
        }
        assert!(serde_json::from_str::<SecretString>("\"/w==\"").is_err());
        assert!(serde_json::from_str::<SecretBytes>("\"canary!!\"").is_err());
        assert!(serde_json::from_str::<SecretBytes>("\"YQ\"").is_err());
        assert!(serde_json::from_str::<SecretBytes>("12").is_err());
        assert!(serde_json::from_str::<SecretBytes>("null").is_err());
    }
}
