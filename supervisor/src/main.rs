//! The `zerolease` binary: takes the master-key variables out of the
//! environment while the process is still single-threaded, then hands over to
//! the library's CLI.

use std::process::ExitCode;

use zerolease::vault::EnvKeys;

fn main() -> ExitCode {
    // SAFETY: nothing has spawned a thread yet; this is the first statement
    // of `main`, so no other thread can read the environment concurrently.
    let env_keys = unsafe { EnvKeys::take_from_process() };
    zerolease::cli::main(env_keys)
}
