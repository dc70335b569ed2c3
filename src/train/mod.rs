//! Training the generative model on interaction sequences.
//!
//! One epoch is one pass over every user's training prefix, cut into windows
//! ([`data`]). After each epoch the model is scored on the validation
//! targets with the same constrained beam search serving uses
//! ([`crate::eval`]); the best epoch by NDCG@10 is kept as `model.safetensors`
//! and training stops after `patience` epochs without improvement.
//!
//! A run is a function of its inputs and seed: weights are initialised on
//! the host, dropout masks come from a seeded RNG keyed by epoch, and batch
//! order is keyed by epoch too. A checkpoint after every epoch holds the
//! weights, the optimizer's moments and the run's counters, so `resume`
//! continues exactly where the checkpoint left off.
//!
//! The output directory:
//!
//! | file | what |
//! |---|---|
//! | `config.json`, `model.safetensors` | the best model so far, loadable by [`crate::model::Model::load`] |
//! | `train_log.csv`, `train_curves.png` | one row per epoch; the curves drawn from it |
//! | `checkpoint/` | the last epoch's weights, moments and `state.json` |
//! | `transitions.safetensors` | the training transitions, counted after training ([`transitions`]) |

pub mod affinity;
pub mod curves;
pub mod data;
pub mod optim;
pub mod transitions;

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Device;
use indicatif::ProgressBar;
use serde::{Deserialize, Serialize};

use crate::dataset::{Example, Split};
use crate::eval::{evaluate, OfflineIndex, Report};
use crate::model::{
    Dropout, Generator, ModelConfig, ModelError, Params, SearchOptions, SiblingTable, CONFIG_FILE,
    WEIGHTS_FILE,
};
use crate::sid::Sid;
use curves::{EpochRecord, TrainLog};
use data::{epoch_batches, make_batch, short_windows, thinned, windows};
use optim::{AdamW, AdamWConfig, Schedule};

/// Knobs of a run; the defaults are the ones the README's results used.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainOptions {
    /// Upper bound on epochs; early stopping usually ends the run first.
    pub epochs: usize,
    /// Windows per batch.
    pub batch_size: usize,
    pub lr: f64,
    pub warmup_steps: u64,
    /// The learning rate decays to `lr × min_lr_ratio` at the last epoch.
    pub min_lr_ratio: f64,
    pub weight_decay: f64,
    /// Epochs without a better validation NDCG@10 before stopping.
    pub patience: usize,
    pub seed: u64,
    /// Validation users per epoch (evenly spaced); 0 means all.
    pub valid_users: usize,
    /// Beam width of validation searches.
    pub beams: usize,
    /// Requests per validation search batch.
    pub eval_batch: usize,
    /// Probability of deleting each item of a training sequence, drawn
    /// afresh every epoch ([`data::thinned`]); 0 trains on the sequences
    /// as they are.
    #[serde(default)]
    pub item_drop: f64,
    /// Probability of cutting a training window to a random shorter length
    /// ([`data::short_windows`]); 0 cuts every window at `max_history + 1`.
    #[serde(default)]
    pub short_windows: f64,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            epochs: 30,
            batch_size: 128,
            lr: 2e-3,
            warmup_steps: 300,
            min_lr_ratio: 0.05,
            weight_decay: 0.05,
            patience: 6,
            seed: 42,
            valid_users: 0,
            beams: 20,
            eval_batch: 64,
            item_drop: 0.0,
            short_windows: 0.8,
        }
    }
}

/// What a run needs besides options: per-user item sequences and each
/// item's SID (`sids[item]`).
pub struct Corpus<'a> {
    pub seqs: &'a [Vec<u32>],
    pub sids: &'a [Sid],
}

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
    #[error(transparent)]
    Curves(#[from] curves::CurvesError),
    #[error(transparent)]
    Index(#[from] crate::index::IndexError),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {why}", path.display())]
    Resume { path: PathBuf, why: String },
    #[error("{0} is {1}; it must be a probability (item_drop below 1)")]
    Probability(&'static str, f64),
    #[error("the training data has no window of two or more items")]
    NoData,
    #[error("training diverged at epoch {epoch}: the loss is {loss}; lower --lr")]
    Diverged { epoch: usize, loss: f64 },
}

/// Counters carried from one epoch to the next, saved with checkpoints.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct RunState {
    epochs_done: usize,
    steps: u64,
    best_ndcg10: f64,
    best_epoch: usize,
    bad_epochs: usize,
    elapsed_secs: f64,
    options: Option<TrainOptions>,
}

/// How a run ended.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub epochs: usize,
    pub best_epoch: usize,
    pub best_valid: Option<Report>,
    pub params: usize,
    pub train_secs: f64,
    /// Training targets per second of optimisation over this run's epochs,
    /// validation left out (0 when it ran none): the number a device or a
    /// thread count changes, where `train_secs` also holds validation.
    pub examples_per_sec: f64,
    pub stopped_early: bool,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Trains `cfg` on `corpus`, writing into `out`. With `resume`, continues
/// from `out/checkpoint`.
pub fn train(
    corpus: &Corpus<'_>,
    cfg: &ModelConfig,
    opts: &TrainOptions,
    out: &Path,
    resume: bool,
    device: &Device,
    progress: impl Fn(u64, &str) -> ProgressBar,
) -> Result<Summary, TrainError> {
    cfg.validate()?;
    if !(0.0..1.0).contains(&opts.item_drop) {
        return Err(TrainError::Probability("item_drop", opts.item_drop));
    }
    if !(0.0..=1.0).contains(&opts.short_windows) {
        return Err(TrainError::Probability("short_windows", opts.short_windows));
    }
    std::fs::create_dir_all(out).map_err(io(out))?;
    let ckpt = out.join("checkpoint");
    let log_path = out.join("train_log.csv");

    let train_windows = windows(corpus.seqs, 2, cfg.max_history);
    if train_windows.is_empty() {
        return Err(TrainError::NoData);
    }
    let split = Split::leave_one_out(corpus.seqs, cfg.max_history);
    let valid: Vec<Example<'_>> = sample(split.valid().iter().collect(), opts.valid_users);
    let index = OfflineIndex::build(corpus.sids, &cfg.vocab)?;

    let (params, mut state, mut log, mut records) = if resume {
        let state: RunState = read_json(&ckpt.join("state.json"))?;
        let saved = ModelConfig::load(out)?;
        // The transition weight is chosen after training, not trained.
        let saved = ModelConfig {
            transition_weight: cfg.transition_weight,
            ..saved
        };
        if &saved != cfg {
            return Err(TrainError::Resume {
                path: out.join(CONFIG_FILE),
                why: "the model config differs from the one being resumed".into(),
            });
        }
        let params = Params::load(cfg, &ckpt.join(WEIGHTS_FILE), device)?;
        let (log, records) = TrainLog::resume(&log_path, state.epochs_done)?;
        (params, state, log, records)
    } else {
        cfg.save(out)?;
        let params = Params::init(cfg, opts.seed, device)?;
        (
            params,
            RunState::default(),
            TrainLog::create(&log_path)?,
            Vec::new(),
        )
    };
    state.options = Some(opts.clone());
    let mut optimizer = AdamW::new(
        &params,
        AdamWConfig {
            weight_decay: opts.weight_decay,
            ..AdamWConfig::default()
        },
    )?;
    if resume {
        optimizer.load(&ckpt.join("optimizer.safetensors"), state.steps, device)?;
    }
    let model = params.model(cfg)?;
    // Augmented epochs differ a little in their number of windows; the
    // first one's count stands for all, so the schedule ends near the last
    // epoch instead of early.
    let batches_per_epoch = {
        let planned = epoch_data(corpus.seqs, opts, cfg.max_history, 1).1;
        epoch_batches(
            planned.as_deref().unwrap_or(&train_windows),
            opts.batch_size,
            opts.seed,
            0,
        )
        .len() as u64
    };
    let schedule = Schedule {
        peak: opts.lr,
        warmup: opts.warmup_steps,
        total: batches_per_epoch * opts.epochs as u64,
        floor: opts.min_lr_ratio,
    };
    let targets: u64 = train_windows.iter().map(|w| w.targets() as u64).sum();
    tracing::info!(
        params = params.count(),
        windows = train_windows.len(),
        targets,
        valid = valid.len(),
        "training"
    );

    let search = SearchOptions {
        beams: opts.beams,
        top_k: 10,
        exclude_history: false,
    };
    let mut best_valid = None;
    let mut stopped_early = false;
    let (mut seen_all, mut optimise_secs) = (0u64, 0.0);
    let siblings = SiblingTable::new(cfg, corpus.sids);
    for epoch in state.epochs_done + 1..=opts.epochs {
        let started = Instant::now();
        let mut dropout = Dropout::new(cfg.dropout, opts.seed ^ (epoch as u64) << 32);
        let (mut loss_sum, mut loss_n, mut seen) = (0.0, 0.0, 0u64);
        let mut lr = schedule.at(state.steps);
        let (thin_seqs, epoch_windows) = epoch_data(corpus.seqs, opts, cfg.max_history, epoch);
        let seqs = thin_seqs.as_deref().unwrap_or(corpus.seqs);
        let epoch_windows = epoch_windows.as_deref().unwrap_or(&train_windows);
        let epoch_targets = epoch_windows.iter().map(|w| w.targets() as u64).sum();
        let bar = progress(epoch_targets, &format!("epoch {epoch}"));
        for batch in epoch_batches(epoch_windows, opts.batch_size, opts.seed, epoch) {
            let ws: Vec<_> = batch.iter().map(|&i| &epoch_windows[i]).collect();
            let n: u64 = ws.iter().map(|w| w.targets() as u64).sum();
            let b = make_batch(&ws, seqs, corpus.sids, &siblings, cfg, device)?;
            let loss = model.train_loss(&b, &mut dropout)?;
            let grads = loss.backward()?;
            lr = schedule.at(state.steps);
            optimizer.step(&grads, lr)?;
            state.steps += 1;
            let l = f64::from(loss.to_scalar::<f32>()?);
            loss_sum += l * n as f64;
            loss_n += n as f64;
            seen += n;
            bar.inc(n);
            let rate = seen as f64 / started.elapsed().as_secs_f64();
            bar.set_message(format!("loss {:.3}  {rate:.0} ex/s", loss_sum / loss_n));
        }
        bar.finish_and_clear();
        let train_loss = loss_sum / loss_n.max(1.0);
        if !train_loss.is_finite() {
            return Err(TrainError::Diverged {
                epoch,
                loss: train_loss,
            });
        }
        let train_secs = started.elapsed().as_secs_f64();
        seen_all += seen;
        optimise_secs += train_secs;

        let vbar = progress(valid.len() as u64, &format!("validate {epoch}"));
        // Serving keeps derived tensors (the transposed output table), so
        // it gets a model built from this epoch's weights.
        let serving = params.model(cfg)?;
        let report = evaluate(
            &mut Generator::new(&serving),
            &index,
            corpus.sids,
            &valid,
            &search,
            opts.eval_batch,
            &vbar,
        )?;
        vbar.finish_and_clear();
        state.elapsed_secs += started.elapsed().as_secs_f64();
        state.epochs_done = epoch;

        // The first epoch always counts as the best so far: a run whose
        // validation never rises above zero must still leave a model.
        let improved = state.best_epoch == 0 || report.ndcg10 > state.best_ndcg10;
        if improved {
            state.best_ndcg10 = report.ndcg10;
            state.best_epoch = epoch;
            state.bad_epochs = 0;
            let tmp = out.join("model.safetensors.tmp");
            params.save(&tmp)?;
            std::fs::rename(&tmp, out.join(WEIGHTS_FILE)).map_err(io(out))?;
            best_valid = Some(report.clone());
        } else {
            state.bad_epochs += 1;
        }
        tracing::info!(
            epoch,
            train_loss,
            recall10 = report.recall10,
            ndcg10 = report.ndcg10,
            ex_per_sec = seen as f64 / train_secs,
            improved,
            "epoch done"
        );
        let record = EpochRecord {
            epoch,
            step: state.steps,
            lr,
            train_loss,
            valid_recall10: report.recall10,
            valid_ndcg10: report.ndcg10,
            examples_per_sec: seen as f64 / train_secs,
            elapsed_secs: state.elapsed_secs,
        };
        log.append(&record)?;
        records.push(record);
        curves::plot(
            &records,
            &format!("{} · {} parameters", out.display(), params.count()),
            &out.join("train_curves.png"),
        )?;
        save_checkpoint(&ckpt, &params, &optimizer, &state)?;
        if state.bad_epochs >= opts.patience {
            stopped_early = true;
            break;
        }
    }
    Ok(Summary {
        epochs: state.epochs_done,
        best_epoch: state.best_epoch,
        best_valid,
        params: params.count(),
        train_secs: state.elapsed_secs,
        examples_per_sec: if optimise_secs > 0.0 {
            seen_all as f64 / optimise_secs
        } else {
            0.0
        },
        stopped_early,
    })
}

/// One epoch's training data where augmentation changes it: the thinned
/// sequences (with `item_drop`) and the windows cut from them (with
/// `item_drop` or `short_windows`); `None` means the unchanged corpus.
#[allow(clippy::type_complexity)]
fn epoch_data(
    seqs: &[Vec<u32>],
    opts: &TrainOptions,
    max_history: usize,
    epoch: usize,
) -> (Option<Vec<Vec<u32>>>, Option<Vec<data::Window>>) {
    let thin = (opts.item_drop > 0.0).then(|| thinned(seqs, 2, opts.item_drop, opts.seed, epoch));
    let windows = (opts.item_drop > 0.0 || opts.short_windows > 0.0).then(|| {
        // Thinned sequences already hold only the training prefix.
        let (seqs, holdout) = match &thin {
            Some(t) => (&t[..], 0),
            None => (seqs, 2),
        };
        short_windows(
            seqs,
            holdout,
            max_history,
            opts.short_windows,
            opts.seed,
            epoch,
        )
    });
    (thin, windows)
}

/// Every `n`-th example so that `n` of them remain (all when `n` is 0 or
/// at least their number): a fixed subset, comparable across epochs.
pub(crate) fn sample(all: Vec<Example<'_>>, n: usize) -> Vec<Example<'_>> {
    if n == 0 || n >= all.len() {
        return all;
    }
    let step = all.len() as f64 / n as f64;
    (0..n).map(|i| all[(i as f64 * step) as usize]).collect()
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, TrainError> {
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    serde_json::from_str(&text).map_err(|e| TrainError::Resume {
        path: path.to_path_buf(),
        why: e.to_string(),
    })
}

/// Writes the checkpoint beside the old one and swaps it in, so a crash
/// leaves one whole checkpoint, old or new.
fn save_checkpoint(
    dir: &Path,
    params: &Params,
    optimizer: &AdamW,
    state: &RunState,
) -> Result<(), TrainError> {
    let tmp = dir.with_extension("tmp");
    let old = dir.with_extension("old");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    params.save(&tmp.join(WEIGHTS_FILE))?;
    optimizer.save(&tmp.join("optimizer.safetensors"))?;
    let json = serde_json::to_string_pretty(state).expect("state serialises");
    std::fs::write(tmp.join("state.json"), json).map_err(io(&tmp))?;
    if dir.exists() {
        let _ = std::fs::remove_dir_all(&old);
        std::fs::rename(dir, &old).map_err(io(dir))?;
    }
    std::fs::rename(&tmp, dir).map_err(io(dir))?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}
