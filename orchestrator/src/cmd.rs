//! External commands (e2fsprogs) through one wrapper that logs the command line and puts the
//! command's stderr into the error.

use std::process::Command;

use anyhow::{bail, Context};

/// Output of a command that ran.
pub struct Output {
    /// Exit code (None when killed by a signal).
    pub code: Option<i32>,
    /// Standard output, lossily decoded.
    pub stdout: String,
    /// Standard error, lossily decoded.
    pub stderr: String,
}

/// Runs `program args…` and returns its output whatever the exit code.
pub fn run_any(program: &str, args: &[&str]) -> crate::Result<Output> {
    tracing::debug!(command = %format!("{program} {}", args.join(" ")), "running");
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("could not start {program} (is it installed?)"))?;
    Ok(Output {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// Runs `program args…` and fails unless it exits with one of `ok_codes`.
pub fn run(program: &str, args: &[&str], ok_codes: &[i32]) -> crate::Result<Output> {
    let out = run_any(program, args)?;
    match out.code {
        Some(code) if ok_codes.contains(&code) => Ok(out),
        code => bail!(
            "{program} {} failed (exit {}): {}",
            args.join(" "),
            code.map_or_else(|| "signal".to_string(), |c| c.to_string()),
            out.stderr.trim()
        ),
    }
}
