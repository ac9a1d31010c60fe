//! `cryptfs status`: state, next action, device facts, progress, journal and header backup.
//! Read-only: it opens nothing for writing and never needs the TPM.

use std::fmt::Write as _;

use cryptfs_journal::{Journal, Record};
use cryptfs_states::{derive_state, plan, Action, ProvisioningState, Stage, Step};
use serde::Serialize;

use crate::config::Config;
use crate::kek;
use crate::probe::{self, Content};
use crate::record;
use crate::runner;
use crate::steps::backup::file_blake3;

/// The whole report (the `--json` schema).
#[derive(Debug, Serialize)]
pub struct Status {
    /// One of the six state names, or `null` when the device cannot be classified.
    pub state: Option<ProvisioningState>,
    /// Why there is no state, when there is none.
    pub error: Option<String>,
    /// The next action of the full path (`stage all`), and per boot stage.
    pub next: Option<Action>,
    /// Next action per stage.
    pub next_by_stage: Option<NextByStage>,
    /// Device facts.
    pub device: DeviceStatus,
    /// Journal.
    pub journal: JournalStatus,
    /// `luks.bin`.
    pub header_backup: BackupStatus,
}

/// Next action per stage.
#[derive(Debug, Serialize)]
pub struct NextByStage {
    /// In the initramfs.
    pub initramfs: Action,
    /// In the running system.
    pub userspace: Action,
}

/// Device facts.
#[derive(Debug, Default, Serialize)]
pub struct DeviceStatus {
    /// Path.
    pub path: String,
    /// Size in bytes.
    pub size_bytes: Option<u64>,
    /// `luks2`, `ext4`, `luks1`, `luks2-damaged`, `unrecognised`, `missing`.
    #[serde(rename = "type")]
    pub kind: String,
    /// LUKS2 or filesystem UUID.
    pub uuid: Option<String>,
    /// LUKS2 or filesystem label.
    pub label: Option<String>,
    /// Keyslots.
    pub keyslots: Vec<KeyslotStatus>,
    /// Tokens.
    pub tokens: Vec<TokenStatus>,
    /// Re-encryption.
    pub reencrypt: ReencryptStatus,
    /// Which header copies pass their checksum.
    pub header_copies_ok: Option<[bool; 2]>,
}

/// One keyslot.
#[derive(Debug, Serialize)]
pub struct KeyslotStatus {
    /// Number.
    pub id: u32,
    /// `token` (opened by a token), `passphrase` (no token), `reencrypt` (internal).
    pub kind: String,
    /// Token types that open it.
    pub token_types: Vec<String>,
    /// KDF.
    pub kdf: Option<String>,
}

/// One token.
#[derive(Debug, Serialize)]
pub struct TokenStatus {
    /// Number.
    pub id: u32,
    /// Type.
    #[serde(rename = "type")]
    pub kind: String,
    /// Keyslots.
    pub keyslots: Vec<u32>,
    /// Whether this device's configured protector can use it.
    pub usable: bool,
    /// `kek` (this device's KEK), `marker` (cryptfs's key-origin record, opens nothing) or
    /// `other` (a token cryptfs does not use; never deleted).
    pub role: String,
    /// PCRs (TPM tokens).
    pub pcrs: Option<serde_json::Value>,
}

/// Re-encryption.
#[derive(Debug, Default, Serialize)]
pub struct ReencryptStatus {
    /// `none` or `in-progress`.
    pub status: String,
    /// `encrypt` or `reencrypt`.
    pub mode: Option<String>,
    /// Last committed progress.
    pub progress: Option<Progress>,
}

/// Progress.
#[derive(Debug, Serialize)]
pub struct Progress {
    /// Bytes done.
    pub done_bytes: u64,
    /// Bytes in total.
    pub total_bytes: u64,
    /// Percent done.
    pub percent: u64,
}

/// Journal.
#[derive(Debug, Default, Serialize)]
pub struct JournalStatus {
    /// File.
    pub path: String,
    /// Whether the hash chain verifies.
    pub chain_ok: bool,
    /// Why not.
    pub error: Option<String>,
    /// All records, oldest first.
    pub records: Vec<Record>,
}

/// `luks.bin`.
#[derive(Debug, Default, Serialize)]
pub struct BackupStatus {
    /// Path.
    pub path: String,
    /// Whether the file exists.
    pub present: bool,
    /// Its blake3.
    pub digest: Option<String>,
    /// The digest recorded in the journal.
    pub journal_digest: Option<String>,
    /// Whether they match.
    pub digest_ok: bool,
}

/// Collects the report.
pub fn collect(config: &Config) -> crate::Result<Status> {
    let kek = kek::from_config(config)?;
    let journal_path = config.journal_path();
    let (journal, journal_status) = if journal_path.exists() {
        match Journal::open_verified(&journal_path) {
            Ok(j) => {
                let status = JournalStatus {
                    path: journal_path.display().to_string(),
                    chain_ok: true,
                    error: None,
                    records: j.records().to_vec(),
                };
                (Some(j), status)
            }
            Err(e) => (
                None,
                JournalStatus {
                    path: journal_path.display().to_string(),
                    chain_ok: false,
                    error: Some(format!("{e:#}")),
                    records: Vec::new(),
                },
            ),
        }
    } else {
        (
            None,
            JournalStatus {
                path: journal_path.display().to_string(),
                chain_ok: true,
                error: None,
                records: Vec::new(),
            },
        )
    };

    let backup_path = config.backup_path();
    let present = backup_path.exists();
    let digest = if present {
        file_blake3(&backup_path).ok()
    } else {
        None
    };
    let journal_digest = journal.as_ref().and_then(record::backup_digest);
    let header_backup = BackupStatus {
        path: backup_path.display().to_string(),
        present,
        digest_ok: digest.is_some() && digest == journal_digest,
        digest,
        journal_digest,
    };

    let mut device = DeviceStatus {
        path: config.device.display().to_string(),
        ..DeviceStatus::default()
    };
    device.reencrypt.status = "none".into();
    let probed = probe::probe(&config.device);
    let (state, error, next, next_by_stage) = match &probed {
        Err(e) => {
            device.kind = "missing".into();
            (None, Some(format!("{e:#}")), None, None)
        }
        Ok(p) => {
            device.size_bytes = Some(p.size_bytes);
            describe(&mut device, &p.content, kek.as_ref());
            if device.reencrypt.status == "in-progress" {
                let step = if device.reencrypt.mode.as_deref() == Some("encrypt") {
                    Step::EncryptInPlace
                } else {
                    Step::Reencrypt
                };
                device.reencrypt.progress = journal
                    .as_ref()
                    .and_then(|j| record::last_progress(j, step))
                    .map(|(done, total)| Progress {
                        done_bytes: done,
                        total_bytes: total,
                        percent: (done * 100).checked_div(total).unwrap_or(0),
                    });
            }
            let result = runner::facts(
                config,
                kek.as_ref(),
                p,
                journal.as_ref(),
                &record::boot_id(),
            );
            match result {
                Ok(facts) => (
                    Some(derive_state(&facts)),
                    None,
                    Some(plan(&facts, Stage::All)),
                    Some(NextByStage {
                        initramfs: plan(&facts, Stage::Initramfs),
                        userspace: plan(&facts, Stage::Userspace),
                    }),
                ),
                Err(e) => (None, Some(format!("{e:#}")), None, None),
            }
        }
    };
    Ok(Status {
        state,
        error,
        next,
        next_by_stage,
        device,
        journal: journal_status,
        header_backup,
    })
}

fn describe(device: &mut DeviceStatus, content: &Content, kek: &dyn kek::KekProtector) {
    match content {
        Content::PlainExt4(fs) => {
            device.kind = "ext4".into();
            device.uuid = Some(fs.uuid.clone());
            device.label = Some(fs.label.clone());
        }
        Content::Luks1 => device.kind = "luks1".into(),
        Content::Luks2Damaged => device.kind = "luks2-damaged".into(),
        Content::Unrecognised => device.kind = "unrecognised".into(),
        Content::Luks2(meta) => {
            device.kind = "luks2".into();
            device.uuid = Some(meta.uuid.clone());
            device.label = Some(meta.label.clone());
            device.header_copies_ok = Some([meta.primary_ok, meta.secondary_ok]);
            for (id, slot) in &meta.keyslots {
                let token_types: Vec<String> =
                    meta.tokens_of(*id).map(|(_, t)| t.kind.clone()).collect();
                let kind = if slot.kind == "reencrypt" {
                    "reencrypt"
                } else if token_types.is_empty() {
                    "passphrase"
                } else {
                    "token"
                };
                device.keyslots.push(KeyslotStatus {
                    id: *id,
                    kind: kind.into(),
                    token_types,
                    kdf: slot.kdf.clone(),
                });
            }
            for (id, token) in &meta.tokens {
                device.tokens.push(TokenStatus {
                    id: *id,
                    kind: token.kind.clone(),
                    keyslots: token.keyslots.clone(),
                    usable: kek.can_use(&token.json),
                    role: if token.kind == crate::luks::marker::TOKEN_TYPE {
                        "marker"
                    } else if kek.can_use(&token.json) {
                        "kek"
                    } else {
                        "other"
                    }
                    .into(),
                    pcrs: token.json.get("tpm2-pcrs").cloned(),
                });
            }
            if let Some(mode) = meta.reencrypt_mode() {
                device.reencrypt.status = "in-progress".into();
                device.reencrypt.mode = Some(mode.into());
            }
        }
    }
}

/// Human-readable rendering.
pub fn render(s: &Status) -> String {
    let mut out = String::new();
    let state = s.state.map_or("unknown", |st| st.name());
    let _ = writeln!(out, "state:      {state}");
    if let Some(e) = &s.error {
        let _ = writeln!(out, "error:      {e}");
    }
    if let Some(next) = &s.next {
        let _ = writeln!(out, "next:       {}", action_text(next));
    }
    let d = &s.device;
    let _ = writeln!(
        out,
        "device:     {} ({}, {} MiB)",
        d.path,
        d.kind,
        d.size_bytes.unwrap_or(0) / (1024 * 1024)
    );
    if let Some(uuid) = &d.uuid {
        let _ = writeln!(
            out,
            "uuid:       {uuid}  label: {}",
            d.label.as_deref().unwrap_or("")
        );
    }
    for k in &d.keyslots {
        let _ = writeln!(
            out,
            "keyslot {:>2}: {}{} ({})",
            k.id,
            k.kind,
            if k.token_types.is_empty() {
                String::new()
            } else {
                format!(" [{}]", k.token_types.join(", "))
            },
            k.kdf.as_deref().unwrap_or("-")
        );
    }
    for t in &d.tokens {
        let _ = writeln!(
            out,
            "token {:>4}: {} -> keyslots {:?}{}",
            t.id,
            t.kind,
            t.keyslots,
            match t.role.as_str() {
                "kek" => "",
                "marker" => " (cryptfs key-origin record)",
                _ => " (not usable by this device's protector; kept)",
            }
        );
    }
    let _ = write!(out, "reencrypt:  {}", d.reencrypt.status);
    if let Some(mode) = &d.reencrypt.mode {
        let _ = write!(out, " ({mode})");
    }
    if let Some(p) = &d.reencrypt.progress {
        let _ = write!(
            out,
            " {}% ({} of {} MiB)",
            p.percent,
            p.done_bytes >> 20,
            p.total_bytes >> 20
        );
    }
    let _ = writeln!(out);
    let b = &s.header_backup;
    let _ = writeln!(
        out,
        "backup:     {} {}",
        b.path,
        if !b.present {
            "absent"
        } else if b.digest_ok {
            "present, digest ok"
        } else {
            "present, DIGEST MISMATCH"
        }
    );
    let j = &s.journal;
    let _ = writeln!(
        out,
        "journal:    {} ({} records, chain {})",
        j.path,
        j.records.len(),
        if j.chain_ok { "ok" } else { "BROKEN" }
    );
    for (i, r) in j.records.iter().enumerate() {
        let b = &r.body;
        let progress = |r: &Record| r.body.phase == cryptfs_journal::Phase::Progress;
        // A run of progress records shows as its last one.
        if progress(r)
            && j.records
                .get(i + 1)
                .is_some_and(|n| progress(n) && n.body.step == b.step)
        {
            continue;
        }
        let extra = match (b.state_before, b.state_after) {
            (Some(f), Some(t)) => format!(" {f} -> {t}"),
            _ if progress(r) => {
                let done = b
                    .details
                    .get("done_bytes")
                    .and_then(|v| v.as_u64())
                    .unwrap_or(0);
                let total = b
                    .details
                    .get("total_bytes")
                    .and_then(|v| v.as_u64())
                    .unwrap_or(0);
                format!(
                    " {}% of {} MiB",
                    (done * 100).checked_div(total).unwrap_or(0),
                    total >> 20
                )
            }
            _ => b
                .details
                .get("substep")
                .and_then(|v| v.as_str())
                .map(|s| format!(" {s}"))
                .unwrap_or_default(),
        };
        let _ = writeln!(
            out,
            "  #{:<3} {:<10} {:<17} {:<9}{extra}",
            b.seq,
            b.stage,
            b.step,
            format!("{:?}", b.phase).to_lowercase(),
        );
    }
    out
}

fn action_text(a: &Action) -> String {
    match a {
        Action::Run(step) => format!("run {step}"),
        Action::Done => "nothing (provisioning finished)".into(),
        Action::Blocked(b) => format!("blocked: {b:?}"),
    }
}
