//! Loading RecBole atomic files: item tables, interaction logs, and the
//! leave-one-out split the offline tools train and evaluate on.
//!
//! The layers, each in its own module:
//!
//! - [`header`]: the typed `name:type` header line.
//! - [`AtomicReader`]: lines → records, one reused buffer, no per-row allocation.
//! - [`ItemReader`] / [`read_items`]: item rows with typed [`Value`]s.
//! - [`InteractionReader`] / [`load_sequences`]: interactions → per-user
//!   [`Sequences`] of dense item indices.
//! - [`split`]: leave-one-out [`Split`] with truncated histories.
//! - [`cold`]: the cold-start protocol's split: items met only as test
//!   targets.
//!
//! # Why stream
//!
//! The benchmark files are a few megabytes, and reading them whole would be
//! simpler. But the same loader reads production interaction logs, which are
//! orders of magnitude larger, and there the only thing worth keeping in
//! memory is the result (ids and `u32` sequences), not the text it came from.
//! Reading line by line into one buffer keeps peak memory at the size of the
//! output plus one line, and lets an error stop the read at the bad line.
//!
//! # Errors
//!
//! Every [`DataError`] names the file and, where they apply, the 1-based line
//! and the column (index, name and type), and says what was expected and what
//! was found. No input makes the loader panic.

pub mod cold;
mod error;
pub mod header;
mod interactions;
mod items;
mod reader;
pub mod split;
pub mod time;
mod value;

pub use error::{ColumnRef, DataError};
pub use header::{Column, FieldType};
pub use interactions::{
    load_sequences, Interaction, InteractionReader, Sequences, TIMESTAMP, USER_ID,
};
pub use items::{read_items, ItemReader, ItemRow, Items, ITEM_ID};
pub use reader::{AtomicReader, Record};
pub use split::{Example, Examples, Split, DEFAULT_MAX_HISTORY};
pub use value::Value;
