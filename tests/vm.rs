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

/// Figures of this run, per scenario, in the order they were measured.
static FIGURES: std::sync::Mutex<Vec<(String, String, String)>> = std::sync::Mutex::new(Vec::new());

/// Prints a figure and rewrites the scenario's result file (`design/results/vm-<scenario>.md`)
/// with every figure of the scenario measured in this run: the README links to those files
/// instead of typing figures.
fn figure(scenario: &str, what: &str, value: impl std::fmt::Display) {
    let value = value.to_string();
    eprintln!("VM-FIGURE | {scenario} | {what} | {value} |");
    let mut figures = FIGURES
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    figures.push((scenario.to_string(), what.to_string(), value));
    let mut table = format!(
        "# VM scenario: {scenario}\n\nWritten by `tests/vm.rs` (QEMU TCG, 1 vCPU) on its last run.\n\n\
         | figure | value |\n|---|---|\n"
    );
    for (_, what, value) in figures.iter().filter(|(s, _, _)| s == scenario) {
        table.push_str(&format!("| {what} | {value} |\n"));
    }
    let slug = scenario
        .to_ascii_lowercase()
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|part| !part.is_empty())
        .collect::<Vec<_>>()
        .join("-");
    common::write_result(&format!("vm-{slug}.md"), &table);
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

fn reencrypt_percent(line: &str) -> Option<u32> {
    line.split("cryptfs: reencrypt:")
        .nth(1)?
        .trim_start()
        .split('%')
        .next()?
        .trim()
        .parse()
        .ok()
}

/// Progress between 10 % and 75 % (first attempt: the cut lands after the third such line).
fn mid_reencryption(line: &str) -> bool {
    reencrypt_percent(line).is_some_and(|p| (10..=75).contains(&p))
}

/// Cuts the power at any progress short of the end (later attempts, which resume first).
fn before_the_end(line: &str) -> bool {
    reencrypt_percent(line).is_some_and(|p| p < 95)
}

/// Boots a CI image and cuts the power during re-encryption, up to five times until the header
/// is caught with a hotzone in flight (libcryptsetup's "crash" state, checked on the host), then
/// boots with `config` and expects everything finished and intact. Fails when no cut caught a
/// hotzone in flight: the recovery this scenario exists for would not have been exercised.
/// Returns the boot after the cuts and whether the last cut caught a hotzone in flight (always
/// true; the callers check the recovery against it).
fn power_cut_then_resume(config: &'static str, restart: Option<u32>) -> (Boot, bool) {
    // Made by `cryptfs image encrypt` (PBKDF2 keyslot): what is under test is the recovery of
    // online re-encryption, and the cryptsetup-made image's Argon2id first unlock would only
    // add about 40 s of TCG time; vm_ci_image_reencrypts_online takes that image over.
    let mut disk = Disk::new(RootImage::CryptfsCiLuks, ROOT_MIB);
    // Cut a fraction of a hotzone's time after this boot's third progress line, the time
    // measured between its second and third (fixed delays after the first line missed every
    // hotzone on a loaded host: a resumed boot's first line is its resume point, before any
    // hotzone runs). The header tells whether the cut landed inside one; otherwise the next
    // attempt cuts again.
    let fractions = [0.3, 0.5, 0.2, 0.4, 0.65];
    let mut crashed = false;
    for (attempt, fraction) in fractions.iter().enumerate() {
        let boot = disk.boot(&BootOptions {
            cut_when: Some(if attempt == 0 {
                mid_reencryption
            } else {
                before_the_end
            }),
            cut_fraction: Some(*fraction),
            ..BootOptions::default()
        });
        assert!(
            boot.cut,
            "re-encryption never reached the cut point\n{}",
            boot.console()
        );
        crashed = common::luks2(&disk.extract_root()).reencrypt_crashed();
        eprintln!(
            "VM-NOTE | power cut {config} | attempt {attempt}: hotzone in flight: {crashed} |"
        );
        if crashed {
            figure(
                &format!("power cut, {config}"),
                "cuts until a hotzone was caught in flight",
                attempt + 1,
            );
            break;
        }
    }
    assert!(
        crashed,
        "{config}: none of {} power cuts caught a hotzone in flight; the hotzone recovery was \
         not exercised",
        fractions.len()
    );
    let second = disk.boot(&BootOptions {
        config,
        restart_service_after: restart,
        ..BootOptions::default()
    });
    assert_healthy(&second, "boot after the power cut");
    // The workload's files from before the cut verified at mount (included in files-ok).
    let meta = common::luks2(&disk.extract_root());
    assert!(meta.reencrypt_mode().is_none());
    (second, crashed)
}

#[test]
fn vm_power_cut_during_online_reencryption_resumes_blocking_in_initramfs() {
    let (second, crashed) = power_cut_then_resume("blocking", None);
    let console = second.console();
    let mounted = index_of(&second, "CRYPTFS-VM: mounted").expect("mounted");
    let progress = index_of(&second, "cryptfs: reencrypt:").expect("resumed");
    assert!(
        progress < mounted,
        "expected the initramfs to finish first\n{console}"
    );
    // A hotzone in flight is recovered offline before the resume.
    assert_eq!(
        second.saw("recovering the hotzone first"),
        crashed,
        "hotzone recovery does not match the header's state\n{console}"
    );
    figure(
        "power cut, blocking",
        "kernel start to root mounted (s)",
        second.mounted_after().unwrap_or(0.0),
    );
}

#[test]
fn vm_power_cut_during_online_reencryption_finishes_in_the_background() {
    // The service is also stopped (SIGTERM) mid-way and started again, as a restart does.
    let (second, crashed) = power_cut_then_resume("background", Some(3));
    let console = second.console();
    let mounted = index_of(&second, "CRYPTFS-VM: mounted").expect("mounted");
    let progress = index_of(&second, "cryptfs: reencrypt:").expect("resumed");
    assert!(
        mounted < progress,
        "expected the root mounted before re-encryption went on\n{console}"
    );
    // A hotzone in flight is repaired in the initramfs (recover-reencrypt), before activation;
    // a clean cut needs nothing there. (The console carries tracing's colours: match words.)
    let recover = second
        .lines
        .iter()
        .position(|l| l.contains("step starting") && l.contains("recover-reencrypt"));
    assert_eq!(recover.is_some(), crashed, "{console}");
    assert!(
        recover.is_none_or(|r| r < mounted),
        "repair must come before activation\n{console}"
    );
    // Stopped between two hotzones (exit 75, the unit's SuccessExitStatus=), then resumed.
    let stopped = second
        .marker("service-stopped")
        .unwrap_or_default()
        .to_string();
    assert!(stopped.starts_with("service-stopped rc=75"), "{console}");
    assert!(second.saw("stopped on request"), "{console}");
    let resumed = index_of(&second, "CRYPTFS-VM: service-stopped").expect("stopped");
    assert!(
        second.lines[resumed..]
            .iter()
            .any(|l| l.contains("resuming an interrupted re-encryption")),
        "the restarted service did not resume\n{console}"
    );
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
    // `[activation]` (both workqueue flags in this configuration): the kernel's live table
    // after the online re-encryption and its table swaps, and the header after the backup.
    let mapping = second.marker("mapping ").unwrap_or_default();
    let options: Vec<&str> = mapping
        .split_once("options:")
        .map(|(_, o)| o.split_whitespace().collect())
        .unwrap_or_default();
    for flag in ["no_read_workqueue", "no_write_workqueue"] {
        assert!(
            options.contains(&flag),
            "live table without {flag}: {mapping:?}\n{console}"
        );
    }
    let sectors = second.marker("sectors ").unwrap_or_default();
    assert!(
        sectors.ends_with("persistent flags: no-read-workqueue no-write-workqueue"),
        "header flags: {sectors:?}\n{console}"
    );
    figure(
        "power cut, background",
        "live dm-crypt options at the end",
        options.join(" "),
    );
}

#[test]
fn vm_damaged_header_is_restored_only_from_a_backup_that_matches_the_journal() {
    let mut disk = Disk::new(RootImage::Plain, ROOT_MIB);
    assert_healthy(&disk.boot(&BootOptions::default()), "first boot");
    // Both header copies fail their checksum (magic kept): one bad copy would be repaired
    // from the other, without the backup.
    let damage_both = |disk: &Disk| {
        disk.write_root(448, &[0xffu8; 64]);
        disk.write_root(16384 + 448, &[0xffu8; 64]);
    };
    damage_both(&disk);
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
    damage_both(&disk);
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

/// A CI image made by `cryptfs image encrypt` (the build host's half, PBKDF2 in keyslot 31 and
/// the key-origin marker) is taken over on its first real boot: enrolled and wiped in the
/// initramfs, re-encrypted online, files intact; its first boot is not held up by the CI
/// keyslot's KDF (compare `vm-ci-image.md`'s first boot, Argon2id).
#[test]
fn vm_cryptfs_made_ci_image_is_taken_over() {
    use cryptfs::luks::marker;
    use cryptfs_states::VolumeKeyOrigin;
    let mut disk = Disk::new(RootImage::CryptfsCiLuks, 128);
    let before = common::luks2(&disk.extract_root());
    assert_eq!(marker::origin(&before), Some(VolumeKeyOrigin::Image));
    let old_digest = before.segment_digest().expect("digest").to_string();

    let first = disk.boot(&BootOptions::default());
    assert_healthy(&first, "first boot");
    let root = disk.extract_root();
    let after = common::luks2(&root);
    assert_ne!(
        after.segment_digest(),
        Some(old_digest.as_str()),
        "volume key unchanged"
    );
    assert!(after.reencrypt_mode().is_none());
    assert!(after.passphrase_keyslots().is_empty());
    assert!(common::volume_key_with(&root, common::CI_PASSPHRASE).is_none());
    assert_eq!(marker::origin(&after), Some(VolumeKeyOrigin::Reencrypted));
    let s = "cryptfs-made CI image";
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
}
