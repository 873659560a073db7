//! The vault's sqlite database and the single writer thread that owns it.
//!
//! Every operation is a job run on the writer thread inside a savepoint of a
//! shared transaction. The writer takes every job already queued (up to
//! [`MAX_BATCH`]), runs them, commits once, and only then hands each caller
//! its result. So concurrent callers share one fsync (group commit), and a
//! caller never sees a secret or a lease whose audit record did not commit:
//! results are released after `COMMIT` returns, and dropped (zeroized) if it
//! fails.
//!
//! A job returns `Err` to have its savepoint rolled back (nothing it wrote
//! stays), or `Ok(result)` to keep its writes — including `Ok(Err(denial))`,
//! which keeps the audit record of a refusal and still reports the refusal.

use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError, mpsc};
use std::thread;
use std::time::Duration;

use rusqlite::{Connection, TransactionBehavior};

use super::VaultError;
use super::audit::{self, AuditRecord};

/// Most jobs committed together.
const MAX_BATCH: usize = 256;
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// The first schema. Never edit a released migration: add a new one.
const SCHEMA_V1: &str = "
CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE secrets (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    name        TEXT NOT NULL UNIQUE,
    kind        TEXT NOT NULL,
    description TEXT NOT NULL,
    version     INTEGER NOT NULL,
    domains     TEXT NOT NULL,
    nonce       BLOB NOT NULL,
    ciphertext  BLOB NOT NULL,
    created_ms  INTEGER NOT NULL,
    updated_ms  INTEGER NOT NULL
);
CREATE TABLE grants (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    position    INTEGER NOT NULL,
    agent       TEXT NOT NULL,
    secret      TEXT NOT NULL,
    domains     TEXT NOT NULL,
    max_ttl_ms  INTEGER NOT NULL,
    max_uses    INTEGER,
    renewable   INTEGER NOT NULL,
    created_ms  INTEGER NOT NULL
);
CREATE TABLE leases (
    id              TEXT PRIMARY KEY,
    agent           TEXT NOT NULL,
    session         TEXT NOT NULL,
    secret          TEXT NOT NULL,
    grant_id        INTEGER NOT NULL,
    domains         TEXT NOT NULL,
    issued_ms       INTEGER NOT NULL,
    expires_ms      INTEGER NOT NULL,
    max_expires_ms  INTEGER NOT NULL,
    uses_left       INTEGER,
    renewals        INTEGER NOT NULL,
    renewable       INTEGER NOT NULL,
    revoked_ms      INTEGER,
    expiry_recorded INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX leases_session ON leases(session);
CREATE INDEX leases_secret ON leases(secret);
CREATE INDEX leases_due ON leases(expires_ms) WHERE revoked_ms IS NULL AND expiry_recorded = 0;
";

/// Schema migrations in order; `PRAGMA user_version` counts how many ran.
fn migrations() -> Vec<String> {
    vec![format!("{SCHEMA_V1}{}", audit::SCHEMA)]
}

/// Statement-cached forms of `execute` and `query_row`: the vault runs the
/// same few statements over and over, and parsing SQL each time costs more
/// than running it.
pub(crate) trait CachedExt {
    fn exec_cached<P: rusqlite::Params>(&self, sql: &str, params: P) -> rusqlite::Result<usize>;
    fn row_cached<T, P, F>(&self, sql: &str, params: P, f: F) -> rusqlite::Result<T>
    where
        P: rusqlite::Params,
        F: FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>;
}

impl CachedExt for Connection {
    fn exec_cached<P: rusqlite::Params>(&self, sql: &str, params: P) -> rusqlite::Result<usize> {
        self.prepare_cached(sql)?.execute(params)
    }

    fn row_cached<T, P, F>(&self, sql: &str, params: P, f: F) -> rusqlite::Result<T>
    where
        P: rusqlite::Params,
        F: FnOnce(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    {
        self.prepare_cached(sql)?.query_row(params, f)
    }
}

/// What a job gives back to the writer: whether to keep its writes, and the
/// function that delivers its result once the commit outcome is known.
type Completion = Box<dyn FnOnce(Result<(), VaultError>) + Send>;

/// Runs a job in its savepoint: whether to keep its writes, and how to
/// deliver its result.
type RunJob = Box<dyn FnOnce(&Connection, &mut Vec<AuditRecord>) -> (bool, Completion) + Send>;

struct Job {
    run: RunJob,
    abort: Box<dyn FnOnce(VaultError) + Send>,
}

/// Handle to the writer thread. Dropping it lets the thread finish the jobs
/// already queued and exit.
pub(crate) struct Store {
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Store")
    }
}

pub(crate) fn db_error(action: &'static str) -> impl Fn(rusqlite::Error) -> VaultError {
    move |source| VaultError::Db { action, source }
}

impl Store {
    /// Opens (creating if needed) the database at `path`, applies pending
    /// migrations, and starts the writer thread.
    pub(crate) fn open(path: &Path, durable: bool) -> Result<Store, VaultError> {
        // Create the file 0600 ourselves: sqlite would use 0644, and its WAL
        // and shared-memory files copy the database file's mode.
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| VaultError::Internal(format!("cannot create {}: {e}", path.display())))?;
        let conn = Connection::open(path).map_err(db_error("open the vault database"))?;
        conn.busy_timeout(BUSY_TIMEOUT)
            .map_err(db_error("configure the vault database"))?;
        let sync = if durable { "FULL" } else { "NORMAL" };
        conn.execute_batch(&format!(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = {sync}; PRAGMA foreign_keys = ON;
             PRAGMA secure_delete = ON;"
        ))
        .map_err(db_error("configure the vault database"))?;
        conn.set_prepared_statement_cache_capacity(64);
        migrate(&conn)?;
        let (tx, rx) = mpsc::channel::<Job>();
        let thread = thread::Builder::new()
            .name("vault-writer".into())
            .spawn(move || writer_loop(conn, rx))
            .map_err(|e| VaultError::Internal(format!("cannot start the vault writer: {e}")))?;
        Ok(Store {
            jobs: Some(tx),
            thread: Some(thread),
        })
    }

    /// Runs `f` on the writer thread in its own savepoint and returns its
    /// result after the enclosing transaction committed.
    pub(crate) fn run<T, F>(&self, f: F) -> Result<T, VaultError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection, &mut Vec<AuditRecord>) -> Result<T, VaultError> + Send + 'static,
    {
        let (reply, answer) = mpsc::sync_channel::<Result<T, VaultError>>(1);
        self.submit(f, move |out| {
            let _ = reply.send(out);
        });
        answer.recv().map_err(|_| VaultError::Closed)?
    }

    /// Queues `f` like [`run`](Self::run) without waiting for it: `done`
    /// gets its result on the writer thread, once the enclosing transaction
    /// committed (or failed). Jobs run and commit in the order they were
    /// queued, so a job queued later, waited for or not, commits with this
    /// one or after it. A closed store hands `done` [`VaultError::Closed`]
    /// at once.
    pub(crate) fn submit<T, F, D>(&self, f: F, done: D)
    where
        T: Send + 'static,
        F: FnOnce(&Connection, &mut Vec<AuditRecord>) -> Result<T, VaultError> + Send + 'static,
        D: FnOnce(Result<T, VaultError>) + Send + 'static,
    {
        // Either the job completes or it is aborted, never both: the one
        // that runs takes `done`.
        let done = Arc::new(Mutex::new(Some(done)));
        let abort_done = Arc::clone(&done);
        let take =
            |slot: &Mutex<Option<D>>| slot.lock().unwrap_or_else(PoisonError::into_inner).take();
        let job = Job {
            run: Box::new(move |conn, pending| {
                let result = f(conn, pending);
                let keep = result.is_ok();
                let complete: Completion = Box::new(move |commit| {
                    let out = match (result, commit) {
                        (Ok(v), Ok(())) => Ok(v),
                        // Committing failed: the value (possibly a secret) is
                        // dropped here, unseen.
                        (Ok(_), Err(e)) => Err(e),
                        (Err(e), _) => Err(e),
                    };
                    if let Some(done) = take(&done) {
                        done(out);
                    }
                });
                (keep, complete)
            }),
            abort: Box::new(move |e| {
                if let Some(done) = take(&abort_done) {
                    done(Err(e));
                }
            }),
        };
        let unsent = match &self.jobs {
            Some(jobs) => jobs.send(job).err().map(|mpsc::SendError(job)| job),
            None => Some(job),
        };
        if let Some(job) = unsent {
            (job.abort)(VaultError::Closed);
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn migrate(conn: &Connection) -> Result<(), VaultError> {
    let all = migrations();
    let current: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(db_error("read the schema version"))?;
    let supported = all.len() as i64;
    if current > supported {
        return Err(VaultError::SchemaTooNew {
            found: current,
            supported,
        });
    }
    for (i, sql) in all.iter().enumerate().skip(current as usize) {
        conn.execute_batch(&format!(
            "BEGIN IMMEDIATE; {sql} PRAGMA user_version = {}; COMMIT;",
            i + 1
        ))
        .map_err(|source| {
            let _ = conn.execute_batch("ROLLBACK");
            VaultError::Db {
                action: "upgrade the vault schema",
                source,
            }
        })?;
    }
    Ok(())
}

fn writer_loop(mut conn: Connection, jobs: mpsc::Receiver<Job>) {
    // Audit records of revocations that could not be written yet; retried at
    // the start of every batch (revocation never waits on audit).
    let mut pending: Vec<AuditRecord> = Vec::new();
    while let Ok(first) = jobs.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        let tx = match conn.transaction_with_behavior(TransactionBehavior::Immediate) {
            Ok(tx) => tx,
            Err(source) => {
                let msg = source.to_string();
                for job in batch {
                    (job.abort)(VaultError::CommitFailed(msg.clone()));
                }
                continue;
            }
        };
        flush_pending(&tx, &mut pending);
        let mut completions = Vec::with_capacity(batch.len());
        for job in batch {
            if let Err(source) = tx.execute_batch("SAVEPOINT job") {
                (job.abort)(VaultError::Db {
                    action: "begin a savepoint",
                    source,
                });
                continue;
            }
            let (keep, complete) = (job.run)(&tx, &mut pending);
            let end = if keep {
                "RELEASE job"
            } else {
                "ROLLBACK TO job; RELEASE job"
            };
            match tx.execute_batch(end) {
                Ok(()) => completions.push(complete),
                Err(source) => complete(Err(VaultError::Db {
                    action: "end a savepoint",
                    source,
                })),
            }
        }
        let commit = tx.commit().map_err(|source| VaultError::Db {
            action: "commit",
            source,
        });
        match commit {
            Ok(()) => completions.into_iter().for_each(|c| c(Ok(()))),
            Err(e) => {
                let msg = e.to_string();
                completions
                    .into_iter()
                    .for_each(|c| c(Err(VaultError::CommitFailed(msg.clone()))));
            }
        }
    }
}

fn flush_pending(conn: &Connection, pending: &mut Vec<AuditRecord>) {
    if pending.is_empty() {
        return;
    }
    let mut kept = Vec::new();
    for r in pending.drain(..) {
        if try_append(conn, &r).is_err() {
            kept.push(r);
        }
    }
    if !kept.is_empty() {
        tracing::warn!(
            count = kept.len(),
            "audit records still waiting to be written"
        );
    }
    *pending = kept;
}

/// Appends in a nested savepoint so a failed audit write leaves the rest of
/// the job's writes alone; used where the operation must not wait on audit.
pub(crate) fn try_append(conn: &Connection, r: &AuditRecord) -> rusqlite::Result<()> {
    conn.execute_batch("SAVEPOINT audit_try")?;
    match audit::append(conn, r) {
        Ok(_) => conn.execute_batch("RELEASE audit_try"),
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK TO audit_try; RELEASE audit_try");
            Err(e)
        }
    }
}
