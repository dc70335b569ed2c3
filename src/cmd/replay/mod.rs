//! `genfeed replay`: drives a running service from a RecBole folder and
//! measures what comes out.
//!
//! It writes the catalogue (optionally) and then the interactions, in time
//! order, at a fixed rate, with brand-new items at a steady rate beside them,
//! while it reads the recommendations topic. Each interaction's latency runs
//! from just before it was produced to the arrival of the first feed that
//! answers it (the feed's trigger is at or after the interaction's offset in
//! the same partition). Every second it prints a line of live figures; at the
//! end a few users' feeds and a summary (JSON with `--json`).
//!
//! With `--train` (the training side of `genfeed time-split`) it is a
//! prequential evaluation: every streamed interaction is scored against the
//! feed its user held just before it (HitRate@10, NDCG@10), for items the
//! model was trained on and for fresh ones (first met after the cut, each
//! upserted just before its first interaction), with the share of feed
//! slots fresh items held. Each user's last `--warm-up` training
//! interactions are sent first, unscored, so that the service holds their
//! histories (and a feed) when the stream begins; the service learns their
//! steps too (`[learning]`), which the trained counts hold already.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;

use genfeed::contract::{
    decode, encode, CatalogueEvent, Interaction, InteractionKind, ItemChange, ItemUpsert,
    ReadFormat, Recommendation, SchemaIds, WireFormat,
};
use genfeed::dataset::{read_items, InteractionReader, Items, Value};
use genfeed::embed::EncoderSpec;
use genfeed::model::ContentTable;
use genfeed::service::config::{Config, WireKind};
use genfeed::service::kafka;
use genfeed::tokenizer::FrozenTokenizer;

mod prequential;
use prequential::{baselines, Baselines, Event, Prequential, Stream};

#[derive(Args)]
pub struct ReplayArgs {
    /// The running service's config: brokers, topics, framing, and the state
    /// directory where it wrote its HTTP address.
    #[arg(long)]
    config: PathBuf,
    /// A RecBole folder with NAME.item and NAME.inter.
    #[arg(long)]
    data: PathBuf,
    /// Write the catalogue first and wait until the service has it live.
    #[arg(long)]
    catalogue: bool,
    /// Interactions per second.
    #[arg(long, default_value_t = 200.0)]
    rate: f64,
    /// How long to send for.
    #[arg(long, default_value_t = 30.0)]
    seconds: f64,
    /// Brand-new items per second: catalogue items' content under new ids.
    #[arg(long, default_value_t = 0.0)]
    new_items: f64,
    /// Print the last feed of this many users at the end.
    #[arg(long, default_value_t = 3)]
    show: usize,
    /// Print the summary as JSON, alone on stdout (progress and `--show`
    /// go to stderr).
    #[arg(long)]
    json: bool,
    /// The training side of a time split: score every interaction of
    /// `--data` (the stream side) against its user's feed, and write this
    /// folder's catalogue with `--catalogue`.
    #[arg(long)]
    train: Option<PathBuf>,
    /// With `--train`: each user's last this many training interactions
    /// are sent before the stream, unscored.
    #[arg(long, default_value_t = 10)]
    warm_up: usize,
    /// With `--train`: also score two simple recommenders on the same
    /// stream, once it has been replayed: successor counts learnt from
    /// training and the stream, and content nearest neighbours (content as
    /// the service's tokenizer reads it, encoded here once; a minute for
    /// 5,000 titles on two cores).
    #[arg(long, requires = "train")]
    baselines: bool,
}

#[derive(Serialize)]
struct Summary {
    interactions: usize,
    seconds: f64,
    interactions_per_s: f64,
    feeds: usize,
    feeds_per_s: f64,
    answered: usize,
    latency_ms_p50: f64,
    latency_ms_p99: f64,
    latency_ms_max: f64,
    new_items: usize,
    new_items_live: i64,
    new_items_recommended: usize,
    decodable_ms_p50: Option<f64>,
    decodable_ms_p99: Option<f64>,
    service_batch_users_mean: Option<f64>,
    /// The service's model time per batch (histories read, search,
    /// filters), from its histogram.
    service_generate_ms_mean: Option<f64>,
    /// With `--train`.
    #[serde(skip_serializing_if = "Option::is_none")]
    prequential: Option<Prequential>,
    /// With `--baselines`: simple recommenders scored on the same stream.
    #[serde(skip_serializing_if = "Option::is_none")]
    baselines: Option<Baselines>,
}

/// What the feed reader shares with the sender.
#[derive(Default)]
struct Pending {
    /// Per user: interactions produced and not answered yet, in order.
    waiting: HashMap<String, VecDeque<(i32, i64, Instant)>>,
    latencies: Vec<f64>,
    window: Vec<f64>,
    feeds: usize,
    last_feed: HashMap<String, Recommendation>,
    new_recommended: HashSet<String>,
    /// With `--train`: the fresh items, and once the stream runs, the
    /// top-10 slots of the feeds read and those fresh items held.
    fresh: HashSet<String>,
    scoring: bool,
    slots: usize,
    fresh_slots: usize,
    fresh_recommended: HashSet<String>,
}

pub fn run(a: ReplayArgs) -> anyhow::Result<()> {
    let cfg = Config::load(&a.config)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(replay(a, cfg))
}

fn folder_file(dir: &Path, ext: &str) -> anyhow::Result<PathBuf> {
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let p = e?.path();
        if p.extension().is_some_and(|x| x == ext) {
            return Ok(p);
        }
    }
    bail!("{} has no .{ext} file", dir.display())
}

async fn replay(a: ReplayArgs, cfg: Config) -> anyhow::Result<()> {
    let k = &cfg.kafka;
    // The file, not the address: a restarted service listens elsewhere.
    let http = cfg.paths.state_dir.join("http.addr");
    std::fs::metadata(&http)
        .context("the service's http.addr: is the service running with this config?")?;
    let format = |id: u32| match k.wire.format {
        WireKind::Plain => WireFormat::Plain,
        WireKind::Confluent => WireFormat::Confluent { schema_id: id },
    };
    let producer: FutureProducer = kafka::producer_config(k).create()?;
    let items = read_items(folder_file(&a.data, "item")?)?;
    let title = items
        .column("title")
        .or_else(|| items.column("item_name"))
        .or_else(|| items.column("name"));

    // With a time split, the catalogue written first is the training
    // side's; the fresh items come from `--data`'s, one by one.
    let trained = match &a.train {
        Some(dir) => Some((read_items(folder_file(dir, "item")?)?, read_events(dir)?)),
        None => None,
    };
    let first = trained.as_ref().map_or(&items, |t| &t.0);
    if a.catalogue {
        let start = Instant::now();
        let mut acks = Vec::with_capacity(first.rows.len());
        for row in 0..first.rows.len() {
            let up = upsert(first, row, first.rows[row].id.clone());
            let bytes = encode(
                &CatalogueEvent {
                    change: ItemChange::Upsert(up),
                },
                format(k.wire.catalogue_id),
            )?;
            acks.push(send(
                &producer,
                &k.catalogue_topic,
                &first.rows[row].id,
                &bytes,
            )?);
        }
        for ack in acks {
            ack.await?.map_err(|(e, _)| e)?;
        }
        let n = first.rows.len() as f64;
        loop {
            let live = metric(&http, "genfeed_live_items").unwrap_or(0.0);
            if live >= n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        eprintln!(
            "catalogue: {} items written and live in {:.1} s",
            first.rows.len(),
            start.elapsed().as_secs_f64()
        );
    }
    // Interactions name catalogue items: the service reads them once its
    // catalogue is loaded.
    while metric(&http, "genfeed_ready") != Some(1.0) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let live_before = metric(&http, "genfeed_live_items").unwrap_or(0.0) as i64;

    let events = read_events(&a.data)?;
    let total = ((a.rate * a.seconds) as usize).min(events.len());

    let pending = Arc::new(Mutex::new(Pending::default()));
    let feeds = tokio::task::spawn_blocking({
        let cfg = cfg.clone();
        move || feed_consumer(&cfg)
    })
    .await??;
    let reader = tokio::spawn(read_feeds(feeds, cfg.clone(), pending.clone()));

    let mut score = None;
    // Items the service has (the training catalogue), and where the rest
    // are in `--data`'s catalogue.
    let mut upserted: HashSet<String> = HashSet::new();
    let row_of: HashMap<&str, usize> = items
        .rows
        .iter()
        .enumerate()
        .map(|(r, row)| (row.id.as_str(), r))
        .collect();
    if let Some((train_items, train_events)) = &trained {
        upserted.extend(train_items.rows.iter().map(|r| r.id.clone()));
        let known: HashSet<&str> = train_events.iter().map(|e| e.2.as_str()).collect();
        let fresh: HashSet<String> = events
            .iter()
            .map(|e| e.2.as_str())
            .filter(|i| !known.contains(i))
            .map(str::to_string)
            .collect();
        warm_up(&a, k, &producer, &format, train_events, &pending).await?;
        let mut p = pending.lock().expect("lock");
        p.latencies.clear();
        p.window.clear();
        p.feeds = 0;
        p.fresh = fresh;
        p.scoring = true;
        score = Some(Prequential::new(train_events));
    }
    // Fresh items are upserted this many interactions before their first.
    let ahead = (a.rate as usize).max(1);
    let mut upsert_cursor = 0;

    let start = tokio::time::Instant::now();
    let (mut sent, mut new_sent) = (0usize, 0usize);
    let mut next_report = 1.0;
    let mut last_report = (0usize, 0usize);
    eprintln!(
        "replaying {total} interactions at {}/s with {} new items/s",
        a.rate, a.new_items
    );
    while sent < total {
        let t = start.elapsed().as_secs_f64();
        if t >= next_report {
            let mut w = std::mem::take(&mut pending.lock().expect("lock").window);
            w.sort_by(f64::total_cmp);
            let live = metric(&http, "genfeed_live_items").unwrap_or(0.0) as i64;
            let p = pending.lock().expect("lock");
            // New items are the brand-new copies (`--new-items`) or, in a
            // prequential replay, the fresh items of the stream.
            let news = match &score {
                Some(s) => format!(
                    "hit@10 {:.3}  fresh items: streamed {} recommended {} hit {} (hit@10 {:.3})",
                    s.all.rate(),
                    s.fresh_items_streamed,
                    p.fresh_recommended.len(),
                    s.fresh_items_hit,
                    s.fresh.rate(),
                ),
                None => format!(
                    "new items live {}/{}  recommended {}",
                    live - live_before,
                    new_sent,
                    p.new_recommended.len()
                ),
            };
            eprintln!(
                "t={t:>5.1}s  sent {:>5}/s  feeds {:>5}/s  latency p50 {:>6.1} ms  p99 {:>6.1} ms  {news}",
                sent - last_report.0,
                p.feeds - last_report.1,
                quantile(&w, 0.5),
                quantile(&w, 0.99),
            );
            last_report = (sent, p.feeds);
            drop(p);
            next_report += 1.0;
        }
        // Due: interactions at k / rate, new items at j / new_items.
        let due_new = a.new_items > 0.0 && (new_sent as f64) < t * a.new_items;
        if due_new {
            let row = new_sent % items.rows.len();
            let id = format!("new-{new_sent}");
            let mut up = upsert(&items, row, id.clone());
            if let Some(t) = up.title.as_mut() {
                t.push_str(" (new edition)");
            }
            if let Some(v) = up.embedding.as_mut() {
                v[0] += 1e-3;
            }
            let bytes = encode(
                &CatalogueEvent {
                    change: ItemChange::Upsert(up),
                },
                format(k.wire.catalogue_id),
            )?;
            send(&producer, &k.catalogue_topic, &id, &bytes)?;
            new_sent += 1;
            continue;
        }
        let due_at = start + Duration::from_secs_f64(sent as f64 / a.rate);
        if tokio::time::Instant::now() < due_at {
            tokio::time::sleep_until(due_at).await;
        }
        if score.is_some() {
            while upsert_cursor < total.min(sent + ahead) {
                let item = &events[upsert_cursor].2;
                if !upserted.contains(item) {
                    if let Some(&row) = row_of.get(item.as_str()) {
                        let bytes = encode(
                            &CatalogueEvent {
                                change: ItemChange::Upsert(upsert(&items, row, item.clone())),
                            },
                            format(k.wire.catalogue_id),
                        )?;
                        send(&producer, &k.catalogue_topic, item, &bytes)?;
                        if let Some(s) = score.as_mut() {
                            s.fresh_items_streamed += 1;
                        }
                    }
                    upserted.insert(item.clone());
                }
                upsert_cursor += 1;
            }
        }
        let (_, user, item) = &events[sent];
        if let Some(s) = score.as_mut() {
            let p = pending.lock().expect("lock");
            let feed = p.last_feed.get(user);
            let rank = feed.and_then(|f| f.items.iter().take(10).position(|r| &r.item_id == item));
            s.add(item, p.fresh.contains(item), rank, feed.is_none());
        }
        let i = Interaction {
            user_id: user.clone(),
            item_id: item.clone(),
            kind: InteractionKind::View,
            timestamp: kafka::now_ms(),
        };
        let bytes = encode(&i, format(k.wire.interaction_id))?;
        let at = Instant::now();
        let ack = send(&producer, &k.interactions_topic, user, &bytes)?;
        let pending = pending.clone();
        let user = user.clone();
        tokio::spawn(async move {
            if let Ok(Ok(d)) = ack.await {
                let mut p = pending.lock().expect("lock");
                p.waiting
                    .entry(user)
                    .or_default()
                    .push_back((d.partition, d.offset, at));
            }
        });
        sent += 1;
    }
    let elapsed = start.elapsed().as_secs_f64();
    // Let the last feeds arrive.
    let drain = Instant::now();
    while drain.elapsed() < Duration::from_secs(30) {
        if pending
            .lock()
            .expect("lock")
            .waiting
            .values()
            .all(VecDeque::is_empty)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    reader.abort();

    let p = pending.lock().expect("lock");
    let baselines = match &trained {
        Some((train_items, train_events)) if a.baselines => Some(score_baselines(
            &cfg,
            &items,
            train_items,
            train_events,
            &events[..sent],
            &p.fresh,
            ahead,
        )?),
        _ => None,
    };
    let mut all = p.latencies.clone();
    all.sort_by(f64::total_cmp);
    let body = get(&http, "/metrics").unwrap_or_default();
    let summary = Summary {
        interactions: sent,
        seconds: elapsed,
        interactions_per_s: sent as f64 / elapsed,
        feeds: p.feeds,
        feeds_per_s: p.feeds as f64 / elapsed,
        answered: all.len(),
        latency_ms_p50: quantile(&all, 0.5),
        latency_ms_p99: quantile(&all, 0.99),
        latency_ms_max: all.last().copied().unwrap_or(f64::NAN),
        new_items: new_sent,
        new_items_live: metric(&http, "genfeed_live_items").unwrap_or(0.0) as i64 - live_before,
        new_items_recommended: p.new_recommended.len(),
        decodable_ms_p50: histogram_quantile(&body, "genfeed_decodable_latency_seconds", 0.5)
            .map(|s| s * 1e3),
        decodable_ms_p99: histogram_quantile(&body, "genfeed_decodable_latency_seconds", 0.99)
            .map(|s| s * 1e3),
        service_batch_users_mean: histogram_mean(&body, "genfeed_batch_users"),
        service_generate_ms_mean: histogram_mean(&body, "genfeed_generate_seconds")
            .map(|s| s * 1e3),
        prequential: score.map(|s| {
            let share = p.fresh_slots as f64 / p.slots.max(1) as f64;
            s.finish(p.fresh_recommended.len(), share)
        }),
        baselines,
    };
    let mut shown: Vec<&Recommendation> = p.last_feed.values().collect();
    shown.sort_by(|x, y| x.user_id.cmp(&y.user_id));
    // With --json, stdout is the summary alone.
    let show = |line: String| {
        if a.json {
            eprintln!("{line}")
        } else {
            println!("{line}")
        }
    };
    for f in shown.into_iter().take(a.show) {
        show(format!("feed of {}:", f.user_id));
        for r in f.items.iter().take(5) {
            let name = items
                .rows
                .iter()
                .position(|row| row.id == r.item_id)
                .and_then(|row| {
                    title.and_then(|c| items.rows[row].values[c].as_str().map(str::to_string))
                })
                .unwrap_or_else(|| "(new item)".into());
            show(format!(
                "  {:>10}  {:>7.2}  {}  {}",
                r.item_id,
                r.score,
                sid(&r.sid),
                name
            ));
        }
    }
    if let (Some(s), false) = (&summary.prequential, a.json) {
        println!("prequential: {}", s.line());
    }
    if let (Some(b), false) = (&summary.baselines, a.json) {
        println!("baseline, successor counts: {}", b.successors.line());
        if let Some(c) = &b.content {
            println!("baseline, content neighbours: {}", c.line());
        }
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        let ms = |v: Option<f64>| v.map_or("n/a".into(), |v| format!("{v:.0} ms"));
        let mut news = String::new();
        if a.new_items > 0.0 {
            news = format!(
                "; {} new items, {} live, {} recommended",
                summary.new_items, summary.new_items_live, summary.new_items_recommended,
            );
        }
        if summary.decodable_ms_p50.is_some() {
            news.push_str(&format!(
                "; catalogue event→decodable p50 {}, p99 {}",
                ms(summary.decodable_ms_p50),
                ms(summary.decodable_ms_p99)
            ));
        }
        println!(
            "{} interactions in {:.1} s ({:.1}/s), {} of them answered by a feed; {} feeds ({:.1}/s); interaction→feed latency p50 {:.1} ms, p99 {:.1} ms{news}",
            summary.interactions,
            summary.seconds,
            summary.interactions_per_s,
            summary.answered,
            summary.feeds,
            summary.feeds_per_s,
            summary.latency_ms_p50,
            summary.latency_ms_p99,
        );
    }
    Ok(())
}

/// Scores the baselines on the `stream` just replayed, with content as the
/// service's tokenizer reads it (none for a tokenizer of interactions).
fn score_baselines(
    cfg: &Config,
    items: &Items,
    train_items: &Items,
    train: &[Event],
    stream: &[Event],
    fresh: &HashSet<String>,
    ahead: usize,
) -> anyhow::Result<Baselines> {
    let started = Instant::now();
    let tokenizer = FrozenTokenizer::load(&cfg.paths.tokenizer)?;
    let spec = &tokenizer.manifest().input.encoder;
    let content = match spec {
        EncoderSpec::Interactions { .. } => None,
        _ => {
            let text = matches!(spec, EncoderSpec::Text { .. })
                .then(|| super::tokenizer::load_text(cfg.paths.text_model.clone()))
                .transpose()?;
            let vectors = super::tokenizer::embed(items, spec, text.as_ref())?;
            Some(ContentTable::new(vectors.dim(), vectors.into_vec()))
        }
    };
    let catalogue: Vec<String> = items.rows.iter().map(|r| r.id.clone()).collect();
    let live: HashSet<String> = train_items.rows.iter().map(|r| r.id.clone()).collect();
    let s = Stream {
        train,
        stream,
        catalogue: &catalogue,
        live: &live,
        fresh,
        ahead,
        exclude_seen: cfg.feed.exclude_seen,
    };
    let b = baselines(&s, content.as_ref())?;
    eprintln!(
        "baselines scored on {} interactions in {:.1} s",
        stream.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(b)
}

/// The interactions of a RecBole folder in time order: (timestamp, user,
/// item).
fn read_events(dir: &Path) -> anyhow::Result<Vec<Event>> {
    let mut events = Vec::new();
    let mut rdr = InteractionReader::from_path(folder_file(dir, "inter")?)?;
    while let Some(i) = rdr.read()? {
        events.push((i.timestamp, i.user.to_string(), i.item.to_string()));
    }
    events.sort_by(|x, y| x.0.total_cmp(&y.0));
    Ok(events)
}

/// How long the warm-up may go without a feed.
const WARM_UP_STALL: Duration = Duration::from_secs(30);

/// Sends each user's last `--warm-up` training interactions, in time
/// order, and waits until every user has the feed that answers their last
/// one.
async fn warm_up(
    a: &ReplayArgs,
    k: &genfeed::service::config::KafkaConfig,
    producer: &FutureProducer,
    format: &dyn Fn(u32) -> WireFormat,
    train: &[Event],
    pending: &Arc<Mutex<Pending>>,
) -> anyhow::Result<()> {
    let mut per_user: HashMap<&str, usize> = HashMap::new();
    let mut keep = vec![false; train.len()];
    for (i, e) in train.iter().enumerate().rev() {
        let n = per_user.entry(e.1.as_str()).or_default();
        if *n < a.warm_up {
            *n += 1;
            keep[i] = true;
        }
    }
    let start = Instant::now();
    let mut acks = Vec::new();
    for (e, _) in train.iter().zip(&keep).filter(|(_, &k)| k) {
        let i = Interaction {
            user_id: e.1.clone(),
            item_id: e.2.clone(),
            kind: InteractionKind::View,
            timestamp: kafka::now_ms(),
        };
        let bytes = encode(&i, format(k.wire.interaction_id))?;
        acks.push((
            e.1.clone(),
            send(producer, &k.interactions_topic, &e.1, &bytes)?,
        ));
    }
    let sent = acks.len();
    // Each user's last warm-up interaction, answered once a feed's trigger
    // reaches it.
    let mut last: HashMap<String, (i32, i64)> = HashMap::new();
    for (user, ack) in acks {
        if let Ok(Ok(d)) = ack.await {
            last.insert(user, (d.partition, d.offset));
        }
    }
    let answered = || {
        let p = pending.lock().expect("lock");
        let users = last
            .iter()
            .filter(|(user, &(part, off))| {
                p.last_feed
                    .get(*user)
                    .is_some_and(|f| f.trigger.partition == part && f.trigger.offset >= off)
            })
            .count();
        (users, p.feeds)
    };
    // However long the service takes, as long as it keeps answering: a
    // stream scored while the warm-up is still queued ahead of it would
    // measure the queue.
    let (mut feeds, mut progress, mut report) = (0, Instant::now(), Instant::now());
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (users, now) = answered();
        if users == last.len() {
            break;
        }
        if now > feeds {
            (feeds, progress) = (now, Instant::now());
        } else if progress.elapsed() > WARM_UP_STALL {
            bail!(
                "warm-up stalled: {users} of {} users answered, no feed for {} s; is the service consuming?",
                last.len(),
                WARM_UP_STALL.as_secs()
            );
        }
        if report.elapsed() >= Duration::from_secs(10) {
            eprintln!(
                "warm-up: {users} of {} users answered, {now} feeds",
                last.len()
            );
            report = Instant::now();
        }
    }
    eprintln!(
        "warm-up: the last {} training interactions of {} users sent and answered in {:.1} s",
        sent,
        per_user.len(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

fn sid(codes: &[u16]) -> String {
    codes
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join("-")
}

fn send(
    producer: &FutureProducer,
    topic: &str,
    key: &str,
    payload: &[u8],
) -> anyhow::Result<rdkafka::producer::DeliveryFuture> {
    loop {
        match producer.send_result(FutureRecord::to(topic).key(key).payload(payload)) {
            Ok(f) => return Ok(f),
            Err((
                rdkafka::error::KafkaError::MessageProduction(
                    rdkafka::types::RDKafkaErrorCode::QueueFull,
                ),
                _,
            )) => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err((e, _)) => return Err(e.into()),
        }
    }
}

/// An item row as a catalogue upsert: its `embedding` column if it has one,
/// else its text columns (title, description, brand, categories by name, the
/// rest as attributes).
fn upsert(items: &Items, row: usize, id: String) -> ItemUpsert {
    let mut up = ItemUpsert {
        item_id: id,
        ..Default::default()
    };
    for (c, col) in items.columns.iter().enumerate() {
        let v = &items.rows[row].values[c];
        match (col.name.as_str(), v) {
            ("embedding", Value::FloatSeq(x)) => up.embedding = Some(x.clone()),
            (_, Value::FloatSeq(_)) => {}
            ("title", _) => up.title = v.as_str().map(str::to_string),
            ("description", _) => up.description = v.as_str().map(str::to_string),
            ("brand", _) => up.brand = v.as_str().map(str::to_string),
            ("categories", _) => {
                up.categories = v
                    .as_str()
                    .unwrap_or("")
                    .split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect()
            }
            (name, _) => {
                if let Some(s) = v.as_str() {
                    up.attributes.insert(name.to_string(), s.to_string());
                }
            }
        }
    }
    up
}

/// Reads feeds from the end of the recommendations topic and answers the
/// waiting interactions.
/// A consumer of the feeds topic, assigned every partition at the offset
/// where it ends now. An offset, not [`Offset::End`]: librdkafka resolves a
/// logical offset at its first fetch, some time after `assign` returns, and
/// feeds written before then would be missed. (A high watermark that lags
/// behind the log, as tansu's can, starts it a few feeds early, which only
/// reads feeds no interaction of the replay waits for.)
fn feed_consumer(cfg: &Config) -> anyhow::Result<StreamConsumer> {
    let k = &cfg.kafka;
    let mut c = kafka::consumer_config(
        k,
        &format!("genfeed-replay-{}", std::process::id()),
        kafka::FetchWait::Latency,
    );
    c.set("enable.auto.commit", "false");
    let consumer: StreamConsumer = c.create()?;
    let md = consumer.fetch_metadata(Some(&k.recommendations_topic), kafka::METADATA_TIMEOUT)?;
    let mut tpl = TopicPartitionList::new();
    for t in md.topics() {
        for p in t.partitions() {
            let (_, end) = consumer.fetch_watermarks(t.name(), p.id(), kafka::METADATA_TIMEOUT)?;
            tpl.add_partition_offset(t.name(), p.id(), Offset::Offset(end))?;
        }
    }
    consumer.assign(&tpl)?;
    Ok(consumer)
}

async fn read_feeds(
    consumer: StreamConsumer,
    cfg: Config,
    pending: Arc<Mutex<Pending>>,
) -> anyhow::Result<()> {
    let k = &cfg.kafka;
    let mut ids = SchemaIds::new();
    ids.insert::<Recommendation>(
        k.wire.recommendation_id,
        <Recommendation as genfeed::contract::Record>::schema().clone(),
    )?;
    let format = match k.wire.format {
        WireKind::Plain => ReadFormat::Plain,
        WireKind::Confluent => ReadFormat::Confluent(&ids),
    };
    loop {
        let m = consumer.recv().await?;
        let Some(bytes) = m.payload() else { continue };
        let Ok(f) = decode::<Recommendation>(bytes, format) else {
            continue;
        };
        let now = Instant::now();
        let mut p = pending.lock().expect("lock");
        p.feeds += 1;
        for r in &f.items {
            if r.item_id.starts_with("new-") {
                p.new_recommended.insert(r.item_id.clone());
            }
        }
        if p.scoring {
            let top = &f.items[..f.items.len().min(10)];
            p.slots += top.len();
            for r in top {
                if p.fresh.contains(&r.item_id) {
                    p.fresh_slots += 1;
                    p.fresh_recommended.insert(r.item_id.clone());
                }
            }
        }
        let t = &f.trigger;
        let mut answered = Vec::new();
        if let Some(q) = p.waiting.get_mut(&f.user_id) {
            while let Some(&(part, off, at)) = q.front() {
                if part != t.partition || off > t.offset {
                    break;
                }
                answered.push(now.duration_since(at).as_secs_f64() * 1e3);
                q.pop_front();
            }
        }
        p.latencies.extend_from_slice(&answered);
        p.window.extend_from_slice(&answered);
        p.last_feed.insert(f.user_id.clone(), f);
    }
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

/// `path` from the service whose address is in the file `addr`.
fn get(addr: &Path, path: &str) -> Option<String> {
    let addr = std::fs::read_to_string(addr).ok()?;
    let mut c = TcpStream::connect(addr.trim()).ok()?;
    c.write_all(format!("GET {path} HTTP/1.1\r\nhost: genfeed\r\n\r\n").as_bytes())
        .ok()?;
    let mut text = String::new();
    c.read_to_string(&mut text).ok()?;
    Some(text.split("\r\n\r\n").nth(1)?.to_string())
}

fn metric(addr: &Path, name: &str) -> Option<f64> {
    get(addr, "/metrics")?
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// The bucket bound holding quantile `q` of a Prometheus histogram.
fn histogram_quantile(body: &str, name: &str, q: f64) -> Option<f64> {
    let prefix = format!("{name}_bucket{{le=\"");
    let buckets: Vec<(f64, f64)> = body
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(&prefix)?;
            let (le, count) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, count.parse().ok()?))
        })
        .collect();
    let total = buckets.last()?.1;
    if total == 0.0 {
        return None;
    }
    buckets
        .iter()
        .find(|(_, c)| *c >= q * total)
        .map(|(le, _)| *le)
}

fn histogram_mean(body: &str, name: &str) -> Option<f64> {
    let value = |suffix: &str| -> Option<f64> {
        body.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}_{suffix} "))?.parse().ok())
    };
    let (sum, count) = (value("sum")?, value("count")?);
    (count > 0.0).then(|| sum / count)
}
