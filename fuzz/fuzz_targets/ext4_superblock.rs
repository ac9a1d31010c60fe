//! The ext4 superblock parser (1024 bytes; shorter inputs are zero-padded).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut sb = [0u8; 1024];
    let n = data.len().min(1024);
    sb[..n].copy_from_slice(&data[..n]);
    if let Ok(Some(fs)) = cryptfs::ext4::parse_superblock(&sb) {
        let _ = fs.size_bytes();
    }
});
