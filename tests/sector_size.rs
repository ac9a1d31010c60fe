//! 4096-byte encryption sectors (`sector_size` in the configuration, `--sector-size` of
//! `cryptfs image encrypt`): what the header records, that every file survives, that a
//! volume-key change keeps the sector size, and that a sector larger than the filesystem's
//! blocks is refused before any write.

mod common;

use std::path::Path;

use common::{config_text, image_encrypt, luks2, make_ext4, write_secret, Rig, CI_PASSPHRASE};

const MIB: u64 = 128;
/// A filesystem of 1024-byte blocks spends more on metadata: the sample tree needs more room.
const MIB_1K_BLOCKS: u64 = 160;

/// The sector size of the (single) data segment of `device`.
fn sector_size_of(device: &Path) -> u64 {
    let meta = luks2(device);
    assert_eq!(meta.segment_count, 1, "one data segment: {}", meta.json);
    meta.json
        .pointer("/segments/0/sector_size")
        .and_then(serde_json::Value::as_u64)
        .expect("segment 0 has a sector size")
}

/// A plain ext4 image of `mib` MiB with `block_size`-byte blocks holding `src`.
fn make_ext4_with_blocks(img: &Path, mib: u64, src: &Path, block_size: u32) {
    let f = std::fs::File::create(img).expect("create image");
    f.set_len(mib << 20).expect("size");
    drop(f);
    common::run(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-b",
            &block_size.to_string(),
            "-L",
            "otaroot",
            "-d",
            &src.display().to_string(),
            &img.display().to_string(),
        ],
    );
}

/// Rewrites the rig's configuration with `line` at the top level.
fn configure(rig: &Rig, line: &str) {
    std::fs::write(
        &rig.config,
        config_text(&rig.device, &rig.boot, &rig.tpm.tcti(), line),
    )
    .expect("config");
}

fn provisions_with(line: &str, block_size: u32) -> (Rig, u64) {
    let rig = Rig::with_image(MIB, |device, src| {
        make_ext4_with_blocks(device, MIB, src, block_size)
    });
    configure(&rig, line);
    rig.run_stage("all");
    assert_eq!(rig.status()["state"], "header-backed-up");
    assert_eq!(rig.files_inside(), rig.files, "every file intact");
    let sector = sector_size_of(&rig.device);
    (rig, sector)
}

#[test]
fn in_place_encryption_with_sector_size_4096_keeps_every_file() {
    let (rig, sector) = provisions_with("sector_size = 4096", 4096);
    assert_eq!(sector, 4096);
    // cryptsetup itself opens it: the layout is standard LUKS2, not a cryptfs dialect.
    let dump = common::run(
        "cryptsetup",
        &["luksDump", &rig.device.display().to_string()],
    );
    let dump = String::from_utf8_lossy(&dump.stdout).into_owned();
    assert!(dump.contains("sector: 4096 [bytes]"), "{dump}");
}

#[test]
fn sector_size_auto_takes_4096_over_4096_byte_blocks_and_512_is_the_default() {
    let (_rig, auto) = provisions_with("sector_size = \"auto\"", 4096);
    assert_eq!(auto, 4096);
    let (_rig, default) = provisions_with("", 4096);
    assert_eq!(default, 512, "the reference's layout stays the default");
}

#[test]
fn sector_size_4096_over_1024_byte_blocks_is_refused_before_any_write_and_auto_takes_512() {
    let rig = Rig::with_image(MIB_1K_BLOCKS, |device, src| {
        make_ext4_with_blocks(device, MIB_1K_BLOCKS, src, 1024)
    });
    configure(&rig, "sector_size = 4096");
    let before = common::file_blake3(&rig.device);
    let out = rig.cryptfs(&["run", "--stage", "all"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "refused: {stderr}");
    assert!(
        stderr.contains("larger than the filesystem's 1024-byte blocks")
            && stderr.contains("mkfs.ext4 -b 4096"),
        "a clear, actionable error: {stderr}"
    );
    assert_eq!(
        common::file_blake3(&rig.device),
        before,
        "the device is byte-identical"
    );
    let status = rig.status();
    assert_eq!(status["state"], "unencrypted");
    assert!(
        common::done_steps(&status).is_empty(),
        "no step ran: {status}"
    );
    let records = status["journal"]["records"].as_array().expect("records");
    assert!(
        records.iter().all(|r| r["phase"] != "intent"),
        "no intent was journaled (the refusal is, as failed): {records:?}"
    );
    assert!(
        records
            .iter()
            .any(|r| r["phase"] == "failed" && r["step"] == "encrypt-in-place"),
        "the refusal is in the journal: {records:?}"
    );

    configure(&rig, "sector_size = \"auto\"");
    rig.run_stage("all");
    assert_eq!(rig.status()["state"], "header-backed-up");
    assert_eq!(sector_size_of(&rig.device), 512);
    assert_eq!(rig.files_inside(), rig.files);
}

#[test]
fn a_cryptfs_made_4096_ci_image_keeps_4096_through_the_first_boot_key_change() {
    let rig = Rig::with_image(MIB, |device, src| {
        make_ext4(device, MIB, src);
        let pass = device.with_extension("passphrase");
        write_secret(&pass, CI_PASSPHRASE);
        let out = image_encrypt(device, &pass, &["--sector-size", "4096"], &[]);
        assert!(
            out.status.success(),
            "cryptfs image encrypt: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::remove_file(&pass).expect("rm passphrase file");
    });
    assert_eq!(sector_size_of(&rig.device), 4096, "the CI image");
    let digest_before = luks2(&rig.device).segment_digest().map(String::from);
    rig.run_stage("all");
    let status = rig.status();
    assert_eq!(status["state"], "header-backed-up");
    let steps = common::done_steps(&status);
    assert!(
        steps.iter().any(|s| s == "reencrypt"),
        "the volume key was replaced: {steps:?}"
    );
    assert_ne!(
        luks2(&rig.device).segment_digest().map(String::from),
        digest_before,
        "a new volume key"
    );
    assert_eq!(sector_size_of(&rig.device), 4096, "kept by the key change");
    assert_eq!(rig.files_inside(), rig.files);
}

#[test]
fn image_encrypt_refuses_a_sector_size_the_image_cannot_take_and_leaves_it_untouched() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("src");
    common::sample_tree(&src, 7);
    let img = dir.path().join("root.img");
    make_ext4_with_blocks(&img, MIB_1K_BLOCKS, &src, 1024);
    let pass = dir.path().join("passphrase");
    write_secret(&pass, CI_PASSPHRASE);
    let before = common::file_blake3(&img);
    for (arg, expected) in [
        ("4096", "larger than the filesystem's 1024-byte blocks"),
        ("2048", "use 512, 4096 or \"auto\""),
    ] {
        let out = image_encrypt(&img, &pass, &["--sector-size", arg], &[]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "--sector-size {arg} refused");
        assert!(stderr.contains(expected), "--sector-size {arg}: {stderr}");
        assert_eq!(common::file_blake3(&img), before, "image untouched");
        assert!(
            !dir.path().join("root.img.cryptfs-encrypt").exists(),
            "no work directory left"
        );
    }
}
