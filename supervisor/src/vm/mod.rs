//! The QEMU side of a session: command line, process, QMP, watchdog, disk
//! overlay.
//!
//! - [`argv`] builds QEMU's argument list from a plain [`VmSpec`] (pure).
//!   Secrets never go on the command line; the spec has no field for one.
//! - [`process`] starts QEMU with a clean environment, hands it the tap as an
//!   open descriptor, and owns the child as the RAII value [`Vm`]. A
//!   restarted supervisor rebuilds leftovers from a [`VmRecord`] and reaps
//!   them, checking the `-name` marker so a reused pid is never killed.
//! - [`qmp`] speaks QMP through the `qapi` crate and turns QEMU's events
//!   into the closed enum [`VmEvent`] at the edge.
//! - [`watchdog`] chooses the accelerator and falls back from KVM to TCG when
//!   the guest never says hello (nested hosts).
//! - [`overlay`] is the throwaway qcow2 overlay over a read-only base image.

pub mod argv;
pub mod overlay;
pub mod process;
pub mod qmp;
pub mod watchdog;

pub use argv::{AccelKind, ArgvError, DirectBoot, Mac, Machine, NetSpec, VmSpec, build_argv};
pub use overlay::{Overlay, OverlayError};
pub use process::{SpawnError, Vm, VmError, VmRecord, reap_leftovers};
pub use qmp::{Qmp, QmpError, VmEvent};
pub use watchdog::{
    Accel, BootError, Booted, Hello, accel_attempts, boot, boot_with_fallback, wait_for_hello,
};
