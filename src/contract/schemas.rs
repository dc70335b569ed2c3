//! The `.avsc` files under `schemas/`, compiled into the binary.
//!
//! The files are the contract; the Rust types in `records`
//! follow them, never the other way round. Embedding them with `include_str!`
//! means a deployed binary carries exactly the schemas it was tested with, and
//! parsing them once (lazily) keeps the hot path free of JSON.

use std::sync::LazyLock;

use apache_avro::Schema;

/// `CatalogueEvent.avsc`, which also defines `ItemUpsert` and `ItemRetire`
/// inline so that it is self-contained for consumers in any language.
pub const CATALOGUE_EVENT_JSON: &str = include_str!("../../schemas/CatalogueEvent.avsc");
/// `Interaction.avsc`.
pub const INTERACTION_JSON: &str = include_str!("../../schemas/Interaction.avsc");
/// `Recommendation.avsc`, which defines `RankedItem` and `InputPosition`.
pub const RECOMMENDATION_JSON: &str = include_str!("../../schemas/Recommendation.avsc");
/// `DeadLetter.avsc`.
pub const DEAD_LETTER_JSON: &str = include_str!("../../schemas/DeadLetter.avsc");

pub(crate) static CATALOGUE_EVENT: LazyLock<Schema> =
    LazyLock::new(|| parse("CatalogueEvent.avsc", CATALOGUE_EVENT_JSON));
pub(crate) static ITEM_UPSERT: LazyLock<Schema> =
    LazyLock::new(|| change_branch("genfeed.v1.ItemUpsert"));
pub(crate) static ITEM_RETIRE: LazyLock<Schema> =
    LazyLock::new(|| change_branch("genfeed.v1.ItemRetire"));
pub(crate) static INTERACTION: LazyLock<Schema> =
    LazyLock::new(|| parse("Interaction.avsc", INTERACTION_JSON));
pub(crate) static RECOMMENDATION: LazyLock<Schema> =
    LazyLock::new(|| parse("Recommendation.avsc", RECOMMENDATION_JSON));
pub(crate) static DEAD_LETTER: LazyLock<Schema> =
    LazyLock::new(|| parse("DeadLetter.avsc", DEAD_LETTER_JSON));

/// Parses an embedded schema.
///
/// The input is a compile-time constant, so a failure is a bug in the
/// repository (caught by the tests), not a runtime condition to recover from.
fn parse(file: &str, json: &str) -> Schema {
    match Schema::parse_str(json) {
        Ok(schema) => schema,
        Err(err) => panic!("embedded schema {file} is invalid: {err}"),
    }
}

/// Returns the branch of `CatalogueEvent.change` named `fullname`.
///
/// `ItemUpsert` and `ItemRetire` are defined once, inside the envelope; taking
/// their schemas from there means the standalone records can never drift from
/// what travels on the catalogue topic.
fn change_branch(fullname: &str) -> Schema {
    let Schema::Record(event) = &*CATALOGUE_EVENT else {
        panic!("CatalogueEvent.avsc must define a record");
    };
    let Some(Schema::Union(change)) = event.fields.first().map(|f| &f.schema) else {
        panic!("CatalogueEvent.change must be a union");
    };
    change
        .variants()
        .iter()
        .find(|branch| branch.name().is_some_and(|n| n.fullname(None) == fullname))
        .cloned()
        .unwrap_or_else(|| panic!("CatalogueEvent.change has no branch {fullname}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fullname(schema: &Schema) -> String {
        schema.name().expect("a named schema").fullname(None)
    }

    #[test]
    fn every_schema_parses_and_is_named_in_the_v1_namespace() {
        let all = [
            (&*CATALOGUE_EVENT, "genfeed.v1.CatalogueEvent"),
            (&*ITEM_UPSERT, "genfeed.v1.ItemUpsert"),
            (&*ITEM_RETIRE, "genfeed.v1.ItemRetire"),
            (&*INTERACTION, "genfeed.v1.Interaction"),
            (&*RECOMMENDATION, "genfeed.v1.Recommendation"),
            (&*DEAD_LETTER, "genfeed.v1.DeadLetter"),
        ];
        for (schema, name) in all {
            assert_eq!(fullname(schema), name);
        }
    }

    /// The evolution rule for optional fields, checked on the files
    /// themselves: a union that admits null lists null first (so that the
    /// default can be null, as Avro requires defaults to match the first
    /// branch) and defaults to null.
    #[test]
    fn nullable_fields_put_null_first_and_default_to_null() {
        fn check(file: &str, node: &serde_json::Value, seen: &mut usize) {
            match node {
                serde_json::Value::Object(map) => {
                    if let Some(serde_json::Value::Array(fields)) = map.get("fields") {
                        for field in fields {
                            let Some(serde_json::Value::Array(branches)) = field.get("type") else {
                                continue;
                            };
                            if branches.iter().any(|b| b == "null") {
                                *seen += 1;
                                let name = &field["name"];
                                assert_eq!(branches[0], "null", "{file}: {name}");
                                assert_eq!(
                                    field.get("default"),
                                    Some(&serde_json::Value::Null),
                                    "{file}: {name}"
                                );
                            }
                        }
                    }
                    map.values().for_each(|v| check(file, v, seen));
                }
                serde_json::Value::Array(items) => items.iter().for_each(|v| check(file, v, seen)),
                _ => {}
            }
        }
        let mut seen = 0;
        for (file, json) in [
            ("CatalogueEvent.avsc", CATALOGUE_EVENT_JSON),
            ("Interaction.avsc", INTERACTION_JSON),
            ("Recommendation.avsc", RECOMMENDATION_JSON),
            ("DeadLetter.avsc", DEAD_LETTER_JSON),
        ] {
            let node: serde_json::Value = serde_json::from_str(json).expect("valid JSON");
            check(file, &node, &mut seen);
        }
        // title, description, brand, embedding: the walk must have found them.
        assert_eq!(seen, 4);
    }
}
