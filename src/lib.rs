//! genfeed: a streaming generative recommender.
pub mod contract;
pub mod dataset;
pub mod embed;
pub mod sid;
pub mod synth;
pub mod tokenizer;
