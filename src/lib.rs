//! genfeed: a streaming generative recommender.
pub mod embed;
pub mod sid;
pub mod tokenizer;
