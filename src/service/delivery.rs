//! Everything the service writes to Kafka, and what happens once the broker
//! has it.
//!
//! A record is *delivered* when the broker acknowledged it. Only then are
//! the input messages that caused it finished ([`Offsets::finish`]) and
//! their offsets stored for commit. What happens when it is not depends on
//! why:
//!
//! - **Transient** (the producer's queue is full, the broker is away, a
//!   delivery timed out): the record is sent again after a pause, awaited
//!   on the runtime, never slept on a thread. The input's offset waits.
//! - **Permanent** (too large, invalid, a topic that does not exist or
//!   refuses us): sending again would fail forever and hold every later
//!   offset of the partition back. A feed or changelog record becomes a
//!   dead letter of the message that caused it; a dead letter that is too
//!   large is cut until it fits. Its offset then moves on.
//!
//! Nothing is lost on the way: a message's offset is stored only once its
//! outputs, or its dead letter, are acknowledged.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::mpsc;

use super::changelog::OTHERS;
use super::histories::Position;
use super::kafka::{now_ms, Logged, Wire, MARKER_KEY};
use super::metrics::Metrics;
use super::offsets::Offsets;
use super::reason::Reason;
use crate::contract::DeadLetter;

/// Room kept in every message for Kafka's record and batch headers.
const RECORD_OVERHEAD: usize = 512;

/// The longest detail a dead letter's reason carries.
const DETAIL_BYTES: usize = 2048;

/// An input message waiting for its outputs: where it was read and its
/// Kafka timestamp (for end-to-end latency).
#[derive(Clone, Copy, Debug)]
pub struct Trigger {
    pub partition: i32,
    pub offset: i64,
    pub timestamp_ms: i64,
}

impl Trigger {
    pub fn position(&self) -> Position {
        Position {
            partition: self.partition,
            offset: self.offset,
        }
    }
}

/// A record on its way to the broker.
pub struct Sent {
    /// `None` until the producer has taken the record (its queue may have
    /// been full).
    future: Option<DeliveryFuture>,
    topic: Arc<str>,
    partition: Option<i32>,
    key: Vec<u8>,
    payload: Vec<u8>,
    /// The interaction messages this record finishes once delivered.
    pub triggers: Vec<Trigger>,
    pub kind: Kind,
}

/// What a record is: for the metrics, and for what to do when the broker
/// refuses it.
pub enum Kind {
    Feed,
    /// With the history's [`OTHERS`] header, if it has one.
    Changelog {
        others: Option<OwnedHeaders>,
    },
    /// The letter, to cut it shorter when it does not fit.
    DeadLetter(Box<Letter>),
}

/// A dead letter with what it was made from.
pub struct Letter {
    letter: DeadLetter,
    /// The reason before any note of a cut.
    reason: String,
    /// The input message whole.
    raw: Vec<u8>,
}

impl Letter {
    /// Holds at most `room` bytes of the input, the reason saying how much
    /// of how much when that is not all.
    fn cut(&mut self, room: usize) {
        let keep = self.raw.len().min(room);
        self.letter.raw = self.raw[..keep].to_vec();
        self.letter.reason = if keep < self.raw.len() {
            format!(
                "{}; raw cut to {keep} of {} bytes",
                self.reason,
                self.raw.len()
            )
        } else {
            self.reason.clone()
        };
    }
}

/// The producer and the output topics.
pub struct Outbox {
    producer: FutureProducer<Logged>,
    wire: Arc<Wire>,
    feeds: Arc<str>,
    dead_letters: Arc<str>,
    histories: Arc<str>,
    interactions: Arc<str>,
    /// Key and payload of one record at most, headers' room taken off.
    max_record: usize,
    /// The newest acknowledged changelog offset per partition.
    changelog_acked: std::sync::Mutex<std::collections::HashMap<i32, i64>>,
}

/// The output topics an [`Outbox`] writes, and the input its feeds answer.
pub struct Topics<'a> {
    pub feeds: &'a str,
    pub dead_letters: &'a str,
    pub histories: &'a str,
    pub interactions: &'a str,
}

impl Outbox {
    /// `message_max_bytes` is the producer's `message.max.bytes`.
    pub fn new(
        producer: FutureProducer<Logged>,
        wire: Arc<Wire>,
        topics: Topics<'_>,
        message_max_bytes: usize,
    ) -> Outbox {
        Outbox {
            producer,
            wire,
            feeds: topics.feeds.into(),
            dead_letters: topics.dead_letters.into(),
            histories: topics.histories.into(),
            interactions: topics.interactions.into(),
            max_record: message_max_bytes.saturating_sub(RECORD_OVERHEAD),
            changelog_acked: Default::default(),
        }
    }

    /// Waits until everything handed to the producer is delivered (or
    /// `timeout` passes): what an instance owes the next owner of a
    /// partition before it lets go.
    pub fn flush(&self, timeout: Duration) {
        if let Err(e) = rdkafka::producer::Producer::flush(&self.producer, timeout) {
            tracing::warn!(error = %e, "flushing the producer");
        }
    }

    /// Writes an end marker carrying `token` to `topic`'s `partition` and
    /// waits for its acknowledgement (see [`MARKER_KEY`]); returns the
    /// offset it landed at, the partition's end.
    pub async fn mark(&self, topic: &str, partition: i32, token: &str) -> Result<i64, KafkaError> {
        let record = FutureRecord::<[u8], str>::to(topic)
            .partition(partition)
            .key(MARKER_KEY)
            .payload(token);
        self.producer
            .send(record, Duration::from_secs(10))
            .await
            .map(|d| d.offset)
            .map_err(|(e, _)| e)
    }

    /// The newest changelog offset of `partition` acknowledged since the
    /// last call; forgets it.
    pub fn changelog_acknowledged(&self, partition: i32) -> Option<i64> {
        self.changelog_acked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&partition)
    }

    /// The newest acknowledged changelog offset of every partition that has
    /// one since the last call; forgets them.
    pub fn changelog_acknowledged_all(&self) -> Vec<(i32, i64)> {
        self.changelog_acked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .collect()
    }

    pub fn wire(&self) -> &Wire {
        &self.wire
    }

    /// Hands a record to the producer without waiting: a full queue or a
    /// refusal comes back as the error, for [`Outbox::delivered`] to deal
    /// with. A record over `message.max.bytes` is refused here, as the
    /// producer would.
    fn hand(&self, sent: &mut Sent) -> Result<(), KafkaError> {
        let headers = match &sent.kind {
            Kind::Changelog { others: Some(h) } => Some(h),
            _ => None,
        };
        let header_bytes = headers.map_or(0, |h| {
            h.iter()
                .map(|h| h.key.len() + h.value.map_or(0, <[u8]>::len))
                .sum()
        });
        if sent.key.len() + sent.payload.len() + header_bytes > self.max_record {
            return Err(KafkaError::MessageProduction(
                RDKafkaErrorCode::MessageSizeTooLarge,
            ));
        }
        let mut record = FutureRecord::to(&sent.topic)
            .key(&sent.key)
            .payload(&sent.payload);
        if let Some(h) = headers {
            record = record.headers(h.clone());
        }
        record.partition = sent.partition;
        match self.producer.send_result(record) {
            Ok(future) => {
                sent.future = Some(future);
                Ok(())
            }
            Err((e, _)) => Err(e),
        }
    }

    fn send(&self, mut sent: Sent) -> Sent {
        // An error here is met again, and dealt with, in `delivered`.
        let _ = self.hand(&mut sent);
        sent
    }

    pub fn feed(&self, user: &str, payload: Vec<u8>, triggers: Vec<Trigger>) -> Sent {
        self.send(Sent {
            future: None,
            topic: self.feeds.clone(),
            partition: None,
            key: user.as_bytes().to_vec(),
            payload,
            triggers,
            kind: Kind::Feed,
        })
    }

    /// A user's history, to the changelog partition of the interactions
    /// partition it was read from, with its positions on `others`.
    pub fn changelog(
        &self,
        user: &str,
        record: Vec<u8>,
        others: &[Position],
        trigger: Trigger,
    ) -> Sent {
        self.send(Sent {
            future: None,
            topic: self.histories.clone(),
            partition: Some(trigger.partition),
            key: user.as_bytes().to_vec(),
            payload: record,
            triggers: vec![trigger],
            kind: Kind::Changelog {
                others: (!others.is_empty()).then(|| {
                    OwnedHeaders::new().insert(Header {
                        key: OTHERS,
                        value: Some(&Position::encode_all(others)),
                    })
                }),
            },
        })
    }

    /// A dead letter for the message at `topic/partition/offset`: the bytes
    /// as they came (cut to fit `message.max.bytes`, the reason saying so),
    /// and the reason with the detail of what was wrong.
    pub fn dead_letter(
        &self,
        source: (&str, i32, i64),
        reason: Reason,
        detail: &str,
        raw: &[u8],
        triggers: Vec<Trigger>,
    ) -> Sent {
        let (topic, partition, offset) = source;
        let detail = cut_text(detail, DETAIL_BYTES);
        tracing::warn!(
            topic,
            partition,
            offset,
            reason = reason.label(),
            detail,
            "dead letter"
        );
        let reason = format!("{}: {detail}", reason.label());
        let mut letter = Letter {
            letter: DeadLetter {
                source_topic: topic.to_string(),
                partition,
                offset,
                reason: reason.clone(),
                raw: Vec::new(),
                failed_at: now_ms(),
            },
            reason,
            raw: raw.to_vec(),
        };
        let key = format!("{topic}/{partition}/{offset}").into_bytes();
        // What the letter takes without its copy of the input, with room
        // for the note of a cut.
        let frame = key.len() + self.wire.dead_letter(&letter.letter).len() + 64;
        letter.cut(self.max_record.saturating_sub(frame));
        self.send(Sent {
            future: None,
            topic: self.dead_letters.clone(),
            partition: None,
            key,
            payload: self.wire.dead_letter(&letter.letter),
            triggers,
            kind: Kind::DeadLetter(Box::new(letter)),
        })
    }

    /// Waits until `sent`, or what stands for it, is delivered: a record
    /// the broker refuses for good is replaced by its dead letter, a dead
    /// letter that does not fit by a shorter one; transient failures are
    /// sent again after a pause. `None`: a refreshed feed was refused for
    /// good and dropped (it answers no input).
    pub async fn delivered(&self, mut sent: Sent, metrics: &Metrics) -> Option<Sent> {
        loop {
            let error = match sent.future.take() {
                None => match self.hand(&mut sent) {
                    Ok(()) => continue,
                    Err(e) => e,
                },
                Some(future) => match future.await {
                    Ok(Ok(done)) => {
                        if let Kind::Changelog { .. } = sent.kind {
                            let mut acked = self
                                .changelog_acked
                                .lock()
                                .unwrap_or_else(|e| e.into_inner());
                            let newest = acked.entry(done.partition).or_insert(done.offset);
                            *newest = (*newest).max(done.offset);
                        }
                        return Some(sent);
                    }
                    Ok(Err((e, _))) => e,
                    Err(_) => KafkaError::Canceled,
                },
            };
            let code = error.rdkafka_error_code();
            if code.is_some_and(permanent) {
                match self.refused(sent, &error, metrics) {
                    Ok(Some(next)) => {
                        sent = next;
                        continue;
                    }
                    Ok(None) => return None,
                    Err(back) => sent = back,
                }
            }
            let pause = match code {
                Some(RDKafkaErrorCode::QueueFull) => Duration::from_millis(5),
                _ => {
                    tracing::warn!(topic = %sent.topic, error = %error, "delivery failed; sending again");
                    metrics.feed_retries.inc();
                    if code.is_some_and(permanent) {
                        Duration::from_secs(1)
                    } else {
                        Duration::from_millis(100)
                    }
                }
            };
            tokio::time::sleep(pause).await;
        }
    }

    /// What stands for a record the broker refused for good: its dead
    /// letter, or a dead letter cut shorter; nothing for a refreshed feed,
    /// which answers no input. `Err` gives back a dead letter that cannot
    /// be cut further (its topic refuses writes): it is tried again until an
    /// operator fixes the topic, as losing it would lose the input message.
    fn refused(
        &self,
        sent: Sent,
        error: &KafkaError,
        metrics: &Metrics,
    ) -> Result<Option<Sent>, Sent> {
        let too_large = error.rdkafka_error_code().is_some_and(size_error);
        match sent.kind {
            Kind::Feed | Kind::Changelog { .. } => {
                let what = match sent.kind {
                    Kind::Feed => "feed",
                    _ => "history changelog record",
                };
                let user = String::from_utf8_lossy(&sent.key);
                let Some(&last) = sent.triggers.last() else {
                    tracing::warn!(topic = %sent.topic, user = cut_text(&user, 64), error = %error, "the broker refused a refreshed feed; dropped");
                    metrics.refresh_refused.inc();
                    return Ok(None);
                };
                let detail = format!(
                    "topic {:?} refused the {what} of user {:?} ({} bytes): {error}",
                    sent.topic,
                    cut_text(&user, 64),
                    sent.key.len() + sent.payload.len(),
                );
                metrics.dead_letter(Reason::OutputRefused);
                let source = (&*self.interactions, last.partition, last.offset);
                Ok(Some(self.dead_letter(
                    source,
                    Reason::OutputRefused,
                    &detail,
                    &sent.payload,
                    sent.triggers,
                )))
            }
            Kind::DeadLetter(mut letter) if too_large && !letter.letter.raw.is_empty() => {
                letter.cut(letter.letter.raw.len() / 4);
                Ok(Some(Sent {
                    future: None,
                    payload: self.wire.dead_letter(&letter.letter),
                    kind: Kind::DeadLetter(letter),
                    ..sent
                }))
            }
            Kind::DeadLetter(_) => {
                tracing::error!(topic = %sent.topic, error = %error, "the dead-letter topic refuses a dead letter; its input waits until it is written");
                Err(sent)
            }
        }
    }
}

/// `text` cut to at most `max` bytes on a character boundary.
fn cut_text(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Errors that sending the same record again cannot fix.
fn permanent(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode::*;
    size_error(code)
        || matches!(
            code,
            InvalidMessage
                | InvalidRecord
                | UnknownTopic
                | UnknownTopicOrPartition
                | UnknownPartition
                | InvalidTopic
                | TopicAuthorizationFailed
                | ClusterAuthorizationFailed
                | InvalidRequiredAcks
        )
}

fn size_error(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode::*;
    matches!(
        code,
        MessageSizeTooLarge | InvalidMessageSize | MessageBatchTooLarge
    )
}

/// Awaits deliveries in the order they were sent, then finishes their
/// triggers and stores the offsets that became committable.
pub async fn acknowledge<C: ConsumerContext + 'static>(
    mut rx: mpsc::Receiver<Sent>,
    outbox: Arc<Outbox>,
    offsets: Arc<Offsets>,
    consumer: Arc<BaseConsumer<C>>,
    topic: String,
    metrics: Arc<Metrics>,
) {
    while let Some(sent) = rx.recv().await {
        let Some(sent) = outbox.delivered(sent, &metrics).await else {
            continue;
        };
        let now = now_ms();
        let is_feed = matches!(sent.kind, Kind::Feed);
        if is_feed {
            metrics.feeds.inc();
        }
        let mut tpl = TopicPartitionList::new();
        for t in &sent.triggers {
            if is_feed {
                metrics
                    .feed_latency
                    .observe((now - t.timestamp_ms) as f64 / 1000.0);
            }
            if let Some(w) = offsets.finish(t.partition, t.offset) {
                store_at(&mut tpl, &topic, t.partition, w);
            }
        }
        if tpl.count() > 0 {
            if let Err(e) = consumer.store_offsets(&tpl) {
                // The partition was revoked meanwhile: its new owner
                // re-reads from the last commit.
                tracing::debug!(error = %e, "storing offsets");
            }
        }
    }
}

/// Sets `partition`'s offset to store in `tpl`, once per partition: a
/// second `add_partition_offset` of a partition appends an element with no
/// offset and sets the first one's, and librdkafka then stores the empty
/// one last, so nothing was committed whenever one feed answered two
/// interactions of a partition (a user's coalesced events).
fn store_at(tpl: &mut TopicPartitionList, topic: &str, partition: i32, offset: i64) {
    let _ = match tpl.find_partition(topic, partition) {
        Some(_) => tpl.set_partition_offset(topic, partition, Offset::Offset(offset)),
        None => tpl.add_partition_offset(topic, partition, Offset::Offset(offset)),
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::{decode, ReadFormat};
    use crate::service::config::{KafkaConfig, LimitsConfig};

    /// An outbox whose producer never reaches a broker: these tests look
    /// at what it would send, not at a delivery.
    fn outbox(message_max_bytes: usize) -> Outbox {
        let kafka = KafkaConfig {
            brokers: "127.0.0.1:1".into(),
            ..KafkaConfig::default()
        };
        let producer = super::super::kafka::producer_config(&kafka)
            .create_with_context(Logged::new("producer"))
            .unwrap();
        let wire = Wire::new(&kafka, LimitsConfig::default().record()).unwrap();
        let topics = Topics {
            feeds: "feeds",
            dead_letters: "dlq",
            histories: "histories",
            interactions: "interactions",
        };
        Outbox::new(producer, Arc::new(wire), topics, message_max_bytes)
    }

    fn trigger(offset: i64) -> Trigger {
        Trigger {
            partition: 3,
            offset,
            timestamp_ms: 0,
        }
    }

    fn letter_of(sent: &Sent) -> DeadLetter {
        assert!(matches!(sent.kind, Kind::DeadLetter(_)));
        decode(&sent.payload, ReadFormat::Plain).unwrap()
    }

    /// One feed answering several interactions of a partition stores that
    /// partition once, at its newest offset, and no element without one.
    #[test]
    fn offsets_to_store_name_each_partition_once_at_its_newest() {
        let mut tpl = TopicPartitionList::new();
        for (partition, offset) in [(3, 5), (1, 2), (3, 7)] {
            store_at(&mut tpl, "interactions", partition, offset);
        }
        let stored: Vec<(i32, Offset)> = tpl
            .elements()
            .iter()
            .map(|e| (e.partition(), e.offset()))
            .collect();
        assert_eq!(stored, [(3, Offset::Offset(7)), (1, Offset::Offset(2))]);
    }

    #[test]
    fn a_refused_feed_becomes_the_dead_letter_of_its_last_input_and_keeps_its_triggers() {
        let out = outbox(1_000_000);
        let metrics = Metrics::default();
        let feed = out.feed("user-7", vec![1; 100], vec![trigger(10), trigger(12)]);
        let error = KafkaError::MessageProduction(RDKafkaErrorCode::TopicAuthorizationFailed);
        let letter = out.refused(feed, &error, &metrics).ok().flatten().unwrap();
        let l = letter_of(&letter);
        assert_eq!(
            (l.source_topic.as_str(), l.partition, l.offset),
            ("interactions", 3, 12)
        );
        assert!(l.reason.starts_with("output_refused"), "{}", l.reason);
        assert!(
            l.reason.contains("\"feeds\"") && l.reason.contains("user-7"),
            "{}",
            l.reason
        );
        assert_eq!(l.raw, vec![1; 100]);
        let offsets: Vec<i64> = letter.triggers.iter().map(|t| t.offset).collect();
        assert_eq!(offsets, [10, 12]);
        assert_eq!(metrics.dead_letters(), 1);
    }

    #[test]
    fn a_refused_refreshed_feed_is_dropped_not_dead_lettered() {
        let out = outbox(1_000_000);
        let metrics = Metrics::default();
        let feed = out.feed("user-7", vec![1; 100], Vec::new());
        let error = KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge);
        assert!(matches!(out.refused(feed, &error, &metrics), Ok(None)));
        assert_eq!(metrics.dead_letters(), 0);
        assert_eq!(metrics.refresh_refused.get(), 1);
    }

    #[test]
    fn a_dead_letter_is_cut_to_fit_and_cut_again_when_the_broker_still_refuses_it() {
        let max = 8_192;
        let out = outbox(max);
        let raw: Vec<u8> = (0..50_000u32).map(|i| i as u8).collect();
        let sent = out.dead_letter(("in", 0, 5), Reason::Undecodable, "bad", &raw, Vec::new());
        assert!(sent.key.len() + sent.payload.len() <= max - RECORD_OVERHEAD);
        let first = letter_of(&sent);
        assert!(first.raw.len() > max / 2, "{} bytes kept", first.raw.len());
        assert_eq!(first.raw[..], raw[..first.raw.len()]);
        assert!(
            first.reason.starts_with("undecodable: bad; raw cut to "),
            "{}",
            first.reason
        );
        assert!(
            first.reason.ends_with(" of 50000 bytes"),
            "{}",
            first.reason
        );

        let too_large = KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge);
        let metrics = Metrics::default();
        let second = letter_of(
            &out.refused(sent, &too_large, &metrics)
                .ok()
                .flatten()
                .unwrap(),
        );
        assert_eq!(second.raw.len(), first.raw.len() / 4);
        assert_eq!(
            second.reason,
            format!(
                "undecodable: bad; raw cut to {} of 50000 bytes",
                second.raw.len()
            )
        );
        // A letter the topic refuses for another reason is not cut: it
        // waits for the topic.
        let sent = out.dead_letter(("in", 0, 6), Reason::Undecodable, "bad", b"x", Vec::new());
        let denied = KafkaError::MessageProduction(RDKafkaErrorCode::TopicAuthorizationFailed);
        assert!(out.refused(sent, &denied, &metrics).is_err());
    }

    #[test]
    fn full_queues_and_timeouts_are_transient_size_and_authorization_are_not() {
        use RDKafkaErrorCode::*;
        for code in [
            QueueFull,
            MessageTimedOut,
            BrokerTransportFailure,
            AllBrokersDown,
        ] {
            assert!(!permanent(code), "{code:?}");
        }
        for code in [
            MessageSizeTooLarge,
            UnknownTopicOrPartition,
            TopicAuthorizationFailed,
        ] {
            assert!(permanent(code), "{code:?}");
        }
    }
}
