//! A read-only reader of LUKS headers, so that probing and `status` never need a secret, never
//! take libcryptsetup's locks and can tell a damaged primary header from a missing one.
//!
//! LUKS2 on-disk format (both header copies; all integers big-endian):
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 6 | magic: `LUKS\xba\xbe` (primary) / `SKUL\xba\xbe` (secondary) |
//! | 6 | 2 | version (1 or 2) |
//! | 8 | 8 | hdr_size: binary header + JSON area |
//! | 16 | 8 | seqid |
//! | 24 | 48 | label |
//! | 72 | 32 | checksum algorithm (`sha256`) |
//! | 168 | 40 | uuid |
//! | 256 | 8 | hdr_offset of this copy |
//! | 448 | 64 | checksum over hdr_size bytes with this field zeroed |
//! | 4096 | hdr_size-4096 | JSON metadata, NUL-padded |

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use anyhow::Context;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

const MAGIC_PRIMARY: &[u8; 6] = b"LUKS\xba\xbe";
const MAGIC_SECONDARY: &[u8; 6] = b"SKUL\xba\xbe";
/// Header sizes LUKS2 allows; the secondary header sits at one of these offsets.
pub const HDR_SIZES: [u64; 9] = [
    0x4000, 0x8000, 0x10000, 0x20000, 0x40000, 0x80000, 0x100000, 0x200000, 0x400000,
];

/// What the start of a device holds.
#[derive(Debug, Clone)]
pub enum HeaderKind {
    /// No LUKS magic in either header position.
    None,
    /// A LUKS1 header.
    Luks1,
    /// A LUKS2 header (at least one valid copy).
    Luks2(Box<Luks2Metadata>),
    /// LUKS2 magic present but no copy passes its checksum.
    Luks2Damaged,
}

/// One keyslot as the JSON describes it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct KeyslotMeta {
    /// `luks2` or `reencrypt`.
    #[serde(rename = "type")]
    pub kind: String,
    /// KDF (`pbkdf2`, `argon2id`, …), for `luks2` keyslots.
    pub kdf: Option<String>,
    /// Re-encryption mode (`encrypt`, `reencrypt`, `decrypt`) for the `reencrypt` keyslot.
    pub mode: Option<String>,
}

/// One token.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TokenMeta {
    /// Token type, e.g. `systemd-tpm2`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Keyslots the token unlocks.
    pub keyslots: Vec<u32>,
    /// The whole token JSON.
    #[serde(skip)]
    pub json: Value,
}

/// The parts of a LUKS2 header cryptfs reads.
#[derive(Debug, Clone)]
pub struct Luks2Metadata {
    /// Header UUID.
    pub uuid: String,
    /// Header label.
    pub label: String,
    /// Sequence id of the copy used.
    pub seqid: u64,
    /// Size of one header copy (binary header + JSON area).
    pub hdr_size: u64,
    /// Size of the keyslots area behind both copies (`config.keyslots_size`), validated
    /// against the header size and the data offset.
    pub keyslots_size: u64,
    /// Whether the primary copy passed its checksum.
    pub primary_ok: bool,
    /// Whether the secondary copy passed its checksum.
    pub secondary_ok: bool,
    /// Keyslots by number.
    pub keyslots: BTreeMap<u32, KeyslotMeta>,
    /// Tokens by number.
    pub tokens: BTreeMap<u32, TokenMeta>,
    /// Mandatory requirements (e.g. `online-reencrypt-v2`).
    pub requirements: Vec<String>,
    /// Offset of the first data segment in bytes.
    pub data_offset: Option<u64>,
    /// Number of data segments (more than one while re-encryption is in flight).
    pub segment_count: usize,
    /// The parsed JSON of the copy used.
    pub json: Value,
}

impl Luks2Metadata {
    /// The mode of the in-flight re-encryption, from the `reencrypt` keyslot, if any.
    pub fn reencrypt_mode(&self) -> Option<&str> {
        if !self
            .requirements
            .iter()
            .any(|r| r.starts_with("online-reencrypt"))
        {
            return None;
        }
        self.keyslots
            .values()
            .find(|k| k.kind == "reencrypt")
            .and_then(|k| k.mode.as_deref())
            .or(Some("reencrypt"))
    }

    /// Whether a hotzone was in flight when the last re-encryption run stopped (a segment
    /// flagged `in-reencryption`): libcryptsetup's "crash" status, recovery needed.
    pub fn reencrypt_crashed(&self) -> bool {
        self.reencrypt_mode().is_some()
            && self
                .json
                .get("segments")
                .and_then(Value::as_object)
                .is_some_and(|segments| {
                    segments.values().any(|seg| {
                        seg.get("flags")
                            .and_then(Value::as_array)
                            .is_some_and(|f| f.iter().any(|x| x == "in-reencryption"))
                    })
                })
    }

    /// Tokens whose keyslots include `slot`.
    pub fn tokens_of(&self, slot: u32) -> impl Iterator<Item = (&u32, &TokenMeta)> {
        self.tokens
            .iter()
            .filter(move |(_, t)| t.keyslots.contains(&slot))
    }

    /// The digest of the volume key the data segment uses (from the `digests` section).
    pub fn segment_digest(&self) -> Option<&str> {
        let digests = self.json.get("digests")?.as_object()?;
        digests.values().find_map(|d| {
            let segments = d.get("segments")?.as_array()?;
            if segments.iter().any(|s| s.as_str() == Some("0")) {
                d.get("digest")?.as_str()
            } else {
                None
            }
        })
    }

    /// The encryption sector size of the data, when every data segment (not a re-encryption
    /// backup) agrees on one that cryptfs supports (512 or 4096); `None` otherwise.
    pub fn segment_sector_size(&self) -> Option<u32> {
        let segments = self.json.get("segments")?.as_object()?;
        let mut sizes = segments
            .values()
            .filter(|seg| {
                !seg.get("flags").and_then(Value::as_array).is_some_and(|f| {
                    f.iter()
                        .filter_map(Value::as_str)
                        .any(|x| x.starts_with("backup-"))
                })
            })
            .filter(|seg| seg.get("type").and_then(Value::as_str) == Some("crypt"))
            .map(|seg| seg.get("sector_size").and_then(Value::as_u64));
        let first = sizes.next()??;
        if !sizes.all(|s| s == Some(first)) {
            return None;
        }
        match first {
            512 => Some(512),
            4096 => Some(4096),
            _ => None,
        }
    }

    /// The header's persistent activation flags (`config.flags`: `no-read-workqueue`, ...), the
    /// strings only, at most 16 of at most 64 bytes each (hostile bytes stay bounded).
    pub fn persistent_flags(&self) -> Vec<String> {
        self.json
            .get("config")
            .and_then(|c| c.get("flags"))
            .and_then(Value::as_array)
            .map(|flags| {
                flags
                    .iter()
                    .filter_map(Value::as_str)
                    .filter(|f| f.len() <= 64)
                    .take(16)
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Checks that the data segments this header describes lie on a device of `device_size`
    /// bytes (an on-disk offset past the end is hostile or belongs to another device).
    pub fn check_fits(&self, device_size: u64) -> crate::Result<()> {
        let Some(segments) = self.json.get("segments").and_then(Value::as_object) else {
            return Ok(());
        };
        for (id, segment) in segments {
            let offset = segment.get("offset").and_then(num).unwrap_or(0);
            let end = match segment.get("size").and_then(Value::as_str) {
                Some("dynamic") => Some(offset),
                _ => segment
                    .get("size")
                    .and_then(num)
                    .and_then(|size| offset.checked_add(size)),
            };
            if end.is_none_or(|end| end > device_size) {
                anyhow::bail!(
                    "LUKS2 segment {id} (offset {offset}) extends past the end of the device                      ({device_size} bytes): the header does not belong to this device or was                      tampered with"
                );
            }
        }
        Ok(())
    }

    /// Ordinary keyslots (type `luks2`) that no token references: passphrases.
    pub fn passphrase_keyslots(&self) -> Vec<u32> {
        self.keyslots
            .iter()
            .filter(|(id, k)| k.kind == "luks2" && self.tokens_of(**id).next().is_none())
            .map(|(id, _)| *id)
            .collect()
    }
}

fn be64(b: &[u8], at: usize) -> Option<u64> {
    let bytes: [u8; 8] = b.get(at..at.checked_add(8)?)?.try_into().ok()?;
    Some(u64::from_be_bytes(bytes))
}

fn cstr(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// Bytes of the device start read to classify it: the largest primary header LUKS2 allows plus
/// the secondary header of the sizes cryptfs and libcryptsetup's defaults use (up to 2 MiB). A
/// fixed bound: nothing on the disk sizes a buffer.
pub const HEAD_BYTES: usize = 0x400000;

/// The largest keyslots area libcryptsetup accepts (`LUKS2_MAX_KEYSLOTS_SIZE`).
pub const MAX_KEYSLOTS_SIZE: u64 = 128 * 1024 * 1024;

/// Reads `len` bytes at `offset`, or fewer at the end of the device.
fn read_at(file: &mut std::fs::File, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    file.seek(SeekFrom::Start(offset))?;
    let mut got = 0;
    while got < len {
        match file.read(&mut buf[got..])? {
            0 => break,
            n => got += n,
        }
    }
    buf.truncate(got);
    Ok(buf)
}

/// A checksum-verified, validated header copy.
#[derive(Debug, Clone)]
struct Copy {
    seqid: u64,
    hdr_size: u64,
    label: String,
    uuid: String,
    json: Value,
}

/// Why a copy was not used.
enum CopyProblem {
    /// Wrong magic, size or checksum: a damaged or absent copy.
    Damaged,
    /// The checksum holds, but the JSON breaks the format's rules: hostile or buggy metadata.
    Invalid(String),
}

/// Verifies the copy at the start of `area`, which sits at `at` on the device.
fn verify_copy(area: &[u8], magic: &[u8; 6], at: u64) -> Result<Copy, CopyProblem> {
    if area.len() < 4096 || &area[0..6] != magic {
        return Err(CopyProblem::Damaged);
    }
    let hdr_size = be64(area, 8).ok_or(CopyProblem::Damaged)?;
    if !HDR_SIZES.contains(&hdr_size) {
        return Err(CopyProblem::Damaged);
    }
    // hdr_size is at most 4 MiB (HDR_SIZES), so it fits a usize.
    let Some(area) = usize::try_from(hdr_size).ok().and_then(|n| area.get(..n)) else {
        return Err(CopyProblem::Damaged);
    };
    if cstr(&area[72..104]) != "sha256" {
        return Err(CopyProblem::Damaged);
    }
    let mut hasher = Sha256::new();
    hasher.update(&area[..448]);
    hasher.update([0u8; 64]);
    hasher.update(&area[512..]);
    let digest = hasher.finalize();
    if digest.as_slice() != &area[448..480] {
        return Err(CopyProblem::Damaged);
    }
    let invalid = |why: String| CopyProblem::Invalid(why);
    // The secondary copy sits right behind the primary, whose size it repeats.
    let hdr_offset = be64(area, 256).ok_or(CopyProblem::Damaged)?;
    if hdr_offset != at {
        return Err(invalid(format!(
            "header copy at byte {at} says it is at byte {hdr_offset}"
        )));
    }
    if at != 0 && at != hdr_size {
        return Err(invalid(format!(
            "secondary header at byte {at} has size {hdr_size}"
        )));
    }
    let json_bytes = &area[4096..];
    let end = json_bytes
        .iter()
        .position(|&c| c == 0)
        .unwrap_or(json_bytes.len());
    let json: Value = serde_json::from_slice(&json_bytes[..end])
        .map_err(|e| invalid(format!("JSON metadata does not parse: {e}")))?;
    validate_json(&json, hdr_size).map_err(invalid)?;
    Ok(Copy {
        seqid: be64(area, 16).ok_or(CopyProblem::Damaged)?,
        hdr_size,
        label: cstr(&area[24..72]),
        uuid: cstr(&area[168..208]),
        json,
    })
}

fn num(v: &Value) -> Option<u64> {
    match v {
        Value::String(s) => s.parse().ok(),
        Value::Number(n) => n.as_u64(),
        _ => None,
    }
}

/// A LUKS2 size or offset: a decimal string (the format's rule for u64 values).
fn u64_field(obj: &Value, field: &str, what: &str) -> Result<u64, String> {
    obj.get(field)
        .and_then(Value::as_str)
        .and_then(|s| s.parse::<u64>().ok())
        .ok_or_else(|| format!("{what} has no valid \"{field}\" (a decimal string)"))
}

fn section<'a>(json: &'a Value, name: &str) -> Result<&'a Map<String, Value>, String> {
    json.get(name)
        .and_then(Value::as_object)
        .ok_or_else(|| format!("JSON metadata has no \"{name}\" object"))
}

/// The bounds libcryptsetup's own validation puts on what cryptfs uses: every keyslot area
/// inside the keyslots area, the keyslots area between both header copies and the data, sizes
/// that add up without overflow, every section and token an object.
fn validate_json(json: &Value, hdr_size: u64) -> Result<(), String> {
    if !json.is_object() {
        return Err("JSON metadata is not an object".into());
    }
    let config = section(json, "config")?;
    let config = Value::Object(config.clone());
    let json_size = u64_field(&config, "json_size", "config")?;
    if json_size.checked_add(4096) != Some(hdr_size) {
        return Err(format!(
            "config json_size {json_size} does not match the header size {hdr_size}"
        ));
    }
    let keyslots_size = u64_field(&config, "keyslots_size", "config")?;
    if !keyslots_size.is_multiple_of(4096) || keyslots_size > MAX_KEYSLOTS_SIZE {
        return Err(format!(
            "config keyslots_size {keyslots_size} is not a multiple of 4096 up to 128 MiB"
        ));
    }
    let areas_start = 2 * hdr_size;
    let areas_end = areas_start + keyslots_size;
    for (id, slot) in section(json, "keyslots")? {
        let what = format!("keyslot {id}");
        id.parse::<u32>()
            .map_err(|_| format!("{what}: id is not a number"))?;
        let area = slot
            .get("area")
            .filter(|a| a.is_object())
            .ok_or_else(|| format!("{what} has no area object"))?;
        let offset = u64_field(area, "offset", &what)?;
        let size = u64_field(area, "size", &what)?;
        let end = offset.checked_add(size);
        if offset < areas_start || size == 0 || end.is_none_or(|e| e > areas_end) {
            return Err(format!(
                "{what} area [{offset}, +{size}) lies outside the keyslots area [{areas_start}, \
                 {areas_end})"
            ));
        }
    }
    let mut min_data_offset: Option<u64> = None;
    for (id, segment) in section(json, "segments")? {
        let what = format!("segment {id}");
        id.parse::<u32>()
            .map_err(|_| format!("{what}: id is not a number"))?;
        if !segment.is_object() {
            return Err(format!("{what} is not an object"));
        }
        let offset = u64_field(segment, "offset", &what)?;
        match segment.get("size").and_then(Value::as_str) {
            Some("dynamic") => {}
            _ => {
                let size = u64_field(segment, "size", &what)?;
                if offset.checked_add(size).is_none() {
                    return Err(format!("{what}: offset {offset} + size {size} overflows"));
                }
            }
        }
        let backup = segment
            .get("flags")
            .and_then(Value::as_array)
            .is_some_and(|f| {
                f.iter()
                    .filter_map(Value::as_str)
                    .any(|f| f.starts_with("backup-"))
            });
        if !backup {
            min_data_offset = Some(min_data_offset.map_or(offset, |m| m.min(offset)));
        }
    }
    // Offset 0 is a detached header: the data lives on another device.
    if let Some(data) = min_data_offset.filter(|o| *o != 0) {
        if data < areas_end {
            return Err(format!(
                "data offset {data} lies inside the header and keyslots area (ends at \
                 {areas_end})"
            ));
        }
    }
    section(json, "digests")?;
    if let Some(tokens) = json.get("tokens") {
        let tokens = tokens.as_object().ok_or("\"tokens\" is not an object")?;
        for (id, token) in tokens {
            id.parse::<u32>()
                .map_err(|_| format!("token {id}: id is not a number"))?;
            if !token.is_object() || token.get("type").and_then(Value::as_str).is_none() {
                return Err(format!("token {id} is not an object with a \"type\""));
            }
        }
    }
    Ok(())
}

fn slot_list(v: Option<&Value>) -> Vec<u32> {
    v.and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|s| num(s).and_then(|n| u32::try_from(n).ok()))
                .collect()
        })
        .unwrap_or_default()
}

/// Reads and classifies the header of `device`.
pub fn read(device: &Path) -> crate::Result<HeaderKind> {
    let mut file = std::fs::File::open(device)
        .with_context(|| format!("cannot open {} for reading", device.display()))?;
    let head = read_at(&mut file, 0, HEAD_BYTES)?;
    parse(&head).with_context(|| format!("LUKS2 header of {}", device.display()))
}

/// Classifies the first bytes of a device (or a header backup such as `luks.bin`): at most
/// [`HEAD_BYTES`] are looked at. Never panics; a header copy whose checksum holds but whose
/// JSON breaks the format's bounds is not used, and when no copy is usable for that reason the
/// error says why.
pub fn parse(head: &[u8]) -> crate::Result<HeaderKind> {
    let head = &head[..head.len().min(HEAD_BYTES)];
    let primary_magic = head.len() >= 8 && &head[0..6] == MAGIC_PRIMARY;
    if primary_magic && u16::from_be_bytes([head[6], head[7]]) == 1 {
        return Ok(HeaderKind::Luks1);
    }
    let mut invalid = Vec::new();
    let mut keep = |r: Result<Copy, CopyProblem>, which: &str| match r {
        Ok(copy) => Some(copy),
        Err(CopyProblem::Invalid(why)) => {
            invalid.push(format!("{which} copy: {why}"));
            None
        }
        Err(CopyProblem::Damaged) => None,
    };
    let primary = keep(verify_copy(head, MAGIC_PRIMARY, 0), "primary");
    let secondary_at = primary
        .as_ref()
        .map(|p| vec![p.hdr_size])
        .unwrap_or_else(|| HDR_SIZES.to_vec());
    let mut secondary = None;
    let mut secondary_magic = false;
    for at in secondary_at {
        let Some(area) = usize::try_from(at).ok().and_then(|at| head.get(at..)) else {
            continue;
        };
        if area.len() >= 6 && &area[0..6] == MAGIC_SECONDARY {
            secondary_magic = true;
            if let Some(copy) = keep(verify_copy(area, MAGIC_SECONDARY, at), "secondary") {
                secondary = Some(copy);
                break;
            }
        }
    }
    let (primary_ok, secondary_ok) = (primary.is_some(), secondary.is_some());
    let best = match (primary, secondary) {
        (Some(p), Some(s)) => {
            if s.seqid > p.seqid {
                s
            } else {
                p
            }
        }
        (Some(p), None) => p,
        (None, Some(s)) => s,
        (None, None) if !invalid.is_empty() => {
            anyhow::bail!(
                "LUKS2 metadata breaks the format's rules, refusing to use it: {}",
                invalid.join("; ")
            )
        }
        (None, None) => {
            return Ok(if primary_magic || secondary_magic {
                HeaderKind::Luks2Damaged
            } else {
                HeaderKind::None
            })
        }
    };
    let Copy {
        seqid,
        hdr_size,
        label,
        uuid,
        json,
    } = best;
    let mut keyslots = BTreeMap::new();
    if let Some(map) = json.get("keyslots").and_then(Value::as_object) {
        for (id, k) in map {
            if let Ok(id) = id.parse::<u32>() {
                keyslots.insert(
                    id,
                    KeyslotMeta {
                        kind: k.get("type").and_then(Value::as_str).unwrap_or("").into(),
                        kdf: k
                            .pointer("/kdf/type")
                            .and_then(Value::as_str)
                            .map(String::from),
                        mode: k.get("mode").and_then(Value::as_str).map(String::from),
                    },
                );
            }
        }
    }
    let mut tokens = BTreeMap::new();
    if let Some(map) = json.get("tokens").and_then(Value::as_object) {
        for (id, t) in map {
            if let Ok(id) = id.parse::<u32>() {
                tokens.insert(
                    id,
                    TokenMeta {
                        kind: t.get("type").and_then(Value::as_str).unwrap_or("").into(),
                        keyslots: slot_list(t.get("keyslots")),
                        json: t.clone(),
                    },
                );
            }
        }
    }
    let requirements = json
        .pointer("/config/requirements/mandatory")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(String::from)
                .collect()
        })
        .unwrap_or_default();
    let segments = json.get("segments").and_then(Value::as_object);
    let data_offset = segments.and_then(|s| {
        s.values()
            .filter_map(|seg| seg.get("offset").and_then(num))
            .min()
    });
    let keyslots_size = json
        .pointer("/config/keyslots_size")
        .and_then(num)
        .unwrap_or(0);
    Ok(HeaderKind::Luks2(Box::new(Luks2Metadata {
        uuid,
        label,
        seqid,
        hdr_size,
        keyslots_size,
        primary_ok,
        secondary_ok,
        keyslots,
        tokens,
        requirements,
        data_offset,
        segment_count: segments.map_or(0, |s| s.len()),
        json,
    })))
}
