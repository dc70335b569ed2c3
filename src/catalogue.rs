//! The catalogue path: item changes in, live decodable semantic IDs out.
//!
//! Three parts, one direction:
//!
//! ```text
//! upsert(item, content) ─► frozen tokenizer ─► registry (redb) ─► index overlay ─► publish
//! retire(item)          ─────────────────────►    item ⇄ SID       tombstone        snapshot
//! ```
//!
//! The registry is the source of truth and decides what changed (a replay
//! changes nothing, new content moves an item to a new SID, a retire takes it
//! out); the index follows. A change is decodable at the next
//! [`Catalogue::publish`], without waiting for a merge.
//!
//! Two rules tie them together across crashes and readers:
//!
//! - The index base's generation is recorded in the registry only after the
//!   segment file is durable, and old segment files are deleted only after
//!   that record is flushed. On open, whatever base the registry names is
//!   diffed against the registry's live set, so the index equals the registry
//!   whatever was interrupted.
//! - A SID that leaves the live set stays bound to its item until no published
//!   snapshot that could still decode it is alive; only then does the registry
//!   release it for another item.

use std::path::PathBuf;
use std::sync::Arc;

use crate::index::{Index, IndexError, IndexReader, Opened, Snapshot};
use crate::registry::{LiveChange, Position, Registry, RegistryError, TokenizerBinding};
use crate::sid::Sid;
use crate::tokenizer::FrozenTokenizer;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Where the catalogue lives and how it behaves.
#[derive(Clone, Debug)]
pub struct CatalogueConfig {
    /// Holds `registry/` (a redb file) and `index/` (base segments).
    pub dir: PathBuf,
    /// Overlay changes that trigger a background merge.
    pub merge_threshold: usize,
    /// How long a registry commit may stay without an fsync; `None` makes
    /// it durable only on [`Catalogue::flush`].
    pub flush_every_ms: Option<u64>,
}

impl CatalogueConfig {
    pub fn new(dir: impl Into<PathBuf>) -> CatalogueConfig {
        CatalogueConfig {
            dir: dir.into(),
            merge_threshold: 65_536,
            flush_every_ms: Some(crate::registry::DEFAULT_FLUSH_EVERY_MS),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CatalogueError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Index(#[from] IndexError),
}

/// Registry and index of one tokenizer's catalogue, kept in step.
pub struct Catalogue {
    tokenizer: Arc<FrozenTokenizer>,
    registry: Registry,
    index: Index,
    spilled: u64,
}

/// The vocabulary of each SID level: content codebooks, then the collision
/// level's capacity.
pub fn vocab(tokenizer: &FrozenTokenizer) -> Vec<usize> {
    let m = tokenizer.manifest();
    let mut v = m.codebook_sizes.clone();
    v.push(m.last_level_capacity);
    v
}

impl Catalogue {
    /// Opens (or creates) the catalogue in `cfg.dir` for `tokenizer`.
    pub fn open(
        tokenizer: Arc<FrozenTokenizer>,
        cfg: &CatalogueConfig,
    ) -> Result<(Catalogue, Opened), CatalogueError> {
        let mut registry = Registry::open(
            &cfg.dir.join("registry"),
            &TokenizerBinding::of(&tokenizer),
            cfg.flush_every_ms,
        )?;
        // No snapshot survives a restart, so nothing can still decode a SID
        // that left before it.
        registry.release(u64::MAX)?;
        let live = registry.live().collect::<Result<Vec<(Sid, u32)>, _>>()?;
        let (index, opened) = Index::open(
            &cfg.dir.join("index"),
            &vocab(&tokenizer),
            registry.index_generation()?,
            &live,
            cfg.merge_threshold,
        )?;
        if opened != Opened::Reopened {
            registry.set_index_generation(index.generation())?;
            registry.flush()?;
        }
        index.remove_old_segments()?;
        Ok((
            Catalogue {
                tokenizer,
                registry,
                index,
                spilled: 0,
            },
            opened,
        ))
    }

    pub fn tokenizer(&self) -> &FrozenTokenizer {
        &self.tokenizer
    }

    /// Items given a SID outside their nearest content prefix, that one
    /// being full, since this catalogue was opened
    /// ([`SidAllocator::place_new`](crate::tokenizer::SidAllocator::place_new)):
    /// a count that grows says the tokenizer's last level is too small for
    /// the catalogue.
    pub fn spilled(&self) -> u64 {
        self.spilled
    }

    /// Records item `ord`'s weighted content words with the event applied
    /// last ([`Registry::set_content`]).
    pub fn set_content(&mut self, ord: u32, row: &[(u32, f32)]) {
        self.registry.set_content(ord, row);
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn reader(&self) -> IndexReader {
        self.index.reader()
    }

    /// Applies an upsert: `vector` is the item's content vector, `content_hash`
    /// a digest of the content it came from (equal digests mean "unchanged"),
    /// `position` the event's position in the catalogue topic.
    pub fn upsert(
        &mut self,
        item_id: &str,
        content_hash: [u8; 32],
        vector: &[f32],
        position: Position,
    ) -> Result<LiveChange, CatalogueError> {
        self.upsert_with(item_id, content_hash, position, |_| {
            Ok::<_, std::convert::Infallible>(vector.to_vec())
        })
    }

    /// [`upsert`](Self::upsert) with the content vector made on demand, for
    /// the catalogue's tokenizer (a collaborative one predicts it from
    /// content): `vector` runs only when the registry needs new codes (a new
    /// item, new content, a returning item whose SID was released), so
    /// replays and reserved training items never pay for embedding. Its
    /// error comes back as [`RegistryError::Codes`], whose source can be
    /// downcast to `E`.
    pub fn upsert_with<E>(
        &mut self,
        item_id: &str,
        content_hash: [u8; 32],
        position: Position,
        vector: impl FnOnce(&FrozenTokenizer) -> Result<Vec<f32>, E>,
    ) -> Result<LiveChange, CatalogueError>
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        let generation = self.index.next_seq();
        let tokenizer = &self.tokenizer;
        let mut nearest = None;
        let change =
            self.registry
                .apply_upsert(item_id, content_hash, position, generation, || {
                    let v = vector(tokenizer).map_err(BoxError::from)?;
                    let codes = tokenizer
                        .content_codes(item_id, &v)
                        .map_err(BoxError::from)?;
                    nearest = Some(codes.codes.clone());
                    Ok::<_, BoxError>(codes)
                })?;
        if let (Some(nearest), LiveChange::Added { sid, .. } | LiveChange::Moved { new: sid, .. }) =
            (nearest, change)
        {
            self.spilled += u64::from(sid.prefix() != nearest.as_slice());
        }
        self.follow(change);
        Ok(change)
    }

    /// Applies a retire. An item never seen is recorded as retired
    /// ([`LiveChange::RetiredUnseen`]).
    pub fn retire(
        &mut self,
        item_id: &str,
        position: Position,
    ) -> Result<LiveChange, CatalogueError> {
        let change = self
            .registry
            .apply_retire(item_id, position, self.index.next_seq())?;
        self.follow(change);
        Ok(change)
    }

    fn follow(&mut self, change: LiveChange) {
        match change {
            LiveChange::Unchanged | LiveChange::RetiredUnseen { .. } => {}
            LiveChange::Added { ord, sid } => {
                self.index.insert(sid, ord);
            }
            LiveChange::Moved { ord, old, new } => {
                self.index.remove(old);
                self.index.insert(new, ord);
            }
            LiveChange::Retired { sid, .. } => {
                self.index.remove(sid);
            }
        }
    }

    /// Publishes the changes applied so far, folds in a finished background
    /// merge (or starts one), and releases SIDs no reader can decode any more.
    pub fn publish(&mut self) -> Result<Arc<Snapshot>, CatalogueError> {
        self.index.publish();
        self.index.maybe_merge();
        if let Some(generation) = self.index.poll_merge()? {
            self.record(generation)?;
        }
        let oldest = self.index.oldest_alive_seq();
        self.registry.release(oldest)?;
        Ok(self.index.reader().snapshot())
    }

    /// Merges now and records the new base.
    pub fn merge_now(&mut self) -> Result<u64, CatalogueError> {
        let generation = self.index.merge_now()?;
        self.record(generation)?;
        Ok(generation)
    }

    fn record(&mut self, generation: u64) -> Result<(), CatalogueError> {
        self.registry.set_index_generation(generation)?;
        self.registry.flush()?;
        self.index.remove_old_segments()?;
        Ok(())
    }

    /// Makes everything applied so far durable.
    pub fn flush(&self) -> Result<(), CatalogueError> {
        Ok(self.registry.flush()?)
    }
}
/// A content digest for vectors: what [`Catalogue::upsert`] compares to tell a
/// replay from a change when the content is a ready embedding.
pub fn vector_hash(vector: &[f32]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for x in vector {
        h.update(x.to_le_bytes());
    }
    h.finalize().into()
}
