//! The property the `protocol_frame` fuzz target asserts, shared with a
//! `cargo test` that runs it over the target's seed corpus
//! (`fuzz/corpus/protocol_frame/`). It panics when the property fails.

use std::fmt::Debug;

use crate::{FrameError, FrameReader, FrameWriter, GuestMessage, HostMessage, Message};

/// Smaller than the default bound, so the fuzzer reaches it.
pub const FUZZ_MAX_FRAME: usize = 64 * 1024;

/// Reads `data` as a stream of frames bounded by [`FUZZ_MAX_FRAME`]:
/// - no frame read exceeds the bound, and an oversize error reports a
///   length that really is over it;
/// - a truncation error reports fewer bytes than it needed;
/// - a payload that decodes as a message (either direction) encodes and
///   decodes to an equal value, also through a frame writer and reader.
pub fn frame_property(data: &[u8]) {
    let mut reader = FrameReader::with_max_len(data, FUZZ_MAX_FRAME);
    loop {
        match reader.read_frame() {
            Ok(frame) => {
                assert!(
                    frame.len() <= FUZZ_MAX_FRAME,
                    "frame of {} bytes",
                    frame.len()
                );
                round_trip::<GuestMessage>(&frame);
                round_trip::<HostMessage>(&frame);
            }
            Err(FrameError::TooLarge { len, max }) => {
                assert_eq!(max, FUZZ_MAX_FRAME);
                assert!(len > max as u64, "{len} is within {max}");
                break;
            }
            Err(FrameError::Truncated { expected, got }) => {
                assert!(got < expected, "truncated with {got}/{expected}");
                break;
            }
            Err(FrameError::Closed) => break,
            Err(FrameError::Io(err)) => panic!("a slice reader failed: {err}"),
        }
    }
}

fn round_trip<M: Message + PartialEq + Debug>(payload: &[u8]) {
    let Ok(message) = M::decode(payload) else {
        return;
    };
    let encoded = message
        .encode()
        .expect("a decoded (hence validated) message encodes");
    let again = M::decode(&encoded).expect("an encoded message decodes");
    assert_eq!(again, message);

    let mut wire = Vec::new();
    FrameWriter::new(&mut wire)
        .write_message(&message)
        .expect("a decoded message fits a frame");
    let framed: M = FrameReader::new(&wire[..])
        .read_message()
        .expect("a written frame reads back");
    assert_eq!(framed, message);
}
