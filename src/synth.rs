//! Synthetic catalogues and interaction logs with known structure.
//!
//! Tests, the demo and the benchmarks need data that exists on every machine
//! and whose right answers are known. Items belong to hidden topics; an item's
//! title, categories, attribute ids and (optionally) embedding all come from
//! its topic, and users draw their sequences mostly from one or two favourite
//! topics. A tokenizer that works puts same-topic items under shared prefixes;
//! a recommender that works learns which topic comes next.
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
    for u in 0..cfg.users {
        let favourite = rng.random_range(0..cfg.topics);
        let next_topic = (favourite + 1) % cfg.topics;
        let len = rng.random_range(cfg.min_seq..=cfg.max_seq);
        for pos in 0..len {
            // Mostly the favourite topic, alternating with its successor topic,
            // with some noise: a sequence a model can learn.
            let t = match rng.random_range(0..10) {
                0 => rng.random_range(0..cfg.topics),
                1..=3 => next_topic,
                _ if pos % 2 == 0 => favourite,
                _ => next_topic,
            };
            let pool = &by_topic[t];
            if pool.is_empty() {
                continue;
            }
            let item = pool[rng.random_range(0..pool.len())];
            let _ = writeln!(inter_file, "u{u}\t{item}\t{}", pos + 1);
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
