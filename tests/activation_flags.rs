//! `[activation]`: dm-crypt's `no_read_workqueue` / `no_write_workqueue` stored in the LUKS2
//! header as persistent flags before the header backup, so that every activation (cryptfs's,
//! systemd-cryptsetup's, libcryptsetup's table reloads) uses them. The mapping itself needs
//! device-mapper, which this host lacks: tests/vm.rs checks the live table.

mod common;

use common::{config_text, Image, Rig};

const MIB: u64 = 128;

/// Rewrites the rig's configuration with `extra` before `[kek]`.
fn configure(rig: &Rig, extra: &str) {
    std::fs::write(
        &rig.config,
        config_text(&rig.device, &rig.boot, &rig.tpm.tcti(), extra),
    )
    .expect("config");
}

/// The `Flags:` line of `cryptsetup luksDump` (the reference's own reading of the header).
fn dumped_flags(path: &std::path::Path) -> String {
    let dump = common::run("cryptsetup", &["luksDump", &path.display().to_string()]);
    String::from_utf8_lossy(&dump.stdout)
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("Flags:")
                .map(|f| f.trim().to_string())
        })
        .expect("a Flags: line in luksDump")
}

fn digest(path: &std::path::Path) -> String {
    blake3::hash(&std::fs::read(path).expect("device"))
        .to_hex()
        .to_string()
}

/// The backup step's substeps in the journal.
fn flag_substeps(status: &serde_json::Value) -> Vec<String> {
    status["journal"]["records"]
        .as_array()
        .expect("records")
        .iter()
        .filter_map(|r| r["details"]["substep"].as_str())
        .filter(|s| s.contains("activation-flags"))
        .map(String::from)
        .collect()
}

#[test]
fn workqueue_flags_are_stored_in_the_header_and_its_backup() {
    let rig = Rig::new(Image::Ci, MIB);
    configure(
        &rig,
        "[activation]\nno_read_workqueue = true\nno_write_workqueue = true\n",
    );
    rig.run_stage("all");
    let status = rig.status();
    assert_eq!(status["state"], "header-backed-up");
    assert_eq!(rig.files_inside(), rig.files, "every file intact");
    assert_eq!(
        dumped_flags(&rig.device),
        "no-read-workqueue no-write-workqueue"
    );
    assert_eq!(
        status["device"]["persistent_flags"],
        serde_json::json!(["no-read-workqueue", "no-write-workqueue"]),
        "{:#}",
        status["device"]
    );
    // Written before the backup: the backup carries them (a restore keeps them).
    assert_eq!(
        dumped_flags(&rig.boot.join("luks.bin")),
        "no-read-workqueue no-write-workqueue"
    );
    assert_eq!(
        flag_substeps(&status),
        ["persist-activation-flags", "activation-flags-persisted"],
        "journaled around the header write"
    );
    // A repeat (the service started again) finds them in place and writes nothing.
    rig.run_stage("userspace");
    assert_eq!(flag_substeps(&rig.status()).len(), 2, "no second write");
}

#[test]
fn one_flag_alone_and_the_default_none() {
    let rig = Rig::new(Image::Plain, MIB);
    configure(&rig, "[activation]\nno_write_workqueue = true\n");
    rig.run_stage("all");
    assert_eq!(rig.status()["state"], "header-backed-up");
    assert_eq!(dumped_flags(&rig.device), "no-write-workqueue");

    let rig = Rig::new(Image::Plain, MIB);
    rig.run_stage("all");
    let status = rig.status();
    assert_eq!(status["state"], "header-backed-up");
    assert_eq!(dumped_flags(&rig.device), "(no flags)");
    assert_eq!(status["device"]["persistent_flags"], serde_json::json!([]));
    assert!(flag_substeps(&status).is_empty(), "nothing to write");
}

#[test]
fn an_unknown_activation_key_is_refused_before_any_write() {
    let rig = Rig::new(Image::Plain, MIB);
    configure(&rig, "[activation]\nno_workqueue = true\n");
    let before = digest(&rig.device);
    let out = rig.cryptfs(&["run", "--stage", "all"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no_workqueue"), "names the key: {err}");
    assert_eq!(digest(&rig.device), before, "device untouched");
}
