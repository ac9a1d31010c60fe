//! A private QEMU for machines where apt cannot install `qemu-system-x86` without removing
//! something the machine has.
//!
//! The case is real: a machine with a newer `qemu-utils` (e.g. from backports) `Breaks` the
//! release's `qemu-system-common`, so installing `qemu-system-x86` would remove the user's
//! `qemu-utils`. xtask never does that. Instead it downloads the release's `qemu-system-x86`
//! and `qemu-system-common` packages, unpacks them under [`PRIVATE_ROOT`] without registering
//! them with dpkg (as the VM rig already does with the kernel package), and installs only
//! their library dependencies and the firmware/data packages, which conflict with nothing.
//! The VM rig runs that binary with `QEMU_MODULE_DIR` and `-L` pointing at the unpacked tree.

use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::sh;

/// Where the private QEMU is unpacked (the VM rig looks here too).
pub const PRIVATE_ROOT: &str = "/opt/cryptfs-xtask/qemu";

/// The QEMU packages unpacked privately instead of installed.
const UNPACKED: [&str; 2] = ["qemu-system-x86", "qemu-system-common"];

/// Data and firmware the private binary reads; installable beside any `qemu-utils`.
pub const DATA_PACKAGES: [&str; 3] = ["qemu-system-data", "seabios", "ipxe-qemu"];

/// Whether the private QEMU is unpacked and runs.
pub fn private_present() -> bool {
    let binary = Path::new(PRIVATE_ROOT).join("usr/bin/qemu-system-x86_64");
    binary.exists()
        && sh::succeeds(
            &binary.to_string_lossy(),
            &["--version"],
            "QEMU emulator version",
        )
}

/// Downloads the QEMU packages into a temporary directory, returning it and the names of
/// their dependencies other than QEMU's own packages (libraries, firmware).
pub fn download() -> Result<(tempfile::TempDir, Vec<String>)> {
    let dir = tempfile::tempdir().context("temporary directory for the QEMU packages")?;
    let status = std::process::Command::new("apt-get")
        .arg("download")
        .args(UNPACKED)
        .current_dir(dir.path())
        .status()
        .context("apt-get download")?;
    if !status.success() {
        bail!("apt-get download {} failed", UNPACKED.join(" "));
    }
    let mut deps = Vec::new();
    for deb in debs(dir.path())? {
        let depends = sh::output("dpkg-deb", &["-f", &deb, "Depends"])?;
        deps.extend(dependency_names(&depends));
    }
    deps.sort();
    deps.dedup();
    Ok((dir, deps))
}

/// Unpacks the downloaded packages under [`PRIVATE_ROOT`].
pub fn unpack(dir: &Path) -> Result<()> {
    let staging = format!("{PRIVATE_ROOT}.new");
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).with_context(|| format!("creating {staging}"))?;
    for deb in debs(dir)? {
        sh::run("dpkg-deb", &["-x", &deb, &staging])?;
    }
    let _ = std::fs::remove_dir_all(PRIVATE_ROOT);
    std::fs::rename(&staging, PRIVATE_ROOT)
        .with_context(|| format!("moving {staging} to {PRIVATE_ROOT}"))?;
    if !private_present() {
        bail!("the QEMU unpacked under {PRIVATE_ROOT} does not run (`--version` failed)");
    }
    println!("xtask: QEMU unpacked under {PRIVATE_ROOT} (not registered with dpkg)");
    Ok(())
}

fn debs(dir: &Path) -> Result<Vec<String>> {
    let mut debs: Vec<String> = std::fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "deb"))
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    debs.sort();
    if debs.len() != UNPACKED.len() {
        bail!(
            "expected {} QEMU packages in {}, found {}",
            UNPACKED.len(),
            dir.display(),
            debs.len()
        );
    }
    Ok(debs)
}

/// Package names of a `Depends:` field, first alternative of each, without versions and
/// without QEMU's own packages (they are unpacked, not installed).
fn dependency_names(depends: &str) -> Vec<String> {
    depends
        .split(',')
        .filter_map(|item| item.split('|').next())
        .filter_map(|first| first.split_whitespace().next())
        .map(|name| name.split(':').next().unwrap_or(name).to_string())
        .filter(|name| !name.is_empty() && !name.starts_with("qemu-"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dependency_names_drop_versions_alternatives_and_qemu() {
        let field = "libaio1 (>= 0.3.93), libc6 (>= 2.34), qemu-system-common (= 1:7.2+dfsg-7), \
                     qemu-system-data (>> 1:7.2+dfsg~), seabios, ipxe-qemu, libfoo | libbar, \
                     python3:any";
        assert_eq!(
            dependency_names(field),
            [
                "libaio1",
                "libc6",
                "seabios",
                "ipxe-qemu",
                "libfoo",
                "python3"
            ]
        );
    }
}
