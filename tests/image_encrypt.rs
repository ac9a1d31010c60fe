//! `cryptfs image encrypt`, the build host's half: the CI image it makes has the reference's
//! header layout (side by side with the `cryptsetup`-made one), is taken over by cryptfs on
//! first boot, survives a cut at every step, refuses what it must with the input untouched, and
//! encrypts one partition of a GPT disk image without touching the others.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

use common::{
    image_encrypt, luks2, make_ci_image, make_cryptfs_ci_image, make_ext4, run, sample_tree,
    tree_hashes, volume_key_with, write_secret, Image, Rig, CI_PASSPHRASE, IMAGE_BOUNDARIES,
};
use cryptfs::luks::marker;
use cryptfs_states::VolumeKeyOrigin;

/// `cryptsetup luksDump` as `section/item/field → value` (multi-line values keep their first
/// line; salts and digests differ anyway).
fn luks_dump(img: &Path) -> BTreeMap<String, String> {
    let out = run("cryptsetup", &["luksDump", &img.display().to_string()]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut fields = BTreeMap::new();
    let (mut section, mut item) = (String::from("header"), String::new());
    for line in text.lines() {
        if line.trim().is_empty() || line.starts_with("LUKS header information") {
            continue;
        }
        let indent = line.len() - line.trim_start().len();
        let Some((key, value)) = line.trim().split_once(':') else {
            continue;
        };
        let (key, value) = (key.trim().to_string(), value.trim().to_string());
        if indent == 0 {
            if value.is_empty() {
                section = key;
                item.clear();
            } else {
                fields.insert(key, value);
            }
        } else if indent <= 2 && key.chars().all(|c| c.is_ascii_digit()) {
            item = key.clone();
            fields.insert(format!("{section}/{key}"), value);
        } else if !key.is_empty() && !value.is_empty() {
            fields.insert(format!("{section}/{item}/{key}"), value);
        }
    }
    fields
}

/// Fields that must differ or may: identity, the KDF (the point of the change) and the marker.
fn may_differ(field: &str) -> bool {
    field == "UUID"
        || field == "Epoch"
        || field.starts_with("Tokens")
        || field.starts_with("Digests")
        || [
            "PBKDF",
            "Time cost",
            "Memory",
            "Threads",
            "Iterations",
            "Salt",
            "Hash",
        ]
        .iter()
        .any(|f| field.ends_with(&format!("/{f}")))
}

/// Seconds `cryptsetup open --test-passphrase --key-slot 31` takes on `img`.
fn unlock_seconds(img: &Path, passphrase: &str, keyslot: &str) -> f64 {
    let start = Instant::now();
    common::run_with_stdin(
        "cryptsetup",
        &[
            "open",
            "--test-passphrase",
            "--key-slot",
            keyslot,
            &img.display().to_string(),
        ],
        passphrase.as_bytes(),
    );
    start.elapsed().as_secs_f64()
}

#[test]
fn cryptfs_made_ci_image_has_the_reference_header_layout() {
    let dir = tempfile::tempdir().expect("tmp");
    let src = dir.path().join("src");
    sample_tree(&src, 7);
    let reference = dir.path().join("cryptsetup.img");
    let ours = dir.path().join("cryptfs.img");
    make_ci_image(&reference, 128, &src, CI_PASSPHRASE);
    make_cryptfs_ci_image(&ours, 128, &src, CI_PASSPHRASE);
    let (a, b) = (luks_dump(&reference), luks_dump(&ours));
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    let mut table = String::from(
        "# `cryptsetup luksDump`: the reference's CI image (cryptsetup reencrypt --encrypt \
         --reduce-device-size 32M --key-slot 31, test-cost Argon2id) vs `cryptfs image \
         encrypt`, 128 MiB ext4\n\n| field | cryptsetup | cryptfs | |\n|---|---|---|---|\n",
    );
    let (mut same, mut differ) = (0, Vec::new());
    for key in keys {
        let (x, y) = (
            a.get(key).map_or("—", String::as_str),
            b.get(key).map_or("—", String::as_str),
        );
        let verdict = if x == y {
            same += 1;
            "same"
        } else if may_differ(key) {
            "differs (expected)"
        } else {
            differ.push(key.clone());
            "DIFFERS"
        };
        table.push_str(&format!("| {key} | {x} | {y} | {verdict} |\n"));
    }
    // First-boot cost of the CI keyslot: one unlock with the passphrase.
    let default_cost = dir.path().join("default-kdf.img");
    std::fs::File::create(&default_cost)
        .expect("create")
        .set_len(32 << 20)
        .expect("size");
    common::run_with_stdin(
        "cryptsetup",
        &[
            "luksFormat",
            "--batch-mode",
            "--type",
            "luks2",
            "--key-slot",
            "31",
            &default_cost.display().to_string(),
        ],
        CI_PASSPHRASE.as_bytes(),
    );
    let t_default = unlock_seconds(&default_cost, CI_PASSPHRASE, "31");
    let t_reference = unlock_seconds(&reference, CI_PASSPHRASE, "31");
    let t_ours = unlock_seconds(&ours, CI_PASSPHRASE, "31");
    table.push_str(&format!(
        "\n{same} fields equal, {} differ unexpectedly.\n\nUnlock of keyslot 31 (`cryptsetup open \
         --test-passphrase`, this host): cryptsetup defaults (Argon2id, benchmarked to 2 s) \
         {t_default:.2} s; the tests' cheaper reference image (Argon2id 64 MiB, 200 ms) \
         {t_reference:.2} s; cryptfs (PBKDF2-SHA256, 1000 iterations) {t_ours:.3} s.\n",
        differ.len()
    ));
    eprintln!("{table}");
    common::write_result("image-encrypt-header.md", &table);
    assert!(
        differ.is_empty(),
        "unexpected differences: {differ:?}\n{table}"
    );
    assert!(same >= 20, "{same} equal fields only:\n{table}");
    for field in [
        "Data segments/0/offset",
        "Keyslots/31",
        "Label",
        "Keyslots area",
        "Metadata area",
    ] {
        assert!(a.contains_key(field) && b.contains_key(field), "{field}");
    }
    assert_eq!(b["Data segments/0/offset"], "16777216 [bytes]");
    assert_eq!(b["Label"], "otaroot");
    assert_eq!(b["Keyslots/31/PBKDF"], "pbkdf2");
    assert!(t_ours < t_reference, "{t_ours} vs {t_reference}");
    // The marker says where the volume key came from, bound to its digest.
    assert_eq!(marker::origin(&luks2(&ours)), Some(VolumeKeyOrigin::Image));
    assert_eq!(marker::origin(&luks2(&reference)), None);
}

/// Both stages on the rig; the rig's volume ends re-encrypted, backed up, with its files.
fn take_over(rig: &Rig) -> Vec<Output> {
    assert_eq!(
        marker::origin(&luks2(&rig.device)),
        Some(VolumeKeyOrigin::Image),
        "the image says its key is shared"
    );
    let initramfs = rig.run_stage("initramfs");
    let userspace = rig.run_stage("userspace");
    let status = rig.status();
    assert_eq!(status["state"], "header-backed-up", "{status:#}");
    assert_eq!(status["device"]["reencrypt"]["status"], "none");
    assert_eq!(common::done_steps(&status), common::CI_TAKEOVER_STEPS);
    assert_eq!(rig.files_inside(), rig.files);
    vec![initramfs, userspace]
}

#[test]
fn cryptfs_made_ci_image_is_taken_over_on_first_boot() {
    let rig = Rig::new(Image::CryptfsCi, 128);
    let image_key = volume_key_with(&rig.device, CI_PASSPHRASE).expect("CI passphrase opens");
    let outputs = take_over(&rig);
    assert!(
        volume_key_with(&rig.device, CI_PASSPHRASE).is_none(),
        "passphrase wiped"
    );
    let meta = luks2(&rig.device);
    assert_eq!(marker::origin(&meta), Some(VolumeKeyOrigin::Reencrypted));
    let _ = image_key;
    common::assert_nothing_written_contains(&rig, &[CI_PASSPHRASE.as_bytes()], &outputs);
}

fn died_at(out: &Output, failpoint: &str) -> bool {
    out.status.code().is_none()
        && String::from_utf8_lossy(&out.stderr).contains(&format!("failpoint {failpoint} hit"))
}

fn work_dir(img: &Path, partition: Option<u32>) -> PathBuf {
    let name = img
        .file_name()
        .expect("name")
        .to_string_lossy()
        .into_owned();
    let suffix = partition.map(|n| format!("-p{n}")).unwrap_or_default();
    img.with_file_name(format!("{name}.cryptfs-encrypt{suffix}"))
}

/// Every file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            out.push(e.path());
        }
    }
    out
}

#[test]
fn a_cut_at_every_step_then_a_rerun_gives_an_image_cryptfs_takes_over() {
    let mut cut = 0;
    for failpoint in IMAGE_BOUNDARIES {
        // A passphrase of its own, so that a find in what was written is no coincidence.
        let passphrase = hex::encode(common::random_bytes(16));
        let pass_file = std::cell::RefCell::new(PathBuf::new());
        let outputs = std::cell::RefCell::new(Vec::new());
        let rig = Rig::with_image(128, |device, src| {
            make_ext4(device, 128, src);
            let pass = device.with_file_name("ci-passphrase");
            write_secret(&pass, &passphrase);
            let out = image_encrypt(device, &pass, &[], &[("CRYPTFS_FAILPOINT", failpoint)]);
            assert!(
                died_at(&out, failpoint),
                "{failpoint}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            // What the cut left: never a finished image. Before the header is placed the
            // device is still the plain filesystem; after it the header says "unfinished"
            // until the very end, and the work directory says the run did not complete.
            let work = work_dir(device, None);
            assert!(work.is_dir(), "{failpoint}: the work directory stays");
            match cryptfs::probe::probe(device).expect("probe").content {
                cryptfs::probe::Content::PlainExt4(_) => {
                    assert!(
                        failpoint.contains("after-start")
                            || failpoint.contains("after-shrink")
                            || failpoint.contains("after-prepare"),
                        "{failpoint}"
                    );
                }
                cryptfs::probe::Content::Luks2(meta) => {
                    let unfinished = meta.reencrypt_mode() == Some("encrypt");
                    assert_eq!(
                        unfinished,
                        *failpoint != "image-encrypt:after-encrypt",
                        "{failpoint}"
                    );
                }
                other => panic!("{failpoint}: {other:?}"),
            }
            for f in files_under(&work) {
                let bytes = std::fs::read(&f).expect("read");
                assert!(
                    memchr::memmem::find(&bytes, passphrase.as_bytes()).is_none(),
                    "{failpoint}: the passphrase in {}",
                    f.display()
                );
            }
            let again = image_encrypt(device, &pass, &[], &[]);
            assert!(
                again.status.success(),
                "{failpoint}: rerun: {}",
                String::from_utf8_lossy(&again.stderr)
            );
            assert!(!work.exists(), "{failpoint}: work directory removed");
            outputs.borrow_mut().extend([out, again]);
            *pass_file.borrow_mut() = pass;
        });
        let pass = pass_file.into_inner();
        std::fs::write(
            &rig.config,
            common::config_text(
                &rig.device,
                &rig.boot,
                &rig.tpm.tcti(),
                &format!("image_passphrase_file = \"{}\"", pass.display()),
            ),
        )
        .expect("config");
        assert!(
            volume_key_with(&rig.device, &passphrase).is_some(),
            "{failpoint}"
        );
        let mut outputs = outputs.into_inner();
        outputs.extend(take_over(&rig));
        common::assert_nothing_written_contains(&rig, &[passphrase.as_bytes()], &outputs);
        cut += 1;
        eprintln!("{failpoint}: cut, rerun, taken over, files intact");
    }
    assert_eq!(cut, IMAGE_BOUNDARIES.len());
}

/// Runs the command expecting a refusal naming `expect`; the input is unchanged.
fn refused(img: &Path, pass: &Path, extra: &[&str], expect: &[&str]) -> String {
    let before = common::file_blake3(img);
    let out = image_encrypt(img, pass, extra, &[]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{err}");
    for e in expect {
        assert!(err.contains(e), "message names {e:?}: {err}");
    }
    assert_eq!(common::file_blake3(img), before, "input untouched: {err}");
    let partition = extra
        .iter()
        .position(|a| *a == "--partition")
        .and_then(|i| extra.get(i + 1))
        .and_then(|n| n.parse().ok());
    assert!(!work_dir(img, partition).exists(), "no work directory left");
    err
}

#[test]
fn refusals_leave_the_input_untouched() {
    let dir = tempfile::tempdir().expect("tmp");
    let pass = dir.path().join("pass");
    write_secret(&pass, CI_PASSPHRASE);
    let mut refusals = 0;

    // Loop-attached, then also mounted.
    let src = dir.path().join("src");
    sample_tree(&src, 3);
    let plain = dir.path().join("plain.img");
    make_ext4(&plain, 128, &src);
    let out = run(
        "losetup",
        &["--find", "--show", &plain.display().to_string()],
    );
    let loop_dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
    refused(&plain, &pass, &[], &["in use", &loop_dev, "losetup -d"]);
    refusals += 1;
    let mnt = dir.path().join("mnt");
    std::fs::create_dir_all(&mnt).expect("mkdir");
    let mounted = Command::new("mount")
        .args(["-o", "ro", &loop_dev, &mnt.display().to_string()])
        .status()
        .is_ok_and(|s| s.success());
    if mounted {
        refused(&plain, &pass, &[], &["in use", "mounted at", "unmount"]);
        refusals += 1;
        run("umount", &[&mnt.display().to_string()]);
    } else {
        assert!(!common::under_ci(), "cannot mount ext4 here");
        eprintln!("SKIPPED: the mounted case (cannot mount ext4 on this host)");
    }
    run("losetup", &["-d", &loop_dev]);

    // Too full to shrink by 32 MiB.
    let full_src = dir.path().join("full");
    std::fs::create_dir_all(&full_src).expect("mkdir");
    std::fs::write(full_src.join("big.bin"), common::random_bytes(80 << 20)).expect("write");
    let full = dir.path().join("full.img");
    make_ext4(&full, 100, &full_src);
    refused(&full, &pass, &[], &["too full to shrink", "free at least"]);
    refusals += 1;

    // Unknown filesystem.
    let vfat = dir.path().join("vfat.img");
    std::fs::File::create(&vfat)
        .expect("create")
        .set_len(100 << 20)
        .expect("size");
    run("mkfs.vfat", &[&vfat.display().to_string()]);
    refused(&vfat, &pass, &[], &["holds no ext4", "--partition"]);
    refusals += 1;

    // A partition that is not there, a partition that holds no ext4, no table at all.
    let disk = gpt_disk(dir.path(), &src);
    refused(
        &disk.path,
        &pass,
        &["--partition", "7"],
        &["no partition 7"],
    );
    refused(&disk.path, &pass, &["--partition", "1"], &["holds no ext4"]);
    refused(
        &plain,
        &pass,
        &["--partition", "1"],
        &["no partition table"],
    );
    refusals += 3;
    // A whole disk image without --partition.
    refused(&disk.path, &pass, &[], &["holds no ext4", "--partition N"]);
    refusals += 1;
    // Not a loop device of ours left behind by any of them.
    let held = run("losetup", &["-j", &disk.path.display().to_string()]);
    assert!(
        held.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&held.stdout)
    );
    assert!(refusals >= 7, "{refusals}");
    eprintln!("{refusals} refusals, inputs untouched");
}

struct Disk {
    path: PathBuf,
    /// (first byte, length) of partitions 1, 2, 3.
    parts: Vec<(u64, u64)>,
    files: BTreeMap<String, String>,
}

/// A GPT disk image made by sgdisk: p1 8 MiB random bytes, p2 a 128 MiB ext4 of `src`, p3 the
/// rest, random bytes.
fn gpt_disk(dir: &Path, src: &Path) -> Disk {
    use std::io::{Seek, SeekFrom, Write};
    let path = dir.join("disk.img");
    std::fs::File::create(&path)
        .expect("create")
        .set_len(150 << 20)
        .expect("size");
    let p = path.display().to_string();
    run(
        "sgdisk",
        &["-n", "1:2048:+8M", "-n", "2:0:+128M", "-n", "3:0:0", &p],
    );
    let listing = String::from_utf8_lossy(&run("sgdisk", &["-p", &p]).stdout).into_owned();
    let parts: Vec<(u64, u64)> = listing
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let n: u32 = f.first()?.parse().ok()?;
            let (a, b): (u64, u64) = (f.get(1)?.parse().ok()?, f.get(2)?.parse().ok()?);
            Some((n, a * 512, (b - a + 1) * 512))
        })
        .map(|(_, a, l)| (a, l))
        .collect();
    assert_eq!(parts.len(), 3, "{listing}");
    let fs = dir.join("p2.ext4");
    make_ext4(&fs, parts[1].1 >> 20, src);
    let mut disk = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open");
    for (i, (offset, len)) in parts.iter().enumerate() {
        let bytes = if i == 1 {
            std::fs::read(&fs).expect("read")
        } else {
            common::random_bytes(*len as usize)
        };
        disk.seek(SeekFrom::Start(*offset)).expect("seek");
        disk.write_all(&bytes).expect("write");
    }
    std::fs::remove_file(&fs).expect("rm");
    Disk {
        path,
        parts,
        files: tree_hashes(src),
    }
}

/// blake3 of every byte of the disk outside partition 2.
fn outside_p2(disk: &Disk) -> String {
    let bytes = std::fs::read(&disk.path).expect("read");
    let (a, l) = disk.parts[1];
    let mut h = blake3::Hasher::new();
    h.update(&bytes[..a as usize]);
    h.update(&bytes[(a + l) as usize..]);
    h.finalize().to_hex().to_string()
}

#[test]
fn one_partition_of_a_gpt_disk_image_is_encrypted_and_the_rest_is_unchanged() {
    let dir = tempfile::tempdir().expect("tmp");
    let src = dir.path().join("src");
    sample_tree(&src, 11);
    let disk = gpt_disk(dir.path(), &src);
    let pass = dir.path().join("pass");
    write_secret(&pass, CI_PASSPHRASE);
    let before = outside_p2(&disk);
    let out = image_encrypt(&disk.path, &pass, &["--partition", "2"], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(outside_p2(&disk), before, "the other partitions' bytes");
    assert_eq!(
        std::fs::metadata(&disk.path).expect("meta").len(),
        150 << 20
    );
    let held = run("losetup", &["-j", &disk.path.display().to_string()]);
    assert!(held.stdout.is_empty(), "loop device detached");

    // The partition alone: the CI image, with the same files inside.
    let (a, l) = disk.parts[1];
    let part = dir.path().join("p2.img");
    let bytes = std::fs::read(&disk.path).expect("read");
    std::fs::write(&part, &bytes[a as usize..(a + l) as usize]).expect("write");
    let meta = luks2(&part);
    assert_eq!(meta.data_offset, Some(16 << 20));
    assert_eq!(meta.label, "otaroot");
    assert_eq!(marker::origin(&meta), Some(VolumeKeyOrigin::Image));
    let key = volume_key_with(&part, CI_PASSPHRASE).expect("the passphrase opens keyslot 31");
    let plain = dir.path().join("p2.plain");
    cryptfs::plaintext::export(&part, &meta, &key, &plain).expect("decrypt");
    run("e2fsck", &["-n", "-f", &plain.display().to_string()]);
    let files = common::files_of_ext4_image(&plain, &dir.path().join("extracted"));
    assert_eq!(files, disk.files);
    // A rerun has nothing to do and writes nothing.
    let digest = common::file_blake3(&disk.path);
    let again = image_encrypt(&disk.path, &pass, &["--partition", "2"], &[]);
    assert!(String::from_utf8_lossy(&again.stdout).contains("nothing written"));
    assert_eq!(common::file_blake3(&disk.path), digest);
}

/// The build host's user is not root (bitbake runs image tasks under pseudo): the command works
/// on an image file without root rights, without /run/cryptsetup and without a loop device.
#[test]
fn runs_as_an_unprivileged_build_user() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tmp");
    let src = dir.path().join("src");
    sample_tree(&src, 5);
    let img = dir.path().join("root.img");
    make_ext4(&img, 128, &src);
    let bin = dir.path().join("cryptfs");
    std::fs::copy(common::BIN, &bin).expect("copy binary");
    let pass = dir.path().join("pass");
    write_secret(&pass, CI_PASSPHRASE);
    for p in [dir.path(), &img, &pass, &bin] {
        run("chown", &["nobody", &p.display().to_string()]);
    }
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let out = Command::new("su")
        .args(["nobody", "-s", "/bin/sh", "-c"])
        .arg(format!(
            "id -u && {} image encrypt --image {} --passphrase-file {}",
            bin.display(),
            img.display(),
            pass.display()
        ))
        .output()
        .expect("su");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_ne!(stdout.lines().next(), Some("0"), "ran as root: {stdout}");
    assert!(stdout.contains("encrypted"), "{stdout}");
    let meta = luks2(&img);
    assert_eq!(marker::origin(&meta), Some(VolumeKeyOrigin::Image));
    assert!(volume_key_with(&img, CI_PASSPHRASE).is_some());
}
