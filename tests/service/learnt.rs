//! Learning from the stream: steps users take after training reach the
//! feeds, survive crashes counted once, and are the same on every instance.

use std::collections::HashMap;

use crate::harness::{feeds_answering, At, Bed, Framing, Output, Service};
use genfeed::contract::Recommendation;

/// `[feed]` for these tests: a short feed, and no content scores, so that
/// an item the model never learnt can come only from what is learnt.
const FEED: &str = "beams = 20\ntop_k = 3\ncoalesce_ms = 5\nbatch_wait_ms = 5\nfresh_weight = 0";

/// The item the steps start from, and the newcomer they lead to.
const FROM: usize = 4;
const NEW: &str = "newcomer";

/// The content of the newcomer: that of the item least like `FROM` (of
/// another topic), so that the model, which reads SIDs made from content,
/// has no reason to rank it after `FROM`.
fn newcomer(bed: &Bed) -> Vec<f32> {
    let items = &bed.fixture.items;
    let cos = |a: &[f32], b: &[f32]| {
        let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
        let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
        dot / (norm(a) * norm(b))
    };
    let from = &items[FROM].1;
    items[15..]
        .iter()
        .min_by(|a, b| cos(&a.1, from).total_cmp(&cos(&b.1, from)))
        .unwrap()
        .1
        .clone()
}

/// Users `from..to` each take the step `FROM → newcomer`; their last
/// interactions.
fn steps(bed: &Bed, from: usize, to: usize) -> HashMap<String, At> {
    let a = &bed.fixture.items[FROM].0;
    (from..to)
        .map(|u| {
            let user = format!("stepper-{u}");
            bed.input.interaction(&user, a);
            (user.clone(), bed.input.interaction(&user, NEW))
        })
        .collect()
}

/// The feeds of new users whose one interaction is `FROM`.
fn probe(
    bed: &Bed,
    out: &Output,
    feeds: &mut Vec<Recommendation>,
    users: &[&str],
) -> HashMap<String, Recommendation> {
    let a = &bed.fixture.items[FROM].0;
    let last = users
        .iter()
        .map(|u| (u.to_string(), bed.input.interaction(u, a)))
        .collect();
    feeds_answering(out, Framing::Plain, feeds, &last)
}

fn ids(r: &Recommendation) -> Vec<&str> {
    r.items.iter().map(|i| i.item_id.as_str()).collect()
}

#[test]
fn steps_learnt_from_the_stream_bring_a_new_item_into_feeds_and_survive_kill_9() {
    use genfeed::catalogue::{Catalogue, CatalogueConfig};
    use genfeed::service::learnt::{Learner, LearntSettings};
    use genfeed::tokenizer::FrozenTokenizer;

    let bed = Bed::new("learnt", 2, Framing::Plain);
    let (f, t) = (bed.fixture, &bed.topics);
    bed.upsert_items(..15);
    bed.input.upsert(NEW, newcomer(&bed));
    let cfg = bed.config("a", FEED);
    let out = Output::new(&t.recommendations, 2);
    let mut feeds = Vec::new();
    let mut svc = Service::start(&cfg);
    // Before anyone took it, the model alone does not rank the newcomer.
    let got = probe(&bed, &out, &mut feeds, &["probe-0"]);
    assert!(
        !ids(&got["probe-0"]).contains(&NEW),
        "{:?}",
        ids(&got["probe-0"])
    );

    feeds_answering(&out, Framing::Plain, &mut feeds, &steps(&bed, 0, 40));
    // 80 appends and the probe's.
    svc.wait_metric("genfeed_learnt_steps_total", |v| v >= 81.0);
    let got = probe(&bed, &out, &mut feeds, &["probe-1"]);
    assert_eq!(ids(&got["probe-1"])[0], NEW, "{:?}", ids(&got["probe-1"]));

    svc.kill9();
    let more = steps(&bed, 40, 50);
    let mut svc = Service::start(&cfg);
    feeds_answering(&out, Framing::Plain, &mut feeds, &more);
    let got = probe(&bed, &out, &mut feeds, &["probe-2"]);
    assert_eq!(ids(&got["probe-2"])[0], NEW, "{:?}", ids(&got["probe-2"]));
    assert!(svc.stop().success(), "{}", svc.log_text());
    // A start is ready once the counts are read up to the changelog's end,
    // so after this one everything written is counted.
    let mut svc = Service::start(&cfg);
    assert!(svc.stop().success(), "{}", svc.log_text());

    // Each of the 50 steps is counted exactly once, whatever the kill
    // made the service read again.
    let state = bed.dir.path().join("a");
    let tokenizer = std::sync::Arc::new(FrozenTokenizer::load(&f.tokenizer).unwrap());
    let (catalogue, _) =
        Catalogue::open(tokenizer, &CatalogueConfig::new(state.join("catalogue"))).unwrap();
    let ord = |id: &str| catalogue.registry().get(id).unwrap().unwrap().ord;
    let settings = LearntSettings {
        successor_weight: 1.0,
        popularity_share: 0.1,
        successors_per_item: 64,
        popular_items: 100,
        fresh_popularity: 1.0,
    };
    let learner = Learner::open(&state.join("learnt"), settings).unwrap();
    let after: HashMap<u32, u32> = learner
        .counts()
        .successors(ord(&f.items[FROM].0))
        .iter()
        .copied()
        .collect();
    assert_eq!(after.get(&ord(NEW)), Some(&50), "{after:?}");
}

#[test]
fn learnt_counts_are_the_same_on_every_instance_across_a_rebalance() {
    let bed = Bed::new("learnt-group", 4, Framing::Plain);
    let t = &bed.topics;
    bed.upsert_items(..15);
    bed.input.upsert(NEW, newcomer(&bed));
    // Popularity off: the probes' own interactions then change nothing
    // learnt, and their feeds must agree exactly.
    let feed = format!("{FEED}\n\n[learning]\npopularity_share = 0");
    let out = Output::new(&t.recommendations, 2);
    let mut feeds = Vec::new();
    let mut a = Service::start(&bed.config("a", &feed));
    a.wait_metric("genfeed_assigned_partitions", |v| v == 4.0);
    feeds_answering(&out, Framing::Plain, &mut feeds, &steps(&bed, 0, 40));
    a.wait_metric("genfeed_learnt_steps_total", |v| v >= 80.0);

    // The second instance starts with no state of its own.
    let mut b = Service::start(&bed.config("b", &feed));
    b.wait_metric("genfeed_assigned_partitions", |v| v >= 1.0);
    a.wait_metric("genfeed_assigned_partitions", |v| (1.0..4.0).contains(&v));
    let feeds_of = |s: &Service| s.metric("genfeed_feeds_total").unwrap();
    let before = (feeds_of(&a), feeds_of(&b));
    let users: Vec<String> = (0..24).map(|i| format!("probe-{i}")).collect();
    let users: Vec<&str> = users.iter().map(String::as_str).collect();
    let got = probe(&bed, &out, &mut feeds, &users);
    let after = (feeds_of(&a), feeds_of(&b));
    assert!(
        after.0 > before.0 && after.1 > before.1,
        "both serve: {before:?} → {after:?}"
    );
    let first = &got[users[0]];
    assert_eq!(ids(first)[0], NEW, "{:?}", ids(first));
    for u in &users {
        assert_eq!(ids(&got[*u]), ids(first), "{u}");
        for (x, y) in got[*u].items.iter().zip(&first.items) {
            assert!(
                (x.score - y.score).abs() < 1e-4,
                "{u}: {} vs {}",
                x.score,
                y.score
            );
        }
    }
    assert!(a.stop().success(), "{}", a.log_text());
    assert!(b.stop().success(), "{}", b.log_text());
}
