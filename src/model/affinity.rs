//! Learnt content affinity: which content tends to come next.
//!
//! Cosine similarity can say that a fresh item is like the user's last one;
//! it cannot say that a tent is followed by a sleeping bag, two items whose
//! attributes share nothing. The training transitions can: an affinity is a
//! low-rank bilinear form over unit content vectors,
//!
//! ```text
//! a(prev → next) = (Qᵀ c_prev) · (Kᵀ c_next) + bᵀ c_next
//! ```
//!
//! fitted after training (`genfeed fit-affinity`,
//! [`crate::train::affinity`]) by a softmax over the trained items on the
//! training transitions, and added to the cosine's logit in the fresh items'
//! softmax ([`super::fresh`]). It reads content only, never an item id, so
//! it scores items it never saw: what it learnt about a brand or a category
//! carries to a new item that has them.
//!
//! An affinity belongs to one content space (the TF-IDF table offline, the
//! tokenizer's reconstruction of a SID in the service): [`Affinity::content`]
//! names it, and a caller scoring with another refuses the file.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};

use super::prefix_scores::dot;
use super::ModelError;

/// The file beside the weights that holds a fitted affinity.
pub const AFFINITY_FILE: &str = "affinity.safetensors";

/// A fitted affinity over `dim`-wide content vectors.
#[derive(Clone, Debug, PartialEq)]
pub struct Affinity {
    content: String,
    dim: usize,
    rank: usize,
    /// `Q`, `[dim × rank]`, row-major.
    query: Vec<f32>,
    /// `K`, `[dim × rank]`, row-major.
    key: Vec<f32>,
    /// `b`, `[dim]`.
    bias: Vec<f32>,
    /// The cosine's temperature the affinity was fitted beside: its logits
    /// are on that scale, so whoever scores with it divides by the same.
    temperature: Option<f32>,
}

impl Affinity {
    /// `query` and `key` are `[dim × rank]` row-major, `bias` `[dim]`;
    /// `content` names the content space they were fitted on.
    pub fn new(
        content: &str,
        dim: usize,
        query: Vec<f32>,
        key: Vec<f32>,
        bias: Vec<f32>,
    ) -> Result<Affinity, String> {
        let rank = query.len() / dim.max(1);
        if dim == 0 || rank == 0 || query.len() != dim * rank {
            return Err(format!(
                "query holds {} values, not a multiple of the dimension {dim}",
                query.len()
            ));
        }
        if key.len() != query.len() || bias.len() != dim {
            return Err(format!(
                "key ({}) and bias ({}) do not match query [{dim} × {rank}]",
                key.len(),
                bias.len()
            ));
        }
        Ok(Affinity {
            content: content.to_string(),
            dim,
            rank,
            query,
            key,
            bias,
            temperature: None,
        })
    }

    /// Records the cosine's temperature it was fitted beside.
    pub fn with_temperature(mut self, temperature: f32) -> Affinity {
        self.temperature = Some(temperature);
        self
    }

    /// The cosine's temperature it was fitted beside; `None` for a file
    /// written before it was recorded.
    pub fn temperature(&self) -> Option<f32> {
        self.temperature
    }

    /// The content space it was fitted on (`tfidf`, `auto`, `sid`).
    pub fn content(&self) -> &str {
        &self.content
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    /// `Qᵀ c` into `out` (`rank` values).
    pub fn query_of(&self, c: &[f32], out: &mut Vec<f32>) {
        project(&self.query, self.rank, c, out);
    }

    /// `Kᵀ c` into `out` (`rank` values); returns `bᵀ c`.
    pub fn key_of(&self, c: &[f32], out: &mut Vec<f32>) -> f32 {
        project(&self.key, self.rank, c, out);
        dot(&self.bias, c)
    }

    /// Writes `dir/affinity.safetensors`, the content space in its metadata.
    pub fn save(&self, dir: &Path) -> Result<(), ModelError> {
        let path = dir.join(AFFINITY_FILE);
        let cpu = &Device::Cpu;
        let tensors = [
            (
                "query",
                Tensor::from_slice(&self.query, (self.dim, self.rank), cpu)?,
            ),
            (
                "key",
                Tensor::from_slice(&self.key, (self.dim, self.rank), cpu)?,
            ),
            ("bias", Tensor::from_slice(&self.bias, self.dim, cpu)?),
        ];
        let mut metadata = HashMap::from([("content".to_string(), self.content.clone())]);
        if let Some(t) = self.temperature {
            metadata.insert("temperature".to_string(), t.to_string());
        }
        safetensors::serialize_to_file(tensors, Some(metadata), &path).map_err(|e| {
            ModelError::Parse {
                path,
                why: e.to_string(),
            }
        })
    }

    /// Reads what [`Affinity::save`] wrote into `dir`; `None` when `dir`
    /// has none (nothing was fitted).
    pub fn load(dir: &Path) -> Result<Option<Affinity>, ModelError> {
        let path = dir.join(AFFINITY_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(ModelError::Io { path, source }),
        };
        let parse = |why: String| ModelError::Parse {
            path: path.clone(),
            why,
        };
        let (_, meta) =
            safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| parse(e.to_string()))?;
        let field = |name: &str| {
            meta.metadata()
                .as_ref()
                .and_then(|m| m.get(name))
                .cloned()
                .ok_or_else(|| parse(format!("no \"{name}\" in the metadata")))
        };
        let content = field("content")?;
        let temperature = match field("temperature") {
            Ok(t) => Some(
                t.parse::<f32>()
                    .ok()
                    .filter(|t| *t > 0.0 && t.is_finite())
                    .ok_or_else(|| parse(format!("temperature {t:?} is not a positive number")))?,
            ),
            Err(_) => None,
        };
        let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
            .map_err(|e| parse(e.to_string()))?;
        let get = |name: &str| -> Result<(Vec<usize>, Vec<f32>), ModelError> {
            let t = tensors.get(name).ok_or_else(|| ModelError::Weights {
                path: path.clone(),
                name: name.to_string(),
                why: "missing".into(),
            })?;
            Ok((t.dims().to_vec(), t.flatten_all()?.to_vec1::<f32>()?))
        };
        let (dims, query) = get("query")?;
        let (_, key) = get("key")?;
        let (_, bias) = get("bias")?;
        let dim = dims.first().copied().unwrap_or(0);
        Affinity::new(&content, dim, query, key, bias)
            .map(|a| Some(Affinity { temperature, ..a }))
            .map_err(|why| ModelError::Weights {
                path: path.clone(),
                name: "query".into(),
                why,
            })
    }
}

/// `Mᵀ c` for a row-major `[c.len() × rank]` matrix `m`, skipping the zero
/// entries of `c` (TF-IDF rows are mostly zeros).
fn project(m: &[f32], rank: usize, c: &[f32], out: &mut Vec<f32>) {
    out.clear();
    out.resize(rank, 0.0);
    for (&x, row) in c.iter().zip(m.chunks_exact(rank)) {
        if x != 0.0 {
            out.iter_mut().zip(row).for_each(|(o, r)| *o += x * r);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> Affinity {
        // dim 3, rank 2
        Affinity::new(
            "tfidf",
            3,
            vec![1.0, 0.0, 0.0, 1.0, 0.5, 0.5],
            vec![0.0, 1.0, 1.0, 0.0, 0.0, 0.0],
            vec![0.1, 0.2, 0.3],
        )
        .unwrap()
    }

    #[test]
    fn scores_are_the_bilinear_form_and_survive_a_save() {
        let a = small();
        let (mut q, mut k) = (Vec::new(), Vec::new());
        a.query_of(&[1.0, 0.0, 0.0], &mut q);
        let b = a.key_of(&[0.0, 1.0, 0.0], &mut k);
        assert_eq!(q, vec![1.0, 0.0]);
        assert_eq!(k, vec![1.0, 0.0]);
        assert!((dot(&q, &k) + b - 1.2).abs() < 1e-6);
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Affinity::load(dir.path()).unwrap(), None);
        a.save(dir.path()).unwrap();
        assert_eq!(Affinity::load(dir.path()).unwrap(), Some(a.clone()));
        let fitted = a.with_temperature(0.07);
        fitted.save(dir.path()).unwrap();
        let back = Affinity::load(dir.path()).unwrap().unwrap();
        assert_eq!(back.temperature(), Some(0.07));
    }

    #[test]
    fn mismatched_shapes_are_refused() {
        assert!(Affinity::new("tfidf", 3, vec![0.0; 5], vec![0.0; 5], vec![0.0; 3]).is_err());
        assert!(Affinity::new("tfidf", 3, vec![0.0; 6], vec![0.0; 3], vec![0.0; 3]).is_err());
        assert!(Affinity::new("tfidf", 3, vec![0.0; 6], vec![0.0; 6], vec![0.0; 2]).is_err());
    }
}
