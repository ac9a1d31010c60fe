//! `cargo xtask <task>`: set-up, demo and test commands of the cryptfs workspace.
//!
//! | task | what it does |
//! |---|---|
//! | `deps` | installs the Debian packages the build and the tests need (apt-get, as root) |
//! | `test` | deps, then fmt check, clippy `-D warnings`, and every test (all features) |
//! | `demo` | deps, build, then the whole path on a 256 MiB image with a software TPM |
//! | `bench` | deps, release build, cryptfs against the cryptsetup CLI on the same images |

mod bench;
mod demo;
mod sh;

use anyhow::{bail, Result};

/// Debian 12 packages: build (libcryptsetup, tss2, bindgen's clang), tests and demo
/// (e2fsprogs, cryptsetup CLI for CI-style images, swtpm, tpm2-tools), the PKCS#11 rig
/// (SoftHSM2, pkcs11-tool, p11-kit) and the peers of the compatibility tests (systemd 252:
/// systemd-cryptenroll and its libcryptsetup token plugins).
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
];

fn main() -> Result<()> {
    let task = std::env::args().nth(1).unwrap_or_default();
    match task.as_str() {
        "deps" => deps(),
        "test" => test(),
        "demo" => {
            deps()?;
            demo::run()
        }
        "bench" => {
            deps()?;
            bench::run()
        }
        _ => bail!("usage: cargo xtask <deps|test|demo|bench>"),
    }
}

/// Installs what is missing.
fn deps() -> Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            !sh::succeeds(
                "dpkg-query",
                &["-W", "-f=${Status}", p],
                "install ok installed",
            )
        })
        .collect();
    if missing.is_empty() {
        println!("xtask: all {} packages present", PACKAGES.len());
        return Ok(());
    }
    println!("xtask: installing {}", missing.join(" "));
    sh::run_env(
        "apt-get",
        &["update", "-qq"],
        &[("DEBIAN_FRONTEND", "noninteractive")],
    )?;
    let mut args = vec!["install", "-y", "-qq", "--no-install-recommends"];
    args.extend(missing.iter().copied());
    sh::run_env("apt-get", &args, &[("DEBIAN_FRONTEND", "noninteractive")])
}

/// Everything CI runs.
fn test() -> Result<()> {
    deps()?;
    sh::run("cargo", &["fmt", "--all", "--", "--check"])?;
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
    )?;
    sh::run(
        "cargo",
        &[
            "test",
            "--workspace",
            "--all-features",
            "--",
            "--skip",
            "survives_a_cut_at_every_sync",
        ],
    )?;
    // The fsync-cut harness prints its table (cryptfs beside the cryptsetup reference).
    sh::run(
        "cargo",
        &[
            "test",
            "--package",
            "cryptfs",
            "--all-features",
            "--test",
            "fsync_cuts",
            "--",
            "--nocapture",
        ],
    )?;
    println!("xtask: all checks and tests passed");
    Ok(())
}
