//! `cryptfs status`: state, next action, device facts, progress, journal and header backup.
//! Read-only: it opens nothing for writing. With a TPM reachable it reads the PCR values the
//! KEK tokens are sealed to (`PCR_Read` only) and shows, per token, whether they still match.

use std::fmt::Write as _;

use cryptfs_journal::{Journal, Record};
use cryptfs_states::{
    check_binding, derive_state, plan, Action, BindingCheck, DeviceIdentity, ProvisioningState,
    Stage, Step,
};
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
    /// The active mapping (`mapping_name`) when it exists: its dm-crypt options as the kernel
    /// runs them (`no_read_workqueue`, `sector_size:4096`, ...; never the key).
    pub mapping: Option<MappingStatus>,
    /// The data's encryption sector size (512 or 4096).
    pub sector_size: Option<u32>,
    /// The header's persistent activation flags (`[activation]` stores its workqueue flags
    /// there): every activation of the volume uses them.
    pub persistent_flags: Vec<String>,
    /// Why the TPM tokens' policies could not be checked (no TPM reachable, say).
    pub pcr_error: Option<String>,
    /// The mode of a `reseal` the journal shows interrupted (the next `cryptfs reseal`
    /// resolves it).
    pub reseal_interrupted: Option<String>,
}

/// The active dm-crypt mapping.
#[derive(Debug, Serialize)]
pub struct MappingStatus {
    /// `/dev/mapper/<name>`.
    pub name: String,
    /// Optional parameters of its crypt targets.
    pub crypt_options: Vec<String>,
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
    /// What it is for: `kek` (a systemd-tpm2/-pkcs11 token), `recovery` (a systemd-recovery
    /// token), `passphrase`, `reencrypt`, or `other` (another tool's token).
    pub role: String,
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
    /// `systemd-tpm2` tokens: the policy against this boot's PCR values (the lock PCR at its
    /// pre-lock value), per PCR what it was sealed to and what it is now.
    pub policy: Option<crate::token_policy::TokenPolicy>,
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
    /// `header` (live: the LUKS2 segments as they are now) or `journal` (the last committed
    /// progress record, when the header does not add up).
    pub source: &'static str,
    /// Rate of the run in progress since its first progress record, MiB/s.
    pub mib_per_s: Option<f64>,
    /// Estimated seconds left at that rate.
    pub eta_seconds: Option<u64>,
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
    /// `matches` (written for this device), `unbound` (nothing says which device) or
    /// `other-device` (written for another device: the next run keeps it aside and handles this
    /// device from scratch; its records are not applied here).
    pub binding: String,
    /// The device the journal was written for.
    pub bound_device: Option<DeviceIdentity>,
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

/// Reads the journal without writing and without locking a runner out.
fn read_journal(config: &Config) -> JournalStatus {
    let path = config.journal_path();
    let mut status = JournalStatus {
        path: path.display().to_string(),
        chain_ok: true,
        binding: "unbound".into(),
        ..JournalStatus::default()
    };
    if !path.exists() {
        return status;
    }
    match Journal::read_only(&path) {
        Ok(snapshot) => status.records = snapshot.records,
        Err(e) => {
            status.chain_ok = false;
            status.error = Some(format!("{e:#}"));
        }
    }
    status
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Live progress of the re-encryption in flight: bytes from the header, rate from the journal.
fn live_progress(
    meta: &crate::luks::metadata::Luks2Metadata,
    device_bytes: u64,
    records: &[Record],
    step: Step,
) -> Option<Progress> {
    let (done_bytes, total_bytes, source) =
        match crate::reencrypt_progress::from_segments(&meta.json, device_bytes) {
            Some(p) => (p.done_bytes, p.total_bytes, "header"),
            None => {
                let (done, total) = record::last_progress(records, step)?;
                (done, total, "journal")
            }
        };
    let rate = crate::reencrypt_progress::rate(records, step.name(), done_bytes, now_ms());
    Some(Progress {
        done_bytes,
        total_bytes,
        percent: done_bytes
            .saturating_mul(100)
            .checked_div(total_bytes)
            .unwrap_or(0),
        source,
        mib_per_s: rate.map(|bytes_per_s| bytes_per_s / f64::from(1u32 << 20)),
        eta_seconds: rate
            .filter(|r| *r > 0.0)
            .map(|r| (total_bytes.saturating_sub(done_bytes) as f64 / r).ceil() as u64),
    })
}

/// The configured mapping's dm-crypt options, when it is active and device-mapper answers.
fn mapping(config: &Config) -> Option<MappingStatus> {
    let name = config.mapping_name.as_deref()?;
    if !probe::mapping_active(Some(name)) {
        return None;
    }
    Some(MappingStatus {
        name: name.to_string(),
        crypt_options: crate::dm::crypt_options(name).ok()?,
    })
}

/// Collects the report. Writes nothing anywhere and takes no lock a runner could trip over.
pub fn collect(config: &Config) -> crate::Result<Status> {
    let kek = kek::from_config(config)?;
    let mut journal_status = read_journal(config);

    let mut device = DeviceStatus {
        path: config.device.display().to_string(),
        ..DeviceStatus::default()
    };
    device.reencrypt.status = "none".into();
    device.mapping = mapping(config);
    let probed = probe::probe(&config.device);

    // A journal written for another device is not applied to this one (the next run keeps it
    // aside); the report still lists its records.
    let binding = record::journal_binding(&journal_status.records);
    journal_status.bound_device = binding.bound.clone();
    let current = probed.as_ref().ok().and_then(record::identity_of);
    let applies = match check_binding(&binding, current.as_ref()) {
        BindingCheck::Unbound => {
            journal_status.binding = "unbound".into();
            true
        }
        BindingCheck::Matches => {
            journal_status.binding = "matches".into();
            true
        }
        BindingCheck::Mismatch { .. } => {
            journal_status.binding = "other-device".into();
            false
        }
    };
    let journal: Option<&[Record]> =
        (journal_status.chain_ok && applies).then_some(journal_status.records.as_slice());

    let backup_path = config.backup_path();
    let present = backup_path.exists();
    let digest = if present {
        file_blake3(&backup_path).ok()
    } else {
        None
    };
    let journal_digest = journal.and_then(record::backup_digest);
    let header_backup = BackupStatus {
        path: backup_path.display().to_string(),
        present,
        digest_ok: digest.is_some() && digest == journal_digest,
        digest,
        journal_digest,
    };

    let (state, error, next, next_by_stage) = match &probed {
        Err(e) => {
            device.kind = "missing".into();
            (None, Some(format!("{e:#}")), None, None)
        }
        Ok(p) => {
            device.size_bytes = Some(p.size_bytes);
            describe(&mut device, &p.content, kek.as_ref());
            if let (Content::Luks2(meta), "in-progress") =
                (&p.content, device.reencrypt.status.as_str())
            {
                let step = if device.reencrypt.mode.as_deref() == Some("encrypt") {
                    Step::EncryptInPlace
                } else {
                    Step::Reencrypt
                };
                device.reencrypt.progress =
                    live_progress(meta, p.size_bytes, journal.unwrap_or_default(), step);
            }
            if let Content::Luks2(meta) = &p.content {
                judge_tpm2_tokens(config, meta, journal.unwrap_or_default(), &mut device);
                device.reseal_interrupted = crate::reseal::interrupted(journal.unwrap_or_default());
            }
            let result = runner::facts(config, kek.as_ref(), p, journal, &record::boot_id());
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

/// Fills each `systemd-tpm2` token's policy check: PCR reads only, nothing else of the TPM.
fn judge_tpm2_tokens(
    config: &Config,
    meta: &crate::luks::metadata::Luks2Metadata,
    journal: &[Record],
    device: &mut DeviceStatus,
) {
    let tokens = crate::token_policy::tpm2_tokens(meta);
    if tokens.is_empty() || config.kek.kind != crate::config::KekKind::Tpm2 {
        return;
    }
    let boot = crate::kek::tpm2::Tpm2Protector::new(&config.kek.tpm2)
        .and_then(|tpm| crate::reseal::boot_pcrs(config, &tpm, meta, journal));
    let boot = match boot {
        Ok(boot) => boot,
        Err(e) => {
            device.pcr_error = Some(format!("{e:#}"));
            return;
        }
    };
    for (id, sealed) in tokens {
        let judged = crate::token_policy::judge(id, &sealed, &boot);
        if let Some(status) = device.tokens.iter_mut().find(|t| t.id == id) {
            status.policy = Some(judged);
        }
    }
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
            device.sector_size = meta.segment_sector_size();
            device.persistent_flags = meta.persistent_flags();
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
                let role = if kind != "token" {
                    kind
                } else if token_types.iter().any(|t| t == crate::recovery::TOKEN_TYPE) {
                    "recovery"
                } else if token_types
                    .iter()
                    .any(|t| t == "systemd-tpm2" || t == "systemd-pkcs11")
                {
                    "kek"
                } else {
                    "other"
                };
                device.keyslots.push(KeyslotStatus {
                    id: *id,
                    kind: kind.into(),
                    role: role.into(),
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
                    policy: None,
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
    if let Some(m) = &d.mapping {
        let _ = writeln!(
            out,
            "mapping:    /dev/mapper/{} options: {}",
            m.name,
            if m.crypt_options.is_empty() {
                "none".to_string()
            } else {
                m.crypt_options.join(" ")
            }
        );
    }
    if let Some(sector) = d.sector_size {
        let flags = if d.persistent_flags.is_empty() {
            "none".to_string()
        } else {
            d.persistent_flags.join(" ")
        };
        let _ = writeln!(out, "sectors:    {sector} bytes  persistent flags: {flags}");
    }
    for k in &d.keyslots {
        let _ = writeln!(
            out,
            "keyslot {:>2}: {}{}{} ({})",
            k.id,
            k.kind,
            if k.role == k.kind {
                String::new()
            } else {
                format!(" {}", k.role)
            },
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
        if let Some(p) = &t.policy {
            let _ = writeln!(out, "            {}", policy_text(p));
        }
    }
    if let Some(e) = &d.pcr_error {
        let _ = writeln!(out, "pcrs:       not checked against the TPM: {e}");
    }
    if let Some(mode) = &d.reseal_interrupted {
        let _ = writeln!(
            out,
            "reseal:     an interrupted `reseal` ({mode}) is open in the journal; the next \
             `cryptfs reseal` resolves it (the old unlock path was kept until the new one \
             was proven)"
        );
    }
    let _ = write!(out, "reencrypt:  {}", d.reencrypt.status);
    if let Some(mode) = &d.reencrypt.mode {
        let _ = write!(out, " ({mode})");
    }
    if let Some(p) = &d.reencrypt.progress {
        let _ = write!(
            out,
            " {}% ({} of {} MiB",
            p.percent,
            p.done_bytes >> 20,
            p.total_bytes >> 20
        );
        if let Some(rate) = p.mib_per_s {
            let _ = write!(out, ", {rate:.1} MiB/s");
        }
        if let Some(eta) = p.eta_seconds {
            let _ = write!(out, ", about {eta} s left");
        }
        let _ = write!(out, ")");
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
        if j.chain_ok { "ok" } else { "BROKEN" },
    );
    if j.binding == "other-device" {
        let _ = writeln!(
            out,
            "            written for another device ({}): the next run keeps it aside and \
             handles this device from scratch",
            j.bound_device
                .as_ref()
                .map_or_else(|| "?".to_string(), ToString::to_string)
        );
    }
    if let Some(e) = &j.error {
        let _ = writeln!(out, "            {e}");
    }
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

/// One line on a TPM token's policy: unseals or not, and which PCR changed.
fn policy_text(p: &crate::token_policy::TokenPolicy) -> String {
    if let Some(e) = &p.error {
        return format!("policy: not checked ({e})");
    }
    let pcrs: Vec<String> = p
        .pcrs
        .iter()
        .map(|c| {
            let now = c.boot.as_deref().map_or("?".to_string(), short);
            match (c.changed, c.sealed.as_deref()) {
                (Some(true), Some(sealed)) => {
                    format!(
                        "PCR {} CHANGED (sealed {}, now {now})",
                        c.pcr,
                        short(sealed)
                    )
                }
                (Some(false), _) => format!("PCR {} {now} as sealed", c.pcr),
                _ => format!("PCR {} {now}", c.pcr),
            }
        })
        .collect();
    let verdict = match p.unseals {
        Some(true) => "policy matches this boot's PCR values",
        Some(false) => "policy does NOT match this boot's PCR values (the TPM refuses it)",
        None => "policy unknown",
    };
    format!("{verdict}: {}", pcrs.join(", "))
}

/// The first 16 hex digits of a value: enough to see what changed.
fn short(hex_value: &str) -> String {
    let head: String = hex_value.chars().take(16).collect();
    if head.len() < hex_value.len() {
        format!("{head}…")
    } else {
        head
    }
}

fn action_text(a: &Action) -> String {
    match a {
        Action::Run(step) => format!("run {step}"),
        Action::Done => "nothing (provisioning finished)".into(),
        Action::Blocked(b) => format!("blocked: {b:?}"),
    }
}
