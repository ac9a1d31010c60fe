//! The pure core of cryptfs: what state a device is in and what to do next.
//!
//! Nothing in this crate performs I/O, reads a clock or draws random numbers. The orchestrator
//! observes the device and the journal, hands the observations over as [`Facts`], and receives
//! an [`Action`]. After it has carried a step out, it reports the completion to the
//! [`machine::ProvisioningMachine`], which checks the transition against the only legal path:
//!
//! `unencrypted → encrypted-with-passphrase → kek-enrolled → reencrypting → complete →
//! header-backed-up`

pub mod action;
pub mod facts;
pub mod hotzone;
pub mod identity;
pub mod machine;
pub mod reseal;
pub mod state;

pub use action::{plan, Action, Blocker, Stage, Step};
pub use facts::{
    DeviceFacts, Facts, JournalFacts, Luks2Facts, Policy, ReencryptMode, ReencryptPolicy,
    ReencryptProgress, ResumePolicy, VolumeKeyOrigin,
};
pub use identity::{check_binding, BindingCheck, DeviceIdentity, JournalBinding};
pub use machine::{allowed, ProvisioningMachine, TransitionError};
pub use state::{derive_state, ProvisioningState};

#[cfg(test)]
mod tests;
