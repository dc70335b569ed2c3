//! Opening a registry: creating it for its tokenizer on first open (every
//! training SID reserved), and otherwise rebuilding the in-memory state
//! (allocator, live count, next ord, SIDs waiting for release) from disk.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use super::codec::{self, Binding, SidState, Table};
use super::Applied;
use super::{
    corrupt, ItemEntry, Registry, RegistryError, Status, TokenizerBinding, FILE, FORMAT,
    INIT_BATCH, META_CAPACITY, META_FORMAT, META_LEVELS, META_VERSION,
};
use crate::store::Store;
use crate::tokenizer::SidAllocator;

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
    pub(super) fn create(&self, binding: &TokenizerBinding) -> Result<(), RegistryError> {
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
                    applied: Applied::default(),
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
}
