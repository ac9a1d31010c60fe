//! Two-way compatibility with systemd 252's own tooling, both token kinds, on real peers:
//! systemd's libcryptsetup token plugins and `systemd-cryptenroll`.

mod common;

use std::ffi::CString;
use std::os::raw::c_char;
use std::process::Command;

use common::{Image, Rig, SoftHsm, CI_PASSPHRASE, USER_PIN};
use libcryptsetup_rs::consts::flags::CryptActivate;
use libcryptsetup_rs::consts::vals::EncryptionFormat;
use libcryptsetup_rs::CryptInit;

/// systemd 252's `struct systemd_tpm2_plugin_params` (src/cryptsetup/cryptsetup-tokens).
#[repr(C)]
struct Tpm2PluginParams {
    search_pcr_mask: u32,
    device: *const c_char,
    signature_path: *const c_char,
}

/// Unlocks (test only, no activation) through systemd's own token plugin.
fn systemd_tpm2_plugin_unlocks(rig: &Rig) -> Result<u32, String> {
    let device = CString::new(format!("swtpm:port={}", rig.tpm.port)).expect("cstring");
    let mut params = Tpm2PluginParams {
        search_pcr_mask: u32::MAX,
        device: device.as_ptr(),
        signature_path: std::ptr::null(),
    };
    let mut cd = CryptInit::init(&rig.device).map_err(|e| e.to_string())?;
    cd.context_handle()
        .load::<()>(Some(EncryptionFormat::Luks2), None)
        .map_err(|e| e.to_string())?;
    // No PIN: systemd's plugin must get NULL (it checks `memchr(pin, 0, pin_size - 1)`).
    let token = common::luks2(&rig.device)
        .tokens
        .iter()
        .find(|(_, t)| t.kind == "systemd-tpm2")
        .map(|(id, _)| *id)
        .ok_or("no systemd-tpm2 token")?;
    cd.token_handle()
        .activate_by_token(None, Some(token), Some(&mut params), CryptActivate::empty())
        .map_err(|e| e.to_string())
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

#[test]
fn tokens_cryptfs_cannot_use_are_reported_and_never_deleted() {
    let rig = Rig::new(Image::Ci, 128);
    let foreign = [
        serde_json::json!({"type":"systemd-tpm2","keyslots":[],"tpm2-blob":"AAAA","tpm2-pcrs":[7],
            "tpm2-pcr-bank":"sha256","tpm2-primary-alg":"ecc","tpm2-policy-hash":"00","tpm2-pin":true}),
        serde_json::json!({"type":"systemd-tpm2","keyslots":[],"tpm2-blob":"AAAA","tpm2-pcrs":[7],
            "tpm2-pcr-bank":"sha256","tpm2-primary-alg":"ecc","tpm2-policy-hash":"00","tpm2-pin":false,
            "tpm2_srk":"AAAA"}),
        serde_json::json!({"type":"systemd-fido2","keyslots":[],"fido2-credential":"AAAA",
            "fido2-salt":"AAAA","fido2-rp":"io.systemd.cryptsetup","fido2-clientPin-required":true,
            "fido2-up-required":true,"fido2-uv-required":false}),
    ];
    for token in &foreign {
        cryptfs::luks::device::add_token(&rig.device, token).expect("add foreign token");
    }
    let s = rig.status();
    let roles: Vec<(String, String)> = s["device"]["tokens"]
        .as_array()
        .expect("tokens")
        .iter()
        .map(|t| {
            (
                t["type"].as_str().expect("t").into(),
                t["role"].as_str().expect("r").into(),
            )
        })
        .collect();
    assert_eq!(roles.len(), 3);
    assert!(roles.iter().all(|(_, role)| role == "other"), "{roles:?}");
    let human = String::from_utf8_lossy(&rig.cryptfs(&["status"]).stdout).into_owned();
    assert!(
        human.contains("not usable by this device's protector; kept"),
        "{human}"
    );

    rig.run_stage("initramfs");
    rig.run_stage("userspace");
    let meta = common::luks2(&rig.device);
    for token in &foreign {
        assert!(
            meta.tokens.values().any(|t| t.json == *token),
            "foreign token kept: {token}"
        );
    }
    let s = rig.status();
    assert_eq!(s["state"], "header-backed-up");
}
