use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};

use genfeed::dataset::{load_sequences, read_items, Items, Sequences};
use genfeed::embed::catalogue::{choose, encode_items, EncoderKind};
use genfeed::embed::ridge::LinearMap;
use genfeed::embed::text::TextEncoder;
use genfeed::embed::{EncoderSpec, Vectors};
use genfeed::sid::Code;
use genfeed::tokenizer::report::category_agreement;
use genfeed::tokenizer::train::{train, ContentMap, Provenance, TrainData, TrainOptions};
use genfeed::tokenizer::{FrozenTokenizer, Method, TokenizeError};

#[derive(Subcommand)]
pub enum TokenizerCommand {
    /// Learn the codebooks from a catalogue and write a tokenizer directory.
    Train(TrainArgs),
    /// Give every item of a catalogue its semantic ID (TSV: item_id, sid).
    Assign(AssignArgs),
    /// Measure whether first-level codes mean something: how much more often
    /// two items sharing a first-level code share a category than random pairs.
    Check(CheckArgs),
    /// Write a copy of a catalogue with a collaborative `embedding` column:
    /// each item's direction in a truncated SVD of the training interactions.
    /// `tokenizer train --encoder precomputed` then clusters items by who
    /// interacts with them rather than by their content.
    EmbedInteractions(EmbedInteractionsArgs),
    /// Write a copy of a catalogue with its content vectors as an
    /// `embedding` column, so that later runs (eval's `--content`, a
    /// precomputed tokenizer) read them instead of running the sentence
    /// encoder again.
    Embed(EmbedArgs),
}

/// How a catalogue's content becomes vectors.
#[derive(Args)]
pub struct ContentEncoderArgs {
    /// How content becomes a vector.
    #[arg(long, value_enum, default_value = "auto")]
    pub encoder: EncoderKind,
    /// Columns to encode (comma separated); default: every content column of
    /// the encoder's type.
    #[arg(long, value_delimiter = ',')]
    pub fields: Vec<String>,
    /// Sentence-encoder directory [default: $GENFEED_TEXT_MODEL or models/all-minilm-l6-v2].
    #[arg(long)]
    pub text_model: Option<PathBuf>,
    /// Width of the hashed attribute encoding.
    #[arg(long, default_value_t = 256)]
    pub attribute_dim: usize,
}

#[derive(Args)]
pub struct EmbedArgs {
    /// The catalogue: a RecBole `.item` file without an `embedding` column.
    #[arg(long)]
    items: PathBuf,
    #[command(flatten)]
    content: ContentEncoderArgs,
    /// The new `.item` file.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
pub struct EmbedInteractionsArgs {
    /// The catalogue: a RecBole `.item` file.
    #[arg(long)]
    items: PathBuf,
    /// The interactions (`.inter`).
    #[arg(long)]
    inter: PathBuf,
    /// Items held out at the end of every user's sequence and not used: 2
    /// keeps the validation and test targets of the leave-one-out protocol
    /// out of the embedding.
    #[arg(long, default_value_t = 2)]
    holdout: usize,
    #[arg(long, default_value_t = 64)]
    dims: usize,
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// How an item without training interactions gets its vector: the
    /// collaborative vector its content predicts, by a ridge map fitted on
    /// the items that have both (`none`: zeros, one heap for all of them).
    #[arg(long, value_enum, default_value = "auto")]
    content: ContentArg,
    /// Content columns the map reads (comma separated); default: every
    /// column of the encoder's type.
    #[arg(long, value_delimiter = ',')]
    content_fields: Vec<String>,
    /// Sentence-encoder directory [default: $GENFEED_TEXT_MODEL or models/all-minilm-l6-v2].
    #[arg(long)]
    text_model: Option<PathBuf>,
    /// Width of the hashed attribute encoding.
    #[arg(long, default_value_t = 256)]
    attribute_dim: usize,
    /// Also write the content map here (JSON), for `tokenizer train
    /// --content-map`: the tokenizer then gives a new item, which arrives
    /// with content only, the collaborative vector its content predicts.
    #[arg(long)]
    map: Option<PathBuf>,
    /// The new `.item` file.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ContentArg {
    /// Text if the catalogue has a title, name or description; attributes otherwise.
    Auto,
    Text,
    Attributes,
    None,
}

#[derive(Args)]
pub struct TrainArgs {
    /// The catalogue: a RecBole `.item` file.
    #[arg(long)]
    items: PathBuf,
    /// Interactions (`.inter`); required by `svd`.
    #[arg(long)]
    inter: Option<PathBuf>,
    #[arg(long, value_enum)]
    method: Method,
    /// Output directory (created; files in it are replaced).
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    content: ContentEncoderArgs,
    /// Content levels (the SID has one more, the collision level).
    #[arg(long, default_value_t = 3)]
    levels: usize,
    #[arg(long, default_value_t = 256)]
    codebook_size: usize,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// k-means iterations per level (rq-kmeans).
    #[arg(long, default_value_t = 100)]
    kmeans_iters: usize,
    /// Training epochs (rq-vae).
    #[arg(long, default_value_t = 150)]
    epochs: usize,
    /// Batch size (rq-vae).
    #[arg(long, default_value_t = 1024)]
    batch_size: usize,
    /// Learning rate (rq-vae, AdamW).
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// Codes available at the last level [default: room for twice the largest
    /// collision group, at least 256].
    #[arg(long)]
    last_level_capacity: Option<usize>,
    /// Item ids left out of training, one a line (a cold split's
    /// `cold_items.txt`): the frozen tokenizer then assigns them from their
    /// content, as it does any item a catalogue event brings.
    #[arg(long)]
    exclude: Option<PathBuf>,
    /// A content map from `embed-interactions --map`, for a tokenizer of
    /// collaborative vectors (`--encoder precomputed`): stored in the
    /// tokenizer, it gives an item without a collaborative vector (a new
    /// item, content only) the one its content predicts, here and in the
    /// service; the report checks it on the map's held-out items.
    #[arg(long)]
    content_map: Option<PathBuf>,
}

#[derive(Args)]
pub struct AssignArgs {
    #[arg(long)]
    tokenizer: PathBuf,
    #[arg(long)]
    items: PathBuf,
    /// Interactions, to place unseen items with an SVD tokenizer.
    #[arg(long)]
    inter: Option<PathBuf>,
    #[arg(long)]
    text_model: Option<PathBuf>,
    /// Write here instead of standard output.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Args)]
pub struct CheckArgs {
    #[arg(long)]
    tokenizer: PathBuf,
    /// The catalogue the tokenizer was trained on.
    #[arg(long)]
    items: PathBuf,
    /// The column holding categories.
    #[arg(long, default_value = "categories")]
    field: String,
    /// What separates categories in that column; default: whitespace.
    #[arg(long)]
    separator: Option<String>,
    #[arg(long, default_value_t = 100_000)]
    pairs: usize,
}

pub fn run(c: TokenizerCommand) -> anyhow::Result<()> {
    match c {
        TokenizerCommand::Train(a) => run_train(a),
        TokenizerCommand::Assign(a) => run_assign(a),
        TokenizerCommand::Check(a) => run_check(a),
        TokenizerCommand::EmbedInteractions(a) => run_embed_interactions(a),
        TokenizerCommand::Embed(a) => run_embed(a),
    }
}

pub(super) fn load_items(path: &Path) -> anyhow::Result<Items> {
    read_items(path).with_context(|| format!("reading the catalogue {}", path.display()))
}

/// A set of item ids, one a line (blank lines skipped).
pub(super) fn read_ids(path: &Path) -> anyhow::Result<std::collections::HashSet<String>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect())
}

pub(super) fn load_text(flag: Option<PathBuf>) -> anyhow::Result<TextEncoder> {
    let dir = super::text_model_dir(flag);
    TextEncoder::load(&dir, &candle_core::Device::Cpu)
        .with_context(|| format!("loading the sentence encoder from {}", dir.display()))
}

/// Vectors for `items` as `spec` says, with a progress bar and a rate line.
pub(super) fn embed(
    items: &Items,
    spec: &EncoderSpec,
    text: Option<&TextEncoder>,
) -> anyhow::Result<Vectors> {
    let start = Instant::now();
    let pb = super::bar(items.rows.len() as u64, "embed");
    let vectors = encode_items(items, spec, text, &pb)?;
    pb.finish_and_clear();
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "embedded {} items ({} dims) in {secs:.1} s: {:.0} items/s",
        vectors.rows(),
        vectors.dim(),
        vectors.rows() as f64 / secs.max(1e-9)
    );
    Ok(vectors)
}

/// The vectors `tokenizer` quantises for `items`, encoded as its manifest
/// says. A collaborative tokenizer given a catalogue without its
/// collaborative column (new items, content only) predicts them from the
/// content, as the service does for a catalogue event.
pub(super) fn tokenizer_vectors(
    tokenizer: &FrozenTokenizer,
    items: &Items,
    text_model: Option<PathBuf>,
) -> anyhow::Result<Vectors> {
    let mut spec = &tokenizer.manifest().input.encoder;
    let predict = match spec {
        EncoderSpec::Collaborative { field, content, .. } if items.column(field).is_none() => {
            eprintln!("no column {field:?}: predicting collaborative vectors from content");
            spec = content;
            true
        }
        _ => false,
    };
    let text = matches!(spec, EncoderSpec::Text { .. })
        .then(|| load_text(text_model))
        .transpose()?;
    let vectors = embed(items, spec, text.as_ref())?;
    if !predict {
        return Ok(vectors);
    }
    let mut data = Vec::with_capacity(items.rows.len() * tokenizer.input_dim());
    for (i, row) in items.rows.iter().enumerate() {
        data.extend(tokenizer.predict_collaborative(&row.id, vectors.row(i))?);
    }
    Ok(Vectors::new(tokenizer.input_dim(), data))
}

impl ContentEncoderArgs {
    /// The encoder these arguments resolve to on `items`, with the sentence
    /// encoder loaded when it is a text one.
    pub(super) fn resolve(
        &self,
        items: &Items,
        seed: u64,
    ) -> anyhow::Result<(EncoderSpec, Option<TextEncoder>)> {
        let (kind, fields) = choose(items, self.encoder, &self.fields)?;
        let text = if kind == EncoderKind::Text {
            Some(load_text(self.text_model.clone())?)
        } else {
            None
        };
        let attribute_dim = self.attribute_dim;
        let spec = match kind {
            EncoderKind::Text => {
                let t = text.as_ref().expect("loaded above");
                EncoderSpec::Text {
                    model: t.model_id().to_string(),
                    fields,
                    dim: t.dim(),
                }
            }
            EncoderKind::Attributes => EncoderSpec::Attributes {
                fields,
                dim: attribute_dim,
                seed,
            },
            _ => {
                let col = items.column(&fields[0]).expect("choose checked the column");
                let dim = items.rows.first().map_or(0, |r| match &r.values[col] {
                    genfeed::dataset::Value::FloatSeq(v) => v.len(),
                    _ => 0,
                });
                anyhow::ensure!(
                    dim > 0,
                    "column {:?} holds no embedding in its first row",
                    fields[0]
                );
                EncoderSpec::Precomputed {
                    field: fields[0].clone(),
                    dim,
                }
            }
        };
        Ok((spec, text))
    }
}

fn run_train(a: TrainArgs) -> anyhow::Result<()> {
    let mut items = load_items(&a.items)?;
    if let Some(path) = &a.exclude {
        let excluded = read_ids(path)?;
        let before = items.rows.len();
        items.rows.retain(|r| !excluded.contains(r.id.as_str()));
        eprintln!(
            "left out {} of {before} items listed in {}",
            before - items.rows.len(),
            path.display()
        );
    }
    let ids: Vec<String> = items.rows.iter().map(|r| r.id.clone()).collect();
    let mut opts = TrainOptions::new(a.method);
    opts.levels = a.levels;
    opts.codebook_size = a.codebook_size;
    opts.seed = a.seed;
    opts.kmeans_iters = a.kmeans_iters;
    opts.rq_vae.epochs = a.epochs;
    opts.rq_vae.batch_size = a.batch_size;
    opts.rq_vae.lr = a.lr;
    opts.last_level_capacity = a.last_level_capacity;
    let pb = super::bar(0, a.method.name());
    let provenance = Provenance {
        items_file: &a.items,
        interactions_file: a.inter.as_deref(),
    };
    let tokenizer = if a.method == Method::Svd {
        let Some(inter) = &a.inter else {
            bail!("--method svd learns from interactions: pass --inter FILE");
        };
        let seqs = load_sequences(inter, Some(&items))
            .with_context(|| format!("reading {}", inter.display()))?;
        let data = TrainData::Interactions {
            rows: &seqs.seqs,
            users: &seqs.users,
        };
        train(&ids, data, &opts, provenance, &a.out, &pb)?
    } else {
        let (spec, text) = a.content.resolve(&items, a.seed)?;
        let vectors = embed(&items, &spec, text.as_ref())?;
        let file = a.content_map.as_deref().map(read_content_map).transpose()?;
        let (encoder, content_map) = match (spec, &file) {
            (EncoderSpec::Precomputed { field, dim }, Some(file)) => {
                let held_out = held_out_content(&items, file, a.content.text_model.clone())?;
                let encoder = EncoderSpec::Collaborative {
                    field,
                    dim,
                    content: Box::new(file.encoder.clone()),
                };
                (encoder, Some(ContentMap { map: &file.map, held_out }))
            }
            (_, Some(_)) => bail!(
                "--content-map goes with a catalogue of collaborative vectors (--encoder precomputed)"
            ),
            (spec, None) => (spec, None),
        };
        eprintln!("encoder: {}", serde_json::to_string(&encoder)?);
        let data = TrainData::Content {
            vectors: &vectors,
            encoder,
            content_map,
        };
        train(&ids, data, &opts, provenance, &a.out, &pb)?
    };
    pb.finish_and_clear();
    println!(
        "tokenizer {} written to {}",
        tokenizer.version(),
        a.out.display()
    );
    println!("{}", tokenizer.manifest().metrics);
    Ok(())
}

fn read_content_map(path: &Path) -> anyhow::Result<ContentMapFile> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let file: ContentMapFile = serde_json::from_slice(&bytes).with_context(|| {
        format!(
            "{}: not a content map from `tokenizer embed-interactions --map`",
            path.display()
        )
    })?;
    let m = &file.map;
    let parts = (m.weight().to_vec(), m.bias().to_vec(), m.centre().to_vec());
    let whole = LinearMap::from_parts(
        m.inputs(),
        m.outputs(),
        parts.0,
        parts.1,
        parts.2,
        m.spread(),
    );
    anyhow::ensure!(
        whole.is_some() && m.inputs() == file.encoder.dim(),
        "{}: the content map's sizes do not agree (inputs {}, outputs {}, {} weights, encoder of {} dimensions)",
        path.display(),
        m.inputs(),
        m.outputs(),
        m.weight().len(),
        file.encoder.dim()
    );
    Ok(file)
}

/// The content vectors of the map's held-out items among `items`, with
/// their rows.
fn held_out_content(
    items: &Items,
    file: &ContentMapFile,
    text_model: Option<PathBuf>,
) -> anyhow::Result<Vec<(usize, Vec<f32>)>> {
    let held: std::collections::HashSet<&str> = file.held_out.iter().map(String::as_str).collect();
    let rows: Vec<usize> = (0..items.rows.len())
        .filter(|&i| held.contains(items.rows[i].id.as_str()))
        .collect();
    let subset = Items {
        columns: items.columns.clone(),
        rows: rows.iter().map(|&i| items.rows[i].clone()).collect(),
    };
    let text = matches!(file.encoder, EncoderSpec::Text { .. })
        .then(|| load_text(text_model))
        .transpose()?;
    let vectors = embed(&subset, &file.encoder, text.as_ref())?;
    Ok(rows
        .into_iter()
        .enumerate()
        .map(|(j, i)| (i, vectors.row(j).to_vec()))
        .collect())
}

fn run_assign(a: AssignArgs) -> anyhow::Result<()> {
    let tokenizer = FrozenTokenizer::load(&a.tokenizer)?;
    let items = load_items(&a.items)?;
    let spec = tokenizer.manifest().input.encoder.clone();
    let mut assigner = tokenizer.assigner();
    let mut out = String::with_capacity(items.rows.len() * 24);
    let mut push = |id: &str, sid: genfeed::sid::Sid| {
        out.push_str(id);
        out.push('\t');
        out.push_str(&sid.to_string());
        out.push('\n');
    };
    if let EncoderSpec::Interactions { .. } = spec {
        let seqs = a
            .inter
            .as_ref()
            .map(|p| load_sequences(p, None))
            .transpose()?;
        let users_of = seqs.as_ref().map(users_by_item).unwrap_or_default();
        for row in &items.rows {
            if let Some(sid) = assigner.get(&row.id) {
                push(&row.id, sid);
                continue;
            }
            let users = users_of
                .get(row.id.as_str())
                .map(Vec::as_slice)
                .unwrap_or(&[]);
            let vector = tokenizer.fold_in(users.iter().copied()).ok_or_else(|| {
                TokenizeError::NoKnownUsers {
                    item: row.id.clone(),
                }
            })?;
            push(&row.id, assigner.assign(&row.id, &vector)?);
        }
    } else {
        let vectors = tokenizer_vectors(&tokenizer, &items, a.text_model)?;
        for (i, row) in items.rows.iter().enumerate() {
            push(&row.id, assigner.assign(&row.id, vectors.row(i))?);
        }
    }
    match &a.out {
        Some(path) => {
            std::fs::write(path, out).with_context(|| format!("writing {}", path.display()))?
        }
        None => std::io::stdout().lock().write_all(out.as_bytes())?,
    }
    Ok(())
}

fn users_by_item(seqs: &Sequences) -> HashMap<&str, Vec<&str>> {
    let mut map: HashMap<&str, Vec<&str>> = HashMap::new();
    for (u, seq) in seqs.seqs.iter().enumerate() {
        for &i in seq {
            map.entry(seqs.items[i as usize].as_str())
                .or_default()
                .push(seqs.users[u].as_str());
        }
    }
    map
}

fn run_check(a: CheckArgs) -> anyhow::Result<()> {
    let tokenizer = FrozenTokenizer::load(&a.tokenizer)?;
    let items = load_items(&a.items)?;
    let col = items
        .column(&a.field)
        .with_context(|| format!("{} has no column {:?}", a.items.display(), a.field))?;
    let sids: HashMap<&str, Code> = tokenizer
        .training_items()
        .iter()
        .map(|(id, sid)| (id.as_str(), sid.codes()[0]))
        .collect();
    let mut first = Vec::new();
    let mut cats = Vec::new();
    for row in &items.rows {
        let Some(&code) = sids.get(row.id.as_str()) else {
            bail!(
                "item {:?} is not among the tokenizer's training items",
                row.id
            );
        };
        let raw = row.values[col].as_str().unwrap_or("");
        let set: Vec<String> = match &a.separator {
            Some(sep) => raw
                .split(sep.as_str())
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect(),
            None => raw.split_whitespace().map(str::to_string).collect(),
        };
        first.push(code);
        cats.push(set);
    }
    let agreement = category_agreement(&first, &cats, a.pairs, 1);
    println!("{}", serde_json::to_string_pretty(&agreement)?);
    Ok(())
}

fn run_embed(a: EmbedArgs) -> anyhow::Result<()> {
    let items = load_items(&a.items)?;
    anyhow::ensure!(
        items.column("embedding").is_none(),
        "{}: already has an embedding column",
        a.items.display()
    );
    let (spec, text) = a.content.resolve(&items, 42)?;
    eprintln!("encoder: {}", serde_json::to_string(&spec)?);
    let vectors = embed(&items, &spec, text.as_ref())?;
    let row: HashMap<&str, usize> = items
        .rows
        .iter()
        .enumerate()
        .map(|(i, r)| (r.id.as_str(), i))
        .collect();
    write_with_embedding(&a.items, &a.out, vectors.dim(), |id| {
        row.get(id).map(|&i| vectors.row(i))
    })?;
    Ok(())
}

fn run_embed_interactions(a: EmbedInteractionsArgs) -> anyhow::Result<()> {
    use genfeed::tokenizer::svd::{factorize, SvdConfig};
    use genfeed::train::data::training_prefix;

    let items = load_items(&a.items)?;
    anyhow::ensure!(
        items.column("embedding").is_none(),
        "{}: already has an embedding column",
        a.items.display()
    );
    let seqs = load_sequences(&a.inter, Some(&items))
        .with_context(|| format!("reading {}", a.inter.display()))?;
    let rows: Vec<Vec<u32>> = seqs
        .seqs
        .iter()
        .map(|s| training_prefix(s, a.holdout).to_vec())
        .collect();
    let n = seqs.items.len();
    let f = factorize(
        &rows,
        n,
        &SvdConfig {
            dims: a.dims,
            oversample: 16,
            power_iters: 6,
            seed: a.seed,
        },
    );
    // Scale each dimension by its singular value, then keep only the
    // direction: popularity sits in the length and would otherwise decide
    // the first-level clusters.
    let k = a.dims;
    let mut vectors: HashMap<&str, Vec<f32>> = HashMap::with_capacity(n);
    for (i, id) in seqs.items.iter().enumerate() {
        let mut v: Vec<f32> = (0..k)
            .map(|d| f.item_factors[i * k + d] * f.singular_values[d] as f32)
            .collect();
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        if norm > 0.0 {
            v.iter_mut().for_each(|x| *x /= norm);
        }
        vectors.insert(id.as_str(), v);
    }
    anyhow::ensure!(
        a.map.is_none() || a.content != ContentArg::None,
        "--map needs a content map: drop --content none"
    );
    let predicted = match a.content {
        ContentArg::None => 0,
        kind => {
            let kind = match kind {
                ContentArg::Text => EncoderKind::Text,
                ContentArg::Attributes => EncoderKind::Attributes,
                _ => EncoderKind::Auto,
            };
            let args = ContentEncoderArgs {
                encoder: kind,
                fields: a.content_fields.clone(),
                text_model: a.text_model.clone(),
                attribute_dim: a.attribute_dim,
            };
            let (spec, text) = args.resolve(&items, a.seed)?;
            let content = embed(&items, &spec, text.as_ref())?;
            let mut cf = vec![0.0f32; n * k];
            for (i, id) in seqs.items.iter().enumerate() {
                cf[i * k..(i + 1) * k].copy_from_slice(&vectors[id.as_str()]);
            }
            let fitted = fit_content_map(&content, &cf, k, a.seed)?;
            let cold: Vec<usize> = (0..n)
                .filter(|&i| cf[i * k..(i + 1) * k].iter().all(|&x| x == 0.0))
                .collect();
            for &i in &cold {
                vectors.insert(seqs.items[i].as_str(), fitted.map.direction(content.row(i)));
            }
            if let Some(path) = &a.map {
                let file = ContentMapFile {
                    encoder: spec,
                    ridge: fitted.ridge,
                    held_out_cosine: fitted.cosine,
                    held_out: fitted
                        .held_out
                        .iter()
                        .map(|&i| seqs.items[i].clone())
                        .collect(),
                    map: fitted.map,
                };
                std::fs::write(path, serde_json::to_vec(&file)?)
                    .with_context(|| format!("writing {}", path.display()))?;
                eprintln!("content map written to {}", path.display());
            }
            cold.len()
        }
    };
    let missing =
        write_with_embedding(&a.items, &a.out, k, |id| vectors.get(id).map(Vec::as_slice))?;
    eprintln!(
        "{} items, {k} dims, {:.1}% of the matrix's energy; {predicted} items without training interactions \
         placed by their content; {missing} got zeros",
        n,
        100.0 * f.explained
    );
    Ok(())
}

/// Copies the catalogue at `from` to `to` with an `embedding:float_seq`
/// column of width `k` (zeros where `vector_of` has none); returns how many
/// rows got zeros.
fn write_with_embedding<'v>(
    from: &Path,
    to: &Path,
    k: usize,
    vector_of: impl Fn(&str) -> Option<&'v [f32]>,
) -> anyhow::Result<usize> {
    let text =
        std::fs::read_to_string(from).with_context(|| format!("reading {}", from.display()))?;
    let mut out = String::with_capacity(text.len() * 2);
    let zero = vec![0.0f32; k];
    let mut missing = 0;
    for (i, line) in text.lines().enumerate() {
        out.push_str(line);
        if i == 0 {
            out.push_str("\tembedding:float_seq\n");
            continue;
        }
        let id = line.split('\t').next().unwrap_or_default();
        let v = vector_of(id).unwrap_or_else(|| {
            missing += 1;
            &zero
        });
        out.push('\t');
        for (d, x) in v.iter().enumerate() {
            if d > 0 {
                out.push(' ');
            }
            out.push_str(&format!("{x:.6}"));
        }
        out.push('\n');
    }
    std::fs::write(to, out).with_context(|| format!("writing {}", to.display()))?;
    Ok(missing)
}

/// `embed-interactions --map`: the content map `tokenizer train
/// --content-map` stores in a collaborative tokenizer, so that a new item
/// gets its vector from its content wherever the tokenizer goes.
#[derive(serde::Serialize, serde::Deserialize)]
struct ContentMapFile {
    /// How content becomes the map's input.
    encoder: EncoderSpec,
    /// The ridge penalty the held-out items chose.
    ridge: f64,
    /// Mean cosine of the predicted to the real vector on `held_out`.
    held_out_cosine: f64,
    /// Items with interactions the map was not fitted on (one in ten, by seed).
    held_out: Vec<String>,
    map: LinearMap,
}

/// A map fitted from content to collaborative vectors, with what it was
/// checked on.
struct Fitted {
    map: genfeed::embed::ridge::LinearMap,
    ridge: f64,
    cosine: f64,
    held_out: Vec<usize>,
}

/// The ridge map from `content` to the collaborative vectors `cf` (`k`
/// wide; a zero row is an item without training interactions), fitted on
/// nine in ten items with interactions, drawn with `seed` (not every tenth
/// row: catalogues are often ordered by something their content shows);
/// the penalty is the one of a small grid that predicts the tenth best, by
/// mean cosine, which is printed.
fn fit_content_map(content: &Vectors, cf: &[f32], k: usize, seed: u64) -> anyhow::Result<Fitted> {
    use rand::{Rng, SeedableRng};

    let p = content.dim();
    let n = content.rows();
    let has = |i: usize| cf[i * k..(i + 1) * k].iter().any(|&x| x != 0.0);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let (held, fit): (Vec<usize>, Vec<usize>) = (0..n)
        .filter(|&i| has(i))
        .partition(|_| rng.random_bool(0.1));
    let x = content.as_slice();
    let mut best: Option<Fitted> = None;
    for lambda in [1e-3, 1e-2, 1e-1, 1.0, 10.0] {
        let Some(map) = LinearMap::fit(x, p, cf, k, &fit, lambda) else {
            continue;
        };
        let mut cos = 0.0;
        for &i in &held {
            let v = map.direction(content.row(i));
            let dot: f32 = v
                .iter()
                .zip(&cf[i * k..(i + 1) * k])
                .map(|(a, b)| a * b)
                .sum();
            cos += dot as f64 / held.len().max(1) as f64;
        }
        eprintln!(
            "content map, ridge {lambda}: held-out mean cosine {cos:.4} ({} items)",
            held.len()
        );
        if best.as_ref().is_none_or(|b| cos > b.cosine) {
            best = Some(Fitted {
                map,
                ridge: lambda,
                cosine: cos,
                held_out: held.clone(),
            });
        }
    }
    best.context(
        "the content map could not be fitted (no items with both content and interactions?)",
    )
}
