//! cryptfs: takes a device's root filesystem from "shipped" to "encrypted with a per-device key
//! that only this device's TPM 2.0 can release", unattended, surviving a power cut anywhere.
//!
//! Decisions live in `cryptfs-states` (pure); this crate carries them out: probing the device,
//! LUKS2 through libcryptsetup, the KEK protector, the journal, and the CLI.

pub mod boot_lock;
pub mod cli;
pub mod cmd;
pub mod config;
pub mod dm;
pub mod ext4;
pub mod failpoint;
pub mod generator;
pub mod image;
pub mod kek;
pub mod keyring;
pub mod luks;
pub mod notify;
pub mod online_recovery;
pub mod partition;
pub mod plaintext;
pub mod priority;
pub mod probe;
pub mod progress;
pub mod record;
pub mod recovery;
pub mod reencrypt_progress;
pub mod reseal;
pub mod runner;
pub mod secret;
pub mod secure_boot;
pub mod status;
pub mod steps;
pub mod token_policy;
pub mod token_unlock;
pub mod unlock;

/// Everything that can stop cryptfs, with the context a user needs to act on it.
pub type Result<T, E = anyhow::Error> = std::result::Result<T, E>;

/// A long step stopped cleanly between two hotzones because SIGTERM/SIGINT asked for it; the
/// next start resumes it. Not a failure: the binary exits with [`StoppedOnRequest::EXIT_CODE`],
/// which the unit lists in `SuccessExitStatus=`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{step} stopped on request between two hotzones; it resumes at the next start")]
pub struct StoppedOnRequest {
    /// The step that stopped.
    pub step: cryptfs_states::Step,
}

impl StoppedOnRequest {
    /// `EX_TEMPFAIL` of sysexits.h: try again later.
    pub const EXIT_CODE: u8 = 75;
}
