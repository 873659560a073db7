//! Loading, listing and deleting jail tables with `nft -j` (through the
//! `nftables` crate).
//!
//! PRIVILEGED (CAP_NET_ADMIN). `nft` is spawned from the calling thread, so it
//! acts on that thread's network namespace.

use nftables::helper::{self, NftablesError};
use nftables::schema::{NfListObject, Table};
use nftables::types::NfFamily;
use thiserror::Error;

use super::ruleset::{self, CounterParseError, JailCounters, JailSpec};

/// A failed `nft` invocation.
#[derive(Debug, Error)]
pub enum NftError {
    #[error("`nft` was not found; install the nftables package (apt-get install nftables)")]
    NotInstalled(#[source] NftablesError),
    #[error(
        "`nft` refused to {action} (its message is above); zerolease needs root (CAP_NET_ADMIN)"
    )]
    Failed {
        action: String,
        #[source]
        source: NftablesError,
    },
    #[error("cannot read the counters of the nftables table `{table}`")]
    Counters {
        table: String,
        #[source]
        source: CounterParseError,
    },
    #[error("`nft -j list tables` printed something that is not nftables JSON")]
    Listing(#[source] serde_json::Error),
}

fn classify(action: impl Into<String>) -> impl FnOnce(NftablesError) -> NftError {
    let action = action.into();
    move |e| match &e {
        NftablesError::NftExecution { inner, .. }
            if inner.kind() == std::io::ErrorKind::NotFound =>
        {
            NftError::NotInstalled(e)
        }
        _ => NftError::Failed { action, source: e },
    }
}

/// Loads the session's table in one transaction, replacing an older one.
pub async fn apply(spec: &JailSpec) -> Result<(), NftError> {
    helper::apply_ruleset_async(&ruleset::render(spec))
        .await
        .map_err(classify(format!("load the table inet {}", spec.table)))
}

/// Deletes `inet <table>`; a missing table is not an error.
pub async fn delete_table(table: &str) -> Result<(), NftError> {
    // `add` is a no-op on an existing table, so `add; delete` in one batch
    // deletes whatever is there without failing on absence (nft < 1.0.8 has
    // no `destroy`).
    let mut batch = nftables::batch::Batch::new();
    let t = Table {
        family: NfFamily::INet,
        name: table.to_owned().into(),
        handle: None,
    };
    batch.add(NfListObject::Table(t.clone()));
    batch.delete(NfListObject::Table(t));
    helper::apply_ruleset_async(&batch.to_nftables())
        .await
        .map_err(classify(format!("delete the table inet {table}")))
}

/// The names of the `inet` tables of the namespace.
pub async fn inet_tables() -> Result<Vec<String>, NftError> {
    let raw =
        helper::get_current_ruleset_raw_async(helper::DEFAULT_NFT, ["list", "tables", "inet"])
            .await
            .map_err(classify("list the inet tables"))?;
    parse_table_names(&raw).map_err(NftError::Listing)
}

fn parse_table_names(json: &str) -> Result<Vec<String>, serde_json::Error> {
    #[derive(serde::Deserialize)]
    struct Listing {
        nftables: Vec<serde_json::Value>,
    }
    #[derive(serde::Deserialize)]
    struct RawTable {
        family: String,
        name: String,
    }
    let listing: Listing = serde_json::from_str(json)?;
    let mut out = Vec::new();
    for object in listing.nftables {
        if let Some(table) = object.get("table") {
            let table: RawTable = serde_json::from_value(table.clone())?;
            if table.family == "inet" {
                out.push(table.name);
            }
        }
    }
    Ok(out)
}

/// Reads the named counters of `inet <table>`.
pub async fn counters(table: &str) -> Result<JailCounters, NftError> {
    let raw = helper::get_current_ruleset_raw_async(
        helper::DEFAULT_NFT,
        ["list", "table", "inet", table],
    )
    .await
    .map_err(classify(format!("list the table inet {table}")))?;
    ruleset::parse_counters(table, &raw).map_err(|source| NftError::Counters {
        table: table.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_nft_says_what_to_install() {
        let missing = NftablesError::NftExecution {
            program: "nft".into(),
            inner: std::io::Error::from(std::io::ErrorKind::NotFound),
        };
        let err = classify("load the table inet zl_a")(missing);
        assert!(matches!(err, NftError::NotInstalled(_)));
        assert_eq!(
            err.to_string(),
            "`nft` was not found; install the nftables package (apt-get install nftables)"
        );
        let denied = NftablesError::NftExecution {
            program: "nft".into(),
            inner: std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        };
        assert!(matches!(classify("x")(denied), NftError::Failed { .. }));
    }

    #[test]
    fn table_names_table() {
        let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
            {"table": {"family": "inet", "name": "zl_a", "handle": 1}},
            {"table": {"family": "ip", "name": "zl_b", "handle": 2}},
            {"table": {"family": "inet", "name": "filter", "handle": 3}}]}"#;
        assert_eq!(parse_table_names(json).unwrap(), ["zl_a", "filter"]);
        assert_eq!(
            parse_table_names(r#"{"nftables": []}"#).unwrap(),
            Vec::<String>::new()
        );
        for bad in ["", "{}", r#"{"nftables": [{"table": {"name": 1}}]}"#] {
            assert!(parse_table_names(bad).is_err(), "{bad}");
        }
    }
}
