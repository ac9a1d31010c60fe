//! One journal record and its canonical encoding.
//!
//! Encoding: a record is stored as the UTF-8 JSON of [`Record`] under its sequence number (u64
//! key) in the redb table `records`. Its `hash` is blake3 over the bytes of
//! `prev_hash (32 raw bytes) || JSON of the RecordBody`. serde_json writes struct fields in
//! declaration order and `details` is a `BTreeMap`, so the body's JSON is canonical.

use std::collections::BTreeMap;

use cryptfs_states::ProvisioningState;
use serde::{Deserialize, Serialize};

/// Where a step stands in a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// The step is about to start; committed durably before the first write to the device.
    Intent,
    /// The step finished and its effect is durable.
    Done,
    /// The step failed; the device is as the details say.
    Failed,
    /// Committed progress of a long step.
    Progress,
    /// A fact worth keeping that is no step (a transition, a recovered journal, a skip).
    Note,
}

/// The hashed content of a record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordBody {
    /// Position in the journal, from 0.
    pub seq: u64,
    /// Milliseconds since the Unix epoch when the record was written.
    pub time_unix_ms: u64,
    /// The kernel boot id of the boot that wrote it.
    pub boot_id: String,
    /// The stage that wrote it (`initramfs`, `userspace`, `all`, or a command such as `status`).
    pub stage: String,
    /// The step's name (see `cryptfs_states::Step`) or another subject (`transition`, `journal`).
    pub step: String,
    /// Intent, done, failed, progress or note.
    pub phase: Phase,
    /// The state derived from the device when the record was written.
    pub state_before: Option<ProvisioningState>,
    /// The state after the step (on `done` and transitions).
    pub state_after: Option<ProvisioningState>,
    /// Public facts about the step. Never a secret.
    pub details: BTreeMap<String, serde_json::Value>,
    /// Hex blake3 of the previous record (or of nothing, for the first one).
    pub prev_hash: String,
}

/// A record as stored: its body and its own hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The hashed content.
    #[serde(flatten)]
    pub body: RecordBody,
    /// Hex blake3 of this record (see the module docs).
    pub hash: String,
}

/// The largest stored record decoded: records are small (a few hundred bytes; the largest,
/// with a saved superblock, about 3 KiB), so anything far larger is damage or an attack and is
/// refused before serde allocates for it.
pub const MAX_RECORD_BYTES: usize = 1 << 20;

impl Record {
    /// Decodes a stored record. Bytes from the disk are hostile: the size is capped
    /// ([`MAX_RECORD_BYTES`]), nesting is bounded by serde_json's recursion limit, and every
    /// failure is an error, never a panic. The hash is not checked here (see `verify_chain`).
    pub fn decode(bytes: &[u8]) -> Result<Record, serde_json::Error> {
        if bytes.len() > MAX_RECORD_BYTES {
            return Err(<serde_json::Error as serde::de::Error>::custom(format!(
                "record is {} bytes, more than the {MAX_RECORD_BYTES} a record may have",
                bytes.len()
            )));
        }
        serde_json::from_slice(bytes)
    }
}

impl RecordBody {
    /// The blake3 hash of the body chained to its predecessor.
    pub fn compute_hash(&self) -> Result<blake3::Hash, serde_json::Error> {
        let json = serde_json::to_vec(self)?;
        let mut prev = [0u8; 32];
        // A malformed prev_hash hashes as zeroes; the chain check reports it anyway.
        if let Ok(bytes) = hex::decode(&self.prev_hash) {
            if bytes.len() == 32 {
                prev.copy_from_slice(&bytes);
            }
        }
        let mut hasher = blake3::Hasher::new();
        hasher.update(&prev);
        hasher.update(&json);
        Ok(hasher.finalize())
    }

    /// A detail as a string, if present and a string.
    pub fn detail_str(&self, key: &str) -> Option<&str> {
        self.details.get(key).and_then(|v| v.as_str())
    }
}
