//! `cryptfs image encrypt`: the build host's half. Turns a plain ext4 partition image (or one
//! partition of a disk image) into the CI LUKS2 image the reference's CI makes with
//! `cryptsetup reencrypt --encrypt --reduce-device-size 32M`: shrunk by 32 MiB, data offset
//! 16 MiB, the well-known passphrase in keyslot 31, label `otaroot`; plus cryptfs's key-origin
//! marker (`image`), so a device re-encrypts it on first boot even with an empty journal.
//!
//! It reuses the in-place encryption of the initramfs stage (`steps::encrypt`: the same checks,
//! the same shrink, the same header preparation, the same libcryptsetup driving) without a TPM
//! and without a journal. Its crash safety on the build host rests on three facts:
//! - every precondition is checked before the first write (in use, content, room to shrink);
//! - the few things a journal would remember live in a work directory beside the image
//!   (`<image>.cryptfs-encrypt[-pN]/`): the image's length before the shrink, and the
//!   temporary header under a name that says how far it got (`header.partial` →
//!   `header.prepared` → `header.placed`, each rename flushed);
//! - once the header is placed, the LUKS2 header itself is the truth: while its
//!   `online-reencrypt-v2` requirement is set the image is unfinished, the command never
//!   reports it done, and a rerun resumes it (crash recovery of the hotzone first).
//!
//! The command succeeds only once the header has no re-encryption left, the marker matches the
//! volume key and the passphrase opens the chosen keyslot; then the work directory goes.

use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use cryptfs_states::VolumeKeyOrigin;

use crate::cmd;
use crate::failpoint;
use crate::luks::{device, finalize, marker, reencrypt};
use crate::probe::{self, Content};
use crate::secret::Passphrase;
use crate::steps::encrypt::{
    check_sector_size, check_shrinkable, restore_image_length, shrink, sync_path,
};

/// The reference's CI keyslot.
pub const DEFAULT_KEYSLOT: u32 = 31;
/// The reference's label of the root volume.
pub const DEFAULT_LABEL: &str = "otaroot";
/// Hotzone of the build host's encryption (bounded by the 16 MiB data shift anyway).
const HOTZONE_BYTES: u64 = 8 * 1024 * 1024;
/// [`HOTZONE_BYTES`] as a run's parameters (an in-place encryption's protection is its data
/// shift; the resilience mode is not read).
const HOTZONE: reencrypt::Hotzone = reencrypt::Hotzone {
    bytes: HOTZONE_BYTES,
    resilience: reencrypt::Resilience::Checksum,
};

/// What to encrypt, and how.
pub struct Request {
    /// The image file.
    pub image: PathBuf,
    /// Partition number of a disk image (1-based); `None`: the file is the partition.
    pub partition: Option<u32>,
    /// The CI passphrase (public by design: every device flashed from the image shares it).
    pub passphrase: Passphrase,
    /// Its keyslot.
    pub keyslot: u32,
    /// The LUKS2 label.
    pub label: String,
    /// The encryption sector size asked for.
    pub sector_size: crate::config::SectorSize,
}

/// What the command did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Encrypted from plain ext4 in this run.
    Encrypted,
    /// Finished an encryption an earlier, interrupted run had begun.
    Resumed,
    /// It already was a finished cryptfs CI image; nothing was written.
    AlreadyDone,
}

/// The work directory and the names in it.
struct WorkDir {
    dir: PathBuf,
}

impl WorkDir {
    fn for_image(image: &Path, partition: Option<u32>) -> crate::Result<WorkDir> {
        let name = image
            .file_name()
            .ok_or_else(|| anyhow!("{} has no file name", image.display()))?
            .to_string_lossy()
            .into_owned();
        let suffix = partition.map(|n| format!("-p{n}")).unwrap_or_default();
        let dir = image.with_file_name(format!("{name}.cryptfs-encrypt{suffix}"));
        if let Ok(meta) = std::fs::symlink_metadata(&dir) {
            if !meta.is_dir() {
                bail!(
                    "{} exists and is not a directory: refusing to use or remove it",
                    dir.display()
                );
            }
        }
        Ok(WorkDir { dir })
    }
    fn partial(&self) -> PathBuf {
        self.dir.join("header.partial")
    }
    fn prepared(&self) -> PathBuf {
        self.dir.join("header.prepared")
    }
    fn placed(&self) -> PathBuf {
        self.dir.join("header.placed")
    }
    fn length(&self) -> PathBuf {
        self.dir.join("original-length")
    }
    /// The image's length before the shrink, if an earlier run recorded it.
    fn recorded_length(&self) -> crate::Result<Option<u64>> {
        match std::fs::read_to_string(self.length()) {
            Ok(text) => text
                .trim()
                .parse()
                .map(Some)
                .map_err(|_| anyhow!("{} is not a length", self.length().display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).context(format!("cannot read {}", self.length().display())),
        }
    }
    fn create(&self, length: u64) -> crate::Result<()> {
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("cannot create {}", self.dir.display()))?;
        for stale in [self.partial(), self.length()] {
            if stale.exists() {
                std::fs::remove_file(&stale)?;
            }
        }
        let mut f = std::fs::File::create(self.length())?;
        writeln!(f, "{length}")?;
        f.sync_all()?;
        sync_path(&self.dir)?;
        if let Some(parent) = self.dir.parent() {
            sync_path(parent)?;
        }
        Ok(())
    }
    fn advance(&self, from: &Path, to: &Path) -> crate::Result<()> {
        std::fs::rename(from, to)
            .with_context(|| format!("cannot rename {} to {}", from.display(), to.display()))?;
        sync_path(&self.dir)
    }
    fn remove(&self) -> crate::Result<()> {
        if self.dir.exists() {
            std::fs::remove_dir_all(&self.dir)
                .with_context(|| format!("cannot remove {}", self.dir.display()))?;
            if let Some(parent) = self.dir.parent() {
                sync_path(parent)?;
            }
        }
        Ok(())
    }
}

/// A loop device over a partition's byte range, detached on drop.
struct LoopDevice {
    path: PathBuf,
}

impl LoopDevice {
    fn attach(image: &Path, range: crate::partition::Range) -> crate::Result<LoopDevice> {
        let out = cmd::run(
            "losetup",
            &[
                "--find",
                "--show",
                "--offset",
                &range.offset.to_string(),
                "--sizelimit",
                &range.size.to_string(),
                &image.display().to_string(),
            ],
            &[0],
        )
        .context("a partition of a disk image is encrypted through a loop device (needs root)")?;
        let path = PathBuf::from(out.stdout.trim());
        if !path.starts_with("/dev") {
            bail!("losetup printed no loop device: {}", out.stdout.trim());
        }
        Ok(LoopDevice { path })
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let dev = self.path.display().to_string();
        if let Err(e) = cmd::run("losetup", &["-d", &dev], &[0]) {
            tracing::warn!("cannot detach {dev}: {e:#}");
        }
    }
}

/// Why `image` must not be touched: a loop device is backed by it (mounted or not), or it is
/// itself a mount source. `None` when nothing uses it.
pub fn in_use(image: &Path) -> crate::Result<Option<String>> {
    let meta = std::fs::metadata(image)?;
    let (dev, ino) = (meta.dev(), meta.ino());
    if let Ok(entries) = std::fs::read_dir("/sys/block") {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.starts_with("loop") {
                continue;
            }
            let Ok(backing) = std::fs::read_to_string(entry.path().join("loop/backing_file"))
            else {
                continue;
            };
            let backing = backing.trim_end_matches('\n');
            let same = std::fs::metadata(backing).is_ok_and(|b| b.dev() == dev && b.ino() == ino);
            if same {
                let mounted = probe::in_use(&Path::new("/dev").join(&name))
                    .ok()
                    .flatten()
                    .map(|why| format!(", {why}"))
                    .unwrap_or_default();
                return Ok(Some(format!(
                    "/dev/{name} is attached to it{mounted}; unmount it and run `losetup -d \
                     /dev/{name}` first"
                )));
            }
        }
    }
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    for line in mountinfo.lines() {
        let source = line
            .split(" - ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().nth(1));
        if source
            .is_some_and(|s| std::fs::metadata(s).is_ok_and(|m| m.dev() == dev && m.ino() == ino))
        {
            let at = line.split_whitespace().nth(4).unwrap_or("?");
            return Ok(Some(format!("it is mounted at {at}; unmount it first")));
        }
    }
    Ok(None)
}

/// Runs `cryptfs image encrypt`.
pub fn encrypt(req: &Request) -> crate::Result<Outcome> {
    if req.keyslot > 31 {
        bail!(
            "--keyslot {} is out of range: LUKS2 has keyslots 0 to 31",
            req.keyslot
        );
    }
    if req.passphrase.expose().is_empty() {
        bail!("the passphrase file is empty");
    }
    if req.label.len() > 47 {
        bail!("--label is longer than the 47 bytes LUKS2 allows");
    }
    let image = std::fs::canonicalize(&req.image)
        .with_context(|| format!("cannot find the image {}", req.image.display()))?;
    let meta = std::fs::metadata(&image)?;
    if !meta.is_file() {
        let what = if meta.file_type().is_block_device() {
            "a block device"
        } else {
            "not a regular file"
        };
        bail!(
            "{} is {what}: `cryptfs image encrypt` works on image files (a device encrypts \
             itself on first boot with `cryptfs run`)",
            image.display()
        );
    }
    if let Some(why) = in_use(&image)? {
        bail!(
            "refusing to encrypt {}: it is in use ({why})",
            image.display()
        );
    }
    // One run per image at a time (libcryptsetup's own locks are off below).
    let _lock = lock_image(&image)?;
    if req.partition.is_none() {
        disable_library_locking(&image);
    }
    let work = WorkDir::for_image(&image, req.partition)?;
    let loop_dev = match req.partition {
        None => None,
        Some(n) => {
            let range = crate::partition::find(&image, n)
                .with_context(|| format!("refusing to encrypt {}", image.display()))?;
            Some(LoopDevice::attach(&image, range)?)
        }
    };
    let dev = loop_dev.as_ref().map_or(image.clone(), |l| l.path.clone());
    let what = match req.partition {
        Some(n) => format!("partition {n} of {}", image.display()),
        None => image.display().to_string(),
    };
    // A cut between resize2fs (which truncates an image file) and the length's restore.
    if loop_dev.is_none() {
        if let Some(length) = work.recorded_length()? {
            restore_image_length(&dev, length)?;
        }
    }
    let probed = probe::probe(&dev)?;
    let outcome = if work.placed().exists() {
        match &probed.content {
            Content::Luks2(_) => {
                finish(&dev, req)?;
                Outcome::Resumed
            }
            _ => bail!(
                "{what}: {} says the LUKS2 header was placed, but the image holds no LUKS2 \
                 header: it was changed by something else; start again from the input image",
                work.placed().display()
            ),
        }
    } else if work.prepared().exists() {
        tracing::warn!("an earlier run was cut while placing the header; placing it again");
        place_and_finish(&dev, &work, req)?;
        Outcome::Resumed
    } else {
        match probed.content {
            Content::PlainExt4(fs) => {
                let size_bytes = probed.size_bytes;
                let sector_size =
                    check_sector_size(&dev, &fs, size_bytes, HOTZONE_BYTES, req.sector_size)
                        .with_context(|| format!("--sector-size for {what}"))?;
                let target_blocks = check_shrinkable(&dev, &fs, size_bytes)
                    .with_context(|| format!("refusing to encrypt {what}"))?;
                // Preconditions checked: from here on the image changes.
                work.create(size_bytes)?;
                failpoint::hit("image-encrypt:after-start");
                shrink(&dev, &fs, target_blocks, size_bytes)?;
                failpoint::hit("image-encrypt:after-shrink");
                let header = reencrypt::InPlaceHeader {
                    uuid: uuid::Uuid::new_v4(),
                    label: &req.label,
                    keyslot: Some(req.keyslot),
                    origin: VolumeKeyOrigin::Image,
                    // As the cryptsetup CLI's keyslot: its AF hash, hence the same layout.
                    pbkdf_hash: "sha256",
                    sector_size,
                };
                reencrypt::prepare_in_place(
                    &dev,
                    &work.partial(),
                    &header,
                    &req.passphrase,
                    HOTZONE,
                    |_| None,
                )?;
                // The first 16 MiB now also live at the tail: durable before the header goes
                // over the original.
                sync_path(&dev)?;
                sync_path(&work.partial())?;
                work.advance(&work.partial(), &work.prepared())?;
                failpoint::hit("image-encrypt:after-prepare");
                place_and_finish(&dev, &work, req)?;
                Outcome::Encrypted
            }
            Content::Luks2(meta) if meta.reencrypt_mode() == Some("encrypt") => {
                // Work directory gone, header in the middle of encryption: the header decides.
                finish(&dev, req)?;
                Outcome::Resumed
            }
            Content::Luks2(meta) => {
                if marker::origin(&meta) == Some(VolumeKeyOrigin::Image)
                    && device::test_passphrase(&dev, Some(req.keyslot), &req.passphrase).is_ok()
                {
                    Outcome::AlreadyDone
                } else {
                    bail!(
                        "refusing to encrypt {what}: it is already a LUKS2 volume, and not a \
                         finished cryptfs CI image whose keyslot {} this passphrase opens",
                        req.keyslot
                    )
                }
            }
            Content::Luks1 => bail!("refusing to encrypt {what}: it is a LUKS1 volume"),
            Content::Luks2Damaged => {
                bail!("refusing to encrypt {what}: it holds a damaged LUKS2 header")
            }
            Content::Unrecognised => bail!(
                "refusing to encrypt {what}: it holds no ext4 filesystem (unknown or no \
                 filesystem); cryptfs encrypts ext2/3/4 root filesystems{}",
                if req.partition.is_none() {
                    " (a whole disk image? then name the root partition with --partition N)"
                } else {
                    ""
                }
            ),
        }
    };
    work.remove()?;
    drop(loop_dev);
    Ok(outcome)
}

/// An exclusive, non-blocking flock on the image file for the whole run: a second run on the
/// same image refuses instead of interleaving with the first.
fn lock_image(image: &Path) -> crate::Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    let file =
        std::fs::File::open(image).with_context(|| format!("cannot open {}", image.display()))?;
    // SAFETY: flock on a file descriptor this function owns; no memory is involved.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        bail!(
            "refusing to encrypt {}: another process holds a lock on it (a second `cryptfs \
             image encrypt`?); wait for it to end",
            image.display()
        );
    }
    Ok(file)
}

/// libcryptsetup's metadata and re-encryption locks live under `/run/cryptsetup`, which a build
/// host's unprivileged build user (bitbake under pseudo) cannot write: there it fails with
/// "Failed to acquire reencryption lock". An image file that no loop device backs (checked
/// before) and that this run holds flocked has no other user to lock against, so they go off
/// for this process. A partition goes through a loop device (root anyway): locks stay on.
fn disable_library_locking(image: &Path) {
    match libcryptsetup_rs::CryptInit::init(image) {
        Ok(mut cd) => {
            if let Err(e) = cd.settings_handle().metadata_locking(false) {
                tracing::warn!("cannot turn libcryptsetup's metadata locking off: {e}");
            }
        }
        Err(e) => tracing::warn!("libcryptsetup cannot open {}: {e}", image.display()),
    }
}

fn place_and_finish(dev: &Path, work: &WorkDir, req: &Request) -> crate::Result<()> {
    device::header_restore(dev, &work.prepared())?;
    sync_path(dev)?;
    work.advance(&work.prepared(), &work.placed())?;
    failpoint::hit("image-encrypt:after-header");
    finish(dev, req)
}

/// Runs the data encryption to its end (after crash recovery of an interrupted hotzone) and
/// checks the result; fails unless the header is a finished CI image.
fn finish(dev: &Path, req: &Request) -> crate::Result<()> {
    let kind = reencrypt::Kind::Encrypt;
    let meta = probe::luks2(dev, "to finish the encryption of")?;
    if meta.reencrypt_mode().is_some() {
        let recovered = reencrypt::recover_if_crashed(dev, kind, None, &req.passphrase, HOTZONE)?;
        let meta = probe::luks2(dev, "after crash recovery")?;
        if meta.reencrypt_mode().is_none() {
            tracing::info!("crash recovery completed the encryption");
        } else if finalize::all_data_on_final_key(&meta) {
            tracing::warn!("all data is encrypted but the metadata was never finalised");
            finalize::finalize(dev, None)?;
        } else {
            if recovered {
                tracing::info!("the interrupted hotzone is recovered; resuming");
            }
            let mut hotzones = 0u64;
            let mut last_tenth = None;
            let mut progress = |done: u64, total: u64| -> bool {
                hotzones += 1;
                if hotzones == 2 {
                    failpoint::hit("image-encrypt:mid");
                }
                let tenth = done.saturating_mul(10).checked_div(total).unwrap_or(10);
                if last_tenth != Some(tenth) {
                    last_tenth = Some(tenth);
                    tracing::info!("image encrypt: {}%", tenth * 10);
                }
                true
            };
            reencrypt::resume(dev, kind, None, &req.passphrase, HOTZONE, &mut progress)?;
        }
    }
    failpoint::hit("image-encrypt:after-encrypt");
    let meta = probe::luks2(dev, "after encryption")?;
    if meta.reencrypt_mode().is_some() {
        bail!(
            "the encryption of {} did not finish (the header still has its re-encryption \
             requirement); run the command again to resume it",
            dev.display()
        );
    }
    if marker::origin(&meta) != Some(VolumeKeyOrigin::Image) {
        bail!(
            "{} has no cryptfs marker for its volume key: not an image this command made",
            dev.display()
        );
    }
    let slot = device::test_passphrase(dev, Some(req.keyslot), &req.passphrase)?;
    if slot != req.keyslot {
        bail!("the passphrase opens keyslot {slot}, not {}", req.keyslot);
    }
    Ok(())
}
