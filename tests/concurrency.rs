//! Concurrent use of one device: `cryptfs status` beside every stage of both paths, and a second
//! runner beside a first. Real redb files, real libcryptsetup, swtpm.

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{file_blake3, Image, Rig, BIN};
use serde_json::Value;

/// What a status loop saw while a stage ran.
#[derive(Default)]
struct Observed {
    /// Every `status --json` that ran.
    calls: usize,
    /// Those whose journal had more records than before the stage and fewer than after it:
    /// they looked at a run in progress.
    mid_run: usize,
    /// Those that showed live re-encryption progress taken from the header.
    live_progress: usize,
}

fn status_json(rig: &Rig) -> Value {
    let out = rig.cryptfs(&["status", "--json"]);
    assert!(
        out.status.success(),
        "status failed beside a run: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "status printed no valid JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    assert_eq!(
        status["journal"]["chain_ok"], true,
        "chain not verified beside a run: {:#}",
        status["journal"]
    );
    status
}

fn record_count(status: &Value) -> usize {
    status["journal"]["records"].as_array().map_or(0, Vec::len)
}

fn spawn_stage(rig: &Rig, stage: &str) -> Child {
    Command::new(BIN)
        .args(["run", "--stage", stage, "--config"])
        .arg(&rig.config)
        .env("CRYPTFS_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn cryptfs run")
}

/// Runs `stage` while another thread calls `status --json` in a tight loop.
fn stage_beside_status_loop(rig: &Rig, stage: &str) -> Observed {
    let before = record_count(&status_json(rig));
    let running = Arc::new(AtomicBool::new(true));
    let observed = std::thread::scope(|scope| {
        let looping = running.clone();
        let watcher = scope.spawn(move || {
            let mut seen = Vec::new();
            while looping.load(Ordering::SeqCst) {
                seen.push(status_json(rig));
            }
            seen
        });
        let out = spawn_stage(rig, stage).wait_with_output().expect("wait");
        running.store(false, Ordering::SeqCst);
        let seen = watcher.join().expect("status loop");
        assert!(
            out.status.success(),
            "run --stage {stage} failed beside the status loop: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        seen
    });
    let after = record_count(&status_json(rig));
    let mut result = Observed {
        calls: observed.len(),
        ..Observed::default()
    };
    let mut last = 0;
    for status in &observed {
        let count = record_count(status);
        assert!(count >= last, "a later status saw fewer records");
        last = count;
        if count > before && count < after {
            result.mid_run += 1;
        }
        if status["device"]["reencrypt"]["progress"]["source"] == "header" {
            result.live_progress += 1;
        }
    }
    let kept_aside: Vec<String> = std::fs::read_dir(rig.boot.join("cryptfs"))
        .expect("journal dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|name| name.contains(".damaged-"))
        .collect();
    assert!(
        kept_aside.is_empty(),
        "status made a runner keep a live journal aside: {kept_aside:?}"
    );
    result
}

fn path_beside_status_loop(image: Image) -> Observed {
    let rig = Rig::new(image, 256);
    // Small hotzones: more commits for the status loop to land between.
    let text = std::fs::read_to_string(&rig.config)
        .expect("config")
        .replace("hotzone_size = 8388608", "hotzone_size = 1048576");
    std::fs::write(&rig.config, text).expect("config");
    let mut total = Observed::default();
    for stage in ["initramfs", "userspace"] {
        let seen = stage_beside_status_loop(&rig, stage);
        eprintln!(
            "{stage}: {} status calls, {} mid-run, {} with live progress",
            seen.calls, seen.mid_run, seen.live_progress
        );
        assert!(seen.calls >= 1, "{stage}: the status loop never ran");
        total.calls += seen.calls;
        total.mid_run += seen.mid_run;
        total.live_progress += seen.live_progress;
    }
    let status = status_json(&rig);
    assert_eq!(status["state"], "header-backed-up", "{status:#}");
    assert_eq!(rig.files_inside(), rig.files);
    total
}

/// Both paths, each stage beside the loop: some calls must have landed mid-run and shown the
/// long step's live progress (`what` names it for the failure message).
fn assert_status_follows_the_run(image: Image, what: &str) {
    let seen = path_beside_status_loop(image);
    assert!(seen.mid_run >= 1, "no status landed during a run");
    assert!(
        seen.live_progress >= 1,
        "no status showed the {what}'s live progress"
    );
}

#[test]
fn status_beside_every_stage_of_the_plain_path() {
    assert_status_follows_the_run(Image::Plain, "in-place encryption");
}

#[test]
fn status_beside_every_stage_of_the_ci_image_path() {
    assert_status_follows_the_run(Image::Ci, "re-encryption");
}

/// A journal held by another writer (as a second `cryptfs run` would hold it): the run waits,
/// then refuses with a clear error, having written nothing to the device or the journal;
/// `status` still works meanwhile; once the holder lets go, the run proceeds.
#[test]
fn a_second_runner_waits_then_refuses_and_touches_nothing() {
    let rig = Rig::new(Image::Plain, 128);
    rig.run_stage("initramfs");
    let journal = rig.boot.join("cryptfs/journal.redb");
    let device_before = file_blake3(&rig.device);
    let journal_records = record_count(&rig.status());
    {
        let mut builder = redb::Builder::new();
        builder.set_concurrency_mode(redb::ConcurrencyMode::SingleWriter);
        let holder = builder
            .open(&journal)
            .expect("hold the journal as its writer");
        let started = Instant::now();
        let out = rig.cryptfs(&["run", "--stage", "userspace"]);
        let waited = started.elapsed();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "the second runner must refuse");
        assert!(
            err.contains("held by another cryptfs process"),
            "unclear refusal: {err}"
        );
        assert!(
            waited >= Duration::from_secs(9),
            "it gave up without waiting: {waited:?}"
        );
        assert_eq!(file_blake3(&rig.device), device_before, "device untouched");
        // status reads beside the holder.
        let status = status_json(&rig);
        assert_eq!(record_count(&status), journal_records, "journal untouched");
        drop(holder);
    }
    let names: Vec<String> = std::fs::read_dir(rig.boot.join("cryptfs"))
        .expect("dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.iter().all(|n| !n.contains(".damaged-")),
        "a held journal was taken for damage: {names:?}"
    );
    rig.run_stage("userspace");
    assert_eq!(status_json(&rig)["state"], "header-backed-up");
}

/// Two real runners started together: exactly one does the work; the other waits for it and
/// then finds nothing left to do, or refuses. Never a journal kept aside, never a broken chain.
#[test]
fn two_runners_at_once_never_break_the_journal() {
    let rig = Rig::new(Image::Plain, 128);
    let first = spawn_stage(&rig, "all");
    let second = spawn_stage(&rig, "all");
    let outs = [
        first.wait_with_output().expect("first"),
        second.wait_with_output().expect("second"),
    ];
    for out in &outs {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() || err.contains("held by another cryptfs process"),
            "a runner failed for another reason: {err}"
        );
    }
    assert!(outs.iter().any(|o| o.status.success()));
    let status = status_json(&rig);
    assert_eq!(status["state"], "header-backed-up", "{status:#}");
    let kept: Vec<String> = std::fs::read_dir(rig.boot.join("cryptfs"))
        .expect("dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".damaged-"))
        .collect();
    assert!(kept.is_empty(), "{kept:?}");
    assert_eq!(rig.files_inside(), rig.files);
}
