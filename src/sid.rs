//! Semantic IDs: the names items go by inside genfeed.
//!
//! A semantic ID (SID) is a short tuple of codebook tokens, e.g. `12-48-7-0`. The
//! first levels come from quantising the item's content, so items with similar
//! content share prefixes; the last level only separates items whose content
//! prefix collides, so that every item has exactly one SID and every SID names one
//! item.
//!
//! A `Sid` is a small `Copy` value (no heap) because it travels through every hot
//! path: the index, the beam search, the feed.

use std::fmt;
use std::str::FromStr;

/// The most levels a SID may have. Four is TIGER's shape (three content levels
/// and one collision level); eight leaves room without making `Sid` large.
pub const MAX_LEVELS: usize = 8;

/// One codebook token. Content levels use at most 256 codes, but the collision
/// level of an attribute-only catalogue can need more (hundreds of items share
/// the same attribute set), hence 16 bits.
pub type Code = u16;

/// A semantic ID: `len` codes, one per level.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Sid {
    len: u8,
    codes: [Code; MAX_LEVELS],
}

impl Sid {
    /// Builds a SID from its codes. Fails when there are none or too many.
    pub fn new(codes: &[Code]) -> Result<Sid, SidError> {
        if codes.is_empty() || codes.len() > MAX_LEVELS {
            return Err(SidError::Levels(codes.len()));
        }
        let mut sid = Sid {
            len: codes.len() as u8,
            codes: [0; MAX_LEVELS],
        };
        sid.codes[..codes.len()].copy_from_slice(codes);
        Ok(sid)
    }

    /// The codes, first level first.
    pub fn codes(&self) -> &[Code] {
        &self.codes[..self.len as usize]
    }

    /// How many levels this SID has.
    pub fn levels(&self) -> usize {
        self.len as usize
    }

    /// The SID without its last (collision) level.
    pub fn prefix(&self) -> &[Code] {
        &self.codes[..self.len as usize - 1]
    }

    /// The last-level code, which separates items sharing a content prefix.
    pub fn last(&self) -> Code {
        self.codes[self.len as usize - 1]
    }

    /// Big-endian bytes, two per level: byte order equals SID order, which is
    /// what an FST key needs.
    pub fn to_key(&self) -> ([u8; 2 * MAX_LEVELS], usize) {
        let mut key = [0u8; 2 * MAX_LEVELS];
        for (i, c) in self.codes().iter().enumerate() {
            key[2 * i..2 * i + 2].copy_from_slice(&c.to_be_bytes());
        }
        (key, 2 * self.levels())
    }
}

impl fmt::Display for Sid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, c) in self.codes().iter().enumerate() {
            if i > 0 {
                f.write_str("-")?;
            }
            write!(f, "{c}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Sid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sid({self})")
    }
}

impl FromStr for Sid {
    type Err = SidError;

    fn from_str(s: &str) -> Result<Sid, SidError> {
        let mut codes = [0; MAX_LEVELS];
        let mut n = 0;
        for part in s.split('-') {
            if n == MAX_LEVELS {
                return Err(SidError::Levels(n + 1));
            }
            codes[n] = part.parse().map_err(|_| SidError::Parse(s.to_string()))?;
            n += 1;
        }
        Sid::new(&codes[..n])
    }
}

/// Why a SID could not be built or parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SidError {
    #[error("a semantic ID has 1 to {MAX_LEVELS} levels, not {0}")]
    Levels(usize),
    #[error("{0:?} is not a semantic ID (expected codes joined by '-', e.g. 12-48-7-0)")]
    Parse(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_and_parse_round_trip() {
        let sid = Sid::new(&[12, 48, 7, 300]).unwrap();
        assert_eq!(sid.to_string(), "12-48-7-300");
        assert_eq!("12-48-7-300".parse::<Sid>().unwrap(), sid);
        assert_eq!(sid.prefix(), &[12, 48, 7]);
        assert_eq!(sid.last(), 300);
    }

    #[test]
    fn bad_sids_are_rejected() {
        assert_eq!(Sid::new(&[]), Err(SidError::Levels(0)));
        assert!(matches!("1-x-3".parse::<Sid>(), Err(SidError::Parse(_))));
        assert!(matches!(
            "1-2-3-4-5-6-7-8-9".parse::<Sid>(),
            Err(SidError::Levels(9))
        ));
        assert!(matches!("1-70000".parse::<Sid>(), Err(SidError::Parse(_))));
    }

    #[test]
    fn key_order_is_sid_order() {
        let a = Sid::new(&[1, 255, 3]).unwrap();
        let b = Sid::new(&[1, 256, 0]).unwrap();
        let (ka, na) = a.to_key();
        let (kb, nb) = b.to_key();
        assert!(a < b);
        assert!(ka[..na] < kb[..nb]);
    }
}
