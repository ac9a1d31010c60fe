//! A damaged LUKS2 header: one bad copy is repaired from the other by libcryptsetup (whatever
//! changed since the backup survives); `luks.bin` is restored only when both copies are bad,
//! and only after its digest matches the journal.

mod common;

use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{file_blake3, run, Image, Rig};

/// Keyslot of the recovery key enrolled after provisioning.
const RECOVERY_SLOT: &str = "7";
/// Offset of the checksum in a header copy; the magic stays, so the copy is recognisably LUKS2.
const CHECKSUM: u64 = 448;

fn scribble(path: &Path, offset: u64, len: usize) {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open");
    f.seek(SeekFrom::Start(offset)).expect("seek");
    f.write_all(&vec![0xFFu8; len]).expect("write");
    f.sync_all().expect("sync");
}

/// Enrolls a recovery key after provisioning, as `systemd-cryptenroll --recovery-key` leaves
/// it: a keyslot added with the volume key (`cryptsetup luksAddKey --volume-key-file`) and a
/// `systemd-recovery` token naming it (cryptfs keeps tokens it does not use). Returns the key
/// file.
fn enroll_recovery_key(rig: &Rig) -> PathBuf {
    let unlocked = cryptfs::unlock::with_token(&rig.config(), true).expect("unlock with the KEK");
    let vk = rig.dir.path().join("volume-key");
    std::fs::write(&vk, unlocked.volume_key.as_slice()).expect("volume key file");
    let key = rig.dir.path().join("recovery-key");
    std::fs::write(&key, "recovery-after-provisioning").expect("key file");
    let img = rig.device.display().to_string();
    run(
        "cryptsetup",
        &[
            "luksAddKey",
            "--batch-mode",
            "--volume-key-file",
            &vk.display().to_string(),
            "--pbkdf",
            "pbkdf2",
            "--pbkdf-force-iterations",
            "1000",
            "--key-slot",
            RECOVERY_SLOT,
            &img,
            &key.display().to_string(),
        ],
    );
    std::fs::remove_file(&vk).expect("rm volume key");
    let token = rig.dir.path().join("recovery-token.json");
    std::fs::write(
        &token,
        format!("{{\"type\":\"systemd-recovery\",\"keyslots\":[\"{RECOVERY_SLOT}\"]}}"),
    )
    .expect("token json");
    run(
        "cryptsetup",
        &[
            "token",
            "import",
            "--json-file",
            &token.display().to_string(),
            &img,
        ],
    );
    assert!(
        recovery_key_opens(rig, &key),
        "the recovery key was enrolled"
    );
    key
}

/// The real cryptsetup CLI opens a keyslot with `key` (nothing activated).
fn recovery_key_opens(rig: &Rig, key: &Path) -> bool {
    Command::new("cryptsetup")
        .args(["open", "--test-passphrase", "--key-slot", RECOVERY_SLOT])
        .arg("--key-file")
        .arg(key)
        .arg(&rig.device)
        .output()
        .expect("cryptsetup")
        .status
        .success()
}

fn keyslot_ids(status: &serde_json::Value) -> Vec<u64> {
    status["device"]["keyslots"]
        .as_array()
        .expect("keyslots")
        .iter()
        .map(|k| k["id"].as_u64().expect("id"))
        .collect()
}

/// The `phase` details of the journal's notes about `subject`, oldest first.
fn notes(status: &serde_json::Value, subject: &str) -> Vec<serde_json::Value> {
    status["journal"]["records"]
        .as_array()
        .expect("records")
        .iter()
        .filter(|r| r["step"] == subject)
        .cloned()
        .collect()
}

#[test]
fn one_damaged_copy_is_repaired_from_the_other_and_a_keyslot_added_later_survives() {
    let rig = Rig::new(Image::Plain, 128);
    rig.run_stage("all");
    let key = enroll_recovery_key(&rig);
    let s = rig.status();
    assert_eq!(
        s["state"], "header-backed-up",
        "the recovery token keeps the state"
    );
    assert!(keyslot_ids(&s).contains(&7));
    let backup = rig.boot.join("luks.bin");
    let backup_digest = file_blake3(&backup);
    let hdr_size = common::luks2(&rig.device).hdr_size;

    let mut repaired = 0;
    for (damaged, offset, copies, valid) in [
        ("primary", CHECKSUM, [false, true], "secondary"),
        ("secondary", hdr_size + CHECKSUM, [true, false], "primary"),
    ] {
        scribble(&rig.device, offset, 64);
        assert_eq!(
            rig.status()["device"]["header_copies_ok"],
            serde_json::json!(copies),
            "{damaged} copy damaged"
        );
        let out = rig.run_stage("all");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&format!(
                "the {damaged} LUKS2 header copy of {} is damaged; repairing it from the valid \
                 {valid} copy",
                rig.device.display()
            )),
            "{err}"
        );
        assert!(
            !err.contains("restoring"),
            "luks.bin is not involved: {err}"
        );
        let s = rig.status();
        assert_eq!(
            s["device"]["header_copies_ok"],
            serde_json::json!([true, true])
        );
        assert_eq!(s["state"], "header-backed-up");
        assert!(keyslot_ids(&s).contains(&7), "{damaged}: keyslot 7 kept");
        assert!(
            recovery_key_opens(&rig, &key),
            "{damaged}: the recovery key still opens"
        );
        let repair = notes(&s, "repair-header");
        let last = repair.last().expect("repair journaled");
        assert_eq!(last["details"]["phase"], "done");
        assert_eq!(last["details"]["damaged_copy"], damaged);
        assert_eq!(repair[repair.len() - 2]["details"]["phase"], "intent");
        assert!(notes(&s, "restore-header").is_empty());
        repaired += 1;
    }
    assert_eq!(repaired, 2);
    assert_eq!(file_blake3(&backup), backup_digest, "luks.bin untouched");
    assert_eq!(rig.files_inside(), rig.files);
}

#[test]
fn both_damaged_copies_are_restored_only_from_a_backup_the_journal_vouches_for() {
    let rig = Rig::new(Image::Plain, 128);
    rig.run_stage("all");
    let key = enroll_recovery_key(&rig);
    let hdr_size = common::luks2(&rig.device).hdr_size;
    scribble(&rig.device, CHECKSUM, 64);
    scribble(&rig.device, hdr_size + CHECKSUM, 64);
    let backup = rig.boot.join("luks.bin");
    let kept = rig.dir.path().join("luks.bin.good");
    std::fs::copy(&backup, &kept).expect("copy backup");

    // What `status` says `run` will do, in each case.
    let s = rig.status();
    assert_eq!(s["device"]["type"], "luks2-damaged");
    let said = s["error"].as_str().expect("error").to_string();
    assert!(
        said.contains(&format!(
            "`cryptfs run` restores it from {}",
            backup.display()
        )) && said.contains("digest ok")
            && said.contains("added after that backup was taken are lost"),
        "{said}"
    );
    std::fs::remove_file(&backup).expect("rm");
    let said = rig.status()["error"].as_str().expect("error").to_string();
    assert!(said.contains("there is no header backup at"), "{said}");

    // A tampered backup is refused and nothing is written to the device.
    std::fs::copy(&kept, &backup).expect("put back");
    scribble(&backup, 20_000, 16);
    let said = rig.status()["error"].as_str().expect("error").to_string();
    assert!(said.contains("refusing to restore the backup"), "{said}");
    let before = file_blake3(&rig.device);
    let out = rig.cryptfs(&["run", "--stage", "all"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("does not match the digest in the journal"),
        "{err}"
    );
    assert_eq!(file_blake3(&rig.device), before, "nothing restored");
    assert_eq!(rig.status()["header_backup"]["digest_ok"], false);

    // The verified backup is restored; what was enrolled after it is lost, and said so.
    std::fs::copy(&kept, &backup).expect("put back");
    let out = rig.run_stage("all");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("restoring the verified backup")
            && err.contains("keyslots and tokens added after it was taken are lost"),
        "{err}"
    );
    let s = rig.status();
    assert_eq!(
        s["device"]["header_copies_ok"],
        serde_json::json!([true, true])
    );
    assert_eq!(s["state"], "header-backed-up");
    assert!(
        !keyslot_ids(&s).contains(&7),
        "keyslot 7 came after the backup"
    );
    assert!(!recovery_key_opens(&rig, &key), "the recovery key is gone");
    let restore = notes(&s, "restore-header");
    assert_eq!(restore.len(), 2, "intent and done");
    assert_eq!(restore[0]["details"]["phase"], "intent");
    assert_eq!(restore[1]["details"]["phase"], "done");
    assert_eq!(
        restore[1]["details"]["lost"],
        "keyslots and tokens added after the backup was taken"
    );
    assert!(notes(&s, "repair-header").is_empty());
    assert_eq!(rig.files_inside(), rig.files);
}
