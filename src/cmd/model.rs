//! `genfeed train` and `genfeed eval`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::Device;
use clap::{Args, ValueEnum};

use genfeed::catalogue::vocab;
use genfeed::dataset::{load_sequences, Example, Split};
use genfeed::eval::{evaluate, OfflineIndex};
use genfeed::model::{Generator, Model, ModelConfig, SearchOptions, Transitions};
use genfeed::sid::Sid;
use genfeed::tokenizer::FrozenTokenizer;
use genfeed::train::transitions::fit_transitions;
use genfeed::train::{train, Corpus, TrainOptions};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DeviceArg {
    Cpu,
    /// The first CUDA device (needs a build with `--features cuda`).
    Cuda,
}

pub fn device(arg: DeviceArg) -> anyhow::Result<Device> {
    match arg {
        DeviceArg::Cpu => Ok(Device::Cpu),
        DeviceArg::Cuda => Device::new_cuda(0).context("--device cuda"),
    }
}

/// Sets the worker-thread count candle's CPU kernels use.
pub fn set_threads(threads: Option<usize>) {
    if let Some(t) = threads {
        std::env::set_var("RAYON_NUM_THREADS", t.to_string());
    }
}

#[derive(Args)]
pub struct TrainArgs {
    /// A RecBole folder (or its `.inter` file): the interaction sequences.
    #[arg(long)]
    data: PathBuf,
    /// The tokenizer artifact that gives every item its SID.
    #[arg(long)]
    tokenizer: PathBuf,
    /// Output directory: model, config, log, curves, checkpoint.
    #[arg(long)]
    out: PathBuf,
    /// Continue the run in `--out` from its last checkpoint.
    #[arg(long)]
    resume: bool,
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceArg,
    /// CPU threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    #[arg(long, default_value_t = 128)]
    d_model: usize,
    #[arg(long, default_value_t = 2)]
    layers: usize,
    #[arg(long, default_value_t = 1)]
    decoder_layers: usize,
    #[arg(long, default_value_t = 4)]
    heads: usize,
    #[arg(long, default_value_t = 32)]
    head_dim: usize,
    #[arg(long, default_value_t = 512)]
    d_ff: usize,
    #[arg(long, default_value_t = 0.2)]
    dropout: f32,
    #[arg(long, default_value_t = 20)]
    max_history: usize,
    /// Rows per level of the prefix-embedding tables.
    #[arg(long, default_value_t = 65_536)]
    node_buckets: usize,
    /// Score each code by its prefix's row too (item-specific output
    /// vectors on the levels whose prefix table is exact); `false` gives
    /// the plain code output.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    prefix_output: bool,
    /// Score each live child by its prefix row on the levels whose prefix
    /// table is hashed too, from a list of its parent's children (at most
    /// 64), so that items sharing a prefix are told apart by what was
    /// learnt about each; `false` leaves those levels to code rows.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    sibling_output: bool,
    #[arg(long, default_value_t = TrainOptions::default().epochs)]
    epochs: usize,
    #[arg(long, default_value_t = TrainOptions::default().batch_size)]
    batch_size: usize,
    #[arg(long, default_value_t = TrainOptions::default().lr)]
    lr: f64,
    #[arg(long, default_value_t = TrainOptions::default().warmup_steps)]
    warmup: u64,
    #[arg(long, default_value_t = TrainOptions::default().weight_decay)]
    weight_decay: f64,
    #[arg(long, default_value_t = TrainOptions::default().patience)]
    patience: usize,
    #[arg(long, default_value_t = TrainOptions::default().seed)]
    seed: u64,
    /// Validation users per epoch, evenly spaced; 0 = all.
    #[arg(long, default_value_t = TrainOptions::default().valid_users)]
    valid_users: usize,
    /// Beam width of validation.
    #[arg(long, default_value_t = TrainOptions::default().beams)]
    beams: usize,
    /// Probability of deleting each item of a training sequence, afresh
    /// every epoch, so the model learns from histories with skipped items.
    #[arg(long, default_value_t = TrainOptions::default().item_drop)]
    item_drop: f64,
    /// Probability of cutting a training window to a random shorter length,
    /// afresh every epoch, so next items are also learnt from short
    /// contexts.
    #[arg(long, default_value_t = TrainOptions::default().short_windows)]
    short_windows: f64,
}

/// Interaction sequences and a SID for every catalogue item, numbered so
/// that `sids[i]` belongs to `items[i]`; the interacted items come first.
struct Loaded {
    seqs: Vec<Vec<u32>>,
    items: Vec<String>,
    sids: Vec<Sid>,
    tokenizer: FrozenTokenizer,
}

fn inter_file(data: &Path) -> anyhow::Result<PathBuf> {
    if data.is_file() {
        return Ok(data.to_path_buf());
    }
    let mut found = std::fs::read_dir(data)
        .with_context(|| format!("reading {}", data.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "inter"));
    match (found.next(), found.next()) {
        (Some(p), None) => Ok(p),
        (None, _) => bail!("{}: no .inter file", data.display()),
        (Some(_), Some(_)) => bail!("{}: more than one .inter file; name one", data.display()),
    }
}

fn load(data: &Path, tokenizer: &Path) -> anyhow::Result<Loaded> {
    let tokenizer = FrozenTokenizer::load(tokenizer)
        .with_context(|| format!("loading the tokenizer {}", tokenizer.display()))?;
    let inter = inter_file(data)?;
    let seqs =
        load_sequences(&inter, None).with_context(|| format!("reading {}", inter.display()))?;
    let by_id: std::collections::HashMap<&str, Sid> = tokenizer
        .training_items()
        .iter()
        .map(|(id, sid)| (id.as_str(), *sid))
        .collect();
    let mut items = seqs.items.clone();
    let mut sids = Vec::with_capacity(by_id.len());
    for id in &items {
        match by_id.get(id.as_str()) {
            Some(&s) => sids.push(s),
            None => bail!(
                "{}: item \"{id}\" has no SID in the tokenizer {} (trained on another catalogue?)",
                inter.display(),
                tokenizer.dir().display()
            ),
        }
    }
    let known: std::collections::HashSet<&str> = items.iter().map(String::as_str).collect();
    let extra: Vec<(String, Sid)> = tokenizer
        .training_items()
        .iter()
        .filter(|(id, _)| !known.contains(id.as_str()))
        .cloned()
        .collect();
    for (id, sid) in extra {
        items.push(id);
        sids.push(sid);
    }
    Ok(Loaded {
        seqs: seqs.seqs,
        items,
        sids,
        tokenizer,
    })
}

pub fn run_train(a: TrainArgs) -> anyhow::Result<()> {
    set_threads(a.threads);
    let device = device(a.device)?;
    let loaded = load(&a.data, &a.tokenizer)?;
    let cfg = ModelConfig {
        vocab: vocab(&loaded.tokenizer),
        d_model: a.d_model,
        layers: a.layers,
        decoder_layers: a.decoder_layers,
        heads: a.heads,
        head_dim: a.head_dim,
        d_ff: a.d_ff,
        max_history: a.max_history,
        dropout: a.dropout,
        node_buckets: a.node_buckets,
        prefix_output: a.prefix_output,
        sibling_output: a.sibling_output,
        transition_weight: 0.0,
        tokenizer_version: loaded.tokenizer.version().to_string(),
    };
    let opts = TrainOptions {
        epochs: a.epochs,
        batch_size: a.batch_size,
        lr: a.lr,
        warmup_steps: a.warmup,
        weight_decay: a.weight_decay,
        patience: a.patience,
        seed: a.seed,
        valid_users: a.valid_users,
        beams: a.beams,
        item_drop: a.item_drop,
        short_windows: a.short_windows,
        ..TrainOptions::default()
    };
    eprintln!(
        "{} users, {} items, vocabulary {:?}",
        loaded.seqs.len(),
        loaded.items.len(),
        cfg.vocab
    );
    let corpus = Corpus {
        seqs: &loaded.seqs,
        sids: &loaded.sids,
    };
    let summary = train(&corpus, &cfg, &opts, &a.out, a.resume, &device, super::bar)?;
    let mixing = fit_transitions(
        &corpus,
        &a.out,
        opts.valid_users,
        opts.beams,
        &device,
        super::bar,
    )?;
    #[derive(serde::Serialize)]
    struct Report<'a> {
        #[serde(flatten)]
        summary: &'a genfeed::train::Summary,
        transitions: &'a genfeed::train::transitions::Mixing,
    }
    let report = Report {
        summary: &summary,
        transitions: &mixing,
    };
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

#[derive(Args)]
pub struct FitTransitionsArgs {
    /// The RecBole folder (or `.inter` file) the model was trained on.
    #[arg(long)]
    data: PathBuf,
    /// The tokenizer the model was trained with.
    #[arg(long)]
    tokenizer: PathBuf,
    /// The trained model directory; its config gets the chosen weight.
    #[arg(long)]
    model: PathBuf,
    /// Validation users the weight is chosen on (evenly spaced); 0 = all.
    #[arg(long, default_value_t = TrainOptions::default().valid_users)]
    valid_users: usize,
    #[arg(long, default_value_t = TrainOptions::default().beams)]
    beams: usize,
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceArg,
    #[arg(long)]
    threads: Option<usize>,
}

/// Refuses a model trained on SIDs from another tokenizer than `dir`'s.
fn same_tokenizer(cfg: &ModelConfig, loaded: &Loaded, dir: &Path) -> anyhow::Result<()> {
    if cfg.tokenizer_version != loaded.tokenizer.version() {
        bail!(
            "the model was trained with tokenizer {} but {} is {}",
            cfg.tokenizer_version,
            dir.display(),
            loaded.tokenizer.version()
        );
    }
    Ok(())
}

pub fn run_fit_transitions(a: FitTransitionsArgs) -> anyhow::Result<()> {
    set_threads(a.threads);
    let device = device(a.device)?;
    let loaded = load(&a.data, &a.tokenizer)?;
    let cfg = ModelConfig::load(&a.model)
        .with_context(|| format!("loading the model {}", a.model.display()))?;
    same_tokenizer(&cfg, &loaded, &a.tokenizer)?;
    let corpus = Corpus {
        seqs: &loaded.seqs,
        sids: &loaded.sids,
    };
    let mixing = fit_transitions(
        &corpus,
        &a.model,
        a.valid_users,
        a.beams,
        &device,
        super::bar,
    )?;
    println!("{}", serde_json::to_string_pretty(&mixing)?);
    Ok(())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SplitArg {
    Valid,
    Test,
}

#[derive(Args)]
pub struct EvalArgs {
    /// A RecBole folder (or its `.inter` file).
    #[arg(long)]
    data: PathBuf,
    /// A trained model directory (`genfeed train --out`).
    #[arg(long)]
    model: PathBuf,
    /// The tokenizer the model was trained with.
    #[arg(long)]
    tokenizer: PathBuf,
    #[arg(long, value_enum, default_value = "test")]
    split: SplitArg,
    #[arg(long, default_value_t = 20)]
    beams: usize,
    /// Requests per beam-search batch.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Evaluate this many users, evenly spaced; 0 = all.
    #[arg(long, default_value_t = 0)]
    users: usize,
    /// Leave the user's history items out of the recommendations.
    #[arg(long)]
    exclude_history: bool,
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceArg,
    #[arg(long)]
    threads: Option<usize>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Weight of the successor counts in the search (0 = the model alone);
    /// default: the model's `transition_weight`, chosen on validation.
    #[arg(long)]
    transition_weight: Option<f32>,
    /// Also write one line per evaluated user, tab-separated: the user's
    /// number in the data, the target item, and its 0-based rank in the top
    /// 10 (empty for a miss).
    #[arg(long)]
    ranks: Option<PathBuf>,
}

pub fn run_eval(a: EvalArgs) -> anyhow::Result<()> {
    if let Some(w) = a.transition_weight.filter(|w| !(0.0..1.0).contains(w)) {
        bail!("--transition-weight {w} is not in [0, 1)");
    }
    set_threads(a.threads);
    let device = device(a.device)?;
    let loaded = load(&a.data, &a.tokenizer)?;
    let (cfg, model) = Model::load(&a.model, &device)
        .with_context(|| format!("loading the model {}", a.model.display()))?;
    same_tokenizer(&cfg, &loaded, &a.tokenizer)?;
    let split = Split::leave_one_out(&loaded.seqs, cfg.max_history);
    let examples: Vec<Example<'_>> = match a.split {
        SplitArg::Valid => split.valid().iter().collect(),
        SplitArg::Test => split.test().iter().collect(),
    };
    let examples = if a.users == 0 || a.users >= examples.len() {
        examples
    } else {
        let step = examples.len() as f64 / a.users as f64;
        (0..a.users)
            .map(|i| examples[(i as f64 * step) as usize])
            .collect()
    };
    let index = OfflineIndex::build(&loaded.sids, &cfg.vocab)?;
    let opts = SearchOptions {
        beams: a.beams,
        top_k: 10,
        exclude_history: a.exclude_history,
    };
    let pb = super::bar(examples.len() as u64, "eval");
    let transitions = Transitions::load_weighted(
        &a.model,
        a.transition_weight.unwrap_or(cfg.transition_weight),
    )?;
    let mut generator = Generator::new(&model);
    if let Some((t, w)) = &transitions {
        generator = generator.with_transitions(t, *w);
    }
    let report = evaluate(
        &mut generator,
        &index,
        &loaded.sids,
        &examples,
        &opts,
        a.batch,
        &pb,
    )?;
    pb.finish_and_clear();
    if let Some(path) = &a.ranks {
        write_ranks(path, &examples, &loaded.items, &report.ranks)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "{} users  Recall@5 {:.4}  NDCG@5 {:.4}  Recall@10 {:.4}  NDCG@10 {:.4}\n\
             invalid IDs {:.4}  coverage@10 {:.4}  {:.1} recs/s  {:.2} ms/request (batch {}, beam {})",
            report.users,
            report.recall5,
            report.ndcg5,
            report.recall10,
            report.ndcg10,
            report.invalid_rate,
            report.coverage10,
            report.recs_per_sec,
            report.ms_per_request,
            report.batch,
            report.beams
        );
    }
    Ok(())
}

fn write_ranks(
    path: &Path,
    examples: &[Example<'_>],
    items: &[String],
    ranks: &[Option<u8>],
) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    writeln!(out, "user\ttarget\trank")?;
    for (e, rank) in examples.iter().zip(ranks) {
        let rank = rank.map(|r| r.to_string()).unwrap_or_default();
        writeln!(out, "{}\t{}\t{rank}", e.user, items[e.target as usize])?;
    }
    out.flush()
}
