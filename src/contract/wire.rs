//! Bytes on a Kafka topic to records and back.
//!
//! Decoding is the one place where untrusted bytes meet the pipeline, so it is
//! written to fail, never to panic: every failure is a [`DecodeError`] that
//! names the record, the whole input must be consumed, and Avro's allocations
//! are capped (see [`MAX_ALLOCATION_BYTES`]).

use std::io;

use apache_avro::{
    error::Details, reader::datum::GenericDatumReader, types::Value,
    writer::datum::GenericDatumWriter,
};

use super::{
    error::{DecodeError, EncodeError},
    ids::SchemaIds,
    records::Record,
    resolve::resolve,
};

/// The largest single allocation Avro may make while decoding, in bytes.
///
/// Avro prefixes strings, bytes, arrays and maps with a length, and a decoder
/// allocates before it reads; a garbage prefix could otherwise ask for
/// gigabytes. 64 MiB is far above any sane Kafka message (1 MiB by default)
/// yet small enough that a hostile prefix cannot hurt. apache-avro keeps this
/// setting in a process-wide `OnceLock`, so the first call wins: [`decode`]
/// applies it on every call, before any Avro read, and nothing else in genfeed
/// may set it.
pub const MAX_ALLOCATION_BYTES: usize = 64 * 1024 * 1024;

/// The magic byte that starts a Confluent-framed message.
const CONFLUENT_MAGIC: u8 = 0;
/// Magic byte plus a big-endian `u32` schema id.
const CONFLUENT_HEADER_LEN: usize = 5;

/// How to frame an encoded record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WireFormat {
    /// A bare Avro binary datum. The schema is implied by the topic; used
    /// where genfeed owns both ends (and by producers without a registry).
    Plain,
    /// Magic byte 0, the writer's schema id (big-endian `u32`), the datum.
    /// What Confluent serializers in every language produce and expect.
    Confluent { schema_id: u32 },
}

/// How to unframe a message, and which writer schemas to accept.
#[derive(Clone, Copy, Debug)]
pub enum ReadFormat<'a> {
    /// A bare datum, written with exactly the record's current schema.
    Plain,
    /// A Confluent-framed datum whose schema id must be in the set.
    Confluent(&'a SchemaIds),
}

/// Encodes `value` as `T`'s current schema, framed as `format` says.
///
/// The value is validated first: genfeed never writes what it would refuse
/// to read.
pub fn encode<T: Record>(value: &T, format: WireFormat) -> Result<Vec<u8>, EncodeError> {
    value.validate().map_err(|v| EncodeError::Invalid {
        record: T::NAME,
        field: v.field,
        detail: v.detail,
    })?;
    let mut out = Vec::new();
    if let WireFormat::Confluent { schema_id } = format {
        out.push(CONFLUENT_MAGIC);
        out.extend_from_slice(&schema_id.to_be_bytes());
    }
    let serialize = |err: apache_avro::Error| EncodeError::Serialize {
        record: T::NAME,
        detail: err.to_string(),
    };
    GenericDatumWriter::builder(T::schema())
        .build()
        .map_err(serialize)?
        .write_ser(&mut out, value)
        .map_err(serialize)?;
    Ok(out)
}

/// Decodes one message into a `T`.
///
/// With [`ReadFormat::Confluent`] the writer's schema comes from the id and is
/// resolved to `T`'s schema, so data written with an older (or newer,
/// compatible) schema reads fine: missing fields take their defaults, unknown
/// fields are skipped, unknown enum symbols become the enum's default.
pub fn decode<T: Record>(bytes: &[u8], format: ReadFormat<'_>) -> Result<T, DecodeError> {
    if bytes.is_empty() {
        return Err(DecodeError::Empty { record: T::NAME });
    }
    apache_avro::util::max_allocation_bytes(MAX_ALLOCATION_BYTES);
    let avro = |err| classify(T::NAME, err);
    let value = match format {
        ReadFormat::Plain => {
            let reader = GenericDatumReader::builder(T::schema())
                .build()
                .map_err(avro)?;
            read(T::NAME, &reader, bytes)
                .map_err(|err| framed_by_mistake(T::NAME, &reader, bytes, err))?
        }
        ReadFormat::Confluent(ids) => {
            let (schema_id, datum) = split_confluent(bytes)?;
            let writer = ids
                .get(schema_id)
                .ok_or(DecodeError::UnknownSchemaId(schema_id))?;
            if writer.record != T::NAME {
                return Err(DecodeError::WrongRecord {
                    record: T::NAME,
                    schema_id,
                    found: writer.record,
                });
            }
            let reader = GenericDatumReader::builder(&writer.schema)
                .build()
                .map_err(avro)?;
            let written = read(T::NAME, &reader, datum)?;
            resolve(written, &writer.schema, T::schema()).map_err(avro)?
        }
    };
    let record: T = apache_avro::from_value(&value).map_err(avro)?;
    record.validate().map_err(|v| DecodeError::Invalid {
        record: T::NAME,
        field: v.field,
        detail: v.detail,
    })?;
    Ok(record)
}

/// Reads one datum that must span all of `datum`.
///
/// apache-avro's datum decoder is lenient about running out of input: a
/// short read of a union index, a string body or a boolean yields `Null`
/// instead of an error (a convenience for its container-file reader). A
/// truncated message could then decode "successfully" with its last
/// optional field silently null, so the input is wrapped in an [`Input`]
/// that remembers any short read and turns it into [`UnexpectedEnd`].
///
/// [`UnexpectedEnd`]: DecodeError::UnexpectedEnd
fn read(
    record: &'static str,
    reader: &GenericDatumReader<'_>,
    datum: &[u8],
) -> Result<Value, DecodeError> {
    let mut input = Input {
        rest: datum,
        ended: false,
    };
    let value = reader.read_value(&mut input);
    if input.ended {
        return Err(DecodeError::UnexpectedEnd { record });
    }
    let value = value.map_err(|err| classify(record, err))?;
    if !input.rest.is_empty() {
        return Err(DecodeError::TrailingBytes {
            record,
            count: input.rest.len(),
        });
    }
    Ok(value)
}

/// A plain reader's error for a message that is a whole datum after a
/// Confluent header: a producer using a schema-registry serializer against a
/// plain deployment would otherwise see "trailing bytes" and never guess why.
/// Only for leftover bytes: a plain catalogue upsert starts with a zero byte
/// too (its union branch), and a truncated one can happen to leave a datum
/// after five bytes. Looked at only once decoding has failed.
fn framed_by_mistake(
    record: &'static str,
    reader: &GenericDatumReader<'_>,
    bytes: &[u8],
    err: DecodeError,
) -> DecodeError {
    if !matches!(err, DecodeError::TrailingBytes { .. }) {
        return err;
    }
    match bytes.split_first_chunk::<CONFLUENT_HEADER_LEN>() {
        Some(([CONFLUENT_MAGIC, id @ ..], datum)) if read(record, reader, datum).is_ok() => {
            DecodeError::ConfluentFramed {
                record,
                schema_id: u32::from_be_bytes(*id),
            }
        }
        _ => err,
    }
}

/// A byte slice that records whether anyone tried to read past its end.
struct Input<'b> {
    rest: &'b [u8],
    ended: bool,
}

impl io::Read for Input<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.rest.is_empty() && !buf.is_empty() {
            self.ended = true;
        }
        self.rest.read(buf)
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> io::Result<()> {
        if buf.len() > self.rest.len() {
            self.ended = true;
        }
        self.rest.read_exact(buf)
    }
}

/// Splits a Confluent-framed message into its schema id and datum.
fn split_confluent(bytes: &[u8]) -> Result<(u32, &[u8]), DecodeError> {
    // The magic byte is checked first: a message that is not Confluent-framed
    // at all is better reported as such than as a short header.
    if bytes[0] != CONFLUENT_MAGIC {
        return Err(DecodeError::BadMagic(bytes[0]));
    }
    let Some((header, datum)) = bytes.split_first_chunk::<CONFLUENT_HEADER_LEN>() else {
        return Err(DecodeError::Truncated {
            needed: CONFLUENT_HEADER_LEN,
            got: bytes.len(),
        });
    };
    let [_, id @ ..] = *header;
    Ok((u32::from_be_bytes(id), datum))
}

/// Turns an apache-avro error into the most precise [`DecodeError`].
fn classify(record: &'static str, err: apache_avro::Error) -> DecodeError {
    match err.details() {
        Details::MemoryAllocation { desired, maximum } => DecodeError::TooLarge {
            record,
            desired: *desired,
            maximum: *maximum,
        },
        Details::GetField(field) => DecodeError::MissingField {
            record,
            field: field.clone(),
        },
        _ => DecodeError::Malformed {
            record,
            detail: err.to_string(),
        },
    }
}
