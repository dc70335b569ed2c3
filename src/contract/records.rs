//! The Rust side of each schema, and the checks Avro cannot express.
//!
//! Field names and order match the `.avsc` files exactly: serde maps a struct
//! to an Avro record by field name, an `Option<T>` to a `["null", T]` union, a
//! unit-only enum to an Avro enum by symbol and a newtype-variant enum to a
//! union by branch position. Maps are `BTreeMap`s so that the same value always
//! encodes to the same bytes (useful for replay and compaction checks).

use std::collections::BTreeMap;

use apache_avro::Schema;
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use super::{error::DecodeError, schemas};

/// A Rust type that is one record of the contract.
///
/// This ties a type to its schema so that [`encode`](super::encode) and
/// [`decode`](super::decode) need no schema argument, and carries the semantic
/// checks that run after every decode and before every encode.
pub trait Record: Serialize + DeserializeOwned {
    /// The record's full Avro name, e.g. `genfeed.v1.Interaction`.
    const NAME: &'static str;

    /// The schema this type reads and writes (the reader schema on decode).
    fn schema() -> &'static Schema;

    /// Checks what the schema cannot: e.g. that identifiers are non-empty.
    fn validate(&self) -> Result<(), Violation> {
        Ok(())
    }

    /// Checks the sizes a reader's [`Limits`] allow. Avro bounds none: a
    /// 1 MiB user id is a valid datum, and it would become a key, a history
    /// entry and a feed that no topic accepts.
    fn within(&self, _limits: &Limits) -> Result<(), Violation> {
        Ok(())
    }
}

/// The largest ids and texts a reader accepts, in bytes (UTF-8).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// A user or item id.
    pub id_bytes: usize,
    /// One text field (title, description, brand, a retire reason), or all
    /// of an item's categories, or all of its attributes, together.
    pub text_bytes: usize,
}

impl Limits {
    fn id(&self, field: &'static str, value: &str) -> Result<(), Violation> {
        at_most(field, value.len(), self.id_bytes)
    }

    fn text(&self, field: &'static str, len: usize) -> Result<(), Violation> {
        at_most(field, len, self.text_bytes)
    }
}

/// The detail names the size and the limit, never the value: a value over
/// its limit is too large to echo.
fn at_most(field: &'static str, len: usize, limit: usize) -> Result<(), Violation> {
    if len > limit {
        Err(Violation {
            field,
            detail: format!("{len} bytes, over the limit of {limit}"),
        })
    } else {
        Ok(())
    }
}

/// A value that is well-formed Avro but breaks a rule of the contract.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// The offending field, as a path from the record (`items.item_id`).
    pub field: &'static str,
    /// What is wrong with it.
    pub detail: String,
}

/// Rejects empty identifiers, which would silently merge unrelated users or
/// items downstream (keys, registry, histories), and identifiers that start
/// with a NUL byte, which the service keeps for its own keys (end markers,
/// bookkeeping beside the histories).
fn non_empty(field: &'static str, value: &str) -> Result<(), Violation> {
    let detail = if value.is_empty() {
        "must not be empty"
    } else if value.starts_with('\0') {
        "must not start with a NUL byte (reserved for genfeed's own keys)"
    } else {
        return Ok(());
    };
    Err(Violation {
        field,
        detail: detail.to_string(),
    })
}

/// An envelope on the catalogue topic.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CatalogueEvent {
    pub change: ItemChange,
}

/// What happened to an item. Variant order is the union's branch order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ItemChange {
    Upsert(ItemUpsert),
    Retire(ItemRetire),
}

impl CatalogueEvent {
    /// The item this event is about, whichever change it is.
    pub fn item_id(&self) -> &str {
        match &self.change {
            ItemChange::Upsert(upsert) => &upsert.item_id,
            ItemChange::Retire(retire) => &retire.item_id,
        }
    }

    /// The retirement a catalogue tombstone stands for: a record with a
    /// null value, keyed by the item's id.
    ///
    /// On a compacted topic a tombstone deletes its key's earlier records,
    /// so a reader that starts after compaction never sees the item. A
    /// reader that kept the item live would then disagree with every later
    /// one; retiring it keeps them all the same. The key must be an id as
    /// the contract spells one; errors name the field `key`.
    pub fn tombstone(key: Option<&[u8]>, limits: &Limits) -> Result<CatalogueEvent, DecodeError> {
        let invalid = |v: Violation| DecodeError::Invalid {
            record: Self::NAME,
            field: v.field,
            detail: v.detail,
        };
        let key = key.ok_or(DecodeError::KeylessTombstone)?;
        at_most("key", key.len(), limits.id_bytes).map_err(|v| DecodeError::OverLimit {
            record: Self::NAME,
            field: v.field,
            detail: v.detail,
        })?;
        let item_id = std::str::from_utf8(key).map_err(|e| {
            invalid(Violation {
                field: "key",
                detail: format!("a tombstone's key names the item it retires, in UTF-8: {e}"),
            })
        })?;
        non_empty("key", item_id).map_err(invalid)?;
        Ok(CatalogueEvent {
            change: ItemChange::Retire(ItemRetire {
                item_id: item_id.to_owned(),
                reason: "tombstone".to_owned(),
            }),
        })
    }
}

/// An item was created or its content changed.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ItemUpsert {
    pub item_id: String,
    pub title: Option<String>,
    pub description: Option<String>,
    pub brand: Option<String>,
    pub categories: Vec<String>,
    pub attributes: BTreeMap<String, String>,
    /// A ready content embedding; `None` means "embed the text".
    pub embedding: Option<Vec<f32>>,
}

/// An item left the catalogue.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItemRetire {
    pub item_id: String,
    pub reason: String,
}

/// A user acted on an item.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interaction {
    pub user_id: String,
    pub item_id: String,
    pub kind: InteractionKind,
    /// Milliseconds since the Unix epoch (Avro `timestamp-millis`).
    pub timestamp: i64,
}

/// The kind of an interaction. Variant order is the enum's symbol order.
///
/// Writers may gain symbols before this reader does; schema resolution maps
/// those to the enum's default, [`InteractionKind::Other`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum InteractionKind {
    View,
    Click,
    AddToCart,
    Purchase,
    Rating,
    Other,
}

/// A user's ranked feed, best first.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Recommendation {
    pub user_id: String,
    pub items: Vec<RankedItem>,
    pub model_version: String,
    pub tokenizer_version: String,
    /// Milliseconds since the Unix epoch (Avro `timestamp-millis`).
    pub generated_at: i64,
    /// The input message whose processing produced this feed.
    pub trigger: InputPosition,
}

/// One recommended item.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RankedItem {
    pub item_id: String,
    /// The item's semantic ID, one codebook token per level. Avro has no
    /// unsigned types; `u16` keeps tokens non-negative and a decode of an
    /// out-of-range `int` fails instead of wrapping.
    pub sid: Vec<u16>,
    pub score: f32,
}

/// A position in a Kafka topic.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputPosition {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// An input message that could not be processed, kept verbatim.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub source_topic: String,
    pub partition: i32,
    pub offset: i64,
    pub reason: String,
    /// Without this attribute serde would write `Vec<u8>` as an Avro array
    /// of ints, not as `bytes`.
    #[serde(with = "apache_avro::serde::bytes")]
    pub raw: Vec<u8>,
    /// Milliseconds since the Unix epoch (Avro `timestamp-millis`).
    pub failed_at: i64,
}

impl Record for CatalogueEvent {
    const NAME: &'static str = "genfeed.v1.CatalogueEvent";

    fn schema() -> &'static Schema {
        &schemas::CATALOGUE_EVENT
    }

    fn validate(&self) -> Result<(), Violation> {
        non_empty("change.item_id", self.item_id())
    }

    fn within(&self, limits: &Limits) -> Result<(), Violation> {
        limits.id("change.item_id", self.item_id())?;
        match &self.change {
            ItemChange::Upsert(u) => {
                let texts = [
                    ("change.title", &u.title),
                    ("change.description", &u.description),
                    ("change.brand", &u.brand),
                ];
                for (field, text) in texts {
                    limits.text(field, text.as_deref().map_or(0, str::len))?;
                }
                let categories = u.categories.iter().map(String::len).sum();
                limits.text("change.categories", categories)?;
                let attributes = u.attributes.iter().map(|(k, v)| k.len() + v.len()).sum();
                limits.text("change.attributes", attributes)
            }
            ItemChange::Retire(r) => limits.text("change.reason", r.reason.len()),
        }
    }
}

impl Record for ItemUpsert {
    const NAME: &'static str = "genfeed.v1.ItemUpsert";

    fn schema() -> &'static Schema {
        &schemas::ITEM_UPSERT
    }

    fn validate(&self) -> Result<(), Violation> {
        non_empty("item_id", &self.item_id)
    }
}

impl Record for ItemRetire {
    const NAME: &'static str = "genfeed.v1.ItemRetire";

    fn schema() -> &'static Schema {
        &schemas::ITEM_RETIRE
    }

    fn validate(&self) -> Result<(), Violation> {
        non_empty("item_id", &self.item_id)
    }
}

impl Record for Interaction {
    const NAME: &'static str = "genfeed.v1.Interaction";

    fn schema() -> &'static Schema {
        &schemas::INTERACTION
    }

    fn validate(&self) -> Result<(), Violation> {
        non_empty("user_id", &self.user_id)?;
        non_empty("item_id", &self.item_id)
    }

    fn within(&self, limits: &Limits) -> Result<(), Violation> {
        limits.id("user_id", &self.user_id)?;
        limits.id("item_id", &self.item_id)
    }
}

impl Record for Recommendation {
    const NAME: &'static str = "genfeed.v1.Recommendation";

    fn schema() -> &'static Schema {
        &schemas::RECOMMENDATION
    }

    fn validate(&self) -> Result<(), Violation> {
        non_empty("user_id", &self.user_id)?;
        match self.items.iter().position(|item| item.item_id.is_empty()) {
            Some(i) => Err(Violation {
                field: "items.item_id",
                detail: format!("item {i} has an empty item_id"),
            }),
            None => Ok(()),
        }
    }
}

impl Record for DeadLetter {
    const NAME: &'static str = "genfeed.v1.DeadLetter";

    fn schema() -> &'static Schema {
        &schemas::DEAD_LETTER
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fullname<T: Record>() -> String {
        T::schema()
            .name()
            .expect("records are named")
            .fullname(None)
    }

    #[test]
    fn names_agree_with_schemas() {
        assert_eq!(fullname::<CatalogueEvent>(), CatalogueEvent::NAME);
        assert_eq!(fullname::<ItemUpsert>(), ItemUpsert::NAME);
        assert_eq!(fullname::<ItemRetire>(), ItemRetire::NAME);
        assert_eq!(fullname::<Interaction>(), Interaction::NAME);
        assert_eq!(fullname::<Recommendation>(), Recommendation::NAME);
        assert_eq!(fullname::<DeadLetter>(), DeadLetter::NAME);
    }

    /// The Rust enum and the Avro enum must list symbols in the same order,
    /// since serde and Avro both identify a variant by its position.
    #[test]
    fn interaction_kind_symbols_match_variant_order() {
        let Schema::Record(record) = Interaction::schema() else {
            panic!("Interaction is a record");
        };
        let kind = &record.fields[record.lookup["kind"]].schema;
        let Schema::Enum(kind) = kind else {
            panic!("kind is an enum");
        };
        let variants = [
            InteractionKind::View,
            InteractionKind::Click,
            InteractionKind::AddToCart,
            InteractionKind::Purchase,
            InteractionKind::Rating,
            InteractionKind::Other,
        ];
        assert_eq!(kind.symbols.len(), variants.len());
        for (symbol, variant) in kind.symbols.iter().zip(variants) {
            let json = serde_json::to_value(variant).expect("serializes");
            assert_eq!(json.as_str(), Some(symbol.as_str()));
        }
        assert_eq!(kind.default.as_deref(), Some("OTHER"));
    }

    #[test]
    fn empty_identifiers_are_violations() {
        let interaction = Interaction {
            user_id: "u".to_string(),
            item_id: String::new(),
            kind: InteractionKind::View,
            timestamp: 0,
        };
        assert_eq!(interaction.validate().unwrap_err().field, "item_id");
        let reserved = Interaction {
            user_id: "\0changelog/".to_string(),
            item_id: "i".to_string(),
            ..interaction
        };
        let err = reserved.validate().unwrap_err();
        assert_eq!(err.field, "user_id");
        assert!(err.detail.contains("NUL"), "{err:?}");

        let event = CatalogueEvent {
            change: ItemChange::Retire(ItemRetire::default()),
        };
        assert_eq!(event.validate().unwrap_err().field, "change.item_id");

        let rec = Recommendation {
            user_id: "u".to_string(),
            items: vec![
                RankedItem {
                    item_id: "a".to_string(),
                    sid: vec![1],
                    score: 0.0,
                },
                RankedItem {
                    item_id: String::new(),
                    sid: vec![2],
                    score: 0.0,
                },
            ],
            model_version: "m".to_string(),
            tokenizer_version: "t".to_string(),
            generated_at: 0,
            trigger: InputPosition {
                topic: "t".to_string(),
                partition: 0,
                offset: 0,
            },
        };
        let violation = rec.validate().unwrap_err();
        assert_eq!(violation.field, "items.item_id");
        assert!(violation.detail.contains("item 1"), "{}", violation.detail);
    }
}
