//! Frame and message decoding of untrusted bytes.
//!
//! Properties checked, beyond "does not panic":
//! - no decoded frame exceeds the reader's bound, and an oversize error
//!   reports a length that really is over the bound;
//! - a truncation error reports fewer bytes than it needed;
//! - a payload that decodes as a message (either direction) re-encodes and
//!   decodes to an equal value, also through a frame writer and reader.
#![no_main]

use std::fmt::Debug;

use libfuzzer_sys::fuzz_target;
use zerolease_protocol::{
    FrameError, FrameReader, FrameWriter, GuestMessage, HostMessage, Message,
};

/// Smaller than the default so the fuzzer reaches the bound.
const MAX: usize = 64 * 1024;

fuzz_target!(|data: &[u8]| {
    let mut reader = FrameReader::with_max_len(data, MAX);
    loop {
        match reader.read_frame() {
            Ok(frame) => {
                assert!(frame.len() <= MAX, "frame of {} bytes", frame.len());
                round_trip::<GuestMessage>(&frame);
                round_trip::<HostMessage>(&frame);
            }
            Err(FrameError::TooLarge { len, max }) => {
                assert_eq!(max, MAX);
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
});

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
