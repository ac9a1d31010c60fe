//! The `cryptfs` marker token: where the current volume key came from, kept in the LUKS2
//! metadata itself so that the device stays the ground truth even if the journal is lost.
//!
//! `{"type":"cryptfs","keyslots":[],"volume-key-origin":"in-place","volume-key-digest":"…"}`
//! It opens nothing (no keyslots) and is ignored by systemd and cryptsetup. It is bound to the
//! digest of the segment's volume key: after any key change a stale marker no longer matches.

use cryptfs_states::VolumeKeyOrigin;
use serde_json::{json, Value};

use super::metadata::Luks2Metadata;

/// The marker's token type.
pub const TOKEN_TYPE: &str = "cryptfs";

/// A marker for `origin` bound to `digest`.
pub fn token(origin: VolumeKeyOrigin, digest: &str) -> Value {
    json!({
        "type": TOKEN_TYPE,
        "keyslots": [],
        "volume-key-origin": origin,
        "volume-key-digest": digest,
    })
}

/// The marker token's id, if any.
pub fn find(meta: &Luks2Metadata) -> Option<u32> {
    meta.tokens
        .iter()
        .find(|(_, t)| t.kind == TOKEN_TYPE)
        .map(|(id, _)| *id)
}

/// The origin the marker records for the current volume key, if it matches.
pub fn origin(meta: &Luks2Metadata) -> Option<VolumeKeyOrigin> {
    let token = &meta.tokens.get(&find(meta)?)?.json;
    let digest = meta.segment_digest()?;
    if token.get("volume-key-digest").and_then(Value::as_str) != Some(digest) {
        return None;
    }
    serde_json::from_value(token.get("volume-key-origin")?.clone()).ok()
}
