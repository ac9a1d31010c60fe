//! The boot-phase lock (design/boot.md): after the initramfs stage the KEK cannot be unsealed
//! in this boot; the userspace stage completes with the passphrase handed on through the
//! kernel keyring; the next boot (swtpm restarted on its state: PCRs reset) unseals again.

mod common;

use common::{Image, Rig};
use cryptfs::boot_lock;
use cryptfs::kek::tpm2::Tpm2Protector;
use cryptfs::kek::tpm2_policy;

fn lock_pcr_value(rig: &Rig) -> Vec<u8> {
    let tpm = Tpm2Protector::new(&rig.config().kek.tpm2).expect("protector");
    tpm.read_pcrs("sha256", &[15])
        .expect("read PCR 15")
        .pop()
        .expect("PCR 15")
        .1
}

#[test]
fn after_the_lock_userspace_cannot_unseal_but_completes_via_the_keyring_and_the_next_boot_unlocks()
{
    let mut rig = Rig::new(Image::Ci, 128);
    rig.enable_boot_phase_lock();
    rig.tpm.extend_pcr7();
    let mut checks = 0;

    let pre = lock_pcr_value(&rig);
    let first = rig.run_stage("initramfs");
    let locked = tpm2_policy::extended("sha256", &pre, &boot_lock::measurement()).expect("sha256");
    assert_eq!(
        lock_pcr_value(&rig),
        locked,
        "PCR 15 extended once by the lock"
    );
    checks += 1;
    let token = &common::luks2(&rig.device).tokens[&0];
    assert_eq!(token.json["tpm2-pcrs"], serde_json::json!([7, 15]));
    checks += 1;

    // A "userspace" unseal: refused, and the message names the lock.
    let test = rig.cryptfs(&["unlock", "--test"]);
    let stderr = String::from_utf8_lossy(&test.stderr);
    assert!(!test.status.success(), "unsealed after the lock");
    assert!(
        stderr.contains("boot-phase lock is in effect") && stderr.contains("PCR 15"),
        "{stderr}"
    );
    checks += 1;

    // The initramfs stage again in this boot: no second extend.
    rig.run_stage("initramfs");
    assert_eq!(lock_pcr_value(&rig), locked, "the lock is once per boot");
    checks += 1;

    // The userspace stage (re-encryption, header backup) through the keyring.
    let user = rig.run_stage("userspace");
    let log = String::from_utf8_lossy(&user.stderr);
    assert!(log.contains("taken from the kernel keyring"), "{log}");
    assert_eq!(rig.status()["state"], "header-backed-up");
    checks += 1;

    // The hand-off never reaches a file or a log.
    let meta = common::luks2(&rig.device);
    let stashed = cryptfs::keyring::read(&boot_lock::key_description(&meta))
        .expect("keyring")
        .expect("the initramfs handed the passphrase on");
    common::assert_nothing_written_contains(&rig, &[stashed.expose()], &[first, test, user]);
    checks += 1;

    // Next boot: PCRs reset, another boot id (the kernel keyring of the last boot is gone).
    let meta = common::luks2(&rig.device);
    let description = boot_lock::key_description(&meta);
    // The same secure-boot state as the first boot.
    rig.reboot(true);
    assert_eq!(lock_pcr_value(&rig), pre, "PCR 15 reset by the reboot");
    let next = rig.cryptfs_env(&["unlock", "--test"], &[("CRYPTFS_BOOT_ID", "next-boot")]);
    assert!(
        next.status.success(),
        "the next boot unseals: {}",
        String::from_utf8_lossy(&next.stderr)
    );
    checks += 1;
    assert_eq!(rig.files_inside(), rig.files, "every file survived");
    checks += 1;

    assert!(
        cryptfs::keyring::read(&description)
            .expect("keyring")
            .is_none(),
        "the next boot's keyring does not hold the last boot's key"
    );
    assert_eq!(checks, 8, "every check ran");
}

/// The software PolicyPCR digest equals the TPM's trial-session digest and the token's
/// `tpm2-policy-hash`, for the PCR values the TPM holds.
#[test]
fn software_policy_matches_the_tpm_and_the_token() {
    let mut rig = Rig::new(Image::Plain, 128);
    rig.enable_boot_phase_lock();
    rig.tpm.extend_pcr7();
    let tpm = Tpm2Protector::new(&rig.config().kek.tpm2).expect("protector");
    let mut checks = 0;
    for pcrs in [vec![7u8], vec![7, 15], vec![0, 7, 15]] {
        let values = tpm.read_pcrs("sha256", &pcrs).expect("read");
        let software = tpm2_policy::policy_pcr_digest("sha256", &values).expect("digest");
        let trial = tpm.trial_policy("sha256", &pcrs).expect("trial");
        assert_eq!(hex::encode(software), hex::encode(trial), "PCRs {pcrs:?}");
        checks += 1;
    }
    let mut sealer = Tpm2Protector::new(&rig.config().kek.tpm2).expect("protector");
    let (_, sealed) = cryptfs::kek::KekProtector::seal(&mut sealer).expect("seal");
    let values = tpm.read_pcrs("sha256", &[7, 15]).expect("read");
    assert_eq!(
        sealed.fields["tpm2-policy-hash"],
        hex::encode(tpm2_policy::policy_pcr_digest("sha256", &values).expect("digest"))
    );
    checks += 1;
    assert_eq!(checks, 4);
}
