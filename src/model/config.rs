use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The file beside the weights that says what they are.
pub const CONFIG_FILE: &str = "config.json";
/// The weights, as safetensors.
pub const WEIGHTS_FILE: &str = "model.safetensors";

/// Everything needed to rebuild the network around its weights.
///
/// The defaults are the configuration the quality figures in the README were
/// measured with; [`ModelConfig::tiger`] has TIGER's dimensions, which the
/// throughput benchmark uses.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Codes per SID level: the model's output vocabulary, level by level.
    pub vocab: Vec<usize>,
    pub d_model: usize,
    /// History-transformer blocks.
    pub layers: usize,
    /// SID-decoder blocks.
    pub decoder_layers: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub d_ff: usize,
    /// Items of history the model reads; older ones are dropped.
    pub max_history: usize,
    pub dropout: f32,
    /// Rows of each level's prefix-embedding table (see [`ModelConfig::node_id`]).
    pub node_buckets: usize,
    /// Score a code by its prefix row as well as its code row where the
    /// prefix table is exact ([`ModelConfig::prefix_scored`]). Absent in
    /// configs written before it existed, hence off by default there.
    #[serde(default)]
    pub prefix_output: bool,
    /// Score a code by its prefix row as well on the levels whose prefix
    /// table is hashed, listing each parent's children
    /// ([`ModelConfig::sibling_scored`]). Absent in older configs: off.
    #[serde(default)]
    pub sibling_output: bool,
    /// Weight of the successor counts in the search's mixture
    /// ([`crate::model::transitions`]): 0 is the model alone. Chosen on
    /// validation users after training; absent in older configs: 0.
    #[serde(default)]
    pub transition_weight: f32,
    /// The tokenizer the SIDs came from; a model is meaningless with another.
    pub tokenizer_version: String,
}

impl ModelConfig {
    /// A config for `vocab` with the training defaults.
    pub fn new(vocab: Vec<usize>, tokenizer_version: impl Into<String>) -> ModelConfig {
        ModelConfig {
            vocab,
            d_model: 128,
            layers: 2,
            decoder_layers: 1,
            heads: 4,
            head_dim: 32,
            d_ff: 512,
            max_history: 20,
            dropout: 0.4,
            node_buckets: 65_536,
            prefix_output: false,
            sibling_output: false,
            transition_weight: 0.0,
            tokenizer_version: tokenizer_version.into(),
        }
    }

    /// TIGER's dimensions: 4 layers, d_model 128, 6 heads of 64, feed-forward
    /// 1024, dropout 0.1, 20 items of history (the SID decoder gets 4 layers
    /// too, as TIGER's decoder has).
    pub fn tiger(vocab: Vec<usize>, tokenizer_version: impl Into<String>) -> ModelConfig {
        ModelConfig {
            layers: 4,
            decoder_layers: 4,
            heads: 6,
            head_dim: 64,
            d_ff: 1024,
            dropout: 0.1,
            ..ModelConfig::new(vocab, tokenizer_version)
        }
    }

    pub fn levels(&self) -> usize {
        self.vocab.len()
    }

    /// Attention's inner width, which need not equal `d_model` (TIGER: 6×64
    /// against 128).
    pub fn inner(&self) -> usize {
        self.heads * self.head_dim
    }

    /// Rows of level `level`'s prefix table: one per possible prefix of
    /// `level + 1` codes, or `node_buckets` when there are more.
    pub fn node_rows(&self, level: usize) -> usize {
        let mut n = 1usize;
        for &v in &self.vocab[..=level] {
            n = n.saturating_mul(v);
        }
        n.min(self.node_buckets)
    }

    /// Whether level `level`'s output scores code `c` under prefix `p` with
    /// the prefix row of `p + c` added to the code row. A code row is shared
    /// by every prefix (code 17 at level 1 means something different under
    /// each level-0 code), so on its own the output layer has a few hundred
    /// vectors per level to spell twelve thousand items, and the decoder
    /// must carry every item-to-item transition in its weights. Prefix rows
    /// give the output an item-specific vector for items seen in training,
    /// tied to the input side, as item-ID models have. Only exact levels
    /// qualify: a prefix's children are then the contiguous rows
    /// `parent × vocab .. parent × vocab + vocab`, one gather per beam.
    pub fn prefix_scored(&self, level: usize) -> bool {
        self.prefix_output
            && self.vocab[..=level]
                .iter()
                .try_fold(1usize, |n, &v| n.checked_mul(v))
                .is_some_and(|n| n <= self.node_buckets)
    }

    /// Whether level `level`'s output adds each live child's prefix row to
    /// its score from a list of the parent's children: the levels after the
    /// first that are not prefix-scored (with prefix outputs on, those whose
    /// table is hashed), so that no level is left to code rows alone
    /// ([`crate::model::siblings`] says why).
    pub fn sibling_scored(&self, level: usize) -> bool {
        self.sibling_output && level > 0 && !self.prefix_scored(level)
    }

    /// The row of the prefix `codes[..=level]` in level `level`'s prefix
    /// table. Items are embedded as the sum of their prefixes' rows (and
    /// their codes'), so the deepest prefix acts as an item-specific
    /// embedding for items seen in training while a brand-new item still
    /// gets every shallower prefix it shares with known items. Exact where
    /// the table has a row per prefix, hashed where it does not.
    pub fn node_id(&self, codes: &[crate::sid::Code], level: usize) -> u32 {
        // One pass: the mixed-radix index, the number of possible prefixes
        // and a hash; this runs per beam per level.
        let (mut exact, mut size) = (0u64, 1u64);
        let mut hash = 0x9e37_79b9_7f4a_7c15u64;
        for (&c, &v) in codes[..=level].iter().zip(&self.vocab) {
            exact = exact.wrapping_mul(v as u64).wrapping_add(u64::from(c));
            size = size.saturating_mul(v as u64);
            hash = (hash ^ u64::from(c)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            hash ^= hash >> 31;
        }
        let rows = self.node_buckets as u64;
        if size <= rows {
            exact as u32
        } else {
            (hash % rows) as u32
        }
    }

    /// Rejects configs the network cannot be built from, naming the field.
    pub fn validate(&self) -> Result<(), ModelError> {
        let bad = |field: &'static str, why: String| Err(ModelError::Config { field, why });
        if self.vocab.is_empty() || self.vocab.len() > crate::sid::MAX_LEVELS {
            return bad("vocab", format!("{} levels", self.vocab.len()));
        }
        if let Some(v) = self.vocab.iter().find(|&&v| v == 0 || v > 1 << 16) {
            return bad("vocab", format!("a level has {v} codes"));
        }
        for (field, value) in [
            ("d_model", self.d_model),
            ("layers", self.layers),
            ("decoder_layers", self.decoder_layers),
            ("heads", self.heads),
            ("head_dim", self.head_dim),
            ("d_ff", self.d_ff),
            ("max_history", self.max_history),
            ("node_buckets", self.node_buckets),
        ] {
            if value == 0 {
                return bad(field, "must be at least 1".into());
            }
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad("dropout", format!("{} is not in [0, 1)", self.dropout));
        }
        if !(0.0..1.0).contains(&self.transition_weight) {
            return bad(
                "transition_weight",
                format!("{} is not in [0, 1)", self.transition_weight),
            );
        }
        Ok(())
    }

    pub fn load(dir: &Path) -> Result<ModelConfig, ModelError> {
        let path = dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&path).map_err(|source| ModelError::Io {
            path: path.clone(),
            source,
        })?;
        let config: ModelConfig = serde_json::from_str(&text).map_err(|e| ModelError::Parse {
            path,
            why: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    pub fn save(&self, dir: &Path) -> Result<(), ModelError> {
        let path = dir.join(CONFIG_FILE);
        let text = serde_json::to_string_pretty(self).expect("config serialises");
        std::fs::write(&path, text).map_err(|source| ModelError::Io { path, source })
    }
}

/// Why a model could not be built, loaded or run.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("model config: field \"{field}\": {why}")]
    Config { field: &'static str, why: String },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {why}", path.display())]
    Parse { path: PathBuf, why: String },
    #[error("{}: tensor \"{name}\": {why}", path.display())]
    Weights {
        path: PathBuf,
        name: String,
        why: String,
    },
    #[error("request {request}: {why}")]
    Request { request: usize, why: String },
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_rows_are_exact_while_they_fit_and_hashed_in_range_after() {
        let cfg = ModelConfig {
            node_buckets: 100,
            ..ModelConfig::new(vec![8, 8, 16], "t")
        };
        assert_eq!(
            (cfg.node_rows(0), cfg.node_rows(1), cfg.node_rows(2)),
            (8, 64, 100)
        );
        let mut seen = std::collections::HashSet::new();
        for a in 0..8u16 {
            assert_eq!(cfg.node_id(&[a, 0, 0], 0), u32::from(a));
            for b in 0..8u16 {
                assert!(seen.insert(cfg.node_id(&[a, b, 0], 1)), "level 1 is exact");
                for c in 0..16u16 {
                    assert!(cfg.node_id(&[a, b, c], 2) < 100);
                }
            }
        }
        // Hashing depends on the whole prefix, not only its last code.
        let rows: std::collections::HashSet<u32> =
            (0..8u16).map(|a| cfg.node_id(&[a, 3, 5], 2)).collect();
        assert!(rows.len() > 4, "{rows:?}");
    }
}
