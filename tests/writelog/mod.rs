//! The write log (the CrashMonkey method): a FUSE file system holding one file, `disk`, that
//! logs every write and every sync (fsync/fdatasync) in order. A generator then rebuilds crash
//! states "all writes before sync k", alone or plus a seeded random subset of the writes after
//! it (up to sync k+1). Shared by the host tier (tests/lost_writes.rs: a process's device) and
//! the VM tier (tests/vm_lost_writes.rs: QEMU's disk image, the guest's flushes arriving as
//! fdatasync on the image file).

#![allow(dead_code)]

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, UNIX_EPOCH};

use fuser::{
    FileAttr, FileType, Filesystem, MountOption, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyWrite, Request,
};
use rand::{Rng, SeedableRng};

use crate::common;

const TTL: Duration = Duration::from_secs(0);
const DISK_INO: u64 = 2;

/// One logged operation on the file.
#[derive(Clone)]
pub enum Event {
    /// A write of `data` at `offset`.
    Write { offset: u64, data: Vec<u8> },
    /// A truncate/extend.
    Resize(u64),
    /// fsync or fdatasync: everything before it is durable.
    Sync,
}

struct Shared {
    data: Vec<u8>,
    log: Vec<Event>,
    /// A directory to snapshot at every sync (the host tier's boot directory), if any.
    boot: Option<PathBuf>,
    snapshots: PathBuf,
    syncs: usize,
    sync_times: Vec<Instant>,
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
        // Direct I/O: every write reaches us, in program order, nothing is cached in between
        // (without it the kernel's page cache would hold writes and send them at its leisure,
        // after or merged across the sync that should order them).
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
        s.sync_times.push(Instant::now());
        // The boot directory as the process had it when it asked for this sync.
        if let Some(boot) = s.boot.clone() {
            let snap = s.snapshots.join(s.syncs.to_string());
            common::copy_tree(&boot, &snap);
        }
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

/// Applies one logged event to an image.
pub fn apply(image: &mut Vec<u8>, event: &Event) {
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
pub struct Logged {
    /// The device before the run.
    pub initial: Vec<u8>,
    /// Every write and sync, in the order the file system received them.
    pub log: Vec<Event>,
    /// Syncs logged.
    pub syncs: usize,
    /// When each sync arrived (index k-1 for sync k).
    pub sync_times: Vec<Instant>,
    /// Boot directory at sync k is `snapshots/k`; after the run, `snapshots/final` (only when a
    /// boot directory was given).
    pub snapshots: PathBuf,
}

impl Logged {
    /// Writes (and resizes) logged.
    pub fn writes(&self) -> usize {
        self.log
            .iter()
            .filter(|e| !matches!(e, Event::Sync))
            .count()
    }

    /// Log positions of the syncs.
    fn sync_positions(&self) -> Vec<usize> {
        self.log
            .iter()
            .enumerate()
            .filter(|(_, e)| matches!(e, Event::Sync))
            .map(|(i, _)| i)
            .collect()
    }

    /// Log range of epoch k: after sync k (k = 0: from the start) up to sync k+1 (or the end).
    fn epoch(&self, positions: &[usize], k: usize) -> (usize, usize) {
        let start = if k == 0 { 0 } else { positions[k - 1] + 1 };
        let end = positions.get(k).copied().unwrap_or(self.log.len());
        (start, end)
    }

    /// Writes in epoch k (between sync k and sync k+1).
    pub fn epoch_writes(&self, k: usize) -> usize {
        let (start, end) = self.epoch(&self.sync_positions(), k);
        end - start
    }

    /// Whether a write of epoch k touches the byte range `range` of the file.
    pub fn epoch_touches(&self, k: usize, range: std::ops::Range<u64>) -> bool {
        let (start, end) = self.epoch(&self.sync_positions(), k);
        self.log[start..end].iter().any(|e| match e {
            Event::Write { offset, data } => {
                *offset < range.end && offset + data.len() as u64 > range.start
            }
            _ => false,
        })
    }

    /// Every sampled crash state: (epoch k, device image, boot directory of that state).
    /// Epoch k holds everything before sync k (k = 0: nothing), alone and with a seeded random
    /// half of what follows it up to sync k+1.
    /// With `only_partial`, the "nothing after sync k" states are left out: a kill at every
    /// sync (tests/fsync_cuts.rs) already produces exactly those.
    pub fn for_each_state(&self, only_partial: bool, mut f: impl FnMut(usize, &[u8], &Path)) {
        let sync_positions = self.sync_positions();
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
        for k in 0..=self.syncs {
            let (start, end) = self.epoch(&sync_positions, k);
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
                f(k, &self.image(start, tail, &keep), &boot);
            }
        }
    }

    /// The states of the chosen epochs only, in the order given: for each, "everything before
    /// sync k" (`partial` false) and, when the epoch has more than one write, that plus a
    /// random half of the epoch's writes drawn from `seed` and k (`partial` true).
    pub fn for_each_sampled_state(
        &self,
        epochs: &[usize],
        seed: u64,
        mut f: impl FnMut(usize, bool, &[u8]),
    ) {
        let sync_positions = self.sync_positions();
        for &k in epochs {
            let (start, end) = self.epoch(&sync_positions, k);
            let tail = &self.log[start..end];
            f(k, false, &self.image(start, tail, &vec![false; tail.len()]));
            if tail.len() > 1 {
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ k as u64);
                let keep: Vec<bool> = (0..tail.len()).map(|_| rng.gen_bool(0.5)).collect();
                f(k, true, &self.image(start, tail, &keep));
            }
        }
    }

    /// The initial image with the log up to `start` and the kept events of `tail` applied.
    fn image(&self, start: usize, tail: &[Event], keep: &[bool]) -> Vec<u8> {
        let mut image = self.initial.clone();
        for e in &self.log[..start] {
            apply(&mut image, e);
        }
        for (e, kept) in tail.iter().zip(keep) {
            if *kept {
                apply(&mut image, e);
            }
        }
        image
    }
}

/// Runs `run(path of the logged device)` with a copy of `device` behind the write log, taking
/// snapshots of `boot` (when given) at every sync. `None` (with a message) where FUSE cannot
/// mount; under `CI=true` that fails instead.
pub fn log_run<R>(
    work: &Path,
    device: &Path,
    boot: Option<&Path>,
    run: impl FnOnce(&Path) -> R,
) -> Option<(Logged, R)> {
    let initial = std::fs::read(device).expect("image");
    let mnt = work.join("mnt");
    let snapshots = work.join("boot-at-sync");
    std::fs::create_dir_all(&mnt).expect("mnt");
    std::fs::create_dir_all(&snapshots).expect("snapshots");
    if let Some(boot) = boot {
        std::fs::create_dir_all(boot).expect("boot");
    }
    let shared = Arc::new(Mutex::new(Shared {
        data: initial.clone(),
        log: Vec::new(),
        boot: boot.map(Path::to_path_buf),
        snapshots: snapshots.clone(),
        syncs: 0,
        sync_times: Vec::new(),
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
    let out = run(&mnt.join("disk"));
    drop(session);
    if let Some(boot) = boot {
        common::copy_tree(boot, &snapshots.join("final"));
    }
    let mut s = shared.lock().expect("lock");
    Some((
        Logged {
            initial,
            // Taken, not cloned: a VM's log holds hundreds of MiB.
            log: std::mem::take(&mut s.log),
            syncs: s.syncs,
            sync_times: std::mem::take(&mut s.sync_times),
            snapshots,
        },
        out,
    ))
}
