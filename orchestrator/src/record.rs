//! The orchestrator's side of the journal: who writes (boot id, stage), and the facts read back.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use cryptfs_journal::{Journal, Phase, Record, RecordBody, Recovery};
use cryptfs_states::{
    DeviceIdentity, JournalBinding, JournalFacts, ProvisioningState, Step, VolumeKeyOrigin,
};
use serde_json::Value;

use crate::kek::SealedKek;
use crate::probe::{Content, Probe};

/// How long a run waits for a journal another `cryptfs run` holds before it gives up.
pub const JOURNAL_WAIT: Duration = Duration::from_secs(10);

/// Detail keys used in records.
pub mod keys {
    /// Where the volume key came from.
    pub const VOLUME_KEY_ORIGIN: &str = "volume_key_origin";
    /// The public sealed form of a KEK secret.
    pub const SEALED_KEK: &str = "sealed_kek";
    /// A keyslot number.
    pub const KEYSLOT: &str = "keyslot";
    /// The header backup's blake3.
    pub const BACKUP_BLAKE3: &str = "backup_blake3";
    /// The header backup's path.
    pub const BACKUP_PATH: &str = "backup_path";
    /// A sub-step of a long step.
    pub const SUBSTEP: &str = "substep";
    /// How long a crash recovery of a hotzone took, milliseconds.
    pub const RECOVERY_MS: &str = "recovery_ms";
    /// The hotzone size a recovery budget chose, bytes.
    pub const HOTZONE_BYTES: &str = "hotzone_bytes";
    /// Bytes done.
    pub const DONE_BYTES: &str = "done_bytes";
    /// Bytes in total.
    pub const TOTAL_BYTES: &str = "total_bytes";
    /// On a reconciled `done`: the boot in which the step's effect happened.
    pub const EFFECT_BOOT_ID: &str = "effect_boot_id";
    /// The identity of the device a record was made for ([`cryptfs_states::DeviceIdentity`]).
    pub const DEVICE: &str = "device";
    /// In the `encrypt-in-place` intent: the UUID the LUKS2 header being made will carry.
    pub const LUKS_UUID: &str = "luks_uuid";
}

/// The identity of the device as `probe` saw it, when its content carries one.
pub fn identity_of(probe: &Probe) -> Option<DeviceIdentity> {
    let (kind, uuid) = match &probe.content {
        Content::PlainExt4(fs) => ("ext4", fs.uuid.clone()),
        Content::Luks2(meta) => ("luks2", meta.uuid.clone()),
        Content::Luks1 | Content::Luks2Damaged | Content::Unrecognised => return None,
    };
    Some(DeviceIdentity {
        kind: kind.into(),
        uuid,
        size_bytes: probe.size_bytes,
    })
}

fn record_identity(record: &Record) -> Option<DeviceIdentity> {
    serde_json::from_value(record.body.details.get(keys::DEVICE)?.clone()).ok()
}

/// The device the journal's records were made for (see [`cryptfs_states::check_binding`]).
pub fn journal_binding(records: &[Record]) -> JournalBinding {
    let bound = records.iter().rev().find_map(record_identity);
    let in_place_luks_uuid = bound.as_ref().and_then(|bound| {
        records.iter().rev().find_map(|r| {
            let made_for_bound = record_identity(r).as_ref() == Some(bound);
            (r.body.step == Step::EncryptInPlace.name()
                && r.body.phase == Phase::Intent
                && made_for_bound)
                .then(|| r.body.detail_str(keys::LUKS_UUID).map(String::from))
                .flatten()
        })
    });
    JournalBinding {
        bound,
        in_place_luks_uuid,
    }
}

/// The current boot's id: the kernel's, or — only in builds with the `test-hooks` feature —
/// `CRYPTFS_BOOT_ID` (VM rigs and tests that simulate a reboot without one). A shipped build
/// ignores the variable: the journal's boot ids are the kernel's.
pub fn boot_id() -> String {
    let overridden = if cfg!(feature = "test-hooks") {
        std::env::var("CRYPTFS_BOOT_ID").ok()
    } else {
        None
    };
    overridden
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "unknown".to_string())
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Writes journal records for one run of one stage.
pub struct Recorder {
    journal: Journal,
    boot_id: String,
    stage: String,
    /// The device the records being written are about; stamped on every intent.
    device: Option<DeviceIdentity>,
}

impl Recorder {
    /// Opens (or creates, or recovers) the journal at `path`, waiting up to `wait` for another
    /// run that holds it.
    pub fn open(
        path: &Path,
        stage: &str,
        wait: Duration,
    ) -> crate::Result<(Recorder, Option<Recovery>)> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create journal directory {}", dir.display()))?;
        }
        let (journal, recovery) = Journal::open_or_recover(path, now_ms(), wait)?;
        let mut recorder = Recorder {
            journal,
            boot_id: boot_id(),
            stage: stage.to_string(),
            device: None,
        };
        if let Some(rec) = &recovery {
            recorder.note(
                "journal",
                None,
                Journal::details([
                    (
                        "kept_aside",
                        Value::from(rec.kept_aside.display().to_string()),
                    ),
                    ("reason", Value::from(rec.reason.clone())),
                ]),
            )?;
        }
        Ok((recorder, recovery))
    }

    /// The journal.
    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    /// Says which device the following records are about. The first time a journal sees a
    /// device, and whenever our own steps changed its identity, a `device` note binds the
    /// journal to it.
    pub fn set_device(&mut self, device: Option<DeviceIdentity>) -> crate::Result<()> {
        self.device = device;
        let Some(current) = self.device.clone() else {
            return Ok(());
        };
        if journal_binding(self.journal.records()).bound.as_ref() != Some(&current) {
            self.note(
                keys::DEVICE,
                None,
                Journal::details([(keys::DEVICE, serde_json::to_value(&current)?)]),
            )?;
        }
        Ok(())
    }

    /// Keeps the whole journal aside as `<journal>.<why>-<unix ms>` and continues on a fresh
    /// one; returns where the old one went.
    pub fn start_over(&mut self, why: &str) -> crate::Result<PathBuf> {
        let path = self.journal.path().to_path_buf();
        let (fresh, kept_aside) = Journal::set_aside_and_create(&path, now_ms(), why)?;
        self.journal = fresh;
        Ok(kept_aside)
    }

    /// The boot id records are written with.
    pub fn boot_id(&self) -> &str {
        &self.boot_id
    }

    fn append(
        &mut self,
        step: &str,
        phase: Phase,
        before: Option<ProvisioningState>,
        after: Option<ProvisioningState>,
        details: std::collections::BTreeMap<String, Value>,
    ) -> crate::Result<()> {
        self.journal.append(RecordBody {
            seq: 0,
            time_unix_ms: now_ms(),
            boot_id: self.boot_id.clone(),
            stage: self.stage.clone(),
            step: step.to_string(),
            phase,
            state_before: before,
            state_after: after,
            details,
            prev_hash: String::new(),
        })?;
        Ok(())
    }

    /// Records, durably, that `step` is about to start.
    pub fn intent(
        &mut self,
        step: Step,
        state: ProvisioningState,
        mut details: std::collections::BTreeMap<String, Value>,
    ) -> crate::Result<()> {
        if let Some(device) = &self.device {
            details.insert(keys::DEVICE.into(), serde_json::to_value(device)?);
        }
        self.append(step.name(), Phase::Intent, Some(state), None, details)
    }

    /// Records, durably, that `step` finished.
    pub fn done(
        &mut self,
        step: Step,
        state: ProvisioningState,
        details: std::collections::BTreeMap<String, Value>,
    ) -> crate::Result<()> {
        self.append(step.name(), Phase::Done, Some(state), None, details)
    }

    /// Records that `step` failed with `error`.
    pub fn failed(
        &mut self,
        step: Step,
        state: ProvisioningState,
        error: &str,
    ) -> crate::Result<()> {
        self.append(
            step.name(),
            Phase::Failed,
            Some(state),
            None,
            Journal::details([("error", Value::from(error))]),
        )
    }

    /// Records committed progress of `step`.
    pub fn progress(&mut self, step: Step, done: u64, total: u64) -> crate::Result<()> {
        self.append(
            step.name(),
            Phase::Progress,
            None,
            None,
            Journal::details([
                (keys::DONE_BYTES, Value::from(done)),
                (keys::TOTAL_BYTES, Value::from(total)),
            ]),
        )
    }

    /// Records a sub-step of `step` reached durably.
    pub fn substep(&mut self, step: Step, name: &str) -> crate::Result<()> {
        self.append(
            step.name(),
            Phase::Note,
            None,
            None,
            Journal::details([(keys::SUBSTEP, Value::from(name))]),
        )
    }

    /// Records, durably, that an operation that is no provisioning step (`reseal`) is about to
    /// start; like [`Recorder::intent`], stamped with the device.
    pub fn operation_intent(
        &mut self,
        subject: &str,
        state: ProvisioningState,
        mut details: std::collections::BTreeMap<String, Value>,
    ) -> crate::Result<()> {
        if let Some(device) = &self.device {
            details.insert(keys::DEVICE.into(), serde_json::to_value(device)?);
        }
        self.append(subject, Phase::Intent, Some(state), None, details)
    }

    /// Records, durably, that the operation `subject` finished.
    pub fn operation_done(
        &mut self,
        subject: &str,
        state: ProvisioningState,
        details: std::collections::BTreeMap<String, Value>,
    ) -> crate::Result<()> {
        self.append(subject, Phase::Done, Some(state), None, details)
    }

    /// Records a sub-step of the operation `subject` reached durably.
    pub fn substep_named(
        &mut self,
        subject: &str,
        name: &str,
        mut details: std::collections::BTreeMap<String, Value>,
    ) -> crate::Result<()> {
        details.insert(keys::SUBSTEP.into(), Value::from(name));
        self.append(subject, Phase::Note, None, None, details)
    }

    /// Records a fact that is no step.
    pub fn note(
        &mut self,
        subject: &str,
        state: Option<ProvisioningState>,
        details: std::collections::BTreeMap<String, Value>,
    ) -> crate::Result<()> {
        self.append(subject, Phase::Note, state, None, details)
    }

    /// Records a state transition.
    pub fn transition(
        &mut self,
        step: Step,
        from: ProvisioningState,
        to: ProvisioningState,
    ) -> crate::Result<()> {
        self.append(
            "transition",
            Phase::Note,
            Some(from),
            Some(to),
            Journal::details([("step", Value::from(step.name()))]),
        )
    }
}

/// Closes the journal's open intents whose effect the device already shows (the process died
/// between the effect and its `done` record). Returns the steps reconciled.
pub fn reconcile(rec: &mut Recorder, state: ProvisioningState) -> crate::Result<Vec<Step>> {
    let mut closed = Vec::new();
    for step in Step::ALL {
        let Some(intent) = pending(rec.journal(), step)
            .and_then(|r| r.first())
            .cloned()
        else {
            continue;
        };
        let Some(from) = intent.body.state_before else {
            continue;
        };
        if from != state && cryptfs_states::allowed(from, step).contains(&state) {
            rec.done(
                step,
                state,
                Journal::details([
                    ("reconciled", Value::from("effect found on the device")),
                    (
                        keys::EFFECT_BOOT_ID,
                        Value::from(intent.body.boot_id.clone()),
                    ),
                ]),
            )?;
            closed.push(step);
        }
    }
    Ok(closed)
}

/// The records of `step` since its last intent, if that intent has no `done` after it.
pub fn pending<J: AsRef<[Record]> + ?Sized>(journal: &J, step: Step) -> Option<&[Record]> {
    pending_in(journal.as_ref(), step)
}

/// [`pending`] over a slice of records (a read-only snapshot).
pub fn pending_in(records: &[Record], step: Step) -> Option<&[Record]> {
    pending_named(records, step.name())
}

/// [`pending_in`] for any journal subject (a step's name or an operation such as `reseal`).
pub fn pending_named<'r>(records: &'r [Record], name: &str) -> Option<&'r [Record]> {
    let start = records
        .iter()
        .rposition(|r| r.body.step == name && r.body.phase == Phase::Intent)?;
    let tail = &records[start..];
    if tail
        .iter()
        .any(|r| r.body.step == name && r.body.phase == Phase::Done)
    {
        None
    } else {
        Some(tail)
    }
}

/// A keyslot number in the intent of the unfinished `name` (a step or an operation), if any.
pub fn pending_keyslot(records: &[Record], name: &str) -> Option<u32> {
    pending_named(records, name)?
        .first()?
        .body
        .details
        .get(keys::KEYSLOT)?
        .as_u64()
        .and_then(|s| u32::try_from(s).ok())
}

/// The sealed KEK journaled by an unfinished `step`, if any.
pub fn pending_sealed_kek<J: AsRef<[Record]> + ?Sized>(
    journal: &J,
    step: Step,
) -> Option<SealedKek> {
    pending(journal, step)?
        .first()
        .and_then(|r| r.body.details.get(keys::SEALED_KEK))
        .and_then(|v| serde_json::from_value(v.clone()).ok())
}

/// Whether an unfinished `step` reached sub-step `name`.
pub fn reached<J: AsRef<[Record]> + ?Sized>(journal: &J, step: Step, name: &str) -> bool {
    pending(journal, step).is_some_and(|recs| {
        recs.iter()
            .any(|r| r.body.detail_str(keys::SUBSTEP) == Some(name))
    })
}

/// The latest `done` record of `step`.
pub fn last_done<J: AsRef<[Record]> + ?Sized>(journal: &J, step: Step) -> Option<&Record> {
    journal
        .as_ref()
        .iter()
        .rev()
        .find(|r| r.body.step == step.name() && r.body.phase == Phase::Done)
}

/// The latest committed progress of `step`: (done, total).
pub fn last_progress<J: AsRef<[Record]> + ?Sized>(journal: &J, step: Step) -> Option<(u64, u64)> {
    let r = journal
        .as_ref()
        .iter()
        .rev()
        .find(|r| r.body.step == step.name() && r.body.phase == Phase::Progress)?;
    Some((
        r.body.details.get(keys::DONE_BYTES)?.as_u64()?,
        r.body.details.get(keys::TOTAL_BYTES)?.as_u64()?,
    ))
}

/// What the journal says, as facts for the core.
pub fn journal_facts<J: AsRef<[Record]> + ?Sized>(journal: &J, boot_id: &str) -> JournalFacts {
    let volume_key_origin = journal
        .as_ref()
        .iter()
        .rev()
        .find_map(|r| r.body.details.get(keys::VOLUME_KEY_ORIGIN))
        .and_then(|v| serde_json::from_value::<VolumeKeyOrigin>(v.clone()).ok());
    let reencrypt_initialised_this_boot =
        last_done(journal, Step::InitReencrypt).is_some_and(|r| r.body.boot_id == boot_id);
    let filesystem_grown = last_done(journal, Step::GrowFilesystem).is_some();
    JournalFacts {
        volume_key_origin,
        reencrypt_initialised_this_boot,
        filesystem_grown,
    }
}

/// The blake3 digest the journal holds for the header backup.
pub fn backup_digest<J: AsRef<[Record]> + ?Sized>(journal: &J) -> Option<String> {
    last_done(journal, Step::BackupHeader)
        .and_then(|r| r.body.detail_str(keys::BACKUP_BLAKE3))
        .map(String::from)
}
