//! The generative model: a transformer that spells the next item's semantic ID.
//!
//! # Shape of the model
//!
//! Two stacked parts, both plain pre-norm transformers:
//!
//! - The **history transformer** reads a user's last items, one position per
//!   item. An item's input vector is the sum of its SID tokens' embeddings
//!   (one table per level) plus a position embedding counted from the most
//!   recent item, so an item that arrived a minute ago is as readable as one
//!   from the training set: it only needs a SID. Attention is causal, so one
//!   pass over a whole sequence yields a context vector after every item.
//! - The **SID decoder** turns one context vector into a SID, token by
//!   token: a small causal transformer over `[context, token₀, …, token_{L-2}]`
//!   whose output at position `l` scores level `l`'s codes against that
//!   level's (tied) embedding table and, with prefix- and sibling-scored
//!   outputs, against the (tied) rows of the prefixes they would complete
//!   ([`ModelConfig::prefix_scored`], [`siblings`]).
//!
//! # Why not TIGER's encoder–decoder
//!
//! TIGER runs its encoder once per training target: a user with `n` items
//! costs `n` encoder passes over up to 20 items. The causal history
//! transformer learns from every position of a sequence in one pass, and its
//! positions are items, not tokens, so the sequence is 4× shorter than a
//! flattened token stream. On Toys that is about 128k item positions an epoch
//! instead of TIGER's ~1.1M encoder tokens (`flops` has the counts). At
//! serving time the history is read once per request and its context vector
//! is shared by every beam; only the tiny SID decoder runs per beam, with a
//! key/value cache of at most `L` positions.
//!
//! # Fresh items
//!
//! Items the model never saw as a target (new arrivals, a cold split's cold
//! items) get their share of the distribution from their content
//! ([`fresh`]): a softmax over fresh items of their content's cosine to the
//! history's last item, mixed in at the prior that the next item is fresh.
//!
//! # Successor counts
//!
//! The search can run over a mixture of the model and the training
//! transitions' successor counts ([`transitions`]): the model generalises to
//! targets no transition leads to, the counts keep the sparse transitions a
//! 128-wide model blurs. Both spell items token by token, so the mixture is
//! searched exactly like the model alone.
//!
//! Weights live in `model.safetensors` beside `config.json`
//! ([`ModelConfig`]); [`Model::load`] refuses weights whose shapes do not
//! match the config.
//! The counts, when fitted, are `transitions.safetensors`.

pub mod affinity;
mod beam;
mod config;
pub(crate) mod cpu_storage;
mod device_tables;
mod flops;
pub mod fresh;
mod prefix_scores;
pub mod siblings;
mod transformer;
pub mod transitions;

pub use affinity::{Affinity, AFFINITY_FILE};
pub use beam::{Filter, Generated, Generator, Request, SearchOptions};
pub use config::{ModelConfig, ModelError, CONFIG_FILE, WEIGHTS_FILE};
pub use flops::{flops_per_request, flops_per_train_position};
pub use fresh::{ContentTable, FreshItems, ItemContent, Segment};
pub use siblings::{SiblingTable, MAX_SIBLINGS};
pub use transformer::{param_count, Dropout, ItemTokens, Model, Params, TrainBatch};
pub(crate) use transformer::{window_mask, window_positions};
pub use transitions::{Learnt, Transitions, TRANSITIONS_FILE};
