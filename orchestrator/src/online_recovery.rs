//! `cryptfs recover-online`: repairs the dm stack an online re-encryption left behind when its
//! process died in the middle of a hotzone (SIGKILL: an OOM kill, a stop-timeout escalation),
//! while the volume stays mounted (design/boot.md, "SIGKILL mid-hotzone").
//!
//! libcryptsetup keeps `<name>-hotzone-forward` (a linear map of the raw device) suspended from
//! the moment `<name>-overlay` maps the hotzone with the new key until the hotzone is rewritten
//! and committed; I/O to that region waits there. Its own crash recovery refuses an active
//! device (it opens the data device `O_EXCL`: EBUSY), and its fatal-error teardown puts
//! dm-error under the mounted root. So this module gives libcryptsetup a private alias of the
//! raw device (`<name>-recovery`, a linear map nobody holds) to run on, then:
//! - header in the crash state: libcryptsetup's hotzone recovery from the resilience data;
//! - header clean, hotzone not yet committed (killed before the resilience commit): the one
//!   hotzone step the killed run was doing, offline on the alias (the overlay already maps the
//!   region with the new key, and writes waiting in the suspended device are already encrypted
//!   with it, so only completing the hotzone makes disk and tables agree);
//! - header clean, hotzone committed: nothing to rewrite.
//!
//! Only when the header then says the overlay's hotzone is under the new key is anything
//! resumed (never a half-rewritten region). Then `<name>` gets back the multi-segment table
//! libcryptsetup builds from the header (so that `Restart=`'s online resume finds the table it
//! expects) and the helper devices are removed.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context};
use cryptfs_journal::Journal;
use serde_json::Value;

use crate::config::Config;
use crate::dm;
use crate::luks::metadata::{self, HeaderKind, Luks2Metadata};
use crate::luks::reencrypt::{self as luks_reencrypt, Kind};
use crate::secret::Passphrase;

/// The journal subject of the repair.
pub const SUBJECT: &str = "recover-online";

/// What `recover-online` found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// No device of the stack was suspended.
    NothingSuspended,
    /// The hotzone was repaired (how) and the stack resumed.
    Recovered(&'static str),
}

/// Where the scratch node of the alias lives (tmpfs).
pub const RUN_DIR: &str = "/run/cryptfs";

struct Stack {
    name: String,
    overlay: String,
    hotzone: String,
}

/// The devices of `stack` that exist, with whether each is suspended.
fn present_of(stack: &[&str]) -> Vec<(String, bool)> {
    dm::devices()
        .into_iter()
        .filter(|(n, _, _)| stack.contains(&n.as_str()))
        .map(|(n, s, _)| (n, s))
        .collect()
}

/// Finds what a dead online re-encryption left of its stack (`<name>-overlay`,
/// `<name>-hotzone-*`: libcryptsetup removes them when a run ends, even on SIGTERM) and
/// repairs it; does nothing when there is none.
pub fn run(config: &Config) -> crate::Result<Outcome> {
    let Some(name) = config.mapping_name.clone() else {
        return Ok(Outcome::NothingSuspended);
    };
    let forward = format!("{name}-hotzone-forward");
    let backward = format!("{name}-hotzone-backward");
    let overlay = format!("{name}-overlay");
    let all = [name.as_str(), &overlay, &forward, &backward];
    let helpers = |p: &[(String, bool)]| p.iter().any(|(n, _)| *n != name);
    if !helpers(&present_of(&all)) {
        return Ok(Outcome::NothingSuspended);
    }
    // The journal's lock first: a live run holds it for its whole stage, and its stack must
    // never be touched.
    let (mut rec, _) = crate::record::Recorder::open(
        &config.journal_path(),
        SUBJECT,
        std::time::Duration::from_secs(5),
    )
    .context("the journal is held (a cryptfs run is alive?): its stack is left alone")?;
    let present = present_of(&all);
    if !helpers(&present) {
        return Ok(Outcome::NothingSuspended);
    }
    let hotzone = if present.iter().any(|(n, _)| *n == backward) {
        backward
    } else {
        forward
    };
    let suspended: Vec<&str> = present
        .iter()
        .filter(|(_, s)| *s)
        .map(|(n, _)| n.as_str())
        .collect();
    tracing::warn!(
        suspended = ?suspended,
        "the online re-encryption stack is left over (its process died), suspended: {suspended:?}; \
         repairing"
    );
    // The unit's idle CPU and I/O classes are inherited by ExecStopPost=, but a frozen
    // hotzone stalls every I/O to that region of the root: the repair must not wait for the
    // workload to pause.
    crate::priority::leave_idle_class();
    let meta = crate::probe::luks2(&config.device, "for online recovery")?;
    let (_, passphrase) = crate::boot_lock::stashed(config, &meta).ok_or_else(|| {
        anyhow!(
            "no passphrase for {} in the kernel keyring: the stack is left as it is (the next \
             boot's crash recovery repairs it)",
            config.device.display()
        )
    })?;
    let state = cryptfs_states::ProvisioningState::Reencrypting;
    rec.operation_intent(
        SUBJECT,
        state,
        Journal::details([("suspended", Value::from(suspended.clone()))]),
    )?;
    let stack = Stack {
        name,
        overlay,
        hotzone,
    };
    let how = repair(config, &stack, &suspended, &passphrase)?;
    rec.operation_done(
        SUBJECT,
        state,
        Journal::details([("how", Value::from(how))]),
    )?;
    Ok(Outcome::Recovered(how))
}

/// The raw device's `major:minor` and size in sectors.
fn raw_device(device: &Path) -> crate::Result<(String, u64)> {
    use std::os::unix::fs::MetadataExt;
    let rdev = std::fs::metadata(device)
        .with_context(|| format!("cannot stat {}", device.display()))?
        .rdev();
    let (major, minor) = (libc::major(rdev), libc::minor(rdev));
    let size = std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/size"))
        .with_context(|| format!("no size for {}", device.display()))?;
    Ok((format!("{major}:{minor}"), size.trim().parse()?))
}

/// The hotzone as the overlay maps it: absolute byte offset and length on the raw device.
fn overlay_hotzone(stack: &Stack) -> crate::Result<(u64, u64)> {
    let hz = dm::info(&stack.hotzone)?.major_minor();
    let hz_table = dm::table(&stack.hotzone)?;
    let [linear] = hz_table.as_slice() else {
        bail!(
            "{} has {} targets, expected one",
            stack.hotzone,
            hz_table.len()
        );
    };
    let hz_offset: u64 = linear
        .params
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .filter(|_| linear.kind == "linear")
        .ok_or_else(|| anyhow!("{} is not a linear map", stack.hotzone))?;
    let table = dm::table(&stack.overlay)?;
    let mut found = table.iter().filter_map(|t| {
        let words: Vec<&str> = t.params.split_whitespace().collect();
        // crypt: cipher key iv_offset device offset [options]
        (t.kind == "crypt" && words.get(3) == Some(&hz.as_str()))
            .then(|| words.get(4)?.parse::<u64>().ok())
            .flatten()
            .map(|offset| ((offset + hz_offset) * 512, t.length * 512))
    });
    let first = found
        .next()
        .ok_or_else(|| anyhow!("{} maps nothing through {}", stack.overlay, stack.hotzone))?;
    if found.next().is_some() {
        bail!(
            "{} maps more than one region through {}",
            stack.overlay,
            stack.hotzone
        );
    }
    Ok(first)
}

fn segment_bytes(seg: &Value, key: &str) -> Option<u64> {
    seg.get(key)?.as_str()?.parse().ok()
}

/// Whether the header says the region `[start, start + len)` is under the new volume key (the
/// key of the `backup-final` segment): every byte in one non-backup segment with that digest.
pub fn region_under_new_key(json: &Value, start: u64, len: u64) -> Option<bool> {
    let segments = json.get("segments")?.as_object()?;
    let digests = json.get("digests")?.as_object()?;
    let flagged = |seg: &Value, flag: &str| {
        seg.get("flags")
            .and_then(Value::as_array)
            .is_some_and(|f| f.iter().any(|x| x.as_str() == Some(flag)))
    };
    let digest_of = |id: &str| {
        digests.iter().find_map(|(d, v)| {
            v.get("segments")?
                .as_array()?
                .iter()
                .any(|s| s.as_str() == Some(id))
                .then_some(d.clone())
        })
    };
    let new_digest = match segments.iter().find(|(_, s)| flagged(s, "backup-final")) {
        Some((final_id, _)) => digest_of(final_id)?,
        // No re-encryption left in the header: a kill in the last hotzone, whose repair
        // completed the job and dropped the old key. The one digest left is the new key's.
        None => match digests.keys().collect::<Vec<_>>().as_slice() {
            [only] => (*only).clone(),
            _ => return None,
        },
    };
    let (id, seg) = segments.iter().find(|(_, s)| {
        let backup = s.get("flags").and_then(Value::as_array).is_some_and(|f| {
            f.iter()
                .any(|x| x.as_str().is_some_and(|x| x.starts_with("backup-")))
        });
        let Some(offset) = segment_bytes(s, "offset") else {
            return false;
        };
        let end = segment_bytes(s, "size").map_or(u64::MAX, |size| offset + size);
        !backup && offset <= start && start < end
    })?;
    let offset = segment_bytes(seg, "offset")?;
    let end = segment_bytes(seg, "size").map_or(u64::MAX, |size| offset + size);
    Some(start + len <= end && digest_of(id)? == new_digest)
}

/// The progress callback's rule for running exactly one hotzone offline.
///
/// libcryptsetup (2.6.1, `crypt_reencrypt_run`) calls back once before the first hotzone and
/// then after each one, but adds a hotzone to the progress it reports only after that
/// callback: the call after the first hotzone still reports where the run started. A rule on
/// the reported offset alone ("stop once past the hotzone") therefore let a second hotzone
/// through, which the overlay's table still maps with the old key (found by the VM tier:
/// binaries read from there during the repair failed to run). So the rule stops at the first
/// call after a hotzone, whatever it reports, and also as soon as the offset is past the
/// hotzone (a library that reports up to date, or calls back only after hotzones).
#[derive(Debug)]
struct OneHotzone {
    data_offset: u64,
    hotzone_start: u64,
    calls: u32,
}

impl OneHotzone {
    /// `hotzone_start`: the hotzone's absolute byte offset on the device; `data_offset`: the
    /// data area's.
    fn new(data_offset: u64, hotzone_start: u64) -> OneHotzone {
        OneHotzone {
            data_offset,
            hotzone_start,
            calls: 0,
        }
    }

    /// Whether libcryptsetup may run another hotzone, given the progress `done` (bytes of the
    /// data area) it reports.
    fn keep_going(&mut self, done: u64) -> bool {
        self.calls = self.calls.saturating_add(1);
        self.calls < 2 && done.saturating_add(self.data_offset) <= self.hotzone_start
    }
}

fn header_of(path: &Path) -> crate::Result<Box<Luks2Metadata>> {
    match metadata::read(path)? {
        HeaderKind::Luks2(meta) => Ok(meta),
        _ => bail!("{} has no valid LUKS2 header", path.display()),
    }
}

/// A private alias of the raw device for libcryptsetup, removed on drop.
struct Alias {
    name: String,
    node: PathBuf,
}

impl Alias {
    fn make(stack: &Stack, device: &Path) -> crate::Result<Alias> {
        let (raw, sectors) = raw_device(device)?;
        let name = format!("{}-recovery", stack.name);
        // A stale alias of an earlier attempt that died holds nothing: replace it. An attempt
        // killed inside `restore_top` also left its scratch device open on the alias, which
        // then refuses removal (EBUSY) and every later attempt failed on it (found by the VM
        // tier: a recovery starved past TimeoutStopSec): the scratch goes first.
        let _ = dm::remove(&scratch_name(stack));
        let _ = dm::remove(&name);
        let info = dm::create_linear(&name, &raw, sectors)?;
        std::fs::create_dir_all(RUN_DIR)?;
        let node = Path::new(RUN_DIR).join(&name);
        let _ = std::fs::remove_file(&node);
        let (major, minor) = info
            .major_minor()
            .split_once(':')
            .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
            .ok_or_else(|| anyhow!("bad device number of {name}"))?;
        let c = std::ffi::CString::new(node.as_os_str().as_encoded_bytes())?;
        // SAFETY: mknod with a NUL-terminated path that outlives the call.
        let rc = unsafe {
            libc::mknod(
                c.as_ptr(),
                libc::S_IFBLK | 0o600,
                libc::makedev(major, minor),
            )
        };
        let alias = Alias { name, node };
        if rc != 0 {
            bail!(
                "cannot make {}: {}",
                alias.node.display(),
                std::io::Error::last_os_error()
            );
        }
        Ok(alias)
    }
}

impl Drop for Alias {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.node);
        if let Err(e) = dm::remove(&self.name) {
            tracing::warn!("cannot remove {}: {e:#}", self.name);
        }
    }
}

fn repair(
    config: &Config,
    stack: &Stack,
    suspended: &[&str],
    passphrase: &Passphrase,
) -> crate::Result<&'static str> {
    // Killed between suspending the overlay and resuming it with the next hotzone's table:
    // the live table is still the previous (committed) layout; resuming must not swap the
    // uncommitted one in.
    if suspended.contains(&stack.overlay.as_str()) && dm::info(&stack.overlay)?.inactive_present {
        dm::clear_inactive(&stack.overlay)?;
    }
    let hotzone_suspended = suspended.contains(&stack.hotzone.as_str());
    let alias = Alias::make(stack, &config.device)?;
    let configured = config.reencrypt.hotzone();
    let mut how = "stack left between hotzones";
    if luks_reencrypt::recover_if_crashed(
        &alias.node,
        Kind::Reencrypt,
        None,
        passphrase,
        configured,
    )? {
        how = "hotzone recovered from the resilience data";
    }
    let (start, len) = overlay_hotzone(stack)?;
    tracing::info!(start, len, "hotzone mapped by the overlay");
    let meta = header_of(&alias.node)?;
    match region_under_new_key(&meta.json, start, len) {
        Some(true) => {
            if hotzone_suspended && !how.starts_with("hotzone recovered") {
                how = "hotzone already committed";
            }
        }
        Some(false) => {
            // Killed before the resilience commit: do the hotzone the killed run was doing,
            // and only that one.
            let mut one = OneHotzone::new(meta.data_offset.unwrap_or(0), start);
            // The hotzone the killed run was doing is the overlay's, whatever size a recovery
            // budget had chosen for it.
            let hotzone = if len > 0 && len.is_multiple_of(512) {
                luks_reencrypt::Hotzone {
                    bytes: len,
                    ..configured
                }
            } else {
                configured
            };
            luks_reencrypt::resume(
                &alias.node,
                Kind::Reencrypt,
                None,
                passphrase,
                hotzone,
                &mut |done, _total| one.keep_going(done),
            )?;
            let after = header_of(&alias.node)?;
            if region_under_new_key(&after.json, start, len) != Some(true) {
                bail!(
                    "after re-encrypting the interrupted hotzone the header still does not put \
                     the overlay's hotzone ({start}+{len}) under the new key: the stack stays \
                     suspended"
                );
            }
            // The overlay maps everything after its hotzone with the old key: had more than
            // that hotzone been rewritten, resuming would serve the rest wrong (and store
            // writes there under the old key).
            if region_under_new_key(&after.json, start + len, 512) == Some(true) {
                bail!(
                    "re-encryption went past the overlay's hotzone ({start}+{len}): resuming \
                     would serve the region after it with the old key; the stack stays \
                     suspended (the next boot's crash recovery repairs it)"
                );
            }
            how = "interrupted hotzone re-encrypted";
        }
        None => bail!(
            "the header does not describe the overlay's hotzone ({start}+{len}): the stack \
             stays suspended"
        ),
    }
    // Disk and tables agree now: resume bottom to top.
    for dev in [&stack.hotzone, &stack.overlay, &stack.name] {
        if dm::devices()
            .iter()
            .any(|(n, s, _)| n == dev.as_str() && *s)
        {
            dm::resume(dev)?;
        }
    }
    // The overlay's table still serves the regions around the hotzone until `restore_top`
    // swaps it: the VM tier reads them here.
    crate::failpoint::hold("recover-online:window");
    restore_top(stack, &alias, passphrase)?;
    drop(alias);
    Ok(how)
}

/// The private scratch device `restore_top` activates from the alias.
fn scratch_name(stack: &Stack) -> String {
    format!("{}-restore", stack.name)
}

/// Gives `<name>` the table libcryptsetup builds from the header (as its own teardown does),
/// then removes the overlay and hotzone devices. The table is made by activating a scratch
/// device from the alias (libcryptsetup puts the keys in this thread's keyring), and copied
/// with the alias replaced by the raw device.
fn restore_top(stack: &Stack, alias: &Alias, passphrase: &Passphrase) -> crate::Result<()> {
    let scratch = scratch_name(stack);
    let _ = dm::remove(&scratch);
    let alias_dev = dm::info(&alias.name)?.major_minor();
    let raw_dev = {
        let t = dm::table(&alias.name)?;
        t.first()
            .and_then(|t| t.params.split_whitespace().next().map(String::from))
            .ok_or_else(|| anyhow!("{} has no table", alias.name))?
    };
    let mut cd = crate::luks::device::open(&alias.node)?;
    cd.activate_handle()
        .activate_by_passphrase(
            Some(&scratch),
            None,
            passphrase.expose(),
            libcryptsetup_rs::consts::flags::CryptActivate::PRIVATE,
        )
        .context("cannot build the table of the header")?;
    let result = (|| {
        let mut table = dm::table(&scratch)?;
        for t in &mut table {
            let words: Vec<String> = t.params.split_whitespace().map(String::from).collect();
            let swapped: Vec<String> = words
                .into_iter()
                .map(|w| if w == alias_dev { raw_dev.clone() } else { w })
                .collect();
            t.params = swapped.join(" ");
        }
        dm::load(&stack.name, &table)?;
        dm::resume(&stack.name)
    })();
    if let Err(e) = dm::remove(&scratch) {
        tracing::warn!("cannot remove {scratch}: {e:#}");
    }
    result?;
    remove_retrying(&stack.overlay)?;
    remove_retrying(&stack.hotzone)
}

/// udev may still hold a device it probes after a change (as libcryptsetup, retry a while).
fn remove_retrying(name: &str) -> crate::Result<()> {
    let mut tries = 0;
    loop {
        match dm::remove(name) {
            Ok(()) => return Ok(()),
            Err(e) if tries >= 50 => return Err(e),
            Err(_) => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(boundary: u64) -> Value {
        serde_json::json!({
            "segments": {
                "0": {"type": "crypt", "offset": "16777216", "size": boundary.to_string()},
                "1": {"type": "crypt", "offset": (16777216 + boundary).to_string(), "size": "dynamic"},
                "2": {"type": "crypt", "offset": "16777216", "size": "dynamic", "flags": ["backup-final"]},
                "3": {"type": "crypt", "offset": "16777216", "size": "dynamic", "flags": ["backup-previous"]}
            },
            "digests": {
                "0": {"segments": ["1", "3"], "keyslots": ["0"]},
                "1": {"segments": ["0", "2"], "keyslots": ["1"]}
            }
        })
    }

    /// What `crypt_reencrypt_run` (2.6.1) passes: the start offset before the first hotzone,
    /// then, after each hotzone, the offset of the hotzone just done.
    fn lagging_reports(start_done: u64, hotzone: u64) -> impl Iterator<Item = u64> {
        std::iter::once(start_done).chain((0..).map(move |i| start_done + i * hotzone))
    }

    /// How many hotzones libcryptsetup runs under `rule`, calling back as `reports` says.
    fn hotzones_run(rule: &mut OneHotzone, reports: impl Iterator<Item = u64>) -> usize {
        let mut run = 0;
        for (call, done) in reports.enumerate().take(10) {
            if !rule.keep_going(done) {
                return run;
            }
            // After the first (initial) call, each further call follows one hotzone.
            run = call + 1;
        }
        run
    }

    #[test]
    fn one_hotzone_is_run_although_the_progress_lags_one_hotzone_behind() {
        let mib = 1 << 20;
        let (data_offset, hotzone) = (16 * mib, 8 * mib);
        // The killed run's hotzone: data 96..104 MiB, absolute 112 MiB.
        let start = data_offset + 96 * mib;
        let mut rule = OneHotzone::new(data_offset, start);
        assert_eq!(
            hotzones_run(&mut rule, lagging_reports(96 * mib, hotzone)),
            1
        );
        // The rule on the offset alone, as it was: two.
        let offset_only = lagging_reports(96 * mib, hotzone)
            .take_while(|done| done + data_offset <= start)
            .count();
        assert_eq!(offset_only, 2);
    }

    #[test]
    fn one_hotzone_is_run_when_the_progress_is_up_to_date_or_only_follows_hotzones() {
        let mib = 1 << 20;
        let (data_offset, hotzone) = (16 * mib, 8 * mib);
        let start = data_offset + 96 * mib;
        let up_to_date = std::iter::once(96 * mib).chain((1..).map(|i| 96 * mib + i * hotzone));
        assert_eq!(
            hotzones_run(&mut OneHotzone::new(data_offset, start), up_to_date),
            1
        );
        // No initial call: the first call follows the first hotzone and must stop the run.
        let mut rule = OneHotzone::new(data_offset, start);
        assert!(!rule.keep_going(104 * mib));
    }

    #[test]
    fn a_finished_header_puts_everything_under_the_one_key_left() {
        let mib: u64 = 1 << 20;
        let finished = serde_json::json!({
            "segments": {"0": {"type": "crypt", "offset": "16777216", "size": "dynamic"}},
            "digests": {"1": {"segments": ["0"], "keyslots": ["1"]}}
        });
        assert_eq!(
            region_under_new_key(&finished, 16 * mib + 232 * mib, 8 * mib),
            Some(true)
        );
        // Two digests and no backup-final segment: which key is new is unknown.
        let ambiguous = serde_json::json!({
            "segments": {"0": {"type": "crypt", "offset": "16777216", "size": "dynamic"}},
            "digests": {"0": {"segments": [], "keyslots": ["0"]}, "1": {"segments": ["0"], "keyslots": ["1"]}}
        });
        assert_eq!(region_under_new_key(&ambiguous, 16 * mib, 8 * mib), None);
    }

    #[test]
    fn a_committed_hotzone_is_under_the_new_key_and_an_uncommitted_one_is_not() {
        let mib = 1 << 20;
        let hz = (16 * mib + 8 * mib, 8 * mib);
        assert_eq!(
            region_under_new_key(&(header(16 * mib)), hz.0, hz.1),
            Some(true)
        );
        assert_eq!(
            region_under_new_key(&(header(8 * mib)), hz.0, hz.1),
            Some(false)
        );
        // Half of it: never "done".
        assert_eq!(
            region_under_new_key(&(header(12 * mib)), hz.0, hz.1),
            Some(false)
        );
    }
}
