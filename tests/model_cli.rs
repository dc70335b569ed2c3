//! `genfeed train`, `genfeed eval` and `genfeed bench generate` as a user runs
//! them: a generated catalogue, a tokenizer, a model, a JSON report.

use std::path::Path;
use std::process::{Command, Output};

use genfeed::synth::{generate, SynthConfig};

fn genfeed(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_genfeed"))
        .args(args)
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .unwrap()
}

fn ok(o: Output) -> String {
    assert!(
        o.status.success(),
        "exit {:?}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// A small RQ-KMeans tokenizer over the catalogue's hashed attributes.
fn tokenizer(items: &Path, out: &Path) {
    ok(genfeed(&[
        "tokenizer",
        "train",
        "--items",
        p(items),
        "--method",
        "rq-kmeans",
        "--encoder",
        "attributes",
        "--codebook-size",
        "16",
        "--out",
        p(out),
    ]));
}

#[test]
fn train_then_eval_reports_quality_with_no_invalid_ids() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let files = generate(
        &data,
        &SynthConfig {
            items: 400,
            users: 500,
            topics: 10,
            ..SynthConfig::default()
        },
    )
    .unwrap();
    let tok = dir.path().join("tok");
    tokenizer(&files.items, &tok);
    let model = dir.path().join("model");
    let summary = ok(genfeed(&[
        "train",
        "--data",
        p(&data),
        "--tokenizer",
        p(&tok),
        "--out",
        p(&model),
        "--epochs",
        "3",
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
    ]));
    let summary: serde_json::Value = serde_json::from_str(&summary).unwrap();
    assert_eq!(summary["epochs"], 3);
    // The successor counts' weight was chosen on validation among those tried.
    let mixing = &summary["transitions"];
    let tried = mixing["tried"].as_array().unwrap();
    assert_eq!(tried.len(), genfeed::train::transitions::WEIGHTS.len());
    let best = tried
        .iter()
        .map(|t| t["ndcg10"].as_f64().unwrap())
        .fold(0.0, f64::max);
    let chosen = tried
        .iter()
        .find(|t| t["weight"] == mixing["weight"])
        .unwrap();
    assert_eq!(chosen["ndcg10"].as_f64().unwrap(), best);
    assert!(mixing["pairs"].as_u64().unwrap() > 0);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["transition_weight"], mixing["weight"]);
    for f in [
        "config.json",
        "model.safetensors",
        "train_log.csv",
        "train_curves.png",
        "checkpoint/state.json",
        "transitions.safetensors",
    ] {
        assert!(model.join(f).is_file(), "{f} missing");
    }

    let report = ok(genfeed(&[
        "eval",
        "--data",
        p(&data),
        "--model",
        p(&model),
        "--tokenizer",
        p(&tok),
        "--json",
    ]));
    let report: serde_json::Value = serde_json::from_str(&report).unwrap();
    assert_eq!(report["users"], 500);
    assert_eq!(report["invalid_rate"], 0.0);
    let r10 = report["recall10"].as_f64().unwrap();
    let r5 = report["recall5"].as_f64().unwrap();
    let n10 = report["ndcg10"].as_f64().unwrap();
    assert!(r10 >= r5 && r10 >= n10 && n10 > 0.0, "{report}");
    assert!(report["coverage10"].as_f64().unwrap() > 0.0);

    // A tokenizer of another catalogue is refused, naming the mismatch.
    let other = dir.path().join("other");
    let files2 = generate(
        &dir.path().join("data2"),
        &SynthConfig {
            items: 300,
            users: 50,
            topics: 10,
            seed: 99,
            ..SynthConfig::default()
        },
    )
    .unwrap();
    tokenizer(&files2.items, &other);
    let o = genfeed(&[
        "eval",
        "--data",
        p(&data),
        "--model",
        p(&model),
        "--tokenizer",
        p(&other),
    ]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("tokenizer"), "{err}");
}

#[test]
fn bench_generate_reports_throughput_against_the_matmul_peak() {
    let out = ok(genfeed(&[
        "bench",
        "generate",
        "--beams",
        "5",
        "--batch",
        "4",
        "--requests",
        "8",
        "--items",
        "500",
        "--json",
    ]));
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["items"], 500);
    assert_eq!(r["requests"], 8);
    assert!(r["recs_per_sec"].as_f64().unwrap() > 0.0);
    assert!(r["gflop_per_request"].as_f64().unwrap() > 0.0);
    let share = r["share_of_peak"].as_f64().unwrap();
    assert!(share > 0.0 && share.is_finite(), "{r}");
}
