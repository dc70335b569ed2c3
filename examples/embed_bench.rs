//! Measures how many texts per second `TextEncoder::encode_all` embeds.
//!
//! With no file it encodes synthetic sentences; given a RecBole `.item` file it
//! encodes each item's `title` and `categories` columns as "title. categories".
//!
//! ```text
//! cargo run --release --example embed_bench -- [--model DIR] [--batch-sizes 16,32,64] \
//!     [--count N] [ITEM_FILE]
//! ```

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::Device;
use clap::Parser;
use genfeed::embed::text::TextEncoder;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[derive(Parser)]
struct Args {
    /// Model directory, as installed by scripts/install-minilm.sh.
    #[arg(long, default_value = "models/all-minilm-l6-v2")]
    model: PathBuf,
    /// Batch sizes to measure, each over all texts.
    #[arg(long, value_delimiter = ',', default_value = "16,32,64")]
    batch_sizes: Vec<usize>,
    /// Number of texts: synthetic ones to make, or the first N items of the file.
    #[arg(long)]
    count: Option<usize>,
    /// A RecBole .item file with title and categories columns.
    item_file: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();

    let texts = match &args.item_file {
        Some(path) => {
            let mut texts = read_item_texts(path)?;
            texts.truncate(args.count.unwrap_or(texts.len()));
            texts
        }
        None => synthetic_texts(args.count.unwrap_or(2000)),
    };
    let texts: Vec<&str> = texts.iter().map(String::as_str).collect();

    let start = Instant::now();
    let encoder = TextEncoder::load(&args.model, &Device::Cpu)?;
    println!(
        "loaded {} in {:.0} ms; {} texts",
        encoder.model_id(),
        start.elapsed().as_secs_f64() * 1e3,
        texts.len()
    );

    for &batch_size in &args.batch_sizes {
        let start = Instant::now();
        let vectors = encoder.encode_all(&texts, batch_size, |_| ())?;
        let seconds = start.elapsed().as_secs_f64();
        assert_eq!(vectors.len(), texts.len() * encoder.dim());
        println!(
            "batch {batch_size:>4}: {:>8.1} items/s ({seconds:.1} s)",
            texts.len() as f64 / seconds
        );
    }
    Ok(())
}

/// "title. categories" for each item of a RecBole .item file, whose header names
/// its tab-separated columns as `name:type`.
fn read_item_texts(path: &Path) -> anyhow::Result<Vec<String>> {
    let data =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut lines = data.lines();
    let header: Vec<&str> = lines
        .next()
        .with_context(|| format!("{}: empty file", path.display()))?
        .split('\t')
        .map(|column| column.split(':').next().unwrap_or(column))
        .collect();
    let column = |name: &str| header.iter().position(|&c| c == name);
    let Some(title) = column("title") else {
        bail!("{}: no title column in {header:?}", path.display());
    };
    let categories = column("categories");

    Ok(lines
        .map(|line| {
            let fields: Vec<&str> = line.split('\t').collect();
            let title = fields.get(title).copied().unwrap_or("");
            match categories.and_then(|c| fields.get(c)) {
                Some(categories) => format!("{title}. {categories}"),
                None => title.to_string(),
            }
        })
        .collect())
}

/// Sentences of 3 to 30 words drawn from a small vocabulary, the same every run.
fn synthetic_texts(count: usize) -> Vec<String> {
    const WORDS: &[&str] = &[
        "fresh", "pizza", "coffee", "bar", "late", "night", "family", "owned", "Italian", "sushi",
        "burgers", "vegan", "bakery", "cozy", "patio", "delivery", "brunch", "tacos", "wine",
        "craft", "beer", "spa", "salon", "repair", "shop", "gym", "books", "music",
    ];
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    (0..count)
        .map(|_| {
            let n = rng.random_range(3..=30);
            (0..n)
                .map(|_| WORDS[rng.random_range(0..WORDS.len())])
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}
