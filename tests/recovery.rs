//! The recovery key end to end: real swtpm for the KEK, real libcryptsetup on image files,
//! stock `cryptsetup` and systemd 252's `systemd-cryptenroll` as the compatibility peers.
//! Escrow to a file and to a command; a failing escrow stops before the wipe; a crash at each
//! `enroll-recovery` failpoint resumes with the escrowed key matching the keyslot.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;

use common::{Image, Rig, CI_PASSPHRASE, RECOVERY_BOUNDARIES};

const SIZE_MIB: u64 = 96;

/// Rewrites the rig's configuration with a `[recovery]` section escrowing to a file and to a
/// command (both outside the boot partition the secret scan covers).
fn enable_recovery(rig: &Rig, command: &str, reencrypt: &str) -> (PathBuf, PathBuf) {
    let escrow = rig.dir.path().join("escrow");
    std::fs::create_dir_all(&escrow).expect("escrow dir");
    let file = escrow.join("recovery.key");
    let cmd_copy = escrow.join("from-command.key");
    let command = command.replace("OUT", &cmd_copy.display().to_string());
    let extra = format!(
        "[recovery]\nenabled = true\nescrow_file = \"{}\"\nescrow_command = [\"/bin/sh\", \"-c\", \"{command}\"]\n",
        file.display()
    );
    let mut text = common::config_text(&rig.device, &rig.boot, &rig.tpm.tcti(), &extra);
    text = text.replace(
        "[reencrypt]\n",
        &format!("[reencrypt]\npolicy = \"{reencrypt}\"\n"),
    );
    std::fs::write(&rig.config, text).expect("config");
    (file, cmd_copy)
}

fn run_all(rig: &Rig, failpoint: Option<&str>) -> Output {
    let env: Vec<(&str, &str)> = failpoint
        .map(|fp| vec![("CRYPTFS_FAILPOINT", fp)])
        .unwrap_or_default();
    rig.cryptfs_env(&["run", "--stage", "all"], &env)
}

fn recovery_slots(device: &Path) -> Vec<u32> {
    cryptfs::steps::recovery::recovery_keyslots(&common::luks2(device))
}

/// Checks the escrowed key with every peer; returns the recovery keyslot.
fn assert_escrowed_key_opens(rig: &Rig, file: &Path, outputs: &mut Vec<Output>) -> u32 {
    let mode = std::fs::metadata(file)
        .expect("escrow file")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "escrow file mode");
    let key = std::fs::read(file).expect("escrow file");
    let slots = recovery_slots(&rig.device);
    assert_eq!(slots.len(), 1, "exactly one recovery keyslot: {slots:?}");
    let slot = slots[0];
    // Stock cryptsetup, with the key as typed.
    let out = common::run_with_stdin(
        "cryptsetup",
        &[
            "open",
            "--test-passphrase",
            "--key-slot",
            &slot.to_string(),
            &rig.device.display().to_string(),
        ],
        &key,
    );
    assert!(
        out.status.success(),
        "cryptsetup: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // cryptfs, from the file and from standard input.
    let out = rig.cryptfs(&[
        "unlock",
        "--test",
        "--recovery-key-file",
        &file.display().to_string(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("keyslot {slot}")));
    outputs.push(out);
    let out = common::run_with_stdin(
        common::BIN,
        &[
            "unlock",
            "--test",
            "--recovery-key-file",
            "-",
            "--config",
            &rig.config.display().to_string(),
        ],
        &key,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    outputs.push(out);
    // systemd 252 sees a recovery slot.
    let out = common::run("systemd-cryptenroll", &[&rig.device.display().to_string()]);
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(
        listing
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == [&slot.to_string(), "recovery"]),
        "{listing}"
    );
    slot
}

fn assert_no_key_leaked(rig: &Rig, file: &Path, outputs: &[Output]) {
    let key = std::fs::read(file).expect("escrow file");
    let key = key.trim_ascii();
    let undashed: Vec<u8> = key.iter().copied().filter(|b| *b != b'-').collect();
    common::assert_nothing_written_contains(rig, &[key, &undashed, &key[..17]], outputs);
}

#[test]
fn both_paths_escrow_then_enroll_a_key_stock_tools_use() {
    let mut cases = 0;
    for (image, reencrypt) in [(Image::Plain, "when-from-image"), (Image::Ci, "never")] {
        let rig = Rig::new(image, SIZE_MIB);
        let (file, from_cmd) = enable_recovery(&rig, "umask 077; cat > OUT", reencrypt);
        let (outputs, slot) = finish_and_open(&rig, &file, "");
        assert_eq!(
            std::fs::read(&file).expect("file"),
            std::fs::read(&from_cmd).expect("cmd")
        );
        let meta = common::luks2(&rig.device);
        assert_eq!(
            meta.keyslots.len(),
            2,
            "KEK + recovery only: {:?}",
            meta.keyslots.keys()
        );
        assert!(meta.passphrase_keyslots().is_empty());
        let status = rig.status();
        assert_eq!(status["state"], "header-backed-up", "{status}");
        let roles: Vec<(u64, String)> = status["device"]["keyslots"]
            .as_array()
            .expect("keyslots")
            .iter()
            .map(|k| {
                (
                    k["id"].as_u64().expect("id"),
                    k["role"].as_str().expect("role").to_string(),
                )
            })
            .collect();
        assert!(
            roles.contains(&(u64::from(slot), "recovery".to_string())),
            "{roles:?}"
        );
        assert_eq!(
            roles.iter().filter(|(_, r)| r == "kek").count(),
            1,
            "{roles:?}"
        );
        assert_eq!(rig.files_inside(), rig.files);
        // `--wipe-slot=recovery` removes exactly that keyslot.
        let out = common::run(
            "systemd-cryptenroll",
            &["--wipe-slot=recovery", &rig.device.display().to_string()],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let after = common::luks2(&rig.device);
        assert!(!after.keyslots.contains_key(&slot));
        assert_eq!(after.keyslots.len(), 1);
        assert_no_key_leaked(&rig, &file, &outputs);
        cases += 1;
    }
    assert_eq!(cases, 2);
}

#[test]
fn a_failing_escrow_stops_before_the_wipe_and_the_next_run_succeeds() {
    let rig = Rig::new(Image::Ci, SIZE_MIB);
    let (file, _) = enable_recovery(
        &rig,
        "cat > /dev/null; echo escrow refused >&2; exit 3",
        "never",
    );
    let out = run_all(&rig, None);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("escrow refused") && err.contains("escrow command"),
        "{err}"
    );
    let meta = common::luks2(&rig.device);
    assert_eq!(
        meta.passphrase_keyslots(),
        vec![31],
        "passphrase keyslot kept"
    );
    assert!(recovery_slots(&rig.device).is_empty());
    assert_eq!(
        meta.keyslots.len(),
        2,
        "KEK + passphrase, no recovery keyslot"
    );
    common::volume_key_with(&rig.device, CI_PASSPHRASE).expect("passphrase still opens");
    let escrowed_by_file = std::fs::read(&file).expect("file escrow ran first");
    let (file, _) = enable_recovery(&rig, "cat > OUT", "never");
    let (outputs, _) = finish_and_open(&rig, &file, "");
    assert_ne!(
        std::fs::read(&file).expect("file"),
        escrowed_by_file,
        "a fresh key"
    );
    assert!(common::luks2(&rig.device).passphrase_keyslots().is_empty());
    assert_no_key_leaked(&rig, &file, &outputs);
}

#[test]
fn a_crash_at_every_recovery_failpoint_resumes_with_the_escrowed_key() {
    let mut cut = 0;
    for fp in RECOVERY_BOUNDARIES {
        let rig = Rig::new(Image::Ci, SIZE_MIB);
        let (file, from_cmd) = enable_recovery(&rig, "cat > OUT", "never");
        let out = run_all(&rig, Some(fp));
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(err.contains(&format!("failpoint {fp} hit")), "{fp}: {err}");
        assert_eq!(
            common::luks2(&rig.device).passphrase_keyslots().len(),
            if *fp == "enroll-recovery:after-keyslot" {
                2
            } else {
                1
            },
            "{fp}: nothing wiped before the recovery key is in place"
        );
        let (outputs, _) = finish_and_open(&rig, &file, fp);
        assert_eq!(
            std::fs::read(&file).expect("file"),
            std::fs::read(&from_cmd).expect("cmd")
        );
        assert_eq!(
            common::luks2(&rig.device).keyslots.len(),
            2,
            "{fp}: no orphan keyslot"
        );
        assert_no_key_leaked(&rig, &file, &outputs);
        cut += 1;
    }
    assert_eq!(cut, RECOVERY_BOUNDARIES.len());
    assert_eq!(cut, 4);
}

/// Runs every stage to the end (it must succeed), then checks that the escrowed key opens the
/// volume; returns the outputs seen (for the leak scans) and the recovery keyslot.
fn finish_and_open(rig: &Rig, file: &Path, what: &str) -> (Vec<std::process::Output>, u32) {
    let out = run_all(rig, None);
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut outputs = vec![out];
    let slot = assert_escrowed_key_opens(rig, file, &mut outputs);
    (outputs, slot)
}
