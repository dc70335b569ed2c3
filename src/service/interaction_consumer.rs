//! The interactions topic in: histories updated, users scheduled.
//!
//! This is the poll path, so it does only cheap work per message: decode,
//! look the item up in the current view, append to the user's history (a
//! write to memory, committed in groups) and pass the user on. The model runs elsewhere.
//! Each message is *begun* in [`Offsets`] when read and *finished* when its
//! outputs are delivered (its history's changelog record and its feed, or
//! its dead letter); only finished offsets are stored for commit.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::{mpsc, watch};

use super::catalogue_consumer::decode_reason;
use super::delivery::{Outbox, Sent, Trigger};
use super::histories::{Histories, HistoryError, Position};
use super::kafka::{now_ms, MARKER_KEY};
use super::metrics::Metrics;
use super::offsets::Offsets;
use super::reason::Reason;
use super::scheduler::Event;
use super::view::SharedView;
use crate::contract::Interaction;

/// Reacts to rebalances: a revoked partition is forgotten (late finishes
/// cannot store offsets another instance now owns) after its changelog
/// records are flushed to the broker; an assigned partition's histories are
/// restored from the changelog before any of its interactions is read.
pub struct Rebalancing {
    /// Set when a stop gave up draining: a revoke then does not wait for
    /// the producer.
    pub abandon: Arc<AtomicBool>,
    pub offsets: Arc<Offsets>,
    pub metrics: Arc<Metrics>,
    pub outbox: Arc<Outbox>,
    pub restore: Restore,
}

impl ClientContext for Rebalancing {}

impl ConsumerContext for Rebalancing {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let parts: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
            tracing::info!(?parts, "partitions revoked");
            if !self.abandon.load(Relaxed) {
                self.outbox.flush(Duration::from_secs(10));
                // Every changelog record acknowledged so far is in the local
                // histories: the next restore of these partitions here
                // starts after them.
                let histories = &self.restore.histories;
                for &p in &parts {
                    if let Some(o) = self.outbox.changelog_acknowledged(p) {
                        if let Err(e) = histories.set_changelog_offset(p, o) {
                            tracing::warn!(partition = p, error = %e, "recording the changelog offset");
                        }
                    }
                }
                if let Err(e) = histories.flush() {
                    tracing::warn!(error = %e, "flushing the histories on revoke");
                }
            }
            self.offsets.revoke(parts);
            self.metrics.assigned_partitions.set(0);
        }
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let parts: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
            tracing::info!(?parts, "partitions assigned");
            // This runs on the poll path, before any message of these
            // partitions is handed out: the histories are whole when the
            // first interaction arrives.
            self.restore.partitions(&parts, &self.metrics);
            self.metrics.assigned_partitions.set(parts.len() as i64);
            self.metrics.joined.store(true, Relaxed);
        }
    }
}

/// Reads the histories changelog of assigned partitions into the local
/// histories.
///
/// The local histories are trusted up to the changelog offset they record
/// for a partition ([`Histories::changelog_offset`]): everything up to it is
/// in them, so only what follows is read. Where the partition ends is found
/// with an end marker ([`MARKER_KEY`]) this instance writes to every
/// partition and then reads back; all partitions are read together.
pub struct Restore {
    pub histories: Arc<Histories>,
    pub topic: String,
    pub reader: BaseConsumer,
    pub marker: BaseProducer,
    pub instance: String,
    pub timeout: Duration,
}

/// Where one partition's restore stands.
struct Reading {
    read: u64,
    taken: u64,
    /// The offset of this restore's marker, once read.
    end: Option<i64>,
}

impl Restore {
    fn partitions(&self, parts: &[i32], metrics: &Metrics) {
        let start = std::time::Instant::now();
        let token = format!("{}/{}", self.instance, now_ms());
        let mut tpl = TopicPartitionList::new();
        let mut state = std::collections::HashMap::new();
        for &p in parts {
            let from = match self.histories.changelog_offset(p) {
                Ok(Some(o)) => Offset::Offset(o + 1),
                Ok(None) => Offset::Beginning,
                Err(e) => {
                    tracing::warn!(partition = p, error = %e, "reading the restored offset; reading the whole changelog partition");
                    Offset::Beginning
                }
            };
            let record = BaseRecord::<[u8], str>::to(&self.topic)
                .partition(p)
                .key(MARKER_KEY)
                .payload(token.as_str());
            if let Err((e, _)) = self.marker.send(record) {
                tracing::error!(partition = p, error = %e, topic = %self.topic, "cannot mark the changelog's end; histories of this partition are not restored");
                continue;
            }
            if let Err(e) = tpl.add_partition_offset(&self.topic, p, from) {
                tracing::error!(partition = p, error = %e, "reading the changelog");
                continue;
            }
            state.insert(
                p,
                Reading {
                    read: 0,
                    taken: 0,
                    end: None,
                },
            );
        }
        if let Err(e) = self
            .marker
            .flush(self.timeout)
            .and_then(|()| self.reader.assign(&tpl))
        {
            tracing::error!(error = %e, topic = %self.topic, "cannot mark or read the changelog; histories are not restored");
            return;
        }
        while state.values().any(|r| r.end.is_none()) {
            if start.elapsed() > self.timeout {
                tracing::error!(
                    ?parts,
                    "changelog markers not seen in time; restore incomplete"
                );
                break;
            }
            let m = match self.reader.poll(Duration::from_millis(200)) {
                Some(Ok(m)) => m,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "reading the changelog");
                    continue;
                }
                None => continue,
            };
            let Some(r) = state.get_mut(&m.partition()) else {
                continue;
            };
            let key = m.key().unwrap_or(&[]);
            if key == MARKER_KEY {
                if m.payload() == Some(token.as_bytes()) {
                    r.end = Some(m.offset());
                }
                continue;
            }
            r.read += 1;
            let user = String::from_utf8_lossy(key);
            match self.histories.restore(&user, m.payload().unwrap_or(&[])) {
                Ok(true) => r.taken += 1,
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(partition = m.partition(), offset = m.offset(), error = %e, "skipping a changelog record")
                }
            }
        }
        let _ = self.reader.unassign();
        for (p, r) in &state {
            if let Some(end) = r.end {
                if let Err(e) = self.histories.set_changelog_offset(*p, end) {
                    tracing::warn!(partition = p, error = %e, "recording the restored offset");
                }
            }
            metrics.changelog_restored.inc_by(r.read);
            tracing::info!(
                partition = p,
                read = r.read,
                taken = r.taken,
                complete = r.end.is_some(),
                "histories restored"
            );
        }
        if let Err(e) = self.histories.flush() {
            tracing::warn!(error = %e, "flushing the restored histories");
        }
        tracing::info!(
            ?parts,
            ms = start.elapsed().as_millis() as u64,
            "restore done"
        );
    }
}

/// Polls the consumer, off the runtime, until `out` closes: messages go to
/// `out` as they come (a full channel makes the poll wait: backpressure),
/// and rebalances run here, between polls.
pub fn poll(
    consumer: &BaseConsumer<Rebalancing>,
    out: &mpsc::Sender<Result<OwnedMessage, KafkaError>>,
) {
    while !out.is_closed() {
        let Some(m) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        if out.blocking_send(m.map(|m| m.detach())).is_err() {
            return;
        }
    }
}

pub struct InteractionConsumer {
    pub topic: String,
    pub view: SharedView,
    pub histories: Arc<Histories>,
    pub offsets: Arc<Offsets>,
    pub outbox: Arc<Outbox>,
    pub metrics: Arc<Metrics>,
    pub scheduler: mpsc::Sender<Event>,
    pub sent: mpsc::Sender<Sent>,
}

#[derive(Debug, thiserror::Error)]
pub enum InteractionError {
    #[error("interactions topic {topic:?}: {source}")]
    Kafka { topic: String, source: KafkaError },
    #[error(transparent)]
    History(#[from] HistoryError),
}

impl InteractionConsumer {
    /// Applies the polled `messages` until a stop.
    pub async fn run(
        self,
        mut messages: mpsc::Receiver<Result<OwnedMessage, KafkaError>>,
        mut stop: watch::Receiver<bool>,
    ) -> Result<(), InteractionError> {
        loop {
            let m = tokio::select! {
                m = messages.recv() => match m {
                    Some(m) => m,
                    None => return Ok(()),
                },
                _ = stop.changed() => return Ok(()),
            };
            let m = m.map_err(|source| InteractionError::Kafka {
                topic: self.topic.clone(),
                source,
            })?;
            self.metrics.interaction_events.inc();
            let trigger = Trigger {
                partition: m.partition(),
                offset: m.offset(),
                timestamp_ms: m.timestamp().to_millis().unwrap_or_else(now_ms),
            };
            let raw = m.payload().unwrap_or(&[]);
            let outcome = self.apply(raw, trigger)?;
            let sent = match outcome {
                Ok((event, record)) => {
                    let outputs = 1 + u32::from(record.is_some());
                    self.offsets
                        .begin(trigger.partition, trigger.offset, outputs);
                    if let Some(record) = record {
                        let log = self.outbox.changelog(&event.user, record, trigger);
                        if self.sent.send(log).await.is_err() {
                            return Ok(());
                        }
                    }
                    if self.scheduler.send(event).await.is_err() {
                        return Ok(());
                    }
                    continue;
                }
                Err((reason, detail)) => {
                    self.offsets.begin(trigger.partition, trigger.offset, 1);
                    self.metrics.dead_letter(reason);
                    let source = (self.topic.as_str(), trigger.partition, trigger.offset);
                    self.outbox
                        .dead_letter(source, reason, &detail, raw, vec![trigger])
                }
            };
            if self.sent.send(sent).await.is_err() {
                return Ok(());
            }
        }
    }

    /// The user to schedule and, when the history changed, its changelog
    /// record; or why the message is a dead letter.
    #[allow(clippy::type_complexity)]
    fn apply(
        &self,
        raw: &[u8],
        trigger: Trigger,
    ) -> Result<Result<(Event, Option<Vec<u8>>), (Reason, String)>, InteractionError> {
        let i: Interaction = match self.outbox.wire().decode(raw) {
            Ok(i) => i,
            Err(e) => return Ok(Err(decode_reason(e))),
        };
        let Some(ord) = self.view.load().ord(&i.item_id) else {
            return Ok(Err((
                Reason::UnknownItem,
                format!(
                    "user {:?}: field \"item_id\": item {:?} is not in the catalogue",
                    i.user_id, i.item_id
                ),
            )));
        };
        let at = Position {
            partition: trigger.partition,
            offset: trigger.offset,
        };
        let record = self.histories.append(&i.user_id, at, ord)?;
        if record.is_none() {
            self.metrics.replayed.inc();
        }
        Ok(Ok((
            Event {
                user: i.user_id,
                trigger,
            },
            record,
        )))
    }
}
