//! The index of live semantic IDs that decoding is constrained to.
//!
//! `fst` maps are immutable, so the index is a small LSM, shaped like a tantivy
//! segment store:
//!
//! - a **base segment** ([`segment`]): an `fst::Map` of SID → item number on
//!   disk, memory-mapped, with its decoding tables ([`trie`]);
//! - an **overlay** ([`overlay`]): SIDs added since the base, base SIDs removed
//!   (tombstones) and the live counts of trie nodes, in persistent structures
//!   that clone in constant time;
//! - **snapshots**: an `Arc` of base + overlay, published through an
//!   [`ArcSwap`]. Readers load the current snapshot without a lock and keep it
//!   as long as they like; the writer never waits for them;
//! - a **merge** that folds the overlay into a new base in a background thread
//!   once it passes a threshold. Changes applied while the merge runs are
//!   logged and replayed on the new base, and the swap is one publish.
//!
//! Decoding reads a snapshot through [`Cursor`]s: one per beam, stepped token by
//! token. [`Snapshot::fill_mask`] turns a batch of cursors into the additive
//! mask the model applies to its logits (`0` allowed, `-inf` not): for each beam
//! a slice of the CSR tables, filtered by live counts. A prefix whose items were
//! all retired has count zero and is never offered.
//!
//! What survives a crash: the base segment of the generation the caller last
//! recorded (written to a temporary file, fsynced, renamed, directory fsynced;
//! see [`Index::merge_now`]). The overlay lives in memory; on open it is
//! recomputed by diffing the base against the registry's live set, so the
//! index always equals the registry after a restart, whatever was interrupted.

pub mod chunked;
pub mod overlay;
pub mod segment;
pub mod trie;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use arc_swap::ArcSwap;

use crate::sid::{Code, Sid, MAX_LEVELS};
use overlay::{extend, Overlay, PrefixKey, EXTRA};
use segment::Segment;
use trie::NONE;

/// Why the index could not be opened, written or merged.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: damaged index segment: {detail}")]
    Corrupt { path: PathBuf, detail: String },
    #[error("invalid index input: {0}")]
    Invalid(String),
    #[error("the background merge stopped: {0}")]
    MergeFailed(String),
}

/// One consistent view of the live SIDs.
pub struct Snapshot {
    seq: u64,
    base: Arc<Segment>,
    overlay: Overlay,
}

/// Where one beam is in the trie of a snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cursor {
    /// Codes consumed so far.
    depth: u8,
    /// The base node, or [`NONE`] once the path left the base.
    node: u32,
    prefix: u128,
}

impl Cursor {
    pub fn depth(&self) -> usize {
        usize::from(self.depth)
    }

    fn key(&self) -> PrefixKey {
        (self.depth, self.prefix)
    }
}

impl Snapshot {
    /// Publication number: grows by one at every publish.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The base segment's generation.
    pub fn generation(&self) -> u64 {
        self.base.generation()
    }

    pub fn levels(&self) -> usize {
        self.base.trie().levels()
    }

    pub fn vocab(&self) -> &[usize] {
        self.base.trie().vocab()
    }

    /// Live items.
    pub fn len(&self) -> usize {
        (self.overlay.counts[0].get(0) & !EXTRA) as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The item number of a live SID.
    pub fn get(&self, sid: Sid) -> Option<u32> {
        self.overlay.get(&self.base, sid)
    }

    /// Overlay changes not yet merged into the base.
    pub fn pending(&self) -> usize {
        self.overlay.size()
    }

    /// The cursor before the first token.
    pub fn root(&self) -> Cursor {
        Cursor {
            depth: 0,
            node: 0,
            prefix: 0,
        }
    }

    #[inline]
    fn node_live(&self, depth: usize, node: usize) -> bool {
        self.overlay.counts[depth].get(node) & !EXTRA > 0
    }

    /// Calls `f` with every token allowed after `cursor`: each leads to at least
    /// one live item.
    #[inline]
    pub fn allowed(&self, cursor: Cursor, mut f: impl FnMut(Code)) {
        let d = cursor.depth();
        if d >= self.levels() {
            return;
        }
        let trie = self.base.trie();
        if let Some(bits) = self.dense_bits(cursor) {
            for (i, &word) in bits.iter().enumerate() {
                let mut bits = word;
                while bits != 0 {
                    f((i * 64) as Code + bits.trailing_zeros() as Code);
                    bits &= bits - 1;
                }
            }
            return;
        }
        let mut extra = cursor.node == NONE;
        if cursor.node != NONE {
            for k in trie.children(d, cursor.node) {
                if self.node_live(d + 1, k) {
                    f(trie.token(d, k));
                }
            }
            extra = self.overlay.counts[d].get(cursor.node as usize) & EXTRA != 0;
        }
        if extra {
            if let Some(codes) = self.overlay.extra_children.get(&cursor.key()) {
                for &c in codes {
                    if self
                        .overlay
                        .extra
                        .get(&extend(cursor.key(), c))
                        .is_some_and(|&n| n > 0)
                    {
                        f(c);
                    }
                }
            }
        }
    }

    /// The live-children bitset of a cursor on a dense level, if it is on one.
    #[inline]
    fn dense_bits(&self, cursor: Cursor) -> Option<&[u64]> {
        let d = cursor.depth();
        if cursor.node == NONE || d >= self.overlay.dense.len() {
            return None;
        }
        let w = self.overlay.words[d];
        Some(self.overlay.dense[d].run(cursor.node as usize * w, w))
    }

    /// The cursor after `code`, if that leads to a live item.
    #[inline]
    pub fn step(&self, cursor: Cursor, code: Code) -> Option<Cursor> {
        let d = cursor.depth();
        if d >= self.levels() {
            return None;
        }
        let key = extend(cursor.key(), code);
        if cursor.node != NONE {
            let child = self.base.trie().child(d, cursor.node, code);
            if child != NONE {
                return self.node_live(d + 1, child as usize).then_some(Cursor {
                    depth: key.0,
                    node: child,
                    prefix: key.1,
                });
            }
        }
        self.overlay
            .extra
            .get(&key)
            .is_some_and(|&n| n > 0)
            .then_some(Cursor {
                depth: key.0,
                node: NONE,
                prefix: key.1,
            })
    }

    /// The cursor after a whole prefix.
    pub fn seek(&self, codes: &[Code]) -> Option<Cursor> {
        codes
            .iter()
            .try_fold(self.root(), |c, &code| self.step(c, code))
    }

    /// The SID a full-depth cursor spells.
    pub fn sid(&self, cursor: Cursor) -> Option<Sid> {
        let mut codes = [0 as Code; MAX_LEVELS];
        for (i, c) in codes.iter_mut().enumerate().take(cursor.depth()) {
            *c = (cursor.prefix >> (16 * i)) as Code;
        }
        Sid::new(&codes[..cursor.depth()]).ok()
    }

    /// Fills `mask` (`cursors.len()` rows of `vocab` floats) with `0.0` where a
    /// token is allowed and `-inf` elsewhere: the additive logit mask of one
    /// decoding step for a batch of beams.
    pub fn fill_mask(&self, cursors: &[Cursor], vocab: usize, mask: &mut [f32]) {
        assert_eq!(mask.len(), cursors.len() * vocab);
        for (row, &cursor) in mask.chunks_exact_mut(vocab).zip(cursors) {
            if let Some(bits) = self.dense_bits(cursor) {
                let n = (bits.len() * 64).min(vocab);
                let set: u32 = bits.iter().map(|w| w.count_ones()).sum();
                if set as usize * 4 > n {
                    // Mostly allowed (near the root): one branch-free pass
                    // from bits to floats.
                    let neg = f32::NEG_INFINITY.to_bits();
                    for (chunk, &word) in row[..n].chunks_mut(64).zip(bits) {
                        for (b, x) in chunk.iter_mut().enumerate() {
                            let blocked = ((word >> b) & 1) as u32 ^ 1;
                            *x = f32::from_bits(blocked.wrapping_neg() & neg);
                        }
                    }
                    row[n..].fill(f32::NEG_INFINITY);
                    continue;
                }
            }
            row.fill(f32::NEG_INFINITY);
            self.allowed(cursor, |c| {
                if let Some(x) = row.get_mut(usize::from(c)) {
                    *x = 0.0;
                }
            });
        }
    }

    /// The allowed tokens of a batch of beams in CSR form: beam `i`'s tokens
    /// are `tokens[offsets[i]..offsets[i + 1]]`. This is the sparse form a
    /// device-side scatter turns into a mask; both buffers are reused.
    pub fn gather_allowed(
        &self,
        cursors: &[Cursor],
        tokens: &mut Vec<Code>,
        offsets: &mut Vec<u32>,
    ) {
        tokens.clear();
        offsets.clear();
        offsets.push(0);
        for &cursor in cursors {
            self.allowed(cursor, |c| tokens.push(c));
            offsets.push(tokens.len() as u32);
        }
    }

    /// Tokens allowed after a prefix (empty if the prefix has no live item).
    pub fn allowed_after(&self, codes: &[Code]) -> Vec<Code> {
        let mut out = Vec::new();
        if let Some(c) = self.seek(codes) {
            self.allowed(c, |code| out.push(code));
        }
        out.sort_unstable();
        out
    }

    /// Every live `(sid, item)` in SID order.
    pub fn live(&self) -> Vec<(Sid, u32)> {
        let mut out = Vec::with_capacity(self.len());
        let mut added = self.overlay.added.iter().peekable();
        self.base.for_each(|sid, ord| {
            while let Some((&a, &o)) = added.peek() {
                if a < sid {
                    out.push((a, o));
                    added.next();
                } else {
                    break;
                }
            }
            if let Some((&a, &o)) = added.peek() {
                if a == sid {
                    out.push((a, o));
                    added.next();
                    return;
                }
            }
            if !self.overlay.removed.contains(&sid) {
                out.push((sid, ord));
            }
        });
        out.extend(added.map(|(&a, &o)| (a, o)));
        out
    }

    /// Bytes: base FST on disk, base tables, overlay counters.
    pub fn bytes(&self) -> (usize, usize, usize) {
        let (fst, tables) = self.base.bytes();
        (
            fst,
            tables,
            self.overlay.counts.iter().map(|c| c.heap_bytes()).sum(),
        )
    }
}

/// A cheap handle readers keep: `snapshot()` never blocks.
#[derive(Clone)]
pub struct IndexReader {
    current: Arc<ArcSwap<Snapshot>>,
}

impl IndexReader {
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }
}

/// How [`Index::open`] found the base.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Opened {
    /// The recorded generation opened and verified.
    Reopened,
    /// No generation was recorded: a first base was written.
    Created,
    /// The recorded base could not be used and was rebuilt from the live set.
    Rebuilt { reason: String },
}

/// One edit of the live set, as the writer logs it for a merge in flight
/// to replay.
#[derive(Clone, Copy)]
enum Edit {
    Insert(Sid, u32),
    Remove(Sid),
}

impl Edit {
    fn apply(self, overlay: &mut Overlay, base: &Segment) {
        match self {
            Edit::Insert(sid, ord) => overlay.insert(base, sid, ord),
            Edit::Remove(sid) => overlay.remove(base, sid),
        };
    }
}

/// A merge in flight. Changes applied meanwhile go to the merge thread too,
/// which replays them onto the new base once it is written, so that the swap
/// on the writer's thread replays only the last few: replaying thousands
/// there would stall publishing for milliseconds.
struct Merge {
    handle: JoinHandle<Result<Merged, IndexError>>,
    log: Vec<Edit>,
    tx: std::sync::mpsc::Sender<Edit>,
}

struct Merged {
    base: Segment,
    overlay: Overlay,
    /// How many logged changes `overlay` already holds.
    replayed: usize,
}

/// The writer: applies changes, publishes snapshots, merges.
pub struct Index {
    dir: PathBuf,
    vocab: Vec<usize>,
    merge_threshold: usize,
    base: Arc<Segment>,
    overlay: Overlay,
    seq: u64,
    current: Arc<ArcSwap<Snapshot>>,
    merge: Option<Merge>,
    /// Published snapshots that may still be alive, oldest first.
    published: std::collections::VecDeque<(u64, std::sync::Weak<Snapshot>)>,
}

impl Index {
    /// Opens the index in `dir` whose base is `generation` (as recorded by the
    /// caller after the last merge), and brings it level with `live`, the
    /// registry's live set in SID order. A missing or damaged base is rebuilt
    /// from `live` and says so in [`Opened::Rebuilt`]; record the new
    /// generation then.
    pub fn open(
        dir: &Path,
        vocab: &[usize],
        generation: Option<u64>,
        live: &[(Sid, u32)],
        merge_threshold: usize,
    ) -> Result<(Index, Opened), IndexError> {
        std::fs::create_dir_all(dir).map_err(|source| IndexError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let (base, opened) = match generation {
            None => (
                Segment::write(dir, 1, vocab, live.iter().copied())?,
                Opened::Created,
            ),
            Some(g) => match Segment::open(dir, g, vocab) {
                Ok(s) => (s, Opened::Reopened),
                Err(e) => {
                    let reason = e.to_string();
                    tracing::warn!(%reason, "index base unusable; rebuilding from the registry");
                    (
                        Segment::write(dir, g + 1, vocab, live.iter().copied())?,
                        Opened::Rebuilt { reason },
                    )
                }
            },
        };
        let base = Arc::new(base);
        let mut overlay = Overlay::new(&base);
        diff_into(&base, &mut overlay, live);
        let snapshot = Arc::new(Snapshot {
            seq: 0,
            base: base.clone(),
            overlay: overlay.clone(),
        });
        let published = std::iter::once((0, Arc::downgrade(&snapshot))).collect();
        let index = Index {
            dir: dir.to_path_buf(),
            vocab: vocab.to_vec(),
            merge_threshold,
            base,
            overlay,
            seq: 0,
            current: Arc::new(ArcSwap::new(snapshot)),
            merge: None,
            published,
        };
        Ok((index, opened))
    }

    pub fn reader(&self) -> IndexReader {
        IndexReader {
            current: self.current.clone(),
        }
    }

    /// The base generation in use.
    pub fn generation(&self) -> u64 {
        self.base.generation()
    }

    /// Makes `sid` live as item `ord` (visible at the next publish).
    pub fn insert(&mut self, sid: Sid, ord: u32) -> bool {
        self.log(Edit::Insert(sid, ord));
        self.overlay.insert(&self.base, sid, ord)
    }

    fn log(&mut self, change: Edit) {
        if let Some(m) = &mut self.merge {
            m.log.push(change);
            // The merge thread may be done and gone; the log covers it.
            let _ = m.tx.send(change);
        }
    }

    /// Removes `sid` from the live set (visible at the next publish).
    pub fn remove(&mut self, sid: Sid) -> bool {
        self.log(Edit::Remove(sid));
        self.overlay.remove(&self.base, sid)
    }

    /// Publishes the changes applied so far; readers see them from now on.
    pub fn publish(&mut self) -> Arc<Snapshot> {
        self.seq += 1;
        let snapshot = Arc::new(Snapshot {
            seq: self.seq,
            base: self.base.clone(),
            overlay: self.overlay.clone(),
        });
        self.current.store(snapshot.clone());
        self.published
            .push_back((self.seq, Arc::downgrade(&snapshot)));
        snapshot
    }

    /// The sequence number the next publish will carry: a change applied now
    /// is first visible in that snapshot.
    pub fn next_seq(&self) -> u64 {
        self.seq + 1
    }

    /// The oldest publish that some reader may still hold. A SID removed in a
    /// publish later than this one may still be decoded by that reader; one
    /// removed at or before it no longer can. Call it after `publish`.
    pub fn oldest_alive_seq(&mut self) -> u64 {
        while let Some((seq, weak)) = self.published.front() {
            if weak.strong_count() == 0 && *seq < self.seq {
                self.published.pop_front();
            } else {
                break;
            }
        }
        self.published.front().map_or(self.seq, |(seq, _)| *seq)
    }

    /// Starts a background merge if the overlay passed the threshold and none
    /// is running. Returns whether one started.
    pub fn maybe_merge(&mut self) -> bool {
        if self.merge.is_some() || self.overlay.size() < self.merge_threshold {
            return false;
        }
        self.start_merge();
        true
    }

    /// Starts a background merge now, unless one is running.
    pub fn start_merge(&mut self) {
        if self.merge.is_some() {
            return;
        }
        let snapshot = Snapshot {
            seq: self.seq,
            base: self.base.clone(),
            overlay: self.overlay.clone(),
        };
        let (dir, vocab) = (self.dir.clone(), self.vocab.clone());
        let generation = self.base.generation() + 1;
        let (tx, rx) = std::sync::mpsc::channel::<Edit>();
        let handle = std::thread::Builder::new()
            .name("genfeed-index-merge".into())
            .spawn(move || {
                let base = Segment::write(&dir, generation, &vocab, snapshot.live())?;
                let mut overlay = Overlay::new(&base);
                let mut replayed = 0;
                while let Ok(change) = rx.try_recv() {
                    change.apply(&mut overlay, &base);
                    replayed += 1;
                }
                Ok(Merged {
                    base,
                    overlay,
                    replayed,
                })
            })
            .expect("spawning the merge thread");
        self.merge = Some(Merge {
            handle,
            log: Vec::new(),
            tx,
        });
    }

    /// If a background merge finished, swaps its base in (replaying the
    /// changes made meanwhile) and publishes. Returns the new generation,
    /// which the caller records durably before calling
    /// [`remove_old_segments`](Self::remove_old_segments).
    pub fn poll_merge(&mut self) -> Result<Option<u64>, IndexError> {
        if !self.merge.as_ref().is_some_and(|m| m.handle.is_finished()) {
            return Ok(None);
        }
        self.finish_merge().map(Some)
    }

    fn finish_merge(&mut self) -> Result<u64, IndexError> {
        let merge = self.merge.take().expect("a merge is running");
        let merged = merge
            .handle
            .join()
            .map_err(|_| IndexError::MergeFailed("the merge thread panicked".into()))??;
        let base = Arc::new(merged.base);
        let mut overlay = merged.overlay;
        for change in &merge.log[merged.replayed..] {
            change.apply(&mut overlay, &base);
        }
        self.base = base;
        self.overlay = overlay;
        self.publish();
        Ok(self.base.generation())
    }

    /// Merges now, waiting for it (and for a merge already running).
    pub fn merge_now(&mut self) -> Result<u64, IndexError> {
        self.start_merge();
        self.finish_merge()
    }

    /// Deletes base files other than the current generation's. Call after the
    /// generation is recorded, so a crash never leaves the recorded one
    /// missing.
    pub fn remove_old_segments(&self) -> Result<(), IndexError> {
        segment::remove_others(&self.dir, self.base.generation())
    }
}

impl Drop for Index {
    /// Waits for a running merge: its thread reads the base through a memory
    /// map and writes the next generation's file, and neither may outlive the
    /// index that owns the directory.
    fn drop(&mut self) {
        if let Some(merge) = self.merge.take() {
            let _ = merge.handle.join();
        }
    }
}

/// Applies to `overlay` the difference between `base` and `live` (both in SID
/// order): one merge-join, no FST rebuild.
fn diff_into(base: &Segment, overlay: &mut Overlay, live: &[(Sid, u32)]) {
    let mut i = 0;
    let mut removed = Vec::new();
    base.for_each(|sid, ord| {
        while i < live.len() && live[i].0 < sid {
            i += 1;
        }
        match live.get(i) {
            Some(&(s, o)) if s == sid => {
                if o != ord {
                    removed.push((sid, Some(o)));
                }
            }
            _ => removed.push((sid, None)),
        }
    });
    for (sid, replacement) in removed {
        match replacement {
            Some(ord) => overlay.insert(base, sid, ord),
            None => overlay.remove(base, sid),
        };
    }
    for &(sid, ord) in live {
        if base.get(sid).is_none() {
            overlay.insert(base, sid, ord);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sid(s: &str) -> Sid {
        s.parse().unwrap()
    }

    fn open(dir: &Path, live: &[(Sid, u32)]) -> Index {
        Index::open(dir, &[4, 4, 8], None, live, 1000).unwrap().0
    }

    #[test]
    fn overlay_changes_are_decodable_after_publish() {
        let dir = tempfile::tempdir().unwrap();
        let mut index = open(
            dir.path(),
            &[(sid("0-1-0"), 1), (sid("0-1-1"), 2), (sid("2-0-0"), 3)],
        );
        let reader = index.reader();
        let before = reader.snapshot();
        assert_eq!(before.allowed_after(&[]), [0, 2]);
        index.insert(sid("3-3-7"), 4);
        index.remove(sid("2-0-0"));
        index.remove(sid("0-1-0"));
        // Not published yet: readers still see the old state.
        assert_eq!(reader.snapshot().allowed_after(&[]), [0, 2]);
        index.publish();
        let now = reader.snapshot();
        assert_eq!(now.allowed_after(&[]), [0, 3]);
        assert_eq!(now.allowed_after(&[0, 1]), [1]);
        assert_eq!(now.allowed_after(&[3]), [3]);
        assert_eq!(now.allowed_after(&[3, 3]), [7]);
        assert!(now.allowed_after(&[2]).is_empty());
        assert_eq!(now.get(sid("3-3-7")), Some(4));
        assert_eq!(now.get(sid("2-0-0")), None);
        assert_eq!(now.len(), 2);
        // The old snapshot is untouched.
        assert_eq!(before.get(sid("2-0-0")), Some(3));
        assert_eq!(before.len(), 3);
        let live: Vec<(Sid, u32)> = now.live();
        assert_eq!(live, [(sid("0-1-1"), 2), (sid("3-3-7"), 4)]);
    }

    #[test]
    fn merge_folds_the_overlay_and_keeps_later_changes() {
        let dir = tempfile::tempdir().unwrap();
        let mut index = open(dir.path(), &[(sid("1-1-1"), 1)]);
        index.insert(sid("1-2-0"), 2);
        index.insert(sid("1-1-0"), 3);
        index.remove(sid("1-1-1"));
        index.start_merge();
        index.insert(sid("0-0-0"), 9);
        index.remove(sid("1-2-0"));
        let generation = index.merge_now().unwrap();
        assert_eq!(generation, 2);
        let s = index.reader().snapshot();
        assert_eq!(s.live(), [(sid("0-0-0"), 9), (sid("1-1-0"), 3)]);
        assert_eq!(s.allowed_after(&[1]), [1]);
        index.remove_old_segments().unwrap();
        let (reopened, how) =
            Index::open(dir.path(), &[4, 4, 8], Some(2), &s.live(), 1000).unwrap();
        assert_eq!(how, Opened::Reopened);
        assert_eq!(reopened.reader().snapshot().live(), s.live());
        assert_eq!(
            reopened.reader().snapshot().pending(),
            2,
            "0-0-0 added, 1-2-0 removed since the merge began"
        );
    }

    #[test]
    fn mask_marks_exactly_the_allowed_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let mut index = open(dir.path(), &[(sid("0-1-0"), 1), (sid("0-3-2"), 2)]);
        index.insert(sid("0-2-5"), 3);
        let s = index.publish();
        let cursors = [s.root(), s.seek(&[0]).unwrap(), s.seek(&[0, 2]).unwrap()];
        let mut mask = vec![0.0; 3 * 8];
        s.fill_mask(&cursors, 8, &mut mask);
        let allowed =
            |row: usize| -> Vec<usize> { (0..8).filter(|&t| mask[row * 8 + t] == 0.0).collect() };
        assert_eq!(allowed(0), [0]);
        assert_eq!(allowed(1), [1, 2, 3]);
        assert_eq!(allowed(2), [5]);
        let leaf = s.step(cursors[2], 5).unwrap();
        assert_eq!(s.sid(leaf), Some(sid("0-2-5")));
        assert_eq!(s.step(cursors[2], 4), None);
    }

    #[test]
    fn oldest_alive_snapshot_is_tracked() {
        let dir = tempfile::tempdir().unwrap();
        let mut index = open(dir.path(), &[(sid("1-1-1"), 1)]);
        let held = index.reader().snapshot();
        assert_eq!(index.next_seq(), 1);
        index.remove(sid("1-1-1"));
        index.publish();
        index.publish();
        assert_eq!(
            index.oldest_alive_seq(),
            0,
            "a reader still holds snapshot 0"
        );
        drop(held);
        assert_eq!(
            index.oldest_alive_seq(),
            2,
            "only the current snapshot is alive"
        );
        let held = index.publish();
        index.publish();
        assert_eq!(index.oldest_alive_seq(), 3);
        drop(held);
        assert_eq!(index.oldest_alive_seq(), 4);
    }

    #[test]
    fn damaged_base_is_rebuilt_from_the_live_set() {
        let dir = tempfile::tempdir().unwrap();
        let live = [(sid("1-1-1"), 1), (sid("2-2-2"), 2)];
        let index = open(dir.path(), &live);
        let path = dir.path().join(segment::file_name(index.generation()));
        std::fs::write(&path, b"not an fst").unwrap();
        let (index, how) = Index::open(dir.path(), &[4, 4, 8], Some(1), &live, 1000).unwrap();
        assert!(matches!(how, Opened::Rebuilt { .. }), "{how:?}");
        assert_eq!(index.generation(), 2);
        assert_eq!(index.reader().snapshot().live(), live);
    }
}
