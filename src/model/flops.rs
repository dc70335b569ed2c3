//! Floating-point operation counts, for reporting achieved GFLOP/s and for
//! comparing architectures on paper before training them.
//!
//! A multiply-add counts as two operations; only matrix products are
//! counted (norms, softmax and masks are a small remainder).

use super::config::ModelConfig;

/// One block's matmuls for one query position attending to `keys` positions.
fn block(cfg: &ModelConfig, keys: f64) -> f64 {
    let (d, inner, ff) = (cfg.d_model as f64, cfg.inner() as f64, cfg.d_ff as f64);
    2.0 * (d * 3.0 * inner + inner * d + 2.0 * d * ff) + 2.0 * 2.0 * keys * inner
}

/// One decoder token's cross-attention to `keys` history positions
/// (query and output projections, scores and weighted sum).
fn cross(cfg: &ModelConfig, keys: f64) -> f64 {
    let (d, inner) = (cfg.d_model as f64, cfg.inner() as f64);
    2.0 * 2.0 * d * inner + 2.0 * 2.0 * keys * inner
}

/// The history's keys and values for cross-attention, per position and
/// decoder block.
fn memory(cfg: &ModelConfig) -> f64 {
    2.0 * cfg.d_model as f64 * 2.0 * cfg.inner() as f64
}

/// One row's output layer at `level`: the code rows, and again as many
/// for the children's prefix rows where the level is prefix-scored (level
/// 0 folds them into the code rows). Sibling-scored levels add `2·d` per
/// listed child, which depends on the catalogue (a few per row on Toys),
/// and are left out.
fn output(cfg: &ModelConfig, level: usize) -> f64 {
    let per_table = 2.0 * cfg.d_model as f64 * cfg.vocab[level] as f64;
    if level > 0 && cfg.prefix_scored(level) {
        2.0 * per_table
    } else {
        per_table
    }
}

/// Forward operations of one beam search: `history` items read once, then
/// one decoder step for the request at level 0 and `beams` steps at each
/// level after it, each ending in the level's output layer.
pub fn flops_per_request(cfg: &ModelConfig, history: usize, beams: usize) -> f64 {
    let t = history.min(cfg.max_history) as f64;
    // Causal attention: position i sees i + 1 keys, (t + 1) / 2 on average.
    let hist = t * cfg.layers as f64 * block(cfg, (t + 1.0) / 2.0);
    let mut dec = 0.0;
    for level in 0..cfg.levels() {
        let rows = if level == 0 { 1.0 } else { beams as f64 };
        let per_row =
            cfg.decoder_layers as f64 * block(cfg, level as f64 + 1.0) + output(cfg, level);
        dec += rows * per_row;
    }
    hist + dec
}

/// Training operations (forward and backward, about 3× forward) for one item
/// position with a next item to predict, in a window of `window` items.
pub fn flops_per_train_position(cfg: &ModelConfig, window: usize) -> f64 {
    let t = window.min(cfg.max_history) as f64;
    let levels = cfg.levels() as f64;
    let dl = cfg.decoder_layers as f64;
    let hist = cfg.layers as f64 * block(cfg, (t + 1.0) / 2.0) + dl * memory(cfg);
    let dec = levels * dl * (block(cfg, (levels + 1.0) / 2.0) + cross(cfg, (t + 1.0) / 2.0));
    let out: f64 = (0..cfg.levels()).map(|l| output(cfg, l)).sum();
    3.0 * (hist + dec + out)
}
