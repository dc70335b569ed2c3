//! The catalogue topic in, decodable SIDs out.
//!
//! Every instance reads the whole catalogue (it is compacted and small next
//! to the interactions), so this consumer is not in a group: it assigns
//! itself every partition and keeps its own offsets in the registry, beside
//! the effects they stand for. Events are applied in batches; after each
//! batch the index is published, the registry flushed, and only then are
//! the batch's offsets recorded. A crash replays at most the batches after
//! the last record, and replays change nothing (the registry remembers each
//! item's last position in each partition).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::watch;
use tokio::time::Instant;

use super::content::{content, vector, ContentError};
use super::delivery::{Outbox, Sent};
use super::kafka::{
    ends_consumption, listed, now_ms, partitions, restarted, Logged, Recovered, Throttle,
    CHECK_EVERY, MARKER_KEY, RECHECK_EVERY,
};
use super::metrics::Metrics;
use super::reason::Reason;
use super::view::{FreshRows, FreshSettings, ItemRef, SharedView, View};
use crate::catalogue::{Catalogue, CatalogueError};
use crate::contract::{CatalogueEvent, DecodeError, ItemChange};
use crate::embed::text::TextEncoder;
use crate::registry::{LiveChange, Position, RegistryError};

/// Registry meta key of a partition's next offset.
fn offset_key(topic: &str, partition: i32) -> String {
    format!("catalogue-offset/{topic}/{partition}")
}

/// Registry meta key of a partition's base (see [`CatalogueConsumer::bases`]).
fn base_key(topic: &str, partition: i32) -> String {
    format!("catalogue-base/{topic}/{partition}")
}

/// Registry meta key of the digest of the weighting the stored content
/// rows were weighed with ([`TfIdf::digest`](crate::embed::tfidf::TfIdf::digest)).
const WEIGHTING_KEY: &str = "content-weighting";

/// A big-endian u64 or i64 meta value.
fn be8(value: Option<Vec<u8>>) -> Option<[u8; 8]> {
    value.as_deref().and_then(|b| b.try_into().ok())
}

/// The catalogue is *loaded* (and the interactions may be read) once every
/// partition's end as of start-up is read and published. To know where that
/// is, the consumer writes an end marker ([`MARKER_KEY`]) with a token of its
/// own to every partition at start and waits to read each back: a partition
/// is read in order, so everything written before the marker is applied by
/// then.
struct Loading {
    token: String,
    /// Partitions whose marker has not been read yet.
    waiting: HashSet<i32>,
}

pub struct CatalogueConsumer {
    pub consumer: StreamConsumer<Logged>,
    pub topic: String,
    pub catalogue: Catalogue,
    pub text: Option<TextEncoder>,
    pub view: SharedView,
    /// Told of every publish of `view`: interactions may wait for an item.
    pub published: watch::Sender<()>,
    pub outbox: Arc<Outbox>,
    pub metrics: Arc<Metrics>,
    pub batch_max: usize,
    pub publish_every: Duration,
    /// The catalogue's partitions, once assigned.
    pub partitions: Vec<i32>,
    /// Names this instance in its end markers.
    pub instance: String,
    /// Fresh items in feeds; `None`: off.
    pub fresh: Option<FreshSettings>,
    /// The rows of the fresh set last published.
    pub fresh_rows: FreshRows,
    /// Warnings of items whose events come on more than one partition: a
    /// producer that does not key by item id sends one per event.
    pub unkeyed: Throttle,
    /// Warnings of new items placed next to their full content prefix.
    pub spilled: Throttle,
    /// Per partition, the next offset to read: where the registry's
    /// recorded offset puts it, then one past each message read.
    pub next: HashMap<i32, i64>,
    /// Per partition, what is added to an offset to make the event's
    /// [`Position`] in the registry: raised past every position given so
    /// far each time the partition's log begins again (see [`Landed`](super::kafka::Landed)), so
    /// that the new log's events are not taken for replays of the old's.
    pub bases: HashMap<i32, u64>,
    /// Whether the brokers said, since the last check of the logs, that
    /// the topic was not there: when it is back, its logs are new.
    pub topic_went: bool,
    /// Set while the catalogue is read again from its start to weigh the
    /// items' words anew: the weighting's digest, recorded once loaded.
    pub reweigh: Option<[u8; 32]>,
    /// Per partition, the offset below which a re-read reads only what was
    /// read before: what it rejects was dead-lettered then, and its
    /// recorded offset stays there until the re-read passes it.
    pub read_before: HashMap<i32, i64>,
}

#[derive(Debug, thiserror::Error)]
pub enum CatalogueConsumerError {
    #[error("catalogue topic {topic:?}: {source}")]
    Kafka {
        topic: String,
        source: rdkafka::error::KafkaError,
    },
    #[error("catalogue topic {topic:?} partition {partition}: cannot write the end marker that tells the service where the catalogue ends (it needs write access to the topic): {source}")]
    Marker {
        topic: String,
        partition: i32,
        source: rdkafka::error::KafkaError,
    },
    #[error(transparent)]
    Catalogue(#[from] CatalogueError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

/// The view of what the registry holds now.
pub fn initial_view(
    catalogue: &Catalogue,
    fresh: Option<&FreshSettings>,
    fresh_rows: &mut FreshRows,
) -> Result<View, RegistryError> {
    let mut ords = imbl::HashMap::new();
    let mut items = imbl::OrdMap::new();
    for kv in catalogue.registry().items() {
        let (id, entry) = kv?;
        if entry.applied.is_empty() {
            continue; // reserved for a training item, never seen online
        }
        let id: Arc<str> = id.into();
        ords.insert(id.clone(), entry.ord);
        items.insert(entry.ord, ItemRef::of(id, &entry));
    }
    let mut content = imbl::HashMap::new();
    if fresh.is_some_and(|f| f.words().is_some()) {
        for kv in catalogue.registry().contents() {
            let (ord, row) = kv?;
            content.insert(ord, row.into());
        }
    }
    let snapshot = catalogue.reader().snapshot();
    Ok(View {
        fresh: fresh.map(|f| f.items(fresh_rows, &snapshot, &items, &content)),
        snapshot,
        ords,
        items,
        content,
    })
}

impl CatalogueConsumer {
    /// Assigns every partition, each from its recorded offset (or the
    /// start), after writing the end markers that say where the catalogue
    /// ends as of now (the loading state waits for them); a partition
    /// whose marker lands below its recorded offset is read from its
    /// start. Returns the markers' token.
    pub async fn assign(&mut self) -> Result<String, CatalogueConsumerError> {
        let kafka = |source| CatalogueConsumerError::Kafka {
            topic: self.topic.clone(),
            source,
        };
        let token = format!("{}/{}", self.instance, now_ms());
        self.reweigh = self.weighed_anew()?;
        let listed = tokio::task::block_in_place(|| partitions(&self.consumer, &self.topic));
        for p in listed.map_err(kafka)? {
            let registry = self.catalogue.registry();
            let stored =
                be8(registry.meta_get(&offset_key(&self.topic, p))?).map(i64::from_be_bytes);
            let base =
                be8(registry.meta_get(&base_key(&self.topic, p))?).map_or(0, u64::from_be_bytes);
            self.next.insert(p, stored.unwrap_or(0));
            self.bases.insert(p, base);
            self.partitions.push(p);
            let end = self
                .outbox
                .mark(&self.topic, p, &token)
                .await
                .map_err(|source| CatalogueConsumerError::Marker {
                    topic: self.topic.clone(),
                    partition: p,
                    source,
                })?;
            if restarted(end, stored.unwrap_or(0)) {
                self.restart(p, end)?;
            } else if self.reweigh.is_some() {
                self.read_before.insert(p, self.next[&p]);
                self.next.insert(p, 0);
            }
        }
        self.reassign()?;
        Ok(token)
    }

    /// Whether the stored content rows were weighed otherwise than the
    /// model directory's weighting weighs words (another fit, or none: an
    /// item read while there was none has no row): then they are
    /// forgotten, and the catalogue is read again from its start, where
    /// each item's last applied upsert weighs its words anew. Returns the
    /// digest to record once that read is done.
    fn weighed_anew(&self) -> Result<Option<[u8; 32]>, CatalogueConsumerError> {
        let registry = self.catalogue.registry();
        let stored = registry.meta_get(WEIGHTING_KEY)?;
        let Some(digest) = self
            .fresh
            .as_ref()
            .and_then(|f| f.words())
            .map(|w| w.digest())
        else {
            // Rows stop following the events: a weighting that comes back
            // finds them stale.
            if stored.as_deref().is_some_and(|d| !d.is_empty()) {
                registry.meta_set(WEIGHTING_KEY, &[])?;
            }
            return Ok(None);
        };
        if stored.as_deref() == Some(&digest[..]) {
            return Ok(None);
        }
        let forgotten = tokio::task::block_in_place(|| registry.forget_contents())?;
        // A first start reads the catalogue from its start anyway.
        if stored.is_some() || forgotten > 0 {
            tracing::info!(
                forgotten,
                "the items' words were weighed otherwise when they were stored (the model \
                 directory's content-tfidf.json is new): reading the catalogue again from its \
                 start to weigh them anew"
            );
        }
        Ok(Some(digest))
    }

    /// Assigns every partition from its next offset to read.
    fn reassign(&self) -> Result<(), CatalogueConsumerError> {
        let kafka = |source| CatalogueConsumerError::Kafka {
            topic: self.topic.clone(),
            source,
        };
        let mut tpl = TopicPartitionList::new();
        for &p in &self.partitions {
            let offset = match self.next[&p] {
                0 => Offset::Beginning,
                o => Offset::Offset(o),
            };
            tpl.add_partition_offset(&self.topic, p, offset)
                .map_err(kafka)?;
        }
        tokio::task::block_in_place(|| self.consumer.assign(&tpl)).map_err(kafka)
    }

    /// Runs until `stop`; `token` is [`assign`](Self::assign)'s.
    pub async fn run(
        mut self,
        mut stop: watch::Receiver<bool>,
        token: String,
    ) -> Result<(), CatalogueConsumerError> {
        // The view the service started with: nothing was applied since
        // `initial_view` made it.
        let mut view = View::clone(&self.view.load());
        self.metrics
            .live_items
            .set(self.catalogue.registry().live_count() as i64);
        self.count_fresh(&view);
        let mut batch = Batch::default();
        let mut recovered = Recovered::new("catalogue", self.metrics.consumer_errors.clone());
        let mut loading = Loading {
            token,
            waiting: self.partitions.iter().copied().collect(),
        };
        // After a consumer error (the broker away, the topic gone) the log
        // read may not be the one the offsets are from any more; checked
        // once the topic is back.
        let mut suspect = false;
        let mut recheck = tokio::time::interval(RECHECK_EVERY);
        recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut check = tokio::time::interval_at(Instant::now() + CHECK_EVERY, CHECK_EVERY);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let publish_at = batch.first.map(|t| t + self.publish_every);
            tokio::select! {
                _ = recheck.tick(), if suspect => {
                    suspect = !self.check_logs().await?;
                }
                _ = check.tick() => suspect = true,
                m = self.consumer.recv() => {
                    let m = match m {
                        Ok(m) => m.detach(),
                        Err(e) if !ends_consumption(&e) => {
                            recovered.note(&e);
                            suspect = true;
                            continue;
                        }
                        Err(source) => return Err(CatalogueConsumerError::Kafka { topic: self.topic.clone(), source }),
                    };
                    let (p, o) = (m.partition(), m.offset());
                    self.next.insert(p, o + 1);
                    if m.key() == Some(MARKER_KEY) {
                        if m.payload() == Some(loading.token.as_bytes()) {
                            batch.marked.push(p);
                        }
                        batch.first.get_or_insert_with(Instant::now);
                        batch.next.retain(|(q, _)| *q != p);
                        batch.next.push((p, o + 1));
                        continue;
                    }
                    self.metrics.catalogue_events.inc();
                    let ts = m.timestamp().to_millis().unwrap_or_else(now_ms);
                    let raw = m.payload().unwrap_or(&[]);
                    let position = Position::new(p as u32, self.bases[&p] + o as u64);
                    let decoded = self.outbox.wire().catalogue(m.key(), m.payload());
                    let out = tokio::task::block_in_place(|| self.apply(&mut view, decoded, position))?;
                    // A re-read's rejects below where it read before were
                    // dead-lettered then.
                    let sent_before = self.read_before.get(&p).is_some_and(|&b| o < b);
                    if let (Err((reason, detail)), false) = (out, sent_before) {
                        self.metrics.dead_letter(reason);
                        batch.dead.push(self.outbox.dead_letter((&self.topic, p, o), reason, &detail, raw, Vec::new()));
                    }
                    batch.first.get_or_insert_with(Instant::now);
                    batch.timestamps.push(ts);
                    batch.next.retain(|(q, _)| *q != p);
                    batch.next.push((p, o + 1));
                    if batch.timestamps.len() >= self.batch_max {
                        self.publish(&mut view, &mut batch, &mut loading).await?;
                    }
                }
                _ = tokio::time::sleep_until(publish_at.unwrap_or_else(Instant::now)), if publish_at.is_some() => {
                    self.publish(&mut view, &mut batch, &mut loading).await?;
                }
                _ = stop.changed() => break,
            }
        }
        self.publish(&mut view, &mut batch, &mut loading).await?;
        self.catalogue.flush()?;
        Ok(())
    }

    /// Checks, once the topic is back with as many partitions as when
    /// assigned, that each partition's log is the one read: one the broker
    /// said it did not have since the last check is new, and so is one
    /// whose end marker lands below where the consumer reads on (see
    /// [`Landed`](super::kafka::Landed)). Such a partition is read again
    /// from its start. Whether it could check.
    async fn check_logs(&mut self) -> Result<bool, CatalogueConsumerError> {
        let listed = tokio::task::block_in_place(|| {
            listed(&self.consumer, &self.topic, Duration::from_secs(2))
        });
        match listed {
            // The brokers are away.
            None => return Ok(false),
            Some(n) if n != self.partitions.len() => {
                self.topic_went |= n == 0;
                return Ok(false);
            }
            Some(_) => {}
        }
        let token = format!("{}/check/{}", self.instance, now_ms());
        let mut landed = Vec::with_capacity(self.partitions.len());
        for &p in &self.partitions {
            match self.outbox.mark(&self.topic, p, &token).await {
                Ok(end) => landed.push((p, self.next[&p], end)),
                Err(_) => return Ok(false),
            }
        }
        let went = std::mem::take(&mut self.topic_went);
        let mut again = false;
        for (p, from, end) in landed {
            if went || restarted(end, from) {
                self.restart(p, end)?;
                again = true;
            }
        }
        if again {
            // One assignment for all: librdkafka aborts on an assignment
            // made while the last one is still being taken up.
            self.reassign()?;
        }
        Ok(true)
    }

    /// Makes `partition` be read again from its start (at the next
    /// [`reassign`](Self::reassign)): the log it was read from is gone (its
    /// end marker landed at `end`, below where the consumer reads on; or the
    /// topic was gone). Its base is raised past every position given from
    /// the old log first, durably, so that the new log's events are
    /// applied, not taken for replays.
    fn restart(&mut self, partition: i32, end: i64) -> Result<(), CatalogueConsumerError> {
        let read = self.next[&partition];
        let base = self.bases[&partition] + read as u64;
        self.catalogue
            .registry()
            .meta_set(&base_key(&self.topic, partition), &base.to_be_bytes())?;
        self.bases.insert(partition, base);
        self.next.insert(partition, 0);
        self.read_before.remove(&partition);
        tracing::warn!(
            topic = %self.topic,
            partition,
            read_up_to = read,
            end,
            "the catalogue partition's log began again (the topic was made again, or the broker lost it): reading it from the start"
        );
        Ok(())
    }

    /// Marks the catalogue loaded once every partition's marker is published.
    /// A re-read to weigh the words anew is done then too.
    fn check_loaded(
        &mut self,
        loading: &mut Loading,
        marked: &[i32],
    ) -> Result<(), CatalogueConsumerError> {
        for p in marked {
            loading.waiting.remove(p);
        }
        if !loading.waiting.is_empty() {
            return Ok(());
        }
        if let Some(digest) = self.reweigh.take() {
            self.catalogue.registry().meta_set(WEIGHTING_KEY, &digest)?;
            self.read_before.clear();
        }
        if !self.metrics.catalogue_loaded.load(Relaxed) {
            tracing::info!(
                live = self.catalogue.registry().live_count(),
                "catalogue loaded"
            );
            self.metrics.catalogue_loaded.store(true, Relaxed);
        }
        Ok(())
    }

    /// Applies one message to the registry and the view; an error is the
    /// dead letter's reason.
    fn apply(
        &mut self,
        view: &mut View,
        decoded: Result<CatalogueEvent, DecodeError>,
        position: Position,
    ) -> Result<Rejected, CatalogueConsumerError> {
        let event = match decoded {
            Ok(e) => e,
            Err(e) => return Ok(Err(decode_reason(e))),
        };
        let change = match &event.change {
            ItemChange::Upsert(up) => {
                let spec = &self.catalogue.tokenizer().manifest().input.encoder;
                let c = match content(up, spec) {
                    Ok(c) => c,
                    Err(e) => return Ok(Err(content_reason(e))),
                };
                let hash = c.hash();
                let text = self.text.as_ref();
                self.catalogue
                    .upsert_with(&up.item_id, hash, position, |tokenizer| {
                        vector(&up.item_id, &c, text, tokenizer)
                    })
            }
            ItemChange::Retire(r) => self.catalogue.retire(&r.item_id, position),
        };
        let change = match change {
            Ok(c) => c,
            Err(CatalogueError::Registry(RegistryError::Codes { source, .. }))
                if source.is::<ContentError>() =>
            {
                let e = source.downcast::<ContentError>().expect("checked");
                return Ok(Err(content_reason(*e)));
            }
            Err(CatalogueError::Registry(
                e @ (RegistryError::PrefixFull { .. } | RegistryError::Codes { .. }),
            )) => return Ok(Err((Reason::Tokenizer, e.to_string()))),
            Err(e) => return Err(e.into()),
        };
        let id = event.item_id();
        let spilled = self.catalogue.spilled() - self.metrics.items_spilled.get();
        if spilled > 0 {
            self.metrics.items_spilled.inc_by(spilled);
            if let Some(held_back) = self.spilled.pass(std::time::Instant::now()) {
                tracing::warn!(
                    item = id,
                    held_back,
                    "an item's content prefix is full: it was given a SID in the prefix next to it; if this goes on, train the tokenizer with a larger --last-level-capacity"
                );
            }
        }
        // An applied upsert's words replace the item's, whether or not its
        // SID moved; a replay (the entry holds a later position) leaves
        // them.
        let words = match &event.change {
            ItemChange::Upsert(up) => self.fresh.as_ref().and_then(|f| f.words_of(up)),
            ItemChange::Retire(_) => None,
        };
        let entry = match (change, &words) {
            (LiveChange::Unchanged, None) => return Ok(Ok(())),
            _ => self.catalogue.registry().get(id)?,
        };
        if let Some(e) = entry.as_ref().filter(|e| e.applied.spread()) {
            if let Some(held_back) = self.unkeyed.pass(std::time::Instant::now()) {
                tracing::warn!(
                    item = id,
                    partitions = ?e.applied.partitions().collect::<Vec<_>>(),
                    held_back,
                    "an item's catalogue events came on more than one partition: they are applied in the order read, which Kafka keeps within a partition only; key the catalogue's records by item_id"
                );
            }
        }
        if let (Some(e), Some(words)) = (&entry, words) {
            if e.applied.last() == Some(position) {
                self.catalogue.set_content(e.ord, &words);
                view.content.insert(e.ord, words);
            }
        }
        if change == LiveChange::Unchanged {
            return Ok(Ok(()));
        }
        if let LiveChange::RetiredUnseen { .. } = change {
            self.metrics.retired_unseen.inc();
        }
        if let Some(e) = entry {
            let id: Arc<str> = view
                .item(e.ord)
                .map(|i| i.id.clone())
                .unwrap_or_else(|| id.into());
            view.ords.insert(id.clone(), e.ord);
            view.items.insert(e.ord, ItemRef::of(id, &e));
        }
        Ok(Ok(()))
    }

    fn count_fresh(&self, view: &View) {
        let n = view.fresh.as_ref().map_or(0, |f| f.len());
        self.metrics.fresh_items.set(n as i64);
    }

    async fn publish(
        &mut self,
        view: &mut View,
        batch: &mut Batch,
        loading: &mut Loading,
    ) -> Result<(), CatalogueConsumerError> {
        if batch.first.is_none() {
            return Ok(());
        }
        // A batch of markers alone (the checks of the logs write one every
        // few seconds) changed nothing to publish once loaded.
        if !batch.timestamps.is_empty() || !loading.waiting.is_empty() {
            // The fresh set is published too (up to `feed.fresh_max` items,
            // the rows of the new ones built): off the runtime, with the
            // index.
            tokio::task::block_in_place(|| -> Result<(), CatalogueConsumerError> {
                view.snapshot = self.catalogue.publish()?;
                view.fresh = self.fresh.as_ref().map(|f| {
                    f.items(
                        &mut self.fresh_rows,
                        &view.snapshot,
                        &view.items,
                        &view.content,
                    )
                });
                Ok(())
            })?;
            self.view.store(Arc::new(view.clone()));
            self.published.send_replace(());
            let now = now_ms();
            for &ts in &batch.timestamps {
                self.metrics
                    .decodable_latency
                    .observe((now - ts) as f64 / 1000.0);
            }
            self.metrics
                .index_generation
                .set(view.snapshot.seq() as i64);
            self.metrics
                .live_items
                .set(self.catalogue.registry().live_count() as i64);
            self.count_fresh(view);
        }
        for d in batch.dead.drain(..) {
            self.outbox.delivered(d, &self.metrics).await;
        }
        tokio::task::block_in_place(|| -> Result<(), CatalogueConsumerError> {
            self.catalogue.flush()?;
            for &(p, next) in &batch.next {
                // A re-read keeps the offset it started from until it
                // passes it: a crash before then re-reads from the start
                // again and knows what was dead-lettered.
                if self.read_before.get(&p).is_some_and(|&b| next < b) {
                    continue;
                }
                self.catalogue
                    .registry()
                    .meta_set(&offset_key(&self.topic, p), &next.to_be_bytes())?;
            }
            Ok(())
        })?;
        self.check_loaded(loading, &batch.marked)?;
        *batch = Batch::default();
        Ok(())
    }
}

/// Why a message goes to the dead-letter topic.
type Rejected = Result<(), (Reason, String)>;

#[derive(Default)]
struct Batch {
    first: Option<Instant>,
    timestamps: Vec<i64>,
    /// Next offset per partition, once the batch is durable.
    next: Vec<(i32, i64)>,
    /// Partitions whose end marker this batch read.
    marked: Vec<i32>,
    dead: Vec<Sent>,
}

pub fn decode_reason(e: DecodeError) -> (Reason, String) {
    let reason = match &e {
        DecodeError::UnknownSchemaId(_) | DecodeError::WrongRecord { .. } => Reason::UnknownSchema,
        DecodeError::Invalid { .. } => Reason::InvalidRecord,
        DecodeError::OverLimit { .. } => Reason::TooLarge,
        _ => Reason::Undecodable,
    };
    (reason, e.to_string())
}

fn content_reason(e: ContentError) -> (Reason, String) {
    let reason = match &e {
        ContentError::Vector(_) | ContentError::ZeroEmbedding { .. } => Reason::BadEmbedding,
        _ => Reason::NoContent,
    };
    (reason, e.to_string())
}
