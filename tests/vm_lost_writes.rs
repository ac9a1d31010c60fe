//! Power cuts that lose unflushed writes, under QEMU (TCG): the guest's disk is the write log's
//! FUSE file (tests/writelog), so every write and every flush the guest issues is logged in
//! order (QEMU, `cache=writeback`, turns a guest flush into fdatasync on the image file). One
//! boot runs the operation to its end on the logged disk; then crash states are rebuilt for a
//! sample of its flush epochs — "every write before flush k" and "those plus a seeded random
//! half of epoch k's writes" (the CrashMonkey method, as tests/lost_writes.rs does on the host)
//! — always including the epochs of the operation's end (the metadata finalisation) and a
//! spread over the rest. Each state is booted: the boot must reach `header-backed-up` with every
//! file intact (the guest's blake3 checks of the files written before provisioning and of those
//! the workload wrote during it and flushed before the state's cut: a file's line in
//! `during.b3` is written and flushed only after the file itself was).
//!
//! The table goes to `design/results/vm-lost-writes.md`. Test names start with `vm_`: the host
//! tier skips them; `cargo xtask vm` runs them.

mod common;
#[path = "vm_rig/mod.rs"]
mod vm_rig;
#[path = "writelog/mod.rs"]
mod writelog;

use std::path::Path;
use std::time::Instant;

use vm_rig::{Boot, BootOptions, Disk, RootImage};

/// Root partition size: ten hotzones of 8 MiB for the re-encryption, room for the files.
const ROOT_MIB: u64 = 96;
/// The root's LUKS2 header area (metadata and keyslots: 16 MiB, the reference's default).
const HEADER_AREA: u64 = 16 * 1024 * 1024;
/// Seed of the random halves.
const SEED: u64 = 0x5eed_0011;

/// Why a boot from a crash state is not intact, or `Ok` with the number of `during.b3` files
/// verified at mount (those the state held).
fn intact(boot: &Boot) -> Result<u32, String> {
    if boot.cut {
        return Err("unexpected power cut".into());
    }
    if let Some(f) = boot.marker("fatal") {
        return Err(f.to_string());
    }
    let at_mount = boot
        .marker("files-ok-at-mount")
        .ok_or("files bad at mount")?
        .rsplit(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    match boot.marker("userspace-exit ") {
        Some(m) if m.starts_with("userspace-exit 0 ") && m.ends_with("bad-reads=0") => {}
        other => return Err(format!("userspace stage: {other:?}")),
    }
    boot.marker("files-ok ").ok_or("files bad at the end")?;
    match boot.marker("state ") {
        Some("state header-backed-up") => {}
        other => return Err(format!("ended in {other:?}")),
    }
    boot.marker("end").ok_or("no clean end")?;
    Ok(at_mount)
}

/// The flush epoch the host was in at `at` (a console line's arrival): syncs logged before it.
fn epoch_at(times: &[Instant], at: Instant) -> usize {
    times.partition_point(|t| *t <= at)
}

/// `n` epochs spread evenly over `from..to`, each in the middle of its share (fewer when the
/// range is smaller).
fn spread(from: usize, to: usize, n: usize) -> Vec<usize> {
    let n = n.min(to.saturating_sub(from));
    let len = to.saturating_sub(from);
    let mut out: Vec<usize> = (0..n).map(|i| from + (2 * i + 1) * len / (2 * n)).collect();
    out.dedup();
    out
}

/// What a scenario measured.
struct Outcome {
    row: String,
    taken: usize,
    planned: usize,
    intact: usize,
    failures: Vec<String>,
}

/// Rewrites `design/results/vm-lost-writes.md` with this operation's row replacing its row of an
/// earlier run (each scenario is its own test: either may run alone).
fn record_row(operation: &str, row: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../design/results/vm-lost-writes.md");
    let mut rows: Vec<String> = std::fs::read_to_string(&path)
        .unwrap_or_default()
        .lines()
        .filter(|l| {
            l.starts_with("| ")
                && !l.starts_with("| operation")
                && !l.starts_with(&format!("| {operation} |"))
        })
        .map(String::from)
        .collect();
    rows.push(row.trim_end().to_string());
    rows.sort();
    let mut table = String::from(
        "<!-- Written by tests/vm_lost_writes.rs (`cargo test --package cryptfs --all-features \
         --test vm_lost_writes -- --nocapture --test-threads 1`); each scenario rewrites its \
         row. -->\n\n\
         QEMU (TCG, 1 vCPU), 96 MiB root, the guest's disk behind the FUSE write log \
         (`cache=writeback`: guest flushes arrive as fdatasync). States: \"every write before \
         flush k\" and \"plus a seeded random half of epoch k's writes\", for sampled epochs k \
         (always those of the operation's end). Intact: the next boot reached \
         `header-backed-up` with every file's blake3 matching.\n\n\
         | operation | epochs (operation / boot) | flushes host / guest | sampled epochs | states taken | intact | failing |\n\
         |---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        table.push_str(&r);
        table.push('\n');
    }
    eprintln!("\n{table}");
    common::write_result("vm-lost-writes.md", &table);
}

/// How to find the operation in the logged boot's console.
struct Window {
    /// The operation's name in the table.
    operation: &'static str,
    /// The first console line of the operation.
    starts: fn(&str) -> bool,
    /// The first line of its end (the metadata finalisation follows the last data step).
    finalises: fn(&str) -> bool,
    /// The line after which it is over.
    ends: fn(&str) -> bool,
    /// Epochs sampled over the data steps, and over the end (its last header write always).
    spread: usize,
    finalisation: usize,
    /// Fewest flush epochs the operation must span for the proof to mean anything.
    min_epochs: usize,
}

/// Epochs to sample over the data steps and over the end: the window's defaults (sized for
/// the CI budget), or `CRYPTFS_VM_LOST_EPOCHS=<data>,<end>` for a deeper run.
fn counts(window: &Window) -> (usize, usize) {
    std::env::var("CRYPTFS_VM_LOST_EPOCHS")
        .ok()
        .and_then(|v| {
            let (d, e) = v.split_once(',')?;
            Some((
                d.trim().parse().ok()?,
                e.trim().parse::<usize>().ok()?.max(1),
            ))
        })
        .unwrap_or((window.spread, window.finalisation))
}

fn first_index(boot: &Boot, f: fn(&str) -> bool) -> Option<usize> {
    boot.lines.iter().position(|l| f(l))
}

fn last_index(boot: &Boot, f: fn(&str) -> bool) -> Option<usize> {
    boot.lines.iter().rposition(|l| f(l))
}

fn run(image: RootImage, window: &Window) -> Option<Outcome> {
    let started = Instant::now();
    let mut disk = Disk::new(image, ROOT_MIB);
    let image_path = disk.path.clone();
    let work = disk.dir.path().join("log");
    let (logged, first) = writelog::log_run(&work, &image_path, None, |fuse| {
        disk.boot(&BootOptions {
            drive: Some(fuse.to_path_buf()),
            ..BootOptions::default()
        })
    })?;
    let console = first.console();
    intact(&first).unwrap_or_else(|why| panic!("the logged boot: {why}\n{console}"));
    let guest_flushes: usize = first
        .marker("vda-flushes ")
        .and_then(|m| m.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no flush count from the guest\n{console}"));
    eprintln!(
        "VM-LOST | {} | logged boot {:.1} s: {} writes, {} flushes reached the host, the guest \
         completed {guest_flushes} |",
        window.operation,
        first.elapsed.as_secs_f64(),
        logged.writes(),
        logged.syncs
    );
    // Every flush the host saw is one the guest issued; QEMU drops only those with no write
    // since the previous one.
    assert!(
        logged.syncs > 0 && logged.syncs <= guest_flushes,
        "{} flushes reached the host, the guest completed {guest_flushes}",
        logged.syncs
    );
    let at = |i: usize| epoch_at(&logged.sync_times, first.line_times[i]);
    let start = first_index(&first, window.starts).unwrap_or_else(|| panic!("no start\n{console}"));
    let fin = last_index(&first, window.finalises).unwrap_or_else(|| panic!("no end\n{console}"));
    let end = first_index(&first, window.ends).unwrap_or_else(|| panic!("no end\n{console}"));
    let (a, f, b) = (at(start), at(fin), (at(end) + 1).min(logged.syncs));
    let epochs = b.saturating_sub(a);
    eprintln!(
        "VM-LOST | {} | operation epochs {a}..{b} ({epochs}), end from {f} |",
        window.operation
    );
    let last_data = f;
    assert!(
        epochs >= window.min_epochs,
        "{}: only {epochs} flush epochs exercised",
        window.operation
    );
    // The end: the epochs from the last data step on whose writes reach the root's LUKS2
    // header area (the metadata finalisation: segments, keyslots, requirements), the last of
    // them always, the first and evenly between as the count allows; the data steps: a spread.
    let (n_spread, n_end) = counts(window);
    let header = vm_rig::ROOT_OFFSET..vm_rig::ROOT_OFFSET + HEADER_AREA;
    let metadata: Vec<usize> = (f..=b)
        .filter(|&k| logged.epoch_touches(k, header.clone()))
        .collect();
    assert!(
        !metadata.is_empty(),
        "{}: no header write after the last data step\n{console}",
        window.operation
    );
    // The last header write always; with more, the first one too, then evenly between.
    let last = metadata.len() - 1;
    let mut tail: Vec<usize> = match n_end {
        0 | 1 => vec![last],
        n => std::iter::once(0)
            .chain(spread(1, last, n - 2))
            .chain(std::iter::once(last))
            .collect(),
    }
    .into_iter()
    .map(|i| metadata[i])
    .collect();
    tail.dedup();
    let mut sampled = spread(a, f, n_spread);
    sampled.extend(tail.iter().copied());
    sampled.sort();
    sampled.dedup();
    let planned: usize = sampled
        .iter()
        .map(|&k| 1 + usize::from(logged.epoch_writes(k) > 1))
        .sum();
    eprintln!(
        "VM-LOST | {} | sampled epochs {sampled:?}: {planned} states |",
        window.operation
    );
    // Every state boots on the TPM as the logged boot left it (a TPM is never rolled back; the
    // sealed KEK lives in the LUKS2 token, on the disk).
    let tpm_final = disk.dir.path().join("tpm-final");
    common::copy_tree(&disk.tpm_state, &tpm_final);
    let (mut taken, mut ok, mut files) = (0usize, 0usize, 0u32);
    let mut failures = Vec::new();
    // One row per state taken: the per-epoch table of the closing figures.
    let mut state_rows = String::new();
    let mut boot_secs = Vec::new();
    logged.for_each_sampled_state(&sampled, SEED, |k, partial, image| {
        std::fs::write(&image_path, image).expect("state image");
        let _ = std::fs::remove_dir_all(&disk.tpm_state);
        common::copy_tree(&tpm_final, &disk.tpm_state);
        let boot = disk.boot(&BootOptions::default());
        boot_secs.push(boot.elapsed.as_secs_f64());
        taken += 1;
        let what = format!("epoch {k}{}", if partial { " + half" } else { "" });
        let verdict = intact(&boot);
        state_rows.push_str(&format!(
            "| {k} | {} | {} | {} | {} | {:.0} | {} |\n",
            k - a,
            if tail.contains(&k) {
                "end (header)"
            } else {
                "data"
            },
            logged.epoch_writes(k),
            if partial {
                "before flush k + a seeded half of epoch k"
            } else {
                "every write before flush k"
            },
            boot.elapsed.as_secs_f64(),
            match &verdict {
                Ok(n) => format!("intact ({n} during-files)"),
                Err(why) => format!("NOT intact: {why}"),
            }
        ));
        match verdict {
            Ok(n) => {
                ok += 1;
                files += n;
                eprintln!(
                    "VM-LOST | {} | {what}: intact ({n} during-files in the state) |",
                    window.operation
                );
            }
            Err(why) => {
                eprintln!("VM-LOST | {} | {what}: {why} |", window.operation);
                failures.push(format!("{what}: {why}"));
            }
        }
    });
    let row = format!(
        "| {} | {epochs} / {} | {} / {guest_flushes} | {} (end: {} of {} header-writing) | {taken} | {ok} | {} |\n",
        window.operation,
        logged.syncs + 1,
        logged.syncs,
        sampled.len(),
        tail.len(),
        metadata.len(),
        if failures.is_empty() {
            "none".to_string()
        } else {
            failures.join("; ")
        }
    );
    record_row(window.operation, &row);
    let slug: String = window
        .operation
        .split(' ')
        .next()
        .unwrap_or("operation")
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .collect();
    common::write_result(
        &format!("vm-lost-writes-states--{slug}.md"),
        &format!(
            "# VM lost writes, {}: every state taken\n\n\
             Written by tests/vm_lost_writes.rs on its last run. The operation spans flush \
             epochs {a}..{b} of the logged boot; \"end\" epochs write the root's LUKS2 header \
             area after the last data step (the metadata finalisation).\n\n\
             | epoch k | k from the operation's start | part | writes in epoch k | state | boot (s) | next boot |\n\
             |---|---|---|---|---|---|---|\n{state_rows}",
            window.operation
        ),
    );
    eprintln!(
        "VM-LOST | {} | {taken} states, {ok} intact, {files} during-files verified, boots {:.0}–{:.0} s, whole test {:.0} s |",
        window.operation,
        boot_secs.iter().copied().fold(f64::MAX, f64::min),
        boot_secs.iter().copied().fold(0.0, f64::max),
        started.elapsed().as_secs_f64()
    );
    assert!(
        tail.iter().all(|k| sampled.contains(k) && *k >= last_data)
            && sampled.contains(&metadata[metadata.len() - 1]),
        "the end's epochs were not sampled"
    );
    Some(Outcome {
        row,
        taken,
        planned,
        intact: ok,
        failures,
    })
}

fn check(outcome: Option<Outcome>) {
    let Some(o) = outcome else { return };
    assert_eq!(o.taken, o.planned, "states taken != planned: {}", o.row);
    assert_eq!(o.intact, o.taken, "{:#?}", o.failures);
}

fn line_has(line: &str, words: &[&str]) -> bool {
    words.iter().all(|w| line.contains(w))
}

#[test]
fn vm_online_reencryption_survives_lost_unflushed_writes() {
    check(run(
        RootImage::CiLuks,
        &Window {
            operation: "online re-encryption (userspace stage, mounted)",
            starts: |l| l.contains("cryptfs: reencrypt:"),
            finalises: |l| l.contains("cryptfs: reencrypt: 100%"),
            ends: |l| l.contains("CRYPTFS-VM: userspace-exit"),
            spread: 1,
            finalisation: 2,
            min_epochs: 10,
        },
    ));
}

#[test]
fn vm_in_place_encryption_survives_lost_unflushed_writes() {
    check(run(
        RootImage::Plain,
        &Window {
            operation: "in-place encryption (initramfs)",
            starts: |l| line_has(l, &["step starting", "encrypt-in-place"]),
            finalises: |l| l.contains("cryptfs: encrypt-in-place: 100%"),
            ends: |l| l.contains("CRYPTFS-VM: mounted"),
            spread: 1,
            finalisation: 1,
            min_epochs: 5,
        },
    ));
}
