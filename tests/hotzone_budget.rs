//! `[reencrypt] max_recovery` and `resilience` on a real CI image with a real swtpm: the
//! volume-key change measures its own rate over its first hotzones, sizes the rest from the
//! budget (journaled as `hotzone-sized`), and a crash after that resumes with the journaled
//! size; `resilience = "journal"` reaches the header's reencrypt keyslot. The sizes asserted
//! hold on any machine this runs on: a 1 s budget needs only 6 MiB/s to grow a 1 MiB hotzone
//! (recovery cost 3: orchestrator/src/steps/reencrypt.rs),
//! and a 10 ms budget could keep 8 MiB (or 6, within the resize threshold) only above 1.8 GiB/s.

mod common;

use common::{Image, Rig, BUDGET_BOUNDARIES};

const MIB: u64 = 1024 * 1024;
const IMAGE_MIB: u64 = 128;

/// Appends `lines` to the rig's `[reencrypt]` section (the configuration's last).
fn reencrypt_settings(rig: &Rig, hotzone: u64, lines: &str) {
    let text = std::fs::read_to_string(&rig.config).expect("config");
    let text = text.replace(
        "hotzone_size = 8388608\n",
        &format!("hotzone_size = {hotzone}\n{lines}\n"),
    );
    assert!(text.contains(lines), "the [reencrypt] section was found");
    std::fs::write(&rig.config, text).expect("config");
}

/// The `hotzone-sized` records of the journal: the size chosen, bytes.
fn sized(status: &serde_json::Value) -> Vec<u64> {
    status["journal"]["records"]
        .as_array()
        .expect("records")
        .iter()
        .filter(|r| r["details"]["substep"] == "hotzone-sized")
        .map(|r| {
            r["details"]["hotzone_bytes"]
                .as_u64()
                .expect("hotzone_bytes")
        })
        .collect()
}

fn assert_finished_intact(rig: &Rig) -> serde_json::Value {
    let status = rig.status();
    assert_eq!(status["state"], "header-backed-up", "{status:#}");
    assert_eq!(status["journal"]["chain_ok"], true);
    assert_eq!(rig.files_inside(), rig.files, "every file intact");
    status
}

#[test]
fn a_recovery_budget_grows_a_small_hotzone() {
    let rig = Rig::new(Image::Ci, IMAGE_MIB);
    reencrypt_settings(&rig, MIB, "max_recovery = \"1s\"");
    rig.run_stage("all");
    let status = assert_finished_intact(&rig);
    let chosen = sized(&status);
    assert_eq!(chosen.len(), 1, "one measurement per run: {chosen:?}");
    assert!(
        chosen[0] > MIB && chosen[0] <= 64 * MIB && chosen[0].is_multiple_of(MIB),
        "{chosen:?}"
    );
}

#[test]
fn without_a_budget_the_hotzone_is_never_resized() {
    let rig = Rig::new(Image::Ci, IMAGE_MIB);
    reencrypt_settings(&rig, MIB, "");
    rig.run_stage("all");
    let status = assert_finished_intact(&rig);
    assert_eq!(sized(&status), Vec::<u64>::new());
}

#[test]
fn a_crash_after_sizing_resumes_with_the_journaled_size() {
    let rig = Rig::new(Image::Ci, IMAGE_MIB);
    reencrypt_settings(&rig, 8 * MIB, "max_recovery = \"10ms\"");
    let mut cut = 0;
    for fp in BUDGET_BOUNDARIES {
        let out = rig.cryptfs_env(&["run", "--stage", "all"], &[("CRYPTFS_FAILPOINT", fp)]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{fp} was not reached: {err}");
        assert!(err.contains(&format!("failpoint {fp} hit")), "{err}");
        cut += 1;
        let status = rig.status();
        assert_eq!(status["state"], "reencrypting");
        let chosen = sized(&status);
        assert_eq!(chosen.len(), 1, "{chosen:?}");
        assert!(chosen[0] < 8 * MIB && chosen[0] >= MIB, "{chosen:?}");
        // The next boot resumes with the journaled size and does not measure again.
        rig.run_stage("all");
        let status = assert_finished_intact(&rig);
        assert_eq!(sized(&status), chosen, "no second measurement");
    }
    assert_eq!(cut, BUDGET_BOUNDARIES.len(), "every boundary cut");
}

#[test]
fn journal_resilience_reaches_the_header() {
    let rig = Rig::new(Image::Ci, IMAGE_MIB);
    reencrypt_settings(&rig, 4 * MIB, "resilience = \"journal\"");
    let out = rig.cryptfs_env(
        &["run", "--stage", "all"],
        &[("CRYPTFS_FAILPOINT", "reencrypt:mid")],
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("failpoint reencrypt:mid hit"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dump = common::run(
        "cryptsetup",
        &[
            "luksDump",
            "--dump-json-metadata",
            &rig.device.display().to_string(),
        ],
    );
    let json: serde_json::Value = serde_json::from_slice(&dump.stdout).expect("json");
    let areas: Vec<&str> = json["keyslots"]
        .as_object()
        .expect("keyslots")
        .values()
        .filter(|k| k["type"] == "reencrypt")
        .map(|k| k["area"]["type"].as_str().expect("area type"))
        .collect();
    assert_eq!(areas, ["journal"], "{:#}", json["keyslots"]);
    rig.run_stage("all");
    assert_finished_intact(&rig);
}
