//! The `zerolease` command line: argument parsing (clap), one function per
//! command, output for people or `--json`, and exit codes.
//!
//! **Architecture Invariant:** secret values enter only through stdin or a
//! no-echo prompt — there is no flag that takes one — and leave only through
//! `lease access` on stdout.

mod detach;
mod doctor;
mod image_cmd;
mod leases;
mod logs;
mod output;
mod sessions;
mod workspace;

use std::io::{IsTerminal, Read};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use zeroize::Zeroizing;

use crate::clock::{SystemClock, Timestamp, format_duration_short, parse_duration};
use crate::domain::{DomainPattern, HostName};
use crate::home::{ENV_HOME, StateDir};
use crate::manifest::Manifest;
use crate::vault::{
    AgentPattern, AuditFilter, EnvKeys, GrantSpec, KeySourceKind, KeyringBackend, LeaseAsk,
    LeaseFilter, LeaseRequest, LeaseStatus, NewSecret, PolicyDocument, RevokeScope, SecretValue,
    Vault, VaultConfig, VaultError,
};
pub use output::ExitStatus;
use output::{Table, json};

#[derive(Debug, Parser)]
#[command(
    name = "zerolease",
    version,
    about = "Run AI coding agents with leased, domain-scoped credentials",
    long_about = None,
)]
pub struct Cli {
    /// State directory (default: $XDG_DATA_HOME/zerolease).
    #[arg(long, global = true, env = ENV_HOME, value_name = "DIR")]
    home: Option<PathBuf>,

    /// Where the vault's master key comes from. A new vault uses `file`
    /// unless told otherwise; an existing one uses the source it records.
    #[arg(long, global = true, env = "ZEROLEASE_KEY_SOURCE", value_enum)]
    key_source: Option<KeySourceKind>,

    /// Print machine-readable JSON (one object or array per line).
    #[arg(long, global = true)]
    json: bool,

    /// More log output on stderr (-v info, -vv debug). ZEROLEASE_LOG
    /// takes a tracing filter for finer control.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Store, list, rotate and remove secrets.
    #[command(subcommand)]
    Secret(SecretCmd),
    /// Who may lease which secret, for which domains, for how long.
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// Grant, use, renew, list and revoke leases.
    #[command(subcommand)]
    Lease(LeaseCmd),
    /// Read and verify the hash-chained audit log.
    #[command(subcommand)]
    Audit(AuditCmd),
    /// Manage the vault's master key.
    #[command(subcommand)]
    Key(KeyCmd),
    /// Scan, seal and verify credential-free guest images.
    #[command(subcommand)]
    Image(image_cmd::ImageCmd),
    /// Validate session manifests.
    #[command(subcommand)]
    Manifest(ManifestCmd),
    /// List sessions: state, image, age, leases with time left, open
    /// tunnels, bytes, blocked attempts.
    Ps {
        /// Include finished sessions.
        #[arg(long)]
        all: bool,
    },
    /// Show one session in full: its record, leases, live numbers while it
    /// runs, and its report once it has finished.
    Inspect { session: String },
    /// Revoke every lease of a running session: its tunnels close at once
    /// and the agent is offline; the VM stays.
    Revoke { session: String },
    /// Extend a running session's leases, within their grants' maximum,
    /// without restarting anything. Exits 3 if any lease was refused.
    Renew {
        session: String,
        /// Only the lease of this secret (default: all of the session's).
        #[arg(long, value_name = "NAME")]
        credential: Option<String>,
        /// The new lifetime from now (default: the manifest's ttl, or the
        /// grant's maximum); never past the grant's maximum.
        #[arg(long)]
        ttl: Option<String>,
    },
    /// Revoke and tear a session down: QEMU, tap, nftables table, runtime
    /// directory. Works on a session whose `zerolease run` died, too.
    Destroy { session: String },
    /// Join the terminal of a session started with `run --detach`; Enter ~ .
    /// detaches again (the session goes on).
    Attach { session: String },
    /// Print the agent's output of a session (the newest 8 MiB are kept).
    Logs {
        session: String,
        /// Keep printing new output until the session ends.
        #[arg(short, long)]
        follow: bool,
        /// Print the guest's serial console instead (kernel messages and the
        /// guest agent's boot lines, stamped with the guest's uptime): where
        /// to look when a VM does not boot.
        #[arg(long)]
        console: bool,
    },
    /// Check that this host can run sessions (QEMU, KVM, nftables, tun,
    /// privileges, the address pool, the image) and say how to fix each
    /// problem. Exits 1 when something stops sessions.
    Doctor {
        /// Where images live (default: images/out, or ZEROLEASE_IMAGES).
        #[arg(long, env = "ZEROLEASE_IMAGES")]
        images: Option<PathBuf>,
        /// The image to verify, whose kernel the KVM probe boots.
        #[arg(long, default_value = "minimal")]
        image: String,
        /// How long the KVM probe may take.
        #[arg(long, default_value = "20s")]
        kvm_timeout: String,
    },
    /// Run a session: boot a disposable VM from the manifest's image, lease
    /// its credentials, run the agent, tear everything down. Exits with the
    /// agent's exit code.
    Run {
        manifest: PathBuf,
        /// The agent the policy is checked for (default: the manifest's name).
        #[arg(long)]
        agent: Option<String>,
        /// Where images live (default: images/out, or ZEROLEASE_IMAGES).
        #[arg(long, env = "ZEROLEASE_IMAGES")]
        images: Option<PathBuf>,
        /// How long to wait for the guest agent's hello, per accelerator.
        #[arg(long, default_value = "90s")]
        hello_timeout: String,
        /// Never attach the terminal, even when stdin and stdout are one:
        /// the agent's output is piped and it gets no input.
        #[arg(long)]
        no_tty: bool,
        /// Start the session in the background, print its id once it runs,
        /// and exit; join it with `zerolease attach`.
        #[arg(long, conflicts_with_all = ["no_tty", "ci"])]
        detach: bool,
        /// Internal: the background half of `--detach`.
        #[arg(long, hide = true)]
        detached_child: bool,
        /// Show no progress and no report on stderr.
        #[arg(long, short)]
        quiet: bool,
        /// Write the end-of-session report as JSON to FILE (with --ci the
        /// default is ./zerolease-report.json).
        #[arg(long, value_name = "FILE")]
        report: Option<PathBuf>,
        /// CI mode: never prompts and never attaches a terminal, plain
        /// progress lines, a hard timeout, the JSON report written to a
        /// file; exits with the agent's exit code.
        #[arg(long)]
        ci: bool,
        /// Hard limit on the whole session (`10m`); default: the manifest's
        /// `timeout`.
        #[arg(long)]
        timeout: Option<String>,
        /// Copy this directory into the VM as the agent's working directory
        /// (replaces the manifest's `workspace`).
        #[arg(long, value_name = "DIR")]
        workspace: Option<PathBuf>,
        /// Run this instead of the manifest's command.
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// Show the changes a session's agent made to its workspace (the patch;
    /// control characters are escaped on a terminal).
    Diff {
        session: String,
        /// A summary per file instead of the patch.
        #[arg(long)]
        stat: bool,
    },
    /// Apply a session's workspace changes to the directory it copied (or
    /// --to DIR) with git apply. Changes to symlinks, submodules or `.git/`
    /// and paths leaving the tree are refused.
    Apply {
        session: String,
        /// Apply here instead of the session's workspace.
        #[arg(long, value_name = "DIR")]
        to: Option<PathBuf>,
        /// Apply the safe changes and skip (and list) the refused ones,
        /// instead of refusing the whole patch.
        #[arg(long)]
        skip_unsafe: bool,
        /// Let symlinks through whose targets stay in the tree (relative,
        /// not into `.git`, not through another symlink).
        #[arg(long)]
        allow_symlinks: bool,
    },
}

#[derive(Debug, Subcommand)]
enum ManifestCmd {
    /// Check a manifest without booting anything: its syntax and fields, and
    /// that the policy grants every credential it asks for.
    Check {
        file: PathBuf,
        /// The agent the policy is checked for (default: the manifest's name).
        #[arg(long)]
        agent: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum SecretCmd {
    /// Store a new secret; its value is read from stdin (or a no-echo prompt).
    Add {
        name: String,
        /// A domain the secret may ever be sent to (its ceiling): an exact
        /// name or `*.example.com`. Repeat for several.
        #[arg(long = "domain", required = true, value_name = "DOMAIN")]
        domains: Vec<String>,
        #[arg(long, default_value = "generic")]
        kind: String,
        #[arg(long, default_value = "")]
        description: String,
        /// Keep a trailing newline read from stdin (dropped by default).
        #[arg(long)]
        keep_newline: bool,
    },
    /// List secrets (never their values).
    Ls,
    /// Remove a secret, its grants, and revoke its leases.
    Rm { name: String },
    /// Replace a secret's value; the new value is read from stdin. Running
    /// sessions holding a lease of it get the new value in their env file
    /// and files.
    Rotate {
        name: String,
        #[arg(long)]
        keep_newline: bool,
    },
}

#[derive(Debug, Subcommand)]
enum PolicyCmd {
    /// Add a grant at the end of the policy (first match wins).
    Grant {
        /// Agent name, or a prefix pattern like `ci-*`, or `*`.
        #[arg(long)]
        agent: String,
        #[arg(long)]
        secret: String,
        /// Domains leases may cover; within the secret's ceiling.
        #[arg(long = "domain", required = true, value_name = "DOMAIN")]
        domains: Vec<String>,
        /// Maximum lease lifetime, renewals included (`15m`, `2h`).
        #[arg(long)]
        ttl: String,
        #[arg(long)]
        max_uses: Option<u32>,
        #[arg(long)]
        renewable: bool,
    },
    /// List the grants in evaluation order.
    Ls,
    /// Remove a grant by id.
    Revoke { id: i64 },
    /// Print the policy as YAML.
    Export,
    /// Load a policy from a YAML file; replaces the current grants unless
    /// --append. Nothing changes if any grant is invalid.
    Import {
        file: PathBuf,
        #[arg(long)]
        append: bool,
    },
}

#[derive(Debug, Subcommand)]
enum LeaseCmd {
    /// Ask for a lease as an agent in a session; prints the lease.
    Grant {
        #[arg(long)]
        agent: String,
        #[arg(long)]
        session: String,
        #[arg(long)]
        secret: String,
        /// Narrow the lease to these domains (default: the grant's).
        #[arg(long = "domain", value_name = "DOMAIN")]
        domains: Vec<String>,
        /// Lease lifetime (default: the grant's maximum).
        #[arg(long)]
        ttl: Option<String>,
        #[arg(long)]
        max_uses: Option<u32>,
    },
    /// Use a lease for a domain: writes the secret's value to stdout.
    Access {
        id: String,
        #[arg(long)]
        domain: String,
    },
    /// Extend a lease, within its grant's maximum lifetime.
    Renew {
        id: String,
        #[arg(long)]
        ttl: Option<String>,
    },
    /// List active leases (--all for revoked and expired too).
    Ls {
        #[arg(long)]
        session: Option<String>,
        #[arg(long)]
        all: bool,
    },
    /// Revoke one lease, a session's, a secret's, or all of them.
    Revoke(RevokeArgs),
}

#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
struct RevokeArgs {
    id: Option<String>,
    #[arg(long)]
    session: Option<String>,
    #[arg(long)]
    secret: Option<String>,
    #[arg(long)]
    all: bool,
}

#[derive(Debug, Subcommand)]
enum AuditCmd {
    /// Show audit records, oldest first.
    Ls {
        #[arg(long)]
        session: Option<String>,
        /// Only records since this long ago (`1h`) or since a time
        /// (`2026-11-28T10:00:00Z`).
        #[arg(long)]
        since: Option<String>,
        /// At most this many (the newest).
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Check the hash chain; exits 6 and names the records if it is broken.
    Verify,
}

#[derive(Debug, Subcommand)]
enum KeyCmd {
    /// Re-wrap the data key under a new master key (secrets are untouched).
    Rotate {
        /// Move the key to another source while rotating.
        #[arg(long, value_enum)]
        to: Option<KeySourceKind>,
    },
}

/// Parses arguments and runs; the binary's whole `main`.
pub fn main(env_keys: EnvKeys) -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitStatus::Usage.into()
            } else {
                ExitStatus::Success.into()
            };
        }
    };
    init_logging(cli.verbose);
    match run(cli, env_keys) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            e.downcast_ref::<VaultError>()
                .map(ExitStatus::of)
                .unwrap_or(ExitStatus::Failure)
                .into()
        }
    }
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("ZEROLEASE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn open_vault(cli: &Cli, env_keys: EnvKeys) -> anyhow::Result<Vault> {
    let home = StateDir::resolve(cli.home.clone())?;
    let mut config = VaultConfig::new(home);
    config.key_source = cli.key_source;
    config.env_keys = env_keys;
    config.keyring_backend = KeyringBackend::from_env();
    Ok(Vault::open(config, Arc::new(SystemClock))?)
}

/// Runs a parsed command line.
pub fn run(cli: Cli, env_keys: EnvKeys) -> anyhow::Result<ExitCode> {
    if let Command::Image(cmd) = &cli.command {
        return image_cmd::run(cmd, cli.json).map(Into::into);
    }
    if let Command::Logs {
        session,
        follow,
        console,
    } = &cli.command
    {
        return logs::run(cli.home.clone(), session, *follow, *console).map(Into::into);
    }
    if let Command::Attach { session } = &cli.command {
        return detach::attach(cli.home.clone(), session).map(Into::into);
    }
    if let Command::Doctor {
        images,
        image,
        kvm_timeout,
    } = cli.command
    {
        let bound = parse_duration(&kvm_timeout)
            .map_err(|e| anyhow::anyhow!("--kvm-timeout {kvm_timeout:?}: {e}"))?;
        return doctor::run(cli.home, images, image, bound, cli.json).map(Into::into);
    }
    // Neither needs the vault.
    match &cli.command {
        Command::Diff { session, stat } => {
            let home = StateDir::resolve(cli.home.clone())?;
            return workspace::diff(&home, session, *stat, cli.json).map(Into::into);
        }
        Command::Apply {
            session,
            to,
            skip_unsafe,
            allow_symlinks,
        } => {
            let home = StateDir::resolve(cli.home.clone())?;
            let options = crate::session::workspace::ApplyOptions {
                skip_unsafe: *skip_unsafe,
                allow_symlinks: *allow_symlinks,
            };
            return workspace::apply(&home, session, to.clone(), options, cli.json).map(Into::into);
        }
        _ => {}
    }
    let mut vault = open_vault(&cli, env_keys)?;
    let j = cli.json;
    let status = match cli.command {
        Command::Secret(cmd) => secret(&vault, cmd, cli.home.clone(), j),
        Command::Policy(cmd) => policy(&vault, cmd, j),
        Command::Lease(cmd) => lease(&vault, cmd, j),
        Command::Audit(cmd) => audit(&vault, cmd, j),
        Command::Manifest(ManifestCmd::Check { file, agent }) => {
            manifest_check(&vault, &file, agent, j)
        }
        Command::Image(cmd) => image_cmd::run(&cmd, j),
        Command::Logs {
            session,
            follow,
            console,
        } => logs::run(cli.home.clone(), &session, follow, console),
        Command::Attach { session } => detach::attach(cli.home.clone(), &session),
        Command::Doctor { .. } => unreachable!("handled before the vault is opened"),
        Command::Ps { all } => sessions::ps(&vault, cli.home.clone(), all, j),
        Command::Inspect { session } => sessions::inspect(&vault, cli.home.clone(), &session, j),
        Command::Renew {
            session,
            credential,
            ttl,
        } => leases::renew(&vault, cli.home.clone(), &session, credential, ttl, j),
        Command::Revoke { session } => session_control(
            &vault,
            cli.home.clone(),
            &session,
            crate::session::Control::Revoke,
            j,
        ),
        Command::Destroy { session } => session_control(
            &vault,
            cli.home.clone(),
            &session,
            crate::session::Control::Destroy,
            j,
        ),
        Command::Run {
            manifest,
            agent,
            images,
            hello_timeout,
            no_tty,
            detach,
            detached_child,
            quiet,
            report,
            ci,
            timeout,
            workspace,
            command,
        } => {
            let show = sessions::Presentation { quiet, ci, report };
            if detach {
                return detach::start(
                    &vault,
                    cli.home.clone(),
                    detach::Background {
                        manifest: &manifest,
                        agent,
                        images,
                        hello_timeout: &hello_timeout,
                        command,
                        extra: detach::forwarded(
                            timeout.as_deref(),
                            workspace.as_deref(),
                            show.report.as_deref(),
                            show.quiet,
                        ),
                    },
                    j,
                );
            }
            let tty = if detached_child {
                TtyChoice::Detached
            } else if no_tty || ci {
                TtyChoice::Never
            } else {
                TtyChoice::Auto
            };
            return run_session(
                vault,
                cli.home.clone(),
                &manifest,
                agent,
                images,
                &hello_timeout,
                timeout.as_deref(),
                &show,
                workspace,
                tty,
                command,
            );
        }
        // Handled above without opening the vault; the same calls here keep
        // the match exhaustive.
        Command::Diff { session, stat } => {
            workspace::diff(&StateDir::resolve(cli.home.clone())?, &session, stat, j)
        }
        Command::Apply {
            session,
            to,
            skip_unsafe,
            allow_symlinks,
        } => workspace::apply(
            &StateDir::resolve(cli.home.clone())?,
            &session,
            to,
            crate::session::workspace::ApplyOptions {
                skip_unsafe,
                allow_symlinks,
            },
            j,
        ),
        Command::Key(KeyCmd::Rotate { to }) => {
            let kind = vault.rotate_key(to)?;
            if j {
                json(&serde_json::json!({ "rotated": true, "key_source": kind.as_str() }))?;
            } else {
                println!("master key rotated; key source is now `{kind}`");
                if kind == KeySourceKind::Env {
                    println!(
                        "store the value of ZEROLEASE_NEW_MASTER_KEY as ZEROLEASE_MASTER_KEY in your secret store now: the old key no longer opens this vault"
                    );
                }
            }
            Ok(ExitStatus::Success)
        }
    };
    status.map(Into::into)
}

fn parse_domains(items: &[String]) -> anyhow::Result<Vec<DomainPattern>> {
    items
        .iter()
        .map(|d| DomainPattern::parse(d).map_err(|e| VaultError::Invalid(e.to_string()).into()))
        .collect()
}

fn parse_ttl(s: &str) -> anyhow::Result<Duration> {
    parse_duration(s).map_err(|e| VaultError::Invalid(format!("--ttl: {e}")).into())
}

/// Reads a secret value from stdin, or prompts without echo on a terminal.
fn read_value(name: &str, keep_newline: bool) -> anyhow::Result<SecretValue> {
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        let first = Zeroizing::new(
            rpassword::prompt_password(format!("value for secret `{name}`: "))
                .context("could not read the value from the terminal")?,
        );
        let again = Zeroizing::new(
            rpassword::prompt_password("again: ")
                .context("could not read the value from the terminal")?,
        );
        if *first != *again {
            return Err(
                VaultError::Invalid("the two values differ; nothing was stored".into()).into(),
            );
        }
        return Ok(SecretValue::new(Zeroizing::new(first.as_bytes().to_vec())));
    }
    let mut buf = Zeroizing::new(Vec::new());
    stdin
        .lock()
        .take(crate::vault::MAX_SECRET_LEN as u64 + 3)
        .read_to_end(&mut buf)
        .context("could not read the value from stdin")?;
    if !keep_newline {
        if buf.ends_with(b"\r\n") {
            let n = buf.len() - 2;
            buf.truncate(n);
        } else if buf.ends_with(b"\n") {
            let n = buf.len() - 1;
            buf.truncate(n);
        }
    }
    Ok(SecretValue::new(buf))
}

fn secret(
    vault: &Vault,
    cmd: SecretCmd,
    home: Option<PathBuf>,
    j: bool,
) -> anyhow::Result<ExitStatus> {
    match cmd {
        SecretCmd::Add {
            name,
            domains,
            kind,
            description,
            keep_newline,
        } => {
            let domains = parse_domains(&domains)?;
            let value = read_value(&name, keep_newline)?;
            let info = vault.add_secret(
                NewSecret {
                    name,
                    kind,
                    description,
                    domains,
                },
                value,
            )?;
            if j {
                json(&info)?;
            } else {
                println!(
                    "stored secret `{}` (version {}) for {}",
                    info.name,
                    info.version,
                    join(&info.domains)
                );
            }
        }
        SecretCmd::Ls => {
            let secrets = vault.list_secrets()?;
            if j {
                json(&secrets)?;
            } else {
                let mut t = Table::new(&[
                    "NAME",
                    "KIND",
                    "VERSION",
                    "DOMAINS",
                    "UPDATED",
                    "DESCRIPTION",
                ]);
                for s in &secrets {
                    t.row(vec![
                        s.name.clone(),
                        s.kind.clone(),
                        s.version.to_string(),
                        join(&s.domains),
                        s.updated.rfc3339(),
                        s.description.clone(),
                    ]);
                }
                t.print("no secrets; add one with `zerolease secret add NAME --domain DOMAIN`");
            }
        }
        SecretCmd::Rm { name } => {
            let revoked = vault.remove_secret(&name)?;
            if j {
                json(&serde_json::json!({ "removed": name, "leases_revoked": revoked }))?;
            } else {
                println!(
                    "removed secret `{name}`, its grants, and revoked {} lease(s)",
                    revoked.len()
                );
            }
        }
        SecretCmd::Rotate { name, keep_newline } => {
            let value = read_value(&name, keep_newline)?;
            let info = vault.rotate_secret(&name, value)?;
            let pushed = leases::push_rotation(vault, home, &name);
            if j {
                let mut out = serde_json::to_value(&info)?;
                out["sessions"] = serde_json::to_value(&pushed)?;
                json(&out)?;
            } else {
                println!("secret `{}` is now version {}", info.name, info.version);
                leases::print_pushed(&name, &pushed);
            }
        }
    }
    Ok(ExitStatus::Success)
}

fn policy(vault: &Vault, cmd: PolicyCmd, j: bool) -> anyhow::Result<ExitStatus> {
    match cmd {
        PolicyCmd::Grant {
            agent,
            secret,
            domains,
            ttl,
            max_uses,
            renewable,
        } => {
            let spec = GrantSpec {
                agent: AgentPattern::parse(&agent).map_err(VaultError::Invalid)?,
                secret,
                domains: parse_domains(&domains)?,
                ttl: parse_ttl(&ttl)?,
                max_uses,
                renewable,
            };
            let g = vault.add_grant(spec)?;
            if j {
                json(&g)?;
            } else {
                println!(
                    "grant {}: agent `{}` may lease `{}` for {} up to {}",
                    g.id,
                    g.agent,
                    g.secret,
                    join(&g.domains),
                    humantime::format_duration(g.max_ttl)
                );
            }
        }
        PolicyCmd::Ls => {
            let grants = vault.list_grants()?;
            if j {
                json(&grants)?;
            } else {
                let mut t = Table::new(&[
                    "ID",
                    "AGENT",
                    "SECRET",
                    "DOMAINS",
                    "MAX TTL",
                    "MAX USES",
                    "RENEWABLE",
                ]);
                for g in &grants {
                    t.row(vec![
                        g.id.to_string(),
                        g.agent.to_string(),
                        g.secret.clone(),
                        join(&g.domains),
                        humantime::format_duration(g.max_ttl).to_string(),
                        g.max_uses.map_or("-".into(), |u| u.to_string()),
                        if g.renewable { "yes" } else { "no" }.into(),
                    ]);
                }
                t.print("no grants: every lease request is denied (add one with `zerolease policy grant`)");
            }
        }
        PolicyCmd::Revoke { id } => {
            let g = vault.remove_grant(id)?;
            if j {
                json(&g)?;
            } else {
                println!(
                    "removed grant {} (agent `{}`, secret `{}`)",
                    g.id, g.agent, g.secret
                );
            }
        }
        PolicyCmd::Export => {
            let doc = vault.export_policy()?;
            if j {
                json(&doc)?;
            } else {
                print!(
                    "{}",
                    serde_saphyr::to_string(&doc).context("could not write YAML")?
                );
            }
        }
        PolicyCmd::Import { file, append } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("could not read {}", file.display()))?;
            let doc: PolicyDocument = serde_saphyr::from_str(&text)
                .map_err(|e| VaultError::Invalid(format!("{}: {e}", file.display())))?;
            let grants = vault.import_policy(doc, !append)?;
            if j {
                json(&grants)?;
            } else {
                println!(
                    "imported {} grant(s) from {}{}",
                    grants.len(),
                    file.display(),
                    if append {
                        ""
                    } else {
                        " (replacing the previous policy)"
                    }
                );
            }
        }
    }
    Ok(ExitStatus::Success)
}

fn lease_row(l: &crate::vault::Lease, now: Timestamp) -> Vec<String> {
    let status = l.status(now);
    vec![
        l.id.to_string(),
        status.as_str().into(),
        l.agent.clone(),
        l.session.clone(),
        l.secret.clone(),
        join(&l.domains),
        if status == LeaseStatus::Active {
            format_duration_short(l.time_left(now))
        } else {
            "-".into()
        },
        l.uses_left.map_or("-".into(), |u| u.to_string()),
    ]
}

const LEASE_HEADER: &[&str] = &[
    "ID", "STATUS", "AGENT", "SESSION", "SECRET", "DOMAINS", "LEFT", "USES",
];

#[derive(serde::Serialize)]
struct LeaseView<'a> {
    #[serde(flatten)]
    lease: &'a crate::vault::Lease,
    status: LeaseStatus,
    seconds_left: u64,
}

fn lease_view(l: &crate::vault::Lease, now: Timestamp) -> LeaseView<'_> {
    LeaseView {
        lease: l,
        status: l.status(now),
        seconds_left: l.time_left(now).as_secs(),
    }
}

fn lease(vault: &Vault, cmd: LeaseCmd, j: bool) -> anyhow::Result<ExitStatus> {
    match cmd {
        LeaseCmd::Grant {
            agent,
            session,
            secret,
            domains,
            ttl,
            max_uses,
        } => {
            let ask = LeaseAsk {
                domains: if domains.is_empty() {
                    None
                } else {
                    Some(parse_domains(&domains)?)
                },
                ttl: ttl.as_deref().map(parse_ttl).transpose()?,
                max_uses,
            };
            let l = vault.grant(LeaseRequest {
                agent,
                session,
                secret,
                ask,
            })?;
            if j {
                json(&lease_view(&l, vault.now()))?;
            } else {
                println!("{}", l.id);
                eprintln!(
                    "leased `{}` to agent `{}` (session `{}`) for {} until {}",
                    l.secret,
                    l.agent,
                    l.session,
                    join(&l.domains),
                    l.expires.rfc3339()
                );
            }
        }
        LeaseCmd::Access { id, domain } => {
            let domain =
                HostName::parse(&domain).map_err(|e| VaultError::Invalid(e.to_string()))?;
            let value = vault.access(&id, &domain)?;
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            out.write_all(value.expose())?;
            out.flush()?;
        }
        LeaseCmd::Renew { id, ttl } => {
            let ttl = ttl.as_deref().map(parse_ttl).transpose()?;
            let l = vault.renew(&id, ttl)?;
            if j {
                json(&lease_view(&l, vault.now()))?;
            } else {
                println!("lease {} renewed until {}", l.id, l.expires.rfc3339());
            }
        }
        LeaseCmd::Ls { session, all } => {
            let leases = vault.list_leases(LeaseFilter {
                session,
                include_inactive: all,
            })?;
            let now = vault.now();
            if j {
                json(
                    &leases
                        .iter()
                        .map(|l| lease_view(l, now))
                        .collect::<Vec<_>>(),
                )?;
            } else {
                let mut t = Table::new(LEASE_HEADER);
                for l in &leases {
                    t.row(lease_row(l, now));
                }
                t.print(if all {
                    "no leases"
                } else {
                    "no active leases (--all shows the rest)"
                });
            }
        }
        LeaseCmd::Revoke(args) => {
            let scope = match args {
                RevokeArgs { id: Some(id), .. } => RevokeScope::Lease(id),
                RevokeArgs {
                    session: Some(s), ..
                } => RevokeScope::Session(s),
                RevokeArgs {
                    secret: Some(s), ..
                } => RevokeScope::Secret(s),
                _ => RevokeScope::All,
            };
            let revoked = vault.revoke(scope)?;
            if j {
                json(&serde_json::json!({ "revoked": revoked }))?;
            } else {
                println!("revoked {} lease(s)", revoked.len());
            }
        }
    }
    Ok(ExitStatus::Success)
}

fn parse_since(s: &str, now: Timestamp) -> anyhow::Result<Timestamp> {
    if let Ok(t) = humantime::parse_rfc3339_weak(s) {
        return Ok(Timestamp::from_system_time(t));
    }
    let d = parse_duration(s).map_err(|_| {
        VaultError::Invalid(format!(
            "--since `{s}` is neither a duration (`1h`) nor a time (`2026-11-28T10:00:00Z`)"
        ))
    })?;
    Ok(now.saturating_sub(d))
}

fn audit(vault: &Vault, cmd: AuditCmd, j: bool) -> anyhow::Result<ExitStatus> {
    match cmd {
        AuditCmd::Ls {
            session,
            since,
            limit,
        } => {
            let since = since
                .as_deref()
                .map(|s| parse_since(s, vault.now()))
                .transpose()?;
            let records = vault.audit_list(AuditFilter {
                session,
                since,
                limit,
            })?;
            if j {
                json(&records)?;
            } else {
                let mut t = Table::new(&[
                    "SEQ", "TIME", "EVENT", "OUTCOME", "AGENT", "SESSION", "SECRET", "DOMAIN",
                    "DETAIL",
                ]);
                let opt = |o: &Option<String>| o.clone().unwrap_or_else(|| "-".into());
                for r in &records {
                    let rec = &r.record;
                    t.row(vec![
                        r.seq.to_string(),
                        rec.time.rfc3339(),
                        rec.event.clone(),
                        rec.outcome.clone(),
                        opt(&rec.agent),
                        opt(&rec.session),
                        opt(&rec.secret),
                        opt(&rec.domain),
                        rec.detail.clone(),
                    ]);
                }
                t.print("no audit records match");
            }
            Ok(ExitStatus::Success)
        }
        AuditCmd::Verify => {
            let report = vault.audit_verify()?;
            if j {
                json(&report)?;
            } else if report.is_intact() {
                println!("audit chain intact: {} records", report.records);
            } else {
                println!("audit chain BROKEN ({} records read):", report.records);
                for p in &report.problems {
                    println!("  - {p}");
                }
            }
            Ok(if report.is_intact() {
                ExitStatus::Success
            } else {
                ExitStatus::Integrity
            })
        }
    }
}

/// Whether `run` joins a terminal to the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TtyChoice {
    /// If stdin and stdout are terminals.
    Auto,
    /// `--no-tty`.
    Never,
    /// The background half of `--detach`: a pty in the guest, served on
    /// `attach.sock`.
    Detached,
}

#[allow(clippy::too_many_arguments)]
fn run_session(
    vault: Vault,
    home: Option<PathBuf>,
    manifest_path: &std::path::Path,
    agent: Option<String>,
    images: Option<PathBuf>,
    hello_timeout: &str,
    timeout: Option<&str>,
    show: &sessions::Presentation,
    workspace: Option<PathBuf>,
    tty: TtyChoice,
    command: Vec<String>,
) -> anyhow::Result<ExitCode> {
    let mut manifest =
        Manifest::load(manifest_path).map_err(|e| VaultError::Invalid(e.to_string()))?;
    if let Some(t) = timeout {
        manifest.timeout =
            parse_duration(t).map_err(|e| VaultError::Invalid(format!("--timeout: {e}")))?;
    }
    if let Some(path) = show.report_path() {
        sessions::check_report_path(&path)?;
    }
    let config = crate::session::RunConfig {
        home: StateDir::resolve(home)?,
        images,
        agent,
        command: (!command.is_empty()).then_some(command),
        hello_bound: parse_duration(hello_timeout).map_err(VaultError::Invalid)?,
        workspace,
        tty: match tty {
            TtyChoice::Auto => crate::session::tty::wants_tty(false)
                .then(crate::session::tty::spec_for_this_terminal),
            TtyChoice::Never => None,
            // No terminal yet: `attach` sends its size when it joins.
            TtyChoice::Detached => Some(zerolease_protocol::TtySpec {
                rows: 24,
                cols: 80,
                term: crate::session::tty::term_for(std::env::var("TERM").ok().as_deref()),
            }),
        },
        detached: tty == TtyChoice::Detached,
    };
    for id in crate::session::reap_orphans(&vault, &config.home) {
        eprintln!("reaped session `{id}`, left behind by a zerolease run that died");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let vault = Arc::new(vault);
    let progress = show.progress();
    let finished = runtime.block_on(async {
        let mut out = std::io::stdout();
        let mut err = std::io::stderr();
        crate::session::run_reported(vault, manifest, config, progress, &mut out, &mut err).await
    });
    // Let the proxy's tasks and audit writer finish before exiting.
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    show.finish(
        finished.report.as_ref(),
        finished.result.as_ref().err().map(ToString::to_string),
    )?;
    match finished.result {
        Ok(o) => {
            let code = match (o.code, o.signal) {
                (Some(c), _) => c,
                (None, Some(s)) => 128 + s,
                (None, None) => ExitStatus::SessionFailed as i32,
            };
            Ok(ExitCode::from(
                u8::try_from(code.clamp(0, 255)).unwrap_or(255),
            ))
        }
        Err(e) => {
            eprintln!("error: {e}");
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                eprintln!("  caused by: {s}");
                source = s.source();
            }
            Ok(ExitStatus::SessionFailed.into())
        }
    }
}

fn session_control(
    vault: &Vault,
    home: Option<PathBuf>,
    session: &str,
    what: crate::session::Control,
    j: bool,
) -> anyhow::Result<ExitStatus> {
    use crate::session::record::{SessionRecord, control_socket};
    use std::io::{BufRead, Write};
    let home = StateDir::resolve(home)?;
    let record = SessionRecord::load(&home, session).map_err(|_| {
        VaultError::Invalid(format!(
            "no session `{session}`; list them with `zerolease ps --all`"
        ))
    })?;
    // A live `zerolease run` does it itself, at once: it holds the proxy
    // whose tunnels must be cut and the VM.
    if record.supervisor_alive()
        && let Ok(mut stream) =
            std::os::unix::net::UnixStream::connect(control_socket(&record.runtime_dir))
    {
        stream.set_read_timeout(Some(std::time::Duration::from_secs(30)))?;
        writeln!(stream, "{}", what.as_str())?;
        let mut answer = String::new();
        std::io::BufReader::new(&stream).read_line(&mut answer)?;
        if !answer.starts_with("ok") {
            anyhow::bail!("session `{session}` refused: {}", answer.trim());
        }
        if what == crate::session::Control::Destroy {
            // Wait for its cleanup to finish.
            for _ in 0..300 {
                if SessionRecord::load(&home, session).is_ok_and(|r| r.is_finished()) {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
    } else {
        // Nobody runs it any more: do what a dead supervisor could not.
        let revoked = vault.revoke(RevokeScope::Session(session.to_owned()))?;
        if what == crate::session::Control::Destroy {
            crate::session::reap(&home, record)?;
        }
        tracing::info!(
            count = revoked.len(),
            "revoked the leases of an orphaned session"
        );
    }
    let after = SessionRecord::load(&home, session).ok();
    if j {
        json(&serde_json::json!({
            "session": session,
            "action": what.as_str(),
            "state": after.map(|r| r.state),
        }))?;
    } else {
        match what {
            crate::session::Control::Revoke => println!(
                "session `{session}`: every lease revoked; its tunnels are closed and the agent is offline"
            ),
            crate::session::Control::Destroy => println!(
                "session `{session}` destroyed: leases revoked, VM, tap and nftables table gone"
            ),
            crate::session::Control::Stats => {}
        }
    }
    Ok(ExitStatus::Success)
}

fn manifest_check(
    vault: &Vault,
    file: &std::path::Path,
    agent: Option<String>,
    j: bool,
) -> anyhow::Result<ExitStatus> {
    let manifest = match Manifest::load(file) {
        Ok(m) => m,
        Err(e) => {
            if j {
                json(&serde_json::json!({
                    "ok": false,
                    "file": e.file,
                    "line": e.line,
                    "column": e.column,
                    "error": e.message,
                    "hint": e.hint,
                }))?;
            } else {
                eprintln!("error: {e}");
            }
            return Ok(ExitStatus::Usage);
        }
    };
    let agent = agent.unwrap_or_else(|| manifest.name.clone());
    let mut problems = Vec::new();
    let mut credentials = Vec::new();
    for c in &manifest.credentials {
        let req = LeaseRequest {
            agent: agent.clone(),
            session: "manifest-check".into(),
            secret: c.secret.clone(),
            ask: LeaseAsk {
                domains: c.domains.clone(),
                ttl: c.ttl,
                max_uses: c.max_uses,
            },
        };
        match vault.check_grant(&req) {
            Ok(t) => credentials.push(serde_json::json!({
                "secret": c.secret,
                "grant": t.grant_id,
                "domains": t.domains,
                "ttl_seconds": t.ttl.as_secs(),
                "renewable": t.renewable,
            })),
            Err(e) => problems.push(format!("credential `{}`: {e}", c.secret)),
        }
    }
    if j {
        json(&serde_json::json!({
            "ok": problems.is_empty(),
            "file": file,
            "name": manifest.name,
            "image": manifest.image,
            "agent": agent,
            "credentials": credentials,
            "allow": manifest.allow.iter().map(|a| serde_json::json!({"domain": a.domain, "ports": a.ports})).collect::<Vec<_>>(),
            "problems": problems,
        }))?;
    } else if problems.is_empty() {
        println!(
            "{}: ok — session `{}` on image `{}`, {} credential(s) granted to agent `{agent}`, {} allowed domain(s)",
            file.display(),
            manifest.name,
            manifest.image,
            manifest.credentials.len(),
            manifest.allow.len()
        );
    } else {
        for p in &problems {
            eprintln!("error: {}: {p}", file.display());
        }
    }
    Ok(if problems.is_empty() {
        ExitStatus::Success
    } else {
        ExitStatus::Denied
    })
}

fn join(d: &[DomainPattern]) -> String {
    d.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}
