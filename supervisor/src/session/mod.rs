//! One agent session, end to end: leases from the vault, the jail, the
//! proxy, the VM, provisioning through the guest agent, the agent's output
//! and exit code, and cleanup.
//!
//! **Invariant:** cleanup — revoke every lease, stop the proxy (its tunnels
//! are cut by the revocation), destroy QEMU, delete the jail (nftables table
//! and tap), remove the runtime directory — runs exactly once, after the
//! session's future has ended for whatever reason: the agent exited, an
//! error, Ctrl-C, SIGTERM, or the manifest's timeout. Every state change is
//! an audit record. On a timeout or a signal, a session whose agent runs
//! with a workspace first revokes its leases and stops the agent, so the
//! guest brings the workspace back, for at most [`COLLECT_GRACE`]; cleanup
//! follows either way.
//!
//! Layout: this file is the state machine and the message loop; the
//! features hang off it in their own modules — `progress` (the phase clock),
//! `provision` (what the guest gets), `leases` (renewal, `renew: auto`,
//! rotation pushed into the guest), `workspace` (copy in, changes out),
//! `tty` and `attach` (the user's terminal, detached sessions), `log` (the
//! output log), `stats` (live numbers for `ps`), `report` (the end-of-session
//! report), and `record` (the session's file, for `ps` and the reaper).

pub mod attach;
pub mod leases;
pub mod log;
pub mod progress;
mod provision;
pub mod record;
pub mod report;
pub mod stats;
pub mod tty;
pub mod workspace;

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use zerolease_protocol::{
    CredentialOutcome, GuestMessage, HostMessage, MAX_FRAME_LEN, Message, OutputStream,
};

use crate::domain::HostName;
use crate::home::StateDir;
use crate::image::{self, VerifiedImage};
use crate::jail::{self, DEFAULT_POOL, Jail, JailConfig, JailId, Link, ProxyPorts};
use crate::manifest::{Inject, Manifest};
use crate::proxy::addr::AllowedCidrs;
use crate::proxy::registry::{Entry, ProxyRegistry, SessionId};
use crate::proxy::resolve::{OverrideResolver, SystemResolver};
use crate::proxy::server::{ProxyConfig, ProxyState, SessionListeners, run_session};
use crate::proxy_audit::VaultProxyEvents;
use crate::vault::{
    AuditKind, AuditRecord, Lease, LeaseAsk, LeaseRequest, Outcome, RevokeScope, Vault, VaultError,
};
use crate::vm::argv::{AccelKind, DirectBoot, Mac, Machine, NetSpec, VmSpec};
use crate::vm::process::Vm;

/// The proxy ports on the host side of every session's link.
pub const PORTS: ProxyPorts = ProxyPorts {
    connect: 3128,
    transparent: 3129,
};

/// How to run a session.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub home: StateDir,
    /// Where images live (default: `images/out` of the source tree, or
    /// `ZEROLEASE_IMAGES`).
    pub images: Option<PathBuf>,
    /// The agent name the policy is checked for (default: the manifest's name).
    pub agent: Option<String>,
    /// Replaces the manifest's command.
    pub command: Option<Vec<String>>,
    /// Bound on the guest's hello, per accelerator tried.
    pub hello_bound: Duration,
    /// Copied into the VM; replaces the manifest's `workspace`.
    pub workspace: Option<PathBuf>,
    /// Attach this process's terminal to the agent through a pty in the
    /// guest (see `tty`); `None` runs it with piped output.
    pub tty: Option<zerolease_protocol::TtySpec>,
    /// With `tty`: serve the terminal on `attach.sock` for `zerolease
    /// attach` instead of this process's terminal (`run --detach`).
    pub detached: bool,
}

/// How a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunOutcome {
    pub session: String,
    /// The agent's exit code, or `None` when it was killed by a signal or
    /// never ran.
    pub code: Option<i32>,
    pub signal: Option<i32>,
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Image(#[from] image::ImageError),
    #[error(transparent)]
    Vault(#[from] VaultError),
    #[error("credential `{secret}`: {source}")]
    Lease {
        secret: String,
        #[source]
        source: VaultError,
    },
    #[error(transparent)]
    Jail(#[from] jail::JailError),
    #[error("cannot open the session's tap")]
    Tap(#[from] jail::tap::TapError),
    #[error("cannot start the session's proxy on {addr}")]
    ProxyBind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot find QEMU; install it with `apt-get install qemu-system-x86`")]
    Qemu(#[source] crate::vm::process::SpawnError),
    #[error(transparent)]
    Boot(#[from] crate::vm::watchdog::BootError),
    #[error("cannot create the runtime directory {}", path.display())]
    RuntimeDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("provisioning failed: {0}")]
    Provision(String),
    #[error("the control channel to the guest failed: {0}")]
    Channel(String),
    #[error("cannot set up the session: {0}")]
    Setup(String),
    #[error("the guest went away before the agent exited")]
    GuestGone,
    #[error("the session timed out after {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    #[error("the session was interrupted ({0})")]
    Interrupted(&'static str),
    #[error("the session was destroyed by `zerolease destroy`")]
    Destroyed,
    #[error(transparent)]
    Workspace(#[from] workspace::WorkspaceError),
    #[error("the session was stopped from its terminal (~.)")]
    Escaped,
    #[error(transparent)]
    Tty(#[from] tty::TtyError),
}

/// What another `zerolease` process may ask of a running session over its
/// control socket, as one word on a line. Lease requests (`renew`, a
/// rotated secret) are JSON lines, parsed by [`leases::Request`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Revoke every lease: tunnels are cut, the agent is offline, the VM stays.
    Revoke,
    /// Revoke and tear everything down.
    Destroy,
    /// Answer one JSON line of live numbers ([`stats::LiveStats`]).
    Stats,
}

impl Control {
    pub fn parse(line: &str) -> Option<Control> {
        match line.trim() {
            "revoke" => Some(Control::Revoke),
            "destroy" => Some(Control::Destroy),
            "stats" => Some(Control::Stats),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Control::Revoke => "revoke",
            Control::Destroy => "destroy",
            Control::Stats => "stats",
        }
    }
}

/// What cleanup has to undo. Filled in as the session goes.
#[derive(Default)]
struct Held {
    session: Option<String>,
    record: Option<(StateDir, record::SessionRecord)>,
    jail: Option<Jail>,
    vm: Option<Vm>,
    proxy: Option<(CancellationToken, tokio::task::JoinHandle<()>)>,
    registry: Option<ProxyRegistry>,
    runtime_dir: Option<PathBuf>,
    progress: progress::Progress,
    /// The agent's output on disk (opened once the session has an id).
    log: log::SessionLog,
}

fn record(vault: &Vault, session: &str, state: &str, detail: String) {
    if let Err(e) = vault.audit_append(transition_record(vault, session, state, detail)) {
        tracing::warn!("could not record the session's {state} transition: {e}");
    }
}

fn transition_record(vault: &Vault, session: &str, state: &str, detail: String) -> AuditRecord {
    AuditRecord::new(vault.now(), AuditKind::SessionTransition, Outcome::Ok)
        .session(session)
        .detail(format!("{state}: {detail}"))
}

impl Held {
    /// Records a state change in the audit log and the session's record.
    fn transition(&mut self, vault: &Vault, state: &str, detail: String) {
        if let Some(id) = &self.session {
            record(vault, id, state, detail);
        }
        self.save(|r| r.state = state.to_owned());
    }

    /// The audit half of [`transition`](Self::transition), queued without
    /// waiting for its commit (an fsync: a few milliseconds, hundreds while
    /// the disk is busy writing back), for a step that must not wait for
    /// it. Records commit in order, so every record made after this one,
    /// waited for or not, lands after it in the log. The caller saves the
    /// state in the session's record when it can wait.
    fn record_queued(&self, vault: &Vault, state: &str, detail: String) {
        if let Some(id) = &self.session {
            let state_name = state.to_owned();
            vault.audit_append_queued(transition_record(vault, id, state, detail), move |e| {
                tracing::warn!("could not record the session's {state_name} transition: {e}");
            });
        }
    }

    /// Revokes every lease of the running session, in the vault and in the
    /// proxy (its tunnels are cut), and records the `revoked` state with
    /// the detail `detail` makes of the count. Returns that count.
    fn revoke_leases(&mut self, vault: &Vault, detail: impl FnOnce(usize) -> String) -> usize {
        let Some(session) = self.session.clone() else {
            return 0;
        };
        let revoked = vault.revoke(RevokeScope::Session(session.clone()));
        if let Some(r) = &self.registry {
            r.revoke_session(&SessionId::new(&session));
        }
        let n = revoked.as_ref().map_or(0, Vec::len);
        self.transition(vault, "revoked", detail(n));
        n
    }

    fn save(&mut self, change: impl FnOnce(&mut record::SessionRecord)) {
        if let Some((home, r)) = &mut self.record {
            change(r);
            if let Err(e) = r.save(home) {
                tracing::warn!("could not write the session record: {e}");
            }
        }
    }
}

/// Runs `manifest` as a session in the foreground, writing the agent's
/// output to `stdout`/`stderr`, and returns how the agent ended. Cleanup has
/// run when this returns, on every path.
pub async fn run(
    vault: Arc<Vault>,
    manifest: Manifest,
    config: RunConfig,
    stdout: &mut (dyn Write + Send),
    stderr: &mut (dyn Write + Send),
) -> Result<RunOutcome, SessionError> {
    let quiet = progress::Progress::default();
    run_reported(vault, manifest, config, quiet, stdout, stderr)
        .await
        .result
}

/// How long a session that timed out or was interrupted waits for its
/// agent to stop and its workspace to come back before the teardown.
pub const COLLECT_GRACE: Duration = Duration::from_secs(60);

/// How [`run_reported`] asks [`drive`] to stop the agent and bring back its
/// workspace (the reason, once), and learns whether there is one to bring
/// back: `serving` is set once the agent runs with a workspace.
struct Stop<'a> {
    asked: tokio::sync::watch::Receiver<Option<String>>,
    serving: &'a AtomicBool,
}

/// A finished run: how it ended and its report (`None` only when it failed
/// before it had a session id, e.g. on the image check).
#[derive(Debug)]
pub struct Finished {
    pub result: Result<RunOutcome, SessionError>,
    pub report: Option<report::SessionReport>,
}

/// [`run`], showing each start-up phase on `progress`, and building,
/// storing and returning the end-of-session report.
pub async fn run_reported(
    vault: Arc<Vault>,
    manifest: Manifest,
    config: RunConfig,
    progress: progress::Progress,
    stdout: &mut (dyn Write + Send),
    stderr: &mut (dyn Write + Send),
) -> Finished {
    let mut held = Held {
        progress,
        ..Held::default()
    };
    let timeout = manifest.timeout;
    let interactive = config.tty.is_some();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(None);
    let serving = AtomicBool::new(false);
    let result = {
        let (mut out, mut err) = (
            log::Tee {
                out: stdout,
                log: held.log.clone(),
            },
            log::Tee {
                out: stderr,
                log: held.log.clone(),
            },
        );
        let stop = Stop {
            asked: stop_rx,
            serving: &serving,
        };
        let drive = drive(
            &vault, &manifest, &config, &mut held, &mut out, &mut err, stop,
        );
        tokio::pin!(drive);
        let ended = tokio::select! {
            r = &mut drive => Ok(r),
            _ = tokio::time::sleep(timeout) => Err(SessionError::Timeout(timeout)),
            _ = interrupted(interactive) => Err(SessionError::Interrupted("signal")),
        };
        match ended {
            Ok(r) => r,
            Err(why) => {
                // An agent with a workspace is stopped and its work brought
                // back before the teardown, within a bound; a second signal
                // skips that. The session still ends for `why`.
                if serving.load(Ordering::SeqCst) {
                    // No receiver left means `serve` has returned already
                    // and the result is being collected: wait for it all
                    // the same.
                    let _ = stop_tx.send(Some(why.to_string()));
                    tokio::select! {
                        _ = &mut drive => {}
                        _ = tokio::time::sleep(COLLECT_GRACE) => {}
                        _ = interrupted(interactive) => {}
                    }
                }
                Err(why)
            }
        }
    };
    held.progress.end(report::ran_through(&result));
    held.progress.phase(progress::Phase::Cleanup);
    cleanup(&vault, &mut held).await;
    held.progress.end(true);
    let (state, detail) = match &result {
        Ok(o) => (
            "destroyed",
            format!("agent exit code {:?}, signal {:?}", o.code, o.signal),
        ),
        Err(SessionError::Destroyed) => ("destroyed", "by zerolease destroy".to_owned()),
        Err(SessionError::Escaped) => ("destroyed", "stopped with ~. from its terminal".to_owned()),
        Err(e) => ("failed", e.to_string()),
    };
    let code = result.as_ref().ok().and_then(|o| o.code);
    held.save(|r| r.exit_code = code);
    held.transition(&vault, state, detail);
    let report = report::finish(&vault, &held, &result).await;
    Finished { result, report }
}

/// SIGTERM, SIGHUP (the terminal went away) and, unless the session is
/// interactive, SIGINT. In an interactive session the terminal is raw, so
/// Ctrl-C is a byte for the agent; a SIGINT from `kill` is ignored.
async fn interrupted(interactive: bool) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
    ) else {
        return std::future::pending().await;
    };
    // Always caught (the default action would kill us without cleanup and
    // leave the terminal raw); in an interactive session then ignored.
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
        if interactive {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        _ = ctrl_c => {}
        _ = term.recv() => {}
        _ = hup.recv() => {}
    }
}

/// Undoes everything `drive` set up, in reverse order of risk: leases and
/// tunnels first, so nothing usable outlives the session even if a later
/// step fails; each step is idempotent and runs even when an earlier one
/// failed.
async fn cleanup(vault: &Arc<Vault>, held: &mut Held) {
    let Some(id) = held.session.clone() else {
        return;
    };
    if let Err(e) = vault.revoke(RevokeScope::Session(id.clone())) {
        tracing::warn!("revoking the session's leases: {e}");
    }
    if let Some(registry) = &held.registry {
        registry.revoke_session(&SessionId::new(&id));
    }
    if let Some((token, task)) = held.proxy.take() {
        token.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
    }
    if let Some(mut vm) = held.vm.take()
        && let Err(e) = vm.destroy(Duration::from_secs(3)).await
    {
        tracing::warn!("destroying the VM: {e}");
    }
    if let Some(mut jail) = held.jail.take()
        && let Err(e) = jail.destroy().await
    {
        tracing::warn!("deleting the jail: {e}");
    }
    if let Some(dir) = held.runtime_dir.take() {
        let _ = std::fs::remove_dir_all(dir);
    }
    if let Some((home, _)) = &held.record
        && let Err(e) = log::keep_tail(&log::console_path(home, &id), log::CONSOLE_LIMIT)
    {
        tracing::warn!("cannot trim the console log: {e}");
    }
}

async fn drive(
    vault: &Arc<Vault>,
    manifest: &Manifest,
    config: &RunConfig,
    held: &mut Held,
    stdout: &mut (dyn Write + Send),
    stderr: &mut (dyn Write + Send),
    stop: Stop<'_>,
) -> Result<RunOutcome, SessionError> {
    held.progress.phase(progress::Phase::ImageCheck);
    let image: VerifiedImage = image::verify_named_with(
        &manifest.image,
        config.images.as_deref(),
        Some(&image::DigestCache::in_state_dir(config.home.root())),
    )?;
    let ws = workspace::for_session(manifest, config.workspace.as_deref())?;
    if let Some(w) = &ws {
        workspace::announce(w, stderr);
    }
    let id = JailId::parse(&crate::vault::crypto::random_hex(5).map_err(VaultError::from)?)?;
    let session = id.as_str().to_owned();
    held.session = Some(session.clone());
    let runtime_dir = config.home.root().join("run").join(&session);
    held.record = Some((
        config.home.clone(),
        record::SessionRecord {
            id: session.clone(),
            name: manifest.name.clone(),
            image: image.name.clone(),
            pid: std::process::id(),
            started: vault.now(),
            state: "created".into(),
            runtime_dir: runtime_dir.clone(),
            jail: None,
            qemu_pid: None,
            exit_code: None,
            workspace: ws.as_ref().map(|w| w.root.clone()),
        },
    ));
    if let Err(e) = held.log.open(&config.home, &session) {
        tracing::warn!("cannot create the session's output log: {e}");
    }
    held.transition(
        vault,
        "created",
        format!("manifest {}, image {}", manifest.name, image.name),
    );

    // Leases first: if policy says no, nothing else is built.
    held.progress.phase(progress::Phase::Leases);
    let agent = config
        .agent
        .clone()
        .unwrap_or_else(|| manifest.name.clone());
    let mut leases: Vec<(usize, Lease)> = Vec::new();
    for (i, c) in manifest.credentials.iter().enumerate() {
        let lease = vault
            .grant(LeaseRequest {
                agent: agent.clone(),
                session: session.clone(),
                secret: c.secret.clone(),
                ask: LeaseAsk {
                    domains: c.domains.clone(),
                    ttl: c.ttl,
                    max_uses: c.max_uses,
                },
            })
            .map_err(|source| SessionError::Lease {
                secret: c.secret.clone(),
                source,
            })?;
        leases.push((i, lease));
    }

    held.transition(vault, "booting", "jail, proxy, VM".into());
    held.progress.phase(progress::Phase::Jail);
    // The link is made down; its rules load while QEMU starts, below.
    let jail = Jail::create_down(JailConfig {
        id: id.clone(),
        link: Link::Tap {
            owner: nix::unistd::Uid::effective(),
        },
        pool: DEFAULT_POOL
            .parse()
            .map_err(|e| SessionError::Setup(format!("the default address pool: {e}")))?,
        ports: PORTS,
        dns_port: None,
    })
    .await?;
    let host = jail.record().host;
    let guest = jail.record().guest;
    let link = jail.record().interface.clone();
    let jail_record = jail.record().clone();
    held.save(|r| r.jail = Some(jail_record));
    held.jail = Some(jail);

    held.progress.phase(progress::Phase::Proxy);
    let registry = start_proxy(vault, manifest, &session, &leases, host, held).await?;
    // Renews `renew: auto` leases until this function returns.
    let _auto_renew = leases::AutoRenewer::spawn(
        vault.clone(),
        registry.clone(),
        session.clone(),
        leases::auto_jobs(manifest, &leases),
    );
    held.registry = Some(registry);

    held.progress.phase(progress::Phase::VmSetup);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&runtime_dir)
        .map_err(|source| SessionError::RuntimeDir {
            path: runtime_dir.clone(),
            source,
        })?;
    held.runtime_dir = Some(runtime_dir.clone());
    let control = control_listener(&record::control_socket(&runtime_dir))?;
    let disks = match &ws {
        Some(w) => Some(workspace::write_disks_off_runtime(w, &runtime_dir).await?),
        None => None,
    };

    let tap = jail::tap::open_tap(&link)?;
    let spec = VmSpec {
        session: id.clone(),
        machine: Machine::Q35,
        accel: AccelKind::Tcg,
        vcpus: u16::try_from(manifest.resources.cpus).unwrap_or(1),
        memory_mib: u32::try_from(manifest.resources.memory >> 20).unwrap_or(512),
        boot: Some(DirectBoot {
            kernel: image.kernel.clone(),
            initrd: Some(image.initramfs.clone()),
        }),
        disk: None,
        raw_disks: disks
            .as_ref()
            .map(workspace::Disks::raw_disks)
            .unwrap_or_default(),
        root_disk: image.root_disk.clone(),
        net: Some(NetSpec {
            fd: 3,
            mac: Mac::for_session(&id),
            guest_ip: guest,
            host_ip: host,
        }),
        runtime_dir,
        // Next to the output log when its directory exists (it outlives the
        // VM), else in the runtime directory.
        console_log: Some(log::console_path(&config.home, &session))
            .filter(|path| path.parent().is_some_and(Path::is_dir)),
    };
    let qemu = crate::vm::process::find_qemu().map_err(SessionError::Qemu)?;
    let accel = match manifest.accel {
        crate::manifest::Accel::Auto => crate::vm::watchdog::Accel::Auto,
        crate::manifest::Accel::Kvm => crate::vm::watchdog::Accel::Kvm,
        crate::manifest::Accel::Tcg => crate::vm::watchdog::Accel::Tcg,
    };
    held.progress.phase(progress::Phase::Boot);
    // The jail's rules load while QEMU starts (the `nft` process alone
    // takes 10-20 ms); the link comes up only once they are in, and a tap
    // that is down refuses QEMU's writes, so nothing passes unfiltered.
    let jail = held
        .jail
        .as_ref()
        .ok_or_else(|| SessionError::Setup("the jail is gone".into()))?;
    let (booted, sealed) = tokio::join!(
        crate::vm::watchdog::boot(qemu, spec, Some(tap), accel, config.hello_bound),
        jail.seal(),
    );
    let booted = booted?;
    // QEMU's pid is saved with the next state: one write of the record.
    let qemu_pid = booted.vm.pid();
    if let Some((_, r)) = &mut held.record {
        r.qemu_pid = Some(qemu_pid);
    }
    held.vm = Some(booted.vm);
    // Checked once the VM is held, so the cleanup stops it.
    sealed?;
    let (mut from_guest, mut channel) = booted.hello.channel.into_split();
    held.progress.phase(progress::Phase::Provisioning);
    // The guest waits for `Provision`, so neither record of the transition
    // holds it up: the audit record is queued (the lease accesses that
    // building it records are waited for, and commit after it), and the
    // session's record (another fsync) is saved once it is sent.
    held.record_queued(
        vault,
        "provisioning",
        format!(
            "guest agent {} said hello under {}",
            booted.hello.agent_version, booted.accel
        ),
    );

    let command = config
        .command
        .clone()
        .unwrap_or_else(|| manifest.command.clone());
    let proxy_url = format!("http://{host}:{}", PORTS.connect);
    let mut provision = provision::build(vault, manifest, &leases, command, &proxy_url)?;
    if let Some(w) = &ws {
        workspace::provision(&mut provision, w, manifest);
    }
    provision.tty = config.tty.clone();
    // The terminal is joined before the agent starts, so its first output
    // and the user's first keys are not lost.
    let (tty_tx, mut tty_rx) = mpsc::unbounded_channel();
    let relay = match &config.tty {
        Some(_) => {
            let socket = held
                .vm
                .as_ref()
                .map(Vm::tty_socket)
                .ok_or_else(|| SessionError::Setup("the VM is gone".into()))?;
            let hint = format!(
                "zerolease: session {session} is interactive; type Enter ~ . to stop it (~~ sends ~)"
            );
            let dir = held.runtime_dir.clone().unwrap_or_default();
            Some(tty::Joined::start(
                config.detached,
                &socket,
                &dir,
                tty_tx.clone(),
                &hint,
                held.log.clone(),
            )?)
        }
        None => None,
    };
    send(&mut channel, &HostMessage::Provision(Box::new(provision))).await?;
    held.save(|r| r.state = "provisioning".to_owned());

    let (guest_tx, guest_rx) = mpsc::channel(64);
    let reader = tokio::spawn(async move {
        loop {
            let msg = receive(&mut from_guest).await;
            let end = !matches!(msg, Ok(Some(_)));
            if guest_tx.send(msg).await.is_err() || end {
                break;
            }
        }
    });
    if disks.is_some() {
        stop.serving.store(true, Ordering::SeqCst);
    }
    let served = serve(
        vault,
        manifest,
        held,
        &leases,
        &mut channel,
        guest_rx,
        control,
        &mut tty_rx,
        stop.asked,
        stdout,
        stderr,
    )
    .await;
    reader.abort();
    drop(tty_tx);
    // On an error the relay is simply dropped: stopped, terminal restored.
    if let Some(relay) = relay
        && served.is_ok()
    {
        relay.drain_and_stop().await;
    }
    let outcome = served?;
    if let Some(disks) = &disks {
        workspace::finish(disks, &config.home, &session, stderr);
    }
    let _ = send(&mut channel, &HostMessage::Shutdown {}).await;
    held.transition(
        vault,
        "stopping",
        format!(
            "agent ended: code {:?}, signal {:?}",
            outcome.code, outcome.signal
        ),
    );
    Ok(outcome)
}

async fn start_proxy(
    vault: &Arc<Vault>,
    manifest: &Manifest,
    session: &str,
    leases: &[(usize, Lease)],
    host: Ipv4Addr,
    held: &mut Held,
) -> Result<ProxyRegistry, SessionError> {
    let sid = SessionId::new(session);
    let registry = ProxyRegistry::new();
    registry.add_session(sid.clone());
    let now = vault.now();
    for (_, l) in leases {
        let left = l.time_left(now);
        let entry = Entry::lease(
            l.id.0.clone(),
            l.secret.clone(),
            l.domains.clone(),
            Some(tokio::time::Instant::now() + left),
        );
        registry
            .grant(&sid, entry)
            .map_err(|e| SessionError::Setup(e.to_string()))?;
    }
    for (i, a) in manifest.allow.iter().enumerate() {
        let entry = Entry::allow(format!("allow-{i}-{}", a.domain), vec![a.domain.clone()])
            .with_ports(a.ports.clone());
        registry
            .grant(&sid, entry)
            .map_err(|e| SessionError::Setup(e.to_string()))?;
    }
    let overrides = manifest
        .network
        .overrides
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let resolver = Arc::new(OverrideResolver::with_fallback(
        overrides,
        Arc::new(SystemResolver),
    ));
    let events = Arc::new(
        VaultProxyEvents::new(vault.clone()).map_err(|e| SessionError::Setup(e.to_string()))?,
    );
    let allowed = AllowedCidrs::parse(&manifest.network.allow_cidrs)
        .map_err(|e| SessionError::Setup(e.to_string()))?;
    let state = ProxyState::new(
        registry.clone(),
        resolver,
        events,
        ProxyConfig {
            allowed_cidrs: allowed,
            ..ProxyConfig::default()
        },
    );
    let bind = |port: u16| {
        let addr = SocketAddr::from((host, port));
        async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| SessionError::ProxyBind { addr, source })
        }
    };
    let listeners = SessionListeners {
        explicit: Some(bind(PORTS.connect).await?),
        transparent: Some(bind(PORTS.transparent).await?),
        ..SessionListeners::default()
    };
    let token = CancellationToken::new();
    let task = tokio::spawn(run_session(listeners, sid, state, token.clone()));
    held.proxy = Some((token, task));
    Ok(registry)
}

async fn send(
    channel: &mut (impl AsyncWrite + Unpin),
    msg: &HostMessage,
) -> Result<(), SessionError> {
    // One zeroized buffer (`Provision` carries secrets), one write.
    let frame =
        zerolease_protocol::encode_frame(msg).map_err(|e| SessionError::Channel(e.to_string()))?;
    channel
        .write_all(&frame)
        .await
        .map_err(|e| SessionError::Channel(e.to_string()))
}

/// Reads one guest message; `None` at a clean end of stream.
async fn receive(
    channel: &mut (impl AsyncRead + Unpin),
) -> Result<Option<GuestMessage>, SessionError> {
    let mut len = [0u8; 4];
    match channel.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(SessionError::Channel(e.to_string())),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME_LEN {
        return Err(SessionError::Channel(format!(
            "the guest sent a frame of {len} bytes, over the limit"
        )));
    }
    let mut payload = zeroize::Zeroizing::new(vec![0u8; len]);
    channel
        .read_exact(&mut payload)
        .await
        .map_err(|e| SessionError::Channel(e.to_string()))?;
    GuestMessage::decode(&payload)
        .map(Some)
        .map_err(|e| SessionError::Channel(e.to_string()))
}

/// Binds the session's control socket (in its private runtime directory).
fn control_listener(path: &std::path::Path) -> Result<UnixListener, SessionError> {
    let _ = std::fs::remove_file(path);
    UnixListener::bind(path).map_err(|source| SessionError::RuntimeDir {
        path: path.to_owned(),
        source,
    })
}

/// A control request: its line and where the answer goes.
type ControlRequest = (String, tokio::net::unix::OwnedWriteHalf);

/// Accepts control connections and reads each one's request line in a task
/// of its own, so a client that connects and never writes (or writes
/// slowly) cannot stall the session's message loop; the line is dropped
/// after 5 s without a newline.
async fn accept_control(control: UnixListener, requests: mpsc::Sender<ControlRequest>) {
    loop {
        let stream = match control.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!("accepting a control connection: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let requests = requests.clone();
        tokio::spawn(async move {
            let (read, write) = stream.into_split();
            let mut line = String::new();
            let mut reader = tokio::io::BufReader::new(read.take(leases::MAX_REQUEST_LEN as u64));
            let read = tokio::time::timeout(Duration::from_secs(5), reader.read_line(&mut line));
            if read.await.is_ok() {
                let _ = requests.send((line, write)).await;
            }
        });
    }
}

/// Relays the agent's output, answers credential requests, and obeys the
/// control socket until the agent exits.
#[allow(clippy::too_many_arguments)]
async fn serve(
    vault: &Arc<Vault>,
    manifest: &Manifest,
    held: &mut Held,
    leases: &[(usize, Lease)],
    channel: &mut (impl AsyncWrite + Unpin),
    mut guest: mpsc::Receiver<Result<Option<GuestMessage>, SessionError>>,
    control: UnixListener,
    tty: &mut mpsc::UnboundedReceiver<tty::TtyEvent>,
    mut stop: tokio::sync::watch::Receiver<Option<String>>,
    stdout: &mut (dyn Write + Send),
    stderr: &mut (dyn Write + Send),
) -> Result<RunOutcome, SessionError> {
    let session = held.session.clone().unwrap_or_default();
    let mut pending = leases::PendingUpdates::default();
    let mut stopping = false;
    let (request_tx, mut requests) = mpsc::channel(8);
    let _acceptor =
        tokio_util::task::AbortOnDropHandle::new(tokio::spawn(accept_control(control, request_tx)));
    loop {
        let msg = tokio::select! {
            Ok(()) = stop.changed(), if !stopping => {
                // The session timed out or was interrupted: cut the agent
                // off, then let it end so the guest brings its workspace
                // back (see `run_reported`).
                stopping = true;
                let why = stop.borrow_and_update().clone().unwrap_or_default();
                held.revoke_leases(vault, |n| {
                    format!("{why}: {n} lease(s) revoked; stopping the agent to bring back its workspace")
                });
                let _ = writeln!(
                    stderr,
                    "zerolease: {why}; stopping the agent to bring back its workspace \
                     (at most {}s; interrupt again to skip)",
                    COLLECT_GRACE.as_secs()
                );
                send(channel, &HostMessage::Revoke { scrub: true }).await?;
                continue;
            }
            Some(event) = tty.recv() => match event {
                tty::TtyEvent::Resize { rows, cols } => {
                    send(channel, &HostMessage::Resize { rows, cols }).await?;
                    continue;
                }
                tty::TtyEvent::Escape => return Err(SessionError::Escaped),
            },
            m = guest.recv() => match m {
                Some(Ok(Some(msg))) => msg,
                Some(Err(e)) => return Err(e),
                Some(Ok(None)) | None => return Err(SessionError::GuestGone),
            },
            r = requests.recv() => {
                let Some((line, mut write)) = r else { continue };
                match Control::parse(&line) {
                    Some(Control::Revoke) => {
                        let n = held.revoke_leases(vault, |n| {
                            format!("{n} lease(s) revoked by zerolease revoke; the agent is offline")
                        });
                        let _ = write.write_all(format!("ok {n}\n").as_bytes()).await;
                    }
                    Some(Control::Destroy) => {
                        let _ = write.write_all(b"ok\n").await;
                        return Err(SessionError::Destroyed);
                    }
                    Some(Control::Stats) => {
                        let _ = write.write_all(stats::answer(vault, held).await.as_bytes()).await;
                    }
                    None => {
                        let registry = held.registry.as_ref();
                        let ctx = leases::Ctx { vault, manifest, leases, registry, session: &session };
                        leases::on_line(&ctx, &line, channel, &mut pending, write).await?;
                    }
                }
                continue;
            }
        };
        match msg {
            GuestMessage::Provisioned {} => {
                held.progress.phase(progress::Phase::Agent);
                let revoked = held
                    .record
                    .as_ref()
                    .is_some_and(|(_, r)| r.state == "revoked");
                let state = if revoked { "revoked" } else { "running" };
                held.transition(vault, state, "the guest provisioned the agent".into());
            }
            GuestMessage::ProvisionFailed { reason } => {
                return Err(SessionError::Provision(reason));
            }
            GuestMessage::Started { .. } | GuestMessage::Revoked {} => {}
            GuestMessage::SecretsUpdated {} => pending.answer(Ok(())),
            GuestMessage::UpdateSecretsFailed { reason } => pending.answer(Err(reason)),
            GuestMessage::Output { stream, data } => {
                let out: &mut (dyn Write + Send) = match stream {
                    OutputStream::Stdout => stdout,
                    OutputStream::Stderr => stderr,
                };
                let _ = out.write_all(&data.0);
                let _ = out.flush();
            }
            GuestMessage::CredentialRequest {
                id, protocol, host, ..
            } => {
                let outcome = provision::git_credential(vault, manifest, leases, &protocol, &host);
                if let CredentialOutcome::Denied { reason } = &outcome {
                    tracing::info!(%host, "git credential denied: {reason}");
                }
                send(channel, &HostMessage::CredentialResponse { id, outcome }).await?;
            }
            GuestMessage::Exited { code, signal } => {
                return Ok(RunOutcome {
                    session: session.clone(),
                    code,
                    signal,
                });
            }
            GuestMessage::Hello { .. } => {
                return Err(SessionError::Channel("the guest said hello twice".into()));
            }
        }
    }
}

/// Finds sessions whose `zerolease run` died (their record is not finished
/// and its process is gone) and reaps them: leases revoked, QEMU, jail and
/// runtime directory removed. Called when a new session starts, so a
/// restarted supervisor cleans up after a killed one. Returns their ids.
pub fn reap_orphans(vault: &Vault, home: &StateDir) -> Vec<String> {
    let mut reaped = Vec::new();
    for rec in record::SessionRecord::all(home) {
        if rec.is_finished() || rec.supervisor_alive() {
            continue;
        }
        let id = rec.id.clone();
        if let Err(e) = vault.revoke(RevokeScope::Session(id.clone())) {
            tracing::warn!("revoking the leases of orphaned session {id}: {e}");
        }
        match reap(home, rec) {
            Ok(()) => {
                record(
                    vault,
                    &id,
                    "destroyed",
                    "reaped: its zerolease run had died".into(),
                );
                reaped.push(id);
            }
            Err(e) => tracing::warn!("reaping orphaned session {id}: {e}"),
        }
    }
    reaped
}

/// Tears down what a session whose `zerolease run` died left behind, from
/// its record: QEMU (only a process with the session's marker), the jail,
/// the runtime directory. Its leases are revoked by the caller.
pub fn reap(home: &StateDir, mut rec: record::SessionRecord) -> Result<(), SessionError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| SessionError::Setup(e.to_string()))?;
    runtime.block_on(async {
        if let (Some(pid), Ok(id)) = (rec.qemu_pid, JailId::parse(&rec.id)) {
            let vm_record = crate::vm::process::VmRecord {
                session: id,
                pid,
                runtime_dir: rec.runtime_dir.clone(),
            };
            if let Ok(mut vm) = Vm::for_existing(vm_record) {
                let _ = vm.kill().await;
            }
        }
        if let Some(j) = rec.jail.clone() {
            let mut jail = Jail::for_existing(j);
            if let Err(e) = jail.destroy().await {
                tracing::warn!("deleting the jail of session {}: {e}", rec.id);
            }
        }
    });
    let _ = std::fs::remove_dir_all(&rec.runtime_dir);
    let _ = log::keep_tail(&log::console_path(home, &rec.id), log::CONSOLE_LIMIT);
    rec.state = "destroyed".into();
    rec.save(home)
        .map_err(|e| SessionError::Setup(e.to_string()))
}

/// The host name part of git's `host` field (`example.com:8443` → `example.com`).
fn git_host(host: &str) -> Option<HostName> {
    let name = host.rsplit_once(':').map_or(host, |(h, port)| {
        if port.bytes().all(|b| b.is_ascii_digit()) {
            h
        } else {
            host
        }
    });
    HostName::parse(name).ok()
}

/// Whether the credential of manifest entry `index` is served to git.
fn injects_git(manifest: &Manifest, index: usize) -> bool {
    manifest.credentials[index]
        .inject
        .iter()
        .any(|i| matches!(i, Inject::GitCredential(_)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_silent_control_client_does_not_hold_up_the_next_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("supervisor.sock");
        let (tx, mut requests) = mpsc::channel(8);
        let _acceptor = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(accept_control(
            control_listener(&path).unwrap(),
            tx,
        )));

        // Connects and never writes.
        let _silent = tokio::net::UnixStream::connect(&path).await.unwrap();
        // Writes only part of a line.
        let mut partial = tokio::net::UnixStream::connect(&path).await.unwrap();
        partial.write_all(b"sta").await.unwrap();
        let mut client = tokio::net::UnixStream::connect(&path).await.unwrap();
        client.write_all(b"stats\n").await.unwrap();

        let (line, _answer) = tokio::time::timeout(Duration::from_secs(1), requests.recv())
            .await
            .expect("the third client's request waited for the silent ones")
            .unwrap();
        assert_eq!(Control::parse(&line), Some(Control::Stats));
    }
}
