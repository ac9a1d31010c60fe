//! The VM tier with real systemd as PID 1: a Debian root made with mmdebstrap (cached between
//! runs) on the CI image's LUKS2 root partition; the initramfs provisions and unlocks as in
//! `tests/vm.rs`, then `switch_root`s to systemd, which starts `cryptfs.service` (installed
//! from `units/`, with `cryptfs-generator`) in multi-user.target. A rig unit (not the product's)
//! runs the workload, samples `systemctl status cryptfs`, and performs the scenario's action
//! (`systemctl reboot` mid-re-encryption, SIGKILL of the unit while a mapping of the
//! re-encryption stack is suspended).
//!
//! `cargo xtask vm` runs these after `tests/vm_secure_boot.rs`.

mod common;
#[path = "vm_rig/mod.rs"]
mod vm_rig;

use std::time::Instant;
use vm_rig::{Boot, BootOptions, Disk, RootImage};

/// Root partition: the Debian root (≈ 125 MiB with cryptfs), the "before" files (36 MiB), room
/// for the workload, and the CI image's 32 MiB of header room (at 224 MiB resize2fs's minimum
/// size estimate for the 192 MiB filesystem is already too large).
const ROOT_MIB: u64 = 256;

/// Figures of this run, per scenario.
static FIGURES: vm_rig::Figures = std::sync::Mutex::new(Vec::new());

/// Prints a figure and rewrites `design/results/vm-systemd-<scenario>.md` with every figure of
/// the scenario measured in this run.
fn figure(scenario: &str, what: &str, value: impl std::fmt::Display) {
    vm_rig::record_figure(
        &FIGURES,
        "systemd",
        "vm-systemd",
        &format!(
            "# VM scenario, systemd as PID 1: {scenario}\n\nWritten by `tests/vm_systemd.rs` \
             (QEMU TCG, 1 vCPU, Debian 12 systemd 252 root) on its last run."
        ),
        scenario,
        what,
        value.to_string(),
    );
}

/// A number after `key=` in a marker.
fn field(marker: &str, key: &str) -> Option<u64> {
    marker
        .split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))?
        .parse()
        .ok()
}

/// A boot under systemd that ran the userspace stage to its end with the workload and verified
/// every file; returns its `userspace-exit` marker.
fn assert_finished<'a>(boot: &'a Boot, what: &str) -> &'a str {
    let console = boot.console();
    assert!(!boot.cut, "{what}: unexpected power cut");
    assert!(boot.marker("fatal").is_none(), "{what}: fatal\n{console}");
    assert!(
        boot.marker("systemd-up").is_some(),
        "{what}: the driver never ran under systemd\n{console}"
    );
    assert!(
        boot.marker("files-ok-at-mount").is_some(),
        "{what}: files bad at mount\n{console}"
    );
    let exit = boot
        .marker("userspace-exit")
        .unwrap_or_else(|| panic!("{what}: no userspace-exit\n{console}"));
    assert!(
        exit.starts_with("userspace-exit 0 result=success"),
        "{what}: cryptfs.service did not succeed: {exit}\n{console}"
    );
    assert_eq!(
        field(exit, "bad-reads"),
        Some(0),
        "{what}: {exit}\n{console}"
    );
    assert!(
        boot.marker("files-ok ").is_some(),
        "{what}: files bad\n{console}"
    );
    assert_eq!(
        boot.marker("probe-ok final"),
        Some("probe-ok final"),
        "{what}: the root was not writable at the end\n{console}"
    );
    assert_eq!(
        boot.marker("state "),
        Some("state header-backed-up"),
        "{what}\n{console}"
    );
    assert!(
        boot.marker("end").is_some(),
        "{what}: no clean end\n{console}"
    );
    exit
}

/// Seconds from kernel start to systemd's driver running.
fn systemd_up_after(boot: &Boot) -> f64 {
    boot.marker("systemd-up uptime=")
        .and_then(|m| m.trim_start_matches("systemd-up uptime=").parse().ok())
        .unwrap_or(0.0)
}

/// `systemd-analyze blame`'s time for cryptfs.service, in seconds (`123ms`, `1.234s`).
fn blame_seconds(boot: &Boot) -> Option<f64> {
    let m = boot.marker("blame ")?;
    let t = m.trim_start_matches("blame ").split_whitespace().next()?;
    if let Some(ms) = t.strip_suffix("ms") {
        return ms.parse::<f64>().ok().map(|v| v / 1000.0);
    }
    t.strip_suffix('s')?.parse().ok()
}

/// The position of the first console line containing `needle`.
fn index_of(boot: &Boot, needle: &str) -> Option<usize> {
    boot.lines.iter().position(|l| l.contains(needle))
}

/// Seconds between the first lines containing `from` and `to`, as the host received them.
fn between(boot: &Boot, from: &str, to: &str) -> Option<f64> {
    let a = index_of(boot, from)?;
    let b = index_of(boot, to)?;
    Some(
        boot.line_times[b]
            .saturating_duration_since(boot.line_times[a])
            .as_secs_f64(),
    )
}

/// A boot whose driver ran `systemctl reboot` at `at` % of online re-encryption: the unit
/// stopped between two hotzones (exit 75, `SuccessExitStatus=`, result success), cryptfs's own
/// record of it in the journal, the witness unit that stops after it reported it, and the kernel
/// restarted the machine (QEMU -no-reboot then exits). Returns the stop's duration (s).
fn assert_clean_stop(boot: &Boot, disk: &Disk, what: &str) -> f64 {
    let console = boot.console();
    assert!(!boot.cut, "{what}: unexpected power cut");
    assert!(
        boot.marker("rebooting at").is_some(),
        "{what}: the driver never rebooted\n{console}"
    );
    let after_stop = boot
        .marker("after-stop")
        .unwrap_or_else(|| panic!("{what}: the witness never reported the stop\n{console}"));
    assert_eq!(
        // ExecMainCode=1: CLD_EXITED (an exit, not a signal).
        after_stop,
        "after-stop result=success status=75 code=1",
        "{what}\n{console}"
    );
    assert!(boot.saw("stopped on request"), "{what}\n{console}");
    assert!(
        boot.saw("reboot: Restarting system"),
        "{what}: the shutdown did not complete\n{console}"
    );
    assert!(boot.marker("end").is_none(), "{what}\n{console}");
    let stop_s =
        between(boot, "CRYPTFS-VM: rebooting at", "CRYPTFS-VM: after-stop").unwrap_or(f64::MAX);
    assert!(
        stop_s < 90.0,
        "{what}: the stop took {stop_s} s, beyond TimeoutStopSec=90s"
    );
    let meta = common::luks2(&disk.extract_root());
    assert!(
        meta.reencrypt_mode().is_some() && !meta.reencrypt_crashed(),
        "{what}: after a clean stop the header must show an unfinished, uncrashed re-encryption"
    );
    stop_s
}

/// `systemctl status` lines of a boot that showed re-encryption progress.
fn progress_status_lines(boot: &Boot) -> usize {
    boot.markers()
        .into_iter()
        .filter(|m| m.starts_with("status-line \"reencrypt: ") && m.contains('%'))
        .count()
}

/// `systemctl reboot` mid-re-encryption, resumed both ways, on one disk (each boot of the
/// systemd root costs a minute or more under TCG, so one scenario carries every check):
/// 1. background configuration, reboot at 30 %: a clean stop between hotzones;
/// 2. background: cryptfs.service resumes after mounting, `systemctl status` shows its progress,
///    and the driver reboots again at 60 %: a second clean stop;
/// 3. blocking configuration (`resume = "initramfs"`): the initramfs resumes and finishes before
///    mounting, then the unit runs to `header-backed-up` with every file intact;
/// 4. the completed device: `systemd-analyze blame` of cryptfs.service.
///
/// The configuration only decides where an interrupted re-encryption resumes (a first boot
/// starts it in cryptfs.service either way), so switching it between boots 2 and 3 is a
/// blocking device's resume.
#[test]
fn vm_systemd_reboot_mid_reencryption_resumes_background_then_blocking() {
    let started = Instant::now();
    let mut disk = Disk::new(RootImage::SystemdCiLuks, ROOT_MIB);
    let first = disk.boot(&BootOptions {
        config: "background",
        extra_args: "cryptfs.vm.action=reboot-at:30".into(),
        ..BootOptions::default()
    });
    let first_stop_s = assert_clean_stop(&first, &disk, "first boot");

    let second = disk.boot(&BootOptions {
        config: "background",
        extra_args: "cryptfs.vm.action=reboot-at:60".into(),
        ..BootOptions::default()
    });
    let second_stop_s = assert_clean_stop(&second, &disk, "background resume");
    let console = second.console();
    assert!(
        second.marker("files-ok-at-mount").is_some(),
        "background resume: files bad at mount\n{console}"
    );
    let mounted = index_of(&second, "CRYPTFS-VM: mounted").expect("mounted");
    let progress = index_of(&second, "cryptfs: reencrypt:").expect("resumed");
    assert!(
        mounted < progress,
        "background: cryptfs.service must resume after mounting\n{console}"
    );
    assert!(
        second.saw("resuming an interrupted re-encryption"),
        "{console}"
    );
    let rebooted = second.marker("rebooting at").expect("rebooting at");
    let status_lines = progress_status_lines(&second);
    assert!(
        status_lines > 0,
        "`systemctl status cryptfs` never showed re-encryption progress\n{console}"
    );
    assert_eq!(
        field(rebooted, "status-lines"),
        Some(
            second
                .markers()
                .iter()
                .filter(|m| m.starts_with("status-line"))
                .count() as u64
        ),
        "{rebooted}"
    );
    assert_eq!(field(rebooted, "bad-reads"), Some(0), "{rebooted}");
    let written = field(rebooted, "written").unwrap_or(0);
    assert!(
        written >= 2,
        "the workload wrote too little during re-encryption: {rebooted}"
    );

    let third = disk.boot(&BootOptions {
        config: "blocking",
        ..BootOptions::default()
    });
    assert_finished(&third, "blocking resume");
    let console = third.console();
    let mounted = index_of(&third, "CRYPTFS-VM: mounted").expect("mounted");
    let progress = index_of(&third, "cryptfs: reencrypt:").expect("resumed");
    assert!(
        progress < mounted,
        "blocking: the initramfs must finish before mounting\n{console}"
    );
    assert!(common::luks2(&disk.extract_root())
        .reencrypt_mode()
        .is_none());

    let fourth = disk.boot(&BootOptions {
        config: "blocking",
        extra_args: "cryptfs.vm.analyze=1".into(),
        ..BootOptions::default()
    });
    assert_finished(&fourth, "boot of the completed device");
    let blame = blame_seconds(&fourth)
        .unwrap_or_else(|| panic!("no blame for cryptfs.service\n{}", fourth.console()));
    let analyze = fourth
        .marker("analyze ")
        .unwrap_or_else(|| panic!("no systemd-analyze\n{}", fourth.console()))
        .trim_start_matches("analyze ")
        .to_string();
    assert!(analyze.starts_with("Startup finished"), "{analyze}");

    let s = "reboots mid-re-encryption, background then blocking";
    eprintln!(
        "VM-COUNT | systemd, {s} | boots 4 | reboots 2 | stops with exit 75 2 | resumes background 1, blocking 1 | STATUS lines seen {status_lines} | files written {written} |"
    );
    figure(
        s,
        "first boot: kernel start to the driver running under systemd (s)",
        systemd_up_after(&first),
    );
    figure(
        s,
        "SIGTERM to the unit's stop recorded after it, at 30 % (s)",
        format!("{first_stop_s:.1}"),
    );
    figure(
        s,
        "background resume: kernel start to root mounted (s)",
        second.mounted_after().unwrap_or(0.0),
    );
    figure(
        s,
        "background resume: `systemctl status` samples showing `Status: \"reencrypt: N% …\"`",
        status_lines,
    );
    figure(
        s,
        "background resume: files written by the workload",
        written,
    );
    figure(
        s,
        "SIGTERM to the unit's stop recorded after it, at 60 % (s)",
        format!("{second_stop_s:.1}"),
    );
    figure(
        s,
        "blocking resume: kernel start to root mounted (s)",
        third.mounted_after().unwrap_or(0.0),
    );
    figure(
        s,
        "completed device: `systemd-analyze blame` of cryptfs.service (s)",
        blame,
    );
    figure(s, "completed device: `systemd-analyze time`", analyze);
    figure(
        s,
        "completed device: kernel start to root mounted (s)",
        fourth.mounted_after().unwrap_or(0.0),
    );
    figure(s, "scenario wall time (s)", started.elapsed().as_secs());
}

/// SIGKILL of cryptfs.service while a device of the online re-encryption stack is suspended
/// (background configuration): `ExecStopPost=` repairs the hotzone, the root takes a write,
/// nothing stays suspended, and `Restart=` runs the job to `header-backed-up`.
#[test]
fn vm_systemd_sigkill_mid_hotzone_recovers() {
    let started = Instant::now();
    let mut disk = Disk::new(RootImage::SystemdCiLuks, ROOT_MIB);
    let boot = disk.boot(&BootOptions {
        config: "background",
        extra_args: "cryptfs.vm.action=kill-at:20".into(),
        // The repair and the restart's resume come on top of a whole re-encryption.
        timeout: Some(std::time::Duration::from_secs(900)),
        ..BootOptions::default()
    });
    let console = boot.console();
    let killed = boot
        .marker("killed pid=")
        .unwrap_or_else(|| panic!("the driver never killed cryptfs\n{console}"));
    assert!(
        killed.contains("caught-suspended=1") && killed.contains("-hotzone-forward=1"),
        "the kill did not land while the hotzone device was suspended: {killed}\n{console}"
    );
    // Bursts of sysfs polls the driver needed to catch a suspended mapping (each at most
    // 20 s of uptime; see `kill-at` in systemd-driver.sh).
    let poll_bursts = boot
        .lines
        .iter()
        .filter(|l| l.contains("CRYPTFS-VM: kill-poll burst="))
        .count();
    assert!(
        poll_bursts >= 1,
        "the driver never polled for a suspended mapping\n{console}"
    );
    let window = window_reads(&boot);
    assert!(
        window.window_snapshots >= 1,
        "no read of the regions around the hotzone between its resume and the overlay's removal \
         (the window check exercised nothing): {window:?}\n{console}"
    );
    // recover-online held the window open until the window check had read in it (the rig's
    // CRYPTFS_HOLD_AT), rather than giving up after its 30 s.
    let hold = boot
        .lines
        .iter()
        .find(|l| l.contains("test hold ended") && l.contains("recover-online:window"))
        .unwrap_or_else(|| panic!("recover-online never reached its window hold\n{console}"));
    assert!(
        hold.contains("released=true"),
        "the window check never released recover-online's hold: {hold}\n{console}"
    );
    assert_eq!(
        window.served_wrong, 0,
        "reads around the killed run's hotzone were served wrong while recover-online worked \
         (they read differently, then as at the kill again): {window:?}\n{console}"
    );
    // The write issued right after the kill, while the hotzone device is still suspended,
    // must complete once recover-online resumed the stack.
    let probe = boot
        .marker("probe-ok after-kill 1 ")
        .unwrap_or_else(|| panic!("the write issued after the kill did not complete\n{console}"));
    let writable_s = field(probe, "centiseconds").expect("centiseconds") as f64 / 100.0;
    let after = boot.marker("after-probe suspended:").expect("after-probe");
    assert!(
        !after.contains("=1"),
        "a mapping stayed suspended: {after}\n{console}"
    );
    assert!(
        boot.saw("the stack is resumed"),
        "recover-online did not report a repair\n{console}"
    );
    let exit = assert_finished(&boot, "boot with the kill");
    assert_eq!(field(exit, "kills"), Some(1), "{exit}");
    let restarts = field(exit, "restarts").unwrap_or(0);
    assert!(restarts >= 1, "Restart= never ran cryptfs again: {exit}");
    let recovery_s = between(
        &boot,
        "online re-encryption stack is left over",
        "the stack is resumed",
    )
    .unwrap_or(f64::NAN);
    assert!(common::luks2(&disk.extract_root())
        .reencrypt_mode()
        .is_none());
    let how = boot
        .lines
        .iter()
        .find_map(|l| {
            let at = l.find("recover-online: ")?;
            Some(l[at + 16..].split(';').next()?.to_string())
        })
        .unwrap_or_default();
    let s = "sigkill mid-hotzone";
    eprintln!(
        "VM-COUNT | systemd, {s} | boots 1 | kills while suspended 1 | repairs 1 | restarts {restarts} | window reads {} | chunks compared {} | served wrong {} |",
        window.window_snapshots, window.chunks_compared, window.served_wrong
    );
    figure(s, "what recover-online did", &how);
    figure(
        s,
        "kill to the write+sync issued while the hotzone device was suspended completed (s)",
        format!("{writable_s:.1}"),
    );
    figure(
        s,
        "reads of the 24 MiB around the hotzone: at the kill, while suspended, in the window, after",
        format!(
            "1, {}, {}, 1",
            window.during_snapshots, window.window_snapshots
        ),
    );
    figure(
        s,
        "1 MiB chunks compared in the window / served wrong",
        format!("{} / {}", window.chunks_compared, window.served_wrong),
    );
    figure(
        s,
        "recover-online, first to last log line (s, host receipt)",
        format!("{recovery_s:.1}"),
    );
    figure(s, "restarts of cryptfs.service", restarts);
    figure(
        s,
        "bursts of suspended-flag polls (at most 20 s each) until one caught a suspend",
        poll_bursts,
    );
    figure(s, "scenario wall time (s)", started.elapsed().as_secs());
}

/// What the driver's window check (`window_check` in tests/vm_rig/systemd-driver.sh) read.
#[derive(Debug, Default)]
struct WindowReads {
    /// Reads taken while the hotzone device was still suspended.
    during_snapshots: usize,
    /// Reads taken after the hotzone device was resumed, before the overlay was removed.
    window_snapshots: usize,
    /// (window read, chunk) pairs compared with the reads at the kill and after.
    chunks_compared: usize,
    /// Chunks a window read saw differently from both the kill's and the last read, while
    /// those two agree: data that did not change on disk but was served wrong in between (a
    /// region mapped with the wrong key).
    served_wrong: usize,
}

fn window_reads(boot: &Boot) -> WindowReads {
    let snaps: Vec<(String, Vec<String>)> = boot
        .lines
        .iter()
        .filter_map(|l| {
            let at = l.find("CRYPTFS-VM: window-snap ")?;
            let rest = &l[at + "CRYPTFS-VM: window-snap ".len()..];
            let kind = rest.split_whitespace().next()?.to_string();
            let hashes = rest.split(" h= ").nth(1)?;
            Some((kind, hashes.split_whitespace().map(String::from).collect()))
        })
        .collect();
    fn of<'a>(
        snaps: &'a [(String, Vec<String>)],
        k: &'a str,
    ) -> impl Iterator<Item = &'a (String, Vec<String>)> + 'a {
        snaps.iter().filter(move |(kind, _)| kind == k)
    }
    let (Some((_, kill)), Some((_, after))) =
        (of(&snaps, "kill").next(), of(&snaps, "after").last())
    else {
        panic!(
            "the window check did not report its first and last reads\n{}",
            boot.console()
        );
    };
    assert_eq!(kill.len(), 24, "a read of 24 chunks expected: {kill:?}");
    assert_eq!(after.len(), 24, "a read of 24 chunks expected: {after:?}");
    let mut reads = WindowReads {
        during_snapshots: of(&snaps, "during").count(),
        ..WindowReads::default()
    };
    for (_, window) in of(&snaps, "window") {
        reads.window_snapshots += 1;
        assert_eq!(window.len(), 24, "a read of 24 chunks expected: {window:?}");
        for i in 0..24 {
            reads.chunks_compared += 1;
            if kill[i] == after[i] && window[i] != kill[i] {
                reads.served_wrong += 1;
            }
        }
    }
    reads
}
