//! Crash at every step boundary (test-only failpoints abort the process like a power cut),
//! then boot again: cryptfs must finish with every file intact, no passphrase keyslot and a
//! journal that shows the interrupted intent and the resume. Also `status --json` at every
//! state along the way.
//!
//! "Every" is checked: each crash must really have happened at its failpoint (the process died
//! of the abort, after saying which point it hit), the number of boundaries cut must equal the
//! list, and the lists must name every failpoint the orchestrator's source defines.

mod common;

use std::collections::BTreeSet;
use std::os::unix::process::ExitStatusExt;

use common::{cryptfs_with, Image, Rig, CI_PASSPHRASE};
use serde_json::Value;

/// Failpoints cut on a plain image, with the stage that reaches them.
const PLAIN_BOUNDARIES: &[(&str, &str)] = &[
    ("encrypt-in-place:after-intent", "initramfs"),
    ("encrypt-in-place:after-shrink", "initramfs"),
    ("encrypt-in-place:after-prepare", "initramfs"),
    ("encrypt-in-place:after-header", "initramfs"),
    ("encrypt-in-place:mid", "initramfs"),
    ("backup-header:after-temp", "userspace"),
    ("backup-header:after-rename", "userspace"),
];

/// Failpoints cut on a CI image, with the stage that reaches them.
const CI_BOUNDARIES: &[(&str, &str)] = &[
    ("enroll-kek:after-intent", "initramfs"),
    ("enroll-kek:after-keyslot", "initramfs"),
    ("wipe-passphrase:after-intent", "initramfs"),
    ("init-reencrypt:after-intent", "initramfs"),
    ("init-reencrypt:after-init", "initramfs"),
    ("reencrypt:mid", "userspace"),
    ("backup-header:after-temp", "userspace"),
    ("backup-header:after-rename", "userspace"),
];

/// The process died of the failpoint's abort (SIGABRT, no exit code) after naming it.
fn died_at(out: &std::process::Output, failpoint: &str) -> bool {
    let err = String::from_utf8_lossy(&out.stderr);
    out.status.signal() == Some(libc::SIGABRT)
        && err.contains(&format!("failpoint {failpoint} hit"))
}

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
/// Returns whether boot 1 died at the failpoint (it panics otherwise, so a `true` is counted).
fn crash_and_recover(image: Image, failpoint: &str, stage_of_failpoint: &str) -> bool {
    let rig = Rig::new(image, 128);
    let step = failpoint.split(':').next().expect("step");
    let stages: &[&str] = &["initramfs", "userspace"];
    let mut died = false;
    for stage in stages {
        let armed = (*stage == stage_of_failpoint).then_some(failpoint);
        let out = run_as(&rig, stage, "boot-1", armed);
        if armed.is_some() {
            died = died_at(&out, failpoint);
            assert!(
                died,
                "{failpoint}: boot 1 did not die at the failpoint ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
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
    // The journal left by the crash ends inside the step: its intent is there, its done is not.
    let left = records(&interrupted);
    assert!(
        left.iter()
            .any(|r| r["step"] == step && r["phase"] == "intent" && r["boot_id"] == "boot-1"),
        "{failpoint}: the crashed boot left no intent of {step}"
    );
    assert!(
        !left
            .iter()
            .any(|r| r["step"] == step && r["phase"] == "done" && r["boot_id"] == "boot-1"),
        "{failpoint}: the crashed boot closed {step}"
    );
    died
}

/// Cuts every boundary of `list` and checks that as many crashes happened as the list names.
fn cut_every(image: fn() -> Image, list: &[(&str, &str)]) {
    let fired = list
        .iter()
        .filter(|(fp, stage)| crash_and_recover(image(), fp, stage))
        .count();
    assert_eq!(fired, list.len(), "boundaries cut");
    eprintln!("{fired} of {} boundaries cut and recovered", list.len());
}

/// Every failpoint the orchestrator's source defines (`failpoint::hit("…")`, plus the `:mid`
/// point of each data step), read from the source so a new one cannot go untested.
fn failpoints_in_source() -> BTreeSet<String> {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut found = BTreeSet::new();
    let mut dirs = vec![src];
    while let Some(dir) = dirs.pop() {
        for e in std::fs::read_dir(&dir).expect("read_dir").flatten() {
            let path = e.path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            for part in text.split("failpoint::hit(").skip(1) {
                if let Some(name) = part.strip_prefix('"').and_then(|r| r.split('"').next()) {
                    found.insert(name.to_string());
                } else if part.starts_with("&format!(\"{step}:mid\")") {
                    // One per data step that runs libcryptsetup's reencryption loop.
                    found.insert("encrypt-in-place:mid".into());
                    found.insert("reencrypt:mid".into());
                } else {
                    panic!(
                        "{}: a failpoint this test cannot name: {part:.60}",
                        path.display()
                    );
                }
            }
        }
    }
    found
}

#[test]
fn the_boundary_lists_name_every_failpoint_in_the_source() {
    let in_source = failpoints_in_source();
    let listed: BTreeSet<String> = PLAIN_BOUNDARIES
        .iter()
        .chain(CI_BOUNDARIES)
        .map(|(fp, _)| fp.to_string())
        .chain(common::RECOVERY_BOUNDARIES.iter().map(|fp| fp.to_string()))
        .chain(common::IMAGE_BOUNDARIES.iter().map(|fp| fp.to_string()))
        .chain(common::BUDGET_BOUNDARIES.iter().map(|fp| fp.to_string()))
        .chain(
            common::RESEAL_BOUNDARIES
                .iter()
                .map(|(fp, _)| fp.to_string()),
        )
        .collect();
    assert!(in_source.len() >= 12, "{in_source:?}");
    assert_eq!(listed, in_source, "failpoints listed vs defined");
}

#[test]
fn plain_image_survives_a_crash_at_every_step_boundary() {
    cut_every(|| Image::Plain, PLAIN_BOUNDARIES);
}

#[test]
fn ci_image_survives_a_crash_at_every_step_boundary() {
    cut_every(|| Image::Ci, CI_BOUNDARIES);
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
