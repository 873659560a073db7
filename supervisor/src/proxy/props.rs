//! Properties the fuzz targets assert, shared with a `cargo test` that runs
//! them over the seed corpus. Each function panics when its property fails.

use crate::domain::{DomainPattern, HostName};

use super::connect::{ConnectParse, MAX_HEAD, TargetHost, parse_connect};
use super::sni::{MAX_HELLO_BYTES, SniParse, parse_client_hello};

/// A parsed CONNECT target always has a valid, self-reparsing host name and
/// a port in 1..=65535; the head length lies within the input and the bound;
/// the head alone parses the same; `Incomplete` only below the bound.
pub fn connect_property(data: &[u8]) {
    let parsed = parse_connect(data);
    match &parsed {
        ConnectParse::Connect { target, head_len } => {
            assert!(*head_len <= data.len() && *head_len <= MAX_HEAD);
            assert_ne!(target.port, 0);
            if let TargetHost::Name(name) = &target.host {
                assert_name_is_canonical(name);
            }
            assert_eq!(parse_connect(&data[..*head_len]), parsed);
        }
        ConnectParse::Incomplete => assert!(data.len() < MAX_HEAD),
        ConnectParse::Rejected(_) => {}
    }
}

/// The SNI reader never claims more bytes than it was given, never looks
/// past its bound (the answer for the input equals the answer for its first
/// `MAX_HELLO_BYTES` bytes), and returns only canonical names.
pub fn sni_property(data: &[u8]) {
    let parsed = parse_client_hello(data);
    let bounded = &data[..data.len().min(MAX_HELLO_BYTES)];
    assert_eq!(parse_client_hello(bounded), parsed);
    match &parsed {
        SniParse::Sni { name, hello_end } => {
            assert!(*hello_end <= data.len() && *hello_end <= MAX_HELLO_BYTES);
            assert_name_is_canonical(name);
            assert_eq!(parse_client_hello(&data[..*hello_end]), parsed);
        }
        SniParse::Incomplete => assert!(data.len() < MAX_HELLO_BYTES),
        SniParse::Rejected(_) => {}
    }
}

/// Input: `pattern \n name`. Accepted names re-parse to themselves and pass
/// validation; accepted patterns re-parse from their display form; a match
/// is exact or strictly below the wildcard's suffix on a label boundary.
pub fn domain_property(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let (pattern, name) = text.split_once('\n').unwrap_or((&text, &text));
    let name = HostName::parse(name).ok();
    if let Some(n) = &name {
        assert_name_is_canonical(n);
    }
    let Ok(pattern) = DomainPattern::parse(pattern) else {
        return;
    };
    assert_eq!(
        DomainPattern::parse(&pattern.to_string()).as_ref(),
        Ok(&pattern)
    );
    let Some(name) = name else { return };
    let matches = pattern.matches(&name);
    match &pattern {
        DomainPattern::Exact(exact) => assert_eq!(matches, *exact == name),
        DomainPattern::Wildcard(suffix) => {
            let below = name
                .as_str()
                .strip_suffix(suffix.as_str())
                .is_some_and(|head| head.len() > 1 && head.ends_with('.'));
            assert_eq!(matches, below);
        }
    }
    assert_eq!(pattern.covers(&DomainPattern::Exact(name.clone())), matches);
}

fn assert_name_is_canonical(name: &HostName) {
    let s = name.as_str();
    assert_eq!(HostName::parse(s).as_ref(), Ok(name));
    assert!(!s.is_empty() && s.len() <= 253 && !s.ends_with('.'));
    assert!(
        s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
    );
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::proxy::sni::build_client_hello;

    proptest! {
        #[test]
        fn connect_property_on_random_bytes(data in proptest::collection::vec(any::<u8>(), 0..600)) {
            connect_property(&data);
        }

        #[test]
        fn connect_property_on_near_valid_heads(
            host in "[a-zA-Z0-9.@:_\\[\\]-]{0,40}",
            port in "[0-9+-]{0,7}",
            headers in 0usize..80,
            lf_only in any::<bool>(),
        ) {
            let eol = if lf_only { "\n" } else { "\r\n" };
            let mut req = format!("CONNECT {host}:{port} HTTP/1.1{eol}");
            for i in 0..headers {
                req.push_str(&format!("X-{i}: v{eol}"));
            }
            req.push_str(eol);
            connect_property(req.as_bytes());
        }

        #[test]
        fn sni_property_on_random_bytes(data in proptest::collection::vec(any::<u8>(), 0..600)) {
            sni_property(&data);
        }

        #[test]
        fn any_split_of_a_valid_hello_yields_its_name(
            labels in proptest::collection::vec("[a-z0-9]{1,10}", 1..5),
            record in 1usize..300,
            flip in proptest::option::of((any::<prop::sample::Index>(), any::<u8>())),
        ) {
            let name = labels.join(".") + ".test";
            let mut hello = build_client_hello(&[name.as_bytes()], record);
            let pristine = flip.is_none();
            if let Some((at, byte)) = flip {
                let i = at.index(hello.len());
                hello[i] = byte;
            }
            sni_property(&hello);
            if pristine {
                match parse_client_hello(&hello) {
                    SniParse::Sni { name: got, hello_end } => {
                        prop_assert_eq!(got.as_str(), name.as_str());
                        prop_assert_eq!(hello_end, hello.len());
                    }
                    other => prop_assert!(false, "{:?}", other),
                }
            }
        }

        #[test]
        fn domain_property_on_random_text(pattern in "\\PC{0,30}", name in "\\PC{0,30}") {
            domain_property(format!("{pattern}\n{name}").as_bytes());
        }

        #[test]
        fn domain_property_on_name_like_text(
            pattern in "(\\*\\.)?[a-zA-Z0-9.-]{1,20}",
            name in "[a-zA-Z0-9.-]{1,30}",
        ) {
            domain_property(format!("{pattern}\n{name}").as_bytes());
        }
    }
}
