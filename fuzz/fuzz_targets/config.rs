//! The configuration file: TOML parsing, validation, and the TPM 2.0 settings built from it.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = cryptfs::config::Config::parse(text) {
        let _ = cryptfs::kek::tpm2::Tpm2Protector::new(&config.kek.tpm2);
    }
});
