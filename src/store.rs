//! The local key-value store under the registry and the histories.
//!
//! One ordered table of byte keys and values in one redb file. redb was
//! chosen over sled 0.34 by measurement (README, "State store"): a stable
//! file format, copy-on-write pages with checksummed commit slots (a crash
//! leaves the last durable commit, never a torn one), and a smaller file.
//!
//! # Durability
//!
//! Writes are grouped by the caller ([`Store::write`] is one atomic commit)
//! and made durable in two ways, the way sled did for us before:
//!
//! - [`Store::flush`] returns once everything written before it is on disk
//!   (an fsync). The service calls it before committing the input offsets the
//!   writes came from, so nothing it acknowledged can be lost.
//! - A write that comes more than `flush_every` after the last durable commit
//!   is itself durable, which bounds what a crash loses when nobody flushes.
//!
//! Other writes are committed without an fsync: visible to readers at once,
//! and after a crash either all there or not at all (the store reopens at its
//! last durable commit). Commits are whole, so a crash never splits a group.
//!
//! Dropping the store flushes it.
//!
//! # Groups
//!
//! A commit costs tens of microseconds even without an fsync, so writers
//! that write one small event at a time (a history append, a catalogue event)
//! collect them in a [`Group`] and commit it as one: readers of the writer
//! look in the group first.

use std::collections::HashMap;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use redb::{Database, Durability, ReadableDatabase, TableDefinition};

const TABLE: TableDefinition<&[u8], &[u8]> = TableDefinition::new("kv");

/// How long opening waits for a store that another process has open: a
/// restart right after a `kill -9` can come before the kernel has released
/// the dead process's lock, and a supervisor may start the new process
/// while the old one still drains.
const OPEN_WAIT: Duration = Duration::from_secs(10);

/// The most of a store's file that redb keeps in memory (its page cache
/// and write buffer). redb's default, 1 GiB for each of the service's three
/// stores, lets the caches alone grow to 3 GiB with a large catalogue,
/// while the kernel's page cache holds the file's pages anyway. At 64 MiB
/// `cargo bench --bench store` (1M items, 1M users, one run each) gave
/// 109,440 upserts/s and 49,023 appends/s against 116,116 and 53,046 at
/// 1 GiB, sled's figures moving as much between the two runs.
const CACHE_BYTES: usize = 64 << 20;

/// What went wrong, and in which store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store {path}: {source}")]
    Redb { path: PathBuf, source: redb::Error },
    #[error("store {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("store {path} is open in another process (another genfeed with the same state_dir, or one still stopping); waited {waited_ms} ms for it to close")]
    InUse { path: PathBuf, waited_ms: u128 },
    #[error("{path} was written by sled, before genfeed kept its state in redb, and is not converted: remove the directory, and the service rebuilds it (the registry from the catalogue topic, the histories from the changelog)")]
    Sled { path: PathBuf },
}

/// A key and its value.
pub type Entry = (Vec<u8>, Vec<u8>);

pub struct Store {
    db: Database,
    path: PathBuf,
    flush_every: Duration,
    /// When the last durable commit returned.
    durable: Mutex<Instant>,
}

impl Store {
    /// Opens (or creates) the store `file` in `dir`, creating `dir`. A
    /// directory that sled wrote (its `conf` and `db` files) is refused.
    pub fn open_in(dir: &Path, file: &str, flush_every: Duration) -> Result<Store, StoreError> {
        if dir.join("conf").is_file() && dir.join("db").is_file() {
            return Err(StoreError::Sled {
                path: dir.to_path_buf(),
            });
        }
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        Store::open(&dir.join(file), flush_every, OPEN_WAIT)
    }

    /// Opens (or creates) the store file at `path`, waiting up to `wait`
    /// while another process has it open. After a crash, opening repairs
    /// the file back to its last durable commit.
    fn open(path: &Path, flush_every: Duration, wait: Duration) -> Result<Store, StoreError> {
        let fail = |source: redb::Error| StoreError::Redb {
            path: path.to_path_buf(),
            source,
        };
        let start = Instant::now();
        let mut told = false;
        let db = loop {
            match Database::builder().set_cache_size(CACHE_BYTES).create(path) {
                Ok(db) => break db,
                Err(redb::DatabaseError::DatabaseAlreadyOpen) if start.elapsed() < wait => {
                    if !std::mem::replace(&mut told, true) {
                        tracing::warn!(path = %path.display(), ms = wait.as_millis() as u64, "open in another process; waiting for it to close");
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                    return Err(StoreError::InUse {
                        path: path.to_path_buf(),
                        waited_ms: start.elapsed().as_millis(),
                    })
                }
                Err(e) => return Err(fail(e.into())),
            }
        };
        let store = Store {
            db,
            path: path.to_path_buf(),
            flush_every,
            durable: Mutex::new(Instant::now()),
        };
        // Creates the table, so that readers never find it missing.
        store.write(std::iter::empty())?;
        store.flush()?;
        Ok(store)
    }

    fn fail(&self, source: impl Into<redb::Error>) -> StoreError {
        StoreError::Redb {
            path: self.path.clone(),
            source: source.into(),
        }
    }

    /// The value of `key`.
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.fail(e))?;
        let table = txn.open_table(TABLE).map_err(|e| self.fail(e))?;
        let value = table.get(key).map_err(|e| self.fail(e))?;
        Ok(value.map(|v| v.value().to_vec()))
    }

    /// Applies `writes` (`None` removes the key) as one atomic commit.
    pub fn write<'a>(
        &self,
        writes: impl IntoIterator<Item = (&'a [u8], Option<&'a [u8]>)>,
    ) -> Result<(), StoreError> {
        let mut durable = self.durable.lock().unwrap_or_else(|e| e.into_inner());
        let mut txn = self.db.begin_write().map_err(|e| self.fail(e))?;
        let make_durable = durable.elapsed() >= self.flush_every;
        if !make_durable {
            txn.set_durability(Durability::None)
                .map_err(|e| self.fail(e))?;
        }
        {
            let mut table = txn.open_table(TABLE).map_err(|e| self.fail(e))?;
            for (key, value) in writes {
                match value {
                    Some(value) => table.insert(key, value).map(drop),
                    None => table.remove(key).map(drop),
                }
                .map_err(|e| self.fail(e))?;
            }
        }
        txn.commit().map_err(|e| self.fail(e))?;
        if make_durable {
            *durable = Instant::now();
        }
        Ok(())
    }

    /// Returns once every write so far is on disk.
    pub fn flush(&self) -> Result<(), StoreError> {
        let mut durable = self.durable.lock().unwrap_or_else(|e| e.into_inner());
        let txn = self.db.begin_write().map_err(|e| self.fail(e))?;
        txn.commit().map_err(|e| self.fail(e))?;
        *durable = Instant::now();
        Ok(())
    }

    /// The entries whose key starts with `prefix`, in key order.
    pub fn scan(
        &self,
        prefix: &[u8],
    ) -> Result<impl Iterator<Item = Result<Entry, StoreError>> + '_, StoreError> {
        let prefix = prefix.to_vec();
        Ok(self
            .range(Bound::Included(&prefix))?
            .take_while(move |kv| kv.as_ref().map_or(true, |(k, _)| k.starts_with(&prefix))))
    }

    /// The entries from `from` on, in key order: a walk that goes on where
    /// it stopped (`Bound::Excluded`), each step in a read transaction of
    /// its own.
    pub fn range(
        &self,
        from: Bound<&[u8]>,
    ) -> Result<impl Iterator<Item = Result<Entry, StoreError>> + '_, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.fail(e))?;
        let table = txn.open_table(TABLE).map_err(|e| self.fail(e))?;
        let range = table
            .range::<&[u8]>((from, Bound::Unbounded))
            .map_err(|e| self.fail(e))?;
        Ok(range.map(move |kv| {
            kv.map(|(k, v)| (k.value().to_vec(), v.value().to_vec()))
                .map_err(|e| self.fail(e))
        }))
    }

    /// The entry with the greatest key below `key`.
    pub fn last_below(&self, key: &[u8]) -> Result<Option<Entry>, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.fail(e))?;
        let table = txn.open_table(TABLE).map_err(|e| self.fail(e))?;
        let mut range = table
            .range::<&[u8]>((Bound::Unbounded, Bound::Excluded(key)))
            .map_err(|e| self.fail(e))?;
        match range.next_back() {
            Some(kv) => {
                let (k, v) = kv.map_err(|e| self.fail(e))?;
                Ok(Some((k.value().to_vec(), v.value().to_vec())))
            }
            None => Ok(None),
        }
    }

    /// Removes every key, durably.
    pub fn clear(&self) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(|e| self.fail(e))?;
        {
            let mut table = txn.open_table(TABLE).map_err(|e| self.fail(e))?;
            table.retain(|_, _| false).map_err(|e| self.fail(e))?;
        }
        txn.commit().map_err(|e| self.fail(e))?;
        *self.durable.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        Ok(())
    }
}

/// Writes of whole events, not committed yet; `None` removes the key.
#[derive(Default)]
pub struct Group {
    writes: HashMap<Vec<u8>, Option<Vec<u8>>>,
    events: usize,
    /// When the oldest event of the group was staged.
    since: Option<Instant>,
}

impl Group {
    /// Adds the writes of one event.
    pub fn stage(&mut self, writes: impl IntoIterator<Item = (Vec<u8>, Option<Vec<u8>>)>) {
        self.writes.extend(writes);
        self.events += 1;
        self.since.get_or_insert_with(Instant::now);
    }

    /// The staged value of `key`: `Some(None)` when the group removes it,
    /// `None` when the group does not touch it.
    pub fn get(&self, key: &[u8]) -> Option<Option<&[u8]>> {
        self.writes.get(key).map(Option::as_deref)
    }

    /// Whether the group has `events` events, or its oldest is `age` old.
    pub fn due(&self, events: usize, age: Duration) -> bool {
        self.events >= events || self.since.is_some_and(|t| t.elapsed() >= age)
    }

    /// Commits the group to `store` as one write and empties it.
    pub fn commit(&mut self, store: &Store) -> Result<(), StoreError> {
        if !self.writes.is_empty() {
            store.write(
                self.writes
                    .iter()
                    .map(|(k, v)| (k.as_slice(), v.as_deref())),
            )?;
            self.writes.clear();
        }
        self.events = 0;
        self.since = None;
        Ok(())
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        if let Err(e) = self.flush() {
            tracing::error!(error = %e, "store: the last writes could not be made durable");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_open_elsewhere_is_waited_for_then_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let first = Store::open(&path, Duration::MAX, Duration::ZERO).unwrap();
        let wait = Duration::from_millis(200);
        match Store::open(&path, Duration::MAX, wait) {
            Err(e @ StoreError::InUse { waited_ms, .. }) => {
                assert!(waited_ms >= wait.as_millis(), "{e}");
                assert!(e.to_string().contains("s.redb"), "{e}");
            }
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("opened twice"),
        }
        // Once the holder closes, a waiting open gets it.
        let second =
            std::thread::spawn(move || Store::open(&path, Duration::MAX, Duration::from_secs(60)));
        drop(first);
        assert!(second.join().unwrap().is_ok());
    }
}
