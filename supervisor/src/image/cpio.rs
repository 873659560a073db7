//! A small, bounded reader for `newc` cpio archives (the initramfs format),
//! plain or gzip/zstd-compressed, including archives concatenated the way
//! the kernel accepts them.
//!
//! **Architecture Invariant:** the reader fails closed. Anything it cannot
//! account for — a bad header, a name without its NUL, an entry larger than
//! the caller's bound, bytes after the last trailer that are neither zero
//! padding nor another newc archive — is an error, never silently skipped,
//! because the scanner built on it must not pass bytes it did not look at.
//!
//! Written here rather than taken from a crate: the `cpio` crate allocates a
//! name buffer of whatever size the header claims and stops at the first
//! trailer, and both matter for a scanner that must see every byte.

use std::io::{self, BufRead, BufReader, Read};

/// Longest entry name accepted (the kernel's own limit is `PATH_MAX`).
pub const MAX_NAME: usize = 4096;

const HEADER_LEN: usize = 110;
const TRAILER: &str = "TRAILER!!!";
const S_IFMT: u32 = 0o170_000;
const S_IFREG: u32 = 0o100_000;

/// Why an archive could not be read to its end.
#[derive(Debug, thiserror::Error)]
pub enum CpioError {
    #[error("reading the archive at byte {offset}")]
    Io {
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("bad newc header at byte {offset}: {reason}")]
    BadHeader { offset: u64, reason: &'static str },
    #[error("entry `{name}` at byte {offset} is {size} bytes, over the {limit}-byte limit")]
    TooLarge {
        name: String,
        offset: u64,
        size: u64,
        limit: u64,
    },
    #[error(
        "bytes after the cpio trailer at byte {offset} are neither padding nor another newc archive; they cannot be checked"
    )]
    TrailingData { offset: u64 },
    #[error("the archive ends at byte {offset} without a TRAILER!!! entry")]
    Truncated { offset: u64 },
    #[error("not a newc cpio archive (gzip, zstd or plain): it starts with {magic:02x?}")]
    UnknownFormat { magic: Vec<u8> },
    #[error("the decompressor failed")]
    Decompress(#[source] io::Error),
}

/// One archive member. `data` holds the contents of regular files only.
#[derive(Clone, PartialEq, Eq)]
pub struct Entry {
    /// The name as stored, e.g. `usr/bin/git` or `./init`.
    pub name: String,
    pub mode: u32,
    /// Where the header started in the (decompressed) stream.
    pub offset: u64,
    pub data: Vec<u8>,
}

impl Entry {
    pub fn is_file(&self) -> bool {
        self.mode & S_IFMT == S_IFREG
    }
}

// Contents may be large and are not for logs.
impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry")
            .field("name", &self.name)
            .field("mode", &format_args!("{:o}", self.mode))
            .field("offset", &self.offset)
            .field("len", &self.data.len())
            .finish()
    }
}

/// Streams the entries of one or more concatenated newc archives.
#[derive(Debug)]
pub struct NewcReader<R> {
    inner: R,
    offset: u64,
    max_file: u64,
    done: bool,
}

impl<R: BufRead> NewcReader<R> {
    /// `max_file` bounds the size of any one member read into memory.
    pub fn new(inner: R, max_file: u64) -> Self {
        NewcReader {
            inner,
            offset: 0,
            max_file,
            done: false,
        }
    }

    /// The next entry, or `None` after the last trailer (and any padding).
    pub fn next_entry(&mut self) -> Result<Option<Entry>, CpioError> {
        loop {
            if self.done {
                return Ok(None);
            }
            let start = self.offset;
            let mut header = [0u8; HEADER_LEN];
            if !self.read_exact_or_eof(&mut header)? {
                return Err(CpioError::Truncated { offset: start });
            }
            let h = parse_header(&header).map_err(|reason| CpioError::BadHeader {
                offset: start,
                reason,
            })?;
            if h.namesize == 0 || h.namesize as usize > MAX_NAME {
                return Err(CpioError::BadHeader {
                    offset: start,
                    reason: "name size is zero or over PATH_MAX",
                });
            }
            let mut name = vec![0u8; h.namesize as usize];
            self.read_exact(&mut name, start)?;
            if name.pop() != Some(0) || name.contains(&0) {
                return Err(CpioError::BadHeader {
                    offset: start,
                    reason: "name is not NUL-terminated",
                });
            }
            let name = String::from_utf8_lossy(&name).into_owned();
            self.skip_padding(HEADER_LEN as u64 + u64::from(h.namesize), start)?;

            let size = u64::from(h.filesize);
            if name == TRAILER {
                self.skip_exact(size, start)?;
                self.skip_padding(size, start)?;
                self.after_trailer()?;
                continue;
            }
            let entry_is_file = h.mode & S_IFMT == S_IFREG;
            let data = if entry_is_file {
                if size > self.max_file {
                    return Err(CpioError::TooLarge {
                        name,
                        offset: start,
                        size,
                        limit: self.max_file,
                    });
                }
                let mut data = vec![0u8; size as usize];
                self.read_exact(&mut data, start)?;
                data
            } else {
                self.skip_exact(size, start)?;
                Vec::new()
            };
            self.skip_padding(size, start)?;
            return Ok(Some(Entry {
                name,
                mode: h.mode,
                offset: start,
                data,
            }));
        }
    }

    /// After a trailer: zero bytes, then either the end or another archive.
    fn after_trailer(&mut self) -> Result<(), CpioError> {
        loop {
            let offset = self.offset;
            let buf = self
                .inner
                .fill_buf()
                .map_err(|source| CpioError::Io { offset, source })?;
            if buf.is_empty() {
                self.done = true;
                return Ok(());
            }
            let zeros = buf.iter().take_while(|&&b| b == 0).count();
            if zeros > 0 {
                self.inner.consume(zeros);
                self.offset += zeros as u64;
                continue;
            }
            // The kernel looks for the next header on a 4-byte boundary.
            if !self.offset.is_multiple_of(4) || !buf.starts_with(b"0707") {
                return Err(CpioError::TrailingData { offset });
            }
            return Ok(());
        }
    }

    /// Fills `buf`; `Ok(false)` if the stream ended before the first byte.
    fn read_exact_or_eof(&mut self, buf: &mut [u8]) -> Result<bool, CpioError> {
        let mut got = 0;
        while got < buf.len() {
            match self.inner.read(&mut buf[got..]) {
                Ok(0) if got == 0 => return Ok(false),
                Ok(0) => {
                    return Err(CpioError::Truncated {
                        offset: self.offset,
                    });
                }
                Ok(n) => {
                    got += n;
                    self.offset += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(CpioError::Io {
                        offset: self.offset,
                        source,
                    });
                }
            }
        }
        Ok(true)
    }

    fn read_exact(&mut self, buf: &mut [u8], entry: u64) -> Result<(), CpioError> {
        if buf.is_empty() {
            return Ok(());
        }
        if self.read_exact_or_eof(buf)? {
            Ok(())
        } else {
            Err(CpioError::Truncated { offset: entry })
        }
    }

    fn skip_exact(&mut self, n: u64, entry: u64) -> Result<(), CpioError> {
        let copied =
            io::copy(&mut (&mut self.inner).take(n), &mut io::sink()).map_err(|source| {
                CpioError::Io {
                    offset: self.offset,
                    source,
                }
            })?;
        self.offset += copied;
        if copied < n {
            return Err(CpioError::Truncated { offset: entry });
        }
        Ok(())
    }

    /// Skips to the next multiple of 4 after `len` bytes of a record.
    fn skip_padding(&mut self, len: u64, entry: u64) -> Result<(), CpioError> {
        let pad = (4 - len % 4) % 4;
        let mut buf = [0u8; 3];
        let buf = &mut buf[..pad as usize];
        self.read_exact(buf, entry)
    }
}

struct Header {
    mode: u32,
    filesize: u32,
    namesize: u32,
}

/// Parses the fixed 110-byte header (magic + 13 eight-digit hex fields).
fn parse_header(h: &[u8; HEADER_LEN]) -> Result<Header, &'static str> {
    if &h[..6] != b"070701" && &h[..6] != b"070702" {
        return Err("magic is not 070701/070702");
    }
    let field = |i: usize| -> Result<u32, &'static str> {
        let raw = &h[6 + 8 * i..6 + 8 * (i + 1)];
        let text = std::str::from_utf8(raw).map_err(|_| "non-ASCII header field")?;
        u32::from_str_radix(text, 16).map_err(|_| "header field is not hex")
    };
    // Order: ino mode uid gid nlink mtime filesize devmajor devminor
    // rdevmajor rdevminor namesize check.
    let mut values = [0u32; 13];
    for (i, v) in values.iter_mut().enumerate() {
        *v = field(i)?;
    }
    Ok(Header {
        mode: values[1],
        filesize: values[6],
        namesize: values[11],
    })
}

/// Opens `input` as plain, gzip or zstd newc, judged by its first bytes.
pub fn open<'a, R: Read + 'a>(
    input: R,
    max_file: u64,
) -> Result<NewcReader<Box<dyn BufRead + 'a>>, CpioError> {
    let mut input = BufReader::new(input);
    let magic = input.fill_buf().map_err(CpioError::Decompress)?;
    let magic = magic[..magic.len().min(6)].to_vec();
    let stream: Box<dyn BufRead + 'a> = if magic.starts_with(&[0x1f, 0x8b]) {
        Box::new(BufReader::new(flate2::bufread::MultiGzDecoder::new(input)))
    } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Box::new(BufReader::new(ZstdFrames::new(input)))
    } else if magic.starts_with(b"0707") {
        Box::new(input)
    } else {
        return Err(CpioError::UnknownFormat { magic });
    };
    Ok(NewcReader::new(stream, max_file))
}

/// Decodes every zstd frame in the stream, not only the first, so bytes
/// after the first frame cannot escape the scan.
struct ZstdFrames<R: BufRead> {
    state: Option<ZstdState<R>>,
}

enum ZstdState<R: BufRead> {
    Between(R),
    In(Box<ruzstd::decoding::StreamingDecoder<R, ruzstd::decoding::FrameDecoder>>),
}

impl<R: BufRead> ZstdFrames<R> {
    fn new(inner: R) -> Self {
        ZstdFrames {
            state: Some(ZstdState::Between(inner)),
        }
    }
}

impl<R: BufRead> Read for ZstdFrames<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.state.take() {
                None => return Ok(0),
                Some(ZstdState::Between(mut inner)) => {
                    if inner.fill_buf()?.is_empty() {
                        return Ok(0);
                    }
                    let decoder = ruzstd::decoding::StreamingDecoder::new(inner)
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                    self.state = Some(ZstdState::In(Box::new(decoder)));
                }
                Some(ZstdState::In(mut decoder)) => {
                    let n = decoder.read(buf)?;
                    if n == 0 && !buf.is_empty() {
                        self.state = Some(ZstdState::Between(decoder.into_inner()));
                        continue;
                    }
                    self.state = Some(ZstdState::In(decoder));
                    return Ok(n);
                }
            }
        }
    }
}

/// Writes a newc archive of `(name, mode, data)` members; for tests and
/// fixtures (the image build uses GNU cpio).
pub fn write_newc(members: &[(&str, u32, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut push = |name: &str, mode: u32, data: &[u8]| {
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            0,
            mode,
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            0,
            0,
            name.len() + 1,
            0
        );
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        while !out.len().is_multiple_of(4) {
            out.push(0);
        }
        out.extend_from_slice(data);
        while !out.len().is_multiple_of(4) {
            out.push(0);
        }
    };
    for (name, mode, data) in members {
        push(name, *mode, data);
    }
    push(TRAILER, 0, b"");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn all(bytes: &[u8]) -> Result<Vec<Entry>, CpioError> {
        let mut r = open(bytes, 1 << 20)?;
        let mut v = Vec::new();
        while let Some(e) = r.next_entry()? {
            v.push(e);
        }
        Ok(v)
    }

    fn sample() -> Vec<u8> {
        write_newc(&[
            ("etc", 0o040_755, b""),
            ("etc/passwd", 0o100_644, b"root:x:0:0::/root:/bin/sh\n"),
            ("bin/sh", 0o120_777, b"busybox"),
            ("a", 0o100_600, b"abc"),
        ])
    }

    #[test]
    fn reads_members_and_only_file_data() {
        let e = all(&sample()).unwrap();
        let names: Vec<_> = e.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["etc", "etc/passwd", "bin/sh", "a"]);
        assert!(e[1].is_file() && e[1].data.starts_with(b"root:"));
        assert!(!e[2].is_file() && e[2].data.is_empty());
        assert_eq!(e[3].data, b"abc");
    }

    #[test]
    fn concatenated_archives_with_padding_are_all_read() {
        let mut bytes = sample();
        bytes.extend_from_slice(&[0; 512]);
        bytes.extend(write_newc(&[("later", 0o100_644, b"x")]));
        let e = all(&bytes).unwrap();
        assert_eq!(e.last().unwrap().name, "later");
    }

    #[test]
    fn gzip_and_zstd_are_decoded() {
        let plain = sample();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&plain).unwrap();
        let gz = gz.finish().unwrap();
        assert_eq!(all(&gz).unwrap().len(), 4);

        let zst = ruzstd::encoding::compress_to_vec(
            &plain[..],
            ruzstd::encoding::CompressionLevel::Fastest,
        );
        assert_eq!(all(&zst).unwrap().len(), 4);
        // Two frames: the second must not escape.
        let mut two = zst.clone();
        two.extend(ruzstd::encoding::compress_to_vec(
            &write_newc(&[("second", 0o100_644, b"y")])[..],
            ruzstd::encoding::CompressionLevel::Fastest,
        ));
        assert_eq!(all(&two).unwrap().last().unwrap().name, "second");
    }

    proptest::proptest! {
        /// What `write_newc` writes reads back unchanged, file data only for
        /// regular files.
        #[test]
        fn round_trip(members in proptest::collection::vec(
            ("[a-z]{1,8}(/[a-z]{1,8}){0,3}", proptest::bool::ANY, proptest::collection::vec(proptest::num::u8::ANY, 0..64)),
            0..8,
        )) {
            let owned: Vec<(String, u32, Vec<u8>)> = members
                .into_iter()
                .map(|(n, file, d)| (n, if file { 0o100_644 } else { 0o120_777 }, d))
                .collect();
            let refs: Vec<(&str, u32, &[u8])> =
                owned.iter().map(|(n, m, d)| (n.as_str(), *m, d.as_slice())).collect();
            let got = all(&write_newc(&refs)).unwrap();
            proptest::prop_assert_eq!(got.len(), owned.len());
            for (e, (n, m, d)) in got.iter().zip(&owned) {
                proptest::prop_assert_eq!(&e.name, n);
                proptest::prop_assert_eq!(e.mode, *m);
                let want: &[u8] = if e.is_file() { d } else { &[] };
                proptest::prop_assert_eq!(e.data.as_slice(), want);
            }
        }

        /// Corrupting or cutting an archive anywhere yields entries or an
        /// error, never a panic or an endless loop.
        #[test]
        fn damage_never_panics(at in 0usize..400, byte in proptest::num::u8::ANY, cut in 0usize..400) {
            let mut bytes = sample();
            let at = at % bytes.len();
            bytes[at] = byte;
            bytes.truncate(bytes.len() - cut % bytes.len());
            let _ = all(&bytes);
        }
    }

    #[test]
    fn adversarial_inputs_fail_closed() {
        let good = sample();
        // Garbage after the trailer.
        let mut trailing = good.clone();
        trailing.extend_from_slice(b"\x1f\x8bgarbage!");
        assert!(matches!(
            all(&trailing),
            Err(CpioError::TrailingData { .. })
        ));
        // Cut in the middle of a member.
        assert!(matches!(
            all(&good[..good.len() - 130]),
            Err(CpioError::Truncated { .. })
        ));
        // No trailer at all.
        let no_trailer = &good[..good.len() - 124];
        assert!(matches!(all(no_trailer), Err(CpioError::Truncated { .. })));
        // Huge claimed name size.
        let mut huge = good.clone();
        huge[6 + 8 * 11..6 + 8 * 12].copy_from_slice(b"7fffffff");
        assert!(matches!(all(&huge), Err(CpioError::BadHeader { .. })));
        // Non-hex field.
        let mut nonhex = good.clone();
        nonhex[10] = b'z';
        assert!(matches!(all(&nonhex), Err(CpioError::BadHeader { .. })));
        // Unknown format.
        assert!(matches!(
            all(b"\x7fELF...."),
            Err(CpioError::UnknownFormat { .. })
        ));
        // Member over the size bound.
        let big = write_newc(&[("big", 0o100_644, &[7u8; 2048])]);
        let mut r = open(&big[..], 1024).unwrap();
        assert!(matches!(r.next_entry(), Err(CpioError::TooLarge { .. })));
        // Empty input is not an archive.
        assert!(all(b"").is_err());
    }
}
