//! `cargo xtask bench --recovery`: the row 4, crash-recovery time after a cut
//! mid-hotzone, per hotzone size and resilience mode, cryptfs against the reference.
//!
//! The cuts are real: the `LD_PRELOAD` shim of tests/cutshim SIGKILLs the run's whole process
//! group at its N-th sync, as tests/fsync_cuts.rs does. For each resilience mode and hotzone
//! size, each side's volume-key change of the same CI image runs once uncut (counting its sync
//! points and timing the run), then is cut at successive points from the middle of the run
//! on; a cut counts only when the header it left has a segment flagged `in-reencryption` (the
//! crash state, which makes the next open recover the hotzone first). Then:
//! - the reference recovers with `cryptsetup repair` (timed whole, process start included;
//!   `repair` of a cut that left no hotzone in flight gives that fixed cost);
//! - cryptfs resumes with `cryptfs run --stage userspace`, which journals how long its
//!   libcryptsetup recovery took (`hotzone-recovered`, `recovery_ms`) before finishing the run.
//!
//! Every recovered image must then be clean (no hotzone in flight) and, for cryptfs, provisioned
//! to `header-backed-up`; the bench fails when a side has fewer crash-state cuts than
//! [`CUTS_WANTED`]. The table and every measurement go to `design/results/bench-recovery.md`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};

use crate::sh;

const IMAGE_MIB: u64 = 256;
const HOTZONES_MIB: [u64; 5] = [1, 4, 8, 16, 32];
const MODES: [&str; 2] = ["checksum", "journal"];
/// Crash-state cuts measured per side, mode and size.
const CUTS_WANTED: usize = 3;
/// Cut points tried past the middle of a run before giving up on finding [`CUTS_WANTED`].
const POINTS_TRIED: u64 = 24;
const PASSPHRASE: &str = "benchmark-passphrase";

/// The shim, built in its own target directory.
fn shim(root: &Path) -> Result<PathBuf> {
    let target = root.join("target/cutshim");
    sh::run(
        "cargo",
        &[
            "build",
            "--quiet",
            "--package",
            "cutshim",
            "--target-dir",
            &target.display().to_string(),
        ],
    )?;
    let lib = target.join("debug/libcutshim.so");
    ensure!(lib.exists(), "{} missing after the build", lib.display());
    Ok(lib)
}

/// One run under the shim: cut at `cut_at` (0: count only). Returns the sync points taken, the
/// wall time and whether the run was cut.
struct ShimRun {
    points: u64,
    seconds: f64,
    cut: bool,
}

fn under_shim(
    shim: &Path,
    work: &Path,
    program: &str,
    args: &[&str],
    cut_at: u64,
) -> Result<ShimRun> {
    let counter = work.join("shim-counter");
    let marker = work.join("shim-marker");
    let _ = std::fs::remove_file(&counter);
    let _ = std::fs::remove_file(&marker);
    let start = Instant::now();
    let status = {
        use std::os::unix::process::CommandExt;
        Command::new(program)
            .args(args)
            .env("LD_PRELOAD", shim)
            .env("CUTSHIM_COUNTER", &counter)
            .env("CUTSHIM_MARKER", &marker)
            .env("CUTSHIM_CUT_AT", cut_at.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // A group of its own: the shim kills its whole group at the cut.
            .process_group(0)
            .status()
            .with_context(|| format!("cannot start {program}"))?
    };
    let seconds = start.elapsed().as_secs_f64();
    let points = std::fs::read_to_string(&counter)
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(0);
    let cut = marker.exists();
    if !cut && !status.success() {
        bail!("{program} {} failed uncut ({status})", args.join(" "));
    }
    Ok(ShimRun {
        points,
        seconds,
        cut,
    })
}

/// The length in bytes of the hotzone in flight (the `in-reencryption` segment), if any.
fn hotzone_in_flight(image: &Path) -> Result<Option<u64>> {
    let text = sh::output(
        "cryptsetup",
        &[
            "luksDump",
            "--dump-json-metadata",
            &image.display().to_string(),
        ],
    )?;
    let json: serde_json::Value = serde_json::from_str(&text).context("luksDump json")?;
    let segments = json["segments"].as_object().context("no segments")?;
    Ok(segments
        .values()
        .find(|s| {
            s["flags"]
                .as_array()
                .is_some_and(|f| f.iter().any(|x| x == "in-reencryption"))
        })
        .map(|s| s["size"].as_str().and_then(|v| v.parse().ok()).unwrap_or(0)))
}

fn copy(from: &Path, to: &Path) -> Result<()> {
    sh::output(
        "cp",
        &[
            "-a",
            "--sparse=never",
            &from.display().to_string(),
            &to.display().to_string(),
        ],
    )?;
    Ok(())
}

fn timed(program: &str, args: &[&str]) -> Result<f64> {
    let start = Instant::now();
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot start {program}"))?;
    let seconds = start.elapsed().as_secs_f64();
    ensure!(
        out.status.success(),
        "{program} {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(seconds)
}

/// One side's figures for one mode and size.
#[derive(Default)]
struct Side {
    run_seconds: f64,
    points: u64,
    /// Recovery times, seconds.
    recoveries: Vec<f64>,
    /// The hotzone in flight at each measured cut, bytes.
    in_flight: Vec<u64>,
    /// Points tried.
    tried: u64,
    /// cryptfs: the whole resume stage after each cut, seconds.
    resume_seconds: Vec<f64>,
    /// The reference: `repair` with nothing to recover.
    baseline: Option<f64>,
}

impl Side {
    /// A side that has timed its uncut run (and counted its cut points) and nothing else yet.
    fn after_uncut(uncut: &ShimRun) -> Side {
        Side {
            run_seconds: uncut.seconds,
            points: uncut.points,
            ..Side::default()
        }
    }

    /// The side, once it has measured `CUTS_WANTED` cuts that left a hotzone in flight: a cut
    /// that landed elsewhere measures nothing, so too few of them fails the bench.
    fn enough(self, who: &str, mode: &str, hotzone_mib: u64) -> Result<Side> {
        ensure!(
            self.recoveries.len() >= CUTS_WANTED,
            "{who} {mode} {hotzone_mib} MiB: {} crash-state cuts in {} points tried",
            self.recoveries.len(),
            self.tried
        );
        Ok(self)
    }
}

struct Row {
    mode: &'static str,
    hotzone_mib: u64,
    reference: Side,
    ours: Side,
}

/// Runs row 4 and writes `design/results/bench-recovery.md`.
pub fn run() -> Result<()> {
    let root = std::env::current_dir()?;
    let bin = crate::bench::release_binary()?;
    let shim = shim(&root)?;
    let work = crate::bench::scratch_dir("cryptfs-bench-recovery")?;
    let result = (|| {
        let (_tpm, port) = crate::demo::start_swtpm(&work.join("tpm"))?;
        let ci = ci_image(&work)?;
        let mut rows = Vec::new();
        for mode in MODES {
            for hotzone_mib in HOTZONES_MIB {
                let dir = work.join(format!("{mode}-{hotzone_mib}"));
                std::fs::create_dir_all(&dir)?;
                let reference = reference_side(&dir, &shim, &ci, mode, hotzone_mib)?;
                let ours = cryptfs_side(&dir, &shim, &bin, &ci, port, mode, hotzone_mib)?;
                eprintln!(
                    "bench: {mode} {hotzone_mib} MiB: repair {:?} s, cryptfs recovery {:?} s",
                    reference.recoveries, ours.recoveries
                );
                rows.push(Row {
                    mode,
                    hotzone_mib,
                    reference,
                    ours,
                });
                std::fs::remove_dir_all(&dir)?;
            }
        }
        Ok::<_, anyhow::Error>(rows)
    })();
    let _ = std::fs::remove_dir_all(&work);
    let base = work.parent().unwrap_or(&work);
    crate::bench::publish("bench-recovery.md", &report(&result?, base))
}

/// A CI image as the reference's build makes one: ext4 encrypted in place with the CLI
/// (passphrase in keyslot 0, PBKDF2 so that unlocking costs neither side anything).
fn ci_image(work: &Path) -> Result<PathBuf> {
    let src = work.join("src");
    crate::demo::sample_files(&src)?;
    let img = work.join("ci.img");
    crate::demo::plain_root(&src, &img, IMAGE_MIB)?;
    let img_s = img.display().to_string();
    sh::output("resize2fs", &[&img_s, &format!("{}M", IMAGE_MIB - 32)])?;
    let pass = work.join("pass");
    std::fs::write(&pass, PASSPHRASE)?;
    std::fs::set_permissions(
        &pass,
        <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o600),
    )?;
    sh::output(
        "cryptsetup",
        &[
            crate::bench::CLI_ENCRYPT,
            &["--key-file", &pass.display().to_string(), &img_s],
        ]
        .concat(),
    )?;
    Ok(img)
}

fn reference_side(
    dir: &Path,
    shim: &Path,
    ci: &Path,
    mode: &str,
    hotzone_mib: u64,
) -> Result<Side> {
    let img = dir.join("ref.img");
    let img_s = img.display().to_string();
    let pass = ci.with_file_name("pass").display().to_string();
    let hz = format!("{hotzone_mib}M");
    let args = [
        "reencrypt",
        "--batch-mode",
        "--force-offline-reencrypt",
        "--resilience",
        mode,
        "--hotzone-size",
        &hz,
        "--pbkdf",
        "pbkdf2",
        "--pbkdf-force-iterations",
        "1000",
        "--key-file",
        &pass,
        &img_s,
    ];
    copy(ci, &img)?;
    let uncut = under_shim(shim, dir, "cryptsetup", &args, 0)?;
    let mut side = Side::after_uncut(&uncut);
    for p in (uncut.points / 2..).take(POINTS_TRIED as usize) {
        if side.recoveries.len() >= CUTS_WANTED {
            break;
        }
        side.tried += 1;
        copy(ci, &img)?;
        if !under_shim(shim, dir, "cryptsetup", &args, p)?.cut {
            continue;
        }
        let in_flight = hotzone_in_flight(&img)?;
        let seconds = timed(
            "cryptsetup",
            &["repair", "--batch-mode", "--key-file", &pass, &img_s],
        )?;
        match in_flight {
            Some(bytes) => {
                ensure!(
                    hotzone_in_flight(&img)?.is_none(),
                    "cryptsetup repair left the hotzone in flight ({mode}, cut {p})"
                );
                side.recoveries.push(seconds);
                side.in_flight.push(bytes);
            }
            None => {
                side.baseline.get_or_insert(seconds);
            }
        }
    }
    side.enough("reference", mode, hotzone_mib)
}

#[allow(clippy::too_many_arguments)]
fn cryptfs_side(
    dir: &Path,
    shim: &Path,
    bin: &Path,
    ci: &Path,
    port: u16,
    mode: &str,
    hotzone_mib: u64,
) -> Result<Side> {
    // The prepared state: KEK enrolled, passphrase wiped, marked for re-encryption (the
    // initramfs's part, not measured), kept as the base of every cut.
    let prepared = dir.join("prepared");
    std::fs::create_dir_all(&prepared)?;
    let img = prepared.join("c.img");
    copy(ci, &img)?;
    let cfg = prepared.join("c.toml");
    crate::demo::config(&cfg, &img, &prepared.join("boot"), port)?;
    let pass = ci.with_file_name("pass");
    let text = std::fs::read_to_string(&cfg)?
        .replacen(
            "label = ",
            &format!("image_passphrase_file = \"{}\"\nlabel = ", pass.display()),
            1,
        )
        .replacen(
            "hotzone_size = 8388608\n",
            &format!(
                "hotzone_size = {}\nresilience = \"{mode}\"\n",
                hotzone_mib << 20
            ),
            1,
        );
    std::fs::write(&cfg, text)?;
    let bin_s = bin.display().to_string();
    let cfg_s = cfg.display().to_string();
    sh::output(&bin_s, &["run", "--stage", "initramfs", "--config", &cfg_s])?;
    let base = dir.join("base");
    copy(&prepared, &base)?;
    let stage = ["run", "--stage", "userspace", "--config", &cfg_s];
    let uncut = under_shim(shim, dir, &bin_s, &stage, 0)?;
    let mut side = Side::after_uncut(&uncut);
    for p in (uncut.points / 2..).take(POINTS_TRIED as usize) {
        if side.recoveries.len() >= CUTS_WANTED {
            break;
        }
        side.tried += 1;
        std::fs::remove_dir_all(&prepared)?;
        copy(&base, &prepared)?;
        if !under_shim(shim, dir, &bin_s, &stage, p)?.cut {
            continue;
        }
        let Some(bytes) = hotzone_in_flight(&img)? else {
            continue;
        };
        let seconds = timed(&bin_s, &stage)?;
        let status: serde_json::Value = serde_json::from_str(&sh::output(
            &bin_s,
            &["status", "--json", "--config", &cfg_s],
        )?)?;
        ensure!(
            status["state"] == "header-backed-up",
            "cryptfs {mode} {hotzone_mib} MiB cut {p}: state {} after the resume",
            status["state"]
        );
        let recovered: Vec<u64> = status["journal"]["records"]
            .as_array()
            .context("journal records")?
            .iter()
            .filter(|r| r["details"]["substep"] == "hotzone-recovered")
            .filter_map(|r| r["details"]["recovery_ms"].as_u64())
            .collect();
        let [millis] = recovered.as_slice() else {
            bail!("cryptfs {mode} {hotzone_mib} MiB cut {p}: recoveries journaled: {recovered:?}");
        };
        side.recoveries.push(*millis as f64 / 1000.0);
        side.in_flight.push(bytes);
        side.resume_seconds.push(seconds);
    }
    side.enough("cryptfs", mode, hotzone_mib)
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn max(values: &[f64]) -> f64 {
    values.iter().copied().fold(0.0, f64::max)
}

fn report(rows: &[Row], base: &Path) -> String {
    let mut t = format!(
        "# `cargo xtask bench --recovery`: crash-recovery time after a cut mid-hotzone (host)\n\n\
         A {IMAGE_MIB} MiB CI image on {} (tmpfs); the volume-key change of each side is cut \
         (SIGKILL of its process group at a sync point, tests/cutshim) at successive points \
         from the middle of the run until {CUTS_WANTED} cuts left a hotzone in flight. \
         **Reference**: `cryptsetup repair`, whole command (process start and header load \
         included; `repair` with nothing in flight costs the *fixed* column). **cryptfs**: the \
         libcryptsetup recovery as cryptfs journals it (`hotzone-recovered`), in-process. \
         **In flight**: the hotzone the header recorded at the cut (journal mode is capped by \
         the free keyslot area). **Run**: the uncut volume-key change, whole command. \
         **Cost**: cryptfs's median recovery / the run's time per hotzone in flight, the factor \
         `[reencrypt] max_recovery` sizes by.\n\n\
         | resilience | hotzone | in flight | reference repair median / max | fixed | cryptfs recovery median / max | cryptfs resume stage | run: reference / cryptfs | cost |\n\
         |---|---|---|---|---|---|---|---|---|\n",
        base.display()
    );
    for r in rows {
        let in_flight = r.ours.in_flight.first().copied().unwrap_or(0) as f64 / 1_048_576.0;
        let per_hotzone =
            r.ours.run_seconds * (in_flight / IMAGE_MIB as f64).max(f64::MIN_POSITIVE);
        t.push_str(&format!(
            "| {} | {} MiB | {in_flight:.1} MiB | {:.3} / {:.3} s | {} | {:.3} / {:.3} s | {:.2} s | {:.2} / {:.2} s | {:.1} |\n",
            r.mode,
            r.hotzone_mib,
            median(&r.reference.recoveries),
            max(&r.reference.recoveries),
            r.reference
                .baseline
                .map_or("-".to_string(), |b| format!("{b:.3} s")),
            median(&r.ours.recoveries),
            max(&r.ours.recoveries),
            median(&r.ours.resume_seconds),
            r.reference.run_seconds,
            r.ours.run_seconds,
            median(&r.ours.recoveries) / per_hotzone,
        ));
    }
    t.push_str(
        "\n## Every measurement\n\n| resilience | hotzone | side | sync points | tried | recoveries (s) |\n|---|---|---|---|---|---|\n",
    );
    for r in rows {
        for (name, side) in [("reference", &r.reference), ("cryptfs", &r.ours)] {
            t.push_str(&format!(
                "| {} | {} MiB | {name} | {} | {} | {} |\n",
                r.mode,
                r.hotzone_mib,
                side.points,
                side.tried,
                side.recoveries
                    .iter()
                    .map(|s| format!("{s:.3}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_max_of_few_values() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0]), 2.5);
        assert_eq!(median(&[]), 0.0);
        assert_eq!(max(&[0.5, 2.0, 1.0]), 2.0);
    }
}
