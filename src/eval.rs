//! The field's offline protocol: leave-one-out targets, the last 20 items of
//! history, the whole catalogue ranked through constrained beam search, and
//! Recall@K and NDCG@K with a single relevant item.
//!
//! NDCG with one relevant item is `1 / log2(rank + 2)` for a hit at 0-based
//! `rank`, else 0. Alongside quality the report gives what a serving team
//! asks next: how many generated SIDs were not items (the invalid-ID rate),
//! how much of the catalogue the top 10 lists reach, and the latency.

use std::sync::Arc;
use std::time::Instant;

use indicatif::ProgressBar;
use serde::Serialize;

use crate::dataset::Example;
use crate::index::{Index, IndexError, Snapshot};
use crate::model::{ContentTable, Generator, ModelError, Request, SearchOptions};
use crate::sid::Sid;

/// An index over a fixed catalogue, for offline evaluation. The directory is
/// deleted on drop.
pub struct OfflineIndex {
    _dir: tempfile::TempDir,
    _index: Index,
    snapshot: Arc<Snapshot>,
}

impl OfflineIndex {
    /// `sids[i]` is item `i`'s SID; item numbers in the index are the same `i`.
    pub fn build(sids: &[Sid], vocab: &[usize]) -> Result<OfflineIndex, IndexError> {
        let dir = tempfile::tempdir().map_err(|source| IndexError::Io {
            path: std::env::temp_dir(),
            source,
        })?;
        let mut live: Vec<(Sid, u32)> = sids.iter().copied().zip(0..).collect();
        live.sort_unstable_by(|a, b| a.0.codes().cmp(b.0.codes()));
        let (index, _) = Index::open(dir.path(), vocab, None, &live, usize::MAX)?;
        let snapshot = index.reader().snapshot();
        Ok(OfflineIndex {
            _dir: dir,
            _index: index,
            snapshot,
        })
    }

    pub fn snapshot(&self) -> &Snapshot {
        &self.snapshot
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub users: usize,
    pub beams: usize,
    pub batch: usize,
    pub recall5: f64,
    pub recall10: f64,
    pub ndcg5: f64,
    pub ndcg10: f64,
    /// Share of generated SIDs that are not a catalogue item.
    pub invalid_rate: f64,
    /// Distinct items in all top-10 lists over catalogue size.
    pub coverage10: f64,
    pub recs_per_sec: f64,
    pub ms_per_request: f64,
    /// Per-batch wall time, 50th and 99th percentile.
    pub batch_ms_p50: f64,
    pub batch_ms_p99: f64,
    /// Per example, in input order, the target's 0-based rank in the top 10,
    /// or `None` for a miss: what per-user analysis joins against.
    #[serde(skip)]
    pub ranks: Vec<Option<u8>>,
    /// Per example, its top 10: item numbers and log-probabilities, for
    /// comparing two runs list by list (a CPU's and a GPU's).
    #[serde(skip)]
    pub lists: Vec<Vec<(u32, f32)>>,
    /// Per catalogue item, how many top-10 lists it is in.
    #[serde(skip)]
    pub appearances: Vec<u32>,
}

/// Recall and NDCG at 5 and 10 over a set of users.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Quality {
    pub users: usize,
    pub recall5: f64,
    pub recall10: f64,
    pub ndcg5: f64,
    pub ndcg10: f64,
}

impl Quality {
    /// From each user's 0-based rank of the target in the top 10.
    pub fn of(ranks: impl IntoIterator<Item = Option<u8>>) -> Quality {
        let mut q = Quality::default();
        for rank in ranks {
            q.users += 1;
            if let Some(r) = rank {
                let gain = 1.0 / ((r as usize + 2) as f64).log2();
                q.recall10 += 1.0;
                q.ndcg10 += gain;
                if r < 5 {
                    q.recall5 += 1.0;
                    q.ndcg5 += gain;
                }
            }
        }
        let n = q.users.max(1) as f64;
        q.recall5 /= n;
        q.recall10 /= n;
        q.ndcg5 /= n;
        q.ndcg10 /= n;
        q
    }
}

/// Quality split by whether the target ever occurs in training: `cold`
/// targets are LIGER's protocol (items never seen in training), and on a
/// cold split they are its cold items.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Breakdown {
    pub all: Quality,
    pub cold: Quality,
    pub warm: Quality,
    /// Share of all top-10 slots held by items that never occur in training.
    pub fresh_share10: f64,
}

impl Breakdown {
    /// `trained[i]`: item `i` occurs in training ([`crate::dataset::Split::trained_items`]).
    pub fn new(
        examples: &[Example<'_>],
        ranks: &[Option<u8>],
        appearances: &[u32],
        trained: &[bool],
    ) -> Breakdown {
        let cold = |e: &Example<'_>| !trained.get(e.target as usize).copied().unwrap_or(false);
        let pick = |want: bool| {
            Quality::of(
                examples
                    .iter()
                    .zip(ranks)
                    .filter(|(e, _)| cold(e) == want)
                    .map(|(_, &r)| r),
            )
        };
        let slots: u64 = appearances.iter().map(|&a| a as u64).sum();
        let fresh: u64 = appearances
            .iter()
            .zip(trained)
            .filter(|(_, &t)| !t)
            .map(|(&a, _)| a as u64)
            .sum();
        Breakdown {
            all: Quality::of(ranks.iter().copied()),
            cold: pick(true),
            warm: pick(false),
            fresh_share10: fresh as f64 / slots.max(1) as f64,
        }
    }
}

/// The content nearest-neighbour baseline: every item ranked by the cosine
/// of its content to the history's last item's (history excluded when
/// asked), the way a TF-IDF neighbour is scored on Amazon sets. Returns the
/// target's rank per example and the top-10 appearances per item.
pub fn content_neighbours(
    content: &ContentTable,
    examples: &[Example<'_>],
    exclude_history: bool,
    progress: &ProgressBar,
) -> Result<(Vec<Option<u8>>, Vec<u32>), candle_core::Error> {
    use candle_core::{Device, Tensor};
    let (n, dim) = (content.len(), content.dim());
    let table = Tensor::from_slice(content.as_slice(), (n, dim), &Device::Cpu)?;
    let mut ranks = Vec::with_capacity(examples.len());
    let mut appearances = vec![0u32; n];
    let zero = vec![0.0f32; dim];
    let mut queries = Vec::new();
    let mut order: Vec<u32> = Vec::with_capacity(n);
    progress.set_length(examples.len() as u64);
    for chunk in examples.chunks(256) {
        queries.clear();
        for e in chunk {
            let last = e.history.last().and_then(|&i| content.row(i));
            queries.extend_from_slice(last.unwrap_or(&zero));
        }
        let q = Tensor::from_slice(&queries, (chunk.len(), dim), &Device::Cpu)?;
        let scores = q.matmul(&table.t()?)?.to_vec2::<f32>()?;
        for (e, mut row) in chunk.iter().zip(scores) {
            if exclude_history {
                for &h in e.history {
                    if let Some(s) = row.get_mut(h as usize) {
                        *s = f32::NEG_INFINITY;
                    }
                }
            }
            order.clear();
            order.extend(0..n as u32);
            let k = 10.min(n);
            if k == 0 {
                ranks.push(None);
                continue;
            }
            let by =
                |a: &u32, b: &u32| row[*b as usize].total_cmp(&row[*a as usize]).then(a.cmp(b));
            order.select_nth_unstable_by(k - 1, by);
            order[..k].sort_unstable_by(by);
            let top = &order[..k];
            top.iter().for_each(|&i| appearances[i as usize] += 1);
            ranks.push(top.iter().position(|&i| i == e.target).map(|r| r as u8));
        }
        progress.inc(chunk.len() as u64);
    }
    Ok((ranks, appearances))
}

/// Ranks the catalogue for every example with `generator` (the model,
/// perhaps mixed with successor counts) and scores the target's rank.
pub fn evaluate(
    generator: &mut Generator<'_>,
    index: &OfflineIndex,
    sids: &[Sid],
    examples: &[Example<'_>],
    opts: &SearchOptions,
    batch: usize,
    progress: &ProgressBar,
) -> Result<Report, ModelError> {
    let opts = SearchOptions {
        top_k: opts.top_k.max(10),
        beams: opts.beams.max(10),
        ..opts.clone()
    };
    let batch = batch.max(1);
    let (mut r5, mut r10, mut n5, mut n10) = (0.0, 0.0, 0.0, 0.0);
    let (mut generated, mut invalid) = (0usize, 0usize);
    let mut appearances = vec![0u32; sids.len()];
    let mut batch_ms = Vec::new();
    let mut ranks = Vec::with_capacity(examples.len());
    let mut tops = Vec::with_capacity(examples.len());
    let mut histories: Vec<Vec<Sid>> = Vec::with_capacity(batch);
    let started = Instant::now();
    progress.set_length(examples.len() as u64);
    for chunk in examples.chunks(batch) {
        histories.clear();
        histories.extend(
            chunk
                .iter()
                .map(|e| e.history.iter().map(|&i| sids[i as usize]).collect()),
        );
        let requests: Vec<Request<'_>> = histories.iter().map(|h| Request::new(h)).collect();
        let t = Instant::now();
        let lists = generator.generate(index.snapshot(), &requests, &opts)?;
        batch_ms.push(t.elapsed().as_secs_f64() * 1e3);
        for (e, list) in chunk.iter().zip(&lists) {
            let target = sids[e.target as usize];
            let mut hit = None;
            for (rank, g) in list.iter().take(10).enumerate() {
                generated += 1;
                match sids.get(g.ord as usize) {
                    Some(&s) if s == g.sid => appearances[g.ord as usize] += 1,
                    _ => invalid += 1,
                }
                if g.sid == target {
                    hit = Some(rank as u8);
                    let gain = 1.0 / ((rank + 2) as f64).log2();
                    r10 += 1.0;
                    n10 += gain;
                    if rank < 5 {
                        r5 += 1.0;
                        n5 += gain;
                    }
                }
            }
            ranks.push(hit);
            tops.push(list.iter().take(10).map(|g| (g.ord, g.log_prob)).collect());
        }
        progress.inc(chunk.len() as u64);
    }
    let secs = started.elapsed().as_secs_f64();
    let users = examples.len().max(1) as f64;
    batch_ms.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        batch_ms
            .get(((batch_ms.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or(0.0)
    };
    Ok(Report {
        users: examples.len(),
        beams: opts.beams,
        batch,
        recall5: r5 / users,
        recall10: r10 / users,
        ndcg5: n5 / users,
        ndcg10: n10 / users,
        invalid_rate: invalid as f64 / generated.max(1) as f64,
        coverage10: appearances.iter().filter(|&&a| a > 0).count() as f64
            / sids.len().max(1) as f64,
        recs_per_sec: users / secs,
        ms_per_request: secs * 1e3 / users,
        batch_ms_p50: pct(0.5),
        batch_ms_p99: pct(0.99),
        ranks,
        lists: tops,
        appearances,
    })
}
