//! The whole provisioning path on real LUKS2 images, a real swtpm and real redb journals.

mod common;

use std::process::Output;

use common::{luks2, volume_key_with, Image, Rig, CI_PASSPHRASE};
use cryptfs::kek;
use cryptfs::probe::{self, Content};
use cryptfs::token_unlock::usable_tokens;

/// Unseals the KEK of the rig's volume with the rig's swtpm: (raw secret, base64 passphrase).
fn kek_secret(rig: &Rig) -> (Vec<u8>, Vec<u8>) {
    let config = rig.config();
    let mut protector = kek::from_config(&config).expect("protector");
    let meta = match probe::probe(&config.device).expect("probe").content {
        Content::Luks2(m) => m,
        other => panic!("not LUKS2: {other:?}"),
    };
    let token = usable_tokens(protector.as_ref(), &meta);
    let secret = protector
        .unseal(&token.first().expect("usable token").sealed)
        .expect("the token unseals with the same swtpm");
    (
        secret.expose().to_vec(),
        secret.keyslot_passphrase().expose().to_vec(),
    )
}

/// Nothing cryptfs wrote may contain the KEK secret, raw or as its base64 passphrase.
fn assert_no_secret(rig: &Rig, outputs: &[Output]) {
    let (raw, b64) = kek_secret(rig);
    assert_eq!(raw.len(), 32);
    assert_eq!(b64.len(), 44);
    common::assert_nothing_written_contains(rig, &[&raw, &b64, CI_PASSPHRASE.as_bytes()], outputs);
}

#[test]
fn plain_ext4_image_is_encrypted_in_place_and_backed_up() {
    let rig = Rig::new(Image::Plain, 160);
    let fs_before = cryptfs::ext4::read_superblock(&rig.device)
        .expect("read")
        .expect("ext4");
    let out = rig.run_stage("all");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("encrypt-in-place: 100%"),
        "progress shown: {stderr}"
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("state header-backed-up"));

    let status = rig.status();
    assert_eq!(status["state"], "header-backed-up");
    assert_eq!(status["device"]["type"], "luks2");
    assert_eq!(status["device"]["label"], "otaroot");
    let slots = status["device"]["keyslots"].as_array().expect("keyslots");
    assert_eq!(slots.len(), 1, "only the token keyslot remains: {slots:?}");
    assert_eq!(slots[0]["kind"], "token");
    assert_eq!(slots[0]["kdf"], "pbkdf2");
    assert_eq!(status["device"]["tokens"][0]["type"], "systemd-tpm2");
    assert_eq!(
        status["device"]["tokens"][0]["pcrs"],
        serde_json::json!([7])
    );
    assert_eq!(status["header_backup"]["digest_ok"], true);
    assert_eq!(status["journal"]["chain_ok"], true);

    // The data survived: decrypted in userspace with the token's key, fsck-clean, same files.
    assert_eq!(rig.files_inside(), rig.files);
    let meta = luks2(&rig.device);
    assert_eq!(meta.data_offset, Some(16 << 20));
    let token = &meta.tokens[&0].json;
    for field in [
        "tpm2-blob",
        "tpm2-policy-hash",
        "tpm2-pcr-bank",
        "tpm2-primary-alg",
    ] {
        assert!(token.get(field).is_some(), "token has {field}: {token}");
    }
    assert_eq!(token["tpm2-pin"], false);
    // The filesystem identity is kept (root=UUID= keeps working once unlocked).
    let plain = rig.dir.path().join("p.img");
    assert!(rig
        .cryptfs(&["export-plaintext", "--out", &plain.display().to_string()])
        .status
        .success());
    let fs_after = cryptfs::ext4::read_superblock(&plain)
        .expect("read")
        .expect("ext4");
    assert_eq!(fs_after.uuid, fs_before.uuid);
    assert_eq!(fs_after.label, "otaroot");

    // A second run has nothing to do and changes nothing.
    let digest = common::file_blake3(&rig.device);
    let again = rig.run_stage("all");
    assert_eq!(common::file_blake3(&rig.device), digest);
    assert_no_secret(&rig, &[out, again]);
}

#[test]
fn ci_image_is_taken_over_reencrypted_and_backed_up() {
    let rig = Rig::new(Image::Ci, 160);
    let image_key = volume_key_with(&rig.device, CI_PASSPHRASE).expect("CI passphrase opens");
    let before = rig.dir.path().join("before.img");
    let meta = luks2(&rig.device);
    cryptfs::plaintext::export(&rig.device, &meta, &image_key, &before).expect("decrypt before");

    let initramfs = rig.run_stage("initramfs");
    let status = rig.status();
    assert_eq!(status["state"], "reencrypting");
    assert_eq!(status["next_by_stage"]["initramfs"]["action"], "done");
    assert_eq!(status["next_by_stage"]["userspace"]["step"], "reencrypt");
    assert!(
        volume_key_with(&rig.device, CI_PASSPHRASE).is_none(),
        "passphrase wiped"
    );

    let userspace = rig.run_stage("userspace");
    let status = rig.status();
    assert_eq!(status["state"], "header-backed-up");
    assert_eq!(
        status["device"]["keyslots"]
            .as_array()
            .expect("slots")
            .len(),
        1
    );
    assert_eq!(status["device"]["reencrypt"]["status"], "none");

    // The volume key changed, the passphrase opens nothing, the data is byte-identical.
    let (_, b64) = kek_secret(&rig);
    let new_key =
        volume_key_with(&rig.device, std::str::from_utf8(&b64).expect("b64")).expect("token key");
    assert_ne!(new_key, image_key);
    assert!(volume_key_with(&rig.device, CI_PASSPHRASE).is_none());
    let after = rig.dir.path().join("after.img");
    let meta = luks2(&rig.device);
    cryptfs::plaintext::export(&rig.device, &meta, &new_key, &after).expect("decrypt after");
    assert_eq!(common::file_blake3(&before), common::file_blake3(&after));
    assert_eq!(rig.files_inside(), rig.files);

    // The journal tells the story in order.
    assert_eq!(common::done_steps(&status), common::CI_TAKEOVER_STEPS);
    assert_no_secret(&rig, &[initramfs, userspace]);
}

#[test]
fn token_stops_unsealing_after_pcr7_changes() {
    let rig = Rig::new(Image::Plain, 128);
    rig.run_stage("all");
    rig.tpm.extend_pcr7();
    let digest = common::file_blake3(&rig.device);
    let plain = rig.dir.path().join("p.img");
    let out = rig.cryptfs(&["export-plaintext", "--out", &plain.display().to_string()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("PCR 7"), "error names PCR 7: {err}");
    assert_eq!(common::file_blake3(&rig.device), digest, "nothing written");
}
