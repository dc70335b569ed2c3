//! Load test of the SID registry alone: `n` upserts of new items, then `n`
//! content changes, releasing every 64 events as the catalogue does, then a
//! flush and a reopen.
//!
//! `cargo run --release --example registry_load -- [n]` (default 1,000,000).

use std::convert::Infallible;
use std::time::Instant;

use genfeed::registry::{Position, Registry, TokenizerBinding};
use genfeed::sid::Code;
use genfeed::tokenizer::ContentCodes;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("n"))
        .unwrap_or(1_000_000);
    let dir = tempfile::tempdir().unwrap();
    let binding = TokenizerBinding {
        version: "load".into(),
        sid_levels: 4,
        last_level_capacity: 1024,
        training: vec![],
    };
    let mut r = Registry::open(dir.path(), &binding, Some(500)).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let codes = |rng: &mut ChaCha8Rng| {
        let codes: Vec<Code> = (0..3).map(|_| rng.random_range(0..64)).collect();
        let last_ranked = vec![codes[2]];
        ContentCodes { codes, last_ranked }
    };
    let mut position = 0u64;
    let mut generation = 0u64;
    let start = Instant::now();
    for i in 0..n {
        position += 1;
        let c = codes(&mut rng);
        r.apply_upsert(
            &format!("item-{i}"),
            [i as u8; 32],
            Position::new(0, position),
            generation,
            || Ok::<_, Infallible>(c),
        )
        .unwrap();
        if i % 64 == 63 {
            generation += 1;
            r.release(generation.saturating_sub(2)).unwrap();
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{n} new items: {secs:.2} s = {:.0} upserts/s",
        n as f64 / secs
    );
    let start = Instant::now();
    for i in 0..n {
        position += 1;
        let c = codes(&mut rng);
        let id = rng.random_range(0..n);
        r.apply_upsert(
            &format!("item-{id}"),
            [!(i as u8); 32],
            Position::new(0, position),
            generation,
            || Ok::<_, Infallible>(c),
        )
        .unwrap();
        if i % 64 == 63 {
            generation += 1;
            r.release(generation.saturating_sub(2)).unwrap();
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{n} content changes: {secs:.2} s = {:.0} upserts/s",
        n as f64 / secs
    );
    let start = Instant::now();
    r.flush().unwrap();
    println!("flush: {:.2} s", start.elapsed().as_secs_f64());
    let live = r.live_count();
    drop(r);
    let bytes = dir_bytes(dir.path());

    println!(
        "on disk: {bytes} bytes for {live} live items = {:.0} bytes per live item",
        bytes as f64 / live as f64
    );
    let start = Instant::now();
    let r = Registry::open(dir.path(), &binding, Some(500)).unwrap();
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(r.live_count(), live);
    println!("reopen: {secs:.2} s");
    let start = Instant::now();
    let scanned = r.live().count();
    println!(
        "live scan: {scanned} in {:.2} s",
        start.elapsed().as_secs_f64()
    );
}

fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let meta = e.metadata().unwrap();
            if meta.is_dir() {
                dir_bytes(&e.path())
            } else {
                meta.len()
            }
        })
        .sum()
}
