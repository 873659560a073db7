//! The transparent front end's reader: reassembles a TLS ClientHello across
//! TCP segments and TLS records and extracts its one SNI host name.
//!
//! **Invariant:** [`parse_client_hello`] looks at no byte at or past
//! [`MAX_HELLO_BYTES`] of its input, and a returned `hello_end` never exceeds
//! the input length. The caller replays every byte it read to the upstream;
//! nothing is rewritten. A hello with no SNI, several SNI names, a duplicated
//! extension, or a name [`HostName::parse`] rejects is refused — there is no
//! fallback to the original destination address.

use crate::domain::HostName;

/// Most raw bytes (record headers included) read while waiting for the
/// complete ClientHello.
pub const MAX_HELLO_BYTES: usize = 16 * 1024;

const RECORD_HEADER: usize = 5;
const CONTENT_HANDSHAKE: u8 = 22;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const EXT_SERVER_NAME: u16 = 0;
const NAME_TYPE_HOST: u8 = 0;
/// RFC 8446 §5.1: a TLSPlaintext fragment is at most 2^14 bytes.
const MAX_RECORD_PAYLOAD: usize = 1 << 14;

/// What the reader made of the bytes so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SniParse {
    /// The ClientHello is not complete yet and the bound is not reached.
    Incomplete,
    /// The SNI host name. `hello_end` is the offset just past the record that
    /// completed the ClientHello.
    Sni { name: HostName, hello_end: usize },
    /// Not a ClientHello the proxy can route.
    Rejected(SniError),
}

/// Why a ClientHello was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SniError {
    /// The hello has no server_name extension (or no host_name entry).
    NoSni,
    /// More than one host name, or the extension appears twice.
    MultipleSni,
    /// The SNI value is not a valid host name.
    InvalidName,
    /// The hello (or the bytes before its end) exceeds [`MAX_HELLO_BYTES`].
    TooLarge,
    /// Not TLS, not a handshake, not a ClientHello, or inconsistent lengths.
    Malformed(&'static str),
}

/// Parses the ClientHello at the start of `buf`.
pub fn parse_client_hello(buf: &[u8]) -> SniParse {
    let window = &buf[..buf.len().min(MAX_HELLO_BYTES)];
    match reassemble(window) {
        Ok(Some((hello, hello_end))) => match sni_from_hello(&hello) {
            Ok(name) => SniParse::Sni { name, hello_end },
            Err(e) => SniParse::Rejected(e),
        },
        Ok(None) if buf.len() >= MAX_HELLO_BYTES => SniParse::Rejected(SniError::TooLarge),
        Ok(None) => SniParse::Incomplete,
        Err(e) => SniParse::Rejected(e),
    }
}

/// Collects handshake-record payloads until one whole handshake message is
/// present. Returns the ClientHello body and the end offset of the record
/// that completed it, or `None` when more bytes are needed.
fn reassemble(window: &[u8]) -> Result<Option<(Vec<u8>, usize)>, SniError> {
    let mut handshake = Vec::new();
    let mut pos = 0;
    loop {
        // Check what we already have before asking for more.
        if handshake.len() >= 4 {
            if handshake[0] != HANDSHAKE_CLIENT_HELLO {
                return Err(SniError::Malformed(
                    "first handshake message is not a ClientHello",
                ));
            }
            let len = u32::from_be_bytes([0, handshake[1], handshake[2], handshake[3]]) as usize;
            if len + 4 > MAX_HELLO_BYTES {
                return Err(SniError::TooLarge);
            }
            if handshake.len() >= len + 4 {
                if handshake.len() > len + 4 {
                    return Err(SniError::Malformed(
                        "data after the ClientHello in its records",
                    ));
                }
                handshake.drain(..4);
                return Ok(Some((handshake, pos)));
            }
        }
        let rest = &window[pos..];
        if rest.len() < RECORD_HEADER {
            // Validate the partial header so garbage is refused early.
            check_partial_header(rest)?;
            return Ok(None);
        }
        check_partial_header(&rest[..3])?;
        let len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
        if len == 0 {
            return Err(SniError::Malformed("empty handshake record"));
        }
        if len > MAX_RECORD_PAYLOAD {
            return Err(SniError::Malformed("TLS record longer than 2^14 bytes"));
        }
        let Some(payload) = rest.get(RECORD_HEADER..RECORD_HEADER + len) else {
            return Ok(None);
        };
        handshake.extend_from_slice(payload);
        pos += RECORD_HEADER + len;
    }
}

fn check_partial_header(h: &[u8]) -> Result<(), SniError> {
    if let Some(&ct) = h.first()
        && ct != CONTENT_HANDSHAKE
    {
        return Err(SniError::Malformed("not a TLS handshake record"));
    }
    if let Some(&major) = h.get(1)
        && major != 3
    {
        return Err(SniError::Malformed("not a TLS record version"));
    }
    if let Some(&minor) = h.get(2)
        && minor > 4
    {
        return Err(SniError::Malformed("not a TLS record version"));
    }
    Ok(())
}

/// A bounds-checked reader over a byte slice.
struct Cursor<'a> {
    buf: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], SniError> {
        if n > self.buf.len() {
            return Err(SniError::Malformed("length field runs past its container"));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, SniError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, SniError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn vec8(&mut self) -> Result<&'a [u8], SniError> {
        let n = self.u8()?;
        self.take(usize::from(n))
    }
    fn vec16(&mut self) -> Result<&'a [u8], SniError> {
        let n = self.u16()?;
        self.take(usize::from(n))
    }
    fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}

fn sni_from_hello(body: &[u8]) -> Result<HostName, SniError> {
    let mut c = Cursor { buf: body };
    let _legacy_version = c.take(2)?;
    let _random = c.take(32)?;
    let session_id = c.vec8()?;
    if session_id.len() > 32 {
        return Err(SniError::Malformed("session id longer than 32 bytes"));
    }
    let suites = c.vec16()?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return Err(SniError::Malformed("invalid cipher suite list"));
    }
    if c.vec8()?.is_empty() {
        return Err(SniError::Malformed("empty compression method list"));
    }
    if c.is_empty() {
        return Err(SniError::NoSni);
    }
    let mut exts = Cursor { buf: c.vec16()? };
    if !c.is_empty() {
        return Err(SniError::Malformed("bytes after the extensions"));
    }
    let mut seen = Vec::new();
    let mut name = None;
    while !exts.is_empty() {
        let kind = exts.u16()?;
        let data = exts.vec16()?;
        if seen.contains(&kind) {
            return Err(if kind == EXT_SERVER_NAME {
                SniError::MultipleSni
            } else {
                SniError::Malformed("duplicated extension")
            });
        }
        seen.push(kind);
        if kind == EXT_SERVER_NAME {
            name = Some(server_name(data)?);
        }
    }
    name.ok_or(SniError::NoSni)
}

fn server_name(data: &[u8]) -> Result<HostName, SniError> {
    let mut outer = Cursor { buf: data };
    let mut list = Cursor {
        buf: outer.vec16()?,
    };
    if !outer.is_empty() {
        return Err(SniError::Malformed("bytes after the server name list"));
    }
    let mut host = None;
    while !list.is_empty() {
        let name_type = list.u8()?;
        let value = list.vec16()?;
        if name_type != NAME_TYPE_HOST {
            continue;
        }
        if host.is_some() {
            return Err(SniError::MultipleSni);
        }
        host = Some(value);
    }
    let value = host.ok_or(SniError::NoSni)?;
    // RFC 6066: ASCII, no trailing dot; HostName::parse normalises the rest.
    if value.is_empty() || !value.is_ascii() || value.ends_with(b".") {
        return Err(SniError::InvalidName);
    }
    let text = std::str::from_utf8(value).map_err(|_| SniError::InvalidName)?;
    HostName::parse(text).map_err(|_| SniError::InvalidName)
}

/// Builds ClientHello records for tests and fuzz seeds: `names` become one
/// server_name extension (empty: none), the handshake message is split into
/// records of at most `record_size` payload bytes.
pub fn build_client_hello(names: &[&[u8]], record_size: usize) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&[3, 3]);
    body.extend_from_slice(&[7; 32]);
    body.push(0);
    body.extend_from_slice(&[0, 2, 0x13, 0x01]);
    body.extend_from_slice(&[1, 0]);
    let mut exts = Vec::new();
    if !names.is_empty() {
        let mut list = Vec::new();
        for n in names {
            list.push(NAME_TYPE_HOST);
            list.extend_from_slice(&(n.len() as u16).to_be_bytes());
            list.extend_from_slice(n);
        }
        let mut data = (list.len() as u16).to_be_bytes().to_vec();
        data.extend_from_slice(&list);
        exts.extend_from_slice(&EXT_SERVER_NAME.to_be_bytes());
        exts.extend_from_slice(&(data.len() as u16).to_be_bytes());
        exts.extend_from_slice(&data);
    }
    // supported_versions: TLS 1.3, so the hello looks like a modern one.
    exts.extend_from_slice(&[0, 43, 0, 3, 2, 3, 4]);
    body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
    body.extend_from_slice(&exts);
    let mut hs = vec![HANDSHAKE_CLIENT_HELLO];
    hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    let mut out = Vec::new();
    for chunk in hs.chunks(record_size.max(1)) {
        out.extend_from_slice(&[CONTENT_HANDSHAKE, 3, 1]);
        out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
        out.extend_from_slice(chunk);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(s: &str) -> HostName {
        HostName::parse(s).unwrap()
    }

    #[test]
    fn single_record_hello() {
        let hello = build_client_hello(&[b"api.github.com"], 16384);
        assert_eq!(
            parse_client_hello(&hello),
            SniParse::Sni {
                name: host("api.github.com"),
                hello_end: hello.len()
            }
        );
    }

    #[test]
    fn split_across_records_and_segments() {
        for record_size in [1, 2, 3, 7, 50, 100] {
            let hello = build_client_hello(&[b"Example.COM"], record_size);
            // Every proper prefix (a TCP segment boundary anywhere) is
            // incomplete, never an error and never a premature answer.
            for cut in 0..hello.len() {
                assert_eq!(
                    parse_client_hello(&hello[..cut]),
                    SniParse::Incomplete,
                    "record size {record_size}, cut {cut}"
                );
            }
            assert_eq!(
                parse_client_hello(&hello),
                SniParse::Sni {
                    name: host("example.com"),
                    hello_end: hello.len()
                }
            );
        }
    }

    #[test]
    fn application_data_after_the_hello_is_left_alone() {
        let mut buf = build_client_hello(&[b"a.example"], 40);
        let end = buf.len();
        buf.extend_from_slice(&[23, 3, 3, 0, 1, 0]);
        assert_eq!(
            parse_client_hello(&buf),
            SniParse::Sni {
                name: host("a.example"),
                hello_end: end
            }
        );
    }

    #[test]
    fn refusals() {
        use SniError::*;
        let two = build_client_hello(&[b"a.example", b"b.example"], 16384);
        let none = build_client_hello(&[], 16384);
        let bad = build_client_hello(&[b"evil.com@good.com"], 16384);
        let dot = build_client_hello(&[b"a.example."], 16384);
        let empty = build_client_hello(&[b""], 16384);
        let utf8 = build_client_hello(&["bücher.de".as_bytes()], 16384);
        let nul = build_client_hello(&[b"a.example\0.evil"], 16384);
        let table: Vec<(&str, Vec<u8>, SniParse)> = vec![
            ("two names", two, SniParse::Rejected(MultipleSni)),
            ("no sni", none, SniParse::Rejected(NoSni)),
            ("userinfo", bad, SniParse::Rejected(InvalidName)),
            ("trailing dot", dot, SniParse::Rejected(InvalidName)),
            ("empty name", empty, SniParse::Rejected(InvalidName)),
            ("raw utf-8", utf8, SniParse::Rejected(InvalidName)),
            ("nul", nul, SniParse::Rejected(InvalidName)),
            (
                "http",
                b"GET / HTTP/1.1\r\n\r\n".to_vec(),
                SniParse::Rejected(Malformed("not a TLS handshake record")),
            ),
            (
                "alert record",
                vec![21, 3, 3, 0, 2, 2, 40],
                SniParse::Rejected(Malformed("not a TLS handshake record")),
            ),
            (
                "sslv2-ish",
                vec![22, 2, 0, 0, 1],
                SniParse::Rejected(Malformed("not a TLS record version")),
            ),
            (
                "empty record",
                vec![22, 3, 1, 0, 0],
                SniParse::Rejected(Malformed("empty handshake record")),
            ),
            (
                "record too long",
                vec![22, 3, 1, 0x40, 0x01],
                SniParse::Rejected(Malformed("TLS record longer than 2^14 bytes")),
            ),
            (
                "server hello",
                vec![22, 3, 3, 0, 4, 2, 0, 0, 0],
                SniParse::Rejected(Malformed("first handshake message is not a ClientHello")),
            ),
            (
                "hello claims 16 MiB",
                vec![22, 3, 3, 0, 4, 1, 0xff, 0xff, 0xff],
                SniParse::Rejected(TooLarge),
            ),
            (
                "hello of zero length",
                vec![22, 3, 3, 0, 4, 1, 0, 0, 0],
                SniParse::Rejected(Malformed("length field runs past its container")),
            ),
        ];
        for (what, input, want) in table {
            assert_eq!(parse_client_hello(&input), want, "{what}");
        }
    }

    #[test]
    fn malformed_inner_lengths() {
        let good = build_client_hello(&[b"a.example"], 16384);
        // Offsets in the single-record layout: 5 record + 4 handshake header,
        // then version(2) random(32) sid_len(1) suites_len(2) ...
        let sid_len = 5 + 4 + 2 + 32;
        let mut long_sid = good.clone();
        long_sid[sid_len] = 33;
        assert!(matches!(
            parse_client_hello(&long_sid),
            SniParse::Rejected(SniError::Malformed(_))
        ));
        let mut odd_suites = good.clone();
        odd_suites[sid_len + 2] = 3;
        assert!(matches!(
            parse_client_hello(&odd_suites),
            SniParse::Rejected(SniError::Malformed(_))
        ));
        // The extensions length claims more than there is.
        let ext_len = sid_len + 1 + 2 + 2 + 2;
        let mut long_exts = good.clone();
        long_exts[ext_len + 1] = long_exts[ext_len + 1].wrapping_add(1);
        assert!(matches!(
            parse_client_hello(&long_exts),
            SniParse::Rejected(SniError::Malformed(_))
        ));
        // Handshake header says one byte more than the record holds: the
        // reader waits for another record instead of reading past the end.
        let mut short = good.clone();
        short[5 + 3] += 1;
        assert_eq!(parse_client_hello(&short), SniParse::Incomplete);
        // Handshake header says one byte less: trailing byte in the record.
        let mut trailing = good.clone();
        trailing[5 + 3] -= 1;
        assert!(matches!(
            parse_client_hello(&trailing),
            SniParse::Rejected(SniError::Malformed(_))
        ));
    }

    #[test]
    fn duplicated_sni_extension_is_multiple() {
        let mut hello = build_client_hello(&[b"a.example"], 16384);
        // Append a second server_name extension for `b.example`:
        // type 0, data length 14, list length 12, host_name entry of 9 bytes.
        let mut ext = vec![0u8, 0, 0, 14, 0, 12, 0, 0, 9];
        ext.extend_from_slice(b"b.example");
        let n = ext.len();
        hello.extend_from_slice(&ext);
        let bump = |v: &mut [u8], at: usize, width: usize, by: usize| {
            let mut x = 0usize;
            for b in &v[at..at + width] {
                x = (x << 8) | usize::from(*b);
            }
            x += by;
            for i in 0..width {
                v[at + width - 1 - i] = (x >> (8 * i)) as u8;
            }
        };
        bump(&mut hello, 3, 2, n); // record length
        bump(&mut hello, 6, 3, n); // handshake length
        let ext_len = 5 + 4 + 2 + 32 + 1 + 2 + 2 + 2;
        bump(&mut hello, ext_len, 2, n); // extensions length
        assert_eq!(
            parse_client_hello(&hello),
            SniParse::Rejected(SniError::MultipleSni)
        );
    }

    #[test]
    fn never_waits_past_the_bound() {
        // A hello declared at just under the bound, fed in 1-byte records,
        // needs more raw bytes than the bound allows: refused, not awaited.
        let mut buf = vec![22, 3, 1, 0, 4, 1, 0, 0x30, 0x00];
        while buf.len() < MAX_HELLO_BYTES + 10 {
            buf.extend_from_slice(&[22, 3, 1, 0, 1, 0]);
        }
        assert_eq!(
            parse_client_hello(&buf),
            SniParse::Rejected(SniError::TooLarge)
        );
        assert_eq!(
            parse_client_hello(&buf[..MAX_HELLO_BYTES - 1]),
            SniParse::Incomplete
        );
    }
}
