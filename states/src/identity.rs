//! Which device a journal belongs to.
//!
//! The journal lives on the boot partition and outlives the root partition's content: a
//! factory re-flashes root partitions. State journaled for one device (a prepared header, a
//! saved superblock, a backup digest) must never be applied to another, so every journal is
//! bound to the identity of the device it was made for, and a run that finds another device
//! keeps the old journal aside and starts from scratch.

use serde::{Deserialize, Serialize};

/// What a device is, as far as a journal binding goes: the UUID its content carries (the
/// ext4 filesystem's, or the LUKS2 header's) and its size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceIdentity {
    /// `ext4` or `luks2`.
    pub kind: String,
    /// The filesystem UUID (ext4) or the LUKS2 header UUID.
    pub uuid: String,
    /// The device's size in bytes.
    pub size_bytes: u64,
}

impl std::fmt::Display for DeviceIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} ({} bytes)", self.kind, self.uuid, self.size_bytes)
    }
}

/// What the journal says about the device it was written for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JournalBinding {
    /// The identity in the journal's latest record that carries one; `None` for a fresh
    /// journal (or one written before identities were recorded).
    pub bound: Option<DeviceIdentity>,
    /// The LUKS2 UUID an unfinished in-place encryption of the bound device gives it: once its
    /// header is placed the device carries this UUID instead of the filesystem's.
    pub in_place_luks_uuid: Option<String>,
}

/// Whether the journal may be applied to the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BindingCheck {
    /// Nothing bound yet, or the device cannot be identified (both header copies damaged,
    /// unrecognised content): the journal is used as it is.
    Unbound,
    /// The journal was written for this device.
    Matches,
    /// The journal was written for another device: keep it aside, start from scratch.
    Mismatch {
        /// The identity the journal is bound to.
        journal: DeviceIdentity,
    },
}

/// Decides whether `binding` applies to the device identified as `current`.
///
/// The same device legitimately changes identity in two ways, both ours: in-place encryption
/// turns an ext4 UUID into the LUKS2 UUID journaled in its intent, and an interrupted shrink may
/// leave an image file shorter than the journaled size (the step puts the length back). Any
/// other difference in kind, UUID or size is another device.
pub fn check_binding(binding: &JournalBinding, current: Option<&DeviceIdentity>) -> BindingCheck {
    let (Some(bound), Some(current)) = (&binding.bound, current) else {
        return BindingCheck::Unbound;
    };
    if bound == current {
        return BindingCheck::Matches;
    }
    let in_place = binding.in_place_luks_uuid.as_deref();
    let same_size = bound.size_bytes == current.size_bytes;
    let encrypted_by_us = bound.kind == "ext4"
        && current.kind == "luks2"
        && in_place == Some(current.uuid.as_str())
        && same_size;
    let shrink_truncated = bound.kind == "ext4"
        && current.kind == "ext4"
        && bound.uuid == current.uuid
        && in_place.is_some()
        && current.size_bytes < bound.size_bytes;
    if encrypted_by_us || shrink_truncated {
        BindingCheck::Matches
    } else {
        BindingCheck::Mismatch {
            journal: bound.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(kind: &str, uuid: &str, size_bytes: u64) -> DeviceIdentity {
        DeviceIdentity {
            kind: kind.into(),
            uuid: uuid.into(),
            size_bytes,
        }
    }

    fn bound(identity: DeviceIdentity, in_place: Option<&str>) -> JournalBinding {
        JournalBinding {
            bound: Some(identity),
            in_place_luks_uuid: in_place.map(String::from),
        }
    }

    #[test]
    fn fresh_journal_or_unknown_device_is_unbound() {
        let current = id("ext4", "a", 100);
        assert_eq!(
            check_binding(&JournalBinding::default(), Some(&current)),
            BindingCheck::Unbound
        );
        assert_eq!(
            check_binding(&bound(current.clone(), None), None),
            BindingCheck::Unbound
        );
    }

    #[test]
    fn same_device_matches() {
        let current = id("luks2", "l", 100);
        assert_eq!(
            check_binding(&bound(current.clone(), None), Some(&current)),
            BindingCheck::Matches
        );
    }

    #[test]
    fn our_own_in_place_encryption_matches() {
        let journal = bound(id("ext4", "fs", 100), Some("l"));
        assert_eq!(
            check_binding(&journal, Some(&id("luks2", "l", 100))),
            BindingCheck::Matches
        );
        assert_eq!(
            check_binding(&journal, Some(&id("ext4", "fs", 60))),
            BindingCheck::Matches,
            "an image file truncated by the interrupted shrink"
        );
    }

    #[test]
    fn another_device_is_a_mismatch() {
        let old = id("ext4", "fs", 100);
        let cases = [
            (bound(old.clone(), Some("l")), id("ext4", "other", 100)),
            (bound(old.clone(), Some("l")), id("luks2", "other", 100)),
            (bound(old.clone(), Some("l")), id("luks2", "l", 200)),
            (bound(old.clone(), None), id("ext4", "fs", 60)),
            (bound(old.clone(), None), id("ext4", "fs", 200)),
            (bound(id("luks2", "l", 100), None), id("ext4", "fs", 100)),
            (
                bound(id("luks2", "l", 100), Some("l")),
                id("luks2", "m", 100),
            ),
        ];
        for (journal, current) in cases {
            assert_eq!(
                check_binding(&journal, Some(&current)),
                BindingCheck::Mismatch {
                    journal: journal.bound.clone().expect("bound")
                },
                "{current}"
            );
        }
    }
}
