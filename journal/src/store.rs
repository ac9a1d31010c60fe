//! The redb-backed store.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use redb::{
    Builder, ConcurrencyMode, Database, DatabaseError, ReadableDatabase, ReadableTable,
    StorageError, TableDefinition,
};

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

/// The records of a journal as a read-only reader saw them (see [`Journal::read_only`]).
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// All records, oldest first; the chain verified.
    pub records: Vec<Record>,
}

/// An open journal (the one writer).
pub struct Journal {
    path: PathBuf,
    db: Database,
    records: Vec<Record>,
}

impl AsRef<[Record]> for Journal {
    fn as_ref(&self) -> &[Record] {
        &self.records
    }
}

impl AsRef<[Record]> for Snapshot {
    fn as_ref(&self) -> &[Record] {
        &self.records
    }
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field("path", &self.path)
            .field("records", &self.records.len())
            .finish()
    }
}

/// How long a writer waits between two tries to open a journal another process holds.
const BUSY_RETRY: Duration = Duration::from_millis(100);

/// The writer uses redb's single-writer mode: a second writer is refused with
/// `DatabaseAlreadyOpen` (busy, never damage). Readers (`cryptfs status`) never open the file
/// itself: see [`Journal::read_only`].
///
/// Every open checks the file's integrity (each page's checksum): the journal is read from the
/// boot partition, and a damaged page must be an error, never trusted (redb may panic on one
/// otherwise). The journal is small; the check costs milliseconds.
fn builder() -> Builder {
    let mut builder = Builder::new();
    builder
        .set_concurrency_mode(ConcurrencyMode::SingleWriter)
        .set_check_integrity_on_open(true);
    builder
}

/// Why an open failed, in the three kinds a caller must tell apart.
enum OpenFailure {
    /// Another process has the journal open for writing: wait, never treat as damage.
    Busy,
    /// The bytes are not a journal cryptfs can trust: the only case that is kept aside.
    Damaged(JournalError),
    /// Anything else (I/O, permissions): reported as it is, nothing moved.
    Other(JournalError),
}

fn classify(path: &Path, err: DatabaseError) -> OpenFailure {
    match err {
        DatabaseError::DatabaseAlreadyOpen
        | DatabaseError::LockProtocolMismatch
        | DatabaseError::TransactionInProgress => OpenFailure::Busy,
        DatabaseError::Storage(StorageError::Corrupted(_)) | DatabaseError::UpgradeRequired(_) => {
            OpenFailure::Damaged(JournalError::db(path, err))
        }
        DatabaseError::Storage(StorageError::Io(io))
            if io.kind() == std::io::ErrorKind::InvalidData
                || io.kind() == std::io::ErrorKind::UnexpectedEof =>
        {
            // redb reports "this file holds no redb database" as InvalidData.
            OpenFailure::Damaged(JournalError::db(
                path,
                DatabaseError::Storage(StorageError::Io(io)),
            ))
        }
        other => OpenFailure::Other(JournalError::db(path, other)),
    }
}

impl Journal {
    /// Opens the journal at `path` for writing, creating it if absent, and verifies its chain.
    ///
    /// Another process holding the journal for writing (a second `cryptfs run`) is waited for,
    /// up to `wait`, then refused with [`JournalError::Busy`]: never mistaken for damage. Read-only
    /// handles (`cryptfs status`) never block it. A file whose bytes are not a journal, or whose
    /// chain is broken, is renamed to `<path>.damaged-<unix ms>` and replaced by an empty journal;
    /// the returned [`Recovery`] says so, and the caller rebuilds its view from the device.
    /// Nothing is ever deleted. I/O errors are returned as they are.
    pub fn open_or_recover(
        path: &Path,
        now_unix_ms: u64,
        wait: Duration,
    ) -> Result<(Journal, Option<Recovery>), JournalError> {
        let started = Instant::now();
        loop {
            let attempt = if path.exists() {
                Self::open_writer(path)
            } else {
                Self::create(path)
            };
            match attempt {
                Ok(journal) => return Ok((journal, None)),
                Err(OpenFailure::Busy) if started.elapsed() < wait => {
                    std::thread::sleep(BUSY_RETRY)
                }
                Err(OpenFailure::Busy) => {
                    return Err(JournalError::Busy {
                        path: path.to_path_buf(),
                        waited: started.elapsed(),
                    })
                }
                Err(OpenFailure::Other(err)) => return Err(err),
                Err(OpenFailure::Damaged(err)) => {
                    let journal = Self::set_aside_and_create(path, now_unix_ms, "damaged")?;
                    let kept_aside = journal.1;
                    return Ok((
                        journal.0,
                        Some(Recovery {
                            kept_aside,
                            reason: err.to_string(),
                        }),
                    ));
                }
            }
        }
    }

    /// Renames the journal at `path` to `<path>.<why>-<unix ms>` (never deletes it) and creates
    /// an empty one in its place; returns the new journal and where the old one went.
    pub fn set_aside_and_create(
        path: &Path,
        now_unix_ms: u64,
        why: &str,
    ) -> Result<(Journal, PathBuf), JournalError> {
        let mut aside = path.as_os_str().to_owned();
        aside.push(format!(".{why}-{now_unix_ms}"));
        let kept_aside = PathBuf::from(aside);
        std::fs::rename(path, &kept_aside).map_err(|source| JournalError::MoveAside {
            path: path.to_path_buf(),
            source,
        })?;
        match Self::create(path) {
            Ok(journal) => Ok((journal, kept_aside)),
            Err(OpenFailure::Busy) => Err(JournalError::Busy {
                path: path.to_path_buf(),
                waited: Duration::ZERO,
            }),
            Err(OpenFailure::Damaged(err) | OpenFailure::Other(err)) => Err(err),
        }
    }

    /// Opens an existing journal for writing and verifies it; never recovers, never waits.
    pub fn open_verified(path: &Path) -> Result<Journal, JournalError> {
        Self::open_writer(path).map_err(|failure| match failure {
            OpenFailure::Busy => JournalError::Busy {
                path: path.to_path_buf(),
                waited: Duration::ZERO,
            },
            OpenFailure::Damaged(err) | OpenFailure::Other(err) => err,
        })
    }

    /// Reads every record of the journal at `path` without writing to it and without taking
    /// any lock on it; the chain is verified.
    ///
    /// The bytes are copied to a private file in the temporary directory and opened there with
    /// redb's integrity check (every page checksum verified, any repair applied to the copy):
    /// a journal's bytes are as hostile as any other read from the boot partition, and only the
    /// checked open turns a damaged page into an error instead of trusting it. While a
    /// `cryptfs run` writes, the copy holds its commits so far; a copy caught in the middle of a
    /// commit fails the check and is taken again (a few times, briefly apart) before the
    /// failure is reported as damage.
    pub fn read_only(path: &Path) -> Result<Snapshot, JournalError> {
        const TRIES: usize = 4;
        let mut last_error = None;
        for attempt in 0..TRIES {
            if attempt > 0 {
                std::thread::sleep(BUSY_RETRY);
            }
            let io = |source| JournalError::Io {
                path: path.to_path_buf(),
                source,
            };
            let copy = tempfile::Builder::new()
                .prefix("cryptfs-journal-")
                .tempfile()
                .map_err(io)?;
            std::fs::copy(path, copy.path()).map_err(io)?;
            let db = match builder().open(copy.path()) {
                Ok(db) => db,
                Err(err) => {
                    last_error = Some(JournalError::db(path, err));
                    continue;
                }
            };
            let records = Self::load(path, &db)?;
            verify_chain(&records).map_err(|source| JournalError::Chain {
                path: path.to_path_buf(),
                source,
            })?;
            return Ok(Snapshot { records });
        }
        Err(last_error.unwrap_or_else(|| JournalError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::other("journal could not be read"),
        }))
    }

    fn open_writer(path: &Path) -> Result<Journal, OpenFailure> {
        let db = builder().open(path).map_err(|e| classify(path, e))?;
        let records = Self::load(path, &db).map_err(OpenFailure::Damaged)?;
        verify_chain(&records).map_err(|source| {
            OpenFailure::Damaged(JournalError::Chain {
                path: path.to_path_buf(),
                source,
            })
        })?;
        Ok(Journal {
            path: path.to_path_buf(),
            db,
            records,
        })
    }

    fn create(path: &Path) -> Result<Journal, OpenFailure> {
        let db = builder().create(path).map_err(|e| classify(path, e))?;
        let fail = |e: redb::Error| OpenFailure::Other(JournalError::db(path, e));
        let txn = db.begin_write().map_err(|e| fail(e.into()))?;
        txn.open_table(RECORDS).map_err(|e| fail(e.into()))?;
        txn.commit().map_err(|e| fail(e.into()))?;
        Ok(Journal {
            path: path.to_path_buf(),
            db,
            records: Vec::new(),
        })
    }

    fn load(path: &Path, db: &impl ReadableDatabase) -> Result<Vec<Record>, JournalError> {
        let txn = db.begin_read().map_err(|e| JournalError::db(path, e))?;
        let table = match txn.open_table(RECORDS) {
            Ok(table) => table,
            // A journal caught between its creation and its first commit holds nothing yet.
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(JournalError::db(path, e)),
        };
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
