//! The messages exchanged over the control channel, split by direction.
//!
//! **Invariants:**
//! - Both directions are closed enums. JSON payloads are tagged by `type`
//!   (snake_case); unknown types and unknown fields are rejected, never
//!   ignored. Variants without data are written as empty struct variants so
//!   that `deny_unknown_fields` applies to them too.
//! - [`Message::decode`] and [`Message::encode`] both run
//!   [`Message::validate`]: a handler never sees a message that breaks a field
//!   constraint, and a sender never emits one.
//! - Every field that can carry a credential is a [`SecretString`] or
//!   [`SecretBytes`], so `Debug` of any message is safe to log. Errors from
//!   decoding never quote the input.
//!
//! Flow (guest → host on the left, host → guest on the right):
//!
//! ```text
//! Hello                  →
//!                        ←  Welcome | Reject
//!                        ←  Provision
//! Provisioned | ProvisionFailed →
//! Started                →
//! CredentialRequest      →        (any number, while running)
//!                        ←  CredentialResponse
//! Output                 →        (any number)
//!                        ←  UpdateSecrets → SecretsUpdated | UpdateSecretsFailed
//!                        ←  Revoke        → Revoked
//!                        ←  Resize        (interactive sessions, any time)
//! Exited                 →
//!                        ←  Shutdown
//! ```

use std::collections::HashSet;
use std::fmt;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::frame::ZeroizingBuf;
use crate::secret::{Bytes, SecretBytes, SecretString};

/// A protocol version. Peers interoperate iff their major versions match;
/// a minor bump only adds optional behaviour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProtocolVersion {
    /// Incompatible changes bump this.
    pub major: u16,
    /// Compatible additions bump this.
    pub minor: u16,
}

/// The version this crate speaks. 1.1 added `Provision.tty` and `Resize`.
pub const PROTOCOL_VERSION: ProtocolVersion = ProtocolVersion { major: 1, minor: 1 };

impl ProtocolVersion {
    /// Whether a peer speaking `peer` can talk to us.
    pub fn is_compatible_with(self, peer: ProtocolVersion) -> bool {
        self.major == peer.major
    }
}

impl fmt::Display for ProtocolVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// Why the version handshake failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// The major versions differ.
    #[error(
        "the peer speaks protocol {peer} and this side speaks {local}; \
         rebuild the guest image with a matching zerolease-guest"
    )]
    VersionMismatch {
        /// Our version.
        local: ProtocolVersion,
        /// The peer's version.
        peer: ProtocolVersion,
    },
    /// The host refused the guest.
    #[error("the host rejected the guest: {reason}")]
    Rejected {
        /// The host's reason.
        reason: String,
    },
    /// The first message was not part of the handshake.
    #[error("expected {expected} as the first message, got {got}")]
    Unexpected {
        /// The message type that was expected.
        expected: &'static str,
        /// The message type that arrived.
        got: &'static str,
    },
}

/// Checks that `peer` can talk to `local` (major versions match).
pub fn check_versions(local: ProtocolVersion, peer: ProtocolVersion) -> Result<(), HandshakeError> {
    if local.is_compatible_with(peer) {
        Ok(())
    } else {
        Err(HandshakeError::VersionMismatch { local, peer })
    }
}

/// Host side: checks the guest's first message and returns the guest's
/// version, or the error to report in a [`HostMessage::Reject`].
pub fn accept_hello(
    local: ProtocolVersion,
    first: &GuestMessage,
) -> Result<ProtocolVersion, HandshakeError> {
    match first {
        GuestMessage::Hello {
            protocol_version, ..
        } => check_versions(local, *protocol_version).map(|()| *protocol_version),
        other => Err(HandshakeError::Unexpected {
            expected: "hello",
            got: other.kind(),
        }),
    }
}

/// Host side: the answer to the guest's first message.
pub fn answer_hello(local: ProtocolVersion, first: &GuestMessage) -> HostMessage {
    match accept_hello(local, first) {
        Ok(_) => HostMessage::Welcome {
            protocol_version: local,
        },
        Err(err) => HostMessage::Reject {
            reason: err.to_string(),
        },
    }
}

/// Guest side: checks the host's answer to `Hello` and returns the host's
/// version.
pub fn check_welcome(
    local: ProtocolVersion,
    answer: &HostMessage,
) -> Result<ProtocolVersion, HandshakeError> {
    match answer {
        HostMessage::Welcome { protocol_version } => {
            check_versions(local, *protocol_version).map(|()| *protocol_version)
        }
        HostMessage::Reject { reason } => Err(HandshakeError::Rejected {
            reason: reason.clone(),
        }),
        other => Err(HandshakeError::Unexpected {
            expected: "welcome",
            got: other.kind(),
        }),
    }
}

/// Messages from the guest agent to the supervisor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum GuestMessage {
    /// First message on the channel; legal only once, before anything else.
    Hello {
        /// The protocol version the agent speaks.
        protocol_version: ProtocolVersion,
        /// The agent's build version (free text, at most 64 bytes, no control
        /// characters).
        agent_version: String,
    },
    /// Answer to `Provision`: everything was written.
    Provisioned {},
    /// Answer to `Provision`: nothing should be considered written.
    ProvisionFailed {
        /// What went wrong (no secret values).
        reason: String,
    },
    /// The agent command was started; legal after `Provisioned`.
    Started {
        /// Its process id in the guest.
        pid: u32,
    },
    /// The git credential helper in the guest asks for a credential; legal
    /// while running. Answered by a `CredentialResponse` with the same `id`.
    CredentialRequest {
        /// Chosen by the guest, unique among its outstanding requests.
        id: u64,
        /// URL scheme, as git sends it (`https`).
        protocol: String,
        /// Host (and optional `:port`), as git sends it.
        host: String,
        /// Repository path, if git sends it.
        path: Option<String>,
    },
    /// Output of the agent command; legal after `Started`.
    Output {
        /// Which stream it came from.
        stream: OutputStream,
        /// The bytes, exactly as read.
        data: Bytes,
    },
    /// The agent command ended; legal after `Started`, once.
    Exited {
        /// Exit code, if it exited normally.
        code: Option<i32>,
        /// Signal number, if it was killed by one.
        signal: Option<i32>,
    },
    /// Answer to `UpdateSecrets`: the new values are in place.
    SecretsUpdated {},
    /// Answer to `UpdateSecrets`.
    UpdateSecretsFailed {
        /// What went wrong (no secret values).
        reason: String,
    },
    /// Answer to `Revoke`: the agent's processes are gone (and files
    /// scrubbed if asked).
    Revoked {},
}

/// Messages from the supervisor to the guest agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum HostMessage {
    /// Answer to a compatible `Hello`.
    Welcome {
        /// The protocol version the host speaks.
        protocol_version: ProtocolVersion,
    },
    /// Answer to an incompatible or unexpected first message; the host closes
    /// the channel after sending it.
    Reject {
        /// Why (no secret values).
        reason: String,
    },
    /// Set up the agent and run its command; legal once, after `Welcome`.
    Provision(Box<Provision>),
    /// Answer to a `CredentialRequest` with the same `id`.
    CredentialResponse {
        /// The request's id.
        id: u64,
        /// Whether the credential was granted.
        outcome: CredentialOutcome,
    },
    /// Replace provisioned secrets (rotation); legal after `Provisioned`.
    UpdateSecrets {
        /// Secret environment variables to replace, by name.
        env: Vec<SecretEnvVar>,
        /// Files to replace, by path.
        files: Vec<FileSpec>,
    },
    /// Kill the agent's processes and, if `scrub`, wipe provisioned files.
    Revoke {
        /// Whether to overwrite and remove provisioned files.
        scrub: bool,
    },
    /// Power off the guest.
    Shutdown {},
    /// The user's terminal changed size; legal after `Provision` with a
    /// `tty`, ignored otherwise.
    Resize {
        /// Rows, `1..=MAX_TTY_DIM`.
        rows: u16,
        /// Columns, `1..=MAX_TTY_DIM`.
        cols: u16,
    },
}

/// What the guest needs to run the agent. Boxed in [`HostMessage`] to keep
/// the enum small.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Provision {
    /// Secret environment variables for the agent.
    pub env: Vec<SecretEnvVar>,
    /// Non-secret environment variables for the agent.
    pub env_plain: Vec<PlainEnvVar>,
    /// Files to write under the agent's home.
    pub files: Vec<FileSpec>,
    /// Extra CA certificates (PEM) to trust.
    pub ca_certs: Vec<String>,
    /// The proxy the agent must use.
    pub proxy: ProxySettings,
    /// Hosts for which the guest's git credential helper asks the host.
    pub git_credential_hosts: Vec<String>,
    /// The agent command and its arguments.
    pub command: Vec<String>,
    /// Absolute working directory in the guest.
    pub workdir: String,
    /// The unprivileged user to run as (never `root`).
    pub user: String,
    /// The host's project directory, copied in on a disk, if the session has
    /// one. Absent in older hosts' messages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workspace: Option<WorkspaceSpec>,
    /// Run the command on a pty in the guest, relayed over the TTY port,
    /// instead of with piped output. Absent: non-interactive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tty: Option<TtySpec>,
}

/// The terminal an interactive agent gets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TtySpec {
    /// Initial rows, `1..=MAX_TTY_DIM`.
    pub rows: u16,
    /// Initial columns, `1..=MAX_TTY_DIM`.
    pub cols: u16,
    /// `TERM` for the agent: 1-64 bytes of `[A-Za-z0-9._+-]`.
    pub term: String,
}

/// The largest terminal dimension accepted (rows or columns).
pub const MAX_TTY_DIM: u16 = 4096;

impl TtySpec {
    /// Checks the field constraints (see the field docs).
    pub fn validate(&self) -> Result<(), ValidationError> {
        check_tty_size(self.rows, self.cols)?;
        let term_ok = !self.term.is_empty()
            && self.term.len() <= 64
            && self
                .term
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'+' | b'-'));
        if term_ok {
            Ok(())
        } else {
            Err(field("tty.term", "must be 1-64 bytes of [A-Za-z0-9._+-]"))
        }
    }
}

/// A window size is sane: both dimensions in `1..=MAX_TTY_DIM`.
pub fn check_tty_size(rows: u16, cols: u16) -> Result<(), ValidationError> {
    if (1..=MAX_TTY_DIM).contains(&rows) && (1..=MAX_TTY_DIM).contains(&cols) {
        Ok(())
    } else {
        Err(field("tty size", "rows and cols must each be 1-4096"))
    }
}

/// Where the workspace goes and what it is based on. The contents come on the
/// virtio-blk disk with serial [`WORKSPACE_IN_SERIAL`](crate::workspace::WORKSPACE_IN_SERIAL);
/// the result goes to the one with serial
/// [`WORKSPACE_OUT_SERIAL`](crate::workspace::WORKSPACE_OUT_SERIAL).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkspaceSpec {
    /// Absolute guest directory to extract into (the agent's workdir);
    /// without `..`, `.`, empty components or NUL, and not `/`.
    pub path: String,
    /// The host repository's `HEAD` commit (40 or 64 lowercase hex digits),
    /// or `None` when the workspace is not a git repository (the guest then
    /// creates one with a base commit of its own).
    pub base: Option<String>,
}

impl WorkspaceSpec {
    /// Checks the field constraints (see the field docs).
    pub fn validate(&self) -> Result<(), ValidationError> {
        let path = self.path.strip_prefix('/').unwrap_or("");
        if path.is_empty()
            || self.path.contains('\0')
            || path
                .split('/')
                .any(|part| part.is_empty() || part == "." || part == "..")
        {
            return Err(field(
                "workspace.path",
                "must be an absolute path below / without `..`, `.`, empty components or NUL",
            ));
        }
        if let Some(base) = &self.base
            && !is_commit_id(base)
        {
            return Err(field(
                "workspace.base",
                "must be a commit id: 40 or 64 lowercase hex digits",
            ));
        }
        Ok(())
    }
}

/// Whether `id` is a full git object id (SHA-1 or SHA-256), lowercase hex.
pub fn is_commit_id(id: &str) -> bool {
    matches!(id.len(), 40 | 64) && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// A secret environment variable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretEnvVar {
    /// `[A-Za-z_][A-Za-z0-9_]*`
    pub name: String,
    /// The value (no NUL).
    pub value: SecretString,
}

/// A non-secret environment variable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlainEnvVar {
    /// `[A-Za-z_][A-Za-z0-9_]*`
    pub name: String,
    /// The value (no NUL).
    pub value: String,
}

/// A file to write in the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSpec {
    /// Relative to the agent's home; no `..`, `.` or empty components.
    pub path: String,
    /// The contents.
    pub contents: SecretBytes,
    /// Permission bits, at most `0o777`.
    pub mode: u32,
}

/// Proxy settings exported to the agent's environment.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxySettings {
    /// `http_proxy` URL.
    pub http_proxy: Option<String>,
    /// `https_proxy` URL.
    pub https_proxy: Option<String>,
    /// `no_proxy` entries.
    pub no_proxy: Vec<String>,
}

/// The host's decision on a credential request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case", deny_unknown_fields)]
pub enum CredentialOutcome {
    /// The lease covers the request.
    Granted {
        /// Username for git.
        username: String,
        /// Password or token for git.
        password: SecretString,
    },
    /// No lease covers the request.
    Denied {
        /// Why (no secret values).
        reason: String,
    },
}

/// Which output stream of the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputStream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// A field constraint a message breaks. Never carries a secret value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    /// An environment variable name is not `[A-Za-z_][A-Za-z0-9_]*`.
    #[error("environment variable name {name:?} must match [A-Za-z_][A-Za-z0-9_]*")]
    EnvName {
        /// The name.
        name: String,
    },
    /// An environment variable is given twice.
    #[error("environment variable {name:?} is given more than once")]
    DuplicateEnv {
        /// The name.
        name: String,
    },
    /// A file path breaks a rule.
    #[error("file path {path:?} {reason}")]
    FilePath {
        /// The path.
        path: String,
        /// The rule it breaks.
        reason: &'static str,
    },
    /// A file is given twice.
    #[error("file {path:?} is given more than once")]
    DuplicateFile {
        /// The path.
        path: String,
    },
    /// A file mode has bits above `0o777`.
    #[error("file {path:?} has mode {mode:#o}; only permission bits (at most 0o777) are allowed")]
    FileMode {
        /// The path.
        path: String,
        /// The mode.
        mode: u32,
    },
    /// Another field breaks a rule. The value is not quoted: it may be secret.
    #[error("field `{field}` {reason}")]
    Field {
        /// The field.
        field: &'static str,
        /// The rule it breaks.
        reason: &'static str,
    },
}

/// Why a payload did not decode into a message.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Not JSON, or not one of the known messages. serde_json's own message is
    /// deliberately dropped: it can quote input values, which may be secret.
    #[error("malformed message: {kind}")]
    Malformed {
        /// What kind of problem (syntax, unknown type or field, wrong type).
        kind: &'static str,
    },
    /// A known message that breaks a field constraint.
    #[error("invalid message")]
    Invalid(#[from] ValidationError),
}

/// Why a message could not be encoded.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// The message breaks a field constraint; nothing was sent.
    #[error("refusing to send an invalid message")]
    Invalid(#[from] ValidationError),
    /// Serialisation failed (only for values JSON cannot represent).
    #[error("could not serialise a message")]
    Serialize(#[source] serde_json::Error),
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for super::GuestMessage {}
    impl Sealed for super::HostMessage {}
}

/// A message of either direction. Sealed: only [`GuestMessage`] and
/// [`HostMessage`].
pub trait Message: Serialize + DeserializeOwned + sealed::Sealed {
    /// Checks the field constraints.
    fn validate(&self) -> Result<(), ValidationError>;

    /// The `type` tag, for error messages.
    fn kind(&self) -> &'static str;

    /// Parses and validates one payload.
    fn decode(payload: &[u8]) -> Result<Self, DecodeError> {
        let message: Self = serde_json::from_slice(payload).map_err(|err| {
            let kind = match err.classify() {
                serde_json::error::Category::Syntax => "not valid JSON",
                serde_json::error::Category::Eof => "incomplete JSON",
                serde_json::error::Category::Data => {
                    "unknown message type or field, or a field of the wrong type"
                }
                serde_json::error::Category::Io => "I/O error",
            };
            DecodeError::Malformed { kind }
        })?;
        message.validate()?;
        Ok(message)
    }

    /// Validates and serialises into a buffer that is zeroized on drop.
    fn encode(&self) -> Result<Zeroizing<Vec<u8>>, EncodeError> {
        self.validate()?;
        let mut buf = ZeroizingBuf::with_capacity(512);
        serde_json::to_writer(&mut buf, self).map_err(EncodeError::Serialize)?;
        Ok(buf.into_inner())
    }
}

impl Message for GuestMessage {
    fn validate(&self) -> Result<(), ValidationError> {
        match self {
            Self::Hello { agent_version, .. } => {
                check_text("agent_version", agent_version, 64)?;
                if agent_version.is_empty() {
                    return Err(field("agent_version", "is empty"));
                }
                Ok(())
            }
            Self::Provisioned {} | Self::SecretsUpdated {} | Self::Revoked {} => Ok(()),
            Self::ProvisionFailed { reason } | Self::UpdateSecretsFailed { reason } => {
                check_text("reason", reason, MAX_REASON_LEN)
            }
            Self::Started { pid } => {
                if *pid == 0 {
                    return Err(field("pid", "is 0"));
                }
                Ok(())
            }
            Self::CredentialRequest {
                protocol,
                host,
                path,
                ..
            } => {
                check_url_scheme(protocol)?;
                check_credential_host("host", host)?;
                if let Some(path) = path {
                    check_text("path", path, MAX_PATH_LEN)?;
                }
                Ok(())
            }
            Self::Output { .. } => Ok(()),
            Self::Exited { code, signal } => match (code, signal) {
                (Some(_), None) => Ok(()),
                (None, Some(1..=64)) => Ok(()),
                (None, Some(_)) => Err(field("signal", "is not a signal number (1-64)")),
                _ => Err(field("code", "must be set exactly when signal is not")),
            },
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Self::Hello { .. } => "hello",
            Self::Provisioned {} => "provisioned",
            Self::ProvisionFailed { .. } => "provision_failed",
            Self::Started { .. } => "started",
            Self::CredentialRequest { .. } => "credential_request",
            Self::Output { .. } => "output",
            Self::Exited { .. } => "exited",
            Self::SecretsUpdated {} => "secrets_updated",
            Self::UpdateSecretsFailed { .. } => "update_secrets_failed",
            Self::Revoked {} => "revoked",
        }
    }
}

impl GuestMessage {
    /// The `type` tag, for error messages.
    pub fn kind(&self) -> &'static str {
        Message::kind(self)
    }
}

impl Message for HostMessage {
    fn validate(&self) -> Result<(), ValidationError> {
        match self {
            Self::Welcome { .. } | Self::Revoke { .. } | Self::Shutdown {} => Ok(()),
            Self::Reject { reason } => check_text("reason", reason, MAX_REASON_LEN),
            Self::Provision(provision) => provision.validate(),
            Self::Resize { rows, cols } => check_tty_size(*rows, *cols),
            Self::CredentialResponse { outcome, .. } => match outcome {
                CredentialOutcome::Granted { username, password } => {
                    check_text("username", username, 256)?;
                    // git's credential protocol is line-based: a line break
                    // would let the value inject attributes.
                    if password.expose_secret().chars().any(char::is_control) {
                        return Err(field("password", "contains a control character"));
                    }
                    Ok(())
                }
                CredentialOutcome::Denied { reason } => {
                    check_text("reason", reason, MAX_REASON_LEN)
                }
            },
            Self::UpdateSecrets { env, files } => {
                check_env(env.iter().map(|var| var.name.as_str()))?;
                check_secret_env_values(env)?;
                check_files(files)
            }
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Self::Welcome { .. } => "welcome",
            Self::Reject { .. } => "reject",
            Self::Provision(_) => "provision",
            Self::CredentialResponse { .. } => "credential_response",
            Self::UpdateSecrets { .. } => "update_secrets",
            Self::Revoke { .. } => "revoke",
            Self::Shutdown {} => "shutdown",
            Self::Resize { .. } => "resize",
        }
    }
}

impl HostMessage {
    /// The `type` tag, for error messages.
    pub fn kind(&self) -> &'static str {
        Message::kind(self)
    }
}

impl Provision {
    /// Checks the field constraints (see the field docs).
    pub fn validate(&self) -> Result<(), ValidationError> {
        check_env(
            self.env
                .iter()
                .map(|var| var.name.as_str())
                .chain(self.env_plain.iter().map(|var| var.name.as_str())),
        )?;
        check_secret_env_values(&self.env)?;
        for var in &self.env_plain {
            if var.value.contains('\0') {
                return Err(field("env_plain.value", "contains NUL"));
            }
        }
        check_files(&self.files)?;
        for pem in &self.ca_certs {
            if !pem.trim_start().starts_with("-----BEGIN CERTIFICATE-----") {
                return Err(field("ca_certs", "is not a PEM certificate"));
            }
            if pem.contains('\0') || pem.len() > MAX_PEM_LEN {
                return Err(field("ca_certs", "contains NUL or is too long"));
            }
        }
        self.proxy.validate()?;
        for host in &self.git_credential_hosts {
            check_credential_host("git_credential_hosts", host)?;
        }
        match self.command.first() {
            None => return Err(field("command", "is empty")),
            Some(program) if program.is_empty() => {
                return Err(field("command", "has an empty program name"));
            }
            Some(_) => {}
        }
        if self.command.iter().any(|arg| arg.contains('\0')) {
            return Err(field("command", "contains NUL"));
        }
        if !self.workdir.starts_with('/')
            || self.workdir.contains('\0')
            || self.workdir.split('/').any(|part| part == "..")
        {
            return Err(field(
                "workdir",
                "must be an absolute path without `..` or NUL",
            ));
        }
        if let Some(workspace) = &self.workspace {
            workspace.validate()?;
        }
        if let Some(tty) = &self.tty {
            tty.validate()?;
        }
        check_user(&self.user)
    }
}

impl ProxySettings {
    /// Checks that no value could break the environment file it goes into.
    pub fn validate(&self) -> Result<(), ValidationError> {
        for url in [&self.http_proxy, &self.https_proxy].into_iter().flatten() {
            if url.is_empty() || url.chars().any(|c| c.is_control() || c.is_whitespace()) {
                return Err(field(
                    "proxy",
                    "has an empty URL or one with whitespace or control characters",
                ));
            }
        }
        for entry in &self.no_proxy {
            if entry.is_empty()
                || entry
                    .chars()
                    .any(|c| c.is_control() || c.is_whitespace() || c == ',')
            {
                return Err(field(
                    "proxy.no_proxy",
                    "has an empty entry or one with whitespace, commas or control characters",
                ));
            }
        }
        Ok(())
    }
}

const MAX_REASON_LEN: usize = 4096;
const MAX_PATH_LEN: usize = 4096;
const MAX_PEM_LEN: usize = 64 * 1024;

fn field(field: &'static str, reason: &'static str) -> ValidationError {
    ValidationError::Field { field, reason }
}

/// Free text that ends up in logs: bounded, no control characters.
fn check_text(name: &'static str, text: &str, max: usize) -> Result<(), ValidationError> {
    if text.len() > max {
        return Err(field(name, "is too long"));
    }
    if text.chars().any(char::is_control) {
        return Err(field(name, "contains a control character"));
    }
    Ok(())
}

/// Whether `name` matches `[A-Za-z_][A-Za-z0-9_]*`.
pub fn is_valid_env_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b'A'..=b'Z' | b'a'..=b'z' | b'_'))
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

fn check_env<'a>(names: impl Iterator<Item = &'a str>) -> Result<(), ValidationError> {
    let mut seen = HashSet::new();
    for name in names {
        if !is_valid_env_name(name) {
            return Err(ValidationError::EnvName {
                name: name.to_owned(),
            });
        }
        if !seen.insert(name) {
            return Err(ValidationError::DuplicateEnv {
                name: name.to_owned(),
            });
        }
    }
    Ok(())
}

fn check_secret_env_values(env: &[SecretEnvVar]) -> Result<(), ValidationError> {
    if env
        .iter()
        .any(|var| var.value.expose_secret().contains('\0'))
    {
        return Err(field("env.value", "contains NUL"));
    }
    Ok(())
}

/// Checks a path relative to the agent's home: non-empty, not absolute, no
/// `.`/`..`/empty components, no NUL, bounded.
pub fn check_relative_path(path: &str) -> Result<(), ValidationError> {
    let reason = if path.is_empty() {
        Some("is empty")
    } else if path.len() > MAX_PATH_LEN {
        Some("is too long")
    } else if path.contains('\0') {
        Some("contains NUL")
    } else if path.starts_with('/') {
        Some("must be relative to the agent's home")
    } else if path.split('/').any(|part| part == "..") {
        Some("must not contain `..`")
    } else if path.split('/').any(|part| part.is_empty() || part == ".") {
        Some("must not contain empty or `.` components")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(ValidationError::FilePath {
            path: path.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

fn check_files(files: &[FileSpec]) -> Result<(), ValidationError> {
    let mut seen = HashSet::new();
    for file in files {
        check_relative_path(&file.path)?;
        if file.mode > 0o777 {
            return Err(ValidationError::FileMode {
                path: file.path.clone(),
                mode: file.mode,
            });
        }
        if !seen.insert(file.path.as_str()) {
            return Err(ValidationError::DuplicateFile {
                path: file.path.clone(),
            });
        }
    }
    Ok(())
}

/// A host as git's credential protocol carries it: non-empty, bounded, no
/// control characters (so no CR, LF or NUL), no `=`, no whitespace.
pub fn check_credential_host(name: &'static str, host: &str) -> Result<(), ValidationError> {
    if host.is_empty() || host.len() > 261 {
        return Err(field(name, "is empty or too long"));
    }
    if host
        .chars()
        .any(|c| c.is_control() || c.is_whitespace() || c == '=')
    {
        return Err(field(
            name,
            "contains a control character, whitespace or `=`",
        ));
    }
    Ok(())
}

fn check_url_scheme(scheme: &str) -> Result<(), ValidationError> {
    let mut bytes = scheme.bytes();
    let ok = scheme.len() <= 32
        && matches!(bytes.next(), Some(b'a'..=b'z'))
        && bytes.all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'+' | b'-' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(field("protocol", "is not a lowercase URL scheme"))
    }
}

/// A POSIX-portable user name that is not `root`.
fn check_user(user: &str) -> Result<(), ValidationError> {
    let mut bytes = user.bytes();
    let portable = user.len() <= 32
        && matches!(bytes.next(), Some(b'a'..=b'z' | b'_'))
        && bytes.all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-'));
    if !portable {
        return Err(field("user", "must match [a-z_][a-z0-9_-]{0,31}"));
    }
    if user == "root" {
        return Err(field("user", "must be an unprivileged user, not root"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provision() -> Provision {
        Provision {
            env: vec![SecretEnvVar {
                name: "GITHUB_TOKEN".into(),
                value: SecretString::new("ghp_x".into()),
            }],
            env_plain: vec![PlainEnvVar {
                name: "LANG".into(),
                value: "C.UTF-8".into(),
            }],
            files: vec![FileSpec {
                path: ".config/gh/hosts.yml".into(),
                contents: SecretBytes::new(b"token: x\n".to_vec()),
                mode: 0o600,
            }],
            ca_certs: vec!["-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".into()],
            proxy: ProxySettings {
                http_proxy: Some("http://10.213.0.1:3128".into()),
                https_proxy: Some("http://10.213.0.1:3128".into()),
                no_proxy: vec!["localhost".into(), "127.0.0.1".into()],
            },
            git_credential_hosts: vec!["github.com".into()],
            command: vec!["claude".into(), "--print".into()],
            workdir: "/home/agent/work".into(),
            user: "agent".into(),
            workspace: Some(WorkspaceSpec {
                path: "/home/agent/work".into(),
                base: Some("0123456789abcdef0123456789abcdef01234567".into()),
            }),
            tty: None,
        }
    }

    #[test]
    fn tty_fields_are_validated() {
        let tty = |rows, cols, term: &str| TtySpec {
            rows,
            cols,
            term: term.into(),
        };
        let cases = [
            (tty(24, 80, "xterm-256color"), true),
            (tty(1, 1, "vt100"), true),
            (tty(4096, 4096, "screen.xterm+new_x"), true),
            (tty(0, 80, "xterm"), false),
            (tty(24, 0, "xterm"), false),
            (tty(4097, 80, "xterm"), false),
            (tty(24, u16::MAX, "xterm"), false),
            (tty(24, 80, ""), false),
            (tty(24, 80, "xterm\n"), false),
            (tty(24, 80, "xterm;rm -rf /"), false),
            (tty(24, 80, "x term"), false),
            (tty(24, 80, "xtérm"), false),
            (tty(24, 80, &"x".repeat(65)), false),
            (tty(24, 80, &"x".repeat(64)), true),
        ];
        for (spec, valid) in cases {
            let mut p = provision();
            p.tty = Some(spec.clone());
            let message = HostMessage::Provision(Box::new(p));
            assert_eq!(message.validate().is_ok(), valid, "{spec:?}");
            if valid {
                let bytes = message.encode().unwrap();
                assert_eq!(HostMessage::decode(&bytes).unwrap(), message);
            }
        }
        for (rows, cols, valid) in [
            (24, 80, true),
            (1, 4096, true),
            (0, 0, false),
            (0, 80, false),
            (24, 4097, false),
        ] {
            let message = HostMessage::Resize { rows, cols };
            assert_eq!(message.validate().is_ok(), valid, "{rows}x{cols}");
            if valid {
                let bytes = message.encode().unwrap();
                assert_eq!(HostMessage::decode(&bytes).unwrap(), message);
            }
        }
        // Absent means non-interactive, and is not written at all.
        let plain = HostMessage::Provision(Box::new(provision()))
            .encode()
            .unwrap();
        assert!(!std::str::from_utf8(&plain).unwrap().contains("tty"));
        for bad in [
            br#"{"type":"resize","rows":0,"cols":80}"#.as_slice(),
            br#"{"type":"resize","rows":24}"#,
            br#"{"type":"resize","rows":24,"cols":80,"x":1}"#,
            br#"{"type":"resize","rows":-1,"cols":80}"#,
            br#"{"type":"resize","rows":65536,"cols":80}"#,
        ] {
            assert!(
                HostMessage::decode(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn sample_provision_is_valid() {
        HostMessage::Provision(Box::new(provision()))
            .validate()
            .unwrap();
    }

    #[test]
    fn provision_constraints() {
        type Edit = fn(&mut Provision);
        let cases: &[(&str, Edit)] = &[
            ("env name digit first", |p| p.env[0].name = "1X".into()),
            ("env name empty", |p| p.env[0].name = String::new()),
            ("env name with =", |p| p.env[0].name = "A=B".into()),
            ("env name unicode", |p| p.env[0].name = "ÄB".into()),
            ("env name dash", |p| p.env_plain[0].name = "A-B".into()),
            ("duplicate env across kinds", |p| {
                p.env_plain[0].name = "GITHUB_TOKEN".into()
            }),
            ("NUL in secret env", |p| {
                p.env[0].value = SecretString::new("a\0b".into())
            }),
            ("NUL in plain env", |p| p.env_plain[0].value = "a\0".into()),
            ("absolute file", |p| p.files[0].path = "/etc/passwd".into()),
            ("dotdot file", |p| p.files[0].path = "a/../../etc".into()),
            ("dotdot alone", |p| p.files[0].path = "..".into()),
            ("dot component", |p| p.files[0].path = "./a".into()),
            ("empty component", |p| p.files[0].path = "a//b".into()),
            ("trailing slash", |p| p.files[0].path = "a/".into()),
            ("empty path", |p| p.files[0].path = String::new()),
            ("NUL path", |p| p.files[0].path = "a\0b".into()),
            ("setuid mode", |p| p.files[0].mode = 0o4755),
            ("duplicate file", |p| {
                let again = p.files[0].clone();
                p.files.push(again);
            }),
            ("not a PEM", |p| p.ca_certs[0] = "hello".into()),
            ("proxy with newline", |p| {
                p.proxy.https_proxy = Some("http://x\nEVIL=1".into())
            }),
            ("no_proxy with comma", |p| {
                p.proxy.no_proxy[0] = "a,b".into()
            }),
            ("credential host with =", |p| {
                p.git_credential_hosts[0] = "a=b".into()
            }),
            ("credential host with LF", |p| {
                p.git_credential_hosts[0] = "a\nhost=b".into()
            }),
            ("credential host with CR", |p| {
                p.git_credential_hosts[0] = "a\r".into()
            }),
            ("credential host with NUL", |p| {
                p.git_credential_hosts[0] = "a\0".into()
            }),
            ("empty command", |p| p.command.clear()),
            ("empty program", |p| p.command[0] = String::new()),
            ("NUL argument", |p| p.command.push("a\0b".into())),
            ("relative workdir", |p| p.workdir = "work".into()),
            ("dotdot workdir", |p| p.workdir = "/home/../root".into()),
            ("root user", |p| p.user = "root".into()),
            ("user with slash", |p| p.user = "../x".into()),
            ("uppercase user", |p| p.user = "Agent".into()),
            ("relative workspace", |p| ws(p).path = "work".into()),
            ("root workspace", |p| ws(p).path = "/".into()),
            ("dotdot workspace", |p| ws(p).path = "/home/../etc".into()),
            ("dot workspace", |p| ws(p).path = "/home/./x".into()),
            ("empty workspace part", |p| ws(p).path = "/home//x".into()),
            ("trailing slash workspace", |p| {
                ws(p).path = "/home/x/".into()
            }),
            ("NUL workspace", |p| ws(p).path = "/home/x\0".into()),
            ("short base", |p| ws(p).base = Some("abc123".into())),
            ("uppercase base", |p| {
                ws(p).base = Some("0123456789ABCDEF0123456789ABCDEF01234567".into())
            }),
            ("option in base", |p| {
                ws(p).base = Some("--upload-pack=touch-x-0123456789abcdef01".into())
            }),
            ("41 digit base", |p| ws(p).base = Some("0".repeat(41))),
        ];
        for (name, edit) in cases {
            let mut p = provision();
            edit(&mut p);
            assert!(p.validate().is_err(), "{name} should be rejected");
        }
    }

    fn ws(p: &mut Provision) -> &mut WorkspaceSpec {
        p.workspace.as_mut().unwrap()
    }

    #[test]
    fn workspace_is_optional_and_round_trips() {
        let mut p = provision();
        let message = HostMessage::Provision(Box::new(p.clone()));
        let back = HostMessage::decode(&message.encode().unwrap()).unwrap();
        assert_eq!(back, message);
        // Without one, the field is left out, so older guests accept it.
        p.workspace = None;
        let bytes = HostMessage::Provision(Box::new(p.clone()))
            .encode()
            .unwrap();
        assert!(!String::from_utf8_lossy(&bytes).contains("workspace"));
        let back = HostMessage::decode(&bytes).unwrap();
        assert_eq!(back, HostMessage::Provision(Box::new(p.clone())));
        // A SHA-256 base and no base are fine too.
        p.workspace = Some(WorkspaceSpec {
            path: "/w".into(),
            base: Some("a".repeat(64)),
        });
        p.validate().unwrap();
        p.workspace = Some(WorkspaceSpec {
            path: "/home/agent/work".into(),
            base: None,
        });
        p.validate().unwrap();
        // Unknown fields inside it are refused.
        let text = String::from_utf8(
            HostMessage::Provision(Box::new(p))
                .encode()
                .unwrap()
                .to_vec(),
        )
        .unwrap()
        .replace("\"base\":null", "\"base\":null,\"extra\":1");
        assert!(HostMessage::decode(text.as_bytes()).is_err());
    }

    #[test]
    fn accepted_edge_values() {
        let mut p = provision();
        p.env[0].name = "_".into();
        p.env_plain[0].name = "a1_B2".into();
        p.files[0].path = "a/.hidden/..x/b..".into();
        p.files[0].mode = 0o777;
        p.proxy = ProxySettings::default();
        p.git_credential_hosts = vec!["git.example.com:8443".into()];
        p.env[0].value = SecretString::new("quote\"nl\n$(x)`y`".into());
        p.validate().unwrap();
    }

    #[test]
    fn guest_constraints() {
        let request =
            |protocol: &str, host: &str, path: Option<&str>| GuestMessage::CredentialRequest {
                id: 1,
                protocol: protocol.into(),
                host: host.into(),
                path: path.map(Into::into),
            };
        let cases = [
            (request("https", "github.com", None), true),
            (request("https", "github.com:443", Some("o/r.git")), true),
            (request("git+ssh", "h", None), true),
            (request("HTTPS", "github.com", None), false),
            (request("", "github.com", None), false),
            (request("https\n", "github.com", None), false),
            (request("https", "", None), false),
            (request("https", "a=b", None), false),
            (request("https", "a\nb", None), false),
            (request("https", "a b", None), false),
            (request("https", "h", Some("a\nhost=evil")), false),
            (request("https", "h", Some("a\0")), false),
            (
                GuestMessage::Exited {
                    code: Some(0),
                    signal: None,
                },
                true,
            ),
            (
                GuestMessage::Exited {
                    code: None,
                    signal: Some(9),
                },
                true,
            ),
            (
                GuestMessage::Exited {
                    code: None,
                    signal: None,
                },
                false,
            ),
            (
                GuestMessage::Exited {
                    code: Some(1),
                    signal: Some(9),
                },
                false,
            ),
            (
                GuestMessage::Exited {
                    code: None,
                    signal: Some(0),
                },
                false,
            ),
            (GuestMessage::Started { pid: 0 }, false),
            (GuestMessage::Started { pid: 1 }, true),
            (
                GuestMessage::ProvisionFailed {
                    reason: "disk full".into(),
                },
                true,
            ),
            (
                GuestMessage::ProvisionFailed {
                    reason: "forged\nlog line".into(),
                },
                false,
            ),
            (
                GuestMessage::Hello {
                    protocol_version: PROTOCOL_VERSION,
                    agent_version: String::new(),
                },
                false,
            ),
        ];
        for (message, valid) in cases {
            assert_eq!(message.validate().is_ok(), valid, "{message:?}");
        }
    }

    #[test]
    fn granted_password_cannot_inject_credential_lines() {
        for (password, valid) in [
            ("ghp_abc", true),
            ("with space\"quote'$(x)", true),
            ("a\nusername=evil", false),
            ("a\r", false),
            ("a\0", false),
        ] {
            let message = HostMessage::CredentialResponse {
                id: 7,
                outcome: CredentialOutcome::Granted {
                    username: "x-access-token".into(),
                    password: SecretString::new(password.into()),
                },
            };
            assert_eq!(message.validate().is_ok(), valid, "{password:?}");
            if let Err(err) = message.validate() {
                assert!(!err.to_string().contains("evil"));
            }
        }
    }

    #[test]
    fn decode_rejects_unknown_and_malformed() {
        let cases: &[&[u8]] = &[
            b"",
            b"not json",
            b"{",
            b"[]",
            b"null",
            b"{}",
            br#"{"type":"hello"}"#,
            br#"{"type":"nope"}"#,
            br#"{"type":"Hello","protocol_version":{"major":1,"minor":0},"agent_version":"x"}"#,
            br#"{"type":"hello","protocol_version":{"major":1,"minor":0},"agent_version":"x","extra":1}"#,
            br#"{"type":"hello","protocol_version":{"major":1,"minor":0,"patch":0},"agent_version":"x"}"#,
            br#"{"type":"provisioned","extra":true}"#,
            br#"{"type":"started","pid":-1}"#,
            br#"{"type":"started","pid":"1"}"#,
            br#"{"type":"output","stream":"stdin","data":""}"#,
            br#"{"type":"output","stream":"stdout","data":"!!"}"#,
            br#"{"type":"started","pid":1} trailing"#,
            br#"{"type":"started","pid":1,"pid":2}"#,
            br#"{"type":"started","type":"revoked","pid":1}"#,
            br#"{"type":"revoked","type":"revoked"}"#,
            br#"{"type":"started","pid":1.0}"#,
            br#"{"type":"started","pid":4294967296}"#,
            br#"{"type":"output","stream":"stdout","data":"YQ"}"#,
            b"\xff\xfe",
        ];
        for case in cases {
            assert!(
                GuestMessage::decode(case).is_err(),
                "{}",
                String::from_utf8_lossy(case)
            );
        }
        let ok =
            br#"{"type":"hello","protocol_version":{"major":1,"minor":0},"agent_version":"x"}"#;
        assert_eq!(GuestMessage::decode(ok).unwrap().kind(), "hello");
        // A host message is not a guest message, and vice versa.
        assert!(GuestMessage::decode(br#"{"type":"shutdown"}"#).is_err());
        assert!(HostMessage::decode(br#"{"type":"provisioned"}"#).is_err());
        assert!(HostMessage::decode(br#"{"type":"shutdown","now":true}"#).is_err());
        assert_eq!(
            HostMessage::decode(br#"{"type":"shutdown"}"#).unwrap(),
            HostMessage::Shutdown {}
        );
    }

    #[test]
    fn unknown_field_in_nested_structs_is_rejected() {
        let good = HostMessage::Provision(Box::new(provision()))
            .encode()
            .unwrap();
        let text = std::str::from_utf8(&good).unwrap();
        HostMessage::decode(text.as_bytes()).unwrap();
        for (from, to) in [
            ("\"mode\":384", "\"mode\":384,\"owner\":0"),
            ("\"no_proxy\":[", "\"ftp_proxy\":null,\"no_proxy\":["),
            ("\"user\":\"agent\"", "\"user\":\"agent\",\"uid\":0"),
            ("\"name\":\"LANG\"", "\"name\":\"LANG\",\"export\":true"),
        ] {
            assert!(text.contains(from), "{from}");
            let bad = text.replacen(from, to, 1);
            assert!(HostMessage::decode(bad.as_bytes()).is_err(), "{to}");
        }
        let denied = br#"{"type":"credential_response","id":1,"outcome":{"result":"denied","reason":"r","extra":1}}"#;
        assert!(HostMessage::decode(denied).is_err());
    }

    #[test]
    fn decode_errors_do_not_quote_secrets() {
        // A secret in a field of the wrong type, and in an unknown field.
        let cases: &[&[u8]] = &[
            br#"{"type":"credential_response","id":1,"outcome":{"result":"granted","username":"u","password":"CANARY!"}}"#,
            br#"{"type":"credential_response","id":1,"outcome":{"result":"denied","reason":5,"CANARY":"CANARY"}}"#,
            br#"{"type":"revoke","scrub":"CANARY"}"#,
            br#"{"type":"CANARY"}"#,
        ];
        for case in cases {
            let err = HostMessage::decode(case).unwrap_err();
            assert!(!format!("{err} {err:?}").contains("CANARY"), "{err:?}");
        }
    }

    #[test]
    fn encode_refuses_invalid_messages() {
        let mut p = provision();
        p.user = "root".into();
        assert!(matches!(
            HostMessage::Provision(Box::new(p)).encode(),
            Err(EncodeError::Invalid(_))
        ));
    }

    #[test]
    fn handshake() {
        let v = |major, minor| ProtocolVersion { major, minor };
        let hello = |version| GuestMessage::Hello {
            protocol_version: version,
            agent_version: "0.1.0".into(),
        };
        // (host version, guest version, accepted)
        let cases = [
            (v(1, 0), v(1, 0), true),
            (v(1, 0), v(1, 7), true),
            (v(1, 3), v(1, 0), true),
            (v(1, 0), v(2, 0), false),
            (v(2, 0), v(1, 9), false),
            (v(0, 1), v(0, 2), true),
        ];
        for (host, guest, accepted) in cases {
            let answer = answer_hello(host, &hello(guest));
            match (&answer, accepted) {
                (HostMessage::Welcome { protocol_version }, true) => {
                    assert_eq!(*protocol_version, host);
                    assert_eq!(check_welcome(guest, &answer), Ok(host));
                }
                (HostMessage::Reject { reason }, false) => {
                    assert!(reason.contains(&guest.to_string()), "{reason}");
                    answer.validate().unwrap();
                    assert!(matches!(
                        check_welcome(guest, &answer),
                        Err(HandshakeError::Rejected { .. })
                    ));
                }
                _ => panic!("{host} vs {guest}: {answer:?}"),
            }
            assert_eq!(accept_hello(host, &hello(guest)).is_ok(), accepted);
        }
        // The guest also refuses a welcome from an incompatible host.
        assert_eq!(
            check_welcome(
                v(1, 0),
                &HostMessage::Welcome {
                    protocol_version: v(2, 0)
                }
            ),
            Err(HandshakeError::VersionMismatch {
                local: v(1, 0),
                peer: v(2, 0)
            })
        );
        // Anything but hello first is refused, and anything but
        // welcome/reject as the answer.
        assert_eq!(
            accept_hello(PROTOCOL_VERSION, &GuestMessage::Provisioned {}),
            Err(HandshakeError::Unexpected {
                expected: "hello",
                got: "provisioned"
            })
        );
        assert!(matches!(
            answer_hello(PROTOCOL_VERSION, &GuestMessage::Revoked {}),
            HostMessage::Reject { .. }
        ));
        assert!(matches!(
            check_welcome(PROTOCOL_VERSION, &HostMessage::Shutdown {}),
            Err(HandshakeError::Unexpected { .. })
        ));
    }
}
