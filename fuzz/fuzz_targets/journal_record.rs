//! Journal records as stored, and the hash chain over them. Input: a sequence of
//! (u32 little-endian length, bytes) frames, one record each; a bare input is one record.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut frames = Vec::new();
    let mut rest = data;
    while rest.len() >= 4 && frames.len() < 64 {
        let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let body = &rest[4..];
        if len > body.len() {
            break;
        }
        frames.push(&body[..len]);
        rest = &body[len..];
    }
    if frames.is_empty() {
        frames.push(data);
    }
    let mut records = Vec::new();
    for frame in frames {
        match cryptfs_journal::Record::decode(frame) {
            Ok(r) => records.push(r),
            Err(_) => return,
        }
    }
    let _ = cryptfs_journal::verify_chain(&records);
});
