//! `encrypt-in-place`: plain ext4 → LUKS2 with a data shift, KEK keyslot and token included.
//!
//! Sub-steps, each journaled once durable (see design/steps.md for the crash analysis):
//! `shrunk` → `prepared` (temporary header made, first 16 MiB copied to the tail, device
//! flushed) → `header-placed` → data encrypted → `done`.

use std::path::Path;

use anyhow::{anyhow, bail, Context};
use cryptfs_journal::Journal;
use cryptfs_states::{Step, VolumeKeyOrigin};
use serde_json::Value;

use super::StepContext;
use crate::cmd;
use crate::ext4::Ext4Facts;
use crate::failpoint;
use crate::luks::{device, reencrypt, REDUCE_DEVICE_BYTES};
use crate::probe::{Content, Probe};
use crate::record::{self, keys};

const STEP: Step = Step::EncryptInPlace;
/// Intent detail: the primary superblock (hex) as it was when the filesystem checked clean,
/// before anything of the shrink ran. Not a secret: ext4 metadata.
const SUPERBLOCK_BEFORE: &str = "superblock_before";

/// Runs or resumes in-place encryption.
pub fn run(ctx: &mut StepContext<'_>, probe: &Probe) -> crate::Result<()> {
    match &probe.content {
        Content::PlainExt4(fs) => {
            if record::pending(ctx.rec.journal(), STEP).is_some() {
                // Length first: resize2fs may have truncated an image file before the crash.
                let size_bytes = restore_journaled_length(ctx, probe.size_bytes)?;
                let repaired = repair_interrupted_shrink(ctx, fs)?;
                return start(ctx, &repaired, size_bytes);
            }
            start(ctx, fs, probe.size_bytes)
        }
        Content::Luks2(meta) if meta.reencrypt_mode() == Some("encrypt") => finish(ctx),
        _ => bail!("in-place encryption needs a plain ext4 filesystem"),
    }
}

/// Whether a crash hit while the header was being placed: the temporary header is complete and
/// the moved data is durable, but the device's head may be neither ext4 nor valid LUKS2.
pub fn header_placement_interrupted(ctx: &StepContext<'_>) -> bool {
    record::reached(ctx.rec.journal(), STEP, "prepared") && ctx.config.temp_header_path().exists()
}

/// Places the prepared header again (idempotent: it is the same header) and finishes.
pub fn redo_header_placement(ctx: &mut StepContext<'_>) -> crate::Result<()> {
    tracing::warn!("header placement was interrupted; placing the prepared header again");
    place_header_and_finish(ctx)
}

/// Repairs the filesystem after our own shrink was interrupted, possibly losing unflushed
/// writes; returns the superblock as it reads afterwards.
///
/// resize2fs is not crash-safe under lost writes: libext2fs rewrites only the changed ranges of
/// the primary superblock, so a lost range leaves it torn (checksum mismatch). e2fsck falls
/// back to a backup superblock by itself, but a filesystem of one block group has none: then
/// the superblock saved in the journaled intent (the filesystem as `e2fsck -n` found it clean)
/// goes back first. Nothing but our shrink wrote here since the intent, so every repair e2fsck
/// offers is ours to accept.
fn repair_interrupted_shrink(ctx: &StepContext<'_>, fs: &Ext4Facts) -> crate::Result<Ext4Facts> {
    let dev = &ctx.config.device;
    let dev_str = dev.display().to_string();
    tracing::warn!("resuming an interrupted shrink: repairing the filesystem first (e2fsck -y)");
    let first = cmd::run_any("e2fsck", &["-y", "-f", &dev_str])?;
    // 0: clean, 1/2: errors corrected; anything else: it could not (or would not) open it.
    if !matches!(first.code, Some(0..=2)) {
        let saved = record::pending(ctx.rec.journal(), STEP)
            .and_then(|recs| recs.first())
            .and_then(|r| r.body.detail_str(SUPERBLOCK_BEFORE))
            .and_then(|h| hex::decode(h).ok())
            .ok_or_else(|| {
                anyhow!(
                    "the filesystem on {dev_str} is damaged after an interrupted shrink and the \
                     journal holds no saved superblock: {}",
                    first.stderr.lines().last().unwrap_or("").trim()
                )
            })?;
        tracing::warn!(
            block_size = fs.block_size,
            "primary superblock unusable ({}); putting back the one saved before the shrink",
            first.stderr.lines().last().unwrap_or("").trim()
        );
        crate::ext4::write_superblock_bytes(dev, &saved)?;
        cmd::run("e2fsck", &["-y", "-f", &dev_str], &[0, 1, 2])?;
    }
    crate::ext4::read_superblock(dev)?
        .ok_or_else(|| anyhow!("{dev_str} holds no ext4 filesystem after the repair"))
}

fn resize2fs_minimum_blocks(device: &Path) -> crate::Result<u64> {
    let out = cmd::run("resize2fs", &["-P", &device.display().to_string()], &[0])?;
    out.stdout
        .lines()
        .find_map(|l| l.strip_prefix("Estimated minimum size of the filesystem:"))
        .and_then(|n| n.trim().parse().ok())
        .ok_or_else(|| anyhow!("cannot read resize2fs -P output: {}", out.stdout.trim()))
}

/// resize2fs truncates an image *file* to the new filesystem size; the LUKS2 header and the data
/// shift need the device's original length back (a block device keeps its size anyway).
pub fn restore_image_length(dev: &Path, size_bytes: u64) -> crate::Result<()> {
    let meta = std::fs::metadata(dev)?;
    if meta.is_file() && meta.len() < size_bytes {
        let file = std::fs::OpenOptions::new().write(true).open(dev)?;
        file.set_len(size_bytes)?;
        file.sync_all()?;
    }
    Ok(())
}

/// A crash between resize2fs and the length restore leaves an image file shorter than the
/// device was: the journal remembers the original length. Returns the device's length.
fn restore_journaled_length(ctx: &StepContext<'_>, size_bytes: u64) -> crate::Result<u64> {
    let journaled_bytes = record::pending(ctx.rec.journal(), STEP)
        .and_then(|recs| recs.first())
        .and_then(|r| r.body.details.get("device_bytes"))
        .and_then(Value::as_u64);
    match journaled_bytes {
        Some(original) if original > size_bytes => {
            restore_image_length(&ctx.config.device, original)?;
            Ok(original)
        }
        _ => Ok(size_bytes),
    }
}

/// The last check before the first header byte is written: the filesystem must end at least
/// 32 MiB before the end of the device, or the data shift would cut its tail off.
fn ensure_room_for_header(dev: &Path, size_bytes: u64) -> crate::Result<()> {
    let fs = crate::ext4::read_superblock(dev)?
        .ok_or_else(|| anyhow!("{} no longer holds ext4 after the shrink", dev.display()))?;
    let now = crate::probe::probe(dev)?.size_bytes;
    if now != size_bytes || fs.size_bytes() + REDUCE_DEVICE_BYTES > now {
        bail!(
            "refusing to encrypt {}: filesystem {} bytes, device {} bytes (expected {}); the \
             LUKS2 header needs 32 MiB after the filesystem",
            dev.display(),
            fs.size_bytes(),
            now,
            size_bytes
        );
    }
    Ok(())
}

/// A temporary header already at its path is ours only when this step's intent is journaled
/// (a resumed run whose prepare was cut short: it goes, and is made afresh). Anything else is
/// foreign (another tool, a stale copy from another journal, a planted file) and is refused
/// before any write: it may be the only copy of someone's keyslot, and it is not ours to use.
fn check_stale_temp_header(ctx: &StepContext<'_>) -> crate::Result<()> {
    let temp_header = ctx.config.temp_header_path();
    let Ok(meta) = std::fs::symlink_metadata(&temp_header) else {
        return Ok(());
    };
    if record::pending(ctx.rec.journal(), STEP).is_none() {
        bail!(
            "refusing to encrypt {}: {} already exists and the journal has no in-place \
             encryption in progress, so it is not this run's temporary header; inspect it \
             (`cryptsetup luksDump {}`) and move it away if it is not needed",
            ctx.config.device.display(),
            temp_header.display(),
            temp_header.display()
        );
    }
    if !meta.is_file() {
        bail!(
            "{} is not a regular file: refusing to use or remove it",
            temp_header.display()
        );
    }
    Ok(())
}

/// Every check of in-place encryption that needs no key and writes nothing: the device can lose
/// 32 MiB, the filesystem fits it, is clean (`e2fsck -n`) and can shrink enough. Returns the
/// block count the filesystem is shrunk to. Shared with `cryptfs image encrypt`.
pub fn check_shrinkable(dev: &Path, fs: &Ext4Facts, size_bytes: u64) -> crate::Result<u64> {
    let dev_str = dev.display().to_string();
    let target_bytes = size_bytes
        .checked_sub(REDUCE_DEVICE_BYTES)
        .filter(|b| *b >= 64 * 1024 * 1024)
        .ok_or_else(|| {
            anyhow!("{dev_str} is too small to encrypt in place (needs 96 MiB at least)")
        })?;
    let target_blocks = target_bytes / fs.block_size;
    if fs.size_bytes() > size_bytes {
        bail!("the filesystem on {dev_str} is larger than the device: refusing to touch it");
    }
    let check = cmd::run_any("e2fsck", &["-n", "-f", &dev_str])?;
    if check.code != Some(0) {
        bail!(
            "the filesystem on {dev_str} has errors (e2fsck -n exit {:?}); repair it with \
             `e2fsck -f {dev_str}` before encryption: {}",
            check.code,
            check.stdout.lines().last().unwrap_or("")
        );
    }
    if fs.blocks > target_blocks {
        let minimum = resize2fs_minimum_blocks(dev)?;
        if minimum > target_blocks {
            let short_mib = (minimum - target_blocks) * fs.block_size / (1024 * 1024) + 1;
            bail!(
                "the filesystem on {dev_str} is too full to shrink by 32 MiB for the LUKS2 \
                 header: it needs {minimum} blocks, {target_blocks} would remain; free at \
                 least {short_mib} MiB and retry"
            );
        }
    }
    Ok(target_blocks)
}

/// The encryption sector size for `fs` on a device of `size_bytes` (checked, writes nothing):
/// `wanted` resolved against the filesystem's block size, and the device's length and the
/// hotzone whole multiples of it (dm-crypt maps whole sectors only; a tail that is not one
/// would be cut off the filesystem). Shared with `cryptfs image encrypt`.
pub fn check_sector_size(
    dev: &Path,
    fs: &Ext4Facts,
    size_bytes: u64,
    hotzone_bytes: u64,
    wanted: crate::config::SectorSize,
) -> crate::Result<u32> {
    let sector_size = wanted
        .resolve(fs.block_size)
        .with_context(|| format!("refusing to encrypt {}", dev.display()))?;
    let sector = u64::from(sector_size);
    if !size_bytes.is_multiple_of(sector) {
        bail!(
            "refusing to encrypt {} with {sector_size}-byte sectors: its length ({size_bytes} \
             bytes) is not a multiple of the sector size; use sector_size = 512",
            dev.display()
        );
    }
    if !hotzone_bytes.is_multiple_of(sector) {
        bail!(
            "reencrypt.hotzone_size ({hotzone_bytes} bytes) is not a multiple of the \
             {sector_size}-byte sector size"
        );
    }
    Ok(sector_size)
}

/// The shrink itself: `e2fsck -p`, `resize2fs` to `target_blocks` (when needed), the device's
/// length back (an image file) and the last check that 32 MiB are free after the filesystem.
/// Shared with `cryptfs image encrypt`.
pub fn shrink(
    dev: &Path,
    fs: &Ext4Facts,
    target_blocks: u64,
    size_bytes: u64,
) -> crate::Result<()> {
    let dev_str = dev.display().to_string();
    cmd::run("e2fsck", &["-p", "-f", &dev_str], &[0, 1])?;
    if fs.blocks > target_blocks {
        tracing::info!(
            from = fs.blocks,
            to = target_blocks,
            "shrinking the filesystem"
        );
        cmd::run("resize2fs", &[&dev_str, &target_blocks.to_string()], &[0])?;
    }
    restore_image_length(dev, size_bytes)?;
    ensure_room_for_header(dev, size_bytes)
}

fn start(ctx: &mut StepContext<'_>, fs: &Ext4Facts, size_bytes: u64) -> crate::Result<()> {
    let dev = ctx.config.device.clone();
    check_stale_temp_header(ctx)?;
    let size_bytes = restore_journaled_length(ctx, size_bytes)?;
    // Preconditions, all before the first write.
    let sector_size = check_sector_size(
        &dev,
        fs,
        size_bytes,
        ctx.config.reencrypt.hotzone_size,
        ctx.config.sector_size,
    )?;
    let target_blocks = check_shrinkable(&dev, fs, size_bytes)?;
    ctx.kek.preflight()?;

    // Seal first: the sealed form is public and goes into the journal, the secret itself only
    // ever exists in memory and as the keyslot passphrase. No temporary passphrase exists.
    let superblock = crate::ext4::superblock_bytes(&dev)?;
    let (secret, sealed) = ctx.kek.seal()?;
    let uuid = uuid::Uuid::new_v4();
    ctx.rec.intent(
        STEP,
        ctx.state,
        Journal::details([
            (keys::SEALED_KEK, serde_json::to_value(&sealed)?),
            ("luks_uuid", Value::from(uuid.to_string())),
            ("filesystem_uuid", Value::from(fs.uuid.clone())),
            ("filesystem_label", Value::from(fs.label.clone())),
            ("device_bytes", Value::from(size_bytes)),
            ("sector_size", Value::from(sector_size)),
            (SUPERBLOCK_BEFORE, Value::from(hex::encode(superblock))),
        ]),
    )?;
    failpoint::hit("encrypt-in-place:after-intent");

    shrink(&dev, fs, target_blocks, size_bytes)?;
    ctx.rec.substep(STEP, "shrunk")?;
    failpoint::hit("encrypt-in-place:after-shrink");

    let temp_header = ctx.config.temp_header_path();
    if let Some(dir) = temp_header.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if temp_header.exists() {
        // Checked above: journaled as ours, from a prepare that a crash cut short.
        tracing::warn!(
            path = %temp_header.display(),
            "removing the temporary header of an interrupted prepare; it is made afresh"
        );
        std::fs::remove_file(&temp_header)
            .with_context(|| format!("cannot remove {}", temp_header.display()))?;
    }
    let token_type = ctx.kek.token_type();
    let passphrase = secret.keyslot_passphrase();
    reencrypt::prepare_in_place(
        &dev,
        &temp_header,
        &reencrypt::InPlaceHeader {
            uuid,
            label: &ctx.config.label,
            keyslot: None,
            origin: VolumeKeyOrigin::InPlace,
            pbkdf_hash: crate::luks::device::PBKDF2_TOKEN_HASH,
            sector_size,
        },
        &passphrase,
        ctx.config.reencrypt.hotzone(),
        |slot| Some(sealed.token(token_type, slot)),
    )?;
    // The first 16 MiB of plaintext now also lives at the tail. Make that copy durable before
    // the header goes over the original (window C of the crash-windows note).
    sync_path(&dev)?;
    sync_path(&temp_header)?;
    if let Some(dir) = temp_header.parent() {
        sync_path(dir)?;
    }
    ctx.rec.substep(STEP, "prepared")?;
    failpoint::hit("encrypt-in-place:after-prepare");
    place_header_and_finish(ctx)
}

fn place_header_and_finish(ctx: &mut StepContext<'_>) -> crate::Result<()> {
    let dev = ctx.config.device.clone();
    device::header_restore(&dev, &ctx.config.temp_header_path())?;
    sync_path(&dev)?;
    ctx.rec.substep(STEP, "header-placed")?;
    failpoint::hit("encrypt-in-place:after-header");
    finish(ctx)
}

fn finish(ctx: &mut StepContext<'_>) -> crate::Result<()> {
    let dev = ctx.config.device.clone();
    let meta = crate::probe::luks2(&dev, "during in-place encryption")?;
    if record::pending(ctx.rec.journal(), STEP).is_none() {
        // Resumed from the device alone (journal lost): record the intent now.
        ctx.rec.intent(
            STEP,
            ctx.state,
            Journal::details([("resumed_from", Value::from("device"))]),
        )?;
    }
    if !super::reencrypt::finalize_if_all_data_final(ctx, STEP)? {
        let (_, passphrase) = super::unlock_with_token(ctx, &meta)?;
        super::reencrypt::drive(ctx, reencrypt::Kind::Encrypt, None, &passphrase)?;
    }
    let meta = crate::probe::luks2(&dev, "during in-place encryption")?;
    let (keyslot, _) = super::unlock_with_token(ctx, &meta)?;
    let temp_header = ctx.config.temp_header_path();
    if temp_header.exists() {
        std::fs::remove_file(&temp_header)
            .with_context(|| format!("cannot remove {}", temp_header.display()))?;
        // The removal durable before the step is journaled done (a lost removal is cleaned up
        // by backup-header too: the step can also be reconciled from the device).
        if let Some(dir) = temp_header.parent() {
            sync_path(dir)?;
        }
    }
    ctx.rec.done(
        STEP,
        ctx.state,
        Journal::details([
            (
                keys::VOLUME_KEY_ORIGIN,
                serde_json::to_value(VolumeKeyOrigin::InPlace)?,
            ),
            (keys::KEYSLOT, Value::from(keyslot)),
        ]),
    )?;
    Ok(())
}

/// fsync of a file, device or directory.
pub fn sync_path(path: &Path) -> crate::Result<()> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    file.sync_all()
        .with_context(|| format!("cannot flush {}", path.display()))
}
