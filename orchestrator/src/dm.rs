//! The few device-mapper ioctls online crash recovery needs (`cryptfs recover-online`):
//! libcryptsetup exposes no way to resume, reload or alias the devices of its re-encryption
//! stack, and dmsetup may not be reachable when the root is frozen.
//!
//! Layout and numbers from `linux/dm-ioctl.h` (interface version 4).

use std::fs::File;
use std::os::unix::io::AsRawFd;

use anyhow::{anyhow, bail, Context};
use zeroize::Zeroize;

const DM_IOCTL_SIZE: usize = 312;
const DM_NAME_LEN: usize = 128;
const SPEC_SIZE: usize = 40;
const BUFFER_BYTES: usize = 64 * 1024;

const DM_DEV_CREATE: u8 = 3;
const DM_DEV_REMOVE: u8 = 4;
const DM_DEV_SUSPEND: u8 = 6;
const DM_DEV_STATUS: u8 = 7;
const DM_TABLE_LOAD: u8 = 9;
const DM_TABLE_CLEAR: u8 = 10;
const DM_TABLE_STATUS: u8 = 12;

const DM_STATUS_TABLE_FLAG: u32 = 1 << 4;
const DM_INACTIVE_PRESENT_FLAG: u32 = 1 << 6;
const DM_BUFFER_FULL_FLAG: u32 = 1 << 8;
const DM_SKIP_LOCKFS_FLAG: u32 = 1 << 10;
const DM_NOFLUSH_FLAG: u32 = 1 << 11;

/// One target of a table: `start length type params`, in 512-byte sectors. `params` may hold
/// a dm-crypt key (hex) when the kernel keyring is not used: it is wiped on drop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// First sector.
    pub start: u64,
    /// Length in sectors.
    pub length: u64,
    /// Target type (`crypt`, `linear`, …).
    pub kind: String,
    /// The target's table parameters.
    pub params: String,
}

impl Drop for Target {
    fn drop(&mut self) {
        self.params.zeroize();
    }
}

/// What `DM_DEV_STATUS` says about a device.
#[derive(Debug, Clone, Copy)]
pub struct Info {
    /// The device number (kernel encoding: major << 8 | minor for small numbers; use
    /// [`Info::major_minor`]).
    pub dev: u64,
    /// Whether an inactive (loaded, not yet resumed) table is present.
    pub inactive_present: bool,
}

impl Info {
    /// `major:minor`.
    pub fn major_minor(&self) -> String {
        // The kernel encodes huge_encode_dev(): minor low 8 bits, major next 12, minor rest.
        let major = (self.dev >> 8) & 0xfff;
        let minor = (self.dev & 0xff) | ((self.dev >> 12) & 0xfff00);
        format!("{major}:{minor}")
    }
}

fn request(nr: u8) -> libc::c_ulong {
    // _IOWR(0xfd, nr, struct dm_ioctl)
    ((3u64 << 30) | ((DM_IOCTL_SIZE as u64) << 16) | (0xfd << 8) | u64::from(nr)) as libc::c_ulong
}

struct Buffer(Vec<u8>);

impl Drop for Buffer {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

fn put_u32(buf: &mut [u8], at: usize, v: u32) {
    buf[at..at + 4].copy_from_slice(&v.to_ne_bytes());
}
fn get_u32(buf: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&buf[at..at + 4]);
    u32::from_ne_bytes(b)
}
fn get_u64(buf: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[at..at + 8]);
    u64::from_ne_bytes(b)
}

fn call(nr: u8, name: &str, flags: u32, payload: &[u8], targets: u32) -> crate::Result<Buffer> {
    if name.len() >= DM_NAME_LEN || name.contains('\0') {
        bail!("invalid device-mapper name {name:?}");
    }
    let size = DM_IOCTL_SIZE + payload.len().max(BUFFER_BYTES);
    let mut buf = Buffer(vec![0u8; size]);
    let b = &mut buf.0;
    put_u32(b, 0, 4);
    put_u32(b, 12, u32::try_from(size)?);
    put_u32(b, 16, DM_IOCTL_SIZE as u32);
    put_u32(b, 20, targets);
    put_u32(b, 28, flags);
    b[48..48 + name.len()].copy_from_slice(name.as_bytes());
    b[DM_IOCTL_SIZE..DM_IOCTL_SIZE + payload.len()].copy_from_slice(payload);
    let control = File::options()
        .read(true)
        .write(true)
        .open("/dev/mapper/control")
        .context("cannot open /dev/mapper/control")?;
    // SAFETY: the buffer is a dm_ioctl header followed by its data area, data_size bytes in
    // all, alive and exclusively borrowed for the call.
    let rc = unsafe { libc::ioctl(control.as_raw_fd(), request(nr), b.as_mut_ptr()) };
    if rc < 0 {
        return Err(anyhow!(
            "device-mapper ioctl {nr} on {name}: {}",
            std::io::Error::last_os_error()
        ));
    }
    if get_u32(b, 28) & DM_BUFFER_FULL_FLAG != 0 {
        bail!("device-mapper ioctl {nr} on {name}: result larger than {BUFFER_BYTES} bytes");
    }
    Ok(buf)
}

/// The device's number and whether it has an inactive table.
pub fn info(name: &str) -> crate::Result<Info> {
    let b = call(DM_DEV_STATUS, name, 0, &[], 0)?;
    Ok(Info {
        dev: get_u64(&b.0, 40),
        inactive_present: get_u32(&b.0, 28) & DM_INACTIVE_PRESENT_FLAG != 0,
    })
}

/// The live table of `name`.
pub fn table(name: &str) -> crate::Result<Vec<Target>> {
    let b = call(DM_TABLE_STATUS, name, DM_STATUS_TABLE_FLAG, &[], 0)?;
    let b = &b.0;
    let count = get_u32(b, 20) as usize;
    let start = get_u32(b, 16) as usize;
    let mut at = start;
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let spec = &b[at..];
        let kind_raw = &spec[24..40];
        let kind_len = kind_raw.iter().position(|c| *c == 0).unwrap_or(16);
        let params_raw = &spec[SPEC_SIZE..];
        let params_len = params_raw.iter().position(|c| *c == 0).unwrap_or(0);
        out.push(Target {
            start: get_u64(spec, 0),
            length: get_u64(spec, 8),
            kind: String::from_utf8_lossy(&kind_raw[..kind_len]).into_owned(),
            params: String::from_utf8_lossy(&params_raw[..params_len]).into_owned(),
        });
        // In results `next` counts from the start of the data area.
        at = start + get_u32(spec, 20) as usize;
    }
    Ok(out)
}

/// The optional parameters of `name`'s crypt targets (`no_read_workqueue`, `sector_size:4096`,
/// ...), in table order without repeats: never the key, which is the second field and never
/// has this shape (hex, or `:<size>:<type>:<description>` for a keyring key).
pub fn crypt_options(name: &str) -> crate::Result<Vec<String>> {
    let mut options: Vec<String> = Vec::new();
    for target in table(name)?.iter().filter(|t| t.kind == "crypt") {
        for option in crypt_options_of(&target.params) {
            if !options.contains(&option) {
                options.push(option);
            }
        }
    }
    Ok(options)
}

/// The optional parameters of one crypt target's table line:
/// `<cipher> <key> <iv_offset> <device> <offset> [<#opt_params> <opt_params>...]`. Only words
/// shaped `name` or `name:digits` (lowercase and `_`) are taken, so nothing else of the line
/// can leak into a report.
fn crypt_options_of(params: &str) -> Vec<String> {
    params
        .split_whitespace()
        .skip(6)
        .filter(|word| {
            let (flag, value) = word.split_once(':').unwrap_or((word, ""));
            !flag.is_empty()
                && flag.bytes().all(|c| c.is_ascii_lowercase() || c == b'_')
                && value.bytes().all(|c| c.is_ascii_digit())
        })
        .map(String::from)
        .collect()
}

/// Loads `targets` as the inactive table of `name`.
pub fn load(name: &str, targets: &[Target]) -> crate::Result<()> {
    let mut payload = Buffer(Vec::new());
    for t in targets {
        let begin = payload.0.len();
        let mut spec = [0u8; SPEC_SIZE];
        spec[0..8].copy_from_slice(&t.start.to_ne_bytes());
        spec[8..16].copy_from_slice(&t.length.to_ne_bytes());
        if t.kind.len() >= 16 {
            bail!("target type {:?} too long", t.kind);
        }
        spec[24..24 + t.kind.len()].copy_from_slice(t.kind.as_bytes());
        payload.0.extend_from_slice(&spec);
        payload.0.extend_from_slice(t.params.as_bytes());
        payload.0.push(0);
        while !payload.0.len().is_multiple_of(8) {
            payload.0.push(0);
        }
        // In requests `next` counts from the start of this spec.
        let next = u32::try_from(payload.0.len() - begin)?;
        payload.0[begin + 20..begin + 24].copy_from_slice(&next.to_ne_bytes());
    }
    call(
        DM_TABLE_LOAD,
        name,
        0,
        &payload.0,
        u32::try_from(targets.len())?,
    )?;
    Ok(())
}

/// Drops the inactive table of `name`, so that a resume keeps the live one.
pub fn clear_inactive(name: &str) -> crate::Result<()> {
    call(DM_TABLE_CLEAR, name, 0, &[], 0).map(|_| ())
}

/// Resumes `name` (swapping in its inactive table, if any, after suspending it without
/// flushing or freezing the filesystem on it, as libcryptsetup does for its stack).
pub fn resume(name: &str) -> crate::Result<()> {
    call(
        DM_DEV_SUSPEND,
        name,
        DM_SKIP_LOCKFS_FLAG | DM_NOFLUSH_FLAG,
        &[],
        0,
    )
    .map(|_| ())
}

/// Creates `name` as a linear map of the whole of `device` (`major:minor`, `sectors` long);
/// returns its info.
pub fn create_linear(name: &str, device: &str, sectors: u64) -> crate::Result<Info> {
    call(DM_DEV_CREATE, name, 0, &[], 0)?;
    let made = load(
        name,
        &[Target {
            start: 0,
            length: sectors,
            kind: "linear".into(),
            params: format!("{device} 0"),
        }],
    )
    .and_then(|()| resume(name))
    .and_then(|()| info(name));
    if made.is_err() {
        let _ = remove(name);
    }
    made
}

/// Removes `name`.
pub fn remove(name: &str) -> crate::Result<()> {
    call(DM_DEV_REMOVE, name, 0, &[], 0).map(|_| ())
}

/// Every dm device as (name, suspended, `major:minor`), from sysfs (reads no disk).
pub fn devices() -> Vec<(String, bool, String)> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/sys/block") else {
        return out;
    };
    for entry in dir.flatten() {
        let path = entry.path();
        let read = |p: &str| {
            std::fs::read_to_string(path.join(p))
                .ok()
                .map(|s| s.trim().to_string())
        };
        if let (Some(name), Some(suspended), Some(dev)) =
            (read("dm/name"), read("dm/suspended"), read("dev"))
        {
            out.push((name, suspended == "1", dev));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crypt_options_are_the_optional_parameters_and_never_the_key() {
        let key = "a".repeat(128);
        let line = format!(
            "aes-xts-plain64 {key} 0 252:2 32768 3 no_read_workqueue no_write_workqueue \
             sector_size:4096"
        );
        let options = crypt_options_of(&line);
        assert_eq!(
            options,
            [
                "no_read_workqueue",
                "no_write_workqueue",
                "sector_size:4096"
            ]
        );
        // A keyring key, and a line with no optional parameters.
        let keyring = "aes-xts-plain64 :64:logon:cryptsetup:1234-d0 0 252:2 32768";
        assert!(crypt_options_of(keyring).is_empty());
    }

    #[test]
    fn ioctl_numbers_match_the_kernel_header() {
        // DM_DEV_CREATE and DM_TABLE_STATUS as dm-ioctl.h expands them on 64-bit Linux.
        assert_eq!(request(DM_DEV_CREATE), 0xc138_fd03);
        assert_eq!(request(DM_TABLE_STATUS), 0xc138_fd0c);
    }

    #[test]
    fn device_numbers_decode() {
        let info = Info {
            dev: (253 << 8) | 3,
            inactive_present: false,
        };
        assert_eq!(info.major_minor(), "253:3");
    }
}
