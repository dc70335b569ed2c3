//! A catalogue upsert's content, turned into the vector its tokenizer reads.
//!
//! The tokenizer's manifest says how its training items were embedded
//! ([`EncoderSpec`]); a live item must be embedded the same way, or its
//! vector lands in the wrong codes. An upsert carries either a ready
//! embedding (checked for dimension, finiteness and a direction: all zeros
//! is a producer's placeholder for "none", and the tokenizer would give it
//! a confident SID all the same) or text fields, joined in
//! the order the manifest lists them and run through the same sentence
//! encoder. Under a collaborative tokenizer an upsert without an embedding
//! is a new item nobody has touched: its content is embedded as the
//! tokenizer's content map reads it, and the map predicts the vector.
//! Whatever cannot be made into a vector is an error that names the item and
//! the field, for the dead-letter topic.

use sha2::{Digest, Sha256};

use crate::catalogue::vector_hash;
use crate::contract::ItemUpsert;
use crate::embed::attributes::AttributeEncoder;
use crate::embed::catalogue::join_fields;
use crate::embed::text::TextEncoder;
use crate::embed::{check_vector, EncoderSpec};
use crate::tokenizer::FrozenTokenizer;

#[derive(Debug, thiserror::Error)]
pub enum ContentError {
    #[error("item {item:?}: field \"embedding\" is null and this tokenizer ({spec}) needs one")]
    NeedsEmbedding { item: String, spec: &'static str },
    #[error(
        "item {item:?}: field \"embedding\" is null and the text fields {fields:?} are all empty"
    )]
    NoText { item: String, fields: Vec<String> },
    #[error(
        "item {item:?}: has text to embed but no sentence encoder is configured (paths.text_model)"
    )]
    NoEncoder { item: String },
    #[error(transparent)]
    Vector(#[from] Box<crate::embed::EmbedError>),
    #[error("item {item:?}: field \"embedding\" is all zeros; an item without one sends null")]
    ZeroEmbedding { item: String },
    #[error("item {item:?}: embedding its text failed: {source}")]
    Encode {
        item: String,
        source: Box<crate::embed::text::TextEncoderError>,
    },
}

/// What the registry compares to tell a replay from a change, and what the
/// tokenizer needs if it is a change.
#[derive(Debug)]
pub enum Content {
    Vector(Vec<f32>),
    Text(String),
    /// Content from which a collaborative tokenizer predicts the vector it
    /// reads ([`FrozenTokenizer::predict_collaborative`]): a new item has
    /// no interactions yet.
    Predicted(Box<Content>),
}

impl Content {
    pub fn hash(&self) -> [u8; 32] {
        match self {
            Content::Vector(v) => vector_hash(v),
            Content::Text(t) => Sha256::digest(t.as_bytes()).into(),
            Content::Predicted(c) => c.hash(),
        }
    }
}

/// Checks an upsert's content against what the tokenizer reads. Cheap: text
/// is only embedded later, if the registry needs a new SID.
pub fn content(up: &ItemUpsert, spec: &EncoderSpec) -> Result<Content, ContentError> {
    let item = &up.item_id;
    if let Some(v) = &up.embedding {
        check_vector(item, "embedding", v, spec.dim()).map_err(Box::new)?;
        if v.iter().all(|&x| x == 0.0) {
            return Err(ContentError::ZeroEmbedding { item: item.clone() });
        }
        return Ok(Content::Vector(v.clone()));
    }
    match spec {
        EncoderSpec::Text { fields, .. } => {
            let text = text_of(up, fields);
            if text.is_empty() {
                return Err(ContentError::NoText {
                    item: item.clone(),
                    fields: fields.clone(),
                });
            }
            Ok(Content::Text(text))
        }
        EncoderSpec::Precomputed { .. } => Err(ContentError::NeedsEmbedding {
            item: item.clone(),
            spec: "a precomputed embedding",
        }),
        EncoderSpec::Attributes { fields, dim, seed } => {
            let texts: Vec<String> = fields.iter().map(|f| field_text(up, f)).collect();
            let tokens = fields
                .iter()
                .zip(&texts)
                .flat_map(|(f, t)| t.split_whitespace().map(move |tok| (f.as_str(), tok)));
            if texts.iter().all(|t| t.trim().is_empty()) {
                return Err(ContentError::NoText {
                    item: item.clone(),
                    fields: fields.clone(),
                });
            }
            let mut v = vec![0.0; *dim];
            AttributeEncoder::new(*dim, *seed).encode(tokens, &mut v);
            Ok(Content::Vector(v))
        }
        EncoderSpec::Collaborative { content: inner, .. } => {
            Ok(Content::Predicted(Box::new(content(up, inner)?)))
        }
        EncoderSpec::Interactions { .. } => Err(ContentError::NeedsEmbedding {
            item: item.clone(),
            spec: "interaction factors",
        }),
    }
}

/// The vector `tokenizer` quantises for checked content.
pub fn vector(
    item: &str,
    content: &Content,
    encoder: Option<&TextEncoder>,
    tokenizer: &FrozenTokenizer,
) -> Result<Vec<f32>, ContentError> {
    match content {
        Content::Vector(v) => Ok(v.clone()),
        Content::Predicted(c) => {
            let v = vector(item, c, encoder, tokenizer)?;
            Ok(tokenizer
                .predict_collaborative(item, &v)
                .map_err(Box::new)?)
        }
        Content::Text(t) => {
            let enc = encoder.ok_or_else(|| ContentError::NoEncoder {
                item: item.to_string(),
            })?;
            enc.encode(&[t.as_str()])
                .map_err(|source| ContentError::Encode {
                    item: item.to_string(),
                    source: Box::new(source),
                })
        }
    }
}

/// The upsert's text in the manifest's field order, joined with ". " as the
/// training items' text was ([`crate::embed::catalogue::item_text`]).
pub fn text_of(up: &ItemUpsert, fields: &[String]) -> String {
    let values: Vec<String> = fields.iter().map(|f| field_text(up, f)).collect();
    join_fields(values.iter().map(String::as_str))
}

/// The value of the item-file column `name` as an upsert carries it: the
/// named fields, categories joined with ", " (as RecBole files spell them),
/// any other column from the attributes map under its own name (or, for
/// `attributes` itself, the map's values in key order).
pub fn field_text(up: &ItemUpsert, name: &str) -> String {
    match name {
        "title" => up.title.clone().unwrap_or_default(),
        "description" => up.description.clone().unwrap_or_default(),
        "brand" => up.brand.clone().unwrap_or_default(),
        "categories" => up.categories.join(", "),
        other => match up.attributes.get(other) {
            Some(v) => v.clone(),
            None if other == "attributes" => up
                .attributes
                .values()
                .cloned()
                .collect::<Vec<_>>()
                .join(" "),
            None => String::new(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upsert() -> ItemUpsert {
        ItemUpsert {
            item_id: "i".into(),
            title: Some("Red shoe".into()),
            categories: vec!["Shoes".into(), "Red".into()],
            attributes: [("attributes".to_string(), "attr1 attr2".to_string())].into(),
            ..Default::default()
        }
    }

    #[test]
    fn text_follows_the_manifest_fields_as_item_files_spell_them() {
        let fields = ["title", "categories", "attributes", "missing"].map(String::from);
        assert_eq!(
            text_of(&upsert(), &fields),
            "Red shoe. Shoes, Red. attr1 attr2"
        );
    }

    #[test]
    fn attribute_content_is_the_training_encoding_and_empty_content_is_named() {
        let spec = EncoderSpec::Attributes {
            fields: vec!["attributes".into()],
            dim: 32,
            seed: 7,
        };
        let Content::Vector(v) = content(&upsert(), &spec).unwrap() else {
            panic!("attributes make a vector")
        };
        let mut want = vec![0.0; 32];
        AttributeEncoder::new(32, 7).encode(
            [("attributes", "attr1"), ("attributes", "attr2")],
            &mut want,
        );
        assert_eq!(v, want);
        let bare = ItemUpsert {
            item_id: "bare".into(),
            ..Default::default()
        };
        let err = content(&bare, &spec).unwrap_err();
        assert!(err.to_string().contains("\"bare\""), "{err}");
        let err = content(
            &bare,
            &EncoderSpec::Precomputed {
                field: "embedding".into(),
                dim: 4,
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("\"embedding\""), "{err}");
    }

    #[test]
    fn an_all_zero_embedding_is_refused_naming_item_and_field() {
        let spec = EncoderSpec::Precomputed {
            field: "embedding".into(),
            dim: 3,
        };
        let with = |v: Vec<f32>| ItemUpsert {
            item_id: "z".into(),
            embedding: Some(v),
            ..Default::default()
        };
        let err = content(&with(vec![0.0, -0.0, 0.0]), &spec).unwrap_err();
        assert!(matches!(err, ContentError::ZeroEmbedding { .. }), "{err}");
        assert_eq!(
            err.to_string(),
            "item \"z\": field \"embedding\" is all zeros; an item without one sends null"
        );
        assert!(content(&with(vec![0.0, 1e-30, 0.0]), &spec).is_ok());
    }
}
