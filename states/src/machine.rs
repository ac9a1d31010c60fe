//! The legal transitions of provisioning, as a statig state machine.
//!
//! The orchestrator reports every completed step together with the state it observes on the
//! device afterwards. The machine accepts the report only if that step may lead from the current
//! state to the observed one; anything else is a [`TransitionError`], which the orchestrator
//! treats as fatal: a step whose effect on the device is not the modelled one must not be
//! followed blindly by the next.

use crate::action::Step;
use crate::state::ProvisioningState;

/// An event for the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// Start from the state derived from the device (after a boot or a crash).
    Resume(ProvisioningState),
    /// `step` finished and the device was observed in `observed` afterwards.
    Completed {
        /// The step that ran.
        step: Step,
        /// The state derived from the device after it.
        observed: ProvisioningState,
    },
}

/// A reported transition the model does not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("step {step} may not lead from {from} to {to}")]
pub struct TransitionError {
    /// The step that was reported.
    pub step: Step,
    /// The machine's state when the report came.
    pub from: ProvisioningState,
    /// The state observed on the device.
    pub to: ProvisioningState,
}

/// The statig-generated part; private so its generated types stay out of the public API.
mod model {
    use super::{Event, TransitionError};
    use crate::action::Step;
    use crate::state::ProvisioningState;
    use statig::prelude::*;

    /// The statig machine itself (no shared storage: everything it reports goes into [`Report`]).
    #[derive(Debug, Default)]
    pub(super) struct Model;

    /// What one event produced: a rejection, or the transitions taken.
    #[derive(Debug, Default)]
    pub(super) struct Report {
        pub(super) rejected: Option<TransitionError>,
        pub(super) transitions: Vec<(ProvisioningState, ProvisioningState)>,
    }

    /// Which targets a step may reach from a state.
    pub fn allowed(from: ProvisioningState, step: Step) -> &'static [ProvisioningState] {
        use ProvisioningState as S;
        match (from, step) {
            (S::Unencrypted, Step::EncryptInPlace) => &[S::KekEnrolled, S::Complete],
            (S::EncryptedWithPassphrase, Step::EnrollKek) => &[S::KekEnrolled],
            (S::KekEnrolled, Step::EnrollRecovery) => &[S::KekEnrolled],
            (S::Complete, Step::EnrollRecovery) => &[S::Complete],
            (S::KekEnrolled, Step::WipePassphrase) => &[S::KekEnrolled, S::Complete],
            (S::KekEnrolled, Step::InitReencrypt) => &[S::Reencrypting],
            (S::Reencrypting, Step::Reencrypt) => &[S::Complete],
            (S::Reencrypting, Step::RecoverReencrypt) => &[S::Reencrypting, S::Complete],
            (S::Complete, Step::BackupHeader) => &[S::HeaderBackedUp],
            (S::HeaderBackedUp, Step::GrowFilesystem) => &[S::HeaderBackedUp],
            _ => &[],
        }
    }

    pub(super) fn to_statig(state: ProvisioningState) -> State {
        match state {
            ProvisioningState::Unencrypted => State::unencrypted(),
            ProvisioningState::EncryptedWithPassphrase => State::encrypted_with_passphrase(),
            ProvisioningState::KekEnrolled => State::kek_enrolled(),
            ProvisioningState::Reencrypting => State::reencrypting(),
            ProvisioningState::Complete => State::complete(),
            ProvisioningState::HeaderBackedUp => State::header_backed_up(),
        }
    }

    pub(super) fn from_statig(state: &State) -> ProvisioningState {
        match state {
            State::Unencrypted {} => ProvisioningState::Unencrypted,
            State::EncryptedWithPassphrase {} => ProvisioningState::EncryptedWithPassphrase,
            State::KekEnrolled {} => ProvisioningState::KekEnrolled,
            State::Reencrypting {} => ProvisioningState::Reencrypting,
            State::Complete {} => ProvisioningState::Complete,
            State::HeaderBackedUp {} => ProvisioningState::HeaderBackedUp,
        }
    }

    #[state_machine(
        initial = "State::unencrypted()",
        after_transition = "Self::after_transition",
        state(derive(Debug, Clone, PartialEq, Eq))
    )]
    impl Model {
        #[state(superstate = "provisioning")]
        fn unencrypted(context: &mut Report, event: &Event) -> Outcome<State> {
            step(context, ProvisioningState::Unencrypted, event)
        }

        #[state(superstate = "provisioning")]
        fn encrypted_with_passphrase(context: &mut Report, event: &Event) -> Outcome<State> {
            step(context, ProvisioningState::EncryptedWithPassphrase, event)
        }

        #[state(superstate = "provisioning")]
        fn kek_enrolled(context: &mut Report, event: &Event) -> Outcome<State> {
            step(context, ProvisioningState::KekEnrolled, event)
        }

        #[state(superstate = "provisioning")]
        fn reencrypting(context: &mut Report, event: &Event) -> Outcome<State> {
            step(context, ProvisioningState::Reencrypting, event)
        }

        #[state(superstate = "provisioning")]
        fn complete(context: &mut Report, event: &Event) -> Outcome<State> {
            step(context, ProvisioningState::Complete, event)
        }

        #[state(superstate = "provisioning")]
        fn header_backed_up(context: &mut Report, event: &Event) -> Outcome<State> {
            step(context, ProvisioningState::HeaderBackedUp, event)
        }

        /// Resuming after a boot or crash may land in any state: the device is the ground truth.
        #[superstate]
        fn provisioning(event: &Event) -> Outcome<State> {
            match event {
                Event::Resume(state) => Transition(to_statig(*state)),
                Event::Completed { .. } => Handled,
            }
        }
    }

    fn step(report: &mut Report, from: ProvisioningState, event: &Event) -> Outcome<State> {
        match *event {
            Event::Completed { step, observed } => {
                if allowed(from, step).contains(&observed) {
                    if observed == from {
                        Handled
                    } else {
                        Transition(to_statig(observed))
                    }
                } else {
                    report.rejected = Some(TransitionError {
                        step,
                        from,
                        to: observed,
                    });
                    Handled
                }
            }
            Event::Resume(_) => Super,
        }
    }

    impl Model {
        fn after_transition(&mut self, source: &State, target: &State, report: &mut Report) {
            report
                .transitions
                .push((from_statig(source), from_statig(target)));
        }
    }
}

pub use model::allowed;
use model::{from_statig, Model, Report};
use statig::prelude::*;

/// The provisioning machine, as the orchestrator uses it.
pub struct ProvisioningMachine {
    inner: statig::blocking::InitializedStateMachine<Model>,
}

impl ProvisioningMachine {
    /// A machine positioned at `state`, the state derived from the device at start-up.
    pub fn resume(state: ProvisioningState) -> Self {
        let mut inner = Model
            .uninitialized_state_machine()
            .init_with_context(&mut Report::default());
        inner.handle_with_context(&Event::Resume(state), &mut Report::default());
        ProvisioningMachine { inner }
    }

    /// The machine's current state.
    pub fn state(&self) -> ProvisioningState {
        from_statig(self.inner.state())
    }

    /// Reports that `step` completed and the device now shows `observed`.
    ///
    /// Returns the transitions taken (none when the step left the state as it was).
    pub fn completed(
        &mut self,
        step: Step,
        observed: ProvisioningState,
    ) -> Result<Vec<(ProvisioningState, ProvisioningState)>, TransitionError> {
        let mut report = Report::default();
        self.inner
            .handle_with_context(&Event::Completed { step, observed }, &mut report);
        match report.rejected {
            Some(err) => Err(err),
            None => Ok(report.transitions),
        }
    }
}
