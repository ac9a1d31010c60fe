//! Errors of the journal.

use std::path::PathBuf;

use crate::chain::ChainError;

/// What can go wrong with the journal.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JournalError {
    /// The redb database could not be created, opened or used.
    #[error("journal database {path}: {source}")]
    Database {
        /// The database file.
        path: PathBuf,
        /// What redb said.
        #[source]
        source: Box<redb::Error>,
    },
    /// A record could not be encoded or decoded.
    #[error("journal record {seq}: {source}")]
    Encoding {
        /// The record's sequence number.
        seq: u64,
        /// What serde said.
        #[source]
        source: serde_json::Error,
    },
    /// The hash chain is broken.
    #[error("journal {path}: {source}")]
    Chain {
        /// The database file.
        path: PathBuf,
        /// Where the chain breaks.
        #[source]
        source: ChainError,
    },
    /// Another process (a second `cryptfs run`) has the journal open for writing.
    #[error(
        "journal {path} is held by another cryptfs process (waited {}s): another `cryptfs run` \
         is in progress; let it finish (`cryptfs status` shows what it does) and retry",
        waited.as_secs()
    )]
    Busy {
        /// The database file.
        path: PathBuf,
        /// How long this process waited for it.
        waited: std::time::Duration,
    },
    /// Reading or copying the journal failed.
    #[error("journal {path}: {source}")]
    Io {
        /// The database file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A damaged journal could not be moved aside.
    #[error("could not move damaged journal {path} aside: {source}")]
    MoveAside {
        /// The database file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

impl JournalError {
    pub(crate) fn db(path: &std::path::Path, err: impl Into<redb::Error>) -> Self {
        JournalError::Database {
            path: path.to_path_buf(),
            source: Box::new(err.into()),
        }
    }
}
