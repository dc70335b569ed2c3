//! Per-user interaction histories: durable, bounded, replay-safe.
//!
//! A history is the user's last `N` items (registry ords, oldest first) and
//! the input position of the last interaction applied to it. That position
//! is what makes replays harmless: after a crash the consumer re-reads from
//! the last committed offset, and every interaction at or before the stored
//! position is recognised and skipped, so no item is counted twice.
//!
//! Ords, not SIDs, are stored: an item that moves to a new SID (its content
//! changed) is read under its current SID at request time.
//!
//! One [`Store`] (`histories.redb` in the given directory), key = user id,
//! value = `[partition: i32][offset: i64][ord: u32]*`, all big-endian.
//!
//! A user whose interactions come on several partitions (a producer that
//! does not key them by user) has one position per partition, not one: a
//! replay on one partition is no replay on another. The positions besides
//! the last are kept apart, under `\0at/` and the user id, as
//! `([partition: i32][offset: i64])*` (the 15 newest, newest first), and
//! travel with the history in its changelog record's header: a user keyed
//! as the contract asks has none, and costs one more key read an append.
//!
//! Appends are collected in memory in a [`Group`] of up to [`GROUP`] and
//! committed together; the feed worker calls [`Histories::flush`] before it
//! produces the feeds those appends caused, which is what lets their offsets
//! be committed.
//!
//! Each append is also written to the changelog topic (the Kafka Streams
//! pattern), naming the items by id ([`super::changelog`]): when a partition
//! moves to another instance, that instance [`restore`](Histories::restore)s
//! the partition's users from it.

use std::ops::Bound;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use crate::store::{Group, Store, StoreError};

/// Appends committed together at most (a commit costs as much as hundreds
/// of appends).
pub const GROUP: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("histories: {0}")]
    Store(#[from] StoreError),
    #[error("histories: the record of user {user:?} is corrupt ({len} bytes)")]
    Corrupt { user: String, len: usize },
    #[error(transparent)]
    Changelog(#[from] super::changelog::NotAHistory),
}

/// A position's bytes: a history record's header, and each of its user's
/// positions on other partitions.
const POSITION: usize = 12;

/// The offset of a history whose partition's log restarted: below every
/// offset, so that no interaction passes for a replay of one before it.
const FORGOTTEN: i64 = -1;

/// The key under which the changelog offset of a partition is kept: no user
/// id starts with a NUL byte (the contract refuses them).
fn changelog_key(partition: i32) -> Vec<u8> {
    [&b"\0changelog/"[..], &partition.to_be_bytes()].concat()
}

/// Where the positions of `user` on partitions besides the last are kept.
fn others_key(user: &str) -> Vec<u8> {
    [OTHERS_PREFIX, user.as_bytes()].concat()
}

const OTHERS_PREFIX: &[u8] = b"\0at/";

/// Where the refresh walk stands.
const REFRESH_KEY: &[u8] = b"\0refresh";

/// Partitions besides the last whose positions a user's history keeps: a
/// replay on a partition further back is taken for new (a duplicate entry).
const OTHERS: usize = 15;

/// Where in the interactions topic an event was read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Position {
    pub partition: i32,
    pub offset: i64,
}

impl Position {
    /// `[partition: i32][offset: i64]`, big-endian, as records hold it.
    fn to_bytes(self) -> [u8; POSITION] {
        let mut out = [0; POSITION];
        out[..4].copy_from_slice(&self.partition.to_be_bytes());
        out[4..].copy_from_slice(&self.offset.to_be_bytes());
        out
    }

    fn from_bytes(b: &[u8; POSITION]) -> Position {
        let (partition, offset) = b.split_at(4);
        Position {
            partition: i32::from_be_bytes(partition.try_into().expect("4 bytes")),
            offset: i64::from_be_bytes(offset.try_into().expect("8 bytes")),
        }
    }

    /// Positions one after another, as the store and the changelog's
    /// [`OTHERS`](super::changelog::OTHERS) header hold them.
    pub fn encode_all(all: &[Position]) -> Vec<u8> {
        all.iter().flat_map(|p| p.to_bytes()).collect()
    }

    /// The positions [`encode_all`](Self::encode_all) wrote; `None` unless
    /// `bytes` are whole positions.
    pub fn decode_all(bytes: &[u8]) -> Option<Vec<Position>> {
        let whole = bytes.chunks_exact(POSITION);
        whole.remainder().is_empty().then(|| {
            whole
                .map(|p| Position::from_bytes(p.try_into().expect("a whole position")))
                .collect()
        })
    }
}

pub struct Histories {
    db: Store,
    /// Appends not committed yet.
    staged: Mutex<Group>,
    capacity: usize,
}

impl Histories {
    /// Opens (or creates) the histories in `dir`, keeping `capacity` items
    /// per user.
    pub fn open(dir: &Path, capacity: usize) -> Result<Histories, HistoryError> {
        // Durable on flush only: the feed worker flushes once a second, and
        // the changelog holds what a crash loses (see `super::feeds`).
        let db = Store::open_in(dir, "histories.redb", Duration::MAX)?;
        Ok(Histories {
            db,
            staged: Mutex::default(),
            capacity,
        })
    }

    fn staged(&self) -> MutexGuard<'_, Group> {
        self.staged.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The value of `key` (a user's record, or one of the keys that start
    /// with NUL): staged, else committed.
    fn read(&self, staged: &Group, key: &[u8]) -> Result<Option<Vec<u8>>, HistoryError> {
        match staged.get(key) {
            Some(value) => Ok(value.map(<[u8]>::to_vec)),
            None => Ok(self.db.get(key)?),
        }
    }

    /// Stages `value` under `key`, committing the group when it is full.
    fn write(&self, staged: &mut Group, key: &[u8], value: Vec<u8>) -> Result<(), HistoryError> {
        staged.stage([(key.to_vec(), Some(value))]);
        if staged.due(GROUP, Duration::MAX) {
            staged.commit(&self.db)?;
        }
        Ok(())
    }

    /// Appends `ord` to `user`'s history unless the event at `at` was
    /// applied already. Returns the new history (for the changelog) when it
    /// was appended.
    pub fn append(
        &self,
        user: &str,
        at: Position,
        ord: u32,
    ) -> Result<Option<Stored>, HistoryError> {
        let mut staged = self.staged();
        let old = self.read(&staged, user.as_bytes())?;
        let (last, ords) = match &old {
            Some(v) => decode(user, v)?,
            None => (None, &[][..]),
        };
        let others = self.others(&staged, user)?;
        if applied(last, &others, at) {
            return Ok(None);
        }
        let others = match last {
            Some(last) if last.partition != at.partition => {
                let mut now = others;
                now.retain(|p| p.partition != at.partition);
                now.insert(0, last);
                now.truncate(OTHERS);
                stage_others(&mut staged, user, &now);
                now
            }
            _ => others,
        };
        let held = ords.len() / 4;
        let keep = held.min(self.capacity - 1);
        let mut value = header(at, keep + 1);
        value.extend_from_slice(&ords[(held - keep) * 4..]);
        value.extend_from_slice(&ord.to_be_bytes());
        self.write(&mut staged, user.as_bytes(), value.clone())?;
        Ok(Some(Stored { value, others }))
    }

    /// The positions of `user` besides the last, newest first.
    fn others(&self, staged: &Group, user: &str) -> Result<Vec<Position>, HistoryError> {
        let Some(bytes) = self.read(staged, &others_key(user))? else {
            return Ok(Vec::new());
        };
        Position::decode_all(&bytes).ok_or_else(|| HistoryError::Corrupt {
            user: user.to_string(),
            len: bytes.len(),
        })
    }

    /// Takes the history at `at` holding `ords` (read from the changelog),
    /// with its writer's positions on `others` partitions, as `user`'s
    /// unless the history held here is as recent. Returns whether it was
    /// taken.
    pub fn restore(
        &self,
        user: &str,
        at: Position,
        others: &[Position],
        ords: &[u32],
    ) -> Result<bool, HistoryError> {
        let others = &others[..others.len().min(OTHERS)];
        let mut staged = self.staged();
        if let Some(mine) = self.read(&staged, user.as_bytes())? {
            let (last, _) = decode(user, &mine)?;
            let mine = self.others(&staged, user)?;
            if applied(last, &mine, at) {
                return Ok(false);
            }
            // The history taken brings the positions it was applied up
            // to: a record read after it, older on its own partition,
            // is not taken over it.
            if mine != others {
                stage_others(&mut staged, user, others);
            }
        } else if !others.is_empty() {
            stage_others(&mut staged, user, others);
        }
        let keep = &ords[ords.len().saturating_sub(self.capacity)..];
        let mut value = header(at, keep.len());
        for ord in keep {
            value.extend_from_slice(&ord.to_be_bytes());
        }
        self.write(&mut staged, user.as_bytes(), value)?;
        Ok(true)
    }

    /// Forgets where the interactions of `partition`'s users were read,
    /// keeping their items: the partition's log restarted (the topic was
    /// made again, or the broker lost it), so its offsets begin again below
    /// the ones held, and every new interaction would pass for a replay.
    /// Returns how many users it touched.
    pub fn forget_offsets(&self, partition: i32) -> Result<usize, HistoryError> {
        let mut staged = self.staged();
        staged.commit(&self.db)?;
        let mut touched = 0;
        for kv in self.db.scan(&[])? {
            let (key, mut value) = kv?;
            // Positions on partitions besides the last are kept by
            // themselves, changelog offsets under other keys that start
            // with NUL.
            let positions = match key.strip_prefix(OTHERS_PREFIX) {
                Some(_) => value.len() / POSITION,
                None if key.first() == Some(&0) || value.len() < POSITION => continue,
                None => 1,
            };
            let mut forgot = false;
            for p in value[..positions * POSITION].chunks_exact_mut(POSITION) {
                if p[..4] == partition.to_be_bytes() {
                    p[4..].copy_from_slice(&FORGOTTEN.to_be_bytes());
                    forgot = true;
                }
            }
            if forgot {
                staged.stage([(key, Some(value))]);
                touched += 1;
                if staged.due(GROUP, Duration::MAX) {
                    staged.commit(&self.db)?;
                }
            }
        }
        staged.commit(&self.db)?;
        Ok(touched)
    }

    /// `user`'s items, oldest first, into `out` (cleared first).
    pub fn get(&self, user: &str, out: &mut Vec<u32>) -> Result<(), HistoryError> {
        out.clear();
        let v = self.read(&self.staged(), user.as_bytes())?;
        if let Some(v) = v {
            let (_, ords) = decode(user, &v)?;
            out.extend(
                ords.chunks_exact(4)
                    .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]])),
            );
        }
        Ok(())
    }

    /// The changelog offset of `partition` up to which these histories hold
    /// every record, as last recorded.
    pub fn changelog_offset(&self, partition: i32) -> Result<Option<i64>, HistoryError> {
        let value = self.read(&self.staged(), &changelog_key(partition))?;
        Ok(value.and_then(|v| Some(i64::from_be_bytes(v.as_slice().try_into().ok()?))))
    }

    /// Records that these histories hold every changelog record of
    /// `partition` up to `offset` (durable at the next flush).
    pub fn set_changelog_offset(&self, partition: i32, offset: i64) -> Result<(), HistoryError> {
        let mut staged = self.staged();
        staged.stage([(
            changelog_key(partition),
            Some(offset.to_be_bytes().to_vec()),
        )]);
        Ok(staged.commit(&self.db)?)
    }

    /// Up to `want` users after `after` (from the first when it is empty),
    /// each with where their last interaction was read, that `keep` takes
    /// by that partition, into `out` (cleared first). At most `scan` users
    /// are looked at, so that a store of other partitions' users is walked
    /// a step at a time. Returns the user to go on after, or `None` when the
    /// walk reached the end. Appends not committed yet are not seen.
    pub fn users(
        &self,
        after: &[u8],
        want: usize,
        scan: usize,
        keep: impl Fn(i32) -> bool,
        out: &mut Vec<(String, Position)>,
    ) -> Result<Option<Vec<u8>>, HistoryError> {
        out.clear();
        // Every key that is not a user's starts with NUL.
        let from = match after {
            [] => Bound::Included(&[1u8][..]),
            key => Bound::Excluded(key),
        };
        let mut entries = self.db.range(from)?;
        let mut last = None;
        for _ in 0..scan {
            let Some(kv) = entries.next() else {
                return Ok(None);
            };
            let (key, value) = kv?;
            // A corrupt record is for its feed to report, not the walk.
            if let Ok((Some(at), _)) = decode("", &value) {
                if keep(at.partition) {
                    out.push((String::from_utf8_lossy(&key).into_owned(), at));
                }
            }
            last = Some(key);
            if out.len() == want {
                break;
            }
        }
        Ok(last)
    }

    /// What [`set_refresh_walk`](Self::set_refresh_walk) last recorded.
    pub fn refresh_walk(&self) -> Result<Option<Vec<u8>>, HistoryError> {
        self.read(&self.staged(), REFRESH_KEY)
    }

    /// Records where the refresh walk stands ([`super::refresh`]), durable
    /// with the histories' next flush.
    pub fn set_refresh_walk(&self, walk: Vec<u8>) -> Result<(), HistoryError> {
        self.write(&mut self.staged(), REFRESH_KEY, walk)
    }

    /// Returns once every append so far is on disk.
    pub fn flush(&self) -> Result<(), HistoryError> {
        self.staged().commit(&self.db)?;
        self.db.flush()?;
        Ok(())
    }
}

impl Drop for Histories {
    /// Commits the staged appends; the store flushes when dropped.
    fn drop(&mut self) {
        let staged = self.staged.get_mut().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = staged.commit(&self.db) {
            tracing::error!(error = %e, "histories: staged appends not written on close");
        }
    }
}

/// Stages `others` as `user`'s positions besides the last (none: the key
/// goes).
fn stage_others(staged: &mut Group, user: &str, others: &[Position]) {
    let value = (!others.is_empty()).then(|| Position::encode_all(others));
    staged.stage([(others_key(user), value)]);
}

/// A history as [`Histories::append`] stored it.
pub struct Stored {
    value: Vec<u8>,
    others: Vec<Position>,
}

impl Stored {
    /// The items, oldest first.
    pub fn ords(&self) -> impl Iterator<Item = u32> + '_ {
        self.value[POSITION..]
            .chunks_exact(4)
            .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
    }

    /// The last positions applied on partitions besides the newest's,
    /// newest first: empty for a user whose interactions all come on one.
    pub fn others(&self) -> &[Position] {
        &self.others
    }
}

/// Whether a history last applied at `held` has the event at `at` already
/// (it is a replay, or older than what is held).
fn covers(held: Option<Position>, at: Position) -> bool {
    held.is_some_and(|p| p.partition == at.partition && at.offset <= p.offset)
}

/// Whether a history last applied at `last`, and at `others` on other
/// partitions, has the event at `at` already.
fn applied(last: Option<Position>, others: &[Position], at: Position) -> bool {
    covers(last, at) || others.iter().any(|&p| covers(Some(p), at))
}

/// A record's header (`at`), with room for `items` ords after it.
fn header(at: Position, items: usize) -> Vec<u8> {
    let mut value = Vec::with_capacity(POSITION + 4 * items);
    value.extend_from_slice(&at.to_bytes());
    value
}

/// The last applied position and the ords' bytes.
fn decode<'a>(user: &str, v: &'a [u8]) -> Result<(Option<Position>, &'a [u8]), HistoryError> {
    if v.len() < POSITION || (v.len() - POSITION) % 4 != 0 {
        return Err(HistoryError::Corrupt {
            user: user.to_string(),
            len: v.len(),
        });
    }
    let (at, ords) = v.split_first_chunk().expect("checked");
    Ok((Some(Position::from_bytes(at)), ords))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(partition: i32, offset: i64) -> Position {
        Position { partition, offset }
    }

    #[test]
    fn replays_are_skipped_and_the_history_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let h = Histories::open(dir.path(), 3).unwrap();
        let mut out = Vec::new();
        for (o, ord) in [(10, 1), (11, 2), (12, 3), (13, 4)] {
            assert!(h.append("u", at(0, o), ord).unwrap().is_some());
        }
        assert!(h.append("u", at(0, 12), 9).unwrap().is_none(), "a replay");
        assert!(h.append("u", at(0, 13), 9).unwrap().is_none(), "a replay");
        h.get("u", &mut out).unwrap();
        assert_eq!(out, [2, 3, 4]);
        assert!(
            h.append("u", at(1, 0), 5).unwrap().is_some(),
            "another partition"
        );
        h.get("u", &mut out).unwrap();
        assert_eq!(out, [3, 4, 5]);
        h.get("nobody", &mut out).unwrap();
        assert!(out.is_empty());
    }

    #[test]
    fn a_user_on_several_partitions_has_a_replay_recognised_on_each() {
        let dir = tempfile::tempdir().unwrap();
        {
            let h = Histories::open(dir.path(), 10).unwrap();
            for (p, o, ord) in [(0, 10, 1), (1, 5, 2), (2, 7, 3), (0, 11, 4)] {
                assert!(h.append("u", at(p, o), ord).unwrap().is_some());
            }
            h.flush().unwrap();
        }
        let h = Histories::open(dir.path(), 10).unwrap();
        for (p, o) in [(0, 10), (0, 11), (1, 4), (1, 5), (2, 7)] {
            assert!(
                h.append("u", at(p, o), 9).unwrap().is_none(),
                "({p}, {o}) is a replay"
            );
        }
        assert!(h.append("u", at(1, 6), 5).unwrap().is_some());
        assert!(h.append("u", at(0, 11), 9).unwrap().is_none());
        let mut out = Vec::new();
        h.get("u", &mut out).unwrap();
        assert_eq!(out, [1, 2, 3, 4, 5]);

        // A changelog record older than what was applied on its partition
        // is not taken, though another partition's interaction came last;
        // a newer one is, with the positions it brings.
        assert!(!h.restore("u", at(2, 6), &[], &[7]).unwrap());
        let others = [at(1, 6), at(0, 11)];
        assert!(h
            .restore("u", at(2, 8), &others, &[1, 2, 3, 4, 5, 6])
            .unwrap());
        for (p, o) in [(0, 11), (1, 6), (2, 8)] {
            assert!(h.append("u", at(p, o), 9).unwrap().is_none(), "({p}, {o})");
        }
        let record = h.append("u", at(0, 12), 7).unwrap().unwrap();
        assert_eq!(record.others(), [at(2, 8), at(1, 6)]);
        h.get("u", &mut out).unwrap();
        assert_eq!(out, [1, 2, 3, 4, 5, 6, 7]);
    }

    #[test]
    fn restored_records_are_taken_newest_whatever_order_their_partitions_are_read_in() {
        // A user's records on three changelog partitions: the newest of
        // each, as the writer appended them (items 1..=k).
        let records = [
            (
                at(0, 2),
                vec![at(2, 1), at(1, 1)],
                vec![1, 2, 3, 4, 5, 6, 7],
            ),
            (
                at(1, 2),
                vec![at(0, 2), at(2, 1)],
                vec![1, 2, 3, 4, 5, 6, 7, 8],
            ),
            (
                at(2, 2),
                vec![at(1, 2), at(0, 2)],
                vec![1, 2, 3, 4, 5, 6, 7, 8, 9],
            ),
        ];
        for order in [[0, 1, 2], [2, 1, 0], [1, 2, 0], [2, 0, 1]] {
            let dir = tempfile::tempdir().unwrap();
            let h = Histories::open(dir.path(), 50).unwrap();
            for i in order {
                let (at, others, ords) = &records[i];
                h.restore("u", *at, others, ords).unwrap();
            }
            let mut out = Vec::new();
            h.get("u", &mut out).unwrap();
            assert_eq!(out, records[2].2, "{order:?}");
            for (at, _, _) in &records {
                assert!(h.append("u", *at, 0).unwrap().is_none(), "{order:?}");
            }
        }
    }

    #[test]
    fn positions_are_kept_for_a_bounded_number_of_partitions() {
        let dir = tempfile::tempdir().unwrap();
        let h = Histories::open(dir.path(), 50).unwrap();
        let partitions = OTHERS as i32 + 2;
        for p in 0..partitions {
            assert!(h.append("u", at(p, 3), p as u32).unwrap().is_some());
        }
        for p in 1..partitions {
            assert!(h.append("u", at(p, 3), 0).unwrap().is_none(), "{p}");
        }
        assert!(
            h.append("u", at(0, 3), 0).unwrap().is_some(),
            "the oldest partition's position was let go"
        );
        // So of a changelog record's, whatever its header holds.
        let many: Vec<Position> = (1..=partitions).map(|p| at(p, 3)).collect();
        assert!(h.restore("v", at(0, 3), &many, &[1]).unwrap());
        let record = h.append("v", at(0, 4), 2).unwrap().unwrap();
        assert_eq!(record.others(), &many[..OTHERS]);
    }

    #[test]
    fn forgotten_offsets_let_a_restarted_partition_append_again() {
        let dir = tempfile::tempdir().unwrap();
        let h = Histories::open(dir.path(), 5).unwrap();
        h.append("u", at(0, 40), 1).unwrap();
        h.append("v", at(1, 40), 2).unwrap();
        h.set_changelog_offset(0, 7).unwrap();
        // Partition 0 restarted: its offsets begin again at 0.
        assert!(
            h.append("u", at(0, 3), 3).unwrap().is_none(),
            "taken for a replay"
        );
        assert_eq!(h.forget_offsets(0).unwrap(), 1);
        let record = h.append("u", at(0, 3), 3).unwrap().expect("appended");
        assert!(
            h.append("u", at(0, 3), 3).unwrap().is_none(),
            "a replay again"
        );
        assert!(
            h.append("v", at(1, 39), 4).unwrap().is_none(),
            "partition 1 kept"
        );
        let mut out = Vec::new();
        h.get("u", &mut out).unwrap();
        assert_eq!(out, [1, 3]);
        assert_eq!(record.ords().collect::<Vec<_>>(), [1, 3]);
        assert_eq!(h.changelog_offset(0).unwrap(), Some(7));
        // So for a user whose last interaction came on another partition.
        h.append("x", at(0, 50), 1).unwrap();
        h.append("x", at(1, 50), 2).unwrap();
        assert_eq!(h.forget_offsets(0).unwrap(), 2);
        assert!(h.append("x", at(0, 4), 3).unwrap().is_some());
        assert!(h.append("x", at(1, 50), 3).unwrap().is_none());
        // A changelog record of the restarted partition is newer than a
        // forgotten history.
        let other = Histories::open(&dir.path().join("other"), 5).unwrap();
        other.append("w", at(0, 9), 1).unwrap();
        other.forget_offsets(0).unwrap();
        assert!(other.restore("w", at(0, 4), &[], &[2]).unwrap());
    }

    #[test]
    fn histories_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let h = Histories::open(dir.path(), 5).unwrap();
            h.append("a", at(0, 1), 7).unwrap();
            h.append("b", at(0, 2), 8).unwrap();
            h.flush().unwrap();
        }
        let h = Histories::open(dir.path(), 5).unwrap();
        let mut out = Vec::new();
        h.get("a", &mut out).unwrap();
        assert_eq!(out, [7]);
        h.get("b", &mut out).unwrap();
        assert_eq!(out, [8]);
        assert!(h.append("a", at(0, 1), 7).unwrap().is_none());
    }

    #[test]
    fn the_changelog_offset_is_kept_per_partition_apart_from_users() {
        let dir = tempfile::tempdir().unwrap();
        {
            let h = Histories::open(dir.path(), 5).unwrap();
            assert_eq!(h.changelog_offset(1).unwrap(), None);
            h.append("u", at(1, 3), 7).unwrap();
            h.set_changelog_offset(1, 41).unwrap();
            h.set_changelog_offset(2, 9).unwrap();
            h.set_changelog_offset(1, 42).unwrap();
            h.flush().unwrap();
        }
        let h = Histories::open(dir.path(), 5).unwrap();
        assert_eq!(h.changelog_offset(1).unwrap(), Some(42));
        assert_eq!(h.changelog_offset(2).unwrap(), Some(9));
        assert_eq!(h.changelog_offset(3).unwrap(), None);
        let mut out = Vec::new();
        h.get("u", &mut out).unwrap();
        assert_eq!(out, [7]);
    }

    #[test]
    fn a_changelog_record_restores_a_history_unless_it_is_older() {
        let dir = tempfile::tempdir().unwrap();
        let h = Histories::open(dir.path(), 3).unwrap();
        h.append("u", at(2, 3), 7).unwrap();
        assert!(h.restore("u", at(2, 5), &[], &[1, 2, 7, 8]).unwrap());
        let mut out = Vec::new();
        h.get("u", &mut out).unwrap();
        assert_eq!(out, [2, 7, 8], "bounded as appends are");
        assert!(
            !h.restore("u", at(2, 4), &[], &[9]).unwrap(),
            "older than what is held"
        );
        assert!(
            h.append("u", at(2, 5), 9).unwrap().is_none(),
            "restored position"
        );
        assert!(h.restore("v", at(1, 0), &[], &[]).unwrap());
        h.get("v", &mut out).unwrap();
        assert!(out.is_empty());
    }
}
