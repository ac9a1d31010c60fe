//! The provisioning journal of cryptfs: an append-only, blake3 hash-chained record of every
//! step's intent and outcome, stored in a redb database on the boot partition.
//!
//! The device's LUKS2 metadata is the ground truth of where provisioning stands; the journal
//! says what was in flight when the power went, which the metadata alone cannot tell apart.
//! It must never hold a secret: only public facts, digests and TPM-sealed blobs (which only the
//! sealing TPM can open).

mod chain;
mod error;
mod record;
mod store;

pub use chain::{verify_chain, ChainError, GENESIS};
pub use error::JournalError;
pub use record::{Phase, Record, RecordBody, MAX_RECORD_BYTES};
pub use store::{Journal, Recovery, Snapshot};
