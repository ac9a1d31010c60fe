//! Opening a volume with whichever of its KEK tokens works.
//!
//! A volume can carry several tokens of one kind: a reseal adds the new token before it drops
//! the old one, and `reseal --prepare` keeps a token for tomorrow's PCR 7 beside today's.
//! systemd 252 tries one token and gives up; cryptfs tries every usable token in token order
//! and reports each refusal when none opens, so an operator sees which token failed and why.

use std::path::Path;

use anyhow::anyhow;

use crate::kek::{KekProtector, SealedKek};
use crate::luks::device;
use crate::luks::metadata::Luks2Metadata;
use crate::secret::Passphrase;

/// A token this protector can use: its id, its keyslot and its sealed form.
#[derive(Debug, Clone)]
pub struct UsableToken {
    /// LUKS2 token id.
    pub token: u32,
    /// The keyslot the token names.
    pub keyslot: u32,
    /// The sealed secret.
    pub sealed: SealedKek,
}

/// Every token of `meta` this protector can use, in token order. A token whose keyslot is
/// gone (an interrupted removal) is not usable.
pub fn usable_tokens(kek: &dyn KekProtector, meta: &Luks2Metadata) -> Vec<UsableToken> {
    meta.tokens
        .iter()
        .filter_map(|(id, token)| {
            let keyslot = *token.keyslots.first()?;
            if !kek.can_use(&token.json) || !meta.keyslots.contains_key(&keyslot) {
                return None;
            }
            Some(UsableToken {
                token: *id,
                keyslot,
                sealed: SealedKek::from_token(&token.json)?,
            })
        })
        .collect()
}

/// What a successful token unlock proved.
pub struct TokenUnlock {
    /// The token that unsealed.
    pub token: u32,
    /// The keyslot its passphrase opened.
    pub keyslot: u32,
    /// That passphrase (zeroized on drop).
    pub passphrase: Passphrase,
}

/// Unseals each usable token in turn until one's passphrase opens a keyslot of `device`.
///
/// `open` proves the passphrase against the device (a test unlock, or the activation itself)
/// and returns the keyslot that opened; it gets the token's keyslot as a hint.
pub fn unlock_any(
    kek: &mut dyn KekProtector,
    meta: &Luks2Metadata,
    device_path: &Path,
    mut open: impl FnMut(u32, &Passphrase) -> crate::Result<u32>,
) -> crate::Result<TokenUnlock> {
    let tokens = usable_tokens(kek, meta);
    if tokens.is_empty() {
        return Err(anyhow!(
            "{} has no {} token this device can use",
            device_path.display(),
            kek.token_type()
        ));
    }
    let mut refusals = Vec::new();
    for candidate in &tokens {
        let attempt = kek
            .unseal(&candidate.sealed)
            .map(|secret| secret.keyslot_passphrase())
            .and_then(|passphrase| {
                let keyslot = open(candidate.keyslot, &passphrase).map_err(|e| {
                    anyhow!("the KEK unsealed but opens no keyslot of the volume: {e}")
                })?;
                Ok((keyslot, passphrase))
            });
        match attempt {
            Ok((keyslot, passphrase)) => {
                if keyslot != candidate.keyslot {
                    tracing::warn!(
                        token = candidate.token,
                        token_keyslot = candidate.keyslot,
                        opened = keyslot,
                        "KEK opens another keyslot than its token names"
                    );
                }
                if !refusals.is_empty() {
                    tracing::info!(
                        token = candidate.token,
                        refused = refusals.len(),
                        "unlocked with a later token after earlier ones were refused"
                    );
                }
                return Ok(TokenUnlock {
                    token: candidate.token,
                    keyslot,
                    passphrase,
                });
            }
            Err(e) => {
                tracing::warn!(token = candidate.token, "token refused: {e:#}");
                refusals.push(format!(
                    "token {} (keyslot {}): {e:#}",
                    candidate.token, candidate.keyslot
                ));
            }
        }
    }
    Err(anyhow!(
        "none of the {} {} tokens of {} unlocked it: {}",
        tokens.len(),
        kek.token_type(),
        device_path.display(),
        refusals.join("; ")
    ))
}

/// [`unlock_any`] with a test unlock of `device_path` as the proof: the token's own keyslot
/// first, then any keyslot.
///
/// Why the token's keyslot first: a test against "any keyslot" tries the header's keyslots in
/// the order its JSON lists them, and a CI image lists its Argon2 passphrase keyslot (31)
/// first, so until that keyslot is wiped every such test paid one Argon2 derivation that could
/// not succeed (4-5 s each in the VM bench, row 3; seconds on a slow board). Why any keyslot
/// after that: during a volume-key change a test unlock needs a keyslot of each key, which a
/// single named keyslot is not, and after a reseal the passphrase may open another keyslot
/// than the one the token names (the caller is told which one opened).
pub fn test_unlock_any(
    kek: &mut dyn KekProtector,
    meta: &Luks2Metadata,
    device_path: &Path,
) -> crate::Result<TokenUnlock> {
    unlock_any(kek, meta, device_path, |keyslot, passphrase| {
        device::test_passphrase(device_path, Some(keyslot), passphrase)
            .or_else(|_| device::test_passphrase(device_path, None, passphrase))
    })
}
