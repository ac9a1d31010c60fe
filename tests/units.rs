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
    verify_with_drop_in(unit_text, None)
}

/// Likewise, with `drop_in` as the generator's drop-in (under /etc: systemd-analyze reads no
/// generator output in a --root, and a drop-in reads the same from either place).
fn verify_with_drop_in(unit_text: &str, drop_in: Option<&str>) -> (bool, String) {
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
    // What ExecStartPre= makes and ExecStopPost= runs, and the tool that makes it.
    std::fs::create_dir_all(r.join("run/cryptfs")).expect("mkdir");
    std::fs::copy(common::BIN, r.join("run/cryptfs/cryptfs")).expect("binary copy");
    std::fs::copy("/usr/bin/install", r.join("usr/bin/install")).expect("install(1)");
    common::run(
        "cp",
        &[
            "-a",
            "/usr/lib/systemd/system",
            &r.join("usr/lib/systemd/").display().to_string(),
        ],
    );
    std::fs::write(r.join("etc/systemd/system/cryptfs.service"), unit_text).expect("unit");
    if let Some(text) = drop_in {
        let dir = r.join("etc/systemd/system/cryptfs.service.d");
        std::fs::create_dir_all(&dir).expect("drop-in dir");
        std::fs::write(dir.join(cryptfs::generator::DROP_IN), text).expect("drop-in");
    }
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
    // Bounded: the allowed starts, RestartSec= apart, fit inside the start-limit window, so a
    // failure that keeps coming back hits the limit and the unit stops in "failed".
    let seconds = |name: &str| -> u64 {
        let v = directive(name).unwrap_or_else(|| panic!("{name}= missing"));
        match v.strip_suffix("min") {
            Some(m) => m.parse::<u64>().expect("minutes") * 60,
            None => v.trim_end_matches('s').parse().expect("seconds"),
        }
    };
    let burst: u64 = directive("StartLimitBurst")
        .expect("StartLimitBurst= missing")
        .parse()
        .expect("burst");
    let (interval, restart) = (seconds("StartLimitIntervalSec"), seconds("RestartSec"));
    assert!((2..=10).contains(&burst), "a few tries: {burst}");
    assert!(restart >= 30, "not a tight loop: {restart} s");
    assert!(
        burst * restart < interval,
        "{burst} starts {restart} s apart must fall inside {interval} s to reach the limit"
    );
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
    fails_on_the_missing_configuration(words, "/etc/cryptfs/cryptfs.toml");
}

/// Runs the binary with `args`, the configuration `config` replaced by a missing file: it must
/// fail on that file, not on the arguments.
fn fails_on_the_missing_configuration<'a>(args: impl Iterator<Item = &'a str>, config: &str) {
    let args: Vec<String> = args
        .map(|w| w.replace(config, "/nonexistent/cryptfs.toml"))
        .collect();
    let out = Command::new(common::BIN)
        .args(&args)
        .output()
        .expect("cryptfs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("/nonexistent/cryptfs.toml"), "{err}");
}

fn directives(name: &str) -> Vec<&'static str> {
    UNIT.lines()
        .filter_map(|l| l.strip_prefix(name)?.strip_prefix('='))
        .collect()
}

#[test]
fn a_sigkill_mid_hotzone_is_repaired_by_a_copy_in_run() {
    // ExecStartPre= copies the binary and the configuration to /run while the root is healthy;
    // ExecStopPost= (after the main process died, whatever killed it) runs that copy on that
    // copy, so nothing it starts from lies on the root.
    let pre = directives("ExecStartPre");
    assert_eq!(
        pre,
        [
            "/usr/bin/install -D -m 0700 /usr/bin/cryptfs /run/cryptfs/cryptfs",
            "/usr/bin/install -m 0600 /etc/cryptfs/cryptfs.toml /run/cryptfs/cryptfs.toml",
        ]
    );
    let post = directives("ExecStopPost");
    assert_eq!(
        post,
        ["/run/cryptfs/cryptfs recover-online --config /run/cryptfs/cryptfs.toml"]
    );
    assert_eq!(directive("OOMScoreAdjust"), Some("-500"));
    // The command line is one the binary accepts.
    let mut words = post[0].split_whitespace();
    assert_eq!(words.next(), Some("/run/cryptfs/cryptfs"));
    fails_on_the_missing_configuration(words, "/run/cryptfs/cryptfs.toml");
    // With nothing suspended (this host has no such stack) it does nothing and succeeds.
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("cryptfs.toml");
    std::fs::write(
        &config,
        format!(
            "device = \"/dev/null\"\nboot_dir = \"{}\"\nmapping_name = \"cryptfs-units-test-none\"\n\n[kek]\nkind = \"tpm2\"\n",
            dir.path().display()
        ),
    )
    .expect("config");
    let out = Command::new(common::BIN)
        .args(["recover-online", "--config", &config.display().to_string()])
        .output()
        .expect("cryptfs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
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

/// A directory of stand-ins for what the module calls (`findfs`, `mount`, `umount`, the
/// `cryptfs` binary), each logging its arguments; the module itself runs unchanged under `sh`.
struct ModuleRig {
    dir: tempfile::TempDir,
}

impl ModuleRig {
    fn new() -> ModuleRig {
        let dir = tempfile::tempdir().expect("tempdir");
        let bin = dir.path().join("bin");
        std::fs::create_dir_all(&bin).expect("bin");
        let fakes = [
            (
                "findfs",
                "[ -n \"$FAKE_NO_BOOT\" ] && exit 1\necho /dev/fake-boot",
            ),
            ("mount", ""),
            ("umount", ""),
            ("sync", ""),
            (
                "cryptfs",
                "case \"$1\" in\n\
                 run) [ \"$FAKE_FAIL\" = run ] && { echo 'cryptfs: error: wipe-passphrase failed' >&2; exit 1; } ;;\n\
                 unlock) [ \"$FAKE_FAIL\" = unlock ] && exit 1; echo /dev/mapper/rootfs ;;\n\
                 esac\nexit 0",
            ),
        ];
        for (name, body) in fakes {
            let path = bin.join(name);
            std::fs::write(
                &path,
                format!("#!/bin/sh\necho \"{name} $*\" >>\"$CALLS\"\n{body}\n"),
            )
            .expect("fake");
            common::run("chmod", &["+x", &path.display().to_string()]);
        }
        ModuleRig { dir }
    }

    /// Sources the module with stub `msg`/`fatal`, runs `cryptfs_run`; returns (output, calls).
    fn run(&self, env: &[(&str, &str)]) -> (String, Vec<String>) {
        let module = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(MODULE);
        let d = self.dir.path();
        let calls = d.join("calls");
        let _ = std::fs::remove_file(&calls);
        let script = format!(
            "msg() {{ echo \"MSG: $*\"; }}\nfatal() {{ echo \"FATAL: $*\"; exit 1; }}\n\
             . {}\ncryptfs_run\necho \"ROOT: $bootparam_root\"",
            module.display()
        );
        let out = Command::new("sh")
            .args(["-c", &script])
            .env(
                "PATH",
                format!(
                    "{}:{}",
                    d.join("bin").display(),
                    std::env::var("PATH").unwrap_or_default()
                ),
            )
            .env("CALLS", &calls)
            .env("CRYPTFS_BIN", d.join("bin/cryptfs"))
            .env("CRYPTFS_CONFIG", d.join("cryptfs.toml"))
            .env("CRYPTFS_BOOT_DIR", d.join("boot"))
            .env("CRYPTFS_WAIT_SECONDS", "0")
            .envs(env.iter().copied())
            .output()
            .expect("sh");
        let calls = std::fs::read_to_string(&calls)
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect();
        (
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
            calls,
        )
    }
}

#[test]
fn the_initramfs_module_unmounts_boot_and_says_what_happened_on_every_exit() {
    let rig = ModuleRig::new();
    let boot = rig.dir.path().join("boot").display().to_string();
    let umount = format!("umount {boot}");
    let mut paths = 0;

    // A failure inside the stage: the journal has the state, the next boot resumes; /boot
    // is unmounted before fatal, after the run.
    let (out, calls) = rig.run(&[("FAKE_FAIL", "run")]);
    assert!(
        out.contains("FATAL: cryptfs: the initramfs stage failed"),
        "{out}"
    );
    assert!(out.contains("next boot resumes"), "{out}");
    assert!(!out.contains("nothing further was written"), "{out}");
    assert_eq!(calls.last(), Some(&umount), "{calls:?}");
    assert_eq!(calls.iter().filter(|c| **c == umount).count(), 1);
    assert!(calls.iter().any(|c| c.starts_with("mount /dev/fake-boot")));
    paths += 1;

    // The unlock fails after a successful stage.
    let (out, calls) = rig.run(&[("FAKE_FAIL", "unlock")]);
    assert!(out.contains("FATAL: cryptfs: cannot unlock"), "{out}");
    assert_eq!(calls.last(), Some(&umount), "{calls:?}");
    paths += 1;

    // Success: the mapping is handed over and /boot is unmounted too.
    let (out, calls) = rig.run(&[]);
    assert!(out.contains("ROOT: /dev/mapper/rootfs"), "{out}");
    assert!(!out.contains("FATAL"), "{out}");
    assert_eq!(calls.last(), Some(&umount), "{calls:?}");
    paths += 1;

    // No boot partition: nothing ran, nothing was mounted, so nothing is unmounted.
    let (out, calls) = rig.run(&[("FAKE_NO_BOOT", "1")]);
    assert!(
        out.contains("FATAL: cryptfs: no partition labelled 'boot'"),
        "{out}"
    );
    assert!(out.contains("nothing was written"), "{out}");
    assert!(
        !calls
            .iter()
            .any(|c| c.starts_with("cryptfs ") || c.starts_with("umount")),
        "{calls:?}"
    );
    paths += 1;
    assert_eq!(paths, 4);
}

#[test]
fn the_generator_makes_the_unit_require_the_configured_boot_dir() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let config = d.join("cryptfs.toml");
    std::fs::write(
        &config,
        common::config_text(
            Path::new("/dev/disk/by-label/otaroot"),
            Path::new("/srv/boot"),
            "device:/dev/tpmrm0",
            "journal = \"/var/lib/cryptfs/journal.redb\"",
        ),
    )
    .expect("config");
    let generator_dir = d.join("generator");
    // As systemd calls it: three directories, the configuration at its default unless told.
    let out = Command::new(common::BIN)
        .args(["systemd-generator", "--config"])
        .arg(&config)
        .arg(&generator_dir)
        .arg(d.join("early"))
        .arg(d.join("late"))
        .output()
        .expect("cryptfs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let drop_in = std::fs::read_to_string(
        generator_dir
            .join("cryptfs.service.d")
            .join(cryptfs::generator::DROP_IN),
    )
    .expect("drop-in written");
    assert!(
        drop_in.contains("RequiresMountsFor=/srv/boot /var/lib/cryptfs\n"),
        "{drop_in}"
    );
    let (ok, text) = verify_with_drop_in(UNIT, Some(&drop_in));
    assert!(
        ok && text.trim().is_empty(),
        "systemd-analyze verify: {text}"
    );
    // systemd-analyze does read the drop-in there: a bad one is noticed.
    let (_, text) = verify_with_drop_in(UNIT, Some(&drop_in.replace("=/srv/boot", "=srv/boot")));
    assert!(
        text.contains("RequiresMountsFor= path is not absolute"),
        "the drop-in went unread: {text}"
    );
    // No configuration: nothing written, success (a generator never holds up boot).
    let empty = d.join("empty");
    let out = Command::new(common::BIN)
        .args(["systemd-generator", "--config"])
        .arg(d.join("missing.toml"))
        .arg(&empty)
        .output()
        .expect("cryptfs");
    assert!(out.status.success());
    assert!(!empty.exists(), "nothing written without a configuration");
    // The installed script passes systemd's arguments through to the binary.
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../units/cryptfs-generator");
    assert!(common::run("sh", &["-n", &script.display().to_string()])
        .status
        .success());
    let via_script = d.join("via-script");
    let out = Command::new("sh")
        .arg(&script)
        .arg(&via_script)
        .arg(d.join("early"))
        .arg(d.join("late"))
        .env("CRYPTFS_BIN", common::BIN)
        .output()
        .expect("sh");
    // The script uses the default configuration, which this machine has not: nothing written.
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!via_script.exists());
}
