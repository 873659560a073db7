//! Persistent tap devices, created through `/dev/net/tun`.
//!
//! PRIVILEGED: needs CAP_NET_ADMIN in the network namespace of the calling
//! thread, which is where the device appears. Each ioctl is wrapped in one
//! small function; this is the only file of the jail with `unsafe`.
//!
//! The tap is made persistent and owned by the uid QEMU runs as, so QEMU can
//! attach to it by name (`-netdev tap,ifname=zl-…,script=no,downscript=no`)
//! without privileges, and the device outlives the file descriptor used to
//! create it. It is created down; `Jail::create` brings it up only after the
//! nftables table is in place. Deletion goes through netlink (`netlink.rs`).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use nix::errno::Errno;
use nix::libc;
use nix::unistd::Uid;
use thiserror::Error;

const TUN_DEVICE: &str = "/dev/net/tun";
// From <linux/if_tun.h>. The request numbers encode the argument size as
// `int`, whatever the real argument is, so they are spelled out here.
const TUN_IOC_MAGIC: u8 = b'T';
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

// TUNSETIFF copies the (possibly completed) request back to the caller, so it
// is declared read-write even though the number says "write".
nix::ioctl_readwrite_bad!(
    ioctl_tunsetiff,
    nix::request_code_write!(TUN_IOC_MAGIC, 202, size_of::<libc::c_int>()),
    libc::ifreq
);
nix::ioctl_write_int_bad!(
    ioctl_tunsetpersist,
    nix::request_code_write!(TUN_IOC_MAGIC, 203, size_of::<libc::c_int>())
);
nix::ioctl_write_int_bad!(
    ioctl_tunsetowner,
    nix::request_code_write!(TUN_IOC_MAGIC, 204, size_of::<libc::c_int>())
);

/// Why a tap could not be created.
#[derive(Debug, Error)]
pub enum TapError {
    #[error(
        "the tap name `{name}` is not usable: it must be 1 to 15 bytes without `/`, \
         whitespace or NUL"
    )]
    BadName { name: String },
    #[error("cannot open {TUN_DEVICE}; load the tun module (modprobe tun) and run as root")]
    OpenTun(#[source] io::Error),
    #[error(
        "creating the tap `{name}` was refused; zerolease needs CAP_NET_ADMIN (run it as root)"
    )]
    NotPermitted {
        name: String,
        #[source]
        source: Errno,
    },
    #[error(
        "an interface named `{name}` already exists and is not a tap; \
         remove it (ip link del {name}) or run `zerolease reap`"
    )]
    NameTaken {
        name: String,
        #[source]
        source: Errno,
    },
    #[error("{step} on the tap `{name}` failed")]
    Ioctl {
        step: &'static str,
        name: String,
        #[source]
        source: Errno,
    },
}

/// Creates (or re-attaches to) the persistent tap `name`, owned by `owner`.
///
/// Idempotent: a leftover persistent tap of the same name is taken over and
/// its owner set again. The device is left down.
pub fn create_persistent_tap(name: &str, owner: Uid) -> Result<(), TapError> {
    let mut request = ifreq_for(name)?;
    let tun = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(TUN_DEVICE)
        .map_err(TapError::OpenTun)?;
    tun_set_iff(&tun, &mut request).map_err(|source| match source {
        Errno::EPERM | Errno::EACCES => TapError::NotPermitted {
            name: name.to_owned(),
            source,
        },
        Errno::EINVAL | Errno::EBUSY => TapError::NameTaken {
            name: name.to_owned(),
            source,
        },
        source => TapError::Ioctl {
            step: "TUNSETIFF",
            name: name.to_owned(),
            source,
        },
    })?;
    let step = |step| {
        let name = name.to_owned();
        move |source| TapError::Ioctl { step, name, source }
    };
    tun_set_owner(&tun, owner).map_err(step("TUNSETOWNER"))?;
    tun_set_persist(&tun, true).map_err(step("TUNSETPERSIST"))?;
    // Closing `tun` detaches this process; the persistent device stays.
    Ok(())
}

/// Opens a queue of the existing persistent tap `name` (made by
/// [`create_persistent_tap`]) and returns its descriptor, for QEMU's
/// `-netdev tap,fd=N`. Needs no privilege beyond being the tap's owner.
pub fn open_tap(name: &str) -> Result<std::os::fd::OwnedFd, TapError> {
    let mut request = ifreq_for(name)?;
    let tun = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(TUN_DEVICE)
        .map_err(TapError::OpenTun)?;
    tun_set_iff(&tun, &mut request).map_err(|source| TapError::Ioctl {
        step: "TUNSETIFF (attach)",
        name: name.to_owned(),
        source,
    })?;
    Ok(std::os::fd::OwnedFd::from(tun))
}

fn ifreq_for(name: &str) -> Result<libc::ifreq, TapError> {
    let bad = || TapError::BadName {
        name: name.to_owned(),
    };
    // IFNAMSIZ is 16 including the terminating NUL.
    if name.is_empty()
        || name.len() >= libc::IFNAMSIZ
        || name
            .bytes()
            .any(|b| b == b'/' || b == 0 || b.is_ascii_whitespace())
    {
        return Err(bad());
    }
    // SAFETY: `ifreq` is a plain C struct (a name array and a union of plain
    // integers/arrays); all-zero bytes are a valid value of it.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in request.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    request.ifr_ifru.ifru_flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
    Ok(request)
}

fn raw(file: &File) -> RawFd {
    file.as_raw_fd()
}

/// TUNSETIFF: create or attach to the tap named in `request`.
fn tun_set_iff(tun: &File, request: &mut libc::ifreq) -> Result<(), Errno> {
    // SAFETY: `tun` is an open /dev/net/tun descriptor for the whole call;
    // TUNSETIFF reads and writes back exactly one `struct ifreq`, and
    // `request` is a valid, exclusively borrowed one with a NUL-terminated
    // name that outlives the call.
    unsafe { ioctl_tunsetiff(raw(tun), request) }.map(drop)
}

/// TUNSETOWNER: let `owner` attach to the tap without privileges.
fn tun_set_owner(tun: &File, owner: Uid) -> Result<(), Errno> {
    // The kernel reads the argument as a `uid_t` (u32); passing the same bits
    // as `c_int` is lossless.
    let uid = owner.as_raw() as libc::c_int;
    // SAFETY: `tun` is an open descriptor attached to a tap by TUNSETIFF;
    // TUNSETOWNER takes an integer by value and touches no memory of ours.
    unsafe { ioctl_tunsetowner(raw(tun), uid) }.map(drop)
}

/// TUNSETPERSIST: keep (or stop keeping) the tap after the fd is closed.
fn tun_set_persist(tun: &File, persist: bool) -> Result<(), Errno> {
    // SAFETY: as for TUNSETOWNER: an attached descriptor and an integer
    // argument passed by value.
    unsafe { ioctl_tunsetpersist(raw(tun), libc::c_int::from(persist)) }.map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_names_are_checked_before_any_ioctl() {
        for good in ["zl-a", "zl-0123456789ab", "x"] {
            assert!(ifreq_for(good).is_ok(), "{good}");
        }
        for bad in ["", "zl-0123456789abc", "zl a", "zl/a", "zl\0a", "zl\ta"] {
            assert!(
                matches!(ifreq_for(bad), Err(TapError::BadName { .. })),
                "{bad:?}"
            );
        }
        let req = ifreq_for("zl-ab").unwrap();
        assert_eq!(
            req.ifr_name[..6]
                .iter()
                .map(|c| *c as u8)
                .collect::<Vec<_>>(),
            b"zl-ab\0"
        );
        // SAFETY: `ifru_flags` is the member `ifreq_for` wrote.
        let flags = unsafe { req.ifr_ifru.ifru_flags };
        assert_eq!(flags, IFF_TAP | IFF_NO_PI | IFF_VNET_HDR);
    }
}
