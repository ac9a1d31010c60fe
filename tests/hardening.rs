//! Small hardening points, each on the real binary and real components: secret files refused
//! unless private, the temporary header private and never reused when foreign, key material
//! files private, `--config`'s default, cryptsetup-style sizes, one progress line per update.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::{file_blake3, Image, Rig, SoftHsm};

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").expect("/proc/self").uid() == 0
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .expect("metadata")
        .permissions()
        .mode()
        & 0o7777
}

/// Runs the initramfs stage, expects a refusal naming `expected`, and the device untouched.
fn refuses(rig: &Rig, expected: &[&str]) {
    let before = file_blake3(&rig.device);
    let out = rig.cryptfs(&["run", "--stage", "initramfs"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "accepted: {err}");
    for e in expected {
        assert!(err.contains(e), "expected {e:?} in: {err}");
    }
    assert_eq!(file_blake3(&rig.device), before, "device unchanged");
}

#[test]
fn secret_files_open_to_group_or_others_are_refused_before_any_write() {
    let mut checked = 0;
    // PKCS#11 user PIN and SO PIN (a fresh SoftHSM2 slot: the SO PIN is needed to initialise).
    let mut rig = Rig::new(Image::Plain, 128);
    let hsm = SoftHsm::new(rig.dir.path());
    rig.use_pkcs11(&hsm, 0);
    for (file, mode) in [(&hsm.pin, 0o640), (&hsm.pin, 0o604), (&hsm.so_pin, 0o644)] {
        chmod(file, mode);
        let path = file.display().to_string();
        refuses(
            &rig,
            &[
                &path,
                &format!("mode {mode:04o}"),
                &format!("chmod 600 {path}"),
            ],
        );
        chmod(file, 0o600);
        checked += 1;
    }
    // Owned by another user (the test runs as root in CI: it can give the file away).
    if is_root() {
        std::os::unix::fs::chown(&hsm.pin, Some(4242), None).expect("chown");
        refuses(&rig, &[&hsm.pin.display().to_string(), "owned by uid 4242"]);
        std::os::unix::fs::chown(&hsm.pin, Some(0), None).expect("chown back");
        checked += 1;
    } else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI runs as root"
        );
    }
    // The CI image's passphrase file.
    let ci = Rig::new(Image::Ci, 128);
    let pass = ci.dir.path().join("image-passphrase");
    std::fs::write(&pass, format!("{}\n", common::CI_PASSPHRASE)).expect("write");
    chmod(&pass, 0o644);
    let text = std::fs::read_to_string(&ci.config)
        .expect("config")
        .replacen(
            "boot_dir",
            &format!("image_passphrase_file = \"{}\"\nboot_dir", pass.display()),
            1,
        );
    std::fs::write(&ci.config, text).expect("config");
    refuses(
        &ci,
        &[&pass.display().to_string(), "mode 0644", "chmod 600"],
    );
    checked += 1;
    // Once private, the same files are accepted and the whole first stage runs.
    chmod(&pass, 0o600);
    ci.run_stage("initramfs");
    assert_eq!(checked, if is_root() { 5 } else { 4 });
}

#[test]
fn a_foreign_temporary_header_is_refused_and_key_material_files_are_private() {
    let rig = Rig::new(Image::Plain, 128);
    let temp = rig.config().temp_header_path();
    std::fs::create_dir_all(temp.parent().expect("dir")).expect("mkdir");
    std::fs::write(&temp, b"someone else's header").expect("plant");
    refuses(
        &rig,
        &[
            &temp.display().to_string(),
            "not this run's temporary header",
        ],
    );
    assert_eq!(
        std::fs::read(&temp).expect("kept"),
        b"someone else's header",
        "a foreign file is neither used nor removed"
    );
    std::fs::remove_file(&temp).expect("rm");
    rig.run_stage("all");
    assert!(!temp.exists(), "the temporary header is gone at the end");
    // The header backup holds keyslot areas: private to its owner.
    let backup = rig.config().backup_path();
    assert_eq!(
        mode(&backup) & 0o077,
        0,
        "luks.bin mode {:04o}",
        mode(&backup)
    );
}

#[cfg(feature = "failpoints")]
#[test]
fn the_temporary_header_is_private_and_its_own_stale_copy_is_replaced_on_resume() {
    let rig = Rig::new(Image::Plain, 128);
    let temp = rig.config().temp_header_path();
    // Even under a permissive umask the header is 0600 from its first byte: observed at the
    // moment it is complete, before it is placed.
    let out = rig.cryptfs_env(
        &["run", "--stage", "initramfs"],
        &[("CRYPTFS_FAILPOINT", "encrypt-in-place:after-prepare")],
    );
    assert!(!out.status.success());
    assert_eq!(mode(&temp), 0o600, "temporary header mode");
    // A crash inside the prepare (journaled intent, "prepared" not reached) leaves a partial
    // header of ours: the resumed run removes it and makes it again.
    let rig = Rig::new(Image::Plain, 128);
    let temp = rig.config().temp_header_path();
    let out = rig.cryptfs_env(
        &["run", "--stage", "initramfs"],
        &[("CRYPTFS_FAILPOINT", "encrypt-in-place:after-shrink")],
    );
    assert!(!out.status.success());
    std::fs::write(&temp, b"partial header of an interrupted prepare").expect("partial");
    chmod(&temp, 0o644);
    let out = rig.run_stage("initramfs");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("removing the temporary header"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    rig.run_stage("userspace");
    assert_eq!(rig.status()["state"], "header-backed-up");
    assert_eq!(rig.files_inside(), rig.files);
}

#[test]
fn config_defaults_to_etc_cryptfs_cryptfs_toml() {
    assert!(
        !Path::new("/etc/cryptfs/cryptfs.toml").exists(),
        "this machine has a real configuration: the test would read it"
    );
    let out = std::process::Command::new(common::BIN)
        .arg("status")
        .output()
        .expect("cryptfs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("cannot read configuration /etc/cryptfs/cryptfs.toml"),
        "{err}"
    );
}

#[test]
fn hotzone_size_is_read_as_cryptsetup_reads_sizes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("cryptfs.toml");
    let device = dir.path().join("root.img");
    std::fs::File::create(&device)
        .expect("img")
        .set_len(1 << 20)
        .expect("len");
    let with = |size: &str| {
        let text = common::config_text(&device, dir.path(), "device:/dev/null", "")
            .replace("hotzone_size = 8388608", &format!("hotzone_size = {size}"));
        std::fs::write(&config, text).expect("config");
        let out = common::cryptfs_with(&["status", "--json"], &config, &[]);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    for ok in ["8388608", "\"8M\"", "\"8MiB\"", "\"8MB\"", "\"16384s\""] {
        let (success, err) = with(ok);
        assert!(success, "{ok}: {err}");
    }
    let (success, err) = with("\"8 M\"");
    assert!(!success && err.contains("invalid size \"8 M\""), "{err}");
    let (success, err) = with("\"20000000T\"");
    assert!(!success && err.contains("does not fit in 64 bits"), "{err}");
    // Parsed, then still checked: a sector multiple of at least 1 MiB.
    let (success, err) = with("\"1000KB\"");
    assert!(!success && err.contains("at least 1 MiB"), "{err}");
}

/// Every progress update of a real re-encryption reaches stderr exactly once.
#[test]
fn each_progress_update_is_printed_once() {
    let rig = Rig::new(Image::Ci, 128);
    rig.run_stage("initramfs");
    let out = rig.run_stage("userspace");
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Any line that reports re-encryption progress, in whatever form: keyed by bytes done.
    let mut per_update: BTreeMap<String, usize> = BTreeMap::new();
    for line in stderr.lines() {
        let done = line
            .split_once("done_bytes=")
            .map(|(_, rest)| rest.split_whitespace().next().unwrap_or("").to_string())
            .or_else(|| {
                line.contains("reencrypt:")
                    .then(|| line.split_once('%').map(|(_, r)| r.trim().to_string()))
                    .flatten()
                    .and_then(|r| {
                        r.strip_prefix('(')
                            .map(|r| r.split(' ').next().unwrap_or("").to_string())
                    })
                    .map(|mib| format!("{mib} MiB"))
            })
            .or_else(|| {
                line.split_once("done_mib=")
                    .map(|(_, r)| format!("{} MiB", r.split_whitespace().next().unwrap_or("")))
            });
        if let Some(done) = done {
            *per_update.entry(done).or_default() += 1;
        }
    }
    let progress_lines = stderr
        .lines()
        .filter(|l| l.contains("reencrypt") && (l.contains('%') || l.contains("done_")))
        .count();
    // 112 MiB of data in 8 MiB hotzones: libcryptsetup reports once per hotzone (more than 5 %).
    assert!(
        per_update.len() >= 14,
        "every hotzone of a 112 MiB re-encryption is reported: {per_update:?}\n{stderr}"
    );
    assert_eq!(
        progress_lines,
        per_update.len(),
        "one line per update:\n{stderr}"
    );
    assert!(
        per_update.values().all(|n| *n == 1),
        "an update printed more than once: {per_update:?}"
    );
    assert!(stderr.contains("reencrypt: 100%"), "{stderr}");
    println!(
        "progress: {} updates, one stderr line each",
        per_update.len()
    );
}
