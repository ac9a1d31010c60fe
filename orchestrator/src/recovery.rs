//! The recovery key: the same protocol as `systemd-cryptenroll --recovery-key`, so that stock
//! tools (`systemd-cryptsetup`, `cryptsetup open`, `systemd-cryptenroll --wipe-slot=recovery`)
//! use and recognise what cryptfs enrolls.
//!
//! - Key: 32 random bytes (OS RNG), each written as two "modhex" characters (alphabet
//!   `cbdefghijklnrtuv`, high nibble first), in 8 dash-separated groups of 8: 71 characters.
//!   The keyslot passphrase is that formatted text itself (systemd's `make_recovery_key`).
//! - Keyslot: PBKDF2/sha512/1000 iterations (systemd's `cryptsetup_set_minimal_pbkdf`: the key
//!   is already 256 bits of entropy).
//! - Token: `{"type":"systemd-recovery","keyslots":["N"]}`.
//! - Typed input is normalised as systemd's `normalize_recovery_key` does: 64 modhex characters
//!   without dashes or 71 with them, either case; the result is the lowercase dashed form.
//!
//! The key lives only in zeroized memory, in the escrow file and on the escrow command's
//! standard input; never in the journal, an argument vector, the environment or a message.

use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{anyhow, bail, Context};
use rand::rngs::OsRng;
use rand::RngCore;
use zeroize::Zeroizing;

use crate::secret::Passphrase;

/// LUKS2 token type of a recovery keyslot (systemd's).
pub const TOKEN_TYPE: &str = "systemd-recovery";

/// The modhex alphabet: nibble value → character.
const MODHEX: &[u8; 16] = b"cbdefghijklnrtuv";

/// Raw key length in bytes.
pub const RAW_LEN: usize = 32;

/// Length of the formatted key: 64 modhex characters and 7 dashes.
pub const FORMATTED_LEN: usize = RAW_LEN * 2 / 8 * 9 - 1;

/// Largest input `read_recovery_key` reads from standard input (a key plus generous spacing).
const INPUT_MAX_BYTES: u64 = 4096;

/// A fresh recovery key, already formatted as the keyslot passphrase.
pub fn generate() -> Passphrase {
    let mut raw = Zeroizing::new([0u8; RAW_LEN]);
    OsRng.fill_bytes(&mut raw[..]);
    format(&raw)
}

/// Formats raw key bytes as the dashed modhex passphrase.
pub fn format(raw: &[u8; RAW_LEN]) -> Passphrase {
    let mut out = Zeroizing::new(Vec::with_capacity(FORMATTED_LEN));
    for (i, byte) in raw.iter().enumerate() {
        if i > 0 && i % 4 == 0 {
            out.push(b'-');
        }
        out.push(MODHEX[usize::from(byte >> 4)]);
        out.push(MODHEX[usize::from(byte & 0x0f)]);
    }
    Passphrase::new(std::mem::take(&mut *out))
}

/// Why typed input is not a recovery key. Never carries the input itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MalformedKey {
    /// Neither 64 characters (no dashes) nor 71 (with dashes).
    #[error(
        "a recovery key is 64 modhex characters, optionally in 8 dash-separated groups of 8 \
         (71 characters); this input has {0} characters after trimming whitespace"
    )]
    Length(usize),
    /// A character outside the modhex alphabet, or a dash missing between groups.
    #[error(
        "character {0} of the recovery key is not valid: a recovery key holds only the letters \
         c b d e f g h i j k l n r t u v, in groups of 8 separated by dashes"
    )]
    Character(usize),
}

fn modhex_value(c: u8) -> Option<u8> {
    let lower = c.to_ascii_lowercase();
    MODHEX.iter().position(|m| *m == lower).map(|p| p as u8)
}

/// Normalises typed input (surrounding whitespace trimmed) to the keyslot passphrase: the
/// lowercase, dashed form, exactly as systemd does before trying it on a keyslot.
pub fn normalise(input: &[u8]) -> Result<Passphrase, MalformedKey> {
    let trimmed = input.trim_ascii();
    let dashed = match trimmed.len() {
        n if n == RAW_LEN * 2 => false,
        FORMATTED_LEN => true,
        n => return Err(MalformedKey::Length(n)),
    };
    let mut raw = Zeroizing::new([0u8; RAW_LEN]);
    for (i, byte) in raw.iter_mut().enumerate() {
        let k = if dashed { i * 2 + i / 4 } else { i * 2 };
        if dashed && i > 0 && i % 4 == 0 && trimmed[k - 1] != b'-' {
            return Err(MalformedKey::Character(k));
        }
        let hi = modhex_value(trimmed[k]).ok_or(MalformedKey::Character(k + 1))?;
        let lo = modhex_value(trimmed[k + 1]).ok_or(MalformedKey::Character(k + 2))?;
        *byte = (hi << 4) | lo;
    }
    Ok(format(&raw))
}

/// Reads a recovery key for unlocking or resealing: from the file `arg`, or from standard input
/// when `arg` is `-`. A file must be private (owner-only mode, owned by root or the caller),
/// like every secret file cryptfs reads. Surrounding whitespace and newlines are trimmed.
///
/// Returns the normalised keyslot passphrase, ready for libcryptsetup. A malformed key is an
/// error that says what is wrong and never repeats the key.
pub fn read_recovery_key(arg: &Path) -> crate::Result<Passphrase> {
    let bytes = if arg == Path::new("-") {
        let mut bytes = Zeroizing::new(Vec::new());
        std::io::stdin()
            .take(INPUT_MAX_BYTES)
            .read_to_end(&mut bytes)
            .context("cannot read the recovery key from standard input")?;
        bytes
    } else {
        crate::secret::read_secret_file(arg, "recovery key")?
    };
    let from = if arg == Path::new("-") {
        "standard input".to_string()
    } else {
        arg.display().to_string()
    };
    normalise(&bytes).map_err(|e| anyhow!("the recovery key from {from} is malformed: {e}"))
}

/// The LUKS2 token naming a recovery keyslot.
pub fn token(keyslot: u32) -> serde_json::Value {
    serde_json::json!({"type": TOKEN_TYPE, "keyslots": [keyslot.to_string()]})
}

/// Where the key is escrowed before its keyslot exists (`[recovery]` of the configuration).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Escrow {
    /// Written owner-only (0600) through an exclusive temporary file, fsynced and renamed.
    pub file: Option<PathBuf>,
    /// Run as an argument vector (no shell); the key, newline-terminated, is its standard
    /// input; it must exit 0. Its stdout and stderr are passed through.
    pub command: Option<Vec<String>>,
}

impl Escrow {
    /// The escrow destinations configured, by name (for the journal and `status`).
    pub fn kinds(&self) -> Vec<&'static str> {
        let mut kinds = Vec::new();
        if self.file.is_some() {
            kinds.push("file");
        }
        if self.command.is_some() {
            kinds.push("command");
        }
        kinds
    }

    /// Hands `key` to every configured destination; an error stops before any keyslot exists.
    pub fn escrow(&self, key: &Passphrase) -> crate::Result<()> {
        if self.file.is_none() && self.command.is_none() {
            bail!("[recovery] is enabled but has neither escrow_file nor escrow_command");
        }
        if let Some(path) = &self.file {
            write_escrow_file(path, key)?;
        }
        if let Some(argv) = &self.command {
            run_escrow_command(argv, key)?;
        }
        Ok(())
    }
}

/// Writes `key` and a newline to `path`, mode 0600: an exclusive temporary file beside it,
/// fsynced, renamed over `path`, and the directory fsynced, so that a crash leaves either the
/// old file or the whole new one.
pub fn write_escrow_file(path: &Path, key: &Passphrase) -> crate::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| anyhow!("escrow_file {} names no file", path.display()))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    // A temporary file left by a crash holds a key that never got a keyslot: drop it.
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e).with_context(|| format!("cannot remove stale {}", tmp.display()));
        }
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .with_context(|| format!("cannot create the escrow file {}", tmp.display()))?;
    let mut line = Zeroizing::new(key.expose().to_vec());
    line.push(b'\n');
    file.write_all(&line)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write the escrow file {}", tmp.display()))?;
    drop(file);
    std::fs::rename(&tmp, path)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot fsync the directory {}", dir.display()))?;
    Ok(())
}

/// Runs the escrow command with `key` on its standard input; it must exit 0.
pub fn run_escrow_command(argv: &[String], key: &Passphrase) -> crate::Result<()> {
    let (program, args) = argv
        .split_first()
        .ok_or_else(|| anyhow!("recovery.escrow_command is empty"))?;
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("cannot start the escrow command {program}"))?;
    let mut stdin = child
        .stdin
        .take()
        .ok_or_else(|| anyhow!("the escrow command {program} has no standard input"))?;
    let mut line = Zeroizing::new(key.expose().to_vec());
    line.push(b'\n');
    // A command that exits without reading is judged by its exit status, not by EPIPE.
    let written = stdin.write_all(&line);
    drop(stdin);
    let status = child
        .wait()
        .with_context(|| format!("cannot wait for the escrow command {program}"))?;
    if !status.success() {
        bail!(
            "the escrow command {program} failed ({status}); the recovery key was not escrowed, \
             so no recovery keyslot was added and nothing was wiped; the next start tries again"
        );
    }
    written.with_context(|| format!("cannot write the key to the escrow command {program}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_matches_systemd_layout_and_round_trips() {
        let mut cases = 0;
        for seed in 0u8..=255 {
            let raw: [u8; RAW_LEN] = std::array::from_fn(|i| seed.wrapping_mul(31) ^ i as u8);
            let key = format(&raw);
            let text = std::str::from_utf8(key.expose()).expect("ascii");
            assert_eq!(text.len(), FORMATTED_LEN);
            let groups: Vec<&str> = text.split('-').collect();
            assert_eq!(groups.len(), 8);
            assert!(groups.iter().all(|g| g.len() == 8));
            assert_eq!(
                normalise(key.expose()).expect("valid").expose(),
                key.expose()
            );
            let undashed: Vec<u8> = text.bytes().filter(|b| *b != b'-').collect();
            assert_eq!(normalise(&undashed).expect("valid").expose(), key.expose());
            let upper = format!("  {}\n", text.to_ascii_uppercase());
            assert_eq!(
                normalise(upper.as_bytes()).expect("valid").expose(),
                key.expose()
            );
            cases += 1;
        }
        assert_eq!(cases, 256);
        // Nibble 0 is 'c', 0xff is "vv".
        assert_eq!(
            format(&[0u8; RAW_LEN]).expose()[..9],
            *b"cccccccc-".as_slice()
        );
        assert_eq!(format(&[0xff; RAW_LEN]).expose()[..8], *b"vvvvvvvv");
        // The vector of systemd's normalisation test.
        let vector = b"iefgcelh-biduvkjv-cjvuncnk-vlfchdid-jhtuhhde-urkllkeg-ilkjgbrt-hjkbgktj";
        assert_eq!(normalise(vector).expect("systemd vector").expose(), vector);
    }

    #[test]
    fn malformed_keys_are_refused_without_echoing_them() {
        let good = generate();
        let text = std::str::from_utf8(good.expose())
            .expect("ascii")
            .to_string();
        let bad = [
            text[..70].to_string(),       // one short
            text.replacen('-', "x", 1),   // dash missing
            format!("a{}", &text[1..]),   // 'a' is not modhex
            text.replace('-', ""),        // valid: control case below
            String::new(),                // empty
            format!("{}-cccccccc", text), // too long
        ];
        let mut refused = 0;
        for (i, input) in bad.iter().enumerate() {
            match normalise(input.as_bytes()) {
                Ok(_) => assert_eq!(i, 3, "case {i} should be refused"),
                Err(e) => {
                    let msg = e.to_string();
                    assert!(!msg.contains(&text[9..17]), "{msg}");
                    refused += 1;
                }
            }
        }
        assert_eq!(refused, 5);
    }

    #[test]
    fn generated_keys_differ_and_token_is_systemds() {
        assert_ne!(generate().expose(), generate().expose());
        assert_eq!(
            token(2).to_string(),
            r#"{"keyslots":["2"],"type":"systemd-recovery"}"#
        );
    }

    #[test]
    fn escrow_file_is_private_and_replaced_whole() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("recovery.key");
        for _ in 0..2 {
            let key = generate();
            Escrow {
                file: Some(path.clone()),
                command: None,
            }
            .escrow(&key)
            .expect("escrow");
            let meta = std::fs::metadata(&path).expect("meta");
            assert_eq!(meta.permissions().mode() & 0o777, 0o600);
            let read = read_recovery_key(&path).expect("read back");
            assert_eq!(read.expose(), key.expose());
        }
        assert_eq!(std::fs::read_dir(dir.path()).expect("ls").count(), 1);
    }

    #[test]
    fn escrow_command_gets_the_key_on_stdin_only_and_must_succeed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("got");
        let key = generate();
        let argv = vec![
            "/bin/sh".to_string(),
            "-c".to_string(),
            format!(
                "cat > {0}; echo \"$0 $*\" > {0}.argv; env > {0}.env",
                out.display()
            ),
        ];
        run_escrow_command(&argv, &key).expect("escrow command");
        let got = std::fs::read(&out).expect("stdin copy");
        assert_eq!(got.trim_ascii(), key.expose());
        let text = std::str::from_utf8(key.expose()).expect("ascii");
        for leak in ["got.argv", "got.env"] {
            let seen = std::fs::read_to_string(dir.path().join(leak)).expect("leak file");
            assert!(!seen.contains(text), "{leak} holds the key");
        }
        let err = run_escrow_command(&["/bin/false".to_string()], &key)
            .expect_err("a failing command is an error")
            .to_string();
        assert!(err.contains("failed"), "{err}");
        assert!(!err.contains(text));
        assert!(run_escrow_command(&["/nonexistent/escrow".to_string()], &key).is_err());
        assert!(run_escrow_command(&[], &key).is_err());
    }
}
