//! Freshness of the SID index under a steady upsert stream: how long from an
//! upsert's arrival until a published snapshot can decode it, and how many
//! upserts per second the writer sustains.
//!
//! `cargo bench --bench index_freshness` (a plain harness: this measures a
//! paced stream, which criterion's repeat-a-closure model does not fit).
//! Two runs: the index alone over a 1M-item base, and the whole catalogue
//! path (tokenizer, registry, index) over a 100k-item
//! catalogue. Both exclude the registry's disk flush (an fsync at most every
//! 500 ms still runs). Background merges run as they would in the service
//! (threshold 20,000 changes).

mod common;

use std::time::{Duration, Instant};

use std::sync::Arc;

use genfeed::catalogue::{vector_hash, Catalogue, CatalogueConfig};
use genfeed::embed::{EncoderSpec, Vectors};
use genfeed::index::Index;
use genfeed::registry::Position;
use genfeed::tokenizer::train::{train, Provenance, TrainData, TrainOptions};
use genfeed::tokenizer::Method;
use indicatif::ProgressBar;
use rand::{Rng, SeedableRng};
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

    let latencies = steady(
        &mut index,
        10_000.0,
        100_000,
        |index| {
            index.insert(common::fresh(&mut rng), ord);
            ord += 1;
        },
        |index| {
            index.publish();
            index.maybe_merge();
            index.poll_merge().unwrap();
        },
    );
    report("index alone, 1M-item base", latencies);
    drop(index);

    let (mut catalogue, dim) = catalogue(dir.path());
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    let mut position = 0;
    let vector = |rng: &mut ChaCha8Rng| -> Vec<f32> {
        (0..dim).map(|_| rng.random_range(-1.0..1.0)).collect()
    };
    let start = Instant::now();
    for i in 0..100_000 {
        let v = vector(&mut rng);
        position += 1;
        catalogue
            .upsert(
                &format!("item-{i}"),
                vector_hash(&v),
                &v,
                Position::new(0, position),
            )
            .unwrap();
        if i % 64 == 63 {
            catalogue.publish().unwrap();
        }
    }
    catalogue.publish().unwrap();
    let secs = start.elapsed().as_secs_f64();
    println!(
        "catalogue path saturated: 100000 new items in {secs:.2} s = {:.0} upserts/s",
        1e5 / secs
    );
    let mut next_item = 100_000;
    let latencies = steady(
        &mut catalogue,
        10_000.0,
        50_000,
        |catalogue| {
            let v = vector(&mut rng);
            position += 1;
            // Half new items, half content changes of existing ones.
            let id = if position % 2 == 0 {
                next_item += 1;
                next_item
            } else {
                rng.random_range(0..100_000)
            };
            catalogue
                .upsert(
                    &format!("item-{id}"),
                    vector_hash(&v),
                    &v,
                    Position::new(0, position),
                )
                .unwrap();
        },
        |catalogue| {
            catalogue.publish().unwrap();
        },
    );
    report(
        "catalogue path (tokenizer + registry + index), 100k items",
        latencies,
    );
    catalogue.flush().unwrap();
    let live = catalogue.registry().live_count();
    let registry = dir_bytes(&dir.path().join("catalogue/registry"));
    println!(
        "registry on disk: {registry} bytes for {live} live items = {:.0} bytes per live item (redb)",
        registry as f64 / live as f64
    );
}

/// Runs `count` events at `rate` per second: each is due at its scheduled
/// time; everything due is applied, then published, and an event's latency is
/// its publish time minus its due time.
fn steady<S>(
    state: &mut S,
    rate: f64,
    count: usize,
    mut apply: impl FnMut(&mut S),
    mut publish: impl FnMut(&mut S),
) -> Vec<Duration> {
    let mut latencies = Vec::with_capacity(count);
    let start = Instant::now();
    let mut next = 0usize;
    while next < count {
        let due = ((start.elapsed().as_secs_f64() * rate) as usize + 1).min(count);
        if due <= next {
            std::hint::spin_loop();
            continue;
        }
        for _ in next..due {
            apply(state);
        }
        publish(state);
        let published = start.elapsed();
        for i in next..due {
            latencies.push(published.saturating_sub(Duration::from_secs_f64(i as f64 / rate)));
        }
        next = due;
    }
    latencies.sort();
    latencies
}

fn report(what: &str, latencies: Vec<Duration>) {
    println!(
        "steady 10k upserts/s, {what}: event->decodable p50 {:?} p99 {:?} max {:?}",
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.99),
        latencies[latencies.len() - 1]
    );
}

/// A catalogue over a small RQ-KMeans tokenizer of random 16-dimensional
/// vectors (the tokenizer's cost per item is what matters here, not its
/// quality).
fn catalogue(dir: &std::path::Path) -> (Catalogue, usize) {
    let dim = 16;
    let n = 4000;
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let ids: Vec<String> = (0..n).map(|i| format!("train-{i}")).collect();
    let vectors = Vectors::new(
        dim,
        (0..n * dim).map(|_| rng.random_range(-1.0..1.0)).collect(),
    );
    let items_file = dir.join("train.item");
    std::fs::write(&items_file, "item_id:token\n").unwrap();
    let mut opts = TrainOptions::new(Method::RqKmeans);
    opts.codebook_size = 64;
    opts.last_level_capacity = Some(1024);
    let tokenizer = train(
        &ids,
        TrainData::Content {
            vectors: &vectors,
            encoder: EncoderSpec::Precomputed {
                field: "embedding".into(),
                dim,
            },
            content_map: None,
        },
        &opts,
        Provenance {
            items_file: &items_file,
            interactions_file: None,
        },
        &dir.join("tokenizer"),
        &ProgressBar::hidden(),
    )
    .unwrap();
    let mut cfg = CatalogueConfig::new(dir.join("catalogue"));
    cfg.merge_threshold = 20_000;
    let (catalogue, _) = Catalogue::open(Arc::new(tokenizer), &cfg).unwrap();
    (catalogue, dim)
}

fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let meta = e.metadata().unwrap();
            if meta.is_dir() {
                dir_bytes(&e.path())
            } else {
                meta.len()
            }
        })
        .sum()
}
