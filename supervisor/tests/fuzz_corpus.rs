//! Runs each fuzz target's property over every file of its seed corpus
//! (`fuzz/corpus/<target>/`), so the plain test suite checks them too.

use std::path::PathBuf;

use zerolease::proxy::props::{connect_property, domain_property, sni_property};

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap();
            (p, bytes)
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "empty corpus {}", dir.display());
    files
}

fn run(target: &str, property: fn(&[u8])) {
    for (path, bytes) in corpus(target) {
        let result = std::panic::catch_unwind(|| property(&bytes));
        assert!(result.is_ok(), "property fails on {}", path.display());
        // Every prefix too: the parsers see partial input on the wire.
        for cut in 0..bytes.len() {
            property(&bytes[..cut]);
        }
    }
}

#[test]
fn connect_corpus_holds_its_property() {
    run("connect", connect_property);
}

#[test]
fn sni_corpus_holds_its_property() {
    run("sni", sni_property);
}

#[test]
fn domain_corpus_holds_its_property() {
    run("domain", domain_property);
}

#[test]
fn a_real_rustls_hello_yields_its_sni() {
    let bytes = std::fs::read(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/sni/rustls-api-github-com"),
    )
    .unwrap();
    match zerolease::proxy::sni::parse_client_hello(&bytes) {
        zerolease::proxy::sni::SniParse::Sni { name, hello_end } => {
            assert_eq!(name.as_str(), "api.github.com");
            assert_eq!(hello_end, bytes.len());
        }
        other => panic!("{other:?}"),
    }
}
