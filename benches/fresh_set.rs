//! What publishing the fresh set costs the catalogue consumer: every index
//! publish hands the feed side a new set of the newest items the model never
//! learnt, with their content rows (and affinity keys), up to
//! `feed.fresh_max` = 10,000 of them. A catalogue flood publishes a few dozen
//! times a second.
//!
//! `cargo bench --bench fresh_set`. Two content sources, as the service
//! has them: the tokenizer's reconstruction of a SID (384-wide, dense) and
//! the catalogue's weighted words (30 of 1,024 buckets, with a rank-64
//! affinity). Each is measured twice: the first publish (every row built)
//! and a publish after 64 items arrived and 64 left (the set's steady
//! state during a flood).

mod common;

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use genfeed::embed::tfidf::TfIdf;
use genfeed::index::{Index, Snapshot};
use genfeed::model::Affinity;
use genfeed::service::view::{FreshContent, FreshRows, FreshSettings, ItemRef};
use genfeed::sid::Sid;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const TRAINING: usize = 20_000;
const FRESH: usize = 10_000;
const ARRIVING: usize = 64;
const SID_DIM: usize = 384;
const WORDS_DIM: usize = 1024;

type Content = imbl::HashMap<u32, Arc<[(u32, f32)]>>;

/// A catalogue of about `TRAINING` learnt items and `FRESH + ARRIVING`
/// since: the snapshot and item map before the last `ARRIVING` arrived,
/// and after.
struct Catalogue {
    before: (Arc<Snapshot>, imbl::OrdMap<u32, ItemRef>),
    after: (Arc<Snapshot>, imbl::OrdMap<u32, ItemRef>),
    _dir: tempfile::TempDir,
}

fn catalogue() -> Catalogue {
    // Ords in arrival order: the ones past `TRAINING` are fresh.
    let live = common::sids(TRAINING + FRESH, 7);
    let mut sids: Vec<Sid> = vec![live[0].0; live.len()];
    live.iter().for_each(|&(s, o)| sids[o as usize] = s);
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    sids.extend((0..ARRIVING).map(|_| common::fresh(&mut rng)));
    let dir = tempfile::tempdir().unwrap();
    let (mut index, _) = Index::open(dir.path(), &common::VOCAB, None, &live, usize::MAX).unwrap();
    let item = |o: usize| {
        let item = ItemRef {
            id: o.to_string().into(),
            sid: Some(sids[o]),
            live: true,
        };
        (o as u32, item)
    };
    let mut items: imbl::OrdMap<u32, ItemRef> = (0..live.len()).map(item).collect();
    let before = (index.publish(), items.clone());
    for (ord, i) in (live.len()..sids.len()).map(item) {
        index.insert(sids[ord as usize], ord);
        items.insert(ord, i);
    }
    Catalogue {
        before,
        after: (index.publish(), items),
        _dir: dir,
    }
}

fn settings(content: FreshContent, dim: usize) -> FreshSettings {
    FreshSettings {
        training_items: TRAINING as u32,
        content,
        dim,
        weight: 0.025,
        temperature: 0.2,
        slots: 1,
        after: 2,
        half_at: 20,
        query_items: 5,
        max: FRESH,
    }
}

/// A tokenizer's reconstruction: the sum of the SID's three content codes'
/// codewords.
fn by_sid(rng: &mut ChaCha8Rng) -> FreshSettings {
    let codebooks: Arc<Vec<f32>> = Arc::new(
        (0..3 * 256 * SID_DIM)
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect(),
    );
    let lookup = Arc::new(move |sid: Sid, _, out: &mut Vec<f32>| {
        out.clear();
        out.resize(SID_DIM, 0.0);
        for (level, &code) in sid.codes().iter().take(3).enumerate() {
            let at = (level * 256 + code as usize) * SID_DIM;
            let word = &codebooks[at..at + SID_DIM];
            out.iter_mut().zip(word).for_each(|(o, w)| *o += w);
        }
        true
    });
    settings(FreshContent::Sid(lookup), SID_DIM)
}

fn by_words(rng: &mut ChaCha8Rng, dir: &std::path::Path) -> (FreshSettings, Content) {
    let path = dir.join("x.item");
    std::fs::write(&path, "item_id:token\ttitle:token_seq\n0\tbrick\n").unwrap();
    let words = TfIdf::fit(&genfeed::dataset::read_items(&path).unwrap(), WORDS_DIM);
    let rank = 64;
    let mut random = |n: usize| (0..n).map(|_| rng.random_range(-0.1f32..0.1)).collect();
    let affinity = Affinity::new(
        "tfidf",
        WORDS_DIM,
        random(WORDS_DIM * rank),
        random(WORDS_DIM * rank),
        random(WORDS_DIM),
    )
    .unwrap();
    let content = (0..(TRAINING + FRESH + ARRIVING) as u32)
        .map(|o| {
            let row: Vec<(u32, f32)> = (0..30)
                .map(|_| (rng.random_range(0..WORDS_DIM as u32), rng.random()))
                .collect();
            (o, row.into())
        })
        .collect();
    let content_settings = FreshContent::Catalogue {
        words: Arc::new(words),
        affinity: Some(Arc::new(affinity)),
    };
    (settings(content_settings, WORDS_DIM), content)
}

fn publish(c: &mut Criterion) {
    let catalogue = catalogue();
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let dir = tempfile::tempdir().unwrap();
    let (words, content) = by_words(&mut rng, dir.path());
    let sources = [
        ("sid", by_sid(&mut rng), Content::new()),
        ("words", words, content),
    ];
    let mut group = c.benchmark_group("fresh_set");
    group.sample_size(20);
    for (name, settings, content) in &sources {
        group.bench_function(BenchmarkId::new("first", name), |b| {
            let (snapshot, items) = &catalogue.after;
            b.iter(|| settings.items(&mut FreshRows::default(), snapshot, items, content))
        });
        // Alternating between the two catalogues, every publish finds 64
        // items that it has no row for and 64 that left.
        group.bench_function(BenchmarkId::new("after_64_more", name), |b| {
            let mut built = FreshRows::default();
            let mut at = [&catalogue.before, &catalogue.after].into_iter().cycle();
            b.iter(|| {
                let (snapshot, items) = at.next().expect("cycles");
                settings.items(&mut built, snapshot, items, content)
            })
        });
    }
    group.finish();
}

criterion_group!(benches, publish);
criterion_main!(benches);
