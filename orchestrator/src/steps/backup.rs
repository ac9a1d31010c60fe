//! `backup-header`: `luks.bin` on the boot partition, written atomically, digest journaled.
//!
//! Taken only once the passphrase is gone and the volume key is device-unique: whoever holds
//! the backup and any secret valid at backup time can open the volume forever.
//!
//! A power cut after `luks.bin.tmp` was renamed into place but before `done` was journaled
//! leaves a `luks.bin` the journal does not vouch for. It is compared byte for byte with the
//! device's header area: equal, it is adopted (its digest journaled, nothing written); different,
//! it is replaced. The boot partition is small (32 MiB on the reference's images), so the free
//! space is checked before anything is written, and a shortage is reported as one.

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use cryptfs_journal::Journal;
use cryptfs_states::Step;
use serde_json::Value;

use super::encrypt::sync_path;
use super::StepContext;
use crate::failpoint;
use crate::luks::device;
use crate::luks::metadata::Luks2Metadata;
use crate::probe;
use crate::record::{self, keys};

const STEP: Step = Step::BackupHeader;

/// Bytes compared or hashed per read.
const CHUNK: usize = 1 << 20;

/// Size of the binary part of one LUKS2 header copy (before its JSON area).
const BINARY_HEADER: u64 = 4096;

/// Largest keyslots area libcryptsetup accepts (`LUKS2_MAX_KEYSLOTS_SIZE`, 128 MiB).
const MAX_KEYSLOTS_SIZE: u64 = 128 << 20;

/// blake3 of a file, hex.
pub fn file_blake3(path: &Path) -> crate::Result<String> {
    let mut hasher = blake3::Hasher::new();
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    hasher.update_reader(file)?;
    Ok(hasher.finalize().to_hex().to_string())
}

/// Length of the LUKS2 header area of `meta`: both header copies (binary header and JSON area)
/// followed by the keyslots area, from the device's start. This is exactly what
/// `crypt_header_backup` writes, so it is the length of a correct `luks.bin`.
pub fn header_area_len(meta: &Luks2Metadata) -> crate::Result<u64> {
    let field = |name: &str| {
        meta.json
            .pointer(&format!("/config/{name}"))
            .and_then(Value::as_str)
            .and_then(|s| s.parse::<u64>().ok())
    };
    let (Some(json_size), Some(keyslots_size)) = (field("json_size"), field("keyslots_size"))
    else {
        bail!("the LUKS2 metadata has no valid config.json_size or config.keyslots_size");
    };
    if json_size.checked_add(BINARY_HEADER) != Some(meta.hdr_size) {
        bail!(
            "the LUKS2 metadata is inconsistent: config.json_size {json_size} does not match \
             the header size {}",
            meta.hdr_size
        );
    }
    if keyslots_size % BINARY_HEADER != 0 || keyslots_size > MAX_KEYSLOTS_SIZE {
        bail!("the LUKS2 metadata has an invalid keyslots area size {keyslots_size}");
    }
    meta.hdr_size
        .checked_mul(2)
        .and_then(|copies| copies.checked_add(keyslots_size))
        .ok_or_else(|| anyhow!("the LUKS2 header area size overflows"))
}

/// blake3 of `file` if it holds exactly the first `len` bytes of `device`, byte for byte;
/// `None` if its length or any byte differs. Streams both (no copy of the area in memory).
pub fn matches_device(file: &Path, device: &Path, len: u64) -> crate::Result<Option<String>> {
    let mut f =
        std::fs::File::open(file).with_context(|| format!("cannot read {}", file.display()))?;
    if f.metadata()?.len() != len {
        return Ok(None);
    }
    let mut d =
        std::fs::File::open(device).with_context(|| format!("cannot read {}", device.display()))?;
    let mut ours = vec![0u8; CHUNK];
    let mut theirs = vec![0u8; CHUNK];
    let mut hasher = blake3::Hasher::new();
    let mut left = len;
    while left > 0 {
        let n = usize::try_from(left.min(CHUNK as u64)).unwrap_or(CHUNK);
        if f.read_exact(&mut ours[..n]).is_err() {
            // Shorter than its length said a moment ago: not a backup to trust.
            return Ok(None);
        }
        d.read_exact(&mut theirs[..n]).with_context(|| {
            format!(
                "{} is shorter than its LUKS2 header area ({len} bytes)",
                device.display()
            )
        })?;
        if ours[..n] != theirs[..n] {
            return Ok(None);
        }
        hasher.update(&ours[..n]);
        left -= n as u64;
    }
    Ok(Some(hasher.finalize().to_hex().to_string()))
}

/// What is at the backup's path before the step writes anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Existing {
    /// Nothing.
    Absent,
    /// A file holding exactly the device's header area (a backup whose `done` was lost).
    MatchesDevice {
        /// Its blake3.
        digest: String,
    },
    /// The backup the journal vouches for, of an older header.
    Verified {
        /// Bytes it occupies on the boot partition.
        allocated: u64,
    },
    /// A file nothing vouches for and that matches nothing.
    Stale {
        /// Bytes it occupies on the boot partition.
        allocated: u64,
    },
}

fn allocated(meta: &std::fs::Metadata) -> u64 {
    meta.blocks().saturating_mul(512)
}

/// Looks at `target` (read-only).
fn inspect(
    target: &Path,
    device: &Path,
    area: u64,
    journal_digest: Option<&str>,
) -> crate::Result<Existing> {
    let meta = match std::fs::symlink_metadata(target) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Existing::Absent),
        Err(e) => return Err(e).with_context(|| format!("cannot inspect {}", target.display())),
    };
    if !meta.is_file() {
        bail!(
            "{} is not a regular file: move it away so that the header backup can be written",
            target.display()
        );
    }
    if let Some(digest) = matches_device(target, device, area)? {
        return Ok(Existing::MatchesDevice { digest });
    }
    let allocated = allocated(&meta);
    // No LUKS2 header area is larger; a bigger file is nobody's backup and is not read through.
    let largest_area = 2 * (4 << 20) + MAX_KEYSLOTS_SIZE;
    if let Some(expected) = journal_digest.filter(|_| meta.len() <= largest_area) {
        if file_blake3(target)? == expected {
            return Ok(Existing::Verified { allocated });
        }
    }
    Ok(Existing::Stale { allocated })
}

/// Where the new backup finds its room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Room {
    /// Beside the existing file: written to `luks.bin.tmp`, then renamed over it (atomic).
    Beside,
    /// Only once the stale `luks.bin` is removed (it matches nothing, so nothing is lost).
    AfterRemovingStale,
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1u32 << 20))
}

/// The in-place encryption's temporary header with its metadata, when it is still there
/// although the journal has that step done: a power cut lost its removal after the step had
/// taken effect (the next boot reconciled the step from the device). Ours then, no longer
/// needed (the device's header is complete), and it holds half of a 32 MiB boot partition, which
/// the backup needs. Found by tests/vm_lost_writes.rs.
fn stale_in_place_header(ctx: &StepContext<'_>) -> Option<(PathBuf, std::fs::Metadata)> {
    let journal = ctx.rec.journal();
    if record::pending(journal, Step::EncryptInPlace).is_some()
        || record::last_done(journal, Step::EncryptInPlace).is_none()
    {
        return None;
    }
    let path = ctx.config.temp_header_path();
    let meta = std::fs::symlink_metadata(&path).ok()?;
    meta.is_file().then_some((path, meta))
}

/// Decides where the backup goes, or says exactly what space is missing. `free` is what the
/// boot partition has free, `reclaimable` what cryptfs's own leftovers (`luks.bin.tmp`, a
/// finished in-place encryption's temporary header) hold (removed first), `need` what the new file takes.
pub fn plan_room(
    dir: &Path,
    target: &Path,
    free: u64,
    reclaimable: u64,
    need: u64,
    existing: &Existing,
) -> Result<Room, String> {
    let available = free.saturating_add(reclaimable);
    if available >= need {
        return Ok(Room::Beside);
    }
    let short = format!(
        "boot partition {} has {} free, the header backup needs {}",
        dir.display(),
        mib(available),
        mib(need)
    );
    match existing {
        Existing::Stale { allocated } => {
            let after = available.saturating_add(*allocated);
            if after >= need {
                Ok(Room::AfterRemovingStale)
            } else {
                Err(format!(
                    "{short} (even with the stale {} removed): free {} on {}",
                    target.display(),
                    mib(need - after),
                    dir.display()
                ))
            }
        }
        Existing::Verified { allocated } => Err(format!(
            "{short}; the verified backup {} ({}) is kept until its replacement is written: \
             free {} more on {}",
            target.display(),
            mib(*allocated),
            mib(need - available),
            dir.display()
        )),
        Existing::Absent | Existing::MatchesDevice { .. } => Err(format!(
            "{short}: free {} on {}",
            mib(need - available),
            dir.display()
        )),
    }
}

/// Free space and block size of the filesystem holding `dir`.
struct FsSpace {
    /// Bytes this process may still allocate (root may use the reserved blocks).
    free: u64,
    /// Allocation unit.
    block: u64,
    /// Mounted read-only.
    read_only: bool,
}

#[allow(clippy::useless_conversion)] // the statvfs field types differ between targets
fn fs_space(dir: &Path) -> crate::Result<FsSpace> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .with_context(|| format!("{} is not a valid path", dir.display()))?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: `path` is NUL-terminated and `st` is a writable statvfs buffer.
    if unsafe { libc::statvfs(path.as_ptr(), st.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("cannot read the free space of {}", dir.display()));
    }
    // SAFETY: statvfs succeeded, so it filled the buffer (which was zeroed before anyway).
    let st = unsafe { st.assume_init() };
    let block = u64::from(st.f_frsize).max(1);
    // SAFETY: geteuid has no preconditions.
    let blocks = if unsafe { libc::geteuid() } == 0 {
        u64::from(st.f_bfree)
    } else {
        u64::from(st.f_bavail)
    };
    Ok(FsSpace {
        free: blocks.saturating_mul(block),
        block,
        read_only: st.f_flag & libc::ST_RDONLY != 0,
    })
}

/// The error for a failed `crypt_header_backup`, whose own answer is a bare "IO error": the
/// partial file is removed, then the free space says whether the partition filled up.
fn write_failure(err: anyhow::Error, dir: &Path, temp: &Path, need: u64) -> anyhow::Error {
    let _ = std::fs::remove_file(temp);
    match fs_space(dir) {
        Ok(space) if space.free < need => anyhow!(
            "boot partition {} ran out of space writing the header backup: it has {} free, the \
             header backup needs {}",
            dir.display(),
            mib(space.free),
            mib(need)
        ),
        Ok(space) if space.read_only => anyhow!(
            "boot partition {} is mounted read-only: the header backup cannot be written",
            dir.display()
        ),
        _ => err.context(format!("cannot write the header backup {}", temp.display())),
    }
}

fn round_up(len: u64, block: u64) -> crate::Result<u64> {
    len.div_ceil(block)
        .checked_mul(block)
        .ok_or_else(|| anyhow!("the header backup size overflows"))
}

/// Writes the backup, or adopts the one already there.
pub fn run(ctx: &mut StepContext<'_>) -> crate::Result<()> {
    write_backup(ctx, false)
}

/// [`run`] after a change of keyslots (`cryptfs reseal`): the verified backup describes keyslots
/// that are gone, so it is superseded, and when the boot partition has no room for a second
/// copy it is removed before the new one is written (as a stale one would be). The header is
/// sound at that point (it was just written and proven); a power cut in between leaves no
/// backup, which the boot path's `backup-header` or the next reseal writes again.
pub fn run_superseding(ctx: &mut StepContext<'_>) -> crate::Result<()> {
    write_backup(ctx, true)
}

/// Stores `[activation]`'s flags in the header as persistent flags, so that the backup taken
/// next carries them and every later activation by any LUKS2 tool uses them. Done here because
/// no re-encryption runs any more (libcryptsetup's own header writes are over) and before the
/// backup's device comparison, which must see the final header. Journaled around the write;
/// a repeat finds them in place and writes nothing.
fn persist_activation_flags(ctx: &mut StepContext<'_>) -> crate::Result<()> {
    let device = ctx.config.device.clone();
    if crate::luks::device::activation_flags_persisted(&device, &ctx.config.activation)? {
        return Ok(());
    }
    ctx.rec.substep(STEP, "persist-activation-flags")?;
    crate::luks::device::persist_activation_flags(&device, &ctx.config.activation)?;
    ctx.rec.substep(STEP, "activation-flags-persisted")?;
    tracing::info!(
        no_read_workqueue = ctx.config.activation.no_read_workqueue,
        no_write_workqueue = ctx.config.activation.no_write_workqueue,
        "dm-crypt activation flags stored in the header"
    );
    Ok(())
}

fn write_backup(ctx: &mut StepContext<'_>, superseded: bool) -> crate::Result<()> {
    let device = ctx.config.device.clone();
    let target = ctx.config.backup_path();
    let temp = target.with_extension("bin.tmp");
    let dir: PathBuf = target
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| ".".into());

    persist_activation_flags(ctx)?;
    // Every check before anything is written.
    let meta = probe::luks2(&device, "to back up")?;
    let area = header_area_len(&meta)?;
    let existing = inspect(
        &target,
        &device,
        area,
        record::backup_digest(ctx.rec.journal()).as_deref(),
    )?;
    let existing = match existing {
        Existing::Verified { allocated } if superseded => Existing::Stale { allocated },
        other => other,
    };
    let leftover = std::fs::symlink_metadata(&temp).ok();
    let stale_in_place = stale_in_place_header(ctx);
    let mut plan = None;
    if !matches!(existing, Existing::MatchesDevice { .. }) {
        let space = fs_space(&dir)?;
        if space.read_only {
            bail!(
                "boot partition {} is mounted read-only: the header backup cannot be written",
                dir.display()
            );
        }
        let need = round_up(area, space.block)?;
        let reclaimable = leftover.as_ref().map_or(0, allocated)
            + stale_in_place.as_ref().map_or(0, |(_, m)| allocated(m));
        let room = plan_room(&dir, &target, space.free, reclaimable, need, &existing)
            .map_err(|message| anyhow!(message))?;
        plan = Some((room, need));
    }

    ctx.rec.intent(
        STEP,
        ctx.state,
        Journal::details([(keys::BACKUP_PATH, Value::from(target.display().to_string()))]),
    )?;
    if leftover.is_some() {
        // Ours: a write that a power cut interrupted before its rename.
        std::fs::remove_file(&temp)
            .with_context(|| format!("cannot remove the leftover {}", temp.display()))?;
    }
    if let Some((path, _)) = &stale_in_place {
        tracing::info!(
            path = %path.display(),
            "removing the temporary header of the finished in-place encryption (a power cut \
             lost its removal)"
        );
        std::fs::remove_file(path)
            .with_context(|| format!("cannot remove the leftover {}", path.display()))?;
        sync_path(&dir)?;
    }
    let digest = match (existing, plan) {
        (Existing::MatchesDevice { digest }, _) => {
            // Renamed into place by a run that lost power before its `done`: flush it and
            // its directory entry again, then vouch for it.
            sync_path(&target)?;
            sync_path(&dir)?;
            tracing::info!(
                path = %target.display(),
                "the existing header backup matches the device's header byte for byte: adopted"
            );
            ctx.rec.done(
                STEP,
                ctx.state,
                Journal::details([
                    (keys::BACKUP_PATH, Value::from(target.display().to_string())),
                    (keys::BACKUP_BLAKE3, Value::from(digest.clone())),
                    ("adopted", Value::from(true)),
                ]),
            )?;
            return Ok(());
        }
        (_, Some((room, need))) => {
            if room == Room::AfterRemovingStale {
                tracing::warn!(
                    path = %target.display(),
                    "removing the stale header backup first: the boot partition has no room \
                     for a second copy (it matches neither the device nor the journal)"
                );
                std::fs::remove_file(&target)
                    .with_context(|| format!("cannot remove the stale {}", target.display()))?;
                sync_path(&dir)?;
            }
            device::header_backup(&device, &temp)
                .map_err(|e| write_failure(e, &dir, &temp, need))?;
            sync_path(&temp)?;
            match matches_device(&temp, &device, area)? {
                Some(digest) => digest,
                None => {
                    let _ = std::fs::remove_file(&temp);
                    bail!(
                        "the header backup {} does not match the header of {} (did the header \
                         change while it was written?)",
                        temp.display(),
                        device.display()
                    );
                }
            }
        }
        (_, None) => bail!("internal error: no room planned for the header backup"),
    };
    failpoint::hit("backup-header:after-temp");
    std::fs::rename(&temp, &target)
        .with_context(|| format!("cannot move the backup into place at {}", target.display()))?;
    // The power cut that used to leave every later backup failing: renamed, `done` not journaled.
    failpoint::hit("backup-header:after-rename");
    sync_path(&dir)?;
    tracing::info!(path = %target.display(), blake3 = %digest, "LUKS2 header backed up");
    ctx.rec.done(
        STEP,
        ctx.state,
        Journal::details([
            (keys::BACKUP_PATH, Value::from(target.display().to_string())),
            (keys::BACKUP_BLAKE3, Value::from(digest)),
        ]),
    )?;
    Ok(())
}

/// Whether `luks.bin` may replace a header whose two copies are both damaged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestoreVerdict {
    /// It matches the digest journaled when it was written.
    Restorable {
        /// Sequence number of the journal's `done` that vouches for it.
        done_seq: u64,
    },
    /// There is no `luks.bin`.
    Absent,
    /// The journal holds no digest for it (never journaled, or the journal was lost).
    NotJournaled,
    /// Its digest differs from the journal's.
    Mismatch,
}

impl RestoreVerdict {
    /// Judges the backup of `config` against `journal`.
    pub fn of(
        config: &crate::config::Config,
        journal: Option<&[cryptfs_journal::Record]>,
    ) -> RestoreVerdict {
        let path = config.backup_path();
        if !path.exists() {
            return RestoreVerdict::Absent;
        }
        let Some(done) = journal.and_then(|j| record::last_done(j, STEP)) else {
            return RestoreVerdict::NotJournaled;
        };
        match done.body.detail_str(keys::BACKUP_BLAKE3) {
            None => RestoreVerdict::NotJournaled,
            Some(expected) if file_blake3(&path).is_ok_and(|d| d == expected) => {
                RestoreVerdict::Restorable {
                    done_seq: done.body.seq,
                }
            }
            Some(_) => RestoreVerdict::Mismatch,
        }
    }

    /// What `cryptfs run` does about a header whose copies are both damaged, or why it cannot.
    pub fn describe(&self, device: &Path, backup: &Path) -> String {
        let head = format!(
            "{} has a LUKS2 header whose copies are both damaged",
            device.display()
        );
        match self {
            RestoreVerdict::Restorable { .. } => format!(
                "{head}; `cryptfs run` restores it from {} (present, digest ok: it matches the \
                 journal); keyslots and tokens added after that backup was taken are lost",
                backup.display()
            ),
            RestoreVerdict::Absent => format!(
                "{head}, and there is no header backup at {} to restore it from",
                backup.display()
            ),
            RestoreVerdict::NotJournaled => format!(
                "{head}; the backup {} is not restored: the journal holds no digest for it, so \
                 nothing vouches that it belongs to this device",
                backup.display()
            ),
            RestoreVerdict::Mismatch => format!(
                "{head}; refusing to restore the backup {}: it does not match the digest in the \
                 journal",
                backup.display()
            ),
        }
    }
}

/// Repairs a header with exactly one damaged copy from the valid one (libcryptsetup's repair:
/// every keyslot and token of the valid copy survives, `luks.bin` is not involved). Journaled
/// as a `repair-header` note, intent before and done after; repeating it is harmless.
pub fn repair_header_copy(ctx: &mut StepContext<'_>, meta: &Luks2Metadata) -> crate::Result<()> {
    let device = ctx.config.device.clone();
    let (damaged, valid) = if meta.primary_ok {
        ("secondary", "primary")
    } else {
        ("primary", "secondary")
    };
    tracing::warn!(
        "the {damaged} LUKS2 header copy of {} is damaged; repairing it from the valid {valid} \
         copy (seqid {}, every keyslot and token kept)",
        device.display(),
        meta.seqid
    );
    ctx.rec.note(
        "repair-header",
        None,
        Journal::details([
            ("phase", Value::from("intent")),
            ("damaged_copy", Value::from(damaged)),
            ("seqid", Value::from(meta.seqid)),
        ]),
    )?;
    device::repair(&device)?;
    let repaired = probe::luks2(&device, "after its repair")?;
    if !(repaired.primary_ok && repaired.secondary_ok) {
        bail!(
            "libcryptsetup's repair left a damaged LUKS2 header copy on {} (copies ok: primary \
             {}, secondary {})",
            device.display(),
            repaired.primary_ok,
            repaired.secondary_ok
        );
    }
    ctx.rec.note(
        "repair-header",
        None,
        Journal::details([
            ("phase", Value::from("done")),
            ("damaged_copy", Value::from(damaged)),
            (
                keys::KEYSLOT,
                Value::from(repaired.keyslots.keys().copied().collect::<Vec<u32>>()),
            ),
        ]),
    )?;
    Ok(())
}

/// Restores `luks.bin` over a header whose two copies are both damaged, only when its digest
/// matches the journal's; anything else is refused with the reason, the device untouched.
pub fn restore_header(ctx: &mut StepContext<'_>) -> crate::Result<()> {
    let device = ctx.config.device.clone();
    let backup = ctx.config.backup_path();
    let verdict = RestoreVerdict::of(ctx.config, Some(ctx.rec.journal().records()));
    let RestoreVerdict::Restorable { done_seq } = verdict else {
        bail!("{}", verdict.describe(&device, &backup));
    };
    tracing::warn!(
        "both LUKS2 header copies of {} are damaged; restoring the verified backup {} (journal \
         record #{done_seq}): keyslots and tokens added after it was taken are lost",
        device.display(),
        backup.display()
    );
    ctx.rec.note(
        "restore-header",
        None,
        Journal::details([
            ("phase", Value::from("intent")),
            ("backup_done_seq", Value::from(done_seq)),
        ]),
    )?;
    device::header_restore(&device, &backup)?;
    let restored = probe::luks2(&device, "after the backup was restored")?;
    ctx.rec.note(
        "restore-header",
        None,
        Journal::details([
            ("phase", Value::from("done")),
            ("backup_done_seq", Value::from(done_seq)),
            (
                keys::KEYSLOT,
                Value::from(restored.keyslots.keys().copied().collect::<Vec<u32>>()),
            ),
            (
                "lost",
                Value::from("keyslots and tokens added after the backup was taken"),
            ),
        ]),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn plan(free: u64, reclaimable: u64, existing: Existing) -> Result<Room, String> {
        plan_room(
            Path::new("/boot"),
            Path::new("/boot/luks.bin"),
            free,
            reclaimable,
            16 * MIB,
            &existing,
        )
    }

    #[test]
    fn room_beside_is_preferred_whenever_it_fits() {
        assert_eq!(plan(16 * MIB, 0, Existing::Absent), Ok(Room::Beside));
        let verified = Existing::Verified {
            allocated: 16 * MIB,
        };
        assert_eq!(plan(17 * MIB, 0, verified), Ok(Room::Beside));
        let stale = Existing::Stale {
            allocated: 16 * MIB,
        };
        assert_eq!(plan(10 * MIB, 6 * MIB, stale), Ok(Room::Beside));
    }

    #[test]
    fn a_stale_backup_makes_room_a_verified_one_never_does() {
        let stale = Existing::Stale {
            allocated: 16 * MIB,
        };
        assert_eq!(plan(8 * MIB, 0, stale), Ok(Room::AfterRemovingStale));
        let err = plan(
            8 * MIB,
            0,
            Existing::Verified {
                allocated: 16 * MIB,
            },
        )
        .expect_err("a shortage");
        assert_eq!(
            err,
            "boot partition /boot has 8.0 MiB free, the header backup needs 16.0 MiB; the \
             verified backup /boot/luks.bin (16.0 MiB) is kept until its replacement is \
             written: free 8.0 MiB more on /boot"
        );
    }

    #[test]
    fn a_shortage_says_what_is_free_what_is_needed_and_what_to_free() {
        let err = plan(3 * MIB, MIB, Existing::Absent).expect_err("a shortage");
        assert_eq!(
            err,
            "boot partition /boot has 4.0 MiB free, the header backup needs 16.0 MiB: free \
             12.0 MiB on /boot"
        );
        let err = plan(2 * MIB, 0, Existing::Stale { allocated: 4 * MIB }).expect_err("a shortage");
        assert!(
            err.ends_with("(even with the stale /boot/luks.bin removed): free 10.0 MiB on /boot"),
            "{err}"
        );
    }
}
