//! Subcommands. Each file holds one family; this one holds the grammar.

mod bench;
mod cold_split;
mod model;
mod replay;
mod run;
mod synth;
mod time_split;
mod tokenizer;

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

/// genfeed: a streaming generative recommender over semantic IDs.
#[derive(Parser)]
#[command(version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train, apply and inspect semantic-ID tokenizers.
    #[command(subcommand)]
    Tokenizer(tokenizer::TokenizerCommand),
    /// Write a synthetic catalogue and interaction log (RecBole files).
    Synth(synth::SynthArgs),
    /// Write the cold-start protocol's copy of a RecBole folder: a seeded
    /// share of the test items kept only as their users' test targets.
    ColdSplit(cold_split::ColdSplitArgs),
    /// Write the streaming protocol's split of a RecBole folder: training
    /// before a cut in time, the rest to stream, fresh items first met
    /// after it.
    TimeSplit(time_split::TimeSplitArgs),
    /// Train the generative model on interaction sequences.
    Train(Box<model::TrainArgs>),
    /// Score a trained model with the leave-one-out protocol.
    Eval(model::EvalArgs),
    /// Count a trained model's training transitions and choose their weight
    /// in the search on validation users (`train` does this at its end).
    FitTransitions(model::FitTransitionsArgs),
    /// Fit a content affinity (which content follows which) on a trained
    /// model's training transitions, for scoring fresh items.
    FitAffinity(model::FitAffinityArgs),
    /// Run the streaming service: Kafka in, live feeds out.
    Run(run::RunArgs),
    /// Drive a running service from a RecBole folder at a fixed rate and
    /// measure feeds and latency.
    Replay(replay::ReplayArgs),
    /// Measure throughput.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Tokenizer(c) => tokenizer::run(c),
        Command::Synth(a) => synth::run(a),
        Command::ColdSplit(a) => cold_split::run(a),
        Command::TimeSplit(a) => time_split::run(a),
        Command::Train(a) => model::run_train(*a),
        Command::Eval(a) => model::run_eval(a),
        Command::FitTransitions(a) => model::run_fit_transitions(a),
        Command::FitAffinity(a) => model::run_fit_affinity(a),
        Command::Run(a) => run::run(a),
        Command::Replay(a) => replay::run(a),
        Command::Bench(c) => bench::run(c),
    }
}

/// The sentence-encoder directory: the flag, else `GENFEED_TEXT_MODEL`, else
/// where `scripts/install-minilm.sh` puts it.
fn text_model_dir(flag: Option<PathBuf>) -> PathBuf {
    flag.or_else(|| std::env::var_os("GENFEED_TEXT_MODEL").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("models/all-minilm-l6-v2"))
}

/// A progress bar on stderr (hidden when stderr is not a terminal).
fn bar(len: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template("{prefix:>10} [{bar:30}] {pos}/{len} {elapsed_precise} {msg}")
            .expect("static template")
            .progress_chars("=> "),
    );
    pb.set_prefix(what.to_string());
    pb
}
