//! Test-only `LD_PRELOAD` shim for `tests/fsync_cuts.rs`: a power cut at the N-th sync of a whole
//! process tree.
//!
//! It wraps `fsync`, `fdatasync`, `syncfs`, `sync`, `sync_file_range` and `msync(MS_SYNC)` in
//! every process that loads it (the environment carries `LD_PRELOAD` to children: cryptfs and its
//! `e2fsck` / `resize2fs`, or the `cryptsetup` CLI). Every call takes one global number from a
//! counter file held under `flock`, so the numbers are one order across all processes: the order
//! in which the syncs are asked for, which is the order the writes before them were made durable.
//! At the call numbered `CUTSHIM_CUT_AT` — before it reaches the kernel — the shim writes a marker
//! (`cut at N pid P syscall S exe E`) and SIGKILLs its whole process group (the harness starts the
//! run in a group of its own). The writes made before that sync are in the page cache and stay:
//! this models a crash right after them; losing unflushed writes is `tests/lost_writes.rs`'s job.
//!
//! Environment: `CUTSHIM_COUNTER` (counter file; unset: the shim only passes calls through),
//! `CUTSHIM_CUT_AT` (N; unset or 0: count only), `CUTSHIM_LOG` (optional: one line per call),
//! `CUTSHIM_MARKER` (file written at the cut).

use std::ffi::{c_int, c_uint, c_void, CStr};
use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Looks up the next definition of `name` (libc's) once and caches it.
fn real(cache: &AtomicUsize, name: &CStr) -> usize {
    let cached = cache.load(Ordering::Relaxed);
    if cached != 0 {
        return cached;
    }
    // SAFETY: dlsym with a NUL-terminated name; RTLD_NEXT skips this library.
    let found = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) } as usize;
    cache.store(found, Ordering::Relaxed);
    found
}

/// The name of the running program, for the log and the marker.
fn exe() -> String {
    std::fs::read_to_string("/proc/self/comm")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into())
}

/// Takes the next global sync number; at the armed one, writes the marker and kills the group.
fn sync_point(syscall: &str) {
    let Some(counter) = std::env::var_os("CUTSHIM_COUNTER") else {
        return;
    };
    let Ok(mut file) = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&counter)
    else {
        return;
    };
    // SAFETY: a valid open descriptor; the lock is released when it closes (or the process dies).
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return;
    }
    let mut text = String::new();
    let _ = file.read_to_string(&mut text);
    let n = text.trim().parse::<u64>().unwrap_or(0).saturating_add(1);
    let _ = file.seek(SeekFrom::Start(0));
    let _ = file.set_len(0);
    let _ = write!(file, "{n}");
    let line = format!(
        "{n} pid {} syscall {syscall} exe {}\n",
        std::process::id(),
        exe()
    );
    if let Some(log) = std::env::var_os("CUTSHIM_LOG") {
        if let Ok(mut f) = OpenOptions::new().create(true).append(true).open(log) {
            let _ = f.write_all(line.as_bytes());
        }
    }
    let armed = std::env::var("CUTSHIM_CUT_AT")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(0);
    if armed != 0 && n == armed {
        if let Some(marker) = std::env::var_os("CUTSHIM_MARKER") {
            let _ = std::fs::write(marker, format!("cut at {line}"));
        }
        // SAFETY: kill(0, …) signals this process's own group, this process included; the
        // counter lock is still held, so no other process of the tree passes this point.
        unsafe {
            libc::kill(0, libc::SIGKILL);
            libc::_exit(137);
        }
    }
}

macro_rules! cache {
    () => {{
        static CACHE: AtomicUsize = AtomicUsize::new(0);
        &CACHE
    }};
}

/// `fsync(2)`, counted.
#[no_mangle]
pub extern "C" fn fsync(fd: c_int) -> c_int {
    sync_point("fsync");
    let f = real(cache!(), c"fsync");
    if f == 0 {
        return -1;
    }
    // SAFETY: `f` is libc's fsync.
    unsafe { std::mem::transmute::<usize, extern "C" fn(c_int) -> c_int>(f)(fd) }
}

/// `fdatasync(2)`, counted.
#[no_mangle]
pub extern "C" fn fdatasync(fd: c_int) -> c_int {
    sync_point("fdatasync");
    let f = real(cache!(), c"fdatasync");
    if f == 0 {
        return -1;
    }
    // SAFETY: `f` is libc's fdatasync.
    unsafe { std::mem::transmute::<usize, extern "C" fn(c_int) -> c_int>(f)(fd) }
}

/// `syncfs(2)`, counted.
#[no_mangle]
pub extern "C" fn syncfs(fd: c_int) -> c_int {
    sync_point("syncfs");
    let f = real(cache!(), c"syncfs");
    if f == 0 {
        return -1;
    }
    // SAFETY: `f` is libc's syncfs.
    unsafe { std::mem::transmute::<usize, extern "C" fn(c_int) -> c_int>(f)(fd) }
}

/// `sync(2)`, counted.
#[no_mangle]
pub extern "C" fn sync() {
    sync_point("sync");
    let f = real(cache!(), c"sync");
    if f != 0 {
        // SAFETY: `f` is libc's sync.
        unsafe { std::mem::transmute::<usize, extern "C" fn()>(f)() }
    }
}

/// `sync_file_range(2)`, counted.
#[no_mangle]
pub extern "C" fn sync_file_range(
    fd: c_int,
    offset: libc::off64_t,
    nbytes: libc::off64_t,
    flags: c_uint,
) -> c_int {
    sync_point("sync_file_range");
    let f = real(cache!(), c"sync_file_range");
    if f == 0 {
        return -1;
    }
    // SAFETY: `f` is libc's sync_file_range.
    unsafe {
        std::mem::transmute::<
            usize,
            extern "C" fn(c_int, libc::off64_t, libc::off64_t, c_uint) -> c_int,
        >(f)(fd, offset, nbytes, flags)
    }
}

/// `msync(2)`, counted when it waits for the write-back (`MS_SYNC`).
#[no_mangle]
pub extern "C" fn msync(addr: *mut c_void, len: libc::size_t, flags: c_int) -> c_int {
    if flags & libc::MS_SYNC != 0 {
        sync_point("msync");
    }
    let f = real(cache!(), c"msync");
    if f == 0 {
        return -1;
    }
    // SAFETY: `f` is libc's msync, called with the caller's own arguments.
    unsafe {
        std::mem::transmute::<usize, extern "C" fn(*mut c_void, libc::size_t, c_int) -> c_int>(f)(
            addr, len, flags,
        )
    }
}
