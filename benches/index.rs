//! SID index benchmarks: merge throughput, and the cost of one decoding step's
//! allowed-token lookup per beam.
//!
//! `cargo bench --bench index`. Bytes per live item are printed once.

mod common;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use genfeed::index::segment::Segment;
use genfeed::index::{Cursor, Index};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn merge(c: &mut Criterion) {
    let mut group = c.benchmark_group("merge");
    group.sample_size(10);
    for n in [1_000_000usize, 10_000_000] {
        let sids = common::sids(n, 1);
        let dir = tempfile::tempdir().unwrap();
        group.throughput(Throughput::Elements(sids.len() as u64));
        let mut generation = 0;
        group.bench_with_input(BenchmarkId::from_parameter(n), &sids, |b, sids| {
            b.iter(|| {
                generation += 1;
                Segment::write(dir.path(), generation, &common::VOCAB, sids.iter().copied())
                    .unwrap()
            })
        });
        genfeed::index::segment::remove_others(dir.path(), u64::MAX).unwrap();
    }
    group.finish();
}

fn decode_step(c: &mut Criterion) {
    let n = 1_000_000;
    let sids = common::sids(n, 2);
    let dir = tempfile::tempdir().unwrap();
    let (mut index, _) = Index::open(dir.path(), &common::VOCAB, None, &sids, usize::MAX).unwrap();
    // A realistic overlay: fresh items and retirements since the last merge.
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    for i in 0..10_000 {
        index.insert(common::fresh(&mut rng), (n + i) as u32);
        index.remove(sids[rng.random_range(0..sids.len())].0);
    }
    let snapshot = index.publish();
    let (fst, tables, counters) = snapshot.bytes();
    let live = snapshot.len() as f64;
    eprintln!(
        "bytes per live item at {} items: FST {:.1}, tables {:.1}, live counters {:.1}, total {:.1}",
        snapshot.len(),
        fst as f64 / live,
        tables as f64 / live,
        counters as f64 / live,
        (fst + tables + counters) as f64 / live
    );

    let mut group = c.benchmark_group("allowed_per_step_1k_beams_1M_items");
    let beams = 1000;
    for depth in 0..4usize {
        let cursors: Vec<Cursor> = (0..beams)
            .map(|_| loop {
                let (sid, _) = sids[rng.random_range(0..sids.len())];
                if let Some(c) = snapshot.seek(&sid.codes()[..depth]) {
                    break c;
                }
            })
            .collect();
        group.throughput(Throughput::Elements(beams as u64));
        group.bench_with_input(
            BenchmarkId::new("enumerate", depth),
            &cursors,
            |b, cursors| {
                b.iter(|| {
                    let mut n = 0usize;
                    for &cursor in cursors {
                        snapshot.allowed(cursor, |_| n += 1);
                    }
                    n
                })
            },
        );
        let mut mask = vec![0f32; beams * 256];
        group.bench_with_input(BenchmarkId::new("mask", depth), &cursors, |b, cursors| {
            b.iter(|| snapshot.fill_mask(cursors, 256, &mut mask))
        });
    }
    group.finish();
}

criterion_group!(benches, merge, decode_step);
criterion_main!(benches);
