//! genfeed: a streaming generative recommender.
pub mod contract;
pub mod embed;
