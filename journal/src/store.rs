//! The redb-backed store.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::chain::{verify_chain, GENESIS};
use crate::error::JournalError;
use crate::record::{Record, RecordBody};

const RECORDS: TableDefinition<u64, &[u8]> = TableDefinition::new("records");

/// A damaged journal that was moved aside and replaced by a fresh one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// Where the damaged file now is (kept for inspection, never deleted).
    pub kept_aside: PathBuf,
    /// Why it was judged damaged.
    pub reason: String,
}

/// An open journal.
pub struct Journal {
    path: PathBuf,
    db: Database,
    records: Vec<Record>,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field("path", &self.path)
            .field("records", &self.records.len())
            .finish()
    }
}

impl Journal {
    /// Opens the journal at `path`, creating it if absent, and verifies its chain.
    ///
    /// A file redb cannot open, or whose chain is broken, is renamed to
    /// `<path>.damaged-<unix ms>` and replaced by an empty journal; the returned [`Recovery`]
    /// says so, and the caller rebuilds its view from the device. Nothing is ever deleted.
    pub fn open_or_recover(
        path: &Path,
        now_unix_ms: u64,
    ) -> Result<(Journal, Option<Recovery>), JournalError> {
        if !path.exists() {
            return Ok((Self::create(path)?, None));
        }
        match Self::open_verified(path) {
            Ok(journal) => Ok((journal, None)),
            Err(err) => {
                let reason = err.to_string();
                let mut aside = path.as_os_str().to_owned();
                aside.push(format!(".damaged-{now_unix_ms}"));
                let kept_aside = PathBuf::from(aside);
                std::fs::rename(path, &kept_aside).map_err(|source| JournalError::MoveAside {
                    path: path.to_path_buf(),
                    source,
                })?;
                let journal = Self::create(path)?;
                Ok((journal, Some(Recovery { kept_aside, reason })))
            }
        }
    }

    /// Opens an existing journal read-only-in-spirit and verifies it; never recovers.
    pub fn open_verified(path: &Path) -> Result<Journal, JournalError> {
        let db = Database::open(path).map_err(|e| JournalError::db(path, e))?;
        let records = Self::load(path, &db)?;
        verify_chain(&records).map_err(|source| JournalError::Chain {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Journal {
            path: path.to_path_buf(),
            db,
            records,
        })
    }

    fn create(path: &Path) -> Result<Journal, JournalError> {
        let db = Database::create(path).map_err(|e| JournalError::db(path, e))?;
        let txn = db.begin_write().map_err(|e| JournalError::db(path, e))?;
        txn.open_table(RECORDS)
            .map_err(|e| JournalError::db(path, e))?;
        txn.commit().map_err(|e| JournalError::db(path, e))?;
        Ok(Journal {
            path: path.to_path_buf(),
            db,
            records: Vec::new(),
        })
    }

    fn load(path: &Path, db: &Database) -> Result<Vec<Record>, JournalError> {
        let txn = db.begin_read().map_err(|e| JournalError::db(path, e))?;
        let table = txn
            .open_table(RECORDS)
            .map_err(|e| JournalError::db(path, e))?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(|e| JournalError::db(path, e))? {
            let (key, value) = entry.map_err(|e| JournalError::db(path, e))?;
            let seq = key.value();
            let record: Record = serde_json::from_slice(value.value())
                .map_err(|source| JournalError::Encoding { seq, source })?;
            out.push(record);
        }
        Ok(out)
    }

    /// The file the journal lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// All records, oldest first.
    pub fn records(&self) -> &[Record] {
        &self.records
    }

    /// Appends a record and commits it durably (fsync) before returning.
    ///
    /// `seq` and `prev_hash` of `body` are overwritten here; the hash is computed here.
    pub fn append(&mut self, mut body: RecordBody) -> Result<&Record, JournalError> {
        body.seq = self.records.len() as u64;
        body.prev_hash = self
            .records
            .last()
            .map(|r| r.hash.clone())
            .unwrap_or_else(|| GENESIS.to_string());
        let seq = body.seq;
        let hash = body
            .compute_hash()
            .map_err(|source| JournalError::Encoding { seq, source })?;
        let record = Record {
            body,
            hash: hash.to_hex().to_string(),
        };
        let bytes =
            serde_json::to_vec(&record).map_err(|source| JournalError::Encoding { seq, source })?;
        let path = &self.path;
        let txn = self
            .db
            .begin_write()
            .map_err(|e| JournalError::db(path, e))?;
        {
            let mut table = txn
                .open_table(RECORDS)
                .map_err(|e| JournalError::db(path, e))?;
            table
                .insert(seq, bytes.as_slice())
                .map_err(|e| JournalError::db(path, e))?;
        }
        txn.commit().map_err(|e| JournalError::db(path, e))?;
        let index = self.records.len();
        self.records.push(record);
        Ok(&self.records[index])
    }

    /// The most recent value of `key` in any record's details.
    pub fn latest_detail(&self, key: &str) -> Option<&serde_json::Value> {
        self.records
            .iter()
            .rev()
            .find_map(|r| r.body.details.get(key))
    }

    /// The most recent record of `step` (any phase).
    pub fn latest_of(&self, step: &str) -> Option<&Record> {
        self.records.iter().rev().find(|r| r.body.step == step)
    }

    /// Convenience for building details.
    pub fn details<const N: usize>(
        pairs: [(&str, serde_json::Value); N],
    ) -> BTreeMap<String, serde_json::Value> {
        pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
    }
}
