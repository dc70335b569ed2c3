//! Synthetic catalogues and interaction logs with known structure.
//!
//! Tests, the demo and the benchmarks need data that exists on every machine
//! and whose right answers are known. Items belong to hidden topics; an item's
//! title, categories, attribute ids and (optionally) embedding all come from
//! its topic, and users draw their sequences mostly from one or two favourite
//! topics. A tokenizer that works puts same-topic items under shared prefixes;
//! a recommender that works learns which topic comes next.
//!
//! In the time-ordered mode ([`SynthConfig::late_items`] > 0) the log is one
//! stream: users' interactions interleave, timestamps are positions in that
//! stream, and the last items of the catalogue arrive while it runs (each
//! from its arrival on, with the content of its topic), half of them
//! becoming hits of their topic. That is what a streaming recommender must
//! find: items that did not exist at training time, some of them popular.
//!
//! The output is RecBole atomic files, read by the same loader as real data.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The shape of a synthetic data set.
#[derive(Clone, Debug)]
pub struct SynthConfig {
    pub name: String,
    pub items: usize,
    pub users: usize,
    pub topics: usize,
    /// Interactions per user: uniform in `min_seq..=max_seq`.
    pub min_seq: usize,
    pub max_seq: usize,
    /// Width of an `embedding:float_seq` column; 0 writes none.
    pub embedding_dim: usize,
    pub seed: u64,
    /// Time-ordered mode: this many items (the last ids) arrive during the
    /// stream, between half and 95% of it; 0 writes each user's sequence
    /// with positions as timestamps, as before.
    pub late_items: usize,
}

impl Default for SynthConfig {
    fn default() -> Self {
        SynthConfig {
            name: "synth".into(),
            items: 2000,
            users: 1000,
            topics: 40,
            min_seq: 5,
            max_seq: 20,
            embedding_dim: 0,
            seed: 7,
            late_items: 0,
        }
    }
}

const WORDS: [&str; 48] = [
    "alpine", "amber", "aurora", "basalt", "birch", "blaze", "cedar", "cobalt", "coral", "crimson",
    "delta", "dune", "ember", "fern", "fjord", "flint", "frost", "garnet", "glacier", "harbor",
    "hazel", "indigo", "iris", "jade", "juniper", "lagoon", "lava", "linen", "maple", "meadow",
    "mesa", "onyx", "opal", "orchid", "pebble", "pine", "quartz", "raven", "reef", "saffron",
    "sage", "sierra", "slate", "spruce", "summit", "tundra", "willow", "zephyr",
];

/// Paths of the files written.
pub struct SynthFiles {
    pub items: PathBuf,
    pub inter: PathBuf,
    /// The hidden topic of each item, in item order (item ids are `0..items`).
    pub topics: Vec<usize>,
}

/// Writes `DIR/NAME.item` and `DIR/NAME.inter`.
pub fn generate(dir: &Path, cfg: &SynthConfig) -> std::io::Result<SynthFiles> {
    assert!(cfg.items > 0 && cfg.topics > 0 && cfg.min_seq >= 1 && cfg.max_seq >= cfg.min_seq);
    fs::create_dir_all(dir)?;
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let topic_of: Vec<usize> = (0..cfg.items).map(|i| i % cfg.topics).collect();
    let centres: Vec<Vec<f32>> = (0..cfg.topics)
        .map(|_| {
            (0..cfg.embedding_dim)
                .map(|_| rng.random_range(-1.0..1.0))
                .collect()
        })
        .collect();

    let mut item_file =
        String::from("item_id:token\ttitle:token_seq\tcategories:token_seq\tattributes:token_seq");
    if cfg.embedding_dim > 0 {
        item_file.push_str("\tembedding:float_seq");
    }
    item_file.push('\n');
    for (i, &t) in topic_of.iter().enumerate() {
        let w = |k: usize| WORDS[(t * 7 + k * 13) % WORDS.len()];
        let extra = WORDS[rng.random_range(0..WORDS.len())];
        let _ = write!(
            item_file,
            "{i}\t{} {} {extra} {i}\t{}, {}\tattr{} attr{} attr{}",
            w(0),
            w(1),
            w(2),
            w(3),
            t,
            cfg.topics + t / 4,
            2 * cfg.topics + rng.random_range(0..3)
        );
        if cfg.embedding_dim > 0 {
            item_file.push('\t');
            for (d, c) in centres[t].iter().enumerate() {
                if d > 0 {
                    item_file.push(' ');
                }
                let _ = write!(item_file, "{:.5}", c + 0.1 * rng.random_range(-1.0f32..1.0));
            }
        }
        item_file.push('\n');
    }

    let by_topic: Vec<Vec<usize>> = (0..cfg.topics)
        .map(|t| (0..cfg.items).filter(|&i| topic_of[i] == t).collect())
        .collect();
    let mut inter_file = String::from("user_id:token\titem_id:token\ttimestamp:float\n");
    if cfg.late_items > 0 {
        stream(cfg, &mut rng, &topic_of, &mut inter_file);
    } else {
        for u in 0..cfg.users {
            let (favourite, len) = (
                rng.random_range(0..cfg.topics),
                rng.random_range(cfg.min_seq..=cfg.max_seq),
            );
            for pos in 0..len {
                let t = next_topic(cfg, &mut rng, favourite, pos);
                let pool = &by_topic[t];
                if pool.is_empty() {
                    continue;
                }
                let item = pool[rng.random_range(0..pool.len())];
                let _ = writeln!(inter_file, "u{u}\t{item}\t{}", pos + 1);
            }
        }
    }
    let items = dir.join(format!("{}.item", cfg.name));
    let inter = dir.join(format!("{}.inter", cfg.name));
    fs::write(&items, item_file)?;
    fs::write(&inter, inter_file)?;
    Ok(SynthFiles {
        items,
        inter,
        topics: topic_of,
    })
}

/// The topic of a user's `pos`-th interaction: mostly the favourite topic,
/// alternating with its successor topic, with some noise: a sequence a model
/// can learn.
fn next_topic(cfg: &SynthConfig, rng: &mut ChaCha8Rng, favourite: usize, pos: usize) -> usize {
    let successor = (favourite + 1) % cfg.topics;
    match rng.random_range(0..10) {
        0 => rng.random_range(0..cfg.topics),
        1..=3 => successor,
        _ if pos % 2 == 0 => favourite,
        _ => successor,
    }
}

/// The time-ordered log: every user's sequence drawn as in the plain mode,
/// interleaved at random into one stream; an item of the last
/// `late_items` exists from its arrival on, and a user who picks a topic
/// with arrived late items takes one of them 40% of the time, a hit (every
/// other late item of the topic) eight times as often as the rest.
fn stream(cfg: &SynthConfig, rng: &mut ChaCha8Rng, topic_of: &[usize], out: &mut String) {
    use rand::seq::SliceRandom;
    let late_from = cfg.items.saturating_sub(cfg.late_items);
    let users: Vec<(usize, usize)> = (0..cfg.users)
        .map(|_| {
            (
                rng.random_range(0..cfg.topics),
                rng.random_range(cfg.min_seq..=cfg.max_seq),
            )
        })
        .collect();
    let mut order: Vec<usize> = users
        .iter()
        .enumerate()
        .flat_map(|(u, &(_, len))| std::iter::repeat_n(u, len))
        .collect();
    order.shuffle(rng);
    let total = order.len() as f64;
    // Late items by arrival time.
    let mut arrivals: Vec<(usize, usize)> = (late_from..cfg.items)
        .map(|i| ((total * rng.random_range(0.5..0.95)) as usize, i))
        .collect();
    arrivals.sort_unstable();
    let early: Vec<Vec<usize>> = (0..cfg.topics)
        .map(|t| (0..late_from).filter(|&i| topic_of[i] == t).collect())
        .collect();
    // Arrived late items per topic, with their weights.
    let mut arrived: Vec<Vec<(usize, f64)>> = vec![Vec::new(); cfg.topics];
    let mut next_arrival = 0;
    let mut pos = vec![0usize; cfg.users];
    for (time, &u) in order.iter().enumerate() {
        while next_arrival < arrivals.len() && arrivals[next_arrival].0 <= time {
            let i = arrivals[next_arrival].1;
            // Every other late item of each topic is a hit.
            let hit = (i - late_from) / cfg.topics % 2 == 0;
            arrived[topic_of[i]].push((i, if hit { 8.0 } else { 1.0 }));
            next_arrival += 1;
        }
        let t = next_topic(cfg, rng, users[u].0, pos[u]);
        pos[u] += 1;
        let late = &arrived[t];
        let item = if !late.is_empty() && rng.random_bool(0.4) {
            let sum: f64 = late.iter().map(|x| x.1).sum();
            let mut r = rng.random_range(0.0..sum);
            late.iter()
                .find(|x| {
                    r -= x.1;
                    r < 0.0
                })
                .unwrap_or(&late[late.len() - 1])
                .0
        } else if early[t].is_empty() {
            continue;
        } else {
            early[t][rng.random_range(0..early[t].len())]
        };
        let _ = writeln!(out, "u{u}\t{item}\t{}", time + 1);
    }
}

/// `n` distinct SIDs shaped like a trained tokenizer's: content levels drawn
/// at random, the last level numbering items that share a prefix (0, 1, …).
/// `vocab` is the codes per level; the last entry must exceed the largest
/// group, which at 256 codes on the content levels only pathological `n`
/// would reach.
pub fn random_sids(n: usize, vocab: &[usize], seed: u64) -> Vec<crate::sid::Sid> {
    use std::collections::HashMap;
    let (last, content) = vocab.split_last().expect("at least one level");
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut groups: HashMap<Vec<u16>, usize> = HashMap::new();
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let mut codes: Vec<u16> = content
            .iter()
            .map(|&v| rng.random_range(0..v) as u16)
            .collect();
        let next = groups.entry(codes.clone()).or_insert(0);
        if *next >= *last {
            continue;
        }
        codes.push(*next as u16);
        *next += 1;
        out.push(crate::sid::Sid::new(&codes).expect("levels within MAX_LEVELS"));
    }
    out
}
