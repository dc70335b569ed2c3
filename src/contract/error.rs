//! What can go wrong at the contract boundary.
//!
//! Every decode failure is data, not a bug: the pipeline routes it to the
//! dead-letter topic with its `Display` text as the reason, so each variant
//! names the record type and, where known, the field.

/// Why a message could not be decoded into a record.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The message has no bytes at all (a Kafka tombstone, or an empty
    /// value) where a `record` was expected.
    #[error(
        "empty message: no bytes where a {record} was expected{}",
        retire_hint(record)
    )]
    Empty { record: &'static str },
    /// A catalogue tombstone retires the item its key names; this one has
    /// no key, so it names none.
    #[error("a tombstone (a null value) with no key: a catalogue tombstone retires the item its key names")]
    KeylessTombstone,
    /// The message is shorter than its framing header.
    #[error("truncated message: the header needs {needed} bytes, got {got}")]
    Truncated { needed: usize, got: usize },
    /// A Confluent-framed message did not start with magic byte 0.
    #[error("bad magic byte {0:#04x}: not Confluent wire format")]
    BadMagic(u8),
    /// The Confluent schema id is not one this reader was told to accept.
    #[error("unknown schema id {0}")]
    UnknownSchemaId(u32),
    /// The schema id is known, but belongs to another record type.
    #[error("schema id {schema_id} is a {found}, expected a {record}")]
    WrongRecord {
        record: &'static str,
        schema_id: u32,
        found: &'static str,
    },
    /// The datum ended before the record was complete.
    #[error("{record}: message ends in the middle of the datum")]
    UnexpectedEnd { record: &'static str },
    /// A length prefix asked for more memory than the decoder allows, which
    /// for a Kafka-sized message means the bytes are garbage.
    #[error("{record}: a length prefix asks for {desired:?} bytes, over the {maximum} byte limit")]
    TooLarge {
        record: &'static str,
        desired: Option<usize>,
        maximum: usize,
    },
    /// The writer's data lacks a field the reader needs and has no default for.
    #[error("{record}: missing field {field}")]
    MissingField { record: &'static str, field: String },
    /// The bytes are not a datum of the expected schema.
    #[error("{record}: malformed datum: {detail}")]
    Malformed {
        record: &'static str,
        detail: String,
    },
    /// A whole datum decoded, but bytes were left over: the message was
    /// probably written with another schema.
    #[error("{record}: {count} trailing bytes after the datum")]
    TrailingBytes { record: &'static str, count: usize },
    /// Read as plain Avro, the message is a Confluent header followed by a
    /// whole datum: the writer used a schema-registry serializer.
    #[error(
        "{record}: Confluent-framed (magic byte 0, schema id {schema_id}) where plain Avro \
         is read: set kafka.wire.format = \"confluent\" and the schema ids, or write plain Avro"
    )]
    ConfluentFramed {
        record: &'static str,
        schema_id: u32,
    },
    /// A well-formed datum breaks a rule of the contract.
    #[error("{record}: invalid {field}: {detail}")]
    Invalid {
        record: &'static str,
        field: &'static str,
        detail: String,
    },
    /// A field is larger than the reader's limits allow.
    #[error("{record}: field {field} is too large: {detail}")]
    OverLimit {
        record: &'static str,
        field: &'static str,
        detail: String,
    },
}

/// Why a record could not be encoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// The value breaks a rule of the contract; we never write what we
    /// would refuse to read.
    #[error("{record}: invalid {field}: {detail}")]
    Invalid {
        record: &'static str,
        field: &'static str,
        detail: String,
    },
    /// The value does not fit the schema (a bug in the Rust type).
    #[error("{record}: cannot serialize: {detail}")]
    Serialize {
        record: &'static str,
        detail: String,
    },
}

/// Why a writer schema was refused by [`SchemaIds`](super::SchemaIds).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SchemaIdError {
    /// The schema names another record than the one it was registered for.
    #[error("schema id {schema_id}: schema is {found}, expected {record}")]
    WrongRecord {
        record: &'static str,
        schema_id: u32,
        found: String,
    },
    /// Data written with this schema cannot always be read as the record.
    #[error("schema id {schema_id}: {record} cannot read this writer schema: {detail}")]
    Incompatible {
        record: &'static str,
        schema_id: u32,
        detail: String,
    },
    /// The id is already taken by a different schema. Confluent ids are
    /// immutable, so this is a configuration error.
    #[error("schema id {schema_id} is already registered with a different schema")]
    Conflict { schema_id: u32 },
}

/// On the catalogue, an empty value is most likely meant as a retirement,
/// which is either an event of its own or a tombstone: a null value, not an
/// empty one.
fn retire_hint(record: &str) -> &'static str {
    if record == <super::CatalogueEvent as super::Record>::NAME {
        " (items are retired by an ItemRetire event, or by a tombstone: a null value keyed by the item id)"
    } else {
        " (a null value, e.g. a tombstone, or an empty one)"
    }
}
