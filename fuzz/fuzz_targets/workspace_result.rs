//! The guest's workspace result: the out disk's header and the patch that
//! `zerolease diff`/`apply` check. The properties live in
//! `zerolease::session::workspace::check_result_properties`, so `cargo
//! test` runs them too: as a proptest, and over this target's seed corpus
//! (`supervisor/tests/fuzz_corpus.rs`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    zerolease::session::workspace::check_result_properties(data);
});
