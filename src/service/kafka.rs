//! Kafka clients and the wire format, built from the config.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;

use super::config::{KafkaConfig, WireKind};
use crate::contract::{
    decode, encode, CatalogueEvent, DeadLetter, DecodeError, Interaction, Limits, ReadFormat,
    Recommendation, Record, SchemaIds, WireFormat,
};

/// The key of end markers: records an instance writes to a partition and
/// reads back to know it has read everything written before (a high
/// watermark would do where the broker reports it right; tansu's lags behind
/// batched writes). No item or user id starts with a NUL byte, and readers of
/// the catalogue and histories topics skip these records.
pub const MARKER_KEY: &[u8] = b"\0genfeed-end-marker";

/// How records are framed on this deployment's topics.
pub struct Wire {
    kind: WireKind,
    ids: SchemaIds,
    recommendation_id: u32,
    dead_letter_id: u32,
    limits: Limits,
}

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("kafka.wire.writers.{id}: reading {path}: {source}")]
    Read {
        id: String,
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("kafka.wire.writers.{id}: {detail}")]
    Schema { id: String, detail: String },
}

impl Wire {
    pub fn new(cfg: &KafkaConfig, limits: Limits) -> Result<Wire, WireError> {
        let w = &cfg.wire;
        let mut ids = SchemaIds::new();
        let current = |id: u32, r: Result<(), crate::contract::SchemaIdError>| {
            r.map_err(|e| WireError::Schema {
                id: id.to_string(),
                detail: e.to_string(),
            })
        };
        if w.format == WireKind::Confluent {
            current(
                w.catalogue_id,
                ids.insert::<CatalogueEvent>(w.catalogue_id, CatalogueEvent::schema().clone()),
            )?;
            current(
                w.interaction_id,
                ids.insert::<Interaction>(w.interaction_id, Interaction::schema().clone()),
            )?;
            for (id, path) in &w.writers {
                let text = std::fs::read_to_string(path).map_err(|source| WireError::Read {
                    id: id.clone(),
                    path: path.clone(),
                    source,
                })?;
                let bad = |detail: String| WireError::Schema {
                    id: id.clone(),
                    detail,
                };
                let schema =
                    apache_avro::Schema::parse_str(&text).map_err(|e| bad(e.to_string()))?;
                let n: u32 = id.parse().map_err(|_| bad("not a schema id".into()))?;
                let name = schema.name().map(|n| n.fullname(None)).unwrap_or_default();
                let r = if name == CatalogueEvent::NAME {
                    ids.insert::<CatalogueEvent>(n, schema)
                } else if name == Interaction::NAME {
                    ids.insert::<Interaction>(n, schema)
                } else {
                    return Err(bad(format!(
                        "{name:?} is not a record genfeed reads ({} or {})",
                        CatalogueEvent::NAME,
                        Interaction::NAME
                    )));
                };
                r.map_err(|e| bad(e.to_string()))?;
            }
        }
        Ok(Wire {
            kind: w.format,
            ids,
            recommendation_id: w.recommendation_id,
            dead_letter_id: w.dead_letter_id,
            limits,
        })
    }

    /// Decodes a record and checks it against the configured limits.
    pub fn decode<T: Record>(&self, bytes: &[u8]) -> Result<T, DecodeError> {
        let record: T = match self.kind {
            WireKind::Plain => decode(bytes, ReadFormat::Plain),
            WireKind::Confluent => decode(bytes, ReadFormat::Confluent(&self.ids)),
        }?;
        record
            .within(&self.limits)
            .map_err(|v| DecodeError::OverLimit {
                record: T::NAME,
                field: v.field,
                detail: v.detail,
            })?;
        Ok(record)
    }

    /// Decodes a catalogue record: a null value (a tombstone) is the
    /// retirement of the item its key names (see
    /// [`CatalogueEvent::tombstone`]).
    pub fn catalogue(
        &self,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
    ) -> Result<CatalogueEvent, DecodeError> {
        match value {
            Some(bytes) => self.decode(bytes),
            None => CatalogueEvent::tombstone(key, &self.limits),
        }
    }

    fn format(&self, id: u32) -> WireFormat {
        match self.kind {
            WireKind::Plain => WireFormat::Plain,
            WireKind::Confluent => WireFormat::Confluent { schema_id: id },
        }
    }

    /// Our own records always encode: they are built valid.
    pub fn recommendation(&self, r: &Recommendation) -> Vec<u8> {
        encode(r, self.format(self.recommendation_id)).expect("a valid recommendation")
    }

    pub fn dead_letter(&self, d: &DeadLetter) -> Vec<u8> {
        encode(d, self.format(self.dead_letter_id)).expect("a valid dead letter")
    }
}

/// The settings every client shares, then the user's pass-through ones.
pub fn client(cfg: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.brokers)
        // librdkafka's 5 min is how long a client may go on fetching a topic
        // deleted under it (tansu's answers do not tell it) and how late it
        // sees partitions added; a metadata request per 10 s per client is
        // nothing to a broker.
        .set("topic.metadata.refresh.interval.ms", "10000");
    for (k, v) in &cfg.properties {
        c.set(k, v);
    }
    c
}

/// How long a fetch may wait for new data, chosen per reader by what the
/// wait costs it. Kafka answers as soon as data arrives; tansu answers at
/// once only when data is already there and otherwise holds the fetch for
/// the full wait, so for a reader that keeps up the wait is its latency
/// floor, and a short wait costs the broker a fetch per wait. Catching up
/// is not slowed (100,000 records read in 0.13–0.16 s at any of these).
/// Measured on the demo at 300/s: the learnt counts' reader at 100 ms took
/// 0.04 of a core of tansu's CPU, at 1 s none measurable; idle, the
/// service's readers at 10 ms cost tansu 0.14 of a core.
#[derive(Clone, Copy, Debug)]
pub enum FetchWait {
    /// 10 ms: a reader on the interaction→feed path, where every
    /// millisecond is a user's.
    Latency,
    /// 100 ms: a reader whose records may trail by a fraction of a second
    /// (catalogue changes take longer than that to become decodable).
    Background,
    /// 1 s: a reader whose records may trail by a second (counts learnt
    /// from the stream, which move slowly).
    Trailing,
}

/// A consumer that stores offsets only when told to (after delivery) and
/// commits what was stored in the background.
pub fn consumer_config(cfg: &KafkaConfig, group: &str, wait: FetchWait) -> ClientConfig {
    let mut c = client(cfg);
    c.set("group.id", group)
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", cfg.session_timeout_ms.to_string())
        .set(
            "heartbeat.interval.ms",
            (cfg.session_timeout_ms / 3).max(100).to_string(),
        )
        .set("enable.partition.eof", "false")
        // librdkafka's default of 500 ms would be half a second per hop.
        .set(
            "fetch.wait.max.ms",
            match wait {
                FetchWait::Latency => "10",
                FetchWait::Background => "100",
                FetchWait::Trailing => "1000",
            },
        );
    for (k, v) in &cfg.properties {
        c.set(k, v);
    }
    c
}

pub fn producer_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut c = client(cfg);
    c.set("message.timeout.ms", cfg.message_timeout_ms.to_string())
        .set("message.max.bytes", cfg.message_max_bytes.to_string())
        .set("linger.ms", "2")
        .set("acks", "all");
    for (k, v) in &cfg.properties {
        c.set(k, v);
    }
    c
}

/// A marker producer: it writes a record per restore or catch-up, and is
/// polled on its own thread (one nobody polls queues every error it meets
/// while the broker is away, until a poll or its close hands them all out).
/// Each record carries the [`Landed`] its delivery is noted in.
pub type MarkerProducer = rdkafka::producer::ThreadedProducer<Quiet>;

/// Where a round of end markers landed, by partition.
///
/// A marker lands at its partition's end, so it also tells whether an
/// offset a reader holds is still one of that log's: one past the end
/// means the partition's log began again (the topic was deleted and made
/// again, or the broker lost it), and no offset read from the old log
/// means anything in the new one. Kafka answers a fetch past the end with
/// an error that makes the client start over, but not every
/// Kafka-protocol broker does: tansu answers with nothing, and the reader
/// would wait, silent, until the new log grew past its old offset.
#[derive(Debug, Default)]
pub struct Landed(Mutex<HashMap<i32, i64>>);

impl Landed {
    fn note(&self, partition: i32, offset: i64) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(partition, offset);
    }

    /// Whether `partition`'s marker landed below `from`, an offset the
    /// reader was to read on from (see the type's docs). `None` while no
    /// delivery was noted.
    pub fn restarted(&self, partition: i32, from: i64) -> Option<bool> {
        let landed = self.0.lock().unwrap_or_else(|e| e.into_inner());
        landed.get(&partition).map(|&end| restarted(end, from))
    }
}

/// Whether a marker that landed at `end` says that the log an offset `from`
/// was read up to is gone (see [`Landed`]): a live log's end is at or past
/// every offset read from it.
pub fn restarted(end: i64, from: i64) -> bool {
    end < from
}

/// Queues an end marker with `token` for each of `partitions` of `topic`;
/// once the producer is flushed, the returned [`Landed`] holds where each
/// landed. The partitions whose marker could not be queued come back with
/// their error; what that costs is the caller's to say.
pub fn mark_ends(
    producer: &MarkerProducer,
    topic: &str,
    partitions: &[i32],
    token: &str,
) -> (Arc<Landed>, Vec<(i32, rdkafka::error::KafkaError)>) {
    let landed = Arc::new(Landed::default());
    let mut failed = Vec::new();
    for &p in partitions {
        let record = rdkafka::producer::BaseRecord::with_opaque_to(topic, landed.clone())
            .partition(p)
            .key(MARKER_KEY)
            .payload(token);
        if let Err((e, _)) = producer.send::<[u8], str>(record) {
            failed.push((p, e));
        }
    }
    (landed, failed)
}

/// Creates a [`MarkerProducer`].
pub fn marker_producer(cfg: &KafkaConfig) -> rdkafka::error::KafkaResult<MarkerProducer> {
    producer_config(cfg).create_with_context(Quiet)
}

/// The context of a client whose own errors are not worth a line each: the
/// main clients report the same broker trouble, and the calls it serves
/// return their own errors. They are logged at debug level.
pub struct Quiet;

impl rdkafka::ClientContext for Quiet {
    fn log(&self, _: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        tracing::debug!(fac, message, "librdkafka (marker)");
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        tracing::debug!(%error, reason, "librdkafka (marker)");
    }
}

impl rdkafka::producer::ProducerContext for Quiet {
    type DeliveryOpaque = Arc<Landed>;

    fn delivery(&self, result: &rdkafka::message::DeliveryResult<'_>, landed: Arc<Landed>) {
        use rdkafka::Message as _;
        if let Ok(m) = result {
            landed.note(m.partition(), m.offset());
        }
    }
}

/// Whether an error a consumer hands out ends the service. librdkafka
/// reports most of them (a broker restarting, a connection lost, a fetch
/// timing out) as information and recovers by itself, so ending on them
/// would turn a broker's restart into an outage; failed authentication or
/// authorization and fatal errors do not heal.
pub fn ends_consumption(e: &rdkafka::error::KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode::*;
    matches!(
        e.rdkafka_error_code(),
        Some(
            Fatal
                | Authentication
                | SaslAuthenticationFailed
                | TopicAuthorizationFailed
                | GroupAuthorizationFailed
                | ClusterAuthorizationFailed
        )
    )
}

/// At most one log line per 10 s for one kind of trouble,
/// with how many were held back: a broker that is away makes every client
/// report every reconnect of every connection, a line or more a second.
#[derive(Default)]
pub struct Throttle {
    last: Option<Instant>,
    held_back: u64,
}

impl Throttle {
    const QUIET: Duration = Duration::from_secs(10);

    /// Whether a line may be written at `now`: `Some(lines held back since
    /// the last one)`, or `None` while quiet.
    pub fn pass(&mut self, now: Instant) -> Option<u64> {
        if self
            .last
            .is_some_and(|t| now.saturating_duration_since(t) < Self::QUIET)
        {
            self.held_back += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.held_back))
    }
}

/// The errors one reader recovers from ([`ends_consumption`] is false):
/// each counted, logged through a [`Throttle`].
pub struct Recovered {
    reading: &'static str,
    counter: prometheus_client::metrics::counter::Counter,
    throttle: Throttle,
}

impl Recovered {
    /// `reading` names what the reader reads, for the log.
    pub fn new(
        reading: &'static str,
        counter: prometheus_client::metrics::counter::Counter,
    ) -> Recovered {
        Recovered {
            reading,
            counter,
            throttle: Throttle::default(),
        }
    }

    pub fn note(&mut self, e: &rdkafka::error::KafkaError) {
        self.counter.inc();
        if let Some(held_back) = self.throttle.pass(Instant::now()) {
            tracing::warn!(
                reading = self.reading,
                error = %e,
                held_back,
                "a consumer error the client recovers from"
            );
        }
    }
}

/// The context of the service's clients: librdkafka's own log lines and
/// errors, named by the client they came from, each kind (a log line's
/// facility, an error's code) through one [`Throttle`] that all of the
/// service's clients share, since a broker that is away is reported by
/// every one of them. Without it, 90 s with the broker away wrote about
/// 200 lines, 80 of them the same "all broker connections are down".
#[derive(Clone)]
pub struct Logged {
    client: &'static str,
    kinds: Arc<Mutex<HashMap<String, Throttle>>>,
}

impl Logged {
    /// The first client's context; `client` names it in its lines.
    pub fn new(client: &'static str) -> Logged {
        Logged {
            client,
            kinds: Arc::default(),
        }
    }

    /// Another client's context, throttled together with this one's.
    pub fn client(&self, client: &'static str) -> Logged {
        Logged {
            client,
            kinds: self.kinds.clone(),
        }
    }

    /// Lines of `kind` held back since the last one, or `None` to hold
    /// this one back too.
    fn pass(&self, kind: &str) -> Option<u64> {
        let mut kinds = self.kinds.lock().unwrap_or_else(|e| e.into_inner());
        if !kinds.contains_key(kind) {
            kinds.insert(kind.to_string(), Throttle::default());
        }
        kinds.get_mut(kind)?.pass(Instant::now())
    }
}

impl rdkafka::ClientContext for Logged {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        use rdkafka::config::RDKafkaLogLevel::*;
        let Some(held_back) = self.pass(fac) else {
            return;
        };
        let client = self.client;
        match level {
            Emerg | Alert | Critical | Error => {
                tracing::error!(client, fac, held_back, "librdkafka: {message}")
            }
            Warning => tracing::warn!(client, fac, held_back, "librdkafka: {message}"),
            Notice | Info => tracing::info!(client, fac, held_back, "librdkafka: {message}"),
            Debug => tracing::debug!(client, fac, held_back, "librdkafka: {message}"),
        }
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        let kind = match error.rdkafka_error_code() {
            Some(code) => format!("{code:?}"),
            None => error.to_string(),
        };
        if let Some(held_back) = self.pass(&kind) {
            tracing::error!(client = self.client, %error, held_back, "librdkafka: {reason}");
        }
    }
}

impl rdkafka::consumer::ConsumerContext for Logged {}

/// Timeout of blocking metadata calls.
pub const METADATA_TIMEOUT: Duration = Duration::from_secs(10);

/// The partitions of `topic` (an error when it has none: it is missing),
/// for the readers that assign themselves a whole topic.
pub fn partitions<C: rdkafka::consumer::ConsumerContext>(
    consumer: &impl rdkafka::consumer::Consumer<C>,
    topic: &str,
) -> Result<Vec<i32>, rdkafka::error::KafkaError> {
    let md = consumer.fetch_metadata(Some(topic), METADATA_TIMEOUT)?;
    let ids: Vec<i32> = md
        .topics()
        .iter()
        .filter(|t| t.name() == topic)
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if ids.is_empty() {
        return Err(rdkafka::error::KafkaError::MetadataFetch(
            rdkafka::types::RDKafkaErrorCode::UnknownTopicOrPartition,
        ));
    }
    Ok(ids)
}

/// How often, after a consumer error, a reader looks for its topic to
/// check with an end marker per partition that the logs it reads are still
/// the ones its offsets are from (see [`Landed`]): a broker that lost the
/// topic (tansu keeps it in memory) or a topic made again begin the offsets
/// anew. Markers are written only once the topic is listed again with its
/// partitions: a broker that makes topics on a write would otherwise make
/// the topic itself, with its own settings.
pub const RECHECK_EVERY: Duration = Duration::from_millis(250);

/// How often a reader checks its logs (see [`RECHECK_EVERY`]) without a
/// consumer error to prompt it: a topic deleted and made again while the
/// brokers stay up gives an assigned reader none. A marker per partition
/// each time; compaction keeps one.
pub const CHECK_EVERY: Duration = Duration::from_secs(10);

/// How many partitions the brokers list for `topic`: 0 when they say it is
/// not there, `None` when they do not answer within `timeout`. Asked with
/// a consumer, whose metadata requests never make a topic (a broker that
/// makes topics on a write may also make them on a producer's request).
pub fn listed<C: rdkafka::consumer::ConsumerContext>(
    consumer: &impl rdkafka::consumer::Consumer<C>,
    topic: &str,
    timeout: Duration,
) -> Option<usize> {
    let md = consumer.fetch_metadata(Some(topic), timeout).ok()?;
    let t = md.topics().iter().find(|t| t.name() == topic)?;
    Some(t.partitions().len())
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use rdkafka::error::KafkaError::MessageConsumption;
    use rdkafka::types::RDKafkaErrorCode::*;

    use super::{ends_consumption, Logged, Throttle};

    #[test]
    fn a_throttle_lets_one_line_through_per_quiet_period_and_counts_the_rest() {
        let t0 = std::time::Instant::now();
        let mut t = Throttle::default();
        assert_eq!(t.pass(t0), Some(0));
        for k in 1..=5 {
            assert_eq!(t.pass(t0 + Throttle::QUIET * k / 10), None);
        }
        assert_eq!(t.pass(t0 + Throttle::QUIET), Some(5));
        assert_eq!(t.pass(t0 + Throttle::QUIET * 2), Some(0));
    }

    #[test]
    fn the_service_clients_share_their_throttles_per_kind_of_line() {
        let producer = Logged::new("producer");
        let consumer = producer.client("interactions");
        assert_eq!(producer.pass("AllBrokersDown"), Some(0));
        assert_eq!(consumer.pass("AllBrokersDown"), None, "the same trouble");
        assert_eq!(consumer.pass("FAIL"), Some(0), "another kind");
    }

    #[test]
    fn broker_trouble_is_recovered_from_and_denied_access_is_not() {
        for code in [BrokerTransportFailure, AllBrokersDown, OperationTimedOut] {
            assert!(!ends_consumption(&MessageConsumption(code)), "{code:?}");
        }
        for code in [TopicAuthorizationFailed, GroupAuthorizationFailed, Fatal] {
            assert!(ends_consumption(&MessageConsumption(code)), "{code:?}");
        }
    }
}
