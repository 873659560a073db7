//! Where the key-encryption key (KEK) comes from.
//!
//! The KEK only wraps the vault's data key; it never touches a secret
//! directly, so rotating it rewrites one row. Three sources:
//!
//! - `file`: 32 random bytes, hex-encoded, in `master.key` in the state
//!   directory, mode 0600, created on first use. The default.
//! - `keyring`: the OS keychain through `keyring-core` — the kernel keyutils
//!   store (servers), or the Secret Service over D-Bus (desktops, with the
//!   `secret-service` cargo feature). Keyutils keys live in the user's
//!   persistent keyring, which the kernel wipes on reboot and expires after a
//!   few idle days; see `docs/key-sources.md`.
//! - `env`: `ZEROLEASE_MASTER_KEY` (64 hex digits), for CI. The process takes
//!   the variable out of its own environment at start-up so children never
//!   inherit it (see [`EnvKeys::take_from_process`]).
//!
//! Rotation is two-phase so a crash between the steps never locks the vault:
//! a new key is *staged* (file `master.key.new`, keyring entry `<id>.next`),
//! the DEK is re-wrapped and committed, then the staged key is *promoted*.
//! Opening a vault whose current key fails tries a staged key and finishes
//! the promotion.

use std::fmt;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use zeroize::Zeroizing;

use super::crypto::{self, KEY_LEN};

pub const ENV_MASTER_KEY: &str = "ZEROLEASE_MASTER_KEY";
pub const ENV_NEW_MASTER_KEY: &str = "ZEROLEASE_NEW_MASTER_KEY";
const KEYRING_SERVICE: &str = "zerolease";

/// Which kind of key source; stored (by name) in the vault so later opens
/// know where to look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KeySourceKind {
    File,
    Keyring,
    Env,
}

impl KeySourceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            KeySourceKind::File => "file",
            KeySourceKind::Keyring => "keyring",
            KeySourceKind::Env => "env",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "file" => Some(KeySourceKind::File),
            "keyring" => Some(KeySourceKind::Keyring),
            "env" => Some(KeySourceKind::Env),
            _ => None,
        }
    }
}

impl fmt::Display for KeySourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("key source `env`: {ENV_MASTER_KEY} is not set; export it as 64 hex digits (32 bytes)")]
    EnvMissing,
    #[error(
        "key source `env`: {ENV_NEW_MASTER_KEY} is not set; to rotate an env key, export the new key in it (64 hex digits), run `zerolease key rotate`, then store it as {ENV_MASTER_KEY} in your secret store"
    )]
    EnvNewMissing,
    #[error("key source `{source_name}`: the key is not 64 hex digits (32 bytes)")]
    Malformed { source_name: String },
    #[error("key source `file`: cannot {action} {}", path.display())]
    File {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "key source `file`: {} is not there; the vault cannot be opened without it (restore it from your backup)",
        path.display()
    )]
    FileMissing { path: PathBuf },
    #[error("key source `keyring`: {action} failed ({backend}); see docs/key-sources.md")]
    Keyring {
        action: &'static str,
        backend: &'static str,
        #[source]
        source: keyring_core::Error,
    },
    #[error(
        "key source `keyring`: no key for this vault in the {backend} keyring (keyutils keys vanish on reboot); restore it or recreate the vault"
    )]
    KeyringMissing { backend: &'static str },
    #[error(transparent)]
    Crypto(#[from] crypto::CryptoError),
}

/// The keys taken from the environment at start-up.
#[derive(Default, Clone)]
pub struct EnvKeys {
    current: Option<Zeroizing<String>>,
    new: Option<Zeroizing<String>>,
}

impl fmt::Debug for EnvKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EnvKeys")
            .field("current", &self.current.as_ref().map(|_| "[redacted]"))
            .field("new", &self.new.as_ref().map(|_| "[redacted]"))
            .finish()
    }
}

impl EnvKeys {
    /// Moves the master-key variables out of this process's environment.
    ///
    /// # Safety
    ///
    /// Must be called while the process has a single thread (at the top of
    /// `main`): `std::env::remove_var` is not thread-safe.
    pub unsafe fn take_from_process() -> EnvKeys {
        let mut keys = EnvKeys::default();
        for (name, slot) in [
            (ENV_MASTER_KEY, &mut keys.current),
            (ENV_NEW_MASTER_KEY, &mut keys.new),
        ] {
            if let Some(v) = std::env::var_os(name) {
                *slot = Some(Zeroizing::new(v.to_string_lossy().into_owned()));
                // SAFETY: the caller guarantees no other thread exists yet, so
                // nothing reads the environment concurrently.
                unsafe { std::env::remove_var(name) };
            }
        }
        keys
    }

    /// Keys given directly; for tests and embedding.
    pub fn from_values(current: Option<&str>, new: Option<&str>) -> EnvKeys {
        EnvKeys {
            current: current.map(|s| Zeroizing::new(s.to_owned())),
            new: new.map(|s| Zeroizing::new(s.to_owned())),
        }
    }
}

/// A 32-byte key-encryption key, zeroed on drop.
pub struct Kek(Zeroizing<[u8; KEY_LEN]>);

impl fmt::Debug for Kek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Kek([redacted])")
    }
}

impl Kek {
    pub fn bytes(&self) -> &[u8] {
        self.0.as_ref()
    }

    fn generate() -> Result<Kek, KeyError> {
        Ok(Kek(crypto::random_key()?))
    }

    fn from_hex(hex_text: &str, source_name: &str) -> Result<Kek, KeyError> {
        let malformed = || KeyError::Malformed {
            source_name: source_name.to_owned(),
        };
        let trimmed = hex_text.trim();
        if trimmed.len() != KEY_LEN * 2 {
            return Err(malformed());
        }
        let mut out = Zeroizing::new([0u8; KEY_LEN]);
        hex::decode_to_slice(trimmed, out.as_mut()).map_err(|_| malformed())?;
        Ok(Kek(out))
    }

    fn to_hex(&self) -> Zeroizing<String> {
        Zeroizing::new(hex::encode(self.0.as_ref()))
    }
}

/// Which keychain backs the `keyring` source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyringBackend {
    Keyutils,
    #[cfg(feature = "secret-service")]
    SecretService,
}

impl KeyringBackend {
    /// `ZEROLEASE_KEYRING_BACKEND` if set; otherwise the Secret Service when
    /// built in and a D-Bus session exists, else keyutils.
    pub fn from_env() -> KeyringBackend {
        match std::env::var("ZEROLEASE_KEYRING_BACKEND").as_deref() {
            Ok("keyutils") => KeyringBackend::Keyutils,
            #[cfg(feature = "secret-service")]
            Ok("secret-service") => KeyringBackend::SecretService,
            #[cfg(feature = "secret-service")]
            _ if std::env::var_os("DBUS_SESSION_BUS_ADDRESS").is_some() => {
                KeyringBackend::SecretService
            }
            _ => KeyringBackend::Keyutils,
        }
    }

    fn name(self) -> &'static str {
        match self {
            KeyringBackend::Keyutils => "keyutils",
            #[cfg(feature = "secret-service")]
            KeyringBackend::SecretService => "secret-service",
        }
    }

    fn store(self) -> Result<Arc<keyring_core::CredentialStore>, KeyError> {
        let err = |source| KeyError::Keyring {
            action: "opening the keychain",
            backend: self.name(),
            source,
        };
        match self {
            KeyringBackend::Keyutils => {
                let s: Arc<keyring_core::CredentialStore> =
                    linux_keyutils_keyring_store::Store::new().map_err(err)?;
                Ok(s)
            }
            #[cfg(feature = "secret-service")]
            KeyringBackend::SecretService => {
                let s: Arc<keyring_core::CredentialStore> =
                    zbus_secret_service_keyring_store::Store::new().map_err(err)?;
                Ok(s)
            }
        }
    }
}

/// A configured key source.
#[derive(Debug)]
pub enum KeySource {
    File { path: PathBuf },
    Keyring { backend: KeyringBackend },
    Env(EnvKeys),
}

impl KeySource {
    pub fn kind(&self) -> KeySourceKind {
        match self {
            KeySource::File { .. } => KeySourceKind::File,
            KeySource::Keyring { .. } => KeySourceKind::Keyring,
            KeySource::Env(_) => KeySourceKind::Env,
        }
    }

    /// A description for messages: the kind and where it looks.
    pub fn describe(&self) -> String {
        match self {
            KeySource::File { path } => format!("file ({})", path.display()),
            KeySource::Keyring { backend } => format!("keyring ({})", backend.name()),
            KeySource::Env(_) => format!("env ({ENV_MASTER_KEY})"),
        }
    }

    /// The current key, or `None` when this source has none yet.
    pub fn load(&self, vault_id: &str) -> Result<Option<Kek>, KeyError> {
        match self {
            KeySource::File { path } => read_key_file(path),
            KeySource::Keyring { backend } => keyring_get(*backend, vault_id),
            KeySource::Env(keys) => keys
                .current
                .as_ref()
                .map(|v| Kek::from_hex(v, "env"))
                .transpose(),
        }
    }

    /// The current key, creating and storing one when there is none yet (the
    /// `env` source never creates: it must be given).
    pub fn load_or_create(&self, vault_id: &str) -> Result<Kek, KeyError> {
        if let Some(k) = self.load(vault_id)? {
            return Ok(k);
        }
        match self {
            KeySource::Env(_) => Err(KeyError::EnvMissing),
            _ => {
                let k = Kek::generate()?;
                self.store_current(vault_id, &k)?;
                Ok(k)
            }
        }
    }

    /// The current key, which must exist.
    pub fn load_existing(&self, vault_id: &str) -> Result<Kek, KeyError> {
        self.load(vault_id)?.ok_or_else(|| match self {
            KeySource::File { path } => KeyError::FileMissing { path: path.clone() },
            KeySource::Keyring { backend } => KeyError::KeyringMissing {
                backend: backend.name(),
            },
            KeySource::Env(_) => KeyError::EnvMissing,
        })
    }

    /// Creates (or, for `env`, reads) the next key and keeps it in the staging
    /// slot until [`KeySource::promote_staged`].
    pub fn stage_new(&self, vault_id: &str) -> Result<Kek, KeyError> {
        match self {
            KeySource::File { path } => {
                let k = Kek::generate()?;
                write_key_file(&staged_path(path), &k)?;
                Ok(k)
            }
            KeySource::Keyring { backend } => {
                let k = Kek::generate()?;
                keyring_set(*backend, &staged_account(vault_id), &k)?;
                Ok(k)
            }
            KeySource::Env(keys) => keys
                .new
                .as_ref()
                .ok_or(KeyError::EnvNewMissing)
                .and_then(|v| Kek::from_hex(v, "env")),
        }
    }

    /// A staged key left by an interrupted rotation, if any.
    pub fn load_staged(&self, vault_id: &str) -> Result<Option<Kek>, KeyError> {
        match self {
            KeySource::File { path } => read_key_file(&staged_path(path)),
            KeySource::Keyring { backend } => keyring_get(*backend, &staged_account(vault_id)),
            KeySource::Env(keys) => keys
                .new
                .as_ref()
                .map(|v| Kek::from_hex(v, "env"))
                .transpose(),
        }
    }

    /// Makes the staged key current. Idempotent.
    pub fn promote_staged(&self, vault_id: &str, staged: &Kek) -> Result<(), KeyError> {
        match self {
            KeySource::File { path } => {
                let from = staged_path(path);
                if from.exists() {
                    fs::rename(&from, path).map_err(|source| KeyError::File {
                        action: "replace",
                        path: path.clone(),
                        source,
                    })?;
                }
                Ok(())
            }
            KeySource::Keyring { backend } => {
                keyring_set(*backend, vault_id, staged)?;
                keyring_delete(*backend, &staged_account(vault_id));
                Ok(())
            }
            // The operator moves the new key into ZEROLEASE_MASTER_KEY.
            KeySource::Env(_) => Ok(()),
        }
    }

    /// Stores `kek` as this source's current key (used when a vault moves to
    /// this source).
    pub fn store_current(&self, vault_id: &str, kek: &Kek) -> Result<(), KeyError> {
        match self {
            KeySource::File { path } => write_key_file(path, kek),
            KeySource::Keyring { backend } => keyring_set(*backend, vault_id, kek),
            KeySource::Env(_) => Ok(()),
        }
    }
}

fn staged_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".new");
    PathBuf::from(p)
}

fn staged_account(vault_id: &str) -> String {
    format!("{vault_id}.next")
}

fn read_key_file(path: &Path) -> Result<Option<Kek>, KeyError> {
    match fs::read(path) {
        Ok(bytes) => {
            let bytes = Zeroizing::new(bytes);
            let text = std::str::from_utf8(&bytes).map_err(|_| KeyError::Malformed {
                source_name: "file".into(),
            })?;
            Kek::from_hex(text, "file").map(Some)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(KeyError::File {
            action: "read",
            path: path.to_owned(),
            source,
        }),
    }
}

/// Writes the key to a temporary file created 0600, syncs it, then renames it
/// into place so a crash leaves either the old file or the new one.
fn write_key_file(path: &Path, kek: &Kek) -> Result<(), KeyError> {
    let err = |action, source| KeyError::File {
        action,
        path: path.to_owned(),
        source,
    };
    let tmp = {
        let mut p = path.as_os_str().to_owned();
        p.push(".tmp");
        PathBuf::from(p)
    };
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| err("create", e))?;
    let mut line = kek.to_hex();
    line.push('\n');
    f.write_all(line.as_bytes()).map_err(|e| err("write", e))?;
    f.sync_all().map_err(|e| err("sync", e))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600)).map_err(|e| err("chmod", e))?;
    fs::rename(&tmp, path).map_err(|e| err("replace", e))?;
    if let Some(dir) = path.parent()
        && let Ok(d) = fs::File::open(dir)
    {
        let _ = d.sync_all();
    }
    Ok(())
}

fn keyring_entry(backend: KeyringBackend, account: &str) -> Result<keyring_core::Entry, KeyError> {
    let store = backend.store()?;
    keyring_core::Entry::new_in_store(&store, KEYRING_SERVICE, account).map_err(|source| {
        KeyError::Keyring {
            action: "creating the entry",
            backend: backend.name(),
            source,
        }
    })
}

fn keyring_get(backend: KeyringBackend, account: &str) -> Result<Option<Kek>, KeyError> {
    let entry = keyring_entry(backend, account)?;
    match entry.get_secret() {
        Ok(bytes) => {
            let bytes = Zeroizing::new(bytes);
            let text = std::str::from_utf8(&bytes).map_err(|_| KeyError::Malformed {
                source_name: "keyring".into(),
            })?;
            Kek::from_hex(text, "keyring").map(Some)
        }
        Err(keyring_core::Error::NoEntry) => Ok(None),
        Err(source) => Err(KeyError::Keyring {
            action: "reading the key",
            backend: backend.name(),
            source,
        }),
    }
}

fn keyring_set(backend: KeyringBackend, account: &str, kek: &Kek) -> Result<(), KeyError> {
    let entry = keyring_entry(backend, account)?;
    entry
        .set_secret(kek.to_hex().as_bytes())
        .map_err(|source| KeyError::Keyring {
            action: "storing the key",
            backend: backend.name(),
            source,
        })
}

fn keyring_delete(backend: KeyringBackend, account: &str) {
    if let Ok(entry) = keyring_entry(backend, account)
        && let Err(e) = entry.delete_credential()
        && !matches!(e, keyring_core::Error::NoEntry)
    {
        tracing::warn!(
            backend = backend.name(),
            "could not delete a staged keyring entry: {e}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_source_creates_0600_and_reloads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.key");
        let src = KeySource::File { path: path.clone() };
        assert!(src.load("v").unwrap().is_none());
        let k = src.load_or_create("v").unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(src.load("v").unwrap().unwrap().bytes(), k.bytes());
    }

    #[test]
    fn env_source_parses_hex_and_rejects_junk() {
        let good = "ab".repeat(32);
        let src = KeySource::Env(EnvKeys::from_values(Some(&good), None));
        assert_eq!(src.load("v").unwrap().unwrap().bytes(), &[0xab; 32]);
        for bad in ["", "zz", &"ab".repeat(31), &"gg".repeat(32)] {
            let src = KeySource::Env(EnvKeys::from_values(Some(bad), None));
            assert!(matches!(src.load("v"), Err(KeyError::Malformed { .. })));
        }
        let none = KeySource::Env(EnvKeys::default());
        assert!(matches!(
            none.load_or_create("v"),
            Err(KeyError::EnvMissing)
        ));
        assert!(matches!(none.stage_new("v"), Err(KeyError::EnvNewMissing)));
    }

    #[test]
    fn debug_never_shows_keys() {
        let hexkey = "cd".repeat(32);
        let keys = EnvKeys::from_values(Some(&hexkey), Some(&hexkey));
        let shown = format!("{keys:?} {:?}", Kek::from_hex(&hexkey, "t").unwrap());
        assert!(!shown.contains("cdcd"), "{shown}");
    }
}
