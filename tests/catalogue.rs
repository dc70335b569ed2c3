//! The catalogue path end to end: tokenizer, registry and index kept in step,
//! through publishes, merges, restarts and a crash in the middle of a merge.

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;

use genfeed::catalogue::{vector_hash, Catalogue, CatalogueConfig};
use genfeed::embed::catalogue::encode_items;
use genfeed::embed::EncoderSpec;
use genfeed::registry::{LiveChange, Position};
use genfeed::sid::{Code, Sid};
use genfeed::synth::{generate, SynthConfig};
use genfeed::tokenizer::train::{train, Provenance, TrainData, TrainOptions};
use genfeed::tokenizer::{FrozenTokenizer, Method};
use indicatif::ProgressBar;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const DIM: usize = 8;

/// A small RQ-KMeans tokenizer over 8-dimensional embeddings, `capacity`
/// items to a content prefix.
fn tokenizer(dir: &Path, capacity: usize) -> Arc<FrozenTokenizer> {
    let files = generate(
        dir,
        &SynthConfig {
            items: 400,
            users: 10,
            topics: 16,
            embedding_dim: DIM,
            ..SynthConfig::default()
        },
    )
    .unwrap();
    let items = genfeed::dataset::read_items(&files.items).unwrap();
    let spec = EncoderSpec::Precomputed {
        field: "embedding".into(),
        dim: DIM,
    };
    let vectors = encode_items(&items, &spec, None, &ProgressBar::hidden()).unwrap();
    let ids: Vec<String> = items.rows.iter().map(|r| r.id.clone()).collect();
    let mut opts = TrainOptions::new(Method::RqKmeans);
    opts.codebook_size = 16;
    opts.last_level_capacity = Some(capacity);
    let out = dir.join("tokenizer");
    train(
        &ids,
        TrainData::Content {
            vectors: &vectors,
            encoder: spec,
            content_map: None,
        },
        &opts,
        Provenance {
            items_file: &files.items,
            interactions_file: None,
        },
        &out,
        &ProgressBar::hidden(),
    )
    .unwrap();
    Arc::new(FrozenTokenizer::load(&out).unwrap())
}

fn vector(rng: &mut ChaCha8Rng) -> Vec<f32> {
    (0..DIM).map(|_| rng.random_range(-1.0..1.0)).collect()
}

fn registry_live(c: &Catalogue) -> Vec<(Sid, u32)> {
    c.registry().live().collect::<Result<_, _>>().unwrap()
}

#[test]
fn changes_are_decodable_at_the_next_publish_and_follow_the_registry() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path(), 4096);
    let cfg = CatalogueConfig::new(dir.path().join("catalogue"));
    let (mut cat, _) = Catalogue::open(tok.clone(), &cfg).unwrap();
    let reader = cat.reader();
    let mut rng = ChaCha8Rng::seed_from_u64(1);

    // A training item gets its training SID.
    let (train_id, train_sid) = tok.training_items()[7].clone();
    let v = vector(&mut rng);
    let change = cat
        .upsert(&train_id, vector_hash(&v), &v, Position::new(0, 1))
        .unwrap();
    assert!(
        matches!(change, LiveChange::Added { sid, .. } if sid == train_sid),
        "{change:?}"
    );

    // A brand-new item: decodable at the next publish, no merge needed.
    let v = vector(&mut rng);
    let LiveChange::Added { ord, sid } = cat
        .upsert("brand-new", vector_hash(&v), &v, Position::new(0, 2))
        .unwrap()
    else {
        panic!("a new item is added");
    };
    assert_eq!(
        reader.snapshot().get(sid),
        None,
        "not visible before publish"
    );
    let s = cat.publish().unwrap();
    assert_eq!(s.get(sid), Some(ord));
    assert_eq!(s.pending(), 2, "served from the overlay");
    assert!(s.seek(sid.codes()).is_some(), "decodable");

    // Replaying the same event changes nothing.
    assert_eq!(
        cat.upsert("brand-new", vector_hash(&v), &v, Position::new(0, 2))
            .unwrap(),
        LiveChange::Unchanged
    );

    // New content moves the item; a reader holding the old snapshot still
    // decodes the old SID, and nobody else gets it while that reader lives.
    let held = cat.publish().unwrap();
    let w: Vec<f32> = v.iter().map(|x| -x).collect();
    let change = cat
        .upsert("brand-new", vector_hash(&w), &w, Position::new(0, 3))
        .unwrap();
    let LiveChange::Moved { old, new, .. } = change else {
        panic!("content change moves the SID: {change:?}");
    };
    assert_eq!(old, sid);
    let s = cat.publish().unwrap();
    assert_eq!(s.get(old), None);
    assert_eq!(s.get(new), Some(ord));
    assert_eq!(held.get(old), Some(ord));
    for i in 0..200 {
        let LiveChange::Added { sid: other, .. } = cat
            .upsert(
                &format!("same-{i}"),
                vector_hash(&v),
                &v,
                Position::new(0, 4),
            )
            .unwrap()
        else {
            panic!("added");
        };
        assert_ne!(
            other, old,
            "a SID still decodable by a reader went to another item"
        );
    }
    drop(held);

    // Retire: gone at the next publish; an item never seen is recorded,
    // retired, and decodes nothing.
    cat.retire("brand-new", Position::new(0, 5)).unwrap();
    let s = cat.publish().unwrap();
    assert_eq!(s.get(new), None);
    let live = cat.reader().snapshot().live();
    assert!(matches!(
        cat.retire("never-seen", Position::new(0, 6)).unwrap(),
        LiveChange::RetiredUnseen { .. }
    ));
    assert_eq!(cat.publish().unwrap().live(), live);

    // Merge and restart: the index equals the registry.
    cat.merge_now().unwrap();
    assert_eq!(cat.reader().snapshot().live(), registry_live(&cat));
    cat.flush().unwrap();
    drop(cat);
    let (cat, opened) = Catalogue::open(tok, &cfg).unwrap();
    assert_eq!(opened, genfeed::index::Opened::Reopened);
    assert_eq!(cat.reader().snapshot().live(), registry_live(&cat));
    assert_eq!(cat.reader().snapshot().len(), 201);
}

#[test]
fn items_of_one_content_past_a_prefixs_capacity_take_the_prefixes_next_to_it() {
    let dir = tempfile::tempdir().unwrap();
    let capacity = 256;
    let tok = tokenizer(dir.path(), capacity);
    let cfg = CatalogueConfig::new(dir.path().join("catalogue"));
    let (mut cat, _) = Catalogue::open(tok.clone(), &cfg).unwrap();
    let v = vector(&mut ChaCha8Rng::seed_from_u64(3));
    let order: Vec<Vec<Code>> = tok.content_codes("twin", &v).unwrap().prefixes().collect();
    let mut taken: BTreeMap<&[Code], usize> = BTreeMap::new();
    for (_, sid) in tok.training_items() {
        *taken.entry(sid.prefix()).or_default() += 1;
    }

    // Twice a prefix's capacity and more, all with the same content.
    let n = 2 * capacity + 100;
    let mut added = Vec::new();
    for i in 0..n {
        let change = cat
            .upsert(
                &format!("twin-{i}"),
                vector_hash(&v),
                &v,
                Position::new(0, i as u64),
            )
            .unwrap();
        let LiveChange::Added { ord, sid } = change else {
            panic!("twin {i}: {change:?}");
        };
        added.push((ord, sid));
    }
    let s = cat.publish().unwrap();
    for &(ord, sid) in &added {
        assert_eq!(s.get(sid), Some(ord), "every twin is decodable");
    }
    let distinct: HashSet<Sid> = added.iter().map(|&(_, sid)| sid).collect();
    assert_eq!(distinct.len(), n);
    let outside = added.iter().filter(|(_, sid)| sid.prefix() != order[0]);
    assert_eq!(cat.spilled(), outside.count() as u64);
    assert!(cat.spilled() >= (n - capacity) as u64);

    // They filled the prefixes in the tokenizer's order: the nearest first,
    // each to its capacity (with the training items there) before the next.
    let mut twins: BTreeMap<&[Code], usize> = BTreeMap::new();
    for (_, sid) in &added {
        *twins.entry(sid.prefix()).or_default() += 1;
    }
    let used = order
        .iter()
        .take_while(|p| twins.contains_key(p.as_slice()))
        .count();
    assert_eq!(
        used,
        twins.len(),
        "used prefixes {twins:?}, order {order:?}"
    );
    assert!(used >= 3, "{twins:?}");
    for p in &order[..used - 1] {
        let held = twins[p.as_slice()] + taken.get(p.as_slice()).copied().unwrap_or(0);
        assert_eq!(
            held, capacity,
            "prefix {p:?} left room before the next took twins"
        );
    }
}

const CHILD: &str = "GENFEED_CRASH_CHILD_DIR";

/// Runs as a child process: applies batches of changes and merges in a loop,
/// announcing each merge, until the parent kills it.
fn crash_child(dir: &Path) {
    let tok = Arc::new(FrozenTokenizer::load(&dir.join("tokenizer")).unwrap());
    let mut cfg = CatalogueConfig::new(dir.join("catalogue"));
    cfg.merge_threshold = usize::MAX;
    let (mut cat, _) = Catalogue::open(tok, &cfg).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let mut position = 0;
    for round in 0.. {
        for _ in 0..2000 {
            position += 1;
            let id = format!("item-{}", rng.random_range(0..20_000));
            if rng.random_range(0..5) == 0 {
                let _ = cat.retire(&id, Position::new(0, position));
            } else {
                let v = vector(&mut rng);
                cat.upsert(&id, vector_hash(&v), &v, Position::new(0, position))
                    .unwrap();
            }
        }
        cat.publish().unwrap();
        cat.flush().unwrap();
        println!("merging {round}");
        cat.merge_now().unwrap();
    }
}

#[test]
fn kill_during_merge_then_restart_index_equals_registry() {
    if let Some(dir) = std::env::var_os(CHILD) {
        crash_child(Path::new(&dir));
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer(dir.path(), 4096);
    drop(tok);
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "kill_during_merge_then_restart_index_equals_registry",
            "--nocapture",
        ])
        .env(CHILD, dir.path())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    // Let a few merges complete, then kill the child as the next one starts.
    let mut seen = 0;
    for line in lines.by_ref() {
        if line.unwrap().starts_with("merging") {
            seen += 1;
            if seen == 4 {
                break;
            }
        }
    }
    assert_eq!(seen, 4, "the child stopped before its fourth merge");
    child.kill().unwrap();
    child.wait().unwrap();

    let tok = Arc::new(FrozenTokenizer::load(&dir.path().join("tokenizer")).unwrap());
    let cfg = CatalogueConfig::new(dir.path().join("catalogue"));
    let (cat, _) = Catalogue::open(tok, &cfg).unwrap();
    let live = registry_live(&cat);
    assert!(
        live.len() > 1000,
        "the child applied changes before the kill: {}",
        live.len()
    );
    assert_eq!(cat.reader().snapshot().live(), live);
    let stray: Vec<_> = std::fs::read_dir(dir.path().join("catalogue/index"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(stray.len(), 1, "only the recorded base remains: {stray:?}");
}
