//! What a trained tokenizer is worth, in numbers: codebook use, collisions,
//! reconstruction, and whether codes mean something.

use std::collections::HashMap;
use std::fmt;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::sid::Code;

/// Use of one level's codebook over the training items.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LevelStats {
    pub codebook_size: usize,
    pub used: usize,
    /// `used / codebook_size`.
    pub utilisation: f64,
    /// Entropy of the code distribution in bits; `log2(codebook_size)` is the
    /// most a level can carry.
    pub entropy_bits: f64,
}

/// The training report, printed and stored in the manifest.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub items: usize,
    pub levels: Vec<LevelStats>,
    pub distinct_prefixes: usize,
    /// Share of items whose content prefix at least one other item shares.
    pub colliding_share: f64,
    pub largest_group: usize,
    pub last_level_capacity: usize,
    /// Mean squared quantisation residual over mean squared norm of the
    /// quantised (normalised) vectors: 0 is perfect, 1 is no better than zero.
    pub relative_quantisation_error: f64,
    /// RQ-VAE only: mean squared error of the decoder's reconstruction of the
    /// normalised input from the quantised latent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reconstruction_mse: Option<f64>,
    /// Collaborative tokenizers: how well a new item's content places it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_map: Option<ContentMapCheck>,
    pub train_seconds: f64,
}

/// The content map checked on items it was not fitted on: each has a real
/// collaborative vector, and the SID its content predicts is compared with
/// the SID that vector gets.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ContentMapCheck {
    pub held_out_items: usize,
    /// Mean cosine of the predicted vector to the real one.
    pub mean_cosine: f64,
    /// Share whose predicted first code is the real one's.
    pub first_code_agreement: f64,
    /// The same for two items drawn at random (`Σ p_c²` over first codes):
    /// what a vector with no information would score.
    pub first_code_chance: f64,
    /// Share whose predicted content codes are all the real ones.
    pub prefix_agreement: f64,
}

/// Utilisation and entropy of each level of `codes` (`levels` codes per item).
pub fn level_stats(codes: &[Code], sizes: &[usize]) -> Vec<LevelStats> {
    let levels = sizes.len();
    let n = codes.len() / levels;
    sizes
        .iter()
        .enumerate()
        .map(|(l, &size)| {
            let mut counts = vec![0usize; size];
            for row in codes.chunks(levels) {
                counts[usize::from(row[l])] += 1;
            }
            let used = counts.iter().filter(|&&c| c > 0).count();
            let entropy_bits = counts
                .iter()
                .filter(|&&c| c > 0)
                .map(|&c| {
                    let p = c as f64 / n as f64;
                    -p * p.log2()
                })
                .sum();
            LevelStats {
                codebook_size: size,
                used,
                utilisation: used as f64 / size as f64,
                entropy_bits,
            }
        })
        .collect()
}

/// `(distinct prefixes, share of items in a group of two or more, largest group)`.
pub fn collision_stats(codes: &[Code], levels: usize) -> (usize, f64, usize) {
    let mut groups: HashMap<&[Code], usize> = HashMap::new();
    for row in codes.chunks(levels) {
        *groups.entry(row).or_default() += 1;
    }
    let n = codes.len() / levels;
    let colliding: usize = groups.values().filter(|&&c| c > 1).sum();
    let largest = groups.values().copied().max().unwrap_or(0);
    (groups.len(), colliding as f64 / n.max(1) as f64, largest)
}

/// How much more often two items that share a first-level code share a
/// category than two random items do.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CategoryAgreement {
    pub pairs: usize,
    /// Share of same-code pairs with at least one category in common.
    pub same_code: f64,
    /// The same share for uniformly random pairs.
    pub random: f64,
    /// `same_code / random`.
    pub ratio: f64,
    /// Mean Jaccard similarity of the category sets, same-code and random.
    pub same_code_jaccard: f64,
    pub random_jaccard: f64,
    /// The categories held by more than 10% of items (`Restaurants`, `Food`),
    /// which make almost any two items "share a category"; the `specific_`
    /// figures repeat the comparison without them.
    pub common_categories: Vec<String>,
    pub specific_same_code: f64,
    pub specific_random: f64,
    pub specific_ratio: f64,
}

/// Samples `pairs` same-first-code pairs (a group chosen in proportion to its
/// number of pairs) and `pairs` random pairs, and compares their categories.
pub fn category_agreement(
    first_codes: &[Code],
    categories: &[Vec<String>],
    pairs: usize,
    seed: u64,
) -> CategoryAgreement {
    assert_eq!(first_codes.len(), categories.len());
    let n = first_codes.len();
    let mut groups: HashMap<Code, Vec<usize>> = HashMap::new();
    for (i, &c) in first_codes.iter().enumerate() {
        groups.entry(c).or_default().push(i);
    }
    let mut keys: Vec<Code> = groups.keys().copied().collect();
    keys.sort_unstable();
    let weights: Vec<f64> = keys
        .iter()
        .map(|k| {
            let m = groups[k].len() as f64;
            m * (m - 1.0) / 2.0
        })
        .collect();
    let total: f64 = weights.iter().sum();
    let mut freq: HashMap<&str, usize> = HashMap::new();
    for set in categories {
        for c in set {
            *freq.entry(c.as_str()).or_default() += 1;
        }
    }
    let mut common: Vec<String> = freq
        .iter()
        .filter(|(_, &f)| f * 10 > n)
        .map(|(c, _)| c.to_string())
        .collect();
    common.sort();
    let specific: Vec<Vec<String>> = categories
        .iter()
        .map(|set| {
            set.iter()
                .filter(|c| !common.contains(c))
                .cloned()
                .collect()
        })
        .collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    // [any same, any random, specific same, specific random], and Jaccard sums.
    let mut hits = [0usize; 4];
    let (mut same_jac, mut rand_jac) = (0.0, 0.0);
    for _ in 0..pairs {
        if total > 0.0 {
            let mut t = rng.random::<f64>() * total;
            let mut g = keys.len() - 1;
            for (i, w) in weights.iter().enumerate() {
                t -= w;
                if t <= 0.0 && *w > 0.0 {
                    g = i;
                    break;
                }
            }
            let members = &groups[&keys[g]];
            let (a, b) = distinct_pair(&mut rng, members.len());
            let (a, b) = (members[a], members[b]);
            let (hit, jac) = compare(&categories[a], &categories[b]);
            hits[0] += hit as usize;
            hits[2] += compare(&specific[a], &specific[b]).0 as usize;
            same_jac += jac;
        }
        let (a, b) = distinct_pair(&mut rng, n);
        let (hit, jac) = compare(&categories[a], &categories[b]);
        hits[1] += hit as usize;
        hits[3] += compare(&specific[a], &specific[b]).0 as usize;
        rand_jac += jac;
    }
    let share = |h: usize| h as f64 / pairs as f64;
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::INFINITY };
    CategoryAgreement {
        pairs,
        same_code: share(hits[0]),
        random: share(hits[1]),
        ratio: ratio(share(hits[0]), share(hits[1])),
        same_code_jaccard: same_jac / pairs as f64,
        random_jaccard: rand_jac / pairs as f64,
        common_categories: common,
        specific_same_code: share(hits[2]),
        specific_random: share(hits[3]),
        specific_ratio: ratio(share(hits[2]), share(hits[3])),
    }
}

fn distinct_pair(rng: &mut ChaCha8Rng, n: usize) -> (usize, usize) {
    let a = rng.random_range(0..n);
    let mut b = rng.random_range(0..n - 1);
    if b >= a {
        b += 1;
    }
    (a, b)
}

fn compare(a: &[String], b: &[String]) -> (bool, f64) {
    let common = a.iter().filter(|x| b.contains(x)).count();
    let union = a.len() + b.len() - common;
    (
        common > 0,
        if union > 0 {
            common as f64 / union as f64
        } else {
            0.0
        },
    )
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "items                 {}", self.items)?;
        writeln!(f, "level  codes  used  utilisation  entropy (bits / max)")?;
        for (l, s) in self.levels.iter().enumerate() {
            writeln!(
                f,
                "{:>5}  {:>5}  {:>4}  {:>10.1}%  {:>6.2} / {:.2}",
                l,
                s.codebook_size,
                s.used,
                100.0 * s.utilisation,
                s.entropy_bits,
                (s.codebook_size as f64).log2()
            )?;
        }
        writeln!(f, "distinct prefixes     {}", self.distinct_prefixes)?;
        writeln!(
            f,
            "colliding items       {:.2}%",
            100.0 * self.colliding_share
        )?;
        writeln!(f, "largest group         {}", self.largest_group)?;
        writeln!(f, "last-level capacity   {}", self.last_level_capacity)?;
        writeln!(
            f,
            "relative quant. error {:.4}",
            self.relative_quantisation_error
        )?;
        if let Some(mse) = self.reconstruction_mse {
            writeln!(f, "decoder recon. MSE    {mse:.4}")?;
        }
        if let Some(c) = &self.content_map {
            writeln!(
                f,
                "content map           {} held-out items: cosine {:.3}, first code {:.1}% (chance {:.1}%), whole prefix {:.1}%",
                c.held_out_items,
                c.mean_cosine,
                100.0 * c.first_code_agreement,
                100.0 * c.first_code_chance,
                100.0 * c.prefix_agreement
            )?;
        }
        write!(f, "train time            {:.1} s", self.train_seconds)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn level_stats_count_use_and_entropy() {
        let codes = [0, 0, 1, 0, 2, 1, 3, 1];
        let s = level_stats(&codes, &[4, 2]);
        assert_eq!(s[0].used, 4);
        assert!((s[0].entropy_bits - 2.0).abs() < 1e-9);
        assert_eq!(s[1].used, 2);
        assert!((s[1].utilisation - 1.0).abs() < 1e-9);
        assert!((s[1].entropy_bits - 1.0).abs() < 1e-9);
    }

    #[test]
    fn collisions_are_counted() {
        let codes = [1, 2, 1, 2, 1, 3, 0, 0, 1, 2];
        assert_eq!(collision_stats(&codes, 2), (3, 0.6, 3));
    }

    #[test]
    fn agreement_detects_meaningful_codes() {
        let cats: Vec<Vec<String>> = (0..200).map(|i| vec![format!("c{}", i % 10)]).collect();
        let meaningful: Vec<Code> = (0..200).map(|i| (i % 10) as Code).collect();
        let arbitrary: Vec<Code> = (0..200).map(|i| (i / 20) as Code).collect();
        let good = category_agreement(&meaningful, &cats, 2000, 1);
        let bad = category_agreement(&arbitrary, &cats, 2000, 1);
        assert_eq!(good.same_code, 1.0);
        assert!(good.ratio > 5.0, "{good:?}");
        assert!(bad.ratio < 2.0, "{bad:?}");
    }
}
