//! `genfeed train` and `genfeed eval`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::Device;
use clap::{Args, ValueEnum};

use genfeed::catalogue::vocab;
use genfeed::dataset::{load_sequences, Example, Split};
use genfeed::embed::tfidf;
use genfeed::eval::{content_neighbours, evaluate, Breakdown, OfflineIndex, Quality};
use genfeed::model::fresh::{self, fit_temperature};
use genfeed::model::{
    Affinity, ContentTable, FreshItems, Generator, Model, ModelConfig, SearchOptions, Transitions,
    AFFINITY_FILE,
};
use genfeed::sid::Sid;
use genfeed::tokenizer::FrozenTokenizer;
use genfeed::train::affinity::{fit_affinity, AffinityOptions};
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

/// Where a search builds each step's mask and ranks its candidates
/// ([`Generator::with_device_decoding`]): both give the same lists.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Decoding {
    /// The host on the CPU, the device elsewhere.
    Auto,
    Host,
    /// The model's device, from the index's tables uploaded per snapshot.
    Device,
}

impl Decoding {
    /// Whether a search on `device` decodes there.
    pub fn on_device(self, device: &Device) -> bool {
        match self {
            Decoding::Auto => !device.is_cpu(),
            Decoding::Host => false,
            Decoding::Device => true,
        }
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
    /// The catalogue the tokenizer reads (`.item`), for items it was not
    /// trained on (a cold split's cold items): they are assigned from it.
    #[arg(long)]
    items: Option<PathBuf>,
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

pub(super) fn inter_file(data: &Path) -> anyhow::Result<PathBuf> {
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

/// Loads the sequences and gives every item a SID: a tokenizer training
/// item keeps its own; any other item of the interactions (a cold split's
/// cold items) is assigned by the frozen tokenizer from its content in
/// `catalogue`, in item order, as the service assigns a catalogue event.
fn load(data: &Path, tokenizer: &Path, catalogue: Option<&Path>) -> anyhow::Result<Loaded> {
    let tokenizer = FrozenTokenizer::load(tokenizer)
        .with_context(|| format!("loading the tokenizer {}", tokenizer.display()))?;
    let inter = inter_file(data)?;
    let seqs =
        load_sequences(&inter, None).with_context(|| format!("reading {}", inter.display()))?;
    let mut assigner = tokenizer.assigner();
    let missing: Vec<&str> = seqs
        .items
        .iter()
        .filter(|id| assigner.get(id).is_none())
        .map(String::as_str)
        .collect();
    if let Some(&first) = missing.first() {
        let Some(path) = catalogue else {
            bail!(
                "{}: item \"{first}\" and {} more have no SID in the tokenizer {} \
                 (trained without them, or on another catalogue): pass --items with their content",
                inter.display(),
                missing.len() - 1,
                tokenizer.dir().display()
            );
        };
        assign_from_content(&tokenizer, &mut assigner, path, &missing)?;
    }
    let mut items = seqs.items.clone();
    let mut sids: Vec<Sid> = items
        .iter()
        .map(|id| assigner.get(id).expect("every item was assigned above"))
        .collect();
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

/// Gives `missing` their SIDs from their rows of the catalogue at `path`,
/// encoded as the tokenizer's manifest says.
fn assign_from_content(
    tokenizer: &FrozenTokenizer,
    assigner: &mut genfeed::tokenizer::Assigner<'_>,
    path: &Path,
    missing: &[&str],
) -> anyhow::Result<()> {
    let mut items = super::tokenizer::load_items(path)?;
    let wanted: std::collections::HashMap<&str, usize> =
        missing.iter().enumerate().map(|(i, &id)| (id, i)).collect();
    items.rows.retain(|r| wanted.contains_key(r.id.as_str()));
    if items.rows.len() < missing.len() {
        let absent = missing
            .iter()
            .find(|id| !items.rows.iter().any(|r| r.id == **id))
            .expect("fewer rows than ids");
        bail!(
            "{}: no row for item \"{absent}\", which the tokenizer has no SID for",
            path.display()
        );
    }
    items.rows.sort_by_key(|r| wanted[r.id.as_str()]);
    let vectors = super::tokenizer::tokenizer_vectors(tokenizer, &items, None)?;
    for (i, row) in items.rows.iter().enumerate() {
        assigner.assign(&row.id, vectors.row(i))?;
    }
    eprintln!(
        "{} items without a SID in the tokenizer assigned from {}",
        missing.len(),
        path.display()
    );
    Ok(())
}

pub fn run_train(a: TrainArgs) -> anyhow::Result<()> {
    set_threads(a.threads);
    let device = device(a.device)?;
    let loaded = load(&a.data, &a.tokenizer, a.items.as_deref())?;
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

/// What a trained model was trained on, for the commands that fit more to
/// it.
#[derive(Args)]
pub struct TrainedOn {
    /// The RecBole folder (or `.inter` file) the model was trained on.
    #[arg(long)]
    data: PathBuf,
    /// The tokenizer the model was trained with.
    #[arg(long)]
    tokenizer: PathBuf,
    /// The catalogue the tokenizer reads (`.item`), for items it was not
    /// trained on; the same file as in training.
    #[arg(long)]
    items: Option<PathBuf>,
}

impl TrainedOn {
    /// The data with its SIDs, and the config of `model`, refused if it was
    /// trained with another tokenizer.
    fn load(&self, model: &Path) -> anyhow::Result<(Loaded, ModelConfig)> {
        let loaded = load(&self.data, &self.tokenizer, self.items.as_deref())?;
        let cfg = ModelConfig::load(model)
            .with_context(|| format!("loading the model {}", model.display()))?;
        same_tokenizer(&cfg, &loaded, &self.tokenizer)?;
        Ok((loaded, cfg))
    }
}

#[derive(Args)]
pub struct FitTransitionsArgs {
    #[command(flatten)]
    on: TrainedOn,
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
    let (loaded, _) = a.on.load(&a.model)?;
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

#[derive(Args)]
pub struct FitAffinityArgs {
    #[command(flatten)]
    on: TrainedOn,
    /// The trained model directory; the affinity is written into it
    /// (`affinity.safetensors`), where `eval` finds it.
    #[arg(long)]
    model: PathBuf,
    /// The catalogue whose content the affinity reads, as `eval --content`.
    #[arg(long)]
    content: Option<PathBuf>,
    /// The content space, as `eval --content-encoder`; `eval` uses the
    /// affinity only with the same one.
    #[arg(long, value_enum, default_value = "tfidf")]
    content_encoder: ContentEncoder,
    /// Width of the query and key projections.
    #[arg(long, default_value_t = AffinityOptions::default().rank)]
    rank: usize,
    /// Passes over the training transitions; the epoch with the best
    /// held-out NLL is kept.
    #[arg(long, default_value_t = AffinityOptions::default().epochs)]
    epochs: usize,
    #[arg(long)]
    threads: Option<usize>,
}

/// The name a content space goes by in an affinity's file.
fn content_space(encoder: ContentEncoder) -> String {
    encoder
        .to_possible_value()
        .map(|v| v.get_name().to_string())
        .unwrap_or_default()
}

/// Every item's content in the space `encoder` names.
fn content_of(
    loaded: &Loaded,
    path: Option<&Path>,
    encoder: ContentEncoder,
) -> anyhow::Result<Option<ContentTable>> {
    Ok(match (path, encoder) {
        (_, ContentEncoder::Sid) => Some(sid_content(loaded)?),
        (Some(p), encoder) => Some(content_table(p, &loaded.items, encoder)?),
        (None, _) => None,
    })
}

pub fn run_fit_affinity(a: FitAffinityArgs) -> anyhow::Result<()> {
    set_threads(a.threads);
    let (loaded, cfg) = a.on.load(&a.model)?;
    let Some(content) = content_of(&loaded, a.content.as_deref(), a.content_encoder)? else {
        bail!(
            "--content-encoder {} reads a catalogue: pass --content FILE",
            content_space(a.content_encoder)
        );
    };
    let split = Split::leave_one_out(&loaded.seqs, cfg.max_history);
    let trained = split.trained_items(loaded.items.len());
    let temperature = fit_fresh_temperature(&split, &content, &trained);
    let pairs: Vec<(u32, u32)> = split
        .train()
        .iter()
        .filter_map(|e| e.history.last().map(|&l| (l, e.target)))
        .collect();
    let candidates: Vec<u32> = (0..loaded.items.len() as u32)
        .filter(|&i| trained[i as usize])
        .collect();
    let opts = AffinityOptions {
        rank: a.rank,
        epochs: a.epochs,
        threads: a.threads.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
        }),
        ..AffinityOptions::default()
    };
    let (affinity, fit) = fit_affinity(
        &content,
        &content_space(a.content_encoder),
        temperature,
        &pairs,
        &candidates,
        &opts,
        super::bar,
    )
    .map_err(anyhow::Error::msg)?;
    affinity.save(&a.model)?;
    eprintln!("wrote {}", a.model.join(AFFINITY_FILE).display());
    // The service weighs items that arrive later with the weighting these
    // rows were made with; another content space leaves it none.
    let frozen = a.model.join(tfidf::FILE);
    match (a.content_encoder, a.content.as_deref()) {
        (ContentEncoder::Tfidf, Some(path)) => {
            let catalogue = super::tokenizer::load_items(path)?;
            tfidf::TfIdf::fit(&catalogue, TFIDF_DIM).save(&a.model)?;
            eprintln!("wrote {}", frozen.display());
        }
        _ => match std::fs::remove_file(&frozen) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e)?,
            _ => {}
        },
    }
    println!("{}", serde_json::to_string_pretty(&fit)?);
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
    /// The catalogue the tokenizer reads (`.item`), for items it was not
    /// trained on; the same file as in training.
    #[arg(long)]
    items: Option<PathBuf>,
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
    /// Where masks and candidates are made (default: the model's device).
    #[arg(long, value_enum, default_value = "auto")]
    decoding: Decoding,
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
    /// number in the data, the target item, its 0-based rank in the top 10
    /// (empty for a miss), and the top 10's items and log-probabilities
    /// (comma-separated).
    #[arg(long)]
    ranks: Option<PathBuf>,
    /// A catalogue (`.item`) whose content (text, attributes or an
    /// embedding column, as `tokenizer train --encoder auto` picks) scores
    /// the items that never occur in training, and the content baseline.
    #[arg(long)]
    content: Option<PathBuf>,
    /// Prior that the next item is one never seen in training, the weight
    /// of their content scores in the search (0 = the model alone).
    /// Default: .1 by cosine, chosen with `--fresh-slots 1` on the Toys
    /// cold split; .025 with a fitted affinity, whose sharper scores need
    /// less (README, "Cold start").
    #[arg(long)]
    fresh_weight: Option<f32>,
    /// Hold fresh items to this share of the top-10 slots (of the lists
    /// they can enter) by moving their weight from `--fresh-weight` after
    /// every list, as `feed.fresh_share` does in the service; unset: the
    /// weight as given.
    #[arg(long)]
    fresh_share: Option<f32>,
    /// How `--content` becomes vectors: TF-IDF of its words and attribute
    /// ids (hashed to 1,024 dims), or what `tokenizer train --encoder auto`
    /// picks (an embedding column, the sentence encoder, hashed attributes);
    /// `sid` reads no file and takes the tokenizer's reconstruction of each
    /// item's SID.
    #[arg(long, value_enum, default_value = "tfidf")]
    content_encoder: ContentEncoder,
    /// History items the content query reads, newest first, each older one
    /// at half the weight (1 = the last item alone).
    #[arg(long, default_value_t = fresh::DEFAULT_QUERY_ITEMS)]
    fresh_history: usize,
    /// Normalise the content softmax over the whole catalogue (known items
    /// estimated from an even sample of this many) instead of over the
    /// fresh items alone; 0 = fresh items alone.
    #[arg(long, default_value_t = 0)]
    fresh_normaliser: usize,
    /// At most this many fresh items in one top 10 (TIGER's ε); 0 = no cap.
    #[arg(long, default_value_t = fresh::DEFAULT_SLOTS)]
    fresh_slots: usize,
    /// The first this many positions of a list are the model's: a fresh
    /// item goes no higher than the next one, and at most to the last
    /// (0 = where its score puts it). The default keeps the Sports
    /// standard split within 2% of its NDCG@10 (README, "Cold start").
    #[arg(long, default_value_t = fresh::DEFAULT_AFTER)]
    fresh_after: usize,
    /// How many fresh items get half of `--fresh-weight`: n of them get
    /// w · n / (n + this), so a handful does not take the whole weight
    /// (0 = the weight as given).
    #[arg(long, default_value_t = fresh::DEFAULT_HALF_AT)]
    fresh_half_at: usize,
    /// Temperature of the content softmax; default: fitted on training
    /// transitions.
    #[arg(long)]
    fresh_temperature: Option<f32>,
    /// Also score the content nearest-neighbour baseline (needs `--content`):
    /// every item ranked by its content's cosine to the last item's.
    #[arg(long)]
    baseline: bool,
    /// Score fresh items by cosine alone even where the model has a fitted
    /// affinity (`fit-affinity`) for this content space.
    #[arg(long)]
    no_affinity: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ContentEncoder {
    Tfidf,
    Auto,
    /// The tokenizer's reconstruction of each item's content codes: what
    /// the service has of every item without storing its content.
    Sid,
}

/// Unit content vectors of every item from the tokenizer's reconstruction
/// of its SID's content codes.
fn sid_content(loaded: &Loaded) -> anyhow::Result<ContentTable> {
    let mut row = Vec::new();
    let mut rows = Vec::new();
    for sid in &loaded.sids {
        let codes = &sid.codes()[..sid.levels() - 1];
        if !loaded.tokenizer.reconstruct(codes, &mut row) {
            bail!("--content-encoder sid needs a residual tokenizer (RQ-KMeans, RQ-VAE), not SVD");
        }
        rows.extend_from_slice(&row);
    }
    Ok(ContentTable::new(row.len(), rows))
}

/// The TF-IDF rows' width: hashing collisions cost little at 1,024 on
/// catalogues of tens of thousands of items, and the affinity's projections
/// are `[width × rank]`.
pub(super) const TFIDF_DIM: usize = 1024;

/// Unit content vectors for `items` (missing rows are zeros) from the
/// catalogue at `path`.
fn content_table(
    path: &Path,
    items: &[String],
    encoder: ContentEncoder,
) -> anyhow::Result<ContentTable> {
    use genfeed::embed::catalogue::EncoderKind;
    let catalogue = super::tokenizer::load_items(path)?;
    let vectors = match encoder {
        ContentEncoder::Tfidf => {
            genfeed::embed::Vectors::new(TFIDF_DIM, tfidf::tfidf(&catalogue, TFIDF_DIM))
        }
        ContentEncoder::Sid => bail!(
            "SID content comes from the tokenizer, not {}",
            path.display()
        ),
        ContentEncoder::Auto => {
            let args = super::tokenizer::ContentEncoderArgs {
                encoder: EncoderKind::Auto,
                fields: Vec::new(),
                text_model: None,
                attribute_dim: 256,
            };
            let (spec, text) = args.resolve(&catalogue, 42)?;
            eprintln!("content: {}", serde_json::to_string(&spec)?);
            super::tokenizer::embed(&catalogue, &spec, text.as_ref())?
        }
    };
    let row: std::collections::HashMap<&str, usize> = catalogue
        .rows
        .iter()
        .enumerate()
        .map(|(i, r)| (r.id.as_str(), i))
        .collect();
    let dim = vectors.dim();
    let mut rows = vec![0.0f32; items.len() * dim];
    for (id, out) in items.iter().zip(rows.chunks_exact_mut(dim)) {
        if let Some(&i) = row.get(id.as_str()) {
            out.copy_from_slice(vectors.row(i));
        }
    }
    Ok(ContentTable::new(dim, rows))
}

/// What `eval --json` prints.
#[derive(serde::Serialize)]
struct EvalReport<'a> {
    #[serde(flatten)]
    model: &'a genfeed::eval::Report,
    /// Users whose target never occurs in training, and the others.
    cold: &'a Quality,
    warm: &'a Quality,
    fresh_share10: f64,
    /// The fresh-item mixture's weight and temperature (absent when off).
    fresh: Option<FreshReport>,
    content_baseline: Option<Breakdown>,
}

#[derive(serde::Serialize)]
struct FreshReport {
    items: usize,
    /// The share of `--fresh-weight` these items get (`--fresh-half-at`).
    weight: f32,
    weight_given: f32,
    /// `--fresh-share`, and the weight it had moved to at the end.
    share_target: Option<f32>,
    weight_at_end: f32,
    temperature: f32,
    /// Whether a fitted affinity ([`Affinity`]) scored them beside cosine.
    affinity: bool,
}

fn print_quality(what: &str, q: &Quality) {
    println!(
        "{what:<16} {:>6} users  Recall@5 {:.4}  NDCG@5 {:.4}  Recall@10 {:.4}  NDCG@10 {:.4}",
        q.users, q.recall5, q.ndcg5, q.recall10, q.ndcg10
    );
}

pub fn run_eval(a: EvalArgs) -> anyhow::Result<()> {
    if let Some(w) = a.transition_weight.filter(|w| !(0.0..1.0).contains(w)) {
        bail!("--transition-weight {w} is not in [0, 1)");
    }
    set_threads(a.threads);
    let device = device(a.device)?;
    let loaded = load(&a.data, &a.tokenizer, a.items.as_deref())?;
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
    let trained = split.trained_items(loaded.items.len());
    let content = content_of(&loaded, a.content.as_deref(), a.content_encoder)?;
    let affinity = match Affinity::load(&a.model)? {
        Some(f) if !a.no_affinity && content.is_some() => {
            let space = content_space(a.content_encoder);
            if f.content() != space {
                bail!(
                    "{} was fitted on {} content, this evaluation scores {space} \
                     (--content-encoder {}, or --no-affinity)",
                    a.model.join(AFFINITY_FILE).display(),
                    f.content(),
                    f.content()
                );
            }
            Some(std::sync::Arc::new(f))
        }
        _ => None,
    };
    if content.is_none() && a.baseline {
        bail!("--baseline scores content: pass --content FILE");
    }
    if let Some(s) = a.fresh_share {
        if content.is_none() {
            bail!("--fresh-share holds fresh items scored by content: pass --content FILE");
        }
        if !(s > 0.0 && s < 1.0) {
            bail!("--fresh-share {s} is not in (0, 1)");
        }
    }
    let fresh = match &content {
        Some(content) => {
            let unseen: Vec<(Sid, u32)> = (0..loaded.items.len() as u32)
                .filter(|&i| !trained[i as usize])
                .map(|i| (loaded.sids[i as usize], i))
                .collect();
            let weight = a.fresh_weight.unwrap_or(if affinity.is_some() {
                fresh::DEFAULT_AFFINITY_WEIGHT
            } else {
                fresh::DEFAULT_WEIGHT
            });
            if !(0.0..1.0).contains(&weight) {
                bail!("--fresh-weight {weight} is not in [0, 1)");
            }
            let temperature = match a.fresh_temperature {
                Some(t) => t,
                None => fit_fresh_temperature(&split, content, &trained),
            };
            Some((
                {
                    let known: Vec<u32> = (0..loaded.items.len() as u32)
                        .filter(|&i| trained[i as usize])
                        .collect();
                    let fresh = FreshItems::new(content.clone(), unseen, temperature)
                        .with_query_items(a.fresh_history)
                        .with_after(a.fresh_after)
                        .with_half_weight_at(a.fresh_half_at)
                        .with_slots(if a.fresh_slots == 0 {
                            usize::MAX
                        } else {
                            a.fresh_slots
                        });
                    let mut fresh = if a.fresh_normaliser > 0 {
                        let step = known.len().div_ceil(a.fresh_normaliser).max(1);
                        let sample = known.iter().copied().step_by(step).collect();
                        fresh.with_known_sample(sample, known.len())
                    } else {
                        fresh
                    };
                    if let Some(f) = &affinity {
                        fresh.set_affinity(f.clone()).map_err(anyhow::Error::msg)?;
                    }
                    std::sync::Arc::new(fresh)
                },
                weight,
                temperature,
            ))
        }
        None => None,
    };
    let pb = super::bar(examples.len() as u64, "eval");
    let transitions = Transitions::load_weighted(
        &a.model,
        a.transition_weight.unwrap_or(cfg.transition_weight),
    )?;
    let mut generator = Generator::new(&model).with_device_decoding(a.decoding.on_device(&device));
    if let Some((t, w)) = &transitions {
        generator = generator.with_transitions(t, *w);
    }
    if let Some((f, w, _)) = &fresh {
        generator = generator
            .with_fresh(f.clone(), *w)
            .with_fresh_share(a.fresh_share);
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
    let by_target = Breakdown::new(&examples, &report.ranks, &report.appearances, &trained);
    let baseline = match (&content, a.baseline) {
        (Some(content), true) => {
            let pb = super::bar(examples.len() as u64, "content");
            let (ranks, appearances) =
                content_neighbours(content, &examples, a.exclude_history, &pb)?;
            pb.finish_and_clear();
            Some(Breakdown::new(&examples, &ranks, &appearances, &trained))
        }
        _ => None,
    };
    if let Some(path) = &a.ranks {
        write_ranks(path, &examples, &loaded.items, &report)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let fresh_report = fresh.as_ref().map(|(f, weight, temperature)| FreshReport {
        items: f.len(),
        weight: f.weight(*weight),
        weight_given: *weight,
        share_target: a.fresh_share,
        weight_at_end: generator.fresh_weight().unwrap_or(0.0),
        temperature: *temperature,
        affinity: affinity.is_some(),
    });
    if a.json {
        let out = EvalReport {
            model: &report,
            cold: &by_target.cold,
            warm: &by_target.warm,
            fresh_share10: by_target.fresh_share10,
            fresh: fresh_report,
            content_baseline: baseline,
        };
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        print_quality("all", &by_target.all);
        print_quality("cold targets", &by_target.cold);
        print_quality("warm targets", &by_target.warm);
        println!(
            "invalid IDs {:.4}  coverage@10 {:.4}  unseen items' share of top-10 slots {:.4}  \
             {:.1} recs/s  {:.2} ms/request (batch {}, beam {})",
            report.invalid_rate,
            report.coverage10,
            by_target.fresh_share10,
            report.recs_per_sec,
            report.ms_per_request,
            report.batch,
            report.beams
        );
        if let Some(f) = &fresh_report {
            println!(
                "fresh items: {} scored by content, weight {:.4} (of {}; {:.4} at the end{}), \
                 temperature {}{}",
                f.items,
                f.weight,
                f.weight_given,
                f.weight_at_end,
                f.share_target
                    .map(|s| format!(", held to {s} of the slots"))
                    .unwrap_or_default(),
                f.temperature,
                if f.affinity {
                    ", with the fitted affinity"
                } else {
                    ""
                }
            );
        }
        if let Some(b) = &baseline {
            print_quality("content NN all", &b.all);
            print_quality("content NN cold", &b.cold);
            print_quality("content NN warm", &b.warm);
        }
    }
    Ok(())
}

/// The content softmax's temperature, fitted on up to 2,000 training
/// transitions (evenly spaced) with the trained items as candidates.
fn fit_fresh_temperature(split: &Split<'_>, content: &ContentTable, trained: &[bool]) -> f32 {
    let train = split.train();
    let step = (train.len() / 2000).max(1);
    let pairs: Vec<(u32, u32)> = train
        .iter()
        .step_by(step)
        .filter_map(|e| e.history.last().map(|&l| (l, e.target)))
        .collect();
    let candidates: Vec<u32> = (0..trained.len() as u32)
        .filter(|&i| trained[i as usize])
        .collect();
    let (t, curve) = fit_temperature(content, &pairs, &candidates);
    eprintln!(
        "content temperature {t} fitted on {} training transitions (mean NLL by temperature: {})",
        pairs.len(),
        curve
            .iter()
            .map(|(t, n)| format!("{t}: {n:.3}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    t
}

fn write_ranks(
    path: &Path,
    examples: &[Example<'_>],
    items: &[String],
    report: &genfeed::eval::Report,
) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    writeln!(out, "user\ttarget\trank\ttop10\tlog_probs")?;
    for ((e, rank), list) in examples.iter().zip(&report.ranks).zip(&report.lists) {
        let rank = rank.map(|r| r.to_string()).unwrap_or_default();
        write!(out, "{}\t{}\t{rank}\t", e.user, items[e.target as usize])?;
        for (i, (ord, _)) in list.iter().enumerate() {
            let sep = if i == 0 { "" } else { "," };
            write!(out, "{sep}{}", items[*ord as usize])?;
        }
        write!(out, "\t")?;
        for (i, (_, lp)) in list.iter().enumerate() {
            let sep = if i == 0 { "" } else { "," };
            write!(out, "{sep}{lp:.5}")?;
        }
        writeln!(out)?;
    }
    out.flush()
}
