//! The SID registry: the durable source of truth of item ⇄ SID.
//!
//! Catalogue events (upsert, retire) are applied here, in the order of the
//! catalogue topic. The registry decides which SID an item goes by, remembers
//! it across restarts, and tells the index what changed ([`Change`]). The index
//! can always be rebuilt from [`Registry::live`].
//!
//! # Rules
//!
//! - **One tokenizer.** A registry belongs to one tokenizer version: SIDs from
//!   another tokenizer mean nothing, so opening with another is an error.
//! - **Training SIDs are kept.** The model was trained on the training items'
//!   SIDs, so on first open every training SID is *reserved* for its item, and
//!   the item's first upsert makes exactly that SID live.
//! - **New SIDs follow the tokenizer's rule**: content codes plus the smallest
//!   last-level code the prefix has free ([`SidAllocator`]).
//! - **Replays change nothing.** Each item remembers the position of the last
//!   event applied to it; an event at or before that position is a replay and
//!   is ignored, without running the tokenizer.
//! - **Content changes move the item.** An upsert with a new content hash
//!   re-tokenizes the item; if its content prefix changed it gets a new SID and
//!   the old one leaves the live set. (Same prefix: the SID stays.)
//! - **A SID is never handed to another item while a snapshot may refer to
//!   it.** A SID that leaves the live set (retired, or the old SID of a moved
//!   item) stays *bound* to its item, tagged with the index generation it left
//!   at. Only [`Registry::release`]`(g)`, which the index calls once no snapshot
//!   of generation `g` or older is alive, frees the SIDs that left at or before
//!   `g`. Until then a retired item that comes back with the same content (or
//!   the same content prefix) gets its old SID back.
//!
//! # Storage
//!
//! One sled database with five trees:
//!
//! | tree      | key                        | value                                  |
//! |-----------|----------------------------|----------------------------------------|
//! | `items`   | item id (UTF-8)            | [`ItemEntry`]                          |
//! | `ords`    | ord (u32, big-endian)      | item id                                |
//! | `sids`    | SID key ([`Sid::to_key`])  | ord and state (reserved, live, left at g) |
//! | `leaving` | generation ++ SID key      | ord: the SIDs waiting for release      |
//! | `meta`    | name                       | tokenizer binding, index generation, the index's own keys |
//!
//! Every event is applied as one sled transaction over the trees it touches,
//! so the trees never disagree, not even after a crash. In memory there is only
//! what is rebuilt from `sids` on open (the allocator and the live count).
//!
//! # Durability: what survives a crash
//!
//! sled writes to its log in memory and makes it durable on a flush. Two things
//! flush: [`Registry::flush`], which returns once everything applied before it
//! is on disk, and sled's background flusher, every `flush_every_ms`
//! ([`DEFAULT_FLUSH_EVERY_MS`] unless told otherwise). After a crash the
//! registry holds every event applied before the last completed flush, possibly
//! some applied after it, each one whole or not at all (a prefix of the applied
//! sequence). So the service commits a catalogue offset only after `flush`
//! returned: events after the committed offset are replayed on restart, and
//! replays are harmless.

mod codec;
mod error;

use std::convert::Infallible;
use std::error::Error as StdError;
use std::path::Path;
use std::time::{Duration, Instant};

use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};
use sled::{Batch, Tree};

pub use codec::{ItemEntry, Status};
pub use error::RegistryError;

use crate::sid::{Code, Sid, MAX_LEVELS};
use crate::tokenizer::{FrozenTokenizer, SidAllocator};
use codec::{Binding, SidState};
use error::show_key;

/// How often sled flushes in the background unless told otherwise. Bounds the
/// work lost in a crash when the caller never calls [`Registry::flush`]; the
/// service does not rely on it.
pub const DEFAULT_FLUSH_EVERY_MS: u64 = 500;

/// The on-disk format this build reads and writes.
const FORMAT: u64 = 1;

const META_FORMAT: &str = "registry/format";
const META_VERSION: &str = "registry/tokenizer_version";
const META_LEVELS: &str = "registry/sid_levels";
const META_CAPACITY: &str = "registry/last_level_capacity";
const META_INDEX_GENERATION: &str = "registry/index_generation";
/// Keys of [`Registry::meta_set`] live under this prefix, apart from the
/// registry's own.
const META_EXTERNAL: &str = "ext/";

/// Training items reserved per batch on first open.
const INIT_BATCH: usize = 10_000;

/// What a registry needs to know about its tokenizer.
#[derive(Clone, Debug)]
pub struct TokenizerBinding {
    pub version: String,
    /// Levels of a full SID, the collision level included.
    pub sid_levels: usize,
    pub last_level_capacity: usize,
    /// The training items and the SIDs the model learned them by.
    pub training: Vec<(String, Sid)>,
}

impl TokenizerBinding {
    pub fn of(tokenizer: &FrozenTokenizer) -> TokenizerBinding {
        TokenizerBinding {
            version: tokenizer.version().to_string(),
            sid_levels: tokenizer.sid_levels(),
            last_level_capacity: tokenizer.manifest().last_level_capacity,
            training: tokenizer.training_items().to_vec(),
        }
    }

    fn describe(version: &str, levels: u64, capacity: u64) -> String {
        format!("{version:?} ({levels}-level SIDs, last level of {capacity})")
    }

    /// Refuses a binding the registry could not honour: SIDs of the wrong
    /// shape, or two training items sharing a SID.
    fn validate(&self) -> Result<(), RegistryError> {
        let bad = |detail: String| Err(RegistryError::Binding(detail));
        if !(2..=MAX_LEVELS).contains(&self.sid_levels) {
            return bad(format!(
                "SIDs have 2 to {MAX_LEVELS} levels, not {}",
                self.sid_levels
            ));
        }
        if !(1..=usize::from(Code::MAX) + 1).contains(&self.last_level_capacity) {
            return bad(format!(
                "last-level capacity {} is not in 1..=65536",
                self.last_level_capacity
            ));
        }
        if u32::try_from(self.training.len()).is_err() {
            return bad(format!("{} training items", self.training.len()));
        }
        let mut seen = std::collections::HashMap::with_capacity(self.training.len());
        for (item, sid) in &self.training {
            if sid.levels() != self.sid_levels
                || usize::from(sid.last()) >= self.last_level_capacity
            {
                return bad(format!(
                    "training item {item:?} has SID {sid}, outside {} levels with a last level of {}",
                    self.sid_levels, self.last_level_capacity
                ));
            }
            if let Some(other) = seen.insert(*sid, item) {
                return bad(format!(
                    "training items {other:?} and {item:?} share SID {sid}"
                ));
            }
        }
        let mut ids: Vec<&str> = self.training.iter().map(|(id, _)| id.as_str()).collect();
        ids.sort_unstable();
        if let Some(pair) = ids.windows(2).find(|w| w[0] == w[1]) {
            return bad(format!("training item {:?} appears twice", pair[0]));
        }
        Ok(())
    }
}

/// What applying an event did to the set of live SIDs, i.e. what the index
/// has to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// Nothing: a replay, a retire of an item that was not live, or a content
    /// update that kept the SID.
    Unchanged,
    /// `sid` became live for item `ord`.
    Added { ord: u32, sid: Sid },
    /// Item `ord` left `old` for `new`.
    Moved { ord: u32, old: Sid, new: Sid },
    /// `sid`, item `ord`'s, left the live set.
    Retired { ord: u32, sid: Sid },
}

/// The registry. One writer: every change goes through `&mut self`.
pub struct Registry {
    db: sled::Db,
    items: Tree,
    ords: Tree,
    sids: Tree,
    leaving: Tree,
    meta: Tree,
    levels: usize,
    allocator: SidAllocator,
    live: usize,
}

/// The writes of one event, applied in one transaction.
#[derive(Default)]
struct Writes {
    items: Batch,
    ords: Batch,
    sids: Batch,
    leaving: Batch,
}

impl Writes {
    fn entry(&mut self, item_id: &str, entry: &ItemEntry) {
        self.items
            .insert(item_id.as_bytes(), codec::encode_entry(entry));
    }

    fn bind(&mut self, sid: Sid, ord: u32, state: SidState) {
        self.sids.insert(
            codec::sid_key(sid),
            codec::encode_binding(Binding { ord, state }),
        );
    }

    /// Binds `sid` as having left at `generation`, waiting for release.
    fn leave(&mut self, sid: Sid, ord: u32, generation: u64) {
        self.bind(sid, ord, SidState::Left(generation));
        self.leaving.insert(
            codec::leaving_key(generation, sid),
            &codec::ord_bytes(ord)[..],
        );
    }
}

impl Registry {
    /// Opens (or creates) the registry at `path` for the tokenizer `binding`.
    ///
    /// sled flushes in the background every `flush_every_ms` milliseconds
    /// (`None`: only on [`Registry::flush`]); see the module docs for what
    /// survives a crash. Creating reserves every training item's SID.
    pub fn open(
        path: &Path,
        binding: &TokenizerBinding,
        flush_every_ms: Option<u64>,
    ) -> Result<Registry, RegistryError> {
        let db = open_db(path, flush_every_ms)?;
        let mut registry = Registry {
            items: db.open_tree("items")?,
            ords: db.open_tree("ords")?,
            sids: db.open_tree("sids")?,
            leaving: db.open_tree("leaving")?,
            meta: db.open_tree("meta")?,
            db,
            levels: binding.sid_levels,
            allocator: SidAllocator::new(1),
            live: 0,
        };
        if registry.meta.get(META_VERSION)?.is_some() {
            registry.check_binding(binding)?;
        } else {
            registry.create(binding)?;
        }
        registry.allocator = SidAllocator::new(binding.last_level_capacity);
        for kv in registry.sids.iter() {
            let (key, value) = kv?;
            let sid = codec::decode_sid_key(&key, registry.levels)
                .map_err(|d| corrupt("sids", &key, d))?;
            let bound = codec::decode_binding(&value).map_err(|d| corrupt("sids", &key, d))?;
            if usize::from(sid.last()) >= binding.last_level_capacity {
                return Err(corrupt("sids", &key, "last code beyond the capacity"));
            }
            registry.allocator.insert(sid);
            registry.live += usize::from(bound.state == SidState::Live);
        }
        Ok(registry)
    }

    /// First open: reserve the training SIDs, then record the binding. The
    /// binding is written last and flushed, so a crash before it leaves a
    /// registry that the next open creates again from scratch.
    fn create(&self, binding: &TokenizerBinding) -> Result<(), RegistryError> {
        binding.validate()?;
        for tree in [
            &self.items,
            &self.ords,
            &self.sids,
            &self.leaving,
            &self.meta,
        ] {
            tree.clear()?;
        }
        for (chunk_no, chunk) in binding.training.chunks(INIT_BATCH).enumerate() {
            let mut w = Writes::default();
            for (i, (item, sid)) in chunk.iter().enumerate() {
                let ord = (chunk_no * INIT_BATCH + i) as u32;
                let entry = ItemEntry {
                    ord,
                    sid: Some(*sid),
                    status: Status::Reserved,
                    content_hash: [0; 32],
                    position: None,
                    retired_generation: None,
                };
                w.entry(item, &entry);
                w.ords.insert(&codec::ord_bytes(ord)[..], item.as_bytes());
                w.bind(*sid, ord, SidState::Reserved);
            }
            self.items.apply_batch(w.items)?;
            self.ords.apply_batch(w.ords)?;
            self.sids.apply_batch(w.sids)?;
        }
        self.db.flush()?;
        let mut meta = Batch::default();
        meta.insert(META_FORMAT, &codec::encode_u64(FORMAT)[..]);
        meta.insert(
            META_LEVELS,
            &codec::encode_u64(binding.sid_levels as u64)[..],
        );
        meta.insert(
            META_CAPACITY,
            &codec::encode_u64(binding.last_level_capacity as u64)[..],
        );
        meta.insert(META_VERSION, binding.version.as_bytes());
        self.meta.apply_batch(meta)?;
        self.db.flush()?;
        Ok(())
    }

    fn check_binding(&self, binding: &TokenizerBinding) -> Result<(), RegistryError> {
        let format = self.meta_u64(META_FORMAT)?;
        if format != Some(FORMAT) {
            return Err(corrupt(
                "meta",
                META_FORMAT.as_bytes(),
                format!("format {format:?}, this build reads {FORMAT}"),
            ));
        }
        let version = self.meta.get(META_VERSION)?.unwrap_or_default();
        let version = std::str::from_utf8(&version)
            .map_err(|e| corrupt("meta", META_VERSION.as_bytes(), e.to_string()))?;
        let levels = self.meta_u64(META_LEVELS)?.unwrap_or(0);
        let capacity = self.meta_u64(META_CAPACITY)?.unwrap_or(0);
        if version != binding.version
            || levels != binding.sid_levels as u64
            || capacity != binding.last_level_capacity as u64
        {
            return Err(RegistryError::WrongTokenizer {
                found: TokenizerBinding::describe(version, levels, capacity),
                expected: TokenizerBinding::describe(
                    &binding.version,
                    binding.sid_levels as u64,
                    binding.last_level_capacity as u64,
                ),
            });
        }
        Ok(())
    }

    /// Applies an upsert of `item_id` whose content hashes to `content_hash`,
    /// read at `position` of the catalogue topic. `generation` is the index
    /// generation a SID leaving now is tagged with (see the module docs).
    ///
    /// `content_codes` runs the tokenizer (all SID levels but the last); it is
    /// called only when the item needs a new SID, so replays skip it. An error
    /// from it, or a full prefix, leaves the registry unchanged.
    pub fn apply_upsert<E>(
        &mut self,
        item_id: &str,
        content_hash: [u8; 32],
        position: u64,
        generation: u64,
        content_codes: impl FnOnce() -> Result<Vec<Code>, E>,
    ) -> Result<Change, RegistryError>
    where
        E: Into<Box<dyn StdError + Send + Sync>>,
    {
        let mut w = Writes::default();
        let Some(mut e) = self.get(item_id)? else {
            let codes = self.content_codes(item_id, content_codes)?;
            let ord = self.next_ord()?;
            let sid = self.allocate(item_id, &codes)?;
            let entry = ItemEntry {
                ord,
                sid: Some(sid),
                status: Status::Live,
                content_hash,
                position: Some(position),
                retired_generation: None,
            };
            w.entry(item_id, &entry);
            w.ords
                .insert(&codec::ord_bytes(ord)[..], item_id.as_bytes());
            w.bind(sid, ord, SidState::Live);
            self.commit_new(&w, sid)?;
            self.live += 1;
            return Ok(Change::Added { ord, sid });
        };
        if e.position.is_some_and(|p| position <= p) {
            return Ok(Change::Unchanged);
        }
        let same_content = e.content_hash == content_hash;
        e.content_hash = content_hash;
        e.position = Some(position);
        let ord = e.ord;
        let mut allocated = None;
        let change = match (e.status, e.sid) {
            (Status::Reserved, Some(sid)) => {
                w.bind(sid, ord, SidState::Live);
                Change::Added { ord, sid }
            }
            (Status::Live, Some(_)) if same_content => Change::Unchanged,
            (Status::Live, Some(old)) => {
                let codes = self.content_codes(item_id, content_codes)?;
                if codes == old.prefix() {
                    Change::Unchanged
                } else {
                    let new = self.allocate(item_id, &codes)?;
                    allocated = Some(new);
                    w.leave(old, ord, generation);
                    w.bind(new, ord, SidState::Live);
                    e.sid = Some(new);
                    Change::Moved { ord, old, new }
                }
            }
            (Status::Retired, Some(old)) => {
                let codes = if same_content {
                    None
                } else {
                    Some(self.content_codes(item_id, content_codes)?)
                };
                match codes {
                    Some(codes) if codes != old.prefix() => {
                        let new = self.allocate(item_id, &codes)?;
                        allocated = Some(new);
                        w.bind(new, ord, SidState::Live);
                        e.sid = Some(new);
                        Change::Added { ord, sid: new }
                    }
                    _ => {
                        let left_at = self.left_at(old, ord)?;
                        w.leaving.remove(codec::leaving_key(left_at, old));
                        w.bind(old, ord, SidState::Live);
                        Change::Added { ord, sid: old }
                    }
                }
            }
            (Status::Retired, None) => {
                let codes = self.content_codes(item_id, content_codes)?;
                let new = self.allocate(item_id, &codes)?;
                allocated = Some(new);
                w.bind(new, ord, SidState::Live);
                e.sid = Some(new);
                Change::Added { ord, sid: new }
            }
            (Status::Reserved | Status::Live, None) => {
                return Err(corrupt("items", item_id.as_bytes(), "no SID"));
            }
        };
        e.status = Status::Live;
        w.entry(item_id, &e);
        match allocated {
            Some(sid) => self.commit_new(&w, sid)?,
            None => self.commit(&w)?,
        }
        if matches!(change, Change::Added { .. }) {
            self.live += 1;
        }
        Ok(change)
    }

    /// Applies a retire of `item_id` read at `position`; its SID leaves the
    /// live set at index generation `generation` and stays bound to it until
    /// released. An item the registry never saw is [`RegistryError::UnknownItem`].
    pub fn apply_retire(
        &mut self,
        item_id: &str,
        position: u64,
        generation: u64,
    ) -> Result<Change, RegistryError> {
        let Some(mut e) = self.get(item_id)? else {
            return Err(RegistryError::UnknownItem(item_id.to_string()));
        };
        if e.position.is_some_and(|p| position <= p) {
            return Ok(Change::Unchanged);
        }
        e.position = Some(position);
        let mut w = Writes::default();
        let change = match (e.status, e.sid) {
            (Status::Retired, _) => Change::Unchanged,
            (status @ (Status::Reserved | Status::Live), Some(sid)) => {
                w.leave(sid, e.ord, generation);
                e.status = Status::Retired;
                e.retired_generation = Some(generation);
                if status == Status::Live {
                    Change::Retired { ord: e.ord, sid }
                } else {
                    Change::Unchanged
                }
            }
            (Status::Reserved | Status::Live, None) => {
                return Err(corrupt("items", item_id.as_bytes(), "no SID"));
            }
        };
        w.entry(item_id, &e);
        self.commit(&w)?;
        if matches!(change, Change::Retired { .. }) {
            self.live -= 1;
        }
        Ok(change)
    }

    /// Frees every SID that left the live set at generation `up_to_generation`
    /// or before, so that other items can get it. Call it once no snapshot of
    /// that generation or older is alive. Returns how many were freed.
    pub fn release(&mut self, up_to_generation: u64) -> Result<usize, RegistryError> {
        let due = match up_to_generation.checked_add(1) {
            Some(end) => self.leaving.range(..codec::encode_u64(end)),
            None => self.leaving.iter(),
        }
        .collect::<Result<Vec<_>, _>>()?;
        for (key, value) in &due {
            let bad = |d: String| corrupt("leaving", key, d);
            let (generation, sid) = codec::decode_leaving_key(key, self.levels).map_err(bad)?;
            let ord = codec::decode_ord(value).map_err(bad)?;
            if self.left_at(sid, ord)? != generation {
                return Err(bad(format!(
                    "{sid} is not waiting at generation {generation}"
                )));
            }
            let item_id = self
                .item_id(ord)?
                .ok_or_else(|| bad(format!("no item {ord}")))?;
            let mut w = Writes::default();
            w.leaving.remove(key);
            w.sids.remove(codec::sid_key(sid));
            if let Some(mut e) = self.get(&item_id)? {
                if e.sid == Some(sid) {
                    e.sid = None;
                    w.entry(&item_id, &e);
                }
            }
            self.commit(&w)?;
            self.allocator.remove(sid);
        }
        Ok(due.len())
    }

    /// Returns once everything applied so far is durable.
    pub fn flush(&self) -> Result<(), RegistryError> {
        self.db.flush()?;
        Ok(())
    }

    /// What the registry knows about `item_id`.
    pub fn get(&self, item_id: &str) -> Result<Option<ItemEntry>, RegistryError> {
        self.items
            .get(item_id)?
            .map(|v| {
                codec::decode_entry(&v, self.levels)
                    .map_err(|d| corrupt("items", item_id.as_bytes(), d))
            })
            .transpose()
    }

    /// The id of the item numbered `ord`.
    pub fn item_id(&self, ord: u32) -> Result<Option<String>, RegistryError> {
        let key = codec::ord_bytes(ord);
        self.ords
            .get(key)?
            .map(|v| {
                String::from_utf8(v.to_vec()).map_err(|e| corrupt("ords", &key, e.to_string()))
            })
            .transpose()
    }

    /// The live SIDs and their items' ords, in SID order: what the index is
    /// built from.
    pub fn live(&self) -> impl Iterator<Item = Result<(Sid, u32), RegistryError>> + '_ {
        self.sids.iter().filter_map(move |kv| {
            let decode = |(key, value): (sled::IVec, sled::IVec)| {
                let bad = |d: String| corrupt("sids", &key, d);
                let sid = codec::decode_sid_key(&key, self.levels).map_err(bad)?;
                let bound = codec::decode_binding(&value).map_err(bad)?;
                Ok((bound.state == SidState::Live).then_some((sid, bound.ord)))
            };
            kv.map_err(RegistryError::from).and_then(decode).transpose()
        })
    }

    /// How many items are live.
    pub fn live_count(&self) -> usize {
        self.live
    }

    /// The generation of the last index base persisted, as recorded by
    /// [`Registry::set_index_generation`].
    pub fn index_generation(&self) -> Result<Option<u64>, RegistryError> {
        self.meta_u64(META_INDEX_GENERATION)
    }

    pub fn set_index_generation(&self, generation: u64) -> Result<(), RegistryError> {
        self.meta
            .insert(META_INDEX_GENERATION, &codec::encode_u64(generation)[..])?;
        Ok(())
    }

    /// A value the index stored for its own bookkeeping.
    pub fn meta_get(&self, key: &str) -> Result<Option<Vec<u8>>, RegistryError> {
        Ok(self
            .meta
            .get(format!("{META_EXTERNAL}{key}"))?
            .map(|v| v.to_vec()))
    }

    pub fn meta_set(&self, key: &str, value: &[u8]) -> Result<(), RegistryError> {
        self.meta.insert(format!("{META_EXTERNAL}{key}"), value)?;
        Ok(())
    }

    /// Reads every tree and checks that they agree: each item's ord names it
    /// back, each bound SID belongs to the item it says and is in the state
    /// the item's status implies, each SID waiting for release is listed in
    /// `leaving` and nothing else is, and the live count is right.
    pub fn check(&self) -> Result<(), RegistryError> {
        let mut items = 0;
        for kv in self.items.iter() {
            let (key, value) = kv?;
            items += 1;
            let id =
                std::str::from_utf8(&key).map_err(|e| corrupt("items", &key, e.to_string()))?;
            let e =
                codec::decode_entry(&value, self.levels).map_err(|d| corrupt("items", &key, d))?;
            if self.item_id(e.ord)?.as_deref() != Some(id) {
                return Err(corrupt(
                    "items",
                    &key,
                    format!("ord {} names another item", e.ord),
                ));
            }
            if let Some(sid) = e.sid {
                let bound = self.binding(sid)?;
                let agrees = bound.is_some_and(|b| {
                    b.ord == e.ord
                        && matches!(
                            (e.status, b.state),
                            (Status::Reserved, SidState::Reserved)
                                | (Status::Live, SidState::Live)
                                | (Status::Retired, SidState::Left(_))
                        )
                });
                if !agrees {
                    return Err(corrupt(
                        "items",
                        &key,
                        format!("{:?} with SID {sid}, bound as {bound:?}", e.status),
                    ));
                }
            }
        }
        if self.ords.len() != items {
            return Err(corrupt(
                "ords",
                b"",
                format!("{} ords for {items} items", self.ords.len()),
            ));
        }
        let (mut live, mut left) = (0, 0);
        for kv in self.sids.iter() {
            let (key, value) = kv?;
            let bad = |d: String| corrupt("sids", &key, d);
            let sid = codec::decode_sid_key(&key, self.levels).map_err(bad)?;
            let b = codec::decode_binding(&value).map_err(bad)?;
            let id = self
                .item_id(b.ord)?
                .ok_or_else(|| bad(format!("bound to unknown ord {}", b.ord)))?;
            let e = self
                .get(&id)?
                .ok_or_else(|| bad(format!("bound to missing item {id:?}")))?;
            match b.state {
                SidState::Left(g) => {
                    left += 1;
                    let waiting = self.leaving.get(codec::leaving_key(g, sid))?;
                    if waiting.as_deref() != Some(&codec::ord_bytes(b.ord)[..]) {
                        return Err(bad(format!("left at {g} but not waiting for release")));
                    }
                }
                SidState::Live | SidState::Reserved => {
                    live += usize::from(b.state == SidState::Live);
                    if e.sid != Some(sid) {
                        return Err(bad(format!("{:?} but item {id:?} is not on it", b.state)));
                    }
                }
            }
        }
        if self.leaving.len() != left {
            return Err(corrupt(
                "leaving",
                b"",
                format!("{} waiting, {left} SIDs left", self.leaving.len()),
            ));
        }
        if live != self.live {
            return Err(corrupt(
                "sids",
                b"",
                format!("{live} live SIDs, {} counted", self.live),
            ));
        }
        Ok(())
    }

    fn content_codes<E>(
        &self,
        item_id: &str,
        content_codes: impl FnOnce() -> Result<Vec<Code>, E>,
    ) -> Result<Vec<Code>, RegistryError>
    where
        E: Into<Box<dyn StdError + Send + Sync>>,
    {
        let codes = content_codes().map_err(|e| RegistryError::Codes {
            item: item_id.to_string(),
            source: e.into(),
        })?;
        if codes.len() != self.levels - 1 {
            return Err(RegistryError::Codes {
                item: item_id.to_string(),
                source: format!(
                    "{} content codes for {}-level SIDs, expected {}",
                    codes.len(),
                    self.levels,
                    self.levels - 1
                )
                .into(),
            });
        }
        Ok(codes)
    }

    fn allocate(&mut self, item_id: &str, codes: &[Code]) -> Result<Sid, RegistryError> {
        self.allocator
            .allocate(codes)
            .map_err(|source| RegistryError::PrefixFull {
                item: item_id.to_string(),
                source,
            })
    }

    fn next_ord(&self) -> Result<u32, RegistryError> {
        let Some((key, _)) = self.ords.last()? else {
            return Ok(0);
        };
        let last = codec::decode_ord(&key).map_err(|d| corrupt("ords", &key, d))?;
        last.checked_add(1)
            .ok_or_else(|| corrupt("ords", &key, "no item number left"))
    }

    fn binding(&self, sid: Sid) -> Result<Option<Binding>, RegistryError> {
        let key = codec::sid_key(sid);
        self.sids
            .get(&key)?
            .map(|v| codec::decode_binding(&v).map_err(|d| corrupt("sids", &key, d)))
            .transpose()
    }

    /// The generation at which `sid`, bound to `ord`, left the live set.
    fn left_at(&self, sid: Sid, ord: u32) -> Result<u64, RegistryError> {
        match self.binding(sid)? {
            Some(Binding {
                ord: bound,
                state: SidState::Left(g),
            }) if bound == ord => Ok(g),
            other => Err(corrupt(
                "sids",
                &codec::sid_key(sid),
                format!("expected to have left, bound to item {ord}; found {other:?}"),
            )),
        }
    }

    /// Commits writes that bind `allocated`, a SID taken from the allocator
    /// for them; gives it back if the commit fails.
    fn commit_new(&mut self, w: &Writes, allocated: Sid) -> Result<(), RegistryError> {
        self.commit(w)
            .inspect_err(|_| self.allocator.remove(allocated))
    }

    fn commit(&self, w: &Writes) -> Result<(), RegistryError> {
        (&self.items, &self.ords, &self.sids, &self.leaving)
            .transaction(|(items, ords, sids, leaving)| {
                items.apply_batch(&w.items)?;
                ords.apply_batch(&w.ords)?;
                sids.apply_batch(&w.sids)?;
                leaving.apply_batch(&w.leaving)?;
                Ok::<_, ConflictableTransactionError<Infallible>>(())
            })
            .map_err(|e| match e {
                TransactionError::Storage(e) => RegistryError::Sled(e),
                TransactionError::Abort(never) => match never {},
            })
    }

    fn meta_u64(&self, key: &str) -> Result<Option<u64>, RegistryError> {
        self.meta
            .get(key)?
            .map(|v| codec::decode_u64(&v).map_err(|d| corrupt("meta", key.as_bytes(), d)))
            .transpose()
    }
}

/// How long opening waits for a lock that a closed registry still holds.
///
/// sled 0.34 releases its file lock from background threads a moment after the
/// last handle is dropped (spacejam/sled#1234), so opening right after closing
/// (a restart inside one process, a test) can find it still taken. A lock held
/// longer than this belongs to someone else, and is an error.
const LOCK_WAIT: Duration = Duration::from_secs(2);

fn open_db(path: &Path, flush_every_ms: Option<u64>) -> Result<sled::Db, sled::Error> {
    let start = Instant::now();
    loop {
        let opened = sled::Config::new()
            .path(path)
            .flush_every_ms(flush_every_ms)
            .open();
        match opened {
            Err(sled::Error::Io(e))
                if e.to_string().starts_with("could not acquire lock")
                    && start.elapsed() < LOCK_WAIT =>
            {
                std::thread::sleep(Duration::from_millis(5));
            }
            other => return other,
        }
    }
}

fn corrupt(tree: &'static str, key: &[u8], detail: impl Into<String>) -> RegistryError {
    RegistryError::Corrupt {
        tree,
        key: show_key(key),
        detail: detail.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binding() -> TokenizerBinding {
        TokenizerBinding {
            version: "v".into(),
            sid_levels: 3,
            last_level_capacity: 4,
            training: vec![("t".into(), "1-2-0".parse().unwrap())],
        }
    }

    fn codes() -> Result<Vec<Code>, Infallible> {
        Ok(vec![1, 2])
    }

    #[test]
    fn a_corrupt_entry_is_an_error_naming_tree_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Registry::open(dir.path(), &binding(), None).unwrap();
        // Layout 1, then an item status that does not exist.
        r.items.insert("a", &[1, 9][..]).unwrap();
        let err = r.get("a").unwrap_err();
        assert!(
            matches!(&err, RegistryError::Corrupt { tree: "items", key, .. } if key == "\"a\""),
            "{err}"
        );
        let err = r.apply_upsert("a", [1; 32], 0, 0, codes).unwrap_err();
        assert!(matches!(err, RegistryError::Corrupt { .. }), "{err}");
        assert!(r.check().is_err());
    }

    #[test]
    fn check_finds_trees_that_disagree() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Registry::open(dir.path(), &binding(), None).unwrap();
        r.apply_upsert("a", [1; 32], 0, 0, codes).unwrap();
        r.apply_upsert("a", [2; 32], 1, 0, || Ok::<_, Infallible>(vec![3, 3]))
            .unwrap();
        r.check().unwrap();
        // A SID that left but is not waiting for release could never be freed.
        let key = codec::leaving_key(0, "1-2-1".parse().unwrap());
        let waiting = r.leaving.remove(&key).unwrap().unwrap();
        let err = r.check().unwrap_err();
        assert!(err.to_string().contains("not waiting"), "{err}");
        r.leaving.insert(&key, waiting).unwrap();
        r.check().unwrap();
        r.ords.remove(codec::ord_bytes(1)).unwrap();
        let err = r.check().unwrap_err();
        assert!(
            matches!(err, RegistryError::Corrupt { tree: "items", .. }),
            "{err}"
        );
    }

    #[test]
    fn a_corrupt_sid_fails_open() {
        let dir = tempfile::tempdir().unwrap();
        let r = Registry::open(dir.path(), &binding(), None).unwrap();
        r.sids.insert([0, 1, 0], &[0][..]).unwrap();
        drop(r);
        let err = Registry::open(dir.path(), &binding(), None).err().unwrap();
        assert!(
            matches!(&err, RegistryError::Corrupt { tree: "sids", key, .. } if key == "000100"),
            "{err}"
        );
    }

    #[test]
    fn an_interrupted_creation_is_done_again() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = sled::open(dir.path()).unwrap();
            let items = db.open_tree("items").unwrap();
            items.insert("stray", &b"half-written"[..]).unwrap();
        }
        let r = Registry::open(dir.path(), &binding(), None).unwrap();
        assert_eq!(r.get("stray").unwrap(), None);
        assert_eq!(r.get("t").unwrap().unwrap().status, Status::Reserved);
        r.check().unwrap();
    }
}
