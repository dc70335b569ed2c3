//! The writer: applies changes to the overlay, publishes snapshots, and
//! merges the overlay into a new base segment in the background.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use arc_swap::ArcSwap;

use super::overlay::Overlay;
use super::segment::Segment;
use super::{segment, IndexError, IndexReader, Snapshot};
use crate::sid::Sid;

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
