//! `cargo xtask bench`: cryptfs against the cryptsetup CLI on the same data in the same run.
//!
//! Two operations, each on its own copy of one image, on tmpfs when /dev/shm exists:
//! - in-place encryption of a plain ext4 root: the reference's initramfs sequence (e2fsck,
//!   resize2fs, `cryptsetup reencrypt --encrypt --reduce-device-size 32M`) against
//!   `cryptfs run --stage initramfs` (which also seals the KEK in a swtpm and journals);
//! - volume-key change of a CI image: `cryptsetup reencrypt` (offline) against
//!   `cryptfs run --stage userspace` (which also writes the header backup).
//!
//! Prints wall time, MiB/s, peak RSS and the ratio. Size: `CRYPTFS_BENCH_MIB` (default 1024).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::sh;

struct Measure {
    seconds: f64,
    max_rss_kib: i64,
}

/// Runs a command to completion and measures it (peak RSS of the child via wait4).
fn measure(program: &str, args: &[&str], stdin: Option<&[u8]>) -> Result<Measure> {
    let start = Instant::now();
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {program}"))?;
    if let Some(bytes) = stdin {
        child.stdin.take().context("stdin")?.write_all(bytes)?;
    }
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: a zeroed rusage is a valid out-parameter; wait4 on our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    let seconds = start.elapsed().as_secs_f64();
    if rc != pid || !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            use std::io::Read;
            let _ = e.read_to_string(&mut err);
        }
        bail!("{program} {} failed: {err}", args.join(" "));
    }
    Ok(Measure {
        seconds,
        max_rss_kib: usage.ru_maxrss,
    })
}

fn copy(from: &Path, to: &Path) -> Result<()> {
    sh::output(
        "cp",
        &[
            "--sparse=never",
            &from.display().to_string(),
            &to.display().to_string(),
        ],
    )?;
    Ok(())
}

fn row(op: &str, mib: u64, reference: &Measure, ours: &Measure) {
    println!(
        "| {op} | {mib} | {:.2} s ({:.0} MiB/s, {} MiB RSS) | {:.2} s ({:.0} MiB/s, {} MiB RSS) | {:.2} |",
        reference.seconds,
        mib as f64 / reference.seconds,
        reference.max_rss_kib / 1024,
        ours.seconds,
        mib as f64 / ours.seconds,
        ours.max_rss_kib / 1024,
        ours.seconds / reference.seconds
    );
}

/// Runs the benchmark.
pub fn run() -> Result<()> {
    sh::run(
        "cargo",
        &["build", "--quiet", "--release", "--package", "cryptfs"],
    )?;
    let bin = std::env::current_dir()?.join("target/release/cryptfs");
    let mib: u64 = std::env::var("CRYPTFS_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let base = if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let work = base.join(format!("cryptfs-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let result = run_in(&work, &bin, mib);
    let _ = std::fs::remove_dir_all(&work);
    result
}

fn run_in(work: &Path, bin: &Path, mib: u64) -> Result<()> {
    let (_tpm, port) = crate::demo::start_swtpm(&work.join("tpm"))?;
    let src = work.join("src");
    crate::demo::sample_files(&src)?;
    let plain = work.join("plain.img");
    std::fs::File::create(&plain)?.set_len(mib << 20)?;
    let p = plain.display().to_string();
    sh::output(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-b",
            "4096",
            "-L",
            "otaroot",
            "-d",
            &src.display().to_string(),
            &p,
        ],
    )?;

    // In-place encryption: the reference's sequence with the CLI.
    let a = work.join("a.img");
    copy(&plain, &a)?;
    let a_s = a.display().to_string();
    let target = format!("{}M", mib - 32);
    let start = Instant::now();
    measure("e2fsck", &["-p", "-f", &a_s], None)?;
    measure("resize2fs", &[&a_s, &target], None)?;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&a)?
        .set_len(mib << 20)?;
    let cli = measure(
        "cryptsetup",
        &[
            "reencrypt",
            "--batch-mode",
            "--encrypt",
            "--type",
            "luks2",
            "--reduce-device-size",
            "32M",
            "--pbkdf",
            "pbkdf2",
            "--pbkdf-force-iterations",
            "1000",
            "--hotzone-size",
            "8M",
            &a_s,
        ],
        Some(b"benchmark-passphrase"),
    )?;
    let reference = Measure {
        seconds: start.elapsed().as_secs_f64(),
        max_rss_kib: cli.max_rss_kib,
    };

    let b = work.join("b.img");
    copy(&plain, &b)?;
    let cfg = work.join("b.toml");
    crate::demo::config(&cfg, &b, &work.join("boot-b"), port)?;
    let c = cfg.display().to_string();
    let ours = measure(
        &bin.display().to_string(),
        &["run", "--stage", "initramfs", "--config", &c],
        None,
    )?;

    // Volume-key change of a CI image.
    let ci = work.join("ci.img");
    copy(&a, &ci)?; // a LUKS2 image whose key came from "CI", passphrase in keyslot 0
    let ci_s = ci.display().to_string();
    let cli_ci = work.join("ci-cli.img");
    copy(&ci, &cli_ci)?;
    let reenc_ref = measure(
        "cryptsetup",
        &[
            "reencrypt",
            "--batch-mode",
            "--force-offline-reencrypt",
            "--pbkdf",
            "pbkdf2",
            "--pbkdf-force-iterations",
            "1000",
            "--hotzone-size",
            "8M",
            &cli_ci.display().to_string(),
        ],
        Some(b"benchmark-passphrase"),
    )?;
    let pass_file = work.join("pass");
    std::fs::write(&pass_file, "benchmark-passphrase")?;
    // cryptfs refuses a passphrase file that group or others can read.
    std::fs::set_permissions(
        &pass_file,
        <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o600),
    )?;
    let cfg_ci = work.join("ci.toml");
    crate::demo::config(&cfg_ci, &ci, &work.join("boot-ci"), port)?;
    let mut text = std::fs::read_to_string(&cfg_ci)?;
    text = text.replacen(
        "label = ",
        &format!(
            "image_passphrase_file = \"{}\"\nlabel = ",
            pass_file.display()
        ),
        1,
    );
    std::fs::write(&cfg_ci, text)?;
    let cc = cfg_ci.display().to_string();
    sh::output(
        &bin.display().to_string(),
        &["run", "--stage", "initramfs", "--config", &cc],
    )?;
    let reenc_ours = measure(
        &bin.display().to_string(),
        &["run", "--stage", "userspace", "--config", &cc],
        None,
    )?;
    let _ = ci_s;

    println!(
        "\nbench: {mib} MiB image on {}",
        work.parent()
            .map_or("?".into(), |p| p.display().to_string())
    );
    println!("| operation | MiB | cryptsetup CLI | cryptfs | ratio (cryptfs / cryptsetup) |");
    println!("|---|---|---|---|---|");
    row(
        "in-place encryption (fsck + shrink + encrypt)",
        mib,
        &reference,
        &ours,
    );
    row("volume-key change (offline)", mib, &reenc_ref, &reenc_ours);
    Ok(())
}
