//! The streaming service: Kafka in, a live feed per user out.
//!
//! ```text
//! catalogue topic ─► CatalogueConsumer ─► registry + index ─► View (swapped whole)
//!                     (assigns all partitions; offsets kept in the registry)   │
//! interactions ────► InteractionConsumer ─► histories (redb) ─► scheduler ─► FeedWorker ─► recommendations
//!   (consumer group)   decode, look up, append            coalesce,   beam search,   │
//!         ▲                                               micro-batch filters       ▼
//!         └──── offsets stored once the feed/dead letter is acknowledged ◄── acknowledge
//! ```
//!
//! The parts, one module each: [`catalogue_consumer`] keeps registry, index
//! and [`view`] in step with the catalogue topic; [`interaction_consumer`]
//! updates [`histories`] and hands users to the [`scheduler`], which forms
//! batches for the [`feeds`] worker (an OS thread: the model never blocks
//! polling), which fills its idle time with [`refresh`] passes (idle users'
//! feeds made again); [`delivery`] produces feeds and dead letters and, once
//! the broker has them, tells [`offsets`] which input offsets may be
//! committed.
//!
//! # Guarantees
//!
//! - **At least once.** An interaction's offset is stored for commit only
//!   after its history write is durable and its feed (or dead letter) is
//!   acknowledged. A crash re-reads from the last commit; replays do not
//!   duplicate history entries and do produce the feeds that may be missing.
//! - **Only live items.** Beams are constrained to the snapshot's live SIDs,
//!   and every item is checked against the newest view again after the
//!   search, so a retire that was published is never followed by a feed
//!   holding the item.
//! - **Bad input never stops the pipeline.** Every message that cannot be
//!   applied goes to the dead-letter topic with a reason naming the field
//!   and the record, and is counted by reason; ids and texts over
//!   `limits.*` included.
//! - **No record can stall it either.** An output the broker refuses for
//!   good (too large, a topic that refuses writes) becomes a dead letter of
//!   the message that caused it, and a dead letter is cut to fit
//!   `kafka.message_max_bytes` ([`delivery`]); only transient failures are
//!   retried, on the runtime, without blocking it.
//! - **Bounded memory.** Every queue is bounded; a full one makes the stage
//!   before it wait, back to the consumer.
//! - **Nothing blocks the runtime.** The model and the interactions
//!   consumer's poll (with its rebalances: restores, producer flushes) run
//!   on their own threads; a failed model batch costs its users a dead
//!   letter each, not the service.
//! - **Clean stop.** SIGTERM or SIGINT stops reading, answers every pending
//!   user, waits for the deliveries and commits; within `limits.drain_ms`,
//!   or at once on a second signal, whatever is still pending.

pub mod catalogue_consumer;
pub mod changelog;
pub mod config;
pub mod content;
pub mod delivery;
pub mod feeds;
pub mod histories;
pub mod http;
pub mod interaction_consumer;
pub mod kafka;
pub mod learnt;
pub mod metrics;
pub mod offsets;
pub mod reason;
pub mod refresh;
pub mod scheduler;
pub mod view;
pub mod waiting;

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use arc_swap::ArcSwap;
use candle_core::Device;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, StreamConsumer};
use rdkafka::producer::FutureProducer;
use tokio::sync::{mpsc, watch};

use crate::catalogue::{Catalogue, CatalogueConfig};
use crate::embed::text::TextEncoder;
use crate::embed::EncoderSpec;
use crate::model::{ItemContent, Model, SearchOptions, Transitions};
use crate::sid::Sid;
use crate::tokenizer::FrozenTokenizer;
use catalogue_consumer::CatalogueConsumer;
use config::{Config, FeedDevice, FreshContentKind};
use delivery::Outbox;
use feeds::FeedWorker;
use histories::Histories;
use interaction_consumer::{InteractionConsumer, Rebalancing, Restore};
use kafka::{FetchWait, Logged, Throttle};
use learnt::{Learner, LearntReader, LearntSettings, SharedCounts, Steps};
use metrics::Metrics;
use offsets::Offsets;
use refresh::Refresh;
use scheduler::Timing;
use view::{FreshContent, FreshSettings};
use waiting::Waiting;

/// Deliveries awaiting acknowledgement at most, before the model waits.
const IN_FLIGHT_DELIVERIES: usize = 4096;

/// Runs the service until SIGTERM or SIGINT, then drains and commits.
pub fn run(cfg: Config) -> anyhow::Result<()> {
    std::env::set_var("RAYON_NUM_THREADS", cfg.feed.threads.to_string());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let result = rt.block_on(serve(cfg));
    // Tasks still waiting after an abandoned drain are dropped, not awaited.
    rt.shutdown_timeout(Duration::from_millis(500));
    result
}

async fn serve(cfg: Config) -> anyhow::Result<()> {
    let paths = &cfg.paths;
    std::fs::create_dir_all(&paths.state_dir)
        .with_context(|| format!("creating {}", paths.state_dir.display()))?;
    let histories = Arc::new(
        Histories::open(&paths.state_dir.join("histories"), cfg.feed.history_len)
            .context("opening the histories")?,
    );

    let tokenizer = Arc::new(
        FrozenTokenizer::load(&paths.tokenizer)
            .with_context(|| format!("loading the tokenizer {}", paths.tokenizer.display()))?,
    );
    // Checked before any client exists: a start refused for its fresh-item
    // content leaves no member behind in the consumer group.
    let (fresh, fresh_files) = fresh_settings(&tokenizer, &paths.model, &cfg.feed)?;
    let fresh_weight = fresh.as_ref().map_or(0.0, |f| f.weight);

    let k = &cfg.kafka;
    let wire = Arc::new(kafka::Wire::new(k, cfg.limits.record())?);
    let logged = Logged::new("producer");
    let producer: FutureProducer<Logged> = kafka::producer_config(k)
        .create_with_context(logged.clone())
        .context("creating the producer")?;
    let outbox = Arc::new(Outbox::new(
        producer,
        wire,
        delivery::Topics {
            feeds: &k.recommendations_topic,
            dead_letters: &k.dead_letter_topic,
            histories: &k.histories_topic,
            interactions: &k.interactions_topic,
        },
        k.message_max_bytes,
    ));
    let metrics = Arc::new(Metrics::default());
    // Joining the group takes the broker a while (tansu: half of the
    // session timeout), so it starts now and runs while the model and the
    // catalogue load; the consumer is polled, and its partitions' histories
    // restored, once the catalogue is loaded.
    let offsets = Arc::new(Offsets::default());
    let abandon = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let assigned = Arc::new(refresh::Assigned::default());
    let (revoked_tx, revoked_rx) = watch::channel(());
    let changelog_reader = Arc::new(std::sync::OnceLock::new());
    let started_ms = kafka::now_ms();
    let consumer: Arc<BaseConsumer<Rebalancing>> = Arc::new(
        kafka::consumer_config(k, &k.group_id, FetchWait::Latency)
            .create_with_context(Rebalancing {
                abandon: abandon.clone(),
                assigned: assigned.clone(),
                offsets: offsets.clone(),
                metrics: metrics.clone(),
                outbox: outbox.clone(),
                restore: Restore {
                    histories: histories.clone(),
                    topic: k.histories_topic.clone(),
                    reader: {
                        let mut c = kafka::consumer_config(
                            k,
                            &format!("{}-restore", k.group_id),
                            FetchWait::Latency,
                        );
                        c.set("enable.auto.commit", "false");
                        c
                    },
                    marker: kafka::marker_producer(k)
                        .context("creating the changelog marker producer")?,
                    instance: instance_id(&paths.state_dir),
                    timeout: Duration::from_secs(60),
                    logged: logged.client("histories restore"),
                    by: changelog_reader.clone(),
                },
                revoked: revoked_tx,
                logged: logged.client("interactions"),
                uncovered: Default::default(),
            })
            .context("creating the interactions consumer")?,
    );
    consumer
        .subscribe(&[&k.interactions_topic])
        .with_context(|| format!("subscribing to {:?}", k.interactions_topic))?;

    let device = match cfg.feed.device {
        FeedDevice::Cpu => Device::Cpu,
        FeedDevice::Cuda => Device::new_cuda(0).context("feed.device = \"cuda\"")?,
    };
    let (model_cfg, model) = Model::load(&paths.model, &device)
        .with_context(|| format!("loading the model {}", paths.model.display()))?;
    if model_cfg.tokenizer_version != tokenizer.version() {
        bail!(
            "the model {} was trained on tokenizer {:?}, but paths.tokenizer is {:?}",
            paths.model.display(),
            model_cfg.tokenizer_version,
            tokenizer.version()
        );
    }
    let w = model_cfg.transition_weight;
    let transitions = Transitions::load_weighted(&paths.model, w).with_context(|| {
        format!(
            "the model's config mixes in successor counts (transition_weight {w}), \
             but they cannot be read"
        )
    })?;
    let model_version = model_version(
        &paths.model,
        transitions.as_ref().map(|t| t.1),
        &fresh_files,
    )?;
    // Learnt counts need a place in the mixture even where training fitted
    // none.
    let transitions = match transitions {
        None if cfg.learning.enabled && cfg.learning.weight > 0.0 => {
            Some((Transitions::default(), cfg.learning.weight))
        }
        t => t,
    };
    // A collaborative tokenizer embeds a new item's content as its map reads it.
    let content = match &tokenizer.manifest().input.encoder {
        EncoderSpec::Collaborative { content, .. } => content.as_ref(),
        spec => spec,
    };
    let text = match (content, &paths.text_model) {
        (EncoderSpec::Text { model, .. }, Some(dir)) => {
            let enc = TextEncoder::load(dir, &Device::Cpu)
                .with_context(|| format!("paths.text_model: loading {}", dir.display()))?;
            if enc.model_id() != model {
                bail!(
                    "paths.text_model is {:?}, but the tokenizer was trained on {model:?}",
                    enc.model_id()
                );
            }
            Some(enc)
        }
        _ => None,
    };
    let mut cat_cfg = CatalogueConfig::new(paths.state_dir.join("catalogue"));
    cat_cfg.merge_threshold = cfg.catalogue.merge_threshold;
    let (catalogue, _) =
        Catalogue::open(tokenizer.clone(), &cat_cfg).context("opening the catalogue")?;
    let (stop_tx, stop) = watch::channel(false);

    let listener = tokio::net::TcpListener::bind(cfg.http.listen)
        .await
        .with_context(|| format!("http.listen: binding {}", cfg.http.listen))?;
    let addr = listener.local_addr()?;
    std::fs::write(paths.state_dir.join("http.addr"), addr.to_string())?;
    tracing::info!(%addr, "serving /metrics, /healthz, /readyz");
    // Health and metrics stay up through the drain; they stop last.
    let (http_stop_tx, http_stop) = watch::channel(false);
    let http = tokio::spawn(http::serve(listener, metrics.clone(), http_stop));

    let mut fresh_rows = view::FreshRows::default();
    let view = Arc::new(ArcSwap::from_pointee(catalogue_consumer::initial_view(
        &catalogue,
        fresh.as_ref(),
        &mut fresh_rows,
    )?));
    let by_view = changelog::Reader {
        view: view.clone(),
        since_ms: started_ms,
    };
    let _ = changelog_reader.set(by_view.clone());
    let mut cat_client = kafka::consumer_config(
        k,
        &format!("{}-catalogue", k.group_id),
        FetchWait::Background,
    );
    cat_client.set("enable.auto.commit", "false");
    let (published, published_rx) = watch::channel(());
    let mut cat = CatalogueConsumer {
        consumer: cat_client
            .create_with_context(logged.client("catalogue"))
            .context("creating the catalogue consumer")?,
        topic: k.catalogue_topic.clone(),
        catalogue,
        text,
        view: view.clone(),
        published,
        outbox: outbox.clone(),
        metrics: metrics.clone(),
        batch_max: cfg.catalogue.batch_max,
        publish_every: Duration::from_millis(cfg.catalogue.publish_ms),
        partitions: Vec::new(),
        instance: instance_id(&paths.state_dir),
        fresh,
        fresh_rows,
        unkeyed: Throttle::default(),
        spilled: Throttle::default(),
        next: Default::default(),
        bases: Default::default(),
        topic_went: false,
        reweigh: None,
        read_before: Default::default(),
    };
    // Waiting for the brokers blocks: this worker's other tasks (the HTTP
    // probes) move to the other one meanwhile.
    tokio::task::block_in_place(|| check_topics(&cat.consumer, k))?;
    let token = cat.assign().await?;
    let mut cat_task = tokio::spawn(cat.run(stop.clone(), token));
    let mut learning = start_learning(&cfg, &metrics, &logged, by_view)?;

    // Interactions name items: read them once the catalogue is loaded, or
    // a backlog would dead-letter every item not read yet.
    let mut signals = Signals::new()?;
    // Nor before the learnt counts caught up, or a restarted instance
    // would answer from counts older than the others'.
    while !(metrics.catalogue_loaded.load(Relaxed) && metrics.learnt_loaded.load(Relaxed)) {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            r = &mut cat_task => {
                r??;
                bail!("the catalogue consumer stopped before the catalogue was loaded");
            }
            _ = signals.recv() => {
                let _ = stop_tx.send(true);
                cat_task.await??;
                learning.stop();
                let _ = http_stop_tx.send(true);
                return Ok(());
            }
        }
    }

    let f = &cfg.feed;
    let (events_tx, events_rx) = mpsc::channel(f.batch_max * 4);
    let (jobs_tx, jobs_rx) = mpsc::channel(1);
    let (sent_tx, sent_rx) = mpsc::channel(IN_FLIGHT_DELIVERIES);
    let timing = Timing {
        coalesce: Duration::from_millis(f.coalesce_ms),
        batch_max: f.batch_max,
        batch_wait: Duration::from_millis(f.batch_wait_ms),
        max_pending: f.max_pending,
    };
    let scheduler = tokio::spawn(scheduler::schedule(
        events_rx,
        jobs_tx,
        timing,
        metrics.clone(),
    ));
    let worker = FeedWorker {
        model,
        transitions,
        model_version,
        tokenizer_version: tokenizer.version().to_string(),
        interactions_topic: k.interactions_topic.clone(),
        view: view.clone(),
        histories: histories.clone(),
        outbox: outbox.clone(),
        metrics: metrics.clone(),
        search: SearchOptions {
            beams: f.beams,
            top_k: f.top_k,
            exclude_history: f.exclude_seen,
        },
        deny_items: f.deny_items.clone(),
        fresh_weight,
        fresh_share: f.fresh_share,
        learnt: learning.counts.clone(),
        refresh: match f.refresh_ms {
            0 => None,
            ms => Some(
                Refresh::open(
                    &histories,
                    Duration::from_millis(ms),
                    f.refresh_batch,
                    assigned,
                    kafka::now_ms(),
                )
                .context("reading where the refresh pass stands")?,
            ),
        },
        runtime: tokio::runtime::Handle::current(),
        stop: stop.clone(),
    };
    let worker_sent = sent_tx.clone();
    // The worker's end is awaited beside the consumers': a store it cannot
    // write stops the service (`FeedWorker::run`). A panic drops the sender.
    let (worker_tx, mut worker_rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("feeds".into())
        .spawn(move || {
            let _ = worker_tx.send(worker.run(jobs_rx, worker_sent));
        })?;
    let worker_result = |r: Result<Result<(), feeds::FeedError>, _>| match r {
        Ok(r) => r.context("the feed worker stopped"),
        Err(_) => Err(anyhow::anyhow!("the feed worker panicked")),
    };
    let acker = tokio::spawn(delivery::acknowledge(
        sent_rx,
        outbox.clone(),
        offsets.clone(),
        consumer.clone(),
        k.interactions_topic.clone(),
        metrics.clone(),
    ));
    let lag = tokio::spawn(watch_lag(consumer.clone(), metrics.clone(), stop.clone()));
    let interactions = InteractionConsumer {
        topic: k.interactions_topic.clone(),
        view,
        published: published_rx,
        revoked: revoked_rx,
        waiting: Waiting::new(
            Duration::from_millis(cfg.catalogue.item_wait_ms),
            cfg.catalogue.item_wait_max,
        ),
        histories: histories.clone(),
        offsets: offsets.clone(),
        outbox,
        metrics: metrics.clone(),
        scheduler: events_tx,
        sent: sent_tx,
        miskeyed: Throttle::default(),
    };
    // The consumer is polled on its own thread: rebalances run there, and
    // a partition's restore (up to a minute) or the producer's flush on a
    // revoke never holds one of the runtime's two workers.
    let (messages_tx, messages_rx) = mpsc::channel(f.batch_max * 4);
    let poller = consumer.clone();
    let poll_thread = std::thread::Builder::new()
        .name("interactions".into())
        .spawn(move || interaction_consumer::poll(&poller, &messages_tx))?;
    let mut input = tokio::spawn(interactions.run(messages_rx, stop.clone()));
    tracing::info!("running");

    let mut worker_ended = false;
    let ended = tokio::select! {
        _ = signals.recv() => None,
        r = &mut input => Some(r.map_err(anyhow::Error::from).and_then(|r| r.map_err(Into::into))),
        r = &mut cat_task => Some(r.map_err(anyhow::Error::from).and_then(|r| r.map_err(Into::into))),
        r = &mut worker_rx => {
            worker_ended = true;
            Some(worker_result(r))
        }
    };
    let signalled = ended.is_none();
    // The first error is the one reported; later ones are logged, as they
    // often follow from it (a full disk fails every store in turn).
    let mut error = ended.and_then(Result::err);
    tracing::info!("stopping: draining pending feeds");
    let _ = stop_tx.send(true);
    // Everything read is answered and acknowledged, unless that takes
    // longer than `limits.drain_ms` or a second signal says not to wait.
    let drain = async {
        if signalled {
            input.await??;
        }
        scheduler.await?;
        if !worker_ended {
            worker_result(worker_rx.await)?;
        }
        acker.await?;
        anyhow::Ok(())
    };
    let drain_time = Duration::from_millis(cfg.limits.drain_ms);
    let drained = tokio::select! {
        r = tokio::time::timeout(drain_time, drain) => match r {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                keep_first(&mut error, e, "draining");
                false
            }
            Err(_) => {
                tracing::warn!(ms = cfg.limits.drain_ms, "limits.drain_ms is over; committing what was acknowledged and stopping");
                false
            }
        },
        _ = signals.recv() => {
            tracing::warn!("a second signal: committing what was acknowledged and stopping");
            false
        }
    };
    if !drained {
        // Closing the consumer revokes its partitions; nothing is left to
        // flush that is worth waiting for.
        abandon.store(true, Relaxed);
    }
    let committer = consumer.clone();
    let commit =
        tokio::task::spawn_blocking(move || committer.commit_consumer_state(CommitMode::Sync));
    match tokio::time::timeout(Duration::from_secs(5), commit).await {
        Ok(Ok(
            Ok(())
            | Err(rdkafka::error::KafkaError::ConsumerCommit(
                rdkafka::types::RDKafkaErrorCode::NoOffset,
            )),
        )) => {}
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "final commit"),
        Ok(Err(e)) => tracing::warn!(error = %e, "final commit"),
        Err(_) => tracing::warn!("final commit: no answer in 5 s"),
    }
    if let Err(e) = histories.flush() {
        keep_first(&mut error, e.into(), "flushing the histories");
    }
    learning.stop();
    if drained && (!cat_task.is_finished() || signalled) {
        match cat_task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => keep_first(&mut error, e.into(), "the catalogue consumer"),
            Err(e) => keep_first(&mut error, e.into(), "the catalogue consumer"),
        }
    }
    if drained {
        let _ = lag.await;
        // Closing the consumer (its last handle, once the poll thread is
        // done) leaves the group and revokes the partitions: `Rebalancing`
        // records their changelog offsets, so a restart here reads none of
        // the changelog back, and the group does not wait for this member's
        // session to expire. Left to the process's exit, it sometimes lost
        // the race and did neither.
        let close = tokio::task::spawn_blocking(move || {
            let _ = poll_thread.join();
            drop(consumer);
        });
        if tokio::time::timeout(Duration::from_secs(10), close)
            .await
            .is_err()
        {
            tracing::warn!("closing the interactions consumer: no answer in 10 s");
        }
    }
    let _ = http_stop_tx.send(true);
    let _ = http.await;
    tracing::info!(
        feeds = metrics.feeds.get(),
        dead_letters = metrics.dead_letters(),
        drained,
        "stopped"
    );
    error.map_or(Ok(()), Err)
}

/// Keeps `e` as the error to report if it is the first, else logs it.
fn keep_first(error: &mut Option<anyhow::Error>, e: anyhow::Error, what: &str) {
    match error {
        None => *error = Some(e),
        Some(_) => tracing::warn!(error = %e, what, "after the first error"),
    }
}

/// Refuses to start against topics that are missing or do not fit: a
/// missing output topic would stall every commit behind retried deliveries,
/// and a changelog with other partitions than the interactions would restore
/// the wrong users. Brokers that do not answer and topics not there yet are
/// waited for, up to `kafka.startup_wait_ms`: a service started beside its
/// broker and the job that creates its topics (a compose file, a pod) would
/// otherwise lose that race and leave its restart to the supervisor.
fn check_topics(client: &StreamConsumer<Logged>, k: &config::KafkaConfig) -> anyhow::Result<()> {
    let started = Instant::now();
    let wait = Duration::from_millis(k.startup_wait_ms);
    let mut said = String::new();
    let (interactions, histories) = loop {
        let left = wait.saturating_sub(started.elapsed());
        // A broker that is down holds a metadata request for its whole
        // timeout: short tries let the log say early what it waits for. A
        // single check has the whole timeout.
        let timeout = if wait.is_zero() {
            kafka::METADATA_TIMEOUT
        } else {
            left.clamp(Duration::from_millis(100), Duration::from_secs(2))
        };
        match topic_partitions(client, k, timeout) {
            Ok(n) => break n,
            Err(e) if !left.is_zero() => {
                let why = match e.chain().nth(1) {
                    Some(_) => format!("{e}: {}", e.root_cause()),
                    None => e.to_string(),
                };
                if why != said {
                    tracing::warn!(
                        why = %why,
                        waited_ms = started.elapsed().as_millis() as u64,
                        startup_wait_ms = k.startup_wait_ms,
                        "waiting for the brokers and topics"
                    );
                    said = why;
                }
                std::thread::sleep(left.min(Duration::from_millis(500)));
            }
            Err(e) if k.startup_wait_ms > 0 => {
                return Err(e.context(format!(
                    "waited {} ms for the brokers and topics (kafka.startup_wait_ms)",
                    k.startup_wait_ms
                )))
            }
            Err(e) => return Err(e),
        }
    };
    if histories != interactions {
        bail!(
            "kafka.histories_topic: {:?} has {histories} partitions but {:?} has {interactions}; \
             the changelog needs exactly one partition per interactions partition",
            k.histories_topic,
            k.interactions_topic
        );
    }
    Ok(())
}

/// The partition counts of the interactions and histories topics, once
/// every topic is found.
fn topic_partitions(
    client: &StreamConsumer<Logged>,
    k: &config::KafkaConfig,
    timeout: Duration,
) -> anyhow::Result<(usize, usize)> {
    let partitions = |key: &str, topic: &str| -> anyhow::Result<usize> {
        let md = client
            .fetch_metadata(Some(topic), timeout)
            .with_context(|| {
                // The brokers did not answer: the topic's name is not at fault.
                format!(
                    "kafka.brokers: no metadata from {} for {key} {topic:?}",
                    k.brokers
                )
            })?;
        let n = md
            .topics()
            .iter()
            .find(|t| t.name() == topic && t.error().is_none())
            .map_or(0, |t| t.partitions().len());
        if n == 0 {
            bail!("{key}: topic {topic:?} does not exist on {}", k.brokers);
        }
        Ok(n)
    };
    partitions("kafka.catalogue_topic", &k.catalogue_topic)?;
    partitions("kafka.recommendations_topic", &k.recommendations_topic)?;
    partitions("kafka.dead_letter_topic", &k.dead_letter_topic)?;
    Ok((
        partitions("kafka.interactions_topic", &k.interactions_topic)?,
        partitions("kafka.histories_topic", &k.histories_topic)?,
    ))
}

/// SIGTERM or SIGINT, whichever comes first.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    async fn recv(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

/// The learnt counts' reader, while it runs, and what it publishes.
struct Learning {
    counts: Option<(SharedCounts, LearntSettings)>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Learning {
    /// Stops the reader (within one poll, 100 ms) and waits for its last
    /// commit to be flushed.
    fn stop(&mut self) {
        self.stop.store(true, Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Starts reading the histories changelog into the learnt counts
/// ([`learnt`]), or marks them caught up at once when `learning.enabled` is
/// off.
fn start_learning(
    cfg: &Config,
    metrics: &Arc<Metrics>,
    logged: &Logged,
    reader: changelog::Reader,
) -> anyhow::Result<Learning> {
    let l = &cfg.learning;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    if !l.enabled {
        metrics.learnt_loaded.store(true, Relaxed);
        return Ok(Learning {
            counts: None,
            stop,
            thread: None,
        });
    }
    let settings = LearntSettings {
        successor_weight: l.successor_weight,
        popularity_share: l.popularity_share,
        successors_per_item: l.successors_per_item,
        popular_items: l.popular_items,
        fresh_popularity: l.fresh_popularity,
    };
    let learner = Learner::open(&cfg.paths.state_dir.join("learnt"), settings)
        .context("opening the learnt counts")?;
    let k = &cfg.kafka;
    let mut client =
        kafka::consumer_config(k, &format!("{}-learnt", k.group_id), FetchWait::Trailing);
    client.set("enable.auto.commit", "false");
    let shared: SharedCounts = Default::default();
    let reader = LearntReader {
        learner,
        consumer: client
            .create_with_context(logged.client("learning"))
            .context("creating the learnt counts' changelog reader")?,
        marker: kafka::marker_producer(k).context("creating the learnt counts' marker producer")?,
        topic: k.histories_topic.clone(),
        instance: instance_id(&cfg.paths.state_dir),
        shared: shared.clone(),
        metrics: metrics.clone(),
        steps: Steps {
            reader,
            unknown: Throttle::default(),
            malformed: Throttle::default(),
        },
    };
    let flag = stop.clone();
    let thread = std::thread::Builder::new()
        .name("learnt".into())
        .spawn(move || reader.run(&flag))?;
    Ok(Learning {
        counts: Some((shared, settings)),
        stop,
        thread: Some(thread),
    })
}

/// How fresh items are found and scored, or `None` when `feed.fresh_weight`
/// is 0 or there is no content to score them by; with the files that then
/// decide feeds beside the weights.
fn fresh_settings(
    tokenizer: &Arc<FrozenTokenizer>,
    model_dir: &std::path::Path,
    feed: &config::FeedConfig,
) -> anyhow::Result<(Option<FreshSettings>, Vec<&'static str>)> {
    use crate::embed::tfidf::{self, TfIdf};
    use crate::model::fresh::{DEFAULT_AFFINITY_WEIGHT, DEFAULT_WEIGHT};
    use crate::model::{Affinity, AFFINITY_FILE};
    if feed.fresh_weight == Some(0.0) {
        return Ok((None, Vec::new()));
    }
    let words = match feed.fresh_content {
        FreshContentKind::Sid => None,
        kind => {
            let words = TfIdf::load(model_dir).context("feed.fresh_content")?;
            if words.is_none() && kind == FreshContentKind::Catalogue {
                bail!(
                    "feed.fresh_content = \"catalogue\" needs {} in the model directory {}: \
                     `genfeed fit-affinity --content ITEMS` writes it",
                    tfidf::FILE,
                    model_dir.display()
                );
            }
            words
        }
    };
    let common = |content, dim, weight: f32, temperature: f32| FreshSettings {
        training_items: tokenizer.training_items().len() as u32,
        content,
        dim,
        weight: feed.fresh_weight.unwrap_or(weight),
        temperature: feed.fresh_temperature.unwrap_or(temperature),
        slots: feed.fresh_slots,
        after: feed.fresh_after,
        half_at: feed.fresh_half_at,
        query_items: feed.fresh_history,
        max: feed.fresh_max,
    };
    if let Some(words) = words {
        let affinity = Affinity::load(model_dir).context("feed.fresh_content")?;
        if let Some(a) = affinity
            .as_ref()
            .filter(|a| a.content() != "tfidf" || a.dim() != words.dim())
        {
            bail!(
                "feed.fresh_content: the model directory {} holds {} ({}-wide) beside an affinity \
                 fitted on {:?} content {}-wide: run `genfeed fit-affinity` again",
                model_dir.display(),
                tfidf::FILE,
                words.dim(),
                a.content(),
                a.dim()
            );
        }
        let (weight, temperature) = match &affinity {
            Some(a) => (DEFAULT_AFFINITY_WEIGHT, a.temperature().unwrap_or(0.2)),
            None => (DEFAULT_WEIGHT, 0.2),
        };
        let dim = words.dim();
        let mut files = vec![tfidf::FILE];
        files.extend(affinity.is_some().then_some(AFFINITY_FILE));
        let settings = common(
            FreshContent::Catalogue {
                affinity: affinity.map(Arc::new),
                words: Arc::new(words),
            },
            dim,
            weight,
            temperature,
        );
        tracing::info!(
            content = "catalogue",
            affinity = files.len() == 2,
            weight = settings.weight,
            share = ?feed.fresh_share,
            temperature = settings.temperature,
            "fresh items are scored by their catalogue events' words"
        );
        return Ok((Some(settings), files));
    }
    let probe = tokenizer.training_items().first().map(|(_, s)| *s);
    let mut row = Vec::new();
    if !probe.is_some_and(|s| tokenizer.reconstruct(s.prefix(), &mut row)) {
        tracing::warn!(
            method = tokenizer.manifest().method.name(),
            "this tokenizer has no codewords to reconstruct content from: items that arrive after \
             training reach feeds only through the model"
        );
        return Ok((None, Vec::new()));
    }
    let tok = tokenizer.clone();
    let content: ItemContent =
        Arc::new(move |sid: Sid, _, out: &mut Vec<f32>| tok.reconstruct(sid.prefix(), out));
    let settings = common(FreshContent::Sid(content), row.len(), DEFAULT_WEIGHT, 0.2);
    Ok((Some(settings), Vec::new()))
}

/// Names this instance in end markers: its state directory and pid.
fn instance_id(state: &std::path::Path) -> String {
    format!("{}#{}", state.display(), std::process::id())
}

/// A digest of what decides the feeds: the weights and, when they are
/// mixed in, the successor counts and their weight. Feeds name it as their
/// model version.
fn model_version(
    dir: &std::path::Path,
    transition_weight: Option<f32>,
    fresh_files: &[&str],
) -> anyhow::Result<String> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    let mut files = vec![crate::model::WEIGHTS_FILE];
    files.extend_from_slice(fresh_files);
    if let Some(w) = transition_weight {
        files.push(crate::model::TRANSITIONS_FILE);
        h.update(w.to_le_bytes());
    }
    for file in files {
        let path = dir.join(file);
        std::fs::File::open(&path)
            .and_then(|mut f| std::io::copy(&mut f, &mut h))
            .with_context(|| format!("reading {}", path.display()))?;
    }
    let digest = h.finalize();
    let hex: String = digest[..6].iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!("model-{hex}"))
}

/// Every 5 s: how far the assigned partitions are behind their high
/// watermarks.
async fn watch_lag(
    consumer: Arc<BaseConsumer<Rebalancing>>,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            _ = stop.changed() => return,
        }
        let c = consumer.clone();
        let lag = tokio::task::spawn_blocking(move || -> Option<i64> {
            let positions = c.position().ok()?;
            let mut lag = 0;
            for e in positions.elements() {
                let (_, high) = c
                    .fetch_watermarks(e.topic(), e.partition(), Duration::from_secs(2))
                    .ok()?;
                if let rdkafka::Offset::Offset(p) = e.offset() {
                    lag += (high - p).max(0);
                }
            }
            Some(lag)
        })
        .await;
        if let Ok(Some(lag)) = lag {
            metrics.consumer_lag.set(lag);
        }
    }
}
