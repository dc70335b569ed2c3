//! genfeed: a streaming generative recommender.
pub mod dataset;
pub mod embed;
pub mod sid;
pub mod tokenizer;
pub mod synth;
