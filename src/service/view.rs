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
    /// Ord → item.
    pub items: imbl::HashMap<u32, ItemRef>,
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
}

impl FreshSettings {
    /// The fresh items of `items` that are live in `snapshot`.
    pub fn items(
        &self,
        snapshot: &Snapshot,
        items: &imbl::HashMap<u32, ItemRef>,
    ) -> Arc<FreshItems> {
        let fresh = items
            .iter()
            .filter(|(&ord, _)| ord >= self.training_items)
            .filter_map(|(&ord, item)| {
                item.sid
                    .filter(|&s| snapshot.get(s) == Some(ord))
                    .map(|s| (s, ord))
            })
            .collect();
        Arc::new(
            FreshItems::by_sid(self.content.clone(), fresh, self.temperature)
                .with_slots(self.slots)
                .with_after(self.after)
                .with_half_weight_at(self.half_at),
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
