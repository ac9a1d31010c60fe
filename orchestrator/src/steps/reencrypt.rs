//! `init-reencrypt` and `reencrypt`: replace the volume key that came from the image.

use std::sync::atomic::Ordering;

use anyhow::{anyhow, bail};
use cryptfs_journal::Journal;
use cryptfs_states::{Stage, Step, VolumeKeyOrigin};
use serde_json::Value;

use super::StepContext;
use crate::config;
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
        ctx.config.reencrypt.hotzone(),
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
        recover_hotzone(
            ctx,
            Step::Reencrypt,
            luks_reencrypt::Kind::Reencrypt,
            None,
            &passphrase,
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

/// Runs libcryptsetup's crash recovery of the hotzone in flight, if the header says there is
/// one, and journals how long it took (the figure `[reencrypt] max_recovery` bounds).
fn recover_hotzone(
    ctx: &mut StepContext<'_>,
    step: Step,
    kind: luks_reencrypt::Kind,
    active: Option<&str>,
    passphrase: &Passphrase,
) -> crate::Result<bool> {
    let dev = ctx.config.device.clone();
    let started = std::time::Instant::now();
    let hotzone = run_hotzone(ctx, kind);
    let recovered = luks_reencrypt::recover_if_crashed(&dev, kind, active, passphrase, hotzone)?;
    if recovered {
        let millis = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        tracing::info!(%step, recovery_ms = millis, "hotzone recovered after a crash");
        ctx.rec.substep_named(
            step.name(),
            "hotzone-recovered",
            Journal::details([(keys::RECOVERY_MS, Value::from(millis))]),
        )?;
    }
    Ok(recovered)
}

/// The hotzone this run of `kind` uses: the configured one, or for a volume-key change the
/// size a recovery budget chose earlier in the same run (journaled as `hotzone-sized`).
fn run_hotzone(ctx: &StepContext<'_>, kind: luks_reencrypt::Kind) -> luks_reencrypt::Hotzone {
    let mut hotzone = ctx.config.reencrypt.hotzone();
    if kind == luks_reencrypt::Kind::Reencrypt && ctx.config.reencrypt.max_recovery.is_some() {
        if let Some(bytes) = record::pending(ctx.rec.journal(), Step::Reencrypt)
            .into_iter()
            .flatten()
            .rev()
            .filter(|r| r.body.detail_str(keys::SUBSTEP) == Some("hotzone-sized"))
            .find_map(|r| r.body.details.get(keys::HOTZONE_BYTES)?.as_u64())
            .filter(|b| *b >= config::MIN_HOTZONE && b.is_multiple_of(512))
        {
            hotzone.bytes = bytes.min(config::MAX_HOTZONE);
        }
    }
    hotzone
}

/// How many times a hotzone's share of the run its crash recovery takes, per mille, by
/// resilience mode: measured by `cargo xtask bench --recovery` (design/results/
/// bench-recovery.md), rounded up.
fn recovery_cost_permille(resilience: luks_reencrypt::Resilience) -> u64 {
    match resilience {
        luks_reencrypt::Resilience::Checksum => RECOVERY_COST_CHECKSUM_PERMILLE,
        luks_reencrypt::Resilience::Journal => RECOVERY_COST_JOURNAL_PERMILLE,
    }
}

/// See [`recovery_cost_permille`]. Row 4 (host, tmpfs) measured 2.8 at a 4 MiB hotzone, 1.9 at
/// 8 MiB, 1.4 at 32 MiB, and 10.0 at 1 MiB where the recovery's fixed part (header load and
/// write, about 15 ms) dominates: the 4 MiB figure, rounded up, covers every size a budget of a
/// second or more picks at the VM's rate (5-8 MiB/s) or faster.
const RECOVERY_COST_CHECKSUM_PERMILLE: u64 = 3000;
/// See [`recovery_cost_permille`]. Row 4: 2.0 at 4 MiB, 1.7 at 8 MiB, 1.0-1.3 at the 15.5 MiB
/// cap of the keyslot area, 6.1 at 1 MiB (the fixed part again).
const RECOVERY_COST_JOURNAL_PERMILLE: u64 = 2000;

/// Drives a re-encryption (either kind) to its end, every progress update through
/// [`crate::progress::Progress`]. Stops cleanly between hotzones when asked to. With a
/// recovery budget (`[reencrypt] max_recovery`), a volume-key change measures its rate over
/// its first hotzones and, when the budget calls for another size, stops between hotzones,
/// journals the new size and resumes with it (once per run).
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
    if recover_hotzone(ctx, step, kind, active, passphrase)? {
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
    let mut hotzone = run_hotzone(ctx, kind);
    // A size chosen earlier in this run is kept: one measurement per run.
    let mut budget = (kind == luks_reencrypt::Kind::Reencrypt
        && hotzone.bytes == ctx.config.reencrypt.hotzone_size)
        .then_some(ctx.config.reencrypt.max_recovery)
        .flatten()
        .map(|max| cryptfs_states::hotzone::Budget {
            budget_micros: u64::try_from(max.as_micros()).unwrap_or(u64::MAX),
            recovery_cost_permille: recovery_cost_permille(hotzone.resilience),
            min_bytes: config::MIN_HOTZONE,
            max_bytes: config::MAX_HOTZONE,
        });
    let mut progress = crate::progress::Progress::new(step);
    loop {
        let stop = ctx.stop.clone();
        let rec = &mut *ctx.rec;
        let mut journal_error = None;
        let mut resize = None;
        // The rate is measured from the first report on: the first hotzone also paid for the
        // keyslot unlock.
        let mut first_report: Option<(std::time::Instant, u64)> = None;
        let current = hotzone.bytes;
        let mut report = |done: u64, total: u64| -> bool {
            if let Err(e) = progress.update(rec, done, total) {
                journal_error = Some(e);
                return false;
            }
            if done > 0 && done < total {
                failpoint::hit(&format!("{step}:mid"));
            }
            if let (Some(b), true) = (&budget, done < total) {
                let (since, from) = *first_report.get_or_insert((std::time::Instant::now(), done));
                let micros = u64::try_from(since.elapsed().as_micros()).unwrap_or(u64::MAX);
                let bytes = done.saturating_sub(from);
                match cryptfs_states::hotzone::size_for_budget(b, current, bytes, micros) {
                    cryptfs_states::hotzone::Sizing::Measuring => {}
                    cryptfs_states::hotzone::Sizing::Keep => budget = None,
                    cryptfs_states::hotzone::Sizing::Resize(to) => {
                        resize = Some((to, bytes, micros));
                        return false;
                    }
                }
            }
            !stop.load(Ordering::SeqCst)
        };
        luks_reencrypt::resume(&dev, kind, active, passphrase, hotzone, &mut report)?;
        if let Some(e) = journal_error {
            return Err(e.context("could not journal progress; stopped between hotzones"));
        }
        let Some((to, bytes, micros)) = resize else {
            break;
        };
        let mib_s = bytes as f64 / 1_048_576.0 / (micros.max(1) as f64 / 1e6);
        tracing::info!(
            %step,
            from = hotzone.bytes,
            to,
            measured_mib_s = mib_s,
            "hotzone sized from the recovery budget"
        );
        ctx.rec.substep_named(
            step.name(),
            "hotzone-sized",
            Journal::details([
                (keys::HOTZONE_BYTES, Value::from(to)),
                ("measured_bytes", Value::from(bytes)),
                ("measured_ms", Value::from(micros / 1000)),
            ]),
        )?;
        failpoint::hit("reencrypt:after-hotzone-sized");
        hotzone.bytes = to;
        budget = None;
        if ctx.stop.load(Ordering::SeqCst) {
            break;
        }
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
