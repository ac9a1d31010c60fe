//! The hotzone a crash-recovery budget allows (`[reencrypt] max_recovery`).
//!
//! A crash mid-hotzone leaves libcryptsetup one hotzone to recover before the volume opens
//! again, so the hotzone's size bounds that wait. The run measures its own rate over its first
//! hotzones; a recovery of one hotzone costs `recovery_cost` times that hotzone's share of the
//! run (the bench's row 4 measures the factor per resilience mode), so the largest hotzone that
//! keeps the recovery inside the budget is `budget × rate / recovery_cost`.

/// Hotzones a run completes before its rate is trusted: the first ones pay for the keyslot
/// unlock and a cold cache.
pub const MEASURED_HOTZONES: u64 = 4;

/// A change smaller than this (per mille of the current size) is not worth a stop and resume.
pub const RESIZE_THRESHOLD_PERMILLE: u64 = 250;

/// Hotzone sizes are whole mebibytes: a multiple of every encryption sector size.
pub const HOTZONE_ALIGNMENT: u64 = 1024 * 1024;

/// What sizing needs to know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// The recovery budget, in microseconds.
    pub budget_micros: u64,
    /// How many times a hotzone's share of the run its recovery takes, in per mille.
    pub recovery_cost_permille: u64,
    /// The smallest and the largest hotzone allowed, bytes.
    pub min_bytes: u64,
    /// See `min_bytes`.
    pub max_bytes: u64,
}

/// The decision after a progress report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sizing {
    /// Too little measured yet.
    Measuring,
    /// The current hotzone fits the budget well enough.
    Keep,
    /// Stop between hotzones and resume with this size.
    Resize(u64),
}

/// Decides from `bytes` re-encrypted in `micros` by hotzones of `current` bytes.
pub fn size_for_budget(budget: &Budget, current: u64, bytes: u64, micros: u64) -> Sizing {
    if current == 0 || bytes < current.saturating_mul(MEASURED_HOTZONES) || micros == 0 {
        return Sizing::Measuring;
    }
    let cost = u128::from(budget.recovery_cost_permille.max(1));
    // bytes per microsecond × budget / cost, in u128 and saturating: hostile or absurd inputs
    // give the largest hotzone, never an overflow.
    let wanted = u128::from(budget.budget_micros)
        .saturating_mul(u128::from(bytes))
        .saturating_mul(1000)
        / u128::from(micros).saturating_mul(cost);
    let wanted = u64::try_from(wanted).unwrap_or(u64::MAX);
    let aligned = (wanted / HOTZONE_ALIGNMENT) * HOTZONE_ALIGNMENT;
    let min = budget.min_bytes.max(HOTZONE_ALIGNMENT);
    let max = budget.max_bytes.max(min);
    let chosen = aligned.clamp(min, max);
    let delta = chosen.abs_diff(current);
    if u128::from(delta) * 1000 <= u128::from(current) * u128::from(RESIZE_THRESHOLD_PERMILLE) {
        Sizing::Keep
    } else {
        Sizing::Resize(chosen)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    fn budget(ms: u64, cost_permille: u64) -> Budget {
        Budget {
            budget_micros: ms * 1000,
            recovery_cost_permille: cost_permille,
            min_bytes: MIB,
            max_bytes: 64 * MIB,
        }
    }

    #[test]
    fn waits_for_enough_hotzones() {
        let b = budget(1000, 1000);
        assert_eq!(
            size_for_budget(&b, 8 * MIB, 24 * MIB, 1_000_000),
            Sizing::Measuring
        );
        assert_eq!(size_for_budget(&b, 8 * MIB, 32 * MIB, 0), Sizing::Measuring);
        assert_eq!(size_for_budget(&b, 0, 32 * MIB, 1), Sizing::Measuring);
    }

    #[test]
    fn sizes_from_rate_budget_and_cost() {
        // 32 MiB in 4 s = 8 MiB/s; 1 s of budget at cost 1: 8 MiB, the current size.
        let b = budget(1000, 1000);
        assert_eq!(
            size_for_budget(&b, 8 * MIB, 32 * MIB, 4_000_000),
            Sizing::Keep
        );
        // Cost 4: a recovery takes four hotzones' share, so 2 MiB.
        let b = budget(1000, 4000);
        assert_eq!(
            size_for_budget(&b, 8 * MIB, 32 * MIB, 4_000_000),
            Sizing::Resize(2 * MIB)
        );
        // 320 MiB/s: capped at the largest hotzone.
        let b = budget(1000, 1000);
        assert_eq!(
            size_for_budget(&b, 8 * MIB, 320 * MIB, 1_000_000),
            Sizing::Resize(64 * MIB)
        );
        // 0.1 MiB/s: floored at the smallest.
        assert_eq!(
            size_for_budget(&b, 8 * MIB, 32 * MIB, 320_000_000),
            Sizing::Resize(MIB)
        );
    }

    #[test]
    fn small_changes_are_kept_and_sizes_are_whole_mebibytes() {
        let b = budget(1000, 1000);
        // 9.5 MiB/s → 9 MiB: within 25 % of 8 MiB.
        assert_eq!(
            size_for_budget(&b, 8 * MIB, 38 * MIB, 4_000_000),
            Sizing::Keep
        );
        // 13.5 MiB/s → 13 MiB (aligned down).
        assert_eq!(
            size_for_budget(&b, 8 * MIB, 54 * MIB, 4_000_000),
            Sizing::Resize(13 * MIB)
        );
    }

    #[test]
    fn extreme_inputs_neither_overflow_nor_panic() {
        let b = Budget {
            budget_micros: u64::MAX,
            recovery_cost_permille: 0,
            min_bytes: 0,
            max_bytes: u64::MAX,
        };
        assert!(matches!(
            size_for_budget(&b, MIB, u64::MAX, 1),
            Sizing::Resize(_)
        ));
        assert_eq!(
            size_for_budget(&b, u64::MAX, u64::MAX, u64::MAX),
            Sizing::Keep
        );
    }
}
