//! What the feed side sees of the catalogue: one immutable view, swapped
//! whole.
//!
//! The catalogue consumer owns the registry and the index and is the only
//! writer. Everyone else (the interactions consumer mapping item ids to ords,
//! the feed worker decoding and naming items) reads an [`Arc<View>`] that is
//! never mutated: a new one is published after each catalogue batch. The maps
//! are persistent (`imbl`), so publishing shares all unchanged structure and
//! costs a few allocations, and readers never take a lock.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::embed::tfidf::TfIdf;
use crate::index::Snapshot;
use crate::model::{Affinity, FreshItems, ItemContent, Segment};
use crate::registry::{ItemEntry, Status};
use crate::sid::Sid;

/// An item as the feed side needs it.
#[derive(Clone, Debug, PartialEq)]
pub struct ItemRef {
    pub id: Arc<str>,
    /// The SID the model reads it by; `None` once a retired item's SID was
    /// released.
    pub sid: Option<Sid>,
    pub live: bool,
}

impl ItemRef {
    pub fn of(id: Arc<str>, e: &ItemEntry) -> ItemRef {
        ItemRef {
            id,
            sid: e.sid,
            live: e.status == Status::Live,
        }
    }
}

/// One published state of the catalogue.
#[derive(Clone)]
pub struct View {
    /// Decoding tables of the live SIDs.
    pub snapshot: Arc<Snapshot>,
    /// Item id → ord, for every item that was ever live.
    pub ords: imbl::HashMap<Arc<str>, u32>,
    /// Ord → item. Ordered: ords are handed out in order of arrival, so
    /// the newest items are the last ones (the fresh set takes those).
    pub items: imbl::OrdMap<u32, ItemRef>,
    /// The live items the model never learnt, scored by their content so
    /// that they compete for feed slots ([`crate::model::fresh`]); `None`
    /// when the mechanism is off.
    pub fresh: Option<Arc<FreshItems>>,
    /// Ord → the weighted words of the item's last catalogue event, where
    /// fresh items are scored by them ([`FreshContent::Catalogue`]); empty
    /// otherwise.
    pub content: imbl::HashMap<u32, Arc<[(u32, f32)]>>,
}

/// Where the fresh-item mixture reads an item's content
/// (`feed.fresh_content`).
#[derive(Clone)]
pub enum FreshContent {
    /// A lookup that needs nothing stored: the tokenizer's reconstruction of
    /// the SID's content codes.
    Sid(ItemContent),
    /// The item's catalogue event's words, weighted as the catalogue the
    /// affinity was fitted on ([`TfIdf`]), kept per ord in the registry and
    /// the view: the space the offline cold-start numbers were measured in.
    Catalogue {
        words: Arc<TfIdf>,
        affinity: Option<Arc<Affinity>>,
    },
}

/// Which items are fresh and how their content is scored.
#[derive(Clone)]
pub struct FreshSettings {
    /// Items with an ord below this were in the tokenizer's training
    /// catalogue (the registry reserves their ords first): the model learnt
    /// them, or saw them never chosen. The others arrived since.
    pub training_items: u32,
    pub content: FreshContent,
    /// The content vectors' width.
    pub dim: usize,
    /// `feed.fresh_weight`, or the default for the content source.
    pub weight: f32,
    pub temperature: f32,
    pub slots: usize,
    pub after: usize,
    pub half_at: usize,
    pub query_items: usize,
    /// Fresh items at most: the newest. Each costs every request a dot
    /// product and every publish a content row, and the fresh set grows with
    /// every item that arrives until the next training; an older one that
    /// users take is reached through the counts learnt from the stream.
    pub max: usize,
}

impl FreshSettings {
    /// The weighting of a catalogue event's words, when the items' content
    /// is read from there.
    pub fn words(&self) -> Option<&TfIdf> {
        match &self.content {
            FreshContent::Catalogue { words, .. } => Some(words),
            FreshContent::Sid(_) => None,
        }
    }

    /// The newest [`FreshSettings::max`] fresh items of `items` that are
    /// live in `snapshot`. Reads only those (and retired ones among them),
    /// not the whole catalogue, and builds the rows of the ones `built`
    /// does not hold as they are: it runs on every publish.
    pub fn items(
        &self,
        built: &mut FreshRows,
        snapshot: &Snapshot,
        items: &imbl::OrdMap<u32, ItemRef>,
        content: &imbl::HashMap<u32, Arc<[(u32, f32)]>>,
    ) -> Arc<FreshItems> {
        let (lookup, affinity) = match &self.content {
            FreshContent::Sid(lookup) => (lookup.clone(), None),
            FreshContent::Catalogue { affinity, .. } => {
                let (rows, dim) = (content.clone(), self.dim);
                let lookup: ItemContent = Arc::new(move |_, ord, out: &mut Vec<f32>| {
                    let Some(row) = rows.get(&ord) else {
                        return false;
                    };
                    out.clear();
                    out.resize(dim, 0.0);
                    for &(b, v) in row.iter() {
                        if let Some(x) = out.get_mut(b as usize) {
                            *x = v;
                        }
                    }
                    !row.is_empty()
                });
                (lookup, affinity.clone())
            }
        };
        let fresh: Vec<(Sid, u32)> = items
            .range(self.training_items..)
            .rev()
            .filter_map(|(&ord, item)| {
                item.sid
                    .filter(|&s| snapshot.get(s) == Some(ord))
                    .map(|s| (s, ord))
            })
            .take(self.max)
            .collect();
        let fresh = built.update(fresh, content, |new| {
            Segment::looked_up(&lookup, self.dim, new, affinity.as_deref())
        });
        let segments = built.segments.clone();
        let fresh = FreshItems::by_item(
            lookup,
            self.dim,
            segments,
            fresh,
            self.temperature,
            affinity,
        )
        .with_slots(self.slots)
        .with_after(self.after)
        .with_half_weight_at(self.half_at)
        .with_query_items(self.query_items);
        Arc::new(fresh)
    }

    /// An item's weighted words from its catalogue event, for the registry
    /// and the view; `None` when the content comes from elsewhere.
    pub fn words_of(&self, up: &crate::contract::ItemUpsert) -> Option<Arc<[(u32, f32)]>> {
        self.words().map(|w| {
            w.row(|column| super::content::field_text(up, column))
                .into()
        })
    }
}

/// The content rows of the fresh set last published, kept by the catalogue
/// consumer (the only writer) from one publish to the next. A publish
/// writes a [`Segment`] of the items that arrived or changed since and
/// shares the others'. Segments are merged as in a log-structured store:
/// the newest into the one before it while the newest holds at least half
/// as many of the set's rows (so each row is copied a logarithmic number
/// of times and a request reads a few segments), and all into one once
/// most stored rows are no longer the set's (items that left it or
/// changed).
#[derive(Default)]
pub struct FreshRows {
    /// Oldest first.
    segments: Vec<Arc<Segment>>,
    by_ord: HashMap<u32, Built>,
}

/// A fresh item's row and what it was built from: its SID (a SID's
/// reconstruction) or its catalogue words, whichever the content is.
struct Built {
    sid: Sid,
    words: Option<Arc<[(u32, f32)]>>,
    /// `(segment, row)`.
    at: (usize, u32),
    /// Whether the set being published has it.
    used: bool,
}

impl FreshRows {
    /// Takes `fresh` (`(sid, ord)`) as the new set: rows built by `build`
    /// for the items without one as they are now (`content`: their words),
    /// dropped for the items that left. Returns the set with each item's
    /// `(segment, row)`.
    fn update(
        &mut self,
        fresh: Vec<(Sid, u32)>,
        content: &imbl::HashMap<u32, Arc<[(u32, f32)]>>,
        build: impl FnOnce(&[(Sid, u32)]) -> Segment,
    ) -> Vec<(Sid, u32, (usize, u32))> {
        let mut new = Vec::new();
        for &(sid, ord) in &fresh {
            let words = content.get(&ord);
            match self.by_ord.get_mut(&ord) {
                Some(b) if b.sid == sid && same(&b.words, words) => b.used = true,
                _ => new.push((sid, ord)),
            }
        }
        if !new.is_empty() {
            let s = self.segments.len();
            self.segments.push(Arc::new(build(&new)));
            for (row, (sid, ord)) in (0..).zip(new) {
                let words = content.get(&ord).cloned();
                let at = (s, row);
                let used = true;
                self.by_ord.insert(
                    ord,
                    Built {
                        sid,
                        words,
                        at,
                        used,
                    },
                );
            }
        }
        self.by_ord.retain(|_, b| std::mem::take(&mut b.used));
        self.merge();
        fresh
            .into_iter()
            .map(|(sid, ord)| (sid, ord, self.by_ord[&ord].at))
            .collect()
    }

    /// Merges until the segments are as [`FreshRows`] says.
    fn merge(&mut self) {
        loop {
            let mut read = vec![0usize; self.segments.len()];
            self.by_ord.values().for_each(|b| read[b.at.0] += 1);
            let stored: usize = self.segments.iter().map(|s| s.len()).sum();
            let n = self.segments.len();
            let from = if stored > 2 * self.by_ord.len() {
                0
            } else if n >= 2 && read[n - 1] * 2 >= read[n - 2] {
                n - 2
            } else {
                return;
            };
            self.merge_from(from);
        }
    }

    /// Merges the segments from `from` on into one, of the rows read.
    fn merge_from(&mut self, from: usize) {
        let mut moved: Vec<(usize, u32, u32)> = self
            .by_ord
            .iter()
            .filter(|(_, b)| b.at.0 >= from)
            .map(|(&ord, b)| (b.at.0 - from, b.at.1, ord))
            .collect();
        moved.sort_unstable();
        let picked: Vec<(usize, u32)> = moved.iter().map(|&(s, r, _)| (s, r)).collect();
        let merged = Segment::merged(&self.segments[from..], &picked);
        self.segments.truncate(from);
        if merged.is_empty() {
            return;
        }
        self.segments.push(Arc::new(merged));
        for (row, (_, _, ord)) in (0..).zip(moved) {
            if let Some(b) = self.by_ord.get_mut(&ord) {
                b.at = (from, row);
            }
        }
    }
}

/// Whether a row built from words `a` was built from `b`.
fn same(a: &Option<Arc<[(u32, f32)]>>, b: Option<&Arc<[(u32, f32)]>>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        (a, b) => a.is_none() && b.is_none(),
    }
}

impl View {
    pub fn ord(&self, item_id: &str) -> Option<u32> {
        self.ords.get(item_id).copied()
    }

    pub fn item(&self, ord: u32) -> Option<&ItemRef> {
        self.items.get(&ord)
    }

    /// Whether `ord` may be recommended under `sid` right now.
    pub fn is_live(&self, ord: u32, sid: Sid) -> bool {
        self.snapshot.get(sid) == Some(ord)
    }
}

/// The current view, readable from any thread without a lock.
pub type SharedView = Arc<ArcSwap<View>>;

#[cfg(test)]
/// A view of `ids`, numbered in the order given, none of them live.
pub(crate) fn numbered(ids: &[&str]) -> View {
    let dir = tempfile::tempdir().unwrap();
    let (mut index, _) =
        crate::index::Index::open(dir.path(), &[4, 4], None, &[], 1 << 16).unwrap();
    let ords = ids
        .iter()
        .zip(0u32..)
        .map(|(&id, o)| (id.into(), o))
        .collect();
    let items = ids
        .iter()
        .zip(0u32..)
        .map(|(&id, o)| {
            let item = ItemRef {
                id: id.into(),
                sid: None,
                live: false,
            };
            (o, item)
        })
        .collect();
    View {
        snapshot: index.publish(),
        ords,
        items,
        fresh: None,
        content: imbl::HashMap::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::Index;

    #[test]
    fn the_fresh_set_is_the_newest_live_items_past_training() {
        let sid = |i: u16| Sid::new(&[i / 4, i % 4, 0, 0]).unwrap();
        // Ords 0 and 1 were in training; 2..7 arrived since, 5 was retired
        // (its SID released) and 6 is not live in the snapshot.
        let live: Vec<(Sid, u32)> = [0, 1, 2, 3, 4, 7]
            .into_iter()
            .map(|o| (sid(o as u16), o))
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let (mut index, _) = Index::open(dir.path(), &[4, 4, 4, 4], None, &live, 1 << 16).unwrap();
        let snapshot = index.publish();
        let items: imbl::OrdMap<u32, ItemRef> = (0..8u32)
            .map(|o| {
                let item = ItemRef {
                    id: o.to_string().into(),
                    sid: (o != 5).then(|| sid(o as u16)),
                    live: o != 5 && o != 6,
                };
                (o, item)
            })
            .collect();
        let settings = |max| FreshSettings {
            training_items: 2,
            content: FreshContent::Sid(Arc::new(|_, _, out: &mut Vec<f32>| {
                out.clear();
                out.extend([1.0, 0.0]);
                true
            })),
            dim: 2,
            weight: 0.1,
            temperature: 0.2,
            slots: 1,
            after: 0,
            half_at: 0,
            query_items: 1,
            max,
        };
        let ords = |max| {
            let built = &mut FreshRows::default();
            let fresh = settings(max).items(built, &snapshot, &items, &imbl::HashMap::new());
            let mut ords: Vec<u32> = (0..fresh.len()).map(|i| fresh.item(i).1).collect();
            ords.sort_unstable();
            ords
        };
        assert_eq!(ords(usize::MAX), [2, 3, 4, 7]);
        assert_eq!(ords(2), [4, 7]);
    }

    /// The live path (each item's words weighed as its catalogue event
    /// arrives, looked up by ord) scores fresh items exactly as `eval` does
    /// from the item file's table: the offline cold-start numbers are the
    /// service's.
    #[test]
    fn catalogue_words_score_fresh_items_as_the_offline_table_does() {
        use crate::embed::tfidf::{tfidf, TfIdf};
        use crate::model::ContentTable;

        let texts = [
            "lego brick red",
            "lego brick blue",
            "doll house pink",
            "lego train red",
            "doll pram pink",
            "kite blue",
        ];
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.item");
        let mut file = String::from("item_id:token\tattributes:token_seq\n");
        for (i, t) in texts.iter().enumerate() {
            file.push_str(&format!("{i}\t{t}\n"));
        }
        std::fs::write(&path, file).unwrap();
        let catalogue = crate::dataset::read_items(&path).unwrap();
        let dim = 32;
        let words = TfIdf::fit(&catalogue, dim);
        let content: imbl::HashMap<u32, Arc<[(u32, f32)]>> = texts
            .iter()
            .enumerate()
            .map(|(o, t)| {
                let row = words.row(|c| {
                    if c == "attributes" {
                        t.to_string()
                    } else {
                        String::new()
                    }
                });
                (o as u32, row.into())
            })
            .collect();
        let mut x = 0.3f32;
        let mut noise = |n: usize| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    x = (x * 3.7 + 0.11).fract();
                    x - 0.5
                })
                .collect()
        };
        let affinity = Arc::new(
            Affinity::new("tfidf", dim, noise(dim * 4), noise(dim * 4), noise(dim)).unwrap(),
        );
        let sid = |o: u32| Sid::new(&[o as u16, 0, 0]).unwrap();
        let live: Vec<(Sid, u32)> = (0..6).map(|o| (sid(o), o)).collect();
        let index_dir = tempfile::tempdir().unwrap();
        let (mut index, _) =
            Index::open(index_dir.path(), &[8, 4, 4], None, &live, 1 << 16).unwrap();
        let snapshot = index.publish();
        let items: imbl::OrdMap<u32, ItemRef> = (0..6u32)
            .map(|o| {
                let item = ItemRef {
                    id: o.to_string().into(),
                    sid: Some(sid(o)),
                    live: true,
                };
                (o, item)
            })
            .collect();
        let settings = FreshSettings {
            training_items: 3,
            content: FreshContent::Catalogue {
                words: Arc::new(words),
                affinity: Some(affinity.clone()),
            },
            dim,
            weight: 0.1,
            temperature: 0.1,
            slots: 1,
            after: 0,
            half_at: 0,
            query_items: 2,
            max: 10,
        };
        let mut built = FreshRows::default();
        let served = settings.items(&mut built, &snapshot, &items, &content);
        let mut offline = FreshItems::new(
            ContentTable::new(dim, tfidf(&catalogue, dim)),
            (3..6).map(|o| (sid(o), o)).collect(),
            0.1,
        )
        .with_query_items(2);
        offline.set_affinity(affinity).unwrap();
        let (mut q, mut part, mut a, mut b) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for recent in [[0, 1], [2, 0], [1, 2]] {
            let recent: Vec<(Sid, u32)> = recent.iter().map(|&o| (sid(o), o)).collect();
            assert!(served.score(&recent, |_, _| false, &mut q, &mut part, &mut a));
            assert!(offline.score(&recent, |_, _| false, &mut q, &mut part, &mut b));
            assert_eq!(a.len(), 3);
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() < 1e-5, "{a:?} against {b:?}");
            }
        }
        // The lego history puts the lego train first by its words.
        let recent = [(sid(0), 0), (sid(1), 1)];
        assert!(served.score(&recent, |_, _| false, &mut q, &mut part, &mut a));
        let best = (0..3).max_by(|&i, &j| a[i].total_cmp(&a[j])).unwrap();
        assert_eq!(served.item(best).1, 3, "{a:?}");

        // The next publish builds the row of an item whose words changed:
        // the lego train became a kite, and scores as the other kite does.
        let mut content = content;
        content.insert(3, content[&5].clone());
        let again = settings.items(&mut built, &snapshot, &items, &content);
        assert!(again.score(&recent, |_, _| false, &mut q, &mut part, &mut a));
        assert_eq!(again.item(0).1, 3);
        assert!((a[0] - a[2]).abs() < 1e-6, "{a:?}");
    }

    /// Publish after publish over a catalogue where items arrive, retire
    /// and move to other SIDs, and the set keeps only the newest: the rows
    /// kept from earlier publishes score every item exactly as a set built
    /// from nothing does, only the items new to the set (or moved) are
    /// looked up, and merging keeps the segments few.
    #[test]
    fn a_kept_fresh_set_scores_as_one_built_anew_and_builds_only_what_changed() {
        use std::sync::atomic::{AtomicUsize, Ordering};

        let looked_up = Arc::new(AtomicUsize::new(0));
        let counter = looked_up.clone();
        let lookup: ItemContent = Arc::new(move |sid: Sid, _, out: &mut Vec<f32>| {
            counter.fetch_add(1, Ordering::Relaxed);
            let c = sid.codes();
            out.clear();
            out.extend((0..8).map(|j| ((c[0] * 7 + c[1] * 3 + c[2]) as f32 + j as f32).sin()));
            c[0] % 5 != 4 // some items have no content
        });
        let settings = FreshSettings {
            training_items: 10,
            content: FreshContent::Sid(lookup),
            dim: 8,
            weight: 0.1,
            temperature: 0.2,
            slots: 1,
            after: 0,
            half_at: 0,
            query_items: 2,
            max: 120,
        };
        let mut x = 12345u64;
        let mut rand = move |n: usize| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 33) as usize % n
        };
        let dir = tempfile::tempdir().unwrap();
        let (mut index, _) = Index::open(dir.path(), &[16, 16, 16], None, &[], 1 << 16).unwrap();
        let mut items: imbl::OrdMap<u32, ItemRef> = imbl::OrdMap::new();
        let mut taken = std::collections::HashSet::new();
        let mut free_sid = |rand: &mut dyn FnMut(usize) -> usize| loop {
            let c = [rand(16) as u16, rand(16) as u16, rand(16) as u16];
            if taken.insert(c) {
                return Sid::new(&c).unwrap();
            }
        };
        let mut built = FreshRows::default();
        let mut before: HashMap<u32, Sid> = HashMap::new();
        let (mut q, mut part, mut a, mut b) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for step in 0..300 {
            for _ in 0..rand(12) {
                let ord = items.len() as u32;
                let sid = free_sid(&mut rand);
                index.insert(sid, ord);
                let id = ord.to_string().into();
                items.insert(
                    ord,
                    ItemRef {
                        id,
                        sid: Some(sid),
                        live: true,
                    },
                );
            }
            let live: Vec<u32> = items
                .iter()
                .filter(|(_, i)| i.live)
                .map(|(&o, _)| o)
                .collect();
            for _ in 0..rand(3) {
                let ord = live[rand(live.len())];
                let item = items.get_mut(&ord).unwrap();
                let old = item.sid.take().unwrap();
                index.remove(old);
                if rand(2) == 0 {
                    item.live = false; // retired
                } else {
                    let sid = free_sid(&mut rand);
                    index.insert(sid, ord);
                    item.sid = Some(sid);
                }
            }
            let snapshot = index.publish();
            let empty = imbl::HashMap::new();
            looked_up.store(0, Ordering::Relaxed);
            let kept = settings.items(&mut built, &snapshot, &items, &empty);
            let now: HashMap<u32, Sid> = (0..kept.len())
                .map(|i| (kept.item(i).1, kept.item(i).0))
                .collect();
            let changed = now
                .iter()
                .filter(|&(o, s)| before.get(o) != Some(s))
                .count();
            assert_eq!(looked_up.load(Ordering::Relaxed), changed, "step {step}");
            before = now;
            let anew = settings.items(&mut FreshRows::default(), &snapshot, &items, &empty);
            assert_eq!(kept.len(), anew.len());
            assert!(
                built.segments.len() <= 2 + kept.len().max(1).ilog2() as usize,
                "step {step}: {}",
                built.segments.len()
            );
            for _ in 0..3 {
                let recent: Vec<(Sid, u32)> = (0..2)
                    .filter_map(|_| {
                        let o = rand(items.len()) as u32;
                        items[&o].sid.map(|s| (s, o))
                    })
                    .collect();
                let scored = kept.score(&recent, |_, _| false, &mut q, &mut part, &mut a);
                assert_eq!(
                    scored,
                    anew.score(&recent, |_, _| false, &mut q, &mut part, &mut b)
                );
                if scored {
                    assert!(
                        a.iter()
                            .zip(&b)
                            .all(|(x, y)| x == y || (x - y).abs() < 1e-5),
                        "step {step}: {a:?} against {b:?}"
                    );
                }
            }
        }
    }
}
