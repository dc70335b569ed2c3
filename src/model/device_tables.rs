//! An index snapshot's decoding tables on the model's device, so that a
//! search on a GPU builds its masks and picks its candidates there.
//!
//! On the CPU the search builds each step's mask from the snapshot
//! ([`Snapshot::fill_mask`]) and ranks the step's scores on the host: the
//! scores are already in host memory. On a GPU that costs a copy of every
//! beam's whole score row to the host per step (at beam 20 and 1,024
//! requests, 21 MB) and a mask of the same size back. With these tables the
//! mask is built on the device from each beam's node, and only each
//! request's few best candidates come back ([`top_k`]).
//!
//! The tables are the live trie numbered level by level in SID order, as
//! the base segment's ([`crate::index`]), but built from the snapshot's
//! live items, so the overlay's additions and retirements are in them and
//! no live count is needed: a node exists only if an item lives below it.
//! They are rebuilt when the snapshot changes (a publish), and shared by
//! every batch until then. Each depth's children are a padded table
//! (`[nodes, widest node's children]`, padded with the code `vocab`): near
//! the root that is the dense table, below it a row of a few codes, and in
//! both the mask is one gather and one scatter. The host keeps the same
//! trie ([`Trie`], the base segment's layout) to step each beam's node
//! with its chosen code.

use candle_core::{DType, Device, Tensor, D};

use crate::index::trie::{Trie, TrieBuilder, NONE};
use crate::index::Snapshot;
use crate::sid::Code;

/// Widest row [`top_k`] sorts in one piece: candle's CUDA sort holds a
/// row in shared memory (4 bytes per column, padded to a power of two).
const SORT_WIDTH: usize = 4096;

/// The most entries [`top_k`] keeps of a row wider than [`SORT_WIDTH`]:
/// each piece's best `k` must be fewer than the piece, or cutting a row
/// into pieces would not shrink it. Wider beams are ranked on the host.
pub(crate) const MAX_TOP_K: usize = SORT_WIDTH / 2;

/// One snapshot's decoding tables, host and device.
pub(crate) struct DeviceTables {
    /// The snapshot they were built from: base generation and publish.
    key: (u64, u64),
    /// The live items' trie, for stepping a beam's node on the host.
    trie: Trie,
    /// Per depth: each node's children's codes, padded with `vocab[d]`.
    padded: Vec<Tensor>,
}

impl DeviceTables {
    /// The tables of `snapshot`'s live items, uploaded to `device`.
    pub(crate) fn build(snapshot: &Snapshot, device: &Device) -> candle_core::Result<Self> {
        let mut builder = TrieBuilder::new(snapshot.vocab());
        for (sid, ord) in snapshot.live() {
            builder
                .push(sid, ord)
                .map_err(|e| candle_core::Error::Msg(format!("device tables: {e}")))?;
        }
        let trie = builder.finish();
        let mut padded = Vec::with_capacity(trie.levels());
        for d in 0..trie.levels() {
            let nodes = trie.nodes(d) as u32;
            let fan = (0..nodes).map(|n| trie.children(d, n).len()).max();
            // At least one node (an empty snapshot's) and one column, so that
            // a dead beam's node 0 can always be looked up.
            let (rows, fan) = ((nodes as usize).max(1), fan.unwrap_or(0).max(1));
            let mut table = vec![trie.vocab()[d] as u32; rows * fan];
            for n in 0..nodes {
                let row = n as usize * fan;
                for (slot, k) in trie.children(d, n).enumerate() {
                    table[row + slot] = u32::from(trie.token(d, k));
                }
            }
            padded.push(Tensor::from_vec(table, (rows, fan), device)?);
        }
        Ok(DeviceTables {
            key: (snapshot.generation(), snapshot.seq()),
            trie,
            padded,
        })
    }

    /// Whether these are `snapshot`'s tables.
    pub(crate) fn matches(&self, snapshot: &Snapshot) -> bool {
        self.key == (snapshot.generation(), snapshot.seq())
    }

    /// The node `code` leads to from `node` at `depth`, if an item lives
    /// below it.
    pub(crate) fn child(&self, depth: usize, node: u32, code: Code) -> Option<u32> {
        let child = self.trie.child(depth, node, code);
        (child != NONE).then_some(child)
    }

    /// The additive mask (`0` where a code leads to a live item, `-inf`
    /// elsewhere) of beams at `depth` on `nodes` (`[rows]`, `u32`):
    /// `[rows, vocab]`.
    pub(crate) fn mask(&self, depth: usize, nodes: &Tensor) -> candle_core::Result<Tensor> {
        let vocab = self.trie.vocab()[depth];
        let children = self.padded[depth].index_select(nodes, 0)?;
        let (rows, fan) = children.dims2()?;
        let device = nodes.device();
        // Padding lands in an extra column that is cut off.
        let hits = Tensor::zeros((rows, vocab + 1), DType::F32, device)?
            .scatter_add(
                &children,
                &Tensor::ones((rows, fan), DType::F32, device)?,
                1,
            )?
            .narrow(1, 0, vocab)?;
        hits.gt(0.0)?.where_cond(
            &Tensor::zeros((rows, vocab), DType::F32, device)?,
            &Tensor::full(f32::NEG_INFINITY, (rows, vocab), device)?,
        )
    }
}

/// The `k` largest entries of each row of `x` (`[n, m]`, `k ≤ m`), best
/// first, and their columns (`u32`). Rows wider than candle's CUDA sort
/// takes are cut into pieces whose own top `k` are ranked again (`k` at
/// most [`MAX_TOP_K`] then).
pub(crate) fn top_k(x: &Tensor, k: usize) -> candle_core::Result<(Tensor, Tensor)> {
    let (n, m) = x.dims2()?;
    if m > SORT_WIDTH {
        if k > MAX_TOP_K {
            candle_core::bail!(
                "top {k} of rows of {m}: at most {MAX_TOP_K} of rows over {SORT_WIDTH}"
            );
        }
        let pieces = m.div_ceil(SORT_WIDTH);
        let pad = pieces * SORT_WIDTH - m;
        let x = if pad > 0 {
            let fill = Tensor::full(f32::NEG_INFINITY, (n, pad), x.device())?;
            Tensor::cat(&[x, &fill], 1)?
        } else {
            x.clone()
        };
        let (values, columns) = top_k(&x.reshape((n * pieces, SORT_WIDTH))?, k)?;
        let starts: Vec<u32> = (0..pieces).map(|p| (p * SORT_WIDTH) as u32).collect();
        let starts = Tensor::from_vec(starts, (1, pieces, 1), x.device())?;
        let columns = columns
            .reshape((n, pieces, k))?
            .broadcast_add(&starts)?
            .reshape((n, pieces * k))?;
        let (values, at) = top_k(&values.reshape((n, pieces * k))?, k)?;
        return Ok((values, columns.gather(&at, D::Minus1)?));
    }
    let order = x.contiguous()?.arg_sort_last_dim(false)?.narrow(1, 0, k)?;
    let order = order.contiguous()?;
    Ok((x.gather(&order, D::Minus1)?, order))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::Index;
    use crate::sid::Sid;

    #[test]
    fn top_k_matches_a_sort_across_pieces() {
        let (n, m, k) = (3, SORT_WIDTH * 2 + 37, 25);
        // Distinct values in a scrambled order, so the top k is unique.
        let data: Vec<f32> = (0..n * m).map(|i| ((i * 7919) % (n * m)) as f32).collect();
        let x = Tensor::from_vec(data.clone(), (n, m), &Device::Cpu).unwrap();
        let (values, columns) = top_k(&x, k).unwrap();
        let (values, columns) = (
            values.to_vec2::<f32>().unwrap(),
            columns.to_vec2::<u32>().unwrap(),
        );
        for r in 0..n {
            let row = &data[r * m..(r + 1) * m];
            let mut order: Vec<usize> = (0..m).collect();
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
            let expect: Vec<u32> = order[..k].iter().map(|&c| c as u32).collect();
            assert_eq!(columns[r], expect, "row {r}");
            let got: Vec<f32> = expect.iter().map(|&c| row[c as usize]).collect();
            assert_eq!(values[r], got);
        }
    }

    #[test]
    fn masks_follow_the_live_items_of_the_overlay() {
        let dir = tempfile::tempdir().unwrap();
        let sid = |c: [u16; 3]| Sid::new(&c).unwrap();
        let live: Vec<(Sid, u32)> = [[0, 1, 2], [0, 1, 3], [0, 2, 0], [3, 0, 0]]
            .into_iter()
            .zip(0..)
            .map(|(c, i)| (sid(c), i))
            .collect();
        let (mut index, _) = Index::open(dir.path(), &[4, 4, 4], None, &live, usize::MAX).unwrap();
        // Retire one item, add one under a new prefix.
        index.remove(sid([3, 0, 0]));
        index.insert(sid([2, 2, 1]), 4);
        let snapshot = index.publish();
        let tables = DeviceTables::build(&snapshot, &Device::Cpu).unwrap();
        assert!(tables.matches(&snapshot));

        // Every live prefix's node has exactly the snapshot's allowed codes.
        let mut checked = 0;
        for (sid, _) in snapshot.live() {
            let mut node = 0;
            for d in 0..3 {
                let prefix = &sid.codes()[..d];
                let nodes = Tensor::new(&[node], &Device::Cpu).unwrap();
                let mask = tables.mask(d, &nodes).unwrap().to_vec2::<f32>().unwrap();
                let allowed: Vec<Code> =
                    (0..4u16).filter(|&c| mask[0][c as usize] == 0.0).collect();
                assert_eq!(allowed, snapshot.allowed_after(prefix), "prefix {prefix:?}");
                assert!(mask[0].iter().all(|&x| x == 0.0 || x == f32::NEG_INFINITY));
                node = tables.child(d, node, sid.codes()[d]).unwrap();
                checked += 1;
            }
        }
        assert_eq!(checked, 12);
        // The retired item's branch is gone, not merely empty.
        assert_eq!(tables.child(0, 0, 3), None);
    }
}
