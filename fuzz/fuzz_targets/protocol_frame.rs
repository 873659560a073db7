//! Frame and message decoding of untrusted bytes. The property lives in
//! `zerolease_protocol::props::frame_property`, so `cargo test` runs it
//! over this target's seed corpus too (`supervisor/tests/fuzz_corpus.rs`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    zerolease_protocol::props::frame_property(data);
});
