//! Host↔guest protocol for zerolease: the messages the supervisor and the
//! guest agent exchange over a virtio-serial port, and their framing.
//!
//! This crate does no I/O of its own beyond `std::io::Read`/`Write`.
//!
//! **Architecture Invariants:**
//! - *Bounded frames.* A frame is a big-endian `u32` length plus payload; a
//!   reader rejects a length above its bound ([`MAX_FRAME_LEN`] by default)
//!   before allocating anything for it ([`frame`]).
//! - *Closed, validated messages.* Each direction is a closed enum
//!   ([`GuestMessage`], [`HostMessage`]); unknown types and fields are errors,
//!   and every message is validated on decode and on encode ([`message`]).
//! - *Secrets redacted.* Credentials travel only in [`SecretString`] and
//!   [`SecretBytes`], which zeroize on drop and print as `[redacted …]`;
//!   buffers holding encoded messages are zeroized; decode errors never quote
//!   input ([`secret`]).
//! - *Handshake first.* The guest sends `Hello`; the host answers `Welcome`
//!   or `Reject`; major versions must match ([`check_versions`]).

pub mod frame;
pub mod message;
#[doc(hidden)]
pub mod props;
pub mod secret;
pub mod workspace;

pub use frame::{
    FrameError, FrameReader, FrameWriter, MAX_FRAME_LEN, ReadError, WriteError, encode_frame,
};
pub use message::{
    CredentialOutcome, DecodeError, EncodeError, FileSpec, GuestMessage, HandshakeError,
    HostMessage, MAX_TTY_DIM, Message, OutputStream, PROTOCOL_VERSION, PlainEnvVar,
    ProtocolVersion, Provision, ProxySettings, SecretEnvVar, TtySpec, ValidationError,
    WorkspaceSpec, accept_hello, answer_hello, check_tty_size, check_versions, check_welcome,
};
pub use secret::{Bytes, SecretBytes, SecretString};
