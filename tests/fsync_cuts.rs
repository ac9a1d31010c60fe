//! The crash harness of issue 5, with the counting of issue 9: a run is cut (SIGKILL of its whole
//! process tree) at *every* sync point of each long operation, then the normal boot path runs
//! again. cryptfs must reach `header-backed-up` with no manual step, every file byte-identical, no
//! passphrase keyslot and a valid journal that shows the cut. The same cuts applied to the
//! `cryptsetup` CLI followed by the reference's recovery (`cryptsetup repair` + `reencrypt
//! --resume-only`) are measured beside it, in the same run, as the anchor.
//!
//! The cuts come from the `LD_PRELOAD` shim `tests/cutshim` (built by this harness): every
//! `fsync`, `fdatasync`, `syncfs`, `sync`, `sync_file_range` and `msync(MS_SYNC)` of every process
//! of the run (cryptfs, its `e2fsck` / `resize2fs`; the `cryptsetup` CLI) takes one number from a
//! counter shared by the whole tree, so sync point N is one global point in the order the writes
//! were made durable. An uncut run gives the points; then every point is cut once, and a cut
//! counts only when it was taken (the shim's marker is there and the run did not finish). The
//! tables (points, cuts taken, intact) are written to `design/results/fsync_cuts-*.md`.

mod common;

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

use common::{Image, Rig, BIN};

/// In-place encryption's image: the smallest device cryptfs encrypts in place (64 MiB of
/// filesystem after the shrink, 8 hotzones).
const IN_PLACE_MIB: u64 = 96;
/// The CI image of the volume-key change and the reseal: 8 hotzones of re-encryption, every
/// code path of a hotzone cut in each.
const CI_IMAGE_MIB: u64 = 64;
const PASSPHRASE: &str = "anchor-passphrase";

/// Builds the shim (its own target directory, so the build does not wait for the lock of the
/// `cargo test` that runs this) and returns the library's path.
fn shim() -> &'static Path {
    static SHIM: OnceLock<PathBuf> = OnceLock::new();
    SHIM.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let target = root.join("target").join("cutshim");
        let out = Command::new(env!("CARGO"))
            .args(["build", "--quiet", "--package", "cutshim", "--target-dir"])
            .arg(&target)
            .current_dir(&root)
            .output()
            .expect("cargo");
        assert!(
            out.status.success(),
            "building tests/cutshim failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let lib = target.join("debug").join("libcutshim.so");
        assert!(lib.exists(), "{} missing after the build", lib.display());
        lib
    })
}

/// What one run under the shim did.
struct ShimRun {
    out: Output,
    /// Sync calls numbered by the shim (for a cut run: up to and including the cut).
    syncs: u64,
    /// The shim's marker: `cut at N pid P syscall S exe E`, present only when it cut.
    marker: Option<String>,
    /// `exe syscall` of every numbered call, in order.
    calls: Vec<String>,
}

impl ShimRun {
    /// The cut was taken: the shim cut at the armed point and the run did not finish.
    fn cut_taken(&self, n: u64) -> bool {
        self.marker
            .as_deref()
            .is_some_and(|m| m.starts_with(&format!("cut at {n} ")))
            && !self.out.status.success()
    }
}

/// Runs `cmd` in a process group of its own with the shim preloaded; `cut_at` arms the cut.
fn under_shim(cmd: &[String], cut_at: Option<u64>, env: &[(&str, &str)], dir: &Path) -> ShimRun {
    let state = dir.join("cutshim");
    std::fs::create_dir_all(&state).expect("shim dir");
    let counter = state.join("counter");
    let marker = state.join("marker");
    let log = state.join("log");
    std::fs::write(&counter, "0").expect("counter");
    let _ = std::fs::remove_file(&marker);
    let _ = std::fs::remove_file(&log);
    let mut c = Command::new(&cmd[0]);
    c.args(&cmd[1..])
        .current_dir(dir)
        .stdin(Stdio::null())
        .process_group(0)
        .env("LD_PRELOAD", shim())
        .env("CUTSHIM_COUNTER", &counter)
        .env("CUTSHIM_MARKER", &marker)
        .env("CUTSHIM_LOG", &log)
        .env("CUTSHIM_CUT_AT", cut_at.unwrap_or(0).to_string());
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().expect("run under the shim");
    let syncs = std::fs::read_to_string(&counter)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    let calls = std::fs::read_to_string(&log)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let syscall = l
                .split(" syscall ")
                .nth(1)
                .and_then(|r| r.split(' ').next());
            let exe = l.split(" exe ").nth(1);
            format!("{} {}", exe.unwrap_or("?"), syscall.unwrap_or("?"))
        })
        .collect();
    ShimRun {
        out,
        syncs,
        marker: std::fs::read_to_string(&marker).ok(),
        calls,
    }
}

/// The sync points of an uncut run, which must finish: every point, and where each one is.
fn count_points(cmd: &[String], env: &[(&str, &str)], dir: &Path, what: &str) -> (u64, String) {
    let run = under_shim(cmd, None, env, dir);
    assert!(
        run.out.status.success() && run.marker.is_none(),
        "{what}: the uncut run failed: {}",
        String::from_utf8_lossy(&run.out.stderr)
    );
    assert_eq!(
        run.calls.len() as u64,
        run.syncs,
        "{what}: the log and the counter disagree"
    );
    let mut by: BTreeMap<&str, usize> = BTreeMap::new();
    for c in &run.calls {
        *by.entry(c.as_str()).or_default() += 1;
    }
    let breakdown = by
        .iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ");
    (run.syncs, breakdown)
}

struct Row {
    operation: &'static str,
    recovery: &'static str,
    /// Sync points of the uncut run.
    points: u64,
    /// Points where the cut was taken (the run was killed there).
    taken: u64,
    /// Cuts taken after which recovery gave every file back intact.
    intact: u64,
    /// Points where the cut was not taken (the run finished or died elsewhere).
    not_taken: Vec<u64>,
    failures: Vec<String>,
    breakdown: String,
}

impl Row {
    fn line(&self) -> String {
        format!(
            "| {} | {} | {} | {} | {} | {} | {} |",
            self.operation,
            self.recovery,
            self.points,
            self.taken,
            self.intact,
            if self.failures.is_empty() {
                "—".to_string()
            } else {
                self.failures.join(", ")
            },
            self.breakdown
        )
    }
}

/// Writes and prints the operation's table.
fn report(file: &str, size_mib: u64, rows: &[&Row]) {
    let mut text = String::from(
        "<!-- Written by tests/fsync_cuts.rs (`cargo test --package cryptfs --all-features \
         --test fsync_cuts -- --nocapture`); a run regenerates it. -->\n\n",
    );
    text.push_str(&format!(
        "{size_mib} MiB image, 8 MiB hotzone. A point is one sync call (fsync, fdatasync, syncfs, \
         sync, sync_file_range, msync MS_SYNC) of any process of the run, numbered in one global \
         order; every point is cut once; only cuts taken count.\n\n"
    ));
    text.push_str(
        "| operation | recovery | sync points | cuts taken | intact | failing cuts (point: why) | points by program and call (uncut run) |\n",
    );
    text.push_str("|---|---|---|---|---|---|---|\n");
    for row in rows {
        text.push_str(&row.line());
        text.push('\n');
        if !row.not_taken.is_empty() {
            text.push_str(&format!(
                "\n{} / {}: cut not taken at points {:?}\n",
                row.operation, row.recovery, row.not_taken
            ));
        }
    }
    eprintln!("\n{text}");
    common::write_result(file, &text);
}

/// cryptfs: every sync point of `stage` from the snapshot, recovered by `run --stage all`.
fn sweep_cryptfs(rig: &Rig, operation: &'static str, stage: &str) -> Row {
    sweep(
        rig,
        operation,
        "cryptfs (run --stage all)",
        &["run", "--stage", stage],
        common::cryptfs_recovers,
    )
}

/// Every sync point of `cryptfs ARGS` from a snapshot of the rig's image and boot partition,
/// each cut followed by `recover`.
fn sweep(
    rig: &Rig,
    operation: &'static str,
    recovery: &'static str,
    args: &[&str],
    mut recover: impl FnMut(&Rig) -> Result<(), String>,
) -> Row {
    let snap = rig.dir.path().join("snapshot");
    std::fs::create_dir_all(&snap).expect("snap");
    let snap_img = snap.join("root.img");
    std::fs::copy(&rig.device, &snap_img).expect("snapshot image");
    common::copy_tree(&rig.boot, &snap.join("boot"));
    let restore = || {
        std::fs::copy(&snap_img, &rig.device).expect("restore image");
        common::copy_tree(&snap.join("boot"), &rig.boot);
    };
    let cmd: Vec<String> = std::iter::once(BIN)
        .chain(args.iter().copied())
        .chain(["--config"])
        .map(|s| s.to_string())
        .chain([rig.config.display().to_string()])
        .collect();
    let env = [("CRYPTFS_BOOT_ID", "cut"), ("CRYPTFS_LOG", "warn")];
    restore();
    let (points, breakdown) = count_points(&cmd, &env, rig.dir.path(), operation);
    let mut row = Row {
        operation,
        recovery,
        points,
        taken: 0,
        intact: 0,
        not_taken: Vec::new(),
        failures: Vec::new(),
        breakdown,
    };
    for n in 1..=points {
        restore();
        let run = under_shim(&cmd, Some(n), &env, rig.dir.path());
        if !run.cut_taken(n) {
            row.not_taken.push(n);
            continue;
        }
        row.taken += 1;
        match recover(rig) {
            Ok(()) => row.intact += 1,
            Err(why) => row.failures.push(format!("{n}: {why}")),
        }
    }
    restore();
    row
}

/// The anchor: the same cuts on the cryptsetup CLI, recovered the reference's way.
fn sweep_reference(
    dir: &Path,
    operation: &'static str,
    pre: &Path,
    files: &BTreeMap<String, String>,
    args: &[&str],
) -> Row {
    let work = dir.join(format!(
        "anchor-{}",
        operation.split_whitespace().next().unwrap_or("op")
    ));
    std::fs::create_dir_all(&work).expect("work");
    let img = work.join("img");
    let key_file = work.join("pass");
    std::fs::write(&key_file, PASSPHRASE).expect("key file");
    let mut cmd: Vec<String> = vec![
        "cryptsetup".into(),
        "reencrypt".into(),
        "--batch-mode".into(),
    ];
    cmd.extend(args.iter().map(|s| s.to_string()));
    cmd.extend([
        "--key-file".into(),
        key_file.display().to_string(),
        img.display().to_string(),
    ]);
    let clean = |work: &Path| {
        for e in std::fs::read_dir(work).expect("read_dir").flatten() {
            if e.file_name().to_string_lossy().starts_with("LUKS2-temp-") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    };
    std::fs::copy(pre, &img).expect("copy");
    let (points, breakdown) = count_points(&cmd, &[], &work, operation);
    let mut row = Row {
        operation,
        recovery: "cryptsetup repair + --resume-only",
        points,
        taken: 0,
        intact: 0,
        not_taken: Vec::new(),
        failures: Vec::new(),
        breakdown,
    };
    for n in 1..=points {
        clean(&work);
        std::fs::copy(pre, &img).expect("copy");
        let run = under_shim(&cmd, Some(n), &[], &work);
        if !run.cut_taken(n) {
            row.not_taken.push(n);
            continue;
        }
        row.taken += 1;
        let i = img.display().to_string();
        let is_luks = Command::new("cryptsetup")
            .args(["isLuks", &i])
            .status()
            .is_ok_and(|s| s.success());
        if is_luks {
            common::reference_recovery(&work, &img, &key_file);
        } else {
            // Not LUKS yet: the reference's boot starts the encryption again.
            clean(&work);
            let _ = Command::new(&cmd[0])
                .args(&cmd[1..])
                .current_dir(&work)
                .output();
        }
        match common::passphrase_volume_files(&work, &img, PASSPHRASE) {
            Some(found) if found == *files => row.intact += 1,
            Some(_) => row.failures.push(format!("{n}: files differ")),
            None => row
                .failures
                .push(format!("{n}: does not open or fsck fails")),
        }
    }
    row
}

/// A cryptfs-only sweep: enough points counted, every point cut, every cut intact.
fn assert_cryptfs_row(row: &Row) {
    assert!(row.points > 10, "only {} sync points counted", row.points);
    assert!(
        row.not_taken.is_empty() && row.taken == row.points,
        "{} points, {} cuts taken; not taken at {:?}",
        row.points,
        row.taken,
        row.not_taken
    );
    assert_eq!(row.intact, row.taken, "{:?}", row.failures);
}

/// The claims the README and design/ make from these tables.
fn assert_rows(cryptfs: &Row, reference: &Row) {
    for row in [cryptfs, reference] {
        assert!(
            row.points > 10,
            "{} / {}: only {} sync points counted",
            row.operation,
            row.recovery,
            row.points
        );
        assert!(
            row.not_taken.is_empty() && row.taken == row.points,
            "{} / {}: {} points, {} cuts taken; not taken at {:?}",
            row.operation,
            row.recovery,
            row.points,
            row.taken,
            row.not_taken
        );
    }
    assert_eq!(
        cryptfs.intact, cryptfs.taken,
        "{}: {:?}",
        cryptfs.operation, cryptfs.failures
    );
    // The anchor: the reference loses data or gets stuck in some cuts (windows A and B of
    // design/steps.md). If it no longer does, the comparison the README makes is wrong.
    assert!(
        reference.intact < reference.taken,
        "{}: the reference recovered from every cut ({} of {}): the README's anchor is stale",
        reference.operation,
        reference.intact,
        reference.taken
    );
}

#[test]
fn in_place_encryption_survives_a_cut_at_every_sync() {
    let rig = Rig::new(Image::Plain, IN_PLACE_MIB);
    // Anchor input: the same filesystem, shrunk the reference's way before its CLI call.
    let pre = rig.dir.path().join("anchor-pre.img");
    std::fs::copy(&rig.device, &pre).expect("copy");
    let p = pre.display().to_string();
    common::run("e2fsck", &["-p", "-f", &p]);
    common::run("resize2fs", &[&p, &format!("{}M", IN_PLACE_MIB - 32)]);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&pre)
        .expect("open")
        .set_len(IN_PLACE_MIB << 20)
        .expect("len");
    // The anchor's sweep and cryptfs's are independent (their own images and shim counters):
    // they run side by side.
    let (row, anchor) = std::thread::scope(|scope| {
        let anchor = scope.spawn(|| {
            sweep_reference(
                rig.dir.path(),
                "in-place encryption",
                &pre,
                &rig.files,
                &[
                    &[
                        "--encrypt",
                        "--type",
                        "luks2",
                        "--reduce-device-size",
                        "32M",
                    ],
                    common::ANCHOR_REENCRYPT_ARGS,
                ]
                .concat(),
            )
        });
        let row = sweep_cryptfs(&rig, "in-place encryption", "initramfs");
        (row, anchor.join().expect("the anchor's sweep"))
    });
    report(
        "fsync_cuts-in-place-encryption.md",
        IN_PLACE_MIB,
        &[&row, &anchor],
    );
    assert_rows(&row, &anchor);
}

/// The 4096-byte sector lever (`sector_size = 4096`) under the same cuts. cryptfs alone: the
/// reference's sweep of in-place encryption above is the anchor, and the sector size changes
/// nothing of its crash windows. Every recovered device must still have 4096-byte sectors.
#[test]
fn in_place_encryption_with_4096_byte_sectors_survives_a_cut_at_every_sync() {
    let rig = Rig::new(Image::Plain, IN_PLACE_MIB);
    std::fs::write(
        &rig.config,
        common::config_text(
            &rig.device,
            &rig.boot,
            &rig.tpm.tcti(),
            "sector_size = 4096",
        ),
    )
    .expect("config");
    let mut sectors_checked = 0u64;
    let row = sweep(
        &rig,
        "in-place encryption, 4096-byte sectors",
        "cryptfs (run --stage all)",
        &["run", "--stage", "initramfs"],
        |rig| {
            common::cryptfs_recovers(rig)?;
            let meta = common::luks2(&rig.device);
            match meta.segment_sector_size() {
                Some(4096) => {
                    sectors_checked += 1;
                    Ok(())
                }
                other => Err(format!("sector size after recovery: {other:?}")),
            }
        },
    );
    report(
        "fsync_cuts-in-place-encryption-4096.md",
        IN_PLACE_MIB,
        &[&row],
    );
    assert_cryptfs_row(&row);
    assert_eq!(
        sectors_checked, row.taken,
        "every recovered device checked for 4096-byte sectors"
    );
}

#[test]
fn volume_key_change_survives_a_cut_at_every_sync() {
    let rig = Rig::new(Image::Ci, CI_IMAGE_MIB);
    // Anchor input: a CI-style image with the anchor's passphrase.
    let pre = rig.dir.path().join("anchor-pre.img");
    common::make_ci_image(&pre, CI_IMAGE_MIB, &rig.dir.path().join("src"), PASSPHRASE);
    // The anchor's sweep runs beside cryptfs's (its own image and shim counter).
    let (row, anchor) = std::thread::scope(|scope| {
        let anchor = scope.spawn(|| {
            sweep_reference(
                rig.dir.path(),
                "volume-key change",
                &pre,
                &rig.files,
                &[
                    &["--force-offline-reencrypt"],
                    common::ANCHOR_REENCRYPT_ARGS,
                ]
                .concat(),
            )
        });
        // With a recovery key: on a CI image it is enrolled after the re-encryption, so the
        // userspace stage's sync points include those of `enroll-recovery` (escrow, keyslot,
        // token). The escrow file lives on the rig's boot directory only so that the harness's
        // snapshot restores it with the device (a shipped escrow goes elsewhere).
        let key = enable_recovery_escrow(&rig);
        rig.run_stage("initramfs");
        let row = sweep(
            &rig,
            "volume-key change",
            "cryptfs (run --stage all)",
            &["run", "--stage", "userspace"],
            |rig| {
                common::cryptfs_recovers(rig)?;
                recovery_key_opens(rig, &key)
            },
        );
        (row, anchor.join().expect("the anchor's sweep"))
    });
    report(
        "fsync_cuts-volume-key-change.md",
        CI_IMAGE_MIB,
        &[&row, &anchor],
    );
    assert_rows(&row, &anchor);
}

/// Turns on `[recovery]` with the escrow file at `boot/escrow/recovery.key`; returns its path.
fn enable_recovery_escrow(rig: &Rig) -> PathBuf {
    let key = rig.boot.join("escrow").join("recovery.key");
    std::fs::create_dir_all(key.parent().expect("parent")).expect("escrow dir");
    let extra = format!(
        "[recovery]\nenabled = true\nescrow_file = \"{}\"\n",
        key.display()
    );
    std::fs::write(
        &rig.config,
        common::config_text(&rig.device, &rig.boot, &rig.tpm.tcti(), &extra),
    )
    .expect("config");
    key
}

/// Exactly one recovery keyslot, and the escrowed key opens the volume.
fn recovery_key_opens(rig: &Rig, key: &Path) -> Result<(), String> {
    let slots = cryptfs::steps::recovery::recovery_keyslots(&common::luks2(&rig.device));
    if slots.len() != 1 {
        return Err(format!("recovery keyslots {slots:?}"));
    }
    let out = rig.cryptfs(&[
        "unlock",
        "--test",
        "--recovery-key-file",
        &key.display().to_string(),
    ]);
    if !out.status.success() {
        return Err("the escrowed recovery key does not open the volume".into());
    }
    Ok(())
}

/// What a reseal cut left, checked: the volume still unlocks at the cut (no moment without an
/// unlock path), the boot path runs, the next `reseal` resolves the interrupted one and
/// completes, and the device ends with one proven KEK token, no orphan keyslot, a header backup
/// of the header as it is and a journal with nothing open. Returns how the next reseal resolved
/// the interrupted one (`rolled back`, `completed`, or `none open`).
fn reseal_recovers(rig: &Rig, original_blob: &str) -> Result<&'static str, String> {
    let env = [("CRYPTFS_BOOT_ID", "recovery")];
    let unlock = rig.cryptfs_env(&["unlock", "--test"], &env);
    if !unlock.status.success() {
        return Err("NO UNLOCK PATH after the cut".into());
    }
    let boot = rig.cryptfs_env(&["run", "--stage", "all"], &env);
    if !boot.status.success() {
        let err = String::from_utf8_lossy(&boot.stderr);
        return Err(format!("boot path: {}", err.lines().last().unwrap_or("")));
    }
    let again = rig.cryptfs_env(&["reseal"], &env);
    if !again.status.success() {
        let err = String::from_utf8_lossy(&again.stderr);
        return Err(format!(
            "reseal again: {}",
            err.lines().last().unwrap_or("")
        ));
    }
    let said = String::from_utf8_lossy(&again.stdout);
    let resolved = if said.contains("was rolled back") {
        "rolled back"
    } else if said.contains("was completed") {
        "completed"
    } else {
        "none open"
    };
    let meta = common::luks2(&rig.device);
    let tokens: Vec<_> = meta
        .tokens
        .values()
        .filter(|t| t.kind == "systemd-tpm2")
        .collect();
    if tokens.len() != 1 {
        return Err(format!("{} KEK tokens", tokens.len()));
    }
    if tokens[0].json["tpm2-blob"] == original_blob {
        return Err("never resealed".into());
    }
    if let Some(orphan) = meta
        .keyslots
        .keys()
        .find(|s| meta.tokens_of(**s).next().is_none())
    {
        return Err(format!("orphan keyslot {orphan}"));
    }
    let s = rig.status();
    if s["state"] != "header-backed-up" || s["journal"]["chain_ok"] != true {
        return Err(format!(
            "state {} chain {}",
            s["state"], s["journal"]["chain_ok"]
        ));
    }
    if !s["device"]["reseal_interrupted"].is_null() {
        return Err("a reseal left open".into());
    }
    let area = cryptfs::steps::backup::header_area_len(&meta).map_err(|e| e.to_string())?;
    let current =
        cryptfs::steps::backup::matches_device(&rig.config().backup_path(), &rig.device, area)
            .map_err(|e| e.to_string())?;
    if s["header_backup"]["digest_ok"] != true || current.is_none() {
        return Err("luks.bin stale or unvouched".into());
    }
    let unlock = rig.cryptfs_env(&["unlock", "--test"], &env);
    if !unlock.status.success() {
        return Err("the final token does not unlock".into());
    }
    Ok(resolved)
}

/// `cryptfs reseal` (replace) cut at every sync point. There is no reference operation to
/// measure beside it: the reference has no reseal (its answer is a manual recovery key).
#[test]
fn reseal_survives_a_cut_at_every_sync() {
    let rig = Rig::new(Image::Ci, CI_IMAGE_MIB);
    rig.tpm.extend_pcr7();
    let key = enable_recovery_escrow(&rig);
    rig.run_stage("all");
    let original_blob = common::luks2(&rig.device)
        .tokens
        .values()
        .find(|t| t.kind == "systemd-tpm2")
        .and_then(|t| t.json["tpm2-blob"].as_str().map(String::from))
        .expect("a KEK token");
    let mut resolved: BTreeMap<&str, u64> = BTreeMap::new();
    let row = sweep(
        &rig,
        "reseal (replace)",
        "cryptfs (boot path, then reseal again)",
        &["reseal"],
        |rig| {
            let how = reseal_recovers(rig, &original_blob)?;
            recovery_key_opens(rig, &key)?;
            *resolved.entry(how).or_default() += 1;
            Ok(())
        },
    );
    report("fsync_cuts-reseal.md", CI_IMAGE_MIB, &[&row]);
    eprintln!("interrupted reseals resolved as: {resolved:?}");
    assert_cryptfs_row(&row);
    // Both ways out were exercised: an unproven new pair undone, a proven one completed.
    assert!(
        resolved.get("rolled back").is_some_and(|n| *n > 0)
            && resolved.get("completed").is_some_and(|n| *n > 0),
        "{resolved:?}"
    );
    assert_eq!(rig.files_inside(), rig.files, "every file survived");
}

/// The harness's own proof: calls of several processes share one numbering, the cut lands on the
/// armed call of whichever process makes it and stops the whole tree, and an armed point past
/// the last call is not counted as a cut.
#[test]
fn the_shim_numbers_syncs_across_the_tree_and_cuts_only_at_the_armed_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cmd: Vec<String> = ["sh", "-c", "sync; sh -c 'sync; sync'; sync; echo finished"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let (points, breakdown) = count_points(&cmd, &[], dir.path(), "shim self-test");
    assert_eq!(points, 4, "{breakdown}");
    let cut = under_shim(&cmd, Some(3), &[], dir.path());
    assert!(cut.cut_taken(3), "{:?}", cut.marker);
    assert_eq!(cut.syncs, 3, "nothing ran past the cut");
    assert!(!String::from_utf8_lossy(&cut.out.stdout).contains("finished"));
    let past = under_shim(&cmd, Some(5), &[], dir.path());
    assert!(past.out.status.success() && past.marker.is_none());
    assert!(!past.cut_taken(5), "a point past the last sync is no cut");
}
