//! Crash states with lost unflushed writes (window C's harsh model): the device of an in-place
//! encryption is a FUSE file that logs every write and every sync in order; a generator then
//! builds states "all writes up to sync k, plus a seeded random subset of the writes after it"
//! for every k and runs each through cryptfs's normal recovery (`run --stage all`). The boot
//! directory (journal, temporary header) of each state is the one the process had when it asked
//! for sync k+1: the most advanced journal a crash before that sync can leave. Skips with a clear
//! message where FUSE cannot mount.

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

fn copy_tree(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read_dir") {
        let p = e.expect("entry").path();
        let target = to.join(p.file_name().expect("name"));
        if p.is_dir() {
            copy_tree(&p, &target);
        } else {
            std::fs::copy(&p, &target).expect("copy");
        }
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
        copy_tree(&s.boot, &snap);
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

#[test]
fn in_place_encryption_recovers_from_lost_unflushed_writes() {
    let rig = Rig::new(Image::Plain, 96);
    let initial = std::fs::read(&rig.device).expect("image");
    let mnt = rig.dir.path().join("mnt");
    let snapshots = rig.dir.path().join("boot-at-sync");
    std::fs::create_dir_all(&mnt).expect("mnt");
    std::fs::create_dir_all(&snapshots).expect("snapshots");
    let shared = Arc::new(Mutex::new(Shared {
        data: initial.clone(),
        log: Vec::new(),
        boot: rig.boot.clone(),
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
            eprintln!(
                "SKIPPED: FUSE cannot mount here ({e}); install fuse3 and load the fuse module"
            );
            return;
        }
    };
    // The run under test: in-place encryption with the device behind the write log.
    let fuse_config = rig.dir.path().join("fuse.toml");
    std::fs::write(
        &fuse_config,
        common::config_text(&mnt.join("disk"), &rig.boot, &rig.tpm.tcti(), ""),
    )
    .expect("config");
    let out = common::cryptfs_with(
        &["run", "--stage", "initramfs"],
        &fuse_config,
        &[("CRYPTFS_BOOT_ID", "cut")],
    );
    drop(session);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (log, syncs) = {
        let s = shared.lock().expect("lock");
        (s.log.clone(), s.syncs)
    };
    let final_boot = rig.dir.path().join("boot-final");
    copy_tree(&rig.boot, &final_boot);
    let writes = log.iter().filter(|e| !matches!(e, Event::Sync)).count();
    assert!(
        syncs > 5 && writes > syncs,
        "{syncs} syncs, {writes} writes logged"
    );

    // Epoch k: everything before sync k (k = 0: nothing), plus a subset of what follows it.
    let sync_positions: Vec<usize> = log
        .iter()
        .enumerate()
        .filter(|(_, e)| matches!(e, Event::Sync))
        .map(|(i, _)| i)
        .collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
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
    let mut tally = [(0usize, 0usize), (0usize, 0usize)];
    let mut failures = Vec::new();
    for k in 0..=syncs {
        let start = if k == 0 { 0 } else { sync_positions[k - 1] + 1 };
        let end = sync_positions.get(k).copied().unwrap_or(log.len());
        let boot = if k < syncs {
            snapshots.join((k + 1).to_string())
        } else {
            final_boot.clone()
        };
        let tail = &log[start..end];
        let mut variants: Vec<Vec<bool>> = vec![vec![false; tail.len()]];
        if tail.len() > 1 {
            variants.push((0..tail.len()).map(|_| rng.gen_bool(0.5)).collect());
        }
        for keep in variants {
            let mut image = initial.clone();
            for e in &log[..start] {
                apply(&mut image, e);
            }
            for (e, kept) in tail.iter().zip(&keep) {
                if *kept {
                    apply(&mut image, e);
                }
            }
            std::fs::write(&rig.device, &image).expect("state image");
            copy_tree(&boot, &rig.boot);
            let phase = usize::from(past_shrink(&rig.boot));
            tally[phase].0 += 1;
            let out = rig.cryptfs_env(
                &["run", "--stage", "all"],
                &[("CRYPTFS_BOOT_ID", "recovery")],
            );
            let ok = out.status.success()
                && rig.status()["state"] == "header-backed-up"
                && rig.files_inside() == rig.files;
            if ok {
                tally[phase].1 += 1;
            } else {
                let err = String::from_utf8_lossy(&out.stderr);
                failures.push((
                    phase,
                    format!(
                        "epoch {k}: {}",
                        err.lines()
                            .last()
                            .unwrap_or("")
                            .chars()
                            .take(100)
                            .collect::<String>()
                    ),
                ));
            }
        }
    }
    eprintln!("\n| operation | phase | model | crash states | intact |");
    eprintln!("|---|---|---|---|---|");
    eprintln!(
        "| in-place encryption | shrink (e2fsck, resize2fs) | lost unflushed writes | {} | {} |",
        tally[0].0, tally[0].1
    );
    eprintln!("| in-place encryption | encryption (header, data move, hotzones) | lost unflushed writes | {} | {} |", tally[1].0, tally[1].1);
    eprintln!(
        "({syncs} syncs, {writes} writes logged; shrink failures, reported not asserted: {:?})",
        failures
            .iter()
            .filter(|(p, _)| *p == 0)
            .map(|(_, f)| f)
            .collect::<Vec<_>>()
    );
    // Window C and everything cryptfs itself writes: every sampled state must recover intact.
    assert!(tally[1].0 > 10, "too few encryption-phase states");
    assert_eq!(
        tally[1].1,
        tally[1].0,
        "{:#?}",
        failures.iter().filter(|(p, _)| *p == 1).collect::<Vec<_>>()
    );
}
