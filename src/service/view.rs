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

use crate::index::Snapshot;
use crate::model::{FreshItems, SidContent};
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
}

/// Which items are fresh and how their content is scored.
#[derive(Clone)]
pub struct FreshSettings {
    /// Items with an ord below this were in the tokenizer's training
    /// catalogue (the registry reserves their ords first): the model learnt
    /// them, or saw them never chosen. The others arrived since.
    pub training_items: u32,
    pub content: SidContent,
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
    /// The newest [`FreshSettings::max`] fresh items of `items` that are
    /// live in `snapshot`. Reads only those (and retired ones among them),
    /// not the whole catalogue: it runs on every publish.
    pub fn items(
        &self,
        snapshot: &Snapshot,
        items: &imbl::OrdMap<u32, ItemRef>,
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
        Arc::new(
            FreshItems::by_sid(self.content.clone(), fresh, self.temperature)
                .with_slots(self.slots)
                .with_after(self.after)
                .with_half_weight_at(self.half_at)
                .with_query_items(self.query_items),
        )
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
            content: Arc::new(|_, out: &mut Vec<f32>| {
                out.clear();
                out.extend([1.0, 0.0]);
                true
            }),
            temperature: 0.2,
            slots: 1,
            after: 0,
            half_at: 0,
            query_items: 1,
            max,
        };
        let ords = |max| {
            let fresh = settings(max).items(&snapshot, &items);
            let mut ords: Vec<u32> = (0..fresh.len()).map(|i| fresh.item(i).1).collect();
            ords.sort_unstable();
            ords
        };
        assert_eq!(ords(usize::MAX), [2, 3, 4, 7]);
        assert_eq!(ords(2), [4, 7]);
    }
}
