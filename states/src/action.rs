//! The next action for a stage, decided from facts alone.

use serde::{Deserialize, Serialize};
use std::fmt;

use crate::facts::{DeviceFacts, Facts, ResumePolicy};
use crate::state::{derive_state, ProvisioningState};

/// Which part of the boot is running cryptfs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Stage {
    /// Early boot, before the root is mounted: encryption, enrollment, wipe, re-encryption setup.
    Initramfs,
    /// The running system: re-encryption, header backup, filesystem growth.
    Userspace,
    /// Everything in one offline process (host tests, demo, factory tooling).
    All,
}

/// One destructive or state-changing step, journaled as intent before and done after.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Step {
    /// Encrypt the plain ext4 filesystem in place (or resume doing so), KEK keyslot included.
    EncryptInPlace,
    /// Add the KEK keyslot and token next to the image's passphrase keyslot.
    EnrollKek,
    /// Add a recovery keyslot and its `systemd-recovery` token, the key escrowed first.
    EnrollRecovery,
    /// Destroy every keyslot no token references.
    WipePassphrase,
    /// Mark the header for re-encryption with a new volume key.
    InitReencrypt,
    /// Run (or resume) the re-encryption to its end.
    Reencrypt,
    /// Repair what a crash left of a re-encryption (hotzone recovery, finalisation) without
    /// running it further, so the volume can be activated and finished in the background.
    RecoverReencrypt,
    /// Write `luks.bin` on the boot partition and record its digest.
    BackupHeader,
    /// Grow the filesystem into the space the LUKS2 header no longer needs.
    GrowFilesystem,
}

impl Step {
    /// Every step, in path order.
    pub const ALL: [Step; 9] = [
        Step::EncryptInPlace,
        Step::EnrollKek,
        Step::EnrollRecovery,
        Step::WipePassphrase,
        Step::InitReencrypt,
        Step::Reencrypt,
        Step::RecoverReencrypt,
        Step::BackupHeader,
        Step::GrowFilesystem,
    ];

    /// The step's name as in the journal and logs.
    pub fn name(self) -> &'static str {
        match self {
            Step::EncryptInPlace => "encrypt-in-place",
            Step::EnrollKek => "enroll-kek",
            Step::EnrollRecovery => "enroll-recovery",
            Step::WipePassphrase => "wipe-passphrase",
            Step::InitReencrypt => "init-reencrypt",
            Step::Reencrypt => "reencrypt",
            Step::RecoverReencrypt => "recover-reencrypt",
            Step::BackupHeader => "backup-header",
            Step::GrowFilesystem => "grow-filesystem",
        }
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a stage cannot act on the device as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Blocker {
    /// The userspace stage found work that belongs to the initramfs stage.
    InitramfsStagePending,
}

/// What the orchestrator should do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "action", content = "step")]
pub enum Action {
    /// Carry out this step.
    Run(Step),
    /// The stage has nothing left to do.
    Done,
    /// The stage cannot proceed; the device is left as it is.
    Blocked(Blocker),
}

/// Decides the next action of `stage` from `facts`.
pub fn plan(facts: &Facts, stage: Stage) -> Action {
    let early = matches!(stage, Stage::Initramfs | Stage::All);
    let late = matches!(stage, Stage::Userspace | Stage::All);
    let early_step = |step| {
        if early {
            Action::Run(step)
        } else {
            Action::Blocked(Blocker::InitramfsStagePending)
        }
    };
    match derive_state(facts) {
        ProvisioningState::Unencrypted => early_step(Step::EncryptInPlace),
        ProvisioningState::EncryptedWithPassphrase => early_step(Step::EnrollKek),
        ProvisioningState::KekEnrolled => {
            let passphrases_left = match &facts.device {
                DeviceFacts::Luks2(luks) => !luks.passphrase_keyslots.is_empty(),
                DeviceFacts::PlainExt4 => false,
            };
            // The recovery keyslot is escrowed and added before the last passphrase goes. Not
            // when the volume key is still to be replaced: the re-encryption would drop it (a
            // keyslot of the old key) and its key is never kept to re-wrap; it is enrolled once
            // the key is final (the image passphrase it would back up is public anyway).
            if passphrases_left && recovery_missing(facts) && !facts.reencrypt_required() {
                early_step(Step::EnrollRecovery)
            } else if passphrases_left {
                early_step(Step::WipePassphrase)
            } else {
                early_step(Step::InitReencrypt)
            }
        }
        ProvisioningState::Reencrypting => match stage {
            // Re-encryption set up during this boot belongs to the userspace service; one left
            // over from an earlier boot is finished here, blocking, as the reference does.
            Stage::Initramfs if facts.journal.reencrypt_initialised_this_boot => Action::Done,
            // Finishing in the background (the option the reference lacks): the initramfs only
            // makes the volume safe to activate.
            Stage::Initramfs if facts.policy.resume == ResumePolicy::Background => {
                if matches!(&facts.device, DeviceFacts::Luks2(l) if l.reencrypt_needs_repair) {
                    Action::Run(Step::RecoverReencrypt)
                } else {
                    Action::Done
                }
            }
            _ => Action::Run(Step::Reencrypt),
        },
        // Before the header backup, so that the backup holds the recovery keyslot too.
        ProvisioningState::Complete if recovery_missing(facts) => Action::Run(Step::EnrollRecovery),
        ProvisioningState::Complete if late => Action::Run(Step::BackupHeader),
        ProvisioningState::HeaderBackedUp
            if late && facts.mapping_active && !facts.journal.filesystem_grown =>
        {
            Action::Run(Step::GrowFilesystem)
        }
        ProvisioningState::Complete | ProvisioningState::HeaderBackedUp => Action::Done,
    }
}

/// A recovery key is wanted and the volume has no `systemd-recovery` token yet.
fn recovery_missing(facts: &Facts) -> bool {
    facts.policy.recovery && matches!(&facts.device, DeviceFacts::Luks2(l) if !l.recovery_token)
}
