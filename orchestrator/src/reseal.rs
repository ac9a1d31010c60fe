//! `cryptfs reseal`: seal the KEK to new PCR values without a moment with no unlock path.
//!
//! - `replace` (the default): a new secret sealed to this boot's PCR values replaces every KEK
//!   token (rotation, or recovery after an unplanned PCR 7 change with `--recovery-key-file`).
//! - `prepare --pcr7 HEX`: a new token for a predicted PCR 7 beside the current ones, before a
//!   firmware or `dbx` update.
//! - `finish`: after the update, drop the tokens this boot's PCR values no longer satisfy,
//!   never the last one that unseals.
//!
//! The secret is sealed with a policy computed in software ([`crate::kek::tpm2_policy`]) for
//! the target values, with the boot-phase lock PCR at its journaled pre-lock value, so reseal
//! works from userspace after the lock. The volume is opened with, in this order: the
//! recovery key when given, the passphrase the initramfs handed on in the kernel keyring, an
//! unseal of the current tokens.
//!
//! Order, each step journaled (design/custody.md): intent (new keyslot, pairs to remove,
//! target values: all public) → seal → add keyslot → add token → prove → note `proven` →
//! remove the old pairs, keyslot before token → refresh `luks.bin` → done. A crash before
//! `proven` is undone by the next reseal (the old pairs were never touched); a crash after it is
//! completed. Which of the two is decided by [`cryptfs_states::reseal::resume`].

use anyhow::{anyhow, bail, Context as _};
use cryptfs_journal::{Journal, Record};
use cryptfs_states::reseal::{
    self as plan, Interrupted, KekPair, ResealMode, Resume, TokenVerdict,
};
use cryptfs_states::{check_binding, derive_state, BindingCheck, ProvisioningState, Stage};
use serde_json::{Map, Value};

use crate::boot_lock;
use crate::config::{Config, KekKind};
use crate::failpoint;
use crate::kek::tpm2::{Tpm2Protector, TOKEN_TYPE};
use crate::kek::tpm2_policy;
use crate::kek::KekProtector;
use crate::luks::device;
use crate::luks::metadata::Luks2Metadata;
use crate::probe::{self, Probe};
use crate::record::{self, keys, Recorder};
use crate::secret::Passphrase;
use crate::steps::{self, StepContext};
use crate::token_policy::{self, BootPcrs};
use crate::token_unlock;

/// The journal subject of a reseal.
pub const SUBJECT: &str = "reseal";
/// The sub-step noted once the new pair has opened the volume.
const PROVEN: &str = "proven";
/// LUKS2 has at most 32 keyslots.
const MAX_KEYSLOTS: u32 = 32;

/// What the caller asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Replace every KEK token with one sealed to this boot's PCR values.
    Replace,
    /// Add a token for this PCR 7 value (in the configured bank) beside the current ones.
    Prepare {
        /// The predicted PCR 7 value.
        pcr7: Vec<u8>,
    },
    /// Drop the tokens that no longer unseal.
    Finish,
}

impl Request {
    fn mode(&self) -> ResealMode {
        match self {
            Request::Replace => ResealMode::Replace,
            Request::Prepare { .. } => ResealMode::Prepare,
            Request::Finish => ResealMode::Finish,
        }
    }
}

/// What a reseal did, for the command's output.
#[derive(Debug, Default)]
pub struct Outcome {
    /// What an interrupted earlier reseal was resolved as, if there was one.
    pub resumed: Option<String>,
    /// The new token and keyslot.
    pub added: Option<KekPair>,
    /// The pairs removed.
    pub removed: Vec<KekPair>,
    /// Whether `luks.bin` was written again.
    pub backup_refreshed: bool,
    /// Where the passphrase that opened the volume came from.
    pub opened_with: Option<&'static str>,
}

/// Runs a reseal (after resolving an interrupted one).
pub fn run(
    config: &Config,
    request: &Request,
    recovery_key: Option<&Passphrase>,
) -> crate::Result<Outcome> {
    if config.kek.kind != KekKind::Tpm2 {
        bail!(
            "cryptfs reseal works on TPM 2.0 policies; kek.kind = \"pkcs11\" keys are not bound \
             to PCR values"
        );
    }
    let mut tpm = Tpm2Protector::new(&config.kek.tpm2)?;
    let found = probe::probe(&config.device)?;
    let meta = expect_luks2(config, &found)?;
    if meta.reencrypt_mode().is_some() {
        bail!(
            "{} is being re-encrypted: let `cryptfs run` finish it, then reseal",
            config.device.display()
        );
    }
    let (mut rec, _) = Recorder::open(&config.journal_path(), SUBJECT, record::JOURNAL_WAIT)?;
    let current = record::identity_of(&found);
    let binding = record::journal_binding(rec.journal().records());
    if let BindingCheck::Mismatch { .. } = check_binding(&binding, current.as_ref()) {
        bail!(
            "the journal {} was written for another device: run `cryptfs run` first (it keeps \
             that journal aside)",
            config.journal_path().display()
        );
    }
    rec.set_device(current)?;
    let state = provisioning_state(config, &tpm, &found, &rec)?;
    if !matches!(
        state,
        ProvisioningState::Complete | ProvisioningState::HeaderBackedUp
    ) {
        bail!(
            "{} is in state {state}: reseal is for provisioned volumes (complete or \
             header-backed-up); let `cryptfs run` finish first",
            config.device.display()
        );
    }

    let mut outcome = Outcome::default();
    if let Some(intent) = record::pending_named(rec.journal().records(), SUBJECT)
        .and_then(|tail| tail.first())
        .cloned()
    {
        let proven = record::pending_named(rec.journal().records(), SUBJECT).is_some_and(|tail| {
            tail.iter()
                .any(|r| r.body.detail_str(keys::SUBSTEP) == Some(PROVEN))
        });
        let (mode, resolution) = resume(config, &mut tpm, &mut rec, state, &intent, proven)?;
        let completed = resolution == "completed";
        outcome.resumed = Some(format!("an interrupted {mode} was {resolution}"));
        // An interrupted reseal of the same kind that could be completed is what was asked
        // for (an agent retrying after a power cut): do not rotate a second time.
        if completed && mode == request.mode() {
            return Ok(outcome);
        }
    }
    let meta = probe::luks2(&config.device, "to reseal")?;
    match request {
        Request::Finish => finish(config, &mut tpm, &mut rec, state, &meta, &mut outcome)?,
        Request::Replace | Request::Prepare { .. } => add(
            config,
            &mut tpm,
            &mut rec,
            state,
            &meta,
            request,
            recovery_key,
            &mut outcome,
        )?,
    }
    Ok(outcome)
}

fn expect_luks2<'p>(config: &Config, found: &'p Probe) -> crate::Result<&'p Luks2Metadata> {
    match &found.content {
        probe::Content::Luks2(meta) => Ok(meta),
        _ => bail!(
            "{} is no LUKS2 volume: nothing to reseal",
            config.device.display()
        ),
    }
}

fn provisioning_state(
    config: &Config,
    tpm: &Tpm2Protector,
    found: &Probe,
    rec: &Recorder,
) -> crate::Result<ProvisioningState> {
    let facts = crate::runner::facts(
        config,
        tpm,
        found,
        Some(rec.journal().records()),
        rec.boot_id(),
    )?;
    Ok(derive_state(&facts))
}

/// The KEK pairs of `meta` this protector can use.
fn kek_pairs(tpm: &Tpm2Protector, meta: &Luks2Metadata) -> Vec<KekPair> {
    token_unlock::usable_tokens(tpm, meta)
        .into_iter()
        .map(|t| KekPair {
            token: t.token,
            keyslot: t.keyslot,
        })
        .collect()
}

fn pairs_value(pairs: &[KekPair]) -> Value {
    serde_json::to_value(pairs).unwrap_or(Value::Null)
}

fn values_value(values: &[(u8, Vec<u8>)]) -> Value {
    let mut map = Map::new();
    for (pcr, value) in values {
        map.insert(pcr.to_string(), Value::from(hex::encode(value)));
    }
    Value::Object(map)
}

/// The value the lock PCR has at the start of a boot: the pre-lock value journaled in this
/// boot, else in any boot (it is the same every boot), else — the lock never ran — now.
fn lock_pcr_at_boot(records: &[Record], boot_id: &str, pcr: u8, now: &[u8]) -> Vec<u8> {
    boot_lock::pre_lock_value(records, boot_id)
        .or_else(|| boot_lock::latest_pre_lock_value(records))
        .filter(|(p, _)| *p == pcr)
        .map_or_else(|| now.to_vec(), |(_, v)| v)
}

/// This boot's PCR values as `status` and `finish` judge tokens by.
pub fn boot_pcrs(
    config: &Config,
    tpm: &Tpm2Protector,
    meta: &Luks2Metadata,
    records: &[Record],
) -> crate::Result<BootPcrs> {
    let pre_lock = boot_lock::enabled(config)
        .then(|| boot_lock::pre_lock_value(records, &record::boot_id()))
        .flatten();
    BootPcrs::read(tpm, meta, pre_lock)
}

/// The values a new token is sealed to: every PCR of the policy as it is in this boot (the
/// lock PCR at its pre-lock value), PCR 7 replaced by the prediction for `prepare`.
fn target_values(
    config: &Config,
    tpm: &Tpm2Protector,
    records: &[Record],
    boot_id: &str,
    request: &Request,
) -> crate::Result<Vec<(u8, Vec<u8>)>> {
    let bank = &config.kek.tpm2.pcr_bank;
    let mut values = tpm.read_pcrs(bank, tpm.pcrs())?;
    if boot_lock::enabled(config) {
        let lock = config.kek.tpm2.lock_pcr;
        for (pcr, value) in values.iter_mut() {
            if *pcr == lock {
                *value = lock_pcr_at_boot(records, boot_id, lock, value);
            }
        }
    }
    if let Request::Prepare { pcr7 } = request {
        let len = tpm2_policy::bank_digest_len(bank)?;
        if pcr7.len() != len {
            bail!(
                "--pcr7 is {} bytes; a {bank} PCR value is {len} bytes ({} hex digits)",
                pcr7.len(),
                len * 2
            );
        }
        let slot = values
            .iter_mut()
            .find(|(pcr, _)| *pcr == 7)
            .ok_or_else(|| {
                anyhow!("--pcr7 given but PCR 7 is not in kek.tpm2.pcrs: nothing to predict")
            })?;
        slot.1 = pcr7.clone();
    }
    Ok(values)
}

/// Opens the volume for adding a keyslot: recovery key, keyring hand-off, token unseal.
fn open_volume(
    config: &Config,
    tpm: &mut Tpm2Protector,
    meta: &Luks2Metadata,
    recovery_key: Option<&Passphrase>,
) -> crate::Result<(Passphrase, &'static str)> {
    if let Some(key) = recovery_key {
        device::test_passphrase(&config.device, None, key)
            .map_err(|e| anyhow!("the recovery key opens no keyslot of the volume: {e}"))?;
        return Ok((Passphrase::new(key.expose().to_vec()), "recovery key"));
    }
    if boot_lock::enabled(config) {
        if let Some((_, passphrase)) = boot_lock::stashed(config, meta) {
            return Ok((passphrase, "kernel keyring (boot-phase lock hand-off)"));
        }
    }
    match token_unlock::test_unlock_any(tpm, meta, &config.device) {
        Ok(unlocked) => Ok((unlocked.passphrase, "KEK token")),
        Err(e) => Err(anyhow!(
            "cannot open {} to add the new keyslot: no recovery key given, no key in the kernel \
             keyring, and the TPM refuses the current tokens ({e:#}); if PCR 7 changed (see \
             `cryptfs status`), run `cryptfs reseal --recovery-key-file FILE`",
            config.device.display()
        )),
    }
}

#[allow(clippy::too_many_arguments)]
fn add(
    config: &Config,
    tpm: &mut Tpm2Protector,
    rec: &mut Recorder,
    state: ProvisioningState,
    meta: &Luks2Metadata,
    request: &Request,
    recovery_key: Option<&Passphrase>,
    outcome: &mut Outcome,
) -> crate::Result<()> {
    let dev = config.device.clone();
    let mode = request.mode();
    // Every check before the first write.
    let boot_id = rec.boot_id().to_string();
    let values = target_values(config, tpm, rec.journal().records(), &boot_id, request)?;
    let policy = tpm2_policy::policy_pcr_digest(&config.kek.tpm2.pcr_bank, &values)?;
    tpm.preflight()?;
    let (passphrase, opened_with) = open_volume(config, tpm, meta, recovery_key)?;
    outcome.opened_with = Some(opened_with);
    let keyslot = (0..MAX_KEYSLOTS)
        .find(|s| !meta.keyslots.contains_key(s))
        .ok_or_else(|| anyhow!("{} has no free keyslot for the new KEK", dev.display()))?;
    let remove = match mode {
        ResealMode::Replace => plan::plan_replace(&kek_pairs(tpm, meta)),
        _ => Vec::new(),
    };
    rec.operation_intent(
        SUBJECT,
        state,
        Journal::details([
            ("mode", Value::from(mode.name())),
            (keys::KEYSLOT, Value::from(keyslot)),
            ("remove", pairs_value(&remove)),
            ("pcr_values", values_value(&values)),
            ("pcr_bank", Value::from(config.kek.tpm2.pcr_bank.clone())),
            ("policy", Value::from(hex::encode(policy))),
            ("opened_with", Value::from(opened_with)),
        ]),
    )?;
    failpoint::hit("reseal:after-intent");
    let (secret, sealed) = tpm.seal_to(&values)?;
    let new_passphrase = secret.keyslot_passphrase();
    device::add_keyslot_at(&dev, keyslot, &passphrase, &new_passphrase)?;
    failpoint::hit("reseal:after-keyslot");
    let token = device::add_token(&dev, &sealed.token(TOKEN_TYPE, keyslot))?;
    failpoint::hit("reseal:after-token");

    // Prove the new pair before anything old goes: its passphrase opens its keyslot, the
    // token on the device names it, the sealed object demands exactly the target policy, and
    // — when the target is what the TPM holds now — the TPM really unseals it.
    let opened = device::test_passphrase(&dev, Some(keyslot), &new_passphrase)
        .map_err(|e| anyhow!("the new KEK does not open its keyslot {keyslot}: {e}"))?;
    let after = probe::luks2(&dev, "after adding the new KEK")?;
    let on_device = after
        .tokens
        .get(&token)
        .filter(|t| t.keyslots == [keyslot])
        .ok_or_else(|| anyhow!("the new token {token} does not name keyslot {keyslot}"))?;
    let target = BootPcrs {
        current: values
            .iter()
            .map(|(p, v)| ((config.kek.tpm2.pcr_bank.clone(), *p), v.clone()))
            .collect(),
        pre_lock: None,
    };
    let judged = token_policy::judge(
        token,
        &crate::kek::SealedKek::from_token(&on_device.json)
            .ok_or_else(|| anyhow!("the new token {token} is not a JSON object"))?,
        &target,
    );
    if judged.unseals != Some(true) {
        bail!(
            "the new token {token} does not carry the policy of the target PCR values \
             ({judged:?})"
        );
    }
    if mode == ResealMode::Replace && !boot_lock::locked_this_boot(config).unwrap_or(true) {
        let unsealed = tpm
            .unseal(&sealed)
            .context("the TPM does not unseal the new token")?;
        if unsealed.expose() != secret.expose() {
            bail!("the TPM unsealed another secret than the one the new token was made with");
        }
    }
    rec.substep_named(
        SUBJECT,
        PROVEN,
        Journal::details([
            ("token", Value::from(token)),
            (keys::KEYSLOT, Value::from(opened)),
        ]),
    )?;
    failpoint::hit("reseal:after-proven");
    let new_pair = KekPair { token, keyslot };
    outcome.added = Some(new_pair);
    outcome.removed = remove_pairs(config, &remove, Some(new_pair))?;
    if mode == ResealMode::Replace {
        // The passphrase in the keyring (if any) opened a keyslot that is gone now.
        let after = probe::luks2(&dev, "after reseal")?;
        boot_lock::stash(config, &after, &new_passphrase);
    }
    outcome.backup_refreshed = refresh_backup(config, tpm, rec, state)?;
    rec.operation_done(
        SUBJECT,
        state,
        Journal::details([
            ("mode", Value::from(mode.name())),
            ("token", Value::from(token)),
            (keys::KEYSLOT, Value::from(keyslot)),
            ("removed", pairs_value(&outcome.removed)),
            ("backup_refreshed", Value::from(outcome.backup_refreshed)),
        ]),
    )?;
    tracing::info!(token, keyslot, removed = outcome.removed.len(), %mode, "reseal done");
    Ok(())
}

fn finish(
    config: &Config,
    tpm: &mut Tpm2Protector,
    rec: &mut Recorder,
    state: ProvisioningState,
    meta: &Luks2Metadata,
    outcome: &mut Outcome,
) -> crate::Result<()> {
    let boot = boot_pcrs(config, tpm, meta, rec.journal().records())?;
    let tokens = token_unlock::usable_tokens(tpm, meta);
    let mut verdicts = Vec::new();
    let mut refused = Vec::new();
    for t in &tokens {
        let judged = token_policy::judge(t.token, &t.sealed, &boot);
        if judged.unseals != Some(true) {
            refused.push(format!(
                "token {} ({})",
                t.token,
                token_policy::changed_pcrs(&judged)
                    .map_or_else(|| "policy differs".into(), |p| format!("{p} changed"))
            ));
        }
        verdicts.push(TokenVerdict {
            pair: KekPair {
                token: t.token,
                keyslot: t.keyslot,
            },
            unseals: judged.unseals == Some(true),
        });
    }
    let remove = plan::plan_finish(&verdicts)
        .map_err(|e| anyhow!("{e}; refused: {}", refused.join(", ")))?;
    if remove.is_empty() {
        tracing::info!("every KEK token unseals with this boot's PCR values: nothing to drop");
        return Ok(());
    }
    rec.operation_intent(
        SUBJECT,
        state,
        Journal::details([
            ("mode", Value::from(ResealMode::Finish.name())),
            ("remove", pairs_value(&remove)),
        ]),
    )?;
    failpoint::hit("reseal:after-intent");
    outcome.removed = remove_pairs(config, &remove, None)?;
    outcome.backup_refreshed = refresh_backup(config, tpm, rec, state)?;
    rec.operation_done(
        SUBJECT,
        state,
        Journal::details([
            ("mode", Value::from(ResealMode::Finish.name())),
            ("removed", pairs_value(&outcome.removed)),
            ("backup_refreshed", Value::from(outcome.backup_refreshed)),
        ]),
    )?;
    Ok(())
}

/// Removes each old pair that is still there: its keyslot (libcryptsetup unassigns it from
/// its tokens), then its token. In that order a crash between the two leaves a token naming
/// no keyslot, which nothing uses; the other order would leave a keyslot no token names,
/// which looks like a passphrase to wipe. A keyslot another token still names is kept.
/// Idempotent: what is gone is skipped.
fn remove_pairs(
    config: &Config,
    pairs: &[KekPair],
    keep: Option<KekPair>,
) -> crate::Result<Vec<KekPair>> {
    let dev = &config.device;
    let mut removed = Vec::new();
    for pair in pairs {
        if keep.is_some_and(|k| k.token == pair.token || k.keyslot == pair.keyslot) {
            continue;
        }
        let meta = probe::luks2(dev, "while removing an old KEK pair")?;
        let named_by_others = meta
            .tokens_of(pair.keyslot)
            .any(|(id, _)| *id != pair.token);
        if meta.keyslots.contains_key(&pair.keyslot) && !named_by_others {
            device::destroy_keyslot(dev, pair.keyslot)?;
            failpoint::hit("reseal:after-destroy-keyslot");
        }
        let meta = probe::luks2(dev, "while removing an old KEK pair")?;
        let token_there = meta.tokens.get(&pair.token).is_some_and(|t| {
            t.kind == TOKEN_TYPE && (t.keyslots.is_empty() || t.keyslots == [pair.keyslot])
        });
        if token_there {
            device::remove_token(dev, pair.token)?;
        }
        tracing::info!(
            token = pair.token,
            keyslot = pair.keyslot,
            "old KEK pair removed"
        );
        removed.push(*pair);
    }
    Ok(removed)
}

/// Writes `luks.bin` again when one was taken before: the old one holds keyslots that are
/// gone. Returns whether it ran.
fn refresh_backup(
    config: &Config,
    tpm: &mut Tpm2Protector,
    rec: &mut Recorder,
    state: ProvisioningState,
) -> crate::Result<bool> {
    if record::backup_digest(rec.journal()).is_none() {
        return Ok(false);
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut ctx = StepContext {
        config,
        kek: tpm,
        rec,
        stop,
        stage: Stage::Userspace,
        state,
    };
    steps::backup::run_superseding(&mut ctx).context("the header backup could not be refreshed")?;
    Ok(true)
}

/// Resolves an interrupted reseal: undoes an unproven new pair or completes a proven one.
/// Returns its mode and `rolled back` or `completed`.
fn resume(
    config: &Config,
    tpm: &mut Tpm2Protector,
    rec: &mut Recorder,
    state: ProvisioningState,
    intent: &Record,
    proven: bool,
) -> crate::Result<(ResealMode, &'static str)> {
    let details = &intent.body.details;
    let mode = details
        .get("mode")
        .cloned()
        .and_then(|v| serde_json::from_value::<ResealMode>(v).ok())
        .ok_or_else(|| anyhow!("the journal's interrupted reseal has no mode it understands"))?;
    let new_keyslot = details
        .get(keys::KEYSLOT)
        .and_then(Value::as_u64)
        .and_then(|s| u32::try_from(s).ok());
    let remove: Vec<KekPair> = details
        .get("remove")
        .cloned()
        .and_then(|v| serde_json::from_value(v).ok())
        .unwrap_or_default();
    let meta = probe::luks2(&config.device, "to resume the reseal")?;
    // Only systemd-tpm2 tokens count as the new pair's: a keyslot number that an unrelated
    // token (a recovery key enrolled since) took over is never touched.
    let (new_tokens, new_keyslot_present) = match new_keyslot {
        Some(slot) => {
            let named: Vec<(u32, bool)> = meta
                .tokens_of(slot)
                .map(|(id, t)| (*id, t.kind == TOKEN_TYPE))
                .collect();
            let ours = named
                .iter()
                .filter(|(_, tpm2)| *tpm2)
                .map(|(id, _)| *id)
                .collect();
            let foreign = named.iter().any(|(_, tpm2)| !tpm2);
            (ours, meta.keyslots.contains_key(&slot) && !foreign)
        }
        None => (Vec::new(), false),
    };
    let found = Interrupted {
        mode,
        new_keyslot,
        new_keyslot_present,
        new_tokens,
        proven,
        remove,
    };
    let dev = &config.device;
    match plan::resume(&found) {
        Resume::RollBack { tokens, keyslot } => {
            tracing::warn!(
                %mode,
                ?tokens,
                ?keyslot,
                "an interrupted reseal never proved its new KEK: removing it (the old ones were \
                 not touched)"
            );
            for token in tokens {
                device::remove_token(dev, token)?;
            }
            if let Some(slot) = keyslot {
                device::destroy_keyslot(dev, slot)?;
            }
            rec.operation_done(
                SUBJECT,
                state,
                Journal::details([
                    ("mode", Value::from(mode.name())),
                    ("rolled_back", Value::from(true)),
                ]),
            )?;
            Ok((mode, "rolled back"))
        }
        Resume::Complete { remove } => {
            let keep = new_keyslot.and_then(|slot| {
                found.new_tokens.first().map(|token| KekPair {
                    token: *token,
                    keyslot: slot,
                })
            });
            let removed = remove_pairs(config, &remove, keep)?;
            let refreshed = refresh_backup(config, tpm, rec, state)?;
            rec.operation_done(
                SUBJECT,
                state,
                Journal::details([
                    ("mode", Value::from(mode.name())),
                    ("removed", pairs_value(&removed)),
                    ("backup_refreshed", Value::from(refreshed)),
                    ("resumed", Value::from(true)),
                ]),
            )?;
            Ok((mode, "completed"))
        }
    }
}

/// The command's report.
pub fn render(outcome: &Outcome) -> String {
    let mut out = String::new();
    if let Some(resumed) = &outcome.resumed {
        out.push_str(&format!("cryptfs: {resumed}\n"));
    }
    if let Some(with) = outcome.opened_with {
        out.push_str(&format!("cryptfs: volume opened with the {with}\n"));
    }
    if let Some(added) = outcome.added {
        out.push_str(&format!(
            "cryptfs: new KEK token {} on keyslot {} proven\n",
            added.token, added.keyslot
        ));
    }
    for pair in &outcome.removed {
        out.push_str(&format!(
            "cryptfs: old KEK token {} and keyslot {} removed\n",
            pair.token, pair.keyslot
        ));
    }
    if outcome.backup_refreshed {
        out.push_str("cryptfs: header backup written again\n");
    }
    if outcome.added.is_none() && outcome.removed.is_empty() && outcome.resumed.is_none() {
        out.push_str(
            "cryptfs: nothing to do: every KEK token unseals with this boot's PCR values\n",
        );
    }
    out
}

/// The keyslot an interrupted reseal chose for its new pair, if one is open.
pub fn pending_new_keyslot(records: &[Record]) -> Option<u32> {
    record::pending_keyslot(records, SUBJECT)
}

/// An interrupted reseal, for `status`: its mode, if the journal has one open.
pub fn interrupted(records: &[Record]) -> Option<String> {
    let intent = record::pending_named(records, SUBJECT)?.first()?;
    Some(
        intent
            .body
            .detail_str("mode")
            .unwrap_or("reseal")
            .to_string(),
    )
}
