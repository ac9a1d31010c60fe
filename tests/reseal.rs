//! `cryptfs reseal` end to end on real components: swtpm for the TPM (its PCR 7 extended the
//! way a firmware or `dbx` update changes it), real libcryptsetup on image files, systemd 252's
//! own TPM2 token plugin as the peer that must unlock what reseal writes, the kernel keyring
//! for the boot-phase lock hand-off. The crash side (a cut at every sync of a reseal) is in
//! tests/fsync_cuts.rs.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Output;

use common::{Image, Rig};
use cryptfs::kek::tpm2::Tpm2Protector;
use cryptfs::kek::tpm2_policy;
use serde_json::Value;

const SIZE_MIB: u64 = 96;

/// A rig provisioned to `header-backed-up` (CI image, volume key kept: these tests are about
/// keys, not data), with a recovery key escrowed to a file when `recovery`, with the
/// boot-phase lock when `lock` (then only the initramfs stage has run).
fn provisioned(recovery: bool, lock: bool) -> (Rig, Option<PathBuf>) {
    let mut rig = Rig::new(Image::Ci, SIZE_MIB);
    rig.tpm.extend_pcr7();
    let escrow = rig.dir.path().join("escrow");
    std::fs::create_dir_all(&escrow).expect("escrow dir");
    let key = escrow.join("recovery.key");
    let extra = if recovery {
        format!(
            "[recovery]\nenabled = true\nescrow_file = \"{}\"\n",
            key.display()
        )
    } else {
        String::new()
    };
    let text = common::config_text_with_lock(&rig.device, &rig.boot, &rig.tpm.tcti(), &extra, lock)
        .replace("[reencrypt]\n", "[reencrypt]\npolicy = \"never\"\n");
    std::fs::write(&rig.config, text).expect("config");
    if lock {
        rig.run_stage("initramfs");
        rig.run_stage("userspace");
    } else {
        rig.run_stage("all");
    }
    assert_eq!(rig.status()["state"], "header-backed-up");
    // Keep the rig's directory alive with the swtpm using it.
    rig.env.push(("CRYPTFS_LOG", "info".into()));
    (rig, recovery.then_some(key))
}

fn ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The systemd-tpm2 tokens on the device: (id, keyslot, blob).
fn tpm2_tokens(device: &Path) -> Vec<(u32, u32, String)> {
    common::luks2(device)
        .tokens
        .iter()
        .filter(|(_, t)| t.kind == "systemd-tpm2")
        .map(|(id, t)| {
            (
                *id,
                t.keyslots[0],
                t.json["tpm2-blob"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

/// Every keyslot is named by a token (no orphan a crash or a removal left).
fn assert_no_orphan_keyslot(device: &Path) {
    let meta = common::luks2(device);
    for slot in meta.keyslots.keys() {
        assert!(
            meta.tokens_of(*slot).next().is_some(),
            "keyslot {slot} has no token: {:?}",
            meta.keyslots.keys().collect::<Vec<_>>()
        );
    }
}

/// `luks.bin` is the device's header as it is now, and the journal vouches for it.
fn assert_backup_current(rig: &Rig) {
    let status = rig.status();
    assert_eq!(status["header_backup"]["digest_ok"], true, "{status:#}");
    let meta = common::luks2(&rig.device);
    let area = cryptfs::steps::backup::header_area_len(&meta).expect("area");
    let matches =
        cryptfs::steps::backup::matches_device(&rig.config().backup_path(), &rig.device, area)
            .expect("compare");
    assert!(matches.is_some(), "luks.bin is not the device's header");
}

fn token_policies(status: &Value) -> Vec<Value> {
    status["device"]["tokens"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|t| t["type"] == "systemd-tpm2")
        .map(|t| t["policy"].clone())
        .collect()
}

fn systemd_unlocks(rig: &Rig) -> Result<u32, String> {
    common::systemd_tpm2_plugin_unlocks(&rig.device, &format!("swtpm:port={}", rig.tpm.port))
}

/// Rotation: a new secret replaces the old one; systemd 252 unlocks the new token; the
/// header backup is written again; the journal shows intent, proof and done.
#[test]
fn reseal_replaces_the_kek_token_and_systemd_still_unlocks() {
    let (rig, _) = provisioned(false, false);
    let before = tpm2_tokens(&rig.device);
    assert_eq!(before.len(), 1, "{before:?}");
    let resealed = rig.cryptfs(&["reseal"]);
    let out = ok(&resealed, "reseal");
    assert!(out.contains("new KEK token"), "{out}");
    assert!(out.contains("removed"), "{out}");
    assert!(out.contains("header backup written again"), "{out}");
    let after = tpm2_tokens(&rig.device);
    assert_eq!(after.len(), 1, "{after:?}");
    assert_ne!(after[0].2, before[0].2, "a new sealed object");
    assert!(
        !common::luks2(&rig.device)
            .keyslots
            .contains_key(&before[0].1),
        "the old keyslot is gone"
    );
    assert_no_orphan_keyslot(&rig.device);
    ok(&rig.cryptfs(&["unlock", "--test"]), "unlock after reseal");
    let slot = systemd_unlocks(&rig).expect("systemd 252's plugin unlocks the resealed token");
    assert_eq!(slot, after[0].1);
    assert_backup_current(&rig);
    let status = rig.status();
    let records = status["journal"]["records"].as_array().expect("records");
    let reseal: Vec<(&str, &str)> = records
        .iter()
        .filter(|r| r["step"] == "reseal")
        .map(|r| {
            (
                r["phase"].as_str().unwrap_or(""),
                r["details"]["substep"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        reseal,
        vec![("intent", ""), ("note", "proven"), ("done", "")],
        "journal"
    );
    let policies = token_policies(&status);
    assert_eq!(policies.len(), 1);
    assert_eq!(policies[0]["unseals"], true, "{:#}", policies[0]);
    assert_eq!(status["state"], "header-backed-up");
    // The new secret (unsealed here by the test, through the real TPM) is nowhere on the
    // device, the boot partition (journal, luks.bin) or the command's output.
    let meta = common::luks2(&rig.device);
    let sealed =
        cryptfs::kek::SealedKek::from_token(&meta.tokens[&after[0].0].json).expect("token");
    let mut tpm = Tpm2Protector::new(&rig.config().kek.tpm2).expect("protector");
    let secret = cryptfs::kek::KekProtector::unseal(&mut tpm, &sealed).expect("unseal");
    let passphrase = secret.keyslot_passphrase();
    common::assert_nothing_written_contains(
        &rig,
        &[secret.expose(), passphrase.expose()],
        &[resealed],
    );
    assert_eq!(rig.files_inside(), rig.files, "every file survived");
}

/// An unplanned PCR 7 change: the TPM refuses, `status` says PCR 7 changed (sealed value and
/// current value), reseal without a recovery key refuses before any write and says what to
/// do, reseal with the escrowed recovery key seals to the new value. The recovery keyslot
/// stays.
#[test]
fn an_unplanned_pcr7_change_is_reported_and_resealed_with_the_recovery_key() {
    let (rig, key) = provisioned(true, false);
    let key = key.expect("escrowed key");
    let status = rig.status();
    assert_eq!(token_policies(&status)[0]["unseals"], true);
    rig.tpm.extend_pcr7();

    let refused = rig.cryptfs(&["unlock", "--test"]);
    assert!(!refused.status.success(), "unsealed with PCR 7 changed");
    let status = rig.status();
    let policy = &token_policies(&status)[0];
    assert_eq!(policy["unseals"], false, "{policy:#}");
    let pcr7 = policy["pcrs"]
        .as_array()
        .expect("pcrs")
        .iter()
        .find(|c| c["pcr"] == 7)
        .expect("PCR 7");
    assert_eq!(pcr7["changed"], true, "{pcr7:#}");
    assert_ne!(pcr7["sealed"], pcr7["boot"]);
    let text = String::from_utf8_lossy(&rig.cryptfs(&["status"]).stdout).into_owned();
    assert!(text.contains("PCR 7 CHANGED"), "{text}");

    let header_before = std::fs::read(&rig.device).expect("image")[..16 << 20].to_vec();
    let refused = rig.cryptfs(&["reseal"]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "resealed without any key");
    assert!(stderr.contains("--recovery-key-file"), "{stderr}");
    assert_eq!(
        std::fs::read(&rig.device).expect("image")[..16 << 20],
        header_before[..],
        "a refused reseal wrote to the header"
    );

    let recovery_slots = cryptfs::steps::recovery::recovery_keyslots(&common::luks2(&rig.device));
    let out = ok(
        &rig.cryptfs(&["reseal", "--recovery-key-file", &key.display().to_string()]),
        "reseal with the recovery key",
    );
    assert!(out.contains("recovery key"), "{out}");
    ok(&rig.cryptfs(&["unlock", "--test"]), "unlock after reseal");
    systemd_unlocks(&rig).expect("systemd unlocks the resealed token");
    assert_eq!(
        cryptfs::steps::recovery::recovery_keyslots(&common::luks2(&rig.device)),
        recovery_slots,
        "the recovery keyslot stays"
    );
    assert_eq!(tpm2_tokens(&rig.device).len(), 1);
    assert_no_orphan_keyslot(&rig.device);
    assert_eq!(token_policies(&rig.status())[0]["unseals"], true);
    assert_backup_current(&rig);
}

/// A planned update: `--prepare` adds a token for the predicted PCR 7 beside today's; after
/// the update cryptfs unlocks with the second token (systemd 252 tries one); `--finish` drops
/// the stale token, never the last one that unseals.
#[test]
fn a_planned_pcr7_change_is_prepared_then_finished() {
    let (rig, _) = provisioned(false, false);
    let tpm = Tpm2Protector::new(&rig.config().kek.tpm2).expect("protector");
    let now = tpm.read_pcrs("sha256", &[7]).expect("PCR 7").remove(0).1;
    let predicted = tpm2_policy::extended("sha256", &now, &[0xab; 32]).expect("predict");
    let mut checks = 0;

    let bad = rig.cryptfs(&["reseal", "--prepare", "--pcr7", "abcd"]);
    assert!(!bad.status.success(), "a 2-byte PCR 7 accepted");
    assert!(String::from_utf8_lossy(&bad.stderr).contains("32 bytes"));
    checks += 1;

    let out = ok(
        &rig.cryptfs(&["reseal", "--prepare", "--pcr7", &hex::encode(&predicted)]),
        "reseal --prepare",
    );
    assert!(out.contains("new KEK token"), "{out}");
    let tokens = tpm2_tokens(&rig.device);
    assert_eq!(tokens.len(), 2, "{tokens:?}");
    let verdicts: Vec<Value> = token_policies(&rig.status())
        .iter()
        .map(|p| p["unseals"].clone())
        .collect();
    assert_eq!(verdicts, vec![Value::from(true), Value::from(false)]);
    ok(
        &rig.cryptfs(&["unlock", "--test"]),
        "unlock before the update",
    );
    checks += 1;

    // The update: PCR 7 takes the predicted value.
    rig.tpm.extend_pcr7();
    let out = ok(
        &rig.cryptfs(&["unlock", "--test"]),
        "unlock after the update",
    );
    assert!(out.contains(&format!("token {}", tokens[1].0)), "{out}");
    checks += 1;

    let out = ok(&rig.cryptfs(&["reseal", "--finish"]), "reseal --finish");
    assert!(out.contains("removed"), "{out}");
    let left = tpm2_tokens(&rig.device);
    assert_eq!(left, vec![tokens[1].clone()], "the prepared token stays");
    assert_no_orphan_keyslot(&rig.device);
    systemd_unlocks(&rig).expect("systemd unlocks the remaining token");
    assert_backup_current(&rig);
    checks += 1;

    let again = ok(
        &rig.cryptfs(&["reseal", "--finish"]),
        "reseal --finish again",
    );
    assert!(again.contains("nothing to do"), "{again}");
    checks += 1;

    // Another change nobody prepared for: finish must not remove the last token.
    rig.tpm.extend_pcr7();
    let refused = rig.cryptfs(&["reseal", "--finish"]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "finish removed the last token");
    assert!(stderr.contains("none of the 1 KEK tokens"), "{stderr}");
    assert!(stderr.contains("PCR 7 changed"), "{stderr}");
    assert_eq!(tpm2_tokens(&rig.device), left, "nothing removed");
    checks += 1;
    assert_eq!(checks, 6, "every check ran");
}

/// After the boot-phase lock (userspace, the OTA agent's place): reseal opens the volume with
/// the passphrase the initramfs handed on, seals to PCR 7 and the lock PCR's pre-lock value,
/// and the next boot unlocks with the new token. The keyring then holds the new passphrase.
#[test]
fn reseal_after_the_boot_phase_lock_uses_the_keyring_and_the_next_boot_unlocks() {
    let (mut rig, _) = provisioned(false, true);
    let refused = rig.cryptfs(&["unlock", "--test"]);
    assert!(!refused.status.success(), "the lock is in effect");
    let before = tpm2_tokens(&rig.device);
    let out = ok(&rig.cryptfs(&["reseal"]), "reseal after the lock");
    assert!(out.contains("kernel keyring"), "{out}");
    let after = tpm2_tokens(&rig.device);
    assert_eq!(after.len(), 1);
    assert_ne!(after[0].2, before[0].2);
    let token = &common::luks2(&rig.device).tokens[&after[0].0];
    assert_eq!(token.json["tpm2-pcrs"], serde_json::json!([7, 15]));
    // Still this boot: the userspace stage's hand-off opens the new keyslot.
    let meta = common::luks2(&rig.device);
    assert!(cryptfs::boot_lock::stashed(&rig.config(), &meta).is_some());
    let status = rig.status();
    assert_eq!(token_policies(&status)[0]["unseals"], true, "{status:#}");

    // After the lock, a refusal the lock alone explains says so; one a changed PCR 7 also
    // explains says that instead (the next boot would not unseal either).
    let locked = rig.cryptfs(&["unlock", "--test"]);
    let stderr = String::from_utf8_lossy(&locked.stderr);
    assert!(stderr.contains("boot-phase lock is in effect"), "{stderr}");
    rig.tpm.extend_pcr7();
    let changed = rig.cryptfs(&["unlock", "--test"]);
    let stderr = String::from_utf8_lossy(&changed.stderr);
    assert!(!changed.status.success());
    assert!(
        stderr.contains("PCR 7 changed") && !stderr.contains("boot-phase lock is in effect"),
        "{stderr}"
    );

    rig.reboot(true);
    let next = rig.cryptfs_env(&["unlock", "--test"], &[("CRYPTFS_BOOT_ID", "next-boot")]);
    ok(&next, "the next boot unlocks with the resealed token");
    systemd_unlocks(&rig).expect("systemd unlocks the resealed token in the initramfs");
}

/// A crash (the failpoint's abort, as a power cut) at each step boundary of a reseal: the
/// volume still unlocks at the crash, and the next reseal resolves the interrupted one the
/// way its boundary implies (rolled back before the proof, completed after) and finishes.
#[test]
fn a_crash_at_every_reseal_boundary_keeps_an_unlock_path_and_the_next_reseal_resolves_it() {
    let (rig, _) = provisioned(false, false);
    let original = tpm2_tokens(&rig.device);
    let snap = rig.dir.path().join("snapshot");
    std::fs::create_dir_all(&snap).expect("snapshot dir");
    std::fs::copy(&rig.device, snap.join("root.img")).expect("snapshot image");
    common::copy_tree(&rig.boot, &snap.join("boot"));
    let mut cut = 0;
    for (failpoint, resolution) in common::RESEAL_BOUNDARIES {
        std::fs::copy(snap.join("root.img"), &rig.device).expect("restore image");
        common::copy_tree(&snap.join("boot"), &rig.boot);
        let crashed = rig.cryptfs_env(&["reseal"], &[("CRYPTFS_FAILPOINT", failpoint)]);
        let stderr = String::from_utf8_lossy(&crashed.stderr);
        assert!(
            crashed.status.signal() == Some(libc::SIGABRT)
                && stderr.contains(&format!("failpoint {failpoint} hit")),
            "{failpoint}: no crash there: {stderr}"
        );
        cut += 1;
        ok(
            &rig.cryptfs(&["unlock", "--test"]),
            &format!("unlock after a crash at {failpoint}"),
        );
        let again = ok(&rig.cryptfs(&["reseal"]), "reseal after the crash");
        assert!(
            again.contains(&format!("was {resolution}")),
            "{failpoint}: expected {resolution}: {again}"
        );
        let now = tpm2_tokens(&rig.device);
        assert_eq!(now.len(), 1, "{failpoint}: {now:?}");
        assert_ne!(now[0].2, original[0].2, "{failpoint}: not resealed");
        assert_no_orphan_keyslot(&rig.device);
        ok(
            &rig.cryptfs(&["unlock", "--test"]),
            "unlock after the resume",
        );
        assert_backup_current(&rig);
    }
    assert_eq!(cut, common::RESEAL_BOUNDARIES.len(), "every boundary cut");
}
