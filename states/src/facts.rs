//! Observations the orchestrator hands to the core, and the user's policy.

use serde::{Deserialize, Serialize};

/// What the device's own metadata says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceFacts {
    /// A plain ext4 filesystem, no LUKS header.
    PlainExt4,
    /// A LUKS2 volume.
    Luks2(Luks2Facts),
}

/// The facts of a LUKS2 header that matter for provisioning.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Luks2Facts {
    /// A KEK token (systemd-tpm2 / systemd-pkcs11 of the configured kind) bound to a keyslot.
    pub kek_token: bool,
    /// Keyslots that no token references: passphrases, to be wiped once the KEK works.
    pub passphrase_keyslots: Vec<u32>,
    /// An unfinished LUKS2 re-encryption, if the header carries the requirement.
    pub reencrypt: Option<ReencryptMode>,
    /// The unfinished re-encryption needs repair before the volume may be activated: a hotzone
    /// was in flight when the last run stopped, or every byte is already on the final key with
    /// the metadata unfinished (windows A and B).
    #[serde(default)]
    pub reencrypt_needs_repair: bool,
    /// A `systemd-recovery` token names an existing keyslot.
    #[serde(default)]
    pub recovery_token: bool,
}

/// Which kind of LUKS2 re-encryption the header has in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReencryptMode {
    /// In-place encryption of plaintext (data shift).
    Encrypt,
    /// Replacement of the volume key.
    Reencrypt,
}

/// Where the current volume key came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VolumeKeyOrigin {
    /// Made by CI and shared by every device flashed from the same image.
    Image,
    /// Generated on this device by in-place encryption.
    InPlace,
    /// Generated on this device by a finished re-encryption.
    Reencrypted,
}

/// What the journal remembers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalFacts {
    /// Origin of the volume key, when the journal knows it.
    pub volume_key_origin: Option<VolumeKeyOrigin>,
    /// Whether re-encryption was initialised during the current boot (then it belongs to the
    /// userspace stage; if it was initialised in an earlier boot, the initramfs finishes it).
    pub reencrypt_initialised_this_boot: bool,
    /// Whether the filesystem was already grown after completion.
    pub filesystem_grown: bool,
}

/// Progress of a running or interrupted re-encryption, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReencryptProgress {
    /// Bytes already processed.
    pub done: u64,
    /// Bytes in total.
    pub total: u64,
}

/// Everything the core needs to know to decide.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Facts {
    /// The device's metadata.
    pub device: DeviceFacts,
    /// The journal's memory.
    pub journal: JournalFacts,
    /// A header backup exists and its digest matches the journal.
    pub backup_verified: bool,
    /// The volume is active (mapped), so online operations and filesystem growth are possible.
    pub mapping_active: bool,
    /// The user's policy.
    pub policy: Policy,
}

/// When to replace the volume key.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReencryptPolicy {
    /// Replace it when it came from the image (or when its origin is unknown: the safe side).
    #[default]
    WhenFromImage,
    /// Always replace it, also after in-place encryption.
    Always,
    /// Never replace it (not recommended for CI images: every device shares the key).
    Never,
}

/// Where a re-encryption left unfinished by an earlier boot is finished.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ResumePolicy {
    /// In the initramfs, blocking the boot until done (the reference's behaviour).
    #[default]
    Initramfs,
    /// The initramfs only repairs what a crash left (hotzone recovery, finalisation) so the
    /// volume can be activated; the userspace service finishes it in the background.
    Background,
}

/// The user's choices that change the plan.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// When re-encryption is required.
    pub reencrypt: ReencryptPolicy,
    /// Where an interrupted re-encryption is finished.
    #[serde(default)]
    pub resume: ResumePolicy,
    /// A recovery key is to be enrolled (`[recovery] enabled`).
    #[serde(default)]
    pub recovery: bool,
}

impl Facts {
    /// Whether the volume key must still be replaced.
    ///
    /// Only meaningful once no re-encryption is in flight. An unknown origin (a journal lost
    /// and rebuilt) counts as "from the image": re-encrypting costs time, keeping a key shared by
    /// a whole fleet costs security.
    pub fn reencrypt_required(&self) -> bool {
        let origin = self.journal.volume_key_origin;
        match self.policy.reencrypt {
            ReencryptPolicy::Never => false,
            ReencryptPolicy::Always => origin != Some(VolumeKeyOrigin::Reencrypted),
            ReencryptPolicy::WhenFromImage => matches!(origin, None | Some(VolumeKeyOrigin::Image)),
        }
    }
}
