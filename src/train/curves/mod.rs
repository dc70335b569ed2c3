//! A training run's per-epoch log, and the picture of it.
//!
//! The log is a CSV file with one row per finished epoch. Plain text because
//! the first thing anyone does with a training log is look at it, diff it, or
//! load it into a notebook, and none of that should need genfeed. One row per
//! epoch, appended and synced as the epoch finishes, because training dies
//! (preemption, OOM, a bad batch) and the epochs finished before the crash are
//! exactly the ones worth keeping.
//!
//! Resuming from a checkpoint is the subtle part. The log may run ahead of the
//! checkpoint: epoch 7 was logged, then the process died before (or while)
//! writing checkpoint 7, and training resumes from checkpoint 6. Epoch 7 will
//! be trained again, so its old row describes a model that no longer exists.
//! [`TrainLog::resume`] therefore drops every row past the checkpoint before
//! training appends more, keeping the log a faithful history of the model
//! being trained.
//!
//! [`plot`] draws the curves ([`plot`]'s module says how it gets by
//! without system libraries).

mod log;
mod plot;

use std::error::Error as StdError;
use std::io;
use std::path::PathBuf;

use thiserror::Error;

pub use log::TrainLog;
pub use plot::{plot, FONT_ENV};

/// The header line, and the column names that errors refer to.
const COLUMNS: [&str; 8] = [
    "epoch",
    "step",
    "lr",
    "train_loss",
    "valid_recall10",
    "valid_ndcg10",
    "examples_per_sec",
    "elapsed_secs",
];

/// One row per finished epoch.
#[derive(Clone, Debug, PartialEq)]
pub struct EpochRecord {
    /// 1-based, so that the row for epoch `n` is written once `n` epochs are
    /// done and `resume(path, n)` keeps it.
    pub epoch: usize,
    /// Optimizer steps so far; unlike epochs, comparable across runs with
    /// different batch sizes or dataset sizes.
    pub step: u64,
    /// Learning rate at the end of the epoch.
    pub lr: f64,
    /// Mean training loss over the epoch.
    pub train_loss: f64,
    /// Validation Recall@10; NaN in epochs without a validation pass.
    pub valid_recall10: f64,
    /// Validation NDCG@10; NaN in epochs without a validation pass.
    pub valid_ndcg10: f64,
    pub examples_per_sec: f64,
    /// Wall time since training started, cumulative over resumes, so the
    /// last row tells what the whole run cost.
    pub elapsed_secs: f64,
}

/// An error while writing, reading or plotting a training log.
///
/// Every variant names the file, and parse errors name the 1-based line and
/// the column, so the message alone finds the bad byte.
#[derive(Debug, Error)]
pub enum CurvesError {
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{}:1: expected the header {:?}, found {found:?}",
        .path.display(),
        COLUMNS.join(",")
    )]
    Header { path: PathBuf, found: String },
    #[error(
        "{}:{line}: expected {} comma-separated fields, found {found}",
        .path.display(),
        COLUMNS.len()
    )]
    FieldCount {
        path: PathBuf,
        line: u64,
        found: usize,
    },
    #[error(
        "{}:{line}: column {} ({name}): expected {expected}, found {found:?}",
        .path.display(),
        .index + 1
    )]
    Field {
        path: PathBuf,
        line: u64,
        /// 0-based position of the column; the message shows it 1-based.
        index: usize,
        name: &'static str,
        expected: &'static str,
        found: String,
    },
    /// Drawing failed. Boxed so that no plotters type is part of this API.
    #[error("{}: drawing the plot: {source}", .path.display())]
    Draw {
        path: PathBuf,
        #[source]
        source: Box<dyn StdError + Send + Sync>,
    },
    #[error("{}: encoding the PNG: {source}", .path.display())]
    Png {
        path: PathBuf,
        #[source]
        source: png::EncodingError,
    },
}

#[cfg(test)]
fn record(epoch: usize) -> EpochRecord {
    let e = epoch as f64;
    EpochRecord {
        epoch,
        step: 1000 * epoch as u64,
        lr: 1e-3 / e,
        train_loss: 5.0 / e + 0.1,
        valid_recall10: 0.05 + 0.01 * e,
        valid_ndcg10: 0.03 + 0.005 * e,
        examples_per_sec: 12345.678,
        elapsed_secs: 60.5 * e,
    }
}
