//! Freshness of the SID index under a steady upsert stream: how long from an
//! upsert's arrival until a published snapshot can decode it, and how many
//! upserts per second the writer sustains.
//!
//! `cargo bench --bench index_freshness` (a plain harness: this measures a
//! paced stream, which criterion's repeat-a-closure model does not fit).
//! Excludes the registry's disk flush. Background merges run as they would in
//! the service (threshold 20,000 changes).

mod common;

use std::time::{Duration, Instant};

use genfeed::index::Index;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

fn main() {
    let n = 1_000_000;
    let sids = common::sids(n, 4);
    let dir = tempfile::tempdir().unwrap();
    let (mut index, _) = Index::open(dir.path(), &common::VOCAB, None, &sids, 20_000).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let mut ord = n as u32;

    // Saturation: apply and publish in batches of 64 as fast as possible.
    let total = 500_000;
    let start = Instant::now();
    for i in 0..total {
        index.insert(common::fresh(&mut rng), ord);
        ord += 1;
        if i % 64 == 63 {
            index.publish();
            index.maybe_merge();
            index.poll_merge().unwrap();
        }
    }
    index.publish();
    let secs = start.elapsed().as_secs_f64();
    println!(
        "saturated: {total} upserts in {secs:.2} s = {:.0} upserts/s (publish every 64)",
        total as f64 / secs
    );
    index.merge_now().unwrap();

    // Steady 10k upserts/s for 10 s: each upsert is due at its scheduled time;
    // the writer applies everything due, publishes, and the latency of each
    // upsert is publish time minus due time.
    let rate = 10_000.0;
    let count = 100_000;
    let mut latencies = Vec::with_capacity(count);
    let mut merges = 0;
    let start = Instant::now();
    let mut next = 0usize;
    while next < count {
        let now = start.elapsed();
        let due = ((now.as_secs_f64() * rate) as usize + 1).min(count);
        if due <= next {
            std::hint::spin_loop();
            continue;
        }
        for _ in next..due {
            index.insert(common::fresh(&mut rng), ord);
            ord += 1;
        }
        index.publish();
        let published = start.elapsed();
        for i in next..due {
            latencies.push(published.saturating_sub(Duration::from_secs_f64(i as f64 / rate)));
        }
        next = due;
        if index.maybe_merge() {
            merges += 1;
        }
        index.poll_merge().unwrap();
    }
    latencies.sort();
    println!(
        "steady 10k upserts/s, 1M-item base, {merges} background merges: event->decodable p50 {:?} p99 {:?} max {:?}",
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.99),
        latencies[latencies.len() - 1]
    );
}
