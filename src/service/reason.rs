//! Why an input message went to the dead-letter topic: the reason a dead
//! letter carries, its label in `/metrics`, and the list the contract
//! documents (`schemas/README.md`).

/// Why an input message went to the dead-letter topic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Not a datum of the expected schema (garbage, truncated, a field
    /// missing, junk after it).
    Undecodable,
    /// A Confluent schema id the service was not configured to accept.
    UnknownSchema,
    /// Well-formed, but breaks a rule of the contract (an empty id).
    InvalidRecord,
    /// An embedding of the wrong dimension, with a non-finite value, or all
    /// zeros.
    BadEmbedding,
    /// An upsert with no content the tokenizer can read.
    NoContent,
    /// An interaction naming an item the catalogue never had.
    UnknownItem,
    /// The tokenizer could not place the item: its content prefix and every
    /// prefix next to it are full.
    Tokenizer,
    /// A field over its configured limit (`limits.*`).
    TooLarge,
    /// The broker refused, for good, a record the message caused (a feed
    /// or a changelog record too large, a topic that refuses writes).
    OutputRefused,
    /// The model's batch holding the user failed.
    FeedFailed,
}

impl Reason {
    pub const ALL: [Reason; 10] = [
        Reason::Undecodable,
        Reason::UnknownSchema,
        Reason::InvalidRecord,
        Reason::BadEmbedding,
        Reason::NoContent,
        Reason::UnknownItem,
        Reason::Tokenizer,
        Reason::TooLarge,
        Reason::OutputRefused,
        Reason::FeedFailed,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Reason::Undecodable => "undecodable",
            Reason::UnknownSchema => "unknown_schema",
            Reason::InvalidRecord => "invalid_record",
            Reason::BadEmbedding => "bad_embedding",
            Reason::NoContent => "no_content",
            Reason::UnknownItem => "unknown_item",
            Reason::Tokenizer => "tokenizer",
            Reason::TooLarge => "too_large",
            Reason::OutputRefused => "output_refused",
            Reason::FeedFailed => "feed_failed",
        }
    }
}
