//! `zerolease-guest`: argument handling only; the work is in the library.

use std::path::Path;
use std::process::ExitCode;

use zerolease_guest::{locate_control_channel, version_line};

const USAGE: &str = "usage: zerolease-guest [--version | --help]\n\
\n\
Without arguments, reads /proc/cmdline and reports the control port it would\n\
use. Booting as PID 1 is not implemented yet.";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["--version" | "-V"] => {
            println!("{}", version_line());
            ExitCode::SUCCESS
        }
        ["--help" | "-h"] => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        [] => run(),
        _ => {
            eprintln!("{USAGE}");
            ExitCode::from(2)
        }
    }
}

fn run() -> ExitCode {
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
                port.dev_path(Path::new("/dev")).display()
            );
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprint!("zerolease-guest: {err}");
            let mut source = std::error::Error::source(&err);
            while let Some(cause) = source {
                eprint!(": {cause}");
                source = cause.source();
            }
            eprintln!();
            ExitCode::FAILURE
        }
    }
}
