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

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use anyhow::{bail, Context};
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

/// The finalised JSON and the areas `(offset, size)` of the keyslots it drops.
pub fn finalized_json(json: &Value) -> crate::Result<(Value, Vec<(u64, u64)>)> {
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

    let mut digest = json["digests"][&digest_id].clone();
    let kept: Vec<String> = string_list(digest.get("keyslots"))
        .into_iter()
        .filter(|k| json["keyslots"][k]["type"].as_str() == Some("luks2"))
        .collect();
    if kept.is_empty() {
        bail!("no keyslot holds the final volume key: refusing to finalise");
    }
    digest["keyslots"] = Value::from(kept.clone());
    digest["segments"] = Value::from(vec!["0"]);
    let mut digests = Map::new();
    digests.insert(digest_id.clone(), digest);
    root.insert("digests".into(), Value::Object(digests));

    let mut dropped_areas = Vec::new();
    let mut keyslots = Map::new();
    if let Some(all) = json["keyslots"].as_object() {
        for (id, slot) in all {
            if kept.contains(id) {
                keyslots.insert(id.clone(), slot.clone());
            } else {
                let area = |f: &str| {
                    slot.pointer(&format!("/area/{f}"))
                        .and_then(Value::as_str)
                        .and_then(|s| s.parse::<u64>().ok())
                };
                if let (Some(offset), Some(size)) = (area("offset"), area("size")) {
                    dropped_areas.push((offset, size));
                }
            }
        }
    }
    root.insert("keyslots".into(), Value::Object(keyslots));

    if let Some(tokens) = root.get_mut("tokens").and_then(Value::as_object_mut) {
        for token in tokens.values_mut() {
            let slots: Vec<String> = string_list(token.get("keyslots"))
                .into_iter()
                .filter(|k| kept.contains(k))
                .collect();
            token["keyslots"] = Value::from(slots);
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

/// One header copy: binary header (4096 bytes) + JSON area, checksummed.
fn build_copy(
    template: &[u8],
    magic: &[u8; 6],
    hdr_offset: u64,
    seqid: u64,
    hdr_size: usize,
    json: &[u8],
) -> crate::Result<Vec<u8>> {
    if json.len() + 1 > hdr_size - 4096 {
        bail!("finalised LUKS2 JSON does not fit the metadata area");
    }
    let mut area = vec![0u8; hdr_size];
    area[..4096].copy_from_slice(&template[..4096]);
    area[0..6].copy_from_slice(magic);
    area[16..24].copy_from_slice(&seqid.to_be_bytes());
    area[256..264].copy_from_slice(&hdr_offset.to_be_bytes());
    area[448..512].fill(0);
    area[4096..4096 + json.len()].copy_from_slice(json);
    let digest = Sha256::digest(&area);
    area[448..480].copy_from_slice(&digest);
    Ok(area)
}

/// Writes the finalised metadata to both header copies of `device` and zeroes the areas of the
/// keyslots it drops. Precondition: [`all_data_on_final_key`] holds for the current metadata.
pub fn finalize(device: &Path) -> crate::Result<()> {
    let meta = match super::metadata::read(device)? {
        HeaderKind::Luks2(meta) => meta,
        _ => bail!("{} has no readable LUKS2 header", device.display()),
    };
    let (json, dropped) = finalized_json(&meta.json)?;
    let hdr_size = usize::try_from(meta.hdr_size)?;
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(device)
        .with_context(|| format!("cannot open {} for writing", device.display()))?;
    let mut both = vec![0u8; 2 * hdr_size];
    file.seek(SeekFrom::Start(0))?;
    file.read_exact(&mut both)?;
    let text = serde_json::to_vec(&json)?;
    let seqid = meta.seqid + 1;
    let primary = build_copy(&both[..hdr_size], MAGIC_PRIMARY, 0, seqid, hdr_size, &text)?;
    let secondary = build_copy(
        &both[hdr_size..],
        MAGIC_SECONDARY,
        meta.hdr_size,
        seqid,
        hdr_size,
        &text,
    )?;
    file.seek(SeekFrom::Start(0))?;
    file.write_all(&primary)?;
    file.sync_all()?;
    file.seek(SeekFrom::Start(meta.hdr_size))?;
    file.write_all(&secondary)?;
    file.sync_all()?;
    for (offset, size) in dropped {
        file.seek(SeekFrom::Start(offset))?;
        file.write_all(&vec![0u8; usize::try_from(size)?])?;
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
