//! Progress of a long step: the one place every update goes through.
//!
//! An update fans out to the journal (committed progress, at most every 5 %, so that a resume
//! and `cryptfs status` know how far it got), to the log (one line on stderr, which is also
//! what the system journal and the boot console show) and to the service manager
//! (`STATUS=` over `sd_notify`). One line per update on stderr: the log line *is* the console
//! line, nothing else prints progress.

use std::time::Instant;

use cryptfs_states::Step;

use crate::record::Recorder;

/// Fraction of the total between two reported updates (1/20 = 5 %).
const REPORT_EVERY_PARTS: u64 = 20;

/// Progress of one run of one step.
pub struct Progress {
    step: Step,
    started: Instant,
    last_reported: Option<u64>,
}

impl Progress {
    /// Starts tracking `step`.
    pub fn new(step: Step) -> Self {
        Progress {
            step,
            started: Instant::now(),
            last_reported: None,
        }
    }

    /// Whether `done` of `total` is far enough past the last report (5 %), or the end.
    fn due(&self, done: u64, total: u64) -> bool {
        total > 0
            && match self.last_reported {
                None => true,
                Some(last) => {
                    done == total || done >= last.saturating_add(total / REPORT_EVERY_PARTS)
                }
            }
            && self.last_reported != Some(done)
    }

    /// The human line: `reencrypt:  40% (38 of 96 MiB, 51.2 MiB/s)`.
    fn line(&self, done: u64, total: u64) -> String {
        let mib = |b: u64| b / (1024 * 1024);
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        let percent = u128::from(done) * 100 / u128::from(total.max(1));
        format!(
            "{}: {:>3}% ({} of {} MiB, {:.1} MiB/s)",
            self.step,
            percent,
            mib(done),
            mib(total),
            done as f64 / (1024.0 * 1024.0) / secs
        )
    }

    /// Takes one update from libcryptsetup: when due, journals it (an error stops the caller
    /// between hotzones), logs one line and tells the service manager.
    pub fn update(&mut self, rec: &mut Recorder, done: u64, total: u64) -> crate::Result<()> {
        if !self.due(done, total) {
            return Ok(());
        }
        rec.progress(self.step, done, total)?;
        self.last_reported = Some(done);
        let line = self.line(done, total);
        // "cryptfs: " like cryptfs's other console lines (the VM rig reads it off the console).
        tracing::info!(step = %self.step, done_bytes = done, total_bytes = total, "cryptfs: {line}");
        crate::notify::status(&line);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn updates_are_reported_every_five_percent_and_at_the_end_once() {
        let mut p = Progress::new(Step::Reencrypt);
        let total = 1000u64;
        let mut reported = Vec::new();
        for done in (0..=total).step_by(10).chain([total]) {
            if p.due(done, total) {
                p.last_reported = Some(done);
                reported.push(done);
            }
        }
        let expected: Vec<u64> = (0..=total).step_by(50).collect();
        assert_eq!(reported, expected);
        assert!(!p.due(5, 0), "no total: nothing to report");
        assert_eq!(
            Progress::new(Step::Reencrypt).line(u64::MAX, u64::MAX)[..15],
            *"reencrypt: 100%"
        );
    }
}
