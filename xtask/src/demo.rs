//! The demo: a 256 MiB plain ext4 root with sample files and a software TPM, taken all the way
//! to `header-backed-up`; then a CI-made LUKS2 image taken over the reference's way. Proves the
//! data survived (decrypted in userspace, e2fsck, file by file) and the passphrase is gone.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::sh;

pub(crate) struct Swtpm(Child);

impl Drop for Swtpm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> Result<u16> {
    for _ in 0..50 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        if port < 65000 && std::net::TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free port pair on loopback")
}

pub(crate) fn start_swtpm(state: &Path) -> Result<(Swtpm, u16)> {
    std::fs::create_dir_all(state)?;
    let port = free_port()?;
    let child = Command::new("swtpm")
        .args(["socket", "--tpm2", "--flags", "not-need-init,startup-clear"])
        .arg("--server")
        .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
        .arg("--ctrl")
        .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", port + 1))
        .arg("--tpmstate")
        .arg(format!("dir={}", state.display()))
        .spawn()
        .context("cannot start swtpm")?;
    for _ in 0..250 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok((Swtpm(child), port));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    bail!("swtpm did not come up")
}

/// A plain ext4 root of `mib` MiB at `img` (4 KiB blocks, label `otaroot`) holding the
/// files under `src`: the starting point of every demo and bench image.
pub(crate) fn plain_root(src: &Path, img: &Path, mib: u64) -> Result<()> {
    std::fs::File::create(img)?.set_len(mib << 20)?;
    sh::output(
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
    )?;
    Ok(())
}

pub(crate) fn sample_files(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir.join("etc"))?;
    std::fs::create_dir_all(dir.join("usr/share/demo"))?;
    std::fs::write(
        dir.join("etc/os-release"),
        "NAME=\"cryptfs demo\"\nID=demo\n",
    )?;
    std::fs::write(dir.join("etc/hostname"), "device-0001\n")?;
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in 0..8 {
        let size = (i + 1) * 3 * 1024 * 1024 + 123;
        let mut bytes = Vec::with_capacity(size);
        while bytes.len() < size {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            bytes.extend_from_slice(&seed.to_le_bytes());
        }
        bytes.truncate(size);
        std::fs::write(dir.join(format!("usr/share/demo/blob{i}.bin")), bytes)?;
    }
    Ok(())
}

fn files(dir: &Path, root: &Path, out: &mut Vec<(PathBuf, Vec<u8>)>) -> Result<()> {
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.file_name().is_some_and(|n| n == "lost+found") {
            continue;
        }
        if p.is_dir() {
            files(&p, root, out)?;
        } else {
            out.push((p.strip_prefix(root)?.to_path_buf(), std::fs::read(&p)?));
        }
    }
    Ok(())
}

fn cryptfs(bin: &Path, args: &[&str], config: &Path) -> Result<()> {
    let mut all = args.to_vec();
    let c = config.display().to_string();
    all.extend(["--config", &c]);
    sh::run(&bin.display().to_string(), &all)
}

/// Decrypts through the token, checks the filesystem and compares every file with `src`.
fn prove_data(bin: &Path, config: &Path, work: &Path, src: &Path) -> Result<()> {
    let plain = work.join("plaintext.img");
    cryptfs(
        bin,
        &["export-plaintext", "--out", &plain.display().to_string()],
        config,
    )?;
    let p = plain.display().to_string();
    sh::run("e2fsck", &["-n", "-f", &p])?;
    let out = work.join("extracted");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out)?;
    sh::output(
        "debugfs",
        &["-R", &format!("rdump / {}", out.display()), &p],
    )?;
    let (mut want, mut got) = (Vec::new(), Vec::new());
    files(src, src, &mut want)?;
    files(&out, &out, &mut got)?;
    want.sort();
    got.sort();
    if want != got {
        bail!("the files inside the encrypted volume differ from the originals");
    }
    println!(
        "demo: {} files identical after encryption (decrypted with the TPM-sealed key)",
        want.len()
    );
    std::fs::remove_file(&plain)?;
    std::fs::remove_dir_all(&out)?;
    Ok(())
}

pub(crate) fn config(path: &Path, device: &Path, boot: &Path, port: u16) -> Result<()> {
    std::fs::create_dir_all(boot)?;
    let text = format!(
        "device = \"{}\"\nboot_dir = \"{}\"\nlabel = \"otaroot\"\n\n[kek]\nkind = \"tpm2\"\n\n[kek.tpm2]\ntcti = \"swtpm:host=127.0.0.1,port={port}\"\npcrs = [7]\npcr_bank = \"sha256\"\n# A software TPM on a host without UEFI: no Secure Boot behind PCR 7.\nrequire_secure_boot = false\n\n[reencrypt]\nhotzone_size = 8388608\n",
        device.display(),
        boot.display()
    );
    std::fs::write(path, text)?;
    Ok(())
}

/// Runs the demo.
pub fn run() -> Result<()> {
    // The demo shows the plaintext inside the volume with `export-plaintext`, a test hook.
    sh::run(
        "cargo",
        &[
            "build",
            "--quiet",
            "--package",
            "cryptfs",
            "--features",
            "test-hooks",
        ],
    )?;
    let bin = std::env::current_dir()?.join("target/debug/cryptfs");
    let work = std::env::temp_dir().join(format!("cryptfs-demo-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    println!("demo: working in {}", work.display());
    let (_tpm, port) = start_swtpm(&work.join("tpm"))?;

    println!("\n== 1. A plain ext4 root (256 MiB) is encrypted in place ==");
    let src = work.join("rootfs");
    sample_files(&src)?;
    let image = work.join("root.img");
    plain_root(&src, &image, 256)?;
    let cfg = work.join("cryptfs.toml");
    config(&cfg, &image, &work.join("boot"), port)?;
    cryptfs(&bin, &["status"], &cfg)?;
    cryptfs(&bin, &["run", "--stage", "all"], &cfg)?;
    cryptfs(&bin, &["status"], &cfg)?;
    prove_data(&bin, &cfg, &work, &src)?;

    println!(
        "\n== 2. A CI-made LUKS2 image (keyslot 31, passphrase fiopassphrase) is taken over =="
    );
    let ci = work.join("ci.img");
    plain_root(&src, &ci, 256)?;
    let c = ci.display().to_string();
    sh::run("resize2fs", &[&c, "224M"])?;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&ci)?
        .set_len(256 << 20)?;
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
            &c,
        ])
        // cryptsetup's temporary header goes to the working directory: keep it beside the image.
        .current_dir(ci.parent().unwrap_or(std::path::Path::new("/tmp")))
        .stdin(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(b"fiopassphrase")?;
    if !child.wait()?.success() {
        bail!("cryptsetup could not make the CI image");
    }
    let cfg2 = work.join("cryptfs-ci.toml");
    config(&cfg2, &ci, &work.join("boot-ci"), port)?;
    cryptfs(&bin, &["run", "--stage", "initramfs"], &cfg2)?;
    cryptfs(&bin, &["run", "--stage", "userspace"], &cfg2)?;
    cryptfs(&bin, &["status"], &cfg2)?;
    prove_data(&bin, &cfg2, &work, &src)?;
    let mut test = Command::new("cryptsetup")
        .args(["open", "--test-passphrase", "--batch-mode", &c])
        .stdin(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    test.stdin
        .take()
        .context("stdin")?
        .write_all(b"fiopassphrase")?;
    if test.wait()?.success() {
        bail!("the well-known passphrase still opens the volume");
    }
    println!("demo: `cryptsetup open --test-passphrase` with fiopassphrase fails: the passphrase is gone");

    std::fs::remove_dir_all(&work)?;
    println!("\ndemo: OK");
    Ok(())
}
