//! What can go wrong in the registry, precisely enough to act on.

use crate::tokenizer::PrefixFull;

/// Why a registry operation failed.
///
/// [`RegistryError::PrefixFull`] and [`RegistryError::Codes`] are about one
/// event and leave the registry
/// unchanged: the service dead-letters the event and goes on. The others are
/// about the store itself and should stop the process.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("registry storage: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("registry table {tree:?}, key {key}: {detail}")]
    Corrupt {
        /// The table (`items`, `ords`, `sids`, `meta`; `registry` for a key
        /// of none).
        tree: &'static str,
        /// The key, printed readably (UTF-8 where it is, hex otherwise).
        key: String,
        detail: String,
    },
    #[error("the registry on disk has format {found}; this build reads format {expected} only and does not convert")]
    Format { found: u64, expected: u64 },
    #[error("this registry belongs to tokenizer {found}, not {expected}: semantic IDs of one tokenizer mean nothing to another")]
    WrongTokenizer { found: String, expected: String },
    #[error("tokenizer binding: {0}")]
    Binding(String),
    #[error("item {item:?}: {source}")]
    PrefixFull { item: String, source: PrefixFull },
    #[error("item {item:?}: no content codes: {source}")]
    Codes {
        item: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// A key as an operator would want to read it in an error message.
pub(crate) fn show_key(key: &[u8]) -> String {
    match std::str::from_utf8(key) {
        Ok(s) if !s.chars().any(char::is_control) => format!("{s:?}"),
        _ => key.iter().map(|b| format!("{b:02x}")).collect(),
    }
}
