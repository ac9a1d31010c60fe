//! The crash harness of issue 5: a run is cut (SIGKILL, by `strace -e inject`) at *every*
//! `fsync` and `fdatasync` of each long operation, then the normal boot path runs again. cryptfs
//! must reach `header-backed-up` with no manual step, every file byte-identical, no passphrase
//! keyslot and a valid journal that shows the cut. The same cuts applied to the `cryptsetup` CLI
//! followed by the reference's recovery (`cryptsetup repair` + `reencrypt --resume-only`) are
//! measured beside it, in the same run, as the anchor. Prints a table.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::{Image, Rig, BIN};

const SIZE_MIB: u64 = 96;
const PASSPHRASE: &str = "anchor-passphrase";

/// Runs `cmd` under strace, killed at the `n`-th `syscall` (n = 0: only count them).
fn under_strace(
    cmd: &[String],
    syscall: &str,
    n: usize,
    env: &[(&str, &str)],
    dir: &Path,
) -> (Output, usize) {
    let log = dir.join("strace.log");
    let mut c = Command::new("strace");
    c.args(["-f", "-o"])
        .arg(&log)
        .args(["-e", &format!("trace={syscall}")]);
    if n > 0 {
        c.args(["-e", &format!("inject={syscall}:signal=SIGKILL:when={n}")]);
    }
    c.args(cmd).current_dir(dir).stdin(Stdio::null());
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().expect("strace (package strace)");
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let count = text
        .lines()
        .filter(|l| {
            l.contains(&format!("{syscall}(")) || l.contains(&format!("<... {syscall} resumed>"))
        })
        .filter(|l| !l.contains("<unfinished ...>"))
        .count();
    (out, count)
}

struct Row {
    operation: &'static str,
    syscall: &'static str,
    cuts: usize,
    intact: usize,
    failures: Vec<String>,
}

impl Row {
    fn print(&self, who: &str) {
        eprintln!(
            "| {:<30} | {:<9} | {:<36} | {:>4} | {:>4} |{}",
            self.operation,
            self.syscall,
            who,
            self.cuts,
            self.intact,
            if self.failures.is_empty() {
                String::new()
            } else {
                format!(" {}", self.failures.join(" "))
            }
        );
    }
}

/// cryptfs: every cut of `stage` from the snapshot, recovered by `run --stage all`.
fn sweep_cryptfs(rig: &Rig, operation: &'static str, stage: &str, syscall: &'static str) -> Row {
    let snap = rig.dir.path().join("snapshot");
    std::fs::create_dir_all(&snap).expect("snap");
    let snap_img = snap.join("root.img");
    std::fs::copy(&rig.device, &snap_img).expect("snapshot image");
    common::copy_tree(&rig.boot, &snap.join("boot"));
    let restore = || {
        std::fs::copy(&snap_img, &rig.device).expect("restore image");
        common::copy_tree(&snap.join("boot"), &rig.boot);
    };
    let cmd: Vec<String> = [BIN, "run", "--stage", stage, "--config"]
        .iter()
        .map(|s| s.to_string())
        .chain([rig.config.display().to_string()])
        .collect();
    let env = [("CRYPTFS_BOOT_ID", "cut"), ("CRYPTFS_LOG", "warn")];
    restore();
    let (_, total) = under_strace(&cmd, syscall, 0, &env, rig.dir.path());
    let mut row = Row {
        operation,
        syscall,
        cuts: total,
        intact: 0,
        failures: Vec::new(),
    };
    for n in 1..=total {
        restore();
        under_strace(&cmd, syscall, n, &env, rig.dir.path());
        match common::cryptfs_recovers(rig) {
            Ok(()) => row.intact += 1,
            Err(why) => row.failures.push(format!("{n}:{why}")),
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
    let (_, total) = under_strace(&cmd, "fsync", 0, &[], &work);
    let mut row = Row {
        operation,
        syscall: "fsync",
        cuts: total,
        intact: 0,
        failures: Vec::new(),
    };
    for n in 1..=total {
        clean(&work);
        std::fs::copy(pre, &img).expect("copy");
        under_strace(&cmd, "fsync", n, &[], &work);
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
            _ => row.failures.push(n.to_string()),
        }
    }
    row
}

fn header() {
    eprintln!("\n| operation                      | cut at    | recovery                             | cuts | intact | failing cuts");
    eprintln!("|---|---|---|---|---|---|");
}

#[test]
fn in_place_encryption_survives_a_cut_at_every_sync() {
    let rig = Rig::new(Image::Plain, SIZE_MIB);
    // Anchor input: the same filesystem, shrunk the reference's way before its CLI call.
    let pre = rig.dir.path().join("anchor-pre.img");
    std::fs::copy(&rig.device, &pre).expect("copy");
    let p = pre.display().to_string();
    common::run("e2fsck", &["-p", "-f", &p]);
    common::run("resize2fs", &[&p, &format!("{}M", SIZE_MIB - 32)]);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&pre)
        .expect("open")
        .set_len(SIZE_MIB << 20)
        .expect("len");
    let anchor = sweep_reference(
        rig.dir.path(),
        "in-place encryption",
        &pre,
        &rig.files,
        &[
            "--encrypt",
            "--type",
            "luks2",
            "--reduce-device-size",
            "32M",
            "--pbkdf",
            "pbkdf2",
            "--pbkdf-force-iterations",
            "1000",
            "--hotzone-size",
            "8M",
        ],
    );
    let rows = [
        sweep_cryptfs(&rig, "in-place encryption", "initramfs", "fsync"),
        sweep_cryptfs(&rig, "in-place encryption", "initramfs", "fdatasync"),
    ];
    header();
    for row in &rows {
        row.print("cryptfs (run --stage all)");
    }
    anchor.print("cryptsetup repair + --resume-only");
    for row in &rows {
        assert!(
            row.cuts > 10,
            "{} {}: too few sync points counted",
            row.operation,
            row.syscall
        );
        assert_eq!(
            row.intact, row.cuts,
            "{} {}: {:?}",
            row.operation, row.syscall, row.failures
        );
    }
}

#[test]
fn volume_key_change_survives_a_cut_at_every_sync() {
    let rig = Rig::new(Image::Ci, SIZE_MIB);
    // Anchor input: a CI-style image with the anchor's passphrase.
    let pre = rig.dir.path().join("anchor-pre.img");
    common::make_ci_image(&pre, SIZE_MIB, &rig.dir.path().join("src"), PASSPHRASE);
    let anchor = sweep_reference(
        rig.dir.path(),
        "volume-key change",
        &pre,
        &rig.files,
        &[
            "--force-offline-reencrypt",
            "--pbkdf",
            "pbkdf2",
            "--pbkdf-force-iterations",
            "1000",
            "--hotzone-size",
            "8M",
        ],
    );
    rig.run_stage("initramfs");
    let rows = [
        sweep_cryptfs(&rig, "volume-key change", "userspace", "fsync"),
        sweep_cryptfs(&rig, "volume-key change", "userspace", "fdatasync"),
    ];
    header();
    for row in &rows {
        row.print("cryptfs (run --stage all)");
    }
    anchor.print("cryptsetup repair + --resume-only");
    for row in &rows {
        assert!(
            row.cuts > 10,
            "{} {}: too few sync points counted",
            row.operation,
            row.syscall
        );
        assert_eq!(
            row.intact, row.cuts,
            "{} {}: {:?}",
            row.operation, row.syscall, row.failures
        );
    }
}
