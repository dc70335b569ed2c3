//! Parsed field values.

use std::str::SplitWhitespace;

/// One field, parsed by its column type.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Token(String),
    /// Kept verbatim: the same type holds both token lists and free text,
    /// and only the consumer knows which it is. See [`Value::tokens`].
    TokenSeq(String),
    Float(f64),
    FloatSeq(Vec<f32>),
}

impl Value {
    /// The text of a `Token` or `TokenSeq`.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Token(s) | Value::TokenSeq(s) => Some(s),
            Value::Float(_) | Value::FloatSeq(_) => None,
        }
    }

    /// The whitespace-separated tokens of a `Token` or `TokenSeq`.
    pub fn tokens(&self) -> Option<SplitWhitespace<'_>> {
        self.as_str().map(str::split_whitespace)
    }
}
