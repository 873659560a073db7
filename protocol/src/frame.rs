//! Length-prefixed framing over any `Read`/`Write`.
//!
//! A frame is a `u32` big-endian payload length followed by that many bytes.
//!
//! **Invariants:**
//! - A reader never allocates more than its bound ([`MAX_FRAME_LEN`] unless
//!   configured): the length is checked against the bound *before* the
//!   payload buffer is allocated.
//! - A peer that closes the channel between frames ([`FrameError::Closed`])
//!   is distinguished from one that stops mid-frame
//!   ([`FrameError::Truncated`]).
//! - Payload buffers are returned as [`Zeroizing`] and the message helpers
//!   zeroize every buffer that held an encoded message, since messages carry
//!   secrets.

use std::io::{self, Read, Write};

use zeroize::{Zeroize, Zeroizing};

use crate::message::{DecodeError, EncodeError, Message};

/// Default bound on a frame's payload: 1 MiB.
pub const MAX_FRAME_LEN: usize = 1 << 20;

/// Size of the length prefix.
pub const HEADER_LEN: usize = 4;

/// Why reading or writing a frame failed.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The peer closed the channel cleanly, between two frames.
    #[error("the peer closed the channel")]
    Closed,
    /// The channel ended inside a frame (its header or its payload).
    #[error("the channel ended inside a frame: expected {expected} bytes, got {got}")]
    Truncated {
        /// Bytes the current part of the frame needed.
        expected: usize,
        /// Bytes received before the end of the stream.
        got: usize,
    },
    /// The announced (reading) or requested (writing) payload length exceeds
    /// the bound. Nothing was allocated or written.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Announced or requested payload length.
        len: u64,
        /// The bound in force.
        max: usize,
    },
    /// The underlying channel failed.
    #[error("I/O error on the channel")]
    Io(#[source] io::Error),
}

impl FrameError {
    /// Whether this is the clean end of the stream between frames.
    pub fn is_closed(&self) -> bool {
        matches!(self, Self::Closed)
    }
}

/// Why reading a message failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// No frame could be read.
    #[error("could not read a frame")]
    Frame(#[from] FrameError),
    /// A frame arrived but did not hold a valid message.
    #[error("could not decode a message")]
    Decode(#[from] DecodeError),
}

/// Why writing a message failed.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The message could not be encoded (or was invalid).
    #[error("could not encode a message")]
    Encode(#[from] EncodeError),
    /// The frame could not be written.
    #[error("could not write a frame")]
    Frame(#[from] FrameError),
}

/// Reads frames from a byte stream.
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: R,
    max_len: usize,
}

impl<R: Read> FrameReader<R> {
    /// A reader with the default bound [`MAX_FRAME_LEN`].
    pub fn new(inner: R) -> Self {
        Self::with_max_len(inner, MAX_FRAME_LEN)
    }

    /// A reader that refuses payloads longer than `max_len` bytes.
    pub fn with_max_len(inner: R, max_len: usize) -> Self {
        Self { inner, max_len }
    }

    /// The bound in force.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Reads one frame's payload.
    ///
    /// Returns [`FrameError::Closed`] if the stream ends before the first
    /// header byte, [`FrameError::Truncated`] if it ends later, and
    /// [`FrameError::TooLarge`] — before allocating — if the announced length
    /// exceeds the bound. After an error the stream position is undefined;
    /// the channel should be dropped.
    pub fn read_frame(&mut self) -> Result<Zeroizing<Vec<u8>>, FrameError> {
        let mut header = [0u8; HEADER_LEN];
        match read_full(&mut self.inner, &mut header)? {
            0 => return Err(FrameError::Closed),
            HEADER_LEN => {}
            got => {
                return Err(FrameError::Truncated {
                    expected: HEADER_LEN,
                    got,
                });
            }
        }
        let announced = u32::from_be_bytes(header);
        let len = usize::try_from(announced)
            .ok()
            .filter(|len| *len <= self.max_len)
            .ok_or(FrameError::TooLarge {
                len: u64::from(announced),
                max: self.max_len,
            })?;
        let mut payload = Zeroizing::new(vec![0u8; len]);
        let got = read_full(&mut self.inner, &mut payload)?;
        if got != len {
            return Err(FrameError::Truncated { expected: len, got });
        }
        Ok(payload)
    }

    /// Reads one frame and decodes and validates the message in it. The
    /// payload buffer is zeroized before this returns. A
    /// [`ReadError::Decode`] consumed exactly one whole frame, so the stream
    /// stays in step; whether to go on is the caller's policy.
    pub fn read_message<M: Message>(&mut self) -> Result<M, ReadError> {
        let payload = self.read_frame()?;
        Ok(M::decode(&payload)?)
    }

    /// The underlying reader.
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    /// Gives the underlying reader back.
    pub fn into_inner(self) -> R {
        self.inner
    }
}

/// One frame, header then payload, in one buffer (zeroized on drop), so it
/// goes out in one write: on a virtio-serial port each write is its own
/// buffer and its own notification, and the reader waits for the second.
/// Refuses a payload longer than `max_len` (at most `u32::MAX`).
pub fn frame(payload: &[u8], max_len: usize) -> Result<Zeroizing<Vec<u8>>, FrameError> {
    let max_len = max_len.min(u32::MAX as usize);
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|len| *len as usize <= max_len)
        .ok_or(FrameError::TooLarge {
            len: payload.len() as u64,
            max: max_len,
        })?;
    let mut frame = Zeroizing::new(Vec::with_capacity(HEADER_LEN + payload.len()));
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(payload);
    Ok(frame)
}

/// `message`, validated and encoded, as one frame within [`MAX_FRAME_LEN`]:
/// what [`FrameWriter::write_message`] writes, for a caller that writes it
/// itself (the host's async channel).
pub fn encode_frame<M: Message>(message: &M) -> Result<Zeroizing<Vec<u8>>, WriteError> {
    Ok(frame(&message.encode()?, MAX_FRAME_LEN)?)
}

/// Writes frames to a byte stream.
#[derive(Debug)]
pub struct FrameWriter<W> {
    inner: W,
    max_len: usize,
}

impl<W: Write> FrameWriter<W> {
    /// A writer with the default bound [`MAX_FRAME_LEN`].
    pub fn new(inner: W) -> Self {
        Self::with_max_len(inner, MAX_FRAME_LEN)
    }

    /// A writer that refuses payloads longer than `max_len` bytes (so it never
    /// sends what the peer's reader would reject). `max_len` above
    /// `u32::MAX` is clamped to it.
    pub fn with_max_len(inner: W, max_len: usize) -> Self {
        let max_len = max_len.min(u32::MAX as usize);
        Self { inner, max_len }
    }

    /// Writes one frame, in one write, and flushes.
    pub fn write_frame(&mut self, payload: &[u8]) -> Result<(), FrameError> {
        let frame = frame(payload, self.max_len)?;
        self.inner
            .write_all(&frame)
            .and_then(|()| self.inner.flush())
            .map_err(FrameError::Io)
    }

    /// Validates and encodes `message` and writes it as one frame. The
    /// encoded buffer is zeroized before this returns.
    pub fn write_message<M: Message>(&mut self, message: &M) -> Result<(), WriteError> {
        let payload = message.encode()?;
        self.write_frame(&payload)?;
        Ok(())
    }

    /// The underlying writer.
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }

    /// Gives the underlying writer back.
    pub fn into_inner(self) -> W {
        self.inner
    }
}

/// Reads until `buf` is full or the stream ends; returns the bytes read.
fn read_full<R: Read>(reader: &mut R, buf: &mut [u8]) -> Result<usize, FrameError> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(FrameError::Io(err)),
        }
    }
    Ok(filled)
}

/// A `Write` sink whose buffer never leaves an unzeroized copy behind when
/// it grows, and which is zeroized on drop. Used to encode messages.
#[derive(Default)]
pub(crate) struct ZeroizingBuf(Zeroizing<Vec<u8>>);

impl ZeroizingBuf {
    pub(crate) fn with_capacity(capacity: usize) -> Self {
        Self(Zeroizing::new(Vec::with_capacity(capacity)))
    }

    pub(crate) fn into_inner(self) -> Zeroizing<Vec<u8>> {
        self.0
    }
}

impl Write for ZeroizingBuf {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let needed = self.0.len().saturating_add(data.len());
        if needed > self.0.capacity() {
            let capacity = needed.max(self.0.capacity().saturating_mul(2));
            let mut grown = Vec::with_capacity(capacity);
            grown.extend_from_slice(&self.0);
            // Wipe the old allocation before it is freed.
            self.0.zeroize();
            *self.0 = grown;
        }
        self.0.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(payload: &[u8]) -> Vec<u8> {
        let mut out = (payload.len() as u32).to_be_bytes().to_vec();
        out.extend_from_slice(payload);
        out
    }

    /// A frame built for a caller that writes it itself is the same bytes
    /// a `FrameWriter` writes (and reads back), within the same bound.
    #[test]
    fn a_built_frame_is_what_the_writer_writes() {
        let msg = crate::HostMessage::Shutdown {};
        let built = encode_frame(&msg).unwrap();
        let mut written = Vec::new();
        FrameWriter::new(&mut written).write_message(&msg).unwrap();
        assert_eq!(&built[..], &written[..]);
        let back: crate::HostMessage = FrameReader::new(&built[..]).read_message().unwrap();
        assert_eq!(back.kind(), msg.kind());
        assert_eq!(&super::frame(b"abc", 3).unwrap()[..], &frame(b"abc")[..]);
        assert!(matches!(
            super::frame(b"abcd", 3),
            Err(FrameError::TooLarge { len: 4, max: 3 })
        ));
    }

    #[test]
    fn reads_back_to_back_frames_then_closed() {
        let mut bytes = frame(b"one");
        bytes.extend(frame(b""));
        bytes.extend(frame(b"three"));
        let mut reader = FrameReader::new(&bytes[..]);
        assert_eq!(&reader.read_frame().unwrap()[..], b"one");
        assert_eq!(&reader.read_frame().unwrap()[..], b"");
        assert_eq!(&reader.read_frame().unwrap()[..], b"three");
        assert!(reader.read_frame().unwrap_err().is_closed());
    }

    #[test]
    fn end_of_stream_cases() {
        // (input, expected outcome)
        let cases: &[(&[u8], &str)] = &[
            (b"", "closed"),
            (b"\0", "truncated 4/1"),
            (b"\0\0\0", "truncated 4/3"),
            (b"\0\0\0\x05", "truncated 5/0"),
            (b"\0\0\0\x05abcd", "truncated 5/4"),
            (b"\0\0\0\x05abcde", "ok"),
        ];
        for (input, expected) in cases {
            let outcome = match FrameReader::new(*input).read_frame() {
                Ok(_) => "ok".to_owned(),
                Err(FrameError::Closed) => "closed".to_owned(),
                Err(FrameError::Truncated { expected, got }) => {
                    format!("truncated {expected}/{got}")
                }
                Err(other) => format!("{other:?}"),
            };
            assert_eq!(&outcome, expected, "input {input:?}");
        }
    }

    #[test]
    fn bound_is_inclusive_and_checked_before_reading_payload() {
        let ok = frame(&[7u8; 16]);
        assert_eq!(
            FrameReader::with_max_len(&ok[..], 16)
                .read_frame()
                .unwrap()
                .len(),
            16
        );
        for announced in [17u32, MAX_FRAME_LEN as u32 + 1, u32::MAX] {
            // Only the header: if the reader tried to read the payload first
            // it would report truncation instead.
            let header = announced.to_be_bytes();
            let max = if announced == 17 { 16 } else { MAX_FRAME_LEN };
            match FrameReader::with_max_len(&header[..], max).read_frame() {
                Err(FrameError::TooLarge { len, max: m }) => {
                    assert_eq!(len, u64::from(announced));
                    assert_eq!(m, max);
                }
                other => panic!("{announced}: {other:?}"),
            }
        }
    }

    #[test]
    fn writer_refuses_oversize_and_writes_nothing() {
        let mut out = Vec::new();
        let mut writer = FrameWriter::with_max_len(&mut out, 3);
        assert!(matches!(
            writer.write_frame(b"four"),
            Err(FrameError::TooLarge { len: 4, max: 3 })
        ));
        writer.write_frame(b"abc").unwrap();
        assert_eq!(out, frame(b"abc"));
    }

    #[test]
    fn interrupted_reads_are_retried() {
        struct Flaky<'a> {
            data: &'a [u8],
            interrupt: bool,
        }
        impl Read for Flaky<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                self.interrupt = !self.interrupt;
                if self.interrupt {
                    return Err(io::ErrorKind::Interrupted.into());
                }
                // One byte at a time, to exercise short reads too.
                let Some((first, rest)) = self.data.split_first() else {
                    return Ok(0);
                };
                buf[0] = *first;
                self.data = rest;
                Ok(1)
            }
        }
        let bytes = frame(b"hello");
        let mut reader = FrameReader::new(Flaky {
            data: &bytes,
            interrupt: false,
        });
        assert_eq!(&reader.read_frame().unwrap()[..], b"hello");
        assert!(reader.read_frame().unwrap_err().is_closed());
    }

    #[test]
    fn io_errors_are_reported() {
        struct Broken;
        impl Read for Broken {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::ErrorKind::ConnectionReset.into())
            }
        }
        assert!(matches!(
            FrameReader::new(Broken).read_frame(),
            Err(FrameError::Io(_))
        ));
    }

    #[test]
    fn zeroizing_buf_collects_all_writes() {
        let mut buf = ZeroizingBuf::with_capacity(1);
        for chunk in [&b"ab"[..], b"", b"cdefgh", b"i"] {
            buf.write_all(chunk).unwrap();
        }
        assert_eq!(&buf.into_inner()[..], b"abcdefghi");
    }
}
