//! The six provisioning states and how they follow from observed facts.

use serde::{Deserialize, Serialize};
use std::fmt;

use crate::facts::{DeviceFacts, Facts, ReencryptMode};

/// Where a device stands on its way to a token-protected, re-encrypted, backed-up volume.
///
/// The spelling of each state in JSON and logs is fixed (kebab-case) because status consumers
/// and the journal rely on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "kebab-case")]
pub enum ProvisioningState {
    /// Plain ext4 (possibly in the middle of in-place encryption: data is not yet all encrypted).
    Unencrypted,
    /// LUKS2, opened by a passphrase only (the CI image); no KEK token yet.
    EncryptedWithPassphrase,
    /// A KEK token and its keyslot exist; the passphrase may still need wiping or the
    /// re-encryption may still need initialising.
    KekEnrolled,
    /// Re-encryption with a new volume key is initialised or under way.
    Reencrypting,
    /// All data is under a device-unique volume key that only the KEK opens.
    Complete,
    /// Complete, and a verified LUKS2 header backup exists on the boot partition.
    HeaderBackedUp,
}

impl ProvisioningState {
    /// All states in their order along the provisioning path.
    pub const ALL: [ProvisioningState; 6] = [
        ProvisioningState::Unencrypted,
        ProvisioningState::EncryptedWithPassphrase,
        ProvisioningState::KekEnrolled,
        ProvisioningState::Reencrypting,
        ProvisioningState::Complete,
        ProvisioningState::HeaderBackedUp,
    ];

    /// The state's fixed name, as in JSON and logs.
    pub fn name(self) -> &'static str {
        match self {
            ProvisioningState::Unencrypted => "unencrypted",
            ProvisioningState::EncryptedWithPassphrase => "encrypted-with-passphrase",
            ProvisioningState::KekEnrolled => "kek-enrolled",
            ProvisioningState::Reencrypting => "reencrypting",
            ProvisioningState::Complete => "complete",
            ProvisioningState::HeaderBackedUp => "header-backed-up",
        }
    }
}

impl fmt::Display for ProvisioningState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Derives the provisioning state from what was observed.
///
/// The LUKS2 metadata is the ground truth; the journal only decides what the metadata cannot:
/// whether the volume key still needs replacing and whether the header backup was taken.
pub fn derive_state(facts: &Facts) -> ProvisioningState {
    let luks = match &facts.device {
        DeviceFacts::PlainExt4 => return ProvisioningState::Unencrypted,
        DeviceFacts::Luks2(luks) => luks,
    };
    match luks.reencrypt {
        Some(ReencryptMode::Encrypt) => return ProvisioningState::Unencrypted,
        Some(ReencryptMode::Reencrypt) => return ProvisioningState::Reencrypting,
        None => {}
    }
    if !luks.kek_token {
        return ProvisioningState::EncryptedWithPassphrase;
    }
    if !luks.passphrase_keyslots.is_empty() || facts.reencrypt_required() {
        return ProvisioningState::KekEnrolled;
    }
    if facts.backup_verified {
        ProvisioningState::HeaderBackedUp
    } else {
        ProvisioningState::Complete
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_the_documented_spelling_in_json() {
        let json: Vec<String> = ProvisioningState::ALL
            .iter()
            .map(|s| serde_json::to_string(s).expect("serialise"))
            .collect();
        assert_eq!(
            json,
            [
                "\"unencrypted\"",
                "\"encrypted-with-passphrase\"",
                "\"kek-enrolled\"",
                "\"reencrypting\"",
                "\"complete\"",
                "\"header-backed-up\""
            ]
        );
        for s in ProvisioningState::ALL {
            assert_eq!(format!("\"{s}\""), serde_json::to_string(&s).expect("json"));
        }
    }
}
