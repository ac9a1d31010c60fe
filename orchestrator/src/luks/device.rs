//! LUKS2 changes through libcryptsetup. A fresh crypt context is opened for each operation
//! (the stratisd way), so that no stale in-memory header is ever written back.

use std::path::Path;

use anyhow::{anyhow, Context};
use libcryptsetup_rs::consts::flags::{CryptActivate, CryptPbkdf, CryptVolumeKey};
use libcryptsetup_rs::consts::vals::{CryptKdf, CryptLogLevel, EncryptionFormat};
use libcryptsetup_rs::{CryptDevice, CryptInit, CryptPbkdfType, TokenInput};
use zeroize::Zeroizing;

use crate::config::ActivationConfig;
use crate::secret::Passphrase;

/// The KDF systemd uses for token keyslots: the secret is already 256 bits of entropy, so a
/// slow KDF buys nothing and costs boot time.
pub fn token_pbkdf() -> CryptPbkdfType {
    pbkdf2(PBKDF2_TOKEN_HASH)
}

/// The hash of [`token_pbkdf`] (systemd's).
pub const PBKDF2_TOKEN_HASH: &str = "sha512";

/// PBKDF2 with `hash` at libcryptsetup's minimum of 1000 iterations, no benchmark: for
/// keyslots whose passphrase has full entropy (a KEK secret) or is public (a CI image's).
pub fn pbkdf2(hash: &str) -> CryptPbkdfType {
    CryptPbkdfType {
        type_: CryptKdf::Pbkdf2,
        hash: Some(hash.to_string()),
        time_ms: 0,
        iterations: 1000,
        max_memory_kb: 0,
        parallel_threads: 0,
        flags: CryptPbkdf::NO_BENCHMARK,
    }
}

/// Opens a crypt context on `device` and loads its LUKS2 header.
pub fn open(device: &Path) -> crate::Result<CryptDevice> {
    let mut cd = CryptInit::init(device)
        .with_context(|| format!("libcryptsetup cannot open {}", device.display()))?;
    cd.context_handle()
        .load::<()>(Some(EncryptionFormat::Luks2), None)
        .with_context(|| format!("cannot load the LUKS2 header of {}", device.display()))?;
    Ok(cd)
}

/// Checks `passphrase` without activating anything; returns the keyslot it opens.
pub fn test_passphrase(
    device: &Path,
    keyslot: Option<u32>,
    passphrase: &Passphrase,
) -> crate::Result<u32> {
    let mut cd = open(device)?;
    cd.activate_handle()
        .activate_by_passphrase(None, keyslot, passphrase.expose(), CryptActivate::empty())
        .map_err(|e| anyhow!("no keyslot of {} opens with it ({e})", device.display()))
}

/// The two dm-crypt workqueue flags `[activation]` controls.
const WORKQUEUE_FLAGS: CryptActivate =
    CryptActivate::NO_READ_WORKQUEUE.union(CryptActivate::NO_WRITE_WORKQUEUE);

/// The activation flags `[activation]` asks for.
pub fn activation_flags(config: &ActivationConfig) -> CryptActivate {
    let mut flags = CryptActivate::empty();
    if config.no_read_workqueue {
        flags |= CryptActivate::NO_READ_WORKQUEUE;
    }
    if config.no_write_workqueue {
        flags |= CryptActivate::NO_WRITE_WORKQUEUE;
    }
    flags
}

/// Activates `device` as `/dev/mapper/<name>` with the passphrase of `keyslot` (any keyslot
/// when `None`) and `[activation]`'s flags (libcryptsetup adds the header's persistent flags);
/// returns the
/// keyslot that opened. A header with a clean re-encryption in flight is activated with its
/// reencryption segments (libcryptsetup builds the two-key table).
pub fn activate(
    device: &Path,
    name: &str,
    keyslot: Option<u32>,
    passphrase: &Passphrase,
    flags: &ActivationConfig,
) -> crate::Result<u32> {
    let mut cd = open(device)?;
    cd.activate_handle()
        .activate_by_passphrase(
            Some(name),
            keyslot,
            passphrase.expose(),
            activation_flags(flags),
        )
        .map_err(|e| anyhow!("cannot activate {} as {name} ({e})", device.display()))
}

/// Whether the header's persistent workqueue flags are those `[activation]` asks for.
pub fn activation_flags_persisted(device: &Path, config: &ActivationConfig) -> crate::Result<bool> {
    let mut cd = open(device)?;
    let current = cd
        .luks2_flag_handle::<CryptActivate>()
        .persistent_flags_get()
        .with_context(|| format!("cannot read the persistent flags of {}", device.display()))?;
    Ok(current.intersection(WORKQUEUE_FLAGS).bits() == activation_flags(config).bits())
}

/// Makes the header's persistent workqueue flags those `[activation]` asks for, keeping every
/// other persistent flag; writes the header only when they differ. Returns whether it wrote.
/// Idempotent; the header's two copies are written as any metadata change is (seqid).
pub fn persist_activation_flags(device: &Path, config: &ActivationConfig) -> crate::Result<bool> {
    let mut cd = open(device)?;
    let mut handle = cd.luks2_flag_handle::<CryptActivate>();
    let current = handle
        .persistent_flags_get()
        .with_context(|| format!("cannot read the persistent flags of {}", device.display()))?;
    let current_bits = current.bits();
    let wanted = current.difference(WORKQUEUE_FLAGS) | activation_flags(config);
    if wanted.bits() == current_bits {
        return Ok(false);
    }
    handle
        .persistent_flags_set(wanted)
        .with_context(|| format!("cannot write the persistent flags of {}", device.display()))?;
    Ok(true)
}

/// `device` opened with [`token_pbkdf`] selected for the keyslots it adds next.
fn open_for_new_keyslot(device: &Path) -> crate::Result<CryptDevice> {
    let mut cd = open(device)?;
    cd.settings_handle()
        .set_pbkdf_type(&token_pbkdf())
        .context("cannot select PBKDF2 for the new keyslot")?;
    Ok(cd)
}

/// Adds a keyslot for `new` (PBKDF2/sha512/1000), unlocking the volume key with `existing`.
///
/// Not idempotent by itself: callers first look for a keyslot `new` already opens.
pub fn add_keyslot(device: &Path, existing: &Passphrase, new: &Passphrase) -> crate::Result<u32> {
    let mut cd = open_for_new_keyslot(device)?;
    cd.keyslot_handle()
        .add_by_passphrase(None, existing.expose(), new.expose())
        .with_context(|| format!("cannot add a keyslot to {}", device.display()))
}

/// Adds keyslot `slot` for `new` (PBKDF2/sha512/1000, as systemd's recovery keyslots),
/// unlocking the volume key with `existing`. Fails if `slot` is taken.
pub fn add_keyslot_at(
    device: &Path,
    slot: u32,
    existing: &Passphrase,
    new: &Passphrase,
) -> crate::Result<u32> {
    let mut cd = open_for_new_keyslot(device)?;
    cd.keyslot_handle()
        .add_by_passphrase(Some(slot), existing.expose(), new.expose())
        .with_context(|| format!("cannot add keyslot {slot} to {}", device.display()))
}

/// Writes `token` as a new token; returns its id.
pub fn add_token(device: &Path, token: &serde_json::Value) -> crate::Result<u32> {
    let mut cd = open(device)?;
    cd.token_handle()
        .json_set(TokenInput::AddToken(token))
        .with_context(|| format!("cannot write a LUKS2 token to {}", device.display()))
}

/// Replaces token `id` by `token`.
pub fn replace_token(device: &Path, id: u32, token: &serde_json::Value) -> crate::Result<()> {
    let mut cd = open(device)?;
    cd.token_handle()
        .json_set(TokenInput::ReplaceToken(id, token))
        .with_context(|| format!("cannot rewrite LUKS2 token {id} of {}", device.display()))?;
    Ok(())
}

/// Removes token `id` (its keyslot stays).
pub fn remove_token(device: &Path, id: u32) -> crate::Result<()> {
    let mut cd = open(device)?;
    cd.token_handle()
        .json_set(TokenInput::RemoveToken(id))
        .with_context(|| format!("cannot remove LUKS2 token {id} of {}", device.display()))?;
    Ok(())
}

/// Destroys keyslot `slot` (its key material is wiped). Point of no return for that keyslot.
pub fn destroy_keyslot(device: &Path, slot: u32) -> crate::Result<()> {
    let mut cd = open(device)?;
    cd.keyslot_handle()
        .destroy(slot)
        .with_context(|| format!("cannot destroy keyslot {slot} of {}", device.display()))
}

/// The volume key, unlocked by `passphrase` (tests and verification only; zeroized on drop).
pub fn volume_key(
    device: &Path,
    keyslot: Option<u32>,
    passphrase: &Passphrase,
) -> crate::Result<Zeroizing<Vec<u8>>> {
    unlock_volume_key(device, keyslot, passphrase).map(|(_, key)| key)
}

/// The keyslot `passphrase` opens (of `keyslot`, or any) and the volume key it unlocks (zeroized
/// on drop): one key derivation where a test unlock followed by an add by passphrase would
/// cost two.
pub fn unlock_volume_key(
    device: &Path,
    keyslot: Option<u32>,
    passphrase: &Passphrase,
) -> crate::Result<(u32, Zeroizing<Vec<u8>>)> {
    let mut cd = open(device)?;
    let mut key = Zeroizing::new(vec![0u8; 512]);
    let (opened, len) = cd
        .volume_key_handle()
        .get(keyslot, &mut key, Some(passphrase.expose()))
        .map_err(|e| anyhow!("no keyslot of {} opens with it ({e})", device.display()))?;
    key.truncate(len);
    let opened = u32::try_from(opened).map_err(|_| {
        anyhow!(
            "libcryptsetup reported keyslot {opened} of {}",
            device.display()
        )
    })?;
    Ok((opened, key))
}

/// Adds a keyslot for `new` (PBKDF2, as [`add_keyslot`]) holding `volume_key`, which
/// libcryptsetup checks against the header's digest first; returns its number.
pub fn add_keyslot_for_volume_key(
    device: &Path,
    volume_key: &[u8],
    new: &Passphrase,
) -> crate::Result<u32> {
    let mut cd = open_for_new_keyslot(device)?;
    cd.keyslot_handle()
        .add_by_key(
            None,
            Some(libcryptsetup_rs::Either::Left(volume_key)),
            new.expose(),
            CryptVolumeKey::empty(),
        )
        .with_context(|| format!("cannot add a keyslot to {}", device.display()))
}

/// Writes the binary LUKS2 header backup of `device` to `path` (which must not exist).
pub fn header_backup(device: &Path, path: &Path) -> crate::Result<()> {
    let mut cd = open(device)?;
    cd.backup_handle()
        .header_backup(Some(EncryptionFormat::Luks2), path)
        .with_context(|| format!("cannot back up the header of {}", device.display()))
}

/// Rewrites the damaged copy of the LUKS2 header from the valid one: libcryptsetup's own
/// recovery, what `cryptsetup repair` runs for LUKS2 (`crypt_repair`). It recovers only when
/// exactly one copy is bad, keeps every keyslot and token of the valid copy, and unlike the
/// automatic recovery inside `crypt_load` does not refuse a device on which blkid also sees a
/// foreign signature. Keyslot areas are not touched.
pub fn repair(device: &Path) -> crate::Result<()> {
    let mut cd = CryptInit::init(device)
        .with_context(|| format!("libcryptsetup cannot open {}", device.display()))?;
    cd.context_handle()
        .repair::<()>(EncryptionFormat::Luks2, None)
        .map_err(|e| {
            anyhow!(
                "libcryptsetup cannot repair the LUKS2 header of {} from its valid copy ({e})",
                device.display()
            )
        })
}

/// Restores the LUKS2 header in `backup` onto `device`.
pub fn header_restore(device: &Path, backup: &Path) -> crate::Result<()> {
    let mut cd = CryptInit::init(device)
        .with_context(|| format!("libcryptsetup cannot open {}", device.display()))?;
    cd.backup_handle()
        .header_restore(Some(EncryptionFormat::Luks2), backup)
        .with_context(|| {
            format!(
                "cannot restore the header {} onto {}",
                backup.display(),
                device.display()
            )
        })
}

/// Sends libcryptsetup's log lines, its debug lines included, to `tracing` (stderr in the
/// binary, target `libcryptsetup`). Without a callback libcryptsetup prints every line but its
/// errors on **stdout**, where `cryptfs unlock --device-path` hands the initramfs the root
/// device's path: one debug line there and the root cannot be mounted.
pub fn route_library_log() {
    libcryptsetup_rs::set_log_callback::<()>(Some(library_log_line), None);
}

/// The log callback: one line of libcryptsetup's log, at its level.
///
/// # Safety
/// Called by libcryptsetup only, with `msg` NULL or a NUL-terminated string.
unsafe extern "C" fn library_log_line(
    level: std::os::raw::c_int,
    msg: *const std::os::raw::c_char,
    _usrptr: *mut std::os::raw::c_void,
) {
    if msg.is_null() {
        return;
    }
    // SAFETY: libcryptsetup passes a NUL-terminated string that lives for the call.
    let text = unsafe { std::ffi::CStr::from_ptr(msg) }.to_string_lossy();
    let text = text.trim_end();
    if text.is_empty() {
        return;
    }
    match CryptLogLevel::try_from(level) {
        Ok(CryptLogLevel::Error) => {
            tracing::warn!(target: "libcryptsetup", "libcryptsetup: {text}")
        }
        Ok(CryptLogLevel::Normal) => {
            tracing::info!(target: "libcryptsetup", "libcryptsetup: {text}")
        }
        Ok(CryptLogLevel::Verbose | CryptLogLevel::Debug | CryptLogLevel::DebugJson) | Err(_) => {
            tracing::debug!(target: "libcryptsetup", "libcryptsetup: {text}")
        }
    }
}

/// Keyslot flags re-exported for the in-place encryption step.
pub const NO_VOLUME_KEY_FLAGS: CryptVolumeKey = CryptVolumeKey::empty();
