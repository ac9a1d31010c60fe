//! `enroll-recovery`: add a recovery keyslot (systemd's format) and its `systemd-recovery`
//! token, the key escrowed before the keyslot exists.
//!
//! Order: journal the intent with the keyslot number chosen (never the key) → generate the key
//! → escrow it (file, command) → add the keyslot at that number → write the token → prove the
//! key opens it → done. A crash or a failing escrow before the keyslot leaves nothing on the
//! device; a crash after it leaves a keyslot without a token, whose key may not have reached
//! every escrow: the resume destroys that keyslot and redoes the step with a fresh key and a
//! fresh escrow. So no crash leaves a recovery keyslot whose key was never escrowed.

use anyhow::{anyhow, bail};
use cryptfs_journal::Journal;
use cryptfs_states::{ProvisioningState, Step};
use serde_json::Value;

use super::StepContext;
use crate::failpoint;
use crate::luks::device;
use crate::luks::metadata::Luks2Metadata;
use crate::record::{self, keys, Recorder};
use crate::recovery;

const STEP: Step = Step::EnrollRecovery;

/// LUKS2 has at most 32 keyslots.
const MAX_KEYSLOTS: u32 = 32;

/// The keyslot an open `enroll-recovery` intent chose, if any.
pub fn pending_keyslot(journal: &Journal) -> Option<u32> {
    record::pending_keyslot(journal.records(), STEP.name())
}

/// Keyslots named by a `systemd-recovery` token that exist.
pub fn recovery_keyslots(meta: &Luks2Metadata) -> Vec<u32> {
    meta.tokens
        .values()
        .filter(|t| t.kind == recovery::TOKEN_TYPE)
        .flat_map(|t| t.keyslots.iter().copied())
        .filter(|s| meta.keyslots.contains_key(s))
        .collect()
}

/// Enrolls (or redoes an interrupted enrollment of) the recovery key.
pub fn run(ctx: &mut StepContext<'_>, meta: &Luks2Metadata) -> crate::Result<()> {
    let dev = ctx.config.device.clone();
    let escrow = ctx.config.recovery.escrow();
    if escrow.kinds().is_empty() {
        bail!("[recovery] is enabled but has neither escrow_file nor escrow_command");
    }
    // The KEK opens the volume key for the new keyslot; prove it before touching anything.
    let (kek_keyslot, kek_passphrase) = super::unlock_with_token(ctx, meta)?;
    let mut meta = Box::new(meta.clone());
    if let Some(slot) = pending_keyslot(ctx.rec.journal()) {
        let orphan = meta.keyslots.contains_key(&slot)
            && meta.tokens_of(slot).next().is_none()
            && slot != kek_keyslot;
        if orphan {
            tracing::warn!(
                keyslot = slot,
                "an interrupted recovery enrollment left a keyslot without its token; its key \
                 may not have been escrowed everywhere: destroying it and starting over"
            );
            device::destroy_keyslot(&dev, slot)?;
            meta = crate::probe::luks2(&dev, "after removing the interrupted recovery keyslot")?;
        }
    }
    let keyslot = (0..MAX_KEYSLOTS)
        .find(|s| !meta.keyslots.contains_key(s))
        .ok_or_else(|| anyhow!("{} has no free keyslot for a recovery key", dev.display()))?;
    let kinds: Vec<Value> = escrow.kinds().into_iter().map(Value::from).collect();
    ctx.rec.intent(
        STEP,
        ctx.state,
        Journal::details([
            (keys::KEYSLOT, Value::from(keyslot)),
            ("escrow", Value::from(kinds.clone())),
        ]),
    )?;
    failpoint::hit("enroll-recovery:after-intent");
    let key = recovery::generate();
    escrow.escrow(&key)?;
    failpoint::hit("enroll-recovery:after-escrow");
    device::add_keyslot_at(&dev, keyslot, &kek_passphrase, &key)?;
    failpoint::hit("enroll-recovery:after-keyslot");
    device::add_token(&dev, &recovery::token(keyslot))?;
    failpoint::hit("enroll-recovery:after-token");
    let opened = device::test_passphrase(&dev, Some(keyslot), &key)
        .map_err(|e| anyhow!("the recovery key does not open its new keyslot {keyslot}: {e}"))?;
    tracing::info!(keyslot = opened, "recovery key escrowed and enrolled");
    ctx.rec.done(
        STEP,
        ctx.state,
        Journal::details([
            (keys::KEYSLOT, Value::from(opened)),
            ("escrow", Value::from(kinds)),
        ]),
    )?;
    Ok(())
}

/// Closes an `enroll-recovery` intent whose token the device already shows (a crash between
/// the token and `done`): the key was escrowed before the keyslot existed.
pub fn reconcile(
    rec: &mut Recorder,
    state: ProvisioningState,
    meta: &Luks2Metadata,
) -> crate::Result<bool> {
    let Some(slot) = pending_keyslot(rec.journal()) else {
        return Ok(false);
    };
    if !recovery_keyslots(meta).contains(&slot) {
        return Ok(false);
    }
    rec.done(
        STEP,
        state,
        Journal::details([
            (keys::KEYSLOT, Value::from(slot)),
            ("reconciled", Value::from("token found on the device")),
        ]),
    )?;
    Ok(true)
}
