//! The tokenizer a registry belongs to: SIDs mean something only to the
//! tokenizer that made them, so a registry records its tokenizer and refuses
//! another.

use super::codec::Table;
use super::{
    corrupt, Registry, RegistryError, FORMAT, META_CAPACITY, META_FORMAT, META_LEVELS, META_VERSION,
};
use crate::sid::{Code, Sid, MAX_LEVELS};
use crate::tokenizer::FrozenTokenizer;

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

    pub(super) fn describe(version: &str, levels: u64, capacity: u64) -> String {
        format!("{version:?} ({levels}-level SIDs, last level of {capacity})")
    }

    /// Refuses a binding the registry could not honour: SIDs of the wrong
    /// shape, or two training items sharing a SID.
    pub(super) fn validate(&self) -> Result<(), RegistryError> {
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

impl Registry {
    /// Refuses a registry of another format or another tokenizer.
    pub(super) fn check_binding(&self, binding: &TokenizerBinding) -> Result<(), RegistryError> {
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
}
