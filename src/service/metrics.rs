//! The service's metrics, exposed in the Prometheus text format by
//! `prometheus-client` (the Prometheus project's own Rust client).
//!
//! Counters and gauges are atomics; the pipeline bumps them without a lock or
//! an allocation. A histogram observation takes the histogram's own short
//! mutex (once per feed or batch, never per item). Dead-letter counters are
//! created for every [`Reason`] up front, so counting one never looks a label
//! set up. The text is built only when `/metrics` is scraped.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Metric, Registry};

use super::reason::Reason;

/// Seconds, from 1 ms to 10 s.
const LATENCY_BOUNDS: [f64; 18] = [
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];
/// Users per batch.
const BATCH_BOUNDS: [f64; 9] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

type Labels = [(&'static str, &'static str); 1];

pub struct Metrics {
    registry: Registry,
    pub catalogue_events: Counter,
    pub interaction_events: Counter,
    /// Interactions already in the history (replays after a restart).
    pub replayed: Counter,
    /// Interactions applied after waiting for their item's catalogue event.
    pub waited: Counter,
    /// Interactions whose record key is not their user id.
    pub interactions_miskeyed: Counter,
    /// Histories changelog records read by restores (after a restart on the
    /// same state, only what others wrote since).
    pub changelog_restored: Counter,
    pub feeds: Counter,
    pub feed_retries: Counter,
    /// Feeds made for users who did nothing new ([`super::refresh`]).
    pub feeds_refreshed: Counter,
    /// Refreshed feeds the broker refused for good, dropped.
    pub refresh_refused: Counter,
    /// Errors the consumers reported and the client recovers from by itself
    /// (see [`super::kafka::ends_consumption`]).
    pub consumer_errors: Counter,
    /// Steps (previous item → next) learnt from the histories changelog.
    pub learnt_steps: Counter,
    /// One counter per reason, in the order of [`Reason::ALL`].
    dead_letters: Vec<Counter>,
    pub batch_users: Histogram,
    /// Interaction (its Kafka timestamp) to the feed's delivery ack.
    pub feed_latency: Histogram,
    /// One model batch: histories read, beam search, filters.
    pub generate_seconds: Histogram,
    /// Catalogue event (its Kafka timestamp) to the publish that made it
    /// decodable.
    pub decodable_latency: Histogram,
    pub index_generation: Gauge,
    pub live_items: Gauge,
    /// Items given a SID outside their nearest content prefix, that one
    /// being full ([`Catalogue::spilled`](crate::catalogue::Catalogue::spilled)).
    pub items_spilled: Counter,
    /// Retires of items this instance never saw, kept as retired items.
    pub retired_unseen: Counter,
    /// Live items that arrived after training, competing by their content.
    pub fresh_items: Gauge,
    /// The weight they are searched at: `feed.fresh_weight`, or where
    /// `feed.fresh_share` has moved it.
    pub fresh_weight: Gauge<f64, AtomicU64>,
    /// Distinct (item, successor) pairs and items with a popularity count
    /// learnt from the stream.
    pub learnt_pairs: Gauge,
    pub learnt_items: Gauge,
    pub pending_users: Gauge,
    /// Interactions waiting for their item (or behind one that does).
    pub waiting: Gauge,
    pub consumer_lag: Gauge,
    /// Interaction partitions this instance owns now.
    pub assigned_partitions: Gauge,
    ready: Gauge,
    /// The catalogue was read up to where it stood at start-up.
    pub catalogue_loaded: AtomicBool,
    /// The interactions consumer joined its group and got its partitions
    /// (maybe none) with their histories restored.
    pub joined: AtomicBool,
    /// The learnt counts were read up to where the changelog stood at
    /// start-up (or learning is off).
    pub learnt_loaded: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("genfeed");
        let mut counter =
            |name: &str, help: &str| registered(&mut registry, name, help, Counter::default());
        let catalogue_events = counter("catalogue_events", "Catalogue messages consumed");
        let interaction_events = counter("interaction_events", "Interaction messages consumed");
        let replayed = counter(
            "interactions_replayed",
            "Interactions already in the user's history (replays)",
        );
        let waited = counter(
            "interactions_waited",
            "Interactions applied after waiting for their item's catalogue event",
        );
        let interactions_miskeyed = counter(
            "interactions_miskeyed",
            "Interactions whose record key is not their user_id (none, or another): such a user's interactions can come on several partitions, so several instances, each holding part of the history; key them by user_id",
        );
        let changelog_restored = counter(
            "changelog_restored",
            "Histories changelog records read when partitions were assigned",
        );
        let feeds = counter("feeds", "Recommendation events acknowledged by the broker");
        let feed_retries = counter(
            "feed_retries",
            "Feed deliveries that failed and were sent again",
        );
        let feeds_refreshed = counter(
            "feeds_refreshed",
            "Feeds made by a refresh pass for users who did nothing new (feed.refresh_ms)",
        );
        let refresh_refused = counter(
            "refresh_refused",
            "Refreshed feeds the broker refused for good, dropped (they answer no input)",
        );
        let consumer_errors = counter(
            "consumer_errors",
            "Errors the Kafka consumers reported and recovered from (a broker restarting, a connection lost)",
        );
        let items_spilled = counter(
            "items_spilled",
            "New items given a SID in a prefix next to their content's, which was full; if it grows, train the tokenizer with a larger --last-level-capacity",
        );
        let retired_unseen = counter(
            "catalogue_retired_unseen",
            "Retires of items this instance never saw, kept as retired items: on a compacted catalogue, items retired before their upserts were compacted away; otherwise a producer retiring ids it never upserted",
        );
        let learnt_steps = counter(
            "learnt_steps",
            "Steps from one item to the next learnt from the stream (every partition's)",
        );
        let family = Family::<Labels, Counter>::default();
        let dead_letters = Reason::ALL
            .iter()
            .map(|r| family.get_or_create_owned(&[("reason", r.label())]))
            .collect();
        registry.register(
            "dead_letters",
            "Input messages sent to the dead-letter topic, by reason",
            family,
        );
        let mut gauge =
            |name: &str, help: &str| registered(&mut registry, name, help, Gauge::default());
        let index_generation = gauge(
            "index_generation",
            "Sequence number of the published index snapshot",
        );
        let live_items = gauge("live_items", "Items that can be recommended");
        let fresh_items = gauge(
            "fresh_items",
            "Live items that arrived after training and compete for feed slots by their content",
        );
        let learnt_pairs = gauge(
            "learnt_pairs",
            "Distinct (item, successor) pairs learnt from the stream",
        );
        let learnt_items = gauge(
            "learnt_items",
            "Items with a popularity count learnt from the stream",
        );
        let pending_users = gauge("pending_users", "Users waiting for a feed");
        let waiting = gauge(
            "interactions_waiting",
            "Interactions waiting for their item's catalogue event, or behind their user's one that does",
        );
        let consumer_lag = gauge(
            "consumer_lag",
            "Interactions behind the partitions' high watermarks (approximate on brokers whose watermark is approximate)",
        );
        let assigned_partitions = gauge(
            "assigned_partitions",
            "Interaction partitions this instance owns",
        );
        let ready = gauge(
            "ready",
            "1 once the catalogue is loaded and the consumer group joined",
        );
        let fresh_weight = registered(
            &mut registry,
            "fresh_weight",
            "Weight of fresh items' content in the search (moves to hold feed.fresh_share)",
            Gauge::<f64, AtomicU64>::default(),
        );
        let mut histogram = |name: &str, help: &str, bounds: &[f64]| {
            registered(
                &mut registry,
                name,
                help,
                Histogram::new(bounds.iter().copied()),
            )
        };
        let batch_users = histogram("batch_users", "Users per model batch", &BATCH_BOUNDS);
        let feed_latency = histogram(
            "feed_latency_seconds",
            "Interaction timestamp to the feed's delivery acknowledgement",
            &LATENCY_BOUNDS,
        );
        let generate_seconds =
            histogram("generate_seconds", "Model time per batch", &LATENCY_BOUNDS);
        let decodable_latency = histogram(
            "decodable_latency_seconds",
            "Catalogue event timestamp to the snapshot that makes it decodable",
            &LATENCY_BOUNDS,
        );
        Metrics {
            registry,
            catalogue_events,
            interaction_events,
            replayed,
            waited,
            interactions_miskeyed,
            changelog_restored,
            feeds,
            feed_retries,
            feeds_refreshed,
            refresh_refused,
            consumer_errors,
            learnt_steps,
            dead_letters,
            batch_users,
            feed_latency,
            generate_seconds,
            decodable_latency,
            index_generation,
            live_items,
            items_spilled,
            retired_unseen,
            fresh_items,
            fresh_weight,
            learnt_pairs,
            learnt_items,
            pending_users,
            waiting,
            consumer_lag,
            assigned_partitions,
            ready,
            catalogue_loaded: AtomicBool::new(false),
            joined: AtomicBool::new(false),
            learnt_loaded: AtomicBool::new(false),
        }
    }
}

/// Registers `metric` under `name` and gives it back: the registry keeps a
/// handle to the same atomics, the pipeline bumps the returned one.
fn registered<M: Metric + Clone>(registry: &mut Registry, name: &str, help: &str, metric: M) -> M {
    registry.register(name, help, metric.clone());
    metric
}

impl Metrics {
    pub fn dead_letter(&self, reason: Reason) {
        let i = Reason::ALL
            .iter()
            .position(|&r| r == reason)
            .expect("in ALL");
        self.dead_letters[i].inc();
    }

    /// Serving: the catalogue is loaded, the learnt counts caught up, and
    /// interactions are being read.
    pub fn is_ready(&self) -> bool {
        self.catalogue_loaded.load(Relaxed)
            && self.learnt_loaded.load(Relaxed)
            && self.joined.load(Relaxed)
    }

    pub fn dead_letters(&self) -> u64 {
        self.dead_letters.iter().map(Counter::get).sum()
    }

    /// The Prometheus text exposition of everything.
    pub fn render(&self) -> String {
        self.ready.set(i64::from(self.is_ready()));
        let mut out = String::with_capacity(8192);
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let m = Metrics::default();
        for v in [0.0005, 0.003, 0.003, 0.2, 20.0] {
            m.feed_latency.observe(v);
        }
        let out = m.render();
        let name = "genfeed_feed_latency_seconds";
        assert!(
            out.contains(&format!("{name}_bucket{{le=\"0.001\"}} 1\n")),
            "{out}"
        );
        assert!(
            out.contains(&format!("{name}_bucket{{le=\"0.005\"}} 3\n")),
            "{out}"
        );
        assert!(
            out.contains(&format!("{name}_bucket{{le=\"10.0\"}} 4\n")),
            "{out}"
        );
        assert!(
            out.contains(&format!("{name}_bucket{{le=\"+Inf\"}} 5\n")),
            "{out}"
        );
        assert!(out.contains(&format!("{name}_count 5\n")), "{out}");
    }

    #[test]
    fn dead_letters_are_counted_by_reason() {
        let m = Metrics::default();
        m.dead_letter(Reason::UnknownItem);
        m.dead_letter(Reason::UnknownItem);
        m.dead_letter(Reason::Undecodable);
        let text = m.render();
        assert!(
            text.contains("genfeed_dead_letters_total{reason=\"unknown_item\"} 2"),
            "{text}"
        );
        assert!(text.contains("genfeed_dead_letters_total{reason=\"undecodable\"} 1"));
        assert!(text.contains("genfeed_dead_letters_total{reason=\"too_large\"} 0"));
        assert_eq!(m.dead_letters(), 3);
    }

    #[test]
    fn counters_gauges_and_readiness_are_exposed() {
        let m = Metrics::default();
        m.feeds.inc_by(3);
        m.live_items.set(15);
        assert!(m.render().contains("genfeed_ready 0\n"));
        m.catalogue_loaded.store(true, Relaxed);
        m.joined.store(true, Relaxed);
        // Not before the learnt counts caught up.
        assert!(m.render().contains("genfeed_ready 0\n"));
        m.learnt_loaded.store(true, Relaxed);
        let text = m.render();
        assert!(text.contains("genfeed_feeds_total 3\n"), "{text}");
        assert!(text.contains("genfeed_live_items 15\n"), "{text}");
        assert!(text.contains("genfeed_ready 1\n"), "{text}");
        // The exposition ends each help with a full stop of its own.
        for help in text.lines().filter(|l| l.starts_with("# HELP")) {
            assert!(help.ends_with('.') && !help.ends_with(".."), "{help}");
        }
    }
}
