//! Which Confluent schema ids a reader accepts, and what they mean.
//!
//! A Confluent-framed message names its writer's schema by a registry id. The
//! reader must know that schema to decode the bytes at all (Avro binary is not
//! self-describing) and resolves it to its own schema, which is how old data
//! stays readable after the contract grows. genfeed does not talk to a schema
//! registry at run time: ids are configuration, checked once at start-up, so a
//! registry outage can never stop the pipeline and an unknown id is simply a
//! dead letter.

use std::collections::HashMap;

use apache_avro::{schema_compatibility::SchemaCompatibility, Schema};

use super::{error::SchemaIdError, records::Record};

/// The writer schemas a reader accepts, by Confluent schema id.
#[derive(Clone, Debug, Default)]
pub struct SchemaIds {
    by_id: HashMap<u32, Writer>,
}

/// A writer schema and the record type it was accepted for.
#[derive(Clone, Debug)]
pub(crate) struct Writer {
    pub(crate) record: &'static str,
    pub(crate) schema: Schema,
}

impl SchemaIds {
    /// An empty set: every id is unknown.
    pub fn new() -> SchemaIds {
        SchemaIds::default()
    }

    /// Accepts data of record `T` written with `schema` under `schema_id`.
    ///
    /// Fails if `schema` names another record, if `T`'s schema cannot read it,
    /// or if the id is already taken by a different schema. Checking here, at
    /// start-up, turns a misconfigured id into a refusal to start instead of a
    /// stream of dead letters. Partially compatible schemas (e.g. a writer enum
    /// with symbols the reader lacks and has no default for) are accepted: the
    /// messages that do not resolve fail one by one with a typed error.
    pub fn insert<T: Record>(
        &mut self,
        schema_id: u32,
        schema: Schema,
    ) -> Result<(), SchemaIdError> {
        let found = schema.name().map(|name| name.fullname(None));
        if found.as_deref() != Some(T::NAME) {
            return Err(SchemaIdError::WrongRecord {
                record: T::NAME,
                schema_id,
                found: found.unwrap_or_else(|| "an unnamed schema".to_string()),
            });
        }
        if let Err(err) = SchemaCompatibility::can_read(&schema, T::schema()) {
            return Err(SchemaIdError::Incompatible {
                record: T::NAME,
                schema_id,
                detail: err.to_string(),
            });
        }
        if let Some(known) = self.by_id.get(&schema_id) {
            return if known.record == T::NAME && known.schema == schema {
                Ok(())
            } else {
                Err(SchemaIdError::Conflict { schema_id })
            };
        }
        self.by_id.insert(
            schema_id,
            Writer {
                record: T::NAME,
                schema,
            },
        );
        Ok(())
    }

    /// Whether `schema_id` is accepted (for any record).
    pub fn contains(&self, schema_id: u32) -> bool {
        self.by_id.contains_key(&schema_id)
    }

    pub(crate) fn get(&self, schema_id: u32) -> Option<&Writer> {
        self.by_id.get(&schema_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::records::{Interaction, ItemUpsert};

    #[test]
    fn accepts_the_current_schema_and_is_idempotent() {
        let mut ids = SchemaIds::new();
        let schema = Interaction::schema().clone();
        ids.insert::<Interaction>(7, schema.clone()).unwrap();
        ids.insert::<Interaction>(7, schema).unwrap();
        assert!(ids.contains(7));
        assert!(!ids.contains(8));
    }

    #[test]
    fn refuses_a_schema_of_another_record() {
        let mut ids = SchemaIds::new();
        let err = ids
            .insert::<ItemUpsert>(7, Interaction::schema().clone())
            .unwrap_err();
        assert_eq!(
            err,
            SchemaIdError::WrongRecord {
                record: ItemUpsert::NAME,
                schema_id: 7,
                found: Interaction::NAME.to_string(),
            }
        );
        assert!(!ids.contains(7));
    }

    #[test]
    fn refuses_an_id_reused_for_another_schema() {
        let mut ids = SchemaIds::new();
        ids.insert::<Interaction>(7, Interaction::schema().clone())
            .unwrap();
        let err = ids
            .insert::<ItemUpsert>(7, ItemUpsert::schema().clone())
            .unwrap_err();
        assert_eq!(err, SchemaIdError::Conflict { schema_id: 7 });
    }

    /// A writer whose `kind` is a string cannot be read as our enum.
    #[test]
    fn refuses_an_incompatible_writer() {
        let writer = Schema::parse_str(
            r#"{"type": "record", "name": "Interaction", "namespace": "genfeed.v1",
                "fields": [
                  {"name": "user_id", "type": "string"},
                  {"name": "item_id", "type": "string"},
                  {"name": "kind", "type": "string"},
                  {"name": "timestamp", "type": "long"}
                ]}"#,
        )
        .unwrap();
        let mut ids = SchemaIds::new();
        let err = ids.insert::<Interaction>(3, writer).unwrap_err();
        assert!(
            matches!(err, SchemaIdError::Incompatible { schema_id: 3, .. }),
            "{err:?}"
        );
    }
}
