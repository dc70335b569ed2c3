//! A deterministic vector for items known only by categorical tokens.
//!
//! The Amazon Sports and Toys sets describe items by anonymous brand and category
//! ids (`attr399 attr2 attr220`). There is no text to embed, but items sharing
//! attributes should land near each other. Each token gets a fixed pseudo-random
//! ±1 direction derived from a hash of the token (a dense form of feature
//! hashing); an item is the normalised sum of its tokens' directions. Random
//! directions in a few hundred dimensions are nearly orthogonal, so the cosine of
//! two items approximates the overlap of their token sets, and nothing has to be
//! learned or stored: any process with the same `(dim, seed)` computes the same
//! vector for the same tokens, including for tokens never seen in training.

/// Hashes categorical tokens into vectors of `dim` values.
#[derive(Clone, Debug)]
pub struct AttributeEncoder {
    dim: usize,
    seed: u64,
}

impl AttributeEncoder {
    pub fn new(dim: usize, seed: u64) -> AttributeEncoder {
        assert!(dim > 0, "attribute encoder needs a positive dimension");
        AttributeEncoder { dim, seed }
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Writes the encoding of `tokens` into `out` (length `dim`). Each token is
    /// `(field, token)`: the field name is part of the hash so that the same id
    /// in two columns means two things. An item with no tokens is the zero
    /// vector.
    pub fn encode<'a>(
        &self,
        tokens: impl IntoIterator<Item = (&'a str, &'a str)>,
        out: &mut [f32],
    ) {
        assert_eq!(out.len(), self.dim);
        out.fill(0.0);
        for (field, token) in tokens {
            let mut state = fnv1a(
                fnv1a(self.seed ^ FNV_OFFSET, field.as_bytes()) ^ 0x3d,
                token.as_bytes(),
            );
            let mut bits = 0u64;
            for (i, x) in out.iter_mut().enumerate() {
                if i % 64 == 0 {
                    bits = splitmix64(&mut state);
                }
                *x += if bits & 1 == 1 { 1.0 } else { -1.0 };
                bits >>= 1;
            }
        }
        let norm = out.iter().map(|x| x * x).sum::<f32>().sqrt();
        if norm > 0.0 {
            out.iter_mut().for_each(|x| *x /= norm);
        }
    }
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

fn fnv1a(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(e: &AttributeEncoder, tokens: &[&str]) -> Vec<f32> {
        let mut out = vec![0.0; e.dim()];
        e.encode(tokens.iter().map(|t| ("attributes", *t)), &mut out);
        out
    }

    fn cos(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    #[test]
    fn overlap_orders_similarity() {
        let e = AttributeEncoder::new(256, 1);
        let a = enc(&e, &["attr1", "attr2", "attr3", "attr4"]);
        let b = enc(&e, &["attr1", "attr2", "attr3", "attr9"]);
        let c = enc(&e, &["attr5", "attr6", "attr7", "attr8"]);
        assert!((cos(&a, &a) - 1.0).abs() < 1e-5);
        assert!(cos(&a, &b) > 0.5, "3 of 4 shared: {}", cos(&a, &b));
        assert!(cos(&a, &c).abs() < 0.3, "none shared: {}", cos(&a, &c));
    }

    #[test]
    fn deterministic_and_seed_and_field_sensitive() {
        let e = AttributeEncoder::new(64, 1);
        assert_eq!(
            enc(&e, &["x", "y"]),
            enc(&AttributeEncoder::new(64, 1), &["y", "x"])
        );
        assert_ne!(enc(&e, &["x"]), enc(&AttributeEncoder::new(64, 2), &["x"]));
        let mut other_field = vec![0.0; 64];
        e.encode([("brand", "x")], &mut other_field);
        assert_ne!(enc(&e, &["x"]), other_field);
        assert!(enc(&e, &[]).iter().all(|&x| x == 0.0));
    }
}
