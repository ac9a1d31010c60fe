//! `enroll-kek`: add the KEK keyslot and token next to the CI image's passphrase keyslot.
//!
//! Order: seal → journal the sealed form (intent) → add keyslot → write token → prove it.
//! A crash after the keyslot but before the token leaves a keyslot that the journaled sealed
//! form opens: the resume finds it and writes the token (no orphan, no second keyslot).

use anyhow::{anyhow, Context};
use cryptfs_journal::Journal;
use cryptfs_states::{Step, VolumeKeyOrigin};
use serde_json::Value;

use super::StepContext;
use crate::failpoint;
use crate::luks::device;
use crate::luks::metadata::Luks2Metadata;
use crate::record::{self, keys};

const STEP: Step = Step::EnrollKek;

/// Enrolls (or finishes enrolling) the KEK.
pub fn run(ctx: &mut StepContext<'_>, meta: &Luks2Metadata) -> crate::Result<()> {
    let dev = ctx.config.device.clone();
    let image_passphrase = ctx.config.image_passphrase()?;
    let source = ctx.config.image_passphrase_file.as_ref().map_or_else(
        || "the built-in default".to_string(),
        |p| p.display().to_string(),
    );
    // The image passphrase's one key derivation (Argon2 in a CI image: seconds on a small
    // board): its keyslot and the volume key, which the KEK keyslot below is added for.
    let (image_keyslot, volume_key) = device::unlock_volume_key(&dev, None, &image_passphrase)
        .map_err(|e| anyhow!("wrong image passphrase (from {source}): {e}"))?;
    ctx.kek.preflight()?;

    let (secret, sealed) = match record::pending_sealed_kek(ctx.rec.journal(), STEP) {
        Some(sealed) => {
            tracing::info!("resuming an interrupted enrollment with the journaled sealed KEK");
            (ctx.kek.unseal(&sealed)?, sealed)
        }
        None => {
            let (secret, sealed) = ctx.kek.seal()?;
            ctx.rec.intent(
                STEP,
                ctx.state,
                Journal::details([
                    (keys::SEALED_KEK, serde_json::to_value(&sealed)?),
                    (
                        keys::VOLUME_KEY_ORIGIN,
                        serde_json::to_value(VolumeKeyOrigin::Image)?,
                    ),
                    ("image_keyslot", Value::from(image_keyslot)),
                    ("luks_uuid", Value::from(meta.uuid.clone())),
                ]),
            )?;
            (secret, sealed)
        }
    };
    failpoint::hit("enroll-kek:after-intent");
    let passphrase = secret.keyslot_passphrase();
    // A resumed run may find the KEK's keyslot added already. Each keyslot but the image's
    // is tested on its own: a test against "any keyslot" would try the image's Argon2 keyslot
    // too, one derivation that cannot succeed.
    let added = meta
        .keyslots
        .keys()
        .copied()
        .filter(|slot| *slot != image_keyslot)
        .find(|slot| device::test_passphrase(&dev, Some(*slot), &passphrase).is_ok());
    let keyslot = match added {
        Some(slot) => slot,
        None => device::add_keyslot_for_volume_key(&dev, &volume_key, &passphrase)?,
    };
    drop(volume_key);
    failpoint::hit("enroll-kek:after-keyslot");
    let current = crate::probe::luks2(&dev, "after enrollment")?;
    if current.tokens_of(keyslot).next().is_none() {
        device::add_token(&dev, &sealed.token(ctx.kek.token_type(), keyslot))?;
    }
    // Prove the token path end to end before anything is wiped.
    let current = crate::probe::luks2(&dev, "after enrollment")?;
    let (opened, _) = super::unlock_with_token(ctx, &current)
        .context("the enrolled KEK token does not unlock the volume")?;
    ctx.rec.done(
        STEP,
        ctx.state,
        Journal::details([(keys::KEYSLOT, Value::from(opened))]),
    )?;
    Ok(())
}
