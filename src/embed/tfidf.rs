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
//! one signed bucket of `dim` (feature hashing), so no vocabulary is stored
//! and an unseen token still lands somewhere (with the largest weight, as a
//! token seen nowhere else would have).

use std::collections::HashMap;

use crate::dataset::{FieldType, Items};

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

/// Every token of every token column of row `row`: `(column, word)`.
fn tokens(items: &Items, row: usize) -> impl Iterator<Item = (&str, String)> + '_ {
    items
        .columns
        .iter()
        .enumerate()
        .filter(|(_, c)| matches!(c.ty, FieldType::Token | FieldType::TokenSeq))
        .flat_map(move |(j, c)| {
            items.rows[row].values[j]
                .as_str()
                .unwrap_or("")
                .split(|ch: char| !ch.is_alphanumeric())
                .filter(|w| !w.is_empty())
                .map(move |w| (c.name.as_str(), w.to_lowercase()))
        })
}

/// `[rows × dim]` TF-IDF vectors of `items`, not normalised; an item without
/// tokens is a row of zeros.
pub fn tfidf(items: &Items, dim: usize) -> Vec<f32> {
    let n = items.rows.len();
    let mut df: HashMap<(&str, String), u32> = HashMap::new();
    let mut docs: Vec<HashMap<(&str, String), u32>> = Vec::with_capacity(n);
    for row in 0..n {
        let mut tf: HashMap<(&str, String), u32> = HashMap::new();
        for t in tokens(items, row) {
            *tf.entry(t).or_default() += 1;
        }
        for t in tf.keys() {
            *df.entry(t.clone()).or_default() += 1;
        }
        docs.push(tf);
    }
    let mut out = vec![0.0f32; n * dim];
    for (doc, row) in docs.iter().zip(out.chunks_exact_mut(dim)) {
        for ((field, word), &tf) in doc {
            let idf = (n as f32 / df[&(*field, word.clone())] as f32).ln();
            let (b, sign) = bucket(field, word, dim);
            row[b] += sign * tf as f32 * idf;
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
}
