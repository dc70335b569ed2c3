//! The one error type of the loader.
//!
//! Every variant carries the path it came from and, where one exists, the
//! 1-based line and column, so a message alone is enough to find the bad byte:
//! `data/yelp.item:1234: column 3 (stars:float): expected a number, found "abc"`.

use std::fmt;
use std::io;
use std::path::PathBuf;

use thiserror::Error;

use super::header::{Column, FieldType, HeaderError};

/// Longest field excerpt quoted in a message; fields can be whole paragraphs.
const EXCERPT_CHARS: usize = 64;

/// A column named in an error: its 1-based index and, when the header
/// declares one there, its name and type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ColumnRef {
    pub index: usize,
    pub column: Option<Column>,
}

impl ColumnRef {
    pub(crate) fn new(columns: &[Column], index0: usize) -> ColumnRef {
        ColumnRef {
            index: index0 + 1,
            column: columns.get(index0).cloned(),
        }
    }
}

impl fmt::Display for ColumnRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.column {
            Some(c) => write!(f, "column {} ({c})", self.index),
            None => write!(f, "column {}", self.index),
        }
    }
}

/// An error while reading a RecBole atomic file.
#[derive(Debug, Error)]
pub enum DataError {
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: empty file, expected a typed header line (name:type ...)", .path.display())]
    Empty { path: PathBuf },
    #[error("{}:{line}: header {source}", .path.display())]
    Header {
        path: PathBuf,
        line: u64,
        #[source]
        source: HeaderError,
    },
    #[error("{}:{line}: missing required column {name}:{ty}", .path.display())]
    MissingColumn {
        path: PathBuf,
        line: u64,
        name: &'static str,
        ty: FieldType,
    },
    #[error("{}:{line}: {column}: expected type {expected}", .path.display())]
    ColumnType {
        path: PathBuf,
        line: u64,
        column: ColumnRef,
        expected: FieldType,
    },
    #[error(
        "{}:{line}: expected {expected} tab-separated fields, found {found}",
        .path.display()
    )]
    FieldCount {
        path: PathBuf,
        line: u64,
        expected: usize,
        found: usize,
    },
    #[error("{}:{line}: {column}: invalid UTF-8", .path.display())]
    Utf8 {
        path: PathBuf,
        line: u64,
        column: ColumnRef,
    },
    #[error("{}:{line}: {column}: expected {expected}, found {found:?}", .path.display())]
    Field {
        path: PathBuf,
        line: u64,
        column: ColumnRef,
        expected: &'static str,
        found: String,
    },
    #[error(
        "{}:{line}: duplicate item id {id:?}, first defined at line {first_line}",
        .path.display()
    )]
    DuplicateItem {
        path: PathBuf,
        id: String,
        first_line: u64,
        line: u64,
    },
    #[error(
        "{}:{line}: {column}: expected an item id from the item table, found {id:?}",
        .path.display()
    )]
    UnknownItem {
        path: PathBuf,
        line: u64,
        column: ColumnRef,
        id: String,
    },
    #[error("{}: more than {} distinct {what}", .path.display(), u32::MAX)]
    TooMany { path: PathBuf, what: &'static str },
}

/// Shortens a field for quoting in a message, on a char boundary.
pub(crate) fn excerpt(field: &str) -> String {
    match field.char_indices().nth(EXCERPT_CHARS) {
        Some((cut, _)) => format!("{}...", &field[..cut]),
        None => field.to_owned(),
    }
}
