//! Unlocking with the KEK token, without activating anything.

use anyhow::{anyhow, bail};
use zeroize::Zeroizing;

use crate::config::Config;
use crate::kek;
use crate::luks::device;
use crate::luks::metadata::Luks2Metadata;
use crate::probe::{self, Content};
use crate::steps::usable_token;

/// What a token unlock proved.
pub struct Unlocked {
    /// The token used.
    pub token: u32,
    /// The keyslot that opened.
    pub keyslot: u32,
    /// The volume key (zeroized on drop).
    pub volume_key: Zeroizing<Vec<u8>>,
    /// The header read.
    pub meta: Box<Luks2Metadata>,
}

/// Unseals the KEK of the configured device and unlocks its volume key.
pub fn with_token(config: &Config) -> crate::Result<Unlocked> {
    let mut kek = kek::from_config(config)?;
    let meta = match probe::probe(&config.device)?.content {
        Content::Luks2(meta) => meta,
        _ => bail!("{} is not a LUKS2 volume", config.device.display()),
    };
    let (token, slot, sealed) = usable_token(kek.as_ref(), &meta)
        .ok_or_else(|| anyhow!("no {} token this device can use", kek.token_type()))?;
    let passphrase = kek.unseal(&sealed)?.keyslot_passphrase();
    let keyslot = device::test_passphrase(&config.device, Some(slot), &passphrase)?;
    let volume_key = device::volume_key(&config.device, Some(keyslot), &passphrase)?;
    Ok(Unlocked {
        token,
        keyslot,
        volume_key,
        meta,
    })
}
