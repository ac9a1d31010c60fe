//! The stage runner: observe → decide (pure core) → act (one step) → observe → check the
//! transition against the model → repeat until the stage has nothing left to do.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context};
use cryptfs_journal::{Journal, Record};
use cryptfs_states::{
    check_binding, derive_state, plan, Action, BindingCheck, DeviceFacts, Facts, Luks2Facts,
    Policy, ProvisioningMachine, ProvisioningState, ReencryptMode, Stage, Step,
};
use serde_json::Value;

use crate::config::Config;
use crate::kek::{self, KekProtector};
use crate::probe::{self, Content, Probe};
use crate::record::{self, Recorder};
use crate::steps::{self, backup, backup::file_blake3, encrypt, StepContext};

/// Name of a stage as in the journal.
pub fn stage_name(stage: Stage) -> &'static str {
    match stage {
        Stage::Initramfs => "initramfs",
        Stage::Userspace => "userspace",
        Stage::All => "all",
    }
}

/// Whether the header backup exists and matches the digest the journal recorded.
pub fn backup_verified(config: &Config, journal: Option<&[Record]>) -> bool {
    let path = config.backup_path();
    match (journal.and_then(record::backup_digest), path.exists()) {
        (Some(expected), true) => file_blake3(&path).is_ok_and(|d| d == expected),
        _ => false,
    }
}

/// Builds the core's facts from a probe and the journal. Unsupported content is an error
/// with the action the user should take.
pub fn facts(
    config: &Config,
    kek: &dyn KekProtector,
    probe: &Probe,
    journal: Option<&[Record]>,
    boot_id: &str,
) -> crate::Result<Facts> {
    let dev = config.device.display();
    let device = match &probe.content {
        Content::PlainExt4(_) => DeviceFacts::PlainExt4,
        Content::Luks2(meta) => DeviceFacts::Luks2(Luks2Facts {
            kek_token: !crate::token_unlock::usable_tokens(kek, meta).is_empty(),
            // A keyslot that an interrupted reseal or recovery enrollment added before its token
            // is not a passphrase to wipe: the next reseal, or the resumed `enroll-recovery`,
            // destroys it and starts over (the journal disambiguates). Found by the fsync-cut
            // harness: counted as a passphrase, it sent the boot path back to `kek-enrolled`.
            passphrase_keyslots: {
                let half_added: Vec<u32> = journal
                    .map(|records| {
                        [
                            crate::reseal::pending_new_keyslot(records),
                            record::pending_keyslot(records, Step::EnrollRecovery.name()),
                        ]
                        .into_iter()
                        .flatten()
                        .collect()
                    })
                    .unwrap_or_default();
                meta.passphrase_keyslots()
                    .into_iter()
                    .filter(|s| !half_added.contains(s))
                    .collect()
            },
            reencrypt: match meta.reencrypt_mode() {
                Some("encrypt") => Some(ReencryptMode::Encrypt),
                Some("reencrypt") => Some(ReencryptMode::Reencrypt),
                Some(other) => bail!(
                    "{dev} is being re-encrypted in mode {other:?}, which cryptfs does not handle"
                ),
                None => None,
            },
            reencrypt_needs_repair: meta.reencrypt_crashed()
                || crate::luks::finalize::all_data_on_final_key(meta),
            recovery_token: !steps::recovery::recovery_keyslots(meta).is_empty(),
        }),
        Content::Luks1 => bail!(
            "{dev} is LUKS1; cryptfs needs LUKS2 (convert it with `cryptsetup convert --type \
             luks2 {dev}`)"
        ),
        Content::Luks2Damaged => bail!(
            "{}",
            backup::RestoreVerdict::of(config, journal)
                .describe(&config.device, &config.backup_path())
        ),
        Content::Unrecognised => bail!(
            "{dev} holds neither an ext4 filesystem nor a LUKS2 volume: nothing cryptfs can \
             encrypt or unlock (wrong `device` in the configuration?)"
        ),
    };
    let mut journal_facts = journal
        .map(|j| record::journal_facts(j, boot_id))
        .unwrap_or_default();
    // The metadata's marker is the ground truth for the key's origin; the journal fills in
    // only where the device has none (a CI image, or a volume made before markers).
    if let Content::Luks2(meta) = &probe.content {
        if let Some(origin) = crate::luks::marker::origin(meta) {
            journal_facts.volume_key_origin = Some(origin);
        }
    }
    Ok(Facts {
        device,
        journal: journal_facts,
        backup_verified: backup_verified(config, journal),
        mapping_active: probe::mapping_active(config.mapping_name.as_deref()),
        policy: Policy {
            reencrypt: config.reencrypt.policy,
            resume: config.reencrypt.resume,
            recovery: config.recovery.enabled,
        },
    })
}

/// Repairs what must be repaired before the state can even be derived: an interrupted
/// placement of the in-place encryption header, a header copy damaged beside a valid one
/// (libcryptsetup's repair), or a header whose copies are both damaged (the verified backup).
fn repair_before_probe(ctx: &mut StepContext<'_>, probe: &Probe) -> crate::Result<bool> {
    // Until `header-placed` is journaled the prepared header is authoritative: no data hotzone
    // has run, and lost writes may have left the head half-written even where it reads as
    // LUKS2 (a keyslot area short of its last writes). Placing it again is idempotent.
    if !record::reached(
        ctx.rec.journal(),
        cryptfs_states::Step::EncryptInPlace,
        "header-placed",
    ) && encrypt::header_placement_interrupted(ctx)
    {
        encrypt::redo_header_placement(ctx)?;
        return Ok(true);
    }
    // One damaged copy: libcryptsetup repairs it from the other, which keeps whatever changed
    // since the backup was taken. `luks.bin` is for when neither copy is usable.
    match &probe.content {
        Content::Luks2(meta) if !(meta.primary_ok && meta.secondary_ok) => {
            backup::repair_header_copy(ctx, meta)?;
            Ok(true)
        }
        Content::Luks2Damaged => {
            backup::restore_header(ctx)?;
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// A journal written for another device (the root partition was re-flashed since) is never
/// applied to this one: the journal, the prepared in-place header and the header backup of the
/// other device are kept aside (renamed, never deleted) and this device is handled from
/// scratch, its metadata being the only truth left.
fn ensure_journal_is_for_this_device(
    config: &Config,
    rec: &mut Recorder,
    probe: &Probe,
) -> crate::Result<()> {
    let current = record::identity_of(probe);
    let binding = record::journal_binding(rec.journal().records());
    let BindingCheck::Mismatch { journal: previous } = check_binding(&binding, current.as_ref())
    else {
        return Ok(());
    };
    let suffix = format!(
        "other-device-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis())
    );
    let mut kept_aside = vec![rec.start_over(&suffix)?.display().to_string()];
    for path in [config.temp_header_path(), config.backup_path()] {
        if path.exists() {
            let mut aside = path.clone().into_os_string();
            aside.push(format!(".{suffix}"));
            std::fs::rename(&path, &aside).with_context(|| {
                format!(
                    "cannot keep {} of the previous device aside",
                    path.display()
                )
            })?;
            kept_aside.push(std::path::PathBuf::from(aside).display().to_string());
        }
    }
    let now = current
        .as_ref()
        .map_or_else(|| "an unidentified device".to_string(), ToString::to_string);
    tracing::warn!(
        previous = %previous,
        device = %now,
        kept_aside = %kept_aside.join(", "),
        "the journal was written for another device (the root partition was replaced): kept \
         aside, this device is handled from scratch"
    );
    rec.note(
        "device-changed",
        None,
        Journal::details([
            ("previous_device", serde_json::to_value(&previous)?),
            ("kept_aside", Value::from(kept_aside)),
        ]),
    )?;
    Ok(())
}

/// Runs `stage` until it has nothing left to do; returns the state reached. The initramfs
/// stage ends, on every exit path, with the boot-phase lock (after handing the passphrase on
/// through the kernel keyring; [`crate::boot_lock`]).
pub fn run(
    config: &Config,
    stage: Stage,
    stop: Arc<AtomicBool>,
) -> crate::Result<ProvisioningState> {
    if stage == Stage::Userspace {
        // Belt and braces for ExecStopPost=: a stack a killed run left suspended is repaired
        // before anything else touches the device (a no-op when nothing is suspended).
        crate::online_recovery::run(config)?;
    }
    let result = run_stage(config, stage, stop);
    if stage != Stage::Initramfs {
        return result;
    }
    let locked = crate::boot_lock::finish_initramfs(config);
    let state = result?;
    locked.context("the boot-phase lock failed: the KEK stays unsealable in this boot")?;
    Ok(state)
}

fn run_stage(
    config: &Config,
    stage: Stage,
    stop: Arc<AtomicBool>,
) -> crate::Result<ProvisioningState> {
    // Fail on a missing or unreadable device before creating anything anywhere.
    probe::probe(&config.device)?;
    let mut kek = kek::from_config(config)?;
    let (mut rec, recovery) = Recorder::open(
        &config.journal_path(),
        stage_name(stage),
        record::JOURNAL_WAIT,
    )?;
    if let Some(rec) = recovery {
        tracing::error!(
            kept_aside = %rec.kept_aside.display(),
            reason = %rec.reason,
            "journal was damaged: kept aside, state rebuilt from the device"
        );
    }
    ensure_journal_is_for_this_device(config, &mut rec, &probe::probe(&config.device)?)?;
    let boot_id = rec.boot_id().to_string();
    let mut machine: Option<ProvisioningMachine> = None;
    for _ in 0..32 {
        let probe = probe::probe(&config.device)?;
        rec.set_device(record::identity_of(&probe))?;
        {
            let mut ctx = StepContext {
                config,
                kek: kek.as_mut(),
                rec: &mut rec,
                stop: stop.clone(),
                stage,
                state: ProvisioningState::Unencrypted,
            };
            if repair_before_probe(&mut ctx, &probe)? {
                machine = None;
                continue;
            }
        }
        let current = facts(
            config,
            kek.as_ref(),
            &probe,
            Some(rec.journal().records()),
            &boot_id,
        )?;
        let state = derive_state(&current);
        for step in record::reconcile(&mut rec, state)? {
            tracing::info!(%step, %state, "interrupted step had already taken effect; journal reconciled");
        }
        if let Content::Luks2(meta) = &probe.content {
            if steps::recovery::reconcile(&mut rec, state, meta)? {
                tracing::info!(%state, "interrupted recovery enrollment had finished; journal reconciled");
            }
        }
        let machine = machine.get_or_insert_with(|| {
            tracing::info!(%state, stage = stage_name(stage), "provisioning state");
            ProvisioningMachine::resume(state)
        });
        if machine.state() != state {
            bail!(
                "the device changed behind cryptfs's back: expected {}, found {state}",
                machine.state()
            );
        }
        let step = match plan(&current, stage) {
            Action::Done => {
                if state == ProvisioningState::HeaderBackedUp
                    && stage != Stage::Initramfs
                    && !current.journal.filesystem_grown
                    && !current.mapping_active
                {
                    tracing::info!(
                        "filesystem growth skipped: the volume has no active mapping (it grows \
                         when the userspace stage runs with the root mounted)"
                    );
                }
                tracing::info!(%state, stage = stage_name(stage), "nothing left to do in this stage");
                crate::notify::status(&format!("{state}: nothing left to do"));
                return Ok(state);
            }
            Action::Blocked(blocker) => bail!(
                "the {} stage cannot run: the device is {state} and {:?} (run `cryptfs run \
                 --stage initramfs` first)",
                stage_name(stage),
                blocker
            ),
            Action::Run(step) => step,
        };
        tracing::info!(%step, %state, "step starting");
        crate::notify::status(&format!("{step} (device {state})"));
        let mut ctx = StepContext {
            config,
            kek: kek.as_mut(),
            rec: &mut rec,
            stop: stop.clone(),
            stage,
            state,
        };
        if let Err(err) = steps::run(step, &mut ctx, &probe) {
            if err.downcast_ref::<crate::StoppedOnRequest>().is_some() {
                // The intent stays open: the next start resumes the step.
                rec.note(
                    "stopped-on-request",
                    Some(state),
                    Journal::details([("step", Value::from(step.name()))]),
                )?;
                crate::notify::status(&format!("{step}: stopped, resumes at the next start"));
                return Err(err);
            }
            let message = format!("{err:#}");
            if let Err(journal_err) = rec.failed(step, state, &message) {
                tracing::error!("could not journal the failure: {journal_err:#}");
            }
            return Err(err.context(format!("step {step} failed (device was {state})")));
        }
        let after = probe::probe(&config.device)?;
        let observed = derive_state(&facts(
            config,
            kek.as_ref(),
            &after,
            Some(rec.journal().records()),
            &boot_id,
        )?);
        let transitions = machine
            .completed(step, observed)
            .map_err(|e| anyhow!("{e}: the device does not look as the step promised"))?;
        for (from, to) in transitions {
            tracing::info!(%from, %to, "state transition");
            rec.transition(step, from, to)?;
        }
    }
    Err(anyhow!("provisioning did not settle after 32 steps")).context("internal error")
}
