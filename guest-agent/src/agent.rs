//! The agent's main loop: the control channel after boot.
//!
//! Threads and channels, no async runtime: one thread reads frames from the
//! control port and turns them into [`HostMessage`]s; the agent command's
//! output relays and its waiter, and the credential socket's connections,
//! all feed the same event channel; the loop in [`serve`] is the only writer
//! to the port, so messages never interleave.
//!
//! Message flow (guest → host on the left):
//!
//! ```text
//! Hello                            →
//!                                  ←  Welcome | Reject (stop)
//!                                  ←  Provision
//! Provisioned, Started {pid}       →  (or ProvisionFailed: nothing written)
//! Output …                         →
//! CredentialRequest {id}           →  (from the git helper via the socket)
//!                                  ←  CredentialResponse {id}
//!                                  ←  UpdateSecrets
//! SecretsUpdated | UpdateSecretsFailed →
//!                                  ←  Revoke {scrub}
//! Revoked                          →  (agent processes killed, files gone)
//! Exited {code, signal}            →  (after all output, and after the
//!                                      workspace's result is on its disk)
//!                                  ←  Shutdown  → serve returns, PID 1 powers off
//! ```
//!
//! **Invariants:**
//! - The guest never asks for or holds a vault token; it acts only on what
//!   the host sends.
//! - After `Revoke` no credential request reaches the host and pending ones
//!   are denied. If the agent user's processes cannot all be killed, the
//!   loop stops with [`Outcome::RevokeFailed`] so PID 1 powers the VM off
//!   rather than claim `Revoked`.
//! - Whatever ends the loop (shutdown, host gone, write failure), the agent
//!   user's processes are killed first.

use crate::{error_chain as chain, log};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Duration;

use zerolease_protocol::{
    Bytes, FrameReader, FrameWriter, GuestMessage, HandshakeError, HostMessage, PROTOCOL_VERSION,
    Provision, ReadError, WriteError, check_welcome,
};

use crate::AGENT_VERSION;
use crate::credential::{self, CredentialAsk, GitCredential, ServerPolicy};
use crate::pending::Pending;
use crate::provision::{self, Layout, Provisioned, paths};
use crate::run::{self, AgentEvent, AgentIo, Reaping};
use crate::tty;
use crate::workspace;

/// How the loop is set up.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The guest's filesystem root (`/` in the guest).
    pub layout: Layout,
    /// Where `/proc` is (for finding the agent user's processes).
    pub proc_root: PathBuf,
    /// How git runs the credential helper (`/init credential`).
    pub helper_command: String,
    /// How long a credential request waits for the host.
    pub credential_timeout: Duration,
    /// Whether to reap every child (PID 1) or only the agent.
    pub reaping: Reaping,
    /// Where the TTY port is, for interactive agents.
    pub tty_port: tty::PortLookup,
    /// The network, still being configured while the handshake runs: the
    /// agent's command starts only once it is up.
    pub network: Pending,
    /// The disk's driver (`virtio_blk`), loaded only when the session has a
    /// workspace, whose disks it drives: loading it cost an emulated guest
    /// about 10 ms, and finding out whether the VM had a disk as much
    /// again, on every boot. Empty when boot loaded it (a root disk);
    /// loading it twice is harmless (`EEXIST` counts as loaded).
    pub disk_modules: Vec<PathBuf>,
}

/// Why the loop stopped without error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The host sent `Shutdown`.
    Shutdown,
    /// The host closed the channel (or it broke).
    HostGone,
    /// A `Revoke` could not kill every agent process: power off now.
    RevokeFailed,
}

/// Why the loop could not run.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Sending `Hello` failed.
    #[error("cannot send hello")]
    Hello(#[source] WriteError),
    /// No answer to `Hello`.
    #[error("no answer to hello")]
    NoWelcome(#[source] ReadError),
    /// The host's answer was not an acceptable `Welcome`.
    #[error("handshake failed")]
    Handshake(#[from] HandshakeError),
}

/// Events waiting for the main loop before producers block.
const EVENT_QUEUE: usize = 64;

enum Event {
    Host(HostMessage),
    HostGone,
    Agent(AgentEvent),
    Credential(CredentialAsk),
}

struct State {
    provisioned: Option<Provisioned>,
    agent_running: bool,
    revoked: bool,
    next_id: u64,
    pending: HashMap<u64, mpsc::Sender<Option<GitCredential>>>,
    /// The pty master of an interactive agent, for `Resize`.
    tty_master: Option<std::os::fd::OwnedFd>,
    /// The workspace, until its result is written when the agent exits.
    workspace: Option<workspace::Prepared>,
}

/// Says hello on the control channel, then serves the host until it says
/// `Shutdown` or goes away. `reader` and `writer` are the two directions of
/// the control port.
pub fn serve<R, W>(reader: R, writer: W, config: &AgentConfig) -> Result<Outcome, AgentError>
where
    R: Read + Send + 'static,
    W: Write,
{
    let mut writer = FrameWriter::new(writer);
    let mut reader = FrameReader::new(reader);
    writer
        .write_message(&GuestMessage::Hello {
            protocol_version: PROTOCOL_VERSION,
            agent_version: AGENT_VERSION.to_owned(),
        })
        .map_err(AgentError::Hello)?;
    let answer: HostMessage = reader.read_message().map_err(AgentError::NoWelcome)?;
    check_welcome(PROTOCOL_VERSION, &answer)?;

    // Bounded, so an agent printing faster than the host reads is slowed
    // down (its pipe fills) instead of growing this process's memory.
    let (tx, rx) = mpsc::sync_channel::<Event>(EVENT_QUEUE);
    let mut state = State {
        provisioned: None,
        agent_running: false,
        revoked: false,
        next_id: 1,
        pending: HashMap::new(),
        tty_master: None,
        workspace: None,
    };
    // The host's next message is normally `Provision`. It is handled before
    // the reader thread exists, so the agent command does not wait for that
    // thread to be made (a process's first thread costs an emulated guest
    // about 20 ms).
    let first = loop {
        if let Some(event) = next_event(&mut reader) {
            break event;
        }
    };
    let mut step = on_event(first, &mut state, config, &tx, &mut writer);
    let host_tx = tx.clone();
    std::thread::spawn(move || read_host(reader, &host_tx));
    let outcome = loop {
        match step {
            Ok(None) => {}
            Ok(Some(outcome)) => break outcome,
            Err(err) => {
                log(&format!("cannot write to the host: {}", chain(&err)));
                break Outcome::HostGone;
            }
        }
        let Ok(event) = rx.recv() else {
            break Outcome::HostGone;
        };
        step = on_event(event, &mut state, config, &tx, &mut writer);
    };
    if let Some(done) = &state.provisioned
        && outcome != Outcome::RevokeFailed
        && let Err(err) = run::kill_user(done.user.uid, &config.proc_root)
    {
        log(&format!(
            "cannot stop the agent's processes: {}",
            chain(&err)
        ));
        return Ok(Outcome::RevokeFailed);
    }
    Ok(outcome)
}

/// One turn of the main loop.
fn on_event<W: Write>(
    event: Event,
    state: &mut State,
    config: &AgentConfig,
    tx: &mpsc::SyncSender<Event>,
    writer: &mut FrameWriter<W>,
) -> Result<Option<Outcome>, WriteError> {
    match event {
        Event::Host(message) => on_host(message, state, config, tx, writer),
        Event::HostGone => Ok(Some(Outcome::HostGone)),
        Event::Agent(AgentEvent::Output(stream, data)) => writer
            .write_message(&GuestMessage::Output {
                stream,
                data: Bytes(data),
            })
            .map(|()| None),
        Event::Agent(AgentEvent::Exited { code, signal }) => {
            state.agent_running = false;
            if let Some(ws) = state.workspace.take() {
                collect_workspace(&ws, &config.proc_root);
            }
            writer
                .write_message(&GuestMessage::Exited { code, signal })
                .map(|()| None)
        }
        Event::Credential(ask) => on_credential(ask, state, writer).map(|()| None),
    }
}

/// The next message from the host as an event: `None` for a malformed one
/// (logged and dropped: a whole frame was read, so the stream is still in
/// step), `HostGone` once the channel ends or breaks.
fn next_event<R: Read>(reader: &mut FrameReader<R>) -> Option<Event> {
    match reader.read_message::<HostMessage>() {
        Ok(message) => Some(Event::Host(message)),
        Err(ReadError::Decode(err)) => {
            log(&format!(
                "ignoring a malformed host message: {}",
                chain(&err)
            ));
            None
        }
        Err(ReadError::Frame(err)) => {
            if !err.is_closed() {
                log(&format!("control channel failed: {}", chain(&err)));
            }
            Some(Event::HostGone)
        }
    }
}

fn read_host<R: Read>(mut reader: FrameReader<R>, tx: &mpsc::SyncSender<Event>) {
    loop {
        let Some(event) = next_event(&mut reader) else {
            continue;
        };
        let gone = matches!(event, Event::HostGone);
        if tx.send(event).is_err() || gone {
            return;
        }
    }
}

fn on_host<W: Write>(
    message: HostMessage,
    state: &mut State,
    config: &AgentConfig,
    tx: &mpsc::SyncSender<Event>,
    writer: &mut FrameWriter<W>,
) -> Result<Option<Outcome>, WriteError> {
    match message {
        HostMessage::Welcome { .. } | HostMessage::Reject { .. } => {
            log("ignoring a repeated handshake message");
        }
        HostMessage::Provision(spec) => {
            if state.provisioned.is_some() {
                writer.write_message(&GuestMessage::ProvisionFailed {
                    reason: "already provisioned".to_owned(),
                })?;
                return Ok(None);
            }
            match start(&spec, config, tx) {
                Ok(launched) => {
                    let pid = launched.agent.pid();
                    state.provisioned = Some(launched.done);
                    state.workspace = launched.workspace;
                    state.tty_master = launched.tty_master;
                    state.agent_running = true;
                    let told = writer
                        .write_message(&GuestMessage::Provisioned {})
                        .and_then(|()| writer.write_message(&GuestMessage::Started { pid }));
                    // The command runs already: its output relay and the
                    // credential helper's server start once the host knows.
                    launched.agent.relay();
                    let (listener, policy) = launched.credentials;
                    let ask_tx = tx.clone();
                    std::thread::spawn(move || {
                        credential::serve(listener, policy, move |ask| {
                            ask_tx.send(Event::Credential(ask)).is_ok()
                        });
                    });
                    told?;
                }
                Err(reason) => {
                    writer.write_message(&GuestMessage::ProvisionFailed { reason })?;
                }
            }
        }
        HostMessage::CredentialResponse { id, outcome } => {
            match state.pending.remove(&id) {
                Some(reply) => {
                    let answer = match outcome {
                        zerolease_protocol::CredentialOutcome::Granted { username, password } => {
                            Some(GitCredential { username, password })
                        }
                        zerolease_protocol::CredentialOutcome::Denied { .. } => None,
                    };
                    // The helper may have timed out and gone: fine.
                    let _ = reply.send(answer);
                }
                None => log(&format!(
                    "ignoring a credential response for unknown id {id}"
                )),
            }
        }
        HostMessage::UpdateSecrets { env, files } => {
            let answer = match &mut state.provisioned {
                Some(done) if !state.revoked => {
                    match provision::update(&config.layout, done, &env, &files) {
                        Ok(()) => GuestMessage::SecretsUpdated {},
                        Err(err) => GuestMessage::UpdateSecretsFailed {
                            reason: reason(&err),
                        },
                    }
                }
                _ => GuestMessage::UpdateSecretsFailed {
                    reason: "nothing is provisioned (or it was revoked)".to_owned(),
                },
            };
            writer.write_message(&answer)?;
        }
        HostMessage::Revoke { scrub } => {
            state.revoked = true;
            for (_, reply) in state.pending.drain() {
                let _ = reply.send(None);
            }
            if let Some(done) = &state.provisioned {
                if let Err(err) = run::kill_user(done.user.uid, &config.proc_root) {
                    log(&format!("revoke: {}", chain(&err)));
                    return Ok(Some(Outcome::RevokeFailed));
                }
                let _ = std::fs::remove_file(config.layout.host_path(paths::CREDENTIAL_SOCKET));
                if let Err(err) = provision::remove(&config.layout, done, scrub) {
                    log(&format!("revoke: {}", chain(&err)));
                }
            }
            writer.write_message(&GuestMessage::Revoked {})?;
        }
        HostMessage::Shutdown {} => return Ok(Some(Outcome::Shutdown)),
        HostMessage::Resize { rows, cols } => match &state.tty_master {
            Some(master) => {
                if let Err(err) = tty::set_size(std::os::fd::AsFd::as_fd(master), rows, cols) {
                    log(&format!("cannot resize the terminal: {err}"));
                }
            }
            None => log("ignoring a resize: the agent has no terminal"),
        },
    }
    Ok(None)
}

fn on_credential<W: Write>(
    ask: CredentialAsk,
    state: &mut State,
    writer: &mut FrameWriter<W>,
) -> Result<(), WriteError> {
    if state.revoked || state.provisioned.is_none() {
        let _ = ask.reply.send(None);
        return Ok(());
    }
    let id = state.next_id;
    state.next_id += 1;
    // The host answers every request, which removes its entry; a helper
    // that timed out meanwhile just misses the answer.
    state.pending.insert(id, ask.reply);
    writer.write_message(&ask.request.to_message(id))
}

/// Provisions and starts the agent; on failure, the reason for
/// `ProvisionFailed` (nothing is left written). Returns the pty master too
/// when the agent is interactive.
/// What [`start`] leaves behind: the agent running (its output not relayed
/// yet) and the credential helper's socket bound (not served yet).
struct Launched {
    done: Provisioned,
    agent: run::Spawned,
    credentials: (std::os::unix::net::UnixListener, ServerPolicy),
    workspace: Option<workspace::Prepared>,
    tty_master: Option<std::os::fd::OwnedFd>,
}

fn start(
    spec: &Provision,
    config: &AgentConfig,
    tx: &mpsc::SyncSender<Event>,
) -> Result<Launched, String> {
    let spec = &with_term(spec);
    let done = provision::provision(&config.layout, spec, &config.helper_command)
        .map_err(|err| reason(&err))?;
    let undo = |why: String| {
        let _ = provision::remove(&config.layout, &done, true);
        why
    };
    let socket = config.layout.host_path(paths::CREDENTIAL_SOCKET);
    let listener = credential::bind(&socket, done.user.uid, done.user.gid)
        .map_err(|err| undo(format!("cannot bind {}: {err}", paths::CREDENTIAL_SOCKET)))?;
    let policy = ServerPolicy {
        agent_uid: done.user.uid,
        hosts: done.credential_hosts.clone(),
        timeout: config.credential_timeout,
    };
    let ws = match &spec.workspace {
        Some(ws) => {
            crate::boot::load_modules(&config.disk_modules)
                .map_err(|err| undo(format!("workspace: {}", reason(&err))))?;
            Some(
                workspace::prepare(&config.layout, ws, &done.user)
                    .map_err(|err| undo(format!("workspace: {}", reason(&err))))?,
            )
        }
        None => None,
    };
    // The command is the first thing that needs the network.
    config.network.wait().map_err(undo)?;
    let workdir = config.layout.host_path(&spec.workdir);
    if !workdir.exists() {
        std::fs::create_dir_all(&workdir)
            .and_then(|()| {
                std::os::unix::fs::chown(&workdir, Some(done.user.uid), Some(done.user.gid))
            })
            .map_err(|err| undo(format!("cannot create the workdir {}: {err}", spec.workdir)))?;
    }
    let (io, master) = match &spec.tty {
        None => (AgentIo::Pipes, None),
        Some(tty_spec) => {
            let terminal = || -> Result<_, tty::TtyError> {
                let port = tty::open_port(&config.tty_port)?;
                let (master, slave) = tty::open_pty(tty_spec, done.user.uid, done.user.gid)?;
                let drained = tty::start_relay(&master, port)?;
                Ok((AgentIo::Pty { slave, drained }, Some(master)))
            };
            terminal().map_err(|err| undo(reason(&err)))?
        }
    };
    let agent_tx = tx.clone();
    let agent = run::spawn_io(
        &spec.command,
        &done.env,
        &done.user,
        &workdir,
        config.reaping,
        io,
        move |event| {
            let _ = agent_tx.send(Event::Agent(event));
        },
    )
    .map_err(|err| undo(reason(&err)))?;
    crate::log(&format!(
        "provisioned; the agent command runs as pid {}",
        agent.pid()
    ));
    Ok(Launched {
        done,
        agent,
        credentials: (listener, policy),
        workspace: ws,
        tty_master: master,
    })
}

/// After the agent's exit, before `Exited`: stops whatever the agent left
/// running (so nothing changes the tree meanwhile), then writes the
/// workspace's result to the out disk. Failures are in the result's header
/// for the host; the console gets them too.
fn collect_workspace(ws: &workspace::Prepared, proc_root: &std::path::Path) {
    if let Err(err) = run::kill_user(ws.uid, proc_root) {
        log(&format!("workspace: {}", chain(&err)));
    }
    if let Err(err) = workspace::finish(ws) {
        log(&format!("workspace: {}", chain(&err)));
    }
}

/// `spec` with `TERM` from its `tty` added to the plain environment, unless
/// the manifest set one.
fn with_term(spec: &Provision) -> Provision {
    let mut spec = spec.clone();
    if let Some(tty) = &spec.tty
        && !spec.env_plain.iter().any(|v| v.name == "TERM")
        && !spec.env.iter().any(|v| v.name == "TERM")
    {
        spec.env_plain.push(zerolease_protocol::PlainEnvVar {
            name: "TERM".to_owned(),
            value: tty.term.clone(),
        });
    }
    spec
}

/// An error and its causes as one line, for the host (no control
/// characters, bounded like the protocol's reason fields).
fn reason(err: &dyn std::error::Error) -> String {
    let mut text: String = chain(err)
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if text.len() > 1024 {
        let mut cut = 1024;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credential::GitRequest;

    #[test]
    fn reasons_are_one_bounded_line() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer\nline")]
        struct Outer(#[source] std::io::Error);
        let err = Outer(std::io::Error::other("inner"));
        assert_eq!(reason(&err), "outer line: inner");
        let long = std::io::Error::other("é".repeat(2000));
        let text = reason(&long);
        assert!(text.len() <= 1024 && text.starts_with('é'));
    }

    #[test]
    fn term_comes_from_the_tty_unless_the_manifest_set_one() {
        use zerolease_protocol::{PlainEnvVar, ProxySettings, SecretEnvVar, SecretString, TtySpec};
        let spec = |tty: Option<&str>, plain: &[(&str, &str)], secret: &[&str]| Provision {
            env: secret
                .iter()
                .map(|n| SecretEnvVar {
                    name: (*n).into(),
                    value: SecretString::new("s".into()),
                })
                .collect(),
            env_plain: plain
                .iter()
                .map(|(n, v)| PlainEnvVar {
                    name: (*n).into(),
                    value: (*v).into(),
                })
                .collect(),
            files: vec![],
            ca_certs: vec![],
            proxy: ProxySettings::default(),
            git_credential_hosts: vec![],
            command: vec!["sh".into()],
            workdir: "/home/agent".into(),
            user: "agent".into(),
            workspace: None,
            tty: tty.map(|t| TtySpec {
                rows: 24,
                cols: 80,
                term: t.into(),
            }),
        };
        let term = |p: &Provision| -> Vec<String> {
            with_term(p)
                .env_plain
                .iter()
                .filter(|v| v.name == "TERM")
                .map(|v| v.value.clone())
                .collect()
        };
        assert_eq!(term(&spec(Some("vt100"), &[], &[])), ["vt100"]);
        assert_eq!(term(&spec(None, &[], &[])), Vec::<String>::new());
        assert_eq!(
            term(&spec(Some("vt100"), &[("TERM", "dumb")], &[])),
            ["dumb"]
        );
        assert_eq!(
            term(&spec(Some("vt100"), &[], &["TERM"])),
            Vec::<String>::new()
        );
        with_term(&spec(Some("vt100"), &[("LANG", "C")], &[]))
            .validate()
            .unwrap();
    }

    #[test]
    fn git_request_ids_are_the_message_ids() {
        let request = GitRequest {
            protocol: "https".into(),
            host: "h".into(),
            path: None,
        };
        assert!(matches!(
            request.to_message(42),
            GuestMessage::CredentialRequest { id: 42, .. }
        ));
    }
}
