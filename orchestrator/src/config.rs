//! The TOML configuration.
//!
//! ```toml
//! device = "/dev/disk/by-label/otaroot"   # the root partition (plain ext4 or LUKS2)
//! boot_dir = "/boot"                      # unencrypted boot partition, mounted
//! label = "otaroot"                       # LUKS2 label after in-place encryption
//! # sector_size = 512      # encryption sector of in-place encryption: 512 (the reference's),
//! #                        # 4096, or "auto" (4096 when the filesystem's blocks are 4096 bytes)
//! # journal = "/boot/cryptfs/journal.redb"   (default: <boot_dir>/cryptfs/journal.redb)
//! # image_passphrase_file = "/etc/cryptfs/image-passphrase"  (default: the reference's "fiopassphrase")
//! # mapping_name = "rootfs"               # dm-crypt name when the volume is active
//!
//! [kek]
//! kind = "tpm2"
//!
//! [kek.tpm2]
//! tcti = "device:/dev/tpmrm0"
//! pcrs = [7]
//! pcr_bank = "sha256"
//! # require_secure_boot = true   (default: true when 7 is in pcrs; refuses to seal unless
//! #                               UEFI Secure Boot is on and not in setup mode)
//! # efivars_dir = "/sys/firmware/efi/efivars"
//!
//! # or, for a PKCS#11 token (the reference's OP-TEE setup):
//! # [kek]
//! # kind = "pkcs11"
//! # [kek.pkcs11]
//! # module = "/usr/lib/libckteec.so.0"
//! # token_label = "lmp"     slot = 1     key_label = "luks"     key_id = "9d"
//! # pin_file = "/etc/cryptfs/pkcs11-pin"     so_pin_file = "/etc/cryptfs/pkcs11-so-pin"
//!
//! [reencrypt]
//! hotzone_size = "8M"          # bounds crash-recovery time: bytes, or a size as cryptsetup
//!                              # reads it ("8M" = "8MiB" = 8 × 1024², "8MB" = 8 × 1000², "16384s")
//! policy = "when-from-image"   # or "always" / "never"
//! resume = "initramfs"         # or "background": after a crash, the initramfs only repairs
//!                              # and the userspace service finishes the job
//! resilience = "checksum"      # or "journal": how a volume-key change protects its hotzone
//! # max_recovery = "1s"        # size the hotzone from this crash-recovery budget and the
//!                              # rate measured over the first hotzones (hotzone_size)
//!
//! # [activation]               # dm-crypt flags, also stored in the LUKS2 header (persistent)
//! # no_read_workqueue = false  # decrypt reads in the completing context (no kcryptd queue)
//! # no_write_workqueue = false # encrypt writes in the submitting context
//!
//! # [recovery]                 # optional: a systemd-compatible recovery key keyslot
//! # enabled = true
//! # escrow_file = "/boot/recovery.key"           # written 0600 before the keyslot exists
//! # escrow_command = ["/usr/bin/upload", "--x"]  # argv, no shell; the key on stdin; exit 0
//! ```

use std::path::{Path, PathBuf};

use anyhow::Context;
use cryptfs_states::{ReencryptPolicy, ResumePolicy};
use serde::Deserialize;

use crate::luks::reencrypt::{Hotzone, Resilience};

/// The passphrase of the reference's CI images, used when no passphrase file is configured.
pub const DEFAULT_IMAGE_PASSPHRASE: &str = "fiopassphrase";

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The root device: a plain ext4 filesystem or a LUKS2 volume.
    pub device: PathBuf,
    /// The unencrypted boot partition's mount point (journal, header backup).
    pub boot_dir: PathBuf,
    /// LUKS2 label given by in-place encryption.
    #[serde(default = "default_label")]
    pub label: String,
    /// Encryption sector size of in-place encryption (a volume-key change keeps the one the
    /// volume has).
    #[serde(default)]
    pub sector_size: SectorSize,
    /// Journal file; defaults to `<boot_dir>/cryptfs/journal.redb`.
    #[serde(default)]
    pub journal: Option<PathBuf>,
    /// File holding the CI image's passphrase (trailing newline ignored).
    #[serde(default)]
    pub image_passphrase_file: Option<PathBuf>,
    /// dm-crypt mapping name of the volume when it is active.
    #[serde(default)]
    pub mapping_name: Option<String>,
    /// The KEK protector.
    pub kek: KekConfig,
    /// Re-encryption settings.
    #[serde(default)]
    pub reencrypt: ReencryptConfig,
    /// dm-crypt activation flags.
    #[serde(default)]
    pub activation: ActivationConfig,
    /// The recovery key (off unless `[recovery] enabled = true`).
    #[serde(default)]
    pub recovery: RecoveryConfig,
}

/// `[recovery]`: a recovery keyslot in systemd's format, escrowed before it is added.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecoveryConfig {
    /// Enroll a recovery key during provisioning.
    #[serde(default)]
    pub enabled: bool,
    /// File the key is written to (0600, replaced atomically).
    #[serde(default)]
    pub escrow_file: Option<PathBuf>,
    /// Command (argument vector, no shell) that receives the key on its standard input.
    #[serde(default)]
    pub escrow_command: Option<Vec<String>>,
}

impl RecoveryConfig {
    /// The escrow destinations.
    pub fn escrow(&self) -> crate::recovery::Escrow {
        crate::recovery::Escrow {
            file: self.escrow_file.clone(),
            command: self.escrow_command.clone(),
        }
    }
}

fn default_label() -> String {
    "otaroot".to_string()
}

/// Which protector keeps the KEK.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KekKind {
    /// TPM 2.0, `systemd-tpm2` token.
    Tpm2,
    /// PKCS#11 token (OP-TEE, HSM, SoftHSM2), `systemd-pkcs11` token.
    Pkcs11,
}

/// `[kek]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KekConfig {
    /// The protector kind.
    pub kind: KekKind,
    /// `[kek.tpm2]`.
    #[serde(default)]
    pub tpm2: Tpm2Config,
    /// `[kek.pkcs11]` (required with `kind = "pkcs11"`).
    #[serde(default)]
    pub pkcs11: Option<Pkcs11Config>,
}

/// `[kek.pkcs11]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pkcs11Config {
    /// Path of the PKCS#11 module (e.g. `/usr/lib/libckteec.so.0`).
    pub module: PathBuf,
    /// Label of the token that keeps the KEK.
    #[serde(default = "default_token_label")]
    pub token_label: String,
    /// Slot id to initialise when no token carries the label (the reference uses slot 1).
    #[serde(default = "default_slot")]
    pub slot: u64,
    /// File with the user PIN.
    pub pin_file: PathBuf,
    /// File with the security officer PIN (needed only to initialise the token).
    #[serde(default)]
    pub so_pin_file: Option<PathBuf>,
    /// Label of the RSA key pair and its certificate.
    #[serde(default = "default_key_label")]
    pub key_label: String,
    /// CKA_ID of the key pair and certificate, hex.
    #[serde(default = "default_key_id")]
    pub key_id: String,
}

fn default_token_label() -> String {
    "lmp".to_string()
}
fn default_slot() -> u64 {
    1
}
fn default_key_label() -> String {
    "luks".to_string()
}
fn default_key_id() -> String {
    "9d".to_string()
}

/// `[kek.tpm2]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tpm2Config {
    /// TCTI: `device:/dev/tpmrm0`, `swtpm:host=127.0.0.1,port=2321`, …
    #[serde(default = "default_tcti")]
    pub tcti: String,
    /// PCRs the KEK is sealed to.
    #[serde(default = "default_pcrs")]
    pub pcrs: Vec<u8>,
    /// PCR bank.
    #[serde(default = "default_bank")]
    pub pcr_bank: String,
    /// Refuse to seal to PCR 7 unless UEFI Secure Boot is on and out of setup mode (PCR 7
    /// protects nothing otherwise). Unset: on exactly when 7 is in `pcrs`.
    #[serde(default)]
    pub require_secure_boot: Option<bool>,
    /// Where efivarfs is mounted (tests point it at a directory of their own).
    #[serde(default = "default_efivars_dir")]
    pub efivars_dir: PathBuf,
    /// The boot-phase lock (design/boot.md): seal to `pcrs` and `lock_pcr`, and extend
    /// `lock_pcr` once the initramfs is done with the TPM, so that nothing later in the boot
    /// can unseal the KEK.
    #[serde(default = "default_boot_phase_lock")]
    pub boot_phase_lock: bool,
    /// The PCR the lock extends: 0-15 (locality 0 cannot reset them), not one of `pcrs`.
    /// 15 by default, the PCR systemd uses for its volume-key measurement.
    #[serde(default = "default_lock_pcr")]
    pub lock_pcr: u8,
}

impl Tpm2Config {
    /// Whether sealing needs UEFI Secure Boot enforced (see `require_secure_boot`).
    pub fn requires_secure_boot(&self) -> bool {
        self.require_secure_boot
            .unwrap_or_else(|| self.pcrs.contains(&7))
    }

    /// The PCRs a new token is sealed to: `pcrs`, plus `lock_pcr` when the lock is on, in
    /// ascending order (as `tpm2-pcrs` lists them).
    pub fn sealed_pcrs(&self) -> Vec<u8> {
        let mut pcrs = self.pcrs.clone();
        if self.boot_phase_lock {
            pcrs.push(self.lock_pcr);
        }
        pcrs.sort_unstable();
        pcrs.dedup();
        pcrs
    }

    /// Checks `lock_pcr` against the rules of [`Tpm2Config::lock_pcr`].
    pub fn validate(&self) -> crate::Result<()> {
        if !self.boot_phase_lock {
            return Ok(());
        }
        anyhow::ensure!(
            self.lock_pcr <= 15,
            "kek.tpm2.lock_pcr = {} cannot hold a lock: PCRs 16-23 can be reset or are \
             reserved; use one of 0-15 (15 is the default)",
            self.lock_pcr
        );
        anyhow::ensure!(
            !self.pcrs.contains(&self.lock_pcr),
            "kek.tpm2.lock_pcr = {} is also in kek.tpm2.pcrs; the lock needs a PCR of its own",
            self.lock_pcr
        );
        // The lock extends and predicts the sha256 bank only.
        anyhow::ensure!(
            self.pcr_bank == "sha256",
            "kek.tpm2.boot_phase_lock needs pcr_bank = \"sha256\" (or boot_phase_lock = false)"
        );
        Ok(())
    }
}

impl Default for Tpm2Config {
    fn default() -> Self {
        Tpm2Config {
            tcti: default_tcti(),
            pcrs: default_pcrs(),
            pcr_bank: default_bank(),
            require_secure_boot: None,
            efivars_dir: default_efivars_dir(),
            boot_phase_lock: default_boot_phase_lock(),
            lock_pcr: default_lock_pcr(),
        }
    }
}

fn default_tcti() -> String {
    "device:/dev/tpmrm0".to_string()
}
fn default_pcrs() -> Vec<u8> {
    vec![7]
}
fn default_bank() -> String {
    "sha256".to_string()
}
fn default_efivars_dir() -> PathBuf {
    PathBuf::from(crate::secure_boot::DEFAULT_EFIVARS_DIR)
}
fn default_boot_phase_lock() -> bool {
    true
}
fn default_lock_pcr() -> u8 {
    15
}

/// `[activation]`: dm-crypt performance flags. cryptfs passes them to every activation and
/// stores them in the header as LUKS2 persistent flags (before the header backup), so every later
/// activation by any LUKS2 tool, and libcryptsetup's own table reloads during an online
/// re-encryption, use them too. Both default off: `cargo xtask bench --vm` (row 5,
/// design/results/bench-vm.md) measures them against the plain mapping.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActivationConfig {
    /// dm-crypt `no_read_workqueue`: reads are decrypted where they complete instead of in
    /// kcryptd's queue.
    #[serde(default)]
    pub no_read_workqueue: bool,
    /// dm-crypt `no_write_workqueue`: writes are encrypted where they are submitted instead of
    /// in kcryptd's queue.
    #[serde(default)]
    pub no_write_workqueue: bool,
}

/// `[reencrypt]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReencryptConfig {
    /// Largest hotzone in bytes: bounds crash-recovery time (see design/). Written as an
    /// integer (bytes) or a string with cryptsetup's size suffixes (see [`parse_size`]).
    #[serde(default = "default_hotzone", deserialize_with = "deserialize_size")]
    pub hotzone_size: u64,
    /// When the volume key is replaced.
    #[serde(default)]
    pub policy: ReencryptPolicy,
    /// Where a re-encryption interrupted by a reboot or power cut is finished.
    #[serde(default)]
    pub resume: ResumePolicy,
    /// How a volume-key change protects its hotzone (`checksum` or `journal`).
    #[serde(default)]
    pub resilience: Resilience,
    /// A budget for the recovery of the hotzone a crash interrupts (`"1s"`, `"500ms"`): when
    /// set, the volume-key change measures its own rate over its first hotzones and sizes the
    /// rest from it (see `reencrypt_budget`), within [`MIN_HOTZONE`]..=[`MAX_HOTZONE`];
    /// `hotzone_size` is then the size of those first hotzones.
    #[serde(default, deserialize_with = "deserialize_duration")]
    pub max_recovery: Option<std::time::Duration>,
}

impl ReencryptConfig {
    /// The hotzone a run starts with.
    pub fn hotzone(&self) -> Hotzone {
        Hotzone {
            bytes: self.hotzone_size,
            resilience: self.resilience,
        }
    }
}

impl Default for ReencryptConfig {
    fn default() -> Self {
        ReencryptConfig {
            hotzone_size: default_hotzone(),
            policy: ReencryptPolicy::default(),
            resume: ResumePolicy::default(),
            resilience: Resilience::default(),
            max_recovery: None,
        }
    }
}

/// The smallest hotzone: libcryptsetup's per-hotzone metadata writes dominate below it.
pub const MIN_HOTZONE: u64 = 1024 * 1024;
/// The largest hotzone a recovery budget may choose.
pub const MAX_HOTZONE: u64 = 64 * 1024 * 1024;

fn default_hotzone() -> u64 {
    8 * 1024 * 1024
}

/// The encryption sector size asked for: every later I/O of the device is split into sectors
/// of this size for its whole life, so 4096 costs dm-crypt an eighth of the per-sector work of
/// 512. It may not exceed the filesystem's block size (a block would straddle two sectors and
/// a torn write could corrupt both), which is why 4096 is not the default: "auto" picks it
/// exactly when the filesystem allows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SectorSize {
    /// 512 bytes: the reference's layout.
    #[default]
    Bytes512,
    /// 4096 bytes: refused over a filesystem with smaller blocks.
    Bytes4096,
    /// 4096 when the filesystem's block size is at least 4096, else 512.
    Auto,
}

/// A sector size that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SectorSizeError {
    /// Not 512, 4096 or auto.
    #[error("invalid sector size {0:?}: use 512, 4096 or \"auto\"")]
    Invalid(String),
    /// 4096 over a filesystem whose blocks are smaller.
    #[error(
        "sector size 4096 is larger than the filesystem's {0}-byte blocks (a block would span \
         two encryption sectors); use 512 or \"auto\", or make the filesystem with 4096-byte \
         blocks (mkfs.ext4 -b 4096)"
    )]
    LargerThanBlock(u64),
}

impl SectorSize {
    /// The sector size in bytes for a filesystem of `fs_block_size`-byte blocks.
    pub fn resolve(self, fs_block_size: u64) -> Result<u32, SectorSizeError> {
        match self {
            SectorSize::Bytes512 => Ok(512),
            SectorSize::Bytes4096 if fs_block_size >= 4096 => Ok(4096),
            SectorSize::Bytes4096 => Err(SectorSizeError::LargerThanBlock(fs_block_size)),
            SectorSize::Auto if fs_block_size >= 4096 => Ok(4096),
            SectorSize::Auto => Ok(512),
        }
    }
}

impl std::str::FromStr for SectorSize {
    type Err = SectorSizeError;
    fn from_str(text: &str) -> Result<SectorSize, SectorSizeError> {
        match text {
            "512" => Ok(SectorSize::Bytes512),
            "4096" => Ok(SectorSize::Bytes4096),
            "auto" => Ok(SectorSize::Auto),
            _ => Err(SectorSizeError::Invalid(text.to_string())),
        }
    }
}

impl<'de> Deserialize<'de> for SectorSize {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Written {
            Number(u64),
            Text(String),
        }
        let text = match Written::deserialize(deserializer).map_err(|_| {
            serde::de::Error::custom("expected a sector size: 512, 4096 or \"auto\"")
        })? {
            Written::Number(n) => n.to_string(),
            Written::Text(t) => t,
        };
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// The largest configuration file read.
pub const MAX_CONFIG_BYTES: u64 = 64 * 1024;

/// A size that does not parse the way cryptsetup's `tools_string_to_size` parses it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    /// Not digits followed by an accepted suffix.
    #[error(
        "invalid size {0:?}: write bytes, or a number with one of cryptsetup's suffixes: \
         s (512-byte sectors), K/M/G/T or KiB/MiB/GiB/TiB (powers of 1024), KB/MB/GB/TB \
         (powers of 1000)"
    )]
    Invalid(String),
    /// Larger than 2^64 - 1 bytes.
    #[error("size {0:?} does not fit in 64 bits")]
    Overflow(String),
}

/// Parses a size the way the cryptsetup CLI does (`tools_string_to_size`): decimal digits, then
/// optionally one suffix letter (case-insensitive) `s` (512-byte sectors), `k`, `m`, `g` or `t`,
/// itself optionally followed by `iB` (still powers of 1024) or `B` (powers of 1000). No sign,
/// no space, no fraction; a value that overflows 64 bits is refused.
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let invalid = || SizeError::Invalid(text.to_string());
    let digits_end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, suffix) = text.split_at(digits_end);
    if digits.is_empty() {
        return Err(invalid());
    }
    let number: u64 = digits
        .parse()
        .map_err(|_| SizeError::Overflow(text.to_string()))?;
    let mut chars = suffix.chars();
    let Some(unit) = chars.next() else {
        return Ok(number);
    };
    let base: u64 = match chars.as_str() {
        "" | "iB" => 1024,
        "B" => 1000,
        _ => return Err(invalid()),
    };
    let multiplier = match unit.to_ascii_lowercase() {
        's' => Some(512),
        'k' => Some(base),
        'm' => base.checked_pow(2),
        'g' => base.checked_pow(3),
        't' => base.checked_pow(4),
        _ => return Err(invalid()),
    }
    .ok_or_else(invalid)?;
    number
        .checked_mul(multiplier)
        .ok_or_else(|| SizeError::Overflow(text.to_string()))
}

/// A duration written as a number and a unit, `ms` or `s` (`"1s"`, `"1.5s"`, `"500ms"`).
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let t = text.trim();
    let (number, scale) = if let Some(n) = t.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else {
        return Err(format!(
            "{text:?} is not a duration: write a number and a unit, ms or s (\"1s\", \"500ms\")"
        ));
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration: {number:?} is not a number"))?;
    let seconds = value * scale;
    if !seconds.is_finite() || !(0.01..=3600.0).contains(&seconds) {
        return Err(format!(
            "{text:?}: a duration must be between 10ms and 3600s"
        ));
    }
    Ok(std::time::Duration::from_secs_f64(seconds))
}

fn deserialize_duration<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<std::time::Duration>, D::Error> {
    let text = String::deserialize(deserializer)?;
    parse_duration(&text)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

fn deserialize_size<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Bytes(u64),
        Text(String),
    }
    match Size::deserialize(deserializer).map_err(|_| {
        serde::de::Error::custom(
            "expected a size: a non-negative integer (bytes) or a string such as \"8M\"",
        )
    })? {
        Size::Bytes(bytes) => Ok(bytes),
        Size::Text(text) => parse_size(&text).map_err(serde::de::Error::custom),
    }
}

impl Config {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> crate::Result<Config> {
        let mut text = String::new();
        std::fs::File::open(path)
            .and_then(|f| {
                std::io::Read::read_to_string(
                    &mut std::io::Read::take(f, MAX_CONFIG_BYTES + 1),
                    &mut text,
                )
            })
            .with_context(|| format!("cannot read configuration {}", path.display()))?;
        anyhow::ensure!(
            text.len() as u64 <= MAX_CONFIG_BYTES,
            "configuration {} is larger than 64 KiB",
            path.display()
        );
        Self::parse(&text).with_context(|| format!("invalid configuration {}", path.display()))
    }

    /// Parses and validates a configuration's text (no file access).
    pub fn parse(text: &str) -> crate::Result<Config> {
        let config: Config = toml::from_str(text)?;
        anyhow::ensure!(
            config.reencrypt.hotzone_size >= 1024 * 1024
                && config.reencrypt.hotzone_size.is_multiple_of(512),
            "reencrypt.hotzone_size must be a multiple of 512 bytes and at least 1 MiB"
        );
        anyhow::ensure!(
            !config.label.is_empty() && config.label.len() < 48,
            "label must be 1 to 47 bytes"
        );
        if config.recovery.enabled {
            anyhow::ensure!(
                config.recovery.escrow_file.is_some() || config.recovery.escrow_command.is_some(),
                "[recovery] enabled = true needs escrow_file or escrow_command: a recovery key \
                 nobody kept recovers nothing"
            );
        }
        anyhow::ensure!(
            config
                .recovery
                .escrow_command
                .as_ref()
                .is_none_or(|argv| !argv.is_empty() && !argv[0].is_empty()),
            "recovery.escrow_command must name a program: [\"/path/to/program\", \"arg\", ...]"
        );
        if config.kek.kind == KekKind::Tpm2 {
            config.kek.tpm2.validate()?;
        }
        if config.kek.kind == KekKind::Pkcs11 {
            let p = config.kek.pkcs11.as_ref().ok_or_else(|| {
                anyhow::anyhow!("kek.kind = \"pkcs11\" needs a [kek.pkcs11] section")
            })?;
            anyhow::ensure!(
                hex::decode(&p.key_id).is_ok_and(|id| !id.is_empty()),
                "kek.pkcs11.key_id must be hex, e.g. \"9d\""
            );
        }
        Ok(config)
    }

    /// The journal file.
    pub fn journal_path(&self) -> PathBuf {
        self.journal
            .clone()
            .unwrap_or_else(|| self.boot_dir.join("cryptfs").join("journal.redb"))
    }

    /// The header backup file.
    pub fn backup_path(&self) -> PathBuf {
        self.boot_dir.join("luks.bin")
    }

    /// Where in-place encryption keeps its temporary detached header: deliberately on the boot
    /// partition, never in a working directory (it is the only copy of the new keyslot until
    /// the header is placed on the device).
    pub fn temp_header_path(&self) -> PathBuf {
        self.boot_dir.join("cryptfs").join("encrypt-header.tmp")
    }

    /// The CI image's passphrase.
    pub fn image_passphrase(&self) -> crate::Result<crate::secret::Passphrase> {
        match &self.image_passphrase_file {
            None => Ok(crate::secret::Passphrase::new(
                DEFAULT_IMAGE_PASSPHRASE.as_bytes().to_vec(),
            )),
            Some(path) => {
                let bytes = crate::secret::read_secret_file(path, "image passphrase")?;
                Ok(crate::secret::Passphrase::new(bytes.to_vec()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_as_cryptsetup_parses_them() {
        let mib = 1024 * 1024;
        for (text, bytes) in [
            ("8388608", 8 * mib),
            ("8M", 8 * mib),
            ("8m", 8 * mib),
            ("8MiB", 8 * mib),
            ("8miB", 8 * mib),
            ("8MB", 8_000_000),
            ("8mB", 8_000_000),
            ("16384s", 8 * mib),
            ("16384S", 8 * mib),
            ("4K", 4096),
            ("4KB", 4000),
            ("1G", 1 << 30),
            ("1GB", 1_000_000_000),
            ("2T", 2 << 40),
            ("2TB", 2_000_000_000_000),
            ("0", 0),
        ] {
            assert_eq!(parse_size(text), Ok(bytes), "{text}");
        }
    }

    #[test]
    fn sizes_cryptsetup_refuses_are_refused() {
        for text in [
            "", "M", "-8M", "+8M", " 8M", "8 M", "8.5M", "8Mb", "8MIB", "8Mi", "8MiBB", "8P", "8E",
            "8B", "8x", "0x10",
        ] {
            assert!(
                matches!(parse_size(text), Err(SizeError::Invalid(_))),
                "{text:?} accepted: {:?}",
                parse_size(text)
            );
        }
        for text in [
            "18446744073709551616",
            "17179869184G",
            "16777216T",
            "36028797018963968s",
        ] {
            assert!(
                matches!(parse_size(text), Err(SizeError::Overflow(_))),
                "{text:?}: {:?}",
                parse_size(text)
            );
        }
        assert_eq!(parse_size("18446744073709551615"), Ok(u64::MAX));
    }

    fn tpm2(extra: &str) -> crate::Result<Config> {
        Config::parse(&format!(
            "device = \"/dev/x\"\nboot_dir = \"/boot\"\n[kek]\nkind = \"tpm2\"\n\
             [kek.tpm2]\npcrs = [7]\n{extra}\n"
        ))
    }

    #[test]
    fn boot_phase_lock_is_on_by_default_on_pcr_15() {
        let config = tpm2("").expect("valid");
        assert!(config.kek.tpm2.boot_phase_lock);
        assert_eq!(config.kek.tpm2.lock_pcr, 15);
        assert_eq!(config.kek.tpm2.sealed_pcrs(), vec![7, 15]);
        let off = tpm2("boot_phase_lock = false").expect("valid");
        assert_eq!(off.kek.tpm2.sealed_pcrs(), vec![7]);
        assert_eq!(
            tpm2("lock_pcr = 14").expect("valid").kek.tpm2.sealed_pcrs(),
            vec![7, 14]
        );
    }

    #[test]
    fn lock_pcr_must_be_unresettable_and_distinct() {
        for bad in [16, 23, 17] {
            let err = tpm2(&format!("lock_pcr = {bad}")).expect_err("resettable");
            assert!(format!("{err:#}").contains("0-15"), "{err:#}");
        }
        let err = tpm2("lock_pcr = 7").expect_err("twice");
        assert!(
            format!("{err:#}").contains("also in kek.tpm2.pcrs"),
            "{err:#}"
        );
        // Off, the lock PCR is not used and not checked.
        assert!(tpm2("boot_phase_lock = false\nlock_pcr = 7").is_ok());
    }

    #[test]
    fn sector_size_takes_512_4096_or_auto_and_never_exceeds_the_block_size() {
        let parse = |line: &str| {
            Config::parse(&format!(
                "device = \"/dev/x\"\nboot_dir = \"/boot\"\n{line}\n[kek]\nkind = \"tpm2\"\n"
            ))
        };
        let sector = |line: &str| parse(line).map(|c| c.sector_size);
        assert_eq!(sector("").expect("default"), SectorSize::Bytes512);
        assert_eq!(
            sector("sector_size = 4096").expect("4096"),
            SectorSize::Bytes4096
        );
        assert_eq!(
            sector("sector_size = \"4096\"").expect("4096"),
            SectorSize::Bytes4096
        );
        assert_eq!(
            sector("sector_size = \"auto\"").expect("auto"),
            SectorSize::Auto
        );
        for bad in ["1024", "\"2048\"", "\"Auto\"", "-1", "true"] {
            let err = parse(&format!("sector_size = {bad}")).expect_err(bad);
            assert!(format!("{err:#}").contains("sector size"), "{bad}: {err:#}");
        }
        assert_eq!(SectorSize::Bytes512.resolve(4096), Ok(512));
        assert_eq!(SectorSize::Bytes4096.resolve(4096), Ok(4096));
        assert_eq!(SectorSize::Auto.resolve(4096), Ok(4096));
        assert_eq!(SectorSize::Auto.resolve(1024), Ok(512));
        assert_eq!(
            SectorSize::Bytes4096.resolve(1024),
            Err(SectorSizeError::LargerThanBlock(1024))
        );
    }

    fn hotzone(value: &str) -> Result<u64, String> {
        #[derive(Deserialize)]
        struct Section {
            reencrypt: ReencryptConfig,
        }
        toml::from_str::<Section>(&format!("[reencrypt]\nhotzone_size = {value}\n"))
            .map(|s| s.reencrypt.hotzone_size)
            .map_err(|e| e.to_string())
    }

    fn reencrypt_section(body: &str) -> Result<ReencryptConfig, String> {
        #[derive(Deserialize)]
        struct Section {
            reencrypt: ReencryptConfig,
        }
        toml::from_str::<Section>(&format!("[reencrypt]\n{body}\n"))
            .map(|s| s.reencrypt)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn recovery_budget_and_resilience_parse_with_clear_errors() {
        let r = reencrypt_section("").expect("defaults");
        assert_eq!(r.max_recovery, None);
        assert_eq!(r.resilience, Resilience::Checksum);
        let r =
            reencrypt_section("max_recovery = \"1.5s\"\nresilience = \"journal\"").expect("set");
        assert_eq!(r.max_recovery, Some(std::time::Duration::from_millis(1500)));
        assert_eq!(r.resilience, Resilience::Journal);
        assert_eq!(
            parse_duration("500ms"),
            Ok(std::time::Duration::from_millis(500))
        );
        for bad in ["1", "1h", "-1s", "0s", "1e9s", "NaNs", "fast"] {
            let err = parse_duration(bad).expect_err(bad);
            assert!(err.contains(bad), "{bad}: {err}");
        }
        let err = reencrypt_section("resilience = \"none\"").expect_err("none");
        assert!(err.contains("checksum") && err.contains("journal"), "{err}");
    }

    #[test]
    fn hotzone_size_takes_an_integer_or_a_cryptsetup_size() {
        assert_eq!(hotzone("8388608"), Ok(8 << 20));
        assert_eq!(hotzone("\"8M\""), Ok(8 << 20));
        assert_eq!(hotzone("\"8MiB\""), Ok(8 << 20));
        assert_eq!(hotzone("\"16384s\""), Ok(8 << 20));
        let err = hotzone("\"8 MB\"").expect_err("space");
        assert!(err.contains("invalid size \"8 MB\""), "{err}");
        let err = hotzone("\"99999999999T\"").expect_err("overflow");
        assert!(err.contains("does not fit in 64 bits"), "{err}");
        let err = hotzone("-1").expect_err("negative");
        assert!(err.contains("expected a size"), "{err}");
    }
}
