//! `cargo xtask <task>`: set-up, demo and test commands of the cryptfs workspace.
//!
//! | task | what it does |
//! |---|---|
//! | `deps` | installs the Debian packages the build and the tests need (apt-get, as root) |
//! | `test` | deps, then fmt check, clippy `-D warnings`, and every test (all features) |
//! | `demo` | deps, build, then the whole path on a 256 MiB image with a software TPM |
//! | `bench` | deps, release build, cryptfs against the cryptsetup CLI on the same images |
//! | `bench --vm` | deps and fio, the steady-state and ceiling rows in a QEMU guest (tests/vm_bench.rs) |
//! | `vm [filter]` | deps, then the QEMU boot scenarios (all, or those matching the filter) |
//! | `fuzz [secs]` | seed corpus from real artefacts, then every cargo-fuzz target for `secs` (60) |
//! | `oe-lint` | oelint-adv over every recipe, append and class of `meta-cryptfs/` (also in `test`) |
//! | `oe-crates [--check]` | writes (or checks) the cryptfs recipe's crate list in `meta-cryptfs/` from `Cargo.lock` |

mod bench;
mod demo;
mod oe;
mod plot;
mod qemu;
mod recovery_bench;
mod sh;
mod timing;

use anyhow::{bail, Result};

/// Debian 12 packages: build (libcryptsetup, tss2, bindgen's clang), tests and demo
/// (e2fsprogs, cryptsetup CLI for CI-style images, swtpm, tpm2-tools), the PKCS#11 rig
/// (SoftHSM2, pkcs11-tool, p11-kit) and the peers of the compatibility tests (systemd 252:
/// systemd-cryptenroll and its libcryptsetup token plugins), and the VM rig (QEMU, a static
/// busybox for the initramfs, b3sum for the guest's file checks; the kernel package is
/// downloaded, not installed, by the rig itself).
pub const PACKAGES: &[&str] = &[
    "pkg-config",
    "clang",
    "libclang-dev",
    "libcryptsetup-dev",
    "cryptsetup-bin",
    "libtss2-dev",
    "e2fsprogs",
    "swtpm",
    "swtpm-tools",
    "tpm2-tools",
    "softhsm2",
    "opensc",
    "p11-kit",
    "systemd",
    "strace",
    "fuse3",
    "qemu-system-x86",
    "busybox-static",
    "b3sum",
    // The VM tier on UEFI Secure Boot (tests/vm_secure_boot.rs): OVMF with Debian's test keys,
    // systemd 252's UEFI stub for the UKI, sbsign, an ESP made without mounting, and efitools
    // for the signed dbx update.
    "ovmf",
    "systemd-boot-efi",
    "sbsigntool",
    "dosfstools",
    "mtools",
    "efitools",
    // `cryptfs image encrypt --partition` tests: GPT disk images made by sgdisk.
    "gdisk",
    // The VM tier with systemd as PID 1 (tests/vm_systemd.rs): its Debian root.
    "mmdebstrap",
    // The font of `bench --vm`'s plot (xtask/src/plot.rs, whose test the test command runs).
    "fonts-dejavu-core",
];

/// What only `cargo xtask bench --vm` needs: fio, run in the guest (with its ~80 MiB of
/// libraries, which is why the test command does not install it).
const BENCH_PACKAGES: &[&str] = &["fio"];

fn main() -> Result<()> {
    let task = std::env::args().nth(1).unwrap_or_default();
    match task.as_str() {
        "deps" => deps(),
        "oe-lint" => oe::lint(),
        "oe-crates" => oe::crates(std::env::args().nth(2).as_deref() == Some("--check")),
        "test" => test(),
        "demo" => {
            deps()?;
            demo::run()
        }
        "bench" => {
            deps()?;
            match std::env::args().nth(2).as_deref() {
                None => bench::run(),
                Some("--vm") => {
                    apt_deps(BENCH_PACKAGES)?;
                    bench::run_vm()
                }
                Some("--recovery") => recovery_bench::run(),
                Some(other) => {
                    bail!("usage: cargo xtask bench [--vm|--recovery] (not {other:?})")
                }
            }
        }
        "vm" => {
            deps()?;
            vm(std::env::args().nth(2).as_deref(), None)
        }
        "fuzz" => {
            deps()?;
            fuzz(std::env::args().nth(2).as_deref())
        }
        _ => bail!("usage: cargo xtask <deps|test|demo|bench [--vm|--recovery]|vm [filter]|fuzz [secs]|oe-crates [--check]|oe-lint>"),
    }
}

/// Installs what is missing, and never removes a package the machine has: the install is
/// simulated first (`apt-get -s`), and if apt would remove anything to satisfy it, nothing is
/// installed and the packages apt wanted to remove are named. The real install then runs with
/// `--no-remove` as well (apt-get aborts rather than remove).
fn deps() -> Result<()> {
    apt_deps(PACKAGES)?;
    oe::install_oelint()
}

/// Installs the missing ones of `packages` (see [`deps`]).
fn apt_deps(packages: &[&str]) -> Result<()> {
    let mut missing: Vec<String> = packages
        .iter()
        .copied()
        .filter(|p| {
            !sh::succeeds(
                "dpkg-query",
                &["-W", "-f=${Status}", p],
                "install ok installed",
            )
        })
        // A private QEMU unpacked by an earlier run stands in for the package.
        .filter(|p| *p != QEMU_PACKAGE || !qemu::private_present())
        .map(String::from)
        .collect();
    if missing.is_empty() {
        println!("xtask: all {} packages present", packages.len());
        return Ok(());
    }
    println!("xtask: installing {}", missing.join(" "));
    let env = [("DEBIAN_FRONTEND", "noninteractive")];
    sh::run_env("apt-get", &["update", "-qq"], &env)?;
    let mut removals = apt_removals(&simulate_install(&missing)?);
    let mut private_qemu = None;
    if !removals.is_empty() && missing.iter().any(|p| p == QEMU_PACKAGE) {
        // The usual culprit: the machine's qemu-utils from another release. QEMU is only a
        // program the VM rig runs, so it need not be installed to be used.
        let (downloaded, qemu_deps) = qemu::download()?;
        let mut without_qemu: Vec<String> = missing
            .iter()
            .filter(|p| *p != QEMU_PACKAGE)
            .cloned()
            .chain(qemu::DATA_PACKAGES.iter().map(|p| p.to_string()))
            .chain(qemu_deps)
            .collect();
        without_qemu.sort();
        without_qemu.dedup();
        let without_removals = apt_removals(&simulate_install(&without_qemu)?);
        if without_removals.is_empty() {
            println!(
                "xtask: installing {QEMU_PACKAGE} would make apt-get remove {}; QEMU is \
                 unpacked privately under {} instead",
                removals.join(" "),
                qemu::PRIVATE_ROOT
            );
            missing = without_qemu;
            private_qemu = Some(downloaded);
        }
        removals = without_removals;
    }
    if !removals.is_empty() {
        bail!(
            "installing {} would make apt-get remove {}, which this machine has; xtask never \
             removes a package you installed. Install the missing packages yourself, choosing \
             how to resolve the conflict (e.g. versions from one release), then run it again",
            missing.join(" "),
            removals.join(" ")
        );
    }
    let mut install = vec![
        "install",
        "--no-remove",
        "-y",
        "-qq",
        "--no-install-recommends",
    ];
    install.extend(missing.iter().map(String::as_str));
    sh::run_env("apt-get", &install, &env)?;
    if let Some(downloaded) = private_qemu {
        qemu::unpack(downloaded.path())?;
    }
    Ok(())
}

/// The package the VM rig's QEMU comes from.
const QEMU_PACKAGE: &str = "qemu-system-x86";

/// apt-get's plan (`-s`) for installing `packages`.
fn simulate_install(packages: &[String]) -> Result<String> {
    let mut simulate = vec!["-s", "install", "-y", "--no-install-recommends"];
    simulate.extend(packages.iter().map(String::as_str));
    sh::output("apt-get", &simulate)
}

/// The packages an `apt-get -s` plan removes (its `Remv <package> [<version>]` lines).
fn apt_removals(plan: &str) -> Vec<String> {
    plan.lines()
        .filter_map(|l| l.strip_prefix("Remv "))
        .filter_map(|rest| rest.split_whitespace().next())
        .map(String::from)
        .collect()
}

/// Everything CI runs.
fn test() -> Result<()> {
    let mut timings = timing::Timings::default();
    let result = test_steps(&mut timings);
    timings.print();
    result?;
    println!("xtask: all checks and tests passed");
    Ok(())
}

fn test_steps(t: &mut timing::Timings) -> Result<()> {
    t.step("deps", false, deps)?;
    t.step("fmt", false, || {
        sh::run("cargo", &["fmt", "--all", "--", "--check"])
    })?;
    t.step("clippy", false, || {
        sh::run(
            "cargo",
            &[
                "clippy",
                "--workspace",
                "--all-targets",
                "--all-features",
                "--",
                "-D",
                "warnings",
            ],
        )
    })?;
    // The OE layer: its crate list matches Cargo.lock, oelint-adv finds nothing.
    t.step("oe layer", false, || {
        oe::crates(true)?;
        oe::lint()
    })?;
    // Host tier. The crash harnesses and the VM suite run on their own below, with their
    // tables and figures printed.
    t.step("host tier", false, || {
        sh::run(
            "cargo",
            &[
                "test",
                "--workspace",
                "--all-features",
                "--",
                "--skip",
                "survives_a_cut_at_every_sync",
                "--skip",
                "recovers_from_lost_unflushed_writes",
                "--skip",
                "vm_",
            ],
        )
    })?;
    // The shipped build (no features): its unit tests check that the test-only hooks
    // (`export-plaintext`, `CRYPTFS_BOOT_ID`, failpoints) are not in it.
    t.step("shipped build's unit tests", false, || {
        sh::run("cargo", &["test", "--package", "cryptfs", "--lib"])
    })?;
    for harness in ["fsync_cuts", "lost_writes"] {
        t.step(harness, false, || {
            sh::run("cargo", &test_binary_args(harness, &["--nocapture"]))
        })?;
    }
    vm(None, Some(t))
}

/// `cargo` arguments that run one test binary of the cryptfs package (all features) with
/// `harness_args` for the test harness.
fn test_binary_args<'a>(test: &'a str, harness_args: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "test",
        "--package",
        "cryptfs",
        "--all-features",
        "--test",
        test,
        "--",
    ];
    args.extend_from_slice(harness_args);
    args
}

/// The QEMU boot scenarios (direct kernel boots, then UEFI Secure Boot under OVMF): two VMs at
/// a time at most (one per test thread), figures printed.
fn vm(filter: Option<&str>, mut timings: Option<&mut timing::Timings>) -> Result<()> {
    // The direct boots, the lost-write states (tests/vm_lost_writes.rs), then the UEFI
    // Secure Boot scenarios, then systemd as PID 1.
    for test in ["vm", "vm_lost_writes", "vm_secure_boot", "vm_systemd"] {
        let mut args = test_binary_args(test, &["--nocapture", "--test-threads", "2"]);
        args.extend(filter);
        match timings.as_deref_mut() {
            Some(t) => t.step(test, true, || sh::run("cargo", &args))?,
            None => sh::run("cargo", &args)?,
        }
    }
    Ok(())
}

/// The cargo-fuzz targets in `fuzz/`, one per kind of hostile input.
const FUZZ_TARGETS: &[&str] = &[
    "luks2_header",
    "ext4_superblock",
    "tpm2_token",
    "journal_record",
    "journal_file",
    "config",
];

/// Writes the seed corpus (real headers, superblocks, tokens, journal, config, made by the
/// real tools in `tests/hostile_bytes.rs`), then runs every fuzz target for `secs` seconds
/// (default 60) with nightly. A single allocation above 128 MiB counts as a crash: no input
/// may make a reader allocate without bound.
fn fuzz(secs: Option<&str>) -> Result<()> {
    let secs: u64 = match secs {
        None => 60,
        Some(s) => s
            .parse()
            .map_err(|_| anyhow::anyhow!("usage: cargo xtask fuzz [seconds per target]"))?,
    };
    if !sh::succeeds("cargo", &["fuzz", "--version"], "cargo-fuzz") {
        sh::run("cargo", &["install", "--locked", "cargo-fuzz"])?;
    }
    let root = std::env::current_dir()?;
    let fuzz_dir = root.join("fuzz");
    let seeds = fuzz_dir.join("seeds");
    let seeds_str = seeds.display().to_string();
    sh::run_env(
        "cargo",
        &test_binary_args(
            "hostile_bytes",
            &["--ignored", "--exact", "write_fuzz_corpus"],
        ),
        &[("CRYPTFS_FUZZ_CORPUS", &seeds_str)],
    )?;
    let max_time = format!("-max_total_time={secs}");
    let mut crashed = Vec::new();
    for target in FUZZ_TARGETS {
        let corpus = fuzz_dir.join("corpus").join(target);
        std::fs::create_dir_all(&corpus)?;
        let corpus = corpus.display().to_string();
        let seed = seeds.join(target).display().to_string();
        let status = std::process::Command::new("cargo")
            .current_dir(&fuzz_dir)
            .args([
                "+nightly", "fuzz", "run", "-O", target, &corpus, &seed, "--",
            ])
            .args([
                max_time.as_str(),
                "-malloc_limit_mb=128",
                "-rss_limit_mb=2048",
            ])
            .status()?;
        if !status.success() {
            crashed.push(*target);
        }
    }
    if !crashed.is_empty() {
        bail!(
            "fuzz targets with a crash: {} (inputs in fuzz/artifacts/<target>/)",
            crashed.join(", ")
        );
    }
    println!(
        "xtask: {} fuzz targets ran {secs} s each without a crash",
        FUZZ_TARGETS.len()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On apt-get's real simulation output: a removal plan names the package, an install plan
    /// of a package the machine has names none.
    #[test]
    fn removals_are_read_from_a_real_apt_get_simulation() {
        let installed = |p: &str| {
            sh::succeeds(
                "dpkg-query",
                &["-W", "-f=${Status}", p],
                "install ok installed",
            )
        };
        if !installed("b3sum") {
            assert_ne!(
                std::env::var("CI").as_deref(),
                Ok("true"),
                "CI installs b3sum (cargo xtask deps)"
            );
            return;
        }
        let remove = sh::output("apt-get", &["-s", "remove", "b3sum"]).expect("apt-get -s");
        assert_eq!(apt_removals(&remove), ["b3sum"], "{remove}");
        let install = sh::output("apt-get", &["-s", "--no-remove", "install", "b3sum"])
            .expect("apt-get -s install");
        assert!(apt_removals(&install).is_empty(), "{install}");
    }

    #[test]
    fn removals_of_the_reported_case_are_named() {
        // The shape of the plan behind issue 9, in apt-get's simulation format: a qemu from
        // another release displacing the machine's qemu-utils.
        let plan = "Reading package lists...\nThe following packages will be REMOVED:\n  \
                    qemu-utils\nRemv qemu-utils [1:7.2+dfsg-7+deb12u7]\n\
                    Inst qemu-system-x86 (1:8.2.2 other-release [amd64])\n";
        assert_eq!(apt_removals(plan), ["qemu-utils"]);
    }
}
