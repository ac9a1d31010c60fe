//! Finishing a LUKS2 re-encryption whose data is all under the final key but whose metadata
//! libcryptsetup never finalised (crash windows A and B of the crash-windows note).
//!
//! Signature, from the metadata alone: the `online-reencrypt` requirement is still set, yet there
//! is exactly one data segment (no `backup-*` flag, not `in-reencryption`), it starts where the
//! `backup-final` segment starts and is bound to the same digest. Every byte is then under the
//! final key: libcryptsetup's resume would take "one segment" for "not started" and re-encrypt
//! from offset 0 with the wrong key (B), or fail for good (A, and B's "stuck" half, whose old
//! keyslot is already wiped). Nothing about it needs a key: the change that is missing is the
//! metadata libcryptsetup would have written, which [`finalize`] writes (both header copies,
//! seqid + 1, checksums), exactly as the LUKS2 on-disk format prescribes:
//! - segments: only the data segment, as `"0"`;
//! - digests: only the final digest, bound to segment `"0"` and to its own keyslots;
//! - keyslots: only those of the final digest (the `reencrypt` keyslot and the old key's go, and
//!   their areas are zeroed);
//! - tokens: keyslot lists restricted to the keyslots kept;
//! - config: the `online-reencrypt*` requirement removed.
//!
//! Crash safety: the primary copy is written and flushed first, then the secondary. Between the
//! two, the copy with the higher seqid (the finalised one) wins, as in libcryptsetup; before the
//! first, the device is still in the signature state and finalising again is idempotent.
//!
//! Hostile metadata: every keyslot area zeroed is bounded by the keyslots area and the data
//! offset (checked again here, whatever the reader validated); both binary headers are rebuilt
//! from parsed fields, never copied from bytes that may be torn; libcryptsetup's metadata lock
//! is held while writing; and a volume some mapping holds is refused unless it is the modelled
//! online re-encryption's own mapping.

use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::metadata::{HeaderKind, Luks2Metadata};

fn flags(segment: &Value) -> Vec<&str> {
    segment
        .get("flags")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

fn digest_of(json: &Value, segment_id: &str) -> Option<String> {
    json.get("digests")?
        .as_object()?
        .iter()
        .find_map(|(id, d)| {
            d.get("segments")?
                .as_array()?
                .iter()
                .any(|s| s.as_str() == Some(segment_id))
                .then(|| id.clone())
        })
}

/// The data segment's id and the final digest's id, if all data is under the final key.
fn final_state(json: &Value) -> Option<(String, String)> {
    let mandatory = json.pointer("/config/requirements/mandatory")?.as_array()?;
    if !mandatory
        .iter()
        .filter_map(Value::as_str)
        .any(|r| r.starts_with("online-reencrypt"))
    {
        return None;
    }
    let segments = json.get("segments")?.as_object()?;
    let data: Vec<(&String, &Value)> = segments
        .iter()
        .filter(|(_, s)| !flags(s).iter().any(|f| f.starts_with("backup-")))
        .collect();
    let [(data_id, data)] = data.as_slice() else {
        return None;
    };
    if flags(data).contains(&"in-reencryption") || data.get("type")?.as_str()? != "crypt" {
        return None;
    }
    let (final_id, final_segment) = segments
        .iter()
        .find(|(_, s)| flags(s).contains(&"backup-final"))?;
    for field in ["offset", "encryption", "sector_size", "iv_tweak"] {
        if data.get(field) != final_segment.get(field) {
            return None;
        }
    }
    let digest = digest_of(json, data_id)?;
    (digest_of(json, final_id)? == digest).then(|| ((*data_id).clone(), digest))
}

/// Whether all data is under the final key while the re-encryption is still marked unfinished.
pub fn all_data_on_final_key(meta: &Luks2Metadata) -> bool {
    final_state(&meta.json).is_some()
}

fn string_list(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(String::from)
                .collect()
        })
        .unwrap_or_default()
}

/// Where the keyslot areas may lie: `[2 × hdr_size, 2 × hdr_size + keyslots_size)`, and never
/// past the data offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AreaBounds {
    /// First byte of the keyslots area.
    pub start: u64,
    /// One past the last byte a keyslot area may use.
    pub end: u64,
}

impl AreaBounds {
    /// The bounds of `meta`'s header, or an error when they are themselves inconsistent.
    pub fn of(meta: &Luks2Metadata) -> crate::Result<AreaBounds> {
        let start = meta
            .hdr_size
            .checked_mul(2)
            .context("LUKS2 header size overflows")?;
        let mut end = start
            .checked_add(meta.keyslots_size)
            .context("LUKS2 keyslots area overflows")?;
        let data_offset = meta
            .json
            .get("segments")
            .and_then(Value::as_object)
            .into_iter()
            .flat_map(|s| s.values())
            .filter(|seg| !flags(seg).iter().any(|f| f.starts_with("backup-")))
            .filter_map(|seg| seg.get("offset")?.as_str()?.parse::<u64>().ok())
            .min();
        // Offset 0: a detached header, the data is elsewhere.
        if let Some(data) = data_offset.filter(|d| *d != 0) {
            if data < end {
                bail!("LUKS2 data offset {data} lies inside the keyslots area (ends at {end})");
            }
            end = end.min(data);
        }
        Ok(AreaBounds { start, end })
    }

    /// Checks that `[offset, offset + size)` lies inside the bounds.
    pub fn check(&self, what: &str, offset: u64, size: u64) -> crate::Result<()> {
        let end = offset.checked_add(size);
        if offset < self.start || size == 0 || end.is_none_or(|e| e > self.end) {
            bail!(
                "{what} area [{offset}, +{size}) lies outside the keyslots area [{}, {}): \
                 refusing to finalise (the metadata is damaged or hostile)",
                self.start,
                self.end
            );
        }
        Ok(())
    }
}

/// The finalised JSON and the areas `(offset, size)` of the keyslots it drops, every one
/// checked against `bounds`.
pub fn finalized_json(json: &Value, bounds: AreaBounds) -> crate::Result<(Value, Vec<(u64, u64)>)> {
    let (data_id, digest_id) =
        final_state(json).context("the volume is not in the all-data-on-final-key state")?;
    let mut out = json.clone();
    let root = out.as_object_mut().context("LUKS2 JSON is not an object")?;

    let mut data = json["segments"][&data_id].clone();
    if let Some(obj) = data.as_object_mut() {
        obj.remove("flags");
    }
    let mut segments = Map::new();
    segments.insert("0".into(), data);
    root.insert("segments".into(), Value::Object(segments));

    let all_keyslots = json
        .get("keyslots")
        .and_then(Value::as_object)
        .context("LUKS2 JSON has no keyslots object")?;
    let mut digest = json["digests"][&digest_id].clone();
    let digest_obj = digest
        .as_object_mut()
        .with_context(|| format!("LUKS2 digest {digest_id} is not an object"))?;
    let kept: Vec<String> = string_list(digest_obj.get("keyslots"))
        .into_iter()
        .filter(|k| {
            all_keyslots
                .get(k)
                .and_then(|slot| slot.get("type"))
                .and_then(Value::as_str)
                == Some("luks2")
        })
        .collect();
    if kept.is_empty() {
        bail!("no keyslot holds the final volume key: refusing to finalise");
    }
    digest_obj.insert("keyslots".into(), Value::from(kept.clone()));
    digest_obj.insert("segments".into(), Value::from(vec!["0"]));
    let mut digests = Map::new();
    digests.insert(digest_id.clone(), digest);
    root.insert("digests".into(), Value::Object(digests));

    let mut dropped_areas = Vec::new();
    let mut keyslots = Map::new();
    for (id, slot) in all_keyslots {
        let area = |f: &str| {
            slot.pointer(&format!("/area/{f}"))
                .and_then(Value::as_str)
                .and_then(|s| s.parse::<u64>().ok())
        };
        let (Some(offset), Some(size)) = (area("offset"), area("size")) else {
            bail!("keyslot {id} has no valid area: refusing to finalise");
        };
        // Kept or dropped, no keyslot may reach outside its area.
        bounds.check(&format!("keyslot {id}"), offset, size)?;
        if kept.contains(id) {
            keyslots.insert(id.clone(), slot.clone());
        } else {
            dropped_areas.push((offset, size));
        }
    }
    root.insert("keyslots".into(), Value::Object(keyslots));

    if let Some(tokens) = root.get_mut("tokens") {
        let tokens = tokens
            .as_object_mut()
            .context("LUKS2 tokens section is not an object")?;
        for (id, token) in tokens.iter_mut() {
            let token = token
                .as_object_mut()
                .with_context(|| format!("LUKS2 token {id} is not an object"))?;
            let slots: Vec<String> = string_list(token.get("keyslots"))
                .into_iter()
                .filter(|k| kept.contains(k))
                .collect();
            token.insert("keyslots".into(), Value::from(slots));
        }
    }

    if let Some(config) = root.get_mut("config").and_then(Value::as_object_mut) {
        let mut remove_requirements = false;
        if let Some(mandatory) = config
            .get_mut("requirements")
            .and_then(|r| r.get_mut("mandatory"))
            .and_then(Value::as_array_mut)
        {
            mandatory.retain(|r| {
                !r.as_str()
                    .is_some_and(|s| s.starts_with("online-reencrypt"))
            });
            remove_requirements = mandatory.is_empty();
        }
        if remove_requirements {
            config.remove("requirements");
        }
    }
    Ok((out, dropped_areas))
}

const MAGIC_PRIMARY: &[u8; 6] = b"LUKS\xba\xbe";
const MAGIC_SECONDARY: &[u8; 6] = b"SKUL\xba\xbe";
const BINARY_HEADER_BYTES: usize = 4096;

/// The fields of a LUKS2 binary header that [`build_copy`] writes; every other byte is zero.
#[derive(Debug, Clone)]
pub struct BinaryHeader<'a> {
    /// Sequence id.
    pub seqid: u64,
    /// Size of one copy (binary header + JSON area).
    pub hdr_size: u64,
    /// Label (at most 47 bytes are written).
    pub label: &'a str,
    /// UUID (at most 39 bytes are written).
    pub uuid: &'a str,
}

fn put_cstr(dst: &mut [u8], text: &str) {
    let mut n = text.len().min(dst.len().saturating_sub(1));
    while !text.is_char_boundary(n) {
        n -= 1;
    }
    dst[..n].copy_from_slice(&text.as_bytes()[..n]);
}

/// One header copy built from parsed fields alone, as the LUKS2 on-disk format lays it out:
/// magic, version 2, sizes, seqid, label, `sha256`, a fresh salt, UUID, the copy's own offset,
/// the JSON (NUL-padded) and the checksum over all of it. No byte is taken from the disk, so a
/// torn copy cannot leak into the rebuilt one.
pub fn build_copy(
    header: &BinaryHeader<'_>,
    secondary: bool,
    json: &[u8],
) -> crate::Result<Vec<u8>> {
    if !super::metadata::HDR_SIZES.contains(&header.hdr_size) {
        bail!(
            "LUKS2 header size {} is not one the format allows",
            header.hdr_size
        );
    }
    let hdr_size = usize::try_from(header.hdr_size)?;
    if json.len() >= hdr_size - BINARY_HEADER_BYTES {
        bail!("finalised LUKS2 JSON does not fit the metadata area");
    }
    let mut area = vec![0u8; hdr_size];
    area[0..6].copy_from_slice(if secondary {
        MAGIC_SECONDARY
    } else {
        MAGIC_PRIMARY
    });
    area[6..8].copy_from_slice(&2u16.to_be_bytes());
    area[8..16].copy_from_slice(&header.hdr_size.to_be_bytes());
    area[16..24].copy_from_slice(&header.seqid.to_be_bytes());
    put_cstr(&mut area[24..72], header.label);
    put_cstr(&mut area[72..104], "sha256");
    // The salt only makes each copy's checksum unique; libcryptsetup makes a new one when it
    // formats, and a fresh one here keeps torn bytes out.
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut area[104..168]);
    put_cstr(&mut area[168..208], header.uuid);
    let hdr_offset = if secondary { header.hdr_size } else { 0 };
    area[256..264].copy_from_slice(&hdr_offset.to_be_bytes());
    area[BINARY_HEADER_BYTES..BINARY_HEADER_BYTES + json.len()].copy_from_slice(json);
    let digest = Sha256::digest(&area);
    area[448..480].copy_from_slice(&digest);
    Ok(area)
}

/// The dm mappings that hold a device, by name.
pub fn holders(device: &Path) -> crate::Result<Vec<String>> {
    let meta = std::fs::metadata(device)?;
    let mut block_devices: Vec<PathBuf> = Vec::new();
    if meta.file_type().is_block_device() {
        let rdev = meta.rdev();
        block_devices.push(PathBuf::from(format!(
            "/sys/dev/block/{}:{}",
            libc::major(rdev),
            libc::minor(rdev)
        )));
    } else {
        // An image file: the loop devices backed by it.
        let canonical = std::fs::canonicalize(device)?;
        if let Ok(entries) = std::fs::read_dir("/sys/block") {
            for entry in entries.flatten() {
                let backing = entry.path().join("loop/backing_file");
                if let Ok(text) = std::fs::read_to_string(&backing) {
                    if Path::new(text.trim_end()) == canonical {
                        block_devices.push(entry.path());
                    }
                }
            }
        }
    }
    let mut names = Vec::new();
    for dev in block_devices {
        if let Ok(entries) = std::fs::read_dir(dev.join("holders")) {
            for entry in entries.flatten() {
                let dm_name = entry.path().join("dm/name");
                names.push(match std::fs::read_to_string(dm_name) {
                    Ok(name) => name.trim_end().to_string(),
                    Err(_) => entry.file_name().to_string_lossy().into_owned(),
                });
            }
        }
    }
    Ok(names)
}

/// Whether metadata may be finalised while `holders` hold the device: only when nothing does,
/// or when the only holder is `online`, the mapping of the modelled online re-encryption.
pub fn may_finalize_with(holders: &[String], online: Option<&str>) -> Result<(), String> {
    match (holders, online) {
        ([], _) => Ok(()),
        ([only], Some(name)) if only == name => Ok(()),
        (held, Some(name)) => Err(format!(
            "the volume is held by {} and not only by the online re-encryption's mapping {name:?}",
            held.join(", ")
        )),
        (held, None) => Err(format!(
            "the volume is active ({}) and this is no online re-encryption: close the mapping \
             first",
            held.join(", ")
        )),
    }
}

/// libcryptsetup's metadata write lock on a device, held until dropped.
///
/// Same protocol as libcryptsetup (`lib/utils_device_locking.c`): for a block device an
/// exclusive `flock` on `/run/cryptsetup/L_<major>:<minor>` (directory made 0700, file 0644,
/// `O_NOFOLLOW`), retried when another process unlinked the file between open and lock, and
/// the file unlinked on release when no one else holds it; for a regular file an exclusive
/// `flock` on the image file itself.
pub struct MetadataLock {
    file: std::fs::File,
    resource: Option<PathBuf>,
}

/// Where libcryptsetup keeps its lock files (`DEFAULT_LUKS2_LOCK_PATH`).
pub const LOCK_DIR: &str = "/run/cryptsetup";

fn flock(file: &std::fs::File, op: libc::c_int) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a file descriptor this function borrows for the call's duration.
    if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn same_inode(a: &std::fs::Metadata, b: &std::fs::Metadata) -> bool {
    a.dev() == b.dev() && a.ino() == b.ino()
}

impl MetadataLock {
    /// Takes the write lock of `device`, waiting for another holder to let go (as libcryptsetup
    /// does), for at most `timeout`.
    pub fn acquire(device: &Path, timeout: std::time::Duration) -> crate::Result<MetadataLock> {
        Self::acquire_in(Path::new(LOCK_DIR), device, timeout)
    }

    /// [`MetadataLock::acquire`] with another lock directory (tests).
    pub fn acquire_in(
        lock_dir: &Path,
        device: &Path,
        timeout: std::time::Duration,
    ) -> crate::Result<MetadataLock> {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        let meta = std::fs::metadata(device)
            .with_context(|| format!("cannot stat {}", device.display()))?;
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let (file, resource) = if meta.file_type().is_block_device() {
                let rdev = meta.rdev();
                let resource =
                    lock_dir.join(format!("L_{}:{}", libc::major(rdev), libc::minor(rdev)));
                match std::fs::DirBuilder::new().mode(0o700).create(lock_dir) {
                    Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                        return Err(anyhow!(e).context(format!(
                            "cannot create libcryptsetup's lock directory {}",
                            lock_dir.display()
                        )))
                    }
                    _ => {}
                }
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .mode(0o644)
                    .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                    .open(&resource)
                    .with_context(|| format!("cannot open lock {}", resource.display()))?;
                (file, Some(resource))
            } else if meta.is_file() {
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
                    .open(device)
                    .or_else(|_| std::fs::File::open(device))
                    .with_context(|| format!("cannot open {} to lock it", device.display()))?;
                (file, None)
            } else {
                bail!("{} is neither a block device nor a file", device.display());
            };
            match flock(&file, libc::LOCK_EX | libc::LOCK_NB) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => {
                    if std::time::Instant::now() >= deadline {
                        bail!(
                            "libcryptsetup's metadata lock of {} is held by another process \
                             (cryptsetup running?) for more than {} s",
                            device.display(),
                            timeout.as_secs()
                        );
                    }
                    std::thread::sleep(std::time::Duration::from_millis(50));
                    continue;
                }
                Err(e) => return Err(anyhow!(e).context("cannot lock the LUKS2 metadata")),
            }
            // Another process may have unlinked the file between our open and our lock.
            if let Some(resource) = &resource {
                let locked = file.metadata()?;
                match std::fs::metadata(resource) {
                    Ok(now) if same_inode(&locked, &now) => {}
                    _ => continue,
                }
            }
            return Ok(MetadataLock { file, resource });
        }
    }
}

impl Drop for MetadataLock {
    fn drop(&mut self) {
        if let Some(resource) = &self.resource {
            // As libcryptsetup: drop the file only while it is still the one we locked.
            if let (Ok(locked), Ok(now)) = (self.file.metadata(), std::fs::metadata(resource)) {
                if same_inode(&locked, &now) {
                    let _ = std::fs::remove_file(resource);
                }
            }
        }
        let _ = flock(&self.file, libc::LOCK_UN);
    }
}

/// How long [`finalize`] waits for libcryptsetup's metadata lock.
const LOCK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Writes the finalised metadata to both header copies of `device` and zeroes the areas of the
/// keyslots it drops. Precondition: [`all_data_on_final_key`] holds for the current metadata.
/// `online` names the mapping of a modelled online re-encryption, the one holder allowed.
/// Every check runs before the first write; the metadata lock is held throughout.
pub fn finalize(device: &Path, online: Option<&str>) -> crate::Result<()> {
    may_finalize_with(&holders(device)?, online).map_err(|why| {
        anyhow!(
            "refusing to finalise the LUKS2 metadata of {}: {why}",
            device.display()
        )
    })?;
    let _lock = MetadataLock::acquire(device, LOCK_TIMEOUT)?;
    // Read under the lock: what another writer left is what is finalised.
    let meta = match super::metadata::read(device)? {
        HeaderKind::Luks2(meta) => meta,
        _ => bail!("{} has no readable LUKS2 header", device.display()),
    };
    let bounds =
        AreaBounds::of(&meta).with_context(|| format!("LUKS2 metadata of {}", device.display()))?;
    let (json, dropped) = finalized_json(&meta.json, bounds)
        .with_context(|| format!("LUKS2 metadata of {}", device.display()))?;
    let text = serde_json::to_vec(&json)?;
    let header = BinaryHeader {
        seqid: meta.seqid.checked_add(1).context("LUKS2 seqid overflows")?,
        hdr_size: meta.hdr_size,
        label: &meta.label,
        uuid: &meta.uuid,
    };
    let primary = build_copy(&header, false, &text)?;
    let secondary = build_copy(&header, true, &text)?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open(device)
        .with_context(|| format!("cannot open {} for writing", device.display()))?;
    file.seek(SeekFrom::Start(0))?;
    file.write_all(&primary)?;
    file.sync_all()?;
    file.seek(SeekFrom::Start(meta.hdr_size))?;
    file.write_all(&secondary)?;
    file.sync_all()?;
    let zeroes = vec![0u8; 1 << 20];
    for (offset, size) in dropped {
        file.seek(SeekFrom::Start(offset))?;
        let mut left = size;
        while left > 0 {
            let n = usize::try_from(left).map_or(zeroes.len(), |l| l.min(zeroes.len()));
            file.write_all(&zeroes[..n])?;
            left -= n as u64;
        }
    }
    file.sync_all()?;
    match super::metadata::read(device)? {
        HeaderKind::Luks2(after)
            if after.reencrypt_mode().is_none() && after.segment_count == 1 =>
        {
            Ok(())
        }
        _ => bail!(
            "finalised metadata of {} does not read back as expected",
            device.display()
        ),
    }
}
