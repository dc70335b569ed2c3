//! The SID registry: the durable source of truth of item ⇄ SID.
//!
//! Catalogue events (upsert, retire) are applied here, in the order of the
//! catalogue topic. The registry decides which SID an item goes by, remembers
//! it across restarts, and tells the index what changed ([`LiveChange`]). The index
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
//!   last-level code the prefix has free; a full prefix sends the item to the
//!   next one its [`ContentCodes`](crate::tokenizer::ContentCodes) name
//!   ([`SidAllocator`]).
//! - **A retire of an item never seen records it, retired.** On a compacted
//!   catalogue topic the retire is all that is left of an item retired long
//!   ago, so an instance that starts from scratch must end where one that saw
//!   the item's upserts did: the item known (its interactions belong in
//!   histories), not live, with no SID.
//! - **Replays change nothing.** Each item remembers the position of the last
//!   event applied to it from each catalogue partition ([`Applied`]); an
//!   event at or before that position in its partition is a replay and
//!   is ignored, without running the tokenizer.
//! - **Content changes move the item.** An upsert with a new content hash
//!   re-tokenizes the item; if its content prefix changed it gets a new SID and
//!   the old one leaves the live set. (Same prefix, or one it would reach
//!   before any prefix with room: the SID stays.)
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
//! split into tables by the first byte of every key (`codec::Table`):
//!
//! | table   | key                        | value                                  |
//! |---------|----------------------------|----------------------------------------|
//! | `items` | item id (UTF-8)            | [`ItemEntry`]                          |
//! | `ords`  | ord (u32, big-endian)      | item id                                |
//! | `sids`  | SID key ([`Sid::to_key`])  | ord and state (reserved, live, left at g) |
//! | `meta`  | name                       | format, tokenizer binding, index generation, the index's own keys |
//! | `content` | ord (u32, big-endian)    | the item's weighted content words, where the service scores fresh items by them |
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

mod applied;
mod apply;
mod binding;
mod check;
mod codec;
mod error;
mod open;
mod staging;

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

pub use applied::{Applied, Position};
pub use binding::TokenizerBinding;
pub use codec::{ItemEntry, Status};
pub use error::RegistryError;

use crate::sid::Sid;
use crate::store::{Group, Store};
use crate::tokenizer::SidAllocator;
use codec::{SidState, Table};
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

/// What applying an event did to the set of live SIDs, i.e. what the index
/// has to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LiveChange {
    /// Nothing: a replay, a retire of an item that was not live, or a content
    /// update that kept the SID.
    Unchanged,
    /// `sid` became live for item `ord`.
    Added { ord: u32, sid: Sid },
    /// Item `ord` left `old` for `new`.
    Moved { ord: u32, old: Sid, new: Sid },
    /// `sid`, item `ord`'s, left the live set.
    Retired { ord: u32, sid: Sid },
    /// A retire named an item never seen: it is now known as item `ord`,
    /// retired, with no SID (see [`Registry::apply_retire`]).
    RetiredUnseen { ord: u32 },
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

impl Registry {
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
            self.decode_item(&key[1..], &value)
        });
        written.map(Err).into_iter().chain(items)
    }

    /// An `items` row: the item id (its key) and its entry.
    fn decode_item(&self, key: &[u8], value: &[u8]) -> Result<(String, ItemEntry), RegistryError> {
        let id = std::str::from_utf8(key).map_err(|e| corrupt(Table::Items, key, e.to_string()))?;
        let entry =
            codec::decode_entry(value, self.levels).map_err(|d| corrupt(Table::Items, key, d))?;
        Ok((id.to_string(), entry))
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

    /// Records the weighted content words of item `ord` with the event
    /// applied last (call it right after applying it): the same commit
    /// holds both, so a crash never keeps an event without its content.
    pub fn set_content(&mut self, ord: u32, row: &[(u32, f32)]) {
        let staged = self.staged.get_mut().unwrap_or_else(|e| e.into_inner());
        staged.stage([(
            Table::Content.key(&codec::ord_bytes(ord)),
            Some(codec::encode_content(row)),
        )]);
    }

    /// Forgets every recorded content row, when they were weighed another
    /// way than the rows to come. How many there were.
    pub fn forget_contents(&self) -> Result<usize, RegistryError> {
        self.write_staged()?;
        let mut gone = Vec::new();
        for kv in self.scan(Table::Content) {
            gone.push((kv?.0, None));
        }
        let n = gone.len();
        let mut staged = self.staged();
        staged.stage(gone);
        staged.commit(&self.db)?;
        Ok(n)
    }

    /// Every recorded content row by ord, in ord order: what the service's
    /// content lookup starts from.
    pub fn contents(
        &self,
    ) -> impl Iterator<Item = Result<(u32, Vec<(u32, f32)>), RegistryError>> + '_ {
        let written = self.write_staged().err();
        let rows = self.scan(Table::Content).map(|kv| {
            let (key, value) = kv?;
            let key = &key[1..];
            let bad = |d: String| corrupt(Table::Content, key, d);
            let ord = codec::decode_ord(key).map_err(bad)?;
            Ok((ord, codec::decode_content(&value).map_err(bad)?))
        });
        written.map(Err).into_iter().chain(rows)
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

    fn meta_u64(&self, name: &str) -> Result<Option<u64>, RegistryError> {
        self.read(&Table::Meta.key(name.as_bytes()))?
            .map(|v| codec::decode_u64(&v).map_err(|d| corrupt(Table::Meta, name.as_bytes(), d)))
            .transpose()
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
    use crate::sid::Code;
    use crate::tokenizer::ContentCodes;

    fn binding() -> TokenizerBinding {
        TokenizerBinding {
            version: "v".into(),
            sid_levels: 3,
            last_level_capacity: 4,
            training: vec![("t".into(), "1-2-0".parse().unwrap())],
        }
    }

    /// Content codes with no prefix to go to when theirs is full.
    fn only(codes: &[Code]) -> ContentCodes {
        ContentCodes {
            codes: codes.to_vec(),
            last_ranked: codes.last().copied().into_iter().collect(),
        }
    }

    fn codes() -> Result<ContentCodes, Infallible> {
        Ok(only(&[1, 2]))
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
        let err = r
            .apply_upsert("a", [1; 32], Position::new(0, 0), 0, codes)
            .unwrap_err();
        assert!(matches!(err, RegistryError::Corrupt { .. }), "{err}");
        assert!(r.check().is_err());
    }

    /// Forgotten rows stay forgotten across a reopen, staged ones with
    /// them; the items keep their entries.
    #[test]
    fn forgotten_content_rows_are_gone_after_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut r = Registry::open(dir.path(), &binding(), None).unwrap();
            for (k, id) in ["a", "b"].into_iter().enumerate() {
                let LiveChange::Added { ord, .. } = r
                    .apply_upsert(id, [1; 32], Position::new(0, k as u64), 0, codes)
                    .unwrap()
                else {
                    panic!("a new item is added")
                };
                r.set_content(ord, &[(1, 0.5)]);
            }
            assert_eq!(r.forget_contents().unwrap(), 2);
        }
        let r = Registry::open(dir.path(), &binding(), None).unwrap();
        assert_eq!(r.contents().count(), 0);
        assert!(r.get("a").unwrap().is_some() && r.get("b").unwrap().is_some());
        r.check().unwrap();
    }

    #[test]
    fn content_rows_survive_a_reopen_and_the_last_one_wins() {
        let dir = tempfile::tempdir().unwrap();
        let ord = {
            let mut r = Registry::open(dir.path(), &binding(), None).unwrap();
            let LiveChange::Added { ord, .. } = r
                .apply_upsert("a", [1; 32], Position::new(0, 0), 0, codes)
                .unwrap()
            else {
                panic!("a new item is added")
            };
            r.set_content(ord, &[(1, 0.5)]);
            r.apply_upsert("a", [2; 32], Position::new(0, 1), 0, codes)
                .unwrap();
            r.set_content(ord, &[(2, 1.5), (7, -1.0)]);
            ord
        };
        let r = Registry::open(dir.path(), &binding(), None).unwrap();
        let rows: Vec<_> = r.contents().collect::<Result<_, _>>().unwrap();
        assert_eq!(rows, vec![(ord, vec![(2, 1.5), (7, -1.0)])]);
        r.check().unwrap();
        put(
            &r,
            Table::Content.key(&codec::ord_bytes(9)),
            &[1, 0, 0, 0, 1],
        );
        let err = r.contents().find_map(Result::err).unwrap();
        assert!(
            matches!(
                &err,
                RegistryError::Corrupt {
                    tree: "content",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn check_finds_tables_that_disagree() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Registry::open(dir.path(), &binding(), None).unwrap();
        r.apply_upsert("a", [1; 32], Position::new(0, 0), 0, codes)
            .unwrap();
        r.apply_upsert("a", [2; 32], Position::new(0, 1), 0, || {
            Ok::<_, Infallible>(only(&[3, 3]))
        })
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
        r.apply_upsert("a", [1; 32], Position::new(0, 0), 0, codes)
            .unwrap();
        assert_eq!(r.db.get(&Table::Items.key(b"a")).unwrap(), None, "staged");
        assert_eq!(
            r.get("a").unwrap().unwrap().applied.last(),
            Some(Position::new(0, 0))
        );
        assert_eq!(r.item_id(1).unwrap().as_deref(), Some("a"));
        std::thread::sleep(GROUP_AGE);
        r.apply_retire("a", Position::new(0, 1), 0).unwrap();
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
