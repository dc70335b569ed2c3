//! GPTRec's SVD tokenisation, for catalogues that have interactions but no content.
//!
//! The item factors of a rank-`k` truncated SVD of the binary user–item matrix
//! place items that the same users touch near each other. Each of the `k`
//! dimensions becomes one SID level by cutting it into `bins` quantile bins, so
//! every level's codes are used about equally often.
//!
//! The SVD is a randomised subspace iteration (Halko, Martinsson & Tropp 2011)
//! on the sparse matrix: a few passes over the interactions and one eigen
//! decomposition of a `(k + p) × (k + p)` matrix, so it scales with the number
//! of interactions, not with users × items.

use crate::sid::Code;
use nalgebra::{DMatrix, SymmetricEigen};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[derive(Clone, Debug)]
pub struct SvdConfig {
    /// Factor dimensions, one per content level.
    pub dims: usize,
    /// Extra dimensions carried through the iteration for accuracy.
    pub oversample: usize,
    pub power_iters: usize,
    pub seed: u64,
}

/// The factorisation the tokenizer keeps.
pub struct SvdFactors {
    /// `items × dims`, row-major.
    pub item_factors: Vec<f32>,
    /// `users × dims`: `A V Σ⁻²`, so that an unseen item's factor is the sum of
    /// its users' rows (fold-in).
    pub user_proj: Vec<f32>,
    pub singular_values: Vec<f64>,
    /// Share of `‖A‖²` the rank-`dims` approximation captures.
    pub explained: f64,
}

/// Factorises the binary matrix whose row `u` holds the items of
/// `rows[u]` (duplicates count once), with `items` columns.
pub fn factorize(rows: &[Vec<u32>], items: usize, cfg: &SvdConfig) -> SvdFactors {
    let rows: Vec<Vec<u32>> = rows
        .iter()
        .map(|r| {
            let mut r = r.clone();
            r.sort_unstable();
            r.dedup();
            r
        })
        .collect();
    let m = (cfg.dims + cfg.oversample).min(items).max(cfg.dims);
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let mut q: Vec<f64> = (0..items * m)
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    orthonormalise(&mut q, items, m);
    for _ in 0..cfg.power_iters {
        let y = times(&rows, &q, m);
        q = times_transposed(&rows, &y, items, m);
        orthonormalise(&mut q, items, m);
    }
    let b = times(&rows, &q, m);
    let users = rows.len();
    let gram = DMatrix::from_fn(m, m, |i, j| {
        (0..users).map(|u| b[u * m + i] * b[u * m + j]).sum::<f64>()
    });
    let eig = SymmetricEigen::new(gram);
    let mut order: Vec<usize> = (0..m).collect();
    order.sort_by(|&a, &b| eig.eigenvalues[b].total_cmp(&eig.eigenvalues[a]));
    let k = cfg.dims;
    let mut item_factors = vec![0f32; items * k];
    let mut user_proj = vec![0f32; users * k];
    let mut singular_values = Vec::with_capacity(k);
    for (d, &e) in order.iter().take(k).enumerate() {
        let w = eig.eigenvectors.column(e);
        let mut v: Vec<f64> = (0..items)
            .map(|i| (0..m).map(|j| q[i * m + j] * w[j]).sum())
            .collect();
        let pivot = v
            .iter()
            .copied()
            .fold(0.0f64, |a, x| if x.abs() > a.abs() { x } else { a });
        if pivot < 0.0 {
            v.iter_mut().for_each(|x| *x = -*x);
        }
        let lambda = eig.eigenvalues[e].max(0.0);
        singular_values.push(lambda.sqrt());
        for (i, x) in v.iter().enumerate() {
            item_factors[i * k + d] = *x as f32;
        }
        let inv = if lambda > 0.0 { 1.0 / lambda } else { 0.0 };
        for (u, row) in rows.iter().enumerate() {
            let s: f64 = row.iter().map(|&i| v[i as usize]).sum();
            user_proj[u * k + d] = (s * inv) as f32;
        }
    }
    let nnz: usize = rows.iter().map(Vec::len).sum();
    let energy: f64 = singular_values.iter().map(|s| s * s).sum();
    SvdFactors {
        item_factors,
        user_proj,
        singular_values,
        explained: if nnz > 0 { energy / nnz as f64 } else { 0.0 },
    }
}

/// `A Q`: users × m.
fn times(rows: &[Vec<u32>], q: &[f64], m: usize) -> Vec<f64> {
    let mut y = vec![0.0; rows.len() * m];
    for (u, row) in rows.iter().enumerate() {
        let out = &mut y[u * m..(u + 1) * m];
        for &i in row {
            out.iter_mut()
                .zip(&q[i as usize * m..(i as usize + 1) * m])
                .for_each(|(o, x)| *o += x);
        }
    }
    y
}

/// `Aᵀ Y`: items × m.
fn times_transposed(rows: &[Vec<u32>], y: &[f64], items: usize, m: usize) -> Vec<f64> {
    let mut z = vec![0.0; items * m];
    for (u, row) in rows.iter().enumerate() {
        let src = &y[u * m..(u + 1) * m];
        for &i in row {
            z[i as usize * m..(i as usize + 1) * m]
                .iter_mut()
                .zip(src)
                .for_each(|(o, x)| *o += x);
        }
    }
    z
}

/// Modified Gram–Schmidt on the `m` columns of a row-major `n × m` matrix.
fn orthonormalise(a: &mut [f64], n: usize, m: usize) {
    for j in 0..m {
        for p in 0..j {
            let d: f64 = (0..n).map(|i| a[i * m + j] * a[i * m + p]).sum();
            (0..n).for_each(|i| a[i * m + j] -= d * a[i * m + p]);
        }
        let norm = (0..n).map(|i| a[i * m + j].powi(2)).sum::<f64>().sqrt();
        if norm > 1e-12 {
            (0..n).for_each(|i| a[i * m + j] /= norm);
        }
    }
}

/// `bins - 1` edges cutting `values` into bins of equal counts; a value's bin is
/// the number of edges at or below it.
pub fn quantile_edges(values: &[f32], bins: usize) -> Vec<f32> {
    let mut sorted = values.to_vec();
    sorted.sort_by(f32::total_cmp);
    let n = sorted.len();
    (1..bins)
        .map(|j| sorted[(j * n / bins).min(n - 1)])
        .collect()
}

/// Every bin from the one `v` falls in to the farthest (by how far `v` is
/// from the bin's range), ties to the lower bin; `edges` as
/// [`quantile_edges`] cut them.
pub fn rank_bins(edges: &[f32], v: f32, out: &mut Vec<Code>) {
    let gap = |bin: usize| {
        let below = bin.checked_sub(1).map_or(f32::NEG_INFINITY, |b| edges[b]);
        let above = edges.get(bin).copied().unwrap_or(f32::INFINITY);
        if v < below {
            below - v
        } else if v >= above {
            v - above
        } else {
            0.0
        }
    };
    out.clear();
    out.extend((0..=edges.len()).map(|b| b as Code));
    out.sort_by(|&a, &b| {
        let (a, b) = (usize::from(a), usize::from(b));
        gap(a).total_cmp(&gap(b)).then(a.cmp(&b))
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovers_block_structure() {
        // Two communities: users 0..20 touch items 0..10, users 20..40 items 10..20.
        let rows: Vec<Vec<u32>> = (0..40u32)
            .map(|u| {
                let base = if u < 20 { 0 } else { 10 };
                (0..10)
                    .filter(|i| (u + i) % 3 != 0)
                    .map(|i| base + i)
                    .collect()
            })
            .collect();
        let f = factorize(
            &rows,
            20,
            &SvdConfig {
                dims: 2,
                oversample: 4,
                power_iters: 4,
                seed: 1,
            },
        );
        assert!(f.explained > 0.5, "explained {}", f.explained);
        assert!(f.singular_values[0] >= f.singular_values[1]);
        // Items of the same community agree on the sign pattern of the factors.
        let sign = |i: usize| (f.item_factors[i * 2] > 0.0, f.item_factors[i * 2 + 1] > 0.0);
        assert!((0..10).all(|i| sign(i) == sign(0)));
        assert!((10..20).all(|i| sign(i) == sign(10)));
        assert_ne!(sign(0), sign(10));
        // Folding in an item's users reproduces its factor.
        let users_of_3: Vec<usize> = (0..40).filter(|&u| rows[u].contains(&3)).collect();
        for d in 0..2 {
            let folded: f32 = users_of_3.iter().map(|&u| f.user_proj[u * 2 + d]).sum();
            assert!((folded - f.item_factors[3 * 2 + d]).abs() < 1e-3, "dim {d}");
        }
    }

    #[test]
    fn quantile_bins_are_balanced() {
        let values: Vec<f32> = (0..1000).map(|i| ((i * 7919) % 1000) as f32).collect();
        let edges = quantile_edges(&values, 4);
        let mut counts = [0; 4];
        for v in &values {
            counts[edges.partition_point(|e| e <= v)] += 1;
        }
        assert_eq!(counts, [250; 4]);
    }

    #[test]
    fn bins_rank_from_the_value_outwards() {
        let edges = [1.0, 2.0, 4.0];
        let mut out = Vec::new();
        rank_bins(&edges, 2.2, &mut out);
        assert_eq!(out, [2, 1, 0, 3]);
        assert_eq!(usize::from(out[0]), edges.partition_point(|&e| e <= 2.2));
        rank_bins(&edges, 5.0, &mut out);
        assert_eq!(out, [3, 2, 1, 0]);
    }
}
