//! The semantic-ID tokenizer: trained offline, applied frozen online.
//!
//! A tokenizer turns an item's content vector into a semantic ID in two steps:
//!
//! 1. **Content codes.** The vector is normalised and quantised level by level:
//!    residual k-means codebooks ([`Method::RqKmeans`]), the codebooks of TIGER's
//!    RQ-VAE applied to the encoder's latent ([`Method::RqVae`]), or per-dimension
//!    quantile bins of SVD item factors for catalogues with no content
//!    ([`Method::Svd`], GPTRec). Similar items share leading codes.
//! 2. **The collision level.** One more code separates items whose content codes
//!    are equal ([`collisions`]): the smallest code free under that prefix. A
//!    new item whose prefix is full takes the nearest prefix with room, the
//!    same codes but the last content code's next nearest ([`ContentCodes`]).
//!
//! Training ([`train`]) writes a self-describing artifact directory
//! ([`artifact`]); [`FrozenTokenizer`] loads it in any process and never changes
//! it. An [`Assigner`] hands SIDs to items: a training item keeps the SID it got
//! in training, a new item gets its content codes plus the next free collision
//! code, and asking again for the same item id gives the same SID.
//!
//! Content codes are computed by the host-only arithmetic of [`quantize`], so an
//! item's SID does not depend on thread count, process or machine.

pub mod artifact;
pub mod collisions;
pub mod kmeans;
pub mod quantize;
pub mod report;
pub mod rq_kmeans;
pub mod rq_vae;
pub mod svd;
pub mod train;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub use artifact::{ArtifactError, Manifest, Method};
pub use collisions::{PrefixFull, SidAllocator};

use crate::embed::ridge::LinearMap;
use crate::embed::{check_vector, EmbedError, EncoderSpec};
use crate::sid::{Code, Sid, MAX_LEVELS};
use quantize::{Codebook, Dense, Mlp, Normaliser, ResidualQuantizer};

/// Why an item could not get a SID.
#[derive(Debug, thiserror::Error)]
pub enum TokenizeError {
    #[error(transparent)]
    Vector(#[from] EmbedError),
    #[error("item {item:?}: {source}")]
    PrefixFull { item: String, source: PrefixFull },
    #[error("item {item:?}: the SVD tokenizer places unseen items by their interactions, and none of this item's users is known to it")]
    NoKnownUsers { item: String },
}

/// An item's content codes, all SID levels but the last, and the order in
/// which it tries prefixes when the one they make is full.
///
/// A prefix holds at most the last level's capacity of items. Items with
/// the same content (the same title sold by many sellers, say) have the
/// same codes, and past that capacity they would get no SID at all: not
/// recommendable, only dead-lettered. They go to the prefixes next to
/// theirs instead: the same codes but the last content code's next nearest
/// (by the same distance that chose it), so they stay with what shares
/// their leading codes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContentCodes {
    /// The nearest code at each content level.
    pub codes: Vec<Code>,
    /// Every code of the last content level, nearest first (so the first is
    /// the last of `codes`).
    pub last_ranked: Vec<Code>,
}

impl ContentCodes {
    /// The prefixes the item may take, in order: `codes`, then the same
    /// with the last code replaced by each next nearest one.
    pub fn prefixes(&self) -> impl Iterator<Item = Vec<Code>> + '_ {
        let (_, lead) = self.codes.split_last().expect("at least one content level");
        self.last_ranked.iter().map(move |&c| {
            let mut p = lead.to_vec();
            p.push(c);
            p
        })
    }
}

/// The content-code stage of a loaded tokenizer.
enum Stage {
    /// Residual codebooks, optionally behind an RQ-VAE encoder.
    Residual {
        encoder: Option<Mlp>,
        rq: ResidualQuantizer,
    },
    /// Quantile bin edges per SVD dimension, and the user projection that folds
    /// a new item's interactions into the factor space.
    Svd {
        edges: Vec<Vec<f32>>,
        users: HashMap<String, usize>,
        user_proj: Vec<f32>,
    },
}

/// A trained tokenizer, loaded read-only.
pub struct FrozenTokenizer {
    dir: PathBuf,
    manifest: Manifest,
    normaliser: Normaliser,
    stage: Stage,
    /// Collaborative tokenizers: content vector → collaborative vector.
    content_map: Option<LinearMap>,
    items: Vec<(String, Sid)>,
}

impl FrozenTokenizer {
    /// Loads and verifies an artifact directory.
    pub fn load(dir: &Path) -> Result<FrozenTokenizer, ArtifactError> {
        let manifest = artifact::read_manifest(dir)?;
        let weights = artifact::read_weights(dir, &manifest)?;
        let inconsistent = |detail: String| ArtifactError::Inconsistent {
            path: dir.join(artifact::MANIFEST),
            detail,
        };
        let levels = manifest.content_levels;
        if levels == 0 || levels >= MAX_LEVELS || manifest.codebook_sizes.len() != levels {
            return Err(inconsistent(format!(
                "{} content levels with {} codebook sizes",
                levels,
                manifest.codebook_sizes.len()
            )));
        }
        let dim = manifest.input.dim;
        if dim != manifest.input.encoder.dim() {
            return Err(inconsistent(format!(
                "input dimension {dim} but the encoder gives {}",
                manifest.input.encoder.dim()
            )));
        }
        let normaliser = Normaliser {
            mean: weights.get("normaliser.mean", &[dim])?,
            scale: weights.get("normaliser.scale", &[1])?[0],
        };
        let stage = match manifest.method {
            Method::RqKmeans | Method::RqVae => {
                let encoder = if manifest.method == Method::RqVae {
                    Some(read_mlp(&weights, "encoder", dim)?)
                } else {
                    None
                };
                let latent = encoder.as_ref().map_or(dim, Mlp::output_dim);
                let books = manifest
                    .codebook_sizes
                    .iter()
                    .enumerate()
                    .map(|(l, &k)| {
                        Ok(Codebook::new(
                            k,
                            latent,
                            weights.get(&format!("codebook.{l}"), &[k, latent])?,
                        ))
                    })
                    .collect::<Result<Vec<_>, ArtifactError>>()?;
                Stage::Residual {
                    encoder,
                    rq: ResidualQuantizer::new(books),
                }
            }
            Method::Svd => {
                let k = manifest.codebook_sizes[0];
                if manifest.codebook_sizes.iter().any(|&s| s != k) || dim != levels {
                    return Err(inconsistent(
                        "an SVD tokenizer has one dimension per level and one bin count".into(),
                    ));
                }
                let flat = weights.get("svd.edges", &[levels, k - 1])?;
                let edges = flat.chunks(k - 1).map(<[f32]>::to_vec).collect();
                let names = artifact::read_users(dir, &manifest)?;
                let user_proj = weights.get("svd.user_proj", &[names.len(), levels])?;
                let users = names.into_iter().enumerate().map(|(i, u)| (u, i)).collect();
                Stage::Svd {
                    edges,
                    users,
                    user_proj,
                }
            }
        };
        let content_map = match &manifest.input.encoder {
            EncoderSpec::Collaborative { content, .. } => {
                let inputs = content.dim();
                let weight = weights.get("content_map.weight", &[dim, inputs])?;
                let bias = weights.get("content_map.bias", &[dim])?;
                let centre = weights.get("content_map.centre", &[dim])?;
                let spread = weights.get("content_map.spread", &[1])?[0];
                Some(
                    LinearMap::from_parts(inputs, dim, weight, bias, centre, spread).ok_or_else(
                        || inconsistent(format!("a content map from {inputs} to {dim} dimensions")),
                    )?,
                )
            }
            _ => None,
        };
        let items = artifact::read_items(dir, &manifest)?;
        Ok(FrozenTokenizer {
            dir: dir.to_path_buf(),
            manifest,
            normaliser,
            stage,
            content_map,
            items,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The tokenizer version that recommendations carry.
    pub fn version(&self) -> &str {
        &self.manifest.version
    }

    /// The dimension of the vectors it takes.
    pub fn input_dim(&self) -> usize {
        self.manifest.input.dim
    }

    /// Levels of a full SID (content levels plus the collision level).
    pub fn sid_levels(&self) -> usize {
        self.manifest.content_levels + 1
    }

    /// The training items and their SIDs, in training order.
    pub fn training_items(&self) -> &[(String, Sid)] {
        &self.items
    }

    /// The content codes of one item's vector (all levels but the last),
    /// with the order of the prefixes it tries when theirs is full. Checks
    /// the vector first: wrong dimension or a non-finite value is an error
    /// naming the item.
    pub fn content_codes(&self, item: &str, vector: &[f32]) -> Result<ContentCodes, EmbedError> {
        check_vector(item, "embedding", vector, self.input_dim())?;
        let mut codes = vec![0; self.manifest.content_levels];
        let mut last_ranked = Vec::new();
        match &self.stage {
            Stage::Residual { encoder, rq } => {
                let x = self.encode(vector, encoder.as_ref());
                let mut scratch = vec![0.0; x.len()];
                rq.quantize_ranked(&x, &mut codes, &mut scratch, &mut last_ranked);
            }
            Stage::Svd { edges, .. } => {
                svd_bins(edges, vector, &mut codes);
                let (edges, &v) = edges.last().zip(vector.last()).expect("a level");
                svd::rank_bins(edges, v, &mut last_ranked);
            }
        }
        Ok(ContentCodes { codes, last_ranked })
    }

    /// What the residual codebooks quantise: the normalised vector, through
    /// the RQ-VAE encoder where there is one.
    fn encode(&self, vector: &[f32], encoder: Option<&Mlp>) -> Vec<f32> {
        let mut x = vec![0.0; vector.len()];
        self.normaliser.apply(vector, &mut x);
        match encoder {
            Some(mlp) => mlp.forward(&x),
            None => x,
        }
    }

    /// Content codes of a checked vector; returns the squared quantisation
    /// residual and the squared norm of what was quantised (for the report).
    fn quantise(&self, vector: &[f32], codes: &mut [Code]) -> (f32, f32) {
        match &self.stage {
            Stage::Residual { encoder, rq } => {
                let x = self.encode(vector, encoder.as_ref());
                let mut scratch = vec![0.0; x.len()];
                (rq.quantize(&x, codes, &mut scratch), quantize::dot(&x, &x))
            }
            Stage::Svd { edges, .. } => {
                svd_bins(edges, vector, codes);
                (0.0, 0.0)
            }
        }
    }

    /// The point of the quantised space an item's content codes stand for
    /// (the sum of their codewords, in the space the codebooks live in),
    /// written to `out`; false for SVD tokenizers, whose codes are bins.
    /// Two items' reconstructions are as alike as their content was, up to
    /// the quantisation error, and they need nothing but the SIDs: every
    /// instance gets the same vector for an item without storing any.
    pub fn reconstruct(&self, codes: &[Code], out: &mut Vec<f32>) -> bool {
        let Stage::Residual { rq, .. } = &self.stage else {
            return false;
        };
        out.clear();
        out.resize(rq.dim(), 0.0);
        for (book, &code) in rq.levels().iter().zip(codes) {
            out.iter_mut()
                .zip(book.word(usize::from(code)))
                .for_each(|(o, w)| *o += w);
        }
        true
    }

    /// Collaborative tokenizers only: the collaborative vector an item's
    /// content predicts, from its content vector (encoded as the encoder's
    /// `content` says), checked first. What a new item, which nobody has
    /// interacted with yet, is quantised from.
    pub fn predict_collaborative(
        &self,
        item: &str,
        content: &[f32],
    ) -> Result<Vec<f32>, EmbedError> {
        let Some(map) = &self.content_map else {
            return Err(EmbedError::NoContentMap {
                item: item.to_string(),
            });
        };
        check_vector(item, "content", content, map.inputs())?;
        Ok(map.direction(content))
    }

    /// SVD tokenizers only: the factor vector of an unseen item from the users
    /// who interacted with it (`Σ⁻¹ Uᵀ a`, the standard SVD fold-in). Unknown
    /// users are skipped; `None` when no user is known or the tokenizer is not
    /// an SVD one.
    pub fn fold_in<'a>(&self, users: impl IntoIterator<Item = &'a str>) -> Option<Vec<f32>> {
        let Stage::Svd {
            users: index,
            user_proj,
            ..
        } = &self.stage
        else {
            return None;
        };
        let k = self.manifest.content_levels;
        let mut v = vec![0.0; k];
        let mut any = false;
        for u in users {
            if let Some(&row) = index.get(u) {
                any = true;
                for (x, p) in v.iter_mut().zip(&user_proj[row * k..(row + 1) * k]) {
                    *x += p;
                }
            }
        }
        any.then_some(v)
    }

    /// An assigner that knows every training item's SID.
    pub fn assigner(&self) -> Assigner<'_> {
        let mut allocator = SidAllocator::new(self.manifest.last_level_capacity);
        let mut known = HashMap::with_capacity(self.items.len());
        for (id, sid) in &self.items {
            allocator.insert(*sid);
            known.insert(id.clone(), *sid);
        }
        Assigner {
            tokenizer: self,
            known,
            allocator,
        }
    }
}

/// Each SVD factor's quantile bin.
fn svd_bins(edges: &[Vec<f32>], vector: &[f32], codes: &mut [Code]) {
    for ((code, e), &v) in codes.iter_mut().zip(edges).zip(vector) {
        *code = e.partition_point(|&edge| edge <= v) as Code;
    }
}

fn read_mlp(weights: &artifact::Weights, name: &str, input: usize) -> Result<Mlp, ArtifactError> {
    let mut layers = Vec::new();
    let mut inputs = input;
    while let Some(dims) = weights.dims(&format!("{name}.{}.weight", layers.len())) {
        let outputs = dims[0];
        let i = layers.len();
        layers.push(Dense {
            inputs,
            outputs,
            weight: weights.get(&format!("{name}.{i}.weight"), &[outputs, inputs])?,
            bias: weights.get(&format!("{name}.{i}.bias"), &[outputs])?,
        });
        inputs = outputs;
    }
    if layers.is_empty() {
        weights.get(&format!("{name}.0.weight"), &[0, input])?;
    }
    Ok(Mlp { layers })
}

/// Hands out SIDs: stable for known items, next free collision code for new
/// ones. One assigner is one sequence of decisions: give it the items in the
/// same order and it gives the same SIDs.
pub struct Assigner<'a> {
    tokenizer: &'a FrozenTokenizer,
    known: HashMap<String, Sid>,
    allocator: SidAllocator,
}

impl Assigner<'_> {
    /// The SID of `item`, whose content vector is `vector`. An item seen
    /// before (in training or by this assigner) keeps its SID whatever the
    /// vector says: a SID never moves.
    pub fn assign(&mut self, item: &str, vector: &[f32]) -> Result<Sid, TokenizeError> {
        if let Some(&sid) = self.known.get(item) {
            return Ok(sid);
        }
        let content = self.tokenizer.content_codes(item, vector)?;
        let sid =
            self.allocator
                .place_new(&content)
                .map_err(|source| TokenizeError::PrefixFull {
                    item: item.to_string(),
                    source,
                })?;
        self.known.insert(item.to_string(), sid);
        Ok(sid)
    }

    /// The SID already given to `item`, if any.
    pub fn get(&self, item: &str) -> Option<Sid> {
        self.known.get(item).copied()
    }
}
