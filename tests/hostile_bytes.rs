//! Hostile bytes: every reader of the disk, the boot partition or the configuration is fed
//! mutated *real* artefacts (headers made by cryptsetup, superblocks made by mkfs.ext4, tokens
//! sealed by swtpm, a redb journal written by cryptfs, a `luks.bin` from luksHeaderBackup) and
//! must answer with a value or a clear error: no panic, no unbounded allocation, nothing written.
//! Each property test counts the cases it ran and how many reached the deep paths, and asserts
//! both. The end-to-end cases show `cryptfs run` refusing a hostile device, which is unchanged.
//!
//! The same artefacts seed the cargo-fuzz corpus: `CRYPTFS_FUZZ_CORPUS=dir cargo test --test
//! hostile_bytes -- --ignored write_fuzz_corpus` (what `cargo xtask fuzz` runs first).

mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{config_text, cryptfs_with, file_blake3, run, run_with_stdin, Swtpm};
use cryptfs::kek::tpm2::{Tpm2Protector, Tpm2Token};
use cryptfs::kek::{KekProtector, SealedKek};
use cryptfs::luks::finalize::{self, AreaBounds, BinaryHeader};
use cryptfs::luks::metadata::{self, HeaderKind};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

// ---------------------------------------------------------------------------------------------
// A seeded mutator (no dependency, reproducible: every failure names its seed and case).

struct Mutator(u64);

impl Mutator {
    fn new(seed: u64) -> Mutator {
        Mutator(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        // xorshift64*
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn chance(&mut self, one_in: u64) -> bool {
        self.next().is_multiple_of(one_in)
    }

    /// A value chosen to break arithmetic: zero, one, powers of two, all ones, signed edges.
    fn extreme(&mut self) -> u64 {
        const VALUES: [u64; 12] = [
            0,
            1,
            255,
            4096,
            0x7fff_ffff,
            0x8000_0000,
            0xffff_ffff,
            1 << 32,
            1 << 52,
            i64::MAX as u64,
            1 << 63,
            u64::MAX,
        ];
        VALUES[self.below(VALUES.len())]
    }

    /// Byte-level damage: flips, extreme integers (BE and LE) at `hot` offsets or anywhere,
    /// truncation, splices from `other`, duplicated runs.
    fn bytes(&mut self, data: &mut Vec<u8>, hot: &[usize], other: &[u8]) {
        for _ in 0..1 + self.below(4) {
            if data.is_empty() {
                data.push(0);
            }
            match self.below(7) {
                0 | 1 => {
                    let i = self.below(data.len());
                    data[i] ^= 1 << self.below(8);
                }
                2 => {
                    let i = self.below(data.len());
                    data[i] = [0, 0xff, 0x7f, 0x80, b'"', b'{', b'9'][self.below(7)];
                }
                3 => {
                    let at = if !hot.is_empty() && !self.chance(4) {
                        hot[self.below(hot.len())]
                    } else {
                        self.below(data.len())
                    };
                    let v = self.extreme();
                    let (width, be) = ([4usize, 8][self.below(2)], self.chance(2));
                    let bytes = match (width, be) {
                        (8, true) => v.to_be_bytes().to_vec(),
                        (8, false) => v.to_le_bytes().to_vec(),
                        (_, true) => (v as u32).to_be_bytes().to_vec(),
                        (_, false) => (v as u32).to_le_bytes().to_vec(),
                    };
                    for (k, b) in bytes.into_iter().enumerate() {
                        if let Some(slot) = data.get_mut(at + k) {
                            *slot = b;
                        }
                    }
                }
                4 => {
                    let len = self.below(data.len() + 1);
                    data.truncate(len);
                }
                5 if !other.is_empty() => {
                    let from = self.below(other.len());
                    let len = self.below((other.len() - from).min(4096) + 1);
                    let at = self.below(data.len());
                    let end = (at + len).min(data.len());
                    data[at..end].copy_from_slice(&other[from..from + (end - at)]);
                }
                _ => {
                    let from = self.below(data.len());
                    let len = self.below((data.len() - from).min(512) + 1);
                    let run = data[from..from + len].to_vec();
                    let at = self.below(data.len());
                    data.splice(at..at, run);
                }
            }
        }
    }

    /// A hostile JSON value: wrong types, out-of-range numbers, numbers as strings past u64,
    /// deep nesting, long strings.
    fn hostile_value(&mut self) -> Value {
        match self.below(16) {
            0 => Value::Null,
            1 => json!(7),
            2 => json!(-1),
            3 => json!(1.5),
            4 => json!("18446744073709551616"),
            5 => json!(u64::MAX.to_string()),
            6 => json!(self.extreme().to_string()),
            7 => json!("dynamic"),
            8 => json!([]),
            9 => json!({}),
            10 => json!([40]),
            11 => json!([255, 32, 24]),
            12 => json!("x".repeat(self.below(70_000))),
            13 => {
                let mut v = json!(1);
                for _ in 0..self.below(300) {
                    v = json!([v]);
                }
                v
            }
            14 => json!(true),
            _ => json!((self.next() % (1 << 40)).to_string()),
        }
    }

    /// Replaces, removes or adds one node somewhere in `value`.
    fn json(&mut self, value: &mut Value) {
        let depth = self.below(6);
        self.json_at(value, depth);
    }

    fn json_at(&mut self, node: &mut Value, depth: usize) {
        if depth > 0 {
            let pick = self.next() as usize;
            let child = match node {
                Value::Object(map) if !map.is_empty() => {
                    let n = map.len();
                    map.values_mut().nth(pick % n)
                }
                Value::Array(items) if !items.is_empty() => {
                    let n = items.len();
                    items.get_mut(pick % n)
                }
                _ => None,
            };
            if let Some(child) = child {
                return self.json_at(child, depth - 1);
            }
        }
        let op = self.below(4);
        if let Value::Object(map) = node {
            if op == 0 && !map.is_empty() {
                let key = map.keys().nth(self.below(map.len())).cloned();
                if let Some(k) = key {
                    map.remove(&k);
                }
                return;
            }
            if op == 1 {
                let key = [
                    "offset", "size", "type", "keyslots", "segments", "flags", "7",
                ][self.below(7)];
                let v = self.hostile_value();
                map.insert(key.into(), v);
                return;
            }
        }
        *node = self.hostile_value();
    }
}

/// Runs `f`, turning a panic into an error message (the property tests collect them all).
fn no_panic<T>(what: &str, f: impl FnOnce() -> T) -> Result<T, String> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|e| {
        let msg = e
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        format!("{what}: panicked: {msg}")
    })
}

/// An error a user can act on: says something, not a bare "error".
fn assert_clear(err: &anyhow::Error, what: &str) {
    let text = format!("{err:#}");
    assert!(text.len() >= 12, "{what}: unclear error {text:?}");
}

// ---------------------------------------------------------------------------------------------
// Real artefacts.

fn cryptsetup(args: &[&str], stdin: &[u8]) {
    run_with_stdin("cryptsetup", args, stdin);
}

/// A LUKS2 image (pbkdf2, cheap) of `mib` MiB, passphrase `pw`.
fn luks_image(path: &Path, mib: u64, extra: &[&str]) {
    std::fs::File::create(path)
        .expect("create")
        .set_len(mib << 20)
        .expect("size");
    let p = path.display().to_string();
    let mut args = vec![
        "luksFormat",
        "--batch-mode",
        "--type",
        "luks2",
        "--pbkdf",
        "pbkdf2",
        "--pbkdf-force-iterations",
        "1000",
        "--key-file",
        "-",
    ];
    args.extend_from_slice(extra);
    args.push(&p);
    cryptsetup(&args, b"pw");
}

fn head_of(path: &Path, len: usize) -> Vec<u8> {
    let mut bytes = std::fs::read(path).expect("read");
    bytes.truncate(len);
    bytes
}

/// Recomputes the checksum of the copy at `at` (hostile metadata that passes the checksum).
fn reseal_copy(bytes: &mut [u8], at: usize) {
    let Some(size) = bytes
        .get(at + 8..at + 16)
        .map(|b| u64::from_be_bytes(b.try_into().expect("8")) as usize)
    else {
        return;
    };
    if !metadata::HDR_SIZES.contains(&(size as u64)) || bytes.len() < at + size {
        return;
    }
    let area = &mut bytes[at..at + size];
    area[448..512].fill(0);
    let digest = Sha256::digest(&*area);
    area[448..480].copy_from_slice(&digest);
}

fn hdr_size_of(bytes: &[u8]) -> usize {
    u64::from_be_bytes(bytes[8..16].try_into().expect("8")) as usize
}

/// Writes `json` into both copies of a header and reseals them.
fn with_json(bytes: &mut [u8], json: &Value) {
    let size = hdr_size_of(bytes);
    let text = serde_json::to_vec(json).expect("json");
    for at in [0, size] {
        let area = &mut bytes[at + 4096..at + size];
        area.fill(0);
        let n = text.len().min(area.len());
        area[..n].copy_from_slice(&text[..n]);
        reseal_copy(bytes, at);
    }
}

fn json_of(bytes: &[u8]) -> Value {
    match metadata::parse(bytes).expect("parse") {
        HeaderKind::Luks2(meta) => meta.json,
        other => panic!("not LUKS2: {other:?}"),
    }
}

/// Turns the JSON of a `reencrypt --init-only` header into the "all data on the final key,
/// metadata not finalised" signature (crash windows A/B): the data segment is bound to the
/// final digest, the old digest only to `backup-previous`.
fn final_state_json(init: &Value) -> Value {
    let mut json = init.clone();
    let segments = json["segments"].as_object().expect("segments").clone();
    let find = |flag: &str| {
        segments
            .iter()
            .find(|(_, s)| {
                s["flags"]
                    .as_array()
                    .is_some_and(|f| f.iter().any(|x| x == flag))
            })
            .map(|(id, _)| id.clone())
            .expect("segment")
    };
    let (previous, final_id) = (find("backup-previous"), find("backup-final"));
    let data = segments
        .iter()
        .find(|(_, s)| s.get("flags").is_none())
        .map(|(id, _)| id.clone())
        .expect("data segment");
    for (_, digest) in json["digests"].as_object_mut().expect("digests").iter_mut() {
        let segs: Vec<String> = digest["segments"]
            .as_array()
            .expect("segs")
            .iter()
            .filter_map(|s| s.as_str().map(String::from))
            .collect();
        if segs.contains(&final_id) {
            digest["segments"] = json!([data.clone(), final_id.clone()]);
        } else {
            digest["segments"] = json!([previous.clone()]);
        }
    }
    json
}

struct Artefacts {
    _dir: tempfile::TempDir,
    /// Heads of real LUKS2 devices (both header copies), by name.
    headers: Vec<(&'static str, Vec<u8>)>,
    /// Real ext4 superblocks (1024 bytes).
    superblocks: Vec<(&'static str, [u8; 1024])>,
    /// A real journal file and its records' stored bytes.
    journal_file: Vec<u8>,
    records: Vec<Vec<u8>>,
    /// A configuration as the tests write it.
    config: String,
}

fn artefacts() -> Artefacts {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let mut headers = Vec::new();

    let plain = d.join("plain.img");
    luks_image(&plain, 20, &["--label", "otaroot"]);
    headers.push(("luks2-plain", head_of(&plain, 0x10000)));

    let tokens = d.join("tokens.img");
    luks_image(&tokens, 20, &["--luks2-metadata-size", "64k"]);
    let token = json!({"type":"systemd-tpm2","keyslots":["0"],
        "tpm2-blob":"AAIAAAACAAA=","tpm2-pcrs":[7],"tpm2-pcr-bank":"sha256",
        "tpm2-primary-alg":"ecc","tpm2-policy-hash":"00".repeat(32),"tpm2-pin":false});
    let token_file = d.join("token.json");
    std::fs::write(&token_file, token.to_string()).expect("token");
    cryptsetup(
        &[
            "token",
            "import",
            "--json-file",
            &token_file.display().to_string(),
            &tokens.display().to_string(),
        ],
        b"",
    );
    headers.push(("luks2-token-64k", head_of(&tokens, 0x40000)));

    let init = d.join("init.img");
    luks_image(&init, 40, &[]);
    cryptsetup(
        &[
            "reencrypt",
            "--init-only",
            "--batch-mode",
            "--key-file",
            "-",
            "--pbkdf",
            "pbkdf2",
            "--pbkdf-force-iterations",
            "1000",
            &init.display().to_string(),
        ],
        b"pw",
    );
    let init_head = head_of(&init, 0x10000);
    let mut final_head = init_head.clone();
    with_json(&mut final_head, &final_state_json(&json_of(&init_head)));
    headers.push(("luks2-reencrypt-init", init_head));
    headers.push(("luks2-all-data-final", final_head));

    let backup = d.join("luks.bin");
    cryptsetup(
        &[
            "luksHeaderBackup",
            &plain.display().to_string(),
            "--header-backup-file",
            &backup.display().to_string(),
        ],
        b"",
    );
    headers.push(("luks.bin", head_of(&backup, 0x10000)));

    let mut superblocks = Vec::new();
    for (name, args) in [
        ("ext4-4k", &["-b", "4096"][..]),
        ("ext4-1k", &["-b", "1024"][..]),
        ("ext4-64bit", &["-b", "4096", "-O", "64bit"][..]),
    ] {
        let img = d.join(format!("{name}.img"));
        std::fs::File::create(&img)
            .expect("create")
            .set_len(16 << 20)
            .expect("size");
        let mut all = vec!["-q", "-F", "-L", "otaroot"];
        all.extend_from_slice(args);
        let p = img.display().to_string();
        all.push(&p);
        run("mkfs.ext4", &all);
        let bytes = head_of(&img, 2048);
        superblocks.push((name, bytes[1024..2048].try_into().expect("1024")));
    }

    let journal_path = d.join("journal.redb");
    {
        let (mut journal, _) =
            cryptfs_journal::Journal::open_or_recover(&journal_path, 1, std::time::Duration::ZERO)
                .expect("journal");
        let sb_hex = hex::encode(superblocks[0].1);
        for (i, step) in ["encrypt-in-place", "encrypt-in-place", "backup-header"]
            .iter()
            .enumerate()
        {
            journal
                .append(cryptfs_journal::RecordBody {
                    seq: 0,
                    time_unix_ms: 1_700_000_000_000 + i as u64,
                    boot_id: "0b5e7a9c-0000-4000-8000-000000000000".into(),
                    stage: "all".into(),
                    step: (*step).into(),
                    phase: if i == 1 {
                        cryptfs_journal::Phase::Done
                    } else {
                        cryptfs_journal::Phase::Intent
                    },
                    state_before: None,
                    state_after: None,
                    details: cryptfs_journal::Journal::details([
                        ("superblock_before", Value::from(sb_hex.clone())),
                        ("device_bytes", Value::from(100u64 << 20)),
                    ]),
                    prev_hash: String::new(),
                })
                .expect("append");
        }
    }
    let records = {
        let db = redb::Database::open(&journal_path).expect("redb");
        use redb::{ReadableDatabase, ReadableTable};
        let txn = db.begin_read().expect("read");
        let table = txn
            .open_table(redb::TableDefinition::<u64, &[u8]>::new("records"))
            .expect("table");
        table
            .iter()
            .expect("iter")
            .map(|e| e.expect("entry").1.value().to_vec())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        records.len(),
        3,
        "the real journal holds the records appended"
    );
    let journal_file = std::fs::read(&journal_path).expect("journal bytes");
    let config = config_text(
        Path::new("/dev/disk/by-label/otaroot"),
        Path::new("/boot"),
        "swtpm:host=127.0.0.1,port=2321",
        "mapping_name = \"root\"",
    );
    Artefacts {
        _dir: dir,
        headers,
        superblocks,
        journal_file,
        records,
        config,
    }
}

// ---------------------------------------------------------------------------------------------
// Exercising each reader on one input. Each returns which outcome it reached.

#[derive(Default, Debug)]
struct Tally {
    cases: usize,
    ok: usize,
    errors: usize,
    deep: usize,
    panics: Vec<String>,
}

impl Tally {
    fn record(&mut self, what: String, outcome: Result<Outcome, String>) {
        self.cases += 1;
        match outcome {
            Ok(Outcome::Ok) => self.ok += 1,
            Ok(Outcome::Deep) => {
                self.ok += 1;
                self.deep += 1
            }
            Ok(Outcome::Error) => self.errors += 1,
            Err(panic) => self.panics.push(format!("{what}: {panic}")),
        }
    }

    fn assert(&self, name: &str, cases: usize) {
        eprintln!("{name}: {self:?}");
        assert!(self.panics.is_empty(), "{name}: panics: {:#?}", self.panics);
        assert_eq!(self.cases, cases, "{name}: every case ran");
        assert!(
            self.ok > 0 && self.errors > 0,
            "{name}: both outcomes reached: {self:?}"
        );
    }
}

enum Outcome {
    Ok,
    /// Accepted, and the deeper consumers ran on it.
    Deep,
    Error,
}

/// Everything cryptfs does with a LUKS2 header it read, none of it writing.
fn exercise_luks(bytes: &[u8], device_size: u64, rules: &mut usize) -> Outcome {
    let meta = match metadata::parse(bytes) {
        Ok(HeaderKind::Luks2(meta)) => meta,
        Ok(_) => return Outcome::Ok,
        Err(e) => {
            assert_clear(&e, "LUKS2 parse");
            *rules += format!("{e}").contains("format's rules") as usize;
            return Outcome::Error;
        }
    };
    let _ = meta.check_fits(device_size);
    let _ = (
        meta.reencrypt_mode(),
        meta.reencrypt_crashed(),
        meta.segment_digest(),
        meta.passphrase_keyslots(),
        finalize::all_data_on_final_key(&meta),
        cryptfs::luks::marker::origin(&meta),
    );
    if let Ok(bounds) = AreaBounds::of(&meta) {
        if let Ok((json, dropped)) = finalize::finalized_json(&meta.json, bounds) {
            for (offset, size) in dropped {
                assert!(offset >= bounds.start && offset + size <= bounds.end);
            }
            let text = serde_json::to_vec(&json).expect("serialises");
            let header = BinaryHeader {
                seqid: meta.seqid.saturating_add(1),
                hdr_size: meta.hdr_size,
                label: &meta.label,
                uuid: &meta.uuid,
            };
            let _ = finalize::build_copy(&header, true, &text);
        }
    }
    for token in meta.tokens.values() {
        if let Some(sealed) = SealedKek::from_token(&token.json) {
            let _ = Tpm2Token::parse(&sealed.fields);
        }
    }
    Outcome::Deep
}

fn exercise_superblock(sb: &[u8]) -> Outcome {
    let Ok(sb) = <&[u8; 1024]>::try_from(sb) else {
        return Outcome::Ok;
    };
    match cryptfs::ext4::parse_superblock(sb) {
        Ok(Some(fs)) => {
            let _ = fs.size_bytes();
            Outcome::Deep
        }
        Ok(None) => Outcome::Ok,
        Err(e) => {
            assert_clear(&e, "ext4 parse");
            Outcome::Error
        }
    }
}

fn exercise_token(token: &Value, tpm: &mut Tpm2Protector) -> Outcome {
    let _ = tpm.can_use(token);
    if let Some(uri) = token.get("pkcs11-uri").and_then(Value::as_str) {
        return match cryptfs::kek::pkcs11::Pkcs11Uri::parse(uri) {
            Ok(_) => Outcome::Deep,
            Err(e) => {
                assert_clear(&e, "pkcs11 uri");
                Outcome::Error
            }
        };
    }
    let Some(sealed) = SealedKek::from_token(token) else {
        return Outcome::Ok;
    };
    match Tpm2Token::parse(&sealed.fields) {
        Ok(_) => Outcome::Deep,
        Err(e) => {
            assert_clear(&e, "token parse");
            Outcome::Error
        }
    }
}

fn exercise_records(records: &[Vec<u8>]) -> Outcome {
    let mut decoded = Vec::new();
    for bytes in records {
        match cryptfs_journal::Record::decode(bytes) {
            Ok(r) => decoded.push(r),
            Err(e) => {
                assert!(!e.to_string().is_empty());
                return Outcome::Error;
            }
        }
    }
    match cryptfs_journal::verify_chain(&decoded) {
        Ok(()) => Outcome::Deep,
        Err(e) => {
            assert!(!e.to_string().is_empty());
            Outcome::Error
        }
    }
}

fn exercise_config(text: &str) -> Outcome {
    match cryptfs::config::Config::parse(text) {
        Ok(config) => match Tpm2Protector::new(&config.kek.tpm2) {
            Ok(_) => Outcome::Deep,
            Err(e) => {
                assert_clear(&e, "config tpm2");
                Outcome::Error
            }
        },
        Err(e) => {
            assert_clear(&e, "config parse");
            Outcome::Error
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Property tests (the CI form of the fuzz targets).

const LUKS_CASES: usize = 6000;
const EXT4_CASES: usize = 20_000;
const TOKEN_CASES: usize = 4000;
const RECORD_CASES: usize = 4000;
const JOURNAL_FILE_CASES: usize = 120;
const CONFIG_CASES: usize = 3000;

#[test]
fn luks2_headers_and_luks_bin_never_panic() {
    let a = artefacts();
    // The real artefacts themselves parse (positive control for the mutations below).
    for (name, bytes) in &a.headers {
        assert!(
            matches!(metadata::parse(bytes), Ok(HeaderKind::Luks2(_))),
            "{name} must parse"
        );
    }
    let finals = a
        .headers
        .iter()
        .filter(|(_, b)| match metadata::parse(b) {
            Ok(HeaderKind::Luks2(m)) => finalize::all_data_on_final_key(&m),
            _ => false,
        })
        .count();
    assert_eq!(
        finals, 1,
        "the synthesised crash-window header has the signature"
    );
    let mut tally = Tally::default();
    let mut rejected_by_rules = 0;
    let jsons: Vec<Value> = a.headers.iter().map(|(_, b)| json_of(b)).collect();
    let mut m = Mutator::new(0x4c554b53);
    for case in 0..LUKS_CASES {
        let (name, base) = &a.headers[case % a.headers.len()];
        let base_json = &jsons[case % a.headers.len()];
        let other = &a.headers[m.below(a.headers.len())].1;
        let mut bytes = base.clone();
        let size = hdr_size_of(&bytes);
        match m.below(3) {
            // Raw damage, checksums left as they fall.
            0 => m.bytes(&mut bytes, &[6, 8, 16, 256, size + 8, size + 256], other),
            // Hostile JSON that passes the checksum.
            1 => {
                let mut json = base_json.clone();
                for _ in 0..1 + m.below(3) {
                    m.json(&mut json);
                }
                with_json(&mut bytes, &json);
            }
            // Damaged binary fields, resealed.
            _ => {
                m.bytes(
                    &mut bytes,
                    &[8, 16, 256, size + 8, size + 16, size + 256],
                    &[],
                );
                if bytes.len() >= 2 * size {
                    reseal_copy(&mut bytes, 0);
                    reseal_copy(&mut bytes, size);
                }
            }
        }
        let device_size = [0, 1 << 20, 40 << 20, u64::MAX][m.below(4)];
        let outcome = no_panic("luks", || {
            exercise_luks(&bytes, device_size, &mut rejected_by_rules)
        });
        tally.record(format!("seed 0x4c554b53 case {case} ({name})"), outcome);
    }
    tally.assert("luks2", LUKS_CASES);
    assert!(
        tally.deep > LUKS_CASES / 10,
        "mutations reach the consumers"
    );
    assert!(
        rejected_by_rules > LUKS_CASES / 20,
        "resealed hostile JSON is refused by the bounds, not the checksum: {rejected_by_rules}"
    );
}

#[test]
fn ext4_superblocks_never_panic() {
    let a = artefacts();
    let mut tally = Tally::default();
    let mut m = Mutator::new(0xef53);
    let hot = [0x4, 0xC, 0x18, 0x38, 0x60, 0x150, 0x158];
    for case in 0..EXT4_CASES {
        let (name, base) = &a.superblocks[case % a.superblocks.len()];
        let mut bytes = base.to_vec();
        let other = a.superblocks[m.below(3)].1;
        m.bytes(&mut bytes, &hot, &other);
        bytes.resize(1024, 0);
        tally.record(
            format!("seed 0xef53 case {case} ({name})"),
            no_panic("ext4", || exercise_superblock(&bytes)),
        );
    }
    // The overflow that used to panic in size_bytes: 64-bit count × 64 KiB blocks.
    let mut sb = a.superblocks[2].1;
    sb[0x150..0x154].copy_from_slice(&u32::MAX.to_le_bytes());
    sb[0x18..0x1c].copy_from_slice(&6u32.to_le_bytes());
    let err = cryptfs::ext4::parse_superblock(&sb).expect_err("absurd block count refused");
    assert!(format!("{err}").contains("impossible block count"), "{err}");
    tally.assert("ext4", EXT4_CASES);
    assert!(tally.deep > EXT4_CASES / 4);
}

#[test]
fn tokens_never_panic_and_pcrs_are_bounded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tpm = Swtpm::start(dir.path());
    let mut protector = Tpm2Protector::new(&cryptfs::config::Tpm2Config {
        tcti: tpm.tcti(),
        pcrs: vec![7],
        pcr_bank: "sha256".into(),
        ..Default::default()
    })
    .expect("protector");
    let (_, sealed) = protector.seal().expect("seal with swtpm");
    let real = sealed.token("systemd-tpm2", 1);
    assert!(matches!(
        exercise_token(&real, &mut protector),
        Outcome::Deep
    ));
    // The named hostile fields, each a clear error.
    for (field, value, needle) in [
        ("tpm2-pcrs", json!([40]), "PCR 40 does not exist"),
        ("tpm2-pcrs", json!([255]), "PCR 255 does not exist"),
        ("tpm2-pcrs", json!([32]), "PCR 32 does not exist"),
        ("tpm2-pcrs", json!([24]), "PCR 24 does not exist"),
        ("tpm2-pcrs", json!([-1]), "PCR -1 does not exist"),
        ("tpm2-pcrs", json!("7"), "not a list"),
        (
            "tpm2-pcr-bank",
            json!("md5"),
            "unsupported PCR bank \"md5\"",
        ),
        ("tpm2-pcr-bank", json!(256), "not a string"),
        ("tpm2-blob", json!("!!"), "not base64"),
        ("tpm2-blob", json!("AAAA"), "truncated tpm2-blob"),
        ("tpm2-blob", json!("A".repeat(1 << 20)), "too large"),
        ("cryptfs-tpm2-primary-name", json!("zz"), "is not hex"),
        ("cryptfs-tpm2-primary-name", json!(7), "not a TPM name"),
        (
            "cryptfs-tpm2-primary-name",
            json!("00".repeat(1 << 16)),
            "not a TPM name",
        ),
    ] {
        let mut token = real.clone();
        token[field] = value;
        let sealed = SealedKek::from_token(&token).expect("object");
        let err = Tpm2Token::parse(&sealed.fields).expect_err(field);
        assert!(format!("{err:#}").contains(needle), "{field}: {err:#}");
        // And through the protector: refused before any TPM command.
        let err = protector.unseal(&sealed).expect_err(field);
        assert!(format!("{err:#}").contains(needle), "{field}: {err:#}");
    }
    assert!(SealedKek::from_token(&json!("not an object")).is_none());
    assert!(SealedKek::from_token(&json!([1, 2])).is_none());
    let mut tally = Tally::default();
    let mut m = Mutator::new(0x7470_6d32);
    let mut through_tpm = 0;
    let pkcs11 = json!({"type":"systemd-pkcs11","keyslots":["0"],
        "pkcs11-uri":"pkcs11:token=lmp;object=luks;id=%9d","pkcs11-key":"AAAA"});
    for case in 0..TOKEN_CASES {
        let mut token = if case % 4 == 3 {
            pkcs11.clone()
        } else {
            real.clone()
        };
        for _ in 0..1 + m.below(2) {
            m.json(&mut token);
        }
        let outcome = no_panic("token", || exercise_token(&token, &mut protector));
        // A few whole unseals through swtpm: a hostile blob must not panic tss-esapi either.
        if case % 200 == 0 {
            if let Some(sealed) = SealedKek::from_token(&token) {
                if let Err(p) = no_panic("unseal", || protector.unseal(&sealed).map(|_| ())) {
                    tally.panics.push(p);
                }
                through_tpm += 1;
            }
        }
        tally.record(format!("seed 0x74706d32 case {case}"), outcome);
    }
    tally.assert("tokens", TOKEN_CASES);
    assert!(
        through_tpm >= 15,
        "hostile tokens unsealed through swtpm: {through_tpm}"
    );
}

/// The token's bank is what unsealing uses, not the configuration's: a protector configured
/// for sha1 unseals a token sealed over sha256, and a token that claims sha1 for a sha256
/// policy does not unseal (the bank the token names is the one the policy is computed over).
#[test]
fn unseal_uses_the_tokens_pcr_bank() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tpm = Swtpm::start(dir.path());
    let config = |bank: &str| cryptfs::config::Tpm2Config {
        tcti: tpm.tcti(),
        pcrs: vec![7],
        pcr_bank: bank.into(),
        ..Default::default()
    };
    let mut sealer = Tpm2Protector::new(&config("sha256")).expect("sha256");
    let (secret, sealed) = sealer.seal().expect("seal");
    assert_eq!(sealed.fields["tpm2-pcr-bank"], "sha256");
    let mut sha1_configured = Tpm2Protector::new(&config("sha1")).expect("sha1");
    let opened = sha1_configured
        .unseal(&sealed)
        .expect("the token's sha256 bank is used, not the configured sha1");
    assert_eq!(opened.expose(), secret.expose());
    let mut lying = sealed.clone();
    lying
        .fields
        .insert("tpm2-pcr-bank".into(), Value::from("sha1"));
    let err = sealer.unseal(&lying).expect_err("sha1 policy differs");
    assert!(format!("{err:#}").contains("bank sha1"), "{err:#}");
    let mut missing = sealed.clone();
    missing.fields.remove("tpm2-pcr-bank");
    let opened = sha1_configured
        .unseal(&missing)
        .expect("no bank in the token: systemd's default sha256");
    assert_eq!(opened.expose(), secret.expose());
}

#[test]
fn journal_records_and_files_never_panic() {
    let a = artefacts();
    assert!(matches!(exercise_records(&a.records), Outcome::Deep));
    // Size cap before any allocation by serde.
    let huge = vec![b' '; cryptfs_journal::MAX_RECORD_BYTES + 1];
    let err = cryptfs_journal::Record::decode(&huge).expect_err("oversized");
    assert!(err.to_string().contains("more than"), "{err}");
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    assert!(cryptfs_journal::Record::decode(deep.as_bytes()).is_err());
    let mut tally = Tally::default();
    let mut m = Mutator::new(0x6a726e6c);
    for case in 0..RECORD_CASES {
        let mut records = a.records.clone();
        let i = m.below(records.len());
        if m.chance(2) {
            let other = a.records[m.below(a.records.len())].clone();
            m.bytes(&mut records[i], &[], &other);
        } else {
            let mut value: Value = serde_json::from_slice(&records[i]).expect("json");
            m.json(&mut value);
            records[i] = serde_json::to_vec(&value).expect("json");
        }
        if m.chance(10) {
            let last = records.len() - 1;
            records.swap(0, last);
        }
        tally.record(
            format!("seed 0x6a726e6c case {case}"),
            no_panic("record", || exercise_records(&records)),
        );
    }
    tally.assert("journal records", RECORD_CASES);
    // Whole redb files, damaged: the read-only open (status) and open_verified answer or err.
    let dir = tempfile::tempdir().expect("tempdir");
    let mut files = Tally::default();
    let mut m = Mutator::new(0x72656462);
    for case in 0..JOURNAL_FILE_CASES {
        let mut bytes = a.journal_file.clone();
        for _ in 0..1 + m.below(8) {
            m.bytes(&mut bytes, &[], &a.records[0]);
        }
        let path = dir.path().join(format!("j{case}.redb"));
        std::fs::write(&path, &bytes).expect("write");
        let outcome = no_panic("redb", || {
            // The status path first: it must not write the file it reads.
            let _ = cryptfs_journal::Journal::read_only(&path);
            assert_eq!(
                std::fs::read(&path).expect("read back"),
                bytes,
                "a read-only open wrote to the journal"
            );
            match cryptfs_journal::Journal::open_verified(&path) {
                Ok(_) => Outcome::Deep,
                Err(_) => Outcome::Error,
            }
        });
        let _ = std::fs::remove_file(&path);
        files.record(format!("seed 0x72656462 case {case}"), outcome);
    }
    files.assert("journal files", JOURNAL_FILE_CASES);
}

#[test]
fn configurations_never_panic() {
    let a = artefacts();
    assert!(matches!(exercise_config(&a.config), Outcome::Deep));
    for (text, needle) in [
        (
            a.config.replace("pcrs = [7]", "pcrs = [40]"),
            "PCR 40 does not exist",
        ),
        (a.config.replace("pcrs = [7]", "pcrs = [256]"), "invalid"),
        (
            a.config.replace(
                "hotzone_size = 8388608",
                "hotzone_size = 18446744073709551615",
            ),
            "",
        ),
        (
            format!(
                "{}\nx = {}1{}",
                a.config,
                "[".repeat(5000),
                "]".repeat(5000)
            ),
            "",
        ),
    ] {
        let err = match cryptfs::config::Config::parse(&text) {
            Ok(config) => Tpm2Protector::new(&config.kek.tpm2).err(),
            Err(e) => Some(e),
        }
        .expect("hostile configuration refused");
        assert!(format!("{err:#}").contains(needle), "{err:#}");
    }
    let mut tally = Tally::default();
    let mut m = Mutator::new(0x746f6d6c);
    for case in 0..CONFIG_CASES {
        let mut bytes = a.config.clone().into_bytes();
        m.bytes(
            &mut bytes,
            &[],
            b"pcrs = [99]\n[kek.tpm2]\nhotzone_size = -1\n\"\"\"",
        );
        let text = String::from_utf8_lossy(&bytes).into_owned();
        tally.record(
            format!("seed 0x746f6d6c case {case}"),
            no_panic("config", || exercise_config(&text)),
        );
    }
    tally.assert("config", CONFIG_CASES);
}

// ---------------------------------------------------------------------------------------------
// The hand-written finalisation, on real images.

struct FinalImage {
    _dir: tempfile::TempDir,
    img: PathBuf,
}

/// A real 40 MiB LUKS2 image in the crash-window state (all data on the final key, metadata
/// not finalised), made from a real `reencrypt --init-only` header.
fn final_state_image() -> FinalImage {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("final.img");
    luks_image(&img, 40, &[]);
    cryptsetup(
        &[
            "reencrypt",
            "--init-only",
            "--batch-mode",
            "--key-file",
            "-",
            "--pbkdf",
            "pbkdf2",
            "--pbkdf-force-iterations",
            "1000",
            &img.display().to_string(),
        ],
        b"pw",
    );
    rewrite_head(&img, |head| {
        let json = final_state_json(&json_of(head));
        with_json(head, &json);
    });
    FinalImage { _dir: dir, img }
}

fn rewrite_head(img: &Path, f: impl FnOnce(&mut Vec<u8>)) {
    use std::io::{Seek, Write};
    let mut head = head_of(img, 0x10000);
    f(&mut head);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open(img)
        .expect("open");
    file.seek(std::io::SeekFrom::Start(0)).expect("seek");
    file.write_all(&head).expect("write");
}

fn test_passphrase(img: &Path) -> bool {
    let mut child = Command::new("cryptsetup")
        .args(["open", "--test-passphrase", "--key-file", "-"])
        .arg(img)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("cryptsetup");
    use std::io::Write;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"pw")
        .expect("pw");
    child.wait().expect("wait").success()
}

/// A torn secondary binary header (garbage in its reserved bytes) is rebuilt from parsed
/// fields: afterwards both copies verify, the reserved bytes are zero again, and libcryptsetup
/// opens the finalised volume.
#[test]
fn finalize_rebuilds_torn_headers_from_parsed_fields() {
    let f = final_state_image();
    rewrite_head(&f.img, |head| {
        let size = hdr_size_of(head);
        head[size + 264..size + 448].fill(0xA5);
    });
    let before = match metadata::read(&f.img).expect("read") {
        HeaderKind::Luks2(m) => m,
        other => panic!("{other:?}"),
    };
    assert!(before.primary_ok && !before.secondary_ok, "secondary torn");
    assert!(finalize::all_data_on_final_key(&before));
    finalize::finalize(&f.img, None).expect("finalise");
    let after = match metadata::read(&f.img).expect("read") {
        HeaderKind::Luks2(m) => m,
        other => panic!("{other:?}"),
    };
    assert!(
        after.primary_ok && after.secondary_ok,
        "both copies rebuilt"
    );
    assert_eq!(after.seqid, before.seqid + 1);
    assert_eq!(
        (after.uuid.as_str(), after.label.as_str()),
        (before.uuid.as_str(), "")
    );
    assert!(after.reencrypt_mode().is_none() && after.segment_count == 1);
    let head = head_of(&f.img, 0x10000);
    let size = hdr_size_of(&head);
    assert!(
        head[size + 264..size + 448].iter().all(|b| *b == 0),
        "no torn byte kept"
    );
    assert!(
        test_passphrase(&f.img),
        "libcryptsetup accepts the rebuilt headers"
    );
}

/// A keyslot area that reaches into the data: the reader refuses the metadata, finalisation
/// refuses before writing, the image is unchanged. The same bound inside `finalized_json`
/// holds on its own (a reader that let it through would not make it write out of bounds).
#[test]
fn finalize_refuses_out_of_bounds_areas_and_changes_nothing() {
    let f = final_state_image();
    rewrite_head(&f.img, |head| {
        let mut json = json_of(head);
        let slots = json["keyslots"].as_object_mut().expect("keyslots");
        let reencrypt = slots
            .values_mut()
            .find(|k| k["type"] == "reencrypt")
            .expect("reencrypt keyslot");
        reencrypt["area"]["offset"] = json!("16777216");
        with_json(head, &json);
    });
    let before = file_blake3(&f.img);
    let err = finalize::finalize(&f.img, None).expect_err("refused");
    assert!(
        format!("{err:#}").contains("outside the keyslots area"),
        "{err:#}"
    );
    assert_eq!(file_blake3(&f.img), before, "nothing written");

    let good = final_state_image();
    let meta = match metadata::read(&good.img).expect("read") {
        HeaderKind::Luks2(m) => m,
        other => panic!("{other:?}"),
    };
    let bounds = AreaBounds::of(&meta).expect("bounds");
    assert!(finalize::finalized_json(&meta.json, bounds).is_ok());
    let tight = AreaBounds {
        start: bounds.start,
        end: bounds.start + 4096,
    };
    let err = finalize::finalized_json(&meta.json, tight).expect_err("out of tight bounds");
    assert!(
        format!("{err:#}").contains("outside the keyslots area"),
        "{err:#}"
    );
    // A token that is not an object, a digest that is not an object: errors, not panics.
    for (pointer, value) in [("/tokens", json!({"0": 5})), ("/tokens", json!([]))] {
        let mut json = meta.json.clone();
        *json.pointer_mut(pointer).expect("pointer") = value;
        let err = finalize::finalized_json(&json, bounds).expect_err("non-object token");
        assert!(format!("{err:#}").contains("not an object"), "{err:#}");
    }
    let mut json = meta.json.clone();
    for d in json["digests"]
        .as_object_mut()
        .expect("digests")
        .values_mut()
    {
        if d["segments"].as_array().is_some_and(|s| s.len() == 2) {
            let segments = d["segments"].clone();
            *d = json!(["not", "an", "object"]);
            let _ = segments;
        }
    }
    assert!(finalize::finalized_json(&json, bounds).is_err());
}

/// The metadata lock is libcryptsetup's: while cryptfs holds it, cryptsetup waits (a block
/// device: `/run/cryptsetup/L_<major>:<minor>`; an image file: the file itself), and while
/// another process holds it, cryptfs waits and then refuses with a clear error.
#[test]
fn metadata_lock_is_libcryptsetups() {
    let f = final_state_image();
    // Regular file: a flock held on the image (another open file, as another process would
    // have) stops finalisation.
    let other = std::fs::File::open(&f.img).expect("open");
    // SAFETY: flock on a descriptor owned by `other`, alive for the call.
    let held = unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&other), libc::LOCK_EX) };
    assert_eq!(held, 0, "test holds the lock");
    let err = finalize::MetadataLock::acquire(&f.img, Duration::from_millis(400))
        .err()
        .expect("held elsewhere");
    assert!(
        format!("{err:#}").contains("held by another process"),
        "{err:#}"
    );
    drop(other);
    let lock = finalize::MetadataLock::acquire(&f.img, Duration::from_secs(5)).expect("free");
    // cryptsetup needs the same lock to change the metadata: it waits while we hold it.
    let waited = Command::new("timeout")
        .current_dir(std::env::temp_dir())
        .args(["2", "cryptsetup", "token", "remove", "--token-id", "0"])
        .arg(&f.img)
        .status()
        .expect("timeout");
    assert_eq!(
        waited.code(),
        Some(124),
        "cryptsetup blocked on our lock (file)"
    );
    drop(lock);

    // Block device (loop): the lock file under /run/cryptsetup, unlinked on release.
    let out = run(
        "losetup",
        &["--find", "--show", &f.img.display().to_string()],
    );
    let loop_dev = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    struct Detach(PathBuf);
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
        }
    }
    let _detach = Detach(loop_dev.clone());
    let rdev = std::os::unix::fs::MetadataExt::rdev(&std::fs::metadata(&loop_dev).expect("stat"));
    let resource = Path::new(finalize::LOCK_DIR).join(format!(
        "L_{}:{}",
        libc::major(rdev),
        libc::minor(rdev)
    ));
    let lock = finalize::MetadataLock::acquire(&loop_dev, Duration::from_secs(5)).expect("lock");
    assert!(resource.exists(), "{} made", resource.display());
    let waited = Command::new("timeout")
        .current_dir(std::env::temp_dir())
        .args(["2", "cryptsetup", "luksDump"])
        .arg(&loop_dev)
        .stdout(Stdio::null())
        .status()
        .expect("timeout");
    assert_eq!(
        waited.code(),
        Some(124),
        "cryptsetup blocked on our lock (block device)"
    );
    drop(lock);
    assert!(
        !resource.exists(),
        "lock file removed on release, as libcryptsetup does"
    );
    let free = Command::new("cryptsetup")
        .arg("luksDump")
        .arg(&loop_dev)
        .stdout(Stdio::null())
        .status()
        .expect("cryptsetup");
    assert!(
        free.success(),
        "control: without our lock cryptsetup goes through"
    );
    // No mapping holds the loop device: finalisation's holder check passes on the real path.
    assert_eq!(
        finalize::holders(&loop_dev).expect("holders"),
        Vec::<String>::new()
    );
    assert_eq!(
        finalize::holders(&f.img).expect("holders"),
        Vec::<String>::new()
    );
}

#[test]
fn finalize_refuses_an_active_mapping_unless_online() {
    let none: [String; 0] = [];
    assert!(finalize::may_finalize_with(&none, None).is_ok());
    assert!(finalize::may_finalize_with(&none, Some("root")).is_ok());
    let root = ["root".to_string()];
    assert!(finalize::may_finalize_with(&root, Some("root")).is_ok());
    let err = finalize::may_finalize_with(&root, None).expect_err("offline, active");
    assert!(err.contains("close the mapping"), "{err}");
    let err = finalize::may_finalize_with(&root, Some("other")).expect_err("not ours");
    assert!(err.contains("not only by"), "{err}");
    let two = ["root".to_string(), "dm-3".to_string()];
    assert!(finalize::may_finalize_with(&two, Some("root")).is_err());
}

// ---------------------------------------------------------------------------------------------
// End to end: `cryptfs run` refuses a hostile device with a clear error, the device unchanged.

struct Case {
    _dir: tempfile::TempDir,
    _tpm: Swtpm,
    device: PathBuf,
    config: PathBuf,
}

fn case(make: impl FnOnce(&Path)) -> Case {
    let dir = tempfile::tempdir().expect("tempdir");
    let tpm = Swtpm::start(dir.path());
    let device = dir.path().join("root.img");
    make(&device);
    let boot = dir.path().join("boot");
    std::fs::create_dir_all(&boot).expect("boot");
    let config = dir.path().join("cryptfs.toml");
    std::fs::write(&config, config_text(&device, &boot, &tpm.tcti(), "")).expect("config");
    Case {
        _dir: dir,
        _tpm: tpm,
        device,
        config,
    }
}

fn refuses(case: &Case, expected: &str) {
    let before = file_blake3(&case.device);
    for stage in ["all", "initramfs"] {
        let out = cryptfs_with(&["run", "--stage", stage], &case.config, &[]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "must fail: {err}");
        assert!(
            err.contains(expected),
            "error should say {expected:?}: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
        assert_eq!(
            file_blake3(&case.device),
            before,
            "the device must not change"
        );
    }
}

fn hostile_luks_image(path: &Path, edit: impl FnOnce(&mut Value)) {
    luks_image(path, 100, &[]);
    rewrite_head(path, |head| {
        let mut json = json_of(head);
        edit(&mut json);
        with_json(head, &json);
    });
}

#[test]
fn e2e_luks2_segment_offset_past_the_device() {
    let c = case(|dev| {
        hostile_luks_image(dev, |json| {
            json["segments"]["0"]["offset"] = json!("1099511627776");
        })
    });
    refuses(&c, "extends past the end of the device");
}

#[test]
fn e2e_luks2_keyslot_area_outside_the_keyslots_area() {
    let c = case(|dev| {
        hostile_luks_image(dev, |json| {
            json["keyslots"]["0"]["area"]["offset"] = json!("4096");
        })
    });
    refuses(&c, "lies outside the keyslots area");
}

/// A case on a real 100 MiB ext4 image that `edit` then damages through `file`.
fn ext4_case(edit: impl FnOnce(&Path, &mut std::fs::File)) -> Case {
    case(|dev| {
        let src = dev.with_extension("src");
        std::fs::create_dir_all(&src).expect("src");
        common::make_ext4(dev, 100, &src);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .open(dev)
            .expect("open");
        edit(dev, &mut file);
    })
}

#[test]
fn e2e_ext4_absurd_block_count() {
    let c = ext4_case(|dev, file| {
        use std::io::{Seek, Write};
        // 64bit feature on, high block count word all ones.
        let mut sb = [0u8; 1024];
        sb.copy_from_slice(&head_of(dev, 2048)[1024..]);
        let incompat = u32::from_le_bytes(sb[0x60..0x64].try_into().expect("4")) | 0x80;
        sb[0x60..0x64].copy_from_slice(&incompat.to_le_bytes());
        sb[0x150..0x154].copy_from_slice(&u32::MAX.to_le_bytes());
        sb[0x18..0x1c].copy_from_slice(&6u32.to_le_bytes());
        file.seek(std::io::SeekFrom::Start(1024)).expect("seek");
        file.write_all(&sb).expect("write");
    });
    refuses(&c, "impossible block count");
}

#[test]
fn e2e_ext4_block_count_larger_than_the_device() {
    let c = ext4_case(|_, file| {
        use std::io::{Seek, Write};
        file.seek(std::io::SeekFrom::Start(1024 + 4)).expect("seek");
        file.write_all(&u32::MAX.to_le_bytes()).expect("write");
    });
    refuses(&c, "larger than the device");
}

#[test]
fn e2e_token_with_pcr_40() {
    let c = case(|dev| {
        hostile_luks_image(dev, |json| {
            json["tokens"]["0"] = json!({"type":"systemd-tpm2","keyslots":["0"],
                "tpm2-blob":"AAIAAAACAAA=","tpm2-pcrs":[40],"tpm2-pcr-bank":"sha256",
                "tpm2-primary-alg":"ecc","tpm2-policy-hash":"00","tpm2-pin":false});
        })
    });
    refuses(&c, "PCR 40 does not exist");
}

#[test]
fn e2e_hostile_configuration() {
    let c = case(|dev| luks_image(dev, 100, &[]));
    let text = std::fs::read_to_string(&c.config).expect("config");
    std::fs::write(&c.config, text.replace("pcrs = [7]", "pcrs = [255]")).expect("write");
    refuses(&c, "PCR 255 does not exist");
    std::fs::write(&c.config, "x".repeat(200_000)).expect("write");
    refuses(&c, "larger than 64 KiB");
}

// ---------------------------------------------------------------------------------------------
// The fuzz corpus: the same real artefacts, written where `cargo xtask fuzz` asks.

#[test]
#[ignore = "writes the cargo-fuzz seed corpus; run by `cargo xtask fuzz`"]
fn write_fuzz_corpus() {
    let Some(root) = std::env::var_os("CRYPTFS_FUZZ_CORPUS").map(PathBuf::from) else {
        panic!("set CRYPTFS_FUZZ_CORPUS to the corpus directory");
    };
    let a = artefacts();
    let put = |target: &str, name: &str, bytes: &[u8]| {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir).expect("corpus dir");
        std::fs::write(dir.join(name), bytes).expect("corpus file");
    };
    for (name, bytes) in &a.headers {
        put("luks2_header", name, bytes);
    }
    for (name, sb) in &a.superblocks {
        put("ext4_superblock", name, sb);
    }
    for (i, r) in a.records.iter().enumerate() {
        put("journal_record", &format!("record-{i}"), r);
    }
    let mut chain = Vec::new();
    for r in &a.records {
        chain.extend_from_slice(&(r.len() as u32).to_le_bytes());
        chain.extend_from_slice(r);
    }
    put("journal_record", "chain", &chain);
    put("journal_file", "journal.redb", &a.journal_file);
    put("config", "cryptfs.toml", a.config.as_bytes());
    // Tokens: the real one sealed by swtpm, and the one cryptsetup stored.
    let dir = tempfile::tempdir().expect("tempdir");
    let tpm = Swtpm::start(dir.path());
    let mut protector = Tpm2Protector::new(&cryptfs::config::Tpm2Config {
        tcti: tpm.tcti(),
        pcrs: vec![7],
        pcr_bank: "sha256".into(),
        ..Default::default()
    })
    .expect("protector");
    let (_, sealed) = protector.seal().expect("seal");
    put(
        "tpm2_token",
        "sealed-by-swtpm.json",
        sealed.token("systemd-tpm2", 1).to_string().as_bytes(),
    );
    for (name, bytes) in &a.headers {
        if let Ok(HeaderKind::Luks2(meta)) = metadata::parse(bytes) {
            for (id, t) in &meta.tokens {
                put(
                    "tpm2_token",
                    &format!("{name}-token-{id}.json"),
                    t.json.to_string().as_bytes(),
                );
            }
        }
    }
}
