//! The frozen arithmetic: what turns a vector into codes once training is over.
//!
//! Everything here runs on the host in plain `f32` loops with a fixed summation
//! order, one item at a time. That is deliberate: the SID of an item must not
//! depend on the thread count, the BLAS kernel or the machine, and a
//! matrix-multiply library gives no such promise (it may split the reduction
//! differently with more threads). Training may use candle's fast kernels; the
//! SIDs it reports are then recomputed through this path, so that training and
//! every later assignment agree bit for bit.

use crate::sid::Code;

/// A dot product with eight independent accumulators: fast enough for the
/// compiler to vectorise, and the order of additions never changes.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let mut acc = [0.0f32; 8];
    let chunks = a.len() / 8;
    for i in 0..chunks {
        for j in 0..8 {
            acc[j] += a[i * 8 + j] * b[i * 8 + j];
        }
    }
    let mut tail = 0.0;
    for i in chunks * 8..a.len() {
        tail += a[i] * b[i];
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// One level's codewords, `k` rows of `dim` values.
#[derive(Clone, Debug, PartialEq)]
pub struct Codebook {
    k: usize,
    dim: usize,
    words: Vec<f32>,
    half_norms: Vec<f32>,
}

impl Codebook {
    pub fn new(k: usize, dim: usize, words: Vec<f32>) -> Codebook {
        assert_eq!(words.len(), k * dim, "codebook shape");
        let half_norms = words.chunks(dim).map(|w| 0.5 * dot(w, w)).collect();
        Codebook {
            k,
            dim,
            words,
            half_norms,
        }
    }

    pub fn k(&self) -> usize {
        self.k
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn words(&self) -> &[f32] {
        &self.words
    }

    pub fn word(&self, code: usize) -> &[f32] {
        &self.words[code * self.dim..(code + 1) * self.dim]
    }

    /// The nearest codeword to `x` in Euclidean distance. Since
    /// `|x − c|² = |x|² − 2(x·c − |c|²/2)`, the argmax of `x·c − |c|²/2` is the
    /// answer; ties go to the lower code.
    pub fn nearest(&self, x: &[f32]) -> usize {
        let mut best = 0;
        let mut best_score = f32::NEG_INFINITY;
        for (c, w) in self.words.chunks(self.dim).enumerate() {
            let score = dot(x, w) - self.half_norms[c];
            if score > best_score {
                best_score = score;
                best = c;
            }
        }
        best
    }

    /// Every code from the nearest codeword to `x` to the farthest, ties to
    /// the lower code: [`nearest`](Self::nearest) first (a score that is not
    /// a number ranks last, as `nearest` never takes one).
    pub fn ranked(&self, x: &[f32], out: &mut Vec<Code>) {
        let scores: Vec<f32> = self
            .words
            .chunks(self.dim)
            .zip(&self.half_norms)
            .map(|(w, h)| dot(x, w) - h)
            .map(|s| if s.is_nan() { f32::NEG_INFINITY } else { s })
            .collect();
        out.clear();
        out.extend((0..self.k).map(|c| c as Code));
        out.sort_by(|&a, &b| {
            let (a, b) = (usize::from(a), usize::from(b));
            scores[b].total_cmp(&scores[a]).then(a.cmp(&b))
        });
    }
}

/// Residual quantisation: each level quantises what the previous levels left.
#[derive(Clone, Debug, PartialEq)]
pub struct ResidualQuantizer {
    levels: Vec<Codebook>,
}

impl ResidualQuantizer {
    pub fn new(levels: Vec<Codebook>) -> ResidualQuantizer {
        assert!(!levels.is_empty());
        assert!(levels.iter().all(|l| l.dim == levels[0].dim));
        ResidualQuantizer { levels }
    }

    pub fn levels(&self) -> &[Codebook] {
        &self.levels
    }

    pub fn dim(&self) -> usize {
        self.levels[0].dim
    }

    /// Writes one code per level into `codes` and returns the squared norm of
    /// the final residual (the quantisation error). `residual` is scratch space
    /// of length `dim`, so the hot path allocates nothing.
    pub fn quantize(&self, x: &[f32], codes: &mut [Code], residual: &mut [f32]) -> f32 {
        residual.copy_from_slice(x);
        descend(&self.levels, codes, residual);
        dot(residual, residual)
    }

    /// [`quantize`](Self::quantize)'s codes, with every code of the last
    /// level ranked into `last` from nearest to farthest (its code in
    /// `codes` is the first): the order in which an item whose nearest
    /// prefix is full tries the prefixes next to it.
    pub fn quantize_ranked(
        &self,
        x: &[f32],
        codes: &mut [Code],
        residual: &mut [f32],
        last: &mut Vec<Code>,
    ) {
        let (book, before) = self.levels.split_last().expect("at least one level");
        residual.copy_from_slice(x);
        descend(before, codes, residual);
        book.ranked(residual, last);
        codes[before.len()] = last[0];
    }
}

/// Each of `levels` quantises `residual` in turn: its nearest code goes to
/// `codes`, and its codeword is taken from `residual`.
fn descend(levels: &[Codebook], codes: &mut [Code], residual: &mut [f32]) {
    for (level, book) in levels.iter().enumerate() {
        let c = book.nearest(residual);
        codes[level] = c as Code;
        for (r, w) in residual.iter_mut().zip(book.word(c)) {
            *r -= w;
        }
    }
}

/// Centring and scaling applied before quantisation. Centring matters: without
/// it the first level spends its codes on the catalogue's common direction
/// (every attribute set shares `attr2`, every sentence embedding shares a bias).
#[derive(Clone, Debug, PartialEq)]
pub struct Normaliser {
    pub mean: Vec<f32>,
    pub scale: f32,
}

impl Normaliser {
    /// Fits mean and a single scale that makes the mean squared norm of the
    /// centred rows equal to `dim` (unit variance per coordinate on average).
    pub fn fit(data: &[f32], dim: usize) -> Normaliser {
        let n = data.len() / dim;
        let mut mean = vec![0.0f64; dim];
        for row in data.chunks(dim) {
            for (m, &x) in mean.iter_mut().zip(row) {
                *m += f64::from(x);
            }
        }
        mean.iter_mut().for_each(|m| *m /= n.max(1) as f64);
        let mut sq = 0.0f64;
        for row in data.chunks(dim) {
            for (m, &x) in mean.iter().zip(row) {
                sq += (f64::from(x) - m).powi(2);
            }
        }
        let var = sq / (n.max(1) * dim) as f64;
        let scale = if var > 0.0 {
            (1.0 / var.sqrt()) as f32
        } else {
            1.0
        };
        Normaliser {
            mean: mean.into_iter().map(|m| m as f32).collect(),
            scale,
        }
    }

    pub fn apply(&self, x: &[f32], out: &mut [f32]) {
        for ((o, &v), m) in out.iter_mut().zip(x).zip(&self.mean) {
            *o = (v - m) * self.scale;
        }
    }

    pub fn apply_all(&self, data: &[f32]) -> Vec<f32> {
        let dim = self.mean.len();
        let mut out = vec![0.0; data.len()];
        for (o, x) in out.chunks_mut(dim).zip(data.chunks(dim)) {
            self.apply(x, o);
        }
        out
    }
}

/// A dense layer stored as candle stores it: weight `[out, in]`, bias `[out]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Dense {
    pub inputs: usize,
    pub outputs: usize,
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
}

/// A ReLU MLP evaluated on the host (the RQ-VAE encoder at assignment time).
#[derive(Clone, Debug, PartialEq)]
pub struct Mlp {
    pub layers: Vec<Dense>,
}

impl Mlp {
    pub fn input_dim(&self) -> usize {
        self.layers[0].inputs
    }

    pub fn output_dim(&self) -> usize {
        self.layers[self.layers.len() - 1].outputs
    }

    /// ReLU between layers, none after the last.
    pub fn forward(&self, x: &[f32]) -> Vec<f32> {
        let mut cur = x.to_vec();
        for (i, layer) in self.layers.iter().enumerate() {
            let mut next: Vec<f32> = layer
                .weight
                .chunks(layer.inputs)
                .zip(&layer.bias)
                .map(|(w, b)| dot(w, &cur) + b)
                .collect();
            if i + 1 < self.layers.len() {
                next.iter_mut().for_each(|v| *v = v.max(0.0));
            }
            cur = next;
        }
        cur
    }
}

/// Runs `f(i, codes_row)` over all rows on `threads` threads and collects
/// the codes and what `f` returns per row. Each row is independent, so the
/// result does not depend on the thread count.
pub fn par_rows<T, F>(n: usize, levels: usize, threads: usize, f: F) -> (Vec<Code>, Vec<T>)
where
    T: Default + Clone + Send,
    F: Fn(usize, &mut [Code]) -> T + Sync,
{
    let mut codes = vec![0 as Code; n * levels];
    let mut out = vec![T::default(); n];
    let threads = threads.max(1);
    let per = n.div_ceil(threads).max(1);
    std::thread::scope(|s| {
        for (t, (chunk, res)) in codes
            .chunks_mut(per * levels)
            .zip(out.chunks_mut(per))
            .enumerate()
        {
            let f = &f;
            s.spawn(move || {
                for (j, (row, r)) in chunk.chunks_mut(levels).zip(res).enumerate() {
                    *r = f(t * per + j, row);
                }
            });
        }
    });
    (codes, out)
}

/// The number of threads to use for host work: `RAYON_NUM_THREADS` when set
/// (the variable candle also obeys), else the machine's parallelism.
pub fn host_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_matches_naive() {
        let a: Vec<f32> = (0..19).map(|i| i as f32 * 0.5).collect();
        let b: Vec<f32> = (0..19).map(|i| 1.0 - i as f32).collect();
        let naive: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((dot(&a, &b) - naive).abs() < 1e-3);
    }

    #[test]
    fn residual_quantizer_picks_nearest_each_level() {
        let l0 = Codebook::new(2, 2, vec![0.0, 0.0, 10.0, 10.0]);
        let l1 = Codebook::new(3, 2, vec![0.0, 0.0, 1.0, 0.0, 0.0, 1.0]);
        let rq = ResidualQuantizer::new(vec![l0, l1]);
        let mut codes = [0; 2];
        let mut scratch = [0.0; 2];
        let err = rq.quantize(&[9.0, 10.9], &mut codes, &mut scratch);
        assert_eq!(codes, [1, 2]);
        assert!((err - (1.0 + 0.01)).abs() < 1e-4, "{err}");
        // What level 0 leaves of (9, 10.9) is (-1, 0.9): nearest (0, 1),
        // then (0, 0), then (1, 0).
        let (mut ranked, mut same) = (Vec::new(), [0; 2]);
        rq.quantize_ranked(&[9.0, 10.9], &mut same, &mut scratch, &mut ranked);
        assert_eq!(ranked, [2, 0, 1]);
        assert_eq!(same, codes);
        // A tie (equidistant codewords) goes to the lower code.
        rq.quantize_ranked(&[10.6, 10.6], &mut same, &mut scratch, &mut ranked);
        assert_eq!(ranked, [1, 2, 0]);
        assert_eq!(same, [1, 1]);
    }

    #[test]
    fn par_rows_is_independent_of_threads() {
        let f = |i: usize, row: &mut [Code]| {
            row[0] = (i % 7) as Code;
            row[1] = (i / 7) as Code;
            i * 2
        };
        assert_eq!(par_rows(100, 2, 1, f), par_rows(100, 2, 3, f));
    }

    #[test]
    fn normaliser_centres_and_scales() {
        let data = [1.0, 3.0, 3.0, 5.0];
        let n = Normaliser::fit(&data, 2);
        assert_eq!(n.mean, vec![2.0, 4.0]);
        let out = n.apply_all(&data);
        let msq: f32 = out.iter().map(|x| x * x).sum::<f32>() / 4.0;
        assert!((msq - 1.0).abs() < 1e-5);
    }
}
