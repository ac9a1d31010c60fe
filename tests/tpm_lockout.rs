//! Power cuts never lock the TPM out: a swtpm with libtpms' default dictionary-attack
//! parameters, SIGKILLed (a power cut) right after each cryptfs unlock, ten times; its lockout
//! counter stays 0. The anchor: the same loop with systemd 252's plugin as the TPM client
//! raises it. And a real lockout (someone else's failed tries) is reported as DA lockout.

mod common;

use common::proxy::{Proxy, CC_LOAD, CC_SHUTDOWN, CC_UNSEAL};
use common::{Image, Rig, Swtpm};

/// Power cuts right after an unlock, per TPM client.
const CUTS: usize = 10;

/// `tpm2_getcap properties-variable` value of `name` (e.g. TPM2_PT_LOCKOUT_COUNTER).
fn tpm_property(tpm: &Swtpm, capability: &str, name: &str) -> u32 {
    let out = tpm.tool(&["tpm2_getcap", capability]);
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

/// `cuts` cycles of: swtpm up on the rig's state dir (TPM2_Startup(CLEAR) by swtpm itself),
/// `unlock` through a proxy, SIGKILL: right after the unlock, or, with `cut_at`, by the proxy
/// instead of forwarding that command. Returns the cuts that really cut: swtpm died of SIGKILL
/// after the DA-protected storage primary had been authorized in this TPM power cycle (the
/// unlock succeeded, or TPM2_Load went through before the mid-way cut).
fn cut_each(
    rig: &mut Rig,
    cuts: usize,
    cut_at: Option<u32>,
    unlock: impl Fn(&Rig, &Proxy) -> bool,
) -> usize {
    let state = rig.tpm.state.clone();
    // The running swtpm holds the state dir: stop it first (not counted, nothing in use).
    rig.tpm.power_cut();
    let mut real = 0;
    for _ in 0..cuts {
        rig.tpm = Swtpm::start_on(&state);
        let proxy = Proxy::start_cutting(&rig.tpm, cut_at);
        rig.point_tpm_at(&proxy.tcti());
        let unlocked = unlock(rig, &proxy);
        let (_, codes) = proxy.take();
        let authorized = if cut_at.is_some() {
            codes.contains(&CC_LOAD)
        } else {
            unlocked
        };
        if rig.tpm.power_cut() && authorized {
            real += 1;
        }
    }
    rig.tpm = Swtpm::start_on(&state);
    rig.point_tpm_at(&rig.tpm.tcti());
    real
}

fn cryptfs_unlocks(rig: &Rig, _: &Proxy) -> bool {
    rig.cryptfs(&["unlock", "--test"]).status.success()
}

fn systemd_unlocks(rig: &Rig, proxy: &Proxy) -> bool {
    common::systemd_tpm2_plugin_unlocks(&rig.device, &format!("swtpm:port={}", proxy.port)).is_ok()
}

/// The re-encryption stage, cut with the whole machine (cryptfs and the TPM) 0-250 ms after
/// its TPM2_Unseal: true when the unseal happened before the cut.
fn reencryption_cut(rig: &Rig, proxy: &Proxy, delay_ms: u64) -> bool {
    let mut child = std::process::Command::new(common::BIN)
        .args(["run", "--stage", "userspace", "--config"])
        .arg(&rig.config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("cryptfs");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut unsealed = false;
    while std::time::Instant::now() < deadline {
        if proxy.saw(CC_UNSEAL) {
            unsealed = true;
            break;
        }
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    std::thread::sleep(std::time::Duration::from_millis(delay_ms));
    let _ = child.kill();
    let _ = child.wait();
    unsealed
}

#[test]
fn ten_power_cuts_during_reencryption_leave_the_lockout_counter_at_zero() {
    let mut rig = Rig::new(Image::Ci, 128);
    rig.run_stage("initramfs");
    assert_eq!(rig.status()["state"], "reencrypting");
    let delay = std::cell::Cell::new(0u64);
    let cuts = cut_each(&mut rig, CUTS, None, |rig, proxy| {
        delay.set((delay.get() + 97) % 250);
        reencryption_cut(rig, proxy, delay.get())
    });
    let counter = lockout_counter(&rig.tpm);
    println!("re-encryption stage: {CUTS} power cuts after its unseal, {cuts} cut, lockout counter {counter}");
    assert_eq!(cuts, CUTS, "every cut came after the stage's TPM2_Unseal");
    assert_eq!(counter, 0);
    rig.run_stage("userspace");
    assert_eq!(rig.status()["state"], "header-backed-up");
    assert_eq!(rig.files_inside(), rig.files);
}

#[test]
fn ten_power_cuts_during_unlock_leave_the_lockout_counter_at_zero() {
    let mut rig = Rig::new(Image::Plain, 128);
    let max = tpm_property(&rig.tpm, "properties-variable", "TPM2_PT_MAX_AUTH_FAIL");
    rig.run_stage("all");
    assert_eq!(lockout_counter(&rig.tpm), 0);

    let cryptfs_cuts = cut_each(&mut rig, CUTS, None, cryptfs_unlocks);
    let cryptfs_counter = lockout_counter(&rig.tpm);
    assert!(
        rig.cryptfs(&["unlock", "--test"]).status.success(),
        "a final unlock after the cuts"
    );

    // Mid-unlock, when TPM2_Unseal is sent (the primary authorized by TPM2_Load before it).
    let mid_cuts = cut_each(&mut rig, 3, Some(CC_UNSEAL), cryptfs_unlocks);
    let mid_counter = lockout_counter(&rig.tpm);
    // What remains: a cut between TPM2_Load and the TPM2_Shutdown right after it. Two, below
    // the limit; then cleared for the anchor.
    let residual_cuts = cut_each(&mut rig, 2, Some(CC_SHUTDOWN), cryptfs_unlocks);
    let residual_counter = lockout_counter(&rig.tpm);
    let clear = rig.tpm.tool(&["tpm2_dictionarylockout", "--clear-lockout"]);
    assert!(
        clear.status.success(),
        "{}",
        String::from_utf8_lossy(&clear.stderr)
    );
    assert_eq!(lockout_counter(&rig.tpm), 0);

    // The anchor: systemd 252's plugin authorizes the same DA-protected primary and leaves the
    // TPM in the "DA used" state; each cut then counts as a failed try.
    let anchor_cuts = cut_each(&mut rig, CUTS, None, systemd_unlocks);
    let anchor_counter = lockout_counter(&rig.tpm);
    let locked = rig.cryptfs(&["unlock", "--test"]);
    let table = format!(
        "| TPM client | power cuts | when | cuts that cut | lockout counter after | max tries |\n\
         |---|---|---|---|---|---|\n\
         | cryptfs | {CUTS} | right after unlock | {cryptfs_cuts} | {cryptfs_counter} | {max} |\n\
         | cryptfs | 3 | mid-unlock, at TPM2_Unseal | {mid_cuts} | {mid_counter} | {max} |\n\
         | cryptfs | 2 | mid-unlock, at the TPM2_Shutdown after TPM2_Load (the window that remains) | {residual_cuts} | {residual_counter} | {max} |\n\
         | systemd 252 plugin | {CUTS} | right after unlock | {anchor_cuts} | {anchor_counter} | {max} |\n"
    );
    println!("{table}");
    common::write_result(
        "tpm_lockout.md",
        &format!(
            "# Power cuts and the TPM's dictionary-attack counter (tests/tpm_lockout.rs)\n\n\
             swtpm with libtpms' default DA parameters, SIGKILLed on a persistent state dir. A \
             cut counts only if swtpm died of SIGKILL after the DA-protected storage primary was \
             authorized in that power cycle.\n\n{table}"
        ),
    );
    assert_eq!(mid_cuts, 3, "every cut at TPM2_Unseal cut after TPM2_Load");
    assert_eq!(
        mid_counter, 0,
        "a cut at TPM2_Unseal counted as a failed try"
    );
    assert_eq!(
        residual_cuts, 2,
        "both cuts at TPM2_Shutdown cut after TPM2_Load"
    );
    assert_eq!(residual_counter, 2, "the remaining window, measured");
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
        let out = rig.tpm.tool(args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let wrong = rig.tpm.tool(&[
        "tpm2_nvread",
        "0x1500016",
        "-C",
        "0x1500016",
        "-P",
        "wrong",
        "-s",
        "8",
    ]);
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
    let clear = rig.tpm.tool(&["tpm2_dictionarylockout", "--clear-lockout"]);
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
