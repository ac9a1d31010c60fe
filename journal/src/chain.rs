//! Verification of the blake3 hash chain.

use crate::record::Record;

/// `prev_hash` of the first record: blake3 of the empty string is not used, a fixed all-zero
/// value is, so that the genesis is obvious in a dump.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Where and why a chain is broken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// Sequence numbers are not 0, 1, 2, ...
    #[error("record at position {position} has sequence number {seq}")]
    Gap {
        /// Expected sequence number.
        position: u64,
        /// Found sequence number.
        seq: u64,
    },
    /// A record does not point at its predecessor.
    #[error("record {seq} does not chain to its predecessor")]
    Link {
        /// The record.
        seq: u64,
    },
    /// A record's content does not match its hash.
    #[error("record {seq} was altered (hash mismatch)")]
    Altered {
        /// The record.
        seq: u64,
    },
}

/// Checks sequence, links and hashes of `records` (in order).
pub fn verify_chain(records: &[Record]) -> Result<(), ChainError> {
    let mut prev = GENESIS.to_string();
    for (position, record) in records.iter().enumerate() {
        let position = position as u64;
        if record.body.seq != position {
            return Err(ChainError::Gap {
                position,
                seq: record.body.seq,
            });
        }
        if record.body.prev_hash != prev {
            return Err(ChainError::Link { seq: position });
        }
        let computed = record
            .body
            .compute_hash()
            .map_err(|_| ChainError::Altered { seq: position })?;
        if computed.to_hex().as_str() != record.hash {
            return Err(ChainError::Altered { seq: position });
        }
        prev = record.hash.clone();
    }
    Ok(())
}
