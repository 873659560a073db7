//! Round-trip properties for frames and every message type, and the
//! redaction guarantee for secrets.

use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;
use zerolease_protocol::{
    Bytes, CredentialOutcome, FileSpec, FrameError, FrameReader, FrameWriter, GuestMessage,
    HostMessage, Message, OutputStream, PROTOCOL_VERSION, PlainEnvVar, ProtocolVersion, Provision,
    ProxySettings, SecretBytes, SecretEnvVar, SecretString,
};

// ---- strategies for valid values -------------------------------------

fn env_name() -> impl Strategy<Value = String> {
    "[A-Za-z_][A-Za-z0-9_]{0,15}"
}

fn text() -> impl Strategy<Value = String> {
    // Printable, including quotes and shell metacharacters.
    "[ -~é€]{0,40}"
}

fn any_secret_string() -> impl Strategy<Value = SecretString> {
    // Anything but NUL and control characters (so valid in env and as a
    // git password) — see `nasty_secret_strings` for those.
    "[^\\x00-\\x1f\\x7f-\\u{9f}]{0,64}".prop_map(SecretString::new)
}

fn any_secret_bytes() -> impl Strategy<Value = SecretBytes> {
    vec(any::<u8>(), 0..256).prop_map(SecretBytes::new)
}

fn rel_path() -> impl Strategy<Value = String> {
    vec("[A-Za-z0-9_.-]{1,12}", 1..4)
        .prop_filter("no dot components", |parts| {
            parts.iter().all(|p| p != "." && p != "..")
        })
        .prop_map(|parts| parts.join("/"))
}

fn host() -> impl Strategy<Value = String> {
    "[a-z0-9.-]{1,30}(:[0-9]{1,5})?"
}

fn version() -> impl Strategy<Value = ProtocolVersion> {
    (any::<u16>(), any::<u16>()).prop_map(|(major, minor)| ProtocolVersion { major, minor })
}

fn unique_by<T: Clone, K: Eq + std::hash::Hash>(items: Vec<T>, key: impl Fn(&T) -> K) -> Vec<T> {
    let mut seen = std::collections::HashSet::new();
    items.into_iter().filter(|i| seen.insert(key(i))).collect()
}

fn secret_env() -> impl Strategy<Value = Vec<SecretEnvVar>> {
    vec(
        (env_name(), any_secret_string()).prop_map(|(name, value)| SecretEnvVar { name, value }),
        0..4,
    )
    .prop_map(|vars| unique_by(vars, |v| v.name.clone()))
}

fn files() -> impl Strategy<Value = Vec<FileSpec>> {
    vec(
        (rel_path(), any_secret_bytes(), 0u32..=0o777).prop_map(|(path, contents, mode)| {
            FileSpec {
                path,
                contents,
                mode,
            }
        }),
        0..4,
    )
    .prop_map(|files| unique_by(files, |f| f.path.clone()))
}

fn provision() -> impl Strategy<Value = Provision> {
    (
        secret_env(),
        vec((env_name(), "[^\\x00]{0,20}"), 0..4),
        files(),
        vec("[A-Za-z0-9+/=\n]{0,80}", 0..3),
        (
            option::of("http://[a-z0-9.:]{1,20}"),
            option::of("http://[a-z0-9.:]{1,20}"),
            vec("[a-z0-9.*]{1,10}", 0..3),
        ),
        vec(host(), 0..3),
        vec("[^\\x00]{1,12}", 1..4),
        "(/[a-z0-9_.-]{1,8}){0,3}",
        "[a-z_][a-z0-9_-]{0,10}",
    )
        .prop_filter("not root", |t| t.8 != "root")
        .prop_filter("no dotdot workdir", |t| {
            !t.7.split('/').any(|part| part == "..")
        })
        .prop_map(
            |(env, plain, files, pems, (http, https, no_proxy), hosts, command, workdir, user)| {
                let env_plain = unique_by(
                    plain
                        .into_iter()
                        .filter(|(name, _)| env.iter().all(|e| &e.name != name))
                        .map(|(name, value)| PlainEnvVar { name, value })
                        .collect(),
                    |v| v.name.clone(),
                );
                Provision {
                    env,
                    env_plain,
                    files,
                    ca_certs: pems
                        .into_iter()
                        .map(|body| {
                            format!(
                                "-----BEGIN CERTIFICATE-----\n{body}\n-----END CERTIFICATE-----\n"
                            )
                        })
                        .collect(),
                    proxy: ProxySettings {
                        http_proxy: http,
                        https_proxy: https,
                        no_proxy,
                    },
                    git_credential_hosts: hosts,
                    command,
                    workdir: format!("/{workdir}"),
                    user,
                    workspace: None,
                    tty: None,
                }
            },
        )
}

fn guest_message() -> impl Strategy<Value = GuestMessage> {
    prop_oneof![
        (version(), "[ -~]{1,20}").prop_map(|(protocol_version, agent_version)| {
            GuestMessage::Hello {
                protocol_version,
                agent_version,
            }
        }),
        Just(GuestMessage::Provisioned {}),
        text().prop_map(|reason| GuestMessage::ProvisionFailed { reason }),
        (1u32..).prop_map(|pid| GuestMessage::Started { pid }),
        (
            any::<u64>(),
            "[a-z][a-z0-9+.-]{0,8}",
            host(),
            option::of(text())
        )
            .prop_map(
                |(id, protocol, host, path)| GuestMessage::CredentialRequest {
                    id,
                    protocol,
                    host,
                    path,
                }
            ),
        (
            prop_oneof![Just(OutputStream::Stdout), Just(OutputStream::Stderr)],
            vec(any::<u8>(), 0..512)
        )
            .prop_map(|(stream, data)| GuestMessage::Output {
                stream,
                data: Bytes(data)
            }),
        prop_oneof![
            any::<i32>().prop_map(|code| GuestMessage::Exited {
                code: Some(code),
                signal: None
            }),
            (1i32..=64).prop_map(|signal| GuestMessage::Exited {
                code: None,
                signal: Some(signal)
            }),
        ],
        Just(GuestMessage::SecretsUpdated {}),
        text().prop_map(|reason| GuestMessage::UpdateSecretsFailed { reason }),
        Just(GuestMessage::Revoked {}),
    ]
}

fn host_message() -> impl Strategy<Value = HostMessage> {
    prop_oneof![
        version().prop_map(|protocol_version| HostMessage::Welcome { protocol_version }),
        text().prop_map(|reason| HostMessage::Reject { reason }),
        provision().prop_map(|p| HostMessage::Provision(Box::new(p))),
        (any::<u64>(), "[ -~]{0,20}", any_secret_string()).prop_map(|(id, username, password)| {
            HostMessage::CredentialResponse {
                id,
                outcome: CredentialOutcome::Granted { username, password },
            }
        }),
        (any::<u64>(), text()).prop_map(|(id, reason)| HostMessage::CredentialResponse {
            id,
            outcome: CredentialOutcome::Denied { reason },
        }),
        (secret_env(), files()).prop_map(|(env, files)| HostMessage::UpdateSecrets { env, files }),
        any::<bool>().prop_map(|scrub| HostMessage::Revoke { scrub }),
        Just(HostMessage::Shutdown {}),
    ]
}

fn through_frames<M: Message + PartialEq + std::fmt::Debug>(messages: &[M]) -> Vec<M> {
    let mut wire = Vec::new();
    let mut writer = FrameWriter::new(&mut wire);
    for message in messages {
        writer
            .write_message(message)
            .expect("valid message encodes");
    }
    let mut reader = FrameReader::new(&wire[..]);
    let mut out = Vec::new();
    loop {
        match reader.read_message::<M>() {
            Ok(message) => out.push(message),
            Err(zerolease_protocol::ReadError::Frame(FrameError::Closed)) => break,
            Err(err) => panic!("{err:?}"),
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn frames_round_trip(payloads in vec(vec(any::<u8>(), 0..2048), 0..8), max in 2048usize..4096) {
        let mut wire = Vec::new();
        let mut writer = FrameWriter::with_max_len(&mut wire, max);
        for payload in &payloads {
            writer.write_frame(payload).unwrap();
        }
        let mut reader = FrameReader::with_max_len(&wire[..], max);
        for payload in &payloads {
            let frame = reader.read_frame().unwrap();
            prop_assert_eq!(&frame[..], &payload[..]);
        }
        prop_assert!(reader.read_frame().unwrap_err().is_closed());
    }

    #[test]
    fn any_cut_of_a_frame_stream_is_closed_or_truncated(
        payloads in vec(vec(any::<u8>(), 0..64), 1..4),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut wire = Vec::new();
        let mut writer = FrameWriter::new(&mut wire);
        let mut boundaries = vec![0];
        for payload in &payloads {
            writer.write_frame(payload).unwrap();
            boundaries.push(writer.get_mut().len());
        }
        let cut = cut.index(wire.len() + 1);
        let mut reader = FrameReader::new(&wire[..cut]);
        let whole = boundaries.iter().filter(|b| **b <= cut).count() - 1;
        for payload in &payloads[..whole] {
            prop_assert_eq!(&reader.read_frame().unwrap()[..], &payload[..]);
        }
        let end = reader.read_frame().unwrap_err();
        if boundaries.contains(&cut) {
            prop_assert!(end.is_closed(), "{:?}", end);
        } else {
            let truncated = matches!(end, FrameError::Truncated { .. });
            prop_assert!(truncated, "{:?}", end);
        }
    }

    #[test]
    fn guest_messages_round_trip(messages in vec(guest_message(), 1..6)) {
        prop_assert_eq!(through_frames(&messages), messages);
    }

    #[test]
    fn host_messages_round_trip(messages in vec(host_message(), 1..4)) {
        prop_assert_eq!(through_frames(&messages), messages);
    }

    #[test]
    fn arbitrary_payloads_never_panic(payload in vec(any::<u8>(), 0..256)) {
        let _ = GuestMessage::decode(&payload);
        let _ = HostMessage::decode(&payload);
    }

    #[test]
    fn json_like_garbage_never_panics(payload in "[{}\\[\\]\":,a-z0-9 ]{0,120}") {
        let _ = GuestMessage::decode(payload.as_bytes());
        let _ = HostMessage::decode(payload.as_bytes());
    }

    /// What decodes re-encodes to the same value (the fuzz target's
    /// property), starting from near-valid JSON.
    #[test]
    fn decoded_messages_re_encode_equal(message in host_message(), cut in 0usize..64, junk in "[ ,:{}\"a-z0-9]{0,4}") {
        let encoded = message.encode().unwrap();
        let mut text = String::from_utf8(encoded.to_vec()).unwrap();
        let at = text.len().saturating_sub(cut);
        if text.is_char_boundary(at) {
            text.insert_str(at, &junk);
        }
        if let Ok(decoded) = HostMessage::decode(text.as_bytes()) {
            let again = HostMessage::decode(&decoded.encode().unwrap()).unwrap();
            prop_assert_eq!(again, decoded);
        }
    }

    #[test]
    fn secret_bytes_round_trip_exactly(bytes in vec(any::<u8>(), 0..1024)) {
        let message = HostMessage::UpdateSecrets {
            env: vec![],
            files: vec![FileSpec { path: "f".into(), contents: SecretBytes::new(bytes.clone()), mode: 0o600 }],
        };
        let back = through_frames(std::slice::from_ref(&message));
        let HostMessage::UpdateSecrets { files, .. } = &back[0] else { panic!() };
        prop_assert_eq!(files[0].contents.expose_secret(), &bytes[..]);
    }
}

/// Secrets containing everything a shell, JSON or a line protocol could
/// mangle come back byte for byte.
#[test]
fn nasty_secrets_round_trip_byte_exact() {
    let nasty: [&[u8]; 8] = [
        b"\"quoted\" 'single'",
        b"line1\nline2\r\n",
        b"$(rm -rf ~) `id` ${HOME}",
        b"nul\0in\0the\0middle\0",
        b"\\\"\\n\\u0000",
        b"\xff\xfe\x00\x80 not utf-8",
        b"",
        b"=== base64 padding lookalike ==",
    ];
    for secret in nasty {
        let message = HostMessage::Provision(Box::new(Provision {
            env: vec![],
            env_plain: vec![],
            files: vec![FileSpec {
                path: ".netrc".into(),
                contents: SecretBytes::new(secret.to_vec()),
                mode: 0o600,
            }],
            ca_certs: vec![],
            proxy: ProxySettings::default(),
            git_credential_hosts: vec![],
            command: vec!["sh".into()],
            workdir: "/home/agent".into(),
            user: "agent".into(),
            workspace: None,
            tty: None,
        }));
        let back = through_frames(std::slice::from_ref(&message));
        let HostMessage::Provision(p) = &back[0] else {
            panic!("{back:?}")
        };
        assert_eq!(p.files[0].contents.expose_secret(), secret);
    }
    // Text secrets may hold anything but NUL (which env forbids).
    let text = "\"q\" 'q' \n\r\t $(x) `y` ${Z} \\ é";
    let message = HostMessage::UpdateSecrets {
        env: vec![SecretEnvVar {
            name: "TOKEN".into(),
            value: SecretString::new(text.into()),
        }],
        files: vec![],
    };
    let back = through_frames(std::slice::from_ref(&message));
    let HostMessage::UpdateSecrets { env, .. } = &back[0] else {
        panic!()
    };
    assert_eq!(env[0].value.expose_secret(), text);
}

/// Every message type that can carry a secret hides it from `Debug`, at
/// every nesting level, and from the encoded JSON's plain view.
#[test]
fn debug_never_shows_the_canary() {
    const CANARY: &str = "CANARY-7f3a9c";
    let secret = || SecretString::new(CANARY.into());
    let secret_bytes = || SecretBytes::new(CANARY.as_bytes().to_vec());
    let provision = Provision {
        env: vec![SecretEnvVar {
            name: "TOKEN".into(),
            value: secret(),
        }],
        env_plain: vec![],
        files: vec![FileSpec {
            path: ".git-credentials".into(),
            contents: secret_bytes(),
            mode: 0o600,
        }],
        ca_certs: vec![],
        proxy: ProxySettings::default(),
        git_credential_hosts: vec!["github.com".into()],
        command: vec!["claude".into()],
        workdir: "/home/agent".into(),
        user: "agent".into(),
        workspace: None,
        tty: None,
    };
    let messages = [
        HostMessage::Provision(Box::new(provision.clone())),
        HostMessage::CredentialResponse {
            id: 1,
            outcome: CredentialOutcome::Granted {
                username: "x-access-token".into(),
                password: secret(),
            },
        },
        HostMessage::UpdateSecrets {
            env: provision.env.clone(),
            files: provision.files.clone(),
        },
    ];
    for message in &messages {
        for shown in [format!("{message:?}"), format!("{message:#?}")] {
            assert!(!shown.contains(CANARY), "{shown}");
            assert!(shown.contains("[redacted"), "{shown}");
        }
        // Still there, just not shown.
        let back = through_frames(std::slice::from_ref(message));
        assert_eq!(&back[0], message);
    }
    let output = GuestMessage::Output {
        stream: OutputStream::Stdout,
        data: Bytes(CANARY.as_bytes().to_vec()),
    };
    assert!(!format!("{output:?}").contains(CANARY));
    for shown in [
        format!("{:?}", provision.env[0]),
        format!("{:?}", provision.files[0]),
        format!("{provision:?}"),
    ] {
        assert!(!shown.contains(CANARY), "{shown}");
    }
}

#[test]
fn hello_carries_this_crates_version() {
    let hello = GuestMessage::Hello {
        protocol_version: PROTOCOL_VERSION,
        agent_version: env!("CARGO_PKG_VERSION").into(),
    };
    assert_eq!(through_frames(std::slice::from_ref(&hello)), vec![hello]);
}
