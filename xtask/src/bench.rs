//! `cargo xtask bench`: cryptfs against the cryptsetup CLI on the same data in the same run.
//!
//! Two operations, each on its own copy of one image, on tmpfs when /dev/shm exists:
//! - in-place encryption of a plain ext4 root: the reference's initramfs sequence (e2fsck,
//!   resize2fs, `cryptsetup reencrypt --encrypt --reduce-device-size 32M`) against
//!   `cryptfs run --stage initramfs` (which also seals the KEK in a swtpm and journals);
//! - volume-key change of a CI image: `cryptsetup reencrypt` (offline) against
//!   `cryptfs run --stage userspace` (which also writes the header backup).
//!
//! Each operation alternates the two sides on fresh identical images over several runs and
//! reports the medians, MiB/s, peak RSS and the speed-up (the CLI's time / cryptfs's), with every
//! run's raw figures, in `design/results/bench-host.md`. Sizes: `CRYPTFS_BENCH_MIB`
//! (comma-separated, default `1024,4096`); runs: `CRYPTFS_BENCH_RUNS` (default 5 at 1 GiB,
//! 3 above).

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

/// One operation's figures from one run: the reference's and cryptfs's, and which ran first.
struct Pair {
    reference: Measure,
    ours: Measure,
    ours_first: bool,
}

/// Runs the two sides of one operation in the given order (the order alternates between runs
/// so that neither side always gets the warmer cache or the quieter machine).
fn pair(
    ours_first: bool,
    reference: impl FnOnce() -> Result<Measure>,
    ours: impl FnOnce() -> Result<Measure>,
) -> Result<Pair> {
    let (reference, ours) = if ours_first {
        let o = ours()?;
        (reference()?, o)
    } else {
        let r = reference()?;
        (r, ours()?)
    };
    Ok(Pair {
        reference,
        ours,
        ours_first,
    })
}

/// The two host operations of the row 1.
/// Builds the release `cryptfs` binary and returns its path.
pub(crate) fn release_binary() -> Result<PathBuf> {
    sh::run(
        "cargo",
        &["build", "--quiet", "--release", "--package", "cryptfs"],
    )?;
    Ok(std::env::current_dir()?.join("target/release/cryptfs"))
}

/// A fresh work directory for one bench run, on tmpfs where there is one (the host rows time
/// the code, not the disk).
pub(crate) fn scratch_dir(prefix: &str) -> Result<PathBuf> {
    let base = if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let work = base.join(format!("{prefix}-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    Ok(work)
}

/// Prints a bench's report and writes it to `design/results/<name>`, which the README shows.
pub(crate) fn publish(name: &str, report: &str) -> Result<()> {
    println!("\n{report}");
    let out = std::env::current_dir()?.join("design/results").join(name);
    std::fs::write(&out, report).with_context(|| format!("writing {}", out.display()))?;
    println!("(written to {})", out.display());
    Ok(())
}

/// The CLI's in-place encryption of a shrunk ext4 image, as both the host bench and the
/// recovery bench's CI image run it (a cheap PBKDF: the bench times the data, not the KDF).
pub(crate) const CLI_ENCRYPT: &[&str] = &[
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
];

const OPERATIONS: [&str; 2] = [
    "in-place encryption (fsck + shrink + encrypt)",
    "volume-key change (offline)",
];

/// Runs per size: `CRYPTFS_BENCH_RUNS`, else 5 up to 1 GiB and 3 above.
fn runs_for(mib: u64) -> usize {
    std::env::var("CRYPTFS_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if mib <= 1024 { 5 } else { 3 })
}

/// `cargo xtask bench --vm`: the guest's rows (tests/vm_bench.rs, ignored tests so that the
/// test command never runs them, one VM at a time so that neither slows the other), which print
/// their tables and write `design/results/bench-vm.md`, `bench-vm-online.md` and
/// `bench-vm-boot.md`; then the online
/// row's plot, `bench-vm-online.png`.
pub fn run_vm() -> Result<()> {
    sh::run(
        "cargo",
        &[
            "test",
            "--package",
            "cryptfs",
            "--all-features",
            "--test",
            "vm_bench",
            "--",
            "--ignored",
            "--nocapture",
            "--test-threads",
            "1",
        ],
    )?;
    let results = std::env::current_dir()?.join("design/results");
    crate::plot::draw(
        &results.join("bench-vm-online.md"),
        &results.join("bench-vm-online.png"),
    )
}

/// Runs the benchmark: every size of `CRYPTFS_BENCH_MIB` (comma-separated, default
/// `1024,4096`), each operation alternating the two sides over several runs on fresh images;
/// prints the medians and writes them with every run's raw figures to
/// `design/results/bench-host.md`.
pub fn run() -> Result<()> {
    let bin = release_binary()?;
    let sizes: Vec<u64> = std::env::var("CRYPTFS_BENCH_MIB")
        .unwrap_or_else(|_| "1024,4096".into())
        .split(',')
        .map(|v| v.trim().parse::<u64>())
        .collect::<Result<_, _>>()
        .context("CRYPTFS_BENCH_MIB: comma-separated sizes in MiB")?;
    if sizes.iter().any(|&m| m < 128) {
        bail!("CRYPTFS_BENCH_MIB: each size must be at least 128 MiB");
    }
    let work = scratch_dir("cryptfs-bench")?;
    let result = (|| {
        let (_tpm, port) = crate::demo::start_swtpm(&work.join("tpm"))?;
        let src = work.join("src");
        crate::demo::sample_files(&src)?;
        let mut results = Vec::new();
        for &mib in &sizes {
            let mut pairs: [Vec<Pair>; 2] = [Vec::new(), Vec::new()];
            for i in 0..runs_for(mib) {
                let dir = work.join(format!("run-{mib}-{i}"));
                std::fs::create_dir_all(&dir)?;
                let [a, b] = run_once(&dir, &bin, &src, mib, port, i % 2 == 1)?;
                eprintln!(
                    "bench: {mib} MiB run {i}: in-place {:.2} s / {:.2} s, key change {:.2} s / {:.2} s (cryptsetup / cryptfs)",
                    a.reference.seconds, a.ours.seconds, b.reference.seconds, b.ours.seconds
                );
                pairs[0].push(a);
                pairs[1].push(b);
                std::fs::remove_dir_all(&dir)?;
            }
            results.push((mib, pairs));
        }
        Ok::<_, anyhow::Error>(results)
    })();
    let _ = std::fs::remove_dir_all(&work);
    let base = work.parent().unwrap_or(&work);
    publish("bench-host.md", &report(&result?, base))
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n == 0 {
        return 0.0;
    }
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

/// The Markdown table (medians) and the raw figures of every run.
fn report(results: &[(u64, [Vec<Pair>; 2])], base: &Path) -> String {
    let mut t = format!(
        "# `cargo xtask bench`: cryptfs against the cryptsetup CLI (host)\n\n\
         Images on {} (tmpfs), made afresh for every run; the two sides alternate which runs \
         first. Median wall time of the runs, MiB/s of the image size, peak RSS (largest of the \
         runs). **Speed-up** = the CLI's median time / cryptfs's: above 1, cryptfs is faster. \
         cryptfs's in-place encryption also seals the KEK in a swtpm and journals; its \
         volume-key change also writes the header backup.\n\n\
         | operation | MiB | runs | cryptsetup CLI | cryptfs | speed-up |\n|---|---|---|---|---|---|\n",
        base.display()
    );
    let side = |mib: u64, secs: f64, rss: i64| {
        format!(
            "{secs:.2} s ({:.0} MiB/s, {} MiB RSS)",
            mib as f64 / secs,
            rss / 1024
        )
    };
    for (mib, pairs) in results {
        for (op, runs) in OPERATIONS.iter().zip(pairs) {
            let r = median(runs.iter().map(|p| p.reference.seconds).collect());
            let o = median(runs.iter().map(|p| p.ours.seconds).collect());
            let r_rss = runs
                .iter()
                .map(|p| p.reference.max_rss_kib)
                .max()
                .unwrap_or(0);
            let o_rss = runs.iter().map(|p| p.ours.max_rss_kib).max().unwrap_or(0);
            t.push_str(&format!(
                "| {op} | {mib} | {} | {} | {} | {:.2} |\n",
                runs.len(),
                side(*mib, r, r_rss),
                side(*mib, o, o_rss),
                r / o
            ));
        }
    }
    t.push_str("\n## Every run (seconds)\n\n| operation | MiB | run | first | cryptsetup CLI | cryptfs |\n|---|---|---|---|---|---|\n");
    for (mib, pairs) in results {
        for (op, runs) in OPERATIONS.iter().zip(pairs) {
            for (i, p) in runs.iter().enumerate() {
                t.push_str(&format!(
                    "| {op} | {mib} | {i} | {} | {:.3} | {:.3} |\n",
                    if p.ours_first {
                        "cryptfs"
                    } else {
                        "cryptsetup"
                    },
                    p.reference.seconds,
                    p.ours.seconds
                ));
            }
        }
    }
    t
}

/// One run of both operations at `mib` in `work` (removed by the caller): returns the in-place
/// encryption pair and the volume-key change pair.
fn run_once(
    work: &Path,
    bin: &Path,
    src: &Path,
    mib: u64,
    port: u16,
    ours_first: bool,
) -> Result<[Pair; 2]> {
    let bin_s = bin.display().to_string();
    // Two identical fresh plain images.
    let a = work.join("a.img");
    crate::demo::plain_root(src, &a, mib)?;
    let a_s = a.display().to_string();
    let b = work.join("b.img");
    copy(&a, &b)?;

    // In-place encryption: the reference's sequence with the CLI against cryptfs's initramfs
    // stage.
    let cfg = work.join("b.toml");
    crate::demo::config(&cfg, &b, &work.join("boot-b"), port)?;
    let c = cfg.display().to_string();
    let target = format!("{}M", mib - 32);
    let in_place = pair(
        ours_first,
        || {
            let start = Instant::now();
            measure("e2fsck", &["-p", "-f", &a_s], None)?;
            measure("resize2fs", &[&a_s, &target], None)?;
            std::fs::OpenOptions::new()
                .write(true)
                .open(&a)?
                .set_len(mib << 20)?;
            let cli = measure(
                "cryptsetup",
                &[CLI_ENCRYPT, &["--hotzone-size", "8M", &a_s]].concat(),
                Some(b"benchmark-passphrase"),
            )?;
            Ok(Measure {
                seconds: start.elapsed().as_secs_f64(),
                max_rss_kib: cli.max_rss_kib,
            })
        },
        || {
            measure(
                &bin_s,
                &["run", "--stage", "initramfs", "--config", &c],
                None,
            )
        },
    )?;
    std::fs::remove_file(&b)?;

    // Volume-key change of a CI image: the CLI's LUKS2 result (passphrase in keyslot 0) is
    // the CI image for both sides.
    let cli_ci = work.join("ci-cli.img");
    std::fs::rename(&a, &cli_ci)?;
    let ci = work.join("ci.img");
    copy(&cli_ci, &ci)?;
    let pass_file = work.join("pass");
    std::fs::write(&pass_file, "benchmark-passphrase")?;
    // cryptfs refuses a passphrase file that group or others can read.
    std::fs::set_permissions(
        &pass_file,
        <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o600),
    )?;
    let cfg_ci = work.join("ci.toml");
    crate::demo::config(&cfg_ci, &ci, &work.join("boot-ci"), port)?;
    let text = std::fs::read_to_string(&cfg_ci)?.replacen(
        "label = ",
        &format!(
            "image_passphrase_file = \"{}\"\nlabel = ",
            pass_file.display()
        ),
        1,
    );
    std::fs::write(&cfg_ci, text)?;
    let cc = cfg_ci.display().to_string();
    // Enrolment, wipe and the re-encryption mark (not timed: the initramfs's part).
    sh::output(&bin_s, &["run", "--stage", "initramfs", "--config", &cc])?;
    let cli_ci_s = cli_ci.display().to_string();
    let key_change = pair(
        ours_first,
        || {
            measure(
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
                    &cli_ci_s,
                ],
                Some(b"benchmark-passphrase"),
            )
        },
        || {
            measure(
                &bin_s,
                &["run", "--stage", "userspace", "--config", &cc],
                None,
            )
        },
    )?;
    Ok([in_place, key_change])
}
