//! Item content to vectors.
pub mod text;
