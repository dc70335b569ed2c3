//! The interactions topic in: histories updated, users scheduled.
//!
//! This is the poll path, so it does only cheap work per message: decode,
//! look the item up in the current view, append to the user's history (a
//! write to memory, committed in groups) and pass the user on. The model runs elsewhere.
//! An interaction whose item the catalogue has not published yet waits for
//! it, a bounded while, in [`Waiting`]; a publish or the grace's end sends
//! it on.
//! Each message is *begun* in [`Offsets`] when read and *finished* when its
//! outputs are delivered (its history's changelog record and its feed, or
//! its dead letter); only finished offsets are stored for commit.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};

use std::time::Duration;

use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message, OwnedMessage};
use rdkafka::producer::Producer;
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::catalogue_consumer::decode_reason;
use super::changelog;
use super::delivery::{Outbox, Sent, Trigger};
use super::histories::{Histories, HistoryError, Position};
use super::kafka::{
    self, ends_consumption, now_ms, Logged, MarkerProducer, Recovered, Throttle, MARKER_KEY,
};
use super::metrics::Metrics;
use super::offsets::Offsets;
use super::reason::Reason;
use super::refresh::Assigned;
use super::scheduler::Event;
use super::view::SharedView;
use super::waiting::{Held, Waiting};
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
    /// The partitions held, for the refresh passes.
    pub assigned: Arc<Assigned>,
    /// Told after every revoke: the interactions of revoked partitions that
    /// wait for their items are dropped by [`InteractionConsumer::run`].
    pub revoked: watch::Sender<()>,
    /// librdkafka's own lines, throttled.
    pub logged: Logged,
    /// Set by an assignment of interactions partitions that the histories
    /// topic lacks; [`poll`] hands it on and stops. Read after every poll,
    /// so a lock-free load.
    pub uncovered: OnceLock<Uncovered>,
}

/// Interactions partitions without a histories partition: partitions were
/// added to the interactions topic while the service ran (a start refuses
/// unequal counts). Their users' histories would have nowhere to go, and
/// every interaction of theirs would cost a dead letter, so the service
/// stops and says what to do.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "partitions {partitions:?} were assigned, but the histories topic {histories_topic:?} has \
     {histories} partitions; the changelog needs exactly one partition per interactions \
     partition: add partitions to it as to the interactions topic"
)]
pub struct Uncovered {
    pub partitions: Vec<i32>,
    pub histories_topic: String,
    pub histories: usize,
}

impl ClientContext for Rebalancing {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        self.logged.log(level, fac, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.logged.error(error, reason);
    }
}

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
            self.assigned.clear();
            self.revoked.send_replace(());
            self.metrics.assigned_partitions.set(0);
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let parts: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
            tracing::info!(?parts, "partitions assigned");
            if let Some(u) = self.uncovered_by(consumer, &parts) {
                let _ = self.uncovered.set(u);
                return;
            }
            // This runs on the poll path, before any message of these
            // partitions is handed out: the histories are whole when the
            // first interaction arrives.
            self.restore.partitions(&parts, &self.metrics);
            self.assigned.set(&parts);
            self.metrics.assigned_partitions.set(parts.len() as i64);
            self.metrics.joined.store(true, Relaxed);
        }
    }
}

impl Rebalancing {
    /// The assigned `parts` that the histories topic has no partition for.
    /// Its partition count is asked for at each assignment, as partitions
    /// may have been added to both topics since the start; when the brokers
    /// do not answer, the restore that follows reports it.
    fn uncovered_by(&self, consumer: &BaseConsumer<Self>, parts: &[i32]) -> Option<Uncovered> {
        let topic = &self.restore.topic;
        let histories = match kafka::partitions(consumer, topic) {
            Ok(ids) => ids.len(),
            Err(e) => {
                tracing::warn!(topic = %topic, error = %e, "reading the histories topic's partition count");
                return None;
            }
        };
        Uncovered::of(parts, topic, histories)
    }
}

impl Uncovered {
    /// The `parts` a histories topic of `histories` partitions lacks, if
    /// any.
    fn of(parts: &[i32], histories_topic: &str, histories: usize) -> Option<Uncovered> {
        let mut partitions: Vec<i32> = parts
            .iter()
            .copied()
            .filter(|&p| usize::try_from(p).map_or(true, |p| p >= histories))
            .collect();
        partitions.sort_unstable();
        (!partitions.is_empty()).then(|| Uncovered {
            partitions,
            histories_topic: histories_topic.to_string(),
            histories,
        })
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
    /// The changelog reader's settings: a reader is made for each restore
    /// and dropped after, as one kept idle between restores is never
    /// polled, and librdkafka queues every error it meets (one per
    /// reconnect while the broker is away) until a poll, or its close,
    /// hands them all out: 443 log lines at once after 90 s away.
    pub reader: ClientConfig,
    pub marker: MarkerProducer,
    pub instance: String,
    pub timeout: Duration,
    /// The context of each reader made.
    pub logged: Logged,
    /// Maps the records' item ids to this instance's ords. Set once the
    /// catalogue's first view is made, which is before the consumer is
    /// first polled, so before any restore.
    pub by: Arc<OnceLock<changelog::Reader>>,
}

/// Where one partition's restore stands.
struct Reading {
    read: u64,
    taken: u64,
    /// Items of restored histories this instance does not know (left out).
    unknown: usize,
    /// Records not taken for an error: not a history, or the store's.
    skipped: u64,
    /// The offset of this restore's marker, once read.
    end: Option<i64>,
}

impl Restore {
    fn partitions(&self, parts: &[i32], metrics: &Metrics) {
        let start = std::time::Instant::now();
        let token = format!("{}/{}", self.instance, now_ms());
        let (landed, failed) = kafka::mark_ends(&self.marker, &self.topic, parts, &token);
        for (p, e) in &failed {
            tracing::error!(partition = p, error = %e, topic = %self.topic, "cannot mark the changelog's end; histories of this partition are not restored");
        }
        let marked = parts
            .iter()
            .copied()
            .filter(|p| failed.iter().all(|(q, _)| q != p));
        if let Err(e) = self.marker.flush(self.timeout) {
            tracing::error!(error = %e, topic = %self.topic, "cannot mark the changelog's end; histories are not restored");
            return;
        }
        let mut tpl = TopicPartitionList::new();
        let mut state = std::collections::HashMap::new();
        for p in marked {
            let from = match self.histories.changelog_offset(p) {
                Ok(Some(o)) if landed.restarted(p, o + 1) == Some(true) => {
                    // The interactions' log went with the changelog's: their
                    // offsets begin again too.
                    match self.histories.forget_offsets(p) {
                        Ok(users) => {
                            tracing::warn!(partition = p, recorded = o, users, topic = %self.topic, "the changelog partition's log began again (the topic was made again, or the broker lost it): reading it whole; its users keep their items, and their new interactions are not taken for replays")
                        }
                        Err(e) => {
                            tracing::error!(partition = p, error = %e, "the changelog partition's log began again, and its users' offsets could not be forgotten: their new interactions may be taken for replays")
                        }
                    }
                    Offset::Beginning
                }
                Ok(Some(o)) => Offset::Offset(o + 1),
                Ok(None) => Offset::Beginning,
                Err(e) => {
                    tracing::warn!(partition = p, error = %e, "reading the restored offset; reading the whole changelog partition");
                    Offset::Beginning
                }
            };
            if let Err(e) = tpl.add_partition_offset(&self.topic, p, from) {
                tracing::error!(partition = p, error = %e, "reading the changelog");
                continue;
            }
            state.insert(
                p,
                Reading {
                    read: 0,
                    taken: 0,
                    unknown: 0,
                    skipped: 0,
                    end: None,
                },
            );
        }
        let reader: BaseConsumer<Logged> = match self
            .reader
            .create_with_context(self.logged.clone())
        {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, topic = %self.topic, "cannot make the changelog reader; histories are not restored");
                return;
            }
        };
        if let Err(e) = reader.assign(&tpl) {
            tracing::error!(error = %e, topic = %self.topic, "cannot read the changelog; histories are not restored");
            return;
        }
        let Some(by) = self.by.get() else {
            tracing::error!(topic = %self.topic, "no catalogue view to read the changelog's item ids by; histories are not restored");
            return;
        };
        let mut recovered = Recovered::new("histories changelog", metrics.consumer_errors.clone());
        let mut ords = Vec::new();
        // A restore is bounded by `timeout`, not stopped.
        let never = AtomicBool::new(false);
        // Anyone who can write to the topic can fill it with records that
        // are not histories: one line per quiet period, not one per record.
        let mut skipping = Throttle::default();
        while state.values().any(|r| r.end.is_none()) {
            if start.elapsed() > self.timeout {
                tracing::error!(
                    ?parts,
                    "changelog markers not seen in time; restore incomplete"
                );
                break;
            }
            let m = match reader.poll(Duration::from_millis(200)) {
                Some(Ok(m)) => m,
                Some(Err(e)) => {
                    recovered.note(&e);
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
            let written = m.timestamp().to_millis();
            let others = m
                .headers()
                .and_then(|h| h.iter().find(|h| h.key == changelog::OTHERS))
                .map_or(Ok(Vec::new()), |h| {
                    changelog::others(h.value.unwrap_or(&[]))
                });
            let restored = changelog::Record::parse(m.payload().unwrap_or(&[]))
                .and_then(|record| Ok((record, others?)))
                .map_err(HistoryError::from)
                .and_then(|(record, others)| {
                    let view = by.view_for(written, |v| record.knows_all(v), &never);
                    r.unknown += record.ords(&view, &mut ords);
                    self.histories.restore(&user, record.at, &others, &ords)
                });
            match restored {
                Ok(true) => r.taken += 1,
                Ok(false) => {}
                Err(e) => {
                    r.skipped += 1;
                    if let Some(held_back) = skipping.pass(std::time::Instant::now()) {
                        tracing::warn!(partition = m.partition(), offset = m.offset(), held_back, error = %e, "skipping a changelog record");
                    }
                }
            }
        }
        let _ = reader.unassign();
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
                unknown_items = r.unknown,
                skipped = r.skipped,
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

/// What the poll thread hands on that is not a message.
#[derive(Debug)]
pub enum PollError {
    /// An error the consumer reported.
    Kafka(KafkaError),
    /// An assignment the service cannot keep histories for; polling ends.
    Uncovered(Uncovered),
}

/// Polls the consumer, off the runtime, until `out` closes or an
/// assignment is [`Uncovered`]: messages go to `out` as they come (a full
/// channel makes the poll wait: backpressure), and rebalances run here,
/// between polls.
pub fn poll(
    consumer: &BaseConsumer<Rebalancing>,
    out: &mpsc::Sender<Result<OwnedMessage, PollError>>,
) {
    while !out.is_closed() {
        let m = consumer.poll(Duration::from_millis(100));
        // Checked before the message: an assignment runs inside the poll
        // that returns the first message of its partitions.
        if let Some(u) = consumer.context().uncovered.get() {
            let _ = out.blocking_send(Err(PollError::Uncovered(u.clone())));
            return;
        }
        let Some(m) = m else {
            continue;
        };
        if out
            .blocking_send(m.map(|m| m.detach()).map_err(PollError::Kafka))
            .is_err()
        {
            return;
        }
    }
}

pub struct InteractionConsumer {
    pub topic: String,
    pub view: SharedView,
    /// Changes when the catalogue consumer publishes a view: a waiting
    /// interaction's item may have come.
    pub published: watch::Receiver<()>,
    /// Changes after a revoke ([`Rebalancing::revoked`]).
    pub revoked: watch::Receiver<()>,
    pub waiting: Waiting,
    pub histories: Arc<Histories>,
    pub offsets: Arc<Offsets>,
    pub outbox: Arc<Outbox>,
    pub metrics: Arc<Metrics>,
    pub scheduler: mpsc::Sender<Event>,
    pub sent: mpsc::Sender<Sent>,
    /// Quiets the warning about interactions not keyed by their user.
    pub miskeyed: Throttle,
}

#[derive(Debug, thiserror::Error)]
pub enum InteractionError {
    #[error("interactions topic {topic:?}: {source}")]
    Kafka { topic: String, source: KafkaError },
    #[error("interactions topic {topic:?}: {source}")]
    Uncovered { topic: String, source: Uncovered },
    #[error(transparent)]
    History(#[from] HistoryError),
}

/// Whether the pipeline downstream still takes work (`false`: it closed,
/// the service is stopping).
type Open = bool;

impl InteractionConsumer {
    /// Applies the polled `messages` until a stop. Interactions still
    /// waiting for their items then are not finished, so their offsets are
    /// not committed: the next start reads them again.
    pub async fn run(
        mut self,
        mut messages: mpsc::Receiver<Result<OwnedMessage, PollError>>,
        mut stop: watch::Receiver<bool>,
    ) -> Result<(), InteractionError> {
        let mut ready = Vec::new();
        let mut catalogue_open = true;
        let mut rebalancing_open = true;
        let mut recovered = Recovered::new("interactions", self.metrics.consumer_errors.clone());
        loop {
            let wake = self.waiting.wake();
            let waiting = !self.waiting.is_empty();
            let sweep = tokio::select! {
                m = messages.recv() => {
                    let Some(m) = m else { break };
                    let m = match m {
                        Ok(m) => m,
                        Err(PollError::Kafka(e)) if !ends_consumption(&e) => {
                            recovered.note(&e);
                            continue;
                        }
                        Err(PollError::Kafka(source)) => {
                            return Err(InteractionError::Kafka {
                                topic: self.topic.clone(),
                                source,
                            })
                        }
                        Err(PollError::Uncovered(source)) => {
                            return Err(InteractionError::Uncovered {
                                topic: self.topic.clone(),
                                source,
                            })
                        }
                    };
                    if !self.take(&m).await? {
                        break;
                    }
                    false
                }
                r = self.published.changed(), if waiting && catalogue_open => {
                    catalogue_open = r.is_ok();
                    true
                }
                r = self.revoked.changed(), if rebalancing_open => {
                    rebalancing_open = r.is_ok();
                    let offsets = &self.offsets;
                    self.waiting
                        .retain(|h| offsets.holds(h.trigger.partition, h.trigger.offset));
                    self.metrics.waiting.set(self.waiting.len() as i64);
                    false
                }
                _ = tokio::time::sleep_until(wake.unwrap_or_else(Instant::now)), if wake.is_some() => true,
                _ = stop.changed() => break,
            };
            if sweep {
                let view = self.view.load_full();
                self.waiting
                    .ready(Instant::now(), |id| view.ord(id).is_some(), &mut ready);
                if !self.send_on(&mut ready).await? {
                    break;
                }
            }
        }
        if !self.waiting.is_empty() {
            tracing::info!(
                waiting = self.waiting.len(),
                "stopping with interactions waiting for their items; the next start reads them again"
            );
        }
        Ok(())
    }

    /// One polled message: applied, dead-lettered, or left waiting for its
    /// item (or behind its user's interaction that waits).
    async fn take(&mut self, m: &OwnedMessage) -> Result<Open, InteractionError> {
        self.metrics.interaction_events.inc();
        let trigger = Trigger {
            partition: m.partition(),
            offset: m.offset(),
            timestamp_ms: m.timestamp().to_millis().unwrap_or_else(now_ms),
        };
        let raw = m.payload().unwrap_or(&[]);
        let i: Interaction = match self.outbox.wire().decode(raw) {
            Ok(i) => i,
            Err(e) => {
                let (reason, detail) = decode_reason(e);
                return Ok(self.dead_letter(trigger, reason, &detail, raw).await);
            }
        };
        if m.key() != Some(i.user_id.as_bytes()) {
            self.metrics.interactions_miskeyed.inc();
            if let Some(held_back) = self.miskeyed.pass(std::time::Instant::now()) {
                tracing::warn!(
                    user = i.user_id,
                    partition = trigger.partition,
                    offset = trigger.offset,
                    held_back,
                    "an interaction whose record key is not its user_id: a user's interactions must all come on one partition, since instances split the users by partition and each feeds from the histories it holds; key the interactions' records by user_id"
                );
            }
        }
        if !self.waiting.is_empty() && self.waiting.holds(&i.user_id) {
            if self.waiting.has_room() {
                self.wait(i, raw, trigger);
                return Ok(true);
            }
            let mut theirs = Vec::new();
            self.waiting.release(&i.user_id, &mut theirs);
            if !self.send_on(&mut theirs).await? {
                return Ok(false);
            }
        }
        if self.waiting.has_room() && self.view.load().ord(&i.item_id).is_none() {
            self.wait(i, raw, trigger);
            return Ok(true);
        }
        self.apply(i, raw, trigger, None).await
    }

    fn wait(&mut self, i: Interaction, raw: &[u8], trigger: Trigger) {
        // Begun now, so that the committed offset stays before it.
        self.offsets.begin(trigger.partition, trigger.offset, 1);
        self.waiting
            .push(Held::new(i, raw, trigger, Instant::now()));
        self.metrics.waiting.set(self.waiting.len() as i64);
    }

    /// Applies or dead-letters interactions that waited, in order.
    async fn send_on(&mut self, ready: &mut Vec<Held>) -> Result<Open, InteractionError> {
        self.metrics.waiting.set(self.waiting.len() as i64);
        let now = Instant::now();
        for h in ready.drain(..) {
            let t = h.trigger;
            // Its partition was revoked while it waited: the new owner
            // reads it again from the last commit, which is before it.
            if !self.offsets.holds(t.partition, t.offset) {
                continue;
            }
            let waited = h.waited(now);
            if !self.apply(h.interaction, &h.raw, t, Some(waited)).await? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Appends `i` to its user's history and schedules the user, or
    /// dead-letters it when its item is unknown; `waited` is how long it
    /// waited for that.
    async fn apply(
        &self,
        i: Interaction,
        raw: &[u8],
        trigger: Trigger,
        waited: Option<Duration>,
    ) -> Result<Open, InteractionError> {
        let Some(ord) = self.view.load().ord(&i.item_id) else {
            let why = match waited {
                Some(w) => format!(" (waited {} ms for it)", w.as_millis()),
                None if self.waiting.grace().is_zero() => String::new(),
                None => format!(
                    " (not waited for: {} interactions already wait for their items)",
                    self.waiting.len()
                ),
            };
            let detail = format!(
                "user {:?}: field \"item_id\": item {:?} is not in the catalogue{why}",
                i.user_id, i.item_id
            );
            return Ok(self
                .dead_letter(trigger, Reason::UnknownItem, &detail, raw)
                .await);
        };
        let at = Position {
            partition: trigger.partition,
            offset: trigger.offset,
        };
        let record = self.histories.append(&i.user_id, at, ord)?;
        if record.is_none() {
            self.metrics.replayed.inc();
        }
        if waited.is_some() {
            self.metrics.waited.inc();
        }
        let outputs = 1 + u32::from(record.is_some());
        self.offsets
            .begin(trigger.partition, trigger.offset, outputs);
        if let Some(history) = record {
            let record = changelog::record(at, history.ords(), &self.view.load());
            let log = self
                .outbox
                .changelog(&i.user_id, record, history.others(), trigger);
            if self.sent.send(log).await.is_err() {
                return Ok(false);
            }
        }
        let event = Event {
            user: i.user_id,
            trigger,
        };
        Ok(self.scheduler.send(event).await.is_ok())
    }

    async fn dead_letter(
        &self,
        trigger: Trigger,
        reason: Reason,
        detail: &str,
        raw: &[u8],
    ) -> Open {
        self.offsets.begin(trigger.partition, trigger.offset, 1);
        self.metrics.dead_letter(reason);
        let source = (self.topic.as_str(), trigger.partition, trigger.offset);
        let sent = self
            .outbox
            .dead_letter(source, reason, detail, raw, vec![trigger]);
        self.sent.send(sent).await.is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::Uncovered;

    #[test]
    fn an_assignment_beyond_the_histories_partitions_is_uncovered() {
        assert!(Uncovered::of(&[1, 0], "h", 2).is_none());
        let u = Uncovered::of(&[3, 0, 2, 1], "h", 2).expect("two partitions lack one");
        assert_eq!(u.partitions, [2, 3]);
        let text = u.to_string();
        assert!(
            text.contains("partitions [2, 3] were assigned")
                && text.contains("histories topic \"h\" has 2 partitions"),
            "{text}"
        );
    }
}
