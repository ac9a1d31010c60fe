//! Device probing: read-only observation of the root device. Nothing here writes.

use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use anyhow::{bail, Context};

use crate::ext4::{self, Ext4Facts};
use crate::luks::metadata::{self, HeaderKind, Luks2Metadata};

/// What the root device holds.
#[derive(Debug, Clone)]
pub enum Content {
    /// A plain ext4 filesystem.
    PlainExt4(Ext4Facts),
    /// A LUKS2 volume.
    Luks2(Box<Luks2Metadata>),
    /// A LUKS2 volume whose header copies both fail their checksums.
    Luks2Damaged,
    /// Neither ext4 nor LUKS: what the start of the device looks like (for the error message).
    Unrecognised,
    /// A LUKS1 volume.
    Luks1,
}

/// One observation of the device.
#[derive(Debug, Clone)]
pub struct Probe {
    /// The content.
    pub content: Content,
    /// Size in bytes.
    pub size_bytes: u64,
}

/// Observes `device`. Fails only when the device cannot be read at all.
pub fn probe(device: &Path) -> crate::Result<Probe> {
    let meta = std::fs::metadata(device).with_context(|| {
        format!(
            "device {} not found: check `device` in the configuration (is the disk attached?)",
            device.display()
        )
    })?;
    if !(meta.is_file() || meta.file_type().is_block_device()) {
        bail!(
            "{} is neither a block device nor an image file",
            device.display()
        );
    }
    let mut file = std::fs::File::open(device)
        .with_context(|| format!("cannot open {} for reading", device.display()))?;
    let size_bytes = file.seek(SeekFrom::End(0))?;
    let content = match metadata::read(device)? {
        HeaderKind::Luks2(meta) => {
            meta.check_fits(size_bytes)
                .with_context(|| format!("LUKS2 header of {}", device.display()))?;
            Content::Luks2(meta)
        }
        HeaderKind::Luks1 => Content::Luks1,
        HeaderKind::Luks2Damaged => Content::Luks2Damaged,
        HeaderKind::None => match ext4::read_superblock(device)? {
            Some(fs) => Content::PlainExt4(fs),
            None => Content::Unrecognised,
        },
    };
    Ok(Probe {
        content,
        size_bytes,
    })
}

/// The LUKS2 metadata of `device`, which a step expects to be there (`what` says when, for the
/// error: "after re-encryption", …).
pub fn luks2(device: &Path, what: &str) -> crate::Result<Box<Luks2Metadata>> {
    match probe(device)?.content {
        Content::Luks2(meta) => Ok(meta),
        _ => bail!("{} has no valid LUKS2 header {what}", device.display()),
    }
}

/// Whether the dm-crypt mapping `name` is active.
pub fn mapping_active(name: Option<&str>) -> bool {
    name.is_some_and(|n| Path::new("/dev/mapper").join(n).exists())
}

/// Why `device` must not be touched offline: mounted, or held by another device (dm, md).
pub fn in_use(device: &Path) -> crate::Result<Option<String>> {
    let meta = std::fs::metadata(device)?;
    if !meta.file_type().is_block_device() {
        // An image file: the loop devices over it are the only holders we can see.
        return Ok(None);
    }
    let rdev = meta.rdev();
    let (major, minor) = (libc_major(rdev), libc_minor(rdev));
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let dev_id = format!("{major}:{minor}");
    if let Some(line) = mountinfo
        .lines()
        .find(|l| l.split_whitespace().nth(2) == Some(dev_id.as_str()))
    {
        let mountpoint = line.split_whitespace().nth(4).unwrap_or("?");
        return Ok(Some(format!("mounted at {mountpoint}")));
    }
    let holders = Path::new("/sys/dev/block").join(&dev_id).join("holders");
    if let Ok(entries) = std::fs::read_dir(holders) {
        let names: Vec<String> = entries
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        if !names.is_empty() {
            return Ok(Some(format!("held by {}", names.join(", "))));
        }
    }
    Ok(None)
}

fn libc_major(dev: u64) -> u64 {
    ((dev >> 32) & 0xffff_f000) | ((dev >> 8) & 0x0000_0fff)
}

fn libc_minor(dev: u64) -> u64 {
    ((dev >> 12) & 0xffff_ff00) | (dev & 0x0000_00ff)
}
