//! Everything the service writes to Kafka, and what happens once the broker
//! has it.
//!
//! A record is *delivered* when the broker acknowledged it. Only then are
//! the input messages that caused it finished ([`Offsets::finish`]) and
//! their offsets stored for commit. A delivery that fails (broker down
//! longer than `message.timeout.ms`) is sent again until it succeeds: the
//! input's offset must not move past output that does not exist.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::mpsc;

use super::kafka::{now_ms, Wire};
use super::metrics::{Metrics, Reason};
use super::offsets::Offsets;
use crate::contract::DeadLetter;

/// An input message waiting for its outputs: where it was read and its
/// Kafka timestamp (for end-to-end latency).
#[derive(Clone, Copy, Debug)]
pub struct Trigger {
    pub partition: i32,
    pub offset: i64,
    pub timestamp_ms: i64,
}

/// A record on its way to the broker.
pub struct Sent {
    future: DeliveryFuture,
    topic: Arc<str>,
    partition: Option<i32>,
    key: Vec<u8>,
    payload: Vec<u8>,
    /// The interaction messages this record finishes once delivered.
    pub triggers: Vec<Trigger>,
    pub kind: Kind,
}

/// What a record is, for the metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Feed,
    DeadLetter,
    Changelog,
}

/// The producer and the two output topics.
pub struct Outbox {
    producer: FutureProducer,
    wire: Arc<Wire>,
    feeds: Arc<str>,
    dead_letters: Arc<str>,
    histories: Arc<str>,
}

impl Outbox {
    pub fn new(
        producer: FutureProducer,
        wire: Arc<Wire>,
        feeds: &str,
        dead_letters: &str,
        histories: &str,
    ) -> Outbox {
        Outbox {
            producer,
            wire,
            feeds: feeds.into(),
            dead_letters: dead_letters.into(),
            histories: histories.into(),
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

    pub fn wire(&self) -> &Wire {
        &self.wire
    }

    /// Hands a record to the producer, waiting while its queue is full
    /// (backpressure from the broker). Callable from any thread.
    fn enqueue(
        &self,
        topic: &str,
        partition: Option<i32>,
        key: &[u8],
        payload: &[u8],
    ) -> DeliveryFuture {
        loop {
            let mut record = FutureRecord::to(topic).key(key).payload(payload);
            record.partition = partition;
            match self.producer.send_result(record) {
                Ok(future) => return future,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err((e, _)) => {
                    tracing::warn!(topic, error = %e, "produce failed; trying again");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    pub fn feed(&self, user: &str, payload: Vec<u8>, triggers: Vec<Trigger>) -> Sent {
        let future = self.enqueue(&self.feeds, None, user.as_bytes(), &payload);
        Sent {
            future,
            topic: self.feeds.clone(),
            partition: None,
            key: user.as_bytes().to_vec(),
            payload,
            triggers,
            kind: Kind::Feed,
        }
    }

    /// A user's history, to the changelog partition of the interactions
    /// partition it was read from.
    pub fn changelog(&self, user: &str, record: Vec<u8>, trigger: Trigger) -> Sent {
        let partition = Some(trigger.partition);
        let future = self.enqueue(&self.histories, partition, user.as_bytes(), &record);
        Sent {
            future,
            topic: self.histories.clone(),
            partition,
            key: user.as_bytes().to_vec(),
            payload: record,
            triggers: vec![trigger],
            kind: Kind::Changelog,
        }
    }

    /// A dead letter for the message at `topic/partition/offset`: the bytes
    /// as they came, and the reason with the detail of what was wrong.
    pub fn dead_letter(
        &self,
        source: (&str, i32, i64),
        reason: Reason,
        detail: &str,
        raw: &[u8],
        triggers: Vec<Trigger>,
    ) -> Sent {
        let (topic, partition, offset) = source;
        tracing::warn!(
            topic,
            partition,
            offset,
            reason = reason.label(),
            detail,
            "dead letter"
        );
        let letter = DeadLetter {
            source_topic: topic.to_string(),
            partition,
            offset,
            reason: format!("{}: {detail}", reason.label()),
            raw: raw.to_vec(),
            failed_at: now_ms(),
        };
        let payload = self.wire.dead_letter(&letter);
        let key = format!("{topic}/{partition}/{offset}").into_bytes();
        let future = self.enqueue(&self.dead_letters, None, &key, &payload);
        Sent {
            future,
            topic: self.dead_letters.clone(),
            partition: None,
            key,
            payload,
            triggers,
            kind: Kind::DeadLetter,
        }
    }

    /// Waits until `sent` is delivered, sending it again as often as it
    /// fails.
    pub async fn delivered(&self, mut sent: Sent, metrics: &Metrics) -> Sent {
        loop {
            match (&mut sent.future).await {
                Ok(Ok(_)) => return sent,
                Ok(Err((e, _))) => {
                    tracing::warn!(topic = %sent.topic, error = %e, "delivery failed; sending again");
                }
                Err(_) => tracing::warn!(topic = %sent.topic, "delivery lost; sending again"),
            }
            metrics
                .feed_retries
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(100)).await;
            let (topic, key, payload) =
                (sent.topic.clone(), sent.key.clone(), sent.payload.clone());
            sent.future = self.enqueue(&topic, sent.partition, &key, &payload);
        }
    }
}

/// Awaits deliveries in the order they were sent, then finishes their
/// triggers and stores the offsets that became committable.
pub async fn acknowledge<C: ConsumerContext + 'static>(
    mut rx: mpsc::Receiver<Sent>,
    outbox: Arc<Outbox>,
    offsets: Arc<Offsets>,
    consumer: Arc<StreamConsumer<C>>,
    topic: String,
    metrics: Arc<Metrics>,
) {
    use std::sync::atomic::Ordering::Relaxed;
    while let Some(sent) = rx.recv().await {
        let sent = outbox.delivered(sent, &metrics).await;
        let now = now_ms();
        let is_feed = sent.kind == Kind::Feed;
        if is_feed {
            metrics.feeds.fetch_add(1, Relaxed);
        }
        let mut tpl = TopicPartitionList::new();
        for t in &sent.triggers {
            if is_feed {
                metrics
                    .feed_latency
                    .observe((now - t.timestamp_ms) as f64 / 1000.0);
            }
            if let Some(w) = offsets.finish(t.partition, t.offset) {
                let _ = tpl.add_partition_offset(&topic, t.partition, Offset::Offset(w));
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
