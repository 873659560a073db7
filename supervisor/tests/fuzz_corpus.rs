//! Runs each fuzz target's property over every file of its seed corpus
//! (`fuzz/corpus/<target>/`), so the plain test suite checks them too.

use std::path::PathBuf;

use zerolease::proxy::props::{connect_property, domain_property, sni_property};
use zerolease::session::workspace::{Refusal, check_patch, check_result_properties};
use zerolease_protocol::props::{FUZZ_MAX_FRAME, frame_property};
use zerolease_protocol::{FrameError, FrameReader, GuestMessage, HostMessage, Message};

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap();
            (p, bytes)
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "empty corpus {}", dir.display());
    files
}

fn run(target: &str, property: fn(&[u8])) {
    for (path, bytes) in corpus(target) {
        let result = std::panic::catch_unwind(|| property(&bytes));
        assert!(result.is_ok(), "property fails on {}", path.display());
        // Every prefix too: the parsers see partial input on the wire.
        for cut in 0..bytes.len() {
            property(&bytes[..cut]);
        }
    }
}

#[test]
fn connect_corpus_holds_its_property() {
    run("connect", connect_property);
}

#[test]
fn sni_corpus_holds_its_property() {
    run("sni", sni_property);
}

#[test]
fn domain_corpus_holds_its_property() {
    run("domain", domain_property);
}

#[test]
fn protocol_frame_corpus_holds_its_property() {
    run("protocol_frame", frame_property);
}

/// The seed of `target` named `name`.
fn seed(target: &str, name: &str) -> Vec<u8> {
    corpus(target)
        .into_iter()
        .find(|(p, _)| p.ends_with(name))
        .unwrap_or_else(|| panic!("no seed {target}/{name}"))
        .1
}

/// The frame seeds reach what the property checks: messages of both
/// directions that decode (and so round-trip), the bound, a cut-off frame.
#[test]
fn the_frame_seeds_are_what_their_names_say() {
    let frames = |name: &str| {
        let bytes = seed("protocol_frame", name);
        let mut reader = FrameReader::with_max_len(&bytes[..], FUZZ_MAX_FRAME);
        let mut out = Vec::new();
        let end = loop {
            match reader.read_frame() {
                Ok(frame) => out.push(frame.to_vec()),
                Err(e) => break e,
            }
        };
        (out, end)
    };
    let (guest, end) = frames("guest-stream");
    assert!(matches!(end, FrameError::Closed));
    assert_eq!(guest.len(), 6);
    assert!(guest.iter().all(|f| GuestMessage::decode(f).is_ok()));
    let (host, _) = frames("host-stream");
    assert_eq!(host.len(), 5);
    assert!(host.iter().all(|f| HostMessage::decode(f).is_ok()));
    let (provision, _) = frames("provision");
    assert!(matches!(
        HostMessage::decode(&provision[0]),
        Ok(HostMessage::Provision(_))
    ));
    assert!(matches!(frames("oversize").1, FrameError::TooLarge { .. }));
    assert!(matches!(
        frames("truncated").1,
        FrameError::Truncated { .. }
    ));
}

#[test]
fn workspace_result_corpus_holds_its_property() {
    run("workspace_result", check_result_properties);
}

/// The workspace seeds are what their names say, so the property above
/// runs over safe sections and over each kind of refusal.
#[test]
fn the_workspace_seeds_cover_safe_and_refused_sections() {
    let refusals = |name: &str| -> Vec<Vec<Refusal>> {
        check_patch(&seed("workspace_result", name))
            .into_iter()
            .map(|s| s.refusals)
            .collect()
    };
    assert_eq!(refusals("safe-edit-and-new-file.patch"), [vec![], vec![]]);
    assert_eq!(
        refusals("git-hook-then-safe.patch"),
        [vec![Refusal::GitDir], vec![]]
    );
    assert_eq!(refusals("symlink-escape.patch"), [vec![Refusal::Symlink]]);
    assert_eq!(refusals("rename-outside.patch"), [vec![Refusal::Escapes]]);
    let preamble = refusals("mail-preamble.patch");
    assert_eq!(preamble.len(), 2);
    assert!(
        !preamble[0].is_empty() && preamble[1].is_empty(),
        "{preamble:?}"
    );
    assert_eq!(refusals("binary.patch").len(), 1);
}

#[test]
fn a_real_rustls_hello_yields_its_sni() {
    let bytes = std::fs::read(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/sni/rustls-api-github-com"),
    )
    .unwrap();
    match zerolease::proxy::sni::parse_client_hello(&bytes) {
        zerolease::proxy::sni::SniParse::Sni { name, hello_end } => {
            assert_eq!(name.as_str(), "api.github.com");
            assert_eq!(hello_end, bytes.len());
        }
        other => panic!("{other:?}"),
    }
}
