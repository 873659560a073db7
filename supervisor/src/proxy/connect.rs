//! The explicit front end's request parser: one HTTP/1.1 request head over a
//! byte buffer, turned into a closed enum.
//!
//! **Invariant:** a [`ConnectParse::Connect`] target always holds a valid,
//! normalised [`HostName`] (or an IPv6 literal, which the decision refuses)
//! and a port in `1..=65535`. The parser never looks past [`MAX_HEAD`] bytes
//! and never accepts more than [`MAX_HEADERS`] header lines; it requires
//! CRLF line endings (a bare LF is malformed) and refuses obsolete line
//! folding, so no two parsers can disagree about where the head ends.
//!
//! Only the authority form `host:port` is accepted (RFC 9110 §9.3.6): no
//! userinfo (`evil.com@good.com:443`), no scheme, no path.

use std::net::Ipv6Addr;

use crate::domain::HostName;

/// Longest request head (request line + headers + blank line) in bytes.
pub const MAX_HEAD: usize = 8 * 1024;
/// Most header lines accepted.
pub const MAX_HEADERS: usize = 64;

/// Where a CONNECT asks to go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectTarget {
    pub host: TargetHost,
    pub port: u16,
}

/// The host part of a CONNECT authority.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetHost {
    /// A host name, or an IPv4 dotted-quad literal ([`HostName::as_ipv4`]).
    Name(HostName),
    /// A bracketed IPv6 literal. Never leasable; parsed only so the refusal
    /// can say what it was.
    Ipv6(Ipv6Addr),
}

/// What the parser made of the bytes so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectParse {
    /// The head is not complete yet and still within bounds: read more.
    Incomplete,
    /// A complete CONNECT head; `head_len` bytes belong to it, anything after
    /// is tunnel payload the client sent early.
    Connect {
        target: ConnectTarget,
        head_len: usize,
    },
    /// Not a request the proxy serves.
    Rejected(RequestError),
}

/// Why a request head was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestError {
    /// A well-formed request with another method (`GET http://...`).
    NotConnect,
    /// The head exceeds [`MAX_HEAD`] bytes.
    TooLarge,
    /// More than [`MAX_HEADERS`] header lines.
    TooManyHeaders,
    /// The authority's host is not a valid host name.
    InvalidName,
    /// Anything else that is not a well-formed HTTP/1.x head.
    Malformed(&'static str),
}

/// Parses the request head at the start of `buf`.
pub fn parse_connect(buf: &[u8]) -> ConnectParse {
    let window = &buf[..buf.len().min(MAX_HEAD)];
    let mut lines = Lines {
        buf: window,
        pos: 0,
    };
    let request_line = match lines.next_line() {
        Ok(Some(line)) => line,
        Ok(None) => return incomplete_or_too_large(buf),
        Err(e) => return ConnectParse::Rejected(e),
    };
    let target = match parse_request_line(request_line) {
        Ok(t) => t,
        Err(e) => return ConnectParse::Rejected(e),
    };
    let mut headers = 0usize;
    loop {
        match lines.next_line() {
            Ok(Some([])) => break,
            Ok(Some(line)) => {
                headers += 1;
                if headers > MAX_HEADERS {
                    return ConnectParse::Rejected(RequestError::TooManyHeaders);
                }
                if let Err(e) = check_header_line(line) {
                    return ConnectParse::Rejected(e);
                }
            }
            Ok(None) => return incomplete_or_too_large(buf),
            Err(e) => return ConnectParse::Rejected(e),
        }
    }
    match target {
        ParsedLine::Connect(target) => ConnectParse::Connect {
            target,
            head_len: lines.pos,
        },
        ParsedLine::Other => ConnectParse::Rejected(RequestError::NotConnect),
    }
}

fn incomplete_or_too_large(buf: &[u8]) -> ConnectParse {
    if buf.len() >= MAX_HEAD {
        ConnectParse::Rejected(RequestError::TooLarge)
    } else {
        ConnectParse::Incomplete
    }
}

struct Lines<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Lines<'a> {
    /// The next CRLF-terminated line without its terminator, `None` when the
    /// terminator has not arrived yet.
    fn next_line(&mut self) -> Result<Option<&'a [u8]>, RequestError> {
        let rest = &self.buf[self.pos..];
        let Some(lf) = rest.iter().position(|&b| b == b'\n') else {
            // A lone CR anywhere but right before LF is never valid.
            return match rest.iter().position(|&b| b == b'\r') {
                Some(cr) if cr + 1 < rest.len() => {
                    Err(RequestError::Malformed("bare CR in request head"))
                }
                _ => Ok(None),
            };
        };
        if lf == 0 || rest[lf - 1] != b'\r' {
            return Err(RequestError::Malformed(
                "bare LF in request head (lines must end in CRLF)",
            ));
        }
        let line = &rest[..lf - 1];
        if line.contains(&b'\r') {
            return Err(RequestError::Malformed("bare CR in request head"));
        }
        self.pos += lf + 1;
        Ok(Some(line))
    }
}

enum ParsedLine {
    Connect(ConnectTarget),
    Other,
}

fn parse_request_line(line: &[u8]) -> Result<ParsedLine, RequestError> {
    let line = std::str::from_utf8(line)
        .map_err(|_| RequestError::Malformed("request line is not UTF-8"))?;
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(RequestError::Malformed(
            "request line is not `METHOD target HTTP/1.1`",
        ));
    };
    if method.is_empty() || !method.bytes().all(is_tchar) {
        return Err(RequestError::Malformed("invalid method"));
    }
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Err(RequestError::Malformed("unsupported HTTP version"));
    }
    if target.is_empty() {
        return Err(RequestError::Malformed("empty request target"));
    }
    // Methods are case-sensitive (RFC 9110 §9.1).
    if method != "CONNECT" {
        return Ok(ParsedLine::Other);
    }
    parse_authority(target).map(ParsedLine::Connect)
}

/// `host:port` or `[v6]:port`.
pub fn parse_authority(authority: &str) -> Result<ConnectTarget, RequestError> {
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (v6, after) = rest
            .split_once(']')
            .ok_or(RequestError::Malformed("unterminated IPv6 literal"))?;
        let port = after
            .strip_prefix(':')
            .ok_or(RequestError::Malformed("missing port"))?;
        let ip: Ipv6Addr = v6
            .parse()
            .map_err(|_| RequestError::Malformed("invalid IPv6 literal"))?;
        (TargetHost::Ipv6(ip), port)
    } else {
        let (host, port) = authority
            .rsplit_once(':')
            .ok_or(RequestError::Malformed("missing port"))?;
        if host.is_empty() {
            return Err(RequestError::Malformed("missing host"));
        }
        let name = HostName::parse(host).map_err(|_| RequestError::InvalidName)?;
        (TargetHost::Name(name), port)
    };
    Ok(ConnectTarget {
        host,
        port: parse_port(port)?,
    })
}

fn parse_port(s: &str) -> Result<u16, RequestError> {
    if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(RequestError::Malformed("invalid port"));
    }
    match s.parse::<u32>() {
        Ok(p @ 1..=65535) => Ok(p as u16),
        _ => Err(RequestError::Malformed("port out of range 1..=65535")),
    }
}

fn check_header_line(line: &[u8]) -> Result<(), RequestError> {
    if matches!(line.first(), Some(b' ' | b'\t')) {
        return Err(RequestError::Malformed("obsolete header line folding"));
    }
    let colon = line
        .iter()
        .position(|&b| b == b':')
        .ok_or(RequestError::Malformed("header line without `:`"))?;
    let name = &line[..colon];
    if name.is_empty() || !name.iter().copied().all(is_tchar) {
        return Err(RequestError::Malformed("invalid header name"));
    }
    if line[colon + 1..].iter().any(|&b| b == 0 || b == b'\r') {
        return Err(RequestError::Malformed("invalid byte in header value"));
    }
    Ok(())
}

/// RFC 9110 token character.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> TargetHost {
        TargetHost::Name(HostName::parse(s).unwrap())
    }

    fn connect(host: TargetHost, port: u16, head_len: usize) -> ConnectParse {
        ConnectParse::Connect {
            target: ConnectTarget { host, port },
            head_len,
        }
    }

    #[test]
    fn request_table() {
        use ConnectParse::{Incomplete, Rejected};
        use RequestError::*;
        let ok = b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n";
        let table: Vec<(&[u8], ConnectParse)> = vec![
            (ok, connect(name("example.com"), 443, ok.len())),
            (
                b"CONNECT Example.COM.:8443 HTTP/1.0\r\n\r\n",
                connect(name("example.com"), 8443, 38),
            ),
            (
                b"CONNECT 93.184.216.34:443 HTTP/1.1\r\n\r\n",
                connect(name("93.184.216.34"), 443, 38),
            ),
            (
                b"CONNECT [2001:db8::1]:443 HTTP/1.1\r\n\r\n",
                connect(TargetHost::Ipv6("2001:db8::1".parse().unwrap()), 443, 38),
            ),
            (b"", Incomplete),
            (b"CONNECT example.com:443 HTTP/1.1\r\n", Incomplete),
            (
                b"CONNECT example.com:443 HTTP/1.1\r\nHost: x\r\n\r",
                Incomplete,
            ),
            (b"CONNECT example.com:443 HTTP/1.1\r", Incomplete),
            (
                b"GET http://example.com/ HTTP/1.1\r\n\r\n",
                Rejected(NotConnect),
            ),
            (
                b"connect example.com:443 HTTP/1.1\r\n\r\n",
                Rejected(NotConnect),
            ),
            (
                b"CONNECT evil.com@good.com:443 HTTP/1.1\r\n\r\n",
                Rejected(InvalidName),
            ),
            (
                b"CONNECT example.com HTTP/1.1\r\n\r\n",
                Rejected(Malformed("missing port")),
            ),
            (
                b"CONNECT example.com: HTTP/1.1\r\n\r\n",
                Rejected(Malformed("invalid port")),
            ),
            (
                b"CONNECT example.com:0 HTTP/1.1\r\n\r\n",
                Rejected(Malformed("port out of range 1..=65535")),
            ),
            (
                b"CONNECT example.com:65536 HTTP/1.1\r\n\r\n",
                Rejected(Malformed("port out of range 1..=65535")),
            ),
            (
                b"CONNECT example.com:+443 HTTP/1.1\r\n\r\n",
                Rejected(Malformed("invalid port")),
            ),
            (
                b"CONNECT example.com:000443 HTTP/1.1\r\n\r\n",
                Rejected(Malformed("invalid port")),
            ),
            (
                b"CONNECT :443 HTTP/1.1\r\n\r\n",
                Rejected(Malformed("missing host")),
            ),
            (
                b"CONNECT https://example.com:443 HTTP/1.1\r\n\r\n",
                Rejected(InvalidName),
            ),
            (
                b"CONNECT example.com:443/path HTTP/1.1\r\n\r\n",
                Rejected(Malformed("invalid port")),
            ),
            (
                b"CONNECT exa mple.com:443 HTTP/1.1\r\n\r\n",
                Rejected(Malformed("request line is not `METHOD target HTTP/1.1`")),
            ),
            (
                b"CONNECT example.com:443 HTTP/2.0\r\n\r\n",
                Rejected(Malformed("unsupported HTTP version")),
            ),
            (
                b"CONNECT example.com:443 HTTP/1.1\n\n",
                Rejected(Malformed(
                    "bare LF in request head (lines must end in CRLF)",
                )),
            ),
            (
                b"CONNECT example.com:443 HTTP/1.1\r\nHost: a\n\r\n",
                Rejected(Malformed(
                    "bare LF in request head (lines must end in CRLF)",
                )),
            ),
            (
                b"CONNECT example.com:443 HTTP/1.1\r\nHost: a\rb\r\n\r\n",
                Rejected(Malformed("bare CR in request head")),
            ),
            (
                b"CONNECT example.com:443 HTTP/1.1\r\n folded\r\n\r\n",
                Rejected(Malformed("obsolete header line folding")),
            ),
            (
                b"CONNECT example.com:443 HTTP/1.1\r\nnocolon\r\n\r\n",
                Rejected(Malformed("header line without `:`")),
            ),
            (
                b"CONNECT [::1:443 HTTP/1.1\r\n\r\n",
                Rejected(Malformed("unterminated IPv6 literal")),
            ),
            (
                b"CONNECT [zz]:443 HTTP/1.1\r\n\r\n",
                Rejected(Malformed("invalid IPv6 literal")),
            ),
            (
                b"CONNECT exa%6dple.com:443 HTTP/1.1\r\n\r\n",
                Rejected(InvalidName),
            ),
            (
                b"CONNECT \xff:443 HTTP/1.1\r\n\r\n",
                Rejected(Malformed("request line is not UTF-8")),
            ),
        ];
        for (input, want) in table {
            assert_eq!(
                parse_connect(input),
                want,
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn early_payload_is_not_part_of_the_head() {
        let mut buf = b"CONNECT a.example:443 HTTP/1.1\r\n\r\n".to_vec();
        let head = buf.len();
        buf.extend_from_slice(b"\x16\x03\x01payload");
        assert_eq!(parse_connect(&buf), connect(name("a.example"), 443, head));
    }

    #[test]
    fn header_flood_is_refused() {
        let mut buf = b"CONNECT a.example:443 HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            buf.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
        }
        buf.extend_from_slice(b"\r\n");
        assert_eq!(
            parse_connect(&buf),
            ConnectParse::Rejected(RequestError::TooManyHeaders)
        );
        // Exactly the limit is fine.
        let mut ok = b"CONNECT a.example:443 HTTP/1.1\r\n".to_vec();
        for i in 0..MAX_HEADERS {
            ok.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
        }
        ok.extend_from_slice(b"\r\n");
        assert!(matches!(parse_connect(&ok), ConnectParse::Connect { .. }));
    }

    #[test]
    fn oversized_head_is_refused_not_awaited() {
        let mut buf = b"CONNECT a.example:443 HTTP/1.1\r\nX-Big: ".to_vec();
        buf.resize(MAX_HEAD, b'a');
        assert_eq!(
            parse_connect(&buf),
            ConnectParse::Rejected(RequestError::TooLarge)
        );
        // One byte short of the bound is still only incomplete.
        buf.truncate(MAX_HEAD - 1);
        assert_eq!(parse_connect(&buf), ConnectParse::Incomplete);
        // A request line with no LF at all, past the bound.
        let long = vec![b'A'; MAX_HEAD + 100];
        assert_eq!(
            parse_connect(&long),
            ConnectParse::Rejected(RequestError::TooLarge)
        );
    }

    #[test]
    fn head_completing_exactly_at_the_bound_is_accepted() {
        let mut buf = b"CONNECT a.example:443 HTTP/1.1\r\nX-Pad: ".to_vec();
        let fill = MAX_HEAD - buf.len() - 4;
        buf.extend(std::iter::repeat_n(b'p', fill));
        buf.extend_from_slice(b"\r\n\r\n");
        assert_eq!(buf.len(), MAX_HEAD);
        assert!(matches!(
            parse_connect(&buf),
            ConnectParse::Connect { head_len, .. } if head_len == MAX_HEAD
        ));
    }
}
