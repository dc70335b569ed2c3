//! The interaction log (`.inter`) and the per-user sequences built from it.

use std::cmp::Ordering;
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use super::error::{excerpt, ColumnRef, DataError};
use super::header::FieldType;
use super::items::{ItemRow, Items};
use super::reader::AtomicReader;

pub const USER_ID: &str = "user_id";
pub const TIMESTAMP: &str = "timestamp";

/// One interaction, borrowed from its reader's line buffer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Interaction<'r> {
    /// 1-based line in the source file.
    pub line: u64,
    pub user: &'r str,
    pub item: &'r str,
    /// Finite; only its order matters.
    pub timestamp: f64,
}

/// Streams interactions without allocating per row. Columns may come in any
/// order; columns other than `user_id`, `item_id` and `timestamp` are ignored
/// (but must still be present on every line).
#[derive(Debug)]
pub struct InteractionReader<R> {
    rdr: AtomicReader<R>,
    user: usize,
    item: usize,
    timestamp: usize,
}

impl InteractionReader<BufReader<File>> {
    pub fn from_path(path: impl AsRef<Path>) -> Result<Self, DataError> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|source| DataError::Io {
            path: path.to_owned(),
            source,
        })?;
        InteractionReader::new(BufReader::new(file), path)
    }
}

impl<R: BufRead> InteractionReader<R> {
    /// Reads the header and checks it has `user_id:token`, `item_id:token`
    /// and `timestamp:float`.
    pub fn new(rdr: R, path: impl Into<PathBuf>) -> Result<Self, DataError> {
        let rdr = AtomicReader::new(rdr, path)?;
        Ok(InteractionReader {
            user: rdr.require(USER_ID, FieldType::Token)?,
            item: rdr.require(super::ITEM_ID, FieldType::Token)?,
            timestamp: rdr.require(TIMESTAMP, FieldType::Float)?,
            rdr,
        })
    }

    pub fn path(&self) -> &Path {
        self.rdr.path()
    }

    /// Reads the next interaction, or `None` at end of input.
    pub fn read(&mut self) -> Result<Option<Interaction<'_>>, DataError> {
        let (user, item, timestamp) = (self.user, self.item, self.timestamp);
        let Some(rec) = self.rdr.read_record()? else {
            return Ok(None);
        };
        Ok(Some(Interaction {
            line: rec.line(),
            user: rec.id(user)?,
            item: rec.id(item)?,
            timestamp: rec.float(timestamp)?,
        }))
    }

    /// An error saying the item of the interaction at `line` is unknown.
    fn unknown_item(&self, line: u64, id: &str) -> DataError {
        DataError::UnknownItem {
            path: self.path().to_owned(),
            line,
            column: ColumnRef::new(self.rdr.columns(), self.item),
            id: excerpt(id),
        }
    }
}

/// Every user's items in time order, with users and items as dense indices.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Sequences {
    /// User ids; index = dense user index, in first-seen order.
    pub users: Vec<String>,
    /// Item vocabulary; index = dense item index.
    pub items: Vec<String>,
    /// Per user, dense item indices ordered by timestamp; equal timestamps
    /// keep file order.
    pub seqs: Vec<Vec<u32>>,
}

impl Sequences {
    /// Groups interactions by user and orders each group by timestamp.
    ///
    /// With an item table, dense item indices are the table's row indices
    /// (so items nobody interacted with still have one) and an unknown item
    /// is an error. Without one, items are numbered in first-seen order.
    pub fn read<R: BufRead>(
        mut rdr: InteractionReader<R>,
        items: Option<&Items>,
    ) -> Result<Sequences, DataError> {
        let mut vocab = match items {
            Some(items) => Vocab::fixed(items).ok_or_else(|| too_many(&rdr, "items"))?,
            None => Vocab::Open(HashMap::new()),
        };
        let mut users: HashMap<String, u32> = HashMap::new();
        let mut events: Vec<Vec<(f64, u32)>> = Vec::new();
        while let Some(inter) = rdr.read()? {
            let item = match vocab.index(inter.item) {
                Ok(item) => item,
                Err(Miss::Unknown) => {
                    let (line, id) = (inter.line, inter.item.to_owned());
                    return Err(rdr.unknown_item(line, &id));
                }
                Err(Miss::Full) => return Err(too_many(&rdr, "items")),
            };
            let user = match users.get(inter.user) {
                Some(&u) => u,
                None => {
                    let Ok(u) = u32::try_from(users.len()) else {
                        return Err(too_many(&rdr, "users"));
                    };
                    users.insert(inter.user.to_owned(), u);
                    events.push(Vec::new());
                    u
                }
            };
            events[user as usize].push((inter.timestamp, item));
        }
        let seqs = events
            .into_iter()
            .map(|mut evs| {
                // Timestamps are finite, so `partial_cmp` never fails; the
                // sort is stable, so ties keep file order.
                evs.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap_or(Ordering::Equal));
                evs.into_iter().map(|(_, item)| item).collect()
            })
            .collect();
        Ok(Sequences {
            users: by_index(users),
            items: vocab.into_ids(),
            seqs,
        })
    }
}

/// Opens an `.inter` file and builds its sequences. See [`Sequences::read`].
pub fn load_sequences(
    inter_path: impl AsRef<Path>,
    items: Option<&Items>,
) -> Result<Sequences, DataError> {
    Sequences::read(InteractionReader::from_path(inter_path)?, items)
}

fn too_many<R: BufRead>(rdr: &InteractionReader<R>, what: &'static str) -> DataError {
    DataError::TooMany {
        path: rdr.path().to_owned(),
        what,
    }
}

/// Item id to dense index: fixed by an item table, or grown as ids appear.
enum Vocab<'a> {
    Fixed {
        rows: &'a [ItemRow],
        map: HashMap<&'a str, u32>,
    },
    Open(HashMap<String, u32>),
}

/// Why an item id has no index.
enum Miss {
    /// Not in the item table.
    Unknown,
    /// Every `u32` is taken.
    Full,
}

impl<'a> Vocab<'a> {
    /// Indexes an item table's rows, or `None` if they overflow `u32`.
    fn fixed(items: &'a Items) -> Option<Vocab<'a>> {
        u32::try_from(items.rows.len()).ok()?;
        let map = (0u32..).zip(&items.rows);
        Some(Vocab::Fixed {
            rows: &items.rows,
            map: map.map(|(i, r)| (r.id.as_str(), i)).collect(),
        })
    }

    /// The index of `id`, numbering it next if the vocabulary is open.
    fn index(&mut self, id: &str) -> Result<u32, Miss> {
        match self {
            Vocab::Fixed { map, .. } => map.get(id).copied().ok_or(Miss::Unknown),
            Vocab::Open(map) => {
                if let Some(&i) = map.get(id) {
                    return Ok(i);
                }
                let i = u32::try_from(map.len()).map_err(|_| Miss::Full)?;
                map.insert(id.to_owned(), i);
                Ok(i)
            }
        }
    }
}

impl Vocab<'_> {
    /// The ids, index = dense item index.
    fn into_ids(self) -> Vec<String> {
        match self {
            Vocab::Fixed { rows, .. } => rows.iter().map(|r| r.id.clone()).collect(),
            Vocab::Open(map) => by_index(map),
        }
    }
}

/// Turns an id → index map into the index → id vector, moving the strings.
fn by_index(map: HashMap<String, u32>) -> Vec<String> {
    let mut ids = vec![String::new(); map.len()];
    for (id, i) in map {
        ids[i as usize] = id;
    }
    ids
}
