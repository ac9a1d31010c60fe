//! `grow-filesystem`: let ext4 use the space the data shift left at the end of the volume.
//! Needs the active mapping (online resize through the kernel).

use anyhow::anyhow;
use cryptfs_journal::Journal;
use cryptfs_states::Step;

use super::StepContext;
use crate::cmd;

const STEP: Step = Step::GrowFilesystem;

/// Grows the filesystem on the active mapping.
pub fn run(ctx: &mut StepContext<'_>) -> crate::Result<()> {
    let name = ctx
        .config
        .mapping_name
        .as_deref()
        .ok_or_else(|| anyhow!("no mapping_name configured"))?;
    let mapped = format!("/dev/mapper/{name}");
    ctx.rec.intent(STEP, ctx.state, Journal::details([]))?;
    cmd::run("resize2fs", &[&mapped], &[0])?;
    ctx.rec.done(STEP, ctx.state, Journal::details([]))?;
    Ok(())
}
