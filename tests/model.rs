//! The generative model: constrained beam search against brute force, the
//! index's live set as the only source of answers, filters, batching, and
//! training that learns, reproduces and resumes exactly.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use candle_core::Device;
use genfeed::dataset::{Example, Split};
use genfeed::eval::{evaluate, OfflineIndex};
use genfeed::index::Index;
use genfeed::model::{
    ContentTable, Filter, FreshItems, Generator, Learnt, Model, ModelConfig, Params, Request,
    SearchOptions, SiblingTable, Transitions,
};
use genfeed::sid::Sid;
use genfeed::synth::random_sids;
use genfeed::train::{train, Corpus, TrainOptions};
use indicatif::ProgressBar;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn tiny(vocab: Vec<usize>) -> ModelConfig {
    ModelConfig {
        d_model: 32,
        layers: 1,
        decoder_layers: 2,
        heads: 2,
        head_dim: 16,
        d_ff: 64,
        max_history: 8,
        dropout: 0.1,
        ..ModelConfig::new(vocab, "test")
    }
}

fn random_model(cfg: &ModelConfig, seed: u64) -> Model {
    // Larger weights than the training init, so that the distributions are
    // far from uniform and the search has real choices to get wrong.
    let params = Params::init(cfg, seed, &Device::Cpu).unwrap();
    for (_, v) in params.vars() {
        if v.rank() == 2 {
            v.set(&(v.as_tensor() * 40.0).unwrap()).unwrap();
        }
    }
    params.model(cfg).unwrap()
}

/// A random model over `vocab` and a catalogue of `items` random SIDs.
fn fixture(
    vocab: &[usize],
    items: usize,
    model_seed: u64,
    sid_seed: u64,
) -> (Model, Vec<Sid>, OfflineIndex) {
    let model = random_model(&tiny(vocab.to_vec()), model_seed);
    let sids = random_sids(items, vocab, sid_seed);
    let index = OfflineIndex::build(&sids, vocab).unwrap();
    (model, sids, index)
}

fn histories(sids: &[Sid], n: usize, seed: u64) -> Vec<Vec<Sid>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let len = rng.random_range(1..12);
            (0..len)
                .map(|_| sids[rng.random_range(0..sids.len())])
                .collect()
        })
        .collect()
}

fn requests<'a>(hs: &'a [Vec<Sid>], filter: Option<&'a Filter>) -> Vec<Request<'a>> {
    hs.iter().map(|h| Request { history: h, filter }).collect()
}

/// The model's log-probability of `sid` after `history`, found by forcing
/// the search onto that one SID with an allow filter.
fn forced_log_prob(g: &mut Generator<'_>, index: &OfflineIndex, history: &[Sid], sid: Sid) -> f32 {
    let f = Filter::default().allow([sid]);
    let request = Request {
        history,
        filter: Some(&f),
    };
    let opts = SearchOptions {
        beams: 1,
        top_k: 1,
        exclude_history: false,
    };
    let out = g.generate(index.snapshot(), &[request], &opts).unwrap();
    assert_eq!(out[0].len(), 1, "{sid} is live and allowed");
    assert_eq!(out[0][0].sid, sid);
    out[0][0].log_prob
}

/// The model's log-probability of each live SID, by forcing the search onto
/// that one SID with an allow filter.
fn brute_force(
    model: &Model,
    index: &OfflineIndex,
    history: &[Sid],
    sids: &[Sid],
) -> Vec<(Sid, f32)> {
    let mut g = Generator::new(model);
    let mut all: Vec<(Sid, f32)> = sids
        .iter()
        .map(|&sid| (sid, forced_log_prob(&mut g, index, history, sid)))
        .collect();
    all.sort_by(|a, b| b.1.total_cmp(&a.1));
    all
}

#[test]
fn a_beam_as_wide_as_the_catalogue_finds_the_exact_top_items() {
    let vocab = vec![6, 5, 4];
    let (model, sids, index) = fixture(&vocab, 60, 3, 11);
    exact_top_items(&model, &sids, &index);
}

#[test]
fn with_sibling_scored_outputs_the_search_still_finds_the_exact_top_items() {
    // Level 1 is exact, levels 2 and 3 are hashed and scored by siblings;
    // 60 items of 30 possible two-code prefixes: most prefixes are shared.
    let vocab = vec![6, 5, 4, 3];
    let cfg = ModelConfig {
        node_buckets: 30,
        prefix_output: true,
        sibling_output: true,
        ..tiny(vocab.clone())
    };
    assert!(cfg.prefix_scored(1) && cfg.sibling_scored(2) && cfg.sibling_scored(3));
    let model = random_model(&cfg, 5);
    let sids = random_sids(60, &vocab, 13);
    let index = OfflineIndex::build(&sids, &vocab).unwrap();
    exact_top_items(&model, &sids, &index);
    // Without the sibling rows the same weights score items differently.
    let plain = random_model(
        &ModelConfig {
            sibling_output: false,
            ..cfg.clone()
        },
        5,
    );
    let differ = scored_differently(&model, &plain, &index, &sids);
    assert!(differ > 30, "only {differ} of 60 items scored differently");
}

#[test]
fn with_prefix_scored_outputs_the_search_still_finds_the_exact_top_items() {
    let vocab = vec![6, 5, 4];
    let cfg = ModelConfig {
        prefix_output: true,
        ..tiny(vocab.clone())
    };
    assert!((0..3).all(|l| cfg.prefix_scored(l)));
    let model = random_model(&cfg, 3);
    let sids = random_sids(60, &vocab, 11);
    let index = OfflineIndex::build(&sids, &vocab).unwrap();
    exact_top_items(&model, &sids, &index);
    // The same weights without prefix scoring score items differently: the
    // prefix rows are really part of the output.
    let plain = random_model(&tiny(vocab.clone()), 3);
    let differ = scored_differently(&model, &plain, &index, &sids);
    assert!(differ > 50, "only {differ} of 60 items scored differently");
}

/// How many items two models give different log-probabilities for one
/// history.
fn scored_differently(a: &Model, b: &Model, index: &OfflineIndex, sids: &[Sid]) -> usize {
    let h = &histories(sids, 1, 2)[0];
    let with = brute_force(a, index, h, sids);
    let without = brute_force(b, index, h, sids);
    with.iter()
        .filter(|(sid, lp)| {
            let other = without.iter().find(|(s, _)| s == sid).unwrap().1;
            (lp - other).abs() > 1e-3
        })
        .count()
}

fn exact_top_items(model: &Model, sids: &[Sid], index: &OfflineIndex) {
    let hs = histories(sids, 5, 1);
    let opts = SearchOptions {
        beams: 60,
        top_k: 10,
        exclude_history: false,
    };
    let got = Generator::new(model)
        .generate(index.snapshot(), &requests(&hs, None), &opts)
        .unwrap();
    for (h, list) in hs.iter().zip(&got) {
        let exact = brute_force(model, index, h, sids);
        assert_eq!(list.len(), 10);
        for (g, (sid, lp)) in list.iter().zip(&exact) {
            assert_eq!(g.sid, *sid);
            assert!((g.log_prob - lp).abs() < 1e-4, "{} vs {lp}", g.log_prob);
        }
        // Log-probabilities of all live SIDs under the model sum to at most 1.
        let total: f32 = exact.iter().map(|(_, lp)| lp.exp()).sum();
        assert!(total <= 1.0 + 1e-4, "{total}");
    }
}

/// Successor counts for the last item of each history but the first (which
/// keeps the model alone), over `pool`, which may hold items not live.
fn random_transitions(hs: &[Vec<Sid>], pool: &[Sid], seed: u64) -> Transitions {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut pairs = Vec::new();
    for h in &hs[1..] {
        let last = *h.last().unwrap();
        for _ in 0..rng.random_range(1..12) {
            let to = pool[rng.random_range(0..pool.len())];
            for _ in 0..rng.random_range(1..4) {
                pairs.push((last, to));
            }
        }
    }
    Transitions::count(pairs)
}

/// A model over 70 items of which the first 60 are live, histories over
/// the live ones, and successor counts over all (some not live).
fn counts_fixture() -> (Model, Vec<Sid>, OfflineIndex, Vec<Vec<Sid>>, Transitions) {
    let vocab = vec![6, 5, 4];
    let (model, all, _) = fixture(&vocab, 70, 3, 11);
    let index = OfflineIndex::build(&all[..60], &vocab).unwrap();
    let hs = histories(&all[..60], 6, 1);
    let transitions = random_transitions(&hs, &all, 5);
    (model, all, index, hs, transitions)
}

/// `list` is the top of `exact` (a mixture's log-probabilities, best
/// first): each item at its own score, and the scores in order (items
/// with equal counts and a tiny model share tie up to rounding).
fn assert_exact_top(list: &[genfeed::model::Generated], exact: &[(Sid, f32)]) {
    assert_eq!(list.len(), 10);
    for (g, (_, lp)) in list.iter().zip(exact) {
        let own = exact
            .iter()
            .find(|(s, _)| *s == g.sid)
            .expect("only live items")
            .1;
        assert!(
            (g.log_prob - own).abs() < 1e-4,
            "{}: {} vs {own}",
            g.sid,
            g.log_prob
        );
        assert!((g.log_prob - lp).abs() < 1e-4, "{} vs {lp}", g.log_prob);
    }
}

#[test]
fn with_successor_counts_the_search_finds_the_exact_top_items_of_the_mixture() {
    let (model, all, index, hs, transitions) = counts_fixture();
    let sids = &all[..60];
    let w = 0.4f32;
    let opts = SearchOptions {
        beams: 60,
        top_k: 10,
        exclude_history: false,
    };
    let got = Generator::new(&model)
        .with_transitions(&transitions, w)
        .generate(index.snapshot(), &requests(&hs, None), &opts)
        .unwrap();
    let mut mixed_any = false;
    for (h, list) in hs.iter().zip(&got) {
        let (to, counts) = transitions.successors(*h.last().unwrap());
        let count = |sid: Sid| {
            to.iter()
                .zip(counts)
                .find(|(t, _)| **t == sid)
                .map_or(0, |(_, &c)| c)
        };
        let live_total: u32 = sids.iter().map(|&s| count(s)).sum();
        let model_alone = brute_force(&model, &index, h, sids);
        let mut exact: Vec<(Sid, f32)> = model_alone
            .iter()
            .map(|&(sid, lp)| {
                let p = if live_total == 0 {
                    lp.exp()
                } else {
                    (1.0 - w) * lp.exp() + w * count(sid) as f32 / live_total as f32
                };
                (sid, p.ln())
            })
            .collect();
        exact.sort_by(|a, b| b.1.total_cmp(&a.1));
        mixed_any |= live_total > 0 && exact[0].0 != model_alone[0].0;
        assert_exact_top(list, &exact);
        let total: f32 = exact.iter().map(|(_, lp)| lp.exp()).sum();
        assert!(
            total <= 1.0 + 1e-4,
            "the mixture is a distribution: {total}"
        );
    }
    assert!(mixed_any, "the counts changed some request's best item");
}

/// Counts learnt after training, as a test sets them.
struct TestLearnt {
    successors: HashMap<Sid, Vec<(Sid, f32)>>,
    popular: Vec<(Sid, f32)>,
    share: f32,
    boost: HashMap<Sid, f32>,
}

impl Learnt for TestLearnt {
    fn successors(&self, last: Sid, out: &mut Vec<(Sid, f32)>) {
        out.extend(self.successors.get(&last).into_iter().flatten());
    }
    fn popular(&self) -> &[(Sid, f32)] {
        &self.popular
    }
    fn popularity_share(&self) -> f32 {
        self.share
    }
    fn fresh_boost(&self, sid: Sid) -> f32 {
        self.boost.get(&sid).copied().unwrap_or(1.0)
    }
}

#[test]
fn with_learnt_counts_the_search_finds_the_exact_top_items_of_the_mixture() {
    let (model, all, index, hs, transitions) = counts_fixture();
    let sids = &all[..60];
    // Learnt successors for every history's last item, the first's too
    // (which has no trained ones), some of them not live; and popular
    // items (live, sorted by SID, as the trait asks).
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    let learnt = TestLearnt {
        successors: hs
            .iter()
            .map(|h| {
                let to = (0..rng.random_range(1..5))
                    .map(|_| {
                        (
                            all[rng.random_range(0..all.len())],
                            rng.random_range(1..6) as f32,
                        )
                    })
                    .collect();
                (*h.last().unwrap(), to)
            })
            .collect(),
        popular: {
            let mut p = vec![(sids[3], 5.0), (sids[40], 2.0)];
            p.sort_by(|a, b| a.0.codes().cmp(b.0.codes()));
            p
        },
        share: 0.2,
        boost: HashMap::new(),
    };
    let w = 0.4f32;
    let opts = SearchOptions {
        beams: 60,
        top_k: 10,
        exclude_history: false,
    };
    let learnt = Arc::new(learnt);
    let mut g = Generator::new(&model).with_transitions(&transitions, w);
    g.set_learnt(Some(learnt.clone()));
    let got = g
        .generate(index.snapshot(), &requests(&hs, None), &opts)
        .unwrap();
    let mut learnt_only_listed = false;
    for (h, list) in hs.iter().zip(&got) {
        let last = *h.last().unwrap();
        let mut weight: HashMap<Sid, f32> = HashMap::new();
        let (to, counts) = transitions.successors(last);
        for (&s, &n) in to.iter().zip(counts) {
            *weight.entry(s).or_default() += n as f32;
        }
        for &(s, n) in &learnt.successors[&last] {
            *weight.entry(s).or_default() += n;
        }
        weight.retain(|s, _| sids.contains(s));
        let known: f32 = weight.values().sum();
        let popular = [(sids[3], 5.0f32), (sids[40], 2.0)];
        for (s, n) in popular {
            let scale = if known > 0.0 {
                0.2 / 0.8 * known / 7.0
            } else {
                1.0 / 7.0
            };
            *weight.entry(s).or_default() += n * scale;
        }
        let total: f32 = weight.values().sum();
        let model_alone = brute_force(&model, &index, h, sids);
        let mut exact: Vec<(Sid, f32)> = model_alone
            .iter()
            .map(|&(sid, lp)| {
                let counted = weight.get(&sid).map_or(0.0, |n| n / total);
                (sid, ((1.0 - w) * lp.exp() + w * counted).ln())
            })
            .collect();
        exact.sort_by(|a, b| b.1.total_cmp(&a.1));
        assert_exact_top(list, &exact);
        let top_alone: Vec<Sid> = model_alone[..10].iter().map(|x| x.0).collect();
        learnt_only_listed |= list.iter().any(|g| {
            !to.contains(&g.sid) && !top_alone.contains(&g.sid) && weight.contains_key(&g.sid)
        });
    }
    assert!(
        learnt_only_listed,
        "some list holds an item only the learnt counts lead to"
    );
}

#[test]
fn successor_counts_never_bring_back_what_the_mask_removed() {
    let vocab = vec![8, 8, 16];
    let (model, sids, index) = fixture(&vocab, 400, 12, 6);
    let hs = histories(&sids, 10, 3);
    let transitions = random_transitions(&hs, &sids, 9);
    let mut g = Generator::new(&model).with_transitions(&transitions, 0.9);
    let opts = SearchOptions {
        beams: 12,
        top_k: 10,
        exclude_history: true,
    };
    let successors: Vec<Sid> = hs
        .iter()
        .flat_map(|h| transitions.successors(*h.last().unwrap()).0.iter().copied())
        .collect();
    let plain = g
        .generate(index.snapshot(), &requests(&hs, None), &opts)
        .unwrap();
    assert!(
        plain.iter().flatten().any(|x| successors.contains(&x.sid)),
        "at weight 0.9 successors make the lists"
    );
    let deny = Filter::default().deny(successors.iter().copied());
    let out = g
        .generate(index.snapshot(), &requests(&hs, Some(&deny)), &opts)
        .unwrap();
    for (h, list) in hs.iter().zip(&out) {
        assert_eq!(list.len(), 10);
        assert!(list.iter().all(|x| !successors.contains(&x.sid)));
        assert!(list.iter().all(|x| !h.contains(&x.sid)));
    }
}

#[test]
fn narrow_beams_return_only_live_distinct_items_in_score_order() {
    let vocab = vec![16, 16, 8, 32];
    let (model, sids, index) = fixture(&vocab, 500, 5, 2);
    let live: HashSet<Sid> = sids.iter().copied().collect();
    let hs = histories(&sids, 40, 9);
    let opts = SearchOptions {
        beams: 7,
        top_k: 7,
        exclude_history: false,
    };
    let out = Generator::new(&model)
        .generate(index.snapshot(), &requests(&hs, None), &opts)
        .unwrap();
    for list in &out {
        assert_eq!(list.len(), 7);
        let distinct: HashSet<Sid> = list.iter().map(|g| g.sid).collect();
        assert_eq!(distinct.len(), 7);
        for w in list.windows(2) {
            assert!(w[0].log_prob >= w[1].log_prob);
        }
        for g in list {
            assert!(live.contains(&g.sid), "{} is not live", g.sid);
            assert_eq!(sids[g.ord as usize], g.sid);
        }
    }
}

#[test]
fn a_request_gets_the_same_answer_alone_or_in_a_batch() {
    let vocab = vec![8, 8, 16];
    let (model, sids, index) = fixture(&vocab, 300, 8, 4);
    // Different lengths, so the batch pads some histories on the left.
    let hs = histories(&sids, 12, 77);
    let opts = SearchOptions::default();
    let mut g = Generator::new(&model);
    let batched = g
        .generate(index.snapshot(), &requests(&hs, None), &opts)
        .unwrap();
    for (h, b) in hs.iter().zip(&batched) {
        let alone = g
            .generate(
                index.snapshot(),
                &requests(std::slice::from_ref(h), None),
                &opts,
            )
            .unwrap();
        let a: Vec<Sid> = alone[0].iter().map(|x| x.sid).collect();
        let bb: Vec<Sid> = b.iter().map(|x| x.sid).collect();
        assert_eq!(a, bb);
        for (x, y) in alone[0].iter().zip(b) {
            assert!((x.log_prob - y.log_prob).abs() < 1e-4);
        }
    }
}

#[test]
fn filters_and_history_exclusion_act_through_the_mask() {
    let vocab = vec![8, 8, 16];
    let (model, sids, index) = fixture(&vocab, 400, 12, 6);
    let hs = histories(&sids, 10, 3);
    let mut g = Generator::new(&model);
    let opts = SearchOptions {
        beams: 12,
        top_k: 10,
        exclude_history: false,
    };
    let plain = g
        .generate(index.snapshot(), &requests(&hs, None), &opts)
        .unwrap();

    // Denying every item of the unfiltered answers yields ten other items.
    let denied: Vec<Sid> = plain.iter().flatten().map(|x| x.sid).collect();
    let deny = Filter::default().deny(denied.iter().copied());
    let out = g
        .generate(index.snapshot(), &requests(&hs, Some(&deny)), &opts)
        .unwrap();
    for list in &out {
        assert_eq!(list.len(), 10, "the mask steers beams to other items");
        assert!(list.iter().all(|x| !denied.contains(&x.sid)));
    }

    // An allow set of 15 items: answers come from it alone, and all 10 are found.
    let allowed: Vec<Sid> = sids.iter().step_by(27).copied().take(15).collect();
    let allow = Filter::default().allow(allowed.iter().copied());
    let out = g
        .generate(index.snapshot(), &requests(&hs, Some(&allow)), &opts)
        .unwrap();
    for list in &out {
        assert_eq!(list.len(), 10);
        assert!(list.iter().all(|x| allowed.contains(&x.sid)));
    }

    // History exclusion: put each request's top answer into its history.
    let with_top: Vec<Vec<Sid>> = hs
        .iter()
        .zip(&plain)
        .map(|(h, p)| {
            let mut h = h.clone();
            h.insert(0, p[0].sid);
            h
        })
        .collect();
    let excl = SearchOptions {
        exclude_history: true,
        ..opts.clone()
    };
    let out = g
        .generate(index.snapshot(), &requests(&with_top, None), &excl)
        .unwrap();
    for (h, list) in with_top.iter().zip(&out) {
        assert_eq!(list.len(), 10);
        assert!(list.iter().all(|x| !h.contains(&x.sid)));
    }
}

#[test]
fn a_new_item_is_recommendable_at_the_next_snapshot_and_a_retired_one_never_again() {
    let vocab = vec![8, 8, 32];
    let cfg = tiny(vocab.clone());
    let model = random_model(&cfg, 21);
    let sids = random_sids(200, &vocab, 8);
    let dir = tempfile::tempdir().unwrap();
    let mut live: Vec<(Sid, u32)> = sids.iter().copied().zip(0..).collect();
    live.sort_unstable_by(|a, b| a.0.codes().cmp(b.0.codes()));
    let (mut index, _) = Index::open(dir.path(), &vocab, None, &live, usize::MAX).unwrap();
    let hs = histories(&sids, 6, 5);
    let mut g = Generator::new(&model);
    let opts = SearchOptions::default();
    let before = g
        .generate(&index.publish(), &requests(&hs, None), &opts)
        .unwrap();

    // Retire every item the model ranked first; add an item it has never seen.
    let retired: Vec<Sid> = before.iter().map(|l| l[0].sid).collect();
    for s in &retired {
        index.remove(*s);
    }
    let fresh = (0..8u16)
        .flat_map(|a| (0..8u16).map(move |b| Sid::new(&[a, b, 31]).unwrap()))
        .find(|s| !sids.contains(s))
        .unwrap();
    index.insert(fresh, 999);
    let snap = index.publish();
    let after = g.generate(&snap, &requests(&hs, None), &opts).unwrap();
    for list in &after {
        assert!(list.iter().all(|x| !retired.contains(&x.sid)));
    }
    let only_fresh = Filter::default().allow([fresh]);
    let out = g
        .generate(&snap, &requests(&hs, Some(&only_fresh)), &opts)
        .unwrap();
    for list in &out {
        assert_eq!(list.len(), 1);
        assert_eq!((list[0].sid, list[0].ord), (fresh, 999));
    }
}

/// Users whose items follow topics: mostly a favourite topic and its
/// successor. SIDs name the topic first, so the pattern is learnable.
fn topical(users: usize, items: usize, topics: usize, seed: u64) -> (Vec<Vec<u32>>, Vec<Sid>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let per = items / topics;
    let sids = (0..items)
        .map(|i| {
            Sid::new(&[
                (i % topics) as u16,
                ((i / topics) % 4) as u16,
                (i / topics / 4) as u16,
            ])
            .unwrap()
        })
        .collect();
    let seqs = (0..users)
        .map(|_| {
            let fav = rng.random_range(0..topics);
            let len = rng.random_range(5..14);
            (0..len)
                .map(|p| {
                    let t = if p % 2 == 0 { fav } else { (fav + 1) % topics };
                    (t + topics * rng.random_range(0..per)) as u32
                })
                .collect()
        })
        .collect();
    (seqs, sids)
}

fn opts(epochs: usize) -> TrainOptions {
    TrainOptions {
        epochs,
        batch_size: 64,
        lr: 3e-3,
        warmup_steps: 10,
        patience: 100,
        seed: 5,
        valid_users: 0,
        beams: 10,
        ..TrainOptions::default()
    }
}

fn quiet(_: u64, _: &str) -> ProgressBar {
    ProgressBar::hidden()
}

fn recall(dir: &Path, seqs: &[Vec<u32>], sids: &[Sid], valid: bool) -> (f64, f64) {
    let (cfg, model) = Model::load(dir, &Device::Cpu).unwrap();
    let split = Split::leave_one_out(seqs, cfg.max_history);
    let examples: Vec<Example<'_>> = if valid {
        split.valid().iter().collect()
    } else {
        split.test().iter().collect()
    };
    let index = OfflineIndex::build(sids, &cfg.vocab).unwrap();
    let search = SearchOptions {
        beams: 10,
        ..SearchOptions::default()
    };
    let report = evaluate(
        &mut Generator::new(&model),
        &index,
        sids,
        &examples,
        &search,
        32,
        &ProgressBar::hidden(),
    )
    .unwrap();
    assert_eq!(report.invalid_rate, 0.0);
    (report.recall10, report.ndcg10)
}

fn test_recall(dir: &Path, seqs: &[Vec<u32>], sids: &[Sid]) -> f64 {
    recall(dir, seqs, sids, false).0
}

#[test]
fn training_learns_a_sequential_pattern() {
    let (seqs, sids) = topical(600, 240, 12, 1);
    let cfg = tiny(vec![12, 4, 5]);
    let dir = tempfile::tempdir().unwrap();
    let corpus = Corpus {
        seqs: &seqs,
        sids: &sids,
    };
    let summary = train(
        &corpus,
        &cfg,
        &opts(12),
        dir.path(),
        false,
        &Device::Cpu,
        quiet,
    )
    .unwrap();
    assert_eq!(summary.epochs, 12);
    // Validation during training scored the weights that were saved.
    let best = summary.best_valid.unwrap();
    let (r, n) = recall(dir.path(), &seqs, &sids, true);
    assert!(
        (best.recall10 - r).abs() < 1e-9 && (best.ndcg10 - n).abs() < 1e-9,
        "{best:?} vs {r} {n}"
    );
    // Knowing the next topic and nothing more gives 10 / 20 = 0.5; chance is
    // 10 / 240.
    let recall = test_recall(dir.path(), &seqs, &sids);
    assert!(recall > 0.3, "Recall@10 {recall}");
    let log = std::fs::read_to_string(dir.path().join("train_log.csv")).unwrap();
    assert_eq!(log.lines().count(), 13);
    // The run's rate pools its epochs' targets and optimisation time, so it
    // lies within the range of the epochs' own rates.
    let column = log
        .lines()
        .next()
        .unwrap()
        .split(',')
        .position(|c| c == "examples_per_sec")
        .unwrap();
    let rates: Vec<f64> = log
        .lines()
        .skip(1)
        .map(|l| l.split(',').nth(column).unwrap().parse().unwrap())
        .collect();
    let (lo, hi) = rates
        .iter()
        .fold((f64::MAX, 0.0f64), |(lo, hi), &r| (lo.min(r), hi.max(r)));
    assert!(
        lo * 0.999 <= summary.examples_per_sec && summary.examples_per_sec <= hi * 1.001,
        "{} outside the epochs' {lo}..{hi}",
        summary.examples_per_sec
    );
    let png = std::fs::read(dir.path().join("train_curves.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
}

#[test]
fn a_run_is_reproducible_and_resumes_exactly() {
    let (seqs, sids) = topical(200, 120, 6, 2);
    let cfg = tiny(vec![6, 4, 5]);
    let corpus = Corpus {
        seqs: &seqs,
        sids: &sids,
    };
    let weights = |d: &Path| std::fs::read(d.join("checkpoint/model.safetensors")).unwrap();
    let straight = tempfile::tempdir().unwrap();
    train(
        &corpus,
        &cfg,
        &opts(3),
        straight.path(),
        false,
        &Device::Cpu,
        quiet,
    )
    .unwrap();
    let again = tempfile::tempdir().unwrap();
    train(
        &corpus,
        &cfg,
        &opts(3),
        again.path(),
        false,
        &Device::Cpu,
        quiet,
    )
    .unwrap();
    assert_eq!(weights(straight.path()), weights(again.path()));

    let resumed = tempfile::tempdir().unwrap();
    train(
        &corpus,
        &cfg,
        &opts(1),
        resumed.path(),
        false,
        &Device::Cpu,
        quiet,
    )
    .unwrap();
    assert_ne!(weights(straight.path()), weights(resumed.path()));
    let s = train(
        &corpus,
        &cfg,
        &opts(3),
        resumed.path(),
        true,
        &Device::Cpu,
        quiet,
    )
    .unwrap();
    assert_eq!(s.epochs, 3);
    assert_eq!(weights(straight.path()), weights(resumed.path()));
    let log = std::fs::read_to_string(resumed.path().join("train_log.csv")).unwrap();
    assert_eq!(log.lines().count(), 4);
}

#[test]
fn weights_that_do_not_match_the_config_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny(vec![8, 8]);
    cfg.save(dir.path()).unwrap();
    Params::init(&cfg, 1, &Device::Cpu)
        .unwrap()
        .save(&dir.path().join("model.safetensors"))
        .unwrap();
    assert!(Model::load(dir.path(), &Device::Cpu).is_ok());
    let wider = ModelConfig {
        d_ff: 128,
        ..cfg.clone()
    };
    wider.save(dir.path()).unwrap();
    let err = Model::load(dir.path(), &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("blocks.0.ff1.w") && err.contains("shape"),
        "{err}"
    );
    let broken = ModelConfig { heads: 0, ..cfg };
    broken.save(dir.path()).unwrap();
    let err = Model::load(dir.path(), &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("\"heads\""), "{err}");
}

#[test]
fn an_index_of_another_vocabulary_is_refused() {
    let cfg = tiny(vec![8, 8]);
    let model = random_model(&cfg, 1);
    let sids = random_sids(20, &[8, 16], 1);
    let index = OfflineIndex::build(&sids, &[8, 16]).unwrap();
    let h = vec![sids[0]];
    let err = Generator::new(&model)
        .generate(
            index.snapshot(),
            &requests(std::slice::from_ref(&h), None),
            &SearchOptions::default(),
        )
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("vocab"), "{err}");
}

#[test]
fn serving_scores_are_the_training_objective() {
    // Hashed prefixes from level 1 on; then exact through level 1 with
    // prefix-scored outputs on levels 0 and 1 (level 2 stays hashed); then
    // level 2 scored by its listed children as well.
    for (buckets, prefix_output, sibling_output) in
        [(40, false, false), (100, true, false), (100, true, true)]
    {
        let cfg = ModelConfig {
            node_buckets: buckets,
            prefix_output,
            sibling_output,
            ..tiny(vec![8, 8, 16])
        };
        assert_eq!(cfg.prefix_scored(1), prefix_output);
        assert!(!cfg.prefix_scored(2));
        assert_eq!(cfg.sibling_scored(2), sibling_output);
        training_matches_serving(&cfg);
    }
}

fn training_matches_serving(cfg: &ModelConfig) {
    use genfeed::model::Dropout;
    use genfeed::train::data::{make_batch, Window};

    let vocab = cfg.vocab.clone();
    let model = random_model(cfg, 31);
    let sids = random_sids(300, &vocab, 12);
    let index = OfflineIndex::build(&sids, &vocab).unwrap();
    let table = SiblingTable::new(cfg, &sids);
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let mut g = Generator::new(&model);
    for _ in 0..20 {
        let len = rng.random_range(2..8);
        let seq: Vec<u32> = (0..len).map(|_| rng.random_range(0..300)).collect();
        let seqs = vec![seq.clone()];
        let w = Window {
            user: 0,
            start: 0,
            end: len as u32,
        };
        // A window predicts every item after the first; the loss is their
        // mean. Serving scores each prediction from its prefix.
        let batch = make_batch(&[&w], &seqs, &sids, &table, cfg, &Device::Cpu).unwrap();
        let loss = model
            .train_loss(&batch, &mut Dropout::new(0.0, 1))
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let mut total = 0.0;
        for t in 1..len {
            let history: Vec<Sid> = seq[..t].iter().map(|&i| sids[i as usize]).collect();
            let target = sids[seq[t] as usize];
            total -= forced_log_prob(&mut g, &index, &history, target);
        }
        let mean = total / (len - 1) as f32;
        assert!(
            (mean - loss).abs() < 1e-3 * loss.abs().max(1.0),
            "served {mean}, trained {loss}"
        );
    }
}

/// Users walk a fixed item-to-item successor map (with some noise): what
/// "bought A, then B" data looks like, with SIDs that carry no meaning.
fn successors(users: usize, items: usize, seed: u64) -> (Vec<Vec<u32>>, Vec<Sid>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let next = |i: u32| (i * 37 + 11) % items as u32;
    let seqs = (0..users)
        .map(|_| {
            let len = rng.random_range(5..12);
            let mut s = vec![rng.random_range(0..items as u32)];
            while s.len() < len {
                let last = *s.last().unwrap();
                s.push(if rng.random_range(0..10) == 0 {
                    rng.random_range(0..items as u32)
                } else {
                    next(last)
                });
            }
            s
        })
        .collect();
    (seqs, random_sids(items, &[16, 16, 8], seed))
}

#[test]
fn training_learns_item_to_item_transitions_over_meaningless_sids() {
    learns_transitions(&tiny(vec![16, 16, 8]));
}

#[test]
fn training_learns_transitions_through_sibling_scored_outputs() {
    // Level 1's 256 prefixes hash into 64 rows: levels 1 and 2 are scored
    // by their listed children, so the gradient flows through the lists.
    let cfg = ModelConfig {
        node_buckets: 64,
        prefix_output: true,
        sibling_output: true,
        ..tiny(vec![16, 16, 8])
    };
    assert!(cfg.sibling_scored(1) && cfg.sibling_scored(2));
    learns_transitions(&cfg);
}

fn learns_transitions(cfg: &ModelConfig) {
    let (seqs, sids) = successors(800, 300, 3);
    let dir = tempfile::tempdir().unwrap();
    let corpus = Corpus {
        seqs: &seqs,
        sids: &sids,
    };
    train(
        &corpus,
        cfg,
        &opts(15),
        dir.path(),
        false,
        &Device::Cpu,
        quiet,
    )
    .unwrap();
    // 90% of next items are the successor of the last one.
    let recall = test_recall(dir.path(), &seqs, &sids);
    assert!(recall > 0.8, "Recall@10 {recall}");
}

/// Fresh items: items 0..=6 are unknown to the model, with one-hot content
/// by `item % 4`; the tests' histories end with item 10 (content 2), so
/// items 2 and 6 are its content twins and 0, 1, 3, 4, 5 unrelated.
fn fresh_fixture() -> (Model, Vec<Sid>, OfflineIndex, FreshItems) {
    let (model, sids, index) = fixture(&[8, 8, 4], 150, 3, 4);
    let content = ContentTable::new(
        4,
        (0..150)
            .flat_map(|i| (0..4).map(move |d| if i % 4 == d { 1.0 } else { 0.0 }))
            .collect(),
    );
    let fresh_items: Vec<(Sid, u32)> = (0..7).map(|i| (sids[i as usize], i)).collect();
    let fresh = FreshItems::new(content, fresh_items, 0.05);
    (model, sids, index, fresh)
}

/// Histories for [`fresh_fixture`]: without the twins, ending with item 10,
/// whose content the twins share.
fn twin_histories(sids: &[Sid]) -> Vec<Vec<Sid>> {
    histories(sids, 12, 9)
        .into_iter()
        .map(|mut h| {
            h.retain(|s| *s != sids[2] && *s != sids[6]);
            h.push(sids[10]);
            h
        })
        .collect()
}

#[test]
fn a_fresh_item_like_the_last_item_outranks_unrelated_ones_by_the_exact_mixture() {
    let (model, sids, index, fresh) = fresh_fixture();
    let weight = 0.5f32;
    let opts = SearchOptions {
        beams: 10,
        top_k: 10,
        exclude_history: true,
    };
    for (h, history) in twin_histories(&sids).into_iter().enumerate() {
        let request = [Request::new(&history)];
        let mut mixed =
            Generator::new(&model).with_fresh(std::sync::Arc::new(fresh.clone()), weight);
        let list = mixed.generate(index.snapshot(), &request, &opts).unwrap();
        let rank = |i: usize| list[0].iter().position(|g| g.sid == sids[i]);
        // Half the mass goes to content, shared by the two twins: each has
        // at least a quarter, which no list of ten can leave out.
        let (r2, r6) = (rank(2).expect("twin 2"), rank(6).expect("twin 6"));
        for unrelated in [0, 1, 3, 4, 5] {
            if let Some(r) = rank(unrelated) {
                assert!(
                    r > r2 && r > r6,
                    "history {h}: unrelated {unrelated} at {r}"
                );
            }
        }
        // A twin's score is the mixture's: (1 − w) P_model + w P_content.
        let mut alone = Generator::new(&model);
        let model_lp = forced_log_prob(&mut alone, &index, &history, sids[2]);
        let expected = ((1.0 - weight) * model_lp.exp() + weight * 0.5).ln();
        let got = list[0][r2].log_prob;
        assert!(
            (got - expected).abs() < 1e-3,
            "history {h}: {got} vs {expected}"
        );
        // Items in the history stay out when the search leaves them out.
        let mut with_twin = history.clone();
        with_twin.insert(0, sids[2]);
        let request = [Request::new(&with_twin)];
        let list = mixed.generate(index.snapshot(), &request, &opts).unwrap();
        assert!(list[0].iter().all(|g| g.sid != sids[2]));
        assert!(list[0].iter().any(|g| g.sid == sids[6]));
        // A deny filter reaches fresh items too.
        let deny = Filter::default().deny([sids[6]]);
        let request = [Request {
            history: &history,
            filter: Some(&deny),
        }];
        let list = mixed.generate(index.snapshot(), &request, &opts).unwrap();
        assert!(list[0].iter().all(|g| g.sid != sids[6]));
    }
}

/// A small fresh set gets a share of the weight, `w · n / (n + half)`: the
/// twins' scores are the mixture's at that share, and a fresh set as large as
/// `half` scores as at half the weight.
#[test]
fn a_small_fresh_set_gets_a_share_of_the_weight_that_grows_with_it() {
    let (model, sids, index, fresh) = fresh_fixture();
    let opts = twenty_beams();
    let history = &twin_histories(&sids)[0];
    let request = [Request::new(history)];
    let twin = |fresh: FreshItems, weight: f32| {
        let mut g = Generator::new(&model).with_fresh(std::sync::Arc::new(fresh), weight);
        let list = g.generate(index.snapshot(), &request, &opts).unwrap();
        list[0]
            .iter()
            .find(|g| g.sid == sids[2])
            .map(|g| g.log_prob)
    };
    let model_lp = forced_log_prob(&mut Generator::new(&model), &index, history, sids[2]);
    let mixture = |w: f32| ((1.0 - w) * model_lp.exp() + w * 0.5).ln();
    assert_eq!(fresh.len(), 7);
    let halved = twin(fresh.clone().with_half_weight_at(7), 0.6).expect("twin at .3");
    assert!(
        (halved - mixture(0.3)).abs() < 1e-3,
        "{halved} vs {}",
        mixture(0.3)
    );
    let same = twin(fresh.clone(), 0.3).expect("twin at .3");
    assert!((halved - same).abs() < 1e-4, "{halved} vs {same}");
    let small = twin(fresh.with_half_weight_at(693), 0.6);
    assert!(
        small.is_none_or(|lp| (lp - mixture(0.006)).abs() < 1e-3),
        "{small:?} vs {}",
        mixture(0.006)
    );
}

/// Of two fresh twins (the same content, like the user's last item), the
/// one the stream took more wins the one fresh slot, at the score of the
/// mixture whose content part the learnt counts reweighted.
#[test]
fn learnt_counts_move_content_mass_to_the_fresh_item_taken_more() {
    let (model, sids, index, fresh) = fresh_fixture();
    let fresh = std::sync::Arc::new(fresh.with_slots(1));
    let weight = 0.5f32;
    let opts = SearchOptions {
        beams: 10,
        top_k: 10,
        exclude_history: true,
    };
    for (h, history) in twin_histories(&sids).into_iter().enumerate() {
        let request = [Request::new(&history)];
        // One generator for both: what it found for the first counts must
        // not outlive them.
        let mut g = Generator::new(&model).with_fresh(fresh.clone(), weight);
        for (favoured, other) in [(2, 6), (6, 2)] {
            g.set_learnt(Some(Arc::new(TestLearnt {
                successors: HashMap::new(),
                popular: Vec::new(),
                share: 0.0,
                boost: HashMap::from([(sids[favoured], 3.0)]),
            })));
            let list = g.generate(index.snapshot(), &request, &opts).unwrap();
            let got = list[0].iter().find(|x| x.sid == sids[favoured]);
            let got = got.unwrap_or_else(|| panic!("history {h}: twin {favoured} kept"));
            assert!(list[0].iter().all(|x| x.sid != sids[other]), "history {h}");
            // The twins held the content part between them (the rest are
            // unlike the last item at temperature .05): 3/4 of it now.
            let mut alone = Generator::new(&model);
            let model_lp = forced_log_prob(&mut alone, &index, &history, sids[favoured]);
            let expected = ((1.0 - weight) * model_lp.exp() + weight * 0.75).ln();
            assert!(
                (got.log_prob - expected).abs() < 1e-3,
                "history {h}: {} vs {expected}",
                got.log_prob
            );
        }
    }
}

/// A share target moves the weight until fresh items hold that share of
/// the slots: over the same stream of requests a larger target ends at a
/// larger weight and fills more slots, each near its target, where the
/// weight it started from held neither.
#[test]
fn a_share_target_holds_fresh_items_to_their_share_of_the_slots() {
    let (model, sids, index, fresh) = fresh_fixture();
    let fresh = std::sync::Arc::new(fresh.with_slots(1));
    let opts = twenty_beams();
    let hs = histories(&sids, 1500, 31);
    let run = |share: Option<f32>| {
        let mut g = Generator::new(&model)
            .with_fresh(fresh.clone(), 0.02)
            .with_fresh_share(share);
        let mut held = 0;
        for (round, chunk) in hs.chunks(20).enumerate() {
            let lists = g
                .generate(index.snapshot(), &requests(chunk, None), &opts)
                .unwrap();
            if round >= 50 {
                held += lists
                    .iter()
                    .flatten()
                    .filter(|x| sids[..7].contains(&x.sid))
                    .count();
            }
        }
        (held as f32 / (500.0 * 10.0), g.fresh_weight().unwrap())
    };
    let (given, _) = run(None);
    // This small model's tenth items are so unlikely that even at 1e-4 a
    // fresh item takes 5.6% of the slots, at .01 9.4%: the targets lie
    // between.
    let (low, w_low) = run(Some(0.065));
    let (high, w_high) = run(Some(0.085));
    assert!(
        (low - 0.065).abs() < 0.006,
        "share {low} held to .065 (given weight: {given})"
    );
    assert!(
        (high - 0.085).abs() < 0.006,
        "share {high} held to .085 (given weight: {given})"
    );
    assert!(w_high > w_low, "weights {w_low} and {w_high}");
    assert!((given - 0.085).abs() > 0.01, "{given}");
}

/// The fresh tests' search: a top 10 from 20 beams, history left out.
fn twenty_beams() -> SearchOptions {
    SearchOptions {
        beams: 20,
        top_k: 10,
        exclude_history: true,
    }
}

#[test]
fn one_fresh_slot_keeps_the_better_twin_and_gives_the_other_slot_to_a_known_item() {
    let (model, sids, index, uncapped) = fresh_fixture();
    let capped = std::sync::Arc::new(uncapped.clone().with_slots(1));
    let uncapped = std::sync::Arc::new(uncapped);
    let (opts, is_fresh) = (twenty_beams(), |s: Sid| (0..7).any(|i| sids[i] == s));
    for (h, history) in twin_histories(&sids).into_iter().enumerate() {
        let request = [Request::new(&history)];
        let all = Generator::new(&model)
            .with_fresh(uncapped.clone(), 0.5)
            .generate(index.snapshot(), &request, &opts)
            .unwrap();
        let one = Generator::new(&model)
            .with_fresh(capped.clone(), 0.5)
            .generate(index.snapshot(), &request, &opts)
            .unwrap();
        let (all, one) = (&all[0], &one[0]);
        assert!(
            all.iter().filter(|g| is_fresh(g.sid)).count() >= 2,
            "history {h}"
        );
        // The cap keeps the best fresh item where it was, and the list
        // is as long as before: the known items move up into the slots the
        // other fresh items leave.
        let fresh_in_one: Vec<Sid> = one.iter().map(|g| g.sid).filter(|&s| is_fresh(s)).collect();
        let best = all.iter().find(|g| is_fresh(g.sid)).unwrap();
        assert_eq!(fresh_in_one, [best.sid], "history {h}");
        assert_eq!(one.len(), all.len(), "history {h}");
        let known = |l: &[genfeed::model::Generated]| -> Vec<Sid> {
            l.iter().map(|g| g.sid).filter(|&s| !is_fresh(s)).collect()
        };
        let (known_all, known_one) = (known(all), known(one));
        assert_eq!(known_one[..known_all.len()], known_all[..], "history {h}");
    }
}

/// A fresh item kept out of a list's first positions goes to the first one
/// it may take (at most the last), the known items it passed move up, and
/// the list holds the same items, still sorted by score.
#[test]
fn a_fresh_item_goes_no_higher_than_the_positions_kept_for_known_items() {
    let (model, sids, index, fresh) = fresh_fixture();
    let fresh = fresh.with_slots(1);
    let (opts, is_fresh) = (twenty_beams(), |s: Sid| (0..7).any(|i| sids[i] == s));
    for (h, history) in twin_histories(&sids).into_iter().enumerate() {
        let request = [Request::new(&history)];
        let list = |after: usize| {
            Generator::new(&model)
                .with_fresh(std::sync::Arc::new(fresh.clone().with_after(after)), 0.5)
                .generate(index.snapshot(), &request, &opts)
                .unwrap()
                .remove(0)
        };
        let free = list(0);
        // At half the weight the twin's content share puts it near the top.
        let first = free.iter().position(|g| is_fresh(g.sid));
        assert!(first.is_some_and(|p| p < 3), "history {h}: {first:?}");
        for after in [3, 9, 10] {
            let kept = list(after);
            // It follows the known items when there are fewer than `after`,
            // and takes the last position when `after` reaches past it.
            let known = kept.iter().filter(|g| !is_fresh(g.sid)).count();
            let expected = Some(after.min(known).min(opts.top_k - 1));
            let at = kept.iter().position(|g| is_fresh(g.sid));
            assert_eq!(at, expected, "history {h}, after {after}");
            let order = |l: &[genfeed::model::Generated], fresh: bool| -> Vec<Sid> {
                l.iter()
                    .map(|g| g.sid)
                    .filter(|&s| is_fresh(s) == fresh)
                    .collect()
            };
            // The same items, each kind in its own order.
            assert_eq!(order(&kept, false), order(&free, false), "history {h}");
            assert_eq!(order(&kept, true), order(&free, true), "history {h}");
            assert!(
                kept.windows(2).all(|w| w[0].log_prob >= w[1].log_prob),
                "history {h}, after {after}"
            );
        }
    }
}

/// The device search ([`Generator::with_device_decoding`], here on the CPU)
/// against the host's, on the same calls: the same items in the same order
/// at the same scores.
fn assert_same_lists(
    host: &[Vec<genfeed::model::Generated>],
    device: &[Vec<genfeed::model::Generated>],
    what: &str,
) {
    assert_eq!(host.len(), device.len(), "{what}");
    for (r, (h, d)) in host.iter().zip(device).enumerate() {
        let hs: Vec<(Sid, u32)> = h.iter().map(|g| (g.sid, g.ord)).collect();
        let ds: Vec<(Sid, u32)> = d.iter().map(|g| (g.sid, g.ord)).collect();
        assert_eq!(hs, ds, "{what}, request {r}");
        for (a, b) in h.iter().zip(d) {
            assert!(
                (a.log_prob - b.log_prob).abs() < 1e-5,
                "{what}, request {r}: {} vs {}",
                a.log_prob,
                b.log_prob
            );
        }
    }
}

#[test]
fn the_device_search_gives_the_host_search_lists() {
    // Prefix- and sibling-scored outputs, an index whose overlay retired and
    // added items, successor counts with learnt ones, filters, history
    // exclusion and fresh items by content: every path of a step.
    let vocab = vec![8, 8, 16];
    let cfg = ModelConfig {
        node_buckets: 40,
        prefix_output: true,
        sibling_output: true,
        ..tiny(vocab.clone())
    };
    let model = random_model(&cfg, 17);
    let sids = random_sids(400, &vocab, 23);
    let dir = tempfile::tempdir().unwrap();
    let mut live: Vec<(Sid, u32)> = sids[..380].iter().copied().zip(0..).collect();
    live.sort_unstable_by(|a, b| a.0.codes().cmp(b.0.codes()));
    let (mut index, _) = Index::open(dir.path(), &vocab, None, &live, usize::MAX).unwrap();
    for s in &sids[..30] {
        index.remove(*s);
    }
    for (i, s) in sids[380..].iter().enumerate() {
        index.insert(*s, 380 + i as u32);
    }
    let snapshot = index.publish();
    let hs = histories(&sids[30..], 24, 31);
    let transitions = random_transitions(&hs, &sids, 41);
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let learnt = Arc::new(TestLearnt {
        successors: hs
            .iter()
            .map(|h| {
                let to = (0..4)
                    .map(|_| {
                        (
                            sids[rng.random_range(0..400)],
                            rng.random_range(1..6) as f32,
                        )
                    })
                    .collect();
                (*h.last().unwrap(), to)
            })
            .collect(),
        popular: Vec::new(),
        share: 0.0,
        boost: HashMap::new(),
    });
    let content = ContentTable::new(
        4,
        (0..400)
            .flat_map(|i| (0..4).map(move |d| if i % 4 == d { 1.0 } else { 0.5 }))
            .collect(),
    );
    let fresh = Arc::new(FreshItems::new(
        content,
        (380..400).map(|i| (sids[i as usize], i)).collect(),
        0.1,
    ));
    let deny = Filter::default().deny(sids[30..60].iter().copied());
    let allow = Filter::default().allow(sids[60..200].iter().copied());
    let mut reqs = requests(&hs, None);
    for (i, r) in reqs.iter_mut().enumerate() {
        r.filter = [None, Some(&deny), Some(&allow)][i % 3];
    }

    let mut compared = 0;
    // Beam 3,000 is wider than the device ranks (it ranks on the host then).
    for (beams, exclude_history) in [(1, false), (7, true), (20, true), (64, false), (3000, true)] {
        let opts = SearchOptions {
            beams,
            top_k: beams.min(10),
            exclude_history,
        };
        let plain = |on: bool| {
            Generator::new(&model)
                .with_device_decoding(on)
                .generate(&snapshot, &reqs, &opts)
                .unwrap()
        };
        assert_same_lists(&plain(false), &plain(true), &format!("beam {beams}"));
        let mixed = |on: bool| {
            let mut g = Generator::new(&model)
                .with_device_decoding(on)
                .with_transitions(&transitions, 0.6)
                .with_fresh(fresh.clone(), 0.3);
            g.set_learnt(Some(learnt.clone()));
            g.generate(&snapshot, &reqs, &opts).unwrap()
        };
        let (host, device) = (mixed(false), mixed(true));
        assert_same_lists(&host, &device, &format!("beam {beams}, mixture"));
        compared += host.iter().map(Vec::len).sum::<usize>();
    }
    assert!(compared > 24 * 25, "only {compared} items compared");

    // A generator kept across a publish reads the new snapshot's tables.
    let mut g = Generator::new(&model).with_device_decoding(true);
    let opts = SearchOptions::default();
    let before = g.generate(&snapshot, &reqs, &opts).unwrap();
    let retired: Vec<Sid> = before.iter().map(|l| l[0].sid).collect();
    for s in &retired {
        index.remove(*s);
    }
    let after = index.publish();
    let got = g.generate(&after, &reqs, &opts).unwrap();
    for list in &got {
        assert!(list.iter().all(|x| !retired.contains(&x.sid)));
    }
    let host = Generator::new(&model)
        .generate(&after, &reqs, &opts)
        .unwrap();
    assert_same_lists(&host, &got, "after a publish");
}
