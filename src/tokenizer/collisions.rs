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
//!
//! Training sizes the last level to twice its largest group at least, but new
//! items can still fill a prefix (many with the same content). Such an item
//! then tries the prefixes next to its own, in the order its
//! [`ContentCodes`] give, and takes the first with room
//! ([`SidAllocator::place_new`]): only when all of them are full is it refused.

use std::collections::HashMap;

use super::ContentCodes;
use crate::sid::{Code, Sid};

/// Tracks which last-level codes each prefix has handed out.
#[derive(Clone, Debug)]
pub struct SidAllocator {
    capacity: usize,
    used: HashMap<Sid, Vec<u64>>,
}

/// A prefix already holds `capacity` items: the tokenizer's last level is full
/// there and the model's vocabulary cannot name another item with that prefix.
/// `neighbours`: how many prefixes next to it were tried and were full too.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("semantic-ID prefix {prefix} already holds {capacity} items, the last level's capacity{}",
    match .neighbours { 0 => String::new(), n => format!(", and so do the {n} prefixes next to it") })]
pub struct PrefixFull {
    pub prefix: Sid,
    pub capacity: usize,
    pub neighbours: usize,
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
            neighbours: 0,
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

    /// The SID a new item with `content` codes takes: the smallest free
    /// last-level code of the first of its prefixes with room.
    pub fn place_new(&mut self, content: &ContentCodes) -> Result<Sid, PrefixFull> {
        for p in content.prefixes() {
            if let Ok(sid) = self.allocate(&p) {
                return Ok(sid);
            }
        }
        Err(self.all_full(content))
    }

    /// Where an item that holds a SID under the prefix `current` goes when
    /// its content codes are now `content`: `None` when it stays, which it
    /// does if it reaches `current` before any prefix with room (its own
    /// code there is taken by itself); else a new SID, as
    /// [`place_new`](Self::place_new) gives.
    pub fn place(
        &mut self,
        content: &ContentCodes,
        current: &[Code],
    ) -> Result<Option<Sid>, PrefixFull> {
        for p in content.prefixes() {
            if p == current {
                return Ok(None);
            }
            if let Ok(sid) = self.allocate(&p) {
                return Ok(Some(sid));
            }
        }
        Err(self.all_full(content))
    }

    fn all_full(&self, content: &ContentCodes) -> PrefixFull {
        PrefixFull {
            prefix: Sid::new(&content.codes).expect("a content prefix has 1 to 7 levels"),
            capacity: self.capacity,
            neighbours: content.last_ranked.len().saturating_sub(1),
        }
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

    fn content(codes: &[Code], last_ranked: &[Code]) -> ContentCodes {
        ContentCodes {
            codes: codes.to_vec(),
            last_ranked: last_ranked.to_vec(),
        }
    }

    #[test]
    fn a_full_prefix_sends_new_items_to_the_next_nearest_prefix_with_room() {
        let mut a = SidAllocator::new(2);
        let c = content(&[4, 7], &[7, 3, 9]);
        let placed: Vec<String> = (0..6)
            .map(|_| a.place_new(&c).unwrap().to_string())
            .collect();
        assert_eq!(
            placed,
            ["4-7-0", "4-7-1", "4-3-0", "4-3-1", "4-9-0", "4-9-1"]
        );
        let err = a.place_new(&c).unwrap_err();
        assert_eq!((err.prefix.to_string(), err.neighbours), ("4-7".into(), 2));
        assert!(
            err.to_string().contains("the 2 prefixes next to it"),
            "{err}"
        );
        // A code freed in the nearest prefix is taken first again.
        a.remove("4-7-1".parse().unwrap());
        assert_eq!(a.place_new(&c).unwrap().to_string(), "4-7-1");
    }

    #[test]
    fn an_item_stays_where_it_is_unless_a_nearer_prefix_has_room() {
        let mut a = SidAllocator::new(1);
        let c = content(&[0, 1], &[1, 2, 3]);
        assert_eq!(a.place_new(&c).unwrap().to_string(), "0-1-0");
        assert_eq!(a.place_new(&c).unwrap().to_string(), "0-2-0");
        // The second item, in 0-2, has new content whose nearest prefix is
        // still full: it stays.
        assert_eq!(a.place(&c, &[0, 2]).unwrap(), None);
        // Its content now prefers 0-3, which has room: it moves.
        let moved = content(&[0, 3], &[3, 2, 1]);
        assert_eq!(
            a.place(&moved, &[0, 2]).unwrap().unwrap().to_string(),
            "0-3-0"
        );
    }

    #[test]
    fn capacity_has_headroom() {
        assert_eq!(default_capacity(3), 256);
        assert_eq!(default_capacity(543), 2048);
        assert_eq!(default_capacity(40000), 65536);
    }
}
