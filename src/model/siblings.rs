//! A prefix's children, for the output levels whose prefix table is hashed.
//!
//! Prefix-scored outputs ([`ModelConfig::prefix_scored`]) give each item
//! seen in training its own output vector, but only down to the last level
//! whose prefix table is exact: there a parent's children are one
//! contiguous block of rows. Past it the choice between items that share a
//! prefix falls to the code rows, which every prefix shares, so the output
//! cannot tell those items apart by what it learnt about them. That is most
//! items: with RQ-KMeans SIDs, 57% of Toys items share their first two codes
//! with another item, and a trained model found the next item of a known
//! transition 67.5% of the time when its two-code prefix was its own, 56%
//! when it was shared.
//!
//! A hashed table has no block per parent, so the children are listed: each
//! scored row carries its parent's children (at most [`MAX_SIBLINGS`]),
//! their codes and their prefix rows, and the output adds each child's
//! prefix row to that child's score. Training lists a catalogue's children
//! ([`SiblingTable`]), serving the index's live ones; on the same catalogue
//! both list the same, so serving scores are still the training objective.

use std::collections::HashMap;

use candle_core::{Device, Tensor};

use super::config::ModelConfig;
use crate::sid::{Code, Sid, MAX_LEVELS};

/// Parents with more children than this score them by code rows alone:
/// listing them would pad every row of a batch to the largest family. Only
/// degenerate prefixes get there (on Toys, the items without training
/// interactions, whose collaborative vectors are all alike).
pub const MAX_SIBLINGS: usize = 64;

/// Per scored row, the children to score, `[rows, width]` each: their
/// places in the row-major `[rows, vocab]` logits (`row * vocab + code`),
/// their prefix rows, and 1.0 (0.0 where the row is padding).
///
/// Flat places, not codes, because the scores go in with `index_add`:
/// candle's `scatter_add` has no working backward pass for its base.
pub struct Siblings {
    pub(crate) slots: Tensor,
    pub(crate) nodes: Tensor,
    pub(crate) weight: Tensor,
}

/// Host buffers for [`Siblings`], reused across calls.
#[derive(Default)]
pub(crate) struct SiblingBuffer {
    slots: Vec<u32>,
    nodes: Vec<u32>,
    weight: Vec<f32>,
}

impl SiblingBuffer {
    /// The children of `prefixes[r][..level]` are `children[offsets[r] ..
    /// offsets[r + 1]]`, in CSR form.
    pub(crate) fn build(
        &mut self,
        cfg: &ModelConfig,
        level: usize,
        prefixes: &[[Code; MAX_LEVELS]],
        children: &[Code],
        offsets: &[u32],
        device: &Device,
    ) -> candle_core::Result<Siblings> {
        let rows = prefixes.len();
        debug_assert_eq!(offsets.len(), rows + 1);
        let count = |r: usize| (offsets[r + 1] - offsets[r]) as usize;
        let width = (0..rows)
            .map(count)
            .filter(|&n| n <= MAX_SIBLINGS)
            .max()
            .unwrap_or(0)
            .max(1);
        let vocab = cfg.vocab[level];
        self.slots.clear();
        self.nodes.clear();
        self.weight.clear();
        for (r, prefix) in prefixes.iter().enumerate() {
            let n = count(r);
            let listed = if n <= MAX_SIBLINGS { n } else { 0 };
            let mut codes = *prefix;
            for &c in &children[offsets[r] as usize..][..listed] {
                codes[level] = c;
                self.slots.push((r * vocab + usize::from(c)) as u32);
                self.nodes.push(cfg.node_id(&codes, level));
                self.weight.push(1.0);
            }
            let pad = width - listed;
            self.slots
                .extend(std::iter::repeat_n((r * vocab) as u32, pad));
            self.nodes.extend(std::iter::repeat_n(0, pad));
            self.weight.extend(std::iter::repeat_n(0.0, pad));
        }
        Ok(Siblings {
            slots: Tensor::from_slice(&self.slots, rows * width, device)?,
            nodes: Tensor::from_slice(&self.nodes, (rows, width), device)?,
            weight: Tensor::from_slice(&self.weight, (rows, width), device)?,
        })
    }
}

/// Every prefix's children in a catalogue, at the levels a config scores
/// by siblings ([`ModelConfig::sibling_scored`]): what training lists.
#[derive(Default)]
pub struct SiblingTable {
    /// Per level, a prefix of that many codes to its children's codes.
    levels: Vec<HashMap<Vec<Code>, Vec<Code>>>,
}

impl SiblingTable {
    pub fn new(cfg: &ModelConfig, sids: &[Sid]) -> SiblingTable {
        let levels = (0..cfg.levels())
            .map(|l| {
                let mut map: HashMap<Vec<Code>, Vec<Code>> = HashMap::new();
                if cfg.sibling_scored(l) {
                    for sid in sids {
                        let c = sid.codes();
                        map.entry(c[..l].to_vec()).or_default().push(c[l]);
                    }
                    for children in map.values_mut() {
                        children.sort_unstable();
                        children.dedup();
                    }
                }
                map
            })
            .collect();
        SiblingTable { levels }
    }

    /// The children of `prefix` (its length is the level), sorted.
    pub fn children(&self, prefix: &[Code]) -> &[Code] {
        self.levels
            .get(prefix.len())
            .and_then(|m| m.get(prefix))
            .map_or(&[], Vec::as_slice)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_list_their_children_and_crowded_parents_list_none() {
        let cfg = ModelConfig {
            node_buckets: 16,
            prefix_output: true,
            sibling_output: true,
            ..ModelConfig::new(vec![4, 4, 200], "test")
        };
        assert!(cfg.sibling_scored(2) && !cfg.sibling_scored(0));
        // Prefix (1, 2) has three children; (3, 0) has more than the cap.
        let mut sids: Vec<Sid> = [5, 9, 0]
            .iter()
            .map(|&c| Sid::new(&[1, 2, c]).unwrap())
            .collect();
        sids.extend((0..MAX_SIBLINGS as Code + 1).map(|c| Sid::new(&[3, 0, c]).unwrap()));
        let table = SiblingTable::new(&cfg, &sids);
        assert_eq!(table.children(&[1, 2]), &[0, 5, 9]);
        assert_eq!(table.children(&[3, 0]).len(), MAX_SIBLINGS + 1);
        assert!(table.children(&[2, 2]).is_empty());
        // Level 1 is exact, so nothing is listed there.
        assert!(table.children(&[1]).is_empty());

        let mut prefixes = [[0; MAX_LEVELS]; 2];
        prefixes[0][..2].copy_from_slice(&[1, 2]);
        prefixes[1][..2].copy_from_slice(&[3, 0]);
        let mut children = table.children(&[1, 2]).to_vec();
        children.extend_from_slice(table.children(&[3, 0]));
        let offsets = [0, 3, children.len() as u32];
        let s = SiblingBuffer::default()
            .build(&cfg, 2, &prefixes, &children, &offsets, &Device::Cpu)
            .unwrap();
        let slots = s.slots.to_vec1::<u32>().unwrap();
        let nodes = s.nodes.to_vec2::<u32>().unwrap();
        let weight = s.weight.to_vec2::<f32>().unwrap();
        assert_eq!(slots, [0, 5, 9, 200, 200, 200]);
        assert_eq!(weight, [[1.0; 3], [0.0; 3]]);
        for (j, &c) in [0, 5, 9].iter().enumerate() {
            assert_eq!(nodes[0][j], cfg.node_id(&[1, 2, c], 2));
        }
    }
}
