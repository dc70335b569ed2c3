//! A control for the SID model: the same network and training with one
//! "level" whose codes are item numbers, i.e. SASRec with a full softmax.
//! Comparing it with a SID run separates what the tokenization costs from
//! what the network and training cost.
//!
//! `cargo run --release --example item_ids -- DATA.inter OUT_DIR [EPOCHS]`

use candle_core::Device;
use genfeed::dataset::load_sequences;
use genfeed::model::ModelConfig;
use genfeed::sid::Sid;
use genfeed::train::{train, Corpus, TrainOptions};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    anyhow::ensure!(
        args.len() >= 3,
        "usage: item_ids DATA.inter OUT_DIR [EPOCHS]"
    );
    let seqs = load_sequences(std::path::Path::new(&args[1]), None)?;
    let n = seqs.items.len();
    anyhow::ensure!(n <= 1 << 16, "{n} items do not fit one 16-bit level");
    let sids: Vec<Sid> = (0..n).map(|i| Sid::new(&[i as u16]).unwrap()).collect();
    let cfg = ModelConfig::new(vec![n], "item-ids");
    let opts = TrainOptions {
        epochs: args.get(3).map_or(Ok(30), |e| e.parse())?,
        valid_users: 3000,
        ..TrainOptions::default()
    };
    let corpus = Corpus {
        seqs: &seqs.seqs,
        sids: &sids,
    };
    let summary = train(
        &corpus,
        &cfg,
        &opts,
        std::path::Path::new(&args[2]),
        false,
        &Device::Cpu,
        |_, _| indicatif::ProgressBar::hidden(),
    )?;
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}
