//! The credential vault: secrets sealed at rest, policy, leases and the audit
//! log, behind one API the CLI and the session code call.
//!
//! **Invariant (deny by default, fail closed):** a lease exists only if a
//! grant allowed it *and* its audit record committed; an access returns a
//! value only if its use was counted and its audit record committed.
//! Revocation is the exception in the other direction: it takes effect even
//! when its audit record cannot be written yet (the record is retried).
//!
//! **Invariant (secrets stay secret):** plaintext exists only in
//! [`SecretValue`] (zeroized, redacted); nothing here formats a value into an
//! error, a log line or an audit record.

pub mod audit;
pub mod crypto;
pub mod keysource;
pub mod lease;
pub mod policy;
pub mod secret;
mod store;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;
use zeroize::Zeroizing;

use crate::clock::{Clock, Timestamp};
use crate::domain::{DomainPattern, HostName, uncovered};
use crate::home::{HomeError, StateDir};
pub use audit::{AuditFilter, AuditKind, AuditRecord, Outcome, StoredRecord, VerifyReport};
use crypto::{AeadKey, CryptoError, Sealed};
pub use keysource::{EnvKeys, KeyError, KeySource, KeySourceKind, KeyringBackend};
pub use lease::{Lease, LeaseId, LeaseRefusal, LeaseStatus};
pub use policy::{
    AgentPattern, Grant, GrantSpec, LeaseAsk, LeaseTerms, PolicyDenial, PolicyDocument,
};
pub use secret::SecretValue;
use store::{CachedExt, Store, db_error, try_append};

/// Largest secret value accepted.
pub const MAX_SECRET_LEN: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    #[error(transparent)]
    Home(#[from] HomeError),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(
        "the key from key source {source_desc} does not open this vault; check that it is the key this vault was created or last rotated with"
    )]
    WrongKey { source_desc: String },
    #[error(
        "this vault's key is kept by key source `{recorded}`, not `{requested}`; drop --key-source, or move the key with `zerolease key rotate --to {requested}`"
    )]
    KeySourceMismatch {
        recorded: KeySourceKind,
        requested: KeySourceKind,
    },
    #[error("the vault database names an unknown key source `{0}`")]
    UnknownKeySource(String),
    #[error(
        "the vault database uses schema version {found}, newer than this zerolease supports ({supported}); upgrade zerolease"
    )]
    SchemaTooNew { found: i64, supported: i64 },
    #[error("could not {action} in the vault database")]
    Db {
        action: &'static str,
        #[source]
        source: rusqlite::Error,
    },
    #[error("the vault's transaction did not commit ({0}); nothing was granted or returned")]
    CommitFailed(String),
    #[error(
        "the audit log could not be written, so nothing was granted or returned (the vault fails closed); check the disk and the database file"
    )]
    AuditUnavailable(#[source] rusqlite::Error),
    #[error("{0}")]
    Invalid(String),
    #[error("secret `{0}` already exists; use `zerolease secret rotate {0}` to change its value")]
    SecretExists(String),
    #[error("secret `{0}` does not exist; list secrets with `zerolease secret ls`")]
    SecretNotFound(String),
    #[error("grant {0} does not exist; list grants with `zerolease policy ls`")]
    GrantNotFound(i64),
    #[error("lease {0} does not exist; list leases with `zerolease lease ls --all`")]
    LeaseNotFound(String),
    #[error(
        "secret `{secret}` may never be sent to {}; its ceiling is {}. Narrow the domains, or store the secret again with a wider --domain list",
        list(missing),
        list(ceiling)
    )]
    OutsideCeiling {
        secret: String,
        missing: Vec<DomainPattern>,
        ceiling: Vec<DomainPattern>,
    },
    #[error("{}", denial_message(secret, agent, denial))]
    Denied {
        agent: String,
        secret: String,
        denial: PolicyDenial,
    },
    #[error("lease {lease}: {reason}")]
    LeaseRefused { lease: String, reason: LeaseRefusal },
    #[error(
        "secret `{0}` could not be decrypted: its stored ciphertext does not authenticate, so the vault file was modified or damaged; restore it from a backup"
    )]
    Undecryptable(String),
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    #[error("the vault is closed")]
    Closed,
    #[error("internal error: {0}")]
    Internal(String),
}

fn list(domains: &[DomainPattern]) -> String {
    domains
        .iter()
        .map(|d| format!("`{d}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn denial_message(secret: &str, agent: &str, denial: &PolicyDenial) -> String {
    match denial {
        PolicyDenial::NoGrant => format!(
            "secret `{secret}` has no grant for agent `{agent}`; add one with `zerolease policy grant --agent {agent} --secret {secret} --domain DOMAIN --ttl 15m`"
        ),
        PolicyDenial::DomainsNotGranted { grant_id, missing } => format!(
            "grant {grant_id} does not let agent `{agent}` use secret `{secret}` on {}; add a grant for it with `zerolease policy grant --agent {agent} --secret {secret} --domain {} --ttl 15m` (grants are checked in order, first match wins)",
            list(missing),
            missing.first().map(|d| d.to_string()).unwrap_or_default()
        ),
        PolicyDenial::TtlTooLong { grant_id, max } => format!(
            "grant {grant_id} allows agent `{agent}` to lease secret `{secret}` for at most {}; ask for a shorter --ttl",
            humantime::format_duration(*max)
        ),
        PolicyDenial::TooManyUses { grant_id, max } => format!(
            "grant {grant_id} allows at most {max} uses of secret `{secret}` per lease; ask for fewer"
        ),
    }
}

/// How to open a vault.
#[derive(Debug)]
pub struct VaultConfig {
    pub home: StateDir,
    /// The key source asked for; `None` uses the one the vault records (or
    /// `file` for a new vault).
    pub key_source: Option<KeySourceKind>,
    pub env_keys: EnvKeys,
    pub keyring_backend: KeyringBackend,
    /// `synchronous = FULL`: every commit is on disk before it returns.
    pub durable: bool,
}

impl VaultConfig {
    pub fn new(home: StateDir) -> VaultConfig {
        VaultConfig {
            home,
            key_source: None,
            env_keys: EnvKeys::default(),
            keyring_backend: KeyringBackend::Keyutils,
            durable: true,
        }
    }

    fn source(&self, kind: KeySourceKind) -> KeySource {
        match kind {
            KeySourceKind::File => KeySource::File {
                path: self.home.master_key(),
            },
            KeySourceKind::Keyring => KeySource::Keyring {
                backend: self.keyring_backend,
            },
            KeySourceKind::Env => KeySource::Env(self.env_keys.clone()),
        }
    }
}

/// A secret's public description; never its value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SecretInfo {
    pub name: String,
    pub kind: String,
    pub description: String,
    pub version: u32,
    pub domains: Vec<DomainPattern>,
    pub created: Timestamp,
    pub updated: Timestamp,
}

/// A new secret's metadata.
#[derive(Debug, Clone)]
pub struct NewSecret {
    pub name: String,
    pub kind: String,
    pub description: String,
    pub domains: Vec<DomainPattern>,
}

/// A lease request from an agent in a session.
#[derive(Debug, Clone)]
pub struct LeaseRequest {
    pub agent: String,
    pub session: String,
    pub secret: String,
    pub ask: LeaseAsk,
}

/// Which leases to revoke.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RevokeScope {
    Lease(String),
    Session(String),
    Secret(String),
    All,
}

/// Which leases to list.
#[derive(Debug, Clone, Default)]
pub struct LeaseFilter {
    pub session: Option<String>,
    /// Include revoked, expired and exhausted leases.
    pub include_inactive: bool,
}

/// The open vault. Cheap to share behind an `Arc`; operations from many
/// threads are committed together by the writer thread.
pub struct Vault {
    store: Store,
    clock: Arc<dyn Clock>,
    dek: Arc<AeadKey>,
    vault_id: String,
    config: VaultConfig,
    source_kind: KeySourceKind,
}

impl fmt::Debug for Vault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vault")
            .field("vault_id", &self.vault_id)
            .field("home", &self.config.home.root())
            .field("key_source", &self.source_kind)
            .finish_non_exhaustive()
    }
}

const META_VAULT_ID: &str = "vault_id";
const META_WRAPPED_DEK: &str = "wrapped_dek";
const META_KEY_SOURCE: &str = "key_source";

struct Meta {
    vault_id: String,
    wrapped: Sealed,
    source: String,
}

fn read_meta(conn: &Connection) -> rusqlite::Result<Option<Meta>> {
    let get = |k: &str| -> rusqlite::Result<Option<Vec<u8>>> {
        conn.row_cached("SELECT value FROM meta WHERE key = ?1", [k], |r| r.get(0))
            .optional()
    };
    let (Some(id), Some(dek), Some(src)) = (
        get(META_VAULT_ID)?,
        get(META_WRAPPED_DEK)?,
        get(META_KEY_SOURCE)?,
    ) else {
        return Ok(None);
    };
    if dek.len() < crypto::NONCE_LEN {
        return Ok(None);
    }
    Ok(Some(Meta {
        vault_id: String::from_utf8_lossy(&id).into_owned(),
        wrapped: Sealed {
            nonce: dek[..crypto::NONCE_LEN].to_vec(),
            ciphertext: dek[crypto::NONCE_LEN..].to_vec(),
        },
        source: String::from_utf8_lossy(&src).into_owned(),
    }))
}

fn write_meta(conn: &Connection, key: &str, value: &[u8]) -> rusqlite::Result<()> {
    conn.exec_cached(
        "INSERT INTO meta (key, value) VALUES (?1, ?2)
         ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        params![key, value],
    )
    .map(drop)
}

fn wrapped_bytes(s: &Sealed) -> Vec<u8> {
    let mut v = s.nonce.clone();
    v.extend_from_slice(&s.ciphertext);
    v
}

/// Appends a record that must commit with the operation (fail closed).
fn audit_required(conn: &Connection, r: &AuditRecord) -> Result<(), VaultError> {
    audit::append(conn, r)
        .map(drop)
        .map_err(VaultError::AuditUnavailable)
}

/// Appends a record of a refusal. The refusal stands whether or not the
/// record could be written.
fn audit_refusal(conn: &Connection, r: &AuditRecord) {
    if let Err(e) = try_append(conn, r) {
        tracing::warn!(event = %r.event, "could not record a refusal in the audit log: {e}");
    }
}

fn domains_json(d: &[DomainPattern]) -> String {
    serde_json::to_string(d).unwrap_or_else(|_| "[]".into())
}

fn domains_from_json(s: &str) -> rusqlite::Result<Vec<DomainPattern>> {
    serde_json::from_str(s).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
    })
}

fn ts(v: i64) -> Timestamp {
    Timestamp(v.max(0) as u64)
}

fn ms(t: Timestamp) -> i64 {
    i64::try_from(t.as_millis()).unwrap_or(i64::MAX)
}

fn dur_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

const LEASE_COLUMNS: &str = "id, agent, session, secret, grant_id, domains, issued_ms, expires_ms, max_expires_ms, uses_left, renewals, renewable, revoked_ms";

fn lease_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Lease> {
    Ok(Lease {
        id: LeaseId(r.get(0)?),
        agent: r.get(1)?,
        session: r.get(2)?,
        secret: r.get(3)?,
        grant_id: r.get(4)?,
        domains: domains_from_json(&r.get::<_, String>(5)?)?,
        issued: ts(r.get(6)?),
        expires: ts(r.get(7)?),
        max_expires: ts(r.get(8)?),
        uses_left: r
            .get::<_, Option<i64>>(9)?
            .map(|n| n.clamp(0, u32::MAX as i64) as u32),
        renewals: r.get::<_, i64>(10)?.clamp(0, u32::MAX as i64) as u32,
        renewable: r.get(11)?,
        revoked: r.get::<_, Option<i64>>(12)?.map(ts),
    })
}

fn load_lease(conn: &Connection, id: &str) -> Result<Lease, VaultError> {
    conn.row_cached(
        &format!("SELECT {LEASE_COLUMNS} FROM leases WHERE id = ?1"),
        [id],
        lease_from_row,
    )
    .optional()
    .map_err(db_error("read a lease"))?
    .ok_or_else(|| VaultError::LeaseNotFound(id.to_owned()))
}

fn grant_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Grant> {
    let agent: String = r.get(1)?;
    Ok(Grant {
        id: r.get(0)?,
        agent: AgentPattern::parse(&agent).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(1, rusqlite::types::Type::Text, e.into())
        })?,
        secret: r.get(2)?,
        domains: domains_from_json(&r.get::<_, String>(3)?)?,
        max_ttl: Duration::from_millis(r.get::<_, i64>(4)?.max(0) as u64),
        max_uses: r
            .get::<_, Option<i64>>(5)?
            .map(|n| n.clamp(0, u32::MAX as i64) as u32),
        renewable: r.get(6)?,
    })
}

fn load_grants(conn: &Connection) -> Result<Vec<Grant>, VaultError> {
    let mut stmt = conn
        .prepare(
            "SELECT id, agent, secret, domains, max_ttl_ms, max_uses, renewable FROM grants ORDER BY position, id",
        )
        .map_err(db_error("read the policy"))?;
    stmt.query_map([], grant_from_row)
        .and_then(|rows| rows.collect())
        .map_err(db_error("read the policy"))
}

struct SecretRow {
    id: i64,
    info: SecretInfo,
    sealed: Sealed,
}

fn load_secret(conn: &Connection, name: &str) -> Result<SecretRow, VaultError> {
    conn.row_cached(
        "SELECT id, name, kind, description, version, domains, created_ms, updated_ms, nonce, ciphertext
         FROM secrets WHERE name = ?1",
        [name],
        |r| {
            Ok(SecretRow {
                id: r.get(0)?,
                info: SecretInfo {
                    name: r.get(1)?,
                    kind: r.get(2)?,
                    description: r.get(3)?,
                    version: r.get::<_, i64>(4)?.clamp(0, u32::MAX as i64) as u32,
                    domains: domains_from_json(&r.get::<_, String>(5)?)?,
                    created: ts(r.get(6)?),
                    updated: ts(r.get(7)?),
                },
                sealed: Sealed {
                    nonce: r.get(8)?,
                    ciphertext: r.get(9)?,
                },
            })
        },
    )
    .optional()
    .map_err(db_error("read a secret"))?
    .ok_or_else(|| VaultError::SecretNotFound(name.to_owned()))
}

/// Records the expiry of every lease that ran out before `now` and has not
/// been recorded yet.
fn record_expiries(conn: &Connection, now: Timestamp) -> Result<Vec<LeaseId>, VaultError> {
    let due: Vec<Lease> = {
        let mut stmt = conn
            .prepare_cached(&format!(
                "SELECT {LEASE_COLUMNS} FROM leases
                 WHERE revoked_ms IS NULL AND expiry_recorded = 0 AND expires_ms <= ?1"
            ))
            .map_err(db_error("find expired leases"))?;
        stmt.query_map([ms(now)], lease_from_row)
            .and_then(|rows| rows.collect())
            .map_err(db_error("find expired leases"))?
    };
    for l in &due {
        conn.exec_cached(
            "UPDATE leases SET expiry_recorded = 1 WHERE id = ?1",
            [&l.id.0],
        )
        .map_err(db_error("record a lease expiry"))?;
        audit_required(
            conn,
            &AuditRecord::new(now, AuditKind::LeaseExpired, Outcome::Ok)
                .agent(&l.agent)
                .session(&l.session)
                .secret(&l.secret)
                .lease(&l.id)
                .detail(format!("expired at {}", l.expires.rfc3339())),
        )?;
    }
    Ok(due.into_iter().map(|l| l.id).collect())
}

fn validate_secret_name(name: &str) -> Result<(), VaultError> {
    policy::validate_name("secret", name).map_err(VaultError::Invalid)
}

impl Vault {
    /// Opens the vault in `config.home`, creating it (and its key, for the
    /// `file` and `keyring` sources) on first use.
    pub fn open(config: VaultConfig, clock: Arc<dyn Clock>) -> Result<Vault, VaultError> {
        config.home.ensure()?;
        let store = Store::open(&config.home.vault_db(), config.durable)?;
        let meta =
            store.run(|conn, _| read_meta(conn).map_err(db_error("read the vault header")))?;
        let (vault_id, dek, source_kind) = match meta {
            Some(meta) => {
                let recorded = KeySourceKind::parse(&meta.source)
                    .ok_or_else(|| VaultError::UnknownKeySource(meta.source.clone()))?;
                if let Some(requested) = config.key_source
                    && requested != recorded
                {
                    return Err(VaultError::KeySourceMismatch {
                        recorded,
                        requested,
                    });
                }
                let dek = unwrap_dek(&config.source(recorded), &meta)?;
                (meta.vault_id, dek, recorded)
            }
            None => {
                let kind = config.key_source.unwrap_or(KeySourceKind::File);
                let vault_id = crypto::random_hex(16)?;
                let kek = config.source(kind).load_or_create(&vault_id)?;
                let dek = Zeroizing::new(crypto::random_key()?.to_vec());
                let wrapped =
                    AeadKey::from_bytes(kek.bytes())?.seal(&dek, &crypto::dek_aad(&vault_id))?;
                let now = clock.now();
                let id = vault_id.clone();
                let kind_name = kind.as_str();
                store.run(move |conn, _| {
                    if read_meta(conn).map_err(db_error("read the vault header"))?.is_some() {
                        return Err(VaultError::Internal(
                            "another process created the vault at the same time; run the command again".into(),
                        ));
                    }
                    let w = db_error("write the vault header");
                    write_meta(conn, META_VAULT_ID, id.as_bytes()).map_err(&w)?;
                    write_meta(conn, META_WRAPPED_DEK, &wrapped_bytes(&wrapped)).map_err(&w)?;
                    write_meta(conn, META_KEY_SOURCE, kind_name.as_bytes()).map_err(&w)?;
                    audit_required(
                        conn,
                        &AuditRecord::new(now, AuditKind::VaultCreated, Outcome::Ok)
                            .detail(format!("key source {kind_name}")),
                    )
                })?;
                (vault_id, dek, kind)
            }
        };
        Ok(Vault {
            store,
            clock,
            dek: Arc::new(AeadKey::from_bytes(&dek)?),
            vault_id,
            config,
            source_kind,
        })
    }

    pub fn now(&self) -> Timestamp {
        self.clock.now()
    }

    pub fn key_source(&self) -> KeySourceKind {
        self.source_kind
    }

    // ---- secrets ------------------------------------------------------

    /// Stores a new secret with the domains it may ever be sent to.
    pub fn add_secret(
        &self,
        spec: NewSecret,
        value: SecretValue,
    ) -> Result<SecretInfo, VaultError> {
        validate_secret_name(&spec.name)?;
        policy::validate_name("kind", &spec.kind).map_err(VaultError::Invalid)?;
        if spec.domains.is_empty() {
            return Err(VaultError::Invalid(format!(
                "secret `{}` needs at least one --domain: the domains it may ever be sent to",
                spec.name
            )));
        }
        check_value(&spec.name, &value)?;
        let now = self.now();
        let dek = self.dek.clone();
        self.store.run(move |conn, _| {
            let exists: bool = conn
                .query_row("SELECT 1 FROM secrets WHERE name = ?1", [&spec.name], |_| Ok(true))
                .optional()
                .map_err(db_error("read a secret"))?
                .unwrap_or(false);
            if exists {
                return Err(VaultError::SecretExists(spec.name));
            }
            let w = db_error("store a secret");
            conn.exec_cached(
                "INSERT INTO secrets (name, kind, description, version, domains, nonce, ciphertext, created_ms, updated_ms)
                 VALUES (?1, ?2, ?3, 1, ?4, x'', x'', ?5, ?5)",
                params![spec.name, spec.kind, spec.description, domains_json(&spec.domains), ms(now)],
            )
            .map_err(&w)?;
            let id = conn.last_insert_rowid();
            let sealed = dek.seal(value.expose(), &crypto::secret_aad(id, &spec.name, 1))?;
            conn.exec_cached(
                "UPDATE secrets SET nonce = ?1, ciphertext = ?2 WHERE id = ?3",
                params![sealed.nonce, sealed.ciphertext, id],
            )
            .map_err(&w)?;
            audit_required(
                conn,
                &AuditRecord::new(now, AuditKind::SecretAdded, Outcome::Ok)
                    .secret(&spec.name)
                    .detail(format!("kind {}; domains {}", spec.kind, list(&spec.domains))),
            )?;
            Ok(SecretInfo {
                name: spec.name,
                kind: spec.kind,
                description: spec.description,
                version: 1,
                domains: spec.domains,
                created: now,
                updated: now,
            })
        })
    }

    /// Replaces a secret's value (new version, fresh nonce). Leases keep
    /// working and see the new value.
    pub fn rotate_secret(&self, name: &str, value: SecretValue) -> Result<SecretInfo, VaultError> {
        check_value(name, &value)?;
        let now = self.now();
        let dek = self.dek.clone();
        let name = name.to_owned();
        self.store.run(move |conn, _| {
            let row = load_secret(conn, &name)?;
            let version = row.info.version + 1;
            let sealed = dek.seal(value.expose(), &crypto::secret_aad(row.id, &name, version))?;
            conn.exec_cached(
                "UPDATE secrets SET version = ?1, nonce = ?2, ciphertext = ?3, updated_ms = ?4 WHERE id = ?5",
                params![version, sealed.nonce, sealed.ciphertext, ms(now), row.id],
            )
            .map_err(db_error("store a secret"))?;
            audit_required(
                conn,
                &AuditRecord::new(now, AuditKind::SecretRotated, Outcome::Ok)
                    .secret(&name)
                    .detail(format!("version {version}")),
            )?;
            Ok(SecretInfo {
                version,
                updated: now,
                ..row.info
            })
        })
    }

    /// Removes a secret, its grants, and revokes its leases.
    pub fn remove_secret(&self, name: &str) -> Result<Vec<LeaseId>, VaultError> {
        let now = self.now();
        let name = name.to_owned();
        self.store.run(move |conn, pending| {
            load_secret(conn, &name)?;
            let revoked = revoke_in(
                conn,
                pending,
                &RevokeScope::Secret(name.clone()),
                now,
                "secret removed",
            )?;
            let grants: Vec<Grant> = load_grants(conn)?
                .into_iter()
                .filter(|g| g.secret == name)
                .collect();
            for g in &grants {
                conn.exec_cached("DELETE FROM grants WHERE id = ?1", [g.id])
                    .map_err(db_error("remove a grant"))?;
                audit_required(
                    conn,
                    &AuditRecord::new(now, AuditKind::GrantRemoved, Outcome::Ok)
                        .secret(&name)
                        .detail(format!("grant {} removed with its secret", g.id)),
                )?;
            }
            conn.exec_cached("DELETE FROM secrets WHERE name = ?1", [&name])
                .map_err(db_error("remove a secret"))?;
            audit_required(
                conn,
                &AuditRecord::new(now, AuditKind::SecretRemoved, Outcome::Ok).secret(&name),
            )?;
            Ok(revoked)
        })
    }

    pub fn list_secrets(&self) -> Result<Vec<SecretInfo>, VaultError> {
        self.store.run(|conn, _| {
            let mut stmt = conn
                .prepare_cached("SELECT name FROM secrets ORDER BY name")
                .map_err(db_error("list secrets"))?;
            let names: Vec<String> = stmt
                .query_map([], |r| r.get(0))
                .and_then(|rows| rows.collect())
                .map_err(db_error("list secrets"))?;
            names
                .iter()
                .map(|n| load_secret(conn, n).map(|r| r.info))
                .collect()
        })
    }

    // ---- policy -------------------------------------------------------

    /// Appends a grant to the end of the policy (first match wins).
    pub fn add_grant(&self, spec: GrantSpec) -> Result<Grant, VaultError> {
        let now = self.now();
        self.store
            .run(move |conn, _| insert_grant(conn, &spec, now))
    }

    pub fn remove_grant(&self, id: i64) -> Result<Grant, VaultError> {
        let now = self.now();
        self.store.run(move |conn, _| {
            let grant = load_grants(conn)?
                .into_iter()
                .find(|g| g.id == id)
                .ok_or(VaultError::GrantNotFound(id))?;
            conn.exec_cached("DELETE FROM grants WHERE id = ?1", [id])
                .map_err(db_error("remove a grant"))?;
            audit_required(
                conn,
                &AuditRecord::new(now, AuditKind::GrantRemoved, Outcome::Ok)
                    .agent(grant.agent.as_str())
                    .secret(&grant.secret)
                    .detail(format!("grant {id}")),
            )?;
            Ok(grant)
        })
    }

    pub fn list_grants(&self) -> Result<Vec<Grant>, VaultError> {
        self.store.run(|conn, _| load_grants(conn))
    }

    pub fn export_policy(&self) -> Result<PolicyDocument, VaultError> {
        Ok(PolicyDocument {
            grants: self.list_grants()?.iter().map(GrantSpec::from).collect(),
        })
    }

    /// Imports a policy document: every grant is checked first and either all
    /// are stored or none. `replace` drops the current grants.
    pub fn import_policy(
        &self,
        doc: PolicyDocument,
        replace: bool,
    ) -> Result<Vec<Grant>, VaultError> {
        let now = self.now();
        self.store.run(move |conn, _| {
            if replace {
                conn.exec_cached("DELETE FROM grants", [])
                    .map_err(db_error("replace the policy"))?;
            }
            let grants = doc
                .grants
                .iter()
                .map(|g| insert_grant(conn, g, now))
                .collect::<Result<Vec<_>, _>>()?;
            audit_required(
                conn,
                &AuditRecord::new(now, AuditKind::PolicyImported, Outcome::Ok).detail(format!(
                    "{} grants {}",
                    grants.len(),
                    if replace {
                        "replaced the policy"
                    } else {
                        "appended"
                    }
                )),
            )?;
            Ok(grants)
        })
    }

    // ---- leases -------------------------------------------------------

    /// Grants a lease if policy allows it. Denials are audited and returned as
    /// [`VaultError::Denied`].
    pub fn grant(&self, req: LeaseRequest) -> Result<Lease, VaultError> {
        policy::validate_name("agent", &req.agent).map_err(VaultError::Invalid)?;
        policy::validate_name("session", &req.session).map_err(VaultError::Invalid)?;
        let now = self.now();
        let id = LeaseId(crypto::random_hex(16)?);
        self.store
            .run(move |conn, _| {
                record_expiries(conn, now)?;
                let denied = |denial: PolicyDenial, conn: &Connection| {
                    audit_refusal(
                        conn,
                        &AuditRecord::new(now, AuditKind::LeaseDenied, Outcome::Denied)
                            .agent(&req.agent)
                            .session(&req.session)
                            .secret(&req.secret)
                            .detail(denial_message(&req.secret, &req.agent, &denial)),
                    );
                    Ok(Err(VaultError::Denied {
                        agent: req.agent.clone(),
                        secret: req.secret.clone(),
                        denial,
                    }))
                };
                if load_secret(conn, &req.secret).is_err() {
                    return denied(PolicyDenial::NoGrant, conn);
                }
                let grants = load_grants(conn)?;
                let terms = match policy::evaluate(&grants, &req.agent, &req.secret, &req.ask) {
                    Ok(t) => t,
                    Err(d) => return denied(d, conn),
                };
                let lease = Lease {
                    id: id.clone(),
                    agent: req.agent.clone(),
                    session: req.session.clone(),
                    secret: req.secret.clone(),
                    grant_id: terms.grant_id,
                    domains: terms.domains,
                    issued: now,
                    expires: now.saturating_add(terms.ttl),
                    max_expires: now.saturating_add(terms.max_ttl),
                    uses_left: terms.uses,
                    renewals: 0,
                    renewable: terms.renewable,
                    revoked: None,
                };
                conn.exec_cached(
                    "INSERT INTO leases (id, agent, session, secret, grant_id, domains, issued_ms, expires_ms, max_expires_ms, uses_left, renewals, renewable)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, 0, ?11)",
                    params![
                        lease.id.0,
                        lease.agent,
                        lease.session,
                        lease.secret,
                        lease.grant_id,
                        domains_json(&lease.domains),
                        ms(lease.issued),
                        ms(lease.expires),
                        ms(lease.max_expires),
                        lease.uses_left,
                        lease.renewable
                    ],
                )
                .map_err(db_error("store a lease"))?;
                audit_required(
                    conn,
                    &AuditRecord::new(now, AuditKind::LeaseGranted, Outcome::Ok)
                        .agent(&lease.agent)
                        .session(&lease.session)
                        .secret(&lease.secret)
                        .lease(&lease.id)
                        .domain(domains_json(&lease.domains))
                        .detail(format!(
                            "grant {}; expires {}; uses {}",
                            lease.grant_id,
                            lease.expires.rfc3339(),
                            lease.uses_left.map_or("unlimited".to_owned(), |u| u.to_string())
                        )),
                )?;
                Ok(Ok(lease))
            })
            .and_then(|r| r)
    }

    /// What `grant` would decide for `req`, without granting or recording
    /// anything; for `zerolease manifest check`.
    pub fn check_grant(&self, req: &LeaseRequest) -> Result<policy::LeaseTerms, VaultError> {
        let req = req.clone();
        self.store.run(move |conn, _| {
            let denied = |denial| VaultError::Denied {
                agent: req.agent.clone(),
                secret: req.secret.clone(),
                denial,
            };
            load_secret(conn, &req.secret)?;
            let grants = load_grants(conn)?;
            policy::evaluate(&grants, &req.agent, &req.secret, &req.ask).map_err(denied)
        })
    }

    /// Uses a lease for `domain`: checks it, counts the use, records it, and
    /// only then returns the secret's current value.
    pub fn access(&self, lease_id: &str, domain: &HostName) -> Result<SecretValue, VaultError> {
        self.use_lease(lease_id, Some(domain.clone()))
    }

    /// Uses a lease to hand its value to the session's guest (an env var or
    /// a file): counted and recorded like an access, without a domain — the
    /// guest can only send it through the proxy, to the lease's domains.
    pub fn access_for_injection(&self, lease_id: &str) -> Result<SecretValue, VaultError> {
        self.use_lease(lease_id, None)
    }

    fn use_lease(
        &self,
        lease_id: &str,
        domain: Option<HostName>,
    ) -> Result<SecretValue, VaultError> {
        let now = self.now();
        let dek = self.dek.clone();
        let lease_id = lease_id.to_owned();
        self.store
            .run(move |conn, _| {
                let lease = load_lease(conn, &lease_id)?;
                let with_domain = |r: AuditRecord| match &domain {
                    Some(d) => r.domain(d),
                    None => r,
                };
                let refused = |detail: String, conn: &Connection| {
                    audit_refusal(
                        conn,
                        &with_domain(
                            AuditRecord::new(now, AuditKind::AccessDenied, Outcome::Denied)
                                .agent(&lease.agent)
                                .session(&lease.session)
                                .secret(&lease.secret)
                                .lease(&lease.id),
                        )
                        .detail(detail),
                    );
                };
                let checked = match &domain {
                    Some(d) => lease.check_access(d, now),
                    None => lease.check_use(now),
                };
                let uses_left = match checked {
                    Ok(u) => u,
                    Err(reason) => {
                        refused(reason.to_string(), conn);
                        return Ok(Err(VaultError::LeaseRefused {
                            lease: lease_id.clone(),
                            reason,
                        }));
                    }
                };
                let row = load_secret(conn, &lease.secret)?;
                let aad = crypto::secret_aad(row.id, &row.info.name, row.info.version);
                let value = match dek.open(&row.sealed, &aad) {
                    Ok(v) => SecretValue::new(v),
                    Err(_) => {
                        refused("stored ciphertext does not authenticate".into(), conn);
                        return Ok(Err(VaultError::Undecryptable(lease.secret.clone())));
                    }
                };
                conn.exec_cached(
                    "UPDATE leases SET uses_left = ?1 WHERE id = ?2",
                    params![uses_left, lease.id.0],
                )
                .map_err(db_error("count a lease use"))?;
                audit_required(
                    conn,
                    &with_domain(
                        AuditRecord::new(now, AuditKind::LeaseAccessed, Outcome::Ok)
                            .agent(&lease.agent)
                            .session(&lease.session)
                            .secret(&lease.secret)
                            .lease(&lease.id),
                    )
                    .detail(format!(
                        "{}version {}; uses left {}",
                        if domain.is_none() {
                            "injected into the session's guest; "
                        } else {
                            ""
                        },
                        row.info.version,
                        uses_left.map_or("unlimited".to_owned(), |u| u.to_string())
                    )),
                )?;
                Ok(Ok(value))
            })
            .and_then(|r| r)
    }

    /// Extends a lease by `ttl` (default: the grant's maximum TTL) from now,
    /// never past its first issue plus the grant's maximum TTL.
    pub fn renew(&self, lease_id: &str, ttl: Option<Duration>) -> Result<Lease, VaultError> {
        let now = self.now();
        let lease_id = lease_id.to_owned();
        self.store
            .run(move |conn, _| {
                let lease = load_lease(conn, &lease_id)?;
                let grant = load_grants(conn)?
                    .into_iter()
                    .find(|g| g.id == lease.grant_id);
                let ttl = ttl
                    .or(grant.as_ref().map(|g| g.max_ttl))
                    .unwrap_or_default();
                let outcome = match grant {
                    None => Err(LeaseRefusal::NotRenewable),
                    Some(_) => lease.renewed_expiry(ttl, now),
                };
                let expires = match outcome {
                    Ok(e) => e,
                    Err(reason) => {
                        audit_refusal(
                            conn,
                            &AuditRecord::new(now, AuditKind::RenewDenied, Outcome::Denied)
                                .agent(&lease.agent)
                                .session(&lease.session)
                                .secret(&lease.secret)
                                .lease(&lease.id)
                                .detail(reason.to_string()),
                        );
                        return Ok(Err(VaultError::LeaseRefused {
                            lease: lease_id.clone(),
                            reason,
                        }));
                    }
                };
                conn.exec_cached(
                    "UPDATE leases SET expires_ms = ?1, renewals = renewals + 1 WHERE id = ?2",
                    params![ms(expires), lease.id.0],
                )
                .map_err(db_error("renew a lease"))?;
                audit_required(
                    conn,
                    &AuditRecord::new(now, AuditKind::LeaseRenewed, Outcome::Ok)
                        .agent(&lease.agent)
                        .session(&lease.session)
                        .secret(&lease.secret)
                        .lease(&lease.id)
                        .detail(format!("expires {}", expires.rfc3339())),
                )?;
                Ok(Ok(Lease {
                    expires,
                    renewals: lease.renewals + 1,
                    ..lease
                }))
            })
            .and_then(|r| r)
    }

    /// Revokes leases. Takes effect even when the audit log cannot be written
    /// (the records are kept and retried with the next write).
    pub fn revoke(&self, scope: RevokeScope) -> Result<Vec<LeaseId>, VaultError> {
        let now = self.now();
        self.store
            .run(move |conn, pending| revoke_in(conn, pending, &scope, now, "revoked"))
    }

    /// Records every lease that has expired by now; returns their ids.
    pub fn expire_due(&self) -> Result<Vec<LeaseId>, VaultError> {
        let now = self.now();
        self.store.run(move |conn, _| record_expiries(conn, now))
    }

    pub fn get_lease(&self, id: &str) -> Result<Lease, VaultError> {
        let id = id.to_owned();
        self.store.run(move |conn, _| load_lease(conn, &id))
    }

    pub fn list_leases(&self, filter: LeaseFilter) -> Result<Vec<Lease>, VaultError> {
        let now = self.now();
        self.store.run(move |conn, _| {
            record_expiries(conn, now)?;
            let mut stmt = conn
                .prepare_cached(&format!(
                    "SELECT {LEASE_COLUMNS} FROM leases WHERE (?1 IS NULL OR session = ?1) ORDER BY issued_ms, id"
                ))
                .map_err(db_error("list leases"))?;
            let leases: Vec<Lease> = stmt
                .query_map([&filter.session], lease_from_row)
                .and_then(|rows| rows.collect())
                .map_err(db_error("list leases"))?;
            Ok(leases
                .into_iter()
                .filter(|l| filter.include_inactive || l.status(now) == LeaseStatus::Active)
                .collect())
        })
    }

    // ---- audit --------------------------------------------------------

    pub fn audit_list(&self, filter: AuditFilter) -> Result<Vec<StoredRecord>, VaultError> {
        self.store
            .run(move |conn, _| audit::list(conn, &filter).map_err(db_error("read the audit log")))
    }

    pub fn audit_verify(&self) -> Result<VerifyReport, VaultError> {
        self.store
            .run(|conn, _| audit::verify(conn).map_err(db_error("read the audit log")))
    }

    /// Appends a record from another component (sessions, the proxy). Fails
    /// when it cannot be written; callers that must not wait on audit
    /// (revocations) log and carry on.
    pub fn audit_append(&self, record: AuditRecord) -> Result<StoredRecord, VaultError> {
        self.store
            .run(move |conn, _| audit::append(conn, &record).map_err(VaultError::AuditUnavailable))
    }

    /// Queues a record from another component without waiting for it to
    /// commit, for records nothing waits on: a session's state transitions.
    /// Records still commit in the order they were queued, so any record
    /// appended after this one (an access, which is waited for) commits
    /// with it or after it. `failed` gets the error if it cannot be
    /// written.
    pub fn audit_append_queued(
        &self,
        record: AuditRecord,
        failed: impl FnOnce(VaultError) + Send + 'static,
    ) {
        self.store.submit(
            move |conn, _| audit::append(conn, &record).map_err(VaultError::AuditUnavailable),
            |result| {
                if let Err(e) = result {
                    failed(e);
                }
            },
        );
    }

    // ---- key ----------------------------------------------------------

    /// Re-wraps the data key under a new key-encryption key, in the current
    /// key source or in `to`. Secrets are not touched.
    pub fn rotate_key(&mut self, to: Option<KeySourceKind>) -> Result<KeySourceKind, VaultError> {
        let target_kind = to.unwrap_or(self.source_kind);
        let current = self.config.source(self.source_kind);
        let target = self.config.source(target_kind);
        // Re-derive the data key's bytes with the current key; only the
        // wrapping changes, never the data key itself.
        let meta = self
            .store
            .run(|conn, _| read_meta(conn).map_err(db_error("read the vault header")))?
            .ok_or_else(|| VaultError::Internal("the vault header is missing".into()))?;
        let dek = unwrap_dek(&current, &meta)?;
        let new_kek = target.stage_new(&self.vault_id)?;
        let wrapped =
            AeadKey::from_bytes(new_kek.bytes())?.seal(&dek, &crypto::dek_aad(&self.vault_id))?;
        let now = self.now();
        let from = self.source_kind;
        self.store.run(move |conn, _| {
            let w = db_error("write the vault header");
            write_meta(conn, META_WRAPPED_DEK, &wrapped_bytes(&wrapped)).map_err(&w)?;
            write_meta(conn, META_KEY_SOURCE, target_kind.as_str().as_bytes()).map_err(&w)?;
            audit_required(
                conn,
                &AuditRecord::new(now, AuditKind::KeyRotated, Outcome::Ok)
                    .detail(format!("from key source {from} to {target_kind}")),
            )
        })?;
        target.promote_staged(&self.vault_id, &new_kek)?;
        self.source_kind = target_kind;
        Ok(target_kind)
    }
}

fn check_value(name: &str, value: &SecretValue) -> Result<(), VaultError> {
    if value.is_empty() {
        return Err(VaultError::Invalid(format!(
            "the value for secret `{name}` is empty; pipe it on stdin or type it at the prompt"
        )));
    }
    if value.len() > MAX_SECRET_LEN {
        return Err(VaultError::Invalid(format!(
            "the value for secret `{name}` is {} bytes; the limit is {MAX_SECRET_LEN}",
            value.len()
        )));
    }
    Ok(())
}

fn insert_grant(conn: &Connection, spec: &GrantSpec, now: Timestamp) -> Result<Grant, VaultError> {
    if spec.domains.is_empty() {
        return Err(VaultError::Invalid(format!(
            "a grant for secret `{}` needs at least one --domain",
            spec.secret
        )));
    }
    if spec.max_uses == Some(0) {
        return Err(VaultError::Invalid("--max-uses must be at least 1".into()));
    }
    let secret = load_secret(conn, &spec.secret)?;
    let missing: Vec<DomainPattern> = uncovered(&secret.info.domains, &spec.domains)
        .into_iter()
        .cloned()
        .collect();
    if !missing.is_empty() {
        return Err(VaultError::OutsideCeiling {
            secret: spec.secret.clone(),
            missing,
            ceiling: secret.info.domains,
        });
    }
    let position: i64 = conn
        .query_row(
            "SELECT COALESCE(MAX(position), 0) + 1 FROM grants",
            [],
            |r| r.get(0),
        )
        .map_err(db_error("store a grant"))?;
    conn.exec_cached(
        "INSERT INTO grants (position, agent, secret, domains, max_ttl_ms, max_uses, renewable, created_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![
            position,
            spec.agent.as_str(),
            spec.secret,
            domains_json(&spec.domains),
            dur_ms(spec.ttl),
            spec.max_uses,
            spec.renewable,
            ms(now)
        ],
    )
    .map_err(db_error("store a grant"))?;
    let grant = Grant {
        id: conn.last_insert_rowid(),
        agent: spec.agent.clone(),
        secret: spec.secret.clone(),
        domains: spec.domains.clone(),
        max_ttl: spec.ttl,
        max_uses: spec.max_uses,
        renewable: spec.renewable,
    };
    audit_required(
        conn,
        &AuditRecord::new(now, AuditKind::GrantAdded, Outcome::Ok)
            .agent(grant.agent.as_str())
            .secret(&grant.secret)
            .domain(domains_json(&grant.domains))
            .detail(format!(
                "grant {}; ttl {}; max uses {}; renewable {}",
                grant.id,
                humantime::format_duration(grant.max_ttl),
                grant
                    .max_uses
                    .map_or("unlimited".to_owned(), |u| u.to_string()),
                grant.renewable
            )),
    )?;
    Ok(grant)
}

fn revoke_in(
    conn: &Connection,
    pending: &mut Vec<AuditRecord>,
    scope: &RevokeScope,
    now: Timestamp,
    why: &str,
) -> Result<Vec<LeaseId>, VaultError> {
    let (clause, arg): (&str, Option<&str>) = match scope {
        RevokeScope::Lease(id) => {
            load_lease(conn, id)?;
            ("id = ?1", Some(id))
        }
        RevokeScope::Session(s) => ("session = ?1", Some(s)),
        RevokeScope::Secret(s) => ("secret = ?1", Some(s)),
        RevokeScope::All => ("?1 IS NULL", None),
    };
    let targets: Vec<Lease> = {
        let mut stmt = conn
            .prepare_cached(&format!(
                "SELECT {LEASE_COLUMNS} FROM leases WHERE revoked_ms IS NULL AND {clause}"
            ))
            .map_err(db_error("find leases to revoke"))?;
        stmt.query_map([arg], lease_from_row)
            .and_then(|rows| rows.collect())
            .map_err(db_error("find leases to revoke"))?
    };
    for l in &targets {
        conn.exec_cached(
            "UPDATE leases SET revoked_ms = ?1 WHERE id = ?2",
            params![ms(now), l.id.0],
        )
        .map_err(db_error("revoke a lease"))?;
        let record = AuditRecord::new(now, AuditKind::LeaseRevoked, Outcome::Ok)
            .agent(&l.agent)
            .session(&l.session)
            .secret(&l.secret)
            .lease(&l.id)
            .detail(why);
        if let Err(e) = try_append(conn, &record) {
            tracing::warn!("revocation recorded later: the audit log could not be written: {e}");
            pending.push(record);
        }
    }
    Ok(targets.into_iter().map(|l| l.id).collect())
}

fn unwrap_dek(source: &KeySource, meta: &Meta) -> Result<Zeroizing<Vec<u8>>, VaultError> {
    let aad = crypto::dek_aad(&meta.vault_id);
    let current = source.load(&meta.vault_id)?;
    if let Some(kek) = &current
        && let Ok(dek) = AeadKey::from_bytes(kek.bytes())?.open(&meta.wrapped, &aad)
    {
        return Ok(dek);
    }
    // An interrupted rotation may have committed the new wrap without
    // promoting the new key; finish it.
    if let Some(staged) = source.load_staged(&meta.vault_id)?
        && let Ok(dek) = AeadKey::from_bytes(staged.bytes())?.open(&meta.wrapped, &aad)
    {
        if !matches!(source, KeySource::Env(_)) {
            source.promote_staged(&meta.vault_id, &staged)?;
            tracing::warn!("finished an interrupted key rotation");
        }
        return Ok(dek);
    }
    match current {
        None => Err(source
            .load_existing(&meta.vault_id)
            .err()
            .map(VaultError::Key)
            .unwrap_or(VaultError::WrongKey {
                source_desc: source.describe(),
            })),
        Some(_) => Err(VaultError::WrongKey {
            source_desc: source.describe(),
        }),
    }
}
