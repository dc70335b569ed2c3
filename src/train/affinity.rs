//! After training: fit a content affinity ([`crate::model::affinity`]) on
//! the training transitions.
//!
//! Each training transition (an example's last history item and its
//! target) is one softmax over the trained items' affinity to the previous
//! item's content, and the fit minimises its cross-entropy with Adam, full
//! softmax: the trained items are tens of thousands and the rank small, so
//! a step is three `[batch × items × rank]` matrix products.
//!
//! Written by hand rather than with candle's autograd: content rows are
//! sparse (a few attribute ids or words in 1,024 hashed dims), so the
//! projections are cheap sparse sums, and the `[batch × items]` logits are
//! one reused buffer; through candle each step allocated and zeroed several
//! of them and an epoch of Sports took minutes, most of it in the kernel. A seeded 2% of the transitions
//! (at most 2,000) is held out; the epoch with the best held-out NLL is
//! kept, and [`AffinityFit`] puts the uniform softmax's NLL (`ln` of the
//! candidates) beside it: what content says about the next item, in nats.
//!
//! The model's weights are not touched and no item id is read: the fit is
//! a function of content and transitions only, so an item that arrives
//! after it is scored as well as one that was there.

use std::collections::HashMap;

use gemm::Parallelism;
use indicatif::ProgressBar;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::model::{Affinity, ContentTable};

/// Knobs of a fit; the defaults are the ones the README's results used.
#[derive(Clone, Debug)]
pub struct AffinityOptions {
    /// Width of the query and key projections.
    pub rank: usize,
    pub epochs: usize,
    /// Transitions per step.
    pub batch: usize,
    pub lr: f32,
    pub seed: u64,
    /// Threads for the matrix products.
    pub threads: usize,
}

impl Default for AffinityOptions {
    fn default() -> Self {
        AffinityOptions {
            rank: 64,
            epochs: 8,
            batch: 1024,
            lr: 0.01,
            seed: 42,
            threads: 1,
        }
    }
}

/// What [`fit_affinity`] saw and reached.
#[derive(Clone, Debug, Serialize)]
pub struct AffinityFit {
    /// Transitions fitted on, and held out.
    pub pairs: usize,
    pub held_out: usize,
    /// Items the softmax runs over (the trained items).
    pub candidates: usize,
    /// The held-out NLL of a uniform choice among the candidates, and of
    /// the cosine alone at the temperature.
    pub uniform_nll: f64,
    pub cosine_nll: f64,
    /// The held-out NLL after each epoch.
    pub nll: Vec<f64>,
    /// The epoch kept (1-based).
    pub best_epoch: usize,
}

/// Content rows as (dimension, value) lists.
struct Sparse {
    starts: Vec<usize>,
    entries: Vec<(u32, f32)>,
}

impl Sparse {
    fn new<'a>(rows: impl Iterator<Item = Option<&'a [f32]>>) -> Sparse {
        let mut s = Sparse {
            starts: vec![0],
            entries: Vec::new(),
        };
        for row in rows {
            if let Some(r) = row {
                s.entries.extend(
                    r.iter()
                        .enumerate()
                        .filter(|(_, &x)| x != 0.0)
                        .map(|(j, &x)| (j as u32, x)),
                );
            }
            s.starts.push(s.entries.len());
        }
        s
    }

    fn row(&self, i: usize) -> &[(u32, f32)] {
        &self.entries[self.starts[i]..self.starts[i + 1]]
    }

    /// `out[i] = Σ v · m[j]` over row `i`'s entries, for rows `rows`;
    /// `m` is `[dim × rank]`.
    fn project(&self, rows: impl Iterator<Item = usize>, m: &[f32], rank: usize, out: &mut [f32]) {
        for (i, o) in rows.zip(out.chunks_exact_mut(rank)) {
            o.fill(0.0);
            for &(j, v) in self.row(i) {
                let m = &m[j as usize * rank..(j as usize + 1) * rank];
                o.iter_mut().zip(m).for_each(|(o, m)| *o += v * m);
            }
        }
    }

    /// `grad[j] += Σ v · d[i]` over rows `rows` (the transpose of
    /// [`Sparse::project`]).
    fn project_back(
        &self,
        rows: impl Iterator<Item = usize>,
        d: &[f32],
        rank: usize,
        grad: &mut [f32],
    ) {
        for (i, d) in rows.zip(d.chunks_exact(rank)) {
            for &(j, v) in self.row(i) {
                let g = &mut grad[j as usize * rank..(j as usize + 1) * rank];
                g.iter_mut().zip(d).for_each(|(g, d)| *g += v * d);
            }
        }
    }
}

/// A matrix operand: a row-major buffer read as `[rows × cols]`, or as the
/// transpose of one.
#[derive(Clone, Copy)]
struct Mat<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    transposed: bool,
}

impl<'a> Mat<'a> {
    fn new(data: &'a [f32], rows: usize, cols: usize) -> Mat<'a> {
        Mat {
            data,
            rows,
            cols,
            transposed: false,
        }
    }

    /// The transpose of a row-major `[cols × rows]` buffer.
    fn t(data: &'a [f32], rows: usize, cols: usize) -> Mat<'a> {
        Mat {
            data,
            rows,
            cols,
            transposed: true,
        }
    }

    /// (column stride, row stride).
    fn strides(&self) -> (isize, isize) {
        if self.transposed {
            (self.rows as isize, 1)
        } else {
            (1, self.cols as isize)
        }
    }
}

/// `dst = a · b`, `dst` row-major `[a.rows × b.cols]`.
fn matmul(dst: &mut [f32], a: Mat<'_>, b: Mat<'_>, threads: usize) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert!(a.data.len() >= m * k && b.data.len() >= k * n && dst.len() >= m * n);
    assert_eq!(b.rows, k);
    let ((a_cs, a_rs), (b_cs, b_rs)) = (a.strides(), b.strides());
    let parallelism = if threads > 1 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    // SAFETY: the assertions above keep every index gemm forms from these
    // dimensions and strides inside the three slices, and `dst` is borrowed
    // mutably, so it aliases neither operand.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.data.as_ptr(),
            a_cs,
            a_rs,
            b.data.as_ptr(),
            b_cs,
            b_rs,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// One parameter with its Adam moments.
struct Param {
    value: Vec<f32>,
    grad: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
}

impl Param {
    fn new(value: Vec<f32>) -> Param {
        let n = value.len();
        Param {
            value,
            grad: vec![0.0; n],
            m: vec![0.0; n],
            v: vec![0.0; n],
        }
    }

    fn step(&mut self, lr: f32, t: i32) {
        let (b1, b2, eps) = (0.9f32, 0.999f32, 1e-8f32);
        let (c1, c2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
        for (((x, g), m), v) in self
            .value
            .iter_mut()
            .zip(&mut self.grad)
            .zip(&mut self.m)
            .zip(&mut self.v)
        {
            *m = b1 * *m + (1.0 - b1) * *g;
            *v = b2 * *v + (1.0 - b2) * *g * *g;
            *x -= lr * (*m / c1) / ((*v / c2).sqrt() + eps);
            *g = 0.0;
        }
    }
}

/// The fit's buffers, sized once for the largest batch.
struct Work {
    keys: Vec<f32>,
    key_bias: Vec<f32>,
    queries: Vec<f32>,
    /// `[batch × candidates]`: logits, then probabilities, then their
    /// gradient.
    logits: Vec<f32>,
    d_queries: Vec<f32>,
    d_keys: Vec<f32>,
    d_key_bias: Vec<f32>,
}

/// Fits an affinity on `pairs` (previous item, next item; ords into
/// `content`), the next item chosen among `candidates`. Pairs whose
/// previous item has no content or whose next item is not a candidate are
/// left out. The cosine at `temperature` is scored on the same held-out
/// transitions for comparison; it is not part of the fit (fitted as what
/// it adds to the cosine, the affinity explained the transitions less
/// well and found fewer cold targets: README, "Cold start").
/// `content_space` names the content for the file.
pub fn fit_affinity(
    content: &ContentTable,
    content_space: &str,
    temperature: f32,
    pairs: &[(u32, u32)],
    candidates: &[u32],
    opts: &AffinityOptions,
    bar: impl Fn(u64, &str) -> ProgressBar,
) -> Result<(Affinity, AffinityFit), String> {
    let dim = content.dim();
    let rank = opts.rank.max(1);
    let threads = opts.threads.max(1);
    let index: HashMap<u32, u32> = candidates
        .iter()
        .enumerate()
        .map(|(i, &o)| (o, i as u32))
        .collect();
    let mut usable: Vec<(u32, u32)> = pairs
        .iter()
        .filter(|(prev, _)| content.row(*prev).is_some())
        .filter_map(|&(prev, next)| index.get(&next).map(|&i| (prev, i)))
        .collect();
    if usable.len() < 2 || candidates.is_empty() || dim == 0 {
        return Err(format!(
            "{} usable transitions among {} candidates: nothing to fit",
            usable.len(),
            candidates.len()
        ));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    usable.shuffle(&mut rng);
    let held = (usable.len() / 50).clamp(1, 2000);
    let (held, train) = usable.split_at(held);
    let mut train = train.to_vec();
    let n_cand = candidates.len();
    let cand = Sparse::new(candidates.iter().map(|&o| content.row(o)));
    let items = Sparse::new((0..content.len() as u32).map(|o| content.row(o)));
    // The candidates by dimension, for the cosine's score: rows are sparse,
    // so a row's cosines are a few short posting lists, not a product.
    let mut postings: Vec<Vec<(u32, f32)>> = vec![Vec::new(); dim];
    for i in 0..n_cand {
        for &(j, v) in cand.row(i) {
            postings[j as usize].push((i as u32, v / temperature));
        }
    }
    // Uniform in ±0.1·√3: standard deviation 0.1, seeded.
    let a = 0.1 * 3f32.sqrt();
    let mut init = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-a..a)).collect() };
    let mut query = Param::new(init(dim * rank));
    let mut key = Param::new(init(dim * rank));
    let mut bias = Param::new(vec![0.0; dim]);
    let batch = opts.batch.max(1);
    let mut w = Work {
        keys: vec![0.0; n_cand * rank],
        key_bias: vec![0.0; n_cand],
        queries: vec![0.0; batch * rank],
        logits: vec![0.0; batch * n_cand],
        d_queries: vec![0.0; batch * rank],
        d_keys: vec![0.0; n_cand * rank],
        d_key_bias: vec![0.0; n_cand],
    };
    // Forward: the batch's softmax into `w.logits`, by the affinity or (for
    // the comparison) by the cosine alone; returns its summed NLL.
    let forward = |w: &mut Work,
                   query: &Param,
                   key: &Param,
                   bias: &Param,
                   chunk: &[(u32, u32)],
                   learnt: bool| {
        let b = chunk.len();
        let logits = &mut w.logits[..b * n_cand];
        if learnt {
            cand.project(0..n_cand, &key.value, rank, &mut w.keys);
            for (i, kb) in w.key_bias.iter_mut().enumerate() {
                *kb = cand
                    .row(i)
                    .iter()
                    .map(|&(j, v)| v * bias.value[j as usize])
                    .sum();
            }
            items.project(
                chunk.iter().map(|p| p.0 as usize),
                &query.value,
                rank,
                &mut w.queries,
            );
            matmul(
                logits,
                Mat::new(&w.queries, b, rank),
                Mat::t(&w.keys, rank, n_cand),
                threads,
            );
            for row in logits.chunks_exact_mut(n_cand) {
                row.iter_mut().zip(&w.key_bias).for_each(|(l, kb)| *l += kb);
            }
        } else {
            for (row, &(prev, _)) in logits.chunks_exact_mut(n_cand).zip(chunk) {
                row.fill(0.0);
                for &(j, x) in items.row(prev as usize) {
                    for &(i, v) in &postings[j as usize] {
                        row[i as usize] += x * v;
                    }
                }
            }
        }
        let mut nll = 0.0f64;
        for (row, &(_, target)) in logits.chunks_exact_mut(n_cand).zip(chunk) {
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            let mut z = 0.0f32;
            row.iter_mut().for_each(|x| {
                *x = (*x - max).exp();
                z += *x;
            });
            row.iter_mut().for_each(|x| *x /= z);
            nll -= (row[target as usize].max(f32::MIN_POSITIVE) as f64).ln();
        }
        nll
    };
    let cosine_nll = held
        .chunks(batch)
        .map(|c| forward(&mut w, &query, &key, &bias, c, false))
        .sum::<f64>()
        / held.len() as f64;
    let mut fit = AffinityFit {
        pairs: train.len(),
        held_out: held.len(),
        candidates: n_cand,
        uniform_nll: (n_cand as f64).ln(),
        cosine_nll,
        nll: Vec::new(),
        best_epoch: 0,
    };
    let mut best = (f64::INFINITY, Vec::new(), Vec::new(), Vec::new());
    let mut t = 0;
    for epoch in 1..=opts.epochs {
        train.shuffle(&mut rng);
        let pb = bar(
            train.len().div_ceil(batch) as u64,
            &format!("affinity {epoch}"),
        );
        for chunk in train.chunks(batch) {
            let b = chunk.len();
            forward(&mut w, &query, &key, &bias, chunk, true);
            // d(mean NLL)/d(logits) = (p − onehot) / b.
            for (row, &(_, target)) in w.logits.chunks_exact_mut(n_cand).zip(chunk) {
                row[target as usize] -= 1.0;
                row.iter_mut().for_each(|x| *x /= b as f32);
            }
            let g = &w.logits[..b * n_cand];
            matmul(
                &mut w.d_queries[..b * rank],
                Mat::new(g, b, n_cand),
                Mat::new(&w.keys, n_cand, rank),
                threads,
            );
            matmul(
                &mut w.d_keys,
                Mat::t(g, n_cand, b),
                Mat::new(&w.queries[..b * rank], b, rank),
                threads,
            );
            w.d_key_bias.fill(0.0);
            for row in g.chunks_exact(n_cand) {
                w.d_key_bias.iter_mut().zip(row).for_each(|(d, x)| *d += x);
            }
            items.project_back(
                chunk.iter().map(|p| p.0 as usize),
                &w.d_queries,
                rank,
                &mut query.grad,
            );
            cand.project_back(0..n_cand, &w.d_keys, rank, &mut key.grad);
            for (i, &d) in w.d_key_bias.iter().enumerate() {
                for &(j, v) in cand.row(i) {
                    bias.grad[j as usize] += v * d;
                }
            }
            t += 1;
            for p in [&mut query, &mut key, &mut bias] {
                p.step(opts.lr, t);
            }
            pb.inc(1);
        }
        pb.finish_and_clear();
        let nll = held
            .chunks(batch)
            .map(|c| forward(&mut w, &query, &key, &bias, c, true))
            .sum::<f64>()
            / held.len() as f64;
        eprintln!(
            "affinity epoch {epoch}: held-out NLL {nll:.3} (cosine alone {:.3}, uniform {:.3})",
            fit.cosine_nll, fit.uniform_nll
        );
        fit.nll.push(nll);
        if nll < best.0 {
            best = (
                nll,
                query.value.clone(),
                key.value.clone(),
                bias.value.clone(),
            );
            fit.best_epoch = epoch;
        }
    }
    let (_, q, k, b) = best;
    if fit.best_epoch == 0 {
        return Err("no epoch ran (--epochs 0)".into());
    }
    let affinity = Affinity::new(content_space, dim, q, k, b)?.with_temperature(temperature);
    Ok((affinity, fit))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::fresh::FreshItems;
    use crate::sid::Sid;
    use std::sync::Arc;

    /// Four attribute groups over 8 dims: items of group `g` have content
    /// on dims `2g` and `2g + 1`. In training, group 0 is always followed
    /// by group 1 and group 2 by group 3: the next item's content shares
    /// nothing with the previous one's, so cosine alone cannot find it.
    #[test]
    fn a_fitted_affinity_leads_from_content_to_the_content_that_follows() {
        let dim = 8;
        let per_group = 6;
        let mut rows = Vec::new();
        for g in 0..4 {
            for i in 0..per_group {
                let mut r = vec![0.0f32; dim];
                r[2 * g] = 1.0;
                r[2 * g + 1] = 0.2 + 0.1 * i as f32;
                rows.extend(r);
            }
        }
        let content = ContentTable::new(dim, rows);
        let item = |g: usize, i: usize| (g * per_group + i) as u32;
        let mut pairs = Vec::new();
        for round in 0..40 {
            for i in 0..per_group {
                let j = (i + round) % per_group;
                pairs.push((item(0, i), item(1, j)));
                pairs.push((item(2, i), item(3, j)));
            }
        }
        // The last item of groups 1 and 3 never occurs in training: fresh.
        let candidates: Vec<u32> = (0..(4 * per_group) as u32)
            .filter(|&o| o != item(1, 5) && o != item(3, 5))
            .collect();
        let opts = AffinityOptions {
            epochs: 30,
            batch: 64,
            rank: 4,
            lr: 0.05,
            ..AffinityOptions::default()
        };
        let (affinity, fit) = fit_affinity(
            &content,
            "tfidf",
            0.2,
            &pairs,
            &candidates,
            &opts,
            |_, _| ProgressBar::hidden(),
        )
        .unwrap();
        let last = *fit.nll.last().unwrap();
        assert!(
            last < fit.uniform_nll - 1.0,
            "held-out NLL {last} against uniform {}",
            fit.uniform_nll
        );
        let sid = |c: u16| Sid::new(&[c, 0]).unwrap();
        let fresh = vec![(sid(1), item(1, 5)), (sid(3), item(3, 5))];
        let score = |f: FreshItems, last: u32| {
            let (mut q, mut p, mut lp) = (Vec::new(), Vec::new(), Vec::new());
            assert!(f.score(&[(sid(0), last)], |_, _| false, &mut q, &mut p, &mut lp));
            lp
        };
        assert!(
            last < fit.cosine_nll - 1.0,
            "held-out NLL {last} against the cosine's {}",
            fit.cosine_nll
        );
        let plain = FreshItems::new(content.clone(), fresh.clone(), 0.2);
        let mut learnt = plain.clone();
        learnt.set_affinity(Arc::new(affinity)).unwrap();
        // By cosine the two fresh items are alike to a group-0 item (both
        // orthogonal to it); with the affinity group 1's comes first.
        let by_cosine = score(plain, item(0, 2));
        assert!((by_cosine[0] - by_cosine[1]).abs() < 1e-6);
        let p = score(learnt.clone(), item(0, 2));
        assert!(p[0] > p[1] + 1.0, "after group 0: {p:?}");
        let p = score(learnt, item(2, 2));
        assert!(p[1] > p[0] + 1.0, "after group 2: {p:?}");
    }
}
