//! A damaged journal: clear error, the file kept aside, state rebuilt from the device, nothing
//! on the device lost.

mod common;

use common::{file_blake3, Image, Rig};

fn damage_and_recover(rig: &Rig, damage: impl FnOnce(&std::path::Path)) {
    let journal = rig.boot.join("cryptfs/journal.redb");
    damage(&journal);
    let status = rig.status();
    assert_eq!(status["journal"]["chain_ok"], false, "{status:#}");
    assert!(status["journal"]["error"].as_str().is_some());
    // The device alone still says where provisioning stands.
    assert!(status["state"] == "complete" || status["state"] == "header-backed-up");

    let device_before = file_blake3(&rig.device);
    let out = rig.run_stage("all");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("journal was damaged"), "{err}");
    let kept: Vec<_> = std::fs::read_dir(rig.boot.join("cryptfs"))
        .expect("dir")
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("journal.redb.damaged-")
        })
        .collect();
    assert_eq!(kept.len(), 1, "damaged journal kept aside");
    assert_eq!(
        file_blake3(&rig.device),
        device_before,
        "nothing on the device changed"
    );
    let status = rig.status();
    assert_eq!(status["state"], "header-backed-up");
    assert_eq!(status["journal"]["chain_ok"], true);
    assert_eq!(status["journal"]["records"][0]["step"], "journal");
    assert_eq!(rig.files_inside(), rig.files);
}

#[test]
fn garbage_journal_is_replaced_and_provisioning_state_rebuilt() {
    let rig = Rig::new(Image::Plain, 128);
    rig.run_stage("all");
    damage_and_recover(&rig, |path| {
        let len = std::fs::metadata(path).expect("meta").len() as usize;
        std::fs::write(path, vec![0xA5; len]).expect("overwrite");
    });
}

#[test]
fn altered_record_breaks_the_chain_and_is_recovered() {
    let rig = Rig::new(Image::Ci, 128);
    rig.run_stage("initramfs");
    rig.run_stage("userspace");
    damage_and_recover(&rig, |path| {
        // Rewrite one record with a different step name, keeping its stored hash.
        let db = redb::Database::open(path).expect("open");
        let table: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("records");
        let txn = db.begin_write().expect("txn");
        {
            use redb::ReadableTable;
            let mut t = txn.open_table(table).expect("table");
            let raw = t.get(1).expect("get").expect("record").value().to_vec();
            let text = String::from_utf8(raw)
                .expect("utf8")
                .replace("\"enroll-kek\"", "\"enroll-kex\"");
            t.insert(1, text.as_bytes()).expect("insert");
        }
        txn.commit().expect("commit");
    });
}
