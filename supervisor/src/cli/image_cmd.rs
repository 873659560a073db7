//! `zerolease image …`: scan, seal and verify guest images. These commands
//! never open the vault.

use std::path::{Path, PathBuf};

use anyhow::Context;

use clap::Subcommand;

use super::ExitStatus;
use super::output::json;
use crate::image::{self, Allowlist, ImageError, KernelPackage, SealRequest, scan};

#[derive(Debug, Subcommand)]
pub enum ImageCmd {
    /// Scan a directory, a cpio archive (plain, gzip, zstd) or an image
    /// directory for credential material. Exit 0: clean; 6: findings.
    Scan {
        path: PathBuf,
        /// Accept the private keys listed (by SHA-256) in this file.
        #[arg(long, value_name = "FILE")]
        allow: Option<PathBuf>,
    },
    /// Scan an image directory's initramfs, hash its files and write
    /// image.json (what scripts/build-image runs). Exit 6 if the scan finds
    /// anything; the record then says the scan failed.
    Seal {
        /// Image name, e.g. `minimal`.
        #[arg(long)]
        name: String,
        /// Directory holding vmlinux and initramfs.cpio.
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        kernel_package: String,
        #[arg(long)]
        kernel_version: String,
        /// The kernel's `uname -r`.
        #[arg(long)]
        kernel_release: String,
        /// SHA-256 of the kernel .deb.
        #[arg(long)]
        kernel_deb_sha256: String,
        /// Also scan this tree (e.g. the initramfs staging directory).
        #[arg(long = "also-scan", value_name = "DIR")]
        also_scan: Vec<PathBuf>,
        /// Accept the private keys listed (by SHA-256) in this file, e.g.
        /// images/NAME/scan-allow.
        #[arg(long, value_name = "FILE")]
        allow: Option<PathBuf>,
        /// The directory also holds root.ext4 (a read-only root disk):
        /// record its digest. Scan its source tree with --also-scan.
        #[arg(long)]
        root_disk: bool,
    },
    /// Check an image before boot: record present, scan passed, digests
    /// match. NAME is looked up under $ZEROLEASE_IMAGES (default
    /// images/out); an argument with a `/` is a directory.
    Verify {
        #[arg(value_name = "NAME|DIR")]
        image: String,
        /// Where named images live (overrides $ZEROLEASE_IMAGES).
        #[arg(long, value_name = "DIR")]
        images: Option<PathBuf>,
    },
}

fn status_of(e: &ImageError) -> ExitStatus {
    match e {
        e if e.is_integrity() => ExitStatus::Integrity,
        ImageError::Missing { .. } => ExitStatus::NotFound,
        ImageError::BadName(_) => ExitStatus::Usage,
        _ => ExitStatus::Failure,
    }
}

fn print_findings(findings: &[image::Finding]) {
    for f in findings {
        eprintln!("  {f}");
    }
}

fn allowed_note(n: usize) -> String {
    if n == 0 {
        String::new()
    } else {
        format!("; {n} allowlisted test key(s)")
    }
}

fn load_allowlist(path: Option<&Path>) -> anyhow::Result<Allowlist> {
    let Some(path) = path else {
        return Ok(Allowlist::default());
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the allowlist {}", path.display()))?;
    Allowlist::parse(&text).with_context(|| format!("in {}", path.display()))
}

pub fn run(cmd: &ImageCmd, j: bool) -> anyhow::Result<ExitStatus> {
    match cmd {
        ImageCmd::Scan { path, allow } => {
            let mut report = scan::scan_path(path)?;
            report.apply(&load_allowlist(allow.as_deref())?);
            if j {
                json(&serde_json::json!({
                    "path": path,
                    "clean": report.is_clean(),
                    "files": report.files,
                    "bytes": report.bytes,
                    "findings": report.findings,
                    "allowed": report.allowed,
                }))?;
            } else if report.is_clean() {
                println!(
                    "{}: clean ({} files, {} bytes scanned{})",
                    path.display(),
                    report.files,
                    report.bytes,
                    allowed_note(report.allowed.len())
                );
            } else {
                eprintln!(
                    "{}: {} finding(s) of credential material:",
                    path.display(),
                    report.findings.len()
                );
                print_findings(&report.findings);
            }
            Ok(if report.is_clean() {
                ExitStatus::Success
            } else {
                ExitStatus::Integrity
            })
        }
        ImageCmd::Seal {
            name,
            dir,
            kernel_package,
            kernel_version,
            kernel_release,
            kernel_deb_sha256,
            also_scan,
            allow,
            root_disk,
        } => {
            let req = SealRequest {
                name: name.clone(),
                dir: dir.clone(),
                kernel_package: KernelPackage {
                    package: kernel_package.clone(),
                    version: kernel_version.clone(),
                    release: kernel_release.clone(),
                    deb_sha256: kernel_deb_sha256.clone(),
                },
                also_scan: also_scan.clone(),
                allow: load_allowlist(allow.as_deref())?,
                root_disk: *root_disk,
            };
            match image::seal(&req) {
                Ok(record) => {
                    if j {
                        json(&record)?;
                    } else {
                        println!(
                            "sealed image `{}`: vmlinux {} initramfs {} ({} files scanned, clean{})",
                            record.name,
                            record.kernel.sha256,
                            record.initramfs.sha256,
                            record.scan.files,
                            allowed_note(record.scan.allowed.len())
                        );
                    }
                    Ok(ExitStatus::Success)
                }
                Err(e) => {
                    if let ImageError::ScanFailed { .. } = e
                        && let Ok(record) = image::read_record(dir)
                    {
                        print_findings(&record.scan.findings);
                    }
                    eprintln!("error: {e}");
                    Ok(status_of(&e))
                }
            }
        }
        ImageCmd::Verify { image: arg, images } => {
            match image::verify_named(arg, images.as_deref()) {
                Ok(v) => {
                    if j {
                        json(&serde_json::json!({
                            "verified": true,
                            "name": v.name,
                            "kernel": v.kernel,
                            "initramfs": v.initramfs,
                            "root_disk": v.root_disk,
                            "record": v.record,
                        }))?;
                    } else {
                        println!(
                            "image `{}` verified: scan passed, digests match ({})",
                            v.name,
                            v.dir.display()
                        );
                    }
                    Ok(ExitStatus::Success)
                }
                Err(e) => {
                    if j {
                        json(&serde_json::json!({ "verified": false, "error": e.to_string() }))?;
                    }
                    eprintln!("error: {e}");
                    Ok(status_of(&e))
                }
            }
        }
    }
}
