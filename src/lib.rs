//! genfeed: a streaming generative recommender over semantic IDs.
//!
//! Items in genfeed are named by **semantic IDs** (SIDs, [`sid::Sid`]): short
//! tuples of codebook tokens such as `12-48-7-0`, where similar items share
//! leading tokens. A transformer recommends by *generating* the next item's SID
//! token by token, constrained to SIDs of live items. That is what lets a
//! brand-new item be recommended without retraining: the moment it arrives, a
//! frozen tokenizer gives it a SID among its neighbours, and the model can
//! already spell it.
//!
//! The crate follows the flow of data:
//!
//! - [`contract`]: the Avro records on the wire (catalogue changes,
//!   interactions, recommendations, dead letters), plain or Confluent-framed.
//! - [`dataset`]: RecBole atomic files (`.item`, `.inter`) for offline work, and
//!   the leave-one-out split the field evaluates with.
//! - [`embed`]: item content to vectors: a precomputed embedding, text through a
//!   local sentence encoder, or hashed categorical attributes.
//! - [`tokenizer`]: vectors to SIDs. Trained offline (RQ-KMeans, TIGER's
//!   RQ-VAE, GPTRec's SVD), saved as a self-describing artifact, applied frozen
//!   and deterministically online.
//! - [`registry`]: the durable item ⇄ SID map (in a [`store`]): which SID each item
//!   goes by, replay-safe, and when a retired item's SID may go to another.
//! - [`index`]: the live SIDs decoding is constrained to: an LSM of immutable
//!   `fst` base segments and a persistent overlay, published as lock-free
//!   snapshots with STATIC-style decoding tables.
//! - [`catalogue`]: the catalogue path that keeps tokenizer, registry and
//!   index in step: an upsert is decodable at the next publish.
//! - [`model`], [`train`], [`eval`]: the transformer that spells the next
//!   item's SID, its training, and the field's leave-one-out protocol. The
//!   search mixes the model with the training transitions' successor counts
//!   ([`model::transitions`]): what the model misses, the counts know; and
//!   items the model never learnt get their share from their content
//!   ([`model::fresh`]). [`dataset::cold`] is the cold-start protocol that
//!   measures it.
//! - [`service`]: the streaming service behind `genfeed run`: Kafka
//!   consumers, durable per-user histories, a scheduler that micro-batches
//!   users for the model, delivery-gated offsets, dead letters and metrics.
//! - [`synth`]: generated catalogues and interaction logs with known structure,
//!   for tests, demos and benchmarks on any machine.
//!
//! A taste of the frozen path, from a trained artifact to a SID:
//!
//! ```no_run
//! use genfeed::tokenizer::FrozenTokenizer;
//!
//! let tokenizer = FrozenTokenizer::load("runs/demo/tokenizer".as_ref())?;
//! let mut assigner = tokenizer.assigner();
//! let vector = vec![0.0f32; tokenizer.input_dim()];
//! let sid = assigner.assign("new-item-42", &vector)?;
//! println!("new-item-42 is {sid}");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
pub mod catalogue;
pub mod contract;
pub mod dataset;
pub mod embed;
pub mod eval;
pub mod index;
pub mod model;
pub mod registry;
pub mod service;
pub mod sid;
pub mod store;
pub mod synth;
pub mod tokenizer;
pub mod train;
