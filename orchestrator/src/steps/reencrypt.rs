//! `init-reencrypt` and `reencrypt`: replace the volume key that came from the image.

use std::sync::atomic::Ordering;

use anyhow::{anyhow, bail};
use cryptfs_journal::Journal;
use cryptfs_states::{Stage, Step, VolumeKeyOrigin};
use serde_json::Value;

use super::StepContext;
use crate::failpoint;
use crate::kek::SealedKek;
use crate::luks::metadata::Luks2Metadata;
use crate::luks::{device, finalize, marker, reencrypt as luks_reencrypt};
use crate::probe::{self, Content};
use crate::record::{self, keys};
use crate::secret::Passphrase;

fn active_name(ctx: &StepContext<'_>) -> Option<String> {
    let name = ctx.config.mapping_name.as_deref();
    probe::mapping_active(name)
        .then(|| name.map(String::from))
        .flatten()
}

/// Keyslots a volume-key change destroys: every keyslot bound to the current volume key (the
/// data segment's digest) except `kek_keyslot`, which gets a successor for the new key. When
/// the re-encryption completes libcryptsetup drops the old key's keyslots; the tokens naming
/// them stay, naming none (design/README.md: known limits). Returned with their tokens' types.
pub fn keyslots_lost_by_volume_key_change(
    meta: &Luks2Metadata,
    kek_keyslot: u32,
) -> Vec<(u32, Vec<String>)> {
    let bound: Vec<u32> = meta
        .json
        .get("digests")
        .and_then(Value::as_object)
        .into_iter()
        .flat_map(|digests| digests.values())
        .filter(|d| {
            d.get("segments")
                .and_then(Value::as_array)
                .is_some_and(|s| s.iter().any(|x| x.as_str() == Some("0")))
        })
        .filter_map(|d| d.get("keyslots").and_then(Value::as_array))
        .flatten()
        .filter_map(|k| k.as_str()?.parse().ok())
        .collect();
    bound
        .into_iter()
        .filter(|slot| *slot != kek_keyslot)
        .map(|slot| {
            let tokens = meta
                .tokens_of(slot)
                .map(|(id, t)| format!("token {id} ({})", t.kind))
                .collect();
            (slot, tokens)
        })
        .collect()
}

/// Marks the header for re-encryption with a new volume key.
pub fn init(ctx: &mut StepContext<'_>, meta: &Luks2Metadata) -> crate::Result<()> {
    // The volume keeps its sector size through the key change (checked before any write).
    let sector_size = meta.segment_sector_size().ok_or_else(|| {
        anyhow!(
            "{}: the data segment's sector size is not 512 or 4096 (or its segments disagree); \
             refusing to replace the volume key",
            ctx.config.device.display()
        )
    })?;
    let (keyslot, passphrase) = super::unlock_with_token(ctx, meta)?;
    let lost = keyslots_lost_by_volume_key_change(meta, keyslot);
    if !lost.is_empty() {
        let described: Vec<String> = lost
            .iter()
            .map(|(slot, tokens)| match tokens.as_slice() {
                [] => format!("keyslot {slot}"),
                t => format!("keyslot {slot} (used by {})", t.join(", ")),
            })
            .collect();
        tracing::warn!(
            "replacing the volume key destroys {}: those keyslots hold the image's key only, \
             so they stop unlocking now (during the re-encryption activation needs both keys) \
             and libcryptsetup drops them when it completes; their tokens are kept but will \
             name no keyslot. Enroll them again afterwards (e.g. systemd-cryptenroll)",
            described.join(", ")
        );
        ctx.rec.note(
            Step::InitReencrypt.name(),
            Some(ctx.state),
            Journal::details([
                (
                    "keyslots_lost_at_reencryption",
                    Value::from(lost.iter().map(|(s, _)| *s).collect::<Vec<_>>()),
                ),
                (
                    "tokens_left_without_keyslot",
                    Value::from(lost.iter().flat_map(|(_, t)| t.clone()).collect::<Vec<_>>()),
                ),
            ]),
        )?;
    }
    ctx.rec.intent(
        Step::InitReencrypt,
        ctx.state,
        Journal::details([
            (keys::KEYSLOT, Value::from(keyslot)),
            ("sector_size", Value::from(sector_size)),
        ]),
    )?;
    failpoint::hit("init-reencrypt:after-intent");
    let new_keyslot = luks_reencrypt::init_volume_key_change(
        &ctx.config.device,
        &passphrase,
        keyslot,
        ctx.config.reencrypt.hotzone_size,
        sector_size,
    )?;
    failpoint::hit("init-reencrypt:after-init");
    ctx.rec.done(
        Step::InitReencrypt,
        ctx.state,
        Journal::details([("new_keyslot", Value::from(new_keyslot))]),
    )?;
    Ok(())
}

/// Runs (or resumes) the volume-key replacement to its end.
pub fn run(ctx: &mut StepContext<'_>, meta: &Luks2Metadata) -> crate::Result<()> {
    let dev = ctx.config.device.clone();
    let active = active_name(ctx);
    if active.is_none() {
        if let Some(why) = probe::in_use(&dev)? {
            bail!(
                "{} is {why}: offline re-encryption would corrupt it; run the userspace stage \
                 with the volume active as {:?}",
                dev.display(),
                ctx.config.mapping_name
            );
        }
    }
    if record::pending(ctx.rec.journal(), Step::Reencrypt).is_none() {
        ctx.rec.intent(
            Step::Reencrypt,
            ctx.state,
            Journal::details([("online", Value::from(active.is_some()))]),
        )?;
    } else {
        tracing::info!("resuming an interrupted re-encryption");
    }
    // Before any unlock: in the "stuck" window the old keyslot is already wiped, so nothing
    // would open, yet every byte is under the new key.
    if !finalize_if_all_data_final(ctx, Step::Reencrypt)? {
        let (_, passphrase) = super::unlock_with_token(ctx, meta)?;
        drive(
            ctx,
            luks_reencrypt::Kind::Reencrypt,
            active.as_deref(),
            &passphrase,
        )?;
    }
    finish(ctx)
}

/// The tail of a finished volume-key change: the token names the new keyslot, the metadata
/// records the key's origin, the journal closes the step.
fn finish(ctx: &mut StepContext<'_>) -> crate::Result<()> {
    let current = crate::probe::luks2(&ctx.config.device, "after re-encryption")?;
    let (_, passphrase) = super::unlock_with_token(ctx, &current)?;
    reassign_token(ctx, &passphrase)?;
    mark_reencrypted(ctx)?;
    if record::pending(ctx.rec.journal(), Step::Reencrypt).is_none() {
        ctx.rec.intent(
            Step::Reencrypt,
            ctx.state,
            Journal::details([("finished_by", Value::from("crash-recovery"))]),
        )?;
    }
    ctx.rec.done(
        Step::Reencrypt,
        ctx.state,
        Journal::details([(
            keys::VOLUME_KEY_ORIGIN,
            serde_json::to_value(VolumeKeyOrigin::Reencrypted)?,
        )]),
    )?;
    Ok(())
}

/// Repairs what a crash left of a volume-key change without running it further (background
/// resume policy): finalises the metadata in windows A/B, or recovers the hotzone that was in
/// flight. The volume can then be activated and the rest runs in the userspace service.
pub fn recover(ctx: &mut StepContext<'_>, meta: &Luks2Metadata) -> crate::Result<()> {
    let dev = ctx.config.device.clone();
    if let Some(why) = probe::in_use(&dev)? {
        bail!(
            "{} is {why}: crash recovery must run before activation",
            dev.display()
        );
    }
    ctx.rec
        .intent(Step::RecoverReencrypt, ctx.state, Journal::details([]))?;
    if !finalize_if_all_data_final(ctx, Step::Reencrypt)? {
        let (_, passphrase) = super::unlock_with_token(ctx, meta)?;
        luks_reencrypt::recover_if_crashed(
            &dev,
            luks_reencrypt::Kind::Reencrypt,
            None,
            &passphrase,
            ctx.config.reencrypt.hotzone_size,
        )?;
        // Recovering the last hotzone can leave every byte on the final key.
        finalize_if_all_data_final(ctx, Step::Reencrypt)?;
    }
    let finished = crate::probe::luks2(&dev, "after crash recovery")?
        .reencrypt_mode()
        .is_none();
    ctx.rec.done(
        Step::RecoverReencrypt,
        ctx.state,
        Journal::details([("finished", Value::from(finished))]),
    )?;
    if finished {
        finish(ctx)?;
    }
    Ok(())
}

/// After re-encryption the new volume key lives in a new keyslot for the same passphrase; make
/// sure the KEK token names a keyslot that exists.
fn reassign_token(ctx: &mut StepContext<'_>, passphrase: &Passphrase) -> crate::Result<()> {
    let dev = ctx.config.device.clone();
    let meta = crate::probe::luks2(&dev, "after re-encryption")?;
    if !crate::token_unlock::usable_tokens(ctx.kek, &meta).is_empty() {
        return Ok(());
    }
    let slot = device::test_passphrase(&dev, None, passphrase)?;
    let (id, token) = meta
        .tokens
        .iter()
        .find(|(_, t)| t.kind == ctx.kek.token_type())
        .ok_or_else(|| anyhow!("the KEK token vanished during re-encryption"))?;
    let sealed = SealedKek::from_token(&token.json)
        .ok_or_else(|| anyhow!("the KEK token is not a JSON object"))?;
    device::replace_token(&dev, *id, &sealed.token(ctx.kek.token_type(), slot))?;
    tracing::info!(
        token = id,
        keyslot = slot,
        "KEK token now names the new keyslot"
    );
    Ok(())
}

/// If every byte is already under the final key while the header still says "re-encrypting"
/// (crash windows A and B), finishes the metadata instead of resuming. Returns whether it did.
pub fn finalize_if_all_data_final(ctx: &mut StepContext<'_>, step: Step) -> crate::Result<bool> {
    let dev = ctx.config.device.clone();
    let meta = match probe::probe(&dev)?.content {
        Content::Luks2(meta) => meta,
        _ => return Ok(false),
    };
    if !finalize::all_data_on_final_key(&meta) {
        return Ok(false);
    }
    match record::last_progress(ctx.rec.journal(), step) {
        Some((done, total)) if done + 2 * ctx.config.reencrypt.hotzone_size < total => {
            tracing::warn!(
                done,
                total,
                "journal progress lags the metadata; the metadata's segments decide"
            );
        }
        _ => {}
    }
    tracing::warn!(
        %step,
        "all data is under the final key but the metadata was never finalised (crash window): \
         finishing the metadata instead of resuming"
    );
    ctx.rec.substep(step, "finalize-metadata")?;
    // Only the volume-key change runs online; its mapping is the one holder allowed.
    let online = (step == Step::Reencrypt)
        .then(|| active_name(ctx))
        .flatten();
    finalize::finalize(&dev, online.as_deref())?;
    ctx.rec.substep(step, "metadata-finalized")?;
    Ok(true)
}

/// Records in the metadata that the volume key is now device-made (idempotent).
fn mark_reencrypted(ctx: &mut StepContext<'_>) -> crate::Result<()> {
    let dev = ctx.config.device.clone();
    let meta = crate::probe::luks2(&dev, "after re-encryption")?;
    if marker::origin(&meta) == Some(VolumeKeyOrigin::Reencrypted) {
        return Ok(());
    }
    let digest = meta
        .segment_digest()
        .ok_or_else(|| anyhow!("no volume key digest after re-encryption"))?;
    let token = marker::token(VolumeKeyOrigin::Reencrypted, digest);
    match marker::find(&meta) {
        Some(id) => device::replace_token(&dev, id, &token),
        None => device::add_token(&dev, &token).map(|_| ()),
    }
}

/// Drives a re-encryption (either kind) to its end, every progress update through
/// [`crate::progress::Progress`]. Stops cleanly between hotzones when asked to.
pub fn drive(
    ctx: &mut StepContext<'_>,
    kind: luks_reencrypt::Kind,
    active: Option<&str>,
    passphrase: &Passphrase,
) -> crate::Result<()> {
    let step = match kind {
        luks_reencrypt::Kind::Encrypt => Step::EncryptInPlace,
        luks_reencrypt::Kind::Reencrypt => Step::Reencrypt,
    };
    let dev = ctx.config.device.clone();
    let hotzone = ctx.config.reencrypt.hotzone_size;
    if luks_reencrypt::recover_if_crashed(&dev, kind, active, passphrase, hotzone)? {
        // Recovery of the last hotzone can finish the whole job, or leave all data under the
        // final key with the metadata unfinished: in neither case may a resume follow.
        let finished = crate::probe::luks2(&dev, "after crash recovery")?
            .reencrypt_mode()
            .is_none();
        if finished {
            tracing::info!(%step, "crash recovery completed the re-encryption");
            return Ok(());
        }
    }
    if finalize_if_all_data_final(ctx, step)? {
        return Ok(());
    }
    let stop = ctx.stop.clone();
    let rec = &mut *ctx.rec;
    let mut journal_error = None;
    let mut progress = crate::progress::Progress::new(step);
    let mut report = |done: u64, total: u64| -> bool {
        if let Err(e) = progress.update(rec, done, total) {
            journal_error = Some(e);
            return false;
        }
        if done > 0 && done < total {
            failpoint::hit(&format!("{step}:mid"));
        }
        !stop.load(Ordering::SeqCst)
    };
    luks_reencrypt::resume(&dev, kind, active, passphrase, hotzone, &mut report)?;
    if let Some(e) = journal_error {
        return Err(e.context("could not journal progress; stopped between hotzones"));
    }
    let meta = crate::probe::luks2(&dev, "during re-encryption")?;
    if meta.reencrypt_mode().is_some() {
        if ctx.stop.load(Ordering::SeqCst) {
            return Err(crate::StoppedOnRequest { step }.into());
        }
        bail!("{step} ended but the header still requires re-encryption");
    }
    if ctx.stage == Stage::Initramfs {
        tracing::info!(%step, "finished in the initramfs (blocking)");
    }
    Ok(())
}
