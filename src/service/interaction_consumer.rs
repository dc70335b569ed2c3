//! The interactions topic in: histories updated, users scheduled.
//!
//! This is the poll path, so it does only cheap work per message: decode,
//! look the item up in the current view, append to the user's history (a
//! sled write to memory) and pass the user on. The model runs elsewhere.
//! Each message is *begun* in [`Offsets`] when read and *finished* when its
//! feed (or its dead letter) is delivered; only finished offsets are stored
//! for commit.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use rdkafka::consumer::{BaseConsumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::ClientContext;
use tokio::sync::{mpsc, watch};

use super::catalogue_consumer::decode_reason;
use super::delivery::{Outbox, Sent, Trigger};
use super::histories::{Histories, HistoryError, Position};
use super::kafka::now_ms;
use super::metrics::{Metrics, Reason};
use super::offsets::Offsets;
use super::scheduler::Event;
use super::view::SharedView;
use crate::contract::Interaction;

/// Forgets revoked partitions, so that late finishes cannot store offsets
/// for partitions another instance now owns.
pub struct Rebalancing {
    pub offsets: Arc<Offsets>,
    pub metrics: Arc<Metrics>,
}

impl ClientContext for Rebalancing {}

impl ConsumerContext for Rebalancing {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let parts: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
            tracing::info!(?parts, "partitions revoked");
            self.offsets.revoke(parts);
            self.metrics.assigned_partitions.store(0, Relaxed);
        }
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let parts: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
            tracing::info!(?parts, "partitions assigned");
            self.metrics
                .assigned_partitions
                .store(parts.len() as i64, Relaxed);
        }
    }
}

pub struct InteractionConsumer {
    pub consumer: Arc<StreamConsumer<Rebalancing>>,
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
    Kafka {
        topic: String,
        source: rdkafka::error::KafkaError,
    },
    #[error(transparent)]
    History(#[from] HistoryError),
}

impl InteractionConsumer {
    pub async fn run(self, mut stop: watch::Receiver<bool>) -> Result<(), InteractionError> {
        loop {
            let m = tokio::select! {
                m = self.consumer.recv() => m,
                _ = stop.changed() => return Ok(()),
            };
            let m = m.map_err(|source| InteractionError::Kafka {
                topic: self.topic.clone(),
                source,
            })?;
            self.metrics.interaction_events.fetch_add(1, Relaxed);
            let trigger = Trigger {
                partition: m.partition(),
                offset: m.offset(),
                timestamp_ms: m.timestamp().to_millis().unwrap_or_else(now_ms),
            };
            self.offsets.begin(trigger.partition, trigger.offset);
            let raw = m.payload().unwrap_or(&[]);
            let outcome = self.apply(raw, trigger)?;
            let sent = match outcome {
                Ok(event) => {
                    if self.scheduler.send(event).await.is_err() {
                        return Ok(());
                    }
                    continue;
                }
                Err((reason, detail)) => {
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

    fn apply(
        &self,
        raw: &[u8],
        trigger: Trigger,
    ) -> Result<Result<Event, (Reason, String)>, InteractionError> {
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
        if !self.histories.append(&i.user_id, at, ord)? {
            self.metrics.replayed.fetch_add(1, Relaxed);
        }
        Ok(Ok(Event {
            user: i.user_id,
            trigger,
        }))
    }
}
