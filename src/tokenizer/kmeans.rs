//! k-means with k-means++ seeding, the workhorse of RQ-KMeans and of the RQ-VAE
//! codebook initialisation.
//!
//! The distance computation, the only expensive part, is one matrix multiply per
//! chunk of points through candle (`|x|² - 2x·c + |c|²`); the centroid update is a
//! host loop. Empty clusters, which appear when the data has fewer distinct
//! points than clusters or after a bad seed, are re-seeded with the points
//! currently worst served, so a run always ends with every cluster in use when
//! the data allows it.

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Points per distance chunk: bounds the `[chunk, k]` distance matrix.
const CHUNK: usize = 8192;

#[derive(Clone, Debug)]
pub struct KMeansConfig {
    pub k: usize,
    pub max_iters: usize,
    /// Stop when the relative drop in inertia falls below this.
    pub tol: f64,
    pub seed: u64,
}

/// The outcome of a k-means run.
#[derive(Clone, Debug)]
pub struct KMeans {
    pub centroids: Vec<f32>,
    pub assignment: Vec<u32>,
    pub inertia: f64,
    pub iters: usize,
}

/// Clusters the `n × dim` rows of `data` into `cfg.k` clusters.
pub fn kmeans(
    data: &[f32],
    dim: usize,
    cfg: &KMeansConfig,
    device: &Device,
) -> candle_core::Result<KMeans> {
    let n = data.len() / dim;
    assert!(n > 0, "k-means on no points");
    let k = cfg.k;
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let points = Tensor::from_slice(data, (n, dim), device)?;
    let mut centroids = seed_plus_plus(data, &points, dim, k, &mut rng)?;
    let mut assignment = vec![0u32; n];
    let mut dist = vec![0f32; n];
    let mut inertia = f64::INFINITY;
    let mut iters = 0;
    for it in 0..cfg.max_iters {
        iters = it + 1;
        assign(&points, &centroids, dim, &mut assignment, &mut dist)?;
        let new_inertia: f64 = dist.iter().map(|&d| f64::from(d.max(0.0))).sum();
        update(data, dim, k, &assignment, &mut dist, &mut centroids);
        let done = inertia.is_finite() && (inertia - new_inertia) <= cfg.tol * inertia;
        inertia = new_inertia;
        if done {
            break;
        }
    }
    assign(&points, &centroids, dim, &mut assignment, &mut dist)?;
    Ok(KMeans {
        centroids,
        assignment,
        inertia: dist.iter().map(|&d| f64::from(d.max(0.0))).sum(),
        iters,
    })
}

/// k-means++: each new seed is drawn with probability proportional to its
/// squared distance from the seeds so far, which spreads seeds over the data.
fn seed_plus_plus(
    data: &[f32],
    points: &Tensor,
    dim: usize,
    k: usize,
    rng: &mut ChaCha8Rng,
) -> candle_core::Result<Vec<f32>> {
    let n = data.len() / dim;
    let norms = row_norms(data, dim);
    let mut centroids = Vec::with_capacity(k * dim);
    let first = rng.random_range(0..n);
    centroids.extend_from_slice(&data[first * dim..(first + 1) * dim]);
    let mut best = sq_dist_to(points, &norms, &data[first * dim..(first + 1) * dim])?;
    for _ in 1..k {
        let total: f64 = best.iter().map(|&d| f64::from(d)).sum();
        let pick = if total > 0.0 {
            let mut target = rng.random::<f64>() * total;
            let mut pick = n - 1;
            for (i, &d) in best.iter().enumerate() {
                target -= f64::from(d);
                if target <= 0.0 {
                    pick = i;
                    break;
                }
            }
            pick
        } else {
            rng.random_range(0..n)
        };
        let c = &data[pick * dim..(pick + 1) * dim];
        centroids.extend_from_slice(c);
        let d = sq_dist_to(points, &norms, c)?;
        for (b, d) in best.iter_mut().zip(d) {
            *b = b.min(d);
        }
    }
    Ok(centroids)
}

fn row_norms(data: &[f32], dim: usize) -> Vec<f32> {
    data.chunks(dim)
        .map(|r| r.iter().map(|x| x * x).sum())
        .collect()
}

fn sq_dist_to(points: &Tensor, norms: &[f32], c: &[f32]) -> candle_core::Result<Vec<f32>> {
    let dim = c.len();
    let ct = Tensor::from_slice(c, (dim, 1), points.device())?;
    let dots = points.matmul(&ct)?.flatten_all()?.to_vec1::<f32>()?;
    let cn: f32 = c.iter().map(|x| x * x).sum();
    Ok(norms
        .iter()
        .zip(dots)
        .map(|(&xn, d)| (xn - 2.0 * d + cn).max(0.0))
        .collect())
}

/// Nearest centroid of every point, and the squared distance to it.
fn assign(
    points: &Tensor,
    centroids: &[f32],
    dim: usize,
    assignment: &mut [u32],
    dist: &mut [f32],
) -> candle_core::Result<()> {
    let n = assignment.len();
    let k = centroids.len() / dim;
    let c = Tensor::from_slice(centroids, (k, dim), points.device())?;
    let ct = c.t()?.contiguous()?;
    let cn = c.sqr()?.sum(1)?.unsqueeze(0)?;
    for start in (0..n).step_by(CHUNK) {
        let len = CHUNK.min(n - start);
        let x = points.narrow(0, start, len)?;
        let xn = x.sqr()?.sum_keepdim(1)?;
        let d = x
            .matmul(&ct)?
            .affine(-2.0, 0.0)?
            .broadcast_add(&cn)?
            .broadcast_add(&xn)?;
        let idx = d.argmin(1)?.to_vec1::<u32>()?;
        let min = d.min(1)?.to_vec1::<f32>()?;
        assignment[start..start + len].copy_from_slice(&idx);
        dist[start..start + len].copy_from_slice(&min);
    }
    Ok(())
}

/// Moves each centroid to the mean of its points; an empty cluster takes the
/// point farthest from its own centroid (and that point's distance is zeroed so
/// that two empty clusters do not take the same point).
fn update(
    data: &[f32],
    dim: usize,
    k: usize,
    assignment: &[u32],
    dist: &mut [f32],
    centroids: &mut [f32],
) {
    let mut sums = vec![0f64; k * dim];
    let mut counts = vec![0usize; k];
    for (row, &a) in data.chunks(dim).zip(assignment) {
        let a = a as usize;
        counts[a] += 1;
        for (s, &x) in sums[a * dim..(a + 1) * dim].iter_mut().zip(row) {
            *s += f64::from(x);
        }
    }
    for c in 0..k {
        let target = &mut centroids[c * dim..(c + 1) * dim];
        if counts[c] > 0 {
            for (t, s) in target.iter_mut().zip(&sums[c * dim..(c + 1) * dim]) {
                *t = (*s / counts[c] as f64) as f32;
            }
        } else {
            let (far, _) = dist
                .iter()
                .enumerate()
                .fold(
                    (0, f32::NEG_INFINITY),
                    |b, (i, &d)| if d > b.1 { (i, d) } else { b },
                );
            target.copy_from_slice(&data[far * dim..(far + 1) * dim]);
            dist[far] = 0.0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_well_separated_clusters() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let centres = [[0.0f32, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]];
        let mut data = Vec::new();
        let mut truth = Vec::new();
        for i in 0..400 {
            let c = centres[i % 4];
            data.push(c[0] + rng.random_range(-0.5..0.5));
            data.push(c[1] + rng.random_range(-0.5..0.5));
            truth.push(i % 4);
        }
        let cfg = KMeansConfig {
            k: 4,
            max_iters: 50,
            tol: 1e-6,
            seed: 1,
        };
        let km = kmeans(&data, 2, &cfg, &Device::Cpu).unwrap();
        for i in 0..400 {
            for j in 0..400 {
                assert_eq!(
                    truth[i] == truth[j],
                    km.assignment[i] == km.assignment[j],
                    "points {i} and {j}"
                );
            }
        }
        assert!(km.inertia < 400.0 * 0.5, "inertia {}", km.inertia);
    }

    #[test]
    fn uses_every_cluster_when_points_allow() {
        let data: Vec<f32> = (0..64)
            .flat_map(|i| [i as f32, (i * i % 17) as f32])
            .collect();
        let cfg = KMeansConfig {
            k: 32,
            max_iters: 30,
            tol: 0.0,
            seed: 9,
        };
        let km = kmeans(&data, 2, &cfg, &Device::Cpu).unwrap();
        let mut used = km.assignment.clone();
        used.sort();
        used.dedup();
        assert_eq!(used.len(), 32);
    }
}
