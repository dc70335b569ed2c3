//! What the feed side sees of the catalogue: one immutable view, swapped
//! whole.
//!
//! The catalogue consumer owns the registry and the index and is the only
//! writer. Everyone else (the interactions consumer mapping item ids to ords,
//! the feed worker decoding and naming items) reads an [`Arc<View>`] that is
//! never mutated: a new one is published after each catalogue batch. The maps
//! are persistent (`imbl`), so publishing shares all unchanged structure and
//! costs a few allocations, and readers never take a lock.

use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::embed::tfidf::TfIdf;
use crate::index::Snapshot;
use crate::model::{Affinity, FreshItems, ItemContent};
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
    /// not the whole catalogue: it runs on every publish.
    pub fn items(
        &self,
        snapshot: &Snapshot,
        items: &imbl::OrdMap<u32, ItemRef>,
        content: &imbl::HashMap<u32, Arc<[(u32, f32)]>>,
    ) -> Arc<FreshItems> {
        let fresh = items
            .range(self.training_items..)
            .rev()
            .filter_map(|(&ord, item)| {
                item.sid
                    .filter(|&s| snapshot.get(s) == Some(ord))
                    .map(|s| (s, ord))
            })
            .take(self.max)
            .collect();
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
        let mut fresh = FreshItems::by_item(lookup, self.dim, fresh, self.temperature)
            .with_slots(self.slots)
            .with_after(self.after)
            .with_half_weight_at(self.half_at)
            .with_query_items(self.query_items);
        if let Some(a) = affinity {
            // The widths were checked when the service started.
            if let Err(e) = fresh.set_affinity(a) {
                tracing::error!(error = %e, "fresh items scored without the affinity");
            }
        }
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
            let fresh = settings(max).items(&snapshot, &items, &imbl::HashMap::new());
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
        let served = settings.items(&snapshot, &items, &content);
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
    }
}
