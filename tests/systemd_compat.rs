//! Two-way compatibility with systemd 252's own tooling, both token kinds, on real peers:
//! systemd's libcryptsetup token plugins and `systemd-cryptenroll`.

mod common;

use std::process::Command;

use common::{Image, Rig, SoftHsm, CI_PASSPHRASE, USER_PIN};
use libcryptsetup_rs::consts::flags::CryptActivate;
use libcryptsetup_rs::consts::vals::EncryptionFormat;
use libcryptsetup_rs::CryptInit;

/// Unlocks (test only, no activation) through systemd's own token plugin.
fn systemd_tpm2_plugin_unlocks(rig: &Rig) -> Result<u32, String> {
    common::systemd_tpm2_plugin_unlocks(&rig.device, &format!("swtpm:port={}", rig.tpm.port))
}

fn systemd_pkcs11_plugin_unlocks(rig: &Rig, hsm: &SoftHsm) -> Result<u32, String> {
    hsm.with(|| {
        let mut cd = CryptInit::init(&rig.device).map_err(|e| e.to_string())?;
        cd.context_handle()
            .load::<()>(Some(EncryptionFormat::Luks2), None)
            .map_err(|e| e.to_string())?;
        cd.token_handle()
            .activate_by_token_pin::<()>(
                None,
                Some("systemd-pkcs11"),
                None,
                USER_PIN.as_bytes(),
                None,
                CryptActivate::empty(),
            )
            .map_err(|e| e.to_string())
    })
}

fn cryptenroll(rig: &Rig, args: &[&str], env: &[(&str, &str)]) {
    let out = Command::new("systemd-cryptenroll")
        .args(args)
        .arg(&rig.device)
        .env("PASSWORD", CI_PASSPHRASE)
        .envs(env.iter().copied())
        .output()
        .expect("systemd-cryptenroll (package systemd)");
    assert!(
        out.status.success(),
        "systemd-cryptenroll failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn systemd_tpm2_plugin_unlocks_what_cryptfs_enrolls_and_refuses_after_pcr7_changes() {
    let rig = Rig::new(Image::Plain, 128);
    // A non-zero PCR 7 at enrollment (secure boot on), as on a real device.
    rig.tpm.extend_pcr7();
    rig.run_stage("all");
    let slot = systemd_tpm2_plugin_unlocks(&rig).expect("systemd's tpm2 plugin unlocks");
    assert_eq!(slot, common::luks2(&rig.device).tokens[&0].keyslots[0]);
    rig.tpm.extend_pcr7();
    assert!(
        systemd_tpm2_plugin_unlocks(&rig).is_err(),
        "PCR 7 changed: must refuse"
    );
}

/// systemd 252's plugin recomputes the policy over `tpm2-pcrs` (7 and the lock PCR 15): it
/// unlocks in the initramfs, before the boot-phase lock, and not after it.
#[test]
fn systemd_tpm2_plugin_unlocks_before_the_boot_phase_lock_and_not_after() {
    let mut rig = Rig::new(Image::Plain, 128);
    rig.enable_boot_phase_lock();
    rig.tpm.extend_pcr7();
    rig.run_stage("all");
    let token = common::luks2(&rig.device).tokens[&0].json.clone();
    assert_eq!(token["tpm2-pcrs"], serde_json::json!([7, 15]));
    let before = systemd_tpm2_plugin_unlocks(&rig).expect("before the lock: unlocks");
    assert_eq!(before, common::luks2(&rig.device).tokens[&0].keyslots[0]);
    rig.run_stage("initramfs");
    assert!(
        systemd_tpm2_plugin_unlocks(&rig).is_err(),
        "after the lock systemd's plugin must not unseal"
    );
    // Next boot (PCRs reset): unlocks again.
    rig.reboot(true);
    let again = systemd_tpm2_plugin_unlocks(&rig).expect("next boot: unlocks");
    assert_eq!(again, before);
}

#[test]
fn systemd_tpm2_plugin_unlocks_a_cryptfs_reencrypted_ci_image() {
    let rig = Rig::new(Image::Ci, 128);
    rig.run_stage("initramfs");
    rig.run_stage("userspace");
    systemd_tpm2_plugin_unlocks(&rig).expect("unlocks after re-encryption");
}

#[test]
fn cryptfs_unlocks_what_systemd_cryptenroll_enrolls_with_tpm2() {
    let rig = Rig::new(Image::Ci, 128);
    cryptenroll(
        &rig,
        &[
            &format!("--tpm2-device=swtpm:port={}", rig.tpm.port),
            "--tpm2-pcrs=7",
        ],
        &[],
    );
    let out = rig.cryptfs(&["unlock", "--test"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("(systemd-tpm2) opened keyslot"));
    let s = rig.status();
    assert_eq!(s["state"], "kek-enrolled");
    assert_eq!(s["device"]["tokens"][0]["role"], "kek");
    assert_eq!(s["device"]["tokens"][0]["pcrs"], serde_json::json!([7]));
    // And cryptfs carries on from systemd's enrollment to the end.
    rig.run_stage("initramfs");
    rig.run_stage("userspace");
    assert_eq!(rig.status()["state"], "header-backed-up");
    assert_eq!(rig.files_inside(), rig.files);
    systemd_tpm2_plugin_unlocks(&rig).expect("systemd still unlocks it");
}

#[test]
fn systemd_pkcs11_plugin_and_cryptsetup_unlock_what_cryptfs_enrolls() {
    let mut rig = Rig::new(Image::Plain, 128);
    let hsm = SoftHsm::new(rig.dir.path());
    rig.use_pkcs11(&hsm, 0);
    rig.run_stage("all");
    systemd_pkcs11_plugin_unlocks(&rig, &hsm).expect("systemd's pkcs11 plugin unlocks");
    let mut child = Command::new("cryptsetup")
        .args(["open", "--test-passphrase", "--token-only"])
        .arg(&rig.device)
        .env("SOFTHSM2_CONF", &hsm.conf)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("cryptsetup");
    use std::io::Write;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(USER_PIN.as_bytes())
        .expect("pin");
    let out = child.wait_with_output().expect("wait");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn cryptfs_unlocks_what_systemd_cryptenroll_enrolls_with_pkcs11() {
    let mut rig = Rig::new(Image::Ci, 128);
    let hsm = SoftHsm::new(rig.dir.path());
    rig.use_pkcs11(&hsm, 0);
    let config = rig.config();
    hsm.with(|| {
        cryptfs::kek::pkcs11::Pkcs11Protector::new(config.kek.pkcs11.as_ref().expect("p11"))
            .expect("protector")
            .provision()
            .expect("token, key and certificate")
    });
    let conf = hsm.conf.display().to_string();
    cryptenroll(
        &rig,
        &["--pkcs11-token-uri=pkcs11:token=lmp"],
        &[("PIN", USER_PIN), ("SOFTHSM2_CONF", &conf)],
    );
    let out = rig.cryptfs(&["unlock", "--test"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("(systemd-pkcs11) opened keyslot"));
    let s = rig.status();
    assert_eq!(s["state"], "kek-enrolled");
    assert_eq!(s["device"]["tokens"][0]["type"], "systemd-pkcs11");
    assert_eq!(s["device"]["tokens"][0]["role"], "kek");
}

/// Adds a passphrase keyslot with the cryptsetup CLI (cheap PBKDF2), opened by the image's.
fn cryptsetup_add_passphrase(rig: &Rig, slot: u32, passphrase: &str) {
    let old = rig.dir.path().join("old-key");
    let new = rig.dir.path().join("new-key");
    std::fs::write(&old, CI_PASSPHRASE).expect("old key");
    std::fs::write(&new, passphrase).expect("new key");
    let device = rig.device.display().to_string();
    common::run(
        "cryptsetup",
        &[
            "luksAddKey",
            "--batch-mode",
            "--key-file",
            &old.display().to_string(),
            "--key-slot",
            &slot.to_string(),
            "--pbkdf",
            "pbkdf2",
            "--pbkdf-force-iterations",
            "1000",
            &device,
            &new.display().to_string(),
        ],
    );
    std::fs::remove_file(&old).expect("rm");
    std::fs::remove_file(&new).expect("rm");
}

fn opens(rig: &Rig, slot: u32, passphrase: &str) -> bool {
    let p = cryptfs::secret::Passphrase::new(passphrase.as_bytes().to_vec());
    cryptfs::luks::device::test_passphrase(&rig.device, Some(slot), &p).is_ok()
}

/// Foreign tokens with real keyslots: a real `systemd-cryptenroll --tpm2-with-pin` enrollment
/// and a cryptsetup-added keyslot that a FIDO2 token names. cryptfs cannot use them, keeps them
/// through the passphrase wipe, warns and journals before the volume-key change that the change
/// destroys their keyslots (the image's key is replaced: design/README.md, known limits), and
/// afterwards the tokens are still there, naming no keyslot, and status shows exactly that.
#[test]
fn tokens_cryptfs_cannot_use_are_reported_and_never_deleted() {
    let rig = Rig::new(Image::Ci, 128);
    cryptenroll(
        &rig,
        &[
            &format!("--tpm2-device=swtpm:port={}", rig.tpm.port),
            "--tpm2-pcrs=7",
            "--tpm2-with-pin=yes",
        ],
        &[("NEWPIN", "24680")],
    );
    const RECOVERY: &str = "a recovery passphrase of the user's";
    const FIDO2_SLOT: u32 = 5;
    cryptsetup_add_passphrase(&rig, FIDO2_SLOT, RECOVERY);
    let fido2 = serde_json::json!({"type":"systemd-fido2","keyslots":[FIDO2_SLOT.to_string()],
        "fido2-credential":"AAAA","fido2-salt":"AAAA","fido2-rp":"io.systemd.cryptsetup",
        "fido2-clientPin-required":true,"fido2-up-required":true,"fido2-uv-required":false});
    let unbound = serde_json::json!({"type":"systemd-tpm2","keyslots":[],"tpm2-blob":"AAAA",
        "tpm2-pcrs":[7],"tpm2-pcr-bank":"sha256","tpm2-primary-alg":"ecc","tpm2-policy-hash":"00",
        "tpm2-pin":false,"tpm2_srk":"AAAA"});
    for token in [&fido2, &unbound] {
        cryptfs::luks::device::add_token(&rig.device, token).expect("add foreign token");
    }
    let meta = common::luks2(&rig.device);
    let (pin_token, pin_slot) = meta
        .tokens
        .iter()
        .find(|(_, t)| t.json["tpm2-pin"] == true)
        .map(|(id, t)| (*id, t.keyslots[0]))
        .expect("systemd-cryptenroll's TPM2+PIN token with its keyslot");
    let foreign_slots = [pin_slot, FIDO2_SLOT];
    let foreign_tokens: Vec<u32> = meta.tokens.keys().copied().collect();
    assert!(
        opens(&rig, FIDO2_SLOT, RECOVERY),
        "the added keyslot unlocks at first"
    );
    assert_eq!(foreign_tokens.len(), 3);
    let s = rig.status();
    let roles: Vec<&str> = s["device"]["tokens"]
        .as_array()
        .expect("tokens")
        .iter()
        .map(|t| t["role"].as_str().expect("role"))
        .collect();
    assert_eq!(roles, ["other"; 3], "{s}");
    let human = String::from_utf8_lossy(&rig.cryptfs(&["status"]).stdout).into_owned();
    assert!(
        human.contains("not usable by this device's protector; kept"),
        "{human}"
    );

    // The initramfs stage: KEK enrolled, passphrase wiped, re-encryption set up. The foreign
    // keyslots survive the wipe (tokens name them); the loss to come is said before the step.
    let out = rig.run_stage("initramfs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let warning = format!(
        "replacing the volume key destroys keyslot {pin_slot} (used by token {pin_token} \
         (systemd-tpm2)), keyslot {FIDO2_SLOT} (used by token"
    );
    assert!(
        stderr.contains(&warning),
        "no warning {warning:?} in:\n{stderr}"
    );
    let meta = common::luks2(&rig.device);
    for slot in foreign_slots {
        assert!(
            meta.keyslots.contains_key(&slot),
            "keyslot {slot} kept by the wipe"
        );
    }
    // Kept, yet it no longer unlocks: while a re-encryption is in flight, activation needs
    // both volume keys from one passphrase (the cryptsetup CLI behaves the same).
    assert!(
        !opens(&rig, FIDO2_SLOT, RECOVERY),
        "unlocks mid-re-encryption"
    );
    let s = rig.status();
    assert_eq!(s["state"], "reencrypting");
    let note = s["journal"]["records"]
        .as_array()
        .expect("records")
        .iter()
        .find_map(|r| r["details"].get("keyslots_lost_at_reencryption").cloned())
        .expect("journal note before init-reencrypt");
    assert_eq!(note, serde_json::json!(foreign_slots), "{note}");

    // After the volume-key change: the old key's keyslots are gone, the tokens are not.
    rig.run_stage("userspace");
    let meta = common::luks2(&rig.device);
    assert_eq!(rig.status()["state"], "header-backed-up");
    for slot in foreign_slots {
        assert!(
            !meta.keyslots.contains_key(&slot),
            "keyslot {slot} survived: {:?}",
            meta.keyslots
        );
    }
    assert!(!opens(&rig, FIDO2_SLOT, RECOVERY));
    assert!(common::volume_key_with(&rig.device, RECOVERY).is_none());
    for id in &foreign_tokens {
        let token = meta
            .tokens
            .get(id)
            .unwrap_or_else(|| panic!("token {id} deleted"));
        assert!(
            token.keyslots.is_empty(),
            "token {id}: {:?}",
            token.keyslots
        );
    }
    let s = rig.status();
    let reported: Vec<(String, serde_json::Value)> = s["device"]["tokens"]
        .as_array()
        .expect("tokens")
        .iter()
        .filter(|t| t["role"] == "other")
        .map(|t| {
            (
                t["type"].as_str().expect("type").to_string(),
                t["keyslots"].clone(),
            )
        })
        .collect();
    assert_eq!(reported.len(), 3, "{s}");
    assert!(
        reported
            .iter()
            .all(|(_, slots)| *slots == serde_json::json!([])),
        "status reports the tokens as naming no keyslot: {reported:?}"
    );
    // The device's own KEK still opens it.
    let unlock = rig.cryptfs(&["unlock", "--test"]);
    assert!(
        unlock.status.success(),
        "{}",
        String::from_utf8_lossy(&unlock.stderr)
    );
    assert_eq!(rig.files_inside(), rig.files);
}

/// A volume with two `systemd-tpm2` tokens, as a reseal leaves it for a moment and
/// `reseal --prepare` leaves it until the firmware update: the first token is sealed to a PCR 7
/// value the machine no longer has, the second to today's. cryptfs tries every usable token, so
/// the unlock succeeds with the second; when neither matches, the error names each refusal.
#[test]
fn unlock_tries_every_usable_token_and_names_each_refusal() {
    let rig = Rig::new(Image::Ci, 128);
    let tpm2 = [
        format!("--tpm2-device=swtpm:port={}", rig.tpm.port),
        "--tpm2-pcrs=7".to_string(),
    ];
    let tpm2: Vec<&str> = tpm2.iter().map(String::as_str).collect();
    rig.tpm.extend_pcr7();
    cryptenroll(&rig, &tpm2, &[]);
    rig.tpm.extend_pcr7();
    cryptenroll(&rig, &tpm2, &[]);
    let meta = common::luks2(&rig.device);
    let tpm2_tokens: Vec<u32> = meta
        .tokens
        .iter()
        .filter(|(_, t)| t.kind == "systemd-tpm2")
        .map(|(id, _)| *id)
        .collect();
    assert_eq!(tpm2_tokens.len(), 2, "two systemd-tpm2 tokens enrolled");
    let (stale, current) = (tpm2_tokens[0], tpm2_tokens[1]);

    let out = rig.cryptfs(&["unlock", "--test"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "unlock with the second token: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!("token {current} (systemd-tpm2)")),
        "the token sealed to today's PCR 7 opened it: {stdout}"
    );

    rig.tpm.extend_pcr7();
    let out = rig.cryptfs(&["unlock", "--test"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "no token matches a third PCR 7");
    let named: Vec<u32> = [stale, current]
        .into_iter()
        .filter(|id| stderr.contains(&format!("token {id} (keyslot")))
        .collect();
    assert_eq!(named, [stale, current], "each refusal is named: {stderr}");
    assert!(
        stderr.contains("none of the 2 systemd-tpm2 tokens"),
        "{stderr}"
    );
}
