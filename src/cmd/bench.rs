//! `genfeed bench generate`: recommendation throughput of the beam search.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use clap::{Args, Subcommand};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use genfeed::eval::OfflineIndex;
use genfeed::model::fresh;
use genfeed::model::{
    flops_per_request, param_count, Affinity, ContentTable, FreshItems, Generator, Model,
    ModelConfig, Params, Request, SearchOptions, Transitions,
};
use genfeed::sid::Sid;
use genfeed::synth::random_sids;

use super::model::{device, set_threads, Decoding, DeviceArg, TFIDF_DIM};

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Recommendations per second of batched constrained beam search.
    Generate(GenerateArgs),
}

#[derive(Args)]
pub struct GenerateArgs {
    #[arg(long, default_value_t = 20)]
    beams: usize,
    /// Requests per search batch.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// CPU threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Requests to time, after one warm-up batch.
    #[arg(long, default_value_t = 512)]
    requests: usize,
    /// Items of history per request.
    #[arg(long, default_value_t = 20)]
    history: usize,
    /// A trained model directory; default: a randomly initialised model of
    /// TIGER's dimensions over a synthetic catalogue.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Synthetic catalogue size (without `--model`): TIGER's Toys has 11,924
    /// items; 12,101 is the figure the issue fixed.
    #[arg(long, default_value_t = 12_101)]
    items: usize,
    /// Give the random model prefix-scored outputs (`train
    /// --prefix-output`), to measure what they cost.
    #[arg(long)]
    prefix_output: bool,
    /// And sibling-scored outputs on the hashed levels (`train
    /// --sibling-output`).
    #[arg(long)]
    sibling_output: bool,
    /// Mix synthetic successor counts into the search at weight 0.5, this
    /// many successors per item (Toys and Sports average 9 and 10), to
    /// measure what mixing costs; 0 = the model alone.
    #[arg(long, default_value_t = 0)]
    successors: usize,
    /// Fresh items (never learnt by the model) mixed in by their content:
    /// this many of the items get random 256-wide content vectors and every
    /// request scores all of them against its last items' (0 = off).
    #[arg(long, default_value_t = 0)]
    fresh: usize,
    /// Score the fresh items with a random content affinity of this rank
    /// beside the cosine (`fit-affinity`; 0 = cosine alone).
    #[arg(long, default_value_t = 0)]
    affinity_rank: usize,
    /// Give the fresh items word-like content instead: this many weighted
    /// words each, hashed into the catalogue weighting's 1,024 buckets, as
    /// the service scores them (`feed.fresh_content = "catalogue"`); 0 =
    /// dense 256-wide vectors.
    #[arg(long, default_value_t = 0)]
    fresh_words: usize,
    /// Leave each request's history out of its list, as the service does
    /// by default (`feed.exclude_seen`).
    #[arg(long)]
    exclude_history: bool,
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceArg,
    /// Where each step's mask is built and its candidates ranked
    /// (default: the model's device).
    #[arg(long, value_enum, default_value = "auto")]
    decoding: Decoding,
    #[arg(long, default_value_t = 7)]
    seed: u64,
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct GenerateReport {
    model: String,
    params: usize,
    items: usize,
    /// Synthetic successors per item mixed into the search (0: none).
    successors: usize,
    fresh: usize,
    affinity_rank: usize,
    fresh_words: usize,
    exclude_history: bool,
    beams: usize,
    batch: usize,
    threads: usize,
    /// Where masks and candidates were made: "host" or "device".
    decoding: &'static str,
    requests: usize,
    recs_per_sec: f64,
    ms_per_request: f64,
    ms_per_batch: f64,
    gflop_per_request: f64,
    achieved_gflops: f64,
    /// candle's f32 matmul on 1024×1024 by 1024×1024 with the same threads.
    matmul_peak_gflops: f64,
    share_of_peak: f64,
}

pub fn run(c: BenchCommand) -> anyhow::Result<()> {
    match c {
        BenchCommand::Generate(a) => generate(a),
    }
}

fn generate(a: GenerateArgs) -> anyhow::Result<()> {
    set_threads(a.threads);
    let threads = candle_core::utils::get_num_threads();
    let device = device(a.device)?;
    let (cfg, model, sids, name) = match &a.model {
        Some(dir) => {
            let (cfg, model) =
                Model::load(dir, &device).with_context(|| format!("loading {}", dir.display()))?;
            let sids = random_sids(a.items, &cfg.vocab, a.seed);
            (cfg, model, sids, dir.display().to_string())
        }
        None => {
            let vocab = vec![256, 256, 256, 256];
            let cfg = ModelConfig {
                prefix_output: a.prefix_output,
                sibling_output: a.sibling_output,
                ..ModelConfig::tiger(vocab.clone(), "synthetic")
            };
            let params = Params::init(&cfg, a.seed, &device)?;
            let model = params.model(&cfg)?;
            let sids = random_sids(a.items, &vocab, a.seed);
            (
                cfg,
                model,
                sids,
                "random init, TIGER dimensions".to_string(),
            )
        }
    };
    let params = param_count(&cfg);
    let index = OfflineIndex::build(&sids, &cfg.vocab)?;
    let mut rng = ChaCha8Rng::seed_from_u64(a.seed);
    let batch = a.batch.max(1);
    let histories: Vec<Vec<Sid>> = (0..batch)
        .map(|_| {
            (0..a.history.max(1))
                .map(|_| sids[rng.random_range(0..sids.len())])
                .collect()
        })
        .collect();
    let requests: Vec<Request<'_>> = histories.iter().map(|h| Request::new(h)).collect();
    let opts = SearchOptions {
        beams: a.beams,
        top_k: a.beams.min(10),
        exclude_history: a.exclude_history,
    };
    let transitions = Transitions::count(sids.iter().flat_map(|&from| {
        (0..a.successors)
            .flat_map(|_| {
                let to = sids[rng.random_range(0..sids.len())];
                std::iter::repeat_n((from, to), rng.random_range(1..4))
            })
            .collect::<Vec<_>>()
    }));
    // Without successors the search is the model alone, not a mixture with
    // an empty table.
    let weight = if a.successors > 0 { 0.5 } else { 0.0 };
    let (dim, content) = if a.fresh_words > 0 {
        let dim = TFIDF_DIM;
        let mut rows = vec![0.0f32; sids.len() * dim];
        for row in rows.chunks_exact_mut(dim) {
            for _ in 0..a.fresh_words {
                row[rng.random_range(0..dim)] += rng.random_range(0.5f32..5.0);
            }
        }
        (dim, rows)
    } else {
        let dim = 256;
        let rows = (0..sids.len() * dim)
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect();
        (dim, rows)
    };
    let content = ContentTable::new(dim, content);
    let fresh_items: Vec<(Sid, u32)> = (0..a.fresh.min(sids.len()) as u32)
        .map(|i| (sids[i as usize], i))
        .collect();
    // As `eval` runs it by default.
    let fresh = FreshItems::new(content, fresh_items, 0.05)
        .with_query_items(fresh::DEFAULT_QUERY_ITEMS)
        .with_slots(fresh::DEFAULT_SLOTS)
        .with_after(fresh::DEFAULT_AFTER)
        .with_half_weight_at(fresh::DEFAULT_HALF_AT);
    let (fresh, fresh_weight) = if a.affinity_rank > 0 {
        let mut random = |n: usize| (0..n).map(|_| rng.random_range(-0.1f32..0.1)).collect();
        let affinity = Affinity::new(
            "bench",
            dim,
            random(dim * a.affinity_rank),
            random(dim * a.affinity_rank),
            random(dim),
        )
        .map_err(anyhow::Error::msg)?;
        let mut fresh = fresh;
        fresh
            .set_affinity(std::sync::Arc::new(affinity))
            .map_err(anyhow::Error::msg)?;
        (fresh, fresh::DEFAULT_AFFINITY_WEIGHT)
    } else {
        (fresh, fresh::DEFAULT_WEIGHT)
    };
    let on_device = a.decoding.on_device(&device);
    let mut generator = Generator::new(&model)
        .with_device_decoding(on_device)
        .with_transitions(&transitions, weight)
        .with_fresh(std::sync::Arc::new(fresh), fresh_weight);
    generator.generate(index.snapshot(), &requests, &opts)?;
    let rounds = a.requests.div_ceil(batch).max(1);
    let started = Instant::now();
    for _ in 0..rounds {
        let out = generator.generate(index.snapshot(), &requests, &opts)?;
        anyhow::ensure!(out.len() == batch, "a request got no answer");
    }
    let secs = started.elapsed().as_secs_f64();
    let done = (rounds * batch) as f64;
    let flops = flops_per_request(&cfg, a.history, a.beams);
    let peak = matmul_peak(&device)?;
    let achieved = flops * done / secs / 1e9;
    let report = GenerateReport {
        model: name,
        params,
        items: sids.len(),
        successors: a.successors,
        fresh: a.fresh,
        affinity_rank: a.affinity_rank,
        fresh_words: a.fresh_words,
        exclude_history: a.exclude_history,
        beams: a.beams,
        batch,
        threads,
        decoding: if on_device { "device" } else { "host" },
        requests: rounds * batch,
        recs_per_sec: done / secs,
        ms_per_request: secs * 1e3 / done,
        ms_per_batch: secs * 1e3 / rounds as f64,
        gflop_per_request: flops / 1e9,
        achieved_gflops: achieved,
        matmul_peak_gflops: peak,
        share_of_peak: achieved / peak,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "beam {} batch {} threads {}, {} decoding: {:.1} recs/s, {:.2} ms/request, \
             {:.1} ms/batch; {:.1} GFLOP/s of a {:.1} GFLOP/s matmul peak ({:.0}%)",
            report.beams,
            report.batch,
            report.threads,
            report.decoding,
            report.recs_per_sec,
            report.ms_per_request,
            report.ms_per_batch,
            report.achieved_gflops,
            report.matmul_peak_gflops,
            100.0 * report.share_of_peak
        );
    }
    Ok(())
}

/// The best of five 1024³ f32 matmuls, in GFLOP/s.
fn matmul_peak(device: &Device) -> anyhow::Result<f64> {
    let n = 1024;
    let a = Tensor::ones((n, n), DType::F32, device)?;
    let b = Tensor::ones((n, n), DType::F32, device)?;
    a.matmul(&b)?;
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let t = Instant::now();
        let c = a.matmul(&b)?;
        c.device().synchronize()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(2.0 * (n as f64).powi(3) / best / 1e9)
}
