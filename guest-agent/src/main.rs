//! `zerolease-guest`: argument handling only; the work is in the library.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use zerolease_guest::credential::{self, Action};
use zerolease_guest::provision::paths;
use zerolease_guest::{boot, error_chain as chain, locate_control_channel, version_line};

const USAGE: &str = "usage: zerolease-guest [--version | --help]\n\
       zerolease-guest credential [--socket PATH] get|store|erase\n\
\n\
As PID 1, boots the guest (mounts, modules, network), serves the host on the\n\
control port and powers off at the end. As another process without\n\
arguments, reports the control port it would use. `credential` is git's\n\
credential helper: it asks the guest agent, which asks the host.";

/// How long the helper waits for the agent (which waits for the host).
const HELPER_TIMEOUT: Duration = Duration::from_secs(60);

fn main() -> ExitCode {
    if std::process::id() == 1 {
        boot::pid1_main();
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["--version" | "-V"] => {
            println!("{}", version_line());
            ExitCode::SUCCESS
        }
        ["--help" | "-h"] => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        ["credential", "--socket", socket, action] => helper(action, Path::new(socket)),
        ["credential", action] => helper(action, Path::new(paths::CREDENTIAL_SOCKET)),
        [] => report(),
        _ => {
            eprintln!("{USAGE}");
            ExitCode::from(2)
        }
    }
}

fn helper(action: &str, socket: &Path) -> ExitCode {
    let Some(action) = Action::parse(action) else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    match credential::run_helper(
        action,
        &mut std::io::stdin().lock(),
        &mut std::io::stdout().lock(),
        socket,
        HELPER_TIMEOUT,
    ) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("zerolease-guest credential: {}", chain(&err));
            ExitCode::FAILURE
        }
    }
}

fn report() -> ExitCode {
    let cmdline = match std::fs::read_to_string("/proc/cmdline") {
        Ok(cmdline) => cmdline,
        Err(err) => {
            eprintln!("zerolease-guest: cannot read /proc/cmdline: {err}");
            return ExitCode::FAILURE;
        }
    };
    match locate_control_channel(&cmdline, Path::new("/sys")) {
        Ok((config, port)) => {
            println!(
                "zerolease-guest: address {}/{} via {}, control port {:?} at {}",
                config.address,
                config.prefix_len,
                config.gateway,
                port.name,
                port.dev_path(&PathBuf::from("/dev")).display()
            );
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("zerolease-guest: {}", chain(&err));
            ExitCode::FAILURE
        }
    }
}
