//! Command-line interface.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

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
        #[arg(long)]
        config: PathBuf,
        /// Which stage.
        #[arg(long, value_enum, default_value_t = StageArg::All)]
        stage: StageArg,
    },
    /// Show state, journal, device facts and progress.
    Status {
        /// Configuration file.
        #[arg(long)]
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
        #[arg(long)]
        config: PathBuf,
        /// Only test the unlock; activate nothing.
        #[arg(long)]
        test: bool,
        /// Print only the path of the active mapping on stdout (for the initramfs module).
        #[arg(long, conflicts_with = "test")]
        device_path: bool,
    },
    /// Unlock with the KEK token (no activation) and write the decrypted filesystem image to
    /// a file, for offline checks on machines without dm-crypt (demo, tests).
    #[command(hide = true)]
    ExportPlaintext {
        /// Configuration file.
        #[arg(long)]
        config: PathBuf,
        /// Output file.
        #[arg(long)]
        out: PathBuf,
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
