//! A copy-on-write array of counters, cheap to snapshot.
//!
//! Every published index snapshot needs its own view of the live-item counts of
//! every trie node, yet a publish touches only the handful of nodes on the paths
//! of the items that changed. The array is split into fixed chunks behind
//! `Arc`s: cloning the array copies one pointer per chunk, and writing to a
//! chunk that a snapshot still shares copies just that chunk.

use std::sync::Arc;

/// Values per chunk. Smaller chunks make the first write after a publish copy
/// less (a publish shares every chunk, and an upsert touches one chunk per SID
/// level); larger ones make the publish's pointer copy shorter. At 512 (2 KiB)
/// an upsert copies at most 8 KiB and a publish over a 1M-item trie copies
/// about 4,000 pointers.
const CHUNK: usize = 512;

#[derive(Clone, Debug, Default)]
pub struct Chunked<T = u32> {
    len: usize,
    chunks: Vec<Arc<[T; CHUNK]>>,
}

impl<T: Copy + Default> Chunked<T> {
    pub fn from_slice(values: &[T]) -> Chunked<T> {
        let chunks = values
            .chunks(CHUNK)
            .map(|c| {
                let mut chunk = [T::default(); CHUNK];
                chunk[..c.len()].copy_from_slice(c);
                Arc::new(chunk)
            })
            .collect();
        Chunked {
            len: values.len(),
            chunks,
        }
    }

    #[inline]
    pub fn get(&self, i: usize) -> T {
        self.chunks[i / CHUNK][i % CHUNK]
    }

    /// `n` consecutive values starting at `i`, which must not cross a chunk
    /// boundary (callers keep records of a power-of-two size aligned).
    #[inline]
    pub fn run(&self, i: usize, n: usize) -> &[T] {
        &self.chunks[i / CHUNK][i % CHUNK..i % CHUNK + n]
    }

    /// Changes one value, copying its chunk first if a snapshot shares it.
    pub fn update(&mut self, i: usize, f: impl FnOnce(T) -> T) {
        assert!(i < self.len, "counter {i} out of {}", self.len);
        let chunk = Arc::make_mut(&mut self.chunks[i / CHUNK]);
        chunk[i % CHUNK] = f(chunk[i % CHUNK]);
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes owned, counting shared chunks in full.
    pub fn heap_bytes(&self) -> usize {
        self.chunks.len()
            * (std::mem::size_of::<[T; CHUNK]>() + std::mem::size_of::<Arc<[T; CHUNK]>>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clones_do_not_see_later_writes() {
        let values: Vec<u32> = (0..3 * CHUNK as u32).collect();
        let mut a: Chunked = Chunked::from_slice(&values);
        let b = a.clone();
        let i = CHUNK + 7;
        a.update(i, |v| v + 1);
        assert_eq!(a.get(i), i as u32 + 1);
        assert_eq!(b.get(i), i as u32);
        assert_eq!(a.get(3 * CHUNK - 1), 3 * CHUNK as u32 - 1);
        assert_eq!(a.len(), 3 * CHUNK);
        assert!(
            Arc::ptr_eq(&a.chunks[0], &b.chunks[0]),
            "untouched chunks stay shared"
        );
        assert!(!Arc::ptr_eq(&a.chunks[1], &b.chunks[1]));
    }
}
