//! Text to vectors with a local sentence encoder.
