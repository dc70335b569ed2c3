//! Which input offsets may be committed: the lowest one not finished yet.
//!
//! Messages of a partition are read in order but finish out of order: a
//! feed waits for its batch, a dead letter for its own delivery. Kafka
//! commits one offset per partition meaning "everything before this is
//! done", so the offset stored for commit is the smallest still in flight
//! (or one past the last read when none is). This is the pattern of
//! Vector's Kafka source: the consumer commits what it stored, and it only
//! stores what is finished.
//!
//! A message may cause several outputs (its history's changelog record and
//! its feed); it is finished when the last of them is delivered.
//!
//! A partition taken away in a rebalance is forgotten; finishes that arrive
//! for it later are ignored (its new owner reads from the last commit, and
//! replays are idempotent).

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

#[derive(Default)]
struct Partition {
    /// Offset → outputs still undelivered.
    in_flight: BTreeMap<i64, u32>,
    /// One past the highest offset read.
    next: i64,
    /// The last watermark handed out for storing.
    stored: i64,
}

impl Partition {
    fn watermark(&self) -> i64 {
        self.in_flight
            .first_key_value()
            .map(|(&o, _)| o)
            .unwrap_or(self.next)
    }
}

#[derive(Default)]
pub struct Offsets {
    parts: Mutex<HashMap<i32, Partition>>,
}

impl Offsets {
    /// A message was read and waits for `outputs` deliveries (at least one).
    /// Beginning it again sets its outputs anew: one that waited for its
    /// item is begun when read, to hold the watermark, and again when
    /// applied.
    pub fn begin(&self, partition: i32, offset: i64, outputs: u32) {
        let mut parts = self.parts.lock().expect("offsets lock");
        let p = parts.entry(partition).or_insert_with(|| Partition {
            next: offset,
            stored: offset,
            ..Partition::default()
        });
        p.in_flight.insert(offset, outputs.max(1));
        p.next = p.next.max(offset + 1);
    }

    /// One output of a message was delivered. Returns the offset to store
    /// for commit when that finished the message and moved the partition's
    /// watermark.
    pub fn finish(&self, partition: i32, offset: i64) -> Option<i64> {
        let mut parts = self.parts.lock().expect("offsets lock");
        let p = parts.get_mut(&partition)?;
        let left = p.in_flight.get_mut(&offset)?;
        *left -= 1;
        if *left > 0 {
            return None;
        }
        p.in_flight.remove(&offset);
        let w = p.watermark();
        (w > p.stored).then(|| {
            p.stored = w;
            w
        })
    }

    /// Whether `offset` of `partition` was begun and is not finished: false
    /// once its partition was revoked.
    pub fn holds(&self, partition: i32, offset: i64) -> bool {
        let parts = self.parts.lock().expect("offsets lock");
        parts
            .get(&partition)
            .is_some_and(|p| p.in_flight.contains_key(&offset))
    }

    /// Forgets partitions that were revoked.
    pub fn revoke(&self, partitions: impl IntoIterator<Item = i32>) {
        let mut parts = self.parts.lock().expect("offsets lock");
        for p in partitions {
            parts.remove(&p);
        }
    }

    /// Messages in flight, over all partitions.
    pub fn in_flight(&self) -> usize {
        let parts = self.parts.lock().expect("offsets lock");
        parts.values().map(|p| p.in_flight.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watermark_waits_for_the_oldest_unfinished_message() {
        let o = Offsets::default();
        for off in 5..9 {
            o.begin(0, off, 1);
        }
        assert_eq!(o.finish(0, 6), None, "5 is still in flight");
        assert_eq!(o.finish(0, 7), None);
        assert_eq!(o.finish(0, 5), Some(8), "5, 6, 7 done: commit 8");
        assert_eq!(o.finish(0, 5), None, "finishing twice changes nothing");
        assert_eq!(o.finish(0, 8), Some(9));
        assert_eq!(o.in_flight(), 0);
    }

    #[test]
    fn partitions_are_independent_and_revoked_ones_forgotten() {
        let o = Offsets::default();
        o.begin(0, 0, 1);
        o.begin(1, 10, 1);
        o.begin(1, 11, 1);
        assert_eq!(o.finish(1, 10), Some(11));
        assert!(o.holds(0, 0));
        o.revoke([0]);
        assert!(!o.holds(0, 0));
        assert_eq!(o.finish(0, 0), None);
        assert_eq!(o.in_flight(), 1);
    }

    #[test]
    fn a_message_with_two_outputs_waits_for_both() {
        let o = Offsets::default();
        o.begin(0, 3, 2);
        assert_eq!(o.finish(0, 3), None);
        assert_eq!(o.finish(0, 3), Some(4));
    }
}
