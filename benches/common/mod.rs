//! Synthetic SID sets shaped like a tokenizer's output.

use genfeed::sid::Sid;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// TIGER's shape: three content levels of 256 codes and a collision level.
pub const VOCAB: [usize; 4] = [256, 256, 256, 256];

/// `n` distinct SIDs in SID order, item numbers `0..n` in random order. Content
/// codes are skewed (a few popular first codes) the way real catalogues are;
/// the last level counts within each prefix, as the tokenizer does.
pub fn sids(n: usize, seed: u64) -> Vec<(Sid, u32)> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut prefixes: Vec<[u16; 3]> = (0..n)
        .map(|_| {
            let skew = |rng: &mut ChaCha8Rng| {
                let u: f64 = rng.random();
                ((u * u) * 256.0) as u16
            };
            [
                skew(&mut rng),
                rng.random_range(0..256),
                rng.random_range(0..256),
            ]
        })
        .collect();
    prefixes.sort_unstable();
    let mut out = Vec::with_capacity(n);
    let mut last = None;
    let mut k = 0u16;
    for p in prefixes {
        k = if Some(p) == last { k + 1 } else { 0 };
        last = Some(p);
        if k < 256 {
            out.push(Sid::new(&[p[0], p[1], p[2], k]).unwrap());
        }
    }
    let mut ords: Vec<u32> = (0..out.len() as u32).collect();
    for i in (1..ords.len()).rev() {
        ords.swap(i, rng.random_range(0..=i));
    }
    out.into_iter().zip(ords).collect()
}

/// A SID not in `existing` (with high probability), for fresh upserts.
pub fn fresh(rng: &mut ChaCha8Rng) -> Sid {
    Sid::new(&[
        rng.random_range(0..256),
        rng.random_range(0..256),
        rng.random_range(0..256),
        rng.random_range(200..256),
    ])
    .unwrap()
}
