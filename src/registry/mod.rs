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
//! One [`Store`] (a redb file, `registry.redb` in the registry's directory),
//! split into tables by the first byte of every key ([`codec::Table`]):
//!
//! | table   | key                        | value                                  |
//! |---------|----------------------------|----------------------------------------|
//! | `items` | item id (UTF-8)            | [`ItemEntry`]                          |
//! | `ords`  | ord (u32, big-endian)      | item id                                |
//! | `sids`  | SID key ([`Sid::to_key`])  | ord and state (reserved, live, left at g) |
//! | `meta`  | name                       | format, tokenizer binding, index generation, the index's own keys |
//!
//! Each event's writes are staged together in a [`Group`], and a group of
//! whole events is one atomic commit. The tables therefore never disagree,
//! not even after a crash. A group is committed when it reaches
//! [`GROUP_EVENTS`] events, when the next event (or [`Registry::release`])
//! finds it older than [`GROUP_AGE`], on [`Registry::flush`], and when the
//! registry is dropped. (A commit costs far more than an event, which is why
//! events are not committed one by one.) Reads see staged writes.
//!
//! In memory there is only what is rebuilt from `sids` and `ords` on open: the
//! allocator, the live count, the next ord, and the SIDs waiting for release
//! by the generation they left at (so that [`Registry::release`] costs nothing
//! when nothing is due).
//!
//! # Durability: what survives a crash
//!
//! Commits are made durable by [`Registry::flush`], which returns once
//! everything applied before it is on disk, and by the first commit more than
//! `flush_every_ms` ([`DEFAULT_FLUSH_EVERY_MS`] unless told otherwise) after
//! the last durable one (see [`crate::store`]). After a crash the registry holds every event
//! applied before the last completed [`Registry::flush`], possibly some
//! applied after it, each one whole or not at all (a prefix of the applied
//! sequence). So the service commits a catalogue offset only after `flush`
//! returned: events after the committed offset are replayed on restart, and
//! replays are harmless.

mod codec;
mod error;

use std::collections::BTreeMap;
use std::error::Error as StdError;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

pub use codec::{ItemEntry, Status};
pub use error::RegistryError;

use crate::sid::{Code, Sid, MAX_LEVELS};
use crate::store::{Group, Store};
use crate::tokenizer::{FrozenTokenizer, SidAllocator};
use codec::{Binding, SidState, Table};
use error::show_key;

/// How long a commit may stay without an fsync unless told otherwise. Bounds
/// the work lost in a crash when the caller never calls [`Registry::flush`];
/// the service does not rely on it.
pub const DEFAULT_FLUSH_EVERY_MS: u64 = 500;

/// The on-disk format this build reads and writes. Formats 1 and 2 were sled
/// databases; they are refused, not converted (see [`crate::store::StoreError::Sled`]).
const FORMAT: u64 = 3;

/// The registry's file in its directory.
const FILE: &str = "registry.redb";

/// Staged events are committed as one group at the latest when they are
/// this many: bounds the group, and so the pause of committing it.
pub const GROUP_EVENTS: usize = 256;

/// How long a staged event waits at most for more to join its group, as
/// long as events or releases keep coming (see the module docs).
pub const GROUP_AGE: Duration = Duration::from_millis(5);

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
    /// Every table ([`codec::Table`]).
    db: Store,
    /// Events applied but not committed yet (see the module docs). Behind a
    /// lock only so that `&self` methods (reads, flush) can reach it.
    staged: Mutex<Group>,
    levels: usize,
    allocator: SidAllocator,
    live: usize,
    /// The ord the next new item gets.
    next_ord: u64,
    /// The SIDs waiting for release: generation they left at → SID → ord.
    leaving: BTreeMap<u64, BTreeMap<Sid, u32>>,
}

/// The writes of one event, staged together once the event cannot fail any
/// more.
#[derive(Default)]
struct Writes {
    kv: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    /// SIDs that start waiting for release: generation, SID, ord.
    leave: Vec<(u64, Sid, u32)>,
    /// SIDs that stop waiting for release (live again): generation, SID.
    stay: Vec<(u64, Sid)>,
}

impl Writes {
    fn entry(&mut self, item_id: &str, entry: &ItemEntry) {
        self.kv.push((
            Table::Items.key(item_id.as_bytes()),
            Some(codec::encode_entry(entry)),
        ));
    }

    fn ord(&mut self, ord: u32, item_id: &str) {
        self.kv.push((
            Table::Ords.key(&codec::ord_bytes(ord)),
            Some(item_id.as_bytes().to_vec()),
        ));
    }

    fn bind(&mut self, sid: Sid, ord: u32, state: SidState) {
        self.kv.push((
            Table::Sids.key(&codec::sid_key(sid)),
            Some(codec::encode_binding(Binding { ord, state })),
        ));
    }

    fn unbind(&mut self, sid: Sid) {
        self.kv.push((Table::Sids.key(&codec::sid_key(sid)), None));
    }

    /// Binds `sid` as having left at `generation`, waiting for release.
    fn leave(&mut self, sid: Sid, ord: u32, generation: u64) {
        self.bind(sid, ord, SidState::Left(generation));
        self.leave.push((generation, sid, ord));
    }

    /// Makes `sid`, which left at `generation`, live again for `ord`.
    fn stay(&mut self, sid: Sid, ord: u32, generation: u64) {
        self.bind(sid, ord, SidState::Live);
        self.stay.push((generation, sid));
    }
}

impl Registry {
    /// Opens (or creates) the registry at `path` for the tokenizer `binding`.
    ///
    /// A commit is made durable at the latest `flush_every_ms` milliseconds
    /// after the last durable one (`None`: only on [`Registry::flush`]); see
    /// the module docs for what survives a crash. Creating reserves every
    /// training item's SID.
    pub fn open(
        path: &Path,
        binding: &TokenizerBinding,
        flush_every_ms: Option<u64>,
    ) -> Result<Registry, RegistryError> {
        let flush_every = flush_every_ms.map_or(Duration::MAX, Duration::from_millis);
        let db = Store::open_in(path, FILE, flush_every)?;
        let mut registry = Registry {
            db,
            staged: Mutex::default(),
            levels: binding.sid_levels,
            allocator: SidAllocator::new(1),
            live: 0,
            next_ord: 0,
            leaving: BTreeMap::new(),
        };
        if registry
            .read(&Table::Meta.key(META_VERSION.as_bytes()))?
            .is_some()
        {
            registry.check_binding(binding)?;
        } else {
            registry.create(binding)?;
        }
        registry.allocator = SidAllocator::new(binding.last_level_capacity);
        for kv in registry.db.scan(&[Table::Sids.prefix()])? {
            let (key, value) = kv?;
            let key = &key[1..];
            let bad = |d: String| corrupt(Table::Sids, key, d);
            let sid = codec::decode_sid_key(key, registry.levels).map_err(bad)?;
            let bound = codec::decode_binding(&value).map_err(bad)?;
            if usize::from(sid.last()) >= binding.last_level_capacity {
                return Err(bad("last code beyond the capacity".into()));
            }
            registry.allocator.insert(sid);
            match bound.state {
                SidState::Live => registry.live += 1,
                SidState::Left(g) => {
                    registry
                        .leaving
                        .entry(g)
                        .or_default()
                        .insert(sid, bound.ord);
                }
                SidState::Reserved => {}
            }
        }
        if let Some((key, _)) = registry.db.last_below(&[Table::Ords.prefix() + 1])? {
            if let Some((Table::Ords, key)) = Table::split(&key) {
                let last = codec::decode_ord(key).map_err(|d| corrupt(Table::Ords, key, d))?;
                registry.next_ord = u64::from(last) + 1;
            }
        }
        Ok(registry)
    }

    /// First open: reserve the training SIDs, then record the binding. The
    /// binding is written last and flushed, so a crash before it leaves a
    /// registry that the next open creates again from scratch.
    fn create(&self, binding: &TokenizerBinding) -> Result<(), RegistryError> {
        binding.validate()?;
        // Whatever an interrupted creation left.
        self.db.clear()?;
        for (chunk_no, chunk) in binding.training.chunks(INIT_BATCH).enumerate() {
            let mut batch = Vec::with_capacity(3 * chunk.len());
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
                batch.push((
                    Table::Items.key(item.as_bytes()),
                    codec::encode_entry(&entry),
                ));
                batch.push((
                    Table::Ords.key(&codec::ord_bytes(ord)),
                    item.as_bytes().to_vec(),
                ));
                batch.push((
                    Table::Sids.key(&codec::sid_key(*sid)),
                    codec::encode_binding(Binding {
                        ord,
                        state: SidState::Reserved,
                    })
                    .to_vec(),
                ));
            }
            self.db.write(
                batch
                    .iter()
                    .map(|(k, v)| (k.as_slice(), Some(v.as_slice()))),
            )?;
        }
        self.db.flush()?;
        let u64_value = |v: u64| codec::encode_u64(v).to_vec();
        let meta = [
            (META_FORMAT, u64_value(FORMAT)),
            (META_LEVELS, u64_value(binding.sid_levels as u64)),
            (META_CAPACITY, u64_value(binding.last_level_capacity as u64)),
            (META_VERSION, binding.version.as_bytes().to_vec()),
        ]
        .map(|(name, value)| (Table::Meta.key(name.as_bytes()), value));
        self.db
            .write(meta.iter().map(|(k, v)| (k.as_slice(), Some(v.as_slice()))))?;
        self.db.flush()?;
        Ok(())
    }

    fn check_binding(&self, binding: &TokenizerBinding) -> Result<(), RegistryError> {
        match self.meta_u64(META_FORMAT)? {
            Some(FORMAT) => {}
            Some(found) => {
                return Err(RegistryError::Format {
                    found,
                    expected: FORMAT,
                })
            }
            None => {
                return Err(corrupt(
                    Table::Meta,
                    META_FORMAT.as_bytes(),
                    "missing next to a tokenizer binding",
                ))
            }
        }
        let version = self
            .read(&Table::Meta.key(META_VERSION.as_bytes()))?
            .unwrap_or_default();
        let version = std::str::from_utf8(&version)
            .map_err(|e| corrupt(Table::Meta, META_VERSION.as_bytes(), e.to_string()))?;
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
        self.write_if_due()?;
        let mut w = Writes::default();
        let Some(mut e) = self.get(item_id)? else {
            let codes = self.content_codes(item_id, content_codes)?;
            let ord = self.new_ord()?;
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
            w.ord(ord, item_id);
            w.bind(sid, ord, SidState::Live);
            self.stage(w);
            self.next_ord += 1;
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
                        w.bind(new, ord, SidState::Live);
                        e.sid = Some(new);
                        Change::Added { ord, sid: new }
                    }
                    _ => {
                        let left_at = self.left_at(old, ord)?;
                        w.stay(old, ord, left_at);
                        Change::Added { ord, sid: old }
                    }
                }
            }
            (Status::Retired, None) => {
                let codes = self.content_codes(item_id, content_codes)?;
                let new = self.allocate(item_id, &codes)?;
                w.bind(new, ord, SidState::Live);
                e.sid = Some(new);
                Change::Added { ord, sid: new }
            }
            (Status::Reserved | Status::Live, None) => {
                return Err(corrupt(Table::Items, item_id.as_bytes(), "no SID"));
            }
        };
        e.status = Status::Live;
        w.entry(item_id, &e);
        self.stage(w);
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
        self.write_if_due()?;
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
                return Err(corrupt(Table::Items, item_id.as_bytes(), "no SID"));
            }
        };
        w.entry(item_id, &e);
        self.stage(w);
        if matches!(change, Change::Retired { .. }) {
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

    /// Returns once everything applied so far is durable.
    pub fn flush(&self) -> Result<(), RegistryError> {
        self.write_staged()?;
        self.db.flush()?;
        Ok(())
    }

    /// What the registry knows about `item_id`.
    pub fn get(&self, item_id: &str) -> Result<Option<ItemEntry>, RegistryError> {
        self.read(&Table::Items.key(item_id.as_bytes()))?
            .map(|v| {
                codec::decode_entry(&v, self.levels)
                    .map_err(|d| corrupt(Table::Items, item_id.as_bytes(), d))
            })
            .transpose()
    }

    /// The id of the item numbered `ord`.
    pub fn item_id(&self, ord: u32) -> Result<Option<String>, RegistryError> {
        let key = codec::ord_bytes(ord);
        self.read(&Table::Ords.key(&key))?
            .map(|v| {
                String::from_utf8(v.to_vec()).map_err(|e| corrupt(Table::Ords, &key, e.to_string()))
            })
            .transpose()
    }

    /// Every item the registry knows, with its entry, in item-id order: what
    /// a reader that maps ids to ords starts from.
    pub fn items(&self) -> impl Iterator<Item = Result<(String, ItemEntry), RegistryError>> + '_ {
        let written = self.write_staged().err();
        let items = self.scan(Table::Items).map(move |kv| {
            let (key, value) = kv?;
            let key = &key[1..];
            let id =
                std::str::from_utf8(key).map_err(|e| corrupt(Table::Items, key, e.to_string()))?;
            let entry = codec::decode_entry(&value, self.levels)
                .map_err(|d| corrupt(Table::Items, key, d))?;
            Ok((id.to_string(), entry))
        });
        written.map(Err).into_iter().chain(items)
    }

    /// The live SIDs and their items' ords, in SID order: what the index is
    /// built from.
    pub fn live(&self) -> impl Iterator<Item = Result<(Sid, u32), RegistryError>> + '_ {
        let written = self.write_staged().err();
        let sids = self.scan(Table::Sids).filter_map(move |kv| {
            let decode = |(key, value): (Vec<u8>, Vec<u8>)| {
                let key = &key[1..];
                let bad = |d: String| corrupt(Table::Sids, key, d);
                let sid = codec::decode_sid_key(key, self.levels).map_err(bad)?;
                let bound = codec::decode_binding(&value).map_err(bad)?;
                Ok((bound.state == SidState::Live).then_some((sid, bound.ord)))
            };
            kv.and_then(decode).transpose()
        });
        written.map(Err).into_iter().chain(sids)
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

    /// Records the generation of the index base, after every event applied
    /// before it (like every event, durable at the next flush).
    pub fn set_index_generation(&self, generation: u64) -> Result<(), RegistryError> {
        self.put_now(
            Table::Meta.key(META_INDEX_GENERATION.as_bytes()),
            &codec::encode_u64(generation),
        )
    }

    /// A value the index stored for its own bookkeeping.
    pub fn meta_get(&self, key: &str) -> Result<Option<Vec<u8>>, RegistryError> {
        let key = format!("{META_EXTERNAL}{key}");
        Ok(self
            .read(&Table::Meta.key(key.as_bytes()))?
            .map(|v| v.to_vec()))
    }

    pub fn meta_set(&self, key: &str, value: &[u8]) -> Result<(), RegistryError> {
        let key = format!("{META_EXTERNAL}{key}");
        self.put_now(Table::Meta.key(key.as_bytes()), value)
    }

    /// Reads every table and checks that they agree: each item's ord names it
    /// back, each bound SID belongs to the item it says and is in the state
    /// the item's status implies, each SID that left is waiting for release
    /// and nothing else is, and the counts are right.
    pub fn check(&self) -> Result<(), RegistryError> {
        self.write_staged()?;
        for kv in self.scan(Table::Items) {
            let (key, value) = kv?;
            let key = &key[1..];
            let id =
                std::str::from_utf8(key).map_err(|e| corrupt(Table::Items, key, e.to_string()))?;
            let e = codec::decode_entry(&value, self.levels)
                .map_err(|d| corrupt(Table::Items, key, d))?;
            if u64::from(e.ord) >= self.next_ord {
                return Err(corrupt(
                    Table::Items,
                    key,
                    format!("ord {} not below the next ord {}", e.ord, self.next_ord),
                ));
            }
            if self.item_id(e.ord)?.as_deref() != Some(id) {
                return Err(corrupt(
                    Table::Items,
                    key,
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
                        Table::Items,
                        key,
                        format!("{:?} with SID {sid}, bound as {bound:?}", e.status),
                    ));
                }
            }
        }
        let (mut items, mut ords) = (0, 0);
        for kv in self.db.scan(&[])? {
            let (key, _) = kv?;
            match Table::split(&key) {
                Some((Table::Items, _)) => items += 1,
                Some((Table::Ords, _)) => ords += 1,
                Some(_) => {}
                None => {
                    return Err(RegistryError::Corrupt {
                        tree: "registry",
                        key: show_key(&key),
                        detail: "a key of no table".into(),
                    })
                }
            }
        }
        if ords != items {
            return Err(corrupt(
                Table::Ords,
                b"",
                format!("{ords} ords for {items} items"),
            ));
        }
        let (mut live, mut left) = (0, 0);
        for kv in self.scan(Table::Sids) {
            let (key, value) = kv?;
            let key = &key[1..];
            let bad = |d: String| corrupt(Table::Sids, key, d);
            let sid = codec::decode_sid_key(key, self.levels).map_err(bad)?;
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
                    let waiting = self.leaving.get(&g).and_then(|sids| sids.get(&sid));
                    if waiting != Some(&b.ord) {
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
        let waiting: usize = self.leaving.values().map(BTreeMap::len).sum();
        if waiting != left {
            return Err(corrupt(
                Table::Sids,
                b"",
                format!("{waiting} waiting for release, {left} SIDs left"),
            ));
        }
        if live != self.live {
            return Err(corrupt(
                Table::Sids,
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

    /// The ord a new item gets; taken when its event is staged.
    fn new_ord(&self) -> Result<u32, RegistryError> {
        u32::try_from(self.next_ord).map_err(|_| {
            corrupt(
                Table::Ords,
                &codec::ord_bytes(u32::MAX),
                "no item number left",
            )
        })
    }

    fn binding(&self, sid: Sid) -> Result<Option<Binding>, RegistryError> {
        let key = codec::sid_key(sid);
        self.read(&Table::Sids.key(&key))?
            .map(|v| codec::decode_binding(&v).map_err(|d| corrupt(Table::Sids, &key, d)))
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
                Table::Sids,
                &codec::sid_key(sid),
                format!("expected to have left, bound to item {ord}; found {other:?}"),
            )),
        }
    }

    /// The value of a key: staged, else committed.
    fn read(&self, key: &[u8]) -> Result<Option<Vec<u8>>, RegistryError> {
        if let Some(value) = self.staged().get(key) {
            return Ok(value.map(<[u8]>::to_vec));
        }
        Ok(self.db.get(key)?)
    }

    /// The committed entries of `table`, in key order.
    fn scan(
        &self,
        table: Table,
    ) -> impl Iterator<Item = Result<(Vec<u8>, Vec<u8>), RegistryError>> + '_ {
        let (entries, failed) = match self.db.scan(&[table.prefix()]) {
            Ok(entries) => (Some(entries), None),
            Err(e) => (None, Some(Err(e.into()))),
        };
        failed.into_iter().chain(
            entries
                .into_iter()
                .flatten()
                .map(|kv| kv.map_err(Into::into)),
        )
    }

    fn staged(&self) -> MutexGuard<'_, Group> {
        self.staged.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stages one event's writes (which cannot fail) and follows them in
    /// memory.
    fn stage(&mut self, w: Writes) {
        let staged = self.staged.get_mut().unwrap_or_else(|e| e.into_inner());
        staged.stage(w.kv);
        for (generation, sid) in w.stay {
            if let Some(sids) = self.leaving.get_mut(&generation) {
                sids.remove(&sid);
                if sids.is_empty() {
                    self.leaving.remove(&generation);
                }
            }
        }
        for (generation, sid, ord) in w.leave {
            self.leaving.entry(generation).or_default().insert(sid, ord);
        }
    }

    /// Commits the staged events if their group is full or old enough.
    fn write_if_due(&mut self) -> Result<(), RegistryError> {
        let staged = self.staged.get_mut().unwrap_or_else(|e| e.into_inner());
        if staged.due(GROUP_EVENTS, GROUP_AGE) {
            staged.commit(&self.db)?;
        }
        Ok(())
    }

    fn write_staged(&self) -> Result<(), RegistryError> {
        Ok(self.staged().commit(&self.db)?)
    }

    /// Stages one write after everything staged so far and commits them all.
    fn put_now(&self, key: Vec<u8>, value: &[u8]) -> Result<(), RegistryError> {
        let mut staged = self.staged();
        staged.stage([(key, Some(value.to_vec()))]);
        Ok(staged.commit(&self.db)?)
    }

    fn meta_u64(&self, name: &str) -> Result<Option<u64>, RegistryError> {
        self.read(&Table::Meta.key(name.as_bytes()))?
            .map(|v| codec::decode_u64(&v).map_err(|d| corrupt(Table::Meta, name.as_bytes(), d)))
            .transpose()
    }
}

impl Drop for Registry {
    /// Commits the staged events; the store flushes when dropped.
    fn drop(&mut self) {
        let staged = self.staged.get_mut().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = staged.commit(&self.db) {
            tracing::error!(error = %e, "registry: staged events not written on close");
        }
    }
}

fn corrupt(table: Table, key: &[u8], detail: impl Into<String>) -> RegistryError {
    RegistryError::Corrupt {
        tree: table.name(),
        key: show_key(key),
        detail: detail.into(),
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

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
        put(&r, Table::Items.key(b"a"), &[1, 9]);
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
    fn check_finds_tables_that_disagree() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Registry::open(dir.path(), &binding(), None).unwrap();
        r.apply_upsert("a", [1; 32], 0, 0, codes).unwrap();
        r.apply_upsert("a", [2; 32], 1, 0, || Ok::<_, Infallible>(vec![3, 3]))
            .unwrap();
        r.check().unwrap();
        // A SID that left but is not waiting for release could never be freed.
        let sid: Sid = "1-2-1".parse().unwrap();
        let waiting = r.leaving.get_mut(&0).unwrap().remove(&sid).unwrap();
        let err = r.check().unwrap_err();
        assert!(err.to_string().contains("not waiting"), "{err}");
        r.leaving.get_mut(&0).unwrap().insert(sid, waiting);
        r.check().unwrap();
        r.db.write([(&Table::Ords.key(&codec::ord_bytes(1))[..], None)])
            .unwrap();
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
        put(&r, Table::Sids.key(&[0, 1, 0]), &[0]);
        drop(r);
        let err = Registry::open(dir.path(), &binding(), None).err().unwrap();
        assert!(
            matches!(&err, RegistryError::Corrupt { tree: "sids", key, .. } if key == "000100"),
            "{err}"
        );
    }

    fn put(r: &Registry, key: Vec<u8>, value: &[u8]) {
        r.db.write([(key.as_slice(), Some(value))]).unwrap();
    }

    #[test]
    fn an_interrupted_creation_is_done_again() {
        let dir = tempfile::tempdir().unwrap();
        {
            // A creation interrupted before its binding was written.
            let db = Store::open_in(dir.path(), FILE, Duration::ZERO).unwrap();
            let stray = Table::Items.key(b"stray");
            db.write([(stray.as_slice(), Some(&b"half-written"[..]))])
                .unwrap();
        }
        let r = Registry::open(dir.path(), &binding(), None).unwrap();
        assert_eq!(r.get("stray").unwrap(), None);
        assert_eq!(r.get("t").unwrap().unwrap().status, Status::Reserved);
        r.check().unwrap();
    }

    #[test]
    fn another_format_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let r = Registry::open(dir.path(), &binding(), None).unwrap();
            r.put_now(
                Table::Meta.key(META_FORMAT.as_bytes()),
                &codec::encode_u64(9),
            )
            .unwrap();
        }
        let err = Registry::open(dir.path(), &binding(), None).err().unwrap();
        assert!(
            matches!(
                err,
                RegistryError::Format {
                    found: 9,
                    expected: FORMAT
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("format 9"), "{err}");
    }

    #[test]
    fn a_sled_registry_is_refused_with_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        for file in ["conf", "db"] {
            std::fs::write(dir.path().join(file), b"sled").unwrap();
        }
        let err = Registry::open(dir.path(), &binding(), None).err().unwrap();
        assert!(
            matches!(
                err,
                RegistryError::Store(crate::store::StoreError::Sled { .. })
            ),
            "{err}"
        );
        assert!(err.to_string().contains("remove the directory"), "{err}");
    }

    #[test]
    fn staged_events_are_read_back_and_written_in_groups() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Registry::open(dir.path(), &binding(), None).unwrap();
        r.apply_upsert("a", [1; 32], 0, 0, codes).unwrap();
        assert_eq!(r.db.get(&Table::Items.key(b"a")).unwrap(), None, "staged");
        assert_eq!(r.get("a").unwrap().unwrap().position, Some(0));
        assert_eq!(r.item_id(1).unwrap().as_deref(), Some("a"));
        std::thread::sleep(GROUP_AGE);
        r.apply_retire("a", 1, 0).unwrap();
        assert!(
            r.db.get(&Table::Items.key(b"a")).unwrap().is_some(),
            "the old group"
        );
        assert_eq!(r.get("a").unwrap().unwrap().status, Status::Retired);
        assert_eq!(r.release(0).unwrap(), 1);
        r.flush().unwrap();
        assert_eq!(r.staged().get(&Table::Items.key(b"a")), None);
        assert_eq!(r.get("a").unwrap().unwrap().sid, None);
        r.check().unwrap();
    }
}
