//! The model side: batches of users in, delivered-to-be feeds out.
//!
//! Runs on its own OS thread, so that model work never delays the consumers'
//! polling (a consumer that does not poll within `max.poll.interval.ms` is
//! thrown out of its group). For each batch it reads the users' histories,
//! runs one beam search for all of them against the current catalogue view,
//! drops anything that stopped being live while it searched, and hands the
//! feeds to the producer. Deliveries are awaited elsewhere
//! ([`super::delivery::acknowledge`]).
//!
//! The histories are made durable once per `FLUSH_EVERY`, not per batch
//! (a redb fsync rewrites the pages of every user touched, and the batch
//! waits for it): what makes an append safe is its changelog record,
//! acknowledged before the offset of its interaction is committed. With
//! each flush the worker records the changelog offsets acknowledged so far
//! beside the histories; after a crash the restore reads the changelog from
//! there, and brings back every append the last flush did not make durable.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::sync::watch;

use super::delivery::{Outbox, Sent};
use super::histories::{Histories, HistoryError};
use super::kafka::now_ms;
use super::learnt::{BatchCounts, Counts, LearntSettings, SharedCounts};
use super::metrics::Metrics;
use super::reason::Reason;
use super::refresh::{self, Refresh};
use super::scheduler::Job;
use super::view::{SharedView, View};
use crate::contract::{InputPosition, RankedItem, Recommendation};
use crate::model::{Filter, Generator, Learnt, Model, Request, SearchOptions, Transitions};
use crate::sid::Sid;

pub struct FeedWorker {
    pub model: Model,
    /// Successor counts mixed into the search, with their weight, when the
    /// model was fitted with them ([`crate::model::transitions`]).
    pub transitions: Option<(Transitions, f32)>,
    pub model_version: String,
    pub tokenizer_version: String,
    pub interactions_topic: String,
    pub view: SharedView,
    pub histories: Arc<Histories>,
    pub outbox: Arc<Outbox>,
    pub metrics: Arc<Metrics>,
    pub search: SearchOptions,
    /// Business rule: item ids never recommended.
    pub deny_items: Vec<String>,
    /// `feed.fresh_weight`: the weight of the view's fresh items.
    pub fresh_weight: f32,
    /// `feed.fresh_share`: the share of feed slots that weight is moved to
    /// hold them to.
    pub fresh_share: Option<f32>,
    /// Counts learnt from the stream, added to the trained ones; `None`:
    /// learning is off.
    pub learnt: Option<(SharedCounts, LearntSettings)>,
    /// Feeds for idle users, made when no live batch waits; `None`:
    /// `feed.refresh_ms` is 0.
    pub refresh: Option<Refresh>,
    /// The runtime, to wait for a batch or the next refresh step, whichever
    /// comes first.
    pub runtime: tokio::runtime::Handle,
    /// Turns true when the service stops: no refresh step after it.
    pub stop: watch::Receiver<bool>,
}

/// How often the histories are made durable.
const FLUSH_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    #[error(transparent)]
    History(#[from] super::histories::HistoryError),
    #[error("beam search: {0}")]
    Model(#[from] crate::model::ModelError),
}

impl FeedWorker {
    /// Serves batches until `jobs` closes; every delivery goes to `sent`.
    /// A batch that fails (a corrupt history, a model error) costs its users
    /// a dead letter each, not the worker.
    ///
    /// A histories store that fails (a full disk, an I/O error) is another
    /// matter: it is not one batch's fault, every batch after would fail
    /// alike, and dead-lettering them all would throw good interactions
    /// away, as fast as they come. So the worker stops and returns the
    /// error, the service stops with it, and the batch's interactions, never
    /// finished, stay uncommitted: a restart reads them again.
    pub fn run(
        mut self,
        mut jobs: mpsc::Receiver<Vec<Job>>,
        sent: mpsc::Sender<Sent>,
    ) -> Result<(), FeedError> {
        let mut refresh = self.refresh.take();
        let mut stop = self.stop.clone();
        let mut scratch = Scratch {
            generator: Generator::new(&self.model).with_fresh_share(self.fresh_share),
            ords: Vec::new(),
            histories: Vec::new(),
            deny: (u64::MAX, Filter::default()),
            learnt: None,
            flushed: Instant::now(),
        };
        if let Some((t, w)) = &self.transitions {
            scratch.generator = scratch.generator.with_transitions(t, *w);
        }
        while let Some(batch) = refresh::next_batch(
            &mut refresh,
            &mut stop,
            &mut jobs,
            &self.histories,
            &self.metrics,
            &self.runtime,
        )? {
            let start = Instant::now();
            let out: Vec<Sent> = match self.answer(&mut scratch, &batch) {
                Ok(feeds) => {
                    self.metrics
                        .generate_seconds
                        .observe(start.elapsed().as_secs_f64());
                    self.metrics.batch_users.observe(batch.len() as f64);
                    batch
                        .into_iter()
                        .zip(feeds)
                        .map(|(job, items)| self.feed(job, items))
                        .collect()
                }
                Err(e @ FeedError::History(HistoryError::Store(_))) => {
                    tracing::error!(error = %e, "the histories store failed: stopping");
                    return Err(e);
                }
                Err(e) => {
                    tracing::error!(error = %e, users = batch.len(), "a feed batch failed");
                    let detail = format!("the feed batch failed: {e}");
                    // A refresh answers no event: nothing to dead-letter,
                    // and the next pass tries its users again.
                    batch
                        .into_iter()
                        .filter(|job| !job.triggers.is_empty())
                        .map(|job| {
                            self.metrics.dead_letter(Reason::FeedFailed);
                            let source = (
                                &*self.interactions_topic,
                                job.last.partition,
                                job.last.offset,
                            );
                            let detail = format!("user {:?}: {detail}", job.user);
                            self.outbox.dead_letter(
                                source,
                                Reason::FeedFailed,
                                &detail,
                                &[],
                                job.triggers,
                            )
                        })
                        .collect()
                }
            };
            for s in out {
                if sent.blocking_send(s).is_err() {
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// One feed per job of the batch, in order: the histories read, one
    /// beam search for all of them, and the histories made durable when
    /// [`FLUSH_EVERY`] has passed.
    fn answer<'a>(
        &'a self,
        scratch: &mut Scratch<'a>,
        batch: &[Job],
    ) -> Result<Vec<Vec<RankedItem>>, FeedError> {
        let view = self.view.load_full();
        let Scratch {
            generator,
            ords,
            histories,
            deny,
            learnt,
            flushed,
        } = scratch;
        if deny.0 != view.snapshot.seq() {
            let sids = self
                .deny_items
                .iter()
                .filter_map(|id| view.ord(id).and_then(|o| view.item(o)?.sid));
            *deny = (view.snapshot.seq(), Filter::default().deny(sids));
        }
        histories.resize_with(batch.len(), Vec::new);
        for (job, h) in batch.iter().zip(histories.iter_mut()) {
            self.histories.get(&job.user, ords)?;
            h.clear();
            h.extend(ords.iter().filter_map(|&o| view.item(o)?.sid));
        }
        // Users whose history has no item the model can read get an
        // empty feed rather than none: their events are answered.
        let asked: Vec<usize> = (0..batch.len())
            .filter(|&i| !histories[i].is_empty())
            .collect();
        let requests: Vec<Request<'_>> = asked
            .iter()
            .map(|&i| Request {
                history: &histories[i],
                filter: Some(&deny.1),
            })
            .collect();
        generator.set_fresh(view.fresh.clone(), self.fresh_weight);
        generator.set_learnt(self.learnt.as_ref().map(|(shared, settings)| {
            let counts = shared.load_full();
            match learnt {
                Some(f) if Arc::ptr_eq(&f.counts, &counts) && Arc::ptr_eq(&f.view, &view) => {
                    f.learnt.clone()
                }
                _ => {
                    let l: Arc<dyn Learnt> =
                        Arc::new(BatchCounts::new(counts.clone(), view.clone(), *settings));
                    *learnt = Some(LearntFor {
                        counts,
                        view: view.clone(),
                        learnt: l.clone(),
                    });
                    l
                }
            }
        }));
        let generated = generator.generate(&view.snapshot, &requests, &self.search)?;
        if let Some(w) = generator.fresh_weight() {
            self.metrics.fresh_weight.set(w as f64);
        }
        // Items retired while the search ran are dropped here: a retire
        // is never followed by a feed holding the item.
        let now = self.view.load_full();
        let mut feeds: Vec<Vec<RankedItem>> = vec![Vec::new(); batch.len()];
        for (&i, items) in asked.iter().zip(generated) {
            feeds[i] = items
                .into_iter()
                .filter(|g| now.is_live(g.ord, g.sid))
                .filter_map(|g| {
                    Some(RankedItem {
                        item_id: now.item(g.ord)?.id.to_string(),
                        sid: g.sid.codes().to_vec(),
                        score: g.log_prob,
                    })
                })
                .collect();
        }
        if flushed.elapsed() >= FLUSH_EVERY {
            for (p, offset) in self.outbox.changelog_acknowledged_all() {
                self.histories.set_changelog_offset(p, offset)?;
            }
            self.histories.flush()?;
            *flushed = Instant::now();
        }
        Ok(feeds)
    }

    fn feed(&self, job: Job, items: Vec<RankedItem>) -> Sent {
        let rec = Recommendation {
            user_id: job.user.clone(),
            items,
            model_version: self.model_version.clone(),
            tokenizer_version: self.tokenizer_version.clone(),
            generated_at: now_ms(),
            trigger: InputPosition {
                topic: self.interactions_topic.clone(),
                partition: job.last.partition,
                offset: job.last.offset,
            },
        };
        let payload = self.outbox.wire().recommendation(&rec);
        self.outbox.feed(&job.user, payload, job.triggers)
    }
}

/// Learnt counts in the SIDs of one view, and the pair they came from.
struct LearntFor {
    counts: Arc<Counts>,
    view: Arc<View>,
    learnt: Arc<dyn Learnt>,
}

/// What the worker keeps between batches.
struct Scratch<'m> {
    generator: Generator<'m>,
    ords: Vec<u32>,
    histories: Vec<Vec<Sid>>,
    /// The deny filter and the snapshot it was built for.
    deny: (u64, Filter),
    /// The learnt counts in the SIDs of a view, built once per published
    /// pair (the counts publish every 200 ms, the view at catalogue
    /// changes), not once per batch.
    learnt: Option<LearntFor>,
    /// When the histories were last made durable.
    flushed: Instant,
}
