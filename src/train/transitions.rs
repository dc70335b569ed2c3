//! After training: count the training transitions and choose their weight in
//! the search's mixture ([`crate::model::transitions`]) on validation users.
//!
//! The counts come from the training targets only (each one's previous item
//! and itself), so neither a validation nor a test target is ever counted.
//! The weight is the one of [`WEIGHTS`] with the best validation NDCG@10,
//! the metric early stopping uses; 0 is among them, so a model the counts do
//! not help is left alone.

use std::path::Path;

use candle_core::Device;
use indicatif::ProgressBar;
use serde::Serialize;

use super::{sample, Corpus, TrainError, TrainOptions};
use crate::dataset::{Example, Split};
use crate::eval::{evaluate, OfflineIndex};
use crate::model::{Generator, Model, SearchOptions, Transitions};
use crate::sid::Sid;

/// The weights tried, smallest first; ties go to the smaller.
pub const WEIGHTS: [f32; 8] = [0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9];

/// One weight's validation score.
#[derive(Clone, Debug, Serialize)]
pub struct Tried {
    pub weight: f32,
    pub recall10: f64,
    pub ndcg10: f64,
}

/// What [`fit_transitions`] chose and why.
#[derive(Clone, Debug, Serialize)]
pub struct Mixing {
    /// Distinct `(item, next item)` pairs counted.
    pub pairs: usize,
    pub weight: f32,
    pub tried: Vec<Tried>,
}

/// The transitions into every training target of `split`: never a
/// validation or test target's.
pub fn training_transitions(split: &Split<'_>, sids: &[Sid]) -> Transitions {
    let sid = |item: u32| sids[item as usize];
    Transitions::count(split.train().iter().filter_map(|e| {
        let last = *e.history.last()?;
        Some((sid(last), sid(e.target)))
    }))
}

/// Counts `corpus`'s training transitions into the model directory `dir`
/// and writes the best weight into its config.
pub fn fit_transitions(
    corpus: &Corpus<'_>,
    dir: &Path,
    valid_users: usize,
    beams: usize,
    device: &Device,
    progress: impl Fn(u64, &str) -> ProgressBar,
) -> Result<Mixing, TrainError> {
    let (mut cfg, model) = Model::load(dir, device)?;
    let split = Split::leave_one_out(corpus.seqs, cfg.max_history);
    let transitions = training_transitions(&split, corpus.sids);
    transitions.save(dir)?;
    let valid: Vec<Example<'_>> = sample(split.valid().iter().collect(), valid_users);
    let index = OfflineIndex::build(corpus.sids, &cfg.vocab)?;
    let search = SearchOptions {
        beams,
        top_k: 10,
        exclude_history: false,
    };
    let mut tried = Vec::with_capacity(WEIGHTS.len());
    for weight in WEIGHTS {
        let bar = progress(valid.len() as u64, &format!("transition weight {weight}"));
        let mut generator = Generator::new(&model).with_transitions(&transitions, weight);
        let report = evaluate(
            &mut generator,
            &index,
            corpus.sids,
            &valid,
            &search,
            TrainOptions::default().eval_batch,
            &bar,
        )?;
        bar.finish_and_clear();
        tracing::info!(
            weight,
            recall10 = report.recall10,
            ndcg10 = report.ndcg10,
            "transition weight"
        );
        tried.push(Tried {
            weight,
            recall10: report.recall10,
            ndcg10: report.ndcg10,
        });
    }
    let best = tried.iter().fold(
        &tried[0],
        |best, t| if t.ndcg10 > best.ndcg10 { t } else { best },
    );
    cfg.transition_weight = best.weight;
    cfg.save(dir)?;
    Ok(Mixing {
        pairs: transitions.len(),
        weight: best.weight,
        tried,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_training_targets_are_counted() {
        let sids: Vec<Sid> = (0..8u16)
            .map(|i| Sid::new(&[i / 4, i % 4]).unwrap())
            .collect();
        // User 0: 0 1 2 3 4 → trains on 0→1, 1→2; validation 2→3, test 3→4.
        // User 1: 5 6 (too short to hold out) → trains on 5→6.
        // User 2: 1 2 7 → nothing to train on; validation 1→2, test 2→7.
        let seqs = vec![vec![0, 1, 2, 3, 4], vec![5, 6], vec![1, 2, 7]];
        let split = Split::leave_one_out(&seqs, 20);
        let t = training_transitions(&split, &sids);
        let (s, c) = (|i: usize| sids[i], |from: usize| t.successors(sids[from]));
        assert_eq!(c(0), (&[s(1)][..], &[1][..]));
        assert_eq!(c(1), (&[s(2)][..], &[1][..]), "user 2's 1→2 is validation");
        assert_eq!(c(5), (&[s(6)][..], &[1][..]));
        for held_out in [2, 3, 6, 7] {
            assert!(
                c(held_out).0.is_empty(),
                "{held_out} leads nowhere in training"
            );
        }
        assert_eq!(t.len(), 3);
    }
}
