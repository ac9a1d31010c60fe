//! The hand-off of the keyslot passphrase from the initramfs to the rest of the boot through
//! the kernel keyring, as systemd-cryptsetup hands keys on (design/boot.md, boot-phase lock).
//!
//! After the boot-phase lock no process of this boot can unseal the KEK, so the initramfs
//! stage, once the unsealed passphrase has proved to open the device, stores it as a `user`
//! key `cryptfs:<boot id>:<LUKS UUID>` in root's user keyring. The userspace stage, activation
//! and `reseal` read it instead of unsealing.
//!
//! Lifetime: this boot only (the keyring lives in kernel memory). It is kept for the whole
//! boot, not revoked when the userspace stage ends: an OTA agent's `reseal --prepare` runs
//! hours later and needs the passphrase to add the new keyslot. Permissions: view, read and
//! search for the possessor and for uid 0, nothing else (no write, no setattr, no link), so
//! any root process of this boot can read it, as it can read the mapped data. It never goes
//! to a file, a log or the journal.

use anyhow::{anyhow, bail};

use crate::secret::Passphrase;

const KEY_SPEC_USER_KEYRING: libc::c_long = -4;
const KEYCTL_SETPERM: libc::c_long = 5;
const KEYCTL_UNLINK: libc::c_long = 9;
const KEYCTL_SEARCH: libc::c_long = 10;
const KEYCTL_READ: libc::c_long = 11;
/// view | read | search, for the possessor and for the owning user.
const PERMISSIONS: libc::c_long = 0x0b00_0000 | 0x000b_0000;
/// The largest passphrase read back (a PKCS#11 token's is 172 bytes).
const MAX_KEY_BYTES: usize = 4096;

/// The key's description for the volume `uuid` in the boot `boot_id`. The boot id keeps a
/// simulated next boot on one kernel (tests) from finding the previous boot's key.
pub fn description(boot_id: &str, uuid: &str) -> String {
    format!("cryptfs:{boot_id}:{uuid}")
}

fn cstring(text: &str) -> crate::Result<std::ffi::CString> {
    std::ffi::CString::new(text).map_err(|_| anyhow!("key description contains a NUL byte"))
}

fn search(description: &str) -> crate::Result<Option<libc::c_long>> {
    let kind = cstring("user")?;
    let desc = cstring(description)?;
    // SAFETY: keyctl(KEYCTL_SEARCH, keyring, type, description, dest) with NUL-terminated
    // strings that outlive the call; dest 0 links nothing.
    let id = unsafe {
        libc::syscall(
            libc::SYS_keyctl,
            KEYCTL_SEARCH,
            KEY_SPEC_USER_KEYRING,
            kind.as_ptr(),
            desc.as_ptr(),
            0 as libc::c_long,
        )
    };
    if id >= 0 {
        return Ok(Some(id));
    }
    match std::io::Error::last_os_error().raw_os_error() {
        Some(libc::ENOKEY) | Some(libc::EKEYREVOKED) | Some(libc::EKEYEXPIRED) => Ok(None),
        _ => Err(anyhow!(
            "cannot search the kernel keyring: {}",
            std::io::Error::last_os_error()
        )),
    }
}

/// The passphrase stored under `description`, if any.
pub fn read(description: &str) -> crate::Result<Option<Passphrase>> {
    let Some(id) = search(description)? else {
        return Ok(None);
    };
    let mut buf = zeroize::Zeroizing::new(vec![0u8; MAX_KEY_BYTES]);
    // SAFETY: KEYCTL_READ writes at most `buf.len()` bytes into `buf` and returns the key's
    // size.
    let len = unsafe {
        libc::syscall(
            libc::SYS_keyctl,
            KEYCTL_READ,
            id,
            buf.as_mut_ptr(),
            buf.len(),
        )
    };
    let len = usize::try_from(len).map_err(|_| {
        anyhow!(
            "cannot read key {description} from the kernel keyring: {}",
            std::io::Error::last_os_error()
        )
    })?;
    if len > buf.len() {
        bail!("key {description} in the kernel keyring is larger than {MAX_KEY_BYTES} bytes");
    }
    Ok(Some(Passphrase::new(buf[..len].to_vec())))
}

/// Removes the key under `description` from root's user keyring (nothing if absent).
pub fn forget(description: &str) -> crate::Result<()> {
    if let Some(id) = search(description)? {
        // SAFETY: keyctl(KEYCTL_UNLINK, key, keyring) takes two integers.
        let rc =
            unsafe { libc::syscall(libc::SYS_keyctl, KEYCTL_UNLINK, id, KEY_SPEC_USER_KEYRING) };
        if rc < 0 {
            bail!(
                "cannot remove key {description} from the kernel keyring: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(())
}

/// Stores `passphrase` under `description` in root's user keyring, replacing an earlier key
/// of that description, with the read-only permissions of the module docs.
pub fn store(description: &str, passphrase: &Passphrase) -> crate::Result<()> {
    // The key is read-only once stored, so an update in place is refused: replace it.
    forget(description)?;
    let kind = cstring("user")?;
    let desc = cstring(description)?;
    let bytes = passphrase.expose();
    // SAFETY: add_key(type, description, payload, plen, keyring) with NUL-terminated strings
    // and a payload of `plen` bytes, all outliving the call.
    let id = unsafe {
        libc::syscall(
            libc::SYS_add_key,
            kind.as_ptr(),
            desc.as_ptr(),
            bytes.as_ptr(),
            bytes.len(),
            KEY_SPEC_USER_KEYRING,
        )
    };
    if id < 0 {
        bail!(
            "cannot add key {description} to the kernel keyring: {}",
            std::io::Error::last_os_error()
        );
    }
    // SAFETY: keyctl(KEYCTL_SETPERM, key, perm) takes two integers.
    let rc = unsafe { libc::syscall(libc::SYS_keyctl, KEYCTL_SETPERM, id, PERMISSIONS) };
    if rc < 0 {
        let err = std::io::Error::last_os_error();
        // A key with the default, wider permissions is not left behind.
        let _ = forget(description);
        bail!("cannot restrict key {description} in the kernel keyring: {err}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_round_trips_read_only_and_is_forgotten() {
        let desc = description(&format!("unit-test-{}", std::process::id()), "uuid");
        let pass = Passphrase::new(b"not-a-real-passphrase".to_vec());
        store(&desc, &pass).expect("add_key works on this host");
        let back = read(&desc).expect("read").expect("present");
        assert_eq!(back.expose(), pass.expose());
        // Replacing it works although it is read-only.
        store(&desc, &Passphrase::new(b"second".to_vec())).expect("replace");
        assert_eq!(
            read(&desc).expect("read").expect("present").expose(),
            b"second"
        );
        forget(&desc).expect("forget");
        assert!(read(&desc).expect("read").is_none());
    }
}
