//! UEFI Secure Boot state from efivarfs: PCR 7 means something only when Secure Boot is on.
//!
//! PCR 7 measures the Secure Boot policy (the `SecureBoot` variable, PK, KEK, db, dbx). With
//! Secure Boot off, or in setup mode (no platform key: anyone may enroll keys), a KEK sealed to
//! PCR 7 is released to whatever boots, so the reference requires Secure Boot before it seals.
//! cryptfs reads the two variables and refuses to seal to PCR 7 when either says "not enforced".
//!
//! An efivarfs file is the variable's 4-byte attribute word (little-endian) followed by its
//! data; both variables hold one byte, 1 = on. Bytes from efivarfs are checked like any input.

use std::io::Read;
use std::path::{Path, PathBuf};

/// The EFI global variable GUID, part of each variable's efivarfs file name.
pub const EFI_GLOBAL_GUID: &str = "8be4df61-93ca-11d2-aa0d-00e098032b8c";

/// Where the kernel mounts efivarfs.
pub const DEFAULT_EFIVARS_DIR: &str = "/sys/firmware/efi/efivars";

/// The Secure Boot state the firmware reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SecureBootState {
    /// `SecureBoot` = 1: the firmware enforces signatures.
    pub enabled: bool,
    /// `SetupMode` = 1: no platform key enrolled; the key databases are open to anyone.
    pub setup_mode: bool,
}

/// Why the Secure Boot state could not be established or is not acceptable.
#[derive(Debug, thiserror::Error)]
pub enum SecureBootError {
    /// No efivarfs: a non-UEFI board, or efivarfs not mounted.
    #[error(
        "no UEFI variables at {dir} (not a UEFI boot, or efivarfs is not mounted: `mount -t \
         efivarfs efivarfs {dir}`): cannot check that Secure Boot protects PCR 7; set [kek.tpm2] \
         require_secure_boot = false to seal to PCR 7 anyway"
    )]
    NoEfivarfs {
        /// The directory looked at.
        dir: PathBuf,
    },
    /// A variable is missing or unreadable.
    #[error("cannot read the UEFI variable {name} at {path}: {source}")]
    Unreadable {
        /// Variable name.
        name: &'static str,
        /// Its file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A variable's bytes are not a 4-byte attribute word and a one-byte 0/1 value.
    #[error(
        "the UEFI variable {name} at {path} is malformed ({len} bytes, expected 5 with a \
         value of 0 or 1)"
    )]
    Malformed {
        /// Variable name.
        name: &'static str,
        /// Its file.
        path: PathBuf,
        /// Bytes read (at most 6: more are not read).
        len: usize,
    },
    /// Secure Boot is off or in setup mode.
    #[error(
        "UEFI Secure Boot is {what}: PCR 7 does not protect the KEK (whatever boots could \
         unseal it), so cryptfs will not seal to it. Enable Secure Boot with the platform key \
         enrolled in the firmware setup, or set [kek.tpm2] require_secure_boot = false \
         (or drop 7 from `pcrs`) to accept that"
    )]
    NotEnforced {
        /// "off" or "in setup mode".
        what: &'static str,
    },
}

/// Reads `SecureBoot` and `SetupMode` from `efivars_dir`.
pub fn read_state(efivars_dir: &Path) -> Result<SecureBootState, SecureBootError> {
    if !efivars_dir.is_dir() {
        return Err(SecureBootError::NoEfivarfs {
            dir: efivars_dir.to_path_buf(),
        });
    }
    Ok(SecureBootState {
        enabled: read_flag(efivars_dir, "SecureBoot")?,
        setup_mode: read_flag(efivars_dir, "SetupMode")?,
    })
}

/// Succeeds only when Secure Boot is on and not in setup mode.
pub fn require_enforced(efivars_dir: &Path) -> Result<SecureBootState, SecureBootError> {
    let state = read_state(efivars_dir)?;
    if !state.enabled {
        return Err(SecureBootError::NotEnforced { what: "off" });
    }
    if state.setup_mode {
        return Err(SecureBootError::NotEnforced {
            what: "in setup mode (no platform key enrolled)",
        });
    }
    Ok(state)
}

fn read_flag(dir: &Path, name: &'static str) -> Result<bool, SecureBootError> {
    let path = dir.join(format!("{name}-{EFI_GLOBAL_GUID}"));
    let unreadable = |source| SecureBootError::Unreadable {
        name,
        path: path.clone(),
        source,
    };
    let file = std::fs::File::open(&path).map_err(unreadable)?;
    // Never more than one byte past the expected size, whatever the file claims.
    let mut bytes = Vec::with_capacity(6);
    file.take(6).read_to_end(&mut bytes).map_err(unreadable)?;
    match bytes.as_slice() {
        [_, _, _, _, value @ (0 | 1)] => Ok(*value == 1),
        _ => Err(SecureBootError::Malformed {
            name,
            path: path.clone(),
            len: bytes.len(),
        }),
    }
}

/// Writes an efivarfs-shaped directory with the two variables (tests and demos feed it to
/// `efivars_dir`; attributes NV|BS|RT as the firmware sets them).
pub fn write_fake_efivars(dir: &Path, enabled: bool, setup_mode: bool) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    for (name, value) in [("SecureBoot", enabled), ("SetupMode", setup_mode)] {
        std::fs::write(
            dir.join(format!("{name}-{EFI_GLOBAL_GUID}")),
            [0x06, 0, 0, 0, u8::from(value)],
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enforced_only_when_on_and_not_in_setup_mode() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cases = [
            (true, false, true),
            (false, false, false),
            (true, true, false),
            (false, true, false),
        ];
        for (enabled, setup, accepted) in cases {
            write_fake_efivars(dir.path(), enabled, setup).expect("write");
            assert_eq!(
                require_enforced(dir.path()).is_ok(),
                accepted,
                "SecureBoot={enabled} SetupMode={setup}"
            );
        }
    }

    #[test]
    fn missing_and_malformed_variables_are_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(matches!(
            read_state(&dir.path().join("absent")),
            Err(SecureBootError::NoEfivarfs { .. })
        ));
        assert!(matches!(
            read_state(dir.path()),
            Err(SecureBootError::Unreadable {
                name: "SecureBoot",
                ..
            })
        ));
        write_fake_efivars(dir.path(), true, false).expect("write");
        let secure_boot = dir.path().join(format!("SecureBoot-{EFI_GLOBAL_GUID}"));
        for bad in [
            &[][..],
            &[6, 0, 0, 0],
            &[6, 0, 0, 0, 2],
            &[6, 0, 0, 0, 1, 0],
        ] {
            std::fs::write(&secure_boot, bad).expect("write");
            assert!(
                matches!(
                    read_state(dir.path()),
                    Err(SecureBootError::Malformed { .. })
                ),
                "{bad:?}"
            );
        }
    }
}
