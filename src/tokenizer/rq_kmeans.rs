//! RQ-KMeans: k-means on the vectors, then on what the first level left, and so on.
//!
//! No network to train, no collapse to fight: each level is a plain k-means, so
//! utilisation is high by construction (k-means keeps every cluster populated
//! when the data has enough distinct points). It is the baseline every
//! semantic-ID paper since TIGER compares against, and often the better one.

use candle_core::Device;

use super::kmeans::{kmeans, KMeansConfig};
use super::quantize::Codebook;

#[derive(Clone, Debug)]
pub struct RqKmeansConfig {
    pub levels: usize,
    pub codebook_size: usize,
    pub max_iters: usize,
    pub tol: f64,
    pub seed: u64,
}

/// Learns `levels` codebooks on the (already normalised) rows of `data`.
/// `on_level` is told when each level is done, with its k-means inertia.
pub fn train(
    data: &[f32],
    dim: usize,
    cfg: &RqKmeansConfig,
    device: &Device,
    mut on_level: impl FnMut(usize, f64, usize),
) -> candle_core::Result<Vec<Codebook>> {
    let mut residual = data.to_vec();
    let mut books = Vec::with_capacity(cfg.levels);
    for level in 0..cfg.levels {
        let km = kmeans(
            &residual,
            dim,
            &KMeansConfig {
                k: cfg.codebook_size,
                max_iters: cfg.max_iters,
                tol: cfg.tol,
                seed: cfg.seed.wrapping_add(level as u64),
            },
            device,
        )?;
        for (row, &a) in residual.chunks_mut(dim).zip(&km.assignment) {
            let c = &km.centroids[a as usize * dim..(a as usize + 1) * dim];
            row.iter_mut().zip(c).for_each(|(r, c)| *r -= c);
        }
        on_level(level, km.inertia, km.iters);
        books.push(Codebook::new(cfg.codebook_size, dim, km.centroids));
    }
    Ok(books)
}
