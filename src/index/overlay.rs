//! Changes since the base segment, shared structurally between snapshots.
//!
//! The writer applies each catalogue change to one `Overlay` and publishes a
//! clone of it. Every part clones in time independent of its size: persistent
//! maps (`imbl`) share all but the changed path, and the per-node live counts
//! are a chunked copy-on-write array. So a publish costs microseconds whether
//! the overlay holds ten changes or a hundred thousand, which is what lets a new
//! item become decodable without waiting for a merge.

use imbl::{HashMap, HashSet, OrdMap, OrdSet};

use super::chunked::Chunked;
use super::segment::Segment;
use super::trie::{Trie, NONE};
use crate::sid::{Code, Sid};

/// Set in a base node's count when the overlay gave it children the base
/// does not have.
pub const EXTRA: u32 = 1 << 31;

/// A prefix: its depth and its codes packed 16 bits each.
pub type PrefixKey = (u8, u128);

pub fn pack(codes: &[Code]) -> PrefixKey {
    let mut p = 0u128;
    for (i, &c) in codes.iter().enumerate() {
        p |= u128::from(c) << (16 * i);
    }
    (codes.len() as u8, p)
}

pub fn extend(prefix: PrefixKey, code: Code) -> PrefixKey {
    (
        prefix.0 + 1,
        prefix.1 | (u128::from(code) << (16 * usize::from(prefix.0))),
    )
}

#[derive(Clone)]
pub struct Overlay {
    /// Live SIDs that the base lacks, or holds for another item.
    pub added: OrdMap<Sid, u32>,
    /// Base SIDs that are no longer live.
    pub removed: HashSet<Sid>,
    /// Live items below each base node, per depth (`EXTRA` flag in the high bit).
    pub counts: Vec<Chunked>,
    /// Live items below prefixes the base does not have.
    pub extra: HashMap<PrefixKey, u32>,
    /// For a prefix, the codes of its children that are not base nodes.
    pub extra_children: HashMap<PrefixKey, OrdSet<Code>>,
    /// Dense levels: for each base node at depth `d < dense.len()`, a bitset
    /// of its live children's codes (`words[d]` words per node), including
    /// children only the overlay has. Listing the allowed tokens of a node
    /// near the root, which has hundreds of children, is then a scan of four
    /// words instead of hundreds of count lookups.
    pub dense: Vec<Chunked<u64>>,
    pub words: Vec<usize>,
}

/// Depths whose nodes get dense bitsets: the first three (STATIC's "dense
/// tables for the first levels"), and only where a node's bitset stays small.
fn dense_depths(trie: &Trie) -> usize {
    (0..trie.levels().min(3))
        .take_while(|&d| trie.vocab()[d] <= 1024)
        .count()
}

impl Overlay {
    /// An empty overlay over `base`: every base item live.
    pub fn new(base: &Segment) -> Overlay {
        let trie = base.trie();
        let mut dense = Vec::new();
        let mut words = Vec::new();
        for d in 0..dense_depths(trie) {
            let w = trie.vocab()[d].div_ceil(64).next_power_of_two();
            let mut bits = vec![0u64; trie.nodes(d) * w];
            for node in 0..trie.nodes(d) {
                for k in trie.children(d, node as u32) {
                    let c = usize::from(trie.token(d, k));
                    bits[node * w + c / 64] |= 1 << (c % 64);
                }
            }
            dense.push(Chunked::from_slice(&bits));
            words.push(w);
        }
        Overlay {
            added: OrdMap::new(),
            removed: HashSet::new(),
            counts: (0..=trie.levels())
                .map(|d| Chunked::from_slice(trie.counts(d)))
                .collect(),
            extra: HashMap::new(),
            extra_children: HashMap::new(),
            dense,
            words,
        }
    }

    /// Flips the dense bit of `code` under `node` at `depth`, if that depth
    /// is dense.
    fn set_bit(&mut self, depth: usize, node: u32, code: Code, live: bool) {
        if depth < self.dense.len() {
            let w = self.words[depth];
            let i = node as usize * w + usize::from(code) / 64;
            let bit = 1u64 << (code % 64);
            self.dense[depth].update(i, |v| if live { v | bit } else { v & !bit });
        }
    }

    /// Changes held (what a merge would fold in).
    pub fn size(&self) -> usize {
        self.added.len() + self.removed.len()
    }

    pub fn get(&self, base: &Segment, sid: Sid) -> Option<u32> {
        if let Some(&ord) = self.added.get(&sid) {
            return Some(ord);
        }
        if self.removed.contains(&sid) {
            return None;
        }
        base.get(sid)
    }

    /// Makes `sid` live as item `ord`. Returns false if it already was.
    pub fn insert(&mut self, base: &Segment, sid: Sid, ord: u32) -> bool {
        match base.get(sid) {
            Some(base_ord) => {
                let was_live = !self.removed.contains(&sid);
                if !was_live {
                    self.removed.remove(&sid);
                    self.walk_base(base, sid, true);
                }
                let before = if base_ord == ord {
                    self.added.remove(&sid)
                } else {
                    self.added.insert(sid, ord)
                };
                !was_live || before.is_some_and(|b| b != ord)
            }
            None => match self.added.insert(sid, ord) {
                Some(prev) => prev != ord,
                None => {
                    self.walk_mixed(base, sid, true);
                    true
                }
            },
        }
    }

    /// Makes `sid` not live. Returns false if it was not live.
    pub fn remove(&mut self, base: &Segment, sid: Sid) -> bool {
        if base.get(sid).is_some() {
            self.added.remove(&sid);
            if self.removed.insert(sid).is_some() {
                return false;
            }
            self.walk_base(base, sid, false);
            true
        } else if self.added.remove(&sid).is_some() {
            self.walk_mixed(base, sid, false);
            true
        } else {
            false
        }
    }

    /// Adjusts the counts along a SID whose whole path is in the base.
    fn walk_base(&mut self, base: &Segment, sid: Sid, up: bool) {
        let trie = base.trie();
        let mut node = 0u32;
        bump(&mut self.counts[0], 0, up);
        for (depth, &c) in sid.codes().iter().enumerate() {
            let parent = node;
            node = trie.child(depth, node, c);
            debug_assert_ne!(node, NONE);
            if let Some(live) = bump(&mut self.counts[depth + 1], node as usize, up) {
                self.set_bit(depth, parent, c, live);
            }
        }
    }

    /// Adjusts the counts along a SID the base lacks: base nodes while the
    /// path stays in the base, then overlay prefixes.
    fn walk_mixed(&mut self, base: &Segment, sid: Sid, up: bool) {
        let trie = base.trie();
        let codes = sid.codes();
        let mut node = 0u32;
        bump(&mut self.counts[0], 0, up);
        let mut depth = 0;
        while depth < codes.len() {
            let child = trie.child(depth, node, codes[depth]);
            if child == NONE {
                break;
            }
            if let Some(live) = bump(&mut self.counts[depth + 1], child as usize, up) {
                self.set_bit(depth, node, codes[depth], live);
            }
            node = child;
            depth += 1;
        }
        // From `depth` on, the prefixes are the overlay's own.
        if up {
            self.counts[depth].update(node as usize, |v| v | EXTRA);
        }
        let mut prefix = pack(&codes[..depth]);
        for (d, &code) in codes.iter().enumerate().skip(depth) {
            if up {
                self.extra_children.entry(prefix).or_default().insert(code);
            }
            let child = extend(prefix, code);
            let count = self.extra.entry(child).or_insert(0);
            let before = *count;
            *count = if up {
                before + 1
            } else {
                before.saturating_sub(1)
            };
            if d == depth && (before == 0) != (*count == 0) {
                // The first overlay-only node hangs off base node `node`.
                let live = *count > 0;
                self.set_bit(depth, node, code, live);
            }
            prefix = child;
        }
    }
}

/// Counts one item in or out of a node; returns the node's new liveness when
/// it changed (empty to non-empty or back).
fn bump(counts: &mut Chunked, i: usize, up: bool) -> Option<bool> {
    let before = counts.get(i) & !EXTRA;
    counts.update(i, |v| {
        let (flag, n) = (v & EXTRA, v & !EXTRA);
        flag | if up { n + 1 } else { n.saturating_sub(1) }
    });
    let after = counts.get(i) & !EXTRA;
    ((before == 0) != (after == 0)).then_some(after > 0)
}
