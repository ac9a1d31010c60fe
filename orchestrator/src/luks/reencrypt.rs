//! In-place encryption and volume-key replacement through the libcryptsetup re-encryption API,
//! driven as separate calls so that cryptfs can journal and flush between them.

use std::os::raw::c_void;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use anyhow::{bail, Context};
use libcryptsetup_rs::consts::flags::{CryptReencrypt, CryptVolumeKey};
use libcryptsetup_rs::consts::vals::{
    CryptReencryptDirectionInfo, CryptReencryptInfo, CryptReencryptModeInfo, EncryptionFormat,
};
use libcryptsetup_rs::{CryptInit, CryptParamsLuks2, CryptParamsLuks2Ref, CryptParamsReencrypt};

use super::device::{open, token_pbkdf, NO_VOLUME_KEY_FLAGS};
use super::{CIPHER, DATA_OFFSET_BYTES, SECTOR_SIZE, VOLUME_KEY_BYTES};
use crate::secret::Passphrase;

/// Which re-encryption an operation is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// In-place encryption of plaintext with a data shift.
    Encrypt,
    /// Replacement of the volume key.
    Reencrypt,
}

fn luks2_params(label: Option<&str>, sector_size: u32) -> CryptParamsLuks2 {
    CryptParamsLuks2 {
        pbkdf: None,
        integrity: None,
        integrity_params: None,
        data_alignment: 0,
        data_device: None,
        sector_size,
        label: label.map(String::from),
        subsystem: None,
    }
}

/// How a volume-key change protects the hotzone in flight, so that a crash mid-hotzone can be
/// recovered (in-place encryption always uses `datashift`: the moved data is its own copy).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Resilience {
    /// Checksums of the hotzone's blocks in the keyslot area (cryptsetup's default): a hash per
    /// block while running; a recovery reads the hotzone back and hashes it to tell which
    /// blocks were already written.
    #[default]
    Checksum,
    /// A copy of the hotzone in the keyslot area: every hotzone is written twice while running
    /// (and limited to the free keyslot area); a recovery copies it back.
    Journal,
}

impl Resilience {
    /// libcryptsetup's name of the mode.
    pub fn as_str(self) -> &'static str {
        match self {
            Resilience::Checksum => "checksum",
            Resilience::Journal => "journal",
        }
    }
}

/// How a re-encryption run cuts its work: the largest hotzone and, for a volume-key change, the
/// mode that protects it. libcryptsetup reads both again on every resume, so a later run may
/// change them (a recovery uses what the header recorded).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hotzone {
    /// Largest hotzone in bytes (a multiple of 512).
    pub bytes: u64,
    /// The protection of a volume-key change's hotzone.
    pub resilience: Resilience,
}

/// Re-encryption parameters. `sector_size` matters only where a run is initialised (the new
/// segment's sector); a resume or a recovery reads the rest from the header, except the
/// hotzone's size and protection, which a resume may change.
fn params(
    kind: Kind,
    flags: CryptReencrypt,
    hotzone: Hotzone,
    sector_size: u32,
) -> CryptParamsReencrypt {
    let (mode, direction, resilience, data_shift) = match kind {
        Kind::Encrypt => (
            CryptReencryptModeInfo::Encrypt,
            CryptReencryptDirectionInfo::Backward,
            "datashift",
            DATA_OFFSET_BYTES / 512,
        ),
        Kind::Reencrypt => (
            CryptReencryptModeInfo::Reencrypt,
            CryptReencryptDirectionInfo::Forward,
            hotzone.resilience.as_str(),
            0,
        ),
    };
    CryptParamsReencrypt {
        mode,
        direction,
        resilience: resilience.to_string(),
        hash: "sha256".to_string(),
        data_shift,
        max_hotzone_size: hotzone.bytes / 512,
        device_size: 0,
        luks2: Some(luks2_params(None, sector_size)),
        flags,
    }
}

/// What the header made by [`prepare_in_place`] says about itself.
#[derive(Debug, Clone, Copy)]
pub struct InPlaceHeader<'a> {
    /// The LUKS2 UUID.
    pub uuid: uuid::Uuid,
    /// The LUKS2 label.
    pub label: &'a str,
    /// The keyslot of the passphrase (`None`: the first free one).
    pub keyslot: Option<u32>,
    /// Where the volume key comes from, recorded in the cryptfs marker token: `InPlace` on a
    /// device, `Image` for a CI image made on the build host (shared by every device flashed
    /// from it, so the device re-encrypts even with an empty journal).
    pub origin: cryptfs_states::VolumeKeyOrigin,
    /// The PBKDF2 hash of the passphrase's keyslot (1000 iterations either way). It is also
    /// the keyslot's anti-forensic hash: `sha256` gives the layout of a keyslot the
    /// cryptsetup CLI makes (its AF hash default), systemd's token keyslots use `sha512`.
    pub pbkdf_hash: &'a str,
    /// The encryption sector size (512 or 4096), already checked against the filesystem's
    /// block size and the device's length.
    pub sector_size: u32,
}

/// Formats a detached LUKS2 header in `temp_header` for in-place encryption of `device` and
/// initialises the encryption there (this moves the first 16 MiB of data to the free tail).
///
/// Precondition: the filesystem on `device` ends at least 32 MiB before the device's end.
/// Writes to `device` only in its last 32 MiB (the space the shrink freed). Safe to repeat from
/// scratch as long as the header has not been placed on the device. `token` receives the new
/// keyslot number and returns the KEK token to store in the same header (if any), so that the
/// volume is token-enrolled from its first byte on disk. The passphrase's keyslot uses PBKDF2
/// with 1000 iterations: a KEK secret has full entropy, and the passphrase of a CI image is
/// public, so a costly KDF would only slow every first boot.
pub fn prepare_in_place(
    device: &Path,
    temp_header: &Path,
    header: &InPlaceHeader<'_>,
    passphrase: &Passphrase,
    hotzone: Hotzone,
    token: impl FnOnce(u32) -> Option<serde_json::Value>,
) -> crate::Result<u32> {
    // Key material (the keyslot area): created afresh, never through an existing file or a
    // symlink planted there (O_EXCL), and private from its first byte (mode 0600, whatever the
    // umask). The caller removes a stale copy of its own before.
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(temp_header)
        .with_context(|| format!("cannot create {}", temp_header.display()))?;
    file.set_len(4096)?;
    drop(file);
    let mut cd =
        CryptInit::init_with_data_device(libcryptsetup_rs::Either::Right((temp_header, device)))
            .context("libcryptsetup cannot open the temporary header")?;
    cd.settings_handle()
        .set_pbkdf_type(&super::device::pbkdf2(header.pbkdf_hash))?;
    cd.set_data_offset(DATA_OFFSET_BYTES / 512)?;
    let luks2 = luks2_params(Some(header.label), header.sector_size);
    let mut luks2_ref: CryptParamsLuks2Ref<'_> = (&luks2).try_into()?;
    cd.context_handle()
        .format(
            EncryptionFormat::Luks2,
            CIPHER,
            Some(header.uuid),
            libcryptsetup_rs::Either::Right(VOLUME_KEY_BYTES),
            Some(&mut luks2_ref),
        )
        .context("cannot format the temporary LUKS2 header")?;
    let keyslot = cd
        .keyslot_handle()
        .add_by_key(
            header.keyslot,
            None,
            passphrase.expose(),
            NO_VOLUME_KEY_FLAGS,
        )
        .context("cannot add the passphrase keyslot to the temporary header")?;
    if let Some(token) = token(keyslot) {
        cd.token_handle()
            .json_set(libcryptsetup_rs::TokenInput::AddToken(&token))
            .context("cannot add the KEK token to the temporary header")?;
    }
    let digest = match super::metadata::read(temp_header)? {
        super::metadata::HeaderKind::Luks2(meta) => meta.segment_digest().map(String::from),
        _ => None,
    }
    .context("the temporary header has no volume key digest")?;
    cd.token_handle()
        .json_set(libcryptsetup_rs::TokenInput::AddToken(
            &super::marker::token(header.origin, &digest),
        ))
        .context("cannot add the cryptfs marker to the temporary header")?;
    cd.reencrypt_handle()
        .reencrypt_init_by_passphrase(
            None,
            passphrase.expose(),
            None,
            Some(keyslot),
            Some(CIPHER),
            params(
                Kind::Encrypt,
                CryptReencrypt::INITIALIZE_ONLY | CryptReencrypt::MOVE_FIRST_SEGMENT,
                hotzone,
                header.sector_size,
            ),
        )
        .context("cannot initialise in-place encryption")?;
    Ok(keyslot)
}

/// Marks the header of `device` for volume-key replacement (the reference's `--init-only`).
///
/// As the cryptsetup CLI does: a keyslot with a fresh, unbound volume key is added for the same
/// passphrase (PBKDF2 like the token's), every token of the old keyslot is assigned to it too,
/// then the header is marked. A crash before the mark leaves an extra keyslot that the token
/// also names; repeating this call adds another one, and the re-encryption's completion drops
/// every keyslot of the old key. The mark is done without the mapping name, as `--init-only`
/// does: the run that follows decides online or offline. `sector_size` is the volume's own
/// (the caller reads it from the header): libcryptsetup would otherwise re-encrypt into the
/// sector size of the parameters, and a 4096-byte image would fall back to 512.
pub fn init_volume_key_change(
    device: &Path,
    passphrase: &Passphrase,
    keyslot: u32,
    hotzone: Hotzone,
    sector_size: u32,
) -> crate::Result<u32> {
    let mut cd = open(device)?;
    cd.settings_handle().set_pbkdf_type(&token_pbkdf())?;
    let new_keyslot = cd
        .keyslot_handle()
        .add_by_key(
            None,
            Some(libcryptsetup_rs::Either::Right(VOLUME_KEY_BYTES)),
            passphrase.expose(),
            CryptVolumeKey::NO_SEGMENT,
        )
        .context("cannot add a keyslot for the new volume key")?;
    for token in 0..32u32 {
        if cd
            .token_handle()
            .is_assigned(token, keyslot)
            .unwrap_or(false)
        {
            cd.token_handle()
                .assign_keyslot(token, Some(new_keyslot))
                .with_context(|| format!("cannot assign token {token} to keyslot {new_keyslot}"))?;
        }
    }
    cd.reencrypt_handle()
        .reencrypt_init_by_passphrase(
            None,
            passphrase.expose(),
            Some(keyslot),
            Some(new_keyslot),
            Some(CIPHER),
            params(
                Kind::Reencrypt,
                CryptReencrypt::INITIALIZE_ONLY,
                hotzone,
                sector_size,
            ),
        )
        .context("cannot initialise re-encryption with a new volume key")?;
    Ok(new_keyslot)
}

/// Parameters for a status query: libcryptsetup reads nothing of them.
const STATUS_ONLY: Hotzone = Hotzone {
    bytes: 0,
    resilience: Resilience::Checksum,
};

/// The re-encryption status libcryptsetup reports for `device`.
pub fn status(device: &Path) -> crate::Result<CryptReencryptInfo> {
    let mut cd = open(device)?;
    Ok(cd.reencrypt_handle().status(params(
        Kind::Reencrypt,
        CryptReencrypt::empty(),
        STATUS_ONLY,
        SECTOR_SIZE,
    ))?)
}

/// Receives progress: `(bytes done, bytes total)`; returning `false` stops the run cleanly
/// between hotzones (it stays resumable).
pub type ProgressFn<'a> = dyn FnMut(u64, u64) -> bool + 'a;

struct Sink<'a, 'b> {
    callback: &'a mut ProgressFn<'b>,
}

extern "C" fn progress_trampoline(size: u64, offset: u64, usrptr: *mut c_void) -> i32 {
    // SAFETY: usrptr is the `Sink` passed to `reencrypt2` below, alive for the whole run.
    let sink = unsafe { usrptr.cast::<Sink<'_, '_>>().as_mut() };
    match sink {
        Some(sink) => {
            let keep_going = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                (sink.callback)(offset, size)
            }))
            .unwrap_or(false);
            i32::from(!keep_going)
        }
        None => 0,
    }
}

/// Performs libcryptsetup's crash recovery of the hotzone when the header says the last run was
/// interrupted; returns whether it did.
pub fn recover_if_crashed(
    device: &Path,
    kind: Kind,
    active_name: Option<&str>,
    passphrase: &Passphrase,
    hotzone: Hotzone,
) -> crate::Result<bool> {
    let mut cd = open(device)?;
    let info = cd.reencrypt_handle().status(params(
        kind,
        CryptReencrypt::empty(),
        STATUS_ONLY,
        SECTOR_SIZE,
    ))?;
    match info {
        CryptReencryptInfo::None => bail!("{} has no re-encryption to run", device.display()),
        CryptReencryptInfo::Invalid => bail!(
            "the re-encryption metadata of {} is invalid",
            device.display()
        ),
        CryptReencryptInfo::Clean => Ok(false),
        CryptReencryptInfo::Crash => {
            tracing::info!("re-encryption was interrupted; recovering the hotzone first");
            cd.reencrypt_handle()
                .reencrypt_init_by_passphrase(
                    active_name,
                    passphrase.expose(),
                    None,
                    None,
                    None,
                    params(kind, CryptReencrypt::RECOVERY, hotzone, SECTOR_SIZE),
                )
                .context("re-encryption crash recovery failed")?;
            Ok(true)
        }
    }
}

/// Resumes an initialised, clean re-encryption of `device` and runs it to its end (or until
/// `progress` says stop). Callers must first rule out the all-data-on-final-key state
/// (`finalize::all_data_on_final_key`), in which libcryptsetup would restart from offset 0.
pub fn resume(
    device: &Path,
    kind: Kind,
    active_name: Option<&str>,
    passphrase: &Passphrase,
    hotzone: Hotzone,
    progress: &mut ProgressFn<'_>,
) -> crate::Result<()> {
    let mut cd = open(device)?;
    cd.reencrypt_handle()
        .reencrypt_init_by_passphrase(
            active_name,
            passphrase.expose(),
            None,
            None,
            None,
            params(kind, CryptReencrypt::RESUME_ONLY, hotzone, SECTOR_SIZE),
        )
        .context("cannot load the re-encryption context")?;
    // The trampoline only sees a thin pointer, so the (fat) callback travels inside a Sink.
    let mut sink = Sink { callback: progress };
    cd.reencrypt_handle()
        .reencrypt2(Some(progress_trampoline), Some(&mut sink))
        .context("re-encryption failed")?;
    Ok(())
}
