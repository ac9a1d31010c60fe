//! A LUKS2 token's JSON as the TPM 2.0 protector reads it (no TPM needed: parsing and
//! validation only; the PCR selection is built from what it accepts).
#![no_main]

use cryptfs::kek::{tpm2::Tpm2Token, SealedKek};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(token) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    if let Some(sealed) = SealedKek::from_token(&token) {
        if let Ok(parsed) = Tpm2Token::parse(&sealed.fields) {
            assert!(parsed
                .pcrs
                .iter()
                .all(|p| *p <= cryptfs::kek::tpm2::MAX_PCR));
        }
    }
});
