//! libcryptsetup's log, its debug lines included (`CRYPTFS_CRYPTSETUP_DEBUG`), goes to stderr:
//! stdout carries only each command's own result. Without a log callback libcryptsetup prints
//! on stdout, and the initramfs, which reads the root device's path from
//! `cryptfs unlock --device-path`, could not mount the root.

mod common;

use std::process::Output;

use common::{Image, Rig};

const DEBUG: (&str, &str) = ("CRYPTFS_CRYPTSETUP_DEBUG", "1");

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// libcryptsetup lines on stderr (proof that debug output was on and was routed there).
fn library_lines(out: &Output) -> usize {
    text(&out.stderr)
        .lines()
        .filter(|l| l.contains("libcryptsetup: "))
        .count()
}

#[test]
fn libcryptsetup_debug_lines_reach_stderr_and_never_stdout() {
    let rig = Rig::new(Image::Plain, 128);
    let run = rig.cryptfs_env(&["run", "--stage", "all"], &[DEBUG]);
    assert!(run.status.success(), "{}", text(&run.stderr));
    assert_eq!(text(&run.stdout), "cryptfs: state header-backed-up\n");
    assert!(library_lines(&run) > 20, "{}", text(&run.stderr));

    let test = rig.cryptfs_env(&["unlock", "--test"], &[DEBUG]);
    assert!(test.status.success(), "{}", text(&test.stderr));
    let stdout = text(&test.stdout);
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert!(
        stdout.starts_with("cryptfs: token ") && stdout.contains("(test only, nothing activated)"),
        "{stdout}"
    );
    assert!(library_lines(&test) > 5, "{}", text(&test.stderr));

    // No device-mapper on the host: activation fails, and stdout, which the initramfs takes
    // as the root device's path, stays empty.
    std::fs::write(
        &rig.config,
        common::config_text(
            &rig.device,
            &rig.boot,
            &rig.tpm.tcti(),
            "mapping_name = \"cryptfs-log-test\"",
        ),
    )
    .expect("config with a mapping name");
    let activate = rig.cryptfs_env(&["unlock", "--device-path"], &[DEBUG]);
    assert!(!activate.status.success());
    assert_eq!(text(&activate.stdout), "");
    assert!(library_lines(&activate) > 5, "{}", text(&activate.stderr));

    let status = rig.cryptfs_env(&["status", "--json"], &[DEBUG]);
    assert!(status.status.success(), "{}", text(&status.stderr));
    let report: serde_json::Value =
        serde_json::from_slice(&status.stdout).expect("stdout is the status JSON alone");
    assert_eq!(report["state"], "header-backed-up");
}
