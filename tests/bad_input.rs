//! Bad input: a clear, actionable error and not one byte of the device changed.

mod common;

use std::path::Path;
use std::process::Command;

use common::{config_text, cryptfs_with, file_blake3, make_ci_image, make_ext4, run, Swtpm};

struct Case {
    dir: tempfile::TempDir,
    device: std::path::PathBuf,
    config: std::path::PathBuf,
}

fn case(tcti: &str, make: impl FnOnce(&Path, &Path)) -> Case {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).expect("src");
    std::fs::write(src.join("hello.txt"), b"hello").expect("file");
    let device = dir.path().join("root.img");
    make(&device, &src);
    let boot = dir.path().join("boot");
    std::fs::create_dir_all(&boot).expect("boot");
    let config = dir.path().join("cryptfs.toml");
    std::fs::write(&config, config_text(&device, &boot, tcti, "")).expect("config");
    Case {
        dir,
        device,
        config,
    }
}

/// Runs every stage and checks: failure, the message, and an unchanged device.
fn refuses(case: &Case, expected: &[&str]) {
    let before = case.device.exists().then(|| file_blake3(&case.device));
    for stage in ["all", "initramfs"] {
        let out = cryptfs_with(&["run", "--stage", stage], &case.config, &[]);
        assert!(!out.status.success(), "must fail");
        let err = String::from_utf8_lossy(&out.stderr);
        for word in expected {
            assert!(err.contains(word), "error should mention {word:?}: {err}");
        }
        assert!(err.contains("cryptfs: error:"), "{err}");
        let after = case.device.exists().then(|| file_blake3(&case.device));
        assert_eq!(before, after, "the device must not change");
    }
    let _ = &case.dir;
}

#[test]
fn missing_device() {
    let tpm = Swtpm::start(tempfile::tempdir().expect("t").path());
    let c = case(&tpm.tcti(), |_, _| {});
    refuses(&c, &["not found", "root.img"]);
    assert!(
        !c.dir.path().join("boot/cryptfs").exists(),
        "nothing is created for a missing device"
    );
}

#[test]
fn neither_ext4_nor_luks() {
    let tpm = Swtpm::start(tempfile::tempdir().expect("t").path());
    let c = case(&tpm.tcti(), |dev, _| {
        std::fs::write(dev, common::random_bytes(96 << 20)).expect("write")
    });
    refuses(&c, &["neither an ext4 filesystem nor a LUKS2 volume"]);
}

#[test]
fn luks1_volume() {
    let tpm = Swtpm::start(tempfile::tempdir().expect("t").path());
    let c = case(&tpm.tcti(), |dev, _| {
        std::fs::write(dev, vec![0u8; 96 << 20]).expect("write");
        let mut child = Command::new("cryptsetup")
            .args([
                "luksFormat",
                "--batch-mode",
                "--type",
                "luks1",
                "--iter-time",
                "10",
            ])
            .arg(dev)
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("cryptsetup");
        use std::io::Write;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(b"pass")
            .expect("write");
        assert!(child.wait().expect("wait").success());
    });
    refuses(&c, &["LUKS1", "cryptsetup convert --type luks2"]);
}

#[test]
fn filesystem_too_full_to_shrink() {
    let tpm = Swtpm::start(tempfile::tempdir().expect("t").path());
    let c = case(&tpm.tcti(), |dev, src| {
        std::fs::write(src.join("filler.bin"), common::random_bytes(100 << 20)).expect("filler");
        make_ext4(dev, 128, src);
    });
    refuses(&c, &["too full to shrink by 32 MiB", "free at least"]);
}

#[test]
fn wrong_ci_passphrase() {
    let tpm = Swtpm::start(tempfile::tempdir().expect("t").path());
    let c = case(&tpm.tcti(), |dev, src| {
        make_ci_image(dev, 128, src, "not-the-default")
    });
    refuses(&c, &["wrong image passphrase", "built-in default"]);
}

#[test]
fn tpm_unreachable() {
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let tcti = format!("swtpm:host=127.0.0.1,port={port}");
    let plain = case(&tcti, |dev, src| make_ext4(dev, 128, src));
    refuses(&plain, &["TPM 2.0 unreachable"]);
    let ci = case(&tcti, |dev, src| {
        make_ci_image(dev, 128, src, common::CI_PASSPHRASE)
    });
    refuses(&ci, &["TPM 2.0 unreachable"]);
}

#[test]
fn userspace_stage_refuses_initramfs_work() {
    let tpm = Swtpm::start(tempfile::tempdir().expect("t").path());
    let c = case(&tpm.tcti(), |dev, src| make_ext4(dev, 128, src));
    let before = file_blake3(&c.device);
    let out = cryptfs_with(&["run", "--stage", "userspace"], &c.config, &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--stage initramfs"), "{err}");
    assert_eq!(file_blake3(&c.device), before);
}

#[test]
fn invalid_configuration_is_explained() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("bad.toml");
    std::fs::write(
        &config,
        "device = \"/x\"\nboot_dir = \"/y\"\n[kek]\nkind = \"tpm3\"\n",
    )
    .expect("write");
    let out = cryptfs_with(&["run"], &config, &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("invalid configuration") && err.contains("tpm3"),
        "{err}"
    );
    run("true", &[]);
}

/// PCR 7 in the policy and UEFI Secure Boot off, in setup mode, or no efivarfs at all: a fatal
/// error before any write, on both paths. `require_secure_boot = false` lets the same device
/// provision (the opt-out works, so the refusals are the check's, not something else's).
#[test]
fn secure_boot_off_or_in_setup_mode_or_absent_refuses_pcr7() {
    // The state directory lives as long as the TPM: the opt-out below writes NV state.
    let tpm_dir = tempfile::tempdir().expect("tpm dir");
    let tpm = Swtpm::start(tpm_dir.path());
    let refusals = [
        ("off", Some((false, false)), "UEFI Secure Boot is off"),
        ("setup", Some((true, true)), "in setup mode"),
        ("absent", None, "no UEFI variables at"),
    ];
    let mut refused = 0;
    for (name, state, expected) in refusals {
        let plain = case(&tpm.tcti(), |dev, src| make_ext4(dev, 128, src));
        let ci = case(&tpm.tcti(), |dev, src| {
            make_ci_image(dev, 128, src, common::CI_PASSPHRASE)
        });
        for c in [&plain, &ci] {
            let efivars = c.dir.path().join(format!("efivars-{name}"));
            if let Some((enabled, setup)) = state {
                cryptfs::secure_boot::write_fake_efivars(&efivars, enabled, setup)
                    .expect("efivars");
            }
            let text = std::fs::read_to_string(&c.config).expect("config");
            let text = text.replace(
                &format!(
                    "efivars_dir = \"{}\"",
                    common::secure_boot_on_efivars().display()
                ),
                &format!("efivars_dir = \"{}\"", efivars.display()),
            );
            assert!(text.contains(&efivars.display().to_string()));
            std::fs::write(&c.config, text).expect("config");
            refuses(c, &[expected, "require_secure_boot = false"]);
            refused += 1;
        }
        // The opt-out, on the CI image of the last case: provisioning goes ahead.
        if state.is_none() {
            let text = std::fs::read_to_string(&ci.config).expect("config");
            std::fs::write(
                &ci.config,
                text.replace("[kek.tpm2]\n", "[kek.tpm2]\nrequire_secure_boot = false\n"),
            )
            .expect("config");
            let out = cryptfs_with(&["run", "--stage", "initramfs"], &ci.config, &[]);
            assert!(
                out.status.success(),
                "require_secure_boot = false provisions: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    assert_eq!(refused, 6, "three Secure Boot states × two paths refused");
}
