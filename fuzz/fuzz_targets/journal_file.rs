//! A whole journal file (redb) from the boot partition, opened and verified. Written to a
//! file in /dev/shm per input: redb reads files, not slices.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path =
        std::path::PathBuf::from(format!("/dev/shm/cryptfs-fuzz-{}.redb", std::process::id()));
    if std::fs::write(&path, data).is_err() {
        return;
    }
    let _ = cryptfs_journal::Journal::read_only(&path);
    let _ = cryptfs_journal::Journal::open_verified(&path);
    let _ = std::fs::remove_file(&path);
});
