//! The decoding tables of a base segment: the trie of live SIDs, flattened.
//!
//! Constrained decoding asks, for every beam at every step, "which tokens may
//! come next after this prefix?". Walking a pointer trie per beam is slow and
//! branchy; the STATIC layout (Su et al. 2026) instead numbers the trie's nodes
//! level by level in SID order, which makes the children of a node a contiguous
//! range of the next level, so the tables are plain arrays:
//!
//! - **CSR per depth.** `offsets[d][n]..offsets[d][n + 1]` is the range of
//!   node `n`'s children at depth `d + 1`; `tokens[d][k]` is the code leading to
//!   child `k`. Because children are numbered in order, the child's node id *is*
//!   `k`: stepping a beam is a gather, and listing a node's allowed tokens is a
//!   slice.
//! - **Dense transitions for the first levels.** The root's and the first
//!   level's children are found by direct indexing (`dense0[c0]`,
//!   `dense1[c0 * V1 + c1]`) rather than a search; below that rows are short and
//!   a binary search over a handful of codes is cheap.
//! - **Live counts per node** (the number of live items below it) come with the
//!   tables, so that a snapshot can mark nodes dead without rebuilding anything:
//!   a token is allowed only if its child's count is positive, so prefixes whose
//!   items were all retired are never offered.

use crate::sid::{Code, Sid};

/// Marks "no node".
pub const NONE: u32 = u32::MAX;

/// The flattened trie of one sorted set of SIDs.
#[derive(Debug, Default)]
pub struct Trie {
    levels: usize,
    vocab: Vec<usize>,
    offsets: Vec<Vec<u32>>,
    tokens: Vec<Vec<Code>>,
    leaf_ord: Vec<u32>,
    counts: Vec<Vec<u32>>,
    dense0: Vec<u32>,
    dense1: Vec<u32>,
}

/// Why a SID stream cannot form a trie.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrieError {
    #[error("SID {sid} has {found} levels, the index holds {expected}")]
    Levels {
        sid: Sid,
        found: usize,
        expected: usize,
    },
    #[error("SID {sid} has code {code} at level {level}, beyond the vocabulary of {vocab}")]
    Code {
        sid: Sid,
        level: usize,
        code: Code,
        vocab: usize,
    },
    #[error("SIDs out of order or repeated: {prev} then {next}")]
    Order { prev: Sid, next: Sid },
}

/// Builds a [`Trie`] from SIDs fed in strictly increasing order.
pub struct TrieBuilder {
    trie: Trie,
    prev: Option<Sid>,
}

impl TrieBuilder {
    /// `vocab[l]` is the number of codes level `l` may use.
    pub fn new(vocab: &[usize]) -> TrieBuilder {
        let levels = vocab.len();
        assert!(levels >= 1);
        let mut trie = Trie {
            levels,
            vocab: vocab.to_vec(),
            offsets: vec![Vec::new(); levels],
            tokens: vec![Vec::new(); levels],
            ..Trie::default()
        };
        trie.offsets[0].push(0);
        TrieBuilder { trie, prev: None }
    }

    pub fn push(&mut self, sid: Sid, ord: u32) -> Result<(), TrieError> {
        let t = &mut self.trie;
        if sid.levels() != t.levels {
            return Err(TrieError::Levels {
                sid,
                found: sid.levels(),
                expected: t.levels,
            });
        }
        for (level, (&code, &vocab)) in sid.codes().iter().zip(&t.vocab).enumerate() {
            if usize::from(code) >= vocab {
                return Err(TrieError::Code {
                    sid,
                    level,
                    code,
                    vocab,
                });
            }
        }
        let first_new = match self.prev {
            None => 0,
            Some(prev) if prev < sid => prev
                .codes()
                .iter()
                .zip(sid.codes())
                .take_while(|(a, b)| a == b)
                .count(),
            Some(prev) => return Err(TrieError::Order { prev, next: sid }),
        };
        for depth in first_new..t.levels {
            // A new node at depth + 1, the next child of the current depth node.
            t.tokens[depth].push(sid.codes()[depth]);
            if depth + 1 < t.levels {
                let start = t.tokens[depth + 1].len() as u32;
                t.offsets[depth + 1].push(start);
            }
        }
        t.leaf_ord.push(ord);
        self.prev = Some(sid);
        Ok(())
    }

    pub fn finish(mut self) -> Trie {
        let t = &mut self.trie;
        for d in 0..t.levels {
            let end = t.tokens[d].len() as u32;
            t.offsets[d].push(end);
        }
        // Live counts bottom-up: every leaf is live when the segment is built.
        t.counts = vec![Vec::new(); t.levels + 1];
        t.counts[t.levels] = vec![1; t.leaf_ord.len()];
        for d in (0..t.levels).rev() {
            let below = &t.counts[d + 1];
            let counts = t.offsets[d]
                .windows(2)
                .map(|w| below[w[0] as usize..w[1] as usize].iter().sum())
                .collect();
            t.counts[d] = counts;
        }
        t.dense0 = vec![NONE; t.vocab[0]];
        for k in t.offsets[0][0]..t.offsets[0][1] {
            t.dense0[usize::from(t.tokens[0][k as usize])] = k;
        }
        if t.levels >= 2 {
            let v1 = t.vocab[1];
            t.dense1 = vec![NONE; t.vocab[0] * v1];
            for (n1, w) in t.offsets[1].windows(2).enumerate() {
                let c0 = usize::from(t.tokens[0][n1]);
                for k in w[0]..w[1] {
                    t.dense1[c0 * v1 + usize::from(t.tokens[1][k as usize])] = k;
                }
            }
        }
        self.trie
    }
}

impl Trie {
    pub fn levels(&self) -> usize {
        self.levels
    }

    pub fn vocab(&self) -> &[usize] {
        &self.vocab
    }

    /// Nodes at `depth` (the root is depth 0, leaves are depth `levels`).
    pub fn nodes(&self, depth: usize) -> usize {
        if depth == 0 {
            1
        } else {
            self.tokens[depth - 1].len()
        }
    }

    /// Items (leaves).
    pub fn len(&self) -> usize {
        self.leaf_ord.len()
    }

    pub fn is_empty(&self) -> bool {
        self.leaf_ord.is_empty()
    }

    /// The range of child ids of `node` at `depth`.
    #[inline]
    pub fn children(&self, depth: usize, node: u32) -> std::ops::Range<usize> {
        let o = &self.offsets[depth];
        o[node as usize] as usize..o[node as usize + 1] as usize
    }

    /// The code leading to child `k` of a depth-`depth` node.
    #[inline]
    pub fn token(&self, depth: usize, k: usize) -> Code {
        self.tokens[depth][k]
    }

    /// The child of `node` (at `depth`) reached by `code`, or [`NONE`].
    #[inline]
    pub fn child(&self, depth: usize, node: u32, code: Code) -> u32 {
        match depth {
            0 => self.dense0.get(usize::from(code)).copied().unwrap_or(NONE),
            1 => {
                let c0 = usize::from(self.tokens[0][node as usize]);
                let v1 = self.vocab[1];
                if usize::from(code) >= v1 {
                    return NONE;
                }
                self.dense1[c0 * v1 + usize::from(code)]
            }
            _ => {
                let range = self.children(depth, node);
                let row = &self.tokens[depth][range.clone()];
                match row.binary_search(&code) {
                    Ok(i) => (range.start + i) as u32,
                    Err(_) => NONE,
                }
            }
        }
    }

    /// The node of a full SID or prefix, walking from the root.
    pub fn find(&self, codes: &[Code]) -> u32 {
        let mut node = 0;
        for (depth, &c) in codes.iter().enumerate() {
            node = self.child(depth, node, c);
            if node == NONE {
                return NONE;
            }
        }
        node
    }

    /// The item behind a leaf.
    pub fn leaf_ord(&self, leaf: u32) -> u32 {
        self.leaf_ord[leaf as usize]
    }

    /// Live items below each node at `depth`, at build time.
    pub fn counts(&self, depth: usize) -> &[u32] {
        &self.counts[depth]
    }

    /// Bytes of the tables.
    pub fn heap_bytes(&self) -> usize {
        let v = |n: usize, w: usize| n * w;
        self.offsets.iter().map(|o| v(o.len(), 4)).sum::<usize>()
            + self.tokens.iter().map(|t| v(t.len(), 2)).sum::<usize>()
            + v(self.leaf_ord.len(), 4)
            + self.counts.iter().map(|c| v(c.len(), 4)).sum::<usize>()
            + v(self.dense0.len(), 4)
            + v(self.dense1.len(), 4)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sid(s: &str) -> Sid {
        s.parse().unwrap()
    }

    fn build(sids: &[&str]) -> Trie {
        let mut b = TrieBuilder::new(&[4, 4, 8]);
        for (i, s) in sids.iter().enumerate() {
            b.push(sid(s), i as u32 * 10).unwrap();
        }
        b.finish()
    }

    #[test]
    fn children_are_contiguous_and_findable() {
        let t = build(&["0-1-0", "0-1-1", "0-3-0", "2-0-5"]);
        assert_eq!(t.nodes(1), 2);
        assert_eq!(t.nodes(2), 3);
        assert_eq!(t.len(), 4);
        let root: Vec<Code> = t.children(0, 0).map(|k| t.token(0, k)).collect();
        assert_eq!(root, [0, 2]);
        let n0 = t.child(0, 0, 0);
        let under0: Vec<Code> = t.children(1, n0).map(|k| t.token(1, k)).collect();
        assert_eq!(under0, [1, 3]);
        for (i, s) in ["0-1-0", "0-1-1", "0-3-0", "2-0-5"].iter().enumerate() {
            let leaf = t.find(sid(s).codes());
            assert_ne!(leaf, NONE, "{s}");
            assert_eq!(t.leaf_ord(leaf), i as u32 * 10);
        }
        assert_eq!(t.find(sid("0-2-0").codes()), NONE);
        assert_eq!(t.find(sid("3-0-0").codes()), NONE);
        assert_eq!(t.counts(0), &[4]);
        assert_eq!(t.counts(1), &[3, 1]);
        assert_eq!(t.counts(2), &[2, 1, 1]);
    }

    #[test]
    fn bad_streams_are_rejected() {
        let mut b = TrieBuilder::new(&[4, 4, 8]);
        b.push(sid("1-1-1"), 0).unwrap();
        assert!(matches!(
            b.push(sid("1-1-1"), 1),
            Err(TrieError::Order { .. })
        ));
        assert!(matches!(
            b.push(sid("1-1"), 1),
            Err(TrieError::Levels { .. })
        ));
        assert!(matches!(
            b.push(sid("1-4-1"), 1),
            Err(TrieError::Code { level: 1, .. })
        ));
    }
}
