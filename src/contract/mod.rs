/*!
The Avro contract: what genfeed reads from and writes to Kafka.

# What the contract is

The `.avsc` files in `schemas/` are genfeed's public interface. Catalogue
services, event collectors and feed consumers are written in other languages
and by other teams; they depend on those files, not on this crate. This module
is the Rust end of that agreement: one type per record ([`CatalogueEvent`],
[`Interaction`], [`Recommendation`], [`DeadLetter`], ...), each tied to its
schema by the [`Record`] trait, and two functions, [`encode`] and [`decode`].

The schemas evolve by the rules in `schemas/README.md` (add optional fields
only, append enum symbols only), so that a reader can always resolve data
written with an older schema to its own. Avro can express most of the
contract; what it cannot (e.g. "`user_id` is not empty") is checked by
[`Record::validate`] after every decode and before every encode.

# Why two wire formats

Avro binary is not self-describing: the bytes of a datum mean nothing
without the schema they were written with. There are two common answers to
"which schema?", and genfeed speaks both:

* [`WireFormat::Plain`]: the topic implies the schema. Smallest messages, no
  registry needed; right for topics genfeed owns end to end, and what simple
  producers (scripts, tests) find easiest to write. The price is that
  writer and reader must agree on one schema version.
* [`WireFormat::Confluent`]: magic byte `0`, then the writer schema's id as a
  big-endian `u32`, then the datum. This is what Confluent serializers in
  every language produce, and it is what makes evolution work across
  independently deployed producers: the reader looks up the id in its
  [`SchemaIds`] and resolves the writer's schema to its own.

# Failure is data

Nothing on the decode path panics. Every failure, from an empty message to a
datum followed by junk, is a [`DecodeError`] that names the record and, where
it can, the field, so that the pipeline can send the message to the
dead-letter topic with a useful reason and carry on. Decoding caps Avro's
allocations at [`MAX_ALLOCATION_BYTES`] so that a garbage length prefix
cannot exhaust memory.

# Example

```
use genfeed::contract::{
    decode, encode, Interaction, InteractionKind, ReadFormat, Record, SchemaIds, WireFormat,
};

let click = Interaction {
    user_id: "u1".to_string(),
    item_id: "i9".to_string(),
    kind: InteractionKind::Click,
    timestamp: 1_700_000_000_000,
};

let mut ids = SchemaIds::new();
ids.insert::<Interaction>(42, Interaction::schema().clone())?;
let bytes = encode(&click, WireFormat::Confluent { schema_id: 42 })?;
assert_eq!(decode::<Interaction>(&bytes, ReadFormat::Confluent(&ids))?, click);

let bytes = encode(&click, WireFormat::Plain)?;
assert_eq!(decode::<Interaction>(&bytes, ReadFormat::Plain)?, click);
# Ok::<(), Box<dyn std::error::Error>>(())
```
*/

mod error;
mod ids;
mod records;
mod resolve;
pub mod schemas;
mod wire;

pub use error::{DecodeError, EncodeError, SchemaIdError};
pub use ids::SchemaIds;
pub use records::{
    CatalogueEvent, DeadLetter, InputPosition, Interaction, InteractionKind, ItemChange,
    ItemRetire, ItemUpsert, Limits, RankedItem, Recommendation, Record, Violation,
};
pub use wire::{decode, encode, ReadFormat, WireFormat, MAX_ALLOCATION_BYTES};
