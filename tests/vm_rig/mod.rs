//! The VM rig: real dm-crypt, a real TPM device and real reboots, under QEMU (TCG).
//!
//! Assets are made once per test binary and cached under the target directory: the Debian cloud
//! kernel (downloaded with `apt-get download`, extracted, never installed) and an initramfs
//! holding busybox, the project's `cryptfs`, e2fsprogs, b3sum, tpm2_pcrextend, the libraries
//! `ldd` finds (plus the dlopen'ed TCTI), the dm/crypto/virtio modules, the project's
//! initramfs-framework module and `init.sh`. A disk has an MBR with a boot partition (ext4,
//! label `boot`) and a root partition (label `otaroot`). The guest reports `CRYPTFS-VM:` lines
//! on the serial console.
//!
//! `BootOptions::firmware` boots through UEFI instead (OVMF with Secure Boot on or off, a signed
//! UKI on an ESP disk, per-boot arguments over fw_cfg): see [`Firmware`] and design/boot.md.

#![allow(dead_code)]

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::common;

/// Where the kernel and the initramfs are cached.
fn asset_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("vm-assets")
}

const MIB: u64 = 1024 * 1024;
/// Boot partition: offset and size in the disk image.
pub const BOOT_OFFSET: u64 = MIB;
pub const BOOT_SIZE: u64 = 32 * MIB;
/// Root partition: offset in the disk image.
pub const ROOT_OFFSET: u64 = BOOT_OFFSET + BOOT_SIZE;

/// The unit whose ExecStart= the guest runs.
const SERVICE_UNIT: &str = include_str!("../../units/cryptfs.service");
const INITRAMFS_MODULE: &str = include_str!("../../units/initramfs-framework/cryptfs");
const INIT_SH: &str = include_str!("init.sh");
/// The /init of the bench initramfs ([`bench_assets`]).
const BENCH_SH: &str = include_str!("bench.sh");
/// Row 2 of the bench, sourced by bench.sh.
const BENCH_ONLINE_SH: &str = include_str!("bench-online.sh");
/// Row 3 of the bench, sourced by bench.sh.
const BENCH_BOOT_SH: &str = include_str!("bench-boot.sh");

/// Kernel modules the guest loads (dependencies are added from modules.dep).
const MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_blk",
    "dm_mod",
    "dm_crypt",
    "xts",
    "aesni_intel",
];
/// Host programs copied into the initramfs, with their libraries.
const PROGRAMS: &[&str] = &[
    "/usr/sbin/e2fsck",
    "/usr/sbin/resize2fs",
    "/usr/bin/b3sum",
    "/usr/bin/tpm2_pcrextend",
    // The Secure Boot tier's dbx update clears the immutable flag efivarfs sets on variables.
    "/usr/bin/chattr",
];
/// Programs only the bench initramfs carries ([`bench_assets`]): fio drags in about 80 MiB of
/// libraries (Ceph, GlusterFS engines), which every other boot would load into guest RAM.
/// nice, chrt and ionice run the online row's both sides at the unit's priority (busybox has
/// no nice or chrt).
const BENCH_PROGRAMS: &[&str] = &[
    "/usr/bin/fio",
    "/usr/sbin/cryptsetup",
    "/usr/bin/nice",
    "/usr/bin/chrt",
    "/usr/bin/ionice",
    // Row 3's reference enrolls its TPM2 token with systemd 252's tool and opens with its
    // libcryptsetup plugin (BENCH_DLOPENED).
    "/usr/bin/systemd-cryptenroll",
];
/// Libraries only the bench loads with dlopen: systemd's TPM2 token plugin for the cryptsetup
/// CLI, and the TSS library systemd's TPM2 code opens besides the ones cryptfs links.
const BENCH_DLOPENED: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu/cryptsetup/libcryptsetup-token-systemd-tpm2.so",
    "/usr/lib/x86_64-linux-gnu/libtss2-rc.so.0",
];
/// Modules only a firmware boot uses (the direct boot loads none of them): QEMU's fw_cfg, which
/// carries the per-boot arguments a signed UKI's fixed command line cannot, and efivarfs.
const FIRMWARE_MODULES: &[&str] = &["qemu_fw_cfg", "efivarfs"];
/// Libraries loaded with dlopen (invisible to ldd): the TCTI for /dev/tpmrm0.
const DLOPENED: &[&str] = &["libtss2-tcti-device.so.0"];

/// The kernel image and the initramfs.
pub struct Assets {
    /// vmlinuz.
    pub kernel: PathBuf,
    /// Uncompressed newc cpio.
    pub initrd: PathBuf,
}

fn sh(program: &str, args: &[&str]) -> String {
    String::from_utf8_lossy(&common::run(program, args).stdout).into_owned()
}

fn sh_in(dir: &Path, program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The extracted kernel package: (vmlinuz, modules root, version).
fn kernel() -> (PathBuf, PathBuf, String) {
    let dir = asset_dir().join("kernel");
    let root = dir.join("root");
    let find = || -> Option<(PathBuf, PathBuf, String)> {
        let boot = std::fs::read_dir(root.join("boot")).ok()?;
        for e in boot.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(version) = name.strip_prefix("vmlinuz-") {
                if root
                    .join("lib/modules")
                    .join(version)
                    .join("modules.dep")
                    .exists()
                {
                    return Some((e.path(), root.clone(), version.to_string()));
                }
            }
        }
        None
    };
    if let Some(found) = find() {
        return found;
    }
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("kernel dir");
    // The meta package names the current kernel package; download both, install neither.
    let fetched = Command::new("apt-get")
        .args(["download", "-q", "linux-image-cloud-amd64"])
        .current_dir(&dir)
        .status()
        .is_ok_and(|s| s.success());
    if !fetched {
        // A machine whose package lists were never fetched.
        sh("apt-get", &["update", "-qq"]);
        sh_in(
            &dir,
            "apt-get",
            &["download", "-q", "linux-image-cloud-amd64"],
        );
    }
    let meta = std::fs::read_dir(&dir)
        .expect("read")
        .flatten()
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().ends_with(".deb"))
        .expect("meta package");
    let depends = sh("dpkg-deb", &["-f", &meta.display().to_string(), "Depends"]);
    let package = depends
        .split([',', ' ', '('])
        .find(|w| w.starts_with("linux-image-"))
        .expect("kernel package name")
        .to_string();
    sh_in(&dir, "apt-get", &["download", "-q", &package]);
    let deb = std::fs::read_dir(&dir)
        .expect("read")
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&package))
        })
        .expect("kernel package");
    sh(
        "dpkg-deb",
        &[
            "-x",
            &deb.display().to_string(),
            &root.display().to_string(),
        ],
    );
    let version = package.trim_start_matches("linux-image-").to_string();
    // The package has no modules.dep and the host no kmod: busybox makes it.
    sh(
        "busybox",
        &["depmod", "-b", &root.display().to_string(), &version],
    );
    find().expect("kernel extracted")
}

fn copy_into(root: &Path, host: &Path) -> PathBuf {
    // Keep the name (a soname or a multicall binary's argv[0]) but resolve the directory, so
    // the merged-/usr symlinks of the image line up.
    let dir = host
        .parent()
        .and_then(|d| d.canonicalize().ok())
        .expect("host dir");
    let name = host.file_name().expect("file name");
    let target = root
        .join(dir.strip_prefix("/").expect("absolute"))
        .join(name);
    if !target.exists() {
        std::fs::create_dir_all(target.parent().expect("parent")).expect("mkdir");
        std::fs::copy(host, &target).unwrap_or_else(|e| panic!("copy {}: {e}", host.display()));
    }
    target
}

/// Libraries of `binary` as ldd lists them (both `=> /path` and bare `/path` lines).
fn libraries(binary: &Path) -> Vec<PathBuf> {
    sh("ldd", &[&binary.display().to_string()])
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let path = match l.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next()?,
                None => l.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// Copies a program under `name` into /usr/bin of the image, with its libraries. Copied under
/// the tool's name because tpm2-tools is one multicall binary.
fn add_program(root: &Path, host: &Path, name: &str) {
    std::fs::copy(host, root.join("usr/bin").join(name)).expect("copy program");
    for lib in libraries(host) {
        copy_into(root, &lib);
    }
}

/// Figures measured by one test binary: (scenario, what, value), in the order measured.
pub type Figures = std::sync::Mutex<Vec<(String, String, String)>>;

/// Prints a figure (`VM-FIGURE | <label>, <scenario> | …`) and rewrites
/// `design/results/<prefix>-<scenario slug>.md` — `intro` (title and source), then every figure
/// of the scenario measured in this run: the README links to those files instead of typing
/// figures.
pub fn record_figure(
    figures: &Figures,
    label: &str,
    prefix: &str,
    intro: &str,
    scenario: &str,
    what: &str,
    value: String,
) {
    eprintln!("VM-FIGURE | {label}, {scenario} | {what} | {value} |");
    let mut figures = figures.lock().unwrap_or_else(|p| p.into_inner());
    figures.push((scenario.to_string(), what.to_string(), value));
    let rows: String = figures
        .iter()
        .filter(|(s, _, _)| s == scenario)
        .map(|(_, w, v)| format!("| {w} | {v} |\n"))
        .collect();
    let slug = scenario.replace(|c: char| !c.is_ascii_alphanumeric(), "-");
    common::write_result(
        &format!("{prefix}-{slug}.md"),
        &format!("{intro}\n\n| figure | value |\n|---|---|\n{rows}"),
    );
}

/// Installs the project's binary as /usr/bin/cryptfs of an image, without debug info (the
/// initramfs is loaded into guest RAM), with the libraries `ldd` finds and the dlopen'ed ones.
fn add_cryptfs(root: &Path) {
    let cryptfs = root.join("usr/bin/cryptfs");
    sh(
        "strip",
        &["-o", &cryptfs.display().to_string(), common::BIN],
    );
    for lib in libraries(Path::new(common::BIN)) {
        copy_into(root, &lib);
    }
    for lib in DLOPENED {
        let host = ["/usr/lib/x86_64-linux-gnu", "/lib/x86_64-linux-gnu"]
            .iter()
            .map(|d| Path::new(d).join(lib))
            .find(|p| p.exists())
            .unwrap_or_else(|| panic!("{lib} not installed"));
        copy_into(root, &host);
        for dep in libraries(&host) {
            copy_into(root, &dep);
        }
    }
}

/// The ExecStart= of the unit, as the guest runs it.
pub fn unit_exec_start() -> String {
    SERVICE_UNIT
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("ExecStart= in units/cryptfs.service")
        .trim()
        .to_string()
}

/// The guest's configuration. The SeaBIOS guest has no UEFI firmware, so no Secure Boot to
/// require before sealing to PCR 7 (the OVMF tier checks that). The background configuration
/// also turns on both dm-crypt workqueue flags (`[activation]`): its scenarios check that the
/// live table and the header carry them, through power cuts and online re-encryption.
fn guest_config(resume: &str) -> String {
    let activation = if resume == "background" {
        "\n[activation]\nno_read_workqueue = true\nno_write_workqueue = true\n"
    } else {
        ""
    };
    format!(
        "device = \"/dev/vda2\"\nboot_dir = \"/boot\"\nmapping_name = \"otaroot\"\n{activation}\n[kek]\n\
         kind = \"tpm2\"\n\n[kek.tpm2]\ntcti = \"device:/dev/tpmrm0\"\nrequire_secure_boot = false\n\n[reencrypt]\n\
         hotzone_size = 8388608\nresume = \"{resume}\"\n"
    )
}

/// Where a firmware boot's guest escrows its recovery key (on the boot partition: the host
/// reads it back with debugfs, as an operator reads an escrow).
pub const RECOVERY_ESCROW: &str = "/recovery.key";

/// The configuration of the Secure Boot tier (`config: "secureboot"`): the shipped defaults —
/// PCR 7 with `require_secure_boot` (default true), the boot-phase lock (default on) — plus a
/// recovery key escrowed to the boot partition.
fn secure_boot_guest_config() -> String {
    format!(
        "device = \"/dev/vda2\"\nboot_dir = \"/boot\"\nmapping_name = \"otaroot\"\n\n[kek]\n\
         kind = \"tpm2\"\n\n[kek.tpm2]\ntcti = \"device:/dev/tpmrm0\"\n\n[reencrypt]\n\
         hotzone_size = 8388608\nresume = \"initramfs\"\n\n[recovery]\nenabled = true\n\
         escrow_file = \"/boot{RECOVERY_ESCROW}\"\n"
    )
}

/// Which initramfs to build: the rig's (init.sh and the project's module) or the bench's
/// (bench.sh as /init, with [`BENCH_PROGRAMS`]).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Flavour {
    Rig,
    Bench,
}

fn build_initramfs(kernel_root: &Path, version: &str, out: &Path, flavour: Flavour) {
    let root = out.with_extension("root");
    let _ = std::fs::remove_dir_all(&root);
    for d in [
        "usr/bin",
        "usr/sbin",
        "usr/lib",
        "usr/lib64",
        "etc/cryptfs",
        "init.d",
    ] {
        std::fs::create_dir_all(root.join(d)).expect("mkdir");
    }
    for (link, to) in [
        ("bin", "usr/bin"),
        ("sbin", "usr/sbin"),
        ("lib", "usr/lib"),
        ("lib64", "usr/lib64"),
    ] {
        std::os::unix::fs::symlink(to, root.join(link)).expect("symlink");
    }
    for d in ["proc", "sys", "dev", "run", "tmp", "rootfs", "boot"] {
        std::fs::create_dir_all(root.join(d)).expect("mkdir");
    }
    // busybox and its applets (only where no real program of that name comes along).
    let busybox = root.join("usr/bin/busybox");
    std::fs::copy("/bin/busybox", &busybox).expect("busybox-static");
    add_cryptfs(&root);
    let extra: &[&str] = match flavour {
        Flavour::Rig => &[],
        Flavour::Bench => BENCH_PROGRAMS,
    };
    for p in PROGRAMS.iter().chain(extra) {
        let name = Path::new(p)
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        let host = Path::new(p).canonicalize().expect("program installed");
        add_program(&root, &host, &name);
    }
    for applet in sh("busybox", &["--list"]).lines() {
        let link = root.join("usr/bin").join(applet);
        if !link.exists() && !root.join("usr/sbin").join(applet).exists() {
            std::os::unix::fs::symlink("busybox", &link).expect("applet");
        }
    }
    // Kernel modules: the wanted ones and everything modules.dep says they need.
    let modules = kernel_root.join("lib/modules").join(version);
    let dep = std::fs::read_to_string(modules.join("modules.dep")).expect("modules.dep");
    let deps: Vec<(String, Vec<String>)> = dep
        .lines()
        .filter_map(|l| {
            let (module, rest) = l.split_once(':')?;
            Some((
                module.to_string(),
                rest.split_whitespace().map(String::from).collect(),
            ))
        })
        .collect();
    let stem = |p: &str| {
        Path::new(p)
            .file_name()
            .map(|n| {
                n.to_string_lossy()
                    .trim_end_matches(".ko")
                    .replace('-', "_")
            })
            .unwrap_or_default()
    };
    let mut wanted: BTreeSet<String> = BTreeSet::new();
    // The bench's `cryptsetup benchmark` reaches the kernel's cipher through AF_ALG.
    let bench_modules: &[&str] = match flavour {
        Flavour::Rig => &[],
        Flavour::Bench => &["algif_skcipher"],
    };
    for m in MODULES.iter().chain(FIRMWARE_MODULES).chain(bench_modules) {
        let (path, needs) = deps
            .iter()
            .find(|(p, _)| stem(p) == *m)
            .unwrap_or_else(|| panic!("module {m} not in the kernel package"));
        wanted.insert(path.clone());
        wanted.extend(needs.iter().cloned());
    }
    let guest_modules = root.join("usr/lib/modules").join(version);
    for m in &wanted {
        let target = guest_modules.join(m);
        std::fs::create_dir_all(target.parent().expect("parent")).expect("mkdir");
        std::fs::copy(modules.join(m), &target).expect("module");
    }
    sh(
        "busybox",
        &[
            "depmod",
            "-b",
            &root.join("usr").display().to_string(),
            version,
        ],
    );
    // The boot path: /init, the initramfs-framework module, configurations.
    let init = match flavour {
        Flavour::Rig => INIT_SH.replace("@EXECSTART@", &unit_exec_start()),
        Flavour::Bench => BENCH_SH.to_string(),
    };
    std::fs::write(root.join("init"), init).expect("init");
    std::fs::write(root.join("init.d/85-cryptfs"), INITRAMFS_MODULE).expect("module");
    if flavour == Flavour::Bench {
        // The CI images' well-known passphrase (public by design), for `cryptsetup open`.
        std::fs::write(root.join("etc/bench.pass"), common::CI_PASSPHRASE).expect("passphrase");
        std::fs::write(root.join("bench-online.sh"), BENCH_ONLINE_SH).expect("bench-online.sh");
        std::fs::write(root.join("bench-boot.sh"), BENCH_BOOT_SH).expect("bench-boot.sh");
        for lib in BENCH_DLOPENED {
            let host = Path::new(lib);
            assert!(host.exists(), "{lib} not installed (package systemd)");
            copy_into(&root, host);
            for dep in libraries(host) {
                copy_into(&root, &dep);
            }
        }
    }
    for (name, resume) in [("blocking", "initramfs"), ("background", "background")] {
        std::fs::write(
            root.join(format!("etc/cryptfs/{name}.toml")),
            guest_config(resume),
        )
        .expect("config");
    }
    std::fs::write(
        root.join("etc/cryptfs/secureboot.toml"),
        secure_boot_guest_config(),
    )
    .expect("config");
    sh("chmod", &["-R", "a+rX", &root.display().to_string()]);
    sh(
        "chmod",
        &[
            "+x",
            &root.join("init").display().to_string(),
            &root.join("init.d/85-cryptfs").display().to_string(),
        ],
    );
    let cpio = format!(
        "cd {} && find . | busybox cpio -o -H newc > {}",
        root.display(),
        out.display()
    );
    sh("sh", &["-c", &cpio]);
    let _ = std::fs::remove_dir_all(&root);
}

/// Where `cargo xtask deps` unpacks QEMU when apt could install it only by removing one of the
/// machine's packages (xtask/src/qemu.rs).
const PRIVATE_QEMU: &str = "/opt/cryptfs-xtask/qemu";

/// The QEMU to run: the installed package's, else the private copy with its module and
/// firmware directories named (its compiled-in paths are the package's).
pub fn qemu_command() -> Command {
    let installed = Path::new("/usr/bin/qemu-system-x86_64");
    if installed.exists() {
        return Command::new(installed);
    }
    let private = Path::new(PRIVATE_QEMU).join("usr/bin/qemu-system-x86_64");
    assert!(
        private.exists(),
        "qemu-system-x86_64 missing (neither {} nor {}): run `cargo xtask deps`",
        installed.display(),
        private.display()
    );
    let mut qemu = Command::new(private);
    qemu.env(
        "QEMU_MODULE_DIR",
        Path::new(PRIVATE_QEMU).join("usr/lib/x86_64-linux-gnu/qemu"),
    )
    .args(["-L", "/usr/share/qemu", "-L", "/usr/share/seabios"]);
    qemu
}

/// Kernel and initramfs, made once per test binary.
pub fn assets() -> &'static Assets {
    static ASSETS: OnceLock<Assets> = OnceLock::new();
    ASSETS.get_or_init(|| make_assets(Flavour::Rig))
}

/// Kernel and the bench's initramfs (tests/vm_bench.rs): bench.sh as /init, fio and the
/// cryptsetup CLI added; made once per test binary.
pub fn bench_assets() -> &'static Assets {
    static ASSETS: OnceLock<Assets> = OnceLock::new();
    ASSETS.get_or_init(|| make_assets(Flavour::Bench))
}

fn make_assets(flavour: Flavour) -> Assets {
    let started = Instant::now();
    qemu_command();
    let (kernel, kernel_root, version) = kernel();
    // Initramfs images of earlier runs (named by process id) are stale; this run's other
    // flavour is not.
    let ours = format!("-{}.cpio", std::process::id());
    if let Ok(entries) = std::fs::read_dir(asset_dir()) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("initramfs-") && !name.ends_with(&ours) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    let name = match flavour {
        Flavour::Rig => "initramfs",
        Flavour::Bench => "initramfs-bench",
    };
    let initrd = asset_dir().join(format!("{name}-{}.cpio", std::process::id()));
    build_initramfs(&kernel_root, &version, &initrd, flavour);
    eprintln!(
        "vm: kernel {version}, initramfs {} MiB, made in {:.1} s",
        std::fs::metadata(&initrd)
            .map(|m| m.len() >> 20)
            .unwrap_or(0),
        started.elapsed().as_secs_f64()
    );
    Assets { kernel, initrd }
}

/// What goes on the root partition.
pub enum RootImage {
    /// Plain ext4, label otaroot.
    Plain,
    /// LUKS2 made the reference's CI way (slot 31, well-known passphrase).
    CiLuks,
    /// The same CI image made by `cryptfs image encrypt` (PBKDF2 keyslot 31, key-origin marker).
    CryptfsCiLuks,
    /// [`RootImage::CryptfsCiLuks`] holding a Debian root with systemd as PID 1
    /// ([`systemd_root`]): the initramfs hands over with `switch_root`, systemd starts
    /// `cryptfs.service`. Made by `cryptfs image encrypt`, as a meta-cryptfs build makes it:
    /// the cryptsetup-made image's Argon2id keyslot cost each first boot about 40 s under TCG
    /// (root mounted after 66 s, now 24 s); the takeover of that image is `tests/vm.rs`'s own.
    SystemdCiLuks,
}

/// A disk image: MBR, boot partition, root partition; plus the TPM state of its device.
pub struct Disk {
    /// Working directory (disk, TPM state, partition scratch files).
    pub dir: tempfile::TempDir,
    /// The disk image.
    pub path: PathBuf,
    /// Root partition size in bytes.
    pub root_size: u64,
    /// TPM state directory (persists across boots, like a real TPM).
    pub tpm_state: PathBuf,
    /// Boots so far.
    pub boots: u32,
    /// Boot partition size in bytes ([`BOOT_SIZE`] unless made with [`Disk::with_boot_size`]).
    pub boot_size: u64,
    /// The root holds systemd ([`RootImage::SystemdCiLuks`]): boots pass `cryptfs.vm.pid1=systemd`.
    pub systemd: bool,
}

fn mbr(entries: &[(u64, u64)]) -> [u8; 512] {
    let mut mbr = [0u8; 512];
    mbr[440..444].copy_from_slice(&0x6372_7970u32.to_le_bytes());
    for (i, (start, size)) in entries.iter().enumerate() {
        let e = &mut mbr[446 + 16 * i..462 + 16 * i];
        e[1..4].copy_from_slice(&[0xfe, 0xff, 0xff]);
        e[4] = 0x83;
        e[5..8].copy_from_slice(&[0xfe, 0xff, 0xff]);
        e[8..12].copy_from_slice(&((start / 512) as u32).to_le_bytes());
        e[12..16].copy_from_slice(&((size / 512) as u32).to_le_bytes());
    }
    mbr[510] = 0x55;
    mbr[511] = 0xaa;
    mbr
}

/// Files put on the root before the first boot (`/data/before-*.bin`, `before.b3`).
pub const BEFORE_FILES: usize = 24;

impl Disk {
    /// A new disk with `root_mib` of root partition holding the "before" files.
    pub fn new(image: RootImage, root_mib: u64) -> Disk {
        Disk::with_boot_size(image, root_mib, BOOT_SIZE)
    }

    /// Where the root partition starts in the image.
    pub fn root_offset(&self) -> u64 {
        BOOT_OFFSET + self.boot_size
    }

    /// [`Disk::new`] with a boot partition of `boot_size` bytes (the root follows it).
    pub fn with_boot_size(image: RootImage, root_mib: u64, boot_size: u64) -> Disk {
        let root_offset = BOOT_OFFSET + boot_size;
        let dir = tempfile::tempdir().expect("tempdir");
        let src = dir.path().join("rootfs");
        let data = src.join("data");
        std::fs::create_dir_all(&data).expect("data dir");
        let mut manifest = String::new();
        for i in 0..BEFORE_FILES {
            let name = format!("before-{i}.bin");
            let bytes = common::random_bytes(((i % 5) + 1) * 512 * 1024);
            std::fs::write(data.join(&name), &bytes).expect("write");
            manifest.push_str(&format!("{}  {name}\n", blake3::hash(&bytes).to_hex()));
        }
        std::fs::write(data.join("before.b3"), manifest).expect("manifest");
        let root = dir.path().join("root.img");
        let systemd = matches!(image, RootImage::SystemdCiLuks);
        match image {
            RootImage::Plain => common::make_ext4(&root, root_mib, &src),
            RootImage::CiLuks => {
                common::make_ci_image(&root, root_mib, &src, common::CI_PASSPHRASE)
            }
            RootImage::CryptfsCiLuks => {
                common::make_cryptfs_ci_image(&root, root_mib, &src, common::CI_PASSPHRASE);
            }
            RootImage::SystemdCiLuks => {
                systemd_root(&src);
                common::make_cryptfs_ci_image(&root, root_mib, &src, common::CI_PASSPHRASE);
            }
        }
        let boot = dir.path().join("boot.img");
        std::fs::File::create(&boot)
            .and_then(|f| f.set_len(boot_size))
            .expect("boot image");
        sh(
            "mkfs.ext4",
            &["-q", "-F", "-L", "boot", &boot.display().to_string()],
        );
        let root_size = root_mib * MIB;
        let path = dir.path().join("disk.img");
        {
            let mut disk = std::fs::File::create(&path).expect("disk");
            disk.write_all(&mbr(&[(BOOT_OFFSET, boot_size), (root_offset, root_size)]))
                .expect("mbr");
            disk.set_len(root_offset + root_size).expect("size");
            disk.seek(SeekFrom::Start(BOOT_OFFSET)).expect("seek");
            disk.write_all(&std::fs::read(&boot).expect("boot"))
                .expect("boot");
            disk.seek(SeekFrom::Start(root_offset)).expect("seek");
            disk.write_all(&std::fs::read(&root).expect("root"))
                .expect("root");
        }
        let _ = std::fs::remove_file(&root);
        let _ = std::fs::remove_file(&boot);
        let _ = std::fs::remove_dir_all(&src);
        let tpm_state = dir.path().join("tpm");
        std::fs::create_dir_all(&tpm_state).expect("tpm dir");
        sh(
            "swtpm_setup",
            &[
                "--tpm2",
                "--tpmstate",
                &tpm_state.display().to_string(),
                "--createek",
                "--overwrite",
            ],
        );
        // libtpms' default dictionary-attack parameters (3 tries, 1000 s to heal one): the
        // power-cut scenarios cut more often than that while the KEK is in use, so a DA leak in
        // cryptfs' TPM use locks the TPM out and fails them (design/README.md, "power cuts").
        Disk {
            dir,
            path,
            root_size,
            tpm_state,
            boots: 0,
            boot_size,
            systemd,
        }
    }

    /// The bytes of the root partition.
    pub fn root_bytes(&self) -> Vec<u8> {
        let mut f = std::fs::File::open(&self.path).expect("disk");
        f.seek(SeekFrom::Start(self.root_offset())).expect("seek");
        let mut buf = vec![0u8; self.root_size as usize];
        f.read_exact(&mut buf).expect("read root");
        buf
    }

    /// blake3 of the root partition.
    pub fn root_digest(&self) -> String {
        blake3::hash(&self.root_bytes()).to_hex().to_string()
    }

    /// Copies the root partition to a file (host-side LUKS2 inspection).
    pub fn extract_root(&self) -> PathBuf {
        let out = self.dir.path().join("root-extracted.img");
        std::fs::write(&out, self.root_bytes()).expect("extract");
        out
    }

    /// Overwrites `bytes` at `offset` of the root partition.
    pub fn write_root(&self, offset: u64, bytes: &[u8]) {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&self.path)
            .expect("disk");
        f.seek(SeekFrom::Start(self.root_offset() + offset))
            .expect("seek");
        f.write_all(bytes).expect("write");
        f.sync_all().expect("sync");
    }

    /// Runs `f` on the boot partition as a file (e2fsprogs work), then writes it back.
    pub fn with_boot_partition(&self, f: impl FnOnce(&Path)) {
        let part = self.dir.path().join("boot-extracted.img");
        let mut disk = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.path)
            .expect("disk");
        let mut buf = vec![0u8; self.boot_size as usize];
        disk.seek(SeekFrom::Start(BOOT_OFFSET)).expect("seek");
        disk.read_exact(&mut buf).expect("read");
        std::fs::write(&part, &buf).expect("write");
        f(&part);
        let buf = std::fs::read(&part).expect("read back");
        disk.seek(SeekFrom::Start(BOOT_OFFSET)).expect("seek");
        disk.write_all(&buf).expect("write back");
        disk.sync_all().expect("sync");
    }

    /// Boots the disk once.
    pub fn boot(&mut self, opts: &BootOptions) -> Boot {
        self.boots += 1;
        boot(self, opts)
    }
}

/// How to boot.
pub struct BootOptions {
    /// `blocking` or `background` (the guest configuration to use).
    pub config: &'static str,
    /// Attach the TPM device.
    pub tpm: bool,
    /// Extend PCR 7 in the guest before cryptfs runs.
    pub extend_pcr7: bool,
    /// Kill QEMU (power cut) `cut_delay` after the first console line for which this returns
    /// true.
    pub cut_when: Option<fn(&str) -> bool>,
    /// See `cut_when`: a delay lands the cut inside the work that follows the line.
    pub cut_delay: Duration,
    /// When set, replaces `cut_delay` with a delay measured on the guest: the first two matching
    /// lines only time the interval between them, and the cut lands this fraction of that
    /// interval after the third (for progress lines: that far into the next hotzone, whatever
    /// the host's load makes a hotzone take; the interval before the first line, a resume's
    /// set-up, is not timed).
    pub cut_fraction: Option<f64>,
    /// Stop the userspace service (SIGTERM) this many seconds after it started, then start it
    /// again, as a restart does.
    pub restart_service_after: Option<u32>,
    /// Give QEMU this file as the disk instead of the disk's image (the write log's FUSE file,
    /// tests/writelog): same bytes, every write and flush of the guest logged. `None`: the image.
    pub drive: Option<PathBuf>,
    /// Boot through UEFI firmware (OVMF) and a signed UKI instead of QEMU's direct kernel boot.
    pub firmware: Option<Firmware>,
    /// More `cryptfs.vm.*` arguments for init.sh (space-separated `key=value`).
    pub extra_args: String,
    /// A longer boot budget than the default 420 s (a scenario that repairs and restarts).
    pub timeout: Option<Duration>,
    /// Files handed to the guest over fw_cfg (firmware boots): (name, host file).
    pub fw_cfg_files: Vec<(&'static str, PathBuf)>,
    /// Boot the bench's initramfs ([`bench_assets`]) instead of the rig's.
    pub bench: bool,
    /// More virtio disks after the first (`/dev/vdb`, `/dev/vdc`, ...), raw image files.
    pub extra_drives: Vec<PathBuf>,
    /// Guest RAM in MiB (the bench's initramfs needs more than the rig's 512).
    pub memory_mib: u32,
}

impl Default for BootOptions {
    fn default() -> Self {
        BootOptions {
            config: "blocking",
            tpm: true,
            extend_pcr7: false,
            cut_when: None,
            cut_delay: Duration::ZERO,
            cut_fraction: None,
            restart_service_after: None,
            drive: None,
            firmware: None,
            extra_args: String::new(),
            timeout: None,
            fw_cfg_files: Vec::new(),
            bench: false,
            extra_drives: Vec::new(),
            memory_mib: 512,
        }
    }
}

/// What one boot printed.
pub struct Boot {
    /// The serial console, line by line.
    pub lines: Vec<String>,
    /// Whether the host cut the power.
    pub cut: bool,
    /// Wall time of the boot.
    pub elapsed: Duration,
    /// When the host received each line of `lines` (to place console events among the write
    /// log's flushes).
    pub line_times: Vec<Instant>,
}

impl Boot {
    /// `CRYPTFS-VM:` marker payloads.
    pub fn markers(&self) -> Vec<&str> {
        self.lines
            .iter()
            .filter_map(|l| l.split_once("CRYPTFS-VM: ").map(|(_, m)| m.trim()))
            .collect()
    }

    /// The payload of the first marker starting with `prefix`.
    pub fn marker(&self, prefix: &str) -> Option<&str> {
        self.markers().into_iter().find(|m| m.starts_with(prefix))
    }

    /// Whether any console line contains `needle`.
    pub fn saw(&self, needle: &str) -> bool {
        self.lines.iter().any(|l| l.contains(needle))
    }

    /// The whole console, for assertion messages.
    pub fn console(&self) -> String {
        self.lines.join("\n")
    }

    /// Seconds from kernel start to the root mounted from the mapping.
    pub fn mounted_after(&self) -> Option<f64> {
        self.marker("mounted uptime=")?
            .trim_start_matches("mounted uptime=")
            .parse()
            .ok()
    }

    /// The last re-encryption rate cryptfs printed (MiB/s), for `step`.
    pub fn rate(&self, step: &str) -> Option<f64> {
        self.lines
            .iter()
            .rev()
            .find(|l| l.contains(&format!("cryptfs: {step}:")) && l.contains("MiB/s"))
            .and_then(|l| {
                l.rsplit_once(", ")?
                    .1
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            })
    }
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const BOOT_TIMEOUT: Duration = Duration::from_secs(420);

fn boot(disk: &Disk, opts: &BootOptions) -> Boot {
    let assets = if opts.bench { bench_assets() } else { assets() };
    let started = Instant::now();
    let mut swtpm = None;
    let sock = disk.tpm_state.join("swtpm-sock");
    if opts.tpm {
        let _ = std::fs::remove_file(&sock);
        let child = Command::new("swtpm")
            .args([
                "socket",
                "--tpm2",
                "--tpmstate",
                &format!("dir={}", disk.tpm_state.display()),
                "--ctrl",
                &format!("type=unixio,path={}", sock.display()),
                "--terminate",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("swtpm");
        swtpm = Some(KillOnDrop(child));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !sock.exists() {
            assert!(Instant::now() < deadline, "swtpm socket did not appear");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let mut append = format!(
        "console=ttyS0 panic=-1 quiet cryptfs.vm.boot={} cryptfs.vm.config={} cryptfs.vm.extend_pcr7={} \
         cryptfs.vm.debug={}{}",
        disk.boots,
        opts.config,
        u8::from(opts.extend_pcr7),
        u8::from(std::env::var_os("CRYPTFS_VM_DEBUG").is_some()),
        opts.restart_service_after
            .map(|s| format!(" cryptfs.vm.restart_after={s}"))
            .unwrap_or_default()
    );
    if disk.systemd {
        append.push_str(" cryptfs.vm.pid1=systemd");
    }
    if !opts.extra_args.is_empty() {
        append.push(' ');
        append.push_str(&opts.extra_args);
    }
    let memory = opts.memory_mib.to_string();
    let mut args: Vec<String> = [
        "-accel",
        "tcg",
        "-cpu",
        "max",
        "-smp",
        "1",
        "-m",
        &memory,
        "-nographic",
        "-no-reboot",
        "-nodefaults",
        "-serial",
        "stdio",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    match opts.firmware {
        None => args.extend([
            "-kernel".into(),
            assets.kernel.display().to_string(),
            "-initrd".into(),
            assets.initrd.display().to_string(),
            "-append".into(),
            append,
        ]),
        Some(firmware) => args.extend(firmware_args(disk, opts, firmware, &append)),
    }
    args.extend([
        "-drive".into(),
        format!(
            "file={},format=raw,if=virtio,cache=writeback",
            opts.drive.as_deref().unwrap_or(&disk.path).display()
        ),
    ]);
    for extra in &opts.extra_drives {
        args.extend([
            "-drive".into(),
            format!(
                "file={},format=raw,if=virtio,cache=writeback",
                extra.display()
            ),
        ]);
    }
    if opts.tpm {
        args.extend([
            "-chardev".into(),
            format!("socket,id=chrtpm,path={}", sock.display()),
            "-tpmdev".into(),
            "emulator,id=tpm0,chardev=chrtpm".into(),
            "-device".into(),
            "tpm-tis,tpmdev=tpm0".into(),
        ]);
    }
    let mut qemu = KillOnDrop(
        qemu_command()
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("qemu-system-x86_64"),
    );
    let stdout = qemu.0.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let tag = disk
        .dir
        .path()
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut lines = Vec::new();
    let mut line_times = Vec::new();
    let mut cut = false;
    let mut cut_at: Option<Instant> = None;
    let mut matches: Vec<Instant> = Vec::new();
    loop {
        let now = Instant::now();
        if cut_at.is_some_and(|t| now >= t) {
            // Power cut: the guest gets no chance to flush anything.
            let _ = qemu.0.kill();
            cut = true;
            break;
        }
        let budget = opts.timeout.unwrap_or(BOOT_TIMEOUT);
        let remaining = budget.saturating_sub(started.elapsed());
        assert!(
            !remaining.is_zero(),
            "VM boot timed out after {budget:?}:\n{}",
            lines.join("\n")
        );
        let wait = cut_at.map_or(remaining, |t| {
            remaining.min(t.saturating_duration_since(now))
        });
        match rx.recv_timeout(wait) {
            Ok(line) => {
                let line = line.trim_end_matches('\r').to_string();
                eprintln!("[vm {tag}#{}] {line}", disk.boots);
                if cut_at.is_none() && opts.cut_when.is_some_and(|f| f(&line)) {
                    let now = Instant::now();
                    matches.push(now);
                    cut_at = match (opts.cut_fraction, matches.as_slice()) {
                        (None, _) => Some(now + opts.cut_delay),
                        (Some(fraction), [first, second, _]) => {
                            Some(now + (*second - *first).mul_f64(fraction))
                        }
                        (Some(_), _) => None,
                    };
                }
                lines.push(line);
                line_times.push(Instant::now());
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
        }
    }
    let status = qemu.0.wait().expect("qemu wait");
    let _ = reader.join();
    if !cut {
        let mut err = String::new();
        if let Some(mut e) = qemu.0.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        assert!(status.success(), "qemu failed ({status}): {err}");
    }
    drop(swtpm);
    Boot {
        lines,
        cut,
        elapsed: started.elapsed(),
        line_times,
    }
}

/// UEFI firmware for a boot (OVMF under QEMU, `q35` with SMM): the firmware, not the test,
/// measures PCR 7.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Firmware {
    /// `OVMF_CODE_4M.secboot.fd` with a copy of `OVMF_VARS_4M.snakeoil.fd` (PK, KEK and db hold
    /// Debian's test key): Secure Boot enforcing, the UKI signed with that key.
    SecureBoot,
    /// The same code with a copy of the plain `OVMF_VARS_4M.fd`: no keys, setup mode, Secure
    /// Boot off.
    SecureBootOff,
}

/// Where Debian's `ovmf` package puts the firmware and its test key.
const OVMF_DIR: &str = "/usr/share/OVMF";
const OVMF_KEY_DIR: &str = "/usr/share/ovmf";
/// systemd 252's UEFI stub (package `systemd-boot-efi`).
const UKI_STUB: &str = "/usr/lib/systemd/boot/efi/linuxx64.efi.stub";
/// The UKI's fixed command line: per-boot arguments come over fw_cfg (`opt/cryptfs/args`).
/// `no_timer_check`: under a loaded TCG host the kernel's IO-APIC timer check can fail and panic.
const UKI_CMDLINE: &str = "console=ttyS0 panic=-1 quiet no_timer_check";
/// The EFI image-security-database GUID, part of the `dbx` variable's efivarfs name.
pub const EFI_IMAGE_SECURITY_GUID: &str = "d719b2cb-3d3a-4596-a3bc-dad00e67656f";
/// fw_cfg names the guest reads (`/sys/firmware/qemu_fw_cfg/by_name/<name>/raw`).
pub const FW_CFG_ARGS: &str = "opt/cryptfs/args";
/// The recovery key the host hands to a rescue boot.
pub const FW_CFG_RECOVERY_KEY: &str = "opt/cryptfs/recovery-key";
/// The authenticated `dbx` append a boot with `cryptfs.vm.dbx_append=1` writes.
pub const FW_CFG_DBX: &str = "opt/cryptfs/dbx";

/// The firmware tier's assets: the signed UKI on an ESP image, the firmware, the test key and a
/// real `dbx` update signed with it.
pub struct FirmwareAssets {
    /// FAT image holding `/EFI/BOOT/BOOTX64.EFI` (the signed UKI), attached read-only.
    pub esp: PathBuf,
    /// `OVMF_CODE_4M.secboot.fd`.
    pub code: PathBuf,
    /// The EFI signature list appended to `dbx` (a throwaway certificate).
    pub dbx_esl: PathBuf,
    /// `dbx_esl` as an authenticated append, signed with the snakeoil KEK.
    pub dbx_auth: PathBuf,
}

/// Runs a host tool the firmware tier needs, with a message naming the package when missing.
fn tool(program: &str, args: &[&str]) -> String {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "{program} missing: the Secure Boot tier needs ovmf, sbsigntool, mtools, dosfstools, \
         efitools, systemd-boot-efi (`cargo xtask deps`)"
    );
    sh(program, args)
}

/// The UKI (kernel, the rig's initramfs gzipped, the fixed command line) signed with the
/// snakeoil key, on an ESP image; the dbx update. Made once per test binary.
pub fn firmware_assets() -> &'static FirmwareAssets {
    static FW: OnceLock<FirmwareAssets> = OnceLock::new();
    FW.get_or_init(|| {
        let started = Instant::now();
        let assets = assets();
        for f in [
            Path::new(OVMF_DIR).join("OVMF_CODE_4M.secboot.fd"),
            Path::new(OVMF_DIR).join("OVMF_VARS_4M.snakeoil.fd"),
            Path::new(OVMF_DIR).join("OVMF_VARS_4M.fd"),
            Path::new(UKI_STUB).to_path_buf(),
        ] {
            assert!(
                f.exists(),
                "{} missing: install ovmf and systemd-boot-efi (`cargo xtask deps`)",
                f.display()
            );
        }
        // Made from this binary's initramfs: those of earlier runs are stale.
        if let Ok(entries) = std::fs::read_dir(asset_dir()) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with("firmware-") {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let dir = asset_dir().join(format!("firmware-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("firmware dir");
        let p = |name: &str| dir.join(name).display().to_string();
        // The test key, decrypted (its passphrase is public: it is Debian's test key).
        tool(
            "openssl",
            &[
                "pkey",
                "-passin",
                "pass:snakeoil",
                "-in",
                &format!("{OVMF_KEY_DIR}/PkKek-1-snakeoil.key"),
                "-out",
                &p("db.key"),
            ],
        );
        let cert = format!("{OVMF_KEY_DIR}/PkKek-1-snakeoil.pem");
        // The UKI: systemd-stub with the sections at the addresses systemd 252's ukify uses.
        let initrd_gz = dir.join("initrd.gz");
        sh(
            "sh",
            &[
                "-c",
                &format!(
                    "gzip -1 -c {} > {}",
                    assets.initrd.display(),
                    initrd_gz.display()
                ),
            ],
        );
        std::fs::write(
            dir.join("osrel"),
            "ID=cryptfs-vm\nNAME=\"cryptfs VM tier\"\n",
        )
        .expect("osrel");
        std::fs::write(dir.join("cmdline"), UKI_CMDLINE).expect("cmdline");
        tool(
            "objcopy",
            &[
                "--add-section",
                &format!(".osrel={}", p("osrel")),
                "--change-section-vma",
                ".osrel=0x20000",
                "--add-section",
                &format!(".cmdline={}", p("cmdline")),
                "--change-section-vma",
                ".cmdline=0x30000",
                "--add-section",
                &format!(".linux={}", assets.kernel.display()),
                "--change-section-vma",
                ".linux=0x2000000",
                "--add-section",
                &format!(".initrd={}", initrd_gz.display()),
                "--change-section-vma",
                ".initrd=0x3000000",
                UKI_STUB,
                &p("uki.efi"),
            ],
        );
        tool(
            "sbsign",
            &[
                "--key",
                &p("db.key"),
                "--cert",
                &cert,
                "--output",
                &p("uki.signed.efi"),
                &p("uki.efi"),
            ],
        );
        // The ESP, made without mounting.
        let uki_len = std::fs::metadata(dir.join("uki.signed.efi"))
            .expect("uki")
            .len();
        let esp = dir.join("esp.img");
        std::fs::File::create(&esp)
            .and_then(|f| f.set_len((uki_len / MIB + 8) * MIB))
            .expect("esp");
        tool("mkfs.vfat", &["-n", "ESP", &esp.display().to_string()]);
        let esp_s = esp.display().to_string();
        tool("mmd", &["-i", &esp_s, "::/EFI", "::/EFI/BOOT"]);
        tool(
            "mcopy",
            &[
                "-i",
                &esp_s,
                &p("uki.signed.efi"),
                "::/EFI/BOOT/BOOTX64.EFI",
            ],
        );
        // A real dbx update: a throwaway certificate as an EFI signature list, an authenticated
        // append signed with the KEK (the snakeoil key is PK and KEK).
        tool(
            "openssl",
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                "/CN=cryptfs VM tier revoked test certificate/",
                "-days",
                "3650",
                "-keyout",
                &p("revoked.key"),
                "-out",
                &p("revoked.crt"),
            ],
        );
        tool(
            "cert-to-efi-sig-list",
            &[
                "-g",
                "3c5c61b4-2fb2-4b6b-9a3e-6f1a8d2b7c01",
                &p("revoked.crt"),
                &p("revoked.esl"),
            ],
        );
        tool(
            "sign-efi-sig-list",
            &[
                "-a",
                "-k",
                &p("db.key"),
                "-c",
                &cert,
                "dbx",
                &p("revoked.esl"),
                &p("revoked.auth"),
            ],
        );
        let _ = std::fs::remove_file(dir.join("uki.efi"));
        let _ = std::fs::remove_file(dir.join("uki.signed.efi"));
        let _ = std::fs::remove_file(&initrd_gz);
        eprintln!(
            "vm: signed UKI {} MiB on the ESP, dbx update made, in {:.1} s",
            uki_len >> 20,
            started.elapsed().as_secs_f64()
        );
        FirmwareAssets {
            esp,
            code: Path::new(OVMF_DIR).join("OVMF_CODE_4M.secboot.fd"),
            dbx_esl: dir.join("revoked.esl"),
            dbx_auth: dir.join("revoked.auth"),
        }
    })
}

impl Disk {
    /// The machine's NVRAM for `firmware` (a copy of the vars template made at its first boot,
    /// kept with the disk like a board's flash).
    pub fn nvram(&self, firmware: Firmware) -> PathBuf {
        let (name, template) = match firmware {
            Firmware::SecureBoot => ("nvram-secboot.fd", "OVMF_VARS_4M.snakeoil.fd"),
            Firmware::SecureBootOff => ("nvram-plain.fd", "OVMF_VARS_4M.fd"),
        };
        let path = self.dir.path().join(name);
        if !path.exists() {
            std::fs::copy(Path::new(OVMF_DIR).join(template), &path).expect("vars template");
        }
        path
    }

    /// Reads a file of the boot partition (ext4) on the host, if it is there.
    pub fn read_boot_file(&self, name: &str) -> Option<Vec<u8>> {
        let out = self.dir.path().join("boot-file.out");
        let _ = std::fs::remove_file(&out);
        let mut found = None;
        self.with_boot_partition(|part| {
            let _ = Command::new("debugfs")
                .args([
                    "-R",
                    &format!("dump {name} {}", out.display()),
                    &part.display().to_string(),
                ])
                .output();
            found = std::fs::read(&out).ok();
        });
        let _ = std::fs::remove_file(&out);
        found
    }

    /// Deletes a file of the boot partition on the host.
    pub fn remove_boot_file(&self, name: &str) {
        self.with_boot_partition(|part| {
            common::run(
                "debugfs",
                &[
                    "-w",
                    "-R",
                    &format!("rm {name}"),
                    &part.display().to_string(),
                ],
            );
        });
    }
}

/// QEMU arguments of a firmware boot: q35 with SMM (OVMF's variable store is SMM-protected),
/// the code read-only and the NVRAM writable as pflash, the ESP as a second virtio disk that the
/// firmware boots first (`vda` stays the system disk: the ESP sits in a later PCI slot), and
/// the per-boot arguments and files over fw_cfg.
fn firmware_args(disk: &Disk, opts: &BootOptions, firmware: Firmware, append: &str) -> Vec<String> {
    let fw = firmware_assets();
    let mut args: Vec<String> = vec![
        "-machine".into(),
        "q35,smm=on".into(),
        "-global".into(),
        "driver=cfi.pflash01,property=secure,value=on".into(),
        "-drive".into(),
        format!(
            "if=pflash,format=raw,unit=0,readonly=on,file={}",
            fw.code.display()
        ),
        "-drive".into(),
        format!(
            "if=pflash,format=raw,unit=1,file={}",
            disk.nvram(firmware).display()
        ),
        "-drive".into(),
        format!(
            "file={},format=raw,if=none,id=esp,readonly=on",
            fw.esp.display()
        ),
        "-device".into(),
        "virtio-blk-pci,drive=esp,bootindex=0,addr=0x10".into(),
        "-fw_cfg".into(),
        format!("name={FW_CFG_ARGS},string={append}"),
    ];
    for (name, file) in &opts.fw_cfg_files {
        args.extend([
            "-fw_cfg".into(),
            format!("name={name},file={}", file.display()),
        ]);
    }
    args
}

/// Debian packages of the systemd root: systemd as PID 1, udev (which also handles the dm
/// devices libcryptsetup makes during online re-encryption: `dmsetup` brings the rules that
/// complete libdevmapper's udev synchronisation), e2fsprogs (resize2fs of the mounted root),
/// and libcryptsetup as Debian ships it. The TPM libraries come from the host with `ldd`, as
/// for the initramfs.
const SYSTEMD_ROOT_PACKAGES: &str = "systemd-sysv,udev,e2fsprogs,dmsetup,libcryptsetup12";
/// What the root tarball leaves out (documentation, translations, udev's hardware database
/// sources): the root partition stays small, re-encryption short.
const SYSTEMD_ROOT_PATH_EXCLUDES: &[&str] = &[
    "/usr/share/doc/*",
    "/usr/share/man/*",
    "/usr/share/locale/*",
    "/usr/share/info/*",
    "/usr/lib/udev/hwdb.d/*",
];
/// What the root partition leaves out of the tarball: what only installing packages needs (perl
/// for usrmerge's scripts, apt's lists and cache), iconv modules and udev's compiled hardware
/// database; nothing at boot uses them.
const SYSTEMD_ROOT_TAR_EXCLUDES: &[&str] = &[
    "./usr/share/perl",
    "./usr/lib/x86_64-linux-gnu/perl",
    "./usr/lib/x86_64-linux-gnu/gconv",
    "./usr/lib/udev/hwdb.bin",
    "./var/cache/apt/*",
    "./var/lib/apt/lists/*",
];
/// The test driver of the systemd tier (a unit of the rig, not of the product).
const SYSTEMD_DRIVER: &str = include_str!("systemd-driver.sh");
const GENERATOR: &str = include_str!("../../units/cryptfs-generator");

/// The Debian root tarball (mmdebstrap from the machine's own apt sources), cached under the
/// target directory between runs and named by its package list, so a change rebuilds it.
fn systemd_root_tarball() -> &'static Path {
    static TARBALL: OnceLock<PathBuf> = OnceLock::new();
    TARBALL.get_or_init(|| {
        let key = blake3::hash(
            format!("{SYSTEMD_ROOT_PACKAGES}|{}", SYSTEMD_ROOT_PATH_EXCLUDES.join("|")).as_bytes(),
        )
        .to_hex()
        .to_string();
        let tarball = asset_dir().join(format!("systemd-root-{}.tar", &key[..16]));
        if tarball.exists() {
            return tarball;
        }
        let found = Command::new("sh")
            .args(["-c", "command -v mmdebstrap"])
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            found,
            "mmdebstrap missing: the systemd VM tier builds its Debian root with it (`cargo xtask deps`)"
        );
        std::fs::create_dir_all(asset_dir()).expect("asset dir");
        let started = Instant::now();
        let partial = tarball.with_extension("partial.tar");
        let mut args = vec![
            "--variant=minbase".to_string(),
            "--format=tar".to_string(),
            format!("--include={SYSTEMD_ROOT_PACKAGES}"),
        ];
        for p in SYSTEMD_ROOT_PATH_EXCLUDES {
            args.push(format!("--dpkgopt=path-exclude={p}"));
        }
        args.extend([
            "bookworm".to_string(),
            partial.display().to_string(),
            "-".to_string(),
        ]);
        // The machine's own apt sources on standard input: no mirror is named here.
        let sources = std::fs::File::open("/etc/apt/sources.list.d/debian.sources")
            .or_else(|_| std::fs::File::open("/etc/apt/sources.list"))
            .expect("apt sources");
        let out = Command::new("mmdebstrap")
            .args(&args)
            .stdin(sources)
            .output()
            .expect("mmdebstrap");
        assert!(
            out.status.success(),
            "mmdebstrap failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::rename(&partial, &tarball).expect("tarball");
        eprintln!(
            "vm: systemd root tarball {} MiB made in {:.1} s",
            std::fs::metadata(&tarball).map(|m| m.len() >> 20).unwrap_or(0),
            started.elapsed().as_secs_f64()
        );
        tarball
    })
}

/// Fills `root` with the Debian root with systemd and what the product installs into it:
/// `/usr/bin/cryptfs` (the initramfs's binary) with its libraries, `cryptfs.service` enabled in
/// multi-user.target, `cryptfs-generator`, an fstab mounting the boot partition on /boot (the
/// unit's `RequiresMountsFor=`). The configuration is copied in by init.sh at each boot (the
/// one it used). The rig adds its driver units (`systemd-driver.sh`), journald forwarding to
/// the serial console, a machine id (no first-boot prompts), no gettys, and one test-only
/// drop-in: `RestartSec=2s` instead of the shipped 2 minutes (design/boot.md).
pub fn systemd_root(root: &Path) {
    std::fs::create_dir_all(root).expect("root dir");
    let mut tar = vec!["-C".to_string(), root.display().to_string()];
    tar.extend(
        SYSTEMD_ROOT_TAR_EXCLUDES
            .iter()
            .map(|e| format!("--exclude={e}")),
    );
    tar.extend([
        "-xf".to_string(),
        systemd_root_tarball().display().to_string(),
    ]);
    sh("tar", &tar.iter().map(String::as_str).collect::<Vec<_>>());
    add_cryptfs(root);
    add_program(
        root,
        &Path::new("/usr/bin/b3sum").canonicalize().expect("b3sum"),
        "b3sum",
    );
    let write = |path: &str, text: &str, mode: u32| {
        let p = root.join(path);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(&p, text).expect("write");
        sh("chmod", &[&format!("{mode:o}"), &p.display().to_string()]);
    };
    let link = |path: &str, to: &str| {
        let p = root.join(path);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        let _ = std::fs::remove_file(&p);
        std::os::unix::fs::symlink(to, &p).expect("symlink");
    };
    // The product's part.
    write(
        "usr/lib/systemd/system/cryptfs.service",
        SERVICE_UNIT,
        0o644,
    );
    link(
        "etc/systemd/system/multi-user.target.wants/cryptfs.service",
        "/usr/lib/systemd/system/cryptfs.service",
    );
    write(
        "usr/lib/systemd/system-generators/cryptfs-generator",
        GENERATOR,
        0o755,
    );
    std::fs::create_dir_all(root.join("etc/cryptfs")).expect("mkdir");
    std::fs::create_dir_all(root.join("boot")).expect("mkdir");
    write("etc/fstab", "LABEL=boot /boot ext4 defaults 0 0\n", 0o644);
    // The rig's part.
    write(
        "etc/systemd/system/cryptfs.service.d/90-vm-test.conf",
        "# VM tier only: restart after a kill within the test's budget (shipped: 2min).\n\
         [Service]\nRestartSec=2s\n\
         # recover-online waits in the window after the hotzone's resume until the driver's\n\
         # window check has read the regions around it there (failpoint::hold).\n\
         Environment=CRYPTFS_HOLD_AT=recover-online:window\n\
         Environment=CRYPTFS_HOLD_UNTIL=/run/cryptfs-vm-window-read\n",
        0o644,
    );
    write("usr/local/sbin/cryptfs-vm-driver", SYSTEMD_DRIVER, 0o755);
    write(
        "etc/systemd/system/cryptfs-vm-driver.service",
        "[Unit]\nDescription=cryptfs VM tier: workload and scenario driver\n\
         After=cryptfs.service\n\n[Service]\nType=exec\n\
         ExecStart=/usr/local/sbin/cryptfs-vm-driver run\n\n[Install]\nWantedBy=multi-user.target\n",
        0o644,
    );
    link(
        "etc/systemd/system/multi-user.target.wants/cryptfs-vm-driver.service",
        "/etc/systemd/system/cryptfs-vm-driver.service",
    );
    // Stopped after cryptfs.service at shutdown (stop order is the reverse of start order):
    // reports how the unit ended once it has.
    write(
        "etc/systemd/system/cryptfs-vm-witness.service",
        "[Unit]\nDescription=cryptfs VM tier: reports how cryptfs.service stopped\n\
         Before=cryptfs.service\n\n[Service]\nType=oneshot\nRemainAfterExit=yes\n\
         ExecStart=/bin/true\nExecStop=/usr/local/sbin/cryptfs-vm-driver stopped\n\n\
         [Install]\nWantedBy=multi-user.target\n",
        0o644,
    );
    link(
        "etc/systemd/system/multi-user.target.wants/cryptfs-vm-witness.service",
        "/etc/systemd/system/cryptfs-vm-witness.service",
    );
    write(
        "etc/systemd/journald.conf.d/90-vm.conf",
        "[Journal]\nStorage=volatile\nForwardToConsole=yes\nMaxLevelConsole=info\n",
        0o644,
    );
    for getty in ["serial-getty@ttyS0.service", "getty@tty1.service"] {
        link(&format!("etc/systemd/system/{getty}"), "/dev/null");
    }
    let id = format!("{}\n", "6372797074667376".repeat(2));
    write("etc/machine-id", &id, 0o444);
    write("etc/hostname", "cryptfs-vm\n", 0o644);
}
