//! Applying catalogue events: the rules of the module docs, each event's
//! writes staged whole once it cannot fail any more.

use std::collections::BTreeMap;
use std::error::Error as StdError;

use super::applied::{Applied, Position};
use super::codec::{self, Binding, SidState, Table};
use super::staging::Writes;
use super::{corrupt, ItemEntry, LiveChange, Registry, RegistryError, Status};
use crate::sid::Sid;
use crate::tokenizer::ContentCodes;

impl Registry {
    /// Applies an upsert of `item_id` whose content hashes to `content_hash`,
    /// read at `position` of the catalogue topic. `generation` is the index
    /// generation a SID leaving now is tagged with (see the module docs).
    ///
    /// `content_codes` runs the tokenizer (all SID levels but the last, and
    /// the prefixes to try when theirs is full); it is called only when the
    /// item needs a new SID, so replays skip it. An error from it, or a full
    /// prefix with no room next to it, leaves the registry unchanged.
    pub fn apply_upsert<E>(
        &mut self,
        item_id: &str,
        content_hash: [u8; 32],
        position: Position,
        generation: u64,
        content_codes: impl FnOnce() -> Result<ContentCodes, E>,
    ) -> Result<LiveChange, RegistryError>
    where
        E: Into<Box<dyn StdError + Send + Sync>>,
    {
        self.write_if_due()?;
        let mut w = Writes::default();
        let Some(mut e) = self.get(item_id)? else {
            let codes = self.content_codes(item_id, content_codes)?;
            let ord = self.new_ord()?;
            let sid = self.place_new(item_id, &codes)?;
            let entry = ItemEntry {
                ord,
                sid: Some(sid),
                status: Status::Live,
                content_hash,
                applied: Applied::at(position),
                retired_generation: None,
            };
            w.entry(item_id, &entry);
            w.ord(ord, item_id);
            w.bind(sid, ord, SidState::Live);
            self.stage(w);
            self.next_ord += 1;
            self.live += 1;
            return Ok(LiveChange::Added { ord, sid });
        };
        if e.applied.replays(position) {
            return Ok(LiveChange::Unchanged);
        }
        let same_content = e.content_hash == content_hash;
        e.content_hash = content_hash;
        e.applied.record(position);
        let ord = e.ord;
        let change = match (e.status, e.sid) {
            (Status::Reserved, Some(sid)) => {
                w.bind(sid, ord, SidState::Live);
                LiveChange::Added { ord, sid }
            }
            (Status::Live, Some(_)) if same_content => LiveChange::Unchanged,
            (Status::Live, Some(old)) => {
                let codes = self.content_codes(item_id, content_codes)?;
                match self.place(item_id, &codes, old)? {
                    None => LiveChange::Unchanged,
                    Some(new) => {
                        w.leave(old, ord, generation);
                        w.bind(new, ord, SidState::Live);
                        e.sid = Some(new);
                        LiveChange::Moved { ord, old, new }
                    }
                }
            }
            (Status::Retired, Some(old)) => {
                let new = if same_content {
                    None
                } else {
                    let codes = self.content_codes(item_id, content_codes)?;
                    self.place(item_id, &codes, old)?
                };
                match new {
                    Some(new) => {
                        w.bind(new, ord, SidState::Live);
                        e.sid = Some(new);
                        LiveChange::Added { ord, sid: new }
                    }
                    None => {
                        let left_at = self.left_at(old, ord)?;
                        w.stay(old, ord, left_at);
                        LiveChange::Added { ord, sid: old }
                    }
                }
            }
            (Status::Retired, None) => {
                let codes = self.content_codes(item_id, content_codes)?;
                let new = self.place_new(item_id, &codes)?;
                w.bind(new, ord, SidState::Live);
                e.sid = Some(new);
                LiveChange::Added { ord, sid: new }
            }
            (Status::Reserved | Status::Live, None) => {
                return Err(corrupt(Table::Items, item_id.as_bytes(), "no SID"));
            }
        };
        e.status = Status::Live;
        w.entry(item_id, &e);
        self.stage(w);
        if matches!(change, LiveChange::Added { .. }) {
            self.live += 1;
        }
        Ok(change)
    }

    /// Applies a retire of `item_id` read at `position`; its SID leaves the
    /// live set at index generation `generation` and stays bound to it until
    /// released. An item the registry never saw becomes a retired item with
    /// no SID ([`LiveChange::RetiredUnseen`]; the module docs say why).
    pub fn apply_retire(
        &mut self,
        item_id: &str,
        position: Position,
        generation: u64,
    ) -> Result<LiveChange, RegistryError> {
        self.write_if_due()?;
        let mut w = Writes::default();
        let Some(mut e) = self.get(item_id)? else {
            let ord = self.new_ord()?;
            let entry = ItemEntry {
                ord,
                sid: None,
                status: Status::Retired,
                content_hash: [0; 32],
                applied: Applied::at(position),
                retired_generation: None,
            };
            w.entry(item_id, &entry);
            w.ord(ord, item_id);
            self.stage(w);
            self.next_ord += 1;
            return Ok(LiveChange::RetiredUnseen { ord });
        };
        if e.applied.replays(position) {
            return Ok(LiveChange::Unchanged);
        }
        e.applied.record(position);
        let change = match (e.status, e.sid) {
            (Status::Retired, _) => LiveChange::Unchanged,
            (status @ (Status::Reserved | Status::Live), Some(sid)) => {
                w.leave(sid, e.ord, generation);
                e.status = Status::Retired;
                e.retired_generation = Some(generation);
                if status == Status::Live {
                    LiveChange::Retired { ord: e.ord, sid }
                } else {
                    LiveChange::Unchanged
                }
            }
            (Status::Reserved | Status::Live, None) => {
                return Err(corrupt(Table::Items, item_id.as_bytes(), "no SID"));
            }
        };
        w.entry(item_id, &e);
        self.stage(w);
        if matches!(change, LiveChange::Retired { .. }) {
            self.live -= 1;
        }
        Ok(change)
    }

    /// Frees every SID that left the live set at generation `up_to_generation`
    /// or before, so that other items can get it. Call it once no snapshot of
    /// that generation or older is alive. Returns how many were freed.
    ///
    /// Costs nothing when no SID is due.
    pub fn release(&mut self, up_to_generation: u64) -> Result<usize, RegistryError> {
        let due = self.leaving.first_key_value().map(|(&g, _)| g);
        if due.is_none_or(|g| g > up_to_generation) {
            return Ok(0);
        }
        self.write_if_due()?;
        let mut w = Writes::default();
        let mut freed = Vec::new();
        for (&generation, sids) in self.leaving.range(..=up_to_generation) {
            for (&sid, &ord) in sids {
                let bad = |d: String| corrupt(Table::Sids, &codec::sid_key(sid), d);
                if self.left_at(sid, ord)? != generation {
                    return Err(bad(format!(
                        "{sid} is not waiting at generation {generation}"
                    )));
                }
                let item_id = self
                    .item_id(ord)?
                    .ok_or_else(|| bad(format!("no item {ord}")))?;
                w.unbind(sid);
                // At most one of the SIDs an item is freed from is the one
                // its entry names, so each entry is written once here.
                if let Some(mut e) = self.get(&item_id)? {
                    if e.sid == Some(sid) {
                        e.sid = None;
                        w.entry(&item_id, &e);
                    }
                }
                freed.push(sid);
            }
        }
        self.stage(w);
        self.leaving = match up_to_generation.checked_add(1) {
            Some(end) => self.leaving.split_off(&end),
            None => BTreeMap::new(),
        };
        for &sid in &freed {
            self.allocator.remove(sid);
        }
        Ok(freed.len())
    }

    pub(super) fn content_codes<E>(
        &self,
        item_id: &str,
        content_codes: impl FnOnce() -> Result<ContentCodes, E>,
    ) -> Result<ContentCodes, RegistryError>
    where
        E: Into<Box<dyn StdError + Send + Sync>>,
    {
        let codes = content_codes().map_err(|e| RegistryError::Codes {
            item: item_id.to_string(),
            source: e.into(),
        })?;
        let bad = |why: String| RegistryError::Codes {
            item: item_id.to_string(),
            source: why.into(),
        };
        if codes.codes.len() != self.levels - 1 {
            return Err(bad(format!(
                "{} content codes for {}-level SIDs, expected {}",
                codes.codes.len(),
                self.levels,
                self.levels - 1
            )));
        }
        if codes.last_ranked.first() != codes.codes.last() {
            return Err(bad(format!(
                "the prefixes to try, {:?}, do not start with the nearest code, {:?}",
                codes.last_ranked.first(),
                codes.codes.last()
            )));
        }
        Ok(codes)
    }

    fn place_new(&mut self, item_id: &str, codes: &ContentCodes) -> Result<Sid, RegistryError> {
        self.allocator
            .place_new(codes)
            .map_err(|source| RegistryError::PrefixFull {
                item: item_id.to_string(),
                source,
            })
    }

    /// A new SID for an item that holds `old`, or `None` where it stays
    /// ([`SidAllocator::place`](crate::tokenizer::SidAllocator::place)).
    fn place(
        &mut self,
        item_id: &str,
        codes: &ContentCodes,
        old: Sid,
    ) -> Result<Option<Sid>, RegistryError> {
        self.allocator
            .place(codes, old.prefix())
            .map_err(|source| RegistryError::PrefixFull {
                item: item_id.to_string(),
                source,
            })
    }

    /// The ord a new item gets; taken when its event is staged.
    pub(super) fn new_ord(&self) -> Result<u32, RegistryError> {
        u32::try_from(self.next_ord).map_err(|_| {
            corrupt(
                Table::Ords,
                &codec::ord_bytes(u32::MAX),
                "no item number left",
            )
        })
    }

    pub(super) fn binding(&self, sid: Sid) -> Result<Option<Binding>, RegistryError> {
        let key = codec::sid_key(sid);
        self.read(&Table::Sids.key(&key))?
            .map(|v| codec::decode_binding(&v).map_err(|d| corrupt(Table::Sids, &key, d)))
            .transpose()
    }

    /// The generation at which `sid`, bound to `ord`, left the live set.
    pub(super) fn left_at(&self, sid: Sid, ord: u32) -> Result<u64, RegistryError> {
        match self.binding(sid)? {
            Some(Binding {
                ord: bound,
                state: SidState::Left(g),
            }) if bound == ord => Ok(g),
            other => Err(corrupt(
                Table::Sids,
                &codec::sid_key(sid),
                format!("expected to have left, bound to item {ord}; found {other:?}"),
            )),
        }
    }
}
