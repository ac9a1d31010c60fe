//! Crash at every step boundary (test-only failpoints abort the process like a power cut),
//! then boot again: cryptfs must finish with every file intact, no passphrase keyslot and a
//! journal that shows the interrupted intent and the resume. Also `status --json` at every
//! state along the way.

mod common;

use common::{cryptfs_with, Image, Rig, CI_PASSPHRASE};
use serde_json::Value;

fn run_as(rig: &Rig, stage: &str, boot: &str, failpoint: Option<&str>) -> std::process::Output {
    let mut env = vec![("CRYPTFS_BOOT_ID", boot)];
    if let Some(fp) = failpoint {
        env.push(("CRYPTFS_FAILPOINT", fp));
    }
    cryptfs_with(&["run", "--stage", stage], &rig.config, &env)
}

fn records(status: &Value) -> Vec<Value> {
    status["journal"]["records"]
        .as_array()
        .expect("records")
        .clone()
}

/// Boots: first with `failpoint` armed in `stage_of_failpoint`, then a clean second boot.
fn crash_and_recover(image: Image, failpoint: &str, stage_of_failpoint: &str) {
    let rig = Rig::new(image, 128);
    let step = failpoint.split(':').next().expect("step");
    let stages: &[&str] = &["initramfs", "userspace"];
    for stage in stages {
        let armed = (*stage == stage_of_failpoint).then_some(failpoint);
        let out = run_as(&rig, stage, "boot-1", armed);
        if armed.is_some() {
            assert!(
                !out.status.success(),
                "{failpoint}: the crash must stop the run"
            );
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                err.contains(&format!("failpoint {failpoint} hit")),
                "{failpoint}: {err}"
            );
            break;
        }
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let interrupted = rig.status();
    for stage in stages {
        let out = run_as(&rig, stage, "boot-2", None);
        assert!(
            out.status.success(),
            "{failpoint}: boot 2 {stage} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let status = rig.status();
    assert_eq!(
        status["state"], "header-backed-up",
        "{failpoint}: {status:#}"
    );
    assert_eq!(status["journal"]["chain_ok"], true);
    let kinds: Vec<&str> = status["device"]["keyslots"]
        .as_array()
        .expect("slots")
        .iter()
        .map(|k| k["kind"].as_str().expect("kind"))
        .collect();
    assert_eq!(
        kinds,
        ["token"],
        "{failpoint}: only the token keyslot remains"
    );
    assert!(common::volume_key_with(&rig.device, CI_PASSPHRASE).is_none());
    assert_eq!(rig.files_inside(), rig.files, "{failpoint}: files intact");

    // The journal shows the interrupted step's intent in boot 1 and its completion in boot 2.
    let recs = records(&status);
    let intent_at = recs
        .iter()
        .position(|r| r["step"] == step && r["phase"] == "intent" && r["boot_id"] == "boot-1")
        .unwrap_or_else(|| panic!("{failpoint}: no boot-1 intent of {step}"));
    assert!(
        !recs[intent_at..]
            .iter()
            .any(|r| r["step"] == step && r["phase"] == "done" && r["boot_id"] == "boot-1"),
        "{failpoint}: the step did not finish in boot 1"
    );
    assert!(
        recs[intent_at..]
            .iter()
            .any(|r| r["step"] == step && r["phase"] == "done" && r["boot_id"] == "boot-2"),
        "{failpoint}: the step finished in boot 2"
    );
    assert_eq!(
        records(&interrupted).len(),
        intent_at + 1 + count_after(&records(&interrupted), intent_at)
    );
}

fn count_after(recs: &[Value], at: usize) -> usize {
    recs.len() - at - 1
}

#[test]
fn plain_image_survives_a_crash_at_every_step_boundary() {
    for fp in [
        "encrypt-in-place:after-intent",
        "encrypt-in-place:after-shrink",
        "encrypt-in-place:after-prepare",
        "encrypt-in-place:after-header",
        "encrypt-in-place:mid",
    ] {
        crash_and_recover(Image::Plain, fp, "initramfs");
    }
    crash_and_recover(Image::Plain, "backup-header:after-temp", "userspace");
}

#[test]
fn ci_image_survives_a_crash_at_every_step_boundary() {
    for fp in [
        "enroll-kek:after-intent",
        "enroll-kek:after-keyslot",
        "wipe-passphrase:after-intent",
        "init-reencrypt:after-intent",
        "init-reencrypt:after-init",
    ] {
        crash_and_recover(Image::Ci, fp, "initramfs");
    }
    for fp in ["reencrypt:mid", "backup-header:after-temp"] {
        crash_and_recover(Image::Ci, fp, "userspace");
    }
}

#[test]
fn unfinished_reencryption_from_an_earlier_boot_is_finished_in_the_initramfs() {
    let rig = Rig::new(Image::Ci, 128);
    assert!(run_as(&rig, "initramfs", "boot-1", None).status.success());
    let out = run_as(&rig, "userspace", "boot-1", Some("reencrypt:mid"));
    assert!(!out.status.success());
    let status = rig.status();
    assert_eq!(status["state"], "reencrypting");
    assert_eq!(status["next_by_stage"]["initramfs"]["step"], "reencrypt");
    let out = run_as(&rig, "initramfs", "boot-2", None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("finished in the initramfs (blocking)"),
        "{err}"
    );
    assert!(
        err.contains("interrupted; recovering the hotzone first") || err.contains("resuming"),
        "{err}"
    );
    assert_eq!(rig.status()["state"], "complete");
    assert!(run_as(&rig, "userspace", "boot-2", None).status.success());
    assert_eq!(rig.status()["state"], "header-backed-up");
    assert_eq!(rig.files_inside(), rig.files);
}

#[test]
fn status_json_reports_every_state() {
    let plain = Rig::new(Image::Plain, 128);
    let s = plain.status();
    assert_eq!(s["state"], "unencrypted");
    assert_eq!(s["device"]["type"], "ext4");
    assert_eq!(s["device"]["label"], "otaroot");
    assert_eq!(s["next"]["step"], "encrypt-in-place");
    assert_eq!(s["header_backup"]["present"], false);

    let ci = Rig::new(Image::Ci, 128);
    let s = ci.status();
    assert_eq!(s["state"], "encrypted-with-passphrase");
    assert_eq!(s["device"]["keyslots"][0]["id"], 31);
    assert_eq!(s["device"]["keyslots"][0]["kind"], "passphrase");
    assert_eq!(s["next"]["step"], "enroll-kek");

    assert!(!run_as(
        &ci,
        "initramfs",
        "boot-1",
        Some("wipe-passphrase:after-intent")
    )
    .status
    .success());
    let s = ci.status();
    assert_eq!(s["state"], "kek-enrolled");
    assert_eq!(s["next"]["step"], "wipe-passphrase");
    assert_eq!(s["device"]["tokens"][0]["type"], "systemd-tpm2");
    assert_eq!(s["device"]["tokens"][0]["role"], "kek");

    assert!(run_as(&ci, "initramfs", "boot-2", None).status.success());
    let s = ci.status();
    assert_eq!(s["state"], "reencrypting");
    assert_eq!(s["device"]["reencrypt"]["status"], "in-progress");
    assert_eq!(s["device"]["reencrypt"]["mode"], "reencrypt");

    assert!(!run_as(&ci, "userspace", "boot-2", Some("reencrypt:mid"))
        .status
        .success());
    let s = ci.status();
    assert_eq!(s["state"], "reencrypting");
    let progress = &s["device"]["reencrypt"]["progress"];
    assert!(
        progress["done_bytes"].as_u64().expect("done") > 0,
        "{progress}"
    );
    assert!(progress["percent"].as_u64().expect("percent") < 100);

    assert!(
        !run_as(&ci, "userspace", "boot-2", Some("backup-header:after-temp"))
            .status
            .success()
    );
    let s = ci.status();
    assert_eq!(s["state"], "complete");
    assert_eq!(s["next"]["step"], "backup-header");

    assert!(run_as(&ci, "userspace", "boot-2", None).status.success());
    let s = ci.status();
    assert_eq!(s["state"], "header-backed-up");
    assert_eq!(s["next"]["action"], "done");
    assert_eq!(s["header_backup"]["digest_ok"], true);
    let human = ci.cryptfs(&["status"]);
    let text = String::from_utf8_lossy(&human.stdout);
    assert!(text.contains("state:      header-backed-up"), "{text}");
    assert!(text.contains("present, digest ok"), "{text}");
}
