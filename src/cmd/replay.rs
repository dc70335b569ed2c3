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
use genfeed::service::config::{Config, WireKind};
use genfeed::service::kafka;

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
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
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
    let http = std::fs::read_to_string(cfg.paths.state_dir.join("http.addr"))
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

    if a.catalogue {
        let start = Instant::now();
        let mut acks = Vec::with_capacity(items.rows.len());
        for row in 0..items.rows.len() {
            let up = upsert(&items, row, items.rows[row].id.clone());
            let bytes = encode(
                &CatalogueEvent {
                    change: ItemChange::Upsert(up),
                },
                format(k.wire.catalogue_id),
            )?;
            acks.push(send(
                &producer,
                &k.catalogue_topic,
                &items.rows[row].id,
                &bytes,
            )?);
        }
        for ack in acks {
            ack.await?.map_err(|(e, _)| e)?;
        }
        let n = items.rows.len() as f64;
        loop {
            let live = metric(&http, "genfeed_live_items").unwrap_or(0.0);
            if live >= n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        println!(
            "catalogue: {} items written and live in {:.1} s",
            items.rows.len(),
            start.elapsed().as_secs_f64()
        );
    }
    // Interactions name catalogue items: the service reads them once its
    // catalogue is loaded.
    while metric(&http, "genfeed_ready") != Some(1.0) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let live_before = metric(&http, "genfeed_live_items").unwrap_or(0.0) as i64;

    let mut events = Vec::new();
    let mut rdr = InteractionReader::from_path(folder_file(&a.data, "inter")?)?;
    while let Some(i) = rdr.read()? {
        events.push((i.timestamp, i.user.to_string(), i.item.to_string()));
    }
    events.sort_by(|x, y| x.0.total_cmp(&y.0));
    let total = ((a.rate * a.seconds) as usize).min(events.len());

    let pending = Arc::new(Mutex::new(Pending::default()));
    let reader = tokio::spawn(read_feeds(cfg.clone(), pending.clone()));
    // The reader starts at the topic's end; give it its assignment first.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let start = tokio::time::Instant::now();
    let (mut sent, mut new_sent) = (0usize, 0usize);
    let mut next_report = 1.0;
    let mut last_report = (0usize, 0usize);
    println!(
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
            println!(
                "t={t:>5.1}s  sent {:>5}/s  feeds {:>5}/s  latency p50 {:>6.1} ms  p99 {:>6.1} ms  new items live {}/{}  recommended {}",
                sent - last_report.0,
                p.feeds - last_report.1,
                quantile(&w, 0.5),
                quantile(&w, 0.99),
                live - live_before,
                new_sent,
                p.new_recommended.len(),
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
        let (_, user, item) = &events[sent];
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
    };
    let mut shown: Vec<&Recommendation> = p.last_feed.values().collect();
    shown.sort_by(|x, y| x.user_id.cmp(&y.user_id));
    for f in shown.into_iter().take(a.show) {
        println!("feed of {}:", f.user_id);
        for r in f.items.iter().take(5) {
            let name = items
                .rows
                .iter()
                .position(|row| row.id == r.item_id)
                .and_then(|row| {
                    title.and_then(|c| items.rows[row].values[c].as_str().map(str::to_string))
                })
                .unwrap_or_else(|| "(new item)".into());
            println!(
                "  {:>10}  {:>7.2}  {}  {}",
                r.item_id,
                r.score,
                sid(&r.sid),
                name
            );
        }
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!(
            "{} interactions in {:.1} s ({:.1}/s); {} feeds ({:.1}/s); interaction→feed latency p50 {:.1} ms, p99 {:.1} ms; \
             {} new items, {} live, {} recommended; catalogue event→decodable p50 {:?} ms, p99 {:?} ms",
            summary.interactions,
            summary.seconds,
            summary.interactions_per_s,
            summary.feeds,
            summary.feeds_per_s,
            summary.latency_ms_p50,
            summary.latency_ms_p99,
            summary.new_items,
            summary.new_items_live,
            summary.new_items_recommended,
            summary.decodable_ms_p50,
            summary.decodable_ms_p99,
        );
    }
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
async fn read_feeds(cfg: Config, pending: Arc<Mutex<Pending>>) -> anyhow::Result<()> {
    let k = &cfg.kafka;
    let mut c = kafka::consumer_config(k, &format!("genfeed-replay-{}", std::process::id()));
    c.set("enable.auto.commit", "false");
    let consumer: StreamConsumer = c.create()?;
    let md = consumer.fetch_metadata(Some(&k.recommendations_topic), kafka::METADATA_TIMEOUT)?;
    let mut tpl = TopicPartitionList::new();
    for t in md.topics() {
        for p in t.partitions() {
            tpl.add_partition_offset(t.name(), p.id(), Offset::End)?;
        }
    }
    consumer.assign(&tpl)?;
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

fn get(addr: &str, path: &str) -> Option<String> {
    let mut c = TcpStream::connect(addr.trim()).ok()?;
    c.write_all(format!("GET {path} HTTP/1.1\r\nhost: genfeed\r\n\r\n").as_bytes())
        .ok()?;
    let mut text = String::new();
    c.read_to_string(&mut text).ok()?;
    Some(text.split("\r\n\r\n").nth(1)?.to_string())
}

fn metric(addr: &str, name: &str) -> Option<f64> {
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
