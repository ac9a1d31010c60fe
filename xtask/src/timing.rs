//! Wall time of each step of `cargo xtask test`, printed at the end (also when a step fails),
//! so that every CI log shows where the budget goes and the VM suite's own total.

use std::time::Instant;

use anyhow::Result;

/// The steps run so far, each with its wall time in seconds and whether it is part of the VM
/// suite.
#[derive(Default)]
pub struct Timings {
    steps: Vec<(String, f64, bool)>,
}

impl Timings {
    /// Runs `f` as the step `label`, recording its wall time whatever its result.
    pub fn step<T>(&mut self, label: &str, vm: bool, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let start = Instant::now();
        let result = f();
        self.steps
            .push((label.to_string(), start.elapsed().as_secs_f64(), vm));
        result
    }

    /// Prints one line per step, then the VM suite's total and the whole run's.
    pub fn print(&self) {
        println!("xtask: wall time per step");
        for (label, seconds, _) in &self.steps {
            println!("xtask:   {seconds:>7.0} s  {label}");
        }
        let vm: f64 = self.steps.iter().filter(|s| s.2).map(|s| s.1).sum();
        let all: f64 = self.steps.iter().map(|s| s.1).sum();
        println!("xtask:   {vm:>7.0} s  VM suite ({:.1} min)", vm / 60.0);
        println!("xtask:   {all:>7.0} s  in all ({:.1} min)", all / 60.0);
    }
}
