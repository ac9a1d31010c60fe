//! `cryptfs reseal`: which KEK tokens to add and drop, and how to finish or undo an interrupted
//! reseal, decided from observations alone.
//!
//! A reseal never leaves the volume without a working unlock path: the new token and keyslot
//! are added and proven before any old pair is removed, so the undo of an unproven new pair
//! and the completion of a proven one are both safe at every point (design/custody.md).

use serde::{Deserialize, Serialize};
use std::fmt;

/// What a reseal does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ResealMode {
    /// Seal a new secret to the PCR values of this boot and replace every KEK token with it.
    Replace,
    /// Add a token for predicted PCR values beside the current ones (before a firmware or
    /// `dbx` update).
    Prepare,
    /// Drop the tokens whose policy the PCR values of this boot no longer satisfy.
    Finish,
}

impl ResealMode {
    /// The name used in the journal and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            ResealMode::Replace => "replace",
            ResealMode::Prepare => "prepare",
            ResealMode::Finish => "finish",
        }
    }

    /// Whether this mode adds a new token and keyslot.
    pub fn adds_token(self) -> bool {
        !matches!(self, ResealMode::Finish)
    }
}

impl fmt::Display for ResealMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A KEK token and the keyslot it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct KekPair {
    /// LUKS2 token id.
    pub token: u32,
    /// Its keyslot.
    pub keyslot: u32,
}

/// A KEK token as `reseal --finish` judges it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenVerdict {
    /// The token and its keyslot.
    pub pair: KekPair,
    /// Its policy is satisfied by this boot's PCR values (the lock PCR at its pre-lock value):
    /// it unseals at the next boot.
    pub unseals: bool,
}

/// Why `reseal --finish` removes nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FinishRefusal {
    /// No token would unseal: dropping the others would leave no TPM path at all.
    #[error(
        "none of the {0} KEK tokens unseals with this boot's PCR values: removing them would \
         leave no TPM unlock path (run `cryptfs reseal --recovery-key-file` to seal to the new \
         values)"
    )]
    NoneUnseals(usize),
    /// The volume has no KEK token.
    #[error("the volume has no KEK token to keep or drop")]
    NoTokens,
}

/// The pairs `--finish` removes: every token that no longer unseals, as long as one that does
/// stays. A keyslot that a kept token also names is never destroyed (its pair is not listed).
pub fn plan_finish(tokens: &[TokenVerdict]) -> Result<Vec<KekPair>, FinishRefusal> {
    if tokens.is_empty() {
        return Err(FinishRefusal::NoTokens);
    }
    let kept: Vec<u32> = tokens
        .iter()
        .filter(|t| t.unseals)
        .map(|t| t.pair.keyslot)
        .collect();
    if kept.is_empty() {
        return Err(FinishRefusal::NoneUnseals(tokens.len()));
    }
    Ok(tokens
        .iter()
        .filter(|t| !t.unseals && !kept.contains(&t.pair.keyslot))
        .map(|t| t.pair)
        .collect())
}

/// The pairs a `replace` removes once its new pair is proven: every KEK pair there was.
pub fn plan_replace(existing: &[KekPair]) -> Vec<KekPair> {
    existing.to_vec()
}

/// What the device and the journal show of a reseal whose intent has no `done`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interrupted {
    /// The mode of the interrupted reseal.
    pub mode: ResealMode,
    /// The keyslot its intent chose for the new pair (none for `finish`).
    pub new_keyslot: Option<u32>,
    /// That keyslot exists on the device.
    pub new_keyslot_present: bool,
    /// Tokens on the device that name the new keyslot.
    pub new_tokens: Vec<u32>,
    /// The journal shows the new pair proven (it opened the volume) before the crash.
    pub proven: bool,
    /// The old pairs its intent listed for removal.
    pub remove: Vec<KekPair>,
}

/// How to deal with an interrupted reseal before anything else.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resume {
    /// The new pair was never proven: remove what exists of it (tokens first, so no token
    /// ever names a missing keyslot), and close the intent as rolled back. The old pairs were
    /// not touched.
    RollBack {
        /// Tokens naming the new keyslot.
        tokens: Vec<u32>,
        /// The new keyslot, if it exists.
        keyslot: Option<u32>,
    },
    /// The new pair (if any) is proven: remove the old pairs (each step skips what is already
    /// gone), then refresh the header backup and close the intent.
    Complete {
        /// Old pairs to remove.
        remove: Vec<KekPair>,
    },
}

/// Decides how to resume an interrupted reseal.
pub fn resume(found: &Interrupted) -> Resume {
    let unproven_new_pair = found.mode.adds_token() && !found.proven;
    if unproven_new_pair {
        return Resume::RollBack {
            tokens: found.new_tokens.clone(),
            keyslot: found.new_keyslot.filter(|_| found.new_keyslot_present),
        };
    }
    // A proven new pair whose keyslot is gone is not "proven" any more: never remove the old
    // pairs without a working new one beside them.
    if found.mode.adds_token() && (!found.new_keyslot_present || found.new_tokens.is_empty()) {
        return Resume::RollBack {
            tokens: found.new_tokens.clone(),
            keyslot: found.new_keyslot.filter(|_| found.new_keyslot_present),
        };
    }
    Resume::Complete {
        remove: found
            .remove
            .iter()
            .copied()
            .filter(|p| {
                Some(p.keyslot) != found.new_keyslot && !found.new_tokens.contains(&p.token)
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(token: u32, keyslot: u32) -> KekPair {
        KekPair { token, keyslot }
    }

    fn verdict(token: u32, keyslot: u32, unseals: bool) -> TokenVerdict {
        TokenVerdict {
            pair: pair(token, keyslot),
            unseals,
        }
    }

    #[test]
    fn finish_drops_what_no_longer_unseals_and_keeps_the_rest() {
        let plan = plan_finish(&[verdict(0, 1, false), verdict(1, 2, true)]).expect("plan");
        assert_eq!(plan, vec![pair(0, 1)]);
        let nothing = plan_finish(&[verdict(0, 1, true), verdict(1, 2, true)]).expect("plan");
        assert!(nothing.is_empty());
    }

    #[test]
    fn finish_never_removes_the_last_path() {
        assert_eq!(
            plan_finish(&[verdict(0, 1, false), verdict(1, 2, false)]),
            Err(FinishRefusal::NoneUnseals(2))
        );
        assert_eq!(plan_finish(&[]), Err(FinishRefusal::NoTokens));
    }

    #[test]
    fn finish_never_destroys_a_keyslot_a_kept_token_names() {
        let plan = plan_finish(&[verdict(0, 1, false), verdict(1, 1, true)]).expect("plan");
        assert!(plan.is_empty(), "{plan:?}");
    }

    fn interrupted(proven: bool, present: bool, tokens: Vec<u32>) -> Interrupted {
        Interrupted {
            mode: ResealMode::Replace,
            new_keyslot: Some(3),
            new_keyslot_present: present,
            new_tokens: tokens,
            proven,
            remove: vec![pair(0, 1)],
        }
    }

    #[test]
    fn an_unproven_new_pair_is_rolled_back_token_and_keyslot() {
        assert_eq!(
            resume(&interrupted(false, true, vec![2])),
            Resume::RollBack {
                tokens: vec![2],
                keyslot: Some(3)
            }
        );
        assert_eq!(
            resume(&interrupted(false, true, vec![])),
            Resume::RollBack {
                tokens: vec![],
                keyslot: Some(3)
            }
        );
        assert_eq!(
            resume(&interrupted(false, false, vec![])),
            Resume::RollBack {
                tokens: vec![],
                keyslot: None
            }
        );
    }

    #[test]
    fn a_proven_new_pair_completes_the_removal() {
        assert_eq!(
            resume(&interrupted(true, true, vec![2])),
            Resume::Complete {
                remove: vec![pair(0, 1)]
            }
        );
    }

    #[test]
    fn a_proven_pair_that_vanished_never_lets_the_old_ones_go() {
        assert!(matches!(
            resume(&interrupted(true, false, vec![])),
            Resume::RollBack { .. }
        ));
        assert!(matches!(
            resume(&interrupted(true, true, vec![])),
            Resume::RollBack { .. }
        ));
    }

    #[test]
    fn the_new_pair_is_never_in_the_removal() {
        let mut found = interrupted(true, true, vec![2]);
        found.remove = vec![pair(0, 1), pair(2, 3)];
        assert_eq!(
            resume(&found),
            Resume::Complete {
                remove: vec![pair(0, 1)]
            }
        );
    }

    #[test]
    fn an_interrupted_finish_completes() {
        let found = Interrupted {
            mode: ResealMode::Finish,
            new_keyslot: None,
            new_keyslot_present: false,
            new_tokens: vec![],
            proven: false,
            remove: vec![pair(0, 1)],
        };
        assert_eq!(
            resume(&found),
            Resume::Complete {
                remove: vec![pair(0, 1)]
            }
        );
    }
}
