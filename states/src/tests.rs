//! Pure tests of state derivation, planning and legal transitions.

use crate::*;

fn luks(kek: bool, passphrases: &[u32], reencrypt: Option<ReencryptMode>) -> DeviceFacts {
    DeviceFacts::Luks2(Luks2Facts {
        kek_token: kek,
        passphrase_keyslots: passphrases.to_vec(),
        reencrypt,
        reencrypt_needs_repair: false,
        recovery_token: false,
    })
}

fn facts(device: DeviceFacts, origin: Option<VolumeKeyOrigin>) -> Facts {
    Facts {
        device,
        journal: JournalFacts {
            volume_key_origin: origin,
            ..JournalFacts::default()
        },
        backup_verified: false,
        mapping_active: false,
        policy: Policy::default(),
    }
}

#[test]
fn ci_image_path_walks_every_state_in_order() {
    use ProvisioningState as S;
    let image = Some(VolumeKeyOrigin::Image);
    let steps = [
        (
            facts(luks(false, &[31], None), image),
            S::EncryptedWithPassphrase,
            Step::EnrollKek,
        ),
        (
            facts(luks(true, &[31], None), image),
            S::KekEnrolled,
            Step::WipePassphrase,
        ),
        (
            facts(luks(true, &[], None), image),
            S::KekEnrolled,
            Step::InitReencrypt,
        ),
        (
            facts(luks(true, &[], Some(ReencryptMode::Reencrypt)), image),
            S::Reencrypting,
            Step::Reencrypt,
        ),
        (
            facts(luks(true, &[], None), Some(VolumeKeyOrigin::Reencrypted)),
            S::Complete,
            Step::BackupHeader,
        ),
    ];
    for (f, state, step) in steps {
        assert_eq!(derive_state(&f), state, "{f:?}");
        assert_eq!(plan(&f, Stage::All), Action::Run(step), "{f:?}");
    }
    let mut done = facts(luks(true, &[], None), Some(VolumeKeyOrigin::Reencrypted));
    done.backup_verified = true;
    assert_eq!(derive_state(&done), S::HeaderBackedUp);
    assert_eq!(plan(&done, Stage::All), Action::Done);
    done.mapping_active = true;
    assert_eq!(
        plan(&done, Stage::Userspace),
        Action::Run(Step::GrowFilesystem)
    );
    done.journal.filesystem_grown = true;
    assert_eq!(plan(&done, Stage::Userspace), Action::Done);
}

#[test]
fn in_place_path_skips_reencryption_by_default_and_not_when_forced() {
    let mut f = facts(DeviceFacts::PlainExt4, None);
    assert_eq!(
        plan(&f, Stage::Initramfs),
        Action::Run(Step::EncryptInPlace)
    );
    f.device = luks(false, &[], Some(ReencryptMode::Encrypt));
    assert_eq!(derive_state(&f), ProvisioningState::Unencrypted);
    assert_eq!(
        plan(&f, Stage::Initramfs),
        Action::Run(Step::EncryptInPlace)
    );
    f.device = luks(true, &[], None);
    f.journal.volume_key_origin = Some(VolumeKeyOrigin::InPlace);
    assert_eq!(derive_state(&f), ProvisioningState::Complete);
    assert_eq!(plan(&f, Stage::Initramfs), Action::Done);
    assert_eq!(plan(&f, Stage::Userspace), Action::Run(Step::BackupHeader));
    f.policy.reencrypt = ReencryptPolicy::Always;
    assert_eq!(derive_state(&f), ProvisioningState::KekEnrolled);
    assert_eq!(plan(&f, Stage::Initramfs), Action::Run(Step::InitReencrypt));
}

#[test]
fn unknown_key_origin_is_treated_as_shared_image_key() {
    let f = facts(luks(true, &[], None), None);
    assert!(f.reencrypt_required());
    assert_eq!(plan(&f, Stage::All), Action::Run(Step::InitReencrypt));
    let mut never = f.clone();
    never.policy.reencrypt = ReencryptPolicy::Never;
    assert_eq!(plan(&never, Stage::All), Action::Run(Step::BackupHeader));
}

#[test]
fn initramfs_finishes_only_reencryption_left_by_an_earlier_boot() {
    let mut f = facts(
        luks(true, &[], Some(ReencryptMode::Reencrypt)),
        Some(VolumeKeyOrigin::Image),
    );
    f.journal.reencrypt_initialised_this_boot = true;
    assert_eq!(plan(&f, Stage::Initramfs), Action::Done);
    assert_eq!(plan(&f, Stage::Userspace), Action::Run(Step::Reencrypt));
    f.journal.reencrypt_initialised_this_boot = false;
    assert_eq!(plan(&f, Stage::Initramfs), Action::Run(Step::Reencrypt));
}

#[test]
fn background_resume_only_repairs_in_the_initramfs() {
    let mut f = facts(
        luks(true, &[], Some(ReencryptMode::Reencrypt)),
        Some(VolumeKeyOrigin::Image),
    );
    f.policy.resume = ResumePolicy::Background;
    // Left clean by the last boot: nothing for the initramfs, the service finishes it.
    assert_eq!(plan(&f, Stage::Initramfs), Action::Done);
    assert_eq!(plan(&f, Stage::Userspace), Action::Run(Step::Reencrypt));
    // A hotzone in flight (or all data final, metadata unfinished): repaired before activation.
    if let DeviceFacts::Luks2(l) = &mut f.device {
        l.reencrypt_needs_repair = true;
    }
    assert_eq!(
        plan(&f, Stage::Initramfs),
        Action::Run(Step::RecoverReencrypt)
    );
    assert_eq!(plan(&f, Stage::All), Action::Run(Step::Reencrypt));
    // The default keeps the reference's behaviour: finish it here, blocking.
    f.policy.resume = ResumePolicy::Initramfs;
    assert_eq!(plan(&f, Stage::Initramfs), Action::Run(Step::Reencrypt));
}

#[test]
fn recovery_may_leave_the_volume_reencrypting_or_complete_but_nothing_else() {
    use ProvisioningState as S;
    let mut m = ProvisioningMachine::resume(S::Reencrypting);
    assert!(m
        .completed(Step::RecoverReencrypt, S::Reencrypting)
        .expect("legal")
        .is_empty());
    assert!(m.completed(Step::RecoverReencrypt, S::KekEnrolled).is_err());
    assert_eq!(
        m.completed(Step::RecoverReencrypt, S::Complete)
            .expect("legal"),
        vec![(S::Reencrypting, S::Complete)]
    );
}

#[test]
fn userspace_refuses_initramfs_work() {
    for device in [
        DeviceFacts::PlainExt4,
        luks(false, &[31], None),
        luks(true, &[31], None),
        luks(true, &[], None),
    ] {
        let f = facts(device, Some(VolumeKeyOrigin::Image));
        assert_eq!(
            plan(&f, Stage::Userspace),
            Action::Blocked(Blocker::InitramfsStagePending),
            "{f:?}"
        );
    }
}

#[test]
fn machine_accepts_the_legal_path_and_records_transitions() {
    use ProvisioningState as S;
    let mut m = ProvisioningMachine::resume(S::EncryptedWithPassphrase);
    assert_eq!(m.state(), S::EncryptedWithPassphrase);
    let t = m.completed(Step::EnrollKek, S::KekEnrolled).expect("legal");
    assert_eq!(t, vec![(S::EncryptedWithPassphrase, S::KekEnrolled)]);
    assert!(m
        .completed(Step::WipePassphrase, S::KekEnrolled)
        .expect("legal")
        .is_empty());
    m.completed(Step::InitReencrypt, S::Reencrypting)
        .expect("legal");
    m.completed(Step::Reencrypt, S::Complete).expect("legal");
    m.completed(Step::BackupHeader, S::HeaderBackedUp)
        .expect("legal");
    assert_eq!(m.state(), S::HeaderBackedUp);
}

#[test]
fn machine_rejects_effects_that_do_not_match_the_model() {
    use ProvisioningState as S;
    let mut m = ProvisioningMachine::resume(S::KekEnrolled);
    let err = m
        .completed(Step::InitReencrypt, S::Complete)
        .expect_err("illegal");
    assert_eq!(
        err,
        TransitionError {
            step: Step::InitReencrypt,
            from: S::KekEnrolled,
            to: S::Complete
        }
    );
    assert_eq!(
        m.state(),
        S::KekEnrolled,
        "a rejected report changes nothing"
    );
    assert!(m.completed(Step::BackupHeader, S::HeaderBackedUp).is_err());
    let mut fresh = ProvisioningMachine::resume(S::Unencrypted);
    assert!(fresh.completed(Step::EncryptInPlace, S::Complete).is_ok());
}

#[test]
fn every_state_has_a_plan_for_every_stage() {
    // Exhaustive over a small fact space: planning never panics and never proposes a step
    // that the machine would reject for the state it derives.
    let devices = [
        DeviceFacts::PlainExt4,
        luks(false, &[31], None),
        luks(true, &[31], None),
        luks(true, &[], None),
        luks(false, &[], Some(ReencryptMode::Encrypt)),
        luks(true, &[], Some(ReencryptMode::Reencrypt)),
        DeviceFacts::Luks2(Luks2Facts {
            kek_token: true,
            passphrase_keyslots: vec![],
            reencrypt: Some(ReencryptMode::Reencrypt),
            reencrypt_needs_repair: true,
            recovery_token: false,
        }),
    ];
    let origins = [
        None,
        Some(VolumeKeyOrigin::Image),
        Some(VolumeKeyOrigin::InPlace),
        Some(VolumeKeyOrigin::Reencrypted),
    ];
    for d in &devices {
        for o in origins {
            for (backup, resume) in [
                (false, ResumePolicy::Initramfs),
                (true, ResumePolicy::Initramfs),
                (false, ResumePolicy::Background),
            ] {
                let mut f = facts(d.clone(), o);
                f.backup_verified = backup;
                f.policy.resume = resume;
                for stage in [Stage::Initramfs, Stage::Userspace, Stage::All] {
                    if let Action::Run(step) = plan(&f, stage) {
                        let state = derive_state(&f);
                        let m = ProvisioningMachine::resume(state);
                        assert_eq!(m.state(), state);
                        let legal = ProvisioningState::ALL.iter().any(|to| {
                            ProvisioningMachine::resume(state)
                                .completed(step, *to)
                                .is_ok()
                        });
                        assert!(legal, "{step} planned from {state} has no legal target");
                    }
                }
            }
        }
    }
}

#[test]
fn recovery_key_is_enrolled_before_the_wipe_or_once_the_key_is_final() {
    let with = |device: DeviceFacts, origin, reencrypt: ReencryptPolicy| {
        let mut f = facts(device, origin);
        f.policy.recovery = true;
        f.policy.reencrypt = reencrypt;
        f
    };
    let token = |mut d: DeviceFacts| {
        if let DeviceFacts::Luks2(l) = &mut d {
            l.recovery_token = true;
        }
        d
    };
    let image = Some(VolumeKeyOrigin::Image);
    let in_place = Some(VolumeKeyOrigin::InPlace);
    let cases = [
        // CI image kept (no re-encryption): escrow + keyslot before the image passphrase goes.
        (
            with(luks(true, &[31], None), image, ReencryptPolicy::Never),
            Action::Run(Step::EnrollRecovery),
        ),
        (
            with(
                token(luks(true, &[31], None)),
                image,
                ReencryptPolicy::Never,
            ),
            Action::Run(Step::WipePassphrase),
        ),
        // CI image re-encrypted: the old key's keyslots die, so the recovery key comes after.
        (
            with(
                luks(true, &[31], None),
                image,
                ReencryptPolicy::WhenFromImage,
            ),
            Action::Run(Step::WipePassphrase),
        ),
        (
            with(
                luks(true, &[], None),
                Some(VolumeKeyOrigin::Reencrypted),
                ReencryptPolicy::WhenFromImage,
            ),
            Action::Run(Step::EnrollRecovery),
        ),
        // In-place encryption: no passphrase keyslot; enrolled before the header backup.
        (
            with(
                luks(true, &[], None),
                in_place,
                ReencryptPolicy::WhenFromImage,
            ),
            Action::Run(Step::EnrollRecovery),
        ),
        (
            with(
                token(luks(true, &[], None)),
                in_place,
                ReencryptPolicy::WhenFromImage,
            ),
            Action::Run(Step::BackupHeader),
        ),
    ];
    let mut checked = 0;
    for (f, want) in &cases {
        assert_eq!(plan(f, Stage::All), *want, "{f:?}");
        checked += 1;
    }
    // Off by default: the plan is the one without recovery.
    let mut off = cases[0].0.clone();
    off.policy.recovery = false;
    assert_eq!(plan(&off, Stage::All), Action::Run(Step::WipePassphrase));
    assert_eq!(checked, 6);
}
