//! The read side: snapshots, and the cursors that step through their trie.

use std::sync::Arc;

use arc_swap::ArcSwap;

use super::overlay::{extend, Overlay, PrefixKey, EXTRA};
use super::segment::Segment;
use super::trie::NONE;
use crate::sid::{Code, Sid, MAX_LEVELS};

/// One consistent view of the live SIDs.
pub struct Snapshot {
    pub(super) seq: u64,
    pub(super) base: Arc<Segment>,
    pub(super) overlay: Overlay,
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

    /// Tokens allowed after a prefix (empty if the prefix has no live item).
    #[cfg(test)]
    pub(crate) fn allowed_after(&self, codes: &[Code]) -> Vec<Code> {
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
    pub(super) current: Arc<ArcSwap<Snapshot>>,
}

impl IndexReader {
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }
}
