//! The TOML configuration.
//!
//! ```toml
//! device = "/dev/disk/by-label/otaroot"   # the root partition (plain ext4 or LUKS2)
//! boot_dir = "/boot"                      # unencrypted boot partition, mounted
//! label = "otaroot"                       # LUKS2 label after in-place encryption
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
//! hotzone_size = 8388608       # bytes; bounds crash-recovery time
//! policy = "when-from-image"   # or "always" / "never"
//! resume = "initramfs"         # or "background": after a crash, the initramfs only repairs
//!                              # and the userspace service finishes the job
//! ```

use std::path::{Path, PathBuf};

use anyhow::Context;
use cryptfs_states::{ReencryptPolicy, ResumePolicy};
use serde::Deserialize;

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
}

impl Default for Tpm2Config {
    fn default() -> Self {
        Tpm2Config {
            tcti: default_tcti(),
            pcrs: default_pcrs(),
            pcr_bank: default_bank(),
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

/// `[reencrypt]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReencryptConfig {
    /// Largest hotzone in bytes: bounds crash-recovery time (see design/).
    #[serde(default = "default_hotzone")]
    pub hotzone_size: u64,
    /// When the volume key is replaced.
    #[serde(default)]
    pub policy: ReencryptPolicy,
    /// Where a re-encryption interrupted by a reboot or power cut is finished.
    #[serde(default)]
    pub resume: ResumePolicy,
}

impl Default for ReencryptConfig {
    fn default() -> Self {
        ReencryptConfig {
            hotzone_size: default_hotzone(),
            policy: ReencryptPolicy::default(),
            resume: ResumePolicy::default(),
        }
    }
}

fn default_hotzone() -> u64 {
    8 * 1024 * 1024
}

/// The largest configuration file read.
pub const MAX_CONFIG_BYTES: u64 = 64 * 1024;

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
                let mut bytes =
                    zeroize::Zeroizing::new(std::fs::read(path).with_context(|| {
                        format!("cannot read image passphrase file {}", path.display())
                    })?);
                while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                    bytes.pop();
                }
                Ok(crate::secret::Passphrase::new(bytes.to_vec()))
            }
        }
    }
}
