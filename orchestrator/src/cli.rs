//! Command-line interface.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

/// Where the configuration lives unless `--config` says otherwise (the unit and the initramfs
/// module use this path too).
pub const DEFAULT_CONFIG: &str = "/etc/cryptfs/cryptfs.toml";

/// cryptfs: encrypt the root filesystem with a per-device, TPM-protected key, unattended and
/// power-cut safe.
#[derive(Debug, Parser)]
#[command(name = "cryptfs", version)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a provisioning stage until it has nothing left to do.
    Run {
        /// Configuration file.
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Which stage.
        #[arg(long, value_enum, default_value_t = StageArg::All)]
        stage: StageArg,
    },
    /// Show state, journal, device facts and progress.
    Status {
        /// Configuration file.
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Unlock the volume with this device's KEK token and activate it as
    /// `/dev/mapper/<mapping_name>` (initramfs); with `--test`, only say which token and keyslot
    /// open it.
    Unlock {
        /// Configuration file.
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Only test the unlock; activate nothing.
        #[arg(long)]
        test: bool,
        /// Print only the path of the active mapping on stdout (for the initramfs module).
        #[arg(long, conflicts_with = "test")]
        device_path: bool,
        /// Open with the recovery key read from FILE (`-` = standard input) instead of the
        /// KEK token.
        #[arg(long, value_name = "FILE")]
        recovery_key_file: Option<PathBuf>,
    },
    /// Seal the KEK to new PCR values (after a firmware or Secure Boot database update, or to
    /// rotate it): the new token and keyslot are added and proven before the old ones go.
    /// Without flags: replace every KEK token with one sealed to this boot's values.
    Reseal {
        /// Configuration file.
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Open the volume with the recovery key read from FILE (`-` = standard input): when
        /// PCR 7 changed and the TPM refuses the current token.
        #[arg(long, value_name = "FILE", conflicts_with = "finish")]
        recovery_key_file: Option<PathBuf>,
        /// Before a planned update: add a token for the predicted PCR 7 value beside the
        /// current ones.
        #[arg(long, requires = "pcr7", conflicts_with = "finish")]
        prepare: bool,
        /// The predicted PCR 7 value, hex, in the configured bank (with `--prepare`).
        #[arg(long, value_name = "HEX", requires = "prepare")]
        pcr7: Option<String>,
        /// After the update: drop the tokens this boot's PCR values no longer satisfy (never
        /// the last one that does).
        #[arg(long)]
        finish: bool,
    },
    /// Build-host commands on image files (no TPM, no journal).
    Image {
        /// Which one.
        #[command(subcommand)]
        command: ImageCommand,
    },
    /// Unlock with the KEK token (no activation) and write the decrypted filesystem image to
    /// a file, for offline checks on machines without dm-crypt (demo, tests). Only in builds
    /// with the `test-hooks` feature: a shipped binary has no way to write the plaintext out.
    #[cfg(feature = "test-hooks")]
    #[command(hide = true)]
    ExportPlaintext {
        /// Configuration file.
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Output file.
        #[arg(long)]
        out: PathBuf,
    },
    /// Repair the online re-encryption stack after its process died in a hotzone (SIGKILL):
    /// when `<mapping_name>-hotzone-forward` (or another device of the stack) is suspended,
    /// complete or recover the hotzone through libcryptsetup, resume the devices and give the
    /// mapping back its table. Exits 0 at once when nothing is suspended. Run by
    /// cryptfs.service's `ExecStopPost=` from a copy in /run/cryptfs, and at the start of the
    /// userspace stage.
    RecoverOnline {
        /// Configuration file.
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// systemd generator (installed as `cryptfs-generator`): writes a drop-in that makes
    /// cryptfs.service require the mounts of the configured boot_dir and journal.
    #[command(hide = true)]
    SystemdGenerator {
        /// Configuration file.
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// systemd's "normal" generator directory (the first of the three it passes).
        normal_dir: PathBuf,
        /// The "early" directory (unused).
        early_dir: Option<PathBuf>,
        /// The "late" directory (unused).
        late_dir: Option<PathBuf>,
    },
}

/// `cryptfs image …`.
#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Make the CI LUKS2 image the reference's CI makes, in place: e2fsck, shrink by 32 MiB,
    /// encrypt with a 16 MiB data offset, the well-known passphrase in one keyslot (cheap
    /// PBKDF2: the passphrase is public), the label kept, and cryptfs's key-origin marker, so
    /// that every device re-encrypts it on first boot. Resumes an interrupted run.
    Encrypt {
        /// The image: a plain ext4 partition image, or a disk image with `--partition`.
        #[arg(long, value_name = "FILE")]
        image: PathBuf,
        /// Partition number (1-based) of the root filesystem in a GPT or MBR disk image.
        #[arg(long, value_name = "N")]
        partition: Option<u32>,
        /// File holding the CI passphrase (trailing newline ignored; mode 0600).
        #[arg(long, value_name = "FILE")]
        passphrase_file: PathBuf,
        /// Keyslot of the passphrase.
        #[arg(long, default_value_t = crate::image::DEFAULT_KEYSLOT)]
        keyslot: u32,
        /// LUKS2 label.
        #[arg(long, default_value = crate::image::DEFAULT_LABEL)]
        label: String,
        /// Encryption sector size: 512 (the reference's), 4096 (refused over smaller
        /// filesystem blocks) or auto (4096 when the filesystem's blocks allow it). A device
        /// keeps it through its first-boot volume-key change.
        #[arg(long, value_name = "512|4096|auto", default_value = "512")]
        sector_size: crate::config::SectorSize,
    },
}

/// `--stage`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StageArg {
    /// Early boot.
    Initramfs,
    /// The running system.
    Userspace,
    /// Everything, offline.
    All,
}

impl From<StageArg> for cryptfs_states::Stage {
    fn from(s: StageArg) -> Self {
        match s {
            StageArg::Initramfs => cryptfs_states::Stage::Initramfs,
            StageArg::Userspace => cryptfs_states::Stage::Userspace,
            StageArg::All => cryptfs_states::Stage::All,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_to_the_path_the_unit_and_the_module_use() {
        let cli = Cli::try_parse_from(["cryptfs", "status"]).expect("parses");
        match cli.command {
            Command::Status { config, .. } => assert_eq!(config, PathBuf::from(DEFAULT_CONFIG)),
            other => panic!("{other:?}"),
        }
        let unit = include_str!("../../units/cryptfs.service");
        let module = include_str!("../../units/initramfs-framework/cryptfs");
        assert!(unit.contains(DEFAULT_CONFIG) && module.contains(DEFAULT_CONFIG));
    }

    /// `export-plaintext` exists exactly when the `test-hooks` feature is on. The tests build
    /// with `--all-features`; `cargo test -p cryptfs --lib` (no features) checks the shipped
    /// side.
    #[test]
    fn export_plaintext_exists_only_with_test_hooks() {
        let parsed =
            Cli::try_parse_from(["cryptfs", "export-plaintext", "--out", "/tmp/x"]).map(|_| ());
        assert_eq!(parsed.is_ok(), cfg!(feature = "test-hooks"), "{parsed:?}");
    }

    /// Likewise `CRYPTFS_BOOT_ID`: honoured with `test-hooks`, ignored without.
    #[test]
    fn boot_id_override_exists_only_with_test_hooks() {
        std::env::set_var("CRYPTFS_BOOT_ID", "simulated-boot");
        let id = crate::record::boot_id();
        assert_eq!(id == "simulated-boot", cfg!(feature = "test-hooks"), "{id}");
    }
}
