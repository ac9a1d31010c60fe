//! The header backup on a small boot partition (a real tmpfs of the reference's 32 MiB, with
//! the kernel and initramfs taking their share), and a power cut right after `luks.bin` was
//! renamed into place, before its `done` was journaled (failpoint `backup-header:after-rename`).
//! Before the fix every later run wrote a second 16 MiB copy beside the unverified one, ran out
//! of space and failed with "IO error".

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{file_blake3, Image, Rig};

const MIB: u64 = 1 << 20;

/// A tmpfs of `size_mib` mounted over `at`, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size_mib: u64) -> Tmpfs {
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size_mib}m,mode=0755"),
                "tmpfs",
            ])
            .arg(at)
            .output()
            .expect("mount");
        assert!(
            out.status.success(),
            "these tests mount a small tmpfs as the boot partition and need root: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(at.to_path_buf())
    }

    /// Bytes free, as `statvfs` counts them for root.
    fn free(&self) -> u64 {
        let out = common::run(
            "stat",
            &["-f", "-c", "%f %S", &self.0.display().to_string()],
        );
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let mut it = text
            .split_whitespace()
            .map(|n| n.parse::<u64>().expect("number"));
        it.next().expect("blocks") * it.next().expect("block size")
    }

    /// Leaves `free_mib` free by adding a file (the kernel and initramfs of a real boot partition).
    fn fill_to(&self, name: &str, free_mib: u64) {
        let fill = self
            .free()
            .checked_sub(free_mib * MIB)
            .expect("room to fill");
        std::fs::write(self.0.join(name), vec![0x5au8; fill as usize]).expect("filler");
        let free = self.free();
        assert!(
            free.abs_diff(free_mib * MIB) < MIB,
            "free {free} after filling"
        );
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Records of step `backup-header` with phase `phase`.
fn backup_records(status: &serde_json::Value, phase: &str) -> Vec<serde_json::Value> {
    status["journal"]["records"]
        .as_array()
        .expect("records")
        .iter()
        .filter(|r| r["step"] == "backup-header" && r["phase"] == phase)
        .cloned()
        .collect()
}

/// The device's header area (what a correct `luks.bin` holds), hashed.
fn device_header_blake3(rig: &Rig) -> String {
    let meta = common::luks2(&rig.device);
    let len = cryptfs::steps::backup::header_area_len(&meta).expect("area");
    assert_eq!(
        len,
        16 * MIB,
        "the reference's layout: a 16 MiB header area"
    );
    let bytes = std::fs::read(&rig.device).expect("read device");
    blake3::hash(&bytes[..len as usize]).to_hex().to_string()
}

#[test]
fn a_power_cut_after_the_rename_is_adopted_and_every_later_backup_works() {
    let rig = Rig::new(Image::Plain, 128);
    let boot = Tmpfs::mount(&rig.boot, 32);
    boot.fill_to("initramfs.img", 24);

    let out = rig.cryptfs_env(
        &["run", "--stage", "all"],
        &[
            ("CRYPTFS_FAILPOINT", "backup-header:after-rename"),
            ("CRYPTFS_BOOT_ID", "cut"),
        ],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("failpoint backup-header:after-rename hit"),
        "{}",
        stderr(&out)
    );
    let backup = rig.boot.join("luks.bin");
    let temp = rig.boot.join("luks.bin.tmp");
    let s = rig.status();
    assert_eq!(
        s["state"], "complete",
        "renamed, but `done` never journaled"
    );
    assert_eq!(s["header_backup"]["present"], true);
    assert_eq!(s["header_backup"]["digest_ok"], false);
    assert!(!temp.exists());
    let cut_digest = file_blake3(&backup);
    assert_eq!(cut_digest, device_header_blake3(&rig));
    let free_after_cut = boot.free();
    assert!(
        free_after_cut < 16 * MIB,
        "no room for a second copy: {free_after_cut}"
    );

    // Every later boot: the first adopts the file, the others have nothing left to do.
    for boot_id in ["later-1", "later-2", "later-3"] {
        let out = rig.cryptfs_env(&["run", "--stage", "all"], &[("CRYPTFS_BOOT_ID", boot_id)]);
        assert!(out.status.success(), "{boot_id}: {}", stderr(&out));
        assert!(!temp.exists(), "{boot_id}: a second copy was left");
        let s = rig.status();
        assert_eq!(s["state"], "header-backed-up", "{boot_id}");
        assert_eq!(s["header_backup"]["digest_ok"], true, "{boot_id}");
        let done = backup_records(&s, "done");
        assert_eq!(done.len(), 1, "{boot_id}: one backup done");
        assert_eq!(done[0]["boot_id"], "later-1");
        assert_eq!(done[0]["details"]["adopted"], true);
        assert_eq!(done[0]["details"]["backup_blake3"], cut_digest.as_str());
    }
    assert_eq!(file_blake3(&backup), cut_digest, "adopted, never rewritten");

    // The journal is lost and the file no longer matches the device: nothing vouches for it,
    // and there is room for only one copy, so the stale file goes first and a new one is written.
    let journal = rig.boot.join("cryptfs/journal.redb");
    std::fs::remove_file(&journal).expect("lose the journal");
    let mut bytes = std::fs::read(&backup).expect("read");
    bytes[20_000] ^= 0xff;
    std::fs::write(&backup, &bytes).expect("stale backup");
    drop(bytes);
    assert!(boot.free() < 16 * MIB);
    let out = rig.cryptfs_env(
        &["run", "--stage", "all"],
        &[("CRYPTFS_BOOT_ID", "replace")],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("removing the stale header backup first"),
        "{}",
        stderr(&out)
    );
    let s = rig.status();
    assert_eq!(s["state"], "header-backed-up");
    let done = backup_records(&s, "done");
    assert_eq!(done.len(), 1);
    assert_eq!(done[0]["details"]["adopted"], serde_json::Value::Null);
    assert_eq!(file_blake3(&backup), device_header_blake3(&rig));
    assert!(!temp.exists());
    assert_eq!(rig.files_inside(), rig.files);
    drop(boot);
}

#[test]
fn a_boot_partition_too_small_for_the_backup_is_reported_before_anything_is_written() {
    let rig = Rig::new(Image::Plain, 128);
    let boot = Tmpfs::mount(&rig.boot, 32);
    rig.run_stage("initramfs");
    assert_eq!(rig.status()["state"], "complete");
    boot.fill_to("initramfs.img", 10);
    let device_before = file_blake3(&rig.device);
    let free_before = boot.free();

    let out = rig.cryptfs(&["run", "--stage", "userspace"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    let expected = format!(
        "boot partition {} has {:.1} MiB free, the header backup needs 16.0 MiB: free {:.1} MiB on {}",
        rig.boot.display(),
        free_before as f64 / MIB as f64,
        (16 * MIB - free_before) as f64 / MIB as f64,
        rig.boot.display()
    );
    assert!(err.contains(&expected), "expected {expected:?} in\n{err}");
    assert!(!err.contains("IO error"), "{err}");
    assert!(!rig.boot.join("luks.bin").exists());
    assert!(!rig.boot.join("luks.bin.tmp").exists());
    assert_eq!(file_blake3(&rig.device), device_before);
    let s = rig.status();
    assert_eq!(s["state"], "complete");
    assert!(
        backup_records(&s, "intent").is_empty(),
        "failed before its intent"
    );
    assert_eq!(backup_records(&s, "failed").len(), 1);
    drop(boot);
}

/// `cryptfs reseal` on the reference's 32 MiB boot partition after in-place encryption (a
/// 16 MiB header): no room for a second backup beside the first, so the superseded one makes
/// room, and the new `luks.bin` is the device's header (found by the Secure Boot VM tier, whose
/// reseal stopped there).
#[test]
fn reseal_refreshes_the_backup_on_a_32_mib_boot_partition() {
    let rig = Rig::new(Image::Plain, 128);
    let boot = Tmpfs::mount(&rig.boot, 32);
    rig.run_stage("all");
    assert_eq!(rig.status()["state"], "header-backed-up");
    let before = std::fs::read(rig.config().backup_path()).expect("luks.bin");
    assert!(
        boot.free() < before.len() as u64,
        "the test needs a partition without room for a second backup: {} free",
        boot.free()
    );
    let out = rig.cryptfs(&["reseal"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("header backup written again"));
    let status = rig.status();
    assert_eq!(status["header_backup"]["digest_ok"], true, "{status:#}");
    assert_eq!(status["state"], "header-backed-up");
    assert_ne!(
        std::fs::read(rig.config().backup_path()).expect("luks.bin"),
        before
    );
    assert_eq!(
        common::file_blake3(&rig.config().backup_path()),
        device_header_blake3(&rig),
        "luks.bin is the header as it is now"
    );
}
