//! What the service tests share: a real broker, a small trained model, a
//! service process, and Kafka clients to feed it and read its outputs.
//!
//! The broker is the one `scripts/test.sh` starts (`GENFEED_TEST_BROKER`);
//! without it the first test starts one with `scripts/broker.sh` and stops it
//! when the test binary exits.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use genfeed::contract::{
    decode, encode, CatalogueEvent, DeadLetter, Interaction, InteractionKind, ItemChange,
    ItemRetire, ItemUpsert, ReadFormat, Recommendation, Record, SchemaIds, WireFormat,
};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};

/// How long a test waits for something the service should do before it
/// fails (generous: two test binaries may share two cores).
pub const PATIENCE: Duration = Duration::from_secs(120);

static BROKER: OnceLock<String> = OnceLock::new();
static BROKER_DIR: OnceLock<PathBuf> = OnceLock::new();

extern "C" fn stop_broker() {
    if let Some(dir) = BROKER_DIR.get() {
        stop_broker_in(dir);
    }
}

fn stop_broker_in(dir: &Path) {
    let _ = Command::new("bash")
        .arg(repo().join("scripts/broker.sh"))
        .arg("stop")
        .arg(dir)
        .status();
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn broker() -> &'static str {
    BROKER.get_or_init(|| {
        if let Some(addr) = std::env::var("GENFEED_TEST_BROKER")
            .ok()
            .filter(|a| !a.is_empty())
        {
            return addr;
        }
        let dir = tempfile::tempdir().unwrap().keep();
        let addr = start_broker(&dir, None);
        BROKER_DIR.set(dir).unwrap();
        // SAFETY: registers a plain function to run at process exit.
        unsafe { libc::atexit(stop_broker) };
        addr
    })
}

/// `scripts/broker.sh start DIR [PORT]`; the broker's address.
fn start_broker(dir: &Path, port: Option<u16>) -> String {
    let out = Command::new("bash")
        .arg(repo().join("scripts/broker.sh"))
        .arg("start")
        .arg(dir)
        .args(port.map(|p| p.to_string()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "scripts/broker.sh start: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// A synthetic catalogue, its tokenizer and a model trained on it: built
/// once per test binary.
pub struct Fixture {
    _dir: tempfile::TempDir,
    pub tokenizer: PathBuf,
    pub model: PathBuf,
    /// Item ids and content embeddings, in file order.
    pub items: Vec<(String, Vec<f32>)>,
}

fn genfeed(args: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_genfeed"))
        .args(args)
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "genfeed {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let files = genfeed::synth::generate(
            &data,
            &genfeed::synth::SynthConfig {
                items: 200,
                users: 300,
                topics: 8,
                embedding_dim: 16,
                ..Default::default()
            },
        )
        .unwrap();
        let tokenizer = dir.path().join("tokenizer");
        genfeed(&[
            "tokenizer",
            "train",
            "--items",
            s(&files.items),
            "--method",
            "rq-kmeans",
            "--encoder",
            "precomputed",
            "--levels",
            "2",
            "--codebook-size",
            "8",
            "--out",
            s(&tokenizer),
        ]);
        let model = dir.path().join("model");
        genfeed(&[
            "train",
            "--data",
            s(&data),
            "--tokenizer",
            s(&tokenizer),
            "--out",
            s(&model),
            "--epochs",
            "2",
            "--d-model",
            "32",
            "--heads",
            "2",
            "--head-dim",
            "16",
            "--d-ff",
            "64",
            "--layers",
            "1",
            "--batch-size",
            "64",
            "--threads",
            "1",
        ]);
        // Whatever weight validation chose on this tiny set, the service
        // tests search the mixture with the successor counts, so that their
        // guarantees (retired items never return, new ones join) hold for it.
        let config = model.join("config.json");
        let mut cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
        cfg["transition_weight"] = 0.5.into();
        std::fs::write(&config, cfg.to_string()).unwrap();
        let parsed = genfeed::dataset::read_items(&files.items).unwrap();
        let col = parsed.column("embedding").unwrap();
        let items = parsed
            .rows
            .iter()
            .map(|r| {
                let v = match &r.values[col] {
                    genfeed::dataset::Value::FloatSeq(v) => v.clone(),
                    other => panic!("embedding column holds {other:?}"),
                };
                (r.id.clone(), v)
            })
            .collect();
        Fixture {
            _dir: dir,
            tokenizer,
            model,
            items,
        }
    })
}

/// One test's topics, named uniquely so tests can share the broker.
#[derive(Clone)]
pub struct Topics {
    pub catalogue: String,
    pub interactions: String,
    pub recommendations: String,
    pub dead_letters: String,
    pub histories: String,
    pub group: String,
}

/// A broker of a test's own on a given port, stopped when dropped: for what
/// the shared one must not go through.
pub struct OwnBroker {
    dir: tempfile::TempDir,
    pub addr: String,
}

impl OwnBroker {
    pub fn start(port: u16) -> OwnBroker {
        let dir = tempfile::tempdir().unwrap();
        let addr = start_broker(dir.path(), Some(port));
        OwnBroker { dir, addr }
    }

    /// Creates a test's topics here, as [`Bed::new`] did on the shared one.
    pub fn create_topics(&self, topics: &Topics, interaction_partitions: i32) {
        create(&self.addr, &new_topics(topics, interaction_partitions));
    }
}

impl Drop for OwnBroker {
    fn drop(&mut self) {
        stop_broker_in(self.dir.path());
    }
}

/// A free port on the loopback interface (free when asked).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn topics(test: &str, interaction_partitions: i32) -> Topics {
    static N: AtomicU32 = AtomicU32::new(0);
    let tag = format!(
        "{test}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    let t = Topics {
        catalogue: format!("{tag}-catalogue"),
        interactions: format!("{tag}-interactions"),
        recommendations: format!("{tag}-recommendations"),
        dead_letters: format!("{tag}-dead-letters"),
        histories: format!("{tag}-histories"),
        group: format!("{tag}-group"),
    };
    create(broker(), &new_topics(&t, interaction_partitions));
    t
}

fn new_topics(t: &Topics, interaction_partitions: i32) -> Vec<NewTopic<'_>> {
    vec![
        NewTopic::new(&t.catalogue, 2, TopicReplication::Fixed(1)),
        NewTopic::new(
            &t.interactions,
            interaction_partitions,
            TopicReplication::Fixed(1),
        ),
        NewTopic::new(&t.recommendations, 2, TopicReplication::Fixed(1)),
        NewTopic::new(&t.dead_letters, 1, TopicReplication::Fixed(1)),
        NewTopic::new(
            &t.histories,
            interaction_partitions,
            TopicReplication::Fixed(1),
        )
        .set("cleanup.policy", "compact"),
    ]
}

/// Creates a topic on the test broker.
pub fn create_topic(name: &str, partitions: i32) {
    create(
        broker(),
        &[NewTopic::new(name, partitions, TopicReplication::Fixed(1))],
    );
}

/// Deletes a topic on the test broker.
pub fn delete_topic(name: &str) {
    let results = runtime()
        .block_on(admin(broker()).delete_topics(&[name], &AdminOptions::new()))
        .unwrap();
    for r in results {
        r.unwrap();
    }
}

fn admin(addr: &str) -> AdminClient<DefaultClientContext> {
    ClientConfig::new()
        .set("bootstrap.servers", addr)
        .create()
        .unwrap()
}

fn create(addr: &str, new: &[NewTopic<'_>]) {
    let results = runtime()
        .block_on(admin(addr).create_topics(new, &AdminOptions::new()))
        .unwrap();
    for r in results {
        r.unwrap();
    }
}

fn client(group: &str) -> ClientConfig {
    client_of(broker(), group)
}

fn client_of(addr: &str, group: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", addr)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest");
    c
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// How the test's records are framed.
#[derive(Clone, Copy)]
pub enum Framing {
    Plain,
    Confluent,
}

impl Framing {
    fn format(self, id: u32) -> WireFormat {
        match self {
            Framing::Plain => WireFormat::Plain,
            Framing::Confluent => WireFormat::Confluent { schema_id: id },
        }
    }

    fn toml(self) -> &'static str {
        match self {
            Framing::Plain => "plain",
            Framing::Confluent => "confluent",
        }
    }
}

/// Writes a service config for `topics` and returns its path.
fn config(dir: &Path, name: &str, t: &Topics, framing: Framing, feed: &str) -> PathBuf {
    let f = fixture();
    let state = dir.join(name);
    let path = dir.join(format!("{name}.toml"));
    let text = format!(
        r#"[kafka]
brokers = "{broker}"
group_id = "{group}"
catalogue_topic = "{cat}"
interactions_topic = "{int}"
recommendations_topic = "{rec}"
dead_letter_topic = "{dlq}"
histories_topic = "{hist}"
session_timeout_ms = 6000
startup_wait_ms = 1000

[kafka.wire]
format = "{framing}"

[paths]
state_dir = "{state}"
tokenizer = "{tok}"
model = "{model}"

[feed]
{feed}

[catalogue]
publish_ms = 5

[http]
listen = "127.0.0.1:0"
"#,
        broker = broker(),
        group = t.group,
        cat = t.catalogue,
        int = t.interactions,
        rec = t.recommendations,
        dlq = t.dead_letters,
        hist = t.histories,
        framing = framing.toml(),
        state = state.display(),
        tok = f.tokenizer.display(),
        model = f.model.display(),
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// What a test starts from: the shared fixture, a folder for the
/// instances' state, topics of its own and a producer for them.
pub struct Bed {
    pub fixture: &'static Fixture,
    pub dir: tempfile::TempDir,
    pub topics: Topics,
    pub input: Input,
    framing: Framing,
}

impl Bed {
    pub fn new(test: &str, interaction_partitions: i32, framing: Framing) -> Bed {
        let topics = topics(test, interaction_partitions);
        Bed {
            fixture: fixture(),
            dir: tempfile::tempdir().unwrap(),
            input: Input::new(&topics, framing),
            topics,
            framing,
        }
    }

    /// Writes upserts of the fixture's items in `range` (file order).
    pub fn upsert_items(
        &self,
        range: impl std::slice::SliceIndex<[(String, Vec<f32>)], Output = [(String, Vec<f32>)]>,
    ) {
        for (id, v) in &self.fixture.items[range] {
            self.input.upsert(id, v.clone());
        }
    }

    /// The config file of instance `name` ([`config`]).
    pub fn config(&self, name: &str, feed: &str) -> PathBuf {
        config(self.dir.path(), name, &self.topics, self.framing, feed)
    }

    /// [`Bed::config`] with the line `add` after the line `after` (a key
    /// in a section other than `[feed]`).
    pub fn config_adding(&self, name: &str, feed: &str, after: &str, add: &str) -> PathBuf {
        let cfg = self.config(name, feed);
        let text = std::fs::read_to_string(&cfg).unwrap();
        let edited = text.replacen(&format!("{after}\n"), &format!("{after}\n{add}\n"), 1);
        assert_ne!(text, edited, "no line {after:?} in the config");
        std::fs::write(&cfg, edited).unwrap();
        cfg
    }
}

/// A `genfeed run` process.
pub struct Service {
    child: Option<Child>,
    pub state: PathBuf,
    pub log: PathBuf,
    http: String,
}

impl Service {
    /// Starts the service and waits until it is ready (catalogue loaded).
    pub fn start(config: &Path) -> Service {
        let mut svc = Service::spawn(config);
        svc.wait_for(
            |s| s.get("/readyz").filter(|(code, _)| *code == 200),
            "readiness",
        );
        svc
    }

    /// Starts the service and waits until it serves HTTP.
    pub fn spawn(config: &Path) -> Service {
        let text = std::fs::read_to_string(config).unwrap();
        let state: PathBuf = text
            .lines()
            .find_map(|l| l.strip_prefix("state_dir = \""))
            .map(|v| v.trim_end_matches('"').into())
            .unwrap();
        let _ = std::fs::remove_file(state.join("http.addr"));
        let log = PathBuf::from(format!("{}.log", state.display()));
        let logfile = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_genfeed"));
        command
            .arg("run")
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(logfile);
        // SAFETY: only `signal`, which is async-signal-safe, runs between
        // fork and exec. SIGXFSZ ignored, a write past a file-size limit
        // (`limit_file_size`) fails with EFBIG, as on a full disk, instead
        // of killing the process; without a limit it never comes.
        unsafe {
            command.pre_exec(|| {
                libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
                Ok(())
            });
        }
        let child = command.spawn().unwrap();
        let mut svc = Service {
            child: Some(child),
            state,
            log,
            http: String::new(),
        };
        svc.http = svc.wait_for(
            |s| std::fs::read_to_string(s.state.join("http.addr")).ok(),
            "its http address",
        );
        svc
    }

    /// Polls `f` until it gives a value; fails if the process exits or
    /// [`PATIENCE`] runs out.
    pub fn wait_for<T>(&mut self, mut f: impl FnMut(&Service) -> Option<T>, what: &str) -> T {
        let start = Instant::now();
        loop {
            if let Some(v) = f(self) {
                return v;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "the service exited ({status}) waiting for {what}:\n{}",
                    self.log_text()
                );
            }
            assert!(
                start.elapsed() < PATIENCE,
                "timed out waiting for {what}:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// The whole log so far.
    pub fn log_all(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The status code and body of `GET path`.
    pub fn get(&self, path: &str) -> Option<(u16, String)> {
        let mut c = TcpStream::connect(&self.http).ok()?;
        c.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
            .ok()?;
        let mut text = String::new();
        c.read_to_string(&mut text).ok()?;
        let code = text.split_whitespace().nth(1)?.parse().ok()?;
        let body = text.split("\r\n\r\n").nth(1)?.to_string();
        Some((code, body))
    }

    /// The value of an unlabelled metric, or of `name{labels}`.
    pub fn metric(&self, series: &str) -> Option<f64> {
        let (_, body) = self.get("/metrics")?;
        body.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    /// Waits until `series` satisfies `ok`.
    pub fn wait_metric(&mut self, series: &str, ok: impl Fn(f64) -> bool) -> f64 {
        self.wait_for(
            |s| s.metric(series).filter(|v| ok(*v)),
            &format!("metric {series}"),
        )
    }

    /// From now on, no file the service writes may grow past `bytes`: its
    /// stores fail as on a full disk.
    pub fn limit_file_size(&self, bytes: u64) {
        let pid = self.child.as_ref().unwrap().id() as i32;
        let limit = libc::rlimit {
            rlim_cur: bytes,
            rlim_max: libc::RLIM_INFINITY,
        };
        // SAFETY: sets a resource limit of our own child.
        let rc = unsafe { libc::prlimit(pid, libc::RLIMIT_FSIZE, &limit, std::ptr::null_mut()) };
        assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
    }

    /// Whether the process has not exited.
    pub fn running(&mut self) -> bool {
        self.child.as_mut().unwrap().try_wait().unwrap().is_none()
    }

    /// Waits for the service to exit by itself; fails if [`PATIENCE`] runs
    /// out first.
    pub fn exited(&mut self) -> ExitStatus {
        self.wait_exit("the service did not exit")
    }

    pub fn kill9(&mut self) {
        let mut c = self.child.take().unwrap();
        c.kill().unwrap();
        c.wait().unwrap();
    }

    /// SIGTERM, then waits for the exit; fails if it takes longer than
    /// [`PATIENCE`] (the process is then killed).
    pub fn stop(&mut self) -> ExitStatus {
        let c = self.child.as_mut().unwrap();
        // SAFETY: sends a signal to our own child.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        self.wait_exit("SIGTERM did not stop the service")
    }

    fn wait_exit(&mut self, failure: &str) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                return status;
            }
            assert!(
                start.elapsed() < PATIENCE,
                "{failure}:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Writes the test's events and remembers where each landed.
pub struct Input {
    producer: FutureProducer,
    rt: tokio::runtime::Runtime,
    pub topics: Topics,
    pub framing: Framing,
}

/// Where a record landed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct At {
    pub partition: i32,
    pub offset: i64,
}

impl Input {
    pub fn new(topics: &Topics, framing: Framing) -> Input {
        Input::of(broker(), topics, framing)
    }

    /// A writer to the broker at `addr`.
    pub fn of(addr: &str, topics: &Topics, framing: Framing) -> Input {
        let producer = client_of(addr, "producer")
            .set("linger.ms", "1")
            .create()
            .unwrap();
        Input {
            producer,
            rt: runtime(),
            topics: topics.clone(),
            framing,
        }
    }

    /// Another writer for the same topics whose batches are compressed with
    /// `codec` (a `compression.type` value), as a producer configured so
    /// writes them.
    pub fn compressed(&self, codec: &str) -> Input {
        let producer = client("producer")
            .set("linger.ms", "1")
            .set("compression.type", codec)
            .create()
            .unwrap();
        Input {
            producer,
            rt: runtime(),
            topics: self.topics.clone(),
            framing: self.framing,
        }
    }

    pub fn raw(&self, topic: &str, key: &str, payload: &[u8]) -> At {
        self.send(FutureRecord::to(topic).key(key).payload(payload))
    }

    /// A record with no value, as a compacting producer writes to delete
    /// a key.
    pub fn tombstone(&self, topic: &str, key: Option<&str>) -> At {
        let record = FutureRecord::to(topic);
        self.send(match key {
            Some(key) => record.key(key),
            None => record.partition(0),
        })
    }

    fn send(&self, record: FutureRecord<'_, str, [u8]>) -> At {
        let d = self
            .rt
            .block_on(self.producer.send(record, Duration::from_secs(30)))
            .map_err(|(e, _)| e)
            .unwrap();
        At {
            partition: d.partition,
            offset: d.offset,
        }
    }

    /// Writes `n` history changelog records (users `h0`, `h1`, ..., one
    /// item each) to partition 0 of the histories topic, as fast as the
    /// broker takes them.
    pub fn changelog_records(&self, n: usize) {
        let producer: BaseProducer = client("changelog").set("linger.ms", "20").create().unwrap();
        let mut value = vec![0u8; 16];
        for k in 0..n {
            let user = format!("h{k}");
            value[4..12].copy_from_slice(&(k as i64).to_be_bytes());
            loop {
                let record = BaseRecord::<str, [u8]>::to(&self.topics.histories)
                    .partition(0)
                    .key(&user)
                    .payload(&value);
                match producer.send(record) {
                    Ok(()) => break,
                    Err((e, _)) => {
                        assert!(
                            matches!(
                                e.rdkafka_error_code(),
                                Some(rdkafka::types::RDKafkaErrorCode::QueueFull)
                            ),
                            "{e}"
                        );
                        producer.poll(Duration::from_millis(10));
                    }
                }
            }
        }
        producer.flush(Duration::from_secs(120)).unwrap();
    }

    fn record<T: Record>(&self, v: &T, id: u32) -> Vec<u8> {
        encode(v, self.framing.format(id)).unwrap()
    }

    pub fn upsert(&self, id: &str, embedding: Vec<f32>) -> At {
        self.upsert_item(embedded(id, embedding))
    }

    pub fn upsert_item(&self, item: ItemUpsert) -> At {
        self.catalogue(ItemChange::Upsert(item), None)
    }

    pub fn retire(&self, id: &str) -> At {
        self.catalogue(retire(id), None)
    }

    /// An upsert written to catalogue partition `partition` whatever its key,
    /// as a producer that does not key by item id spreads an item's events.
    pub fn upsert_to(&self, partition: i32, id: &str, embedding: Vec<f32>) -> At {
        self.catalogue(ItemChange::Upsert(embedded(id, embedding)), Some(partition))
    }

    /// A retire written to catalogue partition `partition` (see
    /// [`upsert_to`](Self::upsert_to)).
    pub fn retire_to(&self, partition: i32, id: &str) -> At {
        self.catalogue(retire(id), Some(partition))
    }

    fn catalogue(&self, change: ItemChange, partition: Option<i32>) -> At {
        let key = match &change {
            ItemChange::Upsert(u) => u.item_id.clone(),
            ItemChange::Retire(r) => r.item_id.clone(),
        };
        let payload = self.record(&CatalogueEvent { change }, 1);
        let mut record = FutureRecord::to(&self.topics.catalogue)
            .key(key.as_str())
            .payload(payload.as_slice());
        if let Some(p) = partition {
            record = record.partition(p);
        }
        self.send(record)
    }

    pub fn interaction(&self, user: &str, item: &str) -> At {
        self.interaction_keyed(user, item, user)
    }

    /// An interaction whose record key is `key`, as a careless producer
    /// writes it.
    pub fn interaction_keyed(&self, user: &str, item: &str, key: &str) -> At {
        let payload = self.record(&click(user, item), 2);
        self.raw(&self.topics.interactions.clone(), key, &payload)
    }

    /// An interaction with no key, written to interactions partition
    /// `partition`, as a producer that does not key by user spreads a
    /// user's interactions.
    pub fn interaction_to(&self, partition: i32, user: &str, item: &str) -> At {
        let payload = self.record(&click(user, item), 2);
        let record = FutureRecord::<str, [u8]>::to(&self.topics.interactions)
            .partition(partition)
            .payload(payload.as_slice());
        self.send(record)
    }
}

fn click(user: &str, item: &str) -> Interaction {
    Interaction {
        user_id: user.into(),
        item_id: item.into(),
        kind: InteractionKind::Click,
        timestamp: 1_700_000_000_000,
    }
}

fn embedded(id: &str, embedding: Vec<f32>) -> ItemUpsert {
    ItemUpsert {
        item_id: id.into(),
        embedding: Some(embedding),
        ..Default::default()
    }
}

fn retire(id: &str) -> ItemChange {
    ItemChange::Retire(ItemRetire {
        item_id: id.into(),
        reason: "test".into(),
    })
}

/// Reads a topic from the start, across calls.
pub struct Output {
    consumer: BaseConsumer,
}

impl Output {
    pub fn new(topic: &str, partitions: i32) -> Output {
        Output::of(broker(), topic, partitions)
    }

    /// A reader of the broker at `addr`.
    pub fn of(addr: &str, topic: &str, partitions: i32) -> Output {
        let consumer: BaseConsumer = client_of(addr, &format!("{topic}-reader"))
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(topic, p, Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&tpl).unwrap();
        Output { consumer }
    }

    /// Reads until `done` holds for everything read so far.
    pub fn read_until<T: Record>(
        &self,
        framing: Framing,
        seen: &mut Vec<T>,
        mut done: impl FnMut(&[T]) -> bool,
        what: &str,
    ) {
        let mut ids = SchemaIds::new();
        ids.insert::<Recommendation>(3, Recommendation::schema().clone())
            .unwrap();
        ids.insert::<DeadLetter>(4, DeadLetter::schema().clone())
            .unwrap();
        let start = Instant::now();
        while !done(seen) {
            assert!(
                start.elapsed() < PATIENCE,
                "timed out waiting for {what} ({} records read)",
                seen.len()
            );
            if let Some(m) = self.consumer.poll(Duration::from_millis(200)) {
                let m = m.unwrap();
                let format = match framing {
                    Framing::Plain => ReadFormat::Plain,
                    Framing::Confluent => ReadFormat::Confluent(&ids),
                };
                seen.push(decode(m.payload().unwrap(), format).unwrap());
            }
        }
    }
}

/// Each user's feed that answers their latest interaction, once every user
/// in `last` has one.
pub fn feeds_answering(
    out: &Output,
    framing: Framing,
    feeds: &mut Vec<Recommendation>,
    last: &HashMap<String, At>,
) -> HashMap<String, Recommendation> {
    let answered = |feeds: &[Recommendation]| {
        let mut got: HashMap<String, Recommendation> = HashMap::new();
        for f in feeds {
            let at = last.get(&f.user_id);
            let t = &f.trigger;
            if at.is_some_and(|a| a.partition == t.partition && t.offset >= a.offset) {
                got.insert(f.user_id.clone(), f.clone());
            }
        }
        got
    };
    out.read_until(
        framing,
        feeds,
        |f| answered(f).len() == last.len(),
        "a feed for every user",
    );
    answered(feeds)
}
