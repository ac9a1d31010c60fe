//! A damaged LUKS2 header is restored from `luks.bin` only after its digest matches the journal.

mod common;

use std::io::{Seek, SeekFrom, Write};

use common::{file_blake3, Image, Rig};

fn scribble(path: &std::path::Path, offset: u64, len: usize) {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open");
    f.seek(SeekFrom::Start(offset)).expect("seek");
    f.write_all(&vec![0xFFu8; len]).expect("write");
    f.sync_all().expect("sync");
}

#[test]
fn damaged_primary_header_is_restored_from_the_verified_backup() {
    let rig = Rig::new(Image::Plain, 128);
    rig.run_stage("all");
    // Scribble over the primary header's checksum (magic stays: still recognisably LUKS2).
    scribble(&rig.device, 448, 64);
    let s = rig.status();
    assert_eq!(
        s["device"]["header_copies_ok"],
        serde_json::json!([false, true])
    );
    let out = rig.run_stage("all");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("restoring the verified backup"), "{err}");
    let s = rig.status();
    assert_eq!(
        s["device"]["header_copies_ok"],
        serde_json::json!([true, true])
    );
    assert_eq!(s["state"], "header-backed-up");
    assert_eq!(rig.files_inside(), rig.files);
}

#[test]
fn backup_with_a_wrong_digest_is_never_restored() {
    let rig = Rig::new(Image::Plain, 128);
    rig.run_stage("all");
    let backup = rig.boot.join("luks.bin");
    scribble(&backup, 20_000, 16);
    scribble(&rig.device, 448, 64);
    let before = file_blake3(&rig.device);
    let out = rig.cryptfs(&["run", "--stage", "all"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("does not match the digest in the journal"),
        "{err}"
    );
    assert_eq!(file_blake3(&rig.device), before, "nothing restored");
    assert_eq!(rig.status()["header_backup"]["digest_ok"], false);
}
