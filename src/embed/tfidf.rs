//! TF-IDF vectors of a catalogue's words and attribute ids, hashed to a fixed
//! width.
//!
//! On Amazon sets a TF-IDF nearest neighbour of the user's last item scores
//! about as well as TIGER, and it is the content baseline the field compares
//! cold-start methods with. The weighting is what makes it work where plain
//! token overlap does not: an attribute every other toy carries says nothing,
//! a rare brand id says a lot. Tokens are the whitespace- and
//! punctuation-separated, lower-cased words of every token column; the same
//! word in two columns is two tokens. Each token adds `tf · ln(N / df)` to
//! one signed bucket of `dim` (feature hashing).
//!
//! [`TfIdf`] is the weighting frozen: the columns, `N` and every word's
//! document frequency in the catalogue it was fitted on. Offline tools fit
//! it on the item file and weigh every row at once ([`tfidf`]); `genfeed
//! fit-affinity` writes it beside the affinity ([`FILE`]), so that the service
//! weighs an item that arrives later exactly as the rows the affinity was
//! fitted on. A word the fitted catalogue never had weighs nothing, as in a
//! vocabulary-based TF-IDF: the affinity learnt nothing about it, and at the
//! weight of a word of one item (`ln N`, the largest) a new item's few
//! unseen words outweighed the rest of its row (on the demo's stream fresh
//! items were hit 52 times with them at `ln N`, 64 without; brand-new
//! copies of training items with " (new edition)" appended reached 1 feed
//! of 40 against 6).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::dataset::{FieldType, Items};

/// The file in a model directory that holds the frozen weighting.
pub const FILE: &str = "content-tfidf.json";

/// Reading or writing [`FILE`].
#[derive(Debug, thiserror::Error)]
pub enum TfIdfError {
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a TF-IDF weighting: {source}")]
    Parse {
        path: std::path::PathBuf,
        source: serde_json::Error,
    },
    #[error("{path}: {detail}")]
    Invalid {
        path: std::path::PathBuf,
        detail: String,
    },
}

/// A catalogue's TF-IDF weighting, frozen.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TfIdf {
    /// The token columns of the fitted catalogue, in its order: where a
    /// live item's words are read from.
    columns: Vec<String>,
    dim: usize,
    /// `N`: the fitted catalogue's items.
    documents: u32,
    /// Per column, each word's document frequency.
    df: BTreeMap<String, HashMap<String, u32>>,
}

/// A token's bucket and sign, from a hash of `(field, word)`.
fn bucket(field: &str, word: &str, dim: usize) -> (usize, f32) {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in field.bytes().chain([0xff]).chain(word.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 33;
    let sign = if h & 1 == 1 { 1.0 } else { -1.0 };
    ((h >> 1) as usize % dim, sign)
}

/// The lower-cased words of a column's text.
pub fn words(text: &str) -> impl Iterator<Item = String> + '_ {
    text.split(|ch: char| !ch.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
}

/// The token columns of a catalogue.
fn token_columns(items: &Items) -> Vec<(usize, &str)> {
    items
        .columns
        .iter()
        .enumerate()
        .filter(|(_, c)| matches!(c.ty, FieldType::Token | FieldType::TokenSeq))
        .map(|(j, c)| (j, c.name.as_str()))
        .collect()
}

/// Each token of a document and how often it occurs.
type Counts = HashMap<(usize, String), u32>;

impl TfIdf {
    /// Counts document frequencies over every row of `items`; rows are
    /// hashed into `dim` buckets.
    pub fn fit(items: &Items, dim: usize) -> TfIdf {
        let (tfidf, _) = TfIdf::fit_counting(items, dim);
        tfidf
    }

    /// As [`TfIdf::fit`], with each row's token counts (by column position).
    fn fit_counting(items: &Items, dim: usize) -> (TfIdf, Vec<Counts>) {
        let columns = token_columns(items);
        let mut df: BTreeMap<String, HashMap<String, u32>> = columns
            .iter()
            .map(|(_, name)| (name.to_string(), HashMap::new()))
            .collect();
        let docs: Vec<Counts> = items
            .rows
            .iter()
            .map(|row| {
                let mut tf = Counts::new();
                for (c, &(j, _)) in columns.iter().enumerate() {
                    for w in words(row.values[j].as_str().unwrap_or("")) {
                        *tf.entry((c, w)).or_default() += 1;
                    }
                }
                for (c, w) in tf.keys() {
                    let column = df.get_mut(columns[*c].1).expect("every column is in df");
                    *column.entry(w.clone()).or_default() += 1;
                }
                tf
            })
            .collect();
        let tfidf = TfIdf {
            columns: columns.iter().map(|(_, n)| n.to_string()).collect(),
            dim: dim.max(1),
            documents: items.rows.len() as u32,
            df,
        };
        (tfidf, docs)
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Names the weighting: equal for equal weightings, whatever order
    /// their file lists the words in. Rows weighed with another weighting
    /// mean nothing beside this one's (another width hashes words to other
    /// buckets), so whoever stores rows keeps it beside them.
    pub fn digest(&self) -> [u8; 32] {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        let mut field = |bytes: &[u8]| {
            h.update((bytes.len() as u64).to_le_bytes());
            h.update(bytes);
        };
        for c in &self.columns {
            field(c.as_bytes());
        }
        field(&(self.dim as u64).to_le_bytes());
        field(&self.documents.to_le_bytes());
        for (column, df) in &self.df {
            field(column.as_bytes());
            let mut words: Vec<_> = df.iter().collect();
            words.sort_unstable();
            for (word, n) in words {
                field(word.as_bytes());
                field(&n.to_le_bytes());
            }
        }
        h.finalize().into()
    }

    /// The columns a live item's words are read from.
    pub fn columns(&self) -> &[String] {
        &self.columns
    }

    /// `ln(N / df)` of `word` in `column`; 0 for a word the fitted
    /// catalogue never had.
    fn idf(&self, column: &str, word: &str) -> f32 {
        let Some(df) = self.df.get(column).and_then(|c| c.get(word)).copied() else {
            return 0.0;
        };
        (self.documents.max(1) as f32 / df.max(1) as f32).ln()
    }

    /// The weighted row of one item whose text per column is `text(column)`,
    /// as sparse `(bucket, weight)` pairs in bucket order, not normalised;
    /// empty for an item without words.
    pub fn row(&self, text: impl Fn(&str) -> String) -> Vec<(u32, f32)> {
        let mut tf: HashMap<(usize, String), u32> = HashMap::new();
        for (c, column) in self.columns.iter().enumerate() {
            for w in words(&text(column)) {
                *tf.entry((c, w)).or_default() += 1;
            }
        }
        self.weigh(&tf)
    }

    fn weigh(&self, tf: &Counts) -> Vec<(u32, f32)> {
        let mut row: BTreeMap<u32, f32> = BTreeMap::new();
        for ((c, word), &n) in tf {
            let column = &self.columns[*c];
            let (b, sign) = bucket(column, word, self.dim);
            *row.entry(b as u32).or_default() += sign * n as f32 * self.idf(column, word);
        }
        row.into_iter().filter(|&(_, v)| v != 0.0).collect()
    }

    /// Writes [`FILE`] into `dir`.
    pub fn save(&self, dir: &Path) -> Result<(), TfIdfError> {
        let path = dir.join(FILE);
        let io = |source| TfIdfError::Io {
            path: path.clone(),
            source,
        };
        let json = serde_json::to_vec(self).map_err(|e| io(std::io::Error::other(e)))?;
        std::fs::write(&path, json).map_err(io)
    }

    /// Reads [`FILE`] from `dir`; `None` when there is none.
    pub fn load(dir: &Path) -> Result<Option<TfIdf>, TfIdfError> {
        let path = dir.join(FILE);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(TfIdfError::Io { path, source }),
        };
        let tfidf: TfIdf = serde_json::from_slice(&bytes).map_err(|source| TfIdfError::Parse {
            path: path.clone(),
            source,
        })?;
        let unknown = tfidf.df.keys().find(|k| !tfidf.columns.contains(k));
        if tfidf.dim == 0 || tfidf.documents == 0 || unknown.is_some() {
            return Err(TfIdfError::Invalid {
                path,
                detail: format!(
                    "dim {}, {} documents, frequencies for unknown column {unknown:?}",
                    tfidf.dim, tfidf.documents
                ),
            });
        }
        Ok(Some(tfidf))
    }
}

/// `[rows × dim]` TF-IDF vectors of `items` weighed by their own
/// frequencies, not normalised; an item without tokens is a row of zeros.
pub fn tfidf(items: &Items, dim: usize) -> Vec<f32> {
    let (tfidf, docs) = TfIdf::fit_counting(items, dim);
    let dim = tfidf.dim;
    let mut out = vec![0.0f32; items.rows.len() * dim];
    for (doc, row) in docs.iter().zip(out.chunks_exact_mut(dim)) {
        for (b, v) in tfidf.weigh(doc) {
            row[b as usize] = v;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::{read_items, Items};

    fn catalogue(rows: &[&str]) -> (tempfile::TempDir, Items) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.item");
        let mut text = String::from("item_id:token\tattributes:token_seq\n");
        for (i, r) in rows.iter().enumerate() {
            text.push_str(&format!("{i}\t{r}\n"));
        }
        std::fs::write(&path, text).unwrap();
        let items = read_items(&path).unwrap();
        (dir, items)
    }

    fn cos(a: &[f32], b: &[f32]) -> f32 {
        let d: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
        let n = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
        d / (n(a) * n(b))
    }

    /// The digest names the weighting, not its file: a copy read back
    /// (its words in another order) has the same one, another fit not.
    #[test]
    fn a_digest_is_the_weightings_not_its_files() {
        let (d, items) = catalogue(&["a b c", "b c d", "c d e", "e f g"]);
        let w = TfIdf::fit(&items, 64);
        w.save(d.path()).unwrap();
        let back = TfIdf::load(d.path()).unwrap().unwrap();
        assert_eq!(back.digest(), w.digest());
        assert_ne!(TfIdf::fit(&items, 32).digest(), w.digest());
        let (_e, fewer) = catalogue(&["a b c", "b c d", "c d e"]);
        assert_ne!(TfIdf::fit(&fewer, 64).digest(), w.digest());
    }

    #[test]
    fn a_shared_rare_token_counts_more_than_a_shared_common_one() {
        // Everyone has "common"; items 0 and 1 share "rare", 0 and 2 share
        // "mid" (held by half the catalogue).
        let (_d, items) = catalogue(&[
            "common rare mid x0",
            "common rare y1",
            "common mid z2",
            "common mid",
            "common w4",
            "common v5",
        ]);
        let v = tfidf(&items, 1024);
        let row = |i: usize| &v[i * 1024..(i + 1) * 1024];
        assert!(cos(row(0), row(1)) > cos(row(0), row(2)));
        // "common" has idf 0: items sharing only it are orthogonal.
        assert!(cos(row(4), row(5)).abs() < 1e-6);
    }

    #[test]
    fn a_frozen_weighting_weighs_a_live_item_as_the_catalogue_rows() {
        let (dir, items) = catalogue(&["common rare mid x0", "common rare y1", "common mid z2"]);
        let fitted = TfIdf::fit(&items, 64);
        fitted.save(dir.path()).unwrap();
        let frozen = TfIdf::load(dir.path()).unwrap().unwrap();
        assert_eq!(frozen, fitted);
        let table = tfidf(&items, 64);
        // Item 0 arriving live, its words in another case and order.
        let row = frozen.row(|c| {
            if c == "attributes" {
                "X0 mid Rare common".into()
            } else {
                String::new()
            }
        });
        let mut dense = vec![0.0; 64];
        row.iter().for_each(|&(b, v)| dense[b as usize] = v);
        assert_eq!(&dense[..], &table[..64]);
        // A word no fitted item has weighs nothing; one of one item ln N.
        assert!(frozen.row(|_| "unseen".into()).is_empty());
        let once = frozen.row(|_| "x0 unseen".into());
        assert_eq!(once.len(), 1);
        assert!((once[0].1.abs() - 3f32.ln()).abs() < 1e-6);
        assert!(frozen.row(|_| " ,. ".into()).is_empty());
        assert!(TfIdf::load(&dir.path().join("missing")).unwrap().is_none());
    }
}
