//! A LUKS2 device head or `luks.bin`: the reader and everything that consumes what it accepts
//! (status facts, the crash-window signature, the finalised JSON and rebuilt headers, tokens).
//! The first 8 bytes of the input pick the device size for the fit check.
#![no_main]

use cryptfs::kek::{tpm2::Tpm2Token, SealedKek};
use cryptfs::luks::finalize::{self, AreaBounds, BinaryHeader};
use cryptfs::luks::metadata::{self, HeaderKind};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let device_size = data
        .get(..8)
        .map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])));
    let Ok(HeaderKind::Luks2(meta)) = metadata::parse(data) else {
        return;
    };
    let _ = meta.check_fits(device_size);
    let _ = (
        meta.reencrypt_mode(),
        meta.reencrypt_crashed(),
        meta.segment_digest(),
        meta.passphrase_keyslots(),
        finalize::all_data_on_final_key(&meta),
        cryptfs::luks::marker::origin(&meta),
    );
    if let Ok(bounds) = AreaBounds::of(&meta) {
        if let Ok((json, dropped)) = finalize::finalized_json(&meta.json, bounds) {
            for (offset, size) in dropped {
                assert!(offset >= bounds.start && offset + size <= bounds.end);
            }
            if let Ok(text) = serde_json::to_vec(&json) {
                let header = BinaryHeader {
                    seqid: meta.seqid.saturating_add(1),
                    hdr_size: meta.hdr_size,
                    label: &meta.label,
                    uuid: &meta.uuid,
                };
                let _ = finalize::build_copy(&header, false, &text);
            }
        }
    }
    for token in meta.tokens.values() {
        if let Some(sealed) = SealedKek::from_token(&token.json) {
            let _ = Tpm2Token::parse(&sealed.fields);
        }
    }
});
