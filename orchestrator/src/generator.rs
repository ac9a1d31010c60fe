//! `cryptfs systemd-generator`: a systemd generator (`units/cryptfs-generator` calls it) that
//! makes `cryptfs.service` wait for the mounts the configuration really uses.
//!
//! The unit's static `RequiresMountsFor=/boot` only knows the default `boot_dir`. At every
//! boot (and `systemctl daemon-reload`) systemd runs generators before it loads units; this one
//! reads the configuration and writes the drop-in
//! `<normal-dir>/cryptfs.service.d/50-cryptfs-mounts.conf` with `RequiresMountsFor=` for the
//! boot directory and the journal's directory. Without a configuration it writes nothing (the
//! unit has `ConditionPathExists=` on it anyway).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

use crate::config::Config;

/// The drop-in's file name under `cryptfs.service.d/`.
pub const DROP_IN: &str = "50-cryptfs-mounts.conf";

/// One path as a `RequiresMountsFor=` word: absolute, `%` escaped as a specifier; anything
/// systemd would split or unquote is refused rather than guessed at.
fn unit_path_word(path: &Path) -> crate::Result<String> {
    let text = path
        .to_str()
        .with_context(|| format!("{} is not UTF-8", path.display()))?;
    if !path.is_absolute() {
        bail!("{text} is not an absolute path");
    }
    if text
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '"' | '\'' | '\\'))
    {
        bail!(
            "{text:?} holds a space, quote, backslash or control character: unsupported in a unit"
        );
    }
    Ok(text.replace('%', "%%"))
}

/// The directories cryptfs needs mounted: the boot directory, and the journal's directory when
/// the journal is configured elsewhere.
pub fn required_mounts(config: &Config) -> Vec<PathBuf> {
    let mut paths = vec![config.boot_dir.clone()];
    if let Some(dir) = config.journal_path().parent() {
        if !dir.starts_with(&config.boot_dir) {
            paths.push(dir.to_path_buf());
        }
    }
    paths
}

/// The text of the drop-in for `config`.
pub fn drop_in_text(config: &Config) -> crate::Result<String> {
    let words = required_mounts(config)
        .iter()
        .map(|p| unit_path_word(p))
        .collect::<crate::Result<Vec<_>>>()
        .context("cannot name the configured boot_dir/journal in cryptfs.service")?;
    Ok(format!(
        "# Written by cryptfs-generator from the cryptfs configuration: the journal and the\n\
         # header backup live here.\n[Unit]\nRequiresMountsFor={}\n",
        words.join(" ")
    ))
}

/// Runs as a generator: writes the drop-in into `normal_dir` (systemd's first argument).
/// Returns the file written, or `None` without a configuration.
pub fn run(config_path: &Path, normal_dir: &Path) -> crate::Result<Option<PathBuf>> {
    if !config_path.exists() {
        return Ok(None);
    }
    let config = Config::load(config_path)?;
    let text = drop_in_text(&config)?;
    let dir = normal_dir.join("cryptfs.service.d");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let path = dir.join(DROP_IN);
    std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(Some(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_systemd_would_split_are_refused_and_specifiers_escaped() {
        assert_eq!(
            unit_path_word(Path::new("/srv/boot%a")).expect("ok"),
            "/srv/boot%%a"
        );
        for bad in [
            "relative/boot",
            "/srv/my boot",
            "/srv/\"boot",
            "/srv/b\\oot",
        ] {
            assert!(unit_path_word(Path::new(bad)).is_err(), "{bad}");
        }
    }
}
