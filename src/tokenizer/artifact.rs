//! The tokenizer on disk: a directory another process can load and trust.
//!
//! ```text
//! DIR/manifest.json         what it is: method, levels, encoder, data hash, metrics
//! DIR/weights.safetensors   codebooks, normaliser, encoder MLP or SVD tables
//! DIR/items.tsv             the training items' SIDs (item_id<TAB>sid)
//! DIR/users.txt             SVD only: user ids, row order of `svd.user_proj`
//! ```
//!
//! The manifest records the SHA-256 of every other file, so a truncated copy or
//! a weights file from another run is caught at load time rather than producing
//! quietly different SIDs. `format_version` is checked first: a reader never
//! guesses at a layout it does not know.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::report::Report;
use crate::embed::EncoderSpec;
use crate::sid::{Sid, SidError};

/// The only value `manifest.format` may hold.
pub const FORMAT: &str = "genfeed-tokenizer";
/// The artifact layout this build reads and writes.
pub const FORMAT_VERSION: u32 = 1;

pub const MANIFEST: &str = "manifest.json";
pub const WEIGHTS: &str = "weights.safetensors";
pub const ITEMS: &str = "items.tsv";
pub const USERS: &str = "users.txt";

/// How the content levels were learned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// Residual k-means on the content vectors.
    RqKmeans,
    /// TIGER's residual-quantised variational autoencoder.
    RqVae,
    /// GPTRec's quantised truncated SVD of the user–item matrix.
    Svd,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::RqKmeans => "rq-kmeans",
            Method::RqVae => "rq-vae",
            Method::Svd => "svd",
        }
    }
}

/// `manifest.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub format_version: u32,
    /// The name recommendations carry as their tokenizer version:
    /// method, shape and a digest of the weights.
    pub version: String,
    pub method: Method,
    /// Content levels; every SID has one more, the collision level.
    pub content_levels: usize,
    pub codebook_sizes: Vec<usize>,
    pub last_level_capacity: usize,
    pub input: Input,
    /// What is applied to a vector before quantisation (tensors
    /// `normaliser.mean`, `normaliser.scale`).
    pub normalisation: String,
    pub training: Training,
    pub metrics: Report,
    pub files: HashMap<String, String>,
    pub created_by: String,
}

/// What goes into the tokenizer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Input {
    pub dim: usize,
    pub encoder: EncoderSpec,
}

/// Where the tokenizer came from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Training {
    pub items_file: String,
    pub items_sha256: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interactions_file: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interactions_sha256: Option<String>,
    pub seed: u64,
    /// The method's hyper-parameters, as given.
    pub params: serde_json::Value,
}

/// Why an artifact could not be written or read. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a valid manifest: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path}: not a genfeed tokenizer (format {found:?}, expected {FORMAT:?})")]
    Format { path: PathBuf, found: String },
    #[error(
        "{path}: tokenizer format version {found} is not supported by this build (it reads version {FORMAT_VERSION}); \
         retrain the tokenizer or use the genfeed release that wrote it"
    )]
    UnsupportedVersion { path: PathBuf, found: u32 },
    #[error("{path}: SHA-256 is {found}, the manifest says {expected}: the file is damaged or from another run")]
    Digest {
        path: PathBuf,
        expected: String,
        found: String,
    },
    #[error("{path}: the manifest lists no file {name:?}")]
    Unlisted { path: PathBuf, name: String },
    #[error("{path}: tensor {name:?}: {detail}")]
    Tensor {
        path: PathBuf,
        name: String,
        detail: String,
    },
    #[error("{path}:{line}: {detail}")]
    Table {
        path: PathBuf,
        line: usize,
        detail: String,
    },
    #[error("{path}: {detail}")]
    Inconsistent { path: PathBuf, detail: String },
}

impl ArtifactError {
    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ArtifactError + '_ {
        move |source| ArtifactError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// SHA-256 of a file, hex.
pub fn file_sha256(path: &Path) -> Result<String, ArtifactError> {
    let mut file = fs::File::open(path).map_err(ArtifactError::io(path))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).map_err(ArtifactError::io(path))?;
    Ok(hex(&hasher.finalize()))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The tensors of an artifact as host vectors, with their shapes.
pub struct Weights {
    path: PathBuf,
    tensors: HashMap<String, Tensor>,
}

impl Weights {
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, ArtifactError> {
        let err = |detail: String| ArtifactError::Tensor {
            path: self.path.clone(),
            name: name.to_string(),
            detail,
        };
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| err("missing".into()))?;
        if t.dims() != shape {
            return Err(err(format!("shape {:?}, expected {shape:?}", t.dims())));
        }
        let v = t
            .to_dtype(candle_core::DType::F32)
            .and_then(|t| t.flatten_all()?.to_vec1::<f32>())
            .map_err(|e| err(e.to_string()))?;
        if v.iter().any(|x| !x.is_finite()) {
            return Err(err("holds a non-finite value".into()));
        }
        Ok(v)
    }

    /// The shape of a tensor, for layers whose sizes the manifest does not
    /// spell out.
    pub fn dims(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|t| t.dims())
    }
}

/// Writes an artifact: weights and tables first, the manifest (with their
/// digests) last, each through a temporary file and a rename, so that a crash
/// leaves either no manifest or a complete artifact.
pub fn save(
    dir: &Path,
    manifest: &mut Manifest,
    tensors: &HashMap<String, Tensor>,
    items: &[(String, Sid)],
    users: Option<&[String]>,
) -> Result<(), ArtifactError> {
    fs::create_dir_all(dir).map_err(ArtifactError::io(dir))?;
    let weights = dir.join(WEIGHTS);
    let tmp = dir.join(format!("{WEIGHTS}.tmp"));
    candle_core::safetensors::save(tensors, &tmp).map_err(|e| ArtifactError::Tensor {
        path: tmp.clone(),
        name: "*".into(),
        detail: e.to_string(),
    })?;
    fs::rename(&tmp, &weights).map_err(ArtifactError::io(&weights))?;
    let mut table = String::with_capacity(items.len() * 24);
    for (id, sid) in items {
        table.push_str(id);
        table.push('\t');
        table.push_str(&sid.to_string());
        table.push('\n');
    }
    write_atomic(&dir.join(ITEMS), table.as_bytes())?;
    manifest.files.clear();
    let weights_digest = file_sha256(&weights)?;
    manifest.version = format!(
        "{}-{}x{}-{}",
        manifest.method.name(),
        manifest.content_levels,
        manifest.codebook_sizes.first().copied().unwrap_or(0),
        &weights_digest[..12]
    );
    manifest.files.insert(WEIGHTS.into(), weights_digest);
    manifest
        .files
        .insert(ITEMS.into(), file_sha256(&dir.join(ITEMS))?);
    if let Some(users) = users {
        let mut text = users.join("\n");
        text.push('\n');
        write_atomic(&dir.join(USERS), text.as_bytes())?;
        manifest
            .files
            .insert(USERS.into(), file_sha256(&dir.join(USERS))?);
    }
    let json = serde_json::to_vec_pretty(manifest).expect("a manifest always serialises");
    write_atomic(&dir.join(MANIFEST), &json)
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ArtifactError> {
    let tmp = path.with_extension("tmp");
    let mut f = fs::File::create(&tmp).map_err(ArtifactError::io(&tmp))?;
    f.write_all(bytes).map_err(ArtifactError::io(&tmp))?;
    f.sync_all().map_err(ArtifactError::io(&tmp))?;
    fs::rename(&tmp, path).map_err(ArtifactError::io(path))
}

/// Reads and checks `manifest.json`: format and version before anything else.
pub fn read_manifest(dir: &Path) -> Result<Manifest, ArtifactError> {
    let path = dir.join(MANIFEST);
    let bytes = fs::read(&path).map_err(ArtifactError::io(&path))?;
    let probe: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|source| ArtifactError::Json {
            path: path.clone(),
            source,
        })?;
    let format = probe.get("format").and_then(|v| v.as_str()).unwrap_or("");
    if format != FORMAT {
        return Err(ArtifactError::Format {
            path,
            found: format.to_string(),
        });
    }
    let version = probe
        .get("format_version")
        .and_then(|v| v.as_u64())
        .unwrap_or(0);
    if version != u64::from(FORMAT_VERSION) {
        return Err(ArtifactError::UnsupportedVersion {
            path,
            found: version.min(u64::from(u32::MAX)) as u32,
        });
    }
    serde_json::from_value(probe).map_err(|source| ArtifactError::Json { path, source })
}

/// Reads a file the manifest lists, after checking its digest.
pub fn read_listed(dir: &Path, manifest: &Manifest, name: &str) -> Result<Vec<u8>, ArtifactError> {
    let path = dir.join(name);
    let expected = manifest
        .files
        .get(name)
        .ok_or_else(|| ArtifactError::Unlisted {
            path: dir.join(MANIFEST),
            name: name.to_string(),
        })?;
    let bytes = fs::read(&path).map_err(ArtifactError::io(&path))?;
    let found = hex(&Sha256::digest(&bytes));
    if &found != expected {
        return Err(ArtifactError::Digest {
            path,
            expected: expected.clone(),
            found,
        });
    }
    Ok(bytes)
}

pub fn read_weights(dir: &Path, manifest: &Manifest) -> Result<Weights, ArtifactError> {
    let path = dir.join(WEIGHTS);
    let bytes = read_listed(dir, manifest, WEIGHTS)?;
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).map_err(|e| {
        ArtifactError::Tensor {
            path: path.clone(),
            name: "*".into(),
            detail: e.to_string(),
        }
    })?;
    Ok(Weights { path, tensors })
}

/// Reads `items.tsv`: the training items and their SIDs, in training order.
pub fn read_items(dir: &Path, manifest: &Manifest) -> Result<Vec<(String, Sid)>, ArtifactError> {
    let path = dir.join(ITEMS);
    let bytes = read_listed(dir, manifest, ITEMS)?;
    let text = String::from_utf8(bytes).map_err(|e| ArtifactError::Table {
        path: path.clone(),
        line: 0,
        detail: format!("not UTF-8: {e}"),
    })?;
    let levels = manifest.content_levels + 1;
    text.lines()
        .enumerate()
        .map(|(i, line)| {
            let bad = |detail: String| ArtifactError::Table {
                path: path.clone(),
                line: i + 1,
                detail,
            };
            let (id, sid) = line
                .split_once('\t')
                .ok_or_else(|| bad("expected item_id<TAB>sid".into()))?;
            let sid: Sid = sid.parse().map_err(|e: SidError| bad(e.to_string()))?;
            if sid.levels() != levels {
                return Err(bad(format!(
                    "SID {sid} has {} levels, expected {levels}",
                    sid.levels()
                )));
            }
            Ok((id.to_string(), sid))
        })
        .collect()
}

pub fn read_users(dir: &Path, manifest: &Manifest) -> Result<Vec<String>, ArtifactError> {
    let bytes = read_listed(dir, manifest, USERS)?;
    let text = String::from_utf8(bytes).map_err(|e| ArtifactError::Table {
        path: dir.join(USERS),
        line: 0,
        detail: format!("not UTF-8: {e}"),
    })?;
    Ok(text.lines().map(str::to_string).collect())
}
