//! Training a tokenizer end to end: vectors in, artifact directory out.
//!
//! The method learns the content levels; then every training item's content
//! codes are recomputed through the frozen path (exactly what a later
//! assignment will compute), the collision level is handed out in item-id
//! order, the report is measured, and the artifact is written and read back.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor};
use indicatif::ProgressBar;

use super::artifact::{self, ArtifactError, Input, Manifest, Method, Training};
use super::collisions::{default_capacity, SidAllocator};
use super::quantize::{host_threads, par_rows, Normaliser, ResidualQuantizer};
use super::report::{collision_stats, level_stats, ContentMapCheck, Report};
use super::rq_kmeans::{self, RqKmeansConfig};
use super::rq_vae::{self, RqVaeConfig};
use super::svd::{self, SvdConfig};
use super::{FrozenTokenizer, Stage};
use crate::embed::ridge::LinearMap;
use crate::embed::{check_vector, EmbedError, EncoderSpec, Vectors};
use crate::sid::{Code, Sid};

/// What the tokenizer learns from.
pub enum TrainData<'a> {
    /// Content vectors, one row per item, and how they were made; with an
    /// [`EncoderSpec::Collaborative`] encoder, the map that gives a new item
    /// its vector from its content.
    Content {
        vectors: &'a Vectors,
        encoder: EncoderSpec,
        content_map: Option<ContentMap<'a>>,
    },
    /// For SVD: per user, the dense indices of the items they touched, and
    /// the user ids in the same order.
    Interactions {
        rows: &'a [Vec<u32>],
        users: &'a [String],
    },
}

/// A collaborative tokenizer's content map (stored in the artifact) and
/// items it was not fitted on, to check it: `(row of the vectors, the
/// item's content vector)`.
pub struct ContentMap<'a> {
    pub map: &'a LinearMap,
    pub held_out: Vec<(usize, Vec<f32>)>,
}

/// Knobs; [`TrainOptions::new`] gives the defaults documented in the CLI.
#[derive(Clone, Debug)]
pub struct TrainOptions {
    pub method: Method,
    pub levels: usize,
    pub codebook_size: usize,
    pub seed: u64,
    pub kmeans_iters: usize,
    pub rq_vae: RqVaeConfig,
    pub svd_power_iters: usize,
    /// Last-level capacity; `None` picks [`default_capacity`].
    pub last_level_capacity: Option<usize>,
}

impl TrainOptions {
    pub fn new(method: Method) -> TrainOptions {
        TrainOptions {
            method,
            levels: 3,
            codebook_size: 256,
            seed: 42,
            kmeans_iters: 100,
            rq_vae: RqVaeConfig::default(),
            svd_power_iters: 8,
            last_level_capacity: None,
        }
    }
}

/// Where the training data came from, for the manifest.
pub struct Provenance<'a> {
    pub items_file: &'a Path,
    pub interactions_file: Option<&'a Path>,
}

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Vector(#[from] EmbedError),
    #[error("{stage}: {source}")]
    Compute {
        stage: &'static str,
        source: candle_core::Error,
    },
    #[error(transparent)]
    Artifact(#[from] ArtifactError),
}

fn compute(stage: &'static str) -> impl FnOnce(candle_core::Error) -> TrainError {
    move |source| TrainError::Compute { stage, source }
}

/// Trains on `items` (ids, in the order of the rows of `data`) and writes the
/// artifact to `out`. Returns the artifact loaded back from disk.
pub fn train(
    items: &[String],
    data: TrainData<'_>,
    opts: &TrainOptions,
    provenance: Provenance<'_>,
    out: &Path,
    progress: &ProgressBar,
) -> Result<FrozenTokenizer, TrainError> {
    let start = Instant::now();
    let device = Device::Cpu;
    let n = items.len();
    if n == 0 {
        return Err(TrainError::Config("no items to train on".into()));
    }
    if opts.levels == 0 || opts.levels > 7 || opts.codebook_size < 2 || opts.codebook_size > 65536 {
        return Err(TrainError::Config(format!(
            "levels must be 1..=7 and codebook size 2..=65536, got {} and {}",
            opts.levels, opts.codebook_size
        )));
    }
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let mut users_out = None;
    let mut params = serde_json::json!({
        "levels": opts.levels,
        "codebook_size": opts.codebook_size,
    });
    let mut reconstruction_mse = None;
    let (encoder, dim, normaliser, stage, vectors) = match (&data, opts.method) {
        (
            TrainData::Content {
                vectors, encoder, ..
            },
            Method::RqKmeans | Method::RqVae,
        ) => {
            if vectors.rows() != n {
                return Err(TrainError::Config(format!(
                    "{} vectors for {n} items",
                    vectors.rows()
                )));
            }
            for (i, id) in items.iter().enumerate() {
                check_vector(id, "embedding", vectors.row(i), vectors.dim())?;
            }
            let dim = vectors.dim();
            let normaliser = Normaliser::fit(vectors.as_slice(), dim);
            let x = normaliser.apply_all(vectors.as_slice());
            let stage = if opts.method == Method::RqKmeans {
                params["kmeans_iters"] = opts.kmeans_iters.into();
                progress.set_length(opts.levels as u64);
                progress.set_message("rq-kmeans");
                let cfg = RqKmeansConfig {
                    levels: opts.levels,
                    codebook_size: opts.codebook_size,
                    max_iters: opts.kmeans_iters,
                    tol: 1e-5,
                    seed: opts.seed,
                };
                let books = rq_kmeans::train(&x, dim, &cfg, &device, |level, inertia, iters| {
                    progress.set_message(format!(
                        "level {level}: inertia {inertia:.1} after {iters} iterations"
                    ));
                    progress.inc(1);
                })
                .map_err(compute("rq-kmeans"))?;
                Stage::Residual {
                    encoder: None,
                    rq: ResidualQuantizer::new(books),
                }
            } else {
                let cfg = RqVaeConfig {
                    levels: opts.levels,
                    codebook_size: opts.codebook_size,
                    seed: opts.seed,
                    ..opts.rq_vae.clone()
                };
                params["rq_vae"] = serde_json::to_value(&cfg).expect("config serialises");
                progress.set_length(cfg.epochs as u64);
                let trained = rq_vae::train(&x, dim, &cfg, &device, |s| {
                    progress.set_message(format!(
                        "loss {:.4} recon {:.4} codes used {:?}",
                        s.loss, s.recon, s.used
                    ));
                    progress.set_position(s.epoch as u64 + 1);
                })
                .map_err(compute("rq-vae"))?;
                reconstruction_mse = Some(trained.reconstruction_mse);
                params["restarted_codes"] = trained.restarts.into();
                for (prefix, mlp) in [("encoder", &trained.encoder), ("decoder", &trained.decoder)]
                {
                    for (i, l) in mlp.layers.iter().enumerate() {
                        tensors.insert(
                            format!("{prefix}.{i}.weight"),
                            tensor(&l.weight, &[l.outputs, l.inputs])?,
                        );
                        tensors
                            .insert(format!("{prefix}.{i}.bias"), tensor(&l.bias, &[l.outputs])?);
                    }
                }
                Stage::Residual {
                    encoder: Some(trained.encoder),
                    rq: ResidualQuantizer::new(trained.codebooks),
                }
            };
            if let Stage::Residual { rq, .. } = &stage {
                for (l, book) in rq.levels().iter().enumerate() {
                    tensors.insert(
                        format!("codebook.{l}"),
                        tensor(book.words(), &[book.k(), book.dim()])?,
                    );
                }
            }
            (encoder.clone(), dim, normaliser, stage, (*vectors).clone())
        }
        (TrainData::Interactions { rows, users }, Method::Svd) => {
            progress.set_message("truncated SVD");
            let factors = svd::factorize(
                rows,
                n,
                &SvdConfig {
                    dims: opts.levels,
                    oversample: 8,
                    power_iters: opts.svd_power_iters,
                    seed: opts.seed,
                },
            );
            params["singular_values"] = factors.singular_values.clone().into();
            params["explained_energy"] = factors.explained.into();
            let k = opts.levels;
            let edges: Vec<Vec<f32>> = (0..k)
                .map(|d| {
                    let column: Vec<f32> =
                        (0..n).map(|i| factors.item_factors[i * k + d]).collect();
                    svd::quantile_edges(&column, opts.codebook_size)
                })
                .collect();
            let flat: Vec<f32> = edges.iter().flatten().copied().collect();
            tensors.insert(
                "svd.edges".into(),
                tensor(&flat, &[k, opts.codebook_size - 1])?,
            );
            tensors.insert(
                "svd.user_proj".into(),
                tensor(&factors.user_proj, &[users.len(), k])?,
            );
            users_out = Some(users.to_vec());
            let stage = Stage::Svd {
                edges,
                users: HashMap::new(),
                user_proj: Vec::new(),
            };
            let normaliser = Normaliser {
                mean: vec![0.0; k],
                scale: 1.0,
            };
            (
                EncoderSpec::Interactions { dim: k },
                k,
                normaliser,
                stage,
                Vectors::new(k, factors.item_factors),
            )
        }
        (TrainData::Content { .. }, Method::Svd) => {
            return Err(TrainError::Config(
                "svd learns from interactions: pass --inter".into(),
            ))
        }
        (TrainData::Interactions { .. }, _) => {
            return Err(TrainError::Config(format!(
                "{} learns from item content, not interactions",
                opts.method.name()
            )))
        }
    };
    let content_map = match (&data, &encoder) {
        (
            TrainData::Content {
                content_map: Some(c),
                ..
            },
            EncoderSpec::Collaborative { content, .. },
        ) => {
            if (c.map.inputs(), c.map.outputs()) != (content.dim(), dim) {
                return Err(TrainError::Config(format!(
                    "the content map takes {} dimensions to {}, but the content has {} and the collaborative vectors {dim}",
                    c.map.inputs(),
                    c.map.outputs(),
                    content.dim()
                )));
            }
            tensors.insert(
                "content_map.weight".into(),
                tensor(c.map.weight(), &[dim, content.dim()])?,
            );
            tensors.insert("content_map.bias".into(), tensor(c.map.bias(), &[dim])?);
            tensors.insert("content_map.centre".into(), tensor(c.map.centre(), &[dim])?);
            tensors.insert(
                "content_map.spread".into(),
                tensor(&[c.map.spread()], &[1])?,
            );
            Some(c)
        }
        (
            TrainData::Content {
                content_map: None, ..
            },
            EncoderSpec::Collaborative { .. },
        ) => {
            return Err(TrainError::Config(
                "a collaborative encoder needs the content map that places new items".into(),
            ))
        }
        (
            TrainData::Content {
                content_map: Some(_),
                ..
            },
            _,
        ) => {
            return Err(TrainError::Config(
                "a content map goes with a collaborative encoder only".into(),
            ))
        }
        _ => None,
    };
    tensors.insert("normaliser.mean".into(), tensor(&normaliser.mean, &[dim])?);
    tensors.insert(
        "normaliser.scale".into(),
        tensor(&[normaliser.scale], &[1])?,
    );

    let levels = opts.levels;
    let mut manifest = Manifest {
        format: artifact::FORMAT.into(),
        format_version: artifact::FORMAT_VERSION,
        version: String::new(),
        method: opts.method,
        content_levels: levels,
        codebook_sizes: vec![opts.codebook_size; levels],
        last_level_capacity: 0,
        input: Input { dim, encoder },
        normalisation: "centre-scale".into(),
        training: Training {
            items_file: file_name(provenance.items_file),
            items_sha256: artifact::file_sha256(provenance.items_file)?,
            interactions_file: provenance.interactions_file.map(file_name),
            interactions_sha256: provenance
                .interactions_file
                .map(artifact::file_sha256)
                .transpose()?,
            seed: opts.seed,
            params,
        },
        metrics: Report::default(),
        files: HashMap::new(),
        created_by: format!("genfeed {}", env!("CARGO_PKG_VERSION")),
    };
    let frozen = FrozenTokenizer {
        dir: PathBuf::from(out),
        manifest: manifest.clone(),
        normaliser,
        stage,
        content_map: None,
        items: Vec::new(),
    };

    progress.set_message("assigning semantic IDs");
    let (codes, errors) = par_rows(n, levels, host_threads(), |i, row| {
        frozen.quantise(vectors.row(i), row)
    });
    let (distinct_prefixes, colliding_share, largest_group) = collision_stats(&codes, levels);
    let capacity = opts
        .last_level_capacity
        .unwrap_or_else(|| default_capacity(largest_group));
    if capacity < largest_group {
        return Err(TrainError::Config(format!(
            "last-level capacity {capacity} is below the largest collision group ({largest_group} items)"
        )));
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| items[a].cmp(&items[b]));
    let mut allocator = SidAllocator::new(capacity);
    let mut sids = vec![None; n];
    for &i in &order {
        let sid = allocator
            .allocate(&codes[i * levels..(i + 1) * levels])
            .expect("capacity covers the largest group");
        sids[i] = Some(sid);
    }
    let table: Vec<(String, Sid)> = items
        .iter()
        .cloned()
        .zip(
            sids.into_iter()
                .map(|s| s.expect("every item was allocated")),
        )
        .collect();
    if let Some(dup) = duplicate(items) {
        return Err(TrainError::Config(format!(
            "item {dup:?} appears twice in the training items"
        )));
    }

    manifest.last_level_capacity = capacity;
    manifest.metrics = Report {
        items: n,
        levels: level_stats(&codes, &manifest.codebook_sizes),
        distinct_prefixes,
        colliding_share,
        largest_group,
        last_level_capacity: capacity,
        relative_quantisation_error: quantisation_error(&frozen, &vectors, &codes, &errors),
        reconstruction_mse,
        content_map: content_map.map(|c| check_content_map(&frozen, c, &vectors, &codes)),
        train_seconds: start.elapsed().as_secs_f64(),
    };
    progress.set_message("writing artifact");
    artifact::save(out, &mut manifest, &tensors, &table, users_out.as_deref())?;
    Ok(FrozenTokenizer::load(out)?)
}

/// The SIDs a held-out item's content predicts against those its real
/// collaborative vector gets (`codes`, the training items' content codes).
fn check_content_map(
    frozen: &FrozenTokenizer,
    c: &ContentMap<'_>,
    vectors: &Vectors,
    codes: &[Code],
) -> ContentMapCheck {
    let levels = frozen.manifest.content_levels;
    let n = codes.len() / levels;
    let mut firsts: HashMap<Code, usize> = HashMap::new();
    for row in codes.chunks_exact(levels) {
        *firsts.entry(row[0]).or_default() += 1;
    }
    let chance = firsts
        .values()
        .map(|&k| (k as f64 / n as f64).powi(2))
        .sum();
    let (mut cosine, mut first, mut prefix) = (0.0, 0usize, 0usize);
    let mut predicted = vec![0; levels];
    for (row, content) in &c.held_out {
        let v = c.map.direction(content);
        cosine += v
            .iter()
            .zip(vectors.row(*row))
            .map(|(a, b)| (a * b) as f64)
            .sum::<f64>();
        frozen.quantise(&v, &mut predicted);
        let real = &codes[row * levels..(row + 1) * levels];
        first += usize::from(predicted[0] == real[0]);
        prefix += usize::from(predicted[..] == real[..]);
    }
    let held = c.held_out.len().max(1) as f64;
    ContentMapCheck {
        held_out_items: c.held_out.len(),
        mean_cosine: cosine / held,
        first_code_agreement: first as f64 / held,
        first_code_chance: chance,
        prefix_agreement: prefix as f64 / held,
    }
}

fn tensor(data: &[f32], shape: &[usize]) -> Result<Tensor, TrainError> {
    Tensor::from_slice(data, shape, &Device::Cpu).map_err(compute("export"))
}

fn file_name(p: &Path) -> String {
    p.file_name().map_or_else(
        || p.display().to_string(),
        |f| f.to_string_lossy().into_owned(),
    )
}

fn duplicate(items: &[String]) -> Option<&str> {
    let mut seen = std::collections::HashSet::with_capacity(items.len());
    items
        .iter()
        .find(|i| !seen.insert(i.as_str()))
        .map(String::as_str)
}

/// Mean squared residual over mean squared norm, in the space the codebooks
/// quantise (normalised input, or the RQ-VAE latent); for SVD, the
/// within-bin spread of the factors.
fn quantisation_error(
    frozen: &FrozenTokenizer,
    vectors: &Vectors,
    codes: &[Code],
    errors: &[(f32, f32)],
) -> f64 {
    let (mut err, mut norm) = (0.0f64, 0.0f64);
    if let Stage::Svd { .. } = &frozen.stage {
        let k = frozen.manifest.content_levels;
        for d in 0..k {
            let mut bins: HashMap<Code, (f64, f64, usize)> = HashMap::new();
            for i in 0..vectors.rows() {
                let v = f64::from(vectors.row(i)[d]);
                let e = bins.entry(codes[i * k + d]).or_default();
                e.0 += v;
                e.1 += v * v;
                e.2 += 1;
                norm += v * v;
            }
            err += bins
                .values()
                .map(|(s, sq, c)| sq - s * s / *c as f64)
                .sum::<f64>();
        }
    } else {
        err = errors.iter().map(|e| f64::from(e.0)).sum();
        norm = errors.iter().map(|e| f64::from(e.1)).sum();
    }
    if norm > 0.0 {
        err / norm
    } else {
        0.0
    }
}
