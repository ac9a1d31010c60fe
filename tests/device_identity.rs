//! The journal is bound to the device it was written for: after the root partition is
//! re-flashed (ordinary in a factory), nothing journaled for the old content — the prepared
//! in-place header, the saved superblock, the backup digest — is applied to the new one. Real
//! libcryptsetup, e2fsprogs, redb and swtpm; the interruption is a test-only failpoint abort.

mod common;

use common::Image;
use common::{cryptfs_with, make_ci_image, make_ext4, sample_tree, Rig, CI_PASSPHRASE};
use serde_json::Value;

fn kept_aside(rig: &Rig, dir: &str, prefix: &str) -> Vec<String> {
    std::fs::read_dir(rig.boot.join(dir))
        .expect("dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(prefix) && n.contains(".other-device-"))
        .collect()
}

/// Re-flashes the rig's root image with new content; returns the new files.
fn reflash(rig: &mut Rig, ci: bool) {
    let src = rig.dir.path().join("src-reflashed");
    let files = sample_tree(&src, 4242);
    let size_mib = std::fs::metadata(&rig.device).expect("device").len() >> 20;
    std::fs::remove_file(&rig.device).expect("remove old image");
    if ci {
        make_ci_image(&rig.device, size_mib, &src, CI_PASSPHRASE);
    } else {
        make_ext4(&rig.device, size_mib, &src);
    }
    rig.files = files;
}

fn records(status: &Value) -> Vec<Value> {
    status["journal"]["records"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn interrupt_first_boot(rig: &Rig) {
    let out = cryptfs_with(
        &["run", "--stage", "initramfs"],
        &rig.config,
        &[("CRYPTFS_FAILPOINT", "encrypt-in-place:after-prepare")],
    );
    assert!(
        !out.status.success(),
        "the failpoint must stop the run: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        rig.config().temp_header_path().exists(),
        "the interruption left the prepared header behind; the run said: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn interrupted_first_boot_then_reflash_never_writes_the_old_header() {
    let mut rig = Rig::new(Image::Plain, 128);
    let mut journals_aside = 0;
    for replacement_is_ci in [false, true] {
        if replacement_is_ci {
            // The device provisioned in the first round is re-flashed with a plain image,
            // whose first boot is interrupted in turn.
            reflash(&mut rig, false);
            interrupt_first_boot(&rig);
            journals_aside += 1;
            assert_eq!(
                kept_aside(&rig, "", "luks.bin").len(),
                1,
                "old luks.bin kept"
            );
        } else {
            interrupt_first_boot(&rig);
        }
        reflash(&mut rig, replacement_is_ci);
        let status = rig.status();
        assert_eq!(status["journal"]["binding"], "other-device", "{status:#}");
        let expected_state = if replacement_is_ci {
            "encrypted-with-passphrase"
        } else {
            "unencrypted"
        };
        assert_eq!(status["state"], expected_state, "{status:#}");
        let headers_aside = kept_aside(&rig, "cryptfs", "encrypt-header.tmp").len();

        let out = rig.cryptfs(&["run", "--stage", "all"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{err}");
        assert!(err.contains("written for another device"), "{err}");
        journals_aside += 1;
        assert_eq!(
            kept_aside(&rig, "cryptfs", "journal.redb").len(),
            journals_aside,
            "the old journal is kept aside"
        );
        assert_eq!(
            kept_aside(&rig, "cryptfs", "encrypt-header.tmp").len(),
            headers_aside + 1,
            "the prepared header of the old device is kept aside, never placed"
        );
        let status = rig.status();
        assert_eq!(status["state"], "header-backed-up", "{status:#}");
        assert_eq!(status["journal"]["binding"], "matches", "{status:#}");
        let first = &records(&status)[0];
        assert_eq!(first["step"], "device-changed", "{first:#}");
        assert_eq!(
            rig.files_inside(),
            rig.files,
            "the re-flashed content survived, untouched by the old journal"
        );
    }
}

#[test]
fn same_device_resumes_and_is_never_taken_for_another() {
    // Every failpoint of the plain path is covered by crash_resume; here one cut in the shrink
    // (image file truncated) and one after the header (ext4 UUID became the LUKS2 UUID) must
    // both resume as the same device.
    for failpoint in [
        "encrypt-in-place:after-shrink",
        "encrypt-in-place:after-header",
    ] {
        let rig = Rig::new(Image::Plain, 128);
        let out = cryptfs_with(
            &["run", "--stage", "initramfs"],
            &rig.config,
            &[("CRYPTFS_FAILPOINT", failpoint)],
        );
        assert!(!out.status.success(), "{failpoint} must stop the run");
        assert_eq!(rig.status()["journal"]["binding"], "matches", "{failpoint}");
        let out = rig.run_stage("all");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("another device"), "{failpoint}: {err}");
        assert!(kept_aside(&rig, "cryptfs", "").is_empty(), "{failpoint}");
        assert_eq!(rig.status()["state"], "header-backed-up");
        assert_eq!(rig.files_inside(), rig.files, "{failpoint}");
    }
}
