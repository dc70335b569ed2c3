//! Prometheus text metrics, from atomics the pipeline bumps as it goes.
//!
//! Nothing here locks or allocates on the paths that record: counters and
//! histogram buckets are atomics, and the text is only built when
//! `/metrics` is scraped.

use std::fmt::Write;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::Relaxed};

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
    /// An embedding of the wrong dimension or with a non-finite value.
    BadEmbedding,
    /// An upsert with no content the tokenizer can read.
    NoContent,
    /// An interaction or retire naming an item the catalogue never had.
    UnknownItem,
    /// The tokenizer could not place the item (e.g. its prefix is full).
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

/// A histogram with fixed bucket bounds.
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    /// Sum in micro-units, so it can be an integer atomic.
    sum_micros: AtomicU64,
    count: AtomicU64,
}

/// Seconds, from 1 ms to 10 s.
pub const LATENCY_BOUNDS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];
/// Users per batch.
pub const BATCH_BOUNDS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: (0..bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, v: f64) {
        let v = v.max(0.0);
        if let Some(i) = self.bounds.iter().position(|&b| v <= b) {
            self.counts[i].fetch_add(1, Relaxed);
        }
        self.sum_micros.fetch_add((v * 1e6) as u64, Relaxed);
        self.count.fetch_add(1, Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Relaxed)
    }

    /// The upper bound of the bucket holding quantile `q` (an estimate, as
    /// Prometheus' `histogram_quantile` gives).
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let n = self.count();
        if n == 0 {
            return None;
        }
        let target = (q * n as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            seen += c.load(Relaxed);
            if seen >= target {
                return Some(*b);
            }
        }
        Some(f64::INFINITY)
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            cumulative += c.load(Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cumulative}");
        }
        let n = self.count();
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {n}");
        let sum = self.sum_micros.load(Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {n}");
    }
}

pub struct Metrics {
    pub catalogue_events: AtomicU64,
    pub interaction_events: AtomicU64,
    /// Interactions already in the history (replays after a restart).
    pub replayed: AtomicU64,
    pub feeds: AtomicU64,
    pub feed_retries: AtomicU64,
    dead_letters: [AtomicU64; Reason::ALL.len()],
    pub batch_users: Histogram,
    /// Interaction (its Kafka timestamp) to the feed's delivery ack.
    pub feed_latency: Histogram,
    /// One model batch: histories read, beam search, filters.
    pub generate_seconds: Histogram,
    /// Catalogue event (its Kafka timestamp) to the publish that made it
    /// decodable.
    pub decodable_latency: Histogram,
    pub index_generation: AtomicU64,
    pub live_items: AtomicU64,
    pub pending_users: AtomicU64,
    pub consumer_lag: AtomicI64,
    /// Interaction partitions this instance owns now.
    pub assigned_partitions: AtomicI64,
    /// The catalogue was read up to where it stood at start-up.
    pub catalogue_loaded: AtomicBool,
    /// The interactions consumer joined its group and got its partitions
    /// (maybe none) with their histories restored.
    pub joined: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            catalogue_events: AtomicU64::new(0),
            interaction_events: AtomicU64::new(0),
            replayed: AtomicU64::new(0),
            feeds: AtomicU64::new(0),
            feed_retries: AtomicU64::new(0),
            dead_letters: Default::default(),
            batch_users: Histogram::new(BATCH_BOUNDS),
            feed_latency: Histogram::new(LATENCY_BOUNDS),
            generate_seconds: Histogram::new(LATENCY_BOUNDS),
            decodable_latency: Histogram::new(LATENCY_BOUNDS),
            index_generation: AtomicU64::new(0),
            live_items: AtomicU64::new(0),
            pending_users: AtomicU64::new(0),
            consumer_lag: AtomicI64::new(0),
            assigned_partitions: AtomicI64::new(0),
            catalogue_loaded: AtomicBool::new(false),
            joined: AtomicBool::new(false),
        }
    }
}

impl Metrics {
    pub fn dead_letter(&self, reason: Reason) {
        let i = Reason::ALL
            .iter()
            .position(|&r| r == reason)
            .expect("in ALL");
        self.dead_letters[i].fetch_add(1, Relaxed);
    }

    /// Serving: the catalogue is loaded and interactions are being read.
    pub fn is_ready(&self) -> bool {
        self.catalogue_loaded.load(Relaxed) && self.joined.load(Relaxed)
    }

    pub fn dead_letters(&self) -> u64 {
        self.dead_letters.iter().map(|c| c.load(Relaxed)).sum()
    }

    /// The Prometheus text exposition of everything.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        let mut counter = |name: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        };
        counter(
            "genfeed_catalogue_events_total",
            "Catalogue messages consumed.",
            self.catalogue_events.load(Relaxed),
        );
        counter(
            "genfeed_interaction_events_total",
            "Interaction messages consumed.",
            self.interaction_events.load(Relaxed),
        );
        counter(
            "genfeed_interactions_replayed_total",
            "Interactions already in the user's history (replays).",
            self.replayed.load(Relaxed),
        );
        counter(
            "genfeed_feeds_total",
            "Recommendation events acknowledged by the broker.",
            self.feeds.load(Relaxed),
        );
        counter(
            "genfeed_feed_retries_total",
            "Feed deliveries that failed and were sent again.",
            self.feed_retries.load(Relaxed),
        );
        let _ = writeln!(
            out,
            "# HELP genfeed_dead_letters_total Input messages sent to the dead-letter topic, by reason.\n\
             # TYPE genfeed_dead_letters_total counter"
        );
        for (r, c) in Reason::ALL.iter().zip(&self.dead_letters) {
            let _ = writeln!(
                out,
                "genfeed_dead_letters_total{{reason=\"{}\"}} {}",
                r.label(),
                c.load(Relaxed)
            );
        }
        let mut gauge = |name: &str, help: &str, v: i64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        gauge(
            "genfeed_index_generation",
            "Sequence number of the published index snapshot.",
            self.index_generation.load(Relaxed) as i64,
        );
        gauge(
            "genfeed_live_items",
            "Items that can be recommended.",
            self.live_items.load(Relaxed) as i64,
        );
        gauge(
            "genfeed_pending_users",
            "Users waiting for a feed.",
            self.pending_users.load(Relaxed) as i64,
        );
        gauge(
            "genfeed_consumer_lag",
            "Interactions behind the partitions' high watermarks (approximate on brokers whose watermark is approximate).",
            self.consumer_lag.load(Relaxed),
        );
        gauge(
            "genfeed_assigned_partitions",
            "Interaction partitions this instance owns.",
            self.assigned_partitions.load(Relaxed),
        );
        gauge(
            "genfeed_ready",
            "1 once the catalogue is loaded and the consumer group joined.",
            i64::from(self.is_ready()),
        );
        self.batch_users
            .render(&mut out, "genfeed_batch_users", "Users per model batch.");
        self.feed_latency.render(
            &mut out,
            "genfeed_feed_latency_seconds",
            "Interaction timestamp to the feed's delivery acknowledgement.",
        );
        self.generate_seconds.render(
            &mut out,
            "genfeed_generate_seconds",
            "Model time per batch.",
        );
        self.decodable_latency.render(
            &mut out,
            "genfeed_decodable_latency_seconds",
            "Catalogue event timestamp to the snapshot that makes it decodable.",
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_quantiles_read_them() {
        let h = Histogram::new(LATENCY_BOUNDS);
        for v in [0.0005, 0.003, 0.003, 0.2, 20.0] {
            h.observe(v);
        }
        let mut out = String::new();
        h.render(&mut out, "x", "help");
        assert!(out.contains("x_bucket{le=\"0.001\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"0.005\"} 3\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"10\"} 4\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 5\n"), "{out}");
        assert_eq!(h.quantile(0.5), Some(0.005));
        assert_eq!(h.quantile(0.99), Some(f64::INFINITY));
    }

    #[test]
    fn dead_letters_are_counted_by_reason() {
        let m = Metrics::default();
        m.dead_letter(Reason::UnknownItem);
        m.dead_letter(Reason::UnknownItem);
        m.dead_letter(Reason::Undecodable);
        let text = m.render();
        assert!(text.contains("genfeed_dead_letters_total{reason=\"unknown_item\"} 2"));
        assert!(text.contains("genfeed_dead_letters_total{reason=\"undecodable\"} 1"));
        assert_eq!(m.dead_letters(), 3);
    }
}
