//! The VM tier on real UEFI Secure Boot: OVMF (`OVMF_CODE_4M.secboot.fd`, Debian's snakeoil
//! keys enrolled) boots a UKI signed with the test key, and the firmware — not the test —
//! measures PCR 7. Provisioning with the firmware's PCR 7, the refusal with Secure Boot off, and
//! a real `dbx` update written from the guest (an authenticated append signed with the test KEK):
//! unplanned (the boot is refused, the recovery key opens it, `cryptfs reseal`) and planned
//! (`reseal --prepare` with PCR 7 predicted from the firmware's event log, then `--finish`).
//!
//! `cargo xtask vm` runs these after `tests/vm.rs`.

mod common;
#[path = "vm_rig/mod.rs"]
mod vm_rig;

use sha2::{Digest, Sha256};
use vm_rig::{Boot, BootOptions, Disk, Firmware, RootImage};

/// Root partition: the smallest that in-place encryption (32 MiB header room) leaves useful.
const ROOT_MIB: u64 = 96;

/// Boot partition: a reseal writes the new header backup (16 MiB after in-place encryption)
/// beside the verified old one before replacing it, which the direct tier's 32 MiB partition
/// has no room for (found here: "the header backup could not be refreshed"); 64 MiB has.
const BOOT_MIB: u64 = 64;

/// A plain-root disk with the Secure Boot tier's boot partition.
fn new_disk() -> Disk {
    Disk::with_boot_size(RootImage::Plain, ROOT_MIB, BOOT_MIB << 20)
}

/// Figures of this run, per scenario.
static FIGURES: vm_rig::Figures = std::sync::Mutex::new(Vec::new());

/// Prints a figure and rewrites `design/results/vm-secure-boot-<scenario>.md` with every figure
/// of the scenario measured in this run.
fn figure(scenario: &str, what: &str, value: impl std::fmt::Display) {
    vm_rig::record_figure(
        &FIGURES,
        "secure boot",
        "vm-secure-boot",
        &format!(
            "# VM scenario, UEFI Secure Boot: {scenario}\n\nWritten by `tests/vm_secure_boot.rs` \
             (QEMU TCG, 1 vCPU, OVMF) on its last run."
        ),
        scenario,
        what,
        value.to_string(),
    );
}

/// The figures every scenario reports: per boot, kernel start to root mounted and the wall time
/// with the firmware; boots and refusals (also as a `VM-COUNT` line); the scenario's wall time.
fn report(scenario: &str, boots: &[(&str, &Boot)], refusals: usize, started: std::time::Instant) {
    eprintln!(
        "VM-COUNT | secure boot, {scenario} | boots {} | refusals {refusals} |",
        boots.len()
    );
    figure(
        scenario,
        "boots / refused",
        format!("{} / {refusals}", boots.len()),
    );
    for (what, boot) in boots {
        if let Some(t) = boot.mounted_after() {
            figure(
                scenario,
                &format!("{what}: kernel start to root mounted (s)"),
                t,
            );
        }
        let wall = format!("{:.1}", boot.elapsed.as_secs_f64());
        figure(
            scenario,
            &format!("{what}: wall time with the firmware (s)"),
            wall,
        );
    }
    let wall = format!("{:.0}", started.elapsed().as_secs_f64());
    figure(scenario, "scenario wall time (s)", wall);
}

/// A boot through OVMF with Secure Boot enforcing and the Secure Boot tier's configuration.
fn secure_boot(extra_args: &str) -> BootOptions {
    BootOptions {
        config: "secureboot",
        firmware: Some(Firmware::SecureBoot),
        extra_args: extra_args.to_string(),
        ..BootOptions::default()
    }
}

/// The firmware's report: (SecureBoot, SetupMode, PCR 7 in lowercase hex).
fn uefi(boot: &Boot) -> (String, String, String) {
    let m = boot
        .marker("uefi ")
        .unwrap_or_else(|| panic!("no UEFI report\n{}", boot.console()));
    let field = |k: &str| {
        m.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .unwrap_or_default()
            .to_ascii_lowercase()
    };
    (field("secureboot="), field("setupmode="), field("pcr7="))
}

/// The PCR 7 value recorded in each TPM token (`cryptfs-tpm2-pcr-values`), in token order.
fn token_pcr7(disk: &Disk) -> Vec<String> {
    common::luks2(&disk.extract_root())
        .tokens
        .values()
        .filter(|t| t.kind == "systemd-tpm2")
        .map(|t| {
            t.json["cryptfs-tpm2-pcr-values"]["7"]
                .as_str()
                .unwrap_or("none")
                .to_ascii_lowercase()
        })
        .collect()
}

/// Mounted from the mapping, the userspace stage ran to its end, every file verified, and the
/// firmware enforced Secure Boot.
fn assert_healthy(boot: &Boot, what: &str) {
    let console = boot.console();
    assert!(!boot.cut, "{what}: unexpected power cut");
    assert!(boot.marker("fatal").is_none(), "{what}: fatal\n{console}");
    let (sb, setup, pcr7) = uefi(boot);
    assert_eq!(
        (sb.as_str(), setup.as_str()),
        ("1", "0"),
        "{what}\n{console}"
    );
    assert!(
        pcr7.len() == 64 && pcr7.bytes().any(|b| b != b'0'),
        "{what}: PCR 7 {pcr7:?} is not a firmware measurement\n{console}"
    );
    for m in ["files-ok-at-mount", "files-ok ", "end"] {
        assert!(boot.marker(m).is_some(), "{what}: no {m:?}\n{console}");
    }
    assert!(
        boot.marker("userspace-exit 0 ")
            .is_some_and(|m| m.ends_with("bad-reads=0")),
        "{what}: userspace stage failed or a read did not verify\n{console}"
    );
    assert_eq!(
        boot.marker("state "),
        Some("state header-backed-up"),
        "{what}\n{console}"
    );
}

/// The recovery key the first boot escrowed on the boot partition, read on the host; removed
/// from the partition afterwards so that a rescue boot can only have it from the host.
fn take_escrowed_key(disk: &Disk) -> (Vec<u8>, std::path::PathBuf) {
    let key = disk
        .read_boot_file(vm_rig::RECOVERY_ESCROW)
        .expect("the recovery key escrowed on the boot partition");
    let text = String::from_utf8_lossy(&key).trim().to_string();
    assert!(text.len() >= 40, "escrowed recovery key looks wrong");
    disk.remove_boot_file(vm_rig::RECOVERY_ESCROW);
    assert!(disk.read_boot_file(vm_rig::RECOVERY_ESCROW).is_none());
    let path = disk.dir.path().join("recovery-key-from-escrow");
    std::fs::write(&path, &key).expect("key file");
    (text.into_bytes(), path)
}

fn assert_no_secret(boot: &Boot, secret: &[u8], what: &str) {
    let secret = String::from_utf8_lossy(secret);
    let secret = secret.trim();
    assert!(secret.len() >= 40, "{what}: no recovery key to look for");
    assert!(
        !boot.console().contains(secret),
        "{what}: the recovery key appeared on the console"
    );
}

#[test]
fn vm_secure_boot_first_boot_provisions_with_the_firmware_pcr7_and_later_boots_unlock() {
    let started = std::time::Instant::now();
    let mut disk = new_disk();
    let first = disk.boot(&secure_boot(""));
    assert_healthy(&first, "first boot");
    assert!(first.saw("encrypt-in-place"), "{}", first.console());
    let (_, _, pcr7) = uefi(&first);
    assert_eq!(
        token_pcr7(&disk),
        vec![pcr7.clone()],
        "the token is not sealed to the PCR 7 the firmware measured"
    );
    let meta = common::luks2(&disk.extract_root());
    assert!(
        meta.passphrase_keyslots().is_empty(),
        "a passphrase keyslot remains"
    );
    let second = disk.boot(&secure_boot(""));
    assert_healthy(&second, "second boot");
    assert!(
        !second.saw("step starting"),
        "provisioned again\n{}",
        second.console()
    );
    assert_eq!(
        uefi(&second).2,
        pcr7,
        "PCR 7 differs between two identical boots"
    );
    let key = disk
        .read_boot_file(vm_rig::RECOVERY_ESCROW)
        .expect("recovery key escrowed");
    assert_no_secret(&first, &key, "first boot");
    assert_no_secret(&second, &key, "second boot");
    assert_eq!(disk.boots, 2);
    figure("first boot", "PCR 7 measured by OVMF", &pcr7[..16]);
    let boots = [("first boot", &first), ("second boot", &second)];
    report("first boot", &boots, 0, started);
}

#[test]
fn vm_secure_boot_off_refuses_provisioning_before_any_write() {
    let started = std::time::Instant::now();
    let mut disk = new_disk();
    let digest = disk.root_digest();
    let boot = disk.boot(&BootOptions {
        firmware: Some(Firmware::SecureBootOff),
        ..secure_boot("")
    });
    let console = boot.console();
    let (sb, setup, _) = uefi(&boot);
    assert_eq!((sb.as_str(), setup.as_str()), ("0", "1"), "{console}");
    assert!(boot.marker("fatal").is_some(), "{console}");
    assert!(
        boot.saw("UEFI Secure Boot is off") || boot.saw("UEFI Secure Boot is in setup mode"),
        "the refusal does not name Secure Boot\n{console}"
    );
    assert!(boot.marker("mounted").is_none(), "{console}");
    assert_eq!(disk.root_digest(), digest, "the root partition was written");
    assert!(
        disk.read_boot_file(vm_rig::RECOVERY_ESCROW).is_none(),
        "a recovery key was escrowed before the refusal"
    );
    report("secure boot off", &[("refused boot", &boot)], 1, started);
}

/// `EV_EFI_VARIABLE_DRIVER_CONFIG`: the firmware's measurement of a Secure Boot variable.
const EV_EFI_VARIABLE_DRIVER_CONFIG: u32 = 0x8000_0001;
const TPM_ALG_SHA256: u16 = 0x000b;

/// One event of a TCG2 (crypto-agile) event log, as far as PCR 7 needs it.
struct Event {
    pcr: u32,
    kind: u32,
    sha256: Option<[u8; 32]>,
    data: Vec<u8>,
}

fn take<'a>(bytes: &mut &'a [u8], n: usize) -> &'a [u8] {
    assert!(bytes.len() >= n, "event log truncated");
    let (head, rest) = bytes.split_at(n);
    *bytes = rest;
    head
}
fn u16_le(bytes: &mut &[u8]) -> u16 {
    u16::from_le_bytes(take(bytes, 2).try_into().expect("2 bytes"))
}
fn u32_le(bytes: &mut &[u8]) -> u32 {
    u32::from_le_bytes(take(bytes, 4).try_into().expect("4 bytes"))
}

/// Parses `binary_bios_measurements`: the SHA-1-format Spec ID event naming the banks and their
/// digest sizes, then `TCG_PCR_EVENT2` records.
fn parse_event_log(mut log: &[u8]) -> Vec<Event> {
    let b = &mut log;
    let _pcr = u32_le(b);
    let _kind = u32_le(b);
    take(b, 20);
    let size = u32_le(b) as usize;
    let mut spec = take(b, size);
    let s = &mut spec;
    assert_eq!(
        take(s, 16),
        b"Spec ID Event03\0",
        "not a crypto-agile event log"
    );
    take(s, 8);
    let banks: Vec<(u16, usize)> = (0..u32_le(s))
        .map(|_| (u16_le(s), usize::from(u16_le(s))))
        .collect();
    let mut events = Vec::new();
    while b.len() >= 12 {
        let pcr = u32_le(b);
        let kind = u32_le(b);
        let mut sha256 = None;
        for _ in 0..u32_le(b) {
            let alg = u16_le(b);
            let len = banks
                .iter()
                .find(|(a, _)| *a == alg)
                .map(|(_, l)| *l)
                .expect("digest of a bank the log did not declare");
            let digest = take(b, len);
            if alg == TPM_ALG_SHA256 {
                sha256 = Some(digest.try_into().expect("32 bytes"));
            }
        }
        let size = u32_le(b) as usize;
        let data = take(b, size).to_vec();
        events.push(Event {
            pcr,
            kind,
            sha256,
            data,
        });
    }
    events
}

/// The variable name and data of a `UEFI_VARIABLE_DATA` event (GUID, name length in UTF-16
/// units, data length, name, data).
fn variable(event: &Event) -> (String, &[u8]) {
    let mut d = event.data.as_slice();
    let b = &mut d;
    take(b, 16);
    let name_len = u64::from_le_bytes(take(b, 8).try_into().expect("8")) as usize;
    let data_len = u64::from_le_bytes(take(b, 8).try_into().expect("8")) as usize;
    let name: Vec<u16> = take(b, 2 * name_len)
        .chunks(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    (String::from_utf16_lossy(&name), take(b, data_len))
}

/// The SHA-256 PCR 7 a boot with this event log ends with, with the `dbx` measurement's data
/// replaced by `new_dbx` when given: how an OTA agent predicts PCR 7 after a `dbx` update (the
/// firmware measures the whole `UEFI_VARIABLE_DATA` of dbx; nothing else in PCR 7 changes).
/// Returns the value and the number of dbx events replaced.
fn replay_pcr7(events: &[Event], new_dbx: Option<&[u8]>) -> (String, usize) {
    let mut pcr = [0u8; 32];
    let mut replaced = 0;
    for e in events.iter().filter(|e| e.pcr == 7) {
        let mut digest = e.sha256.expect("a SHA-256 digest for every event");
        if e.kind == EV_EFI_VARIABLE_DRIVER_CONFIG {
            let (name, _) = variable(e);
            // The logged digest is of the event data: checked, so the rule below is the
            // firmware's.
            assert_eq!(
                <[u8; 32]>::from(Sha256::digest(&e.data)),
                digest,
                "the firmware's {name} measurement is not SHA-256 of its event data"
            );
            if let (Some(dbx), "dbx") = (new_dbx, name.trim_end_matches('\0')) {
                let mut data = e.data[..e.data.len() - variable(e).1.len()].to_vec();
                data[24..32].copy_from_slice(&(dbx.len() as u64).to_le_bytes());
                data.extend_from_slice(dbx);
                digest = Sha256::digest(&data).into();
                replaced += 1;
            }
        }
        pcr = Sha256::new()
            .chain_update(pcr)
            .chain_update(digest)
            .finalize()
            .into();
    }
    (hex::encode(pcr), replaced)
}

/// The firmware's `dbx` data in the event log.
fn logged_dbx(events: &[Event]) -> Vec<u8> {
    events
        .iter()
        .filter(|e| e.pcr == 7 && e.kind == EV_EFI_VARIABLE_DRIVER_CONFIG)
        .map(variable)
        .find(|(name, _)| name.trim_end_matches('\0') == "dbx")
        .map(|(_, data)| data.to_vec())
        .unwrap_or_else(|| {
            let seen: Vec<String> = events
                .iter()
                .filter(|e| e.pcr == 7)
                .map(|e| {
                    format!(
                        "{:#x} {:?}",
                        e.kind,
                        (e.kind == EV_EFI_VARIABLE_DRIVER_CONFIG).then(|| variable(e).0)
                    )
                })
                .collect();
            panic!("no dbx measurement in PCR 7: {seen:?}")
        })
}

#[test]
fn vm_dbx_update_unplanned_recovery_key_then_reseal() {
    let started = std::time::Instant::now();
    let fw = vm_rig::firmware_assets();
    let mut disk = new_disk();
    let dbx = vec![(vm_rig::FW_CFG_DBX, fw.dbx_auth.clone())];
    // Boot 1 provisions; then the update is applied from the running system.
    let first = disk.boot(&BootOptions {
        fw_cfg_files: dbx,
        ..secure_boot("cryptfs.vm.dbx_append=1")
    });
    assert_healthy(&first, "provisioning boot");
    let appended = first.marker("dbx-appended").unwrap_or_default().to_string();
    let sizes: Vec<u64> = appended
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    assert!(
        matches!(sizes.as_slice(), [a, b] if b > a),
        "dbx did not grow: {appended:?}\n{}",
        first.console()
    );
    let pcr7_before = uefi(&first).2;
    let (key, key_file) = take_escrowed_key(&disk);
    // Boot 2: the module's path is refused (PCR 7 changed), the recovery key from the escrow
    // opens the volume and `cryptfs reseal` seals to the new PCR 7.
    let rescue = disk.boot(&BootOptions {
        fw_cfg_files: vec![(vm_rig::FW_CFG_RECOVERY_KEY, key_file)],
        ..secure_boot("cryptfs.vm.rescue=1")
    });
    let console = rescue.console();
    let pcr7_after = uefi(&rescue).2;
    assert_ne!(
        pcr7_after, pcr7_before,
        "the dbx update did not change PCR 7"
    );
    let refusals = rescue
        .markers()
        .iter()
        .filter(|m| m.starts_with("refused"))
        .count();
    assert_eq!(
        refusals, 1,
        "the unattended unlock was not refused\n{console}"
    );
    assert!(
        rescue.saw("PCR 7 CHANGED"),
        "status did not show PCR 7 changed\n{console}"
    );
    for m in ["unlocked-with-recovery-key", "resealed"] {
        assert!(rescue.marker(m).is_some(), "no {m}\n{console}");
    }
    assert_healthy(&rescue, "rescue boot");
    assert_eq!(
        token_pcr7(&disk),
        vec![pcr7_after.clone()],
        "resealed to the wrong PCR 7"
    );
    // Boot 3: unattended again.
    let third = disk.boot(&secure_boot(""));
    assert_healthy(&third, "boot after the reseal");
    assert!(third.marker("refused").is_none());
    assert_eq!(uefi(&third).2, pcr7_after);
    for (b, what) in [(&first, "first"), (&rescue, "rescue"), (&third, "third")] {
        assert_no_secret(b, &key, what);
    }
    // Nor in the journal the reseal wrote on the boot partition.
    let journal = disk
        .read_boot_file("/cryptfs/journal.redb")
        .expect("the journal on the boot partition");
    assert!(
        !journal.windows(key.len()).any(|w| w == key.as_slice()),
        "the recovery key is in the journal"
    );
    assert_eq!(disk.boots, 3);
    let boots = [
        ("provisioning boot", &first),
        ("rescue boot", &rescue),
        ("boot after the reseal", &third),
    ];
    report("dbx update, unplanned", &boots, refusals, started);
}

#[test]
fn vm_dbx_update_planned_prepare_then_finish_never_stops_a_boot() {
    let started = std::time::Instant::now();
    let fw = vm_rig::firmware_assets();
    let mut disk = new_disk();
    // Boot 1 provisions and keeps the firmware's event log on the boot partition.
    let first = disk.boot(&secure_boot("cryptfs.vm.save_eventlog=1"));
    assert_healthy(&first, "provisioning boot");
    let pcr7_before = uefi(&first).2;
    let log = disk
        .read_boot_file("/eventlog.bin")
        .expect("event log saved");
    let events = parse_event_log(&log);
    // The replay must give what the TPM holds, or the prediction means nothing.
    assert_eq!(
        replay_pcr7(&events, None).0,
        pcr7_before,
        "event log replay != PCR 7"
    );
    // The update appends the ESL to dbx (the firmware keeps the old lists and adds the new).
    let mut new_dbx = logged_dbx(&events);
    new_dbx.extend(std::fs::read(&fw.dbx_esl).expect("esl"));
    let (predicted, replaced) = replay_pcr7(&events, Some(&new_dbx));
    assert_eq!(replaced, 1);
    assert_ne!(predicted, pcr7_before);
    // Boot 2: the agent prepares for the predicted PCR 7, then applies the update.
    let second = disk.boot(&BootOptions {
        fw_cfg_files: vec![(vm_rig::FW_CFG_DBX, fw.dbx_auth.clone())],
        ..secure_boot(&format!(
            "cryptfs.vm.prepare_pcr7={predicted} cryptfs.vm.dbx_append=1"
        ))
    });
    assert_healthy(&second, "update boot");
    for m in ["prepared", "dbx-appended"] {
        assert!(second.marker(m).is_some(), "no {m}\n{}", second.console());
    }
    assert_eq!(
        token_pcr7(&disk),
        vec![pcr7_before.clone(), predicted.clone()]
    );
    // Boot 3: PCR 7 as predicted, unlocked unattended by the prepared token; finish.
    let third = disk.boot(&secure_boot("cryptfs.vm.reseal_finish=1"));
    assert_healthy(&third, "boot after the update");
    assert_eq!(
        uefi(&third).2,
        predicted,
        "PCR 7 is not the predicted value"
    );
    assert!(third.marker("finished").is_some(), "{}", third.console());
    assert_eq!(token_pcr7(&disk), vec![predicted.clone()]);
    // Boot 4: unattended with the one token left.
    let fourth = disk.boot(&secure_boot(""));
    assert_healthy(&fourth, "boot after finish");
    let refusals = [&first, &second, &third, &fourth]
        .iter()
        .filter(|b| b.marker("fatal").is_some() || b.marker("refused").is_some())
        .count();
    assert_eq!((disk.boots, refusals), (4, 0));
    let s = "dbx update, planned";
    let replayed = events.iter().filter(|e| e.pcr == 7).count();
    figure(s, "PCR 7 events replayed from the firmware's log", replayed);
    let boots = [
        ("provisioning boot", &first),
        ("update boot", &second),
        ("boot after the update", &third),
        ("boot after finish", &fourth),
    ];
    report(s, &boots, refusals, started);
}
