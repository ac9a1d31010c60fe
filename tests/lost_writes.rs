//! Crash states with lost unflushed writes (window C's harsh model): the device of a long
//! operation is a FUSE file that logs every write and every sync in order; a generator then
//! builds states "all writes up to sync k, alone and plus a seeded random subset of the writes
//! after it" for every k (for the volume-key change only the latter: a kill at every sync, in
//! tests/fsync_cuts.rs, already makes the former) and runs each through recovery. For cryptfs (in-place encryption, the
//! volume-key change) the boot directory (journal, temporary header) of each state is the one the
//! process had when it asked for sync k+1: the most advanced journal a crash before that sync can
//! leave; recovery is `run --stage all`. The cryptsetup CLI's volume-key change with the
//! reference's recovery (`repair` + `reencrypt --resume-only`) is the anchor, measured beside it.
//! Skips with a clear message where FUSE cannot mount, except under `CI=true`, where that fails.
//! The tables are written to `design/results/lost_writes-*.md`.

mod common;
#[path = "writelog/mod.rs"]
mod writelog;

use std::path::Path;

use common::{Image, Rig};
use writelog::{log_run, Logged};

/// In-place encryption's image: the smallest device cryptfs encrypts in place.
const IN_PLACE_MIB: u64 = 96;
/// The volume-key change's CI image (8 hotzones).
const CI_IMAGE_MIB: u64 = 64;

/// Per-phase tally of sampled states.
#[derive(Default)]
struct Tally {
    states: usize,
    intact: usize,
    failures: Vec<String>,
}

impl Tally {
    fn record(&mut self, k: usize, outcome: Result<(), String>) {
        self.states += 1;
        match outcome {
            Ok(()) => self.intact += 1,
            Err(why) => self.failures.push(format!("epoch {k}: {why}")),
        }
    }

    fn line(&self, operation: &str, phase: &str, recovery: &str) -> String {
        format!(
            "| {operation} | {phase} | {recovery} | {} | {} |\n",
            self.states, self.intact
        )
    }
}

/// The table's head; the rows follow it.
fn table_header(size_mib: u64) -> String {
    format!(
        "<!-- Written by tests/lost_writes.rs (`cargo test --package cryptfs --all-features \
         --test lost_writes -- --nocapture`); a run regenerates it. -->\n\n\
         {size_mib} MiB image, 8 MiB hotzone, the device behind a FUSE write log.\n\n\
         | operation | phase | recovery | crash states (lost unflushed writes) | intact |\n\
         |---|---|---|---|---|\n",
    )
}

/// Prints the table and writes it to `design/results/<file>`.
fn report(file: &str, table: &str) {
    eprintln!("\n{table}");
    common::write_result(file, table);
}

/// Runs `stage` of the rig's configuration with the device behind the write log.
fn log_cryptfs(rig: &Rig, stage: &str) -> Option<Logged> {
    let work = rig.dir.path().join(format!("log-{stage}"));
    log_run(&work, &rig.device, Some(&rig.boot), |disk| {
        let config = work.join("fuse.toml");
        std::fs::write(
            &config,
            common::config_text(disk, &rig.boot, &rig.tpm.tcti(), ""),
        )
        .expect("config");
        let out = common::cryptfs_with(
            &["run", "--stage", stage],
            &config,
            &[("CRYPTFS_BOOT_ID", "cut")],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    })
    .map(|(logged, ())| logged)
}

#[test]
fn in_place_encryption_recovers_from_lost_unflushed_writes() {
    let rig = Rig::new(Image::Plain, IN_PLACE_MIB);
    let Some(logged) = log_cryptfs(&rig, "initramfs") else {
        return;
    };
    assert!(
        logged.syncs > 5 && logged.writes() > logged.syncs,
        "{} syncs, {} writes logged",
        logged.syncs,
        logged.writes()
    );
    // Tally per phase: the shrink (e2fsck/resize2fs writing) and the encryption proper (from the
    // journal's `shrunk` on: temporary header, data move, header placement, hotzones).
    let past_shrink = |boot: &Path| {
        cryptfs_journal::Journal::open_verified(&boot.join("cryptfs/journal.redb"))
            .map(|j| {
                j.records()
                    .iter()
                    .any(|r| r.body.detail_str("substep") == Some("shrunk"))
            })
            .unwrap_or(false)
    };
    let mut tally = [Tally::default(), Tally::default()];
    logged.for_each_state(false, |k, image, boot| {
        std::fs::write(&rig.device, image).expect("state image");
        common::copy_tree(boot, &rig.boot);
        let phase = usize::from(past_shrink(&rig.boot));
        tally[phase].record(k, common::cryptfs_recovers(&rig));
    });
    let recovery = "cryptfs (run --stage all)";
    let mut table = table_header(IN_PLACE_MIB);
    table.push_str(&tally[0].line(
        "in-place encryption",
        "shrink (e2fsck, resize2fs)",
        recovery,
    ));
    table.push_str(&tally[1].line(
        "in-place encryption",
        "encryption (header, data move, hotzones)",
        recovery,
    ));
    table.push_str(&format!(
        "\n({} syncs, {} writes logged)\n",
        logged.syncs,
        logged.writes()
    ));
    report("lost_writes-in-place-encryption.md", &table);
    // Every sampled state, shrink included, must recover intact.
    assert!(tally[0].states > 5, "too few shrink-phase states");
    assert!(tally[1].states > 10, "too few encryption-phase states");
    for t in &tally {
        assert_eq!(t.intact, t.states, "{:#?}", t.failures);
    }
}

const ANCHOR_PASSPHRASE: &str = "anchor-passphrase";

#[test]
fn volume_key_change_recovers_from_lost_unflushed_writes() {
    let rig = Rig::new(Image::Ci, CI_IMAGE_MIB);
    // The anchor (its own copy of the same files, its own write log) runs beside cryptfs.
    let (ours, reference) = std::thread::scope(|scope| {
        let reference = scope.spawn(|| anchor_states(&rig));
        (
            cryptfs_states(&rig),
            reference.join().expect("the anchor's states"),
        )
    });
    let (Some((tally, logged)), Some((anchor, anchor_log))) = (ours, reference) else {
        return;
    };
    let mut table = table_header(CI_IMAGE_MIB);
    table.push_str(&tally.line(
        "volume-key change",
        "hotzones, finalisation, backup",
        "cryptfs (run --stage all)",
    ));
    table.push_str(&anchor.line(
        "volume-key change",
        "hotzones, finalisation",
        "cryptsetup repair + --resume-only",
    ));
    table.push_str(&format!(
        "\n(cryptfs: {} syncs, {} writes logged; cryptsetup: {} syncs, {} writes; reference \
         failures: {})\n",
        logged.syncs,
        logged.writes(),
        anchor_log.syncs,
        anchor_log.writes(),
        anchor.failures.join("; ")
    ));
    report("lost_writes-volume-key-change.md", &table);
    assert!(tally.states > 10, "too few states");
    assert_eq!(tally.intact, tally.states, "{:#?}", tally.failures);
    // The anchor the README relies on: the reference loses some of these states.
    assert!(anchor.states > 10, "too few reference states");
    assert!(
        anchor.intact < anchor.states,
        "the reference recovered every state ({} of {}): the README's anchor is stale",
        anchor.intact,
        anchor.states
    );
}

/// The cryptsetup CLI's volume-key change under the write log, each state recovered the
/// reference's way. `None` where FUSE cannot mount (the write log's own rule for CI applies).
fn anchor_states(rig: &Rig) -> Option<(Tally, Logged)> {
    let anchor_dir = rig.dir.path().join("anchor");
    std::fs::create_dir_all(&anchor_dir).expect("anchor dir");
    let anchor_img = anchor_dir.join("img");
    common::make_ci_image(
        &anchor_img,
        CI_IMAGE_MIB,
        &rig.dir.path().join("src"),
        ANCHOR_PASSPHRASE,
    );
    let key_file = anchor_dir.join("pass");
    std::fs::write(&key_file, ANCHOR_PASSPHRASE).expect("key file");
    let k = key_file.display().to_string();
    let mut anchor = Tally::default();
    let (anchor_log, ()) = log_run(
        &anchor_dir,
        &anchor_img,
        Some(&anchor_dir.join("unused")),
        |disk| {
            let disk = disk.display().to_string();
            common::run(
                "cryptsetup",
                &[
                    &["reencrypt", "--batch-mode", "--force-offline-reencrypt"],
                    common::ANCHOR_REENCRYPT_ARGS,
                    &["--key-file", &k, &disk],
                ]
                .concat(),
            );
        },
    )?;
    anchor_log.for_each_state(true, |k, image, _| {
        std::fs::write(&anchor_img, image).expect("state image");
        common::reference_recovery(&anchor_dir, &anchor_img, &key_file);
        let outcome =
            match common::passphrase_volume_files(&anchor_dir, &anchor_img, ANCHOR_PASSPHRASE) {
                Some(found) if found == rig.files => Ok(()),
                Some(_) => Err("FILES DIFFER".into()),
                None => Err("does not open or fsck fails".into()),
            };
        anchor.record(k, outcome);
    });
    Some((anchor, anchor_log))
}

/// cryptfs: enrolled, passphrase wiped, re-encryption initialised (the initramfs stage), then
/// the volume-key change itself behind the write log, each state recovered by the boot path.
fn cryptfs_states(rig: &Rig) -> Option<(Tally, Logged)> {
    rig.run_stage("initramfs");
    let logged = log_cryptfs(rig, "all")?;
    let mut tally = Tally::default();
    logged.for_each_state(true, |k, image, boot| {
        std::fs::write(&rig.device, image).expect("state image");
        common::copy_tree(boot, &rig.boot);
        tally.record(k, common::cryptfs_recovers(rig));
    });
    Some((tally, logged))
}
