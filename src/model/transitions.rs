//! Item-to-item transition counts, mixed into the search's distribution.
//!
//! A successor-count table ("after item `a`, users took `b` this often") is
//! the oldest sequential recommender there is, and on the leave-one-out sets
//! it is a strong one: on Toys it finds 82% of the test targets that some
//! training transition leads to, the model alone 57% (with sibling outputs).
//! The model in turn finds targets no transition leads to, which counts
//! never can. The two are mixed the way speech recognisers fuse an n-gram
//! model with a neural one, except as a proper mixture rather than a
//! weighted sum of log-probabilities:
//!
//! ```text
//! P(item | history) = (1 − w) · P_model(item | history) + w · c(last, item) / c(last)
//! ```
//!
//! where `c(last, item)` counts the training transitions from the history's
//! last item to `item` and `c(last)` all transitions out of it (live
//! successors only). Both parts spell the item token by token, so the
//! mixture does too: a prefix's probability is the same mixture of the
//! model's prefix probability and the share of `last`'s successors under
//! that prefix. The beam search therefore stays an ordinary beam search over
//! one distribution, and the log-probabilities it returns are that
//! distribution's. A history whose last item has no known successor gets
//! the model alone.
//!
//! Successors are stored sorted by SID, so the successors under any prefix
//! are a contiguous run: following a beam down the trie narrows a range, and
//! no per-prefix table is needed. The table lives beside the model as
//! `transitions.safetensors`; the weight `w` is
//! [`ModelConfig::transition_weight`](super::ModelConfig::transition_weight),
//! chosen on validation users.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};

use super::config::ModelError;
use crate::sid::{Code, Sid};

/// Successor counts learnt after training, searched together with the
/// trained ones.
///
/// The service learns them from the stream (`service::learnt`): a
/// successor's weight becomes its trained count plus its learnt weight, and
/// items popular lately take [`Learnt::popularity_share`] of the counts'
/// part of the mixture (all of it when the last item has no successor at
/// all), so an item first clicked after training is reachable through the
/// counts although the model never saw it.
pub trait Learnt: Send + Sync {
    /// Appends `last`'s successors learnt since training, in any order,
    /// weighted in units of training transitions.
    fn successors(&self, last: Sid, out: &mut Vec<(Sid, f32)>);
    /// Items popular lately, live in the snapshot searched and sorted by
    /// SID (found once per batch, not per request), with weights of any
    /// scale.
    fn popular(&self) -> &[(Sid, f32)];
    /// The share of the counts' part given to popular items, in `[0, 1)`.
    fn popularity_share(&self) -> f32;
    /// How much the stream favours a fresh item (one training never saw,
    /// [`super::fresh`]): its content probability is multiplied by this
    /// and the fresh items' part renormalised, so that among the new items
    /// near a user's last one those catching on come first. 1 when nothing
    /// was learnt.
    fn fresh_boost(&self, sid: Sid) -> f32;
}

/// The file beside the weights that holds the counts.
pub const TRANSITIONS_FILE: &str = "transitions.safetensors";

/// Successor counts per item, by SID.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Transitions {
    /// Where each item's successors sit in `to` and `counts`.
    from: HashMap<Sid, (u32, u32)>,
    /// Successors, grouped by predecessor, each group sorted by codes.
    to: Vec<Sid>,
    counts: Vec<u32>,
}

impl Transitions {
    /// Counts the pairs `(previous item, next item)`.
    pub fn count(pairs: impl IntoIterator<Item = (Sid, Sid)>) -> Transitions {
        Transitions::from_counts(pairs.into_iter().map(|(a, b)| (a, b, 1)))
    }

    /// Sums `(previous item, next item, count)` triples given in any order.
    fn from_counts(triples: impl IntoIterator<Item = (Sid, Sid, u32)>) -> Transitions {
        let mut triples: Vec<(Sid, Sid, u32)> = triples.into_iter().collect();
        triples.sort_unstable_by(|a, b| {
            a.0.codes()
                .cmp(b.0.codes())
                .then_with(|| a.1.codes().cmp(b.1.codes()))
        });
        let mut t = Transitions::default();
        // The predecessor being grouped and where its successors start.
        let mut group: Option<(Sid, u32)> = None;
        for (a, b, n) in triples {
            match group {
                Some((g, _)) if g == a => {
                    if t.to.last() == Some(&b) {
                        *t.counts.last_mut().expect("the group has a successor") += n;
                        continue;
                    }
                }
                _ => {
                    if let Some((g, lo)) = group {
                        t.from.insert(g, (lo, t.to.len() as u32));
                    }
                    group = Some((a, t.to.len() as u32));
                }
            }
            t.to.push(b);
            t.counts.push(n);
        }
        if let Some((g, lo)) = group {
            t.from.insert(g, (lo, t.to.len() as u32));
        }
        t
    }

    /// The counts a model directory's search mixes in at `weight`, with
    /// it: none at weight 0, where the file need not exist.
    pub fn load_weighted(
        dir: &Path,
        weight: f32,
    ) -> Result<Option<(Transitions, f32)>, ModelError> {
        if weight > 0.0 {
            Ok(Some((Transitions::load(dir)?, weight)))
        } else {
            Ok(None)
        }
    }

    /// `from`'s successors, sorted by SID, and how often each followed it.
    pub fn successors(&self, from: Sid) -> (&[Sid], &[u32]) {
        match self.from.get(&from) {
            Some(&(lo, hi)) => (
                &self.to[lo as usize..hi as usize],
                &self.counts[lo as usize..hi as usize],
            ),
            None => (&[], &[]),
        }
    }

    /// Distinct `(item, successor)` pairs.
    pub fn len(&self) -> usize {
        self.to.len()
    }

    pub fn is_empty(&self) -> bool {
        self.to.is_empty()
    }

    /// Writes the counts as three `u32` tensors: `from` and `to` as
    /// `[pairs, levels]` codes, `count` as `[pairs]`.
    pub fn save(&self, dir: &Path) -> Result<(), ModelError> {
        let path = dir.join(TRANSITIONS_FILE);
        let levels = self.to.first().map_or(1, Sid::levels);
        let mut from: Vec<(Sid, (u32, u32))> = self.from.iter().map(|(&s, &r)| (s, r)).collect();
        from.sort_unstable_by_key(|&(_, (lo, _))| lo);
        let mut from_codes = Vec::with_capacity(self.to.len() * levels);
        for (sid, (lo, hi)) in from {
            for _ in lo..hi {
                from_codes.extend(sid.codes().iter().map(|&c| u32::from(c)));
            }
        }
        let to_codes: Vec<u32> = self
            .to
            .iter()
            .flat_map(|s| s.codes().iter().map(|&c| u32::from(c)))
            .collect();
        let n = self.to.len();
        let tensors = [
            (
                "from",
                Tensor::from_vec(from_codes, (n, levels), &Device::Cpu),
            ),
            ("to", Tensor::from_vec(to_codes, (n, levels), &Device::Cpu)),
            ("count", Tensor::from_slice(&self.counts, n, &Device::Cpu)),
        ];
        let mut map = HashMap::new();
        for (name, t) in tensors {
            map.insert(name.to_string(), t?);
        }
        candle_core::safetensors::save(&map, &path).map_err(|e| ModelError::Parse {
            path,
            why: e.to_string(),
        })
    }

    /// Reads what [`Transitions::save`] wrote.
    pub fn load(dir: &Path) -> Result<Transitions, ModelError> {
        let path = dir.join(TRANSITIONS_FILE);
        let bad = |name: &str, why: String| ModelError::Weights {
            path: path.clone(),
            name: name.to_string(),
            why,
        };
        let tensors =
            candle_core::safetensors::load(&path, &Device::Cpu).map_err(|e| ModelError::Parse {
                path: path.clone(),
                why: e.to_string(),
            })?;
        let get = |name: &str| {
            tensors
                .get(name)
                .ok_or_else(|| bad(name, "missing".into()))
                .and_then(|t| {
                    t.to_dtype(candle_core::DType::U32)
                        .map_err(ModelError::from)
                })
        };
        let (from, to, count) = (get("from")?, get("to")?, get("count")?);
        let (n, levels) = to.dims2()?;
        if from.dims() != [n, levels] || count.dims() != [n] {
            return Err(bad(
                "from",
                format!(
                    "shapes {:?}, {:?} and {:?} do not agree",
                    from.dims(),
                    to.dims(),
                    count.dims()
                ),
            ));
        }
        let sids = |t: &Tensor, name: &str| -> Result<Vec<Sid>, ModelError> {
            t.to_vec2::<u32>()?
                .into_iter()
                .map(|row| {
                    let codes: Vec<Code> = row
                        .iter()
                        .map(|&c| Code::try_from(c))
                        .collect::<Result<_, _>>()
                        .map_err(|_| bad(name, format!("a code in {row:?} exceeds 16 bits")))?;
                    Sid::new(&codes).map_err(|e| bad(name, e.to_string()))
                })
                .collect()
        };
        let (from, to, counts) = (
            sids(&from, "from")?,
            sids(&to, "to")?,
            count.to_vec1::<u32>()?,
        );
        Ok(Transitions::from_counts(
            from.into_iter()
                .zip(to)
                .zip(counts)
                .map(|((a, b), n)| (a, b, n)),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sid(c: &[Code]) -> Sid {
        Sid::new(c).unwrap()
    }

    #[test]
    fn counts_group_by_predecessor_and_sort_successors_by_sid() {
        let (a, b, c) = (sid(&[1, 2]), sid(&[0, 5]), sid(&[0, 1]));
        let t = Transitions::count([(a, b), (b, a), (a, c), (a, b)]);
        assert_eq!(t.successors(a), (&[c, b][..], &[1, 2][..]));
        assert_eq!(t.successors(b), (&[a][..], &[1][..]));
        assert_eq!(t.successors(c), (&[][..], &[][..]));
        assert_eq!(t.len(), 3);
    }

    #[test]
    fn saved_counts_load_back_equal() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, c) = (sid(&[1, 2, 3]), sid(&[0, 5, 1]), sid(&[0, 1, 300]));
        let t = Transitions::count([(a, b), (b, a), (a, c), (a, b), (c, c)]);
        t.save(dir.path()).unwrap();
        assert_eq!(Transitions::load(dir.path()).unwrap(), t);
        // A corpus without transitions saves and loads too.
        let empty = Transitions::count([]);
        empty.save(dir.path()).unwrap();
        assert!(Transitions::load(dir.path()).unwrap().is_empty());
    }
}
