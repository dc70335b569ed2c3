//! The tokenizer end to end: train on generated catalogues, load the artifact in
//! other processes, assign, and refuse bad input with a clear error.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::{Command, Output};

use genfeed::dataset::{load_sequences, read_items};
use genfeed::embed::catalogue::{encode_items, EncoderKind};
use genfeed::embed::{EncoderSpec, Vectors};
use genfeed::sid::Sid;
use genfeed::synth::{generate, SynthConfig, SynthFiles};
use genfeed::tokenizer::train::{train, Provenance, TrainData, TrainOptions};
use genfeed::tokenizer::{FrozenTokenizer, Method};
use indicatif::ProgressBar;

fn synth(dir: &Path, items: usize, embedding_dim: usize) -> SynthFiles {
    generate(
        dir,
        &SynthConfig {
            items,
            users: 600,
            topics: 24,
            embedding_dim,
            ..SynthConfig::default()
        },
    )
    .unwrap()
}

fn genfeed(args: &[&str], threads: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_genfeed"))
        .args(args)
        .env("RAYON_NUM_THREADS", threads)
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn precomputed(items_path: &Path) -> (Vec<String>, Vectors, EncoderSpec) {
    let items = read_items(items_path).unwrap();
    let spec = EncoderSpec::Precomputed {
        field: "embedding".into(),
        dim: 16,
    };
    let v = encode_items(&items, &spec, None, &ProgressBar::hidden()).unwrap();
    (items.rows.iter().map(|r| r.id.clone()).collect(), v, spec)
}

fn small_opts(method: Method) -> TrainOptions {
    let mut o = TrainOptions::new(method);
    o.codebook_size = 32;
    o.rq_vae.hidden = vec![32];
    o.rq_vae.latent = 8;
    o.rq_vae.epochs = 30;
    o.rq_vae.batch_size = 256;
    o
}

/// Every item gets exactly one SID and no two items share one.
fn assert_unique(tok: &FrozenTokenizer, n: usize) {
    let sids: HashSet<Sid> = tok.training_items().iter().map(|(_, s)| *s).collect();
    assert_eq!(tok.training_items().len(), n);
    assert_eq!(sids.len(), n, "SIDs are not unique");
    assert!(sids.iter().all(|s| s.levels() == tok.sid_levels()));
}

#[test]
fn content_methods_give_unique_meaningful_sids() {
    let dir = tempfile::tempdir().unwrap();
    let files = synth(dir.path(), 1500, 16);
    let (ids, vectors, spec) = precomputed(&files.items);
    for method in [Method::RqKmeans, Method::RqVae] {
        let out = dir.path().join(method.name());
        let data = TrainData::Content {
            vectors: &vectors,
            encoder: spec.clone(),
            content_map: None,
        };
        let prov = Provenance {
            items_file: &files.items,
            interactions_file: None,
        };
        let tok = train(
            &ids,
            data,
            &small_opts(method),
            prov,
            &out,
            &ProgressBar::hidden(),
        )
        .unwrap();
        assert_unique(&tok, ids.len());
        let report = &tok.manifest().metrics;
        assert!(report.levels[0].utilisation >= 0.5, "{method:?}: {report}");
        // Items of one hidden topic should mostly share their first code.
        let first: HashMap<&str, u16> = tok
            .training_items()
            .iter()
            .map(|(i, s)| (i.as_str(), s.codes()[0]))
            .collect();
        let mut same_topic_same_code = 0;
        let mut pairs = 0;
        for i in 0..ids.len() - 24 {
            pairs += 1;
            same_topic_same_code +=
                (first[ids[i].as_str()] == first[ids[i + 24].as_str()]) as usize;
        }
        assert!(
            same_topic_same_code * 10 >= pairs * 8,
            "{method:?}: only {same_topic_same_code}/{pairs} same-topic pairs share a first code"
        );
        // Reconstructions from the SIDs alone keep the topics apart: an
        // item is nearer one of its topic than one of the next topic.
        let sids: HashMap<&str, Sid> = tok
            .training_items()
            .iter()
            .map(|(i, s)| (i.as_str(), *s))
            .collect();
        let unit = |id: &str| {
            let sid = sids[id];
            let mut v = Vec::new();
            assert!(tok.reconstruct(sid.prefix(), &mut v));
            let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            v.into_iter().map(|x| x / n).collect::<Vec<f32>>()
        };
        let cos = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
        let (mut same, mut other) = (0.0, 0.0);
        for i in 0..ids.len() - 24 {
            let v = unit(&ids[i]);
            same += cos(&v, &unit(&ids[i + 24]));
            other += cos(&v, &unit(&ids[i + 1]));
        }
        assert!(
            same > other + 0.3 * (ids.len() - 24) as f32,
            "{method:?}: same-topic cosine sum {same}, other-topic {other}"
        );
        // Loading again in this process gives the same tokenizer.
        let again = FrozenTokenizer::load(&out).unwrap();
        assert_eq!(again.training_items(), tok.training_items());
        assert_eq!(again.version(), tok.version());
    }
}

#[test]
fn svd_tokenizes_from_interactions_and_folds_in_new_items() {
    let dir = tempfile::tempdir().unwrap();
    let files = synth(dir.path(), 800, 0);
    let items = read_items(&files.items).unwrap();
    let seqs = load_sequences(&files.inter, Some(&items)).unwrap();
    let ids: Vec<String> = items.rows.iter().map(|r| r.id.clone()).collect();
    let out = dir.path().join("svd");
    let mut opts = TrainOptions::new(Method::Svd);
    opts.codebook_size = 16;
    let tok = train(
        &ids,
        TrainData::Interactions {
            rows: &seqs.seqs,
            users: &seqs.users,
        },
        &opts,
        Provenance {
            items_file: &files.items,
            interactions_file: Some(&files.inter),
        },
        &out,
        &ProgressBar::hidden(),
    )
    .unwrap();
    assert_unique(&tok, ids.len());
    for l in &tok.manifest().metrics.levels {
        assert!(l.utilisation > 0.9, "quantile bins use every code: {l:?}");
    }
    // An item folded in from the users of a known item lands on that item's
    // content codes.
    let target = 5usize;
    let users: Vec<&str> = seqs
        .seqs
        .iter()
        .enumerate()
        .filter(|(_, s)| s.contains(&(target as u32)))
        .map(|(u, _)| seqs.users[u].as_str())
        .collect();
    let v = tok.fold_in(users.iter().copied()).unwrap();
    let content = tok.content_codes("new", &v).unwrap();
    let known = tok.training_items()[target].1;
    assert_eq!(&content.codes[..], known.prefix());
    // Where the item goes if that prefix is full: the last factor's other
    // bins, its own first, then outwards.
    let bins = tok.manifest().codebook_sizes[2];
    let mut ranked = content.last_ranked.clone();
    assert_eq!(ranked[0], content.codes[2]);
    ranked.sort_unstable();
    assert_eq!(ranked, (0..bins as u16).collect::<Vec<_>>());
    assert!(tok.fold_in(["nobody"]).is_none());
    // Bins are no codewords: there is nothing to reconstruct.
    assert!(!tok.reconstruct(&content.codes, &mut Vec::new()));
}

#[test]
fn assign_is_deterministic_across_processes_and_threads() {
    let dir = tempfile::tempdir().unwrap();
    let files = synth(dir.path(), 1200, 16);
    let tokdir = dir.path().join("tok");
    let (items, tok) = (files.items.to_str().unwrap(), tokdir.to_str().unwrap());
    let o = genfeed(
        &[
            "tokenizer",
            "train",
            "--items",
            items,
            "--method",
            "rq-kmeans",
            "--out",
            tok,
            "--codebook-size",
            "32",
        ],
        "2",
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let a = genfeed(
        &["tokenizer", "assign", "--tokenizer", tok, "--items", items],
        "1",
    );
    let b = genfeed(
        &["tokenizer", "assign", "--tokenizer", tok, "--items", items],
        "2",
    );
    assert!(a.status.success(), "{}", stderr(&a));
    assert_eq!(a.stdout, b.stdout);
    let table = std::fs::read(tokdir.join("items.tsv")).unwrap();
    assert_eq!(a.stdout, table, "assign reproduces the training SIDs");
    assert_eq!(String::from_utf8(a.stdout).unwrap().lines().count(), 1200);
}

#[test]
fn new_items_never_move_existing_sids() {
    let dir = tempfile::tempdir().unwrap();
    let files = synth(dir.path(), 600, 16);
    let (ids, vectors, spec) = precomputed(&files.items);
    let out = dir.path().join("tok");
    let tok = train(
        &ids,
        TrainData::Content {
            vectors: &vectors,
            encoder: spec,
            content_map: None,
        },
        &small_opts(Method::RqKmeans),
        Provenance {
            items_file: &files.items,
            interactions_file: None,
        },
        &out,
        &ProgressBar::hidden(),
    )
    .unwrap();
    let before: HashMap<String, Sid> = tok.training_items().iter().cloned().collect();
    let mut assigner = tok.assigner();
    // A known item keeps its SID even if its vector now says otherwise.
    assert_eq!(
        assigner.assign(&ids[0], vectors.row(1)).unwrap(),
        before[&ids[0]]
    );
    // Copies of item 3's content collide with it and take the next free codes.
    let mut seen = HashSet::new();
    let prefix = before[&ids[3]].prefix().to_vec();
    let taken: HashSet<u16> = before
        .values()
        .filter(|s| s.prefix() == prefix)
        .map(|s| s.last())
        .collect();
    for k in 0..5 {
        let sid = assigner
            .assign(&format!("new-{k}"), vectors.row(3))
            .unwrap();
        assert_eq!(sid.prefix(), &prefix[..]);
        assert!(!taken.contains(&sid.last()), "{sid} reuses a training code");
        assert!(seen.insert(sid));
        let expected = (0..).find(|c| {
            !taken.contains(c) && !seen.iter().any(|s: &Sid| s.last() == *c && *s != sid)
        });
        assert_eq!(Some(sid.last()), expected, "smallest free code");
        // Asking again gives the same SID.
        assert_eq!(
            assigner
                .assign(&format!("new-{k}"), vectors.row(7))
                .unwrap(),
            sid
        );
    }
    for (id, sid) in &before {
        assert_eq!(assigner.get(id), Some(*sid));
    }
}

#[test]
fn bad_input_gets_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let files = synth(dir.path(), 300, 16);
    let tokdir = dir.path().join("tok");
    let tok = tokdir.to_str().unwrap();
    let items = files.items.to_str().unwrap();
    let o = genfeed(
        &[
            "tokenizer",
            "train",
            "--items",
            items,
            "--method",
            "rq-kmeans",
            "--out",
            tok,
            "--codebook-size",
            "8",
        ],
        "1",
    );
    assert!(o.status.success(), "{}", stderr(&o));

    let text = std::fs::read_to_string(&files.items).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    let write = |name: &str, lines: &[String]| {
        let p = dir.path().join(name);
        std::fs::write(&p, lines.join("\n") + "\n").unwrap();
        p.to_str().unwrap().to_string()
    };

    // A malformed row: a field missing.
    let mut broken = lines.clone();
    broken[5] = broken[5].split('\t').take(2).collect::<Vec<_>>().join("\t");
    let p = write("broken.item", &broken);
    let o = genfeed(
        &["tokenizer", "assign", "--tokenizer", tok, "--items", &p],
        "1",
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("broken.item:6"), "{}", stderr(&o));

    // A wrong-dimension embedding names the item.
    let mut cols: Vec<&str> = lines[10].split('\t').collect();
    let short = cols[4].split(' ').take(15).collect::<Vec<_>>().join(" ");
    cols[4] = &short;
    let item9 = cols.join("\t");
    lines[10] = item9;
    let p = write("short.item", &lines);
    let o = genfeed(
        &["tokenizer", "assign", "--tokenizer", tok, "--items", &p],
        "1",
    );
    assert_eq!(o.status.code(), Some(2));
    let e = stderr(&o);
    assert!(
        e.contains("\"9\"") && e.contains("has 15 values, expected 16"),
        "{e}"
    );

    // A NaN: the loader refuses it with the line and column.
    let mut cols: Vec<String> = lines[1].split('\t').map(str::to_string).collect();
    cols[4] = format!("NaN {}", cols[4].split_once(' ').unwrap().1);
    let p = write("nan.item", &[lines[0].clone(), cols.join("\t")]);
    let o = genfeed(
        &["tokenizer", "assign", "--tokenizer", tok, "--items", &p],
        "1",
    );
    assert_eq!(o.status.code(), Some(2));
    let e = stderr(&o);
    assert!(e.contains("nan.item:2") && e.contains("embedding"), "{e}");

    // An artifact of an unknown format version.
    let manifest = tokdir.join("manifest.json");
    let m = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(
        &manifest,
        m.replace("\"format_version\": 1", "\"format_version\": 99"),
    )
    .unwrap();
    let o = genfeed(
        &["tokenizer", "assign", "--tokenizer", tok, "--items", items],
        "1",
    );
    assert_eq!(o.status.code(), Some(2));
    let e = stderr(&o);
    assert!(
        e.contains("manifest.json") && e.contains("format version 99 is not supported"),
        "{e}"
    );
    std::fs::write(&manifest, &m).unwrap();

    // Damaged weights are caught by their digest.
    let weights = tokdir.join("weights.safetensors");
    let mut w = std::fs::read(&weights).unwrap();
    let last = w.len() - 1;
    w[last] ^= 0xff;
    std::fs::write(&weights, &w).unwrap();
    let o = genfeed(
        &["tokenizer", "assign", "--tokenizer", tok, "--items", items],
        "1",
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("weights.safetensors: SHA-256"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn an_error_names_the_file_and_says_each_cause_once() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("none.toml");
    let o = genfeed(&["run", "--config", missing.to_str().unwrap()], "1");
    assert_eq!(o.status.code(), Some(2));
    let e = stderr(&o);
    assert!(e.contains("none.toml"), "{e}");
    assert_eq!(e.matches("No such file or directory").count(), 1, "{e}");
}

#[test]
fn encoder_choice_follows_the_columns() {
    let dir = tempfile::tempdir().unwrap();
    let files = synth(dir.path(), 50, 4);
    let items = read_items(&files.items).unwrap();
    use genfeed::embed::catalogue::choose;
    let (kind, fields) = choose(&items, EncoderKind::Auto, &[]).unwrap();
    assert_eq!(
        (kind, fields),
        (EncoderKind::Precomputed, vec!["embedding".to_string()])
    );
    let (kind, fields) = choose(&items, EncoderKind::Attributes, &[]).unwrap();
    assert_eq!(kind, EncoderKind::Attributes);
    assert_eq!(fields, ["title", "categories", "attributes"]);
    let err = choose(&items, EncoderKind::Text, &["nope".into()]).unwrap_err();
    assert!(err.to_string().contains("no column \"nope\""), "{err}");
}
