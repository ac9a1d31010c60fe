//! `cargo xtask bench --vm`: issue 12's rows 2, 3, 5 and 6 in a QEMU guest (row 2: online
//! re-encryption, bench-online.sh; row 3: first boot and later boot, bench-boot.sh). A
//! benchmark, not a check: it prints figures and writes `design/results/bench-vm*.md`; nothing
//! here asserts a speed (row 3 asserts that every run happened and cryptfs's states).
//!
//! - Row 5, the steady state after provisioning: fio (direct I/O: sequential 1 MiB read and
//!   write at queue depth 4, random 4 KiB read and write at queue depth 16) through the dm-crypt
//!   mapping of the reference's layout (its CI image, made by `cryptsetup reencrypt --encrypt`:
//!   512-byte sectors) and of cryptfs's 4096-byte layout (`cryptfs image encrypt --sector-size
//!   auto` on a 4 KiB-block ext4), each also opened with dm-crypt's `no_read_workqueue` and
//!   `no_write_workqueue` (the workqueue lever).
//! - Row 6, the ceilings: the guest kernel's AES-XTS through AF_ALG (`cryptsetup benchmark`,
//!   memory only) and the same fio jobs on a blank disk without dm-crypt.
//!
//! Every layout runs in every round, the order reversed every other round; the table shows the
//! medians and every round's raw figures. The guest runs as the tests' guests do: QEMU TCG (on
//! this project's machines KVM is present but a nested guest hangs after the kernel's
//! decompression), 1 vCPU; its disks are host files through the host's page cache (so "raw" is
//! the virtio path's rate, not a flash device's). Absolute figures are the emulator's; the
//! ratios between layouts in one run are what the rows compare. Rounds: `CRYPTFS_BENCH_ROUNDS` (default 3); seconds per fio job:
//! `CRYPTFS_BENCH_RUNTIME` (default 5).

mod common;
#[path = "vm_rig/mod.rs"]
mod vm_rig;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use vm_rig::{BootOptions, Disk, RootImage};

/// Size of each benchmark disk.
const DISK_MIB: u64 = 256;

/// The layouts, in the order of the table: (name in the guest, what it is).
const LAYOUTS: &[(&str, &str)] = &[
    ("raw", "blank disk, no dm-crypt (the ceiling)"),
    ("ref512", "reference layout: 512-byte sectors"),
    (
        "cryptfs4096",
        "cryptfs `sector_size = \"auto\"`: 4096-byte sectors",
    ),
    (
        "ref512-nowq",
        "reference layout + no_read/no_write_workqueue",
    ),
    (
        "cryptfs4096-nowq",
        "cryptfs 4096 + no_read/no_write_workqueue",
    ),
];

/// The fio jobs, in the order of the table: (job name in the guest, column, reads?, in MiB/s?).
const JOBS: &[(&str, &str, bool, bool)] = &[
    ("read-1M", "seq read 1 MiB (MiB/s)", true, true),
    ("write-1M", "seq write 1 MiB (MiB/s)", false, true),
    ("randread-4k", "rand read 4 KiB (IOPS)", true, false),
    ("randwrite-4k", "rand write 4 KiB (IOPS)", false, false),
];

fn env_or(name: &str, default: u32) -> u32 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `key=value` fields of a marker.
fn fields(marker: &str) -> BTreeMap<&str, &str> {
    marker
        .split_whitespace()
        .filter_map(|f| f.split_once('='))
        .collect()
}

/// The guest's markers, once it is known to have finished with no step failed (`...-failed`).
fn checked_markers(boot: &vm_rig::Boot) -> Vec<&str> {
    let markers = boot.markers();
    assert!(
        markers.contains(&"bench-done"),
        "the bench did not finish:\n{}",
        boot.console()
    );
    let failed: Vec<&&str> = markers.iter().filter(|m| m.contains("-failed ")).collect();
    assert!(failed.is_empty(), "{failed:?}:\n{}", boot.console());
    markers
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// The sector size `cryptsetup luksDump` reports for the image's data segment.
fn sector_size(img: &Path) -> u64 {
    let dump = common::run("cryptsetup", &["luksDump", &img.display().to_string()]);
    String::from_utf8_lossy(&dump.stdout)
        .lines()
        .find_map(|l| l.trim().strip_prefix("sector:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("sector size in luksDump")
}

#[test]
#[ignore = "a benchmark, not a check: `cargo xtask bench --vm` runs it"]
fn vm_bench_steady_state_and_ceilings() {
    let rounds = env_or("CRYPTFS_BENCH_ROUNDS", 3).max(1);
    let runtime = env_or("CRYPTFS_BENCH_RUNTIME", 5).max(1);
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src");
    common::sample_tree(&src, 12);
    // The two layouts, each made by its own tool from the same tree.
    let reference = dir.path().join("reference.img");
    common::make_ci_image(&reference, DISK_MIB, &src, common::CI_PASSPHRASE);
    let ours = dir.path().join("cryptfs.img");
    common::make_ext4(&ours, DISK_MIB, &src);
    let pass = dir.path().join("passphrase");
    common::write_secret(&pass, common::CI_PASSPHRASE);
    let made = common::image_encrypt(&ours, &pass, &["--sector-size", "auto"], &[]);
    assert!(
        made.status.success(),
        "cryptfs image encrypt: {}",
        String::from_utf8_lossy(&made.stderr)
    );
    // The bench's premise: the two layouts differ in their sector size.
    assert_eq!(sector_size(&reference), 512, "the reference's CI image");
    assert_eq!(sector_size(&ours), 4096, "cryptfs's auto layout");
    let raw = dir.path().join("raw.img");
    std::fs::File::create(&raw)
        .and_then(|f| f.set_len(DISK_MIB << 20))
        .expect("raw disk");

    // vda: the rig's disk (unused by bench.sh); vdb, vdc, vdd: the bench's.
    let mut disk = Disk::new(RootImage::Plain, 64);
    let per_round = LAYOUTS.len() as u64 * JOBS.len() as u64 * (u64::from(runtime) + 3) + 30;
    let boot = disk.boot(&BootOptions {
        tpm: false,
        bench: true,
        memory_mib: 1024,
        extra_drives: vec![reference, ours, raw],
        extra_args: format!("cryptfs.bench.rounds={rounds} cryptfs.bench.runtime={runtime}"),
        timeout: Some(Duration::from_secs(120 + u64::from(rounds) * per_round)),
        ..Default::default()
    });
    let markers = checked_markers(&boot);

    // (layout, job) -> per-round values; cipher rounds.
    let mut runs: BTreeMap<(String, String), Vec<(u32, f64)>> = BTreeMap::new();
    let mut cipher: Vec<(f64, f64)> = Vec::new();
    let mut layout_lines = Vec::new();
    for m in &markers {
        if let Some(rest) = m.strip_prefix("fio ") {
            let f = fields(rest);
            let job = f["job"];
            let (_, _, reads, mib) = JOBS
                .iter()
                .find(|(j, ..)| *j == job)
                .unwrap_or_else(|| panic!("unknown job {job}"));
            let key = match (reads, mib) {
                (true, true) => "read-kib-s",
                (false, true) => "write-kib-s",
                (true, false) => "read-iops",
                (false, false) => "write-iops",
            };
            let raw: f64 = f[key].parse().unwrap_or(f64::NAN);
            let value = if *mib { raw / 1024.0 } else { raw };
            runs.entry((f["layout"].to_string(), job.to_string()))
                .or_default()
                .push((f["round"].parse().unwrap_or(0), value));
        } else if let Some(rest) = m.strip_prefix("cipher ") {
            let f = fields(rest);
            cipher.push((
                f["enc"].parse().unwrap_or(f64::NAN),
                f["dec"].parse().unwrap_or(f64::NAN),
            ));
        } else if m.starts_with("layout ") || m.starts_with("guest ") {
            layout_lines.push(m.to_string());
        }
    }
    let expected = LAYOUTS.len() * JOBS.len() * rounds as usize;
    let measured: usize = runs.values().map(Vec::len).sum();
    assert_eq!(measured, expected, "fio results: {runs:?}");
    assert_eq!(cipher.len(), rounds as usize, "cipher rounds");
    assert!(
        cipher.iter().all(|(e, d)| e.is_finite() && d.is_finite()),
        "cryptsetup benchmark printed no rate:\n{}",
        boot.console()
    );

    let med = |layout: &str, job: &str| -> f64 {
        median(
            runs.get(&(layout.to_string(), job.to_string()))
                .map(|v| v.iter().map(|(_, x)| *x).collect())
                .unwrap_or_default(),
        )
    };
    let mut out = format!(
        "# `cargo xtask bench --vm`: steady state through dm-crypt and the ceilings (issue 12, rows 5 and 6)\n\n\
         Written by `tests/vm_bench.rs` on its last run: QEMU TCG, 1 vCPU, 1 GiB, \
         the guest's disks host files through the host's page cache (so \"raw\" is the virtio \
         path's rate, not a flash device's). fio, direct I/O, {runtime} s per job after 1 s of \
         ramp, {rounds} rounds, every layout in every round (order reversed every other round); \
         medians. **× ref** = the layout's figure / the reference layout's (above 1: faster).\n\n"
    );
    let (enc, dec): (Vec<f64>, Vec<f64>) = cipher.iter().copied().unzip();
    out.push_str(&format!(
        "## Row 6: ceilings\n\n| ceiling | figure |\n|---|---|\n\
         | AES-XTS 512-bit key, encryption (`cryptsetup benchmark`, AF_ALG, memory only) | {:.0} MiB/s |\n\
         | AES-XTS 512-bit key, decryption | {:.0} MiB/s |\n",
        median(enc),
        median(dec)
    ));
    for (job, column, _, _) in JOBS {
        out.push_str(&format!(
            "| raw disk, {column} | {:.0} |\n",
            med("raw", job)
        ));
    }
    out.push_str("\n## Row 5: through the dm-crypt mapping\n\n| layout |");
    for (_, column, _, _) in JOBS {
        out.push_str(&format!(" {column} | × ref |"));
    }
    out.push_str("\n|---|");
    out.push_str(&"---|---|".repeat(JOBS.len()));
    out.push('\n');
    for (layout, what) in LAYOUTS.iter().skip(1) {
        out.push_str(&format!("| {what} |"));
        for (job, ..) in JOBS {
            let v = med(layout, job);
            out.push_str(&format!(" {v:.0} | {:.2} |", v / med("ref512", job)));
        }
        out.push('\n');
    }
    let rand_ratio = |job: &str| med("cryptfs4096", job) / med("ref512", job);
    out.push_str(&format!(
        "\nTarget (row 5): ≥ 1.3× the reference's layout on 4 KiB I/O. Measured: 4096-byte sectors \
         give {:.2}× (random read) and {:.2}× (random write).\n",
        rand_ratio("randread-4k"),
        rand_ratio("randwrite-4k")
    ));
    out.push_str("\n## Every round\n\n| layout | job | round | figure |\n|---|---|---|---|\n");
    for ((layout, job), values) in &runs {
        for (round, v) in values {
            out.push_str(&format!("| {layout} | {job} | {round} | {v:.1} |\n"));
        }
    }
    out.push_str("\n## What the guest reported\n\n");
    for l in &layout_lines {
        out.push_str(&format!("- `{l}`\n"));
    }
    println!("{out}");
    common::write_result("bench-vm.md", &out);
}

/// The p50 and p99 (ms) of one of fio's latency blocks (`jobs[0].<part>.<field>.percentile`).
fn percentiles(fio: &serde_json::Value, part: &str, field: &str) -> (f64, f64) {
    let block = &fio["jobs"][0][part][field]["percentile"];
    let at = |p: &str| block[p].as_f64().map_or(f64::NAN, |ns| ns / 1e6);
    (at("50.000000"), at("99.000000"))
}

/// MiB done in a progress line: the CLI's (`--progress-json`, or `Progress: ..., 30 MiB
/// written, ...`) or cryptfs's
/// `reencrypt:  40% (38 of 96 MiB, ...)`.
fn progress_mib(line: &str) -> Option<f64> {
    // `--progress-json`: {"device":"...","device_bytes":"N",...}
    if let Some((_, after)) = line.split_once("\"device_bytes\":\"") {
        let bytes: f64 = after.split('"').next()?.parse().ok()?;
        return Some(bytes / f64::from(1u32 << 20));
    }
    if let Some((before, _)) = line.split_once(" MiB written") {
        return before.rsplit(' ').next()?.parse().ok();
    }
    if let Some((before, _)) = line.split_once(" GiB written") {
        return before
            .rsplit(' ')
            .next()?
            .parse::<f64>()
            .ok()
            .map(|g| g * 1024.0);
    }
    let (_, after) = line.split_once('(')?;
    after.split_once(" of ")?.0.trim().parse().ok()
}

/// Boots the bench's guest with a swtpm and `disks` after the rig's own (vdb, vdc, ...),
/// telling bench.sh the last one.
fn boot_with_disks(disks: Vec<std::path::PathBuf>, args: &str, timeout: Duration) -> vm_rig::Boot {
    let last = char::from(b'a' + u8::try_from(disks.len()).expect("fewer than 26 disks"));
    Disk::new(RootImage::Plain, 64).boot(&BootOptions {
        tpm: true,
        bench: true,
        memory_mib: 1024,
        extra_drives: disks,
        extra_args: format!("{args} cryptfs.bench.last_disk=vd{last}"),
        timeout: Some(timeout),
        ..Default::default()
    })
}

#[test]
#[ignore = "a benchmark, not a check: `cargo xtask bench --vm` runs it"]
fn vm_bench_online_reencryption_against_the_reference() {
    let rounds = env_or("CRYPTFS_BENCH_ONLINE_ROUNDS", 2).clamp(1, 4);
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src");
    common::sample_tree(&src, 13);
    // One CI image (as a meta-cryptfs build makes it: PBKDF2 keyslot, 512-byte sectors), a
    // fresh copy for every run of either side.
    let image = dir.path().join("ci.img");
    common::make_cryptfs_ci_image(&image, DISK_MIB, &src, common::CI_PASSPHRASE);
    let data_mib = {
        let meta = common::luks2(&image);
        (DISK_MIB << 20).saturating_sub(meta.data_offset.expect("data offset")) as f64
            / f64::from(1u32 << 20)
    };
    let copies: Vec<std::path::PathBuf> = (0..2 * rounds)
        .map(|i| {
            let copy = dir.path().join(format!("copy-{i}.img"));
            std::fs::copy(&image, &copy).expect("copy");
            copy
        })
        .collect();
    let boot = boot_with_disks(
        copies,
        &format!("cryptfs.bench.mode=online cryptfs.bench.rounds={rounds}"),
        Duration::from_secs(240 + u64::from(rounds) * 600),
    );
    let markers = checked_markers(&boot);

    // Per (tool, round): seconds online, workload idle and during.
    let mut online: BTreeMap<(String, u32), f64> = BTreeMap::new();
    let mut workload: BTreeMap<(String, u32, String), serde_json::Value> = BTreeMap::new();
    let mut curves: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    let mut started: BTreeMap<String, f64> = BTreeMap::new();
    // (tool, round) -> guest uptime of the first progress line with every byte done.
    let mut all_done: BTreeMap<(String, u32), f64> = BTreeMap::new();
    // (tool, round) -> guest uptime the online command started.
    let mut began: BTreeMap<(String, u32), f64> = BTreeMap::new();
    for m in &markers {
        if let Some(rest) = m.strip_prefix("online ") {
            let f = fields(rest);
            let (t0, t1): (f64, f64) = (
                f["t0"].parse().unwrap_or(f64::NAN),
                f["t1"].parse().unwrap_or(f64::NAN),
            );
            if let Some(state) = f.get("state") {
                assert_eq!(*state, "header-backed-up", "cryptfs ended in {state}");
            }
            let key = (f["tool"].to_string(), f["round"].parse().unwrap_or(0));
            began.insert(key.clone(), t0);
            online.insert(key, t1 - t0);
        } else if let Some(rest) = m.strip_prefix("workload ") {
            let (head, json) = rest.split_once(" json=").expect("json");
            let f = fields(head);
            // fio prefixes "fio: terminating on signal 2" when stopped with SIGINT.
            let json = &json[json.find('{').unwrap_or(0)..];
            let value: serde_json::Value =
                serde_json::from_str(json).unwrap_or_else(|e| panic!("fio JSON ({e}): {json}"));
            workload.insert(
                (
                    f["tool"].to_string(),
                    f["round"].parse().unwrap_or(0),
                    f["phase"].to_string(),
                ),
                value,
            );
        } else if let Some((tool, rest)) = m
            .strip_prefix("ref-progress ")
            .map(|r| ("reference", r))
            .or_else(|| m.strip_prefix("ours-progress ").map(|r| ("cryptfs", r)))
        {
            let f = fields(rest);
            let round: u32 = f.get("round").and_then(|r| r.parse().ok()).unwrap_or(0);
            let t: f64 = f.get("t").and_then(|t| t.parse().ok()).unwrap_or(f64::NAN);
            let Some(mib) = progress_mib(rest) else {
                continue;
            };
            if mib + 0.5 >= data_mib {
                all_done.entry((tool.to_string(), round)).or_insert(t);
            }
            // Round 1's curve: MiB done against seconds since its first progress line.
            if round == 1 {
                let first = *started.entry(tool.to_string()).or_insert(t);
                curves
                    .entry(tool.to_string())
                    .or_default()
                    .push((t - first, mib));
            }
        }
    }
    assert_eq!(online.len(), 2 * rounds as usize, "online runs: {online:?}");
    assert_eq!(workload.len(), 4 * rounds as usize, "workload runs");
    // Start of the online command to its last byte re-encrypted (cryptfs's stage goes on with
    // the header backup and the filesystem grow).
    let reencrypted: BTreeMap<(String, u32), f64> = began
        .iter()
        .map(|(key, t0)| {
            let done = all_done.get(key).unwrap_or_else(|| {
                panic!("no progress line with all {data_mib} MiB done for {key:?}")
            });
            (key.clone(), done - t0)
        })
        .collect();

    let tools = ["reference", "cryptfs"];
    let secs = |tool: &str| -> f64 {
        median(
            reencrypted
                .iter()
                .filter(|((t, _), _)| t == tool)
                .map(|(_, s)| *s)
                .collect(),
        )
    };
    let lat = |tool: &str, phase: &str, part: &str, field: &str, p99: bool| -> f64 {
        median(
            workload
                .iter()
                .filter(|((t, _, ph), _)| t == tool && ph == phase)
                .map(|(_, v)| {
                    let (p50, p99v) = percentiles(v, part, field);
                    if p99 {
                        p99v
                    } else {
                        p50
                    }
                })
                .collect(),
        )
    };
    let mut out = format!(
        "# `cargo xtask bench --vm`: online re-encryption against the reference (issue 12, row 2)\n\n\
         Written by `tests/vm_bench.rs` on its last run: QEMU TCG, 1 vCPU, a swtpm. A CI image made \
         by `cryptfs image encrypt` ({data_mib:.0} MiB of data, 512-byte sectors), a fresh copy per \
         run, mounted, while fio writes 4 KiB blocks with an fsync after each, 20 per second. The \
         reference: `cryptsetup reencrypt --init-only` (PBKDF2 keyslot, checksum resilience, 8 MiB \
         hotzone), open, `cryptsetup repair`, then `cryptsetup reencrypt --resume-only \
         --active-name` — timed. cryptfs: `cryptfs run --stage initramfs`, `cryptfs unlock`, then \
         `cryptfs run --stage userspace` — timed, and it also writes the header backup and grows \
         the filesystem (the boot-phase lock off: two provisionings in one boot). Both at the \
         unit's priority (nice 19, SCHED_IDLE, idle I/O class). {rounds} rounds, the side that \
         runs first alternating; medians. Workload latency: fio's fsync latency and write \
         completion latency, idle (10 s before) and during.\n\n\
         | | reference | cryptfs | cryptfs / reference |\n|---|---|---|---|\n"
    );
    let (r, c) = (secs("reference"), secs("cryptfs"));
    let whole = |tool: &str| -> f64 {
        median(
            online
                .iter()
                .filter(|((t, _), _)| t == tool)
                .map(|(_, s)| *s)
                .collect(),
        )
    };
    out.push_str(&format!(
        "| start to every byte re-encrypted (s) | {r:.1} | {c:.1} | {:.2} (time) |\n\
         | rate over the data (MiB/s) | {:.1} | {:.1} | **{:.2}** |\n\
         | the whole command (s; cryptfs: + header backup + grow) | {:.1} | {:.1} | {:.2} (time) |\n",
        c / r,
        data_mib / r,
        data_mib / c,
        r / c,
        whole("reference"),
        whole("cryptfs"),
        whole("cryptfs") / whole("reference")
    ));
    for (phase, label) in [("idle", "idle"), ("during", "during")] {
        for (part, field, what) in [("sync", "lat_ns", "fsync"), ("write", "clat_ns", "write")] {
            for p99 in [false, true] {
                let (a, b) = (
                    lat("reference", phase, part, field, p99),
                    lat("cryptfs", phase, part, field, p99),
                );
                out.push_str(&format!(
                    "| workload {what} p{} {label} (ms) | {a:.2} | {b:.2} | {:.2} |\n",
                    if p99 { 99 } else { 50 },
                    b / a
                ));
            }
        }
    }
    let ceiling = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../design/results/bench-vm.md"),
    )
    .ok()
    .and_then(|t| {
        t.lines()
            .find(|l| l.contains("AES-XTS 512-bit key, encryption"))
            .and_then(|l| l.rsplit('|').nth(1))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
    });
    if let Some(aes) = ceiling {
        out.push_str(&format!(
            "\nAgainst the AES-XTS ceiling of the steady-state bench ({aes:.0} MiB/s): the reference \
             {:.0} %, cryptfs {:.0} % (a re-encryption decrypts and encrypts every byte: 50 % is \
             the cipher's own bound).\n",
            100.0 * data_mib / r / aes,
            100.0 * data_mib / c / aes
        ));
    }
    out.push_str(
        "\n## Every run\n\n| tool | round | to every byte re-encrypted (s) | whole command (s) |\n|---|---|---|---|\n",
    );
    for ((tool, round), s) in &online {
        let re = reencrypted[&(tool.clone(), *round)];
        out.push_str(&format!("| {tool} | {round} | {re:.1} | {s:.1} |\n"));
    }
    out.push_str("\n## MiB done over time (first round's progress lines)\n\n| tool | s | MiB |\n|---|---|---|\n");
    for tool in tools {
        for (t, mib) in curves.get(tool).into_iter().flatten() {
            out.push_str(&format!("| {tool} | {t:.1} | {mib:.0} |\n"));
        }
    }
    println!("{out}");
    common::write_result("bench-vm-online.md", &out);
}

/// Size of each of row 3's disks.
const BOOT_DISK_MIB: u64 = 128;

/// A later boot's ways, in the order of the table: (marker name, what it is).
const LATER_WAYS: &[(&str, &str)] = &[
    (
        "plain",
        "plain unlock: `cryptsetup open --token-only` + mount, cryptfs's disk",
    ),
    (
        "reference",
        "the same on the reference's disk (its token from systemd-cryptenroll)",
    ),
    (
        "cryptfs",
        "cryptfs: `run --stage initramfs` + `unlock` + mount",
    ),
];

#[test]
#[ignore = "a benchmark, not a check: `cargo xtask bench --vm` runs it"]
fn vm_bench_first_boot_and_later_boot() {
    let rounds = env_or("CRYPTFS_BENCH_BOOT_ROUNDS", 3).clamp(1, 3);
    let later_reps = env_or("CRYPTFS_BENCH_LATER_REPS", 3).clamp(1, 10);
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src");
    common::sample_tree(&src, 14);
    // One image of each kind, a fresh copy for every run of either side.
    let plain = dir.path().join("plain.img");
    common::make_ext4(&plain, BOOT_DISK_MIB, &src);
    let ci = dir.path().join("ci.img");
    common::make_ci_image(&ci, BOOT_DISK_MIB, &src, common::CI_PASSPHRASE);
    // Per round, in bench-boot.sh's order: plain for the reference, plain for cryptfs, CI
    // image for the reference, CI image for cryptfs.
    let copies: Vec<std::path::PathBuf> = (0..rounds)
        .flat_map(|r| [(r, 0, &plain), (r, 1, &plain), (r, 2, &ci), (r, 3, &ci)])
        .map(|(r, i, from)| {
            let copy = dir.path().join(format!("copy-{r}-{i}.img"));
            std::fs::copy(from, &copy).expect("copy");
            copy
        })
        .collect();
    let boot = boot_with_disks(
        copies,
        &format!(
            "cryptfs.bench.mode=boot cryptfs.bench.rounds={rounds} \
             cryptfs.bench.later_reps={later_reps}"
        ),
        Duration::from_secs(240 + u64::from(rounds) * 900),
    );
    let markers = checked_markers(&boot);

    // (tool, path) -> seconds per round; way -> seconds per (round, rep).
    let mut first: BTreeMap<(String, String), Vec<f64>> = BTreeMap::new();
    let mut later: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut states: Vec<(String, String)> = Vec::new();
    let secs = |f: &BTreeMap<&str, &str>| -> f64 {
        let t = |k: &str| f.get(k).and_then(|v| v.parse::<f64>().ok());
        match (t("t0"), t("t1")) {
            (Some(t0), Some(t1)) => t1 - t0,
            _ => panic!("no t0/t1 in {f:?}"),
        }
    };
    for m in &markers {
        if let Some(rest) = m.strip_prefix("first-boot ") {
            let f = fields(rest);
            first
                .entry((f["tool"].to_string(), f["path"].to_string()))
                .or_default()
                .push(secs(&f));
        } else if let Some(rest) = m.strip_prefix("later-boot ") {
            let f = fields(rest);
            later
                .entry(f["way"].to_string())
                .or_default()
                .push(secs(&f));
        } else if let Some(rest) = m.strip_prefix("state ") {
            let f = fields(rest);
            states.push((f["path"].to_string(), f["state"].to_string()));
        }
    }
    // Every run happened, and cryptfs ended each first boot where its design says.
    for tool in ["reference", "cryptfs"] {
        for path in ["plain", "ci"] {
            let n = first
                .get(&(tool.to_string(), path.to_string()))
                .map_or(0, Vec::len);
            assert_eq!(n, rounds as usize, "{tool} {path} first boots: {first:?}");
        }
    }
    for (way, _) in LATER_WAYS {
        let n = later.get(*way).map_or(0, Vec::len);
        assert_eq!(n, (rounds * later_reps) as usize, "{way} later boots");
    }
    for (path, state) in &states {
        let want = match path.as_str() {
            "plain" => "complete",
            "ci" => "reencrypting",
            _ => "header-backed-up",
        };
        assert_eq!(state, want, "cryptfs's state after the {path} run");
    }
    assert_eq!(states.len(), 3 * rounds as usize, "states: {states:?}");

    let med = |v: &[f64]| median(v.to_vec());
    let mut out = format!(
        "# `cargo xtask bench --vm`: first boot and later boot (issue 12, row 3)\n\n\
         Written by `tests/vm_bench.rs` on its last run: QEMU TCG, 1 vCPU, a swtpm, {BOOT_DISK_MIB} \
         MiB disks (a plain ext4 image and the reference's CI image, a fresh copy per run). What \
         the initramfs runs, timed from its first command to the root mounted (the kernel's boot, \
         the same for both, is not in it); tests/vm_rig/bench-boot.sh says what each side runs. \
         The reference's CI path leaves out its `cryptsetup reencrypt --init-only`: the stock \
         CLI cannot unlock a keyslot with a token, and it would only add to the reference's time. \
         {rounds} rounds, the side that runs first alternating; medians.\n\n\
         ## First boot to root mounted\n\n\
         | path | reference (s) | cryptfs (s) | speed-up (reference / cryptfs) |\n|---|---|---|---|\n"
    );
    for (path, label) in [
        ("plain", "plain ext4: shrink, in-place encryption, enroll"),
        ("ci", "CI image: enroll (cryptfs also marks the key change)"),
    ] {
        let r = med(&first[&("reference".to_string(), path.to_string())]);
        let c = med(&first[&("cryptfs".to_string(), path.to_string())]);
        out.push_str(&format!(
            "| {label} | {r:.2} | {c:.2} | **{:.2}** |\n",
            r / c
        ));
    }
    let floor = med(&later["plain"]);
    out.push_str(&format!(
        "\n## A later boot (cryptfs's plain-path disk, state header-backed-up)\n\n\
         {rounds} rounds × {later_reps} repetitions, the three ways in turn.\n\n\
         | way | median (s) | over the plain unlock (s) |\n|---|---|---|\n"
    ));
    for (way, label) in LATER_WAYS {
        let m = med(&later[*way]);
        out.push_str(&format!("| {label} | {m:.2} | {:+.2} |\n", m - floor));
    }
    out.push_str("\n## Every run\n\n| run | round/rep | s |\n|---|---|---|\n");
    for ((tool, path), v) in &first {
        for (i, s) in v.iter().enumerate() {
            out.push_str(&format!(
                "| first boot, {tool}, {path} | {} | {s:.2} |\n",
                i + 1
            ));
        }
    }
    for (way, v) in &later {
        for (i, s) in v.iter().enumerate() {
            out.push_str(&format!("| later boot, {way} | {} | {s:.2} |\n", i + 1));
        }
    }
    println!("{out}");
    common::write_result("bench-vm-boot.md", &out);
}
