//! The item table (`.item`): one row of content per item.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use super::error::DataError;
use super::header::{Column, FieldType};
use super::reader::AtomicReader;
use super::value::Value;

/// The column every item table must have.
pub const ITEM_ID: &str = "item_id";

/// One item: its id, the line it came from and its content values.
#[derive(Clone, Debug, PartialEq)]
pub struct ItemRow {
    pub id: String,
    /// 1-based line in the source file.
    pub line: u64,
    /// One value per non-id column, in the order of [`Items::columns`].
    pub values: Vec<Value>,
}

/// A whole item table, rows in file order. Row index = dense item index.
#[derive(Clone, Debug, PartialEq)]
pub struct Items {
    /// The non-id columns; `columns[j]` describes `row.values[j]`.
    pub columns: Vec<Column>,
    pub rows: Vec<ItemRow>,
}

impl Items {
    /// The position of a content column in [`ItemRow::values`].
    pub fn column(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c.name == name)
    }

    /// Reads all rows, rejecting duplicate ids.
    pub fn read<R: BufRead>(mut rdr: ItemReader<R>) -> Result<Items, DataError> {
        let rows = rdr.by_ref().collect::<Result<Vec<_>, _>>()?;
        check_unique(&rows, rdr.path())?;
        Ok(Items {
            columns: rdr.columns,
            rows,
        })
    }
}

/// Opens and reads a whole `.item` file. See [`Items::read`].
pub fn read_items(path: impl AsRef<Path>) -> Result<Items, DataError> {
    Items::read(ItemReader::from_path(path)?)
}

/// Streams the rows of an item table. Does not check ids for uniqueness,
/// since that needs all ids at once; [`Items::read`] does.
#[derive(Debug)]
pub struct ItemReader<R> {
    rdr: AtomicReader<R>,
    id: usize,
    columns: Vec<Column>,
}

impl ItemReader<BufReader<File>> {
    pub fn from_path(path: impl AsRef<Path>) -> Result<Self, DataError> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|source| DataError::Io {
            path: path.to_owned(),
            source,
        })?;
        ItemReader::new(BufReader::new(file), path)
    }
}

impl<R: BufRead> ItemReader<R> {
    /// Reads the header and checks it has `item_id:token`.
    pub fn new(rdr: R, path: impl Into<PathBuf>) -> Result<Self, DataError> {
        let rdr = AtomicReader::new(rdr, path)?;
        let id = rdr.require(ITEM_ID, FieldType::Token)?;
        let mut columns = rdr.columns().to_vec();
        columns.remove(id);
        Ok(ItemReader { rdr, id, columns })
    }

    /// The non-id columns, in the order of [`ItemRow::values`].
    pub fn columns(&self) -> &[Column] {
        &self.columns
    }

    pub fn path(&self) -> &Path {
        self.rdr.path()
    }

    fn read_row(&mut self) -> Result<Option<ItemRow>, DataError> {
        let id = self.id;
        let Some(rec) = self.rdr.read_record()? else {
            return Ok(None);
        };
        let item = rec.id(id)?.to_owned();
        let values = (0..=self.columns.len())
            .filter(|&i| i != id)
            .map(|i| rec.value(i))
            .collect::<Result<_, _>>()?;
        Ok(Some(ItemRow {
            id: item,
            line: rec.line(),
            values,
        }))
    }
}

impl<R: BufRead> Iterator for ItemReader<R> {
    type Item = Result<ItemRow, DataError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.read_row().transpose()
    }
}

/// Finds the first id (in file order) that repeats an earlier one.
///
/// Sorting row indices by id avoids a second copy of every id in a hash set.
fn check_unique(rows: &[ItemRow], path: &Path) -> Result<(), DataError> {
    let mut order: Vec<usize> = (0..rows.len()).collect();
    order.sort_unstable_by(|&a, &b| rows[a].id.cmp(&rows[b].id).then(a.cmp(&b)));
    let dup = order
        .windows(2)
        .filter(|w| rows[w[0]].id == rows[w[1]].id)
        .min_by_key(|w| w[1]);
    match dup {
        None => Ok(()),
        Some(w) => Err(DataError::DuplicateItem {
            path: path.to_owned(),
            id: rows[w[1]].id.clone(),
            first_line: rows[w[0]].line,
            line: rows[w[1]].line,
        }),
    }
}
