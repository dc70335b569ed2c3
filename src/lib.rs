//! genfeed: a streaming generative recommender.
pub mod embed;
