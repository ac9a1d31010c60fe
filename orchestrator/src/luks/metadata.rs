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
use serde_json::Value;
use sha2::{Digest, Sha256};

const MAGIC_PRIMARY: &[u8; 6] = b"LUKS\xba\xbe";
const MAGIC_SECONDARY: &[u8; 6] = b"SKUL\xba\xbe";
/// Header sizes LUKS2 allows; the secondary header sits at one of these offsets.
const HDR_SIZES: [u64; 9] = [
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

    /// Ordinary keyslots (type `luks2`) that no token references: passphrases.
    pub fn passphrase_keyslots(&self) -> Vec<u32> {
        self.keyslots
            .iter()
            .filter(|(id, k)| k.kind == "luks2" && self.tokens_of(**id).next().is_none())
            .map(|(id, _)| *id)
            .collect()
    }
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

fn cstr(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

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

/// A checksum-verified header copy: (seqid, hdr_size, label, uuid, json).
type Copy = (u64, u64, String, String, Value);

fn verify_copy(area: &[u8], magic: &[u8; 6]) -> Option<Copy> {
    if area.len() < 4096 || &area[0..6] != magic {
        return None;
    }
    let hdr_size = be64(area, 8);
    if !HDR_SIZES.contains(&hdr_size) || (area.len() as u64) < hdr_size {
        return None;
    }
    let area = &area[..hdr_size as usize];
    if cstr(&area[72..104]) != "sha256" {
        return None;
    }
    let mut hasher = Sha256::new();
    hasher.update(&area[..448]);
    hasher.update([0u8; 64]);
    hasher.update(&area[512..]);
    let digest = hasher.finalize();
    if digest.as_slice() != &area[448..480] {
        return None;
    }
    let json_bytes = &area[4096..];
    let end = json_bytes
        .iter()
        .position(|&c| c == 0)
        .unwrap_or(json_bytes.len());
    let json: Value = serde_json::from_slice(&json_bytes[..end]).ok()?;
    Some((
        be64(area, 16),
        hdr_size,
        cstr(&area[24..72]),
        cstr(&area[168..208]),
        json,
    ))
}

fn num(v: &Value) -> Option<u64> {
    match v {
        Value::String(s) => s.parse().ok(),
        Value::Number(n) => n.as_u64(),
        _ => None,
    }
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
    let head = read_at(&mut file, 0, 0x400000)?;
    let primary_magic = head.len() >= 8 && &head[0..6] == MAGIC_PRIMARY;
    if primary_magic && u16::from_be_bytes([head[6], head[7]]) == 1 {
        return Ok(HeaderKind::Luks1);
    }
    let primary = verify_copy(&head, MAGIC_PRIMARY);
    let secondary_at = primary
        .as_ref()
        .map(|p| vec![p.1])
        .unwrap_or_else(|| HDR_SIZES.to_vec());
    let mut secondary = None;
    let mut secondary_magic = false;
    for at in secondary_at {
        if (at as usize) < head.len() {
            let area = &head[at as usize..];
            secondary_magic |= area.len() >= 6 && &area[0..6] == MAGIC_SECONDARY;
            if let Some(copy) = verify_copy(area, MAGIC_SECONDARY) {
                secondary = Some(copy);
                break;
            }
        }
    }
    let (primary_ok, secondary_ok) = (primary.is_some(), secondary.is_some());
    let best = match (primary, secondary) {
        (Some(p), Some(s)) => {
            if s.0 > p.0 {
                s
            } else {
                p
            }
        }
        (Some(p), None) => p,
        (None, Some(s)) => s,
        (None, None) => {
            return Ok(if primary_magic || secondary_magic {
                HeaderKind::Luks2Damaged
            } else {
                HeaderKind::None
            })
        }
    };
    let (seqid, hdr_size, label, uuid, json) = best;
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
    Ok(HeaderKind::Luks2(Box::new(Luks2Metadata {
        uuid,
        label,
        seqid,
        hdr_size,
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
