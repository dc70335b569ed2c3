//! A catalogue upsert's content, turned into the vector its tokenizer reads.
//!
//! The tokenizer's manifest says how its training items were embedded
//! ([`EncoderSpec`]); a live item must be embedded the same way, or its
//! vector lands in the wrong codes. An upsert carries either a ready
//! embedding (checked for dimension and finiteness) or text fields, joined in
//! the order the manifest lists them and run through the same sentence
//! encoder. Whatever cannot be made into a vector is an error that names the
//! item and the field, for the dead-letter topic.

use sha2::{Digest, Sha256};

use crate::catalogue::vector_hash;
use crate::contract::ItemUpsert;
use crate::embed::text::TextEncoder;
use crate::embed::{check_vector, EncoderSpec};

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
    #[error("item {item:?}: embedding its text failed: {source}")]
    Encode {
        item: String,
        source: Box<crate::embed::text::TextEncoderError>,
    },
}

/// What the registry compares to tell a replay from a change, and what the
/// tokenizer needs if it is a change.
pub enum Content {
    Vector(Vec<f32>),
    Text(String),
}

impl Content {
    pub fn hash(&self) -> [u8; 32] {
        match self {
            Content::Vector(v) => vector_hash(v),
            Content::Text(t) => Sha256::digest(t.as_bytes()).into(),
        }
    }
}

/// Checks an upsert's content against what the tokenizer reads. Cheap: text
/// is only embedded later, if the registry needs a new SID.
pub fn content(up: &ItemUpsert, spec: &EncoderSpec) -> Result<Content, ContentError> {
    let item = &up.item_id;
    if let Some(v) = &up.embedding {
        check_vector(item, "embedding", v, spec.dim()).map_err(Box::new)?;
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
        EncoderSpec::Attributes { .. } => Err(ContentError::NeedsEmbedding {
            item: item.clone(),
            spec: "hashed attributes",
        }),
        EncoderSpec::Interactions { .. } => Err(ContentError::NeedsEmbedding {
            item: item.clone(),
            spec: "interaction factors",
        }),
    }
}

/// The vector of checked content.
pub fn vector(
    item: &str,
    content: &Content,
    encoder: Option<&TextEncoder>,
) -> Result<Vec<f32>, ContentError> {
    match content {
        Content::Vector(v) => Ok(v.clone()),
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
/// Categories are joined with ", " and attribute values with " ", the way
/// RecBole files spell token sequences.
pub fn text_of(up: &ItemUpsert, fields: &[String]) -> String {
    let mut text = String::new();
    let mut push = |s: &str| {
        let s = s.trim();
        if !s.is_empty() {
            if !text.is_empty() {
                text.push_str(". ");
            }
            text.push_str(s);
        }
    };
    for f in fields {
        match f.as_str() {
            "title" => push(up.title.as_deref().unwrap_or("")),
            "description" => push(up.description.as_deref().unwrap_or("")),
            "brand" => push(up.brand.as_deref().unwrap_or("")),
            "categories" => push(&up.categories.join(", ")),
            "attributes" => {
                let values: Vec<&str> = up.attributes.values().map(String::as_str).collect();
                push(&values.join(" "))
            }
            other => push(up.attributes.get(other).map(String::as_str).unwrap_or("")),
        }
    }
    text
}
