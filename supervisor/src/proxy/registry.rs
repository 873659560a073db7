//! Who may reach what, per session, and every open tunnel.
//!
//! **Invariant:** revoking an entry or a session, or an entry reaching its
//! expiry, removes the entry under the registry lock and cancels the token
//! every one of its tunnels selects on — in the same call, without waiting
//! for a poll or for audit. A tunnel registers only while its entry is still
//! present (checked under the same lock), so a connection that was admitted
//! just before a revocation cannot slip through after it.
//!
//! The cut is also done in the kernel before the revoking call returns: the
//! registry holds a duplicate descriptor of both sockets of every tunnel and
//! shuts them down (`shutdown(SHUT_RDWR)`) under the lock, so no byte moves
//! through a revoked tunnel even before its task has been scheduled; the
//! task then resets and closes the sockets.
//!
//! Expiry uses one tokio timer per entry (`sleep_until` on the monotonic
//! clock), so it follows `tokio::time::pause()` in tests. `grant` must be
//! called from within a tokio runtime when the entry has an expiry.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::domain::{DomainPattern, HostName};

use super::events::{FrontEnd, RefusalReason};
use super::policy::choose_entry;

/// Default most concurrent connections (in set-up or open) per session.
pub const DEFAULT_MAX_TUNNELS: usize = 256;

macro_rules! name_type {
    ($(#[$m:meta])* $t:ident) => {
        $(#[$m])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $t(String);
        impl $t {
            pub fn new(s: impl Into<String>) -> Self {
                $t(s.into())
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($t), self.0)
            }
        }
    };
}

name_type!(
    /// A session's identifier.
    SessionId
);
name_type!(
    /// A lease id, or the name of a manifest allow entry.
    EntryId
);

/// What kind of grant an entry is. Holds names only, never secret values.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum EntryKind {
    /// A credential lease for the secret with this name.
    Lease { secret_name: String },
    /// A credential-less allow entry.
    Allow,
}

/// One grant of reachability within a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub id: EntryId,
    pub patterns: Vec<DomainPattern>,
    /// Allowed destination ports; [`Entry::lease`]/[`Entry::allow`] use 443.
    pub ports: Vec<u16>,
    pub kind: EntryKind,
    /// Monotonic expiry; `None` lives until revoked.
    pub expires_at: Option<Instant>,
}

impl Entry {
    pub fn lease(
        id: impl Into<String>,
        secret_name: impl Into<String>,
        patterns: Vec<DomainPattern>,
        expires_at: Option<Instant>,
    ) -> Self {
        Entry {
            id: EntryId::new(id),
            patterns,
            ports: vec![443],
            kind: EntryKind::Lease {
                secret_name: secret_name.into(),
            },
            expires_at,
        }
    }

    pub fn allow(name: impl Into<String>, patterns: Vec<DomainPattern>) -> Self {
        Entry {
            id: EntryId::new(name),
            patterns,
            ports: vec![443],
            kind: EntryKind::Allow,
            expires_at: None,
        }
    }

    pub fn with_ports(mut self, ports: Vec<u16>) -> Self {
        self.ports = ports;
        self
    }

    pub fn with_expiry(mut self, at: Instant) -> Self {
        self.expires_at = Some(at);
        self
    }
}

/// Registry operations that can fail.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    #[error("session `{0}` is not registered with the proxy")]
    UnknownSession(SessionId),
    #[error("entry `{0}` has an expiry but `grant` was called outside a tokio runtime")]
    NoRuntime(EntryId),
    /// The entry was revoked or has expired: a renewal must not bring it back.
    #[error("entry `{0}` is no longer in force (revoked or expired)")]
    Gone(EntryId),
}

/// Why a tunnel's entry was cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CutReason {
    Revoked,
    Expired,
}

/// The signal a tunnel waits on: cancelled once, with a reason set first.
#[derive(Debug, Clone, Default)]
pub struct Cut {
    token: CancellationToken,
    reason: Arc<OnceLock<CutReason>>,
}

impl Cut {
    fn fire(&self, reason: CutReason) {
        let _ = self.reason.set(reason);
        self.token.cancel();
    }

    pub fn is_cut(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Resolves when the entry is cut.
    pub async fn cancelled(&self) {
        self.token.cancelled().await;
    }

    /// Why it was cut; `Revoked` if it was cut without a reason.
    pub fn reason(&self) -> CutReason {
        self.reason.get().copied().unwrap_or(CutReason::Revoked)
    }
}

/// An admitted name, not yet a tunnel.
#[derive(Debug, Clone)]
pub struct Admission {
    pub entry: Arc<Entry>,
    pub cut: Cut,
}

/// Live view of one open tunnel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelSnapshot {
    pub entry: EntryId,
    pub front_end: FrontEnd,
    pub host: HostName,
    pub address: SocketAddr,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub age: std::time::Duration,
}

/// Live view of one session for `ps`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionSnapshot {
    pub session: SessionId,
    pub entries: Vec<EntryId>,
    pub tunnels: Vec<TunnelSnapshot>,
    pub refusals: u64,
}

/// Byte counters shared by a tunnel's copy loop and the registry.
#[derive(Debug, Default)]
pub struct Counters {
    pub up: AtomicU64,
    pub down: AtomicU64,
}

/// A duplicate descriptor of one tunnel socket, kept so a revocation can
/// shut the socket down directly. Holding the duplicate keeps the socket
/// alive, so the descriptor can never refer to a reused number.
#[derive(Debug)]
pub struct ShutdownHandle(socket2::Socket);

impl ShutdownHandle {
    pub fn for_stream(stream: &tokio::net::TcpStream) -> std::io::Result<Self> {
        socket2::SockRef::from(stream)
            .try_clone()
            .map(ShutdownHandle)
    }

    fn shutdown(&self) {
        // NotConnected when the peer already went away: nothing to cut.
        let _ = self.0.shutdown(std::net::Shutdown::Both);
    }
}

#[derive(Debug)]
struct TunnelState {
    entry: EntryId,
    sockets: Arc<[ShutdownHandle]>,
    front_end: FrontEnd,
    host: HostName,
    address: SocketAddr,
    counters: Arc<Counters>,
    started: Instant,
}

#[derive(Debug)]
struct EntryState {
    entry: Arc<Entry>,
    cut: Cut,
    generation: u64,
    timer: Option<AbortHandle>,
}

impl EntryState {
    fn cut(self, reason: CutReason) {
        if let Some(timer) = self.timer {
            timer.abort();
        }
        self.cut.fire(reason);
    }
}

#[derive(Debug)]
struct SessionState {
    entries: BTreeMap<EntryId, EntryState>,
    tunnels: HashMap<u64, TunnelState>,
    slots: Arc<Semaphore>,
    refusals: u64,
}

impl SessionState {
    /// The sockets of every tunnel of `entry` (all when `None`), to shut
    /// down once the registry lock is released.
    fn sockets_of(&self, entry: Option<&EntryId>) -> Vec<Arc<[ShutdownHandle]>> {
        self.tunnels
            .values()
            .filter(|t| entry.is_none_or(|id| *id == t.entry))
            .map(|t| t.sockets.clone())
            .collect()
    }
}

/// Shuts sockets down outside the registry lock (one syscall each), so a
/// large revocation does not stall admissions of other sessions. Callers do
/// it before returning: a revoke call returns only after the kernel has cut.
fn shut_down(all: Vec<Arc<[ShutdownHandle]>>) {
    for sockets in all {
        sockets.iter().for_each(ShutdownHandle::shutdown);
    }
}

#[derive(Debug)]
struct Inner {
    sessions: HashMap<SessionId, SessionState>,
    next_id: u64,
    max_tunnels: usize,
}

/// The proxy's shared, cheaply cloned registry.
#[derive(Debug, Clone)]
pub struct ProxyRegistry {
    inner: Arc<Mutex<Inner>>,
}

impl Default for ProxyRegistry {
    fn default() -> Self {
        Self::new()
    }
}

impl ProxyRegistry {
    pub fn new() -> Self {
        Self::with_max_tunnels(DEFAULT_MAX_TUNNELS)
    }

    /// A registry whose sessions each allow at most `max` concurrent
    /// connections (counted from accept, so slow handshakes count too).
    pub fn with_max_tunnels(max: usize) -> Self {
        ProxyRegistry {
            inner: Arc::new(Mutex::new(Inner {
                sessions: HashMap::new(),
                next_id: 0,
                max_tunnels: max,
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        lock(&self.inner)
    }

    /// Registers a session with no entries. Returns false if it existed.
    pub fn add_session(&self, session: SessionId) -> bool {
        let mut inner = self.lock();
        let max = inner.max_tunnels;
        if inner.sessions.contains_key(&session) {
            return false;
        }
        inner.sessions.insert(
            session,
            SessionState {
                entries: BTreeMap::new(),
                tunnels: HashMap::new(),
                slots: Arc::new(Semaphore::new(max)),
                refusals: 0,
            },
        );
        true
    }

    /// Adds `entry` to `session`. Re-granting an id with the same patterns
    /// and ports (a renewal) keeps its tunnels and only moves the expiry;
    /// any other change cuts the old entry's tunnels first.
    pub fn grant(&self, session: &SessionId, entry: Entry) -> Result<(), RegistryError> {
        // The expiry timer needs a runtime; check before touching state.
        let runtime = match entry.expires_at {
            Some(_) => Some(
                tokio::runtime::Handle::try_current()
                    .map_err(|_| RegistryError::NoRuntime(entry.id.clone()))?,
            ),
            None => None,
        };
        let mut guard = self.lock();
        let inner = &mut *guard;
        inner.next_id += 1;
        let generation = inner.next_id;
        let state = inner
            .sessions
            .get_mut(session)
            .ok_or_else(|| RegistryError::UnknownSession(session.clone()))?;
        let mut to_shut = Vec::new();
        let cut = match state.entries.remove(&entry.id) {
            Some(old) if old.entry.patterns == entry.patterns && old.entry.ports == entry.ports => {
                if let Some(t) = &old.timer {
                    t.abort();
                }
                old.cut.clone()
            }
            Some(old) => {
                old.cut(CutReason::Revoked);
                to_shut = state.sockets_of(Some(&entry.id));
                Cut::default()
            }
            None => Cut::default(),
        };
        let timer = entry.expires_at.zip(runtime).map(|(at, runtime)| {
            let weak = Arc::downgrade(&self.inner);
            let session = session.clone();
            let id = entry.id.clone();
            runtime
                .spawn(async move {
                    tokio::time::sleep_until(at).await;
                    expire(&weak, &session, &id, generation);
                })
                .abort_handle()
        });
        state.entries.insert(
            entry.id.clone(),
            EntryState {
                entry: Arc::new(entry),
                cut,
                generation,
                timer,
            },
        );
        drop(guard);
        shut_down(to_shut);
        Ok(())
    }

    /// Moves the expiry of entry `id` of `session` to `at` (a renewal): its
    /// open tunnels and pending admissions stay valid and are cut at `at`
    /// instead. The expiry only ever moves later — an earlier `at` leaves
    /// it as it is — and an entry that was revoked, or whose expiry has
    /// passed, is never brought back ([`RegistryError::Gone`]). Returns the
    /// expiry in force afterwards (`None` for an entry that never expires).
    pub fn extend_expiry(
        &self,
        session: &SessionId,
        id: &EntryId,
        at: Instant,
    ) -> Result<Option<Instant>, RegistryError> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| RegistryError::NoRuntime(id.clone()))?;
        let mut guard = self.lock();
        let inner = &mut *guard;
        inner.next_id += 1;
        let generation = inner.next_id;
        let state = inner
            .sessions
            .get_mut(session)
            .ok_or_else(|| RegistryError::UnknownSession(session.clone()))?;
        let e = state
            .entries
            .get_mut(id)
            .ok_or_else(|| RegistryError::Gone(id.clone()))?;
        let Some(old) = e.entry.expires_at else {
            return Ok(None);
        };
        // Its timer may be due and waiting for this lock: it has expired.
        if old <= Instant::now() || e.cut.is_cut() {
            return Err(RegistryError::Gone(id.clone()));
        }
        if at <= old {
            return Ok(Some(old));
        }
        if let Some(t) = e.timer.take() {
            t.abort();
        }
        // A new generation, so an old timer that already fired is a no-op.
        e.generation = generation;
        e.entry = Arc::new(Entry {
            expires_at: Some(at),
            ..(*e.entry).clone()
        });
        let weak = Arc::downgrade(&self.inner);
        let (s, i) = (session.clone(), id.clone());
        e.timer = Some(
            runtime
                .spawn(async move {
                    tokio::time::sleep_until(at).await;
                    expire(&weak, &s, &i, generation);
                })
                .abort_handle(),
        );
        Ok(Some(at))
    }

    /// Revokes the entry `id` in whichever session holds it (lease ids are
    /// unique; allow-entry names are not, so revoke those with
    /// [`ProxyRegistry::revoke_entry`]). Returns the number of entries
    /// removed.
    pub fn revoke_lease(&self, id: &EntryId) -> usize {
        let mut inner = self.lock();
        let mut removed = 0;
        let mut to_shut = Vec::new();
        for state in inner.sessions.values_mut() {
            if let Some(e) = state.entries.remove(id) {
                e.cut(CutReason::Revoked);
                to_shut.extend(state.sockets_of(Some(id)));
                removed += 1;
            }
        }
        drop(inner);
        shut_down(to_shut);
        removed
    }

    /// Revokes one entry of one session. Returns whether it existed.
    pub fn revoke_entry(&self, session: &SessionId, id: &EntryId) -> bool {
        let mut inner = self.lock();
        let Some(state) = inner.sessions.get_mut(session) else {
            return false;
        };
        match state.entries.remove(id) {
            Some(e) => {
                e.cut(CutReason::Revoked);
                let to_shut = state.sockets_of(Some(id));
                drop(inner);
                shut_down(to_shut);
                true
            }
            None => false,
        }
    }

    /// Removes the session: cuts every tunnel, refuses every new one.
    pub fn revoke_session(&self, session: &SessionId) -> bool {
        let mut inner = self.lock();
        let removed = inner.sessions.remove(session);
        drop(inner);
        match removed {
            Some(state) => {
                let to_shut = state.sockets_of(None);
                for (_, e) in state.entries {
                    e.cut(CutReason::Revoked);
                }
                shut_down(to_shut);
                true
            }
            None => false,
        }
    }

    /// A connection slot for `session`, held for the connection's life.
    pub fn acquire_slot(&self, session: &SessionId) -> Result<OwnedSemaphorePermit, RefusalReason> {
        let inner = self.lock();
        let state = inner
            .sessions
            .get(session)
            .ok_or(RefusalReason::NotLeased)?;
        state
            .slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| RefusalReason::TooManyTunnels)
    }

    /// The entry admitting `name:port` now, before any DNS query.
    pub fn admit(
        &self,
        session: &SessionId,
        name: &HostName,
        port: u16,
    ) -> Result<Admission, RefusalReason> {
        let inner = self.lock();
        let state = inner
            .sessions
            .get(session)
            .ok_or(RefusalReason::NotLeased)?;
        let entry = choose_entry(
            state.entries.values().map(|e| &*e.entry),
            name,
            port,
            Instant::now(),
        )?;
        let e = &state.entries[&entry.id];
        Ok(Admission {
            entry: e.entry.clone(),
            cut: e.cut.clone(),
        })
    }

    /// Registers an open tunnel, if its entry is still in force. The returned
    /// guard unregisters it on drop.
    pub fn register_tunnel(
        &self,
        session: &SessionId,
        admission: &Admission,
        front_end: FrontEnd,
        host: HostName,
        address: SocketAddr,
        sockets: Vec<ShutdownHandle>,
    ) -> Result<TunnelGuard, RefusalReason> {
        let mut guard = self.lock();
        let inner = &mut *guard;
        inner.next_id += 1;
        let id = inner.next_id;
        let state = inner
            .sessions
            .get_mut(session)
            .ok_or(RefusalReason::NotLeased)?;
        let live = state
            .entries
            .get(&admission.entry.id)
            .is_some_and(|e| Arc::ptr_eq(&e.cut.reason, &admission.cut.reason));
        if !live || admission.cut.is_cut() {
            return Err(RefusalReason::NotLeased);
        }
        let counters = Arc::new(Counters::default());
        state.tunnels.insert(
            id,
            TunnelState {
                entry: admission.entry.id.clone(),
                sockets: sockets.into(),
                front_end,
                host,
                address,
                counters: counters.clone(),
                started: Instant::now(),
            },
        );
        Ok(TunnelGuard {
            registry: Arc::downgrade(&self.inner),
            session: session.clone(),
            id,
            counters,
        })
    }

    /// Counts a refusal for `ps`.
    pub fn count_refusal(&self, session: &SessionId) {
        if let Some(s) = self.lock().sessions.get_mut(session) {
            s.refusals += 1;
        }
    }

    pub fn snapshot(&self, session: &SessionId) -> Option<SessionSnapshot> {
        let inner = self.lock();
        inner.sessions.get(session).map(|s| snapshot(session, s))
    }

    pub fn snapshot_all(&self) -> Vec<SessionSnapshot> {
        let inner = self.lock();
        let mut all: Vec<_> = inner
            .sessions
            .iter()
            .map(|(id, s)| snapshot(id, s))
            .collect();
        all.sort_by(|a, b| a.session.cmp(&b.session));
        all
    }
}

fn lock(inner: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    // The registry's invariants hold between statements; a panic in another
    // thread while holding the lock must not stop revocation.
    inner.lock().unwrap_or_else(|p| p.into_inner())
}

fn snapshot(id: &SessionId, s: &SessionState) -> SessionSnapshot {
    let now = Instant::now();
    let mut tunnels: Vec<_> = s
        .tunnels
        .values()
        .map(|t| TunnelSnapshot {
            entry: t.entry.clone(),
            front_end: t.front_end,
            host: t.host.clone(),
            address: t.address,
            bytes_up: t.counters.up.load(Ordering::Relaxed),
            bytes_down: t.counters.down.load(Ordering::Relaxed),
            age: now.saturating_duration_since(t.started),
        })
        .collect();
    tunnels.sort_by(|a, b| (&a.entry, &a.host, a.address).cmp(&(&b.entry, &b.host, b.address)));
    SessionSnapshot {
        session: id.clone(),
        entries: s.entries.keys().cloned().collect(),
        tunnels,
        refusals: s.refusals,
    }
}

fn expire(weak: &Weak<Mutex<Inner>>, session: &SessionId, id: &EntryId, generation: u64) {
    let Some(inner) = weak.upgrade() else { return };
    let mut inner = lock(&inner);
    let mut to_shut = Vec::new();
    let Some(state) = inner.sessions.get_mut(session) else {
        return;
    };
    if state
        .entries
        .get(id)
        .is_some_and(|e| e.generation == generation)
        && let Some(mut e) = state.entries.remove(id)
    {
        // This task is the timer; aborting it from itself is pointless.
        e.timer = None;
        e.cut(CutReason::Expired);
        to_shut = state.sockets_of(Some(id));
    }
    drop(inner);
    shut_down(to_shut);
}

/// An open tunnel's registration; dropping it unregisters the tunnel.
#[derive(Debug)]
pub struct TunnelGuard {
    registry: Weak<Mutex<Inner>>,
    session: SessionId,
    id: u64,
    counters: Arc<Counters>,
}

impl TunnelGuard {
    pub fn counters(&self) -> &Arc<Counters> {
        &self.counters
    }
}

impl Drop for TunnelGuard {
    fn drop(&mut self) {
        if let Some(inner) = self.registry.upgrade()
            && let Some(s) = lock(&inner).sessions.get_mut(&self.session)
        {
            s.tunnels.remove(&self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn pats(p: &[&str]) -> Vec<DomainPattern> {
        p.iter().map(|s| DomainPattern::parse(s).unwrap()).collect()
    }

    fn sid(s: &str) -> SessionId {
        SessionId::new(s)
    }

    fn host(s: &str) -> HostName {
        HostName::parse(s).unwrap()
    }

    fn addr() -> SocketAddr {
        "127.0.0.1:443".parse().unwrap()
    }

    #[tokio::test]
    async fn sessions_do_not_share_entries() {
        let r = ProxyRegistry::new();
        r.add_session(sid("a"));
        r.add_session(sid("b"));
        r.grant(&sid("a"), Entry::allow("gh", pats(&["github.com"])))
            .unwrap();
        assert!(r.admit(&sid("a"), &host("github.com"), 443).is_ok());
        assert_eq!(
            r.admit(&sid("b"), &host("github.com"), 443).unwrap_err(),
            RefusalReason::NotLeased
        );
        assert_eq!(
            r.admit(&sid("c"), &host("github.com"), 443).unwrap_err(),
            RefusalReason::NotLeased
        );
        assert_eq!(
            r.grant(&sid("c"), Entry::allow("x", vec![])),
            Err(RegistryError::UnknownSession(sid("c")))
        );
    }

    #[tokio::test]
    async fn revoke_cuts_tunnels_and_refuses_new_ones() {
        let r = ProxyRegistry::new();
        r.add_session(sid("s"));
        r.grant(
            &sid("s"),
            Entry::lease("l1", "gh-token", pats(&["*.github.com"]), None),
        )
        .unwrap();
        let adm = r.admit(&sid("s"), &host("api.github.com"), 443).unwrap();
        let guard = r
            .register_tunnel(
                &sid("s"),
                &adm,
                FrontEnd::Explicit,
                host("api.github.com"),
                addr(),
                vec![],
            )
            .unwrap();
        assert_eq!(r.snapshot(&sid("s")).unwrap().tunnels.len(), 1);
        assert_eq!(r.revoke_lease(&EntryId::new("l1")), 1);
        assert!(adm.cut.is_cut());
        assert_eq!(adm.cut.reason(), CutReason::Revoked);
        assert_eq!(
            r.admit(&sid("s"), &host("api.github.com"), 443)
                .unwrap_err(),
            RefusalReason::NotLeased
        );
        // An admission taken before the revocation cannot register after it.
        assert_eq!(
            r.register_tunnel(
                &sid("s"),
                &adm,
                FrontEnd::Explicit,
                host("api.github.com"),
                addr(),
                vec![]
            )
            .unwrap_err(),
            RefusalReason::NotLeased
        );
        drop(guard);
        assert!(r.snapshot(&sid("s")).unwrap().tunnels.is_empty());
    }

    #[tokio::test]
    async fn revoke_session_cuts_everything() {
        let r = ProxyRegistry::new();
        r.add_session(sid("s"));
        r.grant(&sid("s"), Entry::allow("a", pats(&["a.example"])))
            .unwrap();
        r.grant(&sid("s"), Entry::allow("b", pats(&["b.example"])))
            .unwrap();
        let a = r.admit(&sid("s"), &host("a.example"), 443).unwrap();
        let b = r.admit(&sid("s"), &host("b.example"), 443).unwrap();
        assert!(r.revoke_session(&sid("s")));
        assert!(a.cut.is_cut() && b.cut.is_cut());
        assert!(r.acquire_slot(&sid("s")).is_err());
        assert!(!r.revoke_session(&sid("s")));
    }

    #[tokio::test(start_paused = true)]
    async fn expiry_fires_on_the_monotonic_clock() {
        let r = ProxyRegistry::new();
        r.add_session(sid("s"));
        let at = Instant::now() + Duration::from_secs(300);
        r.grant(
            &sid("s"),
            Entry::lease("l", "tok", pats(&["a.example"]), Some(at)),
        )
        .unwrap();
        let adm = r.admit(&sid("s"), &host("a.example"), 443).unwrap();
        let _t = r
            .register_tunnel(
                &sid("s"),
                &adm,
                FrontEnd::Transparent,
                host("a.example"),
                addr(),
                vec![],
            )
            .unwrap();
        tokio::time::advance(Duration::from_secs(299)).await;
        assert!(!adm.cut.is_cut());
        tokio::time::advance(Duration::from_secs(1)).await;
        // Let the timer task run.
        tokio::task::yield_now().await;
        assert!(adm.cut.is_cut());
        assert_eq!(adm.cut.reason(), CutReason::Expired);
        assert!(r.snapshot(&sid("s")).unwrap().entries.is_empty());
        assert!(r.admit(&sid("s"), &host("a.example"), 443).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn renewal_keeps_tunnels_and_moves_expiry() {
        let r = ProxyRegistry::new();
        r.add_session(sid("s"));
        let e = Entry::lease("l", "tok", pats(&["a.example"]), None);
        r.grant(
            &sid("s"),
            e.clone()
                .with_expiry(Instant::now() + Duration::from_secs(10)),
        )
        .unwrap();
        let adm = r.admit(&sid("s"), &host("a.example"), 443).unwrap();
        r.grant(
            &sid("s"),
            e.clone()
                .with_expiry(Instant::now() + Duration::from_secs(100)),
        )
        .unwrap();
        tokio::time::advance(Duration::from_secs(50)).await;
        tokio::task::yield_now().await;
        assert!(
            !adm.cut.is_cut(),
            "the old timer must not expire the renewed entry"
        );
        // Narrowing the scope is not a renewal: old tunnels are cut.
        r.grant(&sid("s"), e.with_ports(vec![8443])).unwrap();
        assert!(adm.cut.is_cut());
    }

    fn tunnel(r: &ProxyRegistry, adm: &Admission) -> TunnelGuard {
        r.register_tunnel(
            &sid("s"),
            adm,
            FrontEnd::Explicit,
            host("a.example"),
            addr(),
            vec![],
        )
        .unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn extended_entry_survives_the_old_deadline_and_is_cut_at_the_new() {
        let r = ProxyRegistry::new();
        r.add_session(sid("s"));
        let t0 = Instant::now();
        r.grant(
            &sid("s"),
            Entry::lease(
                "l",
                "tok",
                pats(&["a.example"]),
                Some(t0 + Duration::from_secs(40)),
            ),
        )
        .unwrap();
        let adm = r.admit(&sid("s"), &host("a.example"), 443).unwrap();
        let _t = tunnel(&r, &adm);
        tokio::time::advance(Duration::from_secs(20)).await;
        let new = t0 + Duration::from_secs(100);
        assert_eq!(
            r.extend_expiry(&sid("s"), &EntryId::new("l"), new),
            Ok(Some(new))
        );
        // Past the old deadline: the tunnel lives and new names are admitted.
        tokio::time::advance(Duration::from_secs(30)).await;
        tokio::task::yield_now().await;
        assert!(!adm.cut.is_cut(), "cut at the old deadline");
        let later = r.admit(&sid("s"), &host("a.example"), 443).unwrap();
        // An admission taken before the move still registers.
        let _t2 = tunnel(&r, &later);
        // Just before the new deadline, still alive; at it, cut as expired.
        tokio::time::advance(Duration::from_secs(49)).await;
        tokio::task::yield_now().await;
        assert!(!adm.cut.is_cut());
        tokio::time::advance(Duration::from_secs(1)).await;
        tokio::task::yield_now().await;
        assert!(adm.cut.is_cut() && later.cut.is_cut());
        assert_eq!(adm.cut.reason(), CutReason::Expired);
        assert!(r.admit(&sid("s"), &host("a.example"), 443).is_err());
        // Expired is gone for good: no renewal brings it back.
        assert_eq!(
            r.extend_expiry(&sid("s"), &EntryId::new("l"), new + Duration::from_secs(60)),
            Err(RegistryError::Gone(EntryId::new("l")))
        );
        assert!(r.admit(&sid("s"), &host("a.example"), 443).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn revoke_still_cuts_at_once_after_an_extension() {
        let r = ProxyRegistry::new();
        r.add_session(sid("s"));
        let t0 = Instant::now();
        r.grant(
            &sid("s"),
            Entry::lease(
                "l",
                "tok",
                pats(&["a.example"]),
                Some(t0 + Duration::from_secs(40)),
            ),
        )
        .unwrap();
        let adm = r.admit(&sid("s"), &host("a.example"), 443).unwrap();
        let _t = tunnel(&r, &adm);
        r.extend_expiry(&sid("s"), &EntryId::new("l"), t0 + Duration::from_secs(400))
            .unwrap();
        assert_eq!(r.revoke_lease(&EntryId::new("l")), 1);
        assert!(adm.cut.is_cut());
        assert_eq!(adm.cut.reason(), CutReason::Revoked);
        // A revoked entry cannot be renewed back into force.
        assert_eq!(
            r.extend_expiry(&sid("s"), &EntryId::new("l"), t0 + Duration::from_secs(800)),
            Err(RegistryError::Gone(EntryId::new("l")))
        );
        assert!(r.admit(&sid("s"), &host("a.example"), 443).is_err());
        // Nor does the timer of the extension fire on anything later.
        tokio::time::advance(Duration::from_secs(500)).await;
        tokio::task::yield_now().await;
        assert!(r.snapshot(&sid("s")).unwrap().entries.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn extension_never_shortens_and_needs_a_known_entry() {
        let r = ProxyRegistry::new();
        r.add_session(sid("s"));
        let t0 = Instant::now();
        let at = t0 + Duration::from_secs(60);
        r.grant(
            &sid("s"),
            Entry::lease("l", "tok", pats(&["a.example"]), Some(at)),
        )
        .unwrap();
        r.grant(&sid("s"), Entry::allow("open", pats(&["b.example"])))
            .unwrap();
        let id = EntryId::new("l");
        // Earlier or equal: unchanged, and the original timer still fires.
        assert_eq!(
            r.extend_expiry(&sid("s"), &id, t0 + Duration::from_secs(10)),
            Ok(Some(at))
        );
        assert_eq!(r.extend_expiry(&sid("s"), &id, at), Ok(Some(at)));
        // An entry without expiry stays without.
        assert_eq!(
            r.extend_expiry(&sid("s"), &EntryId::new("open"), at),
            Ok(None)
        );
        // Unknown entry, unknown session.
        assert_eq!(
            r.extend_expiry(&sid("s"), &EntryId::new("nope"), at),
            Err(RegistryError::Gone(EntryId::new("nope")))
        );
        assert_eq!(
            r.extend_expiry(&sid("x"), &id, at),
            Err(RegistryError::UnknownSession(sid("x")))
        );
        // Another session's entry of the same id is not touched.
        r.add_session(sid("t"));
        assert_eq!(
            r.extend_expiry(&sid("t"), &id, at + Duration::from_secs(1)),
            Err(RegistryError::Gone(id.clone()))
        );
        tokio::time::advance(Duration::from_secs(60)).await;
        tokio::task::yield_now().await;
        assert!(r.admit(&sid("s"), &host("a.example"), 443).is_err());
        // A due entry whose timer has not run yet counts as expired.
        let due = Instant::now() + Duration::from_secs(5);
        r.grant(
            &sid("s"),
            Entry::lease("m", "tok", pats(&["c.example"]), Some(due)),
        )
        .unwrap();
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(
            r.extend_expiry(&sid("s"), &EntryId::new("m"), due + Duration::from_secs(60)),
            Err(RegistryError::Gone(EntryId::new("m")))
        );
    }

    #[test]
    fn extension_outside_a_runtime_is_an_error() {
        let r = ProxyRegistry::new();
        r.add_session(sid("s"));
        assert_eq!(
            r.extend_expiry(&sid("s"), &EntryId::new("l"), Instant::now()),
            Err(RegistryError::NoRuntime(EntryId::new("l")))
        );
    }

    #[test]
    fn expiring_grant_outside_a_runtime_is_an_error_not_a_panic() {
        let r = ProxyRegistry::new();
        r.add_session(sid("s"));
        let at = Instant::now() + Duration::from_secs(1);
        let e = Entry::lease("l", "tok", pats(&["a.example"]), Some(at));
        assert_eq!(
            r.grant(&sid("s"), e),
            Err(RegistryError::NoRuntime(EntryId::new("l")))
        );
        // Without an expiry no runtime is needed.
        r.grant(&sid("s"), Entry::allow("a", pats(&["a.example"])))
            .unwrap();
        assert_eq!(
            r.snapshot(&sid("s")).unwrap().entries,
            vec![EntryId::new("a")]
        );
    }

    #[tokio::test]
    async fn slots_are_bounded() {
        let r = ProxyRegistry::with_max_tunnels(2);
        r.add_session(sid("s"));
        let a = r.acquire_slot(&sid("s")).unwrap();
        let _b = r.acquire_slot(&sid("s")).unwrap();
        assert_eq!(
            r.acquire_slot(&sid("s")).unwrap_err(),
            RefusalReason::TooManyTunnels
        );
        drop(a);
        assert!(r.acquire_slot(&sid("s")).is_ok());
    }
}
