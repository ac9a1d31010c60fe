//! Crash states with lost unflushed writes (window C's harsh model): the device of a long
//! operation is a FUSE file that logs every write and every sync in order; a generator then
//! builds states "all writes up to sync k, alone and plus a seeded random subset of the writes
//! after it" for every k (for the volume-key change only the latter: a kill at every sync, in
//! tests/fsync_cuts.rs, already makes the former) and runs each through recovery. For cryptfs (in-place encryption, the
//! volume-key change) the boot directory (journal, temporary header) of each state is the one the
//! process had when it asked for sync k+1: the most advanced journal a crash before that sync can
//! leave; recovery is `run --stage all`. The cryptsetup CLI's volume-key change with the
//! reference's recovery (`repair` + `reencrypt --resume-only`) is the anchor, measured beside it.
//! Skips with a clear message where FUSE cannot mount, except under `CI=true`, where that fails.
//! The tables are written to `design/results/lost_writes-*.md`.

mod common;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use common::{Image, Rig};
use fuser::{
    FileAttr, FileType, Filesystem, MountOption, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyWrite, Request,
};
use rand::{Rng, SeedableRng};

const TTL: Duration = Duration::from_secs(0);
const DISK_INO: u64 = 2;

#[derive(Clone)]
enum Event {
    Write { offset: u64, data: Vec<u8> },
    Resize(u64),
    Sync,
}

struct Shared {
    data: Vec<u8>,
    log: Vec<Event>,
    boot: PathBuf,
    snapshots: PathBuf,
    syncs: usize,
}

struct LoggingDisk(Arc<Mutex<Shared>>);

fn attr(ino: u64, size: u64) -> FileAttr {
    FileAttr {
        ino,
        size,
        blocks: size.div_ceil(512),
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: if ino == 1 {
            FileType::Directory
        } else {
            FileType::RegularFile
        },
        perm: if ino == 1 { 0o755 } else { 0o600 },
        nlink: if ino == 1 { 2 } else { 1 },
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

impl Filesystem for LoggingDisk {
    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        if parent == 1 && name == "disk" {
            let size = self.0.lock().expect("lock").data.len() as u64;
            reply.entry(&TTL, &attr(DISK_INO, size), 0);
        } else {
            reply.error(libc::ENOENT);
        }
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        let size = self.0.lock().expect("lock").data.len() as u64;
        reply.attr(&TTL, &attr(ino, if ino == 1 { 0 } else { size }));
    }

    fn setattr(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<std::time::SystemTime>,
        _fh: Option<u64>,
        _crtime: Option<std::time::SystemTime>,
        _chgtime: Option<std::time::SystemTime>,
        _bkuptime: Option<std::time::SystemTime>,
        _flags: Option<u32>,
        reply: ReplyAttr,
    ) {
        let mut s = self.0.lock().expect("lock");
        if let Some(size) = size {
            s.data.resize(size as usize, 0);
            s.log.push(Event::Resize(size));
        }
        let len = s.data.len() as u64;
        reply.attr(&TTL, &attr(ino, len));
    }

    fn open(&mut self, _req: &Request<'_>, _ino: u64, _flags: i32, reply: ReplyOpen) {
        // Direct I/O: every write reaches us, in program order, nothing is cached in between.
        reply.opened(0, fuser::consts::FOPEN_DIRECT_IO);
    }

    fn read(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        _fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock: Option<u64>,
        reply: ReplyData,
    ) {
        let s = self.0.lock().expect("lock");
        let start = (offset as usize).min(s.data.len());
        let end = (start + size as usize).min(s.data.len());
        reply.data(&s.data[start..end]);
    }

    fn write(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        _fh: u64,
        offset: i64,
        data: &[u8],
        _wf: u32,
        _flags: i32,
        _lock: Option<u64>,
        reply: ReplyWrite,
    ) {
        let mut s = self.0.lock().expect("lock");
        let end = offset as usize + data.len();
        if s.data.len() < end {
            s.data.resize(end, 0);
        }
        s.data[offset as usize..end].copy_from_slice(data);
        s.log.push(Event::Write {
            offset: offset as u64,
            data: data.to_vec(),
        });
        reply.written(data.len() as u32);
    }

    fn flush(&mut self, _req: &Request<'_>, _ino: u64, _fh: u64, _lock: u64, reply: ReplyEmpty) {
        reply.ok();
    }

    fn fsync(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        _fh: u64,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let mut s = self.0.lock().expect("lock");
        s.syncs += 1;
        // The boot directory as the process had it when it asked for this sync.
        let snap = s.snapshots.join(s.syncs.to_string());
        common::copy_tree(&s.boot, &snap);
        s.log.push(Event::Sync);
        reply.ok();
    }

    fn readdir(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        mut reply: ReplyDirectory,
    ) {
        if ino != 1 {
            reply.error(libc::ENOTDIR);
            return;
        }
        let entries = [
            (1, FileType::Directory, "."),
            (1, FileType::Directory, ".."),
            (DISK_INO, FileType::RegularFile, "disk"),
        ];
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(*ino, (i + 1) as i64, *kind, name) {
                break;
            }
        }
        reply.ok();
    }
}

fn apply(image: &mut Vec<u8>, event: &Event) {
    match event {
        Event::Write { offset, data } => {
            let end = *offset as usize + data.len();
            if image.len() < end {
                image.resize(end, 0);
            }
            image[*offset as usize..end].copy_from_slice(data);
        }
        Event::Resize(size) => image.resize(*size as usize, 0),
        Event::Sync => {}
    }
}

/// One operation run with its device behind the write log.
struct Logged {
    initial: Vec<u8>,
    log: Vec<Event>,
    syncs: usize,
    /// Boot directory at sync k is `snapshots/k`; after the run, `snapshots/final`.
    snapshots: PathBuf,
}

impl Logged {
    fn writes(&self) -> usize {
        self.log
            .iter()
            .filter(|e| !matches!(e, Event::Sync))
            .count()
    }

    /// Every sampled crash state: (epoch k, device image, boot directory of that state).
    /// Epoch k holds everything before sync k (k = 0: nothing), alone and with a seeded random
    /// half of what follows it up to sync k+1.
    /// With `only_partial`, the "nothing after sync k" states are left out: a kill at every
    /// sync (tests/fsync_cuts.rs) already produces exactly those.
    fn for_each_state(&self, only_partial: bool, mut f: impl FnMut(usize, &[u8], &Path)) {
        let sync_positions: Vec<usize> = self
            .log
            .iter()
            .enumerate()
            .filter(|(_, e)| matches!(e, Event::Sync))
            .map(|(i, _)| i)
            .collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
        for k in 0..=self.syncs {
            let start = if k == 0 { 0 } else { sync_positions[k - 1] + 1 };
            let end = sync_positions.get(k).copied().unwrap_or(self.log.len());
            let boot = if k < self.syncs {
                self.snapshots.join((k + 1).to_string())
            } else {
                self.snapshots.join("final")
            };
            let tail = &self.log[start..end];
            let mut variants: Vec<Vec<bool>> = Vec::new();
            if !only_partial || tail.len() <= 1 {
                variants.push(vec![false; tail.len()]);
            }
            if tail.len() > 1 {
                variants.push((0..tail.len()).map(|_| rng.gen_bool(0.5)).collect());
            }
            for keep in variants {
                let mut image = self.initial.clone();
                for e in &self.log[..start] {
                    apply(&mut image, e);
                }
                for (e, kept) in tail.iter().zip(&keep) {
                    if *kept {
                        apply(&mut image, e);
                    }
                }
                f(k, &image, &boot);
            }
        }
    }
}

/// Runs `run(path of the logged device)` with a copy of `device` behind the write log, taking
/// snapshots of `boot` at every sync. `None` (with a message) where FUSE cannot mount.
fn log_run(work: &Path, device: &Path, boot: &Path, run: impl FnOnce(&Path)) -> Option<Logged> {
    let initial = std::fs::read(device).expect("image");
    let mnt = work.join("mnt");
    let snapshots = work.join("boot-at-sync");
    std::fs::create_dir_all(&mnt).expect("mnt");
    std::fs::create_dir_all(&snapshots).expect("snapshots");
    std::fs::create_dir_all(boot).expect("boot");
    let shared = Arc::new(Mutex::new(Shared {
        data: initial.clone(),
        log: Vec::new(),
        boot: boot.to_path_buf(),
        snapshots: snapshots.clone(),
        syncs: 0,
    }));
    let session = match fuser::spawn_mount2(
        LoggingDisk(shared.clone()),
        &mnt,
        &[
            MountOption::FSName("cryptfs-write-log".into()),
            MountOption::RW,
        ],
    ) {
        Ok(s) => s,
        Err(e) => {
            let why =
                format!("FUSE cannot mount here ({e}); install fuse3 and load the fuse module");
            // Zero crash states prove nothing: in CI the skip is a failure.
            assert!(!common::under_ci(), "CI=true and {why}");
            eprintln!("SKIPPED: {why}");
            return None;
        }
    };
    run(&mnt.join("disk"));
    drop(session);
    common::copy_tree(boot, &snapshots.join("final"));
    let s = shared.lock().expect("lock");
    Some(Logged {
        initial,
        log: s.log.clone(),
        syncs: s.syncs,
        snapshots,
    })
}

/// Per-phase tally of sampled states.
#[derive(Default)]
struct Tally {
    states: usize,
    intact: usize,
    failures: Vec<String>,
}

impl Tally {
    fn record(&mut self, k: usize, outcome: Result<(), String>) {
        self.states += 1;
        match outcome {
            Ok(()) => self.intact += 1,
            Err(why) => self.failures.push(format!("epoch {k}: {why}")),
        }
    }

    fn line(&self, operation: &str, phase: &str, recovery: &str) -> String {
        format!(
            "| {operation} | {phase} | {recovery} | {} | {} |\n",
            self.states, self.intact
        )
    }
}

/// The table's head; the rows follow it.
fn table_header() -> String {
    String::from(
        "<!-- Written by tests/lost_writes.rs (`cargo test --package cryptfs --all-features \
         --test lost_writes -- --nocapture`); a run regenerates it. -->\n\n\
         96 MiB image, 8 MiB hotzone, the device behind a FUSE write log.\n\n\
         | operation | phase | recovery | crash states (lost unflushed writes) | intact |\n\
         |---|---|---|---|---|\n",
    )
}

/// Prints the table and writes it to `design/results/<file>`.
fn report(file: &str, table: &str) {
    eprintln!("\n{table}");
    common::write_result(file, table);
}

/// Runs `stage` of the rig's configuration with the device behind the write log.
fn log_cryptfs(rig: &Rig, stage: &str) -> Option<Logged> {
    let work = rig.dir.path().join(format!("log-{stage}"));
    log_run(&work, &rig.device, &rig.boot, |disk| {
        let config = work.join("fuse.toml");
        std::fs::write(
            &config,
            common::config_text(disk, &rig.boot, &rig.tpm.tcti(), ""),
        )
        .expect("config");
        let out = common::cryptfs_with(
            &["run", "--stage", stage],
            &config,
            &[("CRYPTFS_BOOT_ID", "cut")],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    })
}

#[test]
fn in_place_encryption_recovers_from_lost_unflushed_writes() {
    let rig = Rig::new(Image::Plain, 96);
    let Some(logged) = log_cryptfs(&rig, "initramfs") else {
        return;
    };
    assert!(
        logged.syncs > 5 && logged.writes() > logged.syncs,
        "{} syncs, {} writes logged",
        logged.syncs,
        logged.writes()
    );
    // Tally per phase: the shrink (e2fsck/resize2fs writing) and the encryption proper (from the
    // journal's `shrunk` on: temporary header, data move, header placement, hotzones).
    let past_shrink = |boot: &Path| {
        cryptfs_journal::Journal::open_verified(&boot.join("cryptfs/journal.redb"))
            .map(|j| {
                j.records()
                    .iter()
                    .any(|r| r.body.detail_str("substep") == Some("shrunk"))
            })
            .unwrap_or(false)
    };
    let mut tally = [Tally::default(), Tally::default()];
    logged.for_each_state(false, |k, image, boot| {
        std::fs::write(&rig.device, image).expect("state image");
        common::copy_tree(boot, &rig.boot);
        let phase = usize::from(past_shrink(&rig.boot));
        tally[phase].record(k, common::cryptfs_recovers(&rig));
    });
    let recovery = "cryptfs (run --stage all)";
    let mut table = table_header();
    table.push_str(&tally[0].line(
        "in-place encryption",
        "shrink (e2fsck, resize2fs)",
        recovery,
    ));
    table.push_str(&tally[1].line(
        "in-place encryption",
        "encryption (header, data move, hotzones)",
        recovery,
    ));
    table.push_str(&format!(
        "\n({} syncs, {} writes logged)\n",
        logged.syncs,
        logged.writes()
    ));
    report("lost_writes-in-place-encryption.md", &table);
    // Every sampled state, shrink included, must recover intact.
    assert!(tally[0].states > 5, "too few shrink-phase states");
    assert!(tally[1].states > 10, "too few encryption-phase states");
    for t in &tally {
        assert_eq!(t.intact, t.states, "{:#?}", t.failures);
    }
}

const ANCHOR_PASSPHRASE: &str = "anchor-passphrase";

#[test]
fn volume_key_change_recovers_from_lost_unflushed_writes() {
    let rig = Rig::new(Image::Ci, 96);
    // The anchor first (its own copy of the same files): the cryptsetup CLI's volume-key change
    // under the write log, each state recovered the reference's way.
    let anchor_dir = rig.dir.path().join("anchor");
    std::fs::create_dir_all(&anchor_dir).expect("anchor dir");
    let anchor_img = anchor_dir.join("img");
    common::make_ci_image(
        &anchor_img,
        96,
        &rig.dir.path().join("src"),
        ANCHOR_PASSPHRASE,
    );
    let key_file = anchor_dir.join("pass");
    std::fs::write(&key_file, ANCHOR_PASSPHRASE).expect("key file");
    let k = key_file.display().to_string();
    let mut anchor = Tally::default();
    let anchor_log = log_run(
        &anchor_dir,
        &anchor_img,
        &anchor_dir.join("unused"),
        |disk| {
            common::run(
                "cryptsetup",
                &[
                    "reencrypt",
                    "--batch-mode",
                    "--force-offline-reencrypt",
                    "--pbkdf",
                    "pbkdf2",
                    "--pbkdf-force-iterations",
                    "1000",
                    "--hotzone-size",
                    "8M",
                    "--key-file",
                    &k,
                    &disk.display().to_string(),
                ],
            );
        },
    );
    let Some(anchor_log) = anchor_log else {
        return;
    };
    anchor_log.for_each_state(true, |k, image, _| {
        std::fs::write(&anchor_img, image).expect("state image");
        common::reference_recovery(&anchor_dir, &anchor_img, &key_file);
        let outcome =
            match common::passphrase_volume_files(&anchor_dir, &anchor_img, ANCHOR_PASSPHRASE) {
                Some(found) if found == rig.files => Ok(()),
                Some(_) => Err("FILES DIFFER".into()),
                None => Err("does not open or fsck fails".into()),
            };
        anchor.record(k, outcome);
    });

    // cryptfs: enrolled, passphrase wiped, re-encryption initialised (the initramfs stage), then
    // the volume-key change itself behind the write log.
    rig.run_stage("initramfs");
    let Some(logged) = log_cryptfs(&rig, "all") else {
        return;
    };
    let mut tally = Tally::default();
    logged.for_each_state(true, |k, image, boot| {
        std::fs::write(&rig.device, image).expect("state image");
        common::copy_tree(boot, &rig.boot);
        tally.record(k, common::cryptfs_recovers(&rig));
    });
    let mut table = table_header();
    table.push_str(&tally.line(
        "volume-key change",
        "hotzones, finalisation, backup",
        "cryptfs (run --stage all)",
    ));
    table.push_str(&anchor.line(
        "volume-key change",
        "hotzones, finalisation",
        "cryptsetup repair + --resume-only",
    ));
    table.push_str(&format!(
        "\n(cryptfs: {} syncs, {} writes logged; cryptsetup: {} syncs, {} writes; reference \
         failures: {})\n",
        logged.syncs,
        logged.writes(),
        anchor_log.syncs,
        anchor_log.writes(),
        anchor.failures.join("; ")
    ));
    report("lost_writes-volume-key-change.md", &table);
    assert!(tally.states > 10, "too few states");
    assert_eq!(tally.intact, tally.states, "{:#?}", tally.failures);
    // The anchor the README relies on: the reference loses some of these states.
    assert!(anchor.states > 10, "too few reference states");
    assert!(
        anchor.intact < anchor.states,
        "the reference recovered every state ({} of {}): the README's anchor is stale",
        anchor.intact,
        anchor.states
    );
}
