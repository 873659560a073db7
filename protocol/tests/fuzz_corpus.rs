//! Runs the `protocol_frame` fuzz target's property over every file of its
//! seed corpus (`fuzz/corpus/protocol_frame/`) and every prefix of each, so
//! the plain test suite checks it too.

use std::path::PathBuf;

use zerolease_protocol::props::{FUZZ_MAX_FRAME, frame_property};
use zerolease_protocol::{FrameError, FrameReader, GuestMessage, HostMessage, Message};

fn seed(name: &str) -> Vec<u8> {
    std::fs::read(corpus_dir().join(name)).unwrap()
}

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/protocol_frame")
}

#[test]
fn the_frame_corpus_holds_its_property() {
    let mut files: Vec<PathBuf> = std::fs::read_dir(corpus_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(files.len() >= 5, "{files:?}");
    for path in files {
        let bytes = std::fs::read(&path).unwrap();
        let whole = std::panic::catch_unwind(|| frame_property(&bytes));
        assert!(whole.is_ok(), "property fails on {}", path.display());
        // A reader sees every prefix of a stream on the way.
        for cut in 0..bytes.len() {
            frame_property(&bytes[..cut]);
        }
    }
}

/// The seeds reach what the property checks: messages of both directions
/// that decode (and so round-trip), the bound, and a cut-off frame.
#[test]
fn the_frame_seeds_are_what_their_names_say() {
    let frames = |name: &str| {
        let bytes = seed(name);
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
    let decodes_as_guest = |f: &Vec<u8>| GuestMessage::decode(f).is_ok();
    let decodes_as_host = |f: &Vec<u8>| HostMessage::decode(f).is_ok();

    let (guest, end) = frames("guest-stream");
    assert!(matches!(end, FrameError::Closed));
    assert_eq!(guest.len(), 6);
    assert!(guest.iter().all(decodes_as_guest));
    let (host, _) = frames("host-stream");
    assert_eq!(host.len(), 5);
    assert!(host.iter().all(decodes_as_host));
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
