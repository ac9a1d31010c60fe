//! The systemd unit and the initramfs-framework module, checked with the real tools:
//! `systemd-analyze verify` (systemd 252) on a root holding the unit, the binary and systemd's
//! own units, and the module parsed by the shell. The VM tests run both for real.

mod common;

use std::path::Path;
use std::process::Command;

const UNIT: &str = include_str!("../units/cryptfs.service");
const MODULE: &str = "units/initramfs-framework/cryptfs";

/// `systemd-analyze verify` output for `unit_text` installed as cryptfs.service in a fresh root.
fn verify(unit_text: &str) -> (bool, String) {
    let root = tempfile::tempdir().expect("tempdir");
    let r = root.path();
    for d in [
        "usr/bin",
        "usr/lib/systemd",
        "etc/systemd/system",
        "etc/cryptfs",
    ] {
        std::fs::create_dir_all(r.join(d)).expect("mkdir");
    }
    std::fs::copy(common::BIN, r.join("usr/bin/cryptfs")).expect("binary");
    common::run(
        "cp",
        &[
            "-a",
            "/usr/lib/systemd/system",
            &r.join("usr/lib/systemd/").display().to_string(),
        ],
    );
    std::fs::write(r.join("etc/systemd/system/cryptfs.service"), unit_text).expect("unit");
    std::fs::write(r.join("etc/cryptfs/cryptfs.toml"), "").expect("config");
    let out = Command::new("systemd-analyze")
        .args([
            "verify",
            "--man=no",
            &format!("--root={}", r.display()),
            "cryptfs.service",
        ])
        .output()
        .expect("systemd-analyze (package systemd)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn systemd_analyze_verify_passes_on_the_service_unit() {
    let (ok, text) = verify(UNIT);
    assert!(
        ok && text.trim().is_empty(),
        "systemd-analyze verify: {text}"
    );
    // The same check notices a broken unit (so the pass above means something).
    let (_, text) = verify(&UNIT.replace("Nice=19", "Nice=99"));
    assert!(
        text.contains("Nice"),
        "a bad directive went unnoticed: {text}"
    );
}

fn directive(name: &str) -> Option<&'static str> {
    UNIT.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix('='))
}

#[test]
fn the_service_is_non_blocking_low_priority_and_restart_safe() {
    assert_eq!(directive("Type"), Some("exec"), "boot must not wait for it");
    assert_eq!(directive("Nice"), Some("19"));
    assert_eq!(directive("IOSchedulingClass"), Some("idle"));
    assert_eq!(directive("CPUSchedulingPolicy"), Some("idle"));
    assert_eq!(directive("NotifyAccess"), Some("main"), "STATUS= progress");
    assert_eq!(directive("Restart"), Some("on-failure"));
    assert_eq!(directive("KillMode"), Some("mixed"));
    assert_eq!(
        directive("SuccessExitStatus").map(str::parse::<u8>),
        Some(Ok(cryptfs::StoppedOnRequest::EXIT_CODE)),
        "a stop between hotzones is not a failure"
    );
    assert!(
        directive("Before").is_none(),
        "nothing may be ordered after it"
    );
    // ExecStart= is a command line the binary accepts: with a missing configuration it fails
    // on the configuration, not on the arguments.
    let exec = directive("ExecStart").expect("ExecStart");
    let mut words = exec.split_whitespace();
    assert_eq!(words.next(), Some("/usr/bin/cryptfs"));
    let args: Vec<String> = words
        .map(|w| w.replace("/etc/cryptfs/cryptfs.toml", "/nonexistent/cryptfs.toml"))
        .collect();
    let out = Command::new(common::BIN)
        .args(&args)
        .output()
        .expect("cryptfs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("/nonexistent/cryptfs.toml"), "{err}");
}

#[test]
fn the_initramfs_module_parses_and_is_enabled_only_when_configured() {
    let module = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(MODULE);
    let module = module.display().to_string();
    let parse = common::run("sh", &["-n", &module]);
    assert!(parse.status.success());
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("cryptfs.toml");
    let enabled = |config: &Path| {
        Command::new("sh")
            .args(["-c", &format!(". {module} && cryptfs_enabled")])
            .env("CRYPTFS_BIN", common::BIN)
            .env("CRYPTFS_CONFIG", config)
            .status()
            .expect("sh")
            .success()
    };
    assert!(!enabled(&config), "enabled without a configuration");
    std::fs::write(&config, "").expect("config");
    assert!(enabled(&config));
}
