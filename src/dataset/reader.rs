//! A streaming reader of records from any RecBole atomic file.
//!
//! The reader owns one line buffer and one vector of field boundaries and
//! reuses both for every line, so reading a record allocates nothing; a
//! [`Record`] borrows from the reader until the next call. The typed readers
//! ([`ItemReader`](super::ItemReader), [`InteractionReader`](super::InteractionReader))
//! are thin layers over this one.
//!
//! Line handling follows RecBole's own loader (pandas): a trailing `\r` is
//! dropped, blank lines are skipped, and line numbers count physical lines so
//! that messages point where an editor would.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::str;

use super::error::{excerpt, ColumnRef, DataError};
use super::header::{parse_header, Column, FieldType};
use super::value::Value;

const UTF8_BOM: &[u8] = b"\xEF\xBB\xBF";

/// Reads a typed header, then one record per non-blank line.
#[derive(Debug)]
pub struct AtomicReader<R> {
    rdr: R,
    path: PathBuf,
    columns: Vec<Column>,
    header_line: u64,
    line: u64,
    buf: Vec<u8>,
    /// Byte offset one past the end of each field of the current line.
    ends: Vec<usize>,
}

impl<R: BufRead> AtomicReader<R> {
    /// Reads and parses the header. `path` is only used to name the source in
    /// errors, so any label works for in-memory input.
    pub fn new(rdr: R, path: impl Into<PathBuf>) -> Result<AtomicReader<R>, DataError> {
        let mut reader = AtomicReader {
            rdr,
            path: path.into(),
            columns: Vec::new(),
            header_line: 0,
            line: 0,
            buf: Vec::new(),
            ends: Vec::new(),
        };
        if !reader.next_line()? {
            return Err(DataError::Empty { path: reader.path });
        }
        if reader.buf.starts_with(UTF8_BOM) {
            reader.buf.drain(..UTF8_BOM.len());
        }
        let text = decode(&reader.buf, &reader.path, reader.line, &[])?;
        reader.columns = parse_header(text).map_err(|source| DataError::Header {
            path: reader.path.clone(),
            line: reader.line,
            source,
        })?;
        reader.header_line = reader.line;
        Ok(reader)
    }

    /// The columns declared by the header, in file order.
    pub fn columns(&self) -> &[Column] {
        &self.columns
    }

    /// The name given for the source in errors.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Finds a column the caller cannot do without, checking its type.
    /// Errors point at the header line.
    pub fn require(&self, name: &'static str, ty: FieldType) -> Result<usize, DataError> {
        let Some(i) = self.columns.iter().position(|c| c.name == name) else {
            return Err(DataError::MissingColumn {
                path: self.path.clone(),
                line: self.header_line,
                name,
                ty,
            });
        };
        if self.columns[i].ty != ty {
            return Err(DataError::ColumnType {
                path: self.path.clone(),
                line: self.header_line,
                column: ColumnRef::new(&self.columns, i),
                expected: ty,
            });
        }
        Ok(i)
    }

    /// Reads the next record, or `None` at end of input.
    pub fn read_record(&mut self) -> Result<Option<Record<'_>>, DataError> {
        if !self.next_line()? {
            return Ok(None);
        }
        let text = decode(&self.buf, &self.path, self.line, &self.columns)?;
        self.ends.clear();
        self.ends
            .extend(text.match_indices('\t').map(|(i, _)| i).chain([text.len()]));
        if self.ends.len() != self.columns.len() {
            return Err(DataError::FieldCount {
                path: self.path.clone(),
                line: self.line,
                expected: self.columns.len(),
                found: self.ends.len(),
            });
        }
        Ok(Some(Record {
            path: &self.path,
            columns: &self.columns,
            line: self.line,
            text,
            ends: &self.ends,
        }))
    }

    /// Loads the next non-blank line into `buf` without its terminator.
    fn next_line(&mut self) -> Result<bool, DataError> {
        loop {
            self.buf.clear();
            let n = self
                .rdr
                .read_until(b'\n', &mut self.buf)
                .map_err(|source| DataError::Io {
                    path: self.path.clone(),
                    source,
                })?;
            if n == 0 {
                return Ok(false);
            }
            self.line += 1;
            if self.buf.ends_with(b"\n") {
                self.buf.pop();
            }
            if self.buf.ends_with(b"\r") {
                self.buf.pop();
            }
            if !self.buf.is_empty() {
                return Ok(true);
            }
        }
    }
}

/// Checks a line is UTF-8, naming the column of the first bad byte if not.
fn decode<'b>(
    buf: &'b [u8],
    path: &Path,
    line: u64,
    columns: &[Column],
) -> Result<&'b str, DataError> {
    str::from_utf8(buf).map_err(|e| {
        let tabs = buf[..e.valid_up_to()].iter().filter(|&&b| b == b'\t');
        DataError::Utf8 {
            path: path.to_owned(),
            line,
            column: ColumnRef::new(columns, tabs.count()),
        }
    })
}

/// One line of an atomic file, split into as many fields as the header has
/// columns. Borrowed from its [`AtomicReader`].
#[derive(Clone, Copy, Debug)]
pub struct Record<'r> {
    path: &'r Path,
    columns: &'r [Column],
    line: u64,
    text: &'r str,
    ends: &'r [usize],
}

impl<'r> Record<'r> {
    /// The 1-based physical line number.
    pub fn line(&self) -> u64 {
        self.line
    }

    /// The raw text of field `i` (0-based, header order).
    ///
    /// # Panics
    ///
    /// If `i` is not less than the number of columns.
    pub fn field(&self, i: usize) -> &'r str {
        let start = if i == 0 { 0 } else { self.ends[i - 1] + 1 };
        &self.text[start..self.ends[i]]
    }

    /// Field `i` as an id: any text except the empty string.
    pub fn id(&self, i: usize) -> Result<&'r str, DataError> {
        let field = self.field(i);
        if field.is_empty() {
            return Err(self.invalid(i, "a non-empty id", field));
        }
        Ok(field)
    }

    /// Field `i` as a finite number.
    pub fn float(&self, i: usize) -> Result<f64, DataError> {
        let field = self.field(i);
        match field.parse::<f64>() {
            Ok(x) if x.is_finite() => Ok(x),
            Ok(_) => Err(self.invalid(i, "a finite number", field)),
            Err(_) => Err(self.invalid(i, "a number", field)),
        }
    }

    /// Field `i` parsed according to its column type.
    pub fn value(&self, i: usize) -> Result<Value, DataError> {
        let field = self.field(i);
        Ok(match self.columns[i].ty {
            FieldType::Token => Value::Token(field.to_owned()),
            FieldType::TokenSeq => Value::TokenSeq(field.to_owned()),
            FieldType::Float => Value::Float(self.float(i)?),
            FieldType::FloatSeq => Value::FloatSeq(
                field
                    .split_ascii_whitespace()
                    .map(|tok| match tok.parse::<f32>() {
                        Ok(x) if x.is_finite() => Ok(x),
                        Ok(_) => Err(self.invalid(i, "a finite number", tok)),
                        Err(_) => Err(self.invalid(i, "a number", tok)),
                    })
                    .collect::<Result<_, _>>()?,
            ),
        })
    }

    /// An error naming this record's location and field `i`.
    pub(crate) fn invalid(&self, i: usize, expected: &'static str, found: &str) -> DataError {
        DataError::Field {
            path: self.path.to_owned(),
            line: self.line,
            column: ColumnRef::new(self.columns, i),
            expected,
            found: excerpt(found),
        }
    }
}
