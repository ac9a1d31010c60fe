//! `wipe-passphrase`: destroy every keyslot no token references, once the KEK is proven.
//!
//! Plan, check, then destroy (systemd-cryptenroll's rule): the set to keep must hold a keyslot
//! the KEK opens right now, or nothing is wiped. Repeating the step destroys what is left.

use anyhow::bail;
use cryptfs_journal::Journal;
use cryptfs_states::Step;
use serde_json::Value;

use super::StepContext;
use crate::failpoint;
use crate::luks::device;
use crate::luks::metadata::Luks2Metadata;

const STEP: Step = Step::WipePassphrase;

/// Wipes the passphrase keyslots.
pub fn run(ctx: &mut StepContext<'_>, meta: &Luks2Metadata) -> crate::Result<()> {
    let wipe = meta.passphrase_keyslots();
    let (keep, _) = super::unlock_with_token(ctx, meta)?;
    if wipe.contains(&keep) {
        bail!("refusing to wipe keyslot {keep}: it is the only one the KEK opens");
    }
    ctx.rec.intent(
        STEP,
        ctx.state,
        Journal::details([
            ("wipe", Value::from(wipe.clone())),
            ("keep", Value::from(keep)),
        ]),
    )?;
    failpoint::hit("wipe-passphrase:after-intent");
    for slot in &wipe {
        device::destroy_keyslot(&ctx.config.device, *slot)?;
        tracing::info!(keyslot = slot, "passphrase keyslot wiped");
    }
    ctx.rec.done(
        STEP,
        ctx.state,
        Journal::details([("wiped", Value::from(wipe))]),
    )?;
    Ok(())
}
