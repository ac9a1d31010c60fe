//! Unlocking with the KEK token: test only, or activation of the dm-crypt mapping (initramfs).

use anyhow::{anyhow, bail};
use zeroize::Zeroizing;

use crate::config::Config;
use crate::kek;
use crate::luks::device;
use crate::luks::metadata::Luks2Metadata;
use crate::probe::{self, Content};
use crate::token_unlock;

/// What a token unlock proved.
pub struct Unlocked {
    /// The token used.
    pub token: u32,
    /// The keyslot that opened.
    pub keyslot: u32,
    /// The volume key (zeroized on drop).
    pub volume_key: Zeroizing<Vec<u8>>,
    /// The header read.
    pub meta: Box<Luks2Metadata>,
}

/// Unseals the KEK of the configured device and unlocks its volume key. With `use_keyring`,
/// a passphrase the initramfs handed on through the kernel keyring is used first.
pub fn with_token(config: &Config, use_keyring: bool) -> crate::Result<Unlocked> {
    let mut kek = kek::from_config(config)?;
    let meta = match probe::probe(&config.device)?.content {
        Content::Luks2(meta) => meta,
        _ => bail!("{} is not a LUKS2 volume", config.device.display()),
    };
    let stashed = use_keyring
        .then(|| crate::boot_lock::stashed(config, &meta))
        .flatten();
    let unlocked = match stashed {
        Some((keyslot, passphrase)) => token_unlock::TokenUnlock {
            // The token of the keyslot the handed-on passphrase opened.
            token: token_unlock::usable_tokens(kek.as_ref(), &meta)
                .iter()
                .find(|t| t.keyslot == keyslot)
                .map_or(0, |t| t.token),
            keyslot,
            passphrase,
        },
        None => token_unlock::unlock_any(kek.as_mut(), &meta, &config.device, |slot, p| {
            device::test_passphrase(&config.device, Some(slot), p)
        })
        .map_err(|e| name_the_lock(config, e))?,
    };
    let keyslot = unlocked.keyslot;
    let volume_key = device::volume_key(&config.device, Some(keyslot), &unlocked.passphrase)?;
    Ok(Unlocked {
        token: unlocked.token,
        keyslot,
        volume_key,
        meta,
    })
}

/// What `activate` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Activation {
    /// The mapping already existed (a second call in the same boot is a no-op).
    AlreadyActive,
    /// The mapping was created with the token's keyslot.
    Activated {
        /// The keyslot that opened.
        keyslot: u32,
    },
}

/// A refused unlock after this boot's boot-phase lock says so — only when the lock is the
/// reason: a token whose policy this boot's values (the lock PCR at its pre-lock value) still
/// satisfy. When none does, a PCR of the policy changed as well, and the message says which.
fn name_the_lock(config: &Config, e: anyhow::Error) -> anyhow::Error {
    if !crate::boot_lock::enabled(config)
        || !crate::boot_lock::locked_this_boot(config).unwrap_or(false)
    {
        return e;
    }
    let lock_pcr = config.kek.tpm2.lock_pcr;
    match judge_at_boot(config) {
        Some(judged) if !judged.iter().any(|j| j.unseals == Some(true)) => {
            let changed: Vec<String> = judged
                .iter()
                .filter_map(crate::token_policy::changed_pcrs)
                .collect();
            e.context(format!(
                "no KEK token's policy matches this boot's PCR values even before the                  boot-phase lock ({}): the next boot will not unseal either; see `cryptfs                  status`, and reseal (`cryptfs reseal --recovery-key-file`)",
                if changed.is_empty() {
                    "the policy differs".to_string()
                } else {
                    format!("{} changed", changed.join(", "))
                }
            ))
        }
        _ => e.context(format!(
            "the boot-phase lock is in effect: PCR {lock_pcr} was extended when the initramfs              was done with the TPM, so nothing later in this boot can unseal the KEK (by              design; the next boot unseals it again)"
        )),
    }
}

/// Each TPM token of the device judged against this boot's PCR values, when they can be read.
fn judge_at_boot(config: &Config) -> Option<Vec<crate::token_policy::TokenPolicy>> {
    let meta = probe::luks2(&config.device, "to explain the refusal").ok()?;
    let journal = cryptfs_journal::Journal::read_only(&config.journal_path()).ok()?;
    let tpm = crate::kek::tpm2::Tpm2Protector::new(&config.kek.tpm2).ok()?;
    let boot = crate::reseal::boot_pcrs(config, &tpm, &meta, &journal.records).ok()?;
    Some(
        crate::token_policy::tpm2_tokens(&meta)
            .iter()
            .map(|(id, sealed)| crate::token_policy::judge(*id, sealed, &boot))
            .collect(),
    )
}

/// Activates the configured device as `/dev/mapper/<mapping_name>` with the KEK token, then
/// (on every exit path, when configured) applies the boot-phase lock.
pub fn activate(config: &Config) -> crate::Result<Activation> {
    let result = activate_inner(config);
    let locked = crate::boot_lock::finish_initramfs(config);
    let activation = result?;
    locked.map_err(|e| {
        e.context("the boot-phase lock failed: the KEK stays unsealable in this boot")
    })?;
    Ok(activation)
}

/// Activates the configured device as `/dev/mapper/<mapping_name>` with the KEK token.
///
/// Refuses a header in a re-encryption crash state: libcryptsetup would run its own recovery
/// during activation, which is unsafe in the measured crash windows; `cryptfs run --stage
/// initramfs` repairs it first.
fn activate_inner(config: &Config) -> crate::Result<Activation> {
    let name = config.mapping_name.as_deref().ok_or_else(|| {
        anyhow!("no `mapping_name` in the configuration: nothing to activate the volume as")
    })?;
    if probe::mapping_active(Some(name)) {
        return Ok(Activation::AlreadyActive);
    }
    let mut kek = kek::from_config(config)?;
    let meta = match probe::probe(&config.device)?.content {
        Content::Luks2(meta) => meta,
        _ => bail!(
            "{} is not a LUKS2 volume (run `cryptfs run --stage initramfs` first)",
            config.device.display()
        ),
    };
    if meta.reencrypt_crashed() || crate::luks::finalize::all_data_on_final_key(&meta) {
        bail!(
            "{} has an interrupted re-encryption that needs repair before activation; run \
             `cryptfs run --stage initramfs` first",
            config.device.display()
        );
    }
    // With a re-encryption in flight the mapping needs both volume keys: the token's
    // passphrase opens the old key's keyslot and the new key's, so let libcryptsetup try all.
    let in_flight = meta.reencrypt_mode().is_some();
    let flags = &config.activation;
    // The initramfs stage of this boot may have locked already, handing the passphrase on.
    let (keyslot, passphrase) = match crate::boot_lock::stashed(config, &meta) {
        Some((slot, passphrase)) => (
            device::activate(
                &config.device,
                name,
                (!in_flight).then_some(slot),
                &passphrase,
                flags,
            )?,
            passphrase,
        ),
        None => {
            let unlocked =
                token_unlock::unlock_any(kek.as_mut(), &meta, &config.device, |slot, p| {
                    device::activate(&config.device, name, (!in_flight).then_some(slot), p, flags)
                })
                .map_err(|e| name_the_lock(config, e))?;
            (unlocked.keyslot, unlocked.passphrase)
        }
    };
    // Proved: it opened the device. Handed on to the userspace stage (boot-phase lock).
    crate::boot_lock::stash(config, &meta, &passphrase);
    Ok(Activation::Activated { keyslot })
}

/// Opens the configured device with a recovery key: only tests it when `activate` is false,
/// otherwise activates `/dev/mapper/<mapping_name>`. Only keyslots named by a
/// `systemd-recovery` token are tried, so a recovery key never opens some other keyslot by
/// accident and the answer says which role opened. Returns the keyslot.
pub fn with_recovery_key(
    config: &Config,
    key: &crate::secret::Passphrase,
    activate: bool,
) -> crate::Result<u32> {
    let meta = match probe::probe(&config.device)?.content {
        Content::Luks2(meta) => meta,
        _ => bail!("{} is not a LUKS2 volume", config.device.display()),
    };
    let slots = crate::steps::recovery::recovery_keyslots(&meta);
    if slots.is_empty() {
        bail!(
            "{} has no recovery keyslot (no systemd-recovery token)",
            config.device.display()
        );
    }
    let slot = slots
        .iter()
        .copied()
        .find(|s| device::test_passphrase(&config.device, Some(*s), key).is_ok())
        .ok_or_else(|| {
            anyhow!(
                "the recovery key opens no recovery keyslot of {} (keyslots tried: {slots:?})",
                config.device.display()
            )
        })?;
    if activate {
        if meta.reencrypt_mode().is_some() {
            bail!(
                "{} has a re-encryption in flight; finish it with `cryptfs run` first",
                config.device.display()
            );
        }
        let name = config.mapping_name.as_deref().ok_or_else(|| {
            anyhow!("no `mapping_name` in the configuration: nothing to activate the volume as")
        })?;
        if probe::mapping_active(Some(name)) {
            return Ok(slot);
        }
        device::activate(&config.device, name, Some(slot), key, &config.activation)?;
    }
    Ok(slot)
}
