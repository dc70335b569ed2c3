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
//!   [`ArcSwap`](arc_swap::ArcSwap). Readers load the current snapshot
//!   without a lock and keep it as long as they like; the writer never
//!   waits for them;
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
mod snapshot;
pub mod trie;
mod writer;

use std::path::PathBuf;

pub use snapshot::{Cursor, IndexReader, Snapshot};
pub use writer::{Index, Opened};

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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::sid::Sid;

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
