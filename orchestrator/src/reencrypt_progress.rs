//! Live progress of a LUKS2 re-encryption, read from the header while another process runs it.
//!
//! The journal holds committed progress every 5 %; the header's segments move with every
//! hotzone. `cryptfs status` takes the bytes done from the segments and the rate from the
//! journal's progress records of the running step, so it is live without the runner having to
//! publish anything.
//!
//! Segments during a re-encryption (LUKS2 `segments` object): the parts already under the final
//! key are bound to the same digest as the `backup-final` segment; the hotzone carries the
//! `in-reencryption` flag; `backup-*` segments describe keys, not data. A size of `dynamic`
//! reaches the end of the device.

use cryptfs_journal::{Phase, Record};
use serde::Serialize;
use serde_json::Value;

/// Bytes done and in total, from the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct SegmentProgress {
    /// Bytes already under the final key.
    pub done_bytes: u64,
    /// Bytes the re-encryption covers.
    pub total_bytes: u64,
}

fn segment_size(segment: &Value, device_bytes: u64) -> Option<u64> {
    let offset: u64 = segment.get("offset")?.as_str()?.parse().ok()?;
    match segment.get("size")?.as_str()? {
        "dynamic" => device_bytes.checked_sub(offset),
        fixed => fixed.parse().ok(),
    }
}

fn has_flag(segment: &Value, flag: &str) -> bool {
    segment
        .get("flags")
        .and_then(Value::as_array)
        .is_some_and(|flags| flags.iter().any(|f| f.as_str() == Some(flag)))
}

/// Progress of the re-encryption the LUKS2 metadata `json` describes on a device of
/// `device_bytes`; `None` when none is in flight or the metadata does not add up (a hostile or
/// torn header shows no progress rather than a wrong one).
pub fn from_segments(json: &Value, device_bytes: u64) -> Option<SegmentProgress> {
    let segments = json.get("segments")?.as_object()?;
    let (final_id, _) = segments
        .iter()
        .find(|(_, segment)| has_flag(segment, "backup-final"))?;
    let final_digest_segments: Vec<&str> = json
        .get("digests")?
        .as_object()?
        .values()
        .filter_map(|d| d.get("segments")?.as_array())
        .find(|ids| ids.iter().any(|id| id.as_str() == Some(final_id.as_str())))?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let mut done_bytes: u64 = 0;
    let mut total_bytes: u64 = 0;
    for (id, segment) in segments {
        let is_backup = segment
            .get("flags")
            .and_then(Value::as_array)
            .is_some_and(|flags| {
                flags
                    .iter()
                    .any(|f| f.as_str().is_some_and(|f| f.starts_with("backup-")))
            });
        if is_backup {
            continue;
        }
        let size = segment_size(segment, device_bytes)?;
        total_bytes = total_bytes.checked_add(size)?;
        if !has_flag(segment, "in-reencryption") && final_digest_segments.contains(&id.as_str()) {
            done_bytes = done_bytes.checked_add(size)?;
        }
    }
    (total_bytes > 0 && done_bytes <= total_bytes).then_some(SegmentProgress {
        done_bytes,
        total_bytes,
    })
}

/// Bytes per second of the run now in progress, from its first progress record in the
/// journal (the latest uninterrupted series of `progress` records of `step` by one boot and
/// stage) to `done_bytes` at `now_unix_ms`.
pub fn rate(records: &[Record], step: &str, done_bytes: u64, now_unix_ms: u64) -> Option<f64> {
    let last = records
        .iter()
        .rposition(|r| r.body.step == step && r.body.phase == Phase::Progress)?;
    let run = &records[last].body;
    let first = records[..=last]
        .iter()
        .rev()
        .take_while(|r| {
            r.body.step == step
                && r.body.boot_id == run.boot_id
                && r.body.stage == run.stage
                && matches!(r.body.phase, Phase::Progress | Phase::Intent | Phase::Note)
        })
        .filter(|r| r.body.phase == Phase::Progress)
        .last()?;
    let start_bytes = first.body.details.get("done_bytes")?.as_u64()?;
    let elapsed_ms = now_unix_ms.checked_sub(first.body.time_unix_ms)?;
    let gained = done_bytes.checked_sub(start_bytes)?;
    (elapsed_ms > 0 && gained > 0).then(|| gained as f64 * 1000.0 / elapsed_ms as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Segments of a real `cryptsetup reencrypt` (2.6.1) killed after 126 MiB of a 512 MiB
    /// image (16 MiB data offset, 1 MiB hotzone).
    fn midway() -> Value {
        json!({
            "segments": {
                "0": {"type": "crypt", "offset": "16777216", "size": "132120576"},
                "1": {"type": "crypt", "offset": "148897792", "size": "1048576",
                      "flags": ["in-reencryption"]},
                "2": {"type": "crypt", "offset": "149946368", "size": "dynamic"},
                "3": {"type": "crypt", "offset": "16777216", "size": "dynamic",
                      "flags": ["backup-previous"]},
                "4": {"type": "crypt", "offset": "16777216", "size": "dynamic",
                      "flags": ["backup-final"]}
            },
            "digests": {
                "0": {"segments": ["1", "2", "3"]},
                "1": {"segments": ["1", "0", "4"]}
            }
        })
    }

    #[test]
    fn real_midway_header_gives_done_and_total() {
        let p = from_segments(&midway(), 512 << 20).expect("progress");
        assert_eq!(p.done_bytes, 132_120_576);
        assert_eq!(p.total_bytes, (512 - 16) << 20);
    }

    #[test]
    fn no_reencryption_or_nonsense_gives_none() {
        let plain = json!({"segments": {"0": {"offset": "16777216", "size": "dynamic"}},
                           "digests": {"0": {"segments": ["0"]}}});
        assert_eq!(from_segments(&plain, 1 << 30), None);
        let mut torn = midway();
        torn["segments"]["0"]["size"] = json!("18446744073709551615");
        assert_eq!(
            from_segments(&torn, 512 << 20),
            None,
            "overflow is no progress"
        );
        let mut beyond = midway();
        beyond["segments"]["2"]["offset"] = json!("999999999999");
        assert_eq!(from_segments(&beyond, 512 << 20), None);
        assert_eq!(from_segments(&json!({"segments": 3}), 1), None);
    }
}
