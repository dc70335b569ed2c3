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

/// A tiny model, trained in seconds.
const TINY: [&str; 12] = [
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
];

/// 400 items in 10 topics, 500 users.
fn synth(dir: &Path) -> genfeed::synth::SynthFiles {
    generate(
        dir,
        &SynthConfig {
            items: 400,
            users: 500,
            topics: 10,
            ..SynthConfig::default()
        },
    )
    .unwrap()
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
    let files = synth(&data);
    let tok = dir.path().join("tok");
    tokenizer(&files.items, &tok);
    let model = dir.path().join("model");
    let summary = ok(genfeed(
        &[
            "train",
            "--data",
            p(&data),
            "--tokenizer",
            p(&tok),
            "--out",
            p(&model),
            "--epochs",
            "3",
        ]
        .into_iter()
        .chain(TINY)
        .collect::<Vec<_>>(),
    ));
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

/// Each user's items of an `.inter` file, in timestamp order.
fn sequences(inter: &Path) -> std::collections::HashMap<String, Vec<String>> {
    let mut by_user: std::collections::HashMap<String, Vec<(f64, String)>> = Default::default();
    for line in std::fs::read_to_string(inter).unwrap().lines().skip(1) {
        let f: Vec<&str> = line.split('\t').collect();
        by_user
            .entry(f[0].to_string())
            .or_default()
            .push((f[2].parse().unwrap(), f[1].to_string()));
    }
    by_user
        .into_iter()
        .map(|(u, mut v)| {
            v.sort_by(|a, b| a.0.total_cmp(&b.0));
            (u, v.into_iter().map(|(_, i)| i).collect())
        })
        .collect()
}

#[test]
fn the_cold_start_protocol_keeps_cold_items_out_of_training_and_reports_them_apart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let files = synth(&data);
    let cold_dir = dir.path().join("cold");
    ok(genfeed(&[
        "cold-split",
        "--data",
        p(&data),
        "--out",
        p(&cold_dir),
        "--fraction",
        "0.2",
    ]));
    let cold: std::collections::HashSet<String> =
        std::fs::read_to_string(cold_dir.join("cold_items.txt"))
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect();
    assert!(cold.len() > 10, "{} cold items", cold.len());
    // A cold item survives only as its user's last item, and every other
    // interaction is kept.
    let before = sequences(&files.inter);
    let after = sequences(&cold_dir.join(files.inter.file_name().unwrap()));
    let mut cold_users = 0;
    for (user, seq) in &after {
        let (last, rest) = seq.split_last().unwrap();
        assert!(
            rest.iter().all(|i| !cold.contains(i)),
            "user {user}: {seq:?}"
        );
        let kept: Vec<&String> = before[user].iter().filter(|i| !cold.contains(*i)).collect();
        assert_eq!(
            kept,
            rest.iter()
                .chain([last])
                .filter(|i| !cold.contains(*i))
                .collect::<Vec<_>>()
        );
        if cold.contains(last) && seq.len() >= 3 {
            cold_users += 1;
        }
    }
    assert!(cold_users > 0);
    assert!(cold_dir.join(files.items.file_name().unwrap()).is_file());

    // The tokenizer never sees them; train and eval assign them from content.
    let tok = dir.path().join("tok");
    let cold_items = cold_dir.join(files.items.file_name().unwrap());
    ok(genfeed(&[
        "tokenizer",
        "train",
        "--items",
        p(&cold_items),
        "--method",
        "rq-kmeans",
        "--encoder",
        "attributes",
        "--codebook-size",
        "16",
        "--exclude",
        p(&cold_dir.join("cold_items.txt")),
        "--out",
        p(&tok),
    ]));
    let frozen = genfeed::tokenizer::FrozenTokenizer::load(&tok).unwrap();
    assert_eq!(frozen.training_items().len(), 400 - cold.len());
    assert!(frozen
        .training_items()
        .iter()
        .all(|(i, _)| !cold.contains(i)));
    let model = dir.path().join("model");
    let train = |items: Option<&Path>| {
        let mut args = vec![
            "train",
            "--data",
            p(&cold_dir),
            "--tokenizer",
            p(&tok),
            "--out",
            p(&model),
            "--epochs",
            "2",
        ];
        args.extend(TINY);
        if let Some(items) = items {
            args.extend(["--items", p(items)]);
        }
        genfeed(&args)
    };
    let refused = train(None);
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--items"));
    ok(train(Some(&cold_items)));

    let report = ok(genfeed(&[
        "eval",
        "--data",
        p(&cold_dir),
        "--model",
        p(&model),
        "--tokenizer",
        p(&tok),
        "--items",
        p(&cold_items),
        "--content",
        p(&cold_items),
        "--baseline",
        "--exclude-history",
        "--json",
    ]));
    let report: serde_json::Value = serde_json::from_str(&report).unwrap();
    assert_eq!(report["invalid_rate"], 0.0);
    assert_eq!(report["cold"]["users"], cold_users);
    assert_eq!(
        report["cold"]["users"].as_u64().unwrap() + report["warm"]["users"].as_u64().unwrap(),
        report["users"].as_u64().unwrap()
    );
    assert!(report["fresh"]["items"].as_u64().unwrap() >= cold.len() as u64);
    let baseline = &report["content_baseline"];
    assert_eq!(baseline["cold"]["users"], cold_users);
    // Items of one synthetic topic share attributes, so content finds some
    // cold targets, and with the fresh mixture so does the search.
    assert!(
        baseline["cold"]["recall10"].as_f64().unwrap() > 0.0,
        "{baseline}"
    );
    assert!(
        report["cold"]["recall10"].as_f64().unwrap() > 0.0,
        "{report}"
    );
    assert!(report["fresh_share10"].as_f64().unwrap() > 0.0);
}

/// The time-ordered synthetic log cut in time: training holds the first
/// 80% of the stream and the items met in it, the stream the rest and the
/// whole catalogue; the items first met after the cut are late arrivals,
/// and the hits among the late items are taken more than the others.
#[test]
fn a_time_split_of_the_time_ordered_log_leaves_late_items_fresh() {
    let dir = tempfile::tempdir().unwrap();
    let (data, out) = (dir.path().join("data"), dir.path().join("split"));
    let (items, late) = (600usize, 100usize);
    ok(genfeed(&[
        "synth",
        "--out",
        p(&data),
        "--items",
        "600",
        "--users",
        "400",
        "--topics",
        "12",
        "--late-items",
        "100",
    ]));
    ok(genfeed(&[
        "time-split",
        "--data",
        p(&data),
        "--out",
        p(&out),
        "--cut",
        "0.8",
    ]));
    let read = |path: &Path| std::fs::read_to_string(path).unwrap();
    let rows = |text: &str| -> Vec<Vec<String>> {
        text.lines()
            .skip(1)
            .map(|l| l.split('\t').map(str::to_string).collect())
            .collect()
    };
    let all = rows(&read(&data.join("synth.inter")));
    let train = rows(&read(&out.join("train/synth.inter")));
    let stream = rows(&read(&out.join("stream/synth.inter")));
    assert_eq!(train.len() + stream.len(), all.len());
    assert_eq!(train.len(), (all.len() as f64 * 0.8).round() as usize);
    let time = |r: &Vec<String>| r[2].parse::<f64>().unwrap();
    let last_train = train.iter().map(time).fold(f64::MIN, f64::max);
    assert!(
        stream.iter().all(|r| time(r) > last_train),
        "the cut follows time"
    );
    // Timestamps are one stream's positions.
    let mut times: Vec<f64> = all.iter().map(time).collect();
    times.sort_by(f64::total_cmp);
    assert!(times.windows(2).all(|w| w[0] < w[1]));

    let known: std::collections::HashSet<&str> = train.iter().map(|r| r[1].as_str()).collect();
    let fresh: std::collections::HashSet<&str> = stream
        .iter()
        .map(|r| r[1].as_str())
        .filter(|i| !known.contains(i))
        .collect();
    assert!(!fresh.is_empty());
    let id = |i: &str| i.parse::<usize>().unwrap();
    // Fresh items are mostly the late arrivals (the rest are items nobody
    // took before the cut).
    let fresh_events: Vec<usize> = stream
        .iter()
        .filter(|r| fresh.contains(r[1].as_str()))
        .map(|r| id(&r[1]))
        .collect();
    let late_share = fresh_events.iter().filter(|&&i| i >= items - late).count() as f64
        / fresh_events.len() as f64;
    assert!(late_share > 0.75, "{late_share}");
    let catalogue = |path: &Path| -> std::collections::HashSet<String> {
        rows(&read(path))
            .into_iter()
            .map(|r| r[0].clone())
            .collect()
    };
    let train_items = catalogue(&out.join("train/synth.item"));
    let stream_items = catalogue(&out.join("stream/synth.item"));
    assert_eq!(stream_items.len(), items);
    assert_eq!(train_items.len(), items - fresh.len());
    assert!(fresh
        .iter()
        .all(|&i| !train_items.contains(i) && stream_items.contains(i)));
    // Late items appear only in the later half; hits (every other one of
    // each of the 12 topics) are taken more than the rest.
    let first_late = all
        .iter()
        .filter(|r| id(&r[1]) >= items - late)
        .map(time)
        .fold(f64::MAX, f64::min);
    assert!(first_late > all.len() as f64 * 0.5, "{first_late}");
    let taken = |hit: usize| {
        all.iter()
            .filter(|r| id(&r[1]) >= items - late && (id(&r[1]) - (items - late)) / 12 % 2 == hit)
            .count()
    };
    assert!(
        taken(0) > 3 * taken(1),
        "hits {} vs others {}",
        taken(0),
        taken(1)
    );
}

#[test]
fn a_collaborative_tokenizer_gives_a_new_item_its_sid_from_its_content_alone() {
    use genfeed::contract::ItemUpsert;
    use genfeed::embed::EncoderSpec;
    use genfeed::service::content::{content, vector};
    use genfeed::tokenizer::FrozenTokenizer;

    let dir = tempfile::tempdir().unwrap();
    let files = synth(&dir.path().join("data"));
    let (cf, map, tok) = (
        dir.path().join("cf.item"),
        dir.path().join("map.json"),
        dir.path().join("tok"),
    );
    ok(genfeed(&[
        "tokenizer",
        "embed-interactions",
        "--items",
        p(&files.items),
        "--inter",
        p(&files.inter),
        "--content",
        "attributes",
        "--content-fields",
        "attributes",
        "--dims",
        "16",
        "--map",
        p(&map),
        "--out",
        p(&cf),
    ]));
    // `tokenizer train` on the collaborative column with a content map.
    let train_with = |map: &Path, out: &Path| {
        genfeed(&[
            "tokenizer",
            "train",
            "--items",
            p(&cf),
            "--method",
            "rq-kmeans",
            "--encoder",
            "precomputed",
            "--fields",
            "embedding",
            "--codebook-size",
            "16",
            "--content-map",
            p(map),
            "--out",
            p(out),
        ])
    };
    let report = ok(train_with(&map, &tok));
    assert!(report.contains("content map"), "{report}");
    // A map whose sizes disagree is refused, naming the file.
    let mut bad: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&map).unwrap()).unwrap();
    bad["map"]["weight"].as_array_mut().unwrap().pop();
    let bad_map = dir.path().join("bad.json");
    std::fs::write(&bad_map, bad.to_string()).unwrap();
    let refused = train_with(&bad_map, &dir.path().join("bad-tok"));
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && err.contains("bad.json") && err.contains("sizes"),
        "{err}"
    );
    let frozen = FrozenTokenizer::load(&tok).unwrap();
    let spec = frozen.manifest().input.encoder.clone();
    assert!(
        matches!(&spec, EncoderSpec::Collaborative { content, .. }
            if matches!(**content, EncoderSpec::Attributes { .. })),
        "{spec:?}"
    );
    // On items the map was not fitted on, content finds the collaborative
    // first code far more often than chance.
    let check = frozen.manifest().metrics.content_map.clone().unwrap();
    assert!(check.held_out_items >= 30, "{check:?}");
    assert!(
        check.first_code_agreement > 2.0 * check.first_code_chance,
        "{check:?}"
    );

    // New items (new ids, the content of training items) in a catalogue
    // without the collaborative column: `tokenizer assign` predicts their
    // vectors from content.
    let source: Vec<(String, String)> = std::fs::read_to_string(&files.items)
        .unwrap()
        .lines()
        .skip(1)
        .take(40)
        .map(|l| {
            let cols: Vec<&str> = l.split('\t').collect();
            (cols[0].to_string(), cols[3].to_string())
        })
        .collect();
    let new_items = dir.path().join("new.item");
    let mut text = String::from("item_id:token\tattributes:token_seq\n");
    for (id, attrs) in &source {
        text.push_str(&format!("new-{id}\t{attrs}\n"));
    }
    std::fs::write(&new_items, text).unwrap();
    let assigned = ok(genfeed(&[
        "tokenizer",
        "assign",
        "--tokenizer",
        p(&tok),
        "--items",
        p(&new_items),
    ]));
    let sids: std::collections::HashMap<String, genfeed::sid::Sid> = assigned
        .lines()
        .map(|l| {
            let (id, sid) = l.split_once('\t').unwrap();
            (id.to_string(), sid.parse().unwrap())
        })
        .collect();
    assert_eq!(sids.len(), source.len());

    // The service's path for a catalogue event carrying content only gives
    // the same codes, and a twin usually shares its source's first code.
    let known: std::collections::HashMap<&str, genfeed::sid::Sid> = frozen
        .training_items()
        .iter()
        .map(|(id, sid)| (id.as_str(), *sid))
        .collect();
    let levels = frozen.sid_levels() - 1;
    let mut same_first = 0;
    for (id, attrs) in &source {
        let up = ItemUpsert {
            item_id: format!("new-{id}"),
            attributes: [("attributes".to_string(), attrs.clone())].into(),
            ..Default::default()
        };
        let c = content(&up, &spec).unwrap();
        let v = vector(&up.item_id, &c, None, &frozen).unwrap();
        let codes = frozen.content_codes(&up.item_id, &v).unwrap().codes;
        let sid = sids[&up.item_id];
        assert_eq!(codes, sid.codes()[..levels], "{}", up.item_id);
        same_first += usize::from(sid.codes()[0] == known[id.as_str()].codes()[0]);
    }
    assert!(
        same_first as f64 > 2.0 * check.first_code_chance * source.len() as f64,
        "{same_first} of {} twins share the first code (chance {:.3})",
        source.len(),
        check.first_code_chance
    );

    // An event with no content at all is an error naming the item.
    let bare = ItemUpsert {
        item_id: "bare".into(),
        ..Default::default()
    };
    let err = content(&bare, &spec).unwrap_err().to_string();
    assert!(err.contains("\"bare\""), "{err}");
}
