//! The boot-phase lock (design/boot.md): once the initramfs is done with the TPM in this boot,
//! `lock_pcr` is extended with a fixed measurement, so the KEK, sealed to `pcrs` and the lock
//! PCR's pre-lock value, cannot be unsealed by anything that runs later in this boot (an
//! attacker's root filesystem included). The next boot starts with the PCR reset.
//!
//! Before the extend, the lock PCR's pre-lock value is journaled (public): `reseal` predicts
//! the next boot's value from it. The extend happens at most once per boot: a journal record
//! of this boot with a pre-lock value the PCR no longer holds means it is done.

use anyhow::{anyhow, Context as _};
use cryptfs_journal::{Journal, Record};
use serde_json::Value;
use sha2::{Digest as _, Sha256};

use crate::config::{Config, KekKind};
use crate::kek::tpm2::Tpm2Protector;
use crate::luks::device;
use crate::luks::metadata::Luks2Metadata;
use crate::probe::{self, Content};
use crate::record::{self, Recorder};
use crate::secret::Passphrase;

/// The text whose SHA-256 is extended into the lock PCR.
pub const MEASURED_TEXT: &str = "cryptfs boot-phase lock v1";
/// The journal subject of the pre-lock record.
pub const SUBJECT: &str = "boot-phase-lock";

/// SHA-256 of [`MEASURED_TEXT`]: what the lock extends.
pub fn measurement() -> [u8; 32] {
    Sha256::digest(MEASURED_TEXT.as_bytes()).into()
}

/// Whether the configuration asks for the lock (TPM 2.0 protector, `boot_phase_lock` on).
pub fn enabled(config: &Config) -> bool {
    config.kek.kind == KekKind::Tpm2 && config.kek.tpm2.boot_phase_lock
}

fn lock_record(r: &Record) -> Option<(u8, Vec<u8>)> {
    (r.body.step == SUBJECT).then_some(())?;
    let pcr = u8::try_from(r.body.details.get("pcr")?.as_u64()?).ok()?;
    let value = hex::decode(r.body.detail_str("pre_lock_value")?).ok()?;
    Some((pcr, value))
}

/// The pre-lock value of the lock PCR journaled in the boot `boot_id`, as (PCR, value).
pub fn pre_lock_value(records: &[Record], boot_id: &str) -> Option<(u8, Vec<u8>)> {
    records
        .iter()
        .rev()
        .filter(|r| r.body.boot_id == boot_id)
        .find_map(lock_record)
}

/// The latest pre-lock value journaled in any boot (the lock PCR's value at the start of a
/// boot, the same every boot: what `reseal` seals to).
pub fn latest_pre_lock_value(records: &[Record]) -> Option<(u8, Vec<u8>)> {
    records.iter().rev().find_map(lock_record)
}

/// What [`lock`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockOutcome {
    /// The configuration has no lock.
    Off,
    /// Extended earlier in this boot: nothing done.
    AlreadyLocked,
    /// Extended now.
    Locked,
}

/// Whether the lock PCR shows the lock of this boot: a journaled pre-lock value of this boot
/// that the PCR no longer holds.
pub fn locked_this_boot(config: &Config) -> crate::Result<bool> {
    let tpm = Tpm2Protector::new(&config.kek.tpm2)?;
    let journal = Journal::read_only(&config.journal_path())
        .with_context(|| format!("cannot read {}", config.journal_path().display()))?;
    let Some((pcr, pre)) = pre_lock_value(&journal.records, &record::boot_id()) else {
        return Ok(false);
    };
    let now = tpm.read_pcrs(&config.kek.tpm2.pcr_bank, &[pcr])?;
    Ok(now.first().is_some_and(|(_, v)| *v != pre))
}

/// Extends the lock PCR once per boot, journaling its pre-lock value first.
pub fn lock(config: &Config) -> crate::Result<LockOutcome> {
    if !enabled(config) {
        return Ok(LockOutcome::Off);
    }
    let pcr = config.kek.tpm2.lock_pcr;
    let bank = config.kek.tpm2.pcr_bank.clone();
    let tpm = Tpm2Protector::new(&config.kek.tpm2)?;
    let current = tpm
        .read_pcrs(&bank, &[pcr])?
        .pop()
        .map(|(_, v)| v)
        .ok_or_else(|| anyhow!("TPM returned no value for PCR {pcr}"))?;
    // The journal makes the extend idempotent and keeps the pre-lock value for `reseal`. A
    // journal that cannot be opened does not stop the lock: it is the security property.
    // One that does not exist is not created here: a stage that failed before its first
    // write (a missing device, say) leaves nothing behind.
    let journal = config.journal_path();
    let opened = if journal.exists() {
        Recorder::open(&journal, "boot-phase-lock", record::JOURNAL_WAIT)
    } else {
        Err(anyhow!("{} does not exist yet", journal.display()))
    };
    match opened {
        Ok((mut rec, _)) => {
            if let Some((recorded_pcr, pre)) =
                pre_lock_value(rec.journal().records(), rec.boot_id())
            {
                if recorded_pcr == pcr && pre != current {
                    return Ok(LockOutcome::AlreadyLocked);
                }
            }
            rec.note(
                SUBJECT,
                None,
                Journal::details([
                    ("pcr", Value::from(pcr)),
                    ("bank", Value::from(bank.clone())),
                    ("pre_lock_value", Value::from(hex::encode(&current))),
                    ("measurement", Value::from(hex::encode(measurement()))),
                ]),
            )?;
        }
        Err(e) => tracing::warn!(
            "boot-phase lock: the journal cannot record PCR {pcr}'s pre-lock value ({e:#}); \
             locking anyway"
        ),
    }
    tpm.extend_pcr(pcr, &measurement())?;
    tracing::info!(
        pcr,
        "boot-phase lock: PCR extended; the KEK cannot be unsealed again in this boot"
    );
    Ok(LockOutcome::Locked)
}

/// The keyring description of the configured volume in this boot.
pub fn key_description(meta: &Luks2Metadata) -> String {
    crate::keyring::description(&record::boot_id(), &meta.uuid)
}

/// The passphrase stashed in the kernel keyring for this volume in this boot, if any and if
/// it still opens a keyslot; returns (keyslot, passphrase).
pub fn stashed(config: &Config, meta: &Luks2Metadata) -> Option<(u32, Passphrase)> {
    let passphrase = match crate::keyring::read(&key_description(meta)) {
        Ok(found) => found?,
        Err(e) => {
            tracing::warn!("kernel keyring: {e:#}");
            return None;
        }
    };
    match device::test_passphrase(&config.device, None, &passphrase) {
        Ok(slot) => Some((slot, passphrase)),
        Err(e) => {
            tracing::warn!("the key in the kernel keyring opens no keyslot any more: {e:#}");
            None
        }
    }
}

/// Stashes a passphrase that has proved to open the volume, when the lock is on.
pub fn stash(config: &Config, meta: &Luks2Metadata, passphrase: &Passphrase) {
    if !enabled(config) {
        return;
    }
    if let Err(e) = crate::keyring::store(&key_description(meta), passphrase) {
        tracing::warn!(
            "the userspace stage will not be able to open the volume after the boot-phase \
             lock: {e:#}"
        );
    }
}

/// The end of the initramfs's use of the TPM: makes sure the keyring holds a proven passphrase
/// (unsealing once if it does not), then locks. Called on every exit path of the initramfs
/// stage and of activation; a failure to stash is logged, never a reason not to lock.
pub fn finish_initramfs(config: &Config) -> crate::Result<LockOutcome> {
    if !enabled(config) {
        return Ok(LockOutcome::Off);
    }
    if let Err(e) = ensure_stashed(config) {
        tracing::warn!("boot-phase lock: no key handed on to userspace: {e:#}");
    }
    lock(config)
}

fn ensure_stashed(config: &Config) -> crate::Result<()> {
    let Ok(found) = probe::probe(&config.device) else {
        return Ok(());
    };
    let Content::Luks2(meta) = found.content else {
        return Ok(());
    };
    if stashed(config, &meta).is_some() {
        return Ok(());
    }
    let mut kek = crate::kek::from_config(config)?;
    if crate::token_unlock::usable_tokens(kek.as_ref(), &meta).is_empty()
        || locked_this_boot(config).unwrap_or(false)
    {
        return Ok(());
    }
    let unlocked = crate::token_unlock::test_unlock_any(kek.as_mut(), &meta, &config.device)?;
    stash(config, &meta, &unlocked.passphrase);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_measurement_is_the_documented_text_hashed() {
        assert_eq!(
            hex::encode(measurement()),
            hex::encode(Sha256::digest(b"cryptfs boot-phase lock v1"))
        );
    }
}
