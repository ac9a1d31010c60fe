//! Partition tables of disk images (GPT, or MBR), read from hostile bytes: every offset and
//! length is bounded and checked, nothing panics, and a partition is only ever a byte range
//! that lies inside the file.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use anyhow::{anyhow, bail, Context};

/// Logical sector size of disk images (what sgdisk, sfdisk and wic use for image files).
pub const SECTOR: u64 = 512;
/// At most this many GPT entries are read (the usual table has 128).
const MAX_GPT_ENTRIES: u32 = 1024;

/// A partition's byte range inside the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    /// First byte.
    pub offset: u64,
    /// Length in bytes.
    pub size: u64,
}

fn le32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn le64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Finds partition `number` (1-based, as `/dev/sdaN` counts) of the disk image `image`.
pub fn find(image: &Path, number: u32) -> crate::Result<Range> {
    let mut file =
        std::fs::File::open(image).with_context(|| format!("cannot open {}", image.display()))?;
    let len = file.metadata()?.len();
    let mut head = vec![0u8; (2 * SECTOR) as usize];
    file.read_exact(&mut head)
        .map_err(|_| anyhow!("{} is too short to hold a partition table", image.display()))?;
    let range = if head.get(512..520) == Some(b"EFI PART".as_slice()) {
        gpt_entry(&mut file, &head[512..], number)?
    } else {
        mbr_entry(&head[..512], number)?
    };
    let end = range
        .offset
        .checked_add(range.size)
        .ok_or_else(|| anyhow!("partition {number} has an impossible extent"))?;
    if range.size == 0 || end > len {
        bail!(
            "partition {number} of {} ({} bytes at {}) does not lie inside the {len}-byte image",
            image.display(),
            range.size,
            range.offset
        );
    }
    Ok(range)
}

/// The entry of GPT partition `number`; `header` is LBA 1.
fn gpt_entry(file: &mut std::fs::File, header: &[u8], number: u32) -> crate::Result<Range> {
    let bad = || anyhow!("the GPT header is malformed");
    let entries_lba = le64(header, 72).ok_or_else(bad)?;
    let count = le32(header, 80).ok_or_else(bad)?;
    let entry_size = le32(header, 84).ok_or_else(bad)?;
    if !(128..=4096).contains(&entry_size) || entry_size % 8 != 0 || count > MAX_GPT_ENTRIES {
        bail!("the GPT header is malformed (entry size {entry_size}, {count} entries)");
    }
    if number == 0 || number > count {
        bail!("no partition {number}: the GPT has {count} entries (partitions count from 1)");
    }
    let at = entries_lba
        .checked_mul(SECTOR)
        .and_then(|b| b.checked_add(u64::from(number - 1) * u64::from(entry_size)))
        .ok_or_else(bad)?;
    let mut entry = vec![0u8; entry_size as usize];
    file.seek(SeekFrom::Start(at))?;
    file.read_exact(&mut entry)
        .map_err(|_| anyhow!("the GPT entry of partition {number} lies outside the image"))?;
    if entry[..16].iter().all(|&b| b == 0) {
        bail!("no partition {number}: that GPT entry is not in use");
    }
    let first = le64(&entry, 32).ok_or_else(bad)?;
    let last = le64(&entry, 40).ok_or_else(bad)?;
    let sectors = last
        .checked_sub(first)
        .and_then(|n| n.checked_add(1))
        .ok_or_else(|| anyhow!("GPT partition {number} ends before it starts"))?;
    Ok(Range {
        offset: first.checked_mul(SECTOR).ok_or_else(bad)?,
        size: sectors.checked_mul(SECTOR).ok_or_else(bad)?,
    })
}

/// The entry of primary MBR partition `number` (1–4); `mbr` is sector 0.
fn mbr_entry(mbr: &[u8], number: u32) -> crate::Result<Range> {
    if mbr.get(510..512) != Some([0x55, 0xAA].as_slice()) {
        bail!("no partition table (neither GPT nor MBR): is this a partition image? then leave out --partition");
    }
    if !(1..=4).contains(&number) {
        bail!("no partition {number}: only primary MBR partitions 1 to 4 are supported");
    }
    let at = 446 + 16 * (number as usize - 1);
    let kind = mbr.get(at + 4).copied().unwrap_or(0);
    let first = le32(mbr, at + 8).ok_or_else(|| anyhow!("the MBR is malformed"))?;
    let sectors = le32(mbr, at + 12).ok_or_else(|| anyhow!("the MBR is malformed"))?;
    if kind == 0 || sectors == 0 {
        bail!("no partition {number}: that MBR entry is not in use");
    }
    if kind == 0xEE {
        bail!(
            "the MBR is a GPT's protective one but LBA 1 holds no GPT header: the table is damaged"
        );
    }
    if kind == 0x05 || kind == 0x0f || kind == 0x85 {
        bail!("partition {number} is an extended partition, not a filesystem");
    }
    Ok(Range {
        offset: u64::from(first) * SECTOR,
        size: u64::from(sectors) * SECTOR,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(bytes: &[u8]) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().expect("tmp");
        std::fs::write(f.path(), bytes).expect("write");
        f
    }

    #[test]
    fn hostile_tables_are_refused_without_panicking() {
        let mut rng = 0x1234_5678_u64;
        let mut refused = 0;
        for i in 0..400 {
            let mut img = vec![0u8; 64 * 1024];
            for b in img.iter_mut() {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                *b = rng as u8;
            }
            if i % 2 == 0 {
                img[512..520].copy_from_slice(b"EFI PART");
            } else {
                img[510] = 0x55;
                img[511] = 0xAA;
            }
            let f = write(&img);
            for n in [0, 1, 2, 4, 5, 200, u32::MAX] {
                if find(f.path(), n).is_err() {
                    refused += 1;
                }
            }
        }
        assert!(refused > 2000, "{refused}");
        assert!(find(write(&[0u8; 100]).path(), 1).is_err());
    }

    /// A GPT as sgdisk lays it out (header at LBA 1, 128 entries of 128 bytes from LBA 2),
    /// with partition 1 at sectors 2048..=6143.
    fn gpt_image() -> Vec<u8> {
        let mut img = vec![0u8; 4 << 20];
        img[510] = 0x55;
        img[511] = 0xAA;
        img[446 + 4] = 0xEE;
        img[512..520].copy_from_slice(b"EFI PART");
        img[512 + 72..512 + 80].copy_from_slice(&2u64.to_le_bytes());
        img[512 + 80..512 + 84].copy_from_slice(&128u32.to_le_bytes());
        img[512 + 84..512 + 88].copy_from_slice(&128u32.to_le_bytes());
        let e = 1024;
        img[e..e + 16].copy_from_slice(&[0xAF; 16]);
        img[e + 32..e + 40].copy_from_slice(&2048u64.to_le_bytes());
        img[e + 40..e + 48].copy_from_slice(&6143u64.to_le_bytes());
        img
    }

    /// Every byte of the GPT header and of the first entry, set to each of a few hostile
    /// values: never a panic, and whatever is accepted lies inside the file.
    #[test]
    fn every_mutated_byte_of_a_real_gpt_is_bounded() {
        let base = gpt_image();
        assert_eq!(
            find(write(&base).path(), 1).expect("p1"),
            Range {
                offset: 1 << 20,
                size: 2 << 20
            }
        );
        let f = tempfile::NamedTempFile::new().expect("tmp");
        let (mut cases, mut refused) = (0, 0);
        let positions = (512 + 72..512 + 92).chain(1024 + 16..1024 + 48);
        for at in positions {
            for value in [0x00u8, 0x01, 0x7F, 0x80, 0xFF] {
                let mut img = base.clone();
                img[at] = value;
                std::fs::write(f.path(), &img).expect("write");
                cases += 1;
                match find(f.path(), 1) {
                    Ok(r) => assert!(r.size > 0 && r.offset + r.size <= img.len() as u64),
                    Err(_) => refused += 1,
                }
            }
        }
        assert_eq!(cases, 52 * 5);
        assert!(refused > 50, "{refused} of {cases} refused");
    }

    #[test]
    fn mbr_partition_is_its_byte_range() {
        let mut img = vec![0u8; 4 << 20];
        img[510] = 0x55;
        img[511] = 0xAA;
        img[446 + 4] = 0x83;
        img[446 + 8..446 + 12].copy_from_slice(&2048u32.to_le_bytes());
        img[446 + 12..446 + 16].copy_from_slice(&4096u32.to_le_bytes());
        let f = write(&img);
        assert_eq!(
            find(f.path(), 1).expect("p1"),
            Range {
                offset: 1 << 20,
                size: 2 << 20
            }
        );
        assert!(find(f.path(), 2).is_err());
    }
}
