//! A catalogue file's items to vectors, by an [`EncoderSpec`].

use indicatif::ProgressBar;

use super::attributes::AttributeEncoder;
use super::text::TextEncoder;
use super::{check_vector, EmbedError, EncoderSpec, Vectors};
use crate::dataset::{FieldType, Items, Value};

/// Which encoder a catalogue gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum EncoderKind {
    /// A `float_seq` column if there is one; text if there is a `title`,
    /// `name` or `description` column; attribute hashing otherwise.
    Auto,
    Text,
    Attributes,
    Precomputed,
}

/// Column names that mark a catalogue as having text worth embedding.
const TEXT_MARKERS: [&str; 3] = ["title", "name", "description"];

/// Resolves `Auto` and picks the fields: the given ones, or every content
/// column of the right type.
pub fn choose(
    items: &Items,
    kind: EncoderKind,
    fields: &[String],
) -> Result<(EncoderKind, Vec<String>), EmbedError> {
    let kind = match kind {
        EncoderKind::Auto if items.columns.iter().any(|c| c.ty == FieldType::FloatSeq) => {
            EncoderKind::Precomputed
        }
        EncoderKind::Auto
            if items
                .columns
                .iter()
                .any(|c| TEXT_MARKERS.contains(&c.name.as_str())) =>
        {
            EncoderKind::Text
        }
        EncoderKind::Auto => EncoderKind::Attributes,
        k => k,
    };
    let fields: Vec<String> = if fields.is_empty() {
        items
            .columns
            .iter()
            .filter(|c| match kind {
                EncoderKind::Precomputed => c.ty == FieldType::FloatSeq,
                _ => matches!(c.ty, FieldType::Token | FieldType::TokenSeq),
            })
            .map(|c| c.name.clone())
            .take(if kind == EncoderKind::Precomputed {
                1
            } else {
                usize::MAX
            })
            .collect()
    } else {
        fields.to_vec()
    };
    if fields.is_empty() {
        return Err(EmbedError::MissingField {
            field: format!("(a column for the {kind:?} encoder)"),
            available: available(items),
        });
    }
    for f in &fields {
        if items.column(f).is_none() {
            return Err(EmbedError::MissingField {
                field: f.clone(),
                available: available(items),
            });
        }
    }
    Ok((kind, fields))
}

fn available(items: &Items) -> String {
    items
        .columns
        .iter()
        .map(|c| c.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The text an item is embedded from: its fields' text joined by ". ".
pub fn item_text(items: &Items, row: usize, fields: &[usize]) -> String {
    join_fields(
        fields
            .iter()
            .filter_map(|&f| items.rows[row].values[f].as_str()),
    )
}

/// Field values joined by ". ", empty ones skipped: the one recipe for the
/// text of an item, offline and live, so that both embed the same string.
pub fn join_fields<'a>(values: impl IntoIterator<Item = &'a str>) -> String {
    let mut text = String::new();
    for s in values {
        let s = s.trim();
        if !s.is_empty() {
            if !text.is_empty() {
                text.push_str(". ");
            }
            text.push_str(s);
        }
    }
    text
}

/// Encodes every item of `items` as `spec` says. `text` must be the model the
/// spec names when the spec is a text one.
pub fn encode_items(
    items: &Items,
    spec: &EncoderSpec,
    text: Option<&TextEncoder>,
    progress: &ProgressBar,
) -> Result<Vectors, EmbedError> {
    let index = |field: &String| {
        items.column(field).ok_or_else(|| EmbedError::MissingField {
            field: field.clone(),
            available: available(items),
        })
    };
    let n = items.rows.len();
    progress.set_length(n as u64);
    match spec {
        EncoderSpec::Precomputed { field, dim } | EncoderSpec::Collaborative { field, dim, .. } => {
            let f = index(field)?;
            let mut data = Vec::with_capacity(n * dim);
            for row in &items.rows {
                let Value::FloatSeq(v) = &row.values[f] else {
                    return Err(EmbedError::FieldType {
                        item: row.id.clone(),
                        field: field.clone(),
                        expected: "float_seq",
                    });
                };
                check_vector(&row.id, field, v, *dim)?;
                data.extend_from_slice(v);
                progress.inc(1);
            }
            Ok(Vectors::new(*dim, data))
        }
        EncoderSpec::Attributes { fields, dim, seed } => {
            let cols = fields.iter().map(index).collect::<Result<Vec<_>, _>>()?;
            let enc = AttributeEncoder::new(*dim, *seed);
            let mut data = vec![0.0; n * dim];
            for (row, out) in items.rows.iter().zip(data.chunks_mut(*dim)) {
                let tokens = cols.iter().zip(fields).flat_map(|(&c, name)| {
                    row.values[c]
                        .tokens()
                        .into_iter()
                        .flatten()
                        .map(move |t| (name.as_str(), t))
                });
                enc.encode(tokens, out);
                progress.inc(1);
            }
            Ok(Vectors::new(*dim, data))
        }
        EncoderSpec::Text { model, fields, dim } => {
            let Some(text) = text else {
                return Err(EmbedError::WrongModel {
                    model: model.clone(),
                    found: "no text encoder".into(),
                });
            };
            if text.model_id() != model.as_str() {
                return Err(EmbedError::WrongModel {
                    model: model.clone(),
                    found: text.model_id().to_string(),
                });
            }
            let cols = fields.iter().map(index).collect::<Result<Vec<_>, _>>()?;
            let texts: Vec<String> = (0..n).map(|i| item_text(items, i, &cols)).collect();
            let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
            let data = text.encode_all(&refs, 64, |done| progress.set_position(done as u64))?;
            Ok(Vectors::new(*dim, data))
        }
        EncoderSpec::Interactions { .. } => Err(EmbedError::MissingField {
            field:
                "(interactions: the SVD tokenizer places items by their users, not their content)"
                    .into(),
            available: available(items),
        }),
    }
}
