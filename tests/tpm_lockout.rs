//! Power cuts never lock the TPM out: a swtpm with libtpms' default dictionary-attack
//! parameters, SIGKILLed (a power cut) right after each cryptfs unlock, ten times; its lockout
//! counter stays 0. The anchor: the same loop with systemd 252's plugin as the TPM client
//! raises it. And a real lockout (someone else's failed tries) is reported as DA lockout.

mod common;

use std::process::Command;

use common::{Image, Rig, Swtpm};

const CUTS: usize = 10;

/// `tpm2_getcap properties-variable` value of `name` (e.g. TPM2_PT_LOCKOUT_COUNTER).
fn tpm_property(tpm: &Swtpm, capability: &str, name: &str) -> u32 {
    let out = Command::new("tpm2_getcap")
        .env("TPM2TOOLS_TCTI", tpm.tcti())
        .arg(capability)
        .output()
        .expect("tpm2-tools must be installed");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = text
        .lines()
        .skip_while(|l| !l.starts_with(name))
        .find_map(|l| {
            let v = l
                .trim()
                .trim_start_matches(name)
                .trim_start_matches(':')
                .trim();
            (!v.is_empty()).then(|| v.to_string())
        })
        .or_else(|| {
            // tpm2-tools 5 prints `NAME:` then an indented `raw: 0x..` line.
            let mut lines = text.lines().skip_while(|l| !l.starts_with(name)).skip(1);
            lines.find_map(|l| l.trim().strip_prefix("raw:").map(|v| v.trim().to_string()))
        })
        .unwrap_or_else(|| panic!("{name} not in:\n{text}"));
    let v = line.split_whitespace().next().expect("value");
    u32::from_str_radix(v.trim_start_matches("0x"), 16)
        .or_else(|_| v.parse())
        .unwrap_or_else(|_| panic!("{name}: {line}"))
}

fn lockout_counter(tpm: &Swtpm) -> u32 {
    tpm_property(tpm, "properties-variable", "TPM2_PT_LOCKOUT_COUNTER")
}

fn point_config_at(rig: &Rig, tcti: &str) {
    std::fs::write(
        &rig.config,
        common::config_text(&rig.device, &rig.boot, tcti, ""),
    )
    .expect("config");
}

/// `CUTS` cycles of: swtpm up on the rig's state dir (TPM2_Startup(CLEAR) by swtpm itself),
/// `unlock` through it, SIGKILL. Returns the cuts that really cut: the unlock had succeeded
/// (so the DA-protected storage primary had been authorized in this TPM power cycle) and swtpm
/// died of the signal.
fn cut_after_each(rig: &mut Rig, unlock: impl Fn(&Rig) -> bool) -> usize {
    let state = rig.tpm.state.clone();
    // The running swtpm holds the state dir: stop it first (not counted, nothing in use).
    rig.tpm.power_cut();
    let mut cuts = 0;
    for _ in 0..CUTS {
        rig.tpm = Swtpm::start_on(&state);
        point_config_at(rig, &rig.tpm.tcti());
        let unlocked = unlock(rig);
        let killed = rig.tpm.power_cut();
        if unlocked && killed {
            cuts += 1;
        }
    }
    rig.tpm = Swtpm::start_on(&state);
    point_config_at(rig, &rig.tpm.tcti());
    cuts
}

fn cryptfs_unlocks(rig: &Rig) -> bool {
    rig.cryptfs(&["unlock", "--test"]).status.success()
}

#[test]
fn ten_power_cuts_during_unlock_leave_the_lockout_counter_at_zero() {
    let mut rig = Rig::new(Image::Plain, 128);
    let max = tpm_property(&rig.tpm, "properties-variable", "TPM2_PT_MAX_AUTH_FAIL");
    rig.run_stage("all");
    assert_eq!(lockout_counter(&rig.tpm), 0);

    let cryptfs_cuts = cut_after_each(&mut rig, cryptfs_unlocks);
    let cryptfs_counter = lockout_counter(&rig.tpm);
    assert!(cryptfs_unlocks(&rig), "a final unlock after the cuts");

    // The anchor: systemd 252's plugin authorizes the same DA-protected primary and leaves the
    // TPM in the "DA used" state; each cut then counts as a failed try.
    let anchor_cuts = cut_after_each(&mut rig, |rig| {
        common::systemd_tpm2_plugin_unlocks(&rig.device, &format!("swtpm:port={}", rig.tpm.port))
            .is_ok()
    });
    let anchor_counter = lockout_counter(&rig.tpm);
    let locked = rig.cryptfs(&["unlock", "--test"]);
    println!(
        "| TPM client | power cuts after unlock | cuts that cut | lockout counter after | max tries |\n\
         |---|---|---|---|---|\n\
         | cryptfs | {CUTS} | {cryptfs_cuts} | {cryptfs_counter} | {max} |\n\
         | systemd 252 plugin | {CUTS} | {anchor_cuts} | {anchor_counter} | {max} |"
    );
    assert_eq!(
        cryptfs_cuts, CUTS,
        "every cut cut, after a successful unlock"
    );
    assert_eq!(
        cryptfs_counter, 0,
        "cryptfs' power cuts counted as failed tries"
    );
    assert!(
        anchor_cuts > 0,
        "the anchor unlocked at least once before lockout"
    );
    assert!(
        anchor_counter > 0,
        "the anchor's cuts must count: the measurement is real"
    );
    if anchor_counter >= max {
        let stderr = String::from_utf8_lossy(&locked.stderr);
        assert!(!locked.status.success());
        assert!(
            stderr.contains("dictionary-attack (DA) lockout"),
            "{stderr}"
        );
    }
}

fn tpm2(tpm: &Swtpm, args: &[&str]) -> std::process::Output {
    Command::new(args[0])
        .env("TPM2TOOLS_TCTI", tpm.tcti())
        .args(&args[1..])
        .output()
        .expect("tpm2-tools must be installed")
}

#[test]
fn dictionary_attack_lockout_is_reported_with_its_counter_and_how_to_clear_it() {
    let rig = Rig::new(Image::Plain, 128);
    rig.run_stage("all");
    // Someone else's failed authorization on a DA-protected NV index, with one try allowed.
    for args in [
        &[
            "tpm2_dictionarylockout",
            "--setup-parameters",
            "--max-tries=1",
            "--recovery-time=600",
            "--lockout-recovery-time=600",
        ][..],
        &[
            "tpm2_nvdefine",
            "0x1500016",
            "-C",
            "o",
            "-s",
            "8",
            "-a",
            "ownerread|ownerwrite|authread|authwrite",
            "-p",
            "right",
        ],
    ] {
        let out = tpm2(&rig.tpm, args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let wrong = tpm2(
        &rig.tpm,
        &[
            "tpm2_nvread",
            "0x1500016",
            "-C",
            "0x1500016",
            "-P",
            "wrong",
            "-s",
            "8",
        ],
    );
    assert!(!wrong.status.success(), "the wrong password must fail");
    assert_eq!(lockout_counter(&rig.tpm), 1);

    let out = rig.cryptfs(&["unlock", "--test"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    for needle in [
        "dictionary-attack (DA) lockout",
        "counted 1 of at most 1",
        "every 600 s",
        "tpm2_dictionarylockout --clear-lockout",
    ] {
        assert!(stderr.contains(needle), "{needle:?} not in:\n{stderr}");
    }
    // Cleared as the message says, it unlocks again.
    let clear = tpm2(&rig.tpm, &["tpm2_dictionarylockout", "--clear-lockout"]);
    assert!(
        clear.status.success(),
        "{}",
        String::from_utf8_lossy(&clear.stderr)
    );
    let out = rig.cryptfs(&["unlock", "--test"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
