//! genfeed: a streaming generative recommender.
pub mod dataset;
pub mod embed;
