//! Offline verification: decrypt a volume's data in userspace (no device-mapper needed) so that
//! tests, the demo and a user on a machine without dm-crypt can check the filesystem inside.
//! It writes user data (never key material) to the chosen file.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use aes::cipher::KeyInit;
use aes::Aes256;
use anyhow::{bail, Context};
use xts_mode::{get_tweak_default, Xts128};

use crate::luks::metadata::Luks2Metadata;

/// dm-crypt counts IVs in 512-byte units whatever the encryption sector size (LUKS2 does not
/// set `iv_large_sectors`): a 4096-byte sector's IV is its offset / 512.
const IV_UNIT: u64 = 512;

/// Decrypts the single aes-xts-plain64 data segment of `device` with `volume_key` into `out`;
/// returns the number of bytes written.
pub fn export(
    device: &Path,
    meta: &Luks2Metadata,
    volume_key: &[u8],
    out: &Path,
) -> crate::Result<u64> {
    if meta.segment_count != 1 || meta.reencrypt_mode().is_some() {
        bail!("the volume is being re-encrypted: finish that first");
    }
    let segment = meta
        .json
        .pointer("/segments/0")
        .context("LUKS2 metadata has no segment 0")?;
    let encryption = segment.get("encryption").and_then(|v| v.as_str());
    let sector_size = segment.get("sector_size").and_then(|v| v.as_u64());
    let sector = match (encryption, sector_size) {
        (Some("aes-xts-plain64"), Some(n @ (512 | 4096))) => n,
        _ => bail!(
            "only aes-xts-plain64 with 512- or 4096-byte sectors is supported here \
             ({encryption:?}, {sector_size:?})"
        ),
    };
    if volume_key.len() != 64 {
        bail!("expected a 512-bit volume key");
    }
    let offset = meta.data_offset.context("no data offset")?;
    let iv_tweak: u64 = segment
        .get("iv_tweak")
        .and_then(|v| v.as_str())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let mut input = std::fs::File::open(device)?;
    let end = input.seek(SeekFrom::End(0))?;
    let length = match segment.get("size").and_then(|v| v.as_str()) {
        Some("dynamic") | None => end - offset,
        Some(n) => n.parse().context("bad segment size")?,
    };
    if !length.is_multiple_of(sector) {
        bail!("the data segment ({length} bytes) is not a whole number of {sector}-byte sectors");
    }
    let xts = Xts128::new(
        Aes256::new_from_slice(&volume_key[..32]).map_err(|_| anyhow::anyhow!("bad key"))?,
        Aes256::new_from_slice(&volume_key[32..]).map_err(|_| anyhow::anyhow!("bad key"))?,
    );
    input.seek(SeekFrom::Start(offset))?;
    let mut output =
        std::fs::File::create(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut buf = vec![0u8; 1024 * 1024];
    let mut done = 0u64;
    while done < length {
        let n = usize::try_from((length - done).min(buf.len() as u64))?;
        input.read_exact(&mut buf[..n])?;
        for (i, chunk) in buf[..n].chunks_mut(usize::try_from(sector)?).enumerate() {
            let at = done + u64::try_from(i)? * sector;
            let iv = iv_tweak
                .checked_add(at / IV_UNIT)
                .context("IV out of range")?;
            xts.decrypt_sector(chunk, get_tweak_default(u128::from(iv)));
        }
        output.write_all(&buf[..n])?;
        done += n as u64;
    }
    output.sync_all()?;
    Ok(done)
}
