//! One module per provisioning step. Each step:
//! 1. checks every precondition it can before writing anything (to the device or the journal);
//! 2. journals its intent durably;
//! 3. acts, idempotently: on a resume after a crash it looks at the device first and does only
//!    what is missing;
//! 4. journals `done`.

pub mod backup;
pub mod encrypt;
pub mod enroll;
pub mod grow;
pub mod recovery;
pub mod reencrypt;
pub mod wipe;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::bail;
use cryptfs_states::{ProvisioningState, Stage, Step};

use crate::config::Config;
use crate::kek::KekProtector;
use crate::luks::metadata::Luks2Metadata;
use crate::probe::{Content, Probe};
use crate::record::Recorder;
use crate::secret::Passphrase;
use crate::token_unlock;

/// What a step works with.
pub struct StepContext<'a> {
    /// The configuration.
    pub config: &'a Config,
    /// The KEK protector.
    pub kek: &'a mut dyn KekProtector,
    /// The journal writer.
    pub rec: &'a mut Recorder,
    /// Set when the service is asked to stop: long steps stop between hotzones.
    pub stop: Arc<AtomicBool>,
    /// The stage running.
    pub stage: Stage,
    /// The state derived before the step.
    pub state: ProvisioningState,
}

/// Runs `step` on the device as `probe` observed it.
pub fn run(step: Step, ctx: &mut StepContext<'_>, probe: &Probe) -> crate::Result<()> {
    match step {
        Step::EncryptInPlace => encrypt::run(ctx, probe),
        Step::EnrollKek => enroll::run(ctx, luks2(probe)?),
        Step::EnrollRecovery => recovery::run(ctx, luks2(probe)?),
        Step::WipePassphrase => wipe::run(ctx, luks2(probe)?),
        Step::InitReencrypt => reencrypt::init(ctx, luks2(probe)?),
        Step::Reencrypt => reencrypt::run(ctx, luks2(probe)?),
        Step::RecoverReencrypt => reencrypt::recover(ctx, luks2(probe)?),
        Step::BackupHeader => backup::run(ctx),
        Step::GrowFilesystem => grow::run(ctx),
    }
}

fn luks2(probe: &Probe) -> crate::Result<&Luks2Metadata> {
    match &probe.content {
        Content::Luks2(meta) => Ok(meta),
        _ => bail!("expected a LUKS2 volume"),
    }
}

/// Unseals the KEK of the volume with the first of its tokens that works and proves it opens
/// a keyslot; returns (keyslot, passphrase).
pub fn unlock_with_token(
    ctx: &mut StepContext<'_>,
    meta: &Luks2Metadata,
) -> crate::Result<(u32, Passphrase)> {
    // After the boot-phase lock the TPM cannot unseal in this boot: the userspace stage takes
    // the passphrase the initramfs handed on through the kernel keyring.
    if ctx.stage == Stage::Userspace {
        if let Some(found) = crate::boot_lock::stashed(ctx.config, meta) {
            tracing::info!("KEK passphrase taken from the kernel keyring (boot-phase lock)");
            return Ok(found);
        }
    }
    let unlocked = token_unlock::test_unlock_any(ctx.kek, meta, &ctx.config.device)?;
    Ok((unlocked.keyslot, unlocked.passphrase))
}
