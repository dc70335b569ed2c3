//! Item content to vectors: the input of the semantic-ID tokenizer.
//!
//! An item reaches the tokenizer as a fixed-length vector. Where that vector comes
//! from depends on what the catalogue knows about its items, and the choice is
//! written into the tokenizer's manifest as an [`EncoderSpec`] so that the frozen
//! tokenizer, applied months later in another process, turns content into vectors
//! exactly as training did:
//!
//! - [`EncoderSpec::Precomputed`]: the event or file carries a ready embedding; it
//!   is checked (dimension, finiteness) and used as it is.
//! - [`EncoderSpec::Text`]: title, description and the like are joined and run
//!   through a local sentence encoder ([`text::TextEncoder`], all-MiniLM-L6-v2 by
//!   default). Nothing is fetched at run time: the model lives in a directory.
//! - [`EncoderSpec::Attributes`]: items known only by categorical attribute ids
//!   (brand and category codes) get a deterministic hashed encoding
//!   ([`attributes`]).
//! - [`EncoderSpec::Collaborative`]: a collaborative vector (who interacted
//!   with the item, from `tokenizer embed-interactions`) where the item has
//!   one; an item that has none, because it is new, gets the one its content
//!   predicts through a linear map the tokenizer stores, so a catalogue
//!   event with content alone still lands among the items people treat alike.
//! - [`EncoderSpec::Interactions`]: no content at all; the vector is the item's
//!   factor in a truncated SVD of the user–item matrix (GPTRec), computed by the
//!   tokenizer itself.

pub mod attributes;
pub mod catalogue;
pub mod ridge;
pub mod text;
pub mod tfidf;

use serde::{Deserialize, Serialize};

/// A row-major matrix of item vectors, one row per item.
#[derive(Clone, Debug, PartialEq)]
pub struct Vectors {
    dim: usize,
    data: Vec<f32>,
}

impl Vectors {
    /// Wraps `data` as rows of `dim` values. `data.len()` must be a multiple of
    /// `dim`.
    pub fn new(dim: usize, data: Vec<f32>) -> Vectors {
        assert!(dim > 0 && data.len() % dim == 0, "ragged vector matrix");
        Vectors { dim, data }
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn rows(&self) -> usize {
        self.data.len() / self.dim
    }

    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.dim..(i + 1) * self.dim]
    }

    pub fn as_slice(&self) -> &[f32] {
        &self.data
    }

    pub fn into_vec(self) -> Vec<f32> {
        self.data
    }
}

/// How item content becomes a vector; stored in the tokenizer manifest.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum EncoderSpec {
    /// A ready embedding from a `float_seq` column or an event field.
    Precomputed { field: String, dim: usize },
    /// Text fields joined with ". " and embedded by a sentence encoder. `model`
    /// is the encoder's identity (name and weight digest): a tokenizer refuses a
    /// different model, whose vectors would land in the wrong codes.
    Text {
        model: String,
        fields: Vec<String>,
        dim: usize,
    },
    /// Categorical tokens hashed into a fixed dimension (see [`attributes`]).
    Attributes {
        fields: Vec<String>,
        dim: usize,
        seed: u64,
    },
    /// A collaborative vector read from `field` where the item has one;
    /// otherwise `content` encodes the item and the tokenizer's content map
    /// (weights `content_map.weight`, `content_map.bias`) predicts it.
    Collaborative {
        field: String,
        dim: usize,
        content: Box<EncoderSpec>,
    },
    /// Item factors of a truncated SVD of the user–item matrix.
    Interactions { dim: usize },
}

impl EncoderSpec {
    /// The dimension of the vectors this encoder produces.
    pub fn dim(&self) -> usize {
        match self {
            EncoderSpec::Precomputed { dim, .. }
            | EncoderSpec::Text { dim, .. }
            | EncoderSpec::Attributes { dim, .. }
            | EncoderSpec::Collaborative { dim, .. }
            | EncoderSpec::Interactions { dim } => *dim,
        }
    }
}

/// Why content could not become a vector. Every variant names the item.
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    #[error("item {item:?}: field {field:?} has {found} values, expected {expected}")]
    Dimension {
        item: String,
        field: String,
        expected: usize,
        found: usize,
    },
    #[error("item {item:?}: field {field:?} has a non-finite value ({value}) at position {index}")]
    NotFinite {
        item: String,
        field: String,
        index: usize,
        value: f32,
    },
    #[error("the item file has no column {field:?} (columns: {available})")]
    MissingField { field: String, available: String },
    #[error("item {item:?}: field {field:?} is not of the expected type ({expected})")]
    FieldType {
        item: String,
        field: String,
        expected: &'static str,
    },
    #[error("item {item:?}: has no collaborative vector, and this tokenizer has no content map to predict one (train it with --content-map)")]
    NoContentMap { item: String },
    #[error(transparent)]
    Text(#[from] text::TextEncoderError),
    #[error("this catalogue needs the text encoder {model:?}, but {found:?} was loaded")]
    WrongModel { model: String, found: String },
}

/// Checks a precomputed embedding: the tokenizer's arithmetic assumes finite
/// values of one dimension, and one NaN would poison every distance it touches.
pub fn check_vector(item: &str, field: &str, v: &[f32], dim: usize) -> Result<(), EmbedError> {
    if v.len() != dim {
        return Err(EmbedError::Dimension {
            item: item.to_string(),
            field: field.to_string(),
            expected: dim,
            found: v.len(),
        });
    }
    if let Some((index, &value)) = v.iter().enumerate().find(|(_, x)| !x.is_finite()) {
        return Err(EmbedError::NotFinite {
            item: item.to_string(),
            field: field.to_string(),
            index,
            value,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_vector_names_item_and_field() {
        assert!(check_vector("a", "embedding", &[0.0, 1.0], 2).is_ok());
        let err = check_vector("item-7", "embedding", &[0.0], 2).unwrap_err();
        assert_eq!(
            err.to_string(),
            "item \"item-7\": field \"embedding\" has 1 values, expected 2"
        );
        let err = check_vector("item-8", "embedding", &[0.0, f32::NAN], 2).unwrap_err();
        assert!(
            matches!(err, EmbedError::NotFinite { index: 1, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("item-8"));
    }

    #[test]
    fn spec_round_trips_through_json() {
        let spec = EncoderSpec::Attributes {
            fields: vec!["attributes".into()],
            dim: 128,
            seed: 7,
        };
        let json = serde_json::to_string(&spec).unwrap();
        assert!(json.contains("\"kind\":\"attributes\""), "{json}");
        assert_eq!(serde_json::from_str::<EncoderSpec>(&json).unwrap(), spec);
    }
}
