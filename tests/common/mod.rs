//! Helpers shared by the host-tier integration tests: real swtpm, real e2fsprogs, real
//! cryptsetup/libcryptsetup on image files, the real `cryptfs` binary.
#![allow(dead_code, missing_docs)]

use std::collections::BTreeMap;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, RngCore, SeedableRng};

pub mod proxy;

pub const BIN: &str = env!("CARGO_BIN_EXE_cryptfs");
pub const CI_PASSPHRASE: &str = "fiopassphrase";

/// The crash harnesses' `cryptsetup reencrypt` anchor settings, after the operation's own flags:
/// a cheap KDF (the passphrase is a test's) and cryptfs's 8 MiB hotzone.
pub const ANCHOR_REENCRYPT_ARGS: &[&str] = &[
    "--pbkdf",
    "pbkdf2",
    "--pbkdf-force-iterations",
    "1000",
    "--hotzone-size",
    "8M",
];

/// The failpoints of `enroll-recovery` (cut by tests/recovery.rs, which enables the recovery
/// key; tests/crash_resume.rs counts them among the failpoints the source defines).
pub const RECOVERY_BOUNDARIES: &[&str] = &[
    "enroll-recovery:after-intent",
    "enroll-recovery:after-escrow",
    "enroll-recovery:after-keyslot",
    "enroll-recovery:after-token",
];

/// The failpoints of the recovery budget's hotzone sizing (cut by tests/hotzone_budget.rs).
pub const BUDGET_BOUNDARIES: &[&str] = &["reencrypt:after-hotzone-sized"];

/// The failpoints of `cryptfs reseal`, each with how the next reseal resolves a crash there:
/// before the new pair is proven it is rolled back, after it the removal is completed.
pub const RESEAL_BOUNDARIES: &[(&str, &str)] = &[
    ("reseal:after-intent", "rolled back"),
    ("reseal:after-keyslot", "rolled back"),
    ("reseal:after-token", "rolled back"),
    ("reseal:after-proven", "completed"),
    ("reseal:after-destroy-keyslot", "completed"),
];

/// A software TPM on a free loopback port, killed on drop.
pub struct Swtpm {
    child: Child,
    pub port: u16,
    pub state: PathBuf,
}

pub fn free_port_pair() -> u16 {
    loop {
        let a = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = a.local_addr().expect("addr").port();
        if port < 65000 && TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return port;
        }
    }
}

impl Swtpm {
    pub fn start(dir: &Path) -> Swtpm {
        let state = dir.join("tpm");
        std::fs::create_dir_all(&state).expect("tpm dir");
        Self::start_on(&state)
    }

    /// Starts (or restarts) a swtpm on an existing state directory (PCRs reset, seeds kept).
    pub fn start_on(state: &Path) -> Swtpm {
        for _ in 0..20 {
            let port = free_port_pair();
            let mut child = Command::new("swtpm")
                .args(["socket", "--tpm2"])
                .arg("--server")
                .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
                .arg("--ctrl")
                .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1))
                .arg("--tpmstate")
                .arg(format!("dir={}", state.display()))
                .args(["--flags", "not-need-init,startup-clear"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("swtpm must be installed (cargo xtask deps)");
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Swtpm {
                        child,
                        port,
                        state: state.to_path_buf(),
                    };
                }
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("swtpm did not start");
    }

    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    /// Runs a tpm2-tools command (`args[0]`) against this TPM.
    pub fn tool(&self, args: &[&str]) -> Output {
        Command::new(args[0])
            .env("TPM2TOOLS_TCTI", self.tcti())
            .args(&args[1..])
            .output()
            .expect("tpm2-tools must be installed")
    }

    /// Extends PCR 7 (a secure-boot state change).
    pub fn extend_pcr7(&self) {
        let out = self.tool(&["tpm2_pcrextend", &format!("7:sha256={}", "ab".repeat(32))]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Restarts on the same state: the next boot (PCRs reset, seeds kept). The port changes.
    pub fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let next = Swtpm::start_on(&self.state);
        drop(std::mem::replace(self, next));
    }

    /// The swtpm's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A power cut: SIGKILL (no TPM2_Shutdown, nothing flushed beyond what swtpm already
    /// wrote). True when swtpm died of SIGKILL (this one, or a cutting proxy's).
    pub fn power_cut(&mut self) -> bool {
        use std::os::unix::process::ExitStatusExt;
        // Already killed (by a cutting proxy) or not: the exit status says whether SIGKILL did it.
        let _ = self.child.kill();
        self.child
            .wait()
            .is_ok_and(|s| s.signal() == Some(libc::SIGKILL))
    }

    pub fn stop(mut self) -> PathBuf {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.state.clone()
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn run(program: &str, args: &[&str]) -> Output {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs `program` with `stdin` on its standard input; panics unless it succeeds.
pub fn run_with_stdin(program: &str, args: &[&str], stdin: &[u8]) -> Output {
    use std::io::Write;
    let mut child = Command::new(program)
        .args(args)
        // `cryptsetup reencrypt --encrypt` may leave `LUKS2-temp-*.new` in its working
        // directory: never the source tree.
        .current_dir(std::env::temp_dir())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin)
        .expect("stdin");
    let out = child.wait_with_output().expect("wait");
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A directory of random files (sizes from 1 KiB to 3 MiB, one of 12 MiB); returns their hashes.
pub fn sample_tree(dir: &Path, seed: u64) -> BTreeMap<String, String> {
    sample_tree_of(dir, seed, TreeShape::FULL)
}

/// How much a sample tree holds: one big file and `files` files of 1 KiB up to `max_file`.
#[derive(Clone, Copy)]
pub struct TreeShape {
    big_file: usize,
    files: usize,
    max_file: usize,
}

impl TreeShape {
    /// About 48 MiB: the tree of every rig of 96 MiB and more.
    pub const FULL: TreeShape = TreeShape {
        big_file: 12 << 20,
        files: 24,
        max_file: 3 << 20,
    };
    /// About 20 MiB, for the 64 MiB images of the crash harnesses (32 MiB of filesystem after
    /// the shrink or the CI image's header room): every file still spans several hotzones'
    /// worth of the device between them.
    pub const SMALL: TreeShape = TreeShape {
        big_file: 4 << 20,
        files: 16,
        max_file: 2 << 20,
    };
}

/// [`sample_tree`] of a given shape.
pub fn sample_tree_of(dir: &Path, seed: u64, shape: TreeShape) -> BTreeMap<String, String> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    std::fs::create_dir_all(dir.join("etc/app")).expect("mkdir");
    std::fs::create_dir_all(dir.join("var/data")).expect("mkdir");
    let mut files = vec![("var/data/big.bin".to_string(), shape.big_file)];
    for i in 0..shape.files {
        let size = rng.gen_range(1024..shape.max_file);
        let sub = if i % 3 == 0 { "etc/app" } else { "var/data" };
        files.push((format!("{sub}/file{i:02}.bin"), size));
    }
    for (name, size) in files {
        let mut bytes = vec![0u8; size];
        rng.fill_bytes(&mut bytes);
        std::fs::write(dir.join(&name), bytes).expect("write");
    }
    tree_hashes(dir)
}

pub fn file_blake3(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    blake3::hash(&bytes).to_hex().to_string()
}

/// blake3 of every regular file under `dir` (lost+found excluded), keyed by relative path.
pub fn tree_hashes(dir: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        for entry in std::fs::read_dir(dir).expect("read_dir") {
            let entry = entry.expect("entry");
            let path = entry.path();
            let rel = path
                .strip_prefix(root)
                .expect("prefix")
                .display()
                .to_string();
            if rel == "lost+found" {
                continue;
            }
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                out.insert(rel, file_blake3(&path));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// A plain ext4 image of `size_mib` holding `src`.
pub fn make_ext4(img: &Path, size_mib: u64, src: &Path) {
    let f = std::fs::File::create(img).expect("create image");
    f.set_len(size_mib << 20).expect("size");
    drop(f);
    run(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-b",
            "4096",
            "-L",
            "otaroot",
            "-d",
            &src.display().to_string(),
            &img.display().to_string(),
        ],
    );
}

/// A LUKS2 image made the way the reference's CI makes it: ext4 shrunk by 32 MiB, then
/// `cryptsetup reencrypt --encrypt --key-slot 31 --reduce-device-size 32M` with the well-known
/// passphrase, label otaroot. (A cheaper Argon2 cost keeps the tests fast.)
pub fn make_ci_image(img: &Path, size_mib: u64, src: &Path, passphrase: &str) {
    make_ext4(img, size_mib, src);
    let path = img.display().to_string();
    run("e2fsck", &["-p", "-f", &path]);
    run("resize2fs", &[&path, &format!("{}M", size_mib - 32)]);
    // resize2fs truncates a file; the device keeps its size.
    std::fs::OpenOptions::new()
        .write(true)
        .open(img)
        .expect("open")
        .set_len(size_mib << 20)
        .expect("extend");
    let mut child = Command::new("cryptsetup")
        .args([
            "reencrypt",
            "--batch-mode",
            "--encrypt",
            "--type",
            "luks2",
            "--key-slot",
            "31",
            "--reduce-device-size",
            "32M",
            "--label",
            "otaroot",
            "--pbkdf-memory",
            "65536",
            "--iter-time",
            "200",
            &path,
        ])
        // Its temporary header `LUKS2-temp-<uuid>.new` goes to the working directory: keep it
        // beside the image, never in the source tree, even when a test is killed mid-way.
        .current_dir(img.parent().expect("image directory"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cryptsetup");
    use std::io::Write;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(passphrase.as_bytes())
        .expect("passphrase");
    let out = child.wait_with_output().expect("wait");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The files of the plain ext4 image `plain`, copied out with debugfs into `out_dir` (made
/// afresh) and hashed.
pub fn files_of_ext4_image(plain: &Path, out_dir: &Path) -> BTreeMap<String, String> {
    let _ = std::fs::remove_dir_all(out_dir);
    std::fs::create_dir_all(out_dir).expect("mkdir");
    run(
        "debugfs",
        &[
            "-R",
            &format!("rdump / {}", out_dir.display()),
            &plain.display().to_string(),
        ],
    );
    tree_hashes(out_dir)
}

/// The steps a CI image's takeover journals as done, in order.
pub const CI_TAKEOVER_STEPS: &[&str] = &[
    "enroll-kek",
    "wipe-passphrase",
    "init-reencrypt",
    "reencrypt",
    "backup-header",
];

/// The steps `status --json` shows journaled as done, in order.
pub fn done_steps(status: &serde_json::Value) -> Vec<String> {
    status["journal"]["records"]
        .as_array()
        .expect("records")
        .iter()
        .filter(|r| r["phase"] == "done")
        .map(|r| r["step"].as_str().expect("step").to_string())
        .collect()
}

/// A test rig: temp dir, swtpm, device image, boot dir, config.
pub struct Rig {
    pub dir: tempfile::TempDir,
    pub tpm: Swtpm,
    pub device: PathBuf,
    pub boot: PathBuf,
    pub config: PathBuf,
    pub files: BTreeMap<String, String>,
    /// Extra environment for every cryptfs process of this rig (e.g. SOFTHSM2_CONF).
    pub env: Vec<(&'static str, String)>,
}

/// The rigs' configuration. The boot-phase lock is off: these rigs simulate later boots with
/// another boot id on the same swtpm, which keeps PCR 15 extended (a real reboot resets it);
/// the lock's own tests turn it on ([`Rig::enable_boot_phase_lock`]) and restart the swtpm.
pub fn config_text(device: &Path, boot: &Path, tcti: &str, extra: &str) -> String {
    config_text_with_lock(device, boot, tcti, extra, false)
}

/// [`config_text`] with the boot-phase lock on or off.
pub fn config_text_with_lock(
    device: &Path,
    boot: &Path,
    tcti: &str,
    extra: &str,
    lock: bool,
) -> String {
    format!(
        "device = \"{}\"\nboot_dir = \"{}\"\n{extra}\n[kek]\nkind = \"tpm2\"\n\n[kek.tpm2]\ntcti = \"{tcti}\"\npcrs = [7]\npcr_bank = \"sha256\"\nboot_phase_lock = {lock}\nefivars_dir = \"{}\"\n\n[reencrypt]\nhotzone_size = 8388608\n",
        device.display(),
        boot.display(),
        secure_boot_on_efivars().display()
    )
}

/// An efivarfs-shaped directory saying UEFI Secure Boot is on and out of setup mode, as on a
/// provisioned device: the host has no UEFI firmware, and sealing to PCR 7 requires it.
pub fn secure_boot_on_efivars() -> &'static Path {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("efivars-secure-boot-on");
        // Written beside and renamed: test processes running at once never see half a file.
        let staging = dir.with_extension(format!("{}", std::process::id()));
        cryptfs::secure_boot::write_fake_efivars(&staging, true, false).expect("fake efivars");
        if std::fs::rename(&staging, &dir).is_err() {
            let _ = std::fs::remove_dir_all(&staging);
        }
        assert!(cryptfs::secure_boot::require_enforced(&dir).is_ok());
        dir
    })
}

pub enum Image {
    Plain,
    Ci,
    /// The CI image made by `cryptfs image encrypt` (the build host's half).
    CryptfsCi,
}

/// The failpoints of `cryptfs image encrypt` (cut by tests/image_encrypt.rs; tests/crash_resume.rs
/// counts them among the failpoints the source defines).
pub const IMAGE_BOUNDARIES: &[&str] = &[
    "image-encrypt:after-start",
    "image-encrypt:after-shrink",
    "image-encrypt:after-prepare",
    "image-encrypt:after-header",
    "image-encrypt:mid",
    "image-encrypt:after-encrypt",
];

/// Runs `cryptfs image encrypt --image IMG --passphrase-file FILE EXTRA…` with `env`.
pub fn image_encrypt(
    img: &Path,
    passphrase_file: &Path,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(["image", "encrypt", "--image"])
        .arg(img)
        .arg("--passphrase-file")
        .arg(passphrase_file)
        .args(extra)
        .env("CRYPTFS_LOG", "info");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("cryptfs image encrypt")
}

/// The CI image made by `cryptfs image encrypt` from a plain ext4 image of `src`, with the
/// passphrase in keyslot 31 and label otaroot (the defaults). Returns the command's output.
pub fn make_cryptfs_ci_image(img: &Path, size_mib: u64, src: &Path, passphrase: &str) -> Output {
    make_ext4(img, size_mib, src);
    let pass = img.with_extension("passphrase");
    write_secret(&pass, passphrase);
    let out = image_encrypt(img, &pass, &[], &[]);
    assert!(
        out.status.success(),
        "cryptfs image encrypt: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_file(&pass).expect("rm passphrase file");
    out
}

impl Rig {
    pub fn new(image: Image, size_mib: u64) -> Rig {
        Rig::with_image(size_mib, |device, src| match image {
            Image::Plain => make_ext4(device, size_mib, src),
            Image::Ci => make_ci_image(device, size_mib, src, CI_PASSPHRASE),
            Image::CryptfsCi => {
                make_cryptfs_ci_image(device, size_mib, src, CI_PASSPHRASE);
            }
        })
    }

    /// A rig whose device `make(device, src)` makes from the sample tree in `src`.
    pub fn with_image(size_mib: u64, make: impl FnOnce(&Path, &Path)) -> Rig {
        let dir = tempfile::tempdir().expect("tempdir");
        let tpm = Swtpm::start(dir.path());
        let src = dir.path().join("src");
        // Below 96 MiB the full tree does not fit the filesystem left after 32 MiB of header room.
        let shape = if size_mib < 96 {
            TreeShape::SMALL
        } else {
            TreeShape::FULL
        };
        let files = sample_tree_of(&src, size_mib, shape);
        let device = dir.path().join("root.img");
        make(&device, &src);
        let boot = dir.path().join("boot");
        std::fs::create_dir_all(&boot).expect("boot");
        let config = dir.path().join("cryptfs.toml");
        std::fs::write(&config, config_text(&device, &boot, &tpm.tcti(), "")).expect("config");
        Rig {
            dir,
            tpm,
            device,
            boot,
            config,
            files,
            env: Vec::new(),
        }
    }

    /// The next boot: the swtpm restarted on its state (PCRs reset; PCR 7 given the non-zero
    /// value of [`Swtpm::extend_pcr7`] again when `pcr7_extended`), the configuration (lock on:
    /// only the lock's tests reboot) pointed at its new port, and this boot's kernel-keyring
    /// hand-off of the volume forgotten.
    /// Turns the boot-phase lock on in this rig's configuration (pointed at its swtpm).
    pub fn enable_boot_phase_lock(&mut self) {
        std::fs::write(
            &self.config,
            config_text_with_lock(&self.device, &self.boot, &self.tpm.tcti(), "", true),
        )
        .expect("config");
    }

    pub fn reboot(&mut self, pcr7_extended: bool) {
        if let Ok(cryptfs::probe::Probe {
            content: cryptfs::probe::Content::Luks2(meta),
            ..
        }) = cryptfs::probe::probe(&self.device)
        {
            cryptfs::keyring::forget(&cryptfs::boot_lock::key_description(&meta))
                .expect("forget the keyring hand-off");
        }
        self.tpm.restart();
        if pcr7_extended {
            self.tpm.extend_pcr7();
        }
        self.enable_boot_phase_lock();
    }

    pub fn cryptfs(&self, args: &[&str]) -> Output {
        self.cryptfs_env(args, &[])
    }

    pub fn cryptfs_env(&self, args: &[&str], extra: &[(&str, &str)]) -> Output {
        let mut env: Vec<(&str, &str)> = self.env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        env.extend_from_slice(extra);
        cryptfs_with(args, &self.config, &env)
    }

    pub fn run_stage(&self, stage: &str) -> Output {
        let out = self.cryptfs(&["run", "--stage", stage]);
        assert!(
            out.status.success(),
            "cryptfs run --stage {stage} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    pub fn status(&self) -> serde_json::Value {
        let out = self.cryptfs(&["status", "--json"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("status json")
    }

    /// Decrypts the volume in userspace via the token and returns the files inside, after
    /// checking that e2fsck finds the filesystem clean.
    pub fn files_inside(&self) -> BTreeMap<String, String> {
        let plain = self.dir.path().join("plain.img");
        let out = self.cryptfs(&["export-plaintext", "--out", &plain.display().to_string()]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let fsck = Command::new("e2fsck")
            .args(["-n", "-f", &plain.display().to_string()])
            .output()
            .expect("e2fsck");
        assert_eq!(
            fsck.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&fsck.stdout)
        );
        let out_dir = self.dir.path().join("extracted");
        let files = files_of_ext4_image(&plain, &out_dir);
        std::fs::remove_file(&plain).expect("rm plain");
        std::fs::remove_dir_all(&out_dir).expect("rm extracted");
        files
    }

    /// Rewrites the configuration with the TPM at `tcti` (another swtpm, a proxy).
    pub fn point_tpm_at(&self, tcti: &str) {
        std::fs::write(
            &self.config,
            config_text(&self.device, &self.boot, tcti, ""),
        )
        .expect("config");
    }

    pub fn config(&self) -> cryptfs::config::Config {
        cryptfs::config::Config::load(&self.config).expect("config")
    }
}

pub fn cryptfs_with(args: &[&str], config: &Path, env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args).arg("--config").arg(config);
    cmd.env("CRYPTFS_LOG", "info");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run cryptfs")
}

/// The volume key opened with `passphrase` (keyslot any).
pub fn volume_key_with(device: &Path, passphrase: &str) -> Option<Vec<u8>> {
    let p = cryptfs::secret::Passphrase::new(passphrase.as_bytes().to_vec());
    cryptfs::luks::device::volume_key(device, None, &p)
        .ok()
        .map(|k| k.to_vec())
}

pub fn luks2(device: &Path) -> Box<cryptfs::luks::metadata::Luks2Metadata> {
    match cryptfs::luks::metadata::read(device).expect("read header") {
        cryptfs::luks::metadata::HeaderKind::Luks2(m) => m,
        other => panic!("not LUKS2: {other:?}"),
    }
}

pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rand::thread_rng().fill_bytes(&mut v);
    v
}

/// A private SoftHSM2 (own config and token directory), for the PKCS#11 protector.
pub struct SoftHsm {
    pub conf: PathBuf,
    pub pin: PathBuf,
    pub so_pin: PathBuf,
}

pub const SOFTHSM_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
pub const USER_PIN: &str = "1234";

/// In-process PKCS#11 use reads SOFTHSM2_CONF from the environment: one at a time.
pub static SOFTHSM_ENV: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Writes a PIN or passphrase file private to its owner (mode 0600), as cryptfs requires.
pub fn write_secret(path: &Path, text: &str) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    file.write_all(text.as_bytes()).expect("write secret");
}

impl SoftHsm {
    pub fn new(dir: &Path) -> SoftHsm {
        let tokens = dir.join("softhsm-tokens");
        std::fs::create_dir_all(&tokens).expect("tokens");
        let conf = dir.join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}/\nobjectstore.backend = file\nlog.level = ERROR\n",
                tokens.display()
            ),
        )
        .expect("conf");
        let pin = dir.join("pin");
        let so_pin = dir.join("so-pin");
        write_secret(&pin, USER_PIN);
        write_secret(&so_pin, "5678");
        SoftHsm { conf, pin, so_pin }
    }

    pub fn env(&self) -> (&'static str, String) {
        ("SOFTHSM2_CONF", self.conf.display().to_string())
    }

    /// `[kek]` for this SoftHSM; slot 0 is the uninitialised slot of a fresh token directory.
    pub fn kek_section(&self, slot: u64) -> String {
        format!(
            "[kek]\nkind = \"pkcs11\"\n\n[kek.pkcs11]\nmodule = \"{SOFTHSM_MODULE}\"\ntoken_label = \"lmp\"\nslot = {slot}\npin_file = \"{}\"\nso_pin_file = \"{}\"\nkey_label = \"luks\"\nkey_id = \"9d\"\n",
            self.pin.display(),
            self.so_pin.display()
        )
    }

    /// Runs `f` with SOFTHSM2_CONF pointing at this SoftHSM, serialised across threads.
    pub fn with<T>(&self, f: impl FnOnce() -> T) -> T {
        let _guard = SOFTHSM_ENV.lock().unwrap_or_else(|e| e.into_inner());
        std::env::set_var("SOFTHSM2_CONF", &self.conf);
        let out = f();
        std::env::remove_var("SOFTHSM2_CONF");
        out
    }

    /// Lists the objects on token `lmp` (pkcs11-tool, a real peer).
    pub fn objects(&self) -> String {
        let out = Command::new("pkcs11-tool")
            .env("SOFTHSM2_CONF", &self.conf)
            .args([
                "--module",
                SOFTHSM_MODULE,
                "--token-label",
                "lmp",
                "--login",
                "--pin",
                USER_PIN,
                "--list-objects",
            ])
            .output()
            .expect("pkcs11-tool (package opensc)");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Rig {
    /// Switches the rig to a PKCS#11 KEK on `hsm`.
    pub fn use_pkcs11(&mut self, hsm: &SoftHsm, slot: u64) {
        let text = format!(
            "device = \"{}\"\nboot_dir = \"{}\"\n\n{}\n[reencrypt]\nhotzone_size = 8388608\n",
            self.device.display(),
            self.boot.display(),
            hsm.kek_section(slot)
        );
        std::fs::write(&self.config, text).expect("config");
        self.env = vec![hsm.env()];
    }
}

fn walk_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).expect("read_dir") {
        let p = e.expect("entry").path();
        if p.is_dir() {
            out.extend(walk_files(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Scans the device, every file on the boot partition (journal, luks.bin, kept journals) and
/// the given process outputs for each needle.
pub fn assert_nothing_written_contains(rig: &Rig, needles: &[&[u8]], outputs: &[Output]) {
    let mut files = vec![rig.device.clone()];
    files.extend(walk_files(&rig.boot));
    assert!(files.iter().any(|p| p.ends_with("journal.redb")));
    for path in &files {
        let bytes = std::fs::read(path).expect("read");
        for needle in needles {
            assert!(
                memchr::memmem::find(&bytes, needle).is_none(),
                "a secret was found in {}",
                path.display()
            );
        }
    }
    for out in outputs {
        for stream in [&out.stdout, &out.stderr] {
            for needle in needles {
                assert!(
                    memchr::memmem::find(stream, needle).is_none(),
                    "a secret in the output"
                );
            }
        }
    }
}

/// Replaces `to` with a recursive copy of `from` (boot directories of crash states).
pub fn copy_tree(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read_dir") {
        let p = e.expect("entry").path();
        let target = to.join(p.file_name().expect("name"));
        if p.is_dir() {
            copy_tree(&p, &target);
        } else {
            std::fs::copy(&p, &target).expect("copy");
        }
    }
}

/// The reference's boot with the re-encryption flag set: `cryptsetup repair`, then
/// `reencrypt --resume-only` (offline), both with the passphrase in `key_file`.
pub fn reference_recovery(work: &Path, img: &Path, key_file: &Path) {
    let i = img.display().to_string();
    let k = key_file.display().to_string();
    let _ = Command::new("cryptsetup")
        .args(["repair", "--batch-mode", "--key-file", &k, &i])
        .current_dir(work)
        .output();
    let _ = Command::new("cryptsetup")
        .args([
            "reencrypt",
            "--batch-mode",
            "--resume-only",
            "--force-offline-reencrypt",
            "--key-file",
            &k,
            &i,
        ])
        .current_dir(work)
        .output();
}

/// Files inside a passphrase volume (decrypted in userspace), if it opens and its filesystem
/// checks clean.
pub fn passphrase_volume_files(
    work: &Path,
    img: &Path,
    passphrase: &str,
) -> Option<BTreeMap<String, String>> {
    let meta = match cryptfs::luks::metadata::read(img).ok()? {
        cryptfs::luks::metadata::HeaderKind::Luks2(m) => m,
        _ => return None,
    };
    let key = volume_key_with(img, passphrase)?;
    let plain = work.join("plain");
    cryptfs::plaintext::export(img, &meta, &key, &plain).ok()?;
    let p = plain.display().to_string();
    let fsck = Command::new("e2fsck")
        .args(["-n", "-f", &p])
        .output()
        .ok()?;
    if fsck.status.code() != Some(0) {
        return None;
    }
    let out = work.join("out");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).ok()?;
    Command::new("debugfs")
        .args(["-R", &format!("rdump / {}", out.display()), &p])
        .output()
        .ok()?;
    Some(tree_hashes(&out))
}

/// cryptfs's normal boot path after a crash (`run --stage all`, boot id `recovery`), then the
/// checks every crash harness makes: `header-backed-up`, journal chain valid, only token
/// keyslots, every intent of the cut boot (`cut`) closed, every file byte-identical.
pub fn cryptfs_recovers(rig: &Rig) -> Result<(), String> {
    let out = rig.cryptfs_env(
        &["run", "--stage", "all"],
        &[("CRYPTFS_BOOT_ID", "recovery")],
    );
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(err.lines().last().unwrap_or("").chars().take(120).collect());
    }
    let s = rig.status();
    if s["state"] != "header-backed-up" {
        return Err(format!("state {}", s["state"]));
    }
    if s["journal"]["chain_ok"] != true {
        return Err("journal chain".into());
    }
    let slots = s["device"]["keyslots"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if slots.is_empty() || slots.iter().any(|k| k["kind"] != "token") {
        return Err("keyslots".into());
    }
    // The journal shows the cut: an intent of the cut boot left open there is closed later.
    let records = s["journal"]["records"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for (i, r) in records.iter().enumerate() {
        if r["boot_id"] == "cut" && r["phase"] == "intent" {
            let step = &r["step"];
            let closed_in_cut = records[i..]
                .iter()
                .any(|d| d["step"] == *step && d["phase"] == "done" && d["boot_id"] == "cut");
            let closed_later = records[i..]
                .iter()
                .any(|d| d["step"] == *step && d["phase"] == "done" && d["boot_id"] == "recovery");
            if !closed_in_cut && !closed_later {
                return Err(format!("intent of {step} never closed"));
            }
        }
    }
    if rig.files_inside() != rig.files {
        return Err("FILES DIFFER".into());
    }
    Ok(())
}

/// Writes a harness's result table to `design/results/<name>` (the README links there instead of
/// typing figures): a run regenerates it.
pub fn write_result(name: &str, text: &str) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("design")
        .join("results");
    std::fs::create_dir_all(&dir).expect("design/results");
    std::fs::write(dir.join(name), text).expect("result file");
    eprintln!("(written to design/results/{name})");
}

/// True when the run is CI's (`CI=true`): there a skipped check is a failed check.
pub fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// systemd 252's `struct systemd_tpm2_plugin_params` (src/cryptsetup/cryptsetup-tokens).
#[repr(C)]
struct Tpm2PluginParams {
    search_pcr_mask: u32,
    device: *const std::os::raw::c_char,
    signature_path: *const std::os::raw::c_char,
}

/// Unlocks `device` (test only, no activation) through systemd's own TPM2 token plugin, with
/// the TPM at `tpm_device` (systemd's TCTI syntax, e.g. `swtpm:port=P`). Returns the keyslot.
pub fn systemd_tpm2_plugin_unlocks(device: &Path, tpm_device: &str) -> Result<u32, String> {
    use libcryptsetup_rs::consts::flags::CryptActivate;
    use libcryptsetup_rs::consts::vals::EncryptionFormat;
    let tpm_device = std::ffi::CString::new(tpm_device).expect("cstring");
    let mut params = Tpm2PluginParams {
        search_pcr_mask: u32::MAX,
        device: tpm_device.as_ptr(),
        signature_path: std::ptr::null(),
    };
    let mut cd = libcryptsetup_rs::CryptInit::init(device).map_err(|e| e.to_string())?;
    cd.context_handle()
        .load::<()>(Some(EncryptionFormat::Luks2), None)
        .map_err(|e| e.to_string())?;
    // No PIN: systemd's plugin must get NULL (it checks `memchr(pin, 0, pin_size - 1)`).
    let token = luks2(device)
        .tokens
        .iter()
        .find(|(_, t)| t.kind == "systemd-tpm2")
        .map(|(id, _)| *id)
        .ok_or("no systemd-tpm2 token")?;
    cd.token_handle()
        .activate_by_token(None, Some(token), Some(&mut params), CryptActivate::empty())
        .map_err(|e| e.to_string())
}
