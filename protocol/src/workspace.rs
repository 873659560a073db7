//! The workspace disks: how the guest finds them and the layout of the
//! result the guest writes back.
//!
//! The host attaches two raw virtio-blk disks: the workspace as a tar
//! (read-only, serial [`WORKSPACE_IN_SERIAL`]) and an empty, bounded "out"
//! disk (serial [`WORKSPACE_OUT_SERIAL`]). The guest writes an
//! [`OutHeader`] block at offset 0 and, after it, the git bundle and then the
//! patch.
//!
//! **Invariant:** the host reads the out disk as untrusted data: [`OutHeader::decode`]
//! checks the magic, that both lengths fit in the disk, and that the reason
//! text is short, single-line UTF-8 — before anything is read past the header.

/// Serial of the read-only disk holding the workspace tar (at most 20 bytes:
/// virtio-blk's limit).
pub const WORKSPACE_IN_SERIAL: &str = "zl-ws-in";
/// Serial of the disk the guest writes its result to.
pub const WORKSPACE_OUT_SERIAL: &str = "zl-ws-out";
/// Size of the header block; the bundle starts right after it.
pub const OUT_HEADER_LEN: usize = 512;
/// First bytes of a valid header.
pub const OUT_MAGIC: &[u8; 8] = b"ZLWSOUT1";
/// Longest reason text (bytes) a header carries.
pub const MAX_OUT_REASON: usize = OUT_HEADER_LEN - 32;

/// What the guest reports about the workspace at the end of a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutHeader {
    /// Length of the git bundle that follows the header (0: no bundle,
    /// because nothing changed).
    pub bundle_len: u64,
    /// Length of the patch that follows the bundle.
    pub patch_len: u64,
    /// Why the guest could not produce the result, if it could not; both
    /// lengths are then 0.
    pub error: Option<String>,
}

/// Why an out disk's header is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OutHeaderError {
    /// The disk holds no header: the guest never wrote one.
    #[error("the guest wrote no result (no header on the out disk)")]
    NoHeader,
    /// The lengths do not fit in the disk.
    #[error("the result's lengths ({bundle} + {patch} bytes) do not fit in the {disk}-byte disk")]
    TooLong {
        /// Bundle length claimed.
        bundle: u64,
        /// Patch length claimed.
        patch: u64,
        /// The disk's size.
        disk: u64,
    },
    /// The reason text is malformed.
    #[error("the header's reason text is malformed")]
    BadReason,
}

impl OutHeader {
    /// The header block: magic, bundle length, patch length (big-endian
    /// `u64`s), reason length (`u32`), reason bytes, zero padding. A reason
    /// is cut to [`MAX_OUT_REASON`] bytes at a character boundary and its
    /// control characters become spaces.
    pub fn encode(&self) -> [u8; OUT_HEADER_LEN] {
        let mut block = [0u8; OUT_HEADER_LEN];
        block[..8].copy_from_slice(OUT_MAGIC);
        block[8..16].copy_from_slice(&self.bundle_len.to_be_bytes());
        block[16..24].copy_from_slice(&self.patch_len.to_be_bytes());
        if let Some(reason) = &self.error {
            let mut text: String = reason
                .chars()
                .map(|c| if c.is_control() { ' ' } else { c })
                .collect();
            let mut cut = text.len().min(MAX_OUT_REASON);
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
            // Never empty, so "an error" stays distinguishable from "none".
            if text.is_empty() {
                text.push('?');
            }
            let len = u32::try_from(text.len()).unwrap_or(0);
            block[24..28].copy_from_slice(&len.to_be_bytes());
            block[32..32 + text.len()].copy_from_slice(text.as_bytes());
        }
        block
    }

    /// Parses the first [`OUT_HEADER_LEN`] bytes of a disk of `disk_len`
    /// bytes.
    pub fn decode(block: &[u8], disk_len: u64) -> Result<OutHeader, OutHeaderError> {
        if block.len() < OUT_HEADER_LEN || &block[..8] != OUT_MAGIC {
            return Err(OutHeaderError::NoHeader);
        }
        let u64_at = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&block[at..at + 8]);
            u64::from_be_bytes(b)
        };
        let (bundle, patch) = (u64_at(8), u64_at(16));
        let room = disk_len.saturating_sub(OUT_HEADER_LEN as u64);
        if bundle.checked_add(patch).is_none_or(|total| total > room) {
            return Err(OutHeaderError::TooLong {
                bundle,
                patch,
                disk: disk_len,
            });
        }
        let mut len = [0u8; 4];
        len.copy_from_slice(&block[24..28]);
        let len = u32::from_be_bytes(len) as usize;
        let error = if len == 0 {
            None
        } else {
            if len > MAX_OUT_REASON || bundle != 0 || patch != 0 {
                return Err(OutHeaderError::BadReason);
            }
            let text =
                std::str::from_utf8(&block[32..32 + len]).map_err(|_| OutHeaderError::BadReason)?;
            if text.chars().any(char::is_control) {
                return Err(OutHeaderError::BadReason);
            }
            Some(text.to_owned())
        };
        Ok(OutHeader {
            bundle_len: bundle,
            patch_len: patch,
            error,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let cases = [
            OutHeader {
                bundle_len: 10,
                patch_len: 20,
                error: None,
            },
            OutHeader {
                bundle_len: 0,
                patch_len: 0,
                error: None,
            },
            OutHeader {
                bundle_len: 0,
                patch_len: 0,
                error: Some("git failed: exit 128".into()),
            },
        ];
        for header in cases {
            assert_eq!(OutHeader::decode(&header.encode(), 4096), Ok(header));
        }
    }

    #[test]
    fn reasons_are_cleaned_and_bounded() {
        let header = OutHeader {
            bundle_len: 0,
            patch_len: 0,
            error: Some(format!("a\nb\x1b[31m{}", "é".repeat(400))),
        };
        let back = OutHeader::decode(&header.encode(), 4096).unwrap();
        let text = back.error.unwrap();
        assert!(text.starts_with("a b [31m"));
        assert!(text.len() <= MAX_OUT_REASON);
    }

    #[test]
    fn refuses_bad_headers() {
        let good = OutHeader {
            bundle_len: 100,
            patch_len: 100,
            error: None,
        }
        .encode();
        // An empty disk, a short read, a wrong magic.
        assert_eq!(
            OutHeader::decode(&[0u8; 512], 4096),
            Err(OutHeaderError::NoHeader)
        );
        assert_eq!(
            OutHeader::decode(&good[..100], 4096),
            Err(OutHeaderError::NoHeader)
        );
        let mut bad = good;
        bad[0] = b'X';
        assert_eq!(OutHeader::decode(&bad, 4096), Err(OutHeaderError::NoHeader));
        // Lengths past the disk's end, or overflowing.
        assert!(matches!(
            OutHeader::decode(&good, 711),
            Err(OutHeaderError::TooLong { .. })
        ));
        OutHeader::decode(&good, 712).unwrap();
        let mut huge = good;
        huge[8..16].copy_from_slice(&u64::MAX.to_be_bytes());
        assert!(matches!(
            OutHeader::decode(&huge, u64::MAX),
            Err(OutHeaderError::TooLong { .. })
        ));
        // A reason too long, not UTF-8, with a control character, or next to data.
        let reason = |len: u32, bytes: &[u8], with_data: bool| {
            let mut b = [0u8; OUT_HEADER_LEN];
            b[..8].copy_from_slice(OUT_MAGIC);
            if with_data {
                b[8..16].copy_from_slice(&1u64.to_be_bytes());
            }
            b[24..28].copy_from_slice(&len.to_be_bytes());
            b[32..32 + bytes.len()].copy_from_slice(bytes);
            OutHeader::decode(&b, 4096)
        };
        assert_eq!(reason(u32::MAX, b"", false), Err(OutHeaderError::BadReason));
        assert_eq!(reason(481, b"", false), Err(OutHeaderError::BadReason));
        assert_eq!(
            reason(2, b"\xff\xfe", false),
            Err(OutHeaderError::BadReason)
        );
        assert_eq!(reason(2, b"a\n", false), Err(OutHeaderError::BadReason));
        assert_eq!(reason(2, b"ok", true), Err(OutHeaderError::BadReason));
        assert!(reason(2, b"ok", false).unwrap().error.is_some());
    }
}
