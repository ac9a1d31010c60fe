//! Secrets in memory: zeroized on drop, never printed; secret files read only when their owner
//! and mode keep them private.

use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use base64::Engine;
use zeroize::Zeroizing;

/// Largest secret file cryptfs reads (a PIN or a passphrase, never a bulk file).
const SECRET_FILE_MAX_BYTES: u64 = 64 * 1024;

/// Why a secret file is refused before a byte of it is read.
#[derive(Debug, thiserror::Error)]
pub enum SecretFileError {
    /// The file cannot be opened or examined.
    #[error("cannot read the {what} file {}: {source}", path.display())]
    Io {
        /// What the file holds (e.g. "PKCS#11 PIN").
        what: String,
        /// The file.
        path: std::path::PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Not a regular file (a symlink is refused too: its target could change under us).
    #[error("the {what} file {} is not a regular file", path.display())]
    NotRegular {
        /// What the file holds.
        what: String,
        /// The file.
        path: std::path::PathBuf,
    },
    /// Group or others may read or write it.
    #[error(
        "the {what} file {} has mode {mode:04o}: a secret file must be accessible by its \
         owner only; run `chmod 600 {}`",
        path.display(),
        path.display()
    )]
    TooOpen {
        /// What the file holds.
        what: String,
        /// The file.
        path: std::path::PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// Owned by someone who is neither root nor the running user.
    #[error(
        "the {what} file {} is owned by uid {owner}: a secret file must belong to root or to \
         the user running cryptfs (uid {me}); run `chown {me} {}`",
        path.display(),
        path.display()
    )]
    ForeignOwner {
        /// What the file holds.
        what: String,
        /// The file.
        path: std::path::PathBuf,
        /// Its owner.
        owner: u32,
        /// The running user (effective uid).
        me: u32,
    },
    /// Larger than any PIN or passphrase.
    #[error("the {what} file {} is {len} bytes: too large for a PIN or passphrase", path.display())]
    TooLarge {
        /// What the file holds.
        what: String,
        /// The file.
        path: std::path::PathBuf,
        /// Its length.
        len: u64,
    },
}

/// The effective uid of this process: the owner of `/proc/self` (no libc call needed).
fn effective_uid() -> std::io::Result<u32> {
    std::fs::metadata("/proc/self").map(|m| m.uid())
}

/// Reads a PIN or passphrase file, refusing it (before reading a byte) the way OpenSSH refuses
/// a private key: unless it is a regular file owned by root or the running user with no
/// permission bits for group or others. Trailing newlines are stripped.
pub fn read_secret_file(path: &Path, what: &str) -> Result<Zeroizing<Vec<u8>>, SecretFileError> {
    let io = |source| SecretFileError::Io {
        what: what.to_string(),
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| {
            // With O_NOFOLLOW, ELOOP means the path is a symlink.
            if e.raw_os_error() == Some(libc::ELOOP) {
                SecretFileError::NotRegular {
                    what: what.to_string(),
                    path: path.to_path_buf(),
                }
            } else {
                io(e)
            }
        })?;
    let meta = file.metadata().map_err(io)?;
    check_secret_metadata(path, what, &meta, effective_uid().map_err(io)?)?;
    let mut bytes = Zeroizing::new(Vec::with_capacity(meta.len() as usize));
    (&mut file)
        .take(SECRET_FILE_MAX_BYTES)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        bytes.pop();
    }
    Ok(bytes)
}

/// The owner/mode rule of [`read_secret_file`] on already-read metadata.
fn check_secret_metadata(
    path: &Path,
    what: &str,
    meta: &std::fs::Metadata,
    me: u32,
) -> Result<(), SecretFileError> {
    if !meta.is_file() {
        return Err(SecretFileError::NotRegular {
            what: what.to_string(),
            path: path.to_path_buf(),
        });
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(SecretFileError::TooOpen {
            what: what.to_string(),
            path: path.to_path_buf(),
            mode,
        });
    }
    if meta.uid() != 0 && meta.uid() != me {
        return Err(SecretFileError::ForeignOwner {
            what: what.to_string(),
            path: path.to_path_buf(),
            owner: meta.uid(),
            me,
        });
    }
    if meta.len() > SECRET_FILE_MAX_BYTES {
        return Err(SecretFileError::TooLarge {
            what: what.to_string(),
            path: path.to_path_buf(),
            len: meta.len(),
        });
    }
    Ok(())
}

/// Raw KEK secret bytes (the data sealed by the TPM).
pub struct Secret(Zeroizing<Vec<u8>>);

impl Secret {
    /// Wraps bytes that are secret; the caller's copy should be zeroized by the caller.
    pub fn new(bytes: Vec<u8>) -> Self {
        Secret(Zeroizing::new(bytes))
    }

    /// The secret bytes.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    /// The LUKS2 keyslot passphrase systemd derives from a token secret: standard base64 with
    /// padding, no newline.
    pub fn keyslot_passphrase(&self) -> Passphrase {
        Passphrase(Zeroizing::new(
            base64::engine::general_purpose::STANDARD
                .encode(self.expose())
                .into_bytes(),
        ))
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret(<{} bytes redacted>)", self.0.len())
    }
}

/// A keyslot passphrase (the image passphrase, or one derived from a KEK secret).
pub struct Passphrase(Zeroizing<Vec<u8>>);

impl Passphrase {
    /// Wraps passphrase bytes.
    pub fn new(bytes: Vec<u8>) -> Self {
        Passphrase(Zeroizing::new(bytes))
    }

    /// The passphrase bytes.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for Passphrase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Passphrase(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_never_shows_bytes() {
        let s = Secret::new(vec![0x41; 32]);
        assert!(!format!("{s:?}").contains("AAAA"));
        assert!(!format!("{:?}", s.keyslot_passphrase()).contains("QUFB"));
        assert_eq!(s.keyslot_passphrase().expose().len(), 44);
    }

    fn secret_file(mode: u32) -> (tempfile::TempDir, std::path::PathBuf) {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("pin");
        std::fs::write(&path, "1234\n").expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        (dir, path)
    }

    #[test]
    fn a_symlink_to_a_private_file_is_refused() {
        let (dir, path) = secret_file(0o600);
        let link = dir.path().join("pin-link");
        std::os::unix::fs::symlink(&path, &link).expect("symlink");
        let err = read_secret_file(&link, "PIN").expect_err("a symlink is refused");
        assert!(matches!(err, SecretFileError::NotRegular { .. }), "{err}");
    }

    #[test]
    fn a_private_secret_file_is_read_without_its_newline() {
        for mode in [0o600, 0o400] {
            let (_dir, path) = secret_file(mode);
            let bytes = read_secret_file(&path, "PIN").expect("private file");
            assert_eq!(&bytes[..], b"1234");
        }
    }

    #[test]
    fn group_or_world_access_is_refused_with_the_chmod_fix() {
        for mode in [0o640, 0o604, 0o660, 0o602, 0o644, 0o620] {
            let (_dir, path) = secret_file(mode);
            let err = read_secret_file(&path, "PKCS#11 PIN")
                .expect_err("an open secret file must be refused")
                .to_string();
            assert!(err.contains(&path.display().to_string()), "{err}");
            assert!(err.contains(&format!("{mode:04o}")), "{err}");
            assert!(
                err.contains(&format!("chmod 600 {}", path.display())),
                "{err}"
            );
        }
    }

    #[test]
    fn a_symlink_and_a_foreign_owner_are_refused() {
        let (dir, path) = secret_file(0o600);
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&path, &link).expect("symlink");
        let err = read_secret_file(&link, "PIN")
            .expect_err("symlink")
            .to_string();
        assert!(err.contains("not a regular file"), "{err}");
        // Another user's file: as root the test gives it away for real; otherwise the rule is
        // checked on real metadata with the running user taken to be someone else.
        let meta = std::fs::metadata(&path).expect("meta");
        let err = if effective_uid().expect("uid") == 0 {
            std::os::unix::fs::chown(&path, Some(12345), None).expect("chown");
            read_secret_file(&path, "PIN").expect_err("foreign owner")
        } else {
            check_secret_metadata(&path, "PIN", &meta, meta.uid() + 1).expect_err("foreign owner")
        }
        .to_string();
        assert!(err.contains("owned by uid"), "{err}");
        assert!(err.contains(&path.display().to_string()), "{err}");
    }
}
