//! What the service learns from the stream: successor counts and
//! popularity, without retraining.
//!
//! The model and its trained successor counts are frozen at training time,
//! so an item first clicked after training, or one that became popular
//! since, would stay out of the feeds until the next training run. The
//! cheapest thing that learns it is what `genfeed train` counts: "after item
//! `a`, users took `b`" ([`crate::model::transitions`]), plus how often each
//! item was taken. Both are counted here as interactions are consumed and
//! mixed into the search ([`crate::model::Learnt`]): a learnt transition
//! weighs `learning.successor_weight` trained ones, and the items popular
//! lately take `learning.popularity_share` of the counts' part of the
//! mixture. Among the fresh items (those training never saw, scored by
//! their content), how often each was taken reorders their content
//! probabilities (`learning.fresh_popularity`): of the new items near a
//! user's last one, those catching on come first.
//!
//! # One state on every instance
//!
//! The counts are global (any user's step counts for every user), but each
//! instance reads only its own partitions of the interactions. So they are
//! counted from the histories changelog instead, which every instance reads
//! whole, not in a group, like the catalogue: each record there is one
//! append, whose last two items are the step taken. Every instance therefore
//! applies the same records, and the same history gets the same feed
//! whichever instance owns the user; a rebalance changes nothing here.
//! Records name items by id ([`super::changelog`]), so none is read before
//! the catalogue as it stood at start is in the view, and one written since
//! that names an item this instance has not read yet (its catalogue reader
//! behind the writer's, in a burst of new items) waits for it
//! ([`changelog::Reader`]).
//!
//! # Exactly once, across restarts
//!
//! Counts, the changelog offsets they were read up to, and the newest
//! interaction position applied per interactions partition are committed
//! together in one store ([`Store`], `learnt/learnt.redb`): a crash reopens
//! at the last commit and reads the changelog on from its offsets, so
//! nothing is lost or counted twice. A changelog record written twice (an
//! append redone after a crash before its history was durable) carries an
//! interaction position applied already and is skipped. At start the
//! service waits until this reader has reached the changelog's end as it
//! stood (an end marker of its own, as the catalogue does) before it answers
//! interactions, so a restarted instance never serves from stale counts.
//!
//! Once caught up, the counts trail the stream by up to about a second: the
//! reader's fetches wait a second for new records ([`FetchWait::Trailing`]),
//! which spares the broker a fetch every 100 ms for counts that move slowly
//! (0.04 of a core of tansu's CPU at 300 interactions/s).
//!
//! [`FetchWait::Trailing`]: super::kafka::FetchWait::Trailing
//!
//! # Bounded memory
//!
//! At most `learning.successors_per_item` successors per item: a new one
//! replaces the least counted (oldest first among equals) at count 1, so an
//! item's strong successors stay and rare ones churn. Popularity is one
//! count per item ever taken; the `learning.popular_items` most taken are
//! kept ranked as counts rise (counts only rise, so this is exact and the
//! same on every instance). Memory is about `16 + 8 ×
//! successors_per_item` bytes per item with successors and 8 per item taken
//! (plus the maps' overhead); nothing per user. There is no decay yet:
//! counts accumulate since the state was created.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::Producer;
use rdkafka::{Offset, TopicPartitionList};

use super::changelog::{self, Record};
use super::histories::Position;
use super::kafka::{
    listed, mark_ends, now_ms, partitions, Logged, MarkerProducer, Recovered, Throttle,
    CHECK_EVERY, MARKER_KEY, METADATA_TIMEOUT, RECHECK_EVERY,
};
use super::metrics::Metrics;
use super::view::View;
use crate::model::Learnt;
use crate::sid::Sid;
use crate::store::{Store, StoreError};

/// Changelog records applied per commit at most.
const BATCH: usize = 4096;

/// How often what was read is committed and published at most: counts may
/// trail the stream by this much, and a commit costs page writes.
const COMMIT_EVERY: Duration = Duration::from_millis(200);

/// How often a commit is made durable (an fsync) at most: a crash re-reads
/// at most this much of the changelog, which holds everything.
const DURABLE_EVERY: Duration = Duration::from_secs(10);

/// How long the start-up catch-up may take before the service serves
/// without it (with an error in the log).
const CATCH_UP: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum LearntError {
    #[error("learnt counts: {0}")]
    Store(#[from] StoreError),
    #[error("learnt counts: the stored record {key:?} is corrupt ({len} bytes)")]
    Corrupt { key: Vec<u8>, len: usize },
    #[error("learnt counts: histories changelog {topic:?}: {source}")]
    Kafka {
        topic: String,
        source: rdkafka::error::KafkaError,
    },
}

/// How learnt counts are kept and mixed (`[learning]` in the config).
#[derive(Clone, Copy, Debug)]
pub struct LearntSettings {
    pub successor_weight: f32,
    pub popularity_share: f32,
    pub successors_per_item: usize,
    pub popular_items: usize,
    pub fresh_popularity: f32,
}

/// One published state of the learnt counts, by registry ord (an item that
/// moves to a new SID keeps what was learnt about it).
#[derive(Clone, Default)]
pub struct Counts {
    /// Item → its successors and how often each followed it.
    successors: imbl::HashMap<u32, Arc<Vec<(u32, u32)>>>,
    /// The most taken items and their counts, most taken first.
    popular: Arc<[(u32, u32)]>,
    /// How often each item was taken.
    taken: imbl::HashMap<u32, u32>,
}

impl Counts {
    /// What followed `ord`, and how often.
    pub fn successors(&self, ord: u32) -> &[(u32, u32)] {
        self.successors.get(&ord).map_or(&[], |v| v.as_slice())
    }

    /// The most taken items, most taken first.
    pub fn popular(&self) -> &[(u32, u32)] {
        &self.popular
    }
}

/// The current counts, readable from any thread without a lock.
pub type SharedCounts = Arc<ArcSwap<Counts>>;

/// The learnt counts of one feed batch, in the SIDs of its view.
pub struct BatchCounts {
    counts: Arc<Counts>,
    view: Arc<View>,
    settings: LearntSettings,
    popular: Vec<(Sid, f32)>,
}

impl BatchCounts {
    pub fn new(counts: Arc<Counts>, view: Arc<View>, settings: LearntSettings) -> BatchCounts {
        let mut popular: Vec<(Sid, f32)> = counts
            .popular()
            .iter()
            .filter_map(|&(o, n)| {
                let sid = view.item(o)?.sid?;
                view.is_live(o, sid).then_some((sid, n as f32))
            })
            .collect();
        popular.sort_unstable_by(|a, b| a.0.codes().cmp(b.0.codes()));
        BatchCounts {
            counts,
            view,
            settings,
            popular,
        }
    }
}

impl Learnt for BatchCounts {
    fn successors(&self, last: Sid, out: &mut Vec<(Sid, f32)>) {
        let Some(ord) = self.view.snapshot.get(last) else {
            return;
        };
        let w = self.settings.successor_weight;
        out.extend(
            self.counts
                .successors(ord)
                .iter()
                .filter_map(|&(o, n)| Some((self.view.item(o)?.sid?, n as f32 * w))),
        );
    }

    fn popular(&self) -> &[(Sid, f32)] {
        &self.popular
    }

    fn popularity_share(&self) -> f32 {
        self.settings.popularity_share
    }

    fn fresh_boost(&self, sid: Sid) -> f32 {
        let taken = self
            .view
            .snapshot
            .get(sid)
            .and_then(|o| self.counts.taken.get(&o).copied())
            .unwrap_or(0);
        (1.0 + taken as f32).powf(self.settings.fresh_popularity)
    }
}

const SUCCESSORS: u8 = b's';
const POPULARITY: u8 = b'p';
/// Meta keys start with a NUL byte, item keys never do.
const APPLIED: &[u8] = b"\0applied/";
const READ: &[u8] = b"\0read/";

fn item_key(kind: u8, ord: u32) -> Vec<u8> {
    let mut k = vec![kind];
    k.extend_from_slice(&ord.to_be_bytes());
    k
}

fn meta_key(prefix: &[u8], partition: i32) -> Vec<u8> {
    [prefix, &partition.to_be_bytes()].concat()
}

/// What one changelog record teaches: where its interaction was read, and
/// the user's previous and newest items after it, as this instance's ords.
#[derive(Clone, Copy, Debug)]
pub struct Step {
    pub at: Position,
    pub previous: Option<u32>,
    pub last: u32,
}

/// The writer: applies changelog records, commits them with their offsets,
/// and publishes [`Counts`].
pub struct Learner {
    db: Store,
    settings: LearntSettings,
    counts: Counts,
    /// The `popular_items` greatest `(count, ord)`.
    top: BTreeSet<(u32, u32)>,
    /// Per interactions partition, the newest offset applied.
    applied: HashMap<i32, i64>,
    /// Per changelog partition, the next offset to read.
    read: HashMap<i32, i64>,
    dirty_successors: HashSet<u32>,
    dirty_popularity: HashSet<u32>,
    pairs: usize,
}

impl Learner {
    /// Opens (or creates) the counts in `dir`.
    pub fn open(dir: &Path, settings: LearntSettings) -> Result<Learner, LearntError> {
        let db = Store::open_in(dir, "learnt.redb", DURABLE_EVERY)?;
        let mut l = Learner {
            db,
            settings,
            counts: Counts::default(),
            top: BTreeSet::new(),
            applied: HashMap::new(),
            read: HashMap::new(),
            dirty_successors: HashSet::new(),
            dirty_popularity: HashSet::new(),
            pairs: 0,
        };
        let corrupt = |key: &[u8], len| LearntError::Corrupt {
            key: key.to_vec(),
            len,
        };
        let entries: Vec<_> = l.db.scan(&[])?.collect::<Result<_, _>>()?;
        for (key, value) in entries {
            let be4 = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
            match key.first() {
                Some(&SUCCESSORS) if key.len() == 5 && value.len() % 8 == 0 => {
                    let list: Vec<(u32, u32)> = value
                        .chunks_exact(8)
                        .map(|c| (be4(&c[..4]), be4(&c[4..])))
                        .collect();
                    l.pairs += list.len();
                    l.counts.successors.insert(be4(&key[1..]), Arc::new(list));
                }
                Some(&POPULARITY) if key.len() == 5 && value.len() == 4 => {
                    l.set_popularity(be4(&key[1..]), be4(&value));
                }
                Some(0) if value.len() == 8 => {
                    let offset = i64::from_be_bytes(value[..].try_into().expect("8 bytes"));
                    let partition = key[key.len().saturating_sub(4)..]
                        .try_into()
                        .map(i32::from_be_bytes)
                        .map_err(|_| corrupt(&key, value.len()))?;
                    if key.starts_with(APPLIED) {
                        l.applied.insert(partition, offset);
                    } else if key.starts_with(READ) {
                        l.read.insert(partition, offset);
                    }
                }
                _ => return Err(corrupt(&key, value.len())),
            }
        }
        l.counts.popular = l.ranked();
        Ok(l)
    }

    /// What was learnt so far (published by the reader as it goes).
    pub fn counts(&self) -> &Counts {
        &self.counts
    }

    /// The next changelog offset to read in `partition`, if any was read.
    pub fn next_offset(&self, partition: i32) -> Option<i64> {
        self.read.get(&partition).copied()
    }

    /// Applies the changelog record read at `offset` of `partition`, which
    /// took `step` (`None` for a record that counts nothing: a marker, one
    /// that is not a history, one whose newest item this instance does not
    /// know). Whether it counted (a replay does not).
    pub fn apply(&mut self, partition: i32, offset: i64, step: Option<Step>) -> bool {
        self.read.insert(partition, offset + 1);
        let Some(Step { at, previous, last }) = step else {
            return false;
        };
        if self.is_applied(at) {
            return false;
        }
        self.applied.insert(at.partition, at.offset);
        let n = self.counts.taken.get(&last).copied().unwrap_or(0) + 1;
        self.set_popularity(last, n);
        self.dirty_popularity.insert(last);
        if let Some(from) = previous {
            self.add_successor(from, last);
            self.dirty_successors.insert(from);
        }
        true
    }

    /// Starts `partition` over: its changelog's log and the interactions'
    /// it records began again, so offsets read from the old ones mean
    /// nothing (see [`Landed`](super::kafka::Landed)). The counts stay.
    pub fn restart(&mut self, partition: i32) {
        self.applied.insert(partition, -1);
        self.read.insert(partition, 0);
    }

    fn is_applied(&self, at: Position) -> bool {
        self.applied
            .get(&at.partition)
            .is_some_and(|&o| at.offset <= o)
    }

    fn add_successor(&mut self, from: u32, to: u32) {
        let cap = self.settings.successors_per_item.max(1);
        let list = Arc::make_mut(self.counts.successors.entry(from).or_default());
        if let Some(e) = list.iter_mut().find(|e| e.0 == to) {
            e.1 += 1;
        } else if list.len() < cap {
            list.push((to, 1));
            self.pairs += 1;
        } else {
            // The least counted goes; among equals the oldest (first).
            let (i, _) = list
                .iter()
                .enumerate()
                .min_by_key(|(i, e)| (e.1, *i))
                .expect("a full list is not empty");
            list.remove(i);
            list.push((to, 1));
        }
    }

    fn set_popularity(&mut self, ord: u32, n: u32) {
        let old = self.counts.taken.insert(ord, n).unwrap_or(0);
        let cap = self.settings.popular_items;
        if self.top.remove(&(old, ord)) || self.top.len() < cap {
            self.top.insert((n, ord));
        } else if self.top.first().is_some_and(|&least| (n, ord) > least) {
            self.top.pop_first();
            self.top.insert((n, ord));
        }
    }

    fn ranked(&self) -> Arc<[(u32, u32)]> {
        self.top.iter().rev().map(|&(n, o)| (o, n)).collect()
    }

    /// Commits everything applied since the last commit, with the offsets
    /// it was read up to, as one write, and returns the counts to publish.
    pub fn commit(&mut self) -> Result<Counts, LearntError> {
        let mut writes: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        for &from in &self.dirty_successors {
            let value = self
                .counts
                .successors(from)
                .iter()
                .flat_map(|&(o, n)| [o.to_be_bytes(), n.to_be_bytes()])
                .flatten()
                .collect();
            writes.push((item_key(SUCCESSORS, from), value));
        }
        for &ord in &self.dirty_popularity {
            let n = self.counts.taken[&ord];
            writes.push((item_key(POPULARITY, ord), n.to_be_bytes().to_vec()));
        }
        for (&p, &o) in &self.applied {
            writes.push((meta_key(APPLIED, p), o.to_be_bytes().to_vec()));
        }
        for (&p, &o) in &self.read {
            writes.push((meta_key(READ, p), o.to_be_bytes().to_vec()));
        }
        self.db
            .write(writes.iter().map(|(k, v)| (&k[..], Some(&v[..]))))?;
        if !self.dirty_popularity.is_empty() {
            self.counts.popular = self.ranked();
        }
        self.dirty_successors.clear();
        self.dirty_popularity.clear();
        Ok(self.counts.clone())
    }

    /// Distinct `(item, successor)` pairs held.
    pub fn pairs(&self) -> usize {
        self.pairs
    }

    /// Items taken at least once.
    pub fn items(&self) -> usize {
        self.counts.taken.len()
    }

    /// Makes every commit durable.
    pub fn flush(&self) -> Result<(), LearntError> {
        Ok(self.db.flush()?)
    }
}

/// Reads the whole histories changelog into a [`Learner`] on its own
/// thread (the client is polled off the runtime), publishing after each
/// commit, until `stop`.
pub struct LearntReader {
    pub learner: Learner,
    pub consumer: BaseConsumer<Logged>,
    pub marker: MarkerProducer,
    pub topic: String,
    pub instance: String,
    pub shared: SharedCounts,
    pub metrics: Arc<Metrics>,
    pub steps: Steps,
}

impl LearntReader {
    /// Assigns every changelog partition from its stored offset (or the
    /// start) and writes an end marker to each; returns the partitions
    /// whose marker is still to be read and the marker's token.
    fn start(&mut self) -> Result<(HashSet<i32>, String), LearntError> {
        let topic = self.topic.clone();
        let kafka = |source| LearntError::Kafka {
            topic: topic.clone(),
            source,
        };
        let token = format!("{}/learnt/{}", self.instance, now_ms());
        let listed = partitions(&self.consumer, &self.topic).map_err(kafka)?;
        let (landed, failed) = mark_ends(&self.marker, &self.topic, &listed, &token);
        if let Some((_, e)) = failed.into_iter().next() {
            return Err(kafka(e));
        }
        self.marker.flush(METADATA_TIMEOUT).map_err(kafka)?;
        let waiting: HashSet<i32> = listed.into_iter().collect();
        let mut tpl = TopicPartitionList::new();
        for &p in &waiting {
            let from = match self.learner.next_offset(p) {
                Some(o) if landed.restarted(p, o) == Some(true) => {
                    self.begin_again(p, o);
                    Offset::Beginning
                }
                Some(o) => Offset::Offset(o),
                None => Offset::Beginning,
            };
            tpl.add_partition_offset(&self.topic, p, from)
                .map_err(kafka)?;
        }
        self.consumer.assign(&tpl).map_err(kafka)?;
        Ok((waiting, token))
    }

    /// Partition `p`'s log began again below offset `read_up_to`: it is
    /// learnt from its start, its replay offsets forgotten.
    fn begin_again(&mut self, p: i32, read_up_to: i64) {
        tracing::warn!(partition = p, read_up_to, topic = %self.topic, "the changelog partition's log began again (the topic was made again, or the broker lost it): learning from it whole, the counts learnt so far kept");
        self.learner.restart(p);
    }

    /// Checks, once the changelog topic is back with all the partitions
    /// assigned, that each partition's log is the one read, as the
    /// catalogue consumer does: one the brokers said was gone (`went`) or
    /// whose end marker lands below the next offset to read is new (see
    /// [`Landed`]), and is learnt from its start with its replay offsets
    /// forgotten. Whether it could check.
    fn check_logs(&mut self, went: &mut bool) -> bool {
        let Some(n) = listed(&self.consumer, &self.topic, RECHECK_EVERY) else {
            return false;
        };
        let Ok(assigned) = self.consumer.assignment() else {
            return false;
        };
        let parts: Vec<i32> = assigned.elements().iter().map(|e| e.partition()).collect();
        if n != parts.len() {
            *went |= n == 0;
            return false;
        }
        let token = format!("{}/learnt-check/{}", self.instance, now_ms());
        let (landed, failed) = mark_ends(&self.marker, &self.topic, &parts, &token);
        if !failed.is_empty() || self.marker.flush(METADATA_TIMEOUT).is_err() {
            return false;
        }
        let went = std::mem::take(went);
        let mut again = false;
        let mut tpl = TopicPartitionList::new();
        for &p in &parts {
            let from = self.learner.next_offset(p).unwrap_or(0);
            if went || landed.restarted(p, from) == Some(true) {
                self.begin_again(p, from);
                again = true;
            }
            let offset = match self.learner.next_offset(p) {
                Some(o) if o > 0 => Offset::Offset(o),
                _ => Offset::Beginning,
            };
            if tpl.add_partition_offset(&self.topic, p, offset).is_err() {
                return false;
            }
        }
        !again || self.consumer.assign(&tpl).is_ok()
    }

    /// Runs until `stop`. Errors are logged: the feeds go on with the last
    /// counts published, and the service is marked caught up regardless, so
    /// learning never stops the service.
    pub fn run(mut self, stop: &AtomicBool) {
        self.shared.store(Arc::new(self.learner.counts().clone()));
        let (mut waiting, token) = match self.start() {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the histories changelog: nothing is learnt from the stream");
                self.metrics.learnt_loaded.store(true, Relaxed);
                return;
            }
        };
        // Records name items by id: none is read before the view holds the
        // catalogue as it stood at start.
        while !self.metrics.catalogue_loaded.load(Relaxed) {
            if stop.load(Relaxed) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let started = Instant::now();
        let mut recovered = Recovered::new(
            "histories changelog (learning)",
            self.metrics.consumer_errors.clone(),
        );
        let (mut read, mut counted, mut committed) = (0, 0, Instant::now());
        // After a consumer error, the logs are checked once the topic is
        // back (see `check_logs`).
        let (mut suspect, mut topic_went, mut checked) = (false, false, Instant::now());
        while !stop.load(Relaxed) {
            match self.consumer.poll(Duration::from_millis(50)) {
                Some(Ok(m)) => {
                    read += 1;
                    let key = m.key().unwrap_or(&[]);
                    if key == MARKER_KEY && m.payload() == Some(token.as_bytes()) {
                        waiting.remove(&m.partition());
                    }
                    let step = match key {
                        MARKER_KEY => None,
                        _ => self.steps.of(&m, stop),
                    };
                    counted += u64::from(self.learner.apply(m.partition(), m.offset(), step));
                }
                Some(Err(e)) => {
                    recovered.note(&e);
                    suspect = true;
                }
                None => {}
            }
            suspect |= checked.elapsed() >= CHECK_EVERY;
            if suspect && checked.elapsed() >= RECHECK_EVERY {
                checked = Instant::now();
                suspect = !self.check_logs(&mut topic_went);
            }
            // While catching up at start, everything up to the markers is
            // committed as soon as they are read: readiness waits for it.
            let catching_up = !self.metrics.learnt_loaded.load(Relaxed);
            let due = committed.elapsed() >= COMMIT_EVERY
                || read >= BATCH
                || (catching_up && waiting.is_empty());
            if read > 0 && due {
                match self.learner.commit() {
                    Ok(counts) => self.shared.store(Arc::new(counts)),
                    Err(e) => {
                        tracing::error!(error = %e, "committing the learnt counts; learning stops here");
                        self.metrics.learnt_loaded.store(true, Relaxed);
                        return;
                    }
                }
                self.metrics.learnt_steps.inc_by(counted);
                self.metrics.learnt_pairs.set(self.learner.pairs() as i64);
                self.metrics.learnt_items.set(self.learner.items() as i64);
                (read, counted, committed) = (0, 0, Instant::now());
            }
            if catching_up && read == 0 && (waiting.is_empty() || started.elapsed() > CATCH_UP) {
                if !waiting.is_empty() {
                    tracing::error!(partitions = ?waiting, "the changelog's end markers were not read in time; serving with the counts learnt so far");
                }
                tracing::info!(
                    pairs = self.learner.pairs(),
                    items = self.learner.items(),
                    ms = started.elapsed().as_millis() as u64,
                    "learnt counts caught up"
                );
                self.metrics.learnt_loaded.store(true, Relaxed);
            }
        }
        if read > 0 {
            if let Ok(counts) = self.learner.commit() {
                self.shared.store(Arc::new(counts));
            }
        }
        if let Err(e) = self.learner.flush() {
            tracing::warn!(error = %e, "flushing the learnt counts");
        }
    }
}

/// Reads changelog records as steps in this instance's ords.
pub struct Steps {
    pub reader: changelog::Reader,
    /// Quiets the warning about records whose items are not known here.
    pub unknown: Throttle,
    /// Quiets the warning about records that are not histories: anyone
    /// who can write to the topic can fill it with them.
    pub malformed: Throttle,
}

impl Steps {
    /// The step of the changelog record `m`; waits for items the view does
    /// not know yet ([`changelog::Reader::view_for`]).
    fn of(&mut self, m: &impl Message, stop: &AtomicBool) -> Option<Step> {
        let (partition, offset) = (m.partition(), m.offset());
        let record = match Record::parse(m.payload().unwrap_or(&[])) {
            Ok(r) => r,
            Err(e) => {
                if let Some(held_back) = self.malformed.pass(Instant::now()) {
                    tracing::warn!(partition, offset, held_back, error = %e, "not counted");
                }
                return None;
            }
        };
        let written = m.timestamp().to_millis();
        let view = self
            .reader
            .view_for(written, |v| record.knows_last_step(v), stop);
        let Some((previous, last)) = record.last_step(&view) else {
            // Compacted away after a tombstone, or not read here in time.
            if let Some(held_back) = self.unknown.pass(Instant::now()) {
                tracing::warn!(partition, offset, held_back, "a histories changelog record whose newest item this instance does not know; not counted");
            }
            return None;
        };
        Some(Step {
            at: record.at,
            previous,
            last,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::view::{numbered, SharedView};
    use rdkafka::message::{OwnedMessage, Timestamp};

    fn settings(successors: usize, popular: usize) -> LearntSettings {
        LearntSettings {
            successor_weight: 1.0,
            popularity_share: 0.1,
            successors_per_item: successors,
            popular_items: popular,
            fresh_popularity: 1.0,
        }
    }

    /// The step of a changelog record: position and the history after the
    /// append.
    fn record(partition: i32, offset: i64, ords: &[u32]) -> Option<Step> {
        let (&last, before) = ords.split_last()?;
        Some(Step {
            at: Position { partition, offset },
            previous: before.last().copied(),
            last,
        })
    }

    #[test]
    fn steps_are_counted_once_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut l = Learner::open(dir.path(), settings(8, 2)).unwrap();
        // User histories after each append: 1 → 2 → 3, and 5 → 2 → 3.
        let records = [
            (0, 10, vec![1]),
            (0, 11, vec![1, 2]),
            (1, 4, vec![5]),
            (0, 12, vec![1, 2, 3]),
            (1, 5, vec![5, 2]),
            (1, 6, vec![5, 2, 3]),
        ];
        for (i, (p, o, h)) in records.iter().enumerate() {
            assert!(l.apply(*p, i as i64, record(*p, *o, h)));
        }
        // A record written twice (an append redone after a crash), a
        // marker and a record that is not a history count nothing.
        assert!(!l.apply(1, 6, record(1, 5, &[5, 2])));
        assert!(!l.apply(1, 7, None));
        assert!(!l.apply(1, 8, None));
        let counts = l.commit().unwrap();
        assert_eq!(counts.successors(2), &[(3, 2)]);
        assert_eq!(counts.successors(1), &[(2, 1)]);
        assert_eq!(counts.successors(5), &[(2, 1)]);
        assert_eq!(counts.popular(), &[(3, 2), (2, 2)]);
        assert_eq!(l.pairs(), 3);
        drop(l);
        let again = Learner::open(dir.path(), settings(8, 2)).unwrap();
        assert_eq!(again.next_offset(1), Some(9));
        assert!(again.is_applied(Position {
            partition: 0,
            offset: 12
        }));
        assert_eq!(again.counts.successors(2), &[(3, 2)]);
        assert_eq!(again.counts.popular(), counts.popular());
        assert_eq!(again.items(), 4);
    }

    #[test]
    fn a_restarted_partition_is_learnt_from_its_start_again() {
        let dir = tempfile::tempdir().unwrap();
        let mut l = Learner::open(dir.path(), settings(4, 4)).unwrap();
        assert!(l.apply(0, 40, record(0, 30, &[1, 2])));
        assert!(l.apply(1, 8, record(1, 9, &[1, 3])));
        // The logs began again: the offsets are low again.
        assert!(!l.apply(0, 0, record(0, 2, &[2, 4])), "a replay");
        l.restart(0);
        assert_eq!(l.next_offset(0), Some(0));
        assert!(l.apply(0, 0, record(0, 2, &[2, 4])));
        assert!(!l.apply(0, 0, record(0, 2, &[2, 4])), "a replay again");
        assert!(!l.apply(1, 9, record(1, 9, &[1, 3])), "partition 1 kept");
        l.commit().unwrap();
        drop(l);
        let l = Learner::open(dir.path(), settings(4, 4)).unwrap();
        assert_eq!(l.next_offset(0), Some(1));
        assert_eq!(l.counts().successors(2), &[(4, 1)]);
        assert_eq!(l.counts().successors(1), &[(2, 1), (3, 1)]);
    }

    #[test]
    fn successors_and_popular_items_are_capped() {
        let dir = tempfile::tempdir().unwrap();
        let mut l = Learner::open(dir.path(), settings(2, 2)).unwrap();
        let steps = [(1, 2), (1, 2), (1, 3), (1, 4), (1, 4), (1, 5)];
        for (i, (a, b)) in steps.into_iter().enumerate() {
            l.apply(0, i as i64, record(0, i as i64, &[a, b]));
        }
        let counts = l.commit().unwrap();
        // 4 replaced 3, the least counted; 5 came with 2 and 4 tied at
        // 2, and replaced 2, the older.
        assert_eq!(counts.successors(1), &[(4, 2), (5, 1)]);
        assert_eq!(l.pairs(), 2);
        assert_eq!(counts.popular(), &[(4, 2), (2, 2)]);
    }

    #[test]
    fn the_same_records_in_another_order_give_the_same_counts() {
        let records: Vec<(i32, i64, Vec<u32>)> = (0..40)
            .map(|i| (i % 3, i as i64, vec![i as u32 % 7, (i as u32 * 5) % 11]))
            .collect();
        let counts = |order: &mut dyn Iterator<Item = &(i32, i64, Vec<u32>)>| {
            let dir = tempfile::tempdir().unwrap();
            let mut l = Learner::open(dir.path(), settings(64, 5)).unwrap();
            for (p, o, h) in order {
                l.apply(*p, *o, record(*p, *o, h));
            }
            let c = l.commit().unwrap();
            let mut s: Vec<(u32, Vec<(u32, u32)>)> = (0..7)
                .map(|a| {
                    let mut v = c.successors(a).to_vec();
                    v.sort_unstable();
                    (a, v)
                })
                .collect();
            s.sort_unstable();
            (s, c.popular().to_vec())
        };
        // Partitions interleave differently on two instances; within a
        // partition the order is the log's.
        let by_partition = (0..3).flat_map(|p| records.iter().filter(move |r| r.0 == p));
        assert_eq!(
            counts(&mut records.iter()),
            counts(&mut by_partition.into_iter())
        );
    }

    #[test]
    fn a_record_written_since_the_start_waits_for_the_catalogue_to_bring_its_items() {
        let writer = numbered(&["a", "b"]);
        let at = Position {
            partition: 0,
            offset: 7,
        };
        let bytes = changelog::record(at, [0, 1].into_iter(), &writer);
        let written = |ms| {
            let t = Timestamp::CreateTime(ms);
            OwnedMessage::new(Some(bytes.clone()), None, "h".into(), t, 0, 3, None)
        };
        let shared: SharedView = Arc::new(ArcSwap::from_pointee(numbered(&["a"])));
        let mut steps = Steps {
            reader: changelog::Reader {
                view: shared.clone(),
                since_ms: 1_000,
            },
            unknown: Throttle::default(),
            malformed: Throttle::default(),
        };
        let go = AtomicBool::new(false);
        // Written before this reader started: its catalogue as of the start
        // is all there is to know.
        assert!(steps.of(&written(999), &go).is_none());
        // Written since: the catalogue brings b (here numbered otherwise).
        let later = shared.clone();
        let publish = std::thread::spawn(move || later.store(Arc::new(numbered(&["b", "x", "a"]))));
        let step = steps.of(&written(1_000), &go).expect("waited for b");
        publish.join().unwrap();
        assert_eq!((step.at, step.previous, step.last), (at, Some(2), 0));
        // A stop ends the wait.
        shared.store(Arc::new(numbered(&["a"])));
        assert!(steps.of(&written(2_000), &AtomicBool::new(true)).is_none());
    }
}
