//! `backup-header`: `luks.bin` on the boot partition, written atomically, digest journaled.
//!
//! Taken only once the passphrase is gone and the volume key is device-unique: whoever holds
//! the backup and any secret valid at backup time can open the volume forever.

use std::path::Path;

use anyhow::Context;
use cryptfs_journal::Journal;
use cryptfs_states::Step;
use serde_json::Value;

use super::encrypt::sync_path;
use super::StepContext;
use crate::failpoint;
use crate::luks::device;
use crate::record::keys;

const STEP: Step = Step::BackupHeader;

/// blake3 of a file, hex.
pub fn file_blake3(path: &Path) -> crate::Result<String> {
    let mut hasher = blake3::Hasher::new();
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    hasher.update_reader(file)?;
    Ok(hasher.finalize().to_hex().to_string())
}

/// Writes the backup.
pub fn run(ctx: &mut StepContext<'_>) -> crate::Result<()> {
    let target = ctx.config.backup_path();
    let temp = target.with_extension("bin.tmp");
    let dir = target
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| ".".into());
    ctx.rec.intent(
        STEP,
        ctx.state,
        Journal::details([(keys::BACKUP_PATH, Value::from(target.display().to_string()))]),
    )?;
    if temp.exists() {
        std::fs::remove_file(&temp)?;
    }
    device::header_backup(&ctx.config.device, &temp)?;
    sync_path(&temp)?;
    failpoint::hit("backup-header:after-temp");
    std::fs::rename(&temp, &target)
        .with_context(|| format!("cannot move the backup into place at {}", target.display()))?;
    sync_path(&dir)?;
    let digest = file_blake3(&target)?;
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
