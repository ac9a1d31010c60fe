//! Reading the ext4 superblock (read-only, no external tool needed).

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use anyhow::Context;

/// What cryptfs needs to know about an ext4 filesystem.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Ext4Facts {
    /// Filesystem UUID.
    pub uuid: String,
    /// Volume label.
    pub label: String,
    /// Block size in bytes.
    pub block_size: u64,
    /// Size in blocks.
    pub blocks: u64,
    /// Free blocks.
    pub free_blocks: u64,
}

impl Ext4Facts {
    /// Size of the filesystem in bytes.
    pub fn size_bytes(&self) -> u64 {
        // parse_superblock refuses a product that overflows; saturate all the same.
        self.blocks.saturating_mul(self.block_size)
    }
}

const EXT4_MAGIC: u16 = 0xEF53;

/// Reads the primary superblock at byte 1024 of `device`; `None` when it is not ext2/3/4.
pub fn read_superblock(device: &Path) -> crate::Result<Option<Ext4Facts>> {
    let mut file =
        std::fs::File::open(device).with_context(|| format!("cannot open {}", device.display()))?;
    let mut sb = [0u8; 1024];
    file.seek(SeekFrom::Start(1024))?;
    if file.read_exact(&mut sb).is_err() {
        return Ok(None);
    }
    // A superblock larger than the device is not refused here: an interrupted shrink of an
    // image file leaves exactly that, and the encryption step repairs it or refuses.
    parse_superblock(&sb).with_context(|| format!("ext4 superblock of {}", device.display()))
}

/// Offset and size of the primary superblock.
pub const SUPERBLOCK_OFFSET: u64 = 1024;
/// Size of the superblock.
pub const SUPERBLOCK_SIZE: usize = 1024;

/// The primary superblock's raw bytes.
pub fn superblock_bytes(device: &Path) -> crate::Result<[u8; SUPERBLOCK_SIZE]> {
    let mut file =
        std::fs::File::open(device).with_context(|| format!("cannot open {}", device.display()))?;
    let mut sb = [0u8; SUPERBLOCK_SIZE];
    file.seek(SeekFrom::Start(SUPERBLOCK_OFFSET))?;
    file.read_exact(&mut sb)
        .with_context(|| format!("cannot read the superblock of {}", device.display()))?;
    Ok(sb)
}

/// Writes `sb` over the primary superblock and flushes it to the device.
pub fn write_superblock_bytes(device: &Path, sb: &[u8]) -> crate::Result<()> {
    use std::io::Write;
    anyhow::ensure!(sb.len() == SUPERBLOCK_SIZE, "a superblock is 1024 bytes");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open(device)
        .with_context(|| format!("cannot open {} for writing", device.display()))?;
    file.seek(SeekFrom::Start(SUPERBLOCK_OFFSET))?;
    file.write_all(sb)?;
    file.sync_all()?;
    Ok(())
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Parses a 1024-byte superblock. Never panics: fixed offsets inside the array, a bounded block
/// size, and a block count whose byte size must fit a u64.
pub fn parse_superblock(sb: &[u8; 1024]) -> crate::Result<Option<Ext4Facts>> {
    if le16(sb, 0x38) != EXT4_MAGIC {
        return Ok(None);
    }
    let sixty_four_bit = le32(sb, 0x60) & 0x80 != 0;
    let hi = |at| {
        if sixty_four_bit {
            u64::from(le32(sb, at)) << 32
        } else {
            0
        }
    };
    let blocks = u64::from(le32(sb, 0x4)) | hi(0x150);
    let free_blocks = u64::from(le32(sb, 0xC)) | hi(0x158);
    let log = le32(sb, 0x18);
    anyhow::ensure!(
        log <= 6,
        "ext4 superblock has an invalid block size (log {log})"
    );
    let block_size = 1024u64 << log;
    anyhow::ensure!(
        blocks.checked_mul(block_size).is_some(),
        "ext4 superblock has an impossible block count {blocks}"
    );
    let uuid = &sb[0x68..0x78];
    let uuid = format!(
        "{}-{}-{}-{}-{}",
        hex::encode(&uuid[0..4]),
        hex::encode(&uuid[4..6]),
        hex::encode(&uuid[6..8]),
        hex::encode(&uuid[8..10]),
        hex::encode(&uuid[10..16])
    );
    let label_raw = &sb[0x78..0x88];
    let end = label_raw.iter().position(|&c| c == 0).unwrap_or(16);
    Ok(Some(Ext4Facts {
        uuid,
        label: String::from_utf8_lossy(&label_raw[..end]).into_owned(),
        block_size,
        blocks,
        free_blocks,
    }))
}
