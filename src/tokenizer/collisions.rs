//! The last SID level: telling apart items whose content codes collide.
//!
//! Content quantisation maps similar items to the same code prefix, and items with
//! identical content (the same attribute set, say) to the same prefix for sure.
//! TIGER appends one more code that counts within a prefix. The rule here is the
//! one used in training and forever after:
//!
//! > an item takes the smallest last-level code its prefix has free.
//!
//! Training applies it to the training items in item-id order, so the first item
//! of a group gets 0, the next 1, and so on; a new item later takes the smallest
//! free code given every SID handed out before it. Existing SIDs are never moved.

use std::collections::HashMap;

use crate::sid::{Code, Sid};

/// Tracks which last-level codes each prefix has handed out.
#[derive(Clone, Debug)]
pub struct SidAllocator {
    capacity: usize,
    used: HashMap<Sid, Vec<u64>>,
}

/// A prefix already holds `capacity` items: the tokenizer's last level is full
/// there and the model's vocabulary cannot name another item with that prefix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("semantic-ID prefix {prefix} already holds {capacity} items, the last level's capacity")]
pub struct PrefixFull {
    pub prefix: Sid,
    pub capacity: usize,
}

impl SidAllocator {
    /// An allocator whose last level holds `capacity` codes.
    pub fn new(capacity: usize) -> SidAllocator {
        assert!(capacity > 0 && capacity <= usize::from(Code::MAX) + 1);
        SidAllocator {
            capacity,
            used: HashMap::new(),
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Marks an existing SID as taken. Returns false if it was taken already.
    pub fn insert(&mut self, sid: Sid) -> bool {
        let prefix = Sid::new(sid.prefix()).expect("a SID has at least two levels here");
        let words = self.capacity.div_ceil(64);
        let bits = self.used.entry(prefix).or_insert_with(|| vec![0; words]);
        let (w, b) = (usize::from(sid.last()) / 64, usize::from(sid.last()) % 64);
        let fresh = bits[w] & (1 << b) == 0;
        bits[w] |= 1 << b;
        fresh
    }

    /// Frees a SID's last-level code, for when the item behind it is gone for
    /// good.
    pub fn remove(&mut self, sid: Sid) {
        if let Ok(prefix) = Sid::new(sid.prefix()) {
            if let Some(bits) = self.used.get_mut(&prefix) {
                let (w, b) = (usize::from(sid.last()) / 64, usize::from(sid.last()) % 64);
                bits[w] &= !(1 << b);
            }
        }
    }

    /// The SID `prefix + smallest free code`, now marked as taken.
    pub fn allocate(&mut self, prefix: &[Code]) -> Result<Sid, PrefixFull> {
        let key = Sid::new(prefix).expect("a content prefix has 1 to 7 levels");
        let words = self.capacity.div_ceil(64);
        let bits = self.used.entry(key).or_insert_with(|| vec![0; words]);
        let full = || PrefixFull {
            prefix: key,
            capacity: self.capacity,
        };
        let (w, word) = bits
            .iter()
            .enumerate()
            .find(|(_, w)| **w != u64::MAX)
            .ok_or_else(full)?;
        let code = w * 64 + word.trailing_ones() as usize;
        if code >= self.capacity {
            return Err(full());
        }
        bits[w] |= 1 << (code % 64);
        let mut codes = [0; crate::sid::MAX_LEVELS];
        codes[..prefix.len()].copy_from_slice(prefix);
        codes[prefix.len()] = code as Code;
        Ok(Sid::new(&codes[..=prefix.len()]).expect("prefix plus one level"))
    }
}

/// The capacity of the last level for a catalogue whose largest collision group
/// has `largest` items: room for at least twice that, at least 256, a power of
/// two. New items keep arriving after training and the model's vocabulary is
/// fixed then, so the headroom is chosen up front.
pub fn default_capacity(largest: usize) -> usize {
    (2 * largest)
        .next_power_of_two()
        .clamp(256, usize::from(Code::MAX) + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smallest_free_code_is_taken() {
        let mut a = SidAllocator::new(256);
        assert_eq!(a.allocate(&[1, 2]).unwrap().to_string(), "1-2-0");
        assert_eq!(a.allocate(&[1, 2]).unwrap().to_string(), "1-2-1");
        assert!(a.insert("1-2-3".parse().unwrap()));
        assert!(!a.insert("1-2-3".parse().unwrap()));
        assert_eq!(a.allocate(&[1, 2]).unwrap().to_string(), "1-2-2");
        assert_eq!(a.allocate(&[1, 2]).unwrap().to_string(), "1-2-4");
        a.remove("1-2-1".parse().unwrap());
        assert_eq!(a.allocate(&[1, 2]).unwrap().to_string(), "1-2-1");
        assert_eq!(a.allocate(&[9, 9]).unwrap().to_string(), "9-9-0");
    }

    #[test]
    fn full_prefix_is_an_error() {
        let mut a = SidAllocator::new(65);
        for i in 0..65 {
            assert_eq!(usize::from(a.allocate(&[0]).unwrap().last()), i);
        }
        let err = a.allocate(&[0]).unwrap_err();
        assert_eq!(err.capacity, 65);
        assert!(err.to_string().contains("prefix 0 "), "{err}");
    }

    #[test]
    fn capacity_has_headroom() {
        assert_eq!(default_capacity(3), 256);
        assert_eq!(default_capacity(543), 2048);
        assert_eq!(default_capacity(40000), 65536);
    }
}
