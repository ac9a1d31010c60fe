//! Real boots under QEMU (TCG): dm-crypt activation with the TPM token, the root mounted from the
//! mapping, online re-encryption in the background while a workload writes and re-reads files,
//! power cuts, header restore, PCR 7 and missing-TPM refusals. Every scenario checks the files
//! written before provisioning and during it by blake3 (in the guest, after dropping caches, so
//! the bytes come through dm-crypt), and prints its figures as `VM-FIGURE` lines.
//!
//! `cargo xtask vm` runs these with two VMs at a time at most (one per test thread).

mod common;
#[path = "vm_rig/mod.rs"]
mod vm_rig;

use vm_rig::{Boot, BootOptions, Disk, RootImage};

/// Root partition size: small enough for CI, large enough for 20 hotzones of 8 MiB.
const ROOT_MIB: u64 = 160;

fn figure(scenario: &str, what: &str, value: impl std::fmt::Display) {
    eprintln!("VM-FIGURE | {scenario} | {what} | {value} |");
}

/// A boot that provisioned (or found provisioned), mounted, ran the userspace stage to its end
/// with the workload, and verified every file.
fn assert_healthy(boot: &Boot, what: &str) {
    let console = boot.console();
    assert!(!boot.cut, "{what}: unexpected power cut");
    assert!(boot.marker("fatal").is_none(), "{what}: fatal\n{console}");
    assert!(
        boot.marker("files-ok-at-mount").is_some(),
        "{what}: files bad at mount\n{console}"
    );
    assert!(
        boot.marker("userspace-exit 0 ").is_some(),
        "{what}: userspace stage failed\n{console}"
    );
    assert!(
        boot.marker("userspace-exit 0 ")
            .is_some_and(|m| m.ends_with("bad-reads=0")),
        "{what}: a read during the userspace stage did not verify\n{console}"
    );
    assert!(
        boot.marker("files-ok ").is_some(),
        "{what}: files bad\n{console}"
    );
    assert_eq!(
        boot.marker("state "),
        Some("state header-backed-up"),
        "{what}\n{console}"
    );
    assert!(
        boot.marker("end").is_some(),
        "{what}: no clean end\n{console}"
    );
}

fn index_of(boot: &Boot, needle: &str) -> Option<usize> {
    boot.lines.iter().position(|l| l.contains(needle))
}

fn fs_kib(boot: &Boot, prefix: &str) -> u64 {
    boot.marker(prefix)
        .and_then(|m| m.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}

#[test]
fn vm_plain_root_first_boot_encrypts_in_place_then_unlocks_unattended() {
    let mut disk = Disk::new(RootImage::Plain, ROOT_MIB);
    let first = disk.boot(&BootOptions::default());
    assert_healthy(&first, "first boot");
    assert!(first.saw("encrypt-in-place"), "{}", first.console());
    // The filesystem grew back into the space the data shift left.
    assert!(
        fs_kib(&first, "fs-kib ") > fs_kib(&first, "fs-kib-at-mount "),
        "filesystem did not grow\n{}",
        first.console()
    );
    let root = disk.extract_root();
    let meta = common::luks2(&root);
    assert!(
        meta.passphrase_keyslots().is_empty(),
        "a passphrase keyslot remains"
    );
    assert!(meta.tokens.values().any(|t| t.kind == "systemd-tpm2"));
    assert_eq!(meta.label, "otaroot");

    let second = disk.boot(&BootOptions::default());
    assert_healthy(&second, "second boot");
    assert!(
        !second.saw("step starting"),
        "the second boot provisioned again\n{}",
        second.console()
    );
    let s = "plain root";
    figure(
        s,
        "first boot: kernel start to root mounted (s)",
        first.mounted_after().unwrap_or(0.0),
    );
    figure(
        s,
        "second boot: kernel start to root mounted (s)",
        second.mounted_after().unwrap_or(0.0),
    );
    figure(
        s,
        "in-place encryption in the initramfs (MiB/s)",
        first.rate("encrypt-in-place").unwrap_or(0.0),
    );
}

#[test]
fn vm_ci_image_reencrypts_online_while_the_workload_writes() {
    let mut disk = Disk::new(RootImage::CiLuks, ROOT_MIB);
    let before = common::luks2(&disk.extract_root());
    let old_digest = before.segment_digest().expect("digest").to_string();

    let first = disk.boot(&BootOptions::default());
    assert_healthy(&first, "first boot");
    let console = first.console();
    // Enrolled and wiped in the initramfs, mounted, then re-encrypted online.
    let mounted = index_of(&first, "CRYPTFS-VM: mounted").expect("mounted");
    let progress = index_of(&first, "cryptfs: reencrypt:").expect("re-encryption progress");
    assert!(
        mounted < progress,
        "re-encryption ran before the root was mounted\n{console}"
    );
    let written: u32 = first
        .marker("userspace-exit")
        .and_then(|m| m.split("written=").nth(1)?.split(' ').next()?.parse().ok())
        .unwrap_or(0);
    assert!(
        written >= 2,
        "the workload wrote {written} files during re-encryption"
    );

    let root = disk.extract_root();
    let after = common::luks2(&root);
    assert_ne!(
        after.segment_digest(),
        Some(old_digest.as_str()),
        "volume key unchanged"
    );
    assert!(after.reencrypt_mode().is_none());
    assert!(after.passphrase_keyslots().is_empty());
    assert!(
        common::volume_key_with(&root, common::CI_PASSPHRASE).is_none(),
        "the CI passphrase still opens the volume"
    );

    let second = disk.boot(&BootOptions::default());
    assert_healthy(&second, "second boot");
    let s = "CI image";
    figure(
        s,
        "first boot: kernel start to root mounted (s)",
        first.mounted_after().unwrap_or(0.0),
    );
    figure(
        s,
        "online re-encryption under the workload (MiB/s)",
        first.rate("reencrypt").unwrap_or(0.0),
    );
    figure(
        s,
        "files written by the workload during re-encryption",
        written,
    );
    figure(
        s,
        "second boot: kernel start to root mounted (s)",
        second.mounted_after().unwrap_or(0.0),
    );
}

/// Cuts the power once online re-encryption is between 25 % and 75 %.
fn mid_reencryption(line: &str) -> bool {
    line.split("cryptfs: reencrypt:")
        .nth(1)
        .and_then(|rest| {
            rest.trim_start()
                .split('%')
                .next()?
                .trim()
                .parse::<u32>()
                .ok()
        })
        .is_some_and(|p| (25..=75).contains(&p))
}

fn power_cut_then_resume(config: &'static str) -> (Boot, Boot) {
    let mut disk = Disk::new(RootImage::CiLuks, ROOT_MIB);
    // Half a hotzone after a progress line (8 MiB at ~5 MiB/s under TCG): the cut lands
    // while a hotzone is being rewritten, the state libcryptsetup calls a crash.
    let first = disk.boot(&BootOptions {
        cut_when: Some(mid_reencryption),
        cut_delay: std::time::Duration::from_millis(700),
        ..BootOptions::default()
    });
    assert!(
        first.cut,
        "re-encryption never reached the cut point\n{}",
        first.console()
    );
    let second = disk.boot(&BootOptions {
        config,
        ..BootOptions::default()
    });
    assert_healthy(&second, "boot after the power cut");
    // The workload's files from before the cut verified at mount (included in files-ok).
    let meta = common::luks2(&disk.extract_root());
    assert!(meta.reencrypt_mode().is_none());
    (first, second)
}

#[test]
fn vm_power_cut_during_online_reencryption_resumes_blocking_in_initramfs() {
    let (_, second) = power_cut_then_resume("blocking");
    let console = second.console();
    let mounted = index_of(&second, "CRYPTFS-VM: mounted").expect("mounted");
    let progress = index_of(&second, "cryptfs: reencrypt:").expect("resumed");
    assert!(
        progress < mounted,
        "expected the initramfs to finish first\n{console}"
    );
    let recovered = second.saw("recovering the hotzone first");
    eprintln!("VM-NOTE | power cut, blocking | hotzone in flight at the cut: {recovered} |");
    figure(
        "power cut, blocking",
        "kernel start to root mounted (s)",
        second.mounted_after().unwrap_or(0.0),
    );
}

#[test]
fn vm_power_cut_during_online_reencryption_finishes_in_the_background() {
    let (_, second) = power_cut_then_resume("background");
    let console = second.console();
    let mounted = index_of(&second, "CRYPTFS-VM: mounted").expect("mounted");
    let progress = index_of(&second, "cryptfs: reencrypt:").expect("resumed");
    assert!(
        mounted < progress,
        "expected the root mounted before re-encryption went on\n{console}"
    );
    // A hotzone in flight at the cut is repaired in the initramfs, before activation.
    let recovered =
        second.saw("step starting step=recover-reencrypt") || second.saw("recover-reencrypt");
    eprintln!("VM-NOTE | power cut, background | hotzone in flight at the cut: {recovered} |");
    figure(
        "power cut, background",
        "kernel start to root mounted (s)",
        second.mounted_after().unwrap_or(0.0),
    );
    figure(
        "power cut, background",
        "online re-encryption after recovery (MiB/s)",
        second.rate("reencrypt").unwrap_or(0.0),
    );
}

#[test]
fn vm_damaged_header_is_restored_only_from_a_backup_that_matches_the_journal() {
    let mut disk = Disk::new(RootImage::Plain, ROOT_MIB);
    assert_healthy(&disk.boot(&BootOptions::default()), "first boot");
    // Primary binary header zeroed (the secondary copy is left alone, as in a torn write).
    disk.write_root(0, &[0u8; 4096]);
    let restored = disk.boot(&BootOptions::default());
    assert_healthy(&restored, "boot with a damaged header");
    assert!(
        restored.saw("restoring the verified backup"),
        "{}",
        restored.console()
    );
    assert!(common::luks2(&disk.extract_root()).primary_ok);

    // Now a backup that does not match its digest: never restored, nothing written.
    disk.with_boot_partition(|part| {
        let part = part.display().to_string();
        let dumped = disk.dir.path().join("luks.bin");
        common::run(
            "debugfs",
            &["-R", &format!("dump /luks.bin {}", dumped.display()), &part],
        );
        let mut bytes = std::fs::read(&dumped).expect("dumped backup");
        bytes[4096 + 100] ^= 0xff;
        std::fs::write(&dumped, bytes).expect("tampered");
        let script = disk.dir.path().join("debugfs.cmd");
        std::fs::write(
            &script,
            format!("rm /luks.bin\nwrite {} /luks.bin\n", dumped.display()),
        )
        .expect("script");
        common::run(
            "debugfs",
            &["-w", "-f", &script.display().to_string(), &part],
        );
    });
    disk.write_root(0, &[0u8; 4096]);
    let digest = disk.root_digest();
    let refused = disk.boot(&BootOptions::default());
    let fatal = refused.marker("fatal").unwrap_or_default().to_string();
    assert!(
        refused.saw("does not match the digest in the journal"),
        "{}",
        refused.console()
    );
    assert!(!fatal.is_empty(), "{}", refused.console());
    assert_eq!(disk.root_digest(), digest, "the root partition was written");
}

#[test]
fn vm_pcr7_changed_since_enrollment_is_fatal_and_writes_nothing() {
    let mut disk = Disk::new(RootImage::Plain, ROOT_MIB);
    assert_healthy(&disk.boot(&BootOptions::default()), "first boot");
    let digest = disk.root_digest();
    let boot = disk.boot(&BootOptions {
        extend_pcr7: true,
        ..BootOptions::default()
    });
    assert!(boot.marker("pcr7-extended").is_some(), "{}", boot.console());
    assert!(boot.marker("fatal").is_some(), "{}", boot.console());
    assert!(
        boot.saw("PCR 7"),
        "the message does not name PCR 7\n{}",
        boot.console()
    );
    assert!(boot.marker("mounted").is_none());
    assert_eq!(disk.root_digest(), digest, "the root partition was written");
}

#[test]
fn vm_no_tpm_device_is_fatal_before_any_write() {
    let mut disk = Disk::new(RootImage::Plain, ROOT_MIB);
    let digest = disk.root_digest();
    let boot = disk.boot(&BootOptions {
        tpm: false,
        ..BootOptions::default()
    });
    assert!(boot.marker("fatal").is_some(), "{}", boot.console());
    assert!(boot.saw("TPM 2.0 unreachable"), "{}", boot.console());
    assert!(boot.marker("mounted").is_none());
    assert_eq!(disk.root_digest(), digest, "the root partition was written");
}
