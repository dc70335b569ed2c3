//! Serving-time scores of a parent's children against their prefix rows,
//! without copying a block per beam.
//!
//! At a prefix-scored level ([`ModelConfig::prefix_scored`]) each beam
//! scores its parent's `vocab` children against their rows of the level's
//! prefix table: one contiguous block of `vocab × d` floats per parent. As
//! tensor operations that is a gather of the block for every beam, then a
//! batched product. At level 1 with 256 × 128 blocks, beam 20 and 64
//! requests, the gather copies 1,280 blocks of 128 KiB (164 MB) per search,
//! although beams share parents: a level-1 beam's parent is its first code,
//! so 1,280 beams have at most 256 parents between them.
//!
//! On the CPU this kernel groups the rows by parent instead and streams
//! each used block once, scoring every row of the group against a child's
//! row while that row is in cache: the whole table (32 MB) is read at most
//! once and nothing is written but the scores. Other devices keep the
//! tensor path (a GPU's gather is cheap). Training keeps it too: it needs
//! the backward pass, which this kernel does not have.
//!
//! [`ModelConfig::prefix_scored`]: super::ModelConfig::prefix_scored

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};

use super::cpu_storage::f32s;

/// `z` (`[rows, d]`) scored against the rows of its parent's children:
/// `[rows, vocab]`, where row `r`'s children are rows `parents[r] × vocab
/// .. (parents[r] + 1) × vocab` of `table` (`[parents × vocab, d]`).
pub(crate) fn prefix_scores(
    z: &Tensor,
    table: &Tensor,
    parents: &Tensor,
    vocab: usize,
) -> candle_core::Result<Tensor> {
    if z.device().is_cpu() {
        return z.apply_op3_no_bwd(table, parents, &PrefixScores { vocab });
    }
    gathered(z, table, parents, vocab)
}

/// The tensor path: one block gathered per row, then a batched product.
/// Differentiable, and what devices other than the CPU run.
pub(crate) fn gathered(
    z: &Tensor,
    table: &Tensor,
    parents: &Tensor,
    vocab: usize,
) -> candle_core::Result<Tensor> {
    let (rows, d) = z.dims2()?;
    let blocks = table
        .reshape((table.dim(0)? / vocab, vocab * d))?
        .index_select(parents, 0)?
        .reshape((rows, vocab, d))?;
    z.unsqueeze(1)?.matmul(&blocks.transpose(1, 2)?)?.squeeze(1)
}

struct PrefixScores {
    vocab: usize,
}

impl CustomOp3 for PrefixScores {
    fn name(&self) -> &'static str {
        "prefix-scores"
    }

    fn cpu_fwd(
        &self,
        z: &CpuStorage,
        zl: &Layout,
        table: &CpuStorage,
        tl: &Layout,
        parents: &CpuStorage,
        pl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, d) = zl.shape().dims2()?;
        let (table_rows, table_d) = tl.shape().dims2()?;
        if table_d != d || table_rows % self.vocab != 0 || pl.shape().dims1()? != rows {
            candle_core::bail!(
                "{}: z {:?}, table {:?}, parents {:?} do not fit vocab {}",
                self.name(),
                zl.shape(),
                tl.shape(),
                pl.shape(),
                self.vocab
            );
        }
        let z = f32s(z, zl, self.name())?;
        let table = f32s(table, tl, self.name())?;
        let parents = match (parents, pl.contiguous_offsets()) {
            (CpuStorage::U32(p), Some((a, b))) => &p[a..b],
            _ => candle_core::bail!("{}: parents must be contiguous u32", self.name()),
        };
        let (vocab, block) = (self.vocab, self.vocab * d);
        if let Some(&p) = parents.iter().find(|&&p| p as usize >= table_rows / vocab) {
            candle_core::bail!("{}: parent {p} is past the table", self.name());
        }
        let mut order: Vec<u32> = (0..rows as u32).collect();
        order.sort_unstable_by_key(|&r| parents[r as usize]);
        let mut out = vec![0f32; rows * vocab];
        for group in order.chunk_by(|&a, &b| parents[a as usize] == parents[b as usize]) {
            let p = parents[group[0] as usize] as usize;
            let children = &table[p * block..(p + 1) * block];
            for (c, child) in children.chunks_exact(d).enumerate() {
                for &r in group {
                    let r = r as usize;
                    out[r * vocab + c] = dot(child, &z[r * d..(r + 1) * d]);
                }
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((rows, vocab))))
    }
}

/// Eight independent sums, so the compiler keeps them in vector registers.
pub(super) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    let mut acc = [0f32; 8];
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn the_kernel_scores_as_the_gather_does() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        // d 20 leaves a remainder after the 8-wide sums; parents repeat,
        // come unsorted and include the last block.
        let (vocab, d, blocks) = (6, 20, 5);
        let table = Tensor::randn(0f32, 1.0, (blocks * vocab, d), &dev)?;
        let z = Tensor::randn(0f32, 1.0, (7, d), &dev)?;
        let parents = Tensor::new(&[4u32, 0, 4, 2, 0, 4, 1], &dev)?;
        let got = prefix_scores(&z, &table, &parents, vocab)?;
        let want = gathered(&z, &table, &parents, vocab)?;
        assert_eq!(got.dims(), &[7, vocab]);
        let diff = (&got - &want)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert!(diff < 1e-4, "largest difference {diff}");
        // Not a zero tensor agreeing with a zero tensor.
        let scale = want.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        assert!(scale > 1.0);
        Ok(())
    }

    #[test]
    fn a_parent_past_the_table_is_an_error_not_a_panic() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let table = Tensor::zeros((12, 4), DType::F32, &dev)?;
        let z = Tensor::zeros((2, 4), DType::F32, &dev)?;
        let parents = Tensor::new(&[0u32, 3], &dev)?;
        let err = prefix_scores(&z, &table, &parents, 4).unwrap_err();
        assert!(err.to_string().contains("parent 3"), "{err}");
        Ok(())
    }
}
