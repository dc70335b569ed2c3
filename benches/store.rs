//! State-store benchmark: the redb [`Store`] the registry and the histories
//! use, against sled 0.34, which they used before, on the same workloads in
//! the same run.
//!
//! `cargo bench --bench store` (1M items, 1M users, 50 fault rounds per store;
//! `STORE_BENCH_N=100000 STORE_BENCH_ROUNDS=5` for a quick look). Prints a
//! markdown table, the one in the README.
//!
//! - **registry upserts**: one event writes an item record (~100 B), its ord
//!   and its SID, grouped 256 events to a commit as the registry groups them,
//!   one flush at the end.
//! - **history appends**: 4 appends per user on average, in random user order,
//!   each a read-modify-write of the user's record, a flush every 256 appends
//!   (a feed batch flushes before its feeds are produced).
//! - **reopen**: opening the closed store and reading every key once, which is
//!   what the registry does on open.
//! - **fault loop**: this binary re-runs itself as a writer that flushes every
//!   256 appends and reports each flush; it is killed with SIGKILL at a random
//!   flush, and the store is reopened and checked to hold every key flushed in
//!   every round so far.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use genfeed::store::{Group, Store};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const GROUP: usize = 256;
const APPENDS_PER_USER: usize = 4;
const HISTORY: usize = 50;

trait Kv: Sized {
    const NAME: &'static str;
    fn open(dir: &Path) -> Self;
    fn get(&self, key: &[u8]) -> Option<Vec<u8>>;
    fn put(&self, key: &[u8], value: &[u8]);
    fn group(&self, writes: &[(Vec<u8>, Vec<u8>)]);
    fn flush(&self);
    /// Reads every key once; returns how many there are.
    fn read_all(&self) -> usize;
}

struct Sled(sled::Db);

impl Kv for Sled {
    const NAME: &'static str = "sled 0.34.7";
    fn open(dir: &Path) -> Self {
        // sled 0.34 drops its file lock from a background thread a moment
        // after the last handle goes (spacejam/sled#1234).
        let start = Instant::now();
        loop {
            match sled::Config::new().path(dir).open() {
                Ok(db) => return Sled(db),
                Err(_) if start.elapsed() < Duration::from_secs(5) => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("{e}"),
            }
        }
    }
    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.0.get(key).unwrap().map(|v| v.to_vec())
    }
    fn put(&self, key: &[u8], value: &[u8]) {
        self.0.insert(key, value).unwrap();
    }
    fn group(&self, writes: &[(Vec<u8>, Vec<u8>)]) {
        let mut batch = sled::Batch::default();
        for (k, v) in writes {
            batch.insert(k.as_slice(), v.as_slice());
        }
        self.0.apply_batch(batch).unwrap();
    }
    fn flush(&self) {
        self.0.flush().unwrap();
    }
    fn read_all(&self) -> usize {
        count(self.0.iter().map(|kv| kv.unwrap()))
    }
}

/// The store as the histories use it: appends collected in a group of up to
/// 256, committed as one.
struct Redb(Store, std::sync::Mutex<Group>);

impl Kv for Redb {
    const NAME: &'static str = "redb 4.6.0";
    fn open(dir: &Path) -> Self {
        let store = Store::open_in(dir, "store.redb", Duration::from_millis(500)).unwrap();
        Redb(store, Default::default())
    }
    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        if let Some(staged) = self.1.lock().unwrap().get(key) {
            return staged.map(<[u8]>::to_vec);
        }
        self.0.get(key).unwrap()
    }
    fn put(&self, key: &[u8], value: &[u8]) {
        let mut group = self.1.lock().unwrap();
        group.stage([(key.to_vec(), Some(value.to_vec()))]);
        if group.due(GROUP, Duration::MAX) {
            group.commit(&self.0).unwrap();
        }
    }
    fn group(&self, writes: &[(Vec<u8>, Vec<u8>)]) {
        self.0
            .write(
                writes
                    .iter()
                    .map(|(k, v)| (k.as_slice(), Some(v.as_slice()))),
            )
            .unwrap();
    }
    fn flush(&self) {
        self.1.lock().unwrap().commit(&self.0).unwrap();
        self.0.flush().unwrap();
    }
    fn read_all(&self) -> usize {
        count(self.0.scan(b"").unwrap().map(|kv| kv.unwrap()))
    }
}

/// Counts the entries, every value read.
fn count<K, V: AsRef<[u8]>>(entries: impl Iterator<Item = (K, V)>) -> usize {
    entries
        .map(|(_, v)| std::hint::black_box(v.as_ref().len()))
        .fold(0, |n, _| n + 1)
}

/// Bytes the files under `dir` take on disk (allocated blocks).
fn disk_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let meta = entry.metadata().unwrap();
        total += if meta.is_dir() {
            disk_bytes(&entry.path())
        } else {
            meta.blocks() * 512
        };
    }
    total
}

fn item_event(i: u64) -> [(Vec<u8>, Vec<u8>); 3] {
    let id = format!("item{i:08}");
    let mut record = vec![b'i'];
    record.extend_from_slice(&i.to_be_bytes());
    record.extend((0..92).map(|j| (i as u8).wrapping_mul(31).wrapping_add(j)));
    let sid = [
        (i % 256) as u8,
        (i / 256 % 256) as u8,
        (i / 65536 % 256) as u8,
        0,
    ];
    let ord = (i as u32).to_be_bytes();
    [
        ([b"i", id.as_bytes()].concat(), record),
        ([&b"o"[..], &ord].concat(), id.into_bytes()),
        ([&b"s"[..], &sid].concat(), [&ord[..], &[1]].concat()),
    ]
}

struct Row {
    store: &'static str,
    upserts_per_s: f64,
    bytes_per_item: f64,
    appends_per_s: f64,
    bytes_per_user: f64,
    reopen_ms: f64,
}

fn measure<S: Kv>(n: u64) -> Row {
    let dir = tempfile::tempdir().unwrap();
    let items = dir.path().join("items");
    let start = Instant::now();
    {
        let store = S::open(&items);
        let mut writes = Vec::with_capacity(3 * GROUP);
        for i in 0..n {
            writes.extend(item_event(i));
            if writes.len() == 3 * GROUP {
                store.group(&writes);
                writes.clear();
            }
        }
        store.group(&writes);
        store.flush();
    }
    let upserts_per_s = n as f64 / start.elapsed().as_secs_f64();
    let bytes_per_item = disk_bytes(&items) as f64 / n as f64;

    let reopen = Instant::now();
    let keys = S::open(&items).read_all();
    let reopen_ms = reopen.elapsed().as_secs_f64() * 1e3;
    assert_eq!(keys as u64, 3 * n, "{}: keys lost on reopen", S::NAME);

    let users = dir.path().join("users");
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let appends = n as usize * APPENDS_PER_USER;
    let start = Instant::now();
    {
        let store = S::open(&users);
        for k in 0..appends {
            let user = format!("user{:08}", rng.random_range(0..n));
            let mut value = store.get(user.as_bytes()).unwrap_or_else(|| vec![0; 12]);
            value[4..12].copy_from_slice(&(k as u64).to_be_bytes());
            if value.len() >= 12 + 4 * HISTORY {
                value.drain(12..16);
            }
            value.extend_from_slice(&(k as u32).to_be_bytes());
            store.put(user.as_bytes(), &value);
            if k % GROUP == GROUP - 1 {
                store.flush();
            }
        }
        store.flush();
    }
    let appends_per_s = appends as f64 / start.elapsed().as_secs_f64();
    let bytes_per_user = disk_bytes(&users) as f64 / n as f64;
    Row {
        store: S::NAME,
        upserts_per_s,
        bytes_per_item,
        appends_per_s,
        bytes_per_user,
        reopen_ms,
    }
}

/// The writer of the fault loop: appends `r{round}/{k}` for k = 0, 1, ...
/// and prints k + 1 after each flush, until killed.
fn writer<S: Kv>(dir: &Path, round: u32) {
    let store = S::open(dir);
    let mut out = std::io::stdout().lock();
    for k in 0u64.. {
        let key = format!("r{round:03}/{k:010}");
        store.put(key.as_bytes(), &k.to_be_bytes().repeat(4));
        if k % GROUP as u64 == GROUP as u64 - 1 {
            store.flush();
            writeln!(out, "{}", k + 1).unwrap();
            out.flush().unwrap();
        }
    }
}

struct Faults {
    rounds: u32,
    failed: u32,
    reopen_ms: f64,
}

fn fault_loop<S: Kv>(rounds: u32) -> Faults {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let mut flushed = Vec::new();
    let mut failed = 0;
    let mut reopen = Duration::ZERO;
    for round in 0..rounds {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .env("STORE_BENCH_WRITER", format!("{}:{round}", S::NAME))
            .env("STORE_BENCH_DIR", dir.path())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let kill_at = rng.random_range(20..400);
        let mut last: u64 = 0;
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        for _ in 0..kill_at {
            match lines.next() {
                Some(line) => last = line.unwrap().parse().unwrap(),
                None => break,
            }
        }
        child.kill().unwrap();
        child.wait().unwrap();
        flushed.push(last);

        let start = Instant::now();
        let store = S::open(dir.path());
        reopen += start.elapsed();
        let lost = flushed.iter().enumerate().any(|(r, &n)| {
            (0..n).any(|k| {
                let key = format!("r{r:03}/{k:010}");
                store.get(key.as_bytes()) != Some(k.to_be_bytes().repeat(4))
            })
        });
        if lost {
            eprintln!(
                "{}: round {round}: a flushed key is missing or wrong",
                S::NAME
            );
            failed += 1;
        }
    }
    Faults {
        rounds,
        failed,
        reopen_ms: reopen.as_secs_f64() * 1e3 / rounds as f64,
    }
}

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name).map_or(default, |v| v.parse().expect(name))
}

fn main() {
    if let Ok(writer_of) = std::env::var("STORE_BENCH_WRITER") {
        let (name, round) = writer_of.rsplit_once(':').unwrap();
        let dir = std::path::PathBuf::from(std::env::var("STORE_BENCH_DIR").unwrap());
        let round = round.parse().unwrap();
        if name == Sled::NAME {
            writer::<Sled>(&dir, round)
        } else {
            writer::<Redb>(&dir, round)
        }
        return;
    }
    let n = env("STORE_BENCH_N", 1_000_000);
    let rounds = env("STORE_BENCH_ROUNDS", 50) as u32;
    eprintln!("{n} items, {n} users, {rounds} fault rounds per store");
    let rows = [
        (measure::<Sled>(n), fault_loop::<Sled>(rounds)),
        (measure::<Redb>(n), fault_loop::<Redb>(rounds)),
    ];
    println!("| store | upserts/s | bytes/item | appends/s | bytes/user | reopen + read all (ms) | kill -9 rounds lost | reopen after kill (ms) |");
    println!("|---|---|---|---|---|---|---|---|");
    for (r, f) in rows {
        println!(
            "| {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {} of {} | {:.1} |",
            r.store,
            r.upserts_per_s,
            r.bytes_per_item,
            r.appends_per_s,
            r.bytes_per_user,
            r.reopen_ms,
            f.failed,
            f.rounds,
            f.reopen_ms
        );
    }
}
