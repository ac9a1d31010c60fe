//! Journal tests on real redb files.

use cryptfs_journal::{Journal, Phase, RecordBody, GENESIS};
use cryptfs_states::ProvisioningState;
use redb::{Database, ReadableTable, TableDefinition};

const WAIT: std::time::Duration = std::time::Duration::from_millis(300);

fn body(step: &str, phase: Phase) -> RecordBody {
    RecordBody {
        seq: 0,
        time_unix_ms: 1_700_000_000_000,
        boot_id: "boot-a".into(),
        stage: "all".into(),
        step: step.into(),
        phase,
        state_before: Some(ProvisioningState::Unencrypted),
        state_after: None,
        details: Journal::details([("blob", serde_json::json!("00ff"))]),
        prev_hash: String::new(),
    }
}

#[test]
fn records_chain_and_survive_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("journal.redb");
    {
        let (mut j, rec) = Journal::open_or_recover(&path, 1, WAIT).expect("create");
        assert!(rec.is_none());
        j.append(body("enroll-kek", Phase::Intent)).expect("append");
        j.append(body("enroll-kek", Phase::Done)).expect("append");
    }
    let j = Journal::open_verified(&path).expect("reopen");
    let r = j.records();
    assert_eq!(r.len(), 2);
    assert_eq!(r[0].body.prev_hash, GENESIS);
    assert_eq!(r[1].body.prev_hash, r[0].hash);
    assert_eq!(r[1].body.phase, Phase::Done);
    assert_eq!(j.latest_of("enroll-kek").map(|r| r.body.seq), Some(1));
    assert_eq!(j.latest_detail("blob"), Some(&serde_json::json!("00ff")));
}

const RECORDS: TableDefinition<u64, &[u8]> = TableDefinition::new("records");

#[test]
fn altered_record_is_detected_and_the_file_kept_aside() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("journal.redb");
    {
        let (mut j, _) = Journal::open_or_recover(&path, 1, WAIT).expect("create");
        for step in ["a", "b", "c"] {
            j.append(body(step, Phase::Done)).expect("append");
        }
    }
    // Alter record 1 behind the journal's back: change its step, keep its stored hash.
    {
        let db = Database::open(&path).expect("open");
        let txn = db.begin_write().expect("txn");
        {
            let mut t = txn.open_table(RECORDS).expect("table");
            let raw = t.get(1).expect("get").expect("present").value().to_vec();
            let text = String::from_utf8(raw)
                .expect("utf8")
                .replace("\"step\":\"b\"", "\"step\":\"x\"");
            t.insert(1, text.as_bytes()).expect("insert");
        }
        txn.commit().expect("commit");
    }
    let err = Journal::open_verified(&path).expect_err("must fail");
    assert!(err.to_string().contains("record 1 was altered"), "{err}");
    let (j, rec) = Journal::open_or_recover(&path, 42, WAIT).expect("recover");
    let rec = rec.expect("recovery reported");
    assert!(rec
        .kept_aside
        .to_string_lossy()
        .ends_with("journal.redb.damaged-42"));
    assert!(rec.kept_aside.exists(), "damaged file is kept");
    assert!(j.records().is_empty());
}

#[test]
fn garbage_file_is_recovered_not_fatal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("journal.redb");
    std::fs::write(&path, vec![0x5a; 8192]).expect("write");
    let (mut j, rec) = Journal::open_or_recover(&path, 7, WAIT).expect("recover");
    assert!(rec.is_some());
    j.append(body("a", Phase::Note))
        .expect("append works on the fresh journal");
    let kept = std::fs::read(dir.path().join("journal.redb.damaged-7")).expect("kept");
    assert_eq!(kept, vec![0x5a; 8192]);
}

#[test]
fn removed_record_breaks_the_chain() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("journal.redb");
    {
        let (mut j, _) = Journal::open_or_recover(&path, 1, WAIT).expect("create");
        for step in ["a", "b", "c"] {
            j.append(body(step, Phase::Done)).expect("append");
        }
    }
    {
        let db = Database::open(&path).expect("open");
        let txn = db.begin_write().expect("txn");
        txn.open_table(RECORDS).expect("t").remove(2).expect("rm");
        txn.open_table(RECORDS).expect("t").remove(1).expect("rm");
        let first = {
            let t = txn.open_table(RECORDS).expect("t");
            let v = t.get(0).expect("get").expect("present").value().to_vec();
            v
        };
        // Re-insert record 0 as record 1: a gap/link error must be reported.
        txn.open_table(RECORDS)
            .expect("t")
            .insert(1, first.as_slice())
            .expect("ins");
        txn.commit().expect("commit");
    }
    let err = Journal::open_verified(&path).expect_err("must fail");
    assert!(err.to_string().contains("sequence number"), "{err}");
}

#[test]
fn a_second_writer_is_refused_as_busy_and_nothing_is_moved() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("journal.redb");
    let (mut first, _) = Journal::open_or_recover(&path, 1, WAIT).expect("create");
    first.append(body("a", Phase::Intent)).expect("append");
    let started = std::time::Instant::now();
    let err = Journal::open_or_recover(&path, 2, WAIT).expect_err("second writer refused");
    assert!(
        matches!(err, cryptfs_journal::JournalError::Busy { .. }),
        "{err}"
    );
    assert!(started.elapsed() >= WAIT, "it waited before giving up");
    assert!(
        err.to_string().contains("held by another cryptfs process"),
        "{err}"
    );
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .expect("dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        vec!["journal.redb".to_string()],
        "nothing kept aside"
    );
    // The first writer is unaffected.
    first
        .append(body("a", Phase::Done))
        .expect("append after refusal");
    drop(first);
    let (again, rec) = Journal::open_or_recover(&path, 3, WAIT).expect("free again");
    assert!(rec.is_none());
    assert_eq!(again.records().len(), 2);
}

#[test]
fn a_reader_follows_a_live_writer_without_blocking_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("journal.redb");
    let (mut writer, _) = Journal::open_or_recover(&path, 1, WAIT).expect("create");
    let mut seen = Vec::new();
    for i in 0..20 {
        writer
            .append(body("step", Phase::Progress))
            .expect("append");
        let snap = Journal::read_only(&path).expect("reader opens beside the writer");
        seen.push(snap.records.len());
        assert_eq!(snap.records.len(), i + 1, "reader sees every commit so far");
    }
    assert_eq!(seen.len(), 20);
    // The reader never took the writer's place: appends still work, and a reader is not a writer.
    writer.append(body("step", Phase::Done)).expect("append");
    assert_eq!(Journal::read_only(&path).expect("read").records.len(), 21);
}

/// An input that made redb 4.6 panic (`unreachable!` in its B-tree code) when opened without
/// the integrity check, found by the fuzz target `journal_file`: both opens must answer with
/// an error, the writer keeping the file aside, and neither may panic.
#[test]
fn the_redb_panic_input_is_an_error_for_both_opens() {
    let input = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/regressions/journal_file/redb-4.6-btree-unreachable.redb");
    let original = std::fs::read(&input).expect("regression input");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("journal.redb");
    std::fs::write(&path, &original).expect("write");
    assert!(
        Journal::read_only(&path).is_err(),
        "status must report damage"
    );
    assert_eq!(
        std::fs::read(&path).expect("read"),
        original,
        "status wrote"
    );
    let (journal, recovery) = Journal::open_or_recover(&path, 9, WAIT).expect("recover");
    assert!(recovery.is_some(), "the damaged file is kept aside");
    assert!(journal.records().is_empty());
    assert_eq!(
        std::fs::read(dir.path().join("journal.redb.damaged-9")).expect("kept"),
        original
    );
}
