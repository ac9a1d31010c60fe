//! meta-cryptfs installs the very files the VM tier boots: every `file://` of its recipes that
//! resolves into `units/` is the file `tests/vm_rig` reads, and every unit file the rig reads
//! is installed by a recipe. Its default configurations load. (The crate list and oelint-adv
//! are checked by `cargo xtask test`, see xtask/src/oe.rs.)

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .expect("root")
}

fn recipes() -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut dirs = vec![root().join("meta-cryptfs")];
    while let Some(dir) = dirs.pop() {
        for e in std::fs::read_dir(&dir).expect("read_dir").flatten() {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "bb") {
                out.push(p);
            }
        }
    }
    out
}

/// The `file://` entries of a recipe, resolved as bitbake's FILESPATH does for it:
/// `FILESEXTRAPATHS:prepend := "${THISDIR}/…:"` first, then `${THISDIR}/files`.
fn resolved_files(recipe: &Path) -> Vec<(String, PathBuf)> {
    let text = std::fs::read_to_string(recipe).expect("recipe");
    let this_dir = recipe.parent().expect("dir");
    let mut search: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.strip_prefix("FILESEXTRAPATHS:prepend := \""))
        .flat_map(|v| {
            v.trim_end_matches('"')
                .split(':')
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .filter(|d| !d.is_empty())
        .map(|d| PathBuf::from(d.replace("${THISDIR}", &this_dir.display().to_string())))
        .collect();
    search.push(this_dir.join("files"));
    let mut out = Vec::new();
    for part in text.split("file://").skip(1) {
        let name: String = part
            .chars()
            .take_while(|c| !c.is_whitespace() && *c != '"' && *c != ';' && *c != '\\')
            .collect();
        if name.starts_with("${") {
            continue; // LIC_FILES_CHKSUM's ${COMMON_LICENSE_DIR}
        }
        if text.contains(&format!("LIC_FILES_CHKSUM = \"file://{name}")) {
            continue; // a license file of the fetched source
        }
        let found = search
            .iter()
            .map(|d| d.join(&name))
            .find(|p| p.exists())
            .unwrap_or_else(|| panic!("{}: file://{name} resolves nowhere", recipe.display()));
        out.push((name, found.canonicalize().expect("canonical")));
    }
    out
}

/// The files under `units/` the VM rig reads (`include_str!("../../units/…")`).
fn rig_unit_files() -> BTreeSet<PathBuf> {
    let rig_dir = root().join("tests/vm_rig");
    let text = std::fs::read_to_string(rig_dir.join("mod.rs")).expect("rig");
    text.split("include_str!(\"")
        .skip(1)
        .filter_map(|p| p.split('"').next())
        .filter(|p| p.contains("units/"))
        .map(|p| rig_dir.join(p).canonicalize().expect("rig unit file"))
        .collect()
}

#[test]
fn the_recipes_install_the_files_the_vm_tier_boots() {
    let units = root().join("units");
    let mut installed = BTreeSet::new();
    let mut from_units = 0;
    for recipe in recipes() {
        for (name, path) in resolved_files(&recipe) {
            if path.starts_with(&units) {
                from_units += 1;
                installed.insert(path.clone());
            }
            eprintln!("{}: file://{name} -> {}", recipe.display(), path.display());
        }
    }
    let rig = rig_unit_files();
    assert!(rig.len() >= 2, "{rig:?}");
    assert!(from_units >= 3, "{installed:?}");
    for file in &rig {
        assert!(
            installed.contains(file),
            "the VM tier boots {} but no recipe installs it",
            file.display()
        );
    }
    // Installed where the rig puts it: the framework's /init.d/85-cryptfs.
    let module = std::fs::read_to_string(root().join(
        "meta-cryptfs/recipes-core/initramfs-module-cryptfs/initramfs-module-cryptfs_0.1.0.bb",
    ))
    .expect("module recipe");
    assert!(module.contains("${D}/init.d/85-cryptfs"));
    let rig_src = std::fs::read_to_string(root().join("tests/vm_rig/mod.rs")).expect("rig");
    assert!(rig_src.contains("init.d/85-cryptfs"));
    eprintln!(
        "{from_units} unit files installed from units/, {} of them booted by the VM tier",
        rig.len()
    );
}

#[test]
fn the_default_configurations_load() {
    let dir = tempfile::tempdir().expect("tmp");
    let recipe = root().join("meta-cryptfs/recipes-core/cryptfs/cryptfs_0.1.0.bb");
    let text = std::fs::read_to_string(&recipe).expect("recipe");
    let default = |var: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{var} ??= \"")))
            .map(|v| v.trim_end_matches('"').to_string())
            .unwrap_or_else(|| panic!("{var} has no default"))
    };
    let mut loaded = 0;
    for kind in ["tpm2", "pkcs11"] {
        let template = recipe
            .parent()
            .expect("dir")
            .join(format!("files/cryptfs-{kind}.toml"));
        let mut toml = std::fs::read_to_string(&template).expect("template");
        for var in [
            "CRYPTFS_ROOT_DEVICE",
            "CRYPTFS_BOOT_DIR",
            "CRYPTFS_LABEL",
            "CRYPTFS_MAPPING_NAME",
        ] {
            toml = toml.replace(&format!("@{var}@"), &default(var));
        }
        assert!(!toml.contains('@'), "{toml}");
        let path = dir.path().join(format!("{kind}.toml"));
        std::fs::write(&path, &toml).expect("write");
        let config =
            cryptfs::config::Config::load(&path).unwrap_or_else(|e| panic!("{kind}: {e:#}"));
        assert_eq!(config.device, Path::new("/dev/disk/by-label/otaroot"));
        assert_eq!(
            format!("{:?}", config.kek.kind).to_lowercase(),
            kind.to_string()
        );
        loaded += 1;
    }
    assert_eq!(loaded, 2);
}
