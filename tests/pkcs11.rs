//! The PKCS#11 KEK on a real SoftHSM2: provisioning of token, key and certificate, the whole
//! path for both image kinds, and the reference's errors before any write.

mod common;

use common::{file_blake3, volume_key_with, Image, Rig, SoftHsm, CI_PASSPHRASE};

fn pkcs11_rig(image: Image) -> (Rig, SoftHsm) {
    let mut rig = Rig::new(image, 128);
    let hsm = SoftHsm::new(rig.dir.path());
    rig.use_pkcs11(&hsm, 0);
    (rig, hsm)
}

#[test]
fn plain_image_with_a_pkcs11_kek_reaches_header_backed_up() {
    let (rig, hsm) = pkcs11_rig(Image::Plain);
    let out = rig.run_stage("all");
    assert!(String::from_utf8_lossy(&out.stdout).contains("header-backed-up"));
    // The 128-byte secret the token decrypts, and its base64 keyslot passphrase, are nowhere.
    let config = rig.config();
    let secret = hsm.with(|| {
        let mut protector = cryptfs::kek::from_config(&config).expect("protector");
        let meta = common::luks2(&rig.device);
        let tokens = cryptfs::token_unlock::usable_tokens(protector.as_ref(), &meta);
        let secret = protector
            .unseal(&tokens.first().expect("token").sealed)
            .expect("unseal");
        (
            secret.expose().to_vec(),
            secret.keyslot_passphrase().expose().to_vec(),
        )
    });
    assert_eq!(secret.0.len(), 128);
    assert_eq!(secret.1.len(), 172);
    common::assert_nothing_written_contains(
        &rig,
        &[&secret.0, &secret.1],
        std::slice::from_ref(&out),
    );
    let s = rig.status();
    assert_eq!(s["state"], "header-backed-up");
    assert_eq!(s["device"]["tokens"][0]["type"], "systemd-pkcs11");
    assert_eq!(s["device"]["tokens"][0]["role"], "kek");
    assert_eq!(s["device"]["keyslots"].as_array().expect("slots").len(), 1);
    assert_eq!(rig.files_inside(), rig.files);

    // The token as the reference provisions it, seen by pkcs11-tool.
    let objects = hsm.objects();
    assert!(
        objects.contains("Certificate Object; type = X.509 cert"),
        "{objects}"
    );
    assert!(objects.contains("DN: CN=LmP"), "{objects}");
    assert!(objects.contains("never extractable"), "{objects}");
    assert!(objects.contains("RSA 2048 bits"), "{objects}");
    assert_eq!(objects.matches("ID:         9d").count(), 3, "{objects}");
    let meta = common::luks2(&rig.device);
    let token = &meta.tokens[&0].json;
    assert_eq!(token["pkcs11-uri"], "pkcs11:token=lmp;object=luks");
    let key = token["pkcs11-key"].as_str().expect("key");
    use base64::Engine;
    let key = base64::engine::general_purpose::STANDARD
        .decode(key)
        .expect("b64");
    assert_eq!(key.len(), 256, "RSA-2048 PKCS#1 v1.5 ciphertext");

    // Unlock says which keyslot opened; a second run reuses the token and key.
    let unlock = rig.cryptfs(&["unlock", "--test"]);
    assert!(
        unlock.status.success(),
        "{}",
        String::from_utf8_lossy(&unlock.stderr)
    );
    assert!(String::from_utf8_lossy(&unlock.stdout).contains("(systemd-pkcs11) opened keyslot"));
    rig.run_stage("all");
    assert_eq!(
        hsm.objects().matches("ID:         9d").count(),
        3,
        "nothing new on the token"
    );
}

/// The token's keyslot passphrase (base64 of the secret the token decrypts), via the protector.
fn token_passphrase(rig: &Rig, hsm: &SoftHsm) -> String {
    let config = rig.config();
    hsm.with(|| {
        let mut protector = cryptfs::kek::from_config(&config).expect("protector");
        let meta = common::luks2(&rig.device);
        let tokens = cryptfs::token_unlock::usable_tokens(protector.as_ref(), &meta);
        let secret = protector
            .unseal(&tokens.first().expect("token").sealed)
            .expect("unseal");
        String::from_utf8(secret.keyslot_passphrase().expose().to_vec()).expect("base64")
    })
}

/// The whole decrypted data segment of the volume, hashed.
fn plaintext_blake3(rig: &Rig, volume_key: &[u8], name: &str) -> String {
    let out = rig.dir.path().join(name);
    let meta = common::luks2(&rig.device);
    cryptfs::plaintext::export(&rig.device, &meta, volume_key, &out).expect("decrypt");
    let digest = file_blake3(&out);
    std::fs::remove_file(&out).expect("rm");
    digest
}

#[test]
fn ci_image_with_a_pkcs11_kek_is_reencrypted() {
    let (rig, hsm) = pkcs11_rig(Image::Ci);
    let image_key = volume_key_with(&rig.device, CI_PASSPHRASE).expect("key");
    let image_digest = common::luks2(&rig.device)
        .segment_digest()
        .map(String::from)
        .expect("digest");
    let plaintext_before = plaintext_blake3(&rig, &image_key, "before.img");
    rig.run_stage("initramfs");
    assert_eq!(rig.status()["state"], "reencrypting");
    rig.run_stage("userspace");
    let s = rig.status();
    assert_eq!(s["state"], "header-backed-up");
    assert!(volume_key_with(&rig.device, CI_PASSPHRASE).is_none());
    // The volume key the token opens now is a new one: other bytes, another digest.
    let device_key =
        volume_key_with(&rig.device, &token_passphrase(&rig, &hsm)).expect("the token opens it");
    assert_eq!(device_key.len(), image_key.len());
    assert_ne!(device_key, image_key, "the image's volume key was replaced");
    let device_digest = common::luks2(&rig.device)
        .segment_digest()
        .map(String::from)
        .expect("digest");
    assert_ne!(device_digest, image_digest);
    // And every byte of the data segment decrypts, under the new key, to what it was (the host
    // run does not grow the filesystem: no active mapping).
    assert_eq!(
        plaintext_blake3(&rig, &device_key, "after.img"),
        plaintext_before,
        "the plaintext changed across re-encryption"
    );
    assert_eq!(rig.files_inside(), rig.files);
}

fn refuses(rig: &Rig, expected: &str) {
    let before = file_blake3(&rig.device);
    let out = rig.cryptfs(&["run", "--stage", "initramfs"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(expected), "expected {expected:?} in: {err}");
    assert_eq!(file_blake3(&rig.device), before, "device unchanged");
}

#[test]
fn no_token_and_no_slot_to_initialise() {
    let (mut rig, hsm) = pkcs11_rig(Image::Plain);
    rig.use_pkcs11(&hsm, 77);
    refuses(&rig, "no slot with token named \"lmp\" found");
    let (mut ci, hsm) = pkcs11_rig(Image::Ci);
    ci.use_pkcs11(&hsm, 77);
    refuses(&ci, "no slot with token named \"lmp\" found");
}

fn provision(rig: &Rig, hsm: &SoftHsm) {
    let config = rig.config();
    hsm.with(|| {
        let mut p =
            cryptfs::kek::pkcs11::Pkcs11Protector::new(config.kek.pkcs11.as_ref().expect("p11"))
                .expect("protector");
        p.provision().expect("provision");
    });
}

#[test]
fn certificate_missing() {
    let (rig, hsm) = pkcs11_rig(Image::Ci);
    provision(&rig, &hsm);
    let out = std::process::Command::new("pkcs11-tool")
        .env("SOFTHSM2_CONF", &hsm.conf)
        .args([
            "--module",
            common::SOFTHSM_MODULE,
            "--token-label",
            "lmp",
            "--login",
            "--pin",
            common::USER_PIN,
            "--delete-object",
            "--type",
            "cert",
            "--id",
            "9d",
        ])
        .output()
        .expect("pkcs11-tool");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    refuses(&rig, "PKCS#11 certificate not found");
}

#[test]
fn wrong_pin() {
    let (rig, hsm) = pkcs11_rig(Image::Plain);
    provision(&rig, &hsm);
    std::fs::write(&hsm.pin, "9999").expect("pin");
    refuses(&rig, "wrong PIN for PKCS#11 token \"lmp\"");
}

#[test]
fn module_not_loadable() {
    let (rig, _hsm) = pkcs11_rig(Image::Plain);
    let text = std::fs::read_to_string(&rig.config)
        .expect("config")
        .replace(common::SOFTHSM_MODULE, "/nonexistent/libpkcs11.so");
    std::fs::write(&rig.config, text).expect("config");
    refuses(&rig, "cannot be loaded");
}

#[cfg(feature = "failpoints")]
#[test]
fn crash_after_the_encrypted_key_is_journaled_resumes_with_the_same_secret() {
    let (rig, hsm) = pkcs11_rig(Image::Ci);
    for fp in ["enroll-kek:after-intent", "enroll-kek:after-keyslot"] {
        let out = rig.cryptfs_env(
            &["run", "--stage", "initramfs"],
            &[("CRYPTFS_FAILPOINT", fp)],
        );
        assert!(!out.status.success());
        // The journal holds the encrypted key, never the secret.
        let s = rig.status();
        let intent = s["journal"]["records"]
            .as_array()
            .expect("records")
            .iter()
            .find(|r| r["step"] == "enroll-kek" && r["phase"] == "intent")
            .expect("intent")
            .clone();
        assert!(intent["details"]["sealed_kek"]["fields"]["pkcs11-key"].is_string());
    }
    rig.run_stage("initramfs");
    rig.run_stage("userspace");
    let s = rig.status();
    assert_eq!(s["state"], "header-backed-up");
    assert_eq!(
        s["device"]["keyslots"].as_array().expect("slots").len(),
        1,
        "no orphan keyslot"
    );
    assert_eq!(rig.files_inside(), rig.files);
    let _ = hsm;
}

/// SoftHSM2 never locks a PIN by itself; its token file persists the token flags, so the test
/// sets CKF_USER_PIN_LOCKED there and the real module then reports the locked state through
/// C_GetTokenInfo, as a token that locked its PIN does.
fn lock_user_pin(hsm: &SoftHsm) {
    const LOCKED: u64 = 0x0004_0000;
    // SoftHSM2's object file: attribute id (u64), value kind (u64), value (u64), big-endian;
    // CKA_OS_TOKENFLAGS is the vendor attribute 0x8000534B.
    const TOKEN_FLAGS_ATTRIBUTE: [u8; 8] = 0x8000_534B_u64.to_be_bytes();
    let tokens = hsm.conf.parent().expect("dir").join("softhsm-tokens");
    let token_dir = std::fs::read_dir(&tokens)
        .expect("tokens")
        .filter_map(|e| e.ok())
        .find(|e| e.path().join("token.object").exists())
        .expect("token dir")
        .path();
    let path = token_dir.join("token.object");
    let mut bytes = std::fs::read(&path).expect("token.object");
    let at = bytes
        .windows(8)
        .position(|w| w == TOKEN_FLAGS_ATTRIBUTE)
        .expect("token flags attribute in token.object")
        + 16;
    let v = u64::from_be_bytes(bytes[at..at + 8].try_into().expect("8 bytes")) | LOCKED;
    bytes[at..at + 8].copy_from_slice(&v.to_be_bytes());
    std::fs::write(&path, bytes).expect("write");
    let listing = std::process::Command::new("pkcs11-tool")
        .env("SOFTHSM2_CONF", &hsm.conf)
        .args(["--module", common::SOFTHSM_MODULE, "--list-token-slots"])
        .output()
        .expect("pkcs11-tool");
    assert!(
        String::from_utf8_lossy(&listing.stdout).contains("user PIN locked"),
        "the module reports the lock"
    );
}

#[test]
fn locked_pin() {
    let (rig, hsm) = pkcs11_rig(Image::Ci);
    provision(&rig, &hsm);
    lock_user_pin(&hsm);
    refuses(&rig, "PIN of PKCS#11 token \"lmp\" is locked");
}
