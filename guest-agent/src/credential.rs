//! The git credential helper and its server in the PID 1 agent.
//!
//! `zerolease-guest credential get` is run by git (configured in
//! `/etc/gitconfig`). It reads git's request (`key=value` lines up to a blank
//! line) from stdin, sends it over the Unix socket
//! `/run/zerolease/credential.sock` to the PID 1 agent, which forwards it to
//! the host as a `CredentialRequest` and waits for the `CredentialResponse`.
//! A granted credential comes back as `username=…`/`password=…` lines that
//! the helper prints for git; a denial comes back empty and the helper
//! prints nothing, so git reports an authentication failure as usual.
//!
//! **Invariants:**
//! - Both sides parse with [`parse_request`]: input with NUL or CR, a line
//!   without `=`, a repeated key, or a protocol/host that the protocol crate
//!   would not send is refused, so no value can smuggle in extra attributes.
//! - Answers are rendered only from values without control characters, so a
//!   username or password can never add a line to git's input.
//! - The server answers only peers running as root or the agent user, and
//!   only for hosts in the provisioned list; anything else is denied without
//!   asking the host.
//! - The helper holds no secret beyond the one answer it relays.

use std::io::{self, BufRead, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use zeroize::Zeroizing;
use zerolease_protocol::{GuestMessage, Message, SecretString};

/// Bound on a request or answer read from git or the socket.
pub const MAX_MESSAGE_LEN: usize = 16 * 1024;

/// What git asks the helper to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Look up a credential: the only action that does anything.
    Get,
    /// Git reports a credential worked; ignored (nothing is stored).
    Store,
    /// Git reports a credential failed; ignored.
    Erase,
}

impl Action {
    /// Parses the helper's argument.
    pub fn parse(arg: &str) -> Option<Self> {
        match arg {
            "get" => Some(Self::Get),
            "store" => Some(Self::Store),
            "erase" => Some(Self::Erase),
            _ => None,
        }
    }
}

/// The part of git's request the host needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GitRequest {
    /// `https`.
    pub protocol: String,
    /// `github.com` or `host:port`.
    pub host: String,
    /// Repository path, if git sent one.
    pub path: Option<String>,
}

/// A credential for git. `Debug` redacts the password.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GitCredential {
    /// Username.
    pub username: String,
    /// Password or token.
    pub password: SecretString,
}

/// Why a credential exchange failed. Never quotes a value.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    /// The input is not a well-formed credential message.
    #[error("malformed credential message: {reason}")]
    Malformed {
        /// What is wrong.
        reason: &'static str,
    },
    /// The socket exchange failed.
    #[error("cannot reach the guest agent at {path}")]
    Socket {
        /// The socket.
        path: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Reading or writing the helper's stdin/stdout failed.
    #[error("credential helper I/O failed")]
    Io(#[source] io::Error),
}

fn malformed(reason: &'static str) -> CredentialError {
    CredentialError::Malformed { reason }
}

/// Splits a credential message into `(key, value)` pairs, up to the first
/// blank line or the end. Refuses NUL, CR, non-UTF-8, oversize input, lines
/// without `=` and empty keys.
fn attributes(input: &[u8]) -> Result<Vec<(&str, &str)>, CredentialError> {
    if input.len() > MAX_MESSAGE_LEN {
        return Err(malformed("too long"));
    }
    if input.contains(&0) {
        return Err(malformed("contains NUL"));
    }
    if input.contains(&b'\r') {
        return Err(malformed("contains a carriage return"));
    }
    let text = std::str::from_utf8(input).map_err(|_| malformed("is not UTF-8"))?;
    let mut pairs = Vec::new();
    for line in text.split('\n') {
        if line.is_empty() {
            break;
        }
        let (key, value) = line
            .split_once('=')
            .ok_or_else(|| malformed("a line has no `=`"))?;
        if key.is_empty() {
            return Err(malformed("a line has an empty key"));
        }
        pairs.push((key, value));
    }
    Ok(pairs)
}

/// Parses git's request. `protocol` and `host` are required and, like
/// `path`, may appear once; other keys (`username`, `capability[]`, …) are
/// ignored. The result is checked with the same rules the protocol applies
/// to `CredentialRequest`.
pub fn parse_request(input: &[u8]) -> Result<GitRequest, CredentialError> {
    let mut protocol = None;
    let mut host = None;
    let mut path = None;
    for (key, value) in attributes(input)? {
        let slot = match key {
            "protocol" => &mut protocol,
            "host" => &mut host,
            "path" => &mut path,
            _ => continue,
        };
        if slot.replace(value.to_owned()).is_some() {
            return Err(malformed("a key is repeated"));
        }
    }
    let request = GitRequest {
        protocol: protocol.ok_or_else(|| malformed("no protocol"))?,
        host: host.ok_or_else(|| malformed("no host"))?,
        path,
    };
    request
        .to_message(0)
        .validate()
        .map_err(|_| malformed("protocol, host or path is not acceptable"))?;
    Ok(request)
}

impl GitRequest {
    /// The protocol message for this request.
    pub fn to_message(&self, id: u64) -> GuestMessage {
        GuestMessage::CredentialRequest {
            id,
            protocol: self.protocol.clone(),
            host: self.host.clone(),
            path: self.path.clone(),
        }
    }

    /// Renders the request in git's format (what the helper sends the
    /// server), ending with a blank line.
    pub fn render(&self) -> String {
        let mut text = format!("protocol={}\nhost={}\n", self.protocol, self.host);
        if let Some(path) = &self.path {
            text.push_str(&format!("path={path}\n"));
        }
        text.push('\n');
        text
    }
}

/// Renders a credential for git: `username=…\npassword=…\n`. Refuses values
/// with control characters (they could add attributes) or an empty username.
pub fn render_credential(
    credential: &GitCredential,
) -> Result<Zeroizing<Vec<u8>>, CredentialError> {
    let password = credential.password.expose_secret();
    if credential.username.is_empty()
        || credential.username.chars().any(char::is_control)
        || password.chars().any(char::is_control)
    {
        return Err(malformed("username or password has a control character"));
    }
    let mut out = Zeroizing::new(Vec::with_capacity(
        credential.username.len() + password.len() + 20,
    ));
    out.extend_from_slice(b"username=");
    out.extend_from_slice(credential.username.as_bytes());
    out.extend_from_slice(b"\npassword=");
    out.extend_from_slice(password.as_bytes());
    out.push(b'\n');
    Ok(out)
}

/// Parses the server's answer: empty means denied; otherwise exactly a
/// username and a password.
pub fn parse_credential(input: &[u8]) -> Result<Option<GitCredential>, CredentialError> {
    if input.is_empty() {
        return Ok(None);
    }
    let mut username = None;
    let mut password = None;
    for (key, value) in attributes(input)? {
        let slot = match key {
            "username" => &mut username,
            "password" => &mut password,
            _ => return Err(malformed("an answer has an unknown key")),
        };
        if slot.replace(Zeroizing::new(value.to_owned())).is_some() {
            return Err(malformed("a key is repeated"));
        }
    }
    let (Some(username), Some(password)) = (username, password) else {
        return Err(malformed("an answer lacks the username or password"));
    };
    let credential = GitCredential {
        username: username.to_string(),
        password: SecretString::new(password.to_string()),
    };
    render_credential(&credential)?;
    Ok(Some(credential))
}

/// Reads from `reader` up to a blank line, the end, or the bound.
fn read_message(reader: &mut impl Read) -> io::Result<Zeroizing<Vec<u8>>> {
    let mut buf = Zeroizing::new(Vec::with_capacity(MAX_MESSAGE_LEN + 1));
    let mut reader = io::BufReader::new(reader.take(MAX_MESSAGE_LEN as u64 + 1));
    loop {
        let start = buf.len();
        let n = reader.read_until(b'\n', &mut buf)?;
        if n == 0 || buf[start..] == *b"\n" || buf.len() > MAX_MESSAGE_LEN {
            return Ok(buf);
        }
    }
}

/// The helper: `zerolease-guest credential <action>`. For `get`, asks the
/// agent at `socket` and prints a granted credential to `output`; prints
/// nothing on denial. `store` and `erase` read their input and do nothing.
pub fn run_helper(
    action: Action,
    input: &mut impl Read,
    output: &mut impl Write,
    socket: &Path,
    timeout: Duration,
) -> Result<(), CredentialError> {
    let request = read_message(input).map_err(CredentialError::Io)?;
    if action != Action::Get {
        return Ok(());
    }
    let request = parse_request(&request)?;
    let socket_err = |source| CredentialError::Socket {
        path: socket.display().to_string(),
        source,
    };
    let mut stream = UnixStream::connect(socket).map_err(socket_err)?;
    stream.set_read_timeout(Some(timeout)).map_err(socket_err)?;
    stream
        .set_write_timeout(Some(timeout))
        .map_err(socket_err)?;
    stream
        .write_all(request.render().as_bytes())
        .map_err(socket_err)?;
    stream
        .shutdown(std::net::Shutdown::Write)
        .map_err(socket_err)?;
    let answer = read_message(&mut stream).map_err(socket_err)?;
    if let Some(credential) = parse_credential(&answer)? {
        output
            .write_all(&render_credential(&credential)?)
            .and_then(|()| output.flush())
            .map_err(CredentialError::Io)?;
    }
    Ok(())
}

/// A request the server hands to the agent's main loop, with the channel to
/// answer on (`None` = denied).
#[derive(Debug)]
pub struct CredentialAsk {
    /// What git asked for.
    pub request: GitRequest,
    /// Where the answer goes.
    pub reply: mpsc::Sender<Option<GitCredential>>,
}

/// Who may ask, for which hosts, and how long to wait for the host.
#[derive(Debug, Clone)]
pub struct ServerPolicy {
    /// The agent user's uid (root may ask too).
    pub agent_uid: u32,
    /// Hosts credentials may be asked for (`host` as git sends it).
    pub hosts: Vec<String>,
    /// How long to wait for the host's answer.
    pub timeout: Duration,
}

/// Binds the credential socket at `path` (replacing a stale one), owned by
/// `uid`, mode 0600.
pub fn bind(path: &Path, uid: u32, gid: u32) -> io::Result<UnixListener> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(err) => return Err(err),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    std::os::unix::fs::chown(path, Some(uid), Some(gid))?;
    Ok(listener)
}

/// Accepts helper connections until `sink` refuses an ask (the main loop is
/// gone). Each connection is served on its own thread so a stuck helper
/// cannot hold up the others.
pub fn serve(
    listener: UnixListener,
    policy: ServerPolicy,
    sink: impl Fn(CredentialAsk) -> bool + Send + Sync + Clone + 'static,
) {
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let policy = policy.clone();
        let sink = sink.clone();
        std::thread::spawn(move || {
            let _ = serve_one(stream, &policy, &sink);
        });
    }
}

fn peer_allowed(stream: &UnixStream, agent_uid: u32) -> bool {
    use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
    getsockopt(stream, PeerCredentials).is_ok_and(|creds| uid_may_ask(creds.uid(), agent_uid))
}

/// Only root and the agent user may ask for credentials.
pub fn uid_may_ask(peer_uid: u32, agent_uid: u32) -> bool {
    peer_uid == 0 || peer_uid == agent_uid
}

/// Decides whether a request may go to the host at all.
pub fn host_allowed(request: &GitRequest, hosts: &[String]) -> bool {
    hosts.iter().any(|h| h.eq_ignore_ascii_case(&request.host))
}

fn serve_one(
    mut stream: UnixStream,
    policy: &ServerPolicy,
    sink: &impl Fn(CredentialAsk) -> bool,
) -> io::Result<()> {
    stream.set_read_timeout(Some(policy.timeout))?;
    stream.set_write_timeout(Some(policy.timeout))?;
    if !peer_allowed(&stream, policy.agent_uid) {
        return Ok(());
    }
    let input = read_message(&mut stream)?;
    let Ok(request) = parse_request(&input) else {
        return Ok(());
    };
    if !host_allowed(&request, &policy.hosts) {
        return Ok(());
    }
    let (reply, answer) = mpsc::channel();
    if !sink(CredentialAsk { request, reply }) {
        return Ok(());
    }
    if let Ok(Some(credential)) = answer.recv_timeout(policy.timeout)
        && let Ok(text) = render_credential(&credential)
    {
        stream.write_all(&text)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests() {
        let ok = |protocol: &str, host: &str, path: Option<&str>| {
            Ok::<_, ()>(GitRequest {
                protocol: protocol.into(),
                host: host.into(),
                path: path.map(Into::into),
            })
        };
        let cases: &[(&[u8], Result<GitRequest, ()>)] = &[
            (b"protocol=https\nhost=github.com\n\n", ok("https", "github.com", None)),
            (b"protocol=https\nhost=github.com", ok("https", "github.com", None)),
            (
                b"protocol=https\nhost=git.example:8443\npath=o/r.git\nusername=me\ncapability[]=authtype\n\n",
                ok("https", "git.example:8443", Some("o/r.git")),
            ),
            // A value may contain `=`; only the first one splits.
            (b"protocol=https\nhost=h\npath=a=b\n", ok("https", "h", Some("a=b"))),
            // What follows the blank line is not part of the request.
            (
                b"protocol=https\nhost=good\n\nhost=evil\n",
                ok("https", "good", None),
            ),
            // Injection attempts and malformed input.
            (b"protocol=https\nhost=evil\nhost=good\n", Err(())),
            (b"protocol=https\nhost=evil\rusername=x\n", Err(())),
            (b"protocol=https\nhost=evil\0username=x\n", Err(())),
            (b"protocol=https\nhost=evil\nusername=x\nprotocol=http\n", Err(())),
            (b"protocol=https\nhost=evil host\n", Err(())),
            (b"protocol=https\nhost=a=b\n", Err(())),
            (b"protocol=https\nhost=\n", Err(())),
            (b"protocol=HTTPS\nhost=h\n", Err(())),
            (b"protocol=https\n", Err(())),
            (b"host=h\n", Err(())),
            (b"protocol=https\nhost=h\njunk\n", Err(())),
            (b"protocol=https\nhost=h\n=x\n", Err(())),
            (b"protocol=https\nhost=h\npath=a\x07b\n", Err(())),
            (b"protocol=https\nhost=\xff\n", Err(())),
            (b"", Err(())),
            (b"\n", Err(())),
        ];
        for (input, expected) in cases {
            let got = parse_request(input).map_err(drop);
            assert_eq!(&got, expected, "{:?}", String::from_utf8_lossy(input));
        }
        let long = format!(
            "protocol=https\nhost=h\npath={}\n",
            "a".repeat(MAX_MESSAGE_LEN)
        );
        assert!(parse_request(long.as_bytes()).is_err());
    }

    #[test]
    fn requests_render_and_parse_back() {
        for request in [
            GitRequest {
                protocol: "https".into(),
                host: "h:1".into(),
                path: Some("a/b".into()),
            },
            GitRequest {
                protocol: "http".into(),
                host: "x".into(),
                path: None,
            },
        ] {
            assert_eq!(parse_request(request.render().as_bytes()).unwrap(), request);
        }
    }

    #[test]
    fn credentials() {
        let cred = |u: &str, p: &str| GitCredential {
            username: u.into(),
            password: SecretString::new(p.into()),
        };
        assert_eq!(
            &render_credential(&cred("x-access-token", "ghp_1=2")).unwrap()[..],
            b"username=x-access-token\npassword=ghp_1=2\n"
        );
        for (u, p) in [
            ("u\nhost=evil", "p"),
            ("u", "p\nusername=root"),
            ("u", "p\r"),
            ("u", "p\0"),
            ("", "p"),
        ] {
            assert!(render_credential(&cred(u, p)).is_err(), "{u:?} {p:?}");
        }
        assert_eq!(parse_credential(b"").unwrap(), None);
        assert_eq!(
            parse_credential(b"username=u\npassword=p\n").unwrap(),
            Some(cred("u", "p"))
        );
        for bad in [
            &b"username=u\n"[..],
            b"username=u\npassword=p\npassword=q\n",
            b"username=u\npassword=p\nhost=evil\n",
            b"username=u\npassword=p\r\n",
            b"\n",
        ] {
            assert!(parse_credential(bad).is_err(), "{bad:?}");
        }
        assert!(!format!("{:?}", cred("u", "hunter2")).contains("hunter2"));
    }

    proptest::proptest! {
        /// Whatever bytes arrive, an accepted request re-renders to exactly
        /// its own attributes (no smuggled lines) and parses back equal; an
        /// accepted answer renders to exactly two lines.
        #[test]
        fn parsing_never_lets_extra_attributes_through(
            input in proptest::collection::vec(
                proptest::prop_oneof![
                    proptest::strategy::Just(b'\n'),
                    proptest::strategy::Just(b'='),
                    proptest::strategy::Just(b'\r'),
                    proptest::strategy::Just(0u8),
                    proptest::num::u8::ANY,
                ],
                0..96,
            ),
            prefix in proptest::sample::select(vec![
                &b""[..],
                b"protocol=https\nhost=",
                b"username=u\npassword=",
            ]),
        ) {
            let mut bytes = prefix.to_vec();
            bytes.extend_from_slice(&input);
            if let Ok(request) = parse_request(&bytes) {
                let text = request.render();
                let lines = text.trim_end_matches('\n').lines().count();
                proptest::prop_assert_eq!(lines, 2 + usize::from(request.path.is_some()));
                proptest::prop_assert_eq!(parse_request(text.as_bytes()).unwrap(), request);
            }
            if let Ok(Some(credential)) = parse_credential(&bytes) {
                let text = render_credential(&credential).unwrap();
                proptest::prop_assert_eq!(text.iter().filter(|&&b| b == b'\n').count(), 2);
                proptest::prop_assert!(!text.contains(&b'\r') && !text.contains(&0));
            }
        }
    }

    #[test]
    fn who_may_ask() {
        let cases = [
            (0, 1000, true),
            (1000, 1000, true),
            (1001, 1000, false),
            (65534, 1000, false),
            (u32::MAX, 1000, false),
        ];
        for (peer, agent, expected) in cases {
            assert_eq!(uid_may_ask(peer, agent), expected, "{peer} {agent}");
        }
        let hosts = ["github.com".to_owned()];
        let request = |host: &str| GitRequest {
            protocol: "https".into(),
            host: host.into(),
            path: None,
        };
        assert!(host_allowed(&request("github.com"), &hosts));
        assert!(host_allowed(&request("GITHUB.COM"), &hosts));
        assert!(!host_allowed(&request("github.com.evil"), &hosts));
        assert!(!host_allowed(&request("evil.github.com"), &hosts));
        assert!(!host_allowed(&request("github.com:443"), &hosts));
        assert!(!host_allowed(&request("github.com"), &[]));
    }

    #[test]
    fn actions() {
        assert_eq!(Action::parse("get"), Some(Action::Get));
        assert_eq!(Action::parse("store"), Some(Action::Store));
        assert_eq!(Action::parse("erase"), Some(Action::Erase));
        assert_eq!(Action::parse("GET"), None);
        assert_eq!(Action::parse(""), None);
    }

    /// A server whose "host" grants `github.com` and denies the rest; the
    /// helper talks to it over a real socket.
    fn server(dir: &Path, hosts: &[&str], timeout: Duration) -> std::path::PathBuf {
        let path = dir.join("credential.sock");
        let uid = nix::unistd::getuid().as_raw();
        let gid = nix::unistd::getgid().as_raw();
        let listener = bind(&path, uid, gid).unwrap();
        let policy = ServerPolicy {
            agent_uid: uid,
            hosts: hosts.iter().map(|h| (*h).to_owned()).collect(),
            timeout,
        };
        std::thread::spawn(move || {
            serve(listener, policy, |ask: CredentialAsk| {
                let answer = match ask.request.host.as_str() {
                    "github.com" => Some(GitCredential {
                        username: "x-access-token".into(),
                        password: SecretString::new("ghp_secret".into()),
                    }),
                    // Never answers: the server's timeout applies.
                    "slow.example" => {
                        std::mem::forget(ask.reply);
                        return true;
                    }
                    _ => None,
                };
                ask.reply.send(answer).is_ok()
            });
        });
        path
    }

    fn helper(action: Action, input: &[u8], socket: &Path) -> Result<Vec<u8>, CredentialError> {
        let mut output = Vec::new();
        run_helper(
            action,
            &mut &input[..],
            &mut output,
            socket,
            Duration::from_secs(5),
        )?;
        Ok(output)
    }

    #[test]
    fn socket_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let socket = server(
            dir.path(),
            &["github.com", "gitlab.com", "slow.example"],
            Duration::from_millis(300),
        );
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&socket).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);

        let granted = helper(Action::Get, b"protocol=https\nhost=github.com\n\n", &socket).unwrap();
        assert_eq!(granted, b"username=x-access-token\npassword=ghp_secret\n");
        // Case differences in the host do not matter.
        let granted = helper(Action::Get, b"protocol=https\nhost=GitHub.com\n\n", &socket);
        assert!(granted.is_ok());
        // Denied by the host, not in the list, or no answer in time:
        // nothing printed, no error (git then reports the failure itself).
        for host in ["gitlab.com", "evil.example", "slow.example"] {
            let input = format!("protocol=https\nhost={host}\n\n");
            assert_eq!(
                helper(Action::Get, input.as_bytes(), &socket).unwrap(),
                b"",
                "{host}"
            );
        }
        // store and erase do nothing, even with a bad request.
        assert_eq!(helper(Action::Store, b"junk", &socket).unwrap(), b"");
        assert_eq!(
            helper(Action::Erase, b"protocol=https\nhost=github.com\n", &socket).unwrap(),
            b""
        );
        // A malformed request is refused before the socket.
        assert!(matches!(
            helper(Action::Get, b"protocol=https\nhost=a\rb\n", &socket),
            Err(CredentialError::Malformed { .. })
        ));
        // A raw client bypassing the helper's checks gets nothing either.
        let mut raw = UnixStream::connect(&socket).unwrap();
        raw.write_all(b"protocol=https\nhost=github.com\nhost=evil\n\n")
            .unwrap();
        raw.shutdown(std::net::Shutdown::Write).unwrap();
        let mut answer = Vec::new();
        raw.read_to_end(&mut answer).unwrap();
        assert!(answer.is_empty());
        // No agent listening: an error that names the socket.
        let missing = dir.path().join("missing.sock");
        let err = helper(Action::Get, b"protocol=https\nhost=github.com\n", &missing).unwrap_err();
        assert!(err.to_string().contains("missing.sock"), "{err}");
    }
}
