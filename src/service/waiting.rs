//! Interactions that name an item the catalogue has not published yet.
//!
//! Items and interactions come on separate topics, and nothing orders an
//! item's catalogue event before its first interactions: a producer that
//! writes both at once, or a catalogue publish that takes a moment, lets an
//! interaction arrive first. Dead-lettering it at once would lose the item's
//! first clicks for the user's history and for what the stream teaches,
//! although the item is a few milliseconds away. So such an interaction
//! waits here, for at most a grace period: it goes on when a publish brings
//! its item, and to the dead letters when the grace runs out.
//!
//! A user's later interactions wait behind it, whatever their items: a
//! history is appended in the order its interactions were read (an append
//! older than the history's last is taken for a replay and dropped). Other
//! users go on meanwhile. The room is bounded; when it is full, an
//! interaction with an unknown item is dead-lettered at once, and a waiting
//! user's next interaction first sends on every one of theirs.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use tokio::time::Instant;

use super::delivery::Trigger;
use crate::contract::Interaction;

/// One waiting interaction, with what its delivery or dead letter needs.
pub struct Held {
    pub interaction: Interaction,
    pub raw: Vec<u8>,
    pub trigger: Trigger,
    since: Instant,
}

impl Held {
    pub fn new(interaction: Interaction, raw: &[u8], trigger: Trigger, now: Instant) -> Held {
        Held {
            interaction,
            raw: raw.to_vec(),
            trigger,
            since: now,
        }
    }

    /// How long it has waited by `now`.
    pub fn waited(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.since)
    }
}

/// Waiting interactions, per user in the order read.
pub struct Waiting {
    grace: Duration,
    max: usize,
    users: HashMap<String, VecDeque<Held>>,
    len: usize,
    /// When the earliest first-in-line interaction's grace runs out (may be
    /// early, never late).
    wake: Option<Instant>,
}

impl Waiting {
    /// Interactions wait `grace` at most, `max` of them at once; a zero
    /// grace or room dead-letters unknown items at once.
    pub fn new(grace: Duration, max: usize) -> Waiting {
        Waiting {
            grace,
            max,
            users: HashMap::new(),
            len: 0,
            wake: None,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn grace(&self) -> Duration {
        self.grace
    }

    /// Whether `user` has interactions waiting: a new one must queue behind.
    pub fn holds(&self, user: &str) -> bool {
        self.users.contains_key(user)
    }

    pub fn has_room(&self) -> bool {
        !self.grace.is_zero() && self.len < self.max
    }

    /// When [`Waiting::ready`] next has something to hand out without a
    /// publish.
    pub fn wake(&self) -> Option<Instant> {
        self.wake
    }

    /// Queues `held` behind its user's waiting interactions (first in line
    /// when there are none). The caller checks [`Waiting::has_room`].
    ///
    /// A message already waiting is not queued twice: a partition revoked
    /// and assigned back (a rebalance hands every partition out again) is
    /// read again from its last commit, and the copy read first keeps its
    /// place and its wait.
    pub fn push(&mut self, held: Held) {
        let queue = self
            .users
            .entry(held.interaction.user_id.clone())
            .or_default();
        let (p, o) = (held.trigger.partition, held.trigger.offset);
        if queue
            .iter()
            .any(|h| h.trigger.partition == p && h.trigger.offset == o)
        {
            return;
        }
        self.len += 1;
        if queue.is_empty() {
            let due = held.since + self.grace;
            self.wake = Some(self.wake.map_or(due, |w| w.min(due)));
        }
        queue.push_back(held);
    }

    /// Moves to `out`, in each user's order, the interactions that may go on
    /// at `now`: while a user's first in line has a `known` item or waited
    /// out its grace, it goes, and the next becomes first.
    pub fn ready(&mut self, now: Instant, known: impl Fn(&str) -> bool, out: &mut Vec<Held>) {
        let grace = self.grace;
        let mut wake: Option<Instant> = None;
        let mut taken = 0;
        self.users.retain(|_, queue| {
            while let Some(first) = queue.front() {
                let due = first.since + grace;
                if !known(&first.interaction.item_id) && due > now {
                    wake = Some(wake.map_or(due, |w| w.min(due)));
                    return true;
                }
                out.extend(queue.pop_front());
                taken += 1;
            }
            false
        });
        self.len -= taken;
        self.wake = wake;
    }

    /// Moves every waiting interaction of `user` to `out`, in order, known
    /// items or not: the room is full and `user` has a new one, which must
    /// not pass them.
    pub fn release(&mut self, user: &str, out: &mut Vec<Held>) {
        if let Some(queue) = self.users.remove(user) {
            self.len -= queue.len();
            out.extend(queue);
        }
    }

    /// Keeps only the interactions `keep` accepts, each user's in order:
    /// after a revoke, those of partitions this instance no longer owns go
    /// (their new owner reads them again), so that the room and
    /// `genfeed_interactions_waiting` count only what waits here.
    pub fn retain(&mut self, keep: impl Fn(&Held) -> bool) {
        let grace = self.grace;
        let mut wake: Option<Instant> = None;
        let mut len = 0;
        self.users.retain(|_, queue| {
            queue.retain(|h| keep(h));
            len += queue.len();
            if let Some(first) = queue.front() {
                let due = first.since + grace;
                wake = Some(wake.map_or(due, |w| w.min(due)));
            }
            !queue.is_empty()
        });
        self.len = len;
        self.wake = wake;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::InteractionKind;

    fn held(user: &str, item: &str, offset: i64, now: Instant) -> Held {
        let i = Interaction {
            user_id: user.into(),
            item_id: item.into(),
            kind: InteractionKind::Click,
            timestamp: 0,
        };
        let trigger = Trigger {
            partition: 0,
            offset,
            timestamp_ms: 0,
        };
        Held::new(i, b"raw", trigger, now)
    }

    fn offsets(out: &[Held]) -> Vec<i64> {
        out.iter().map(|h| h.trigger.offset).collect()
    }

    #[test]
    fn a_message_read_again_keeps_the_first_copy_in_its_place() {
        let t0 = Instant::now();
        let later = t0 + Duration::from_millis(500);
        let mut w = Waiting::new(Duration::from_secs(2), 10);
        w.push(held("u", "late", 1, t0));
        w.push(held("u", "known", 2, t0));
        w.push(held("u", "late", 1, later));
        w.push(held("u", "known", 2, later));
        assert_eq!(w.len(), 2);
        assert_eq!(w.wake(), Some(t0 + Duration::from_secs(2)));
        let mut out = Vec::new();
        w.ready(later, |_| true, &mut out);
        assert_eq!(offsets(&out), [1, 2]);
        assert_eq!(out[0].waited(later), Duration::from_millis(500));
    }

    #[test]
    fn a_user_goes_on_in_order_once_the_first_item_is_known() {
        let t0 = Instant::now();
        let mut w = Waiting::new(Duration::from_secs(2), 10);
        w.push(held("u", "late", 1, t0));
        w.push(held("u", "known", 2, t0));
        w.push(held("v", "other-late", 3, t0));
        assert_eq!(w.len(), 3);
        assert_eq!(w.wake(), Some(t0 + Duration::from_secs(2)));

        let mut out = Vec::new();
        w.ready(t0, |i| i == "known", &mut out);
        assert!(out.is_empty(), "a known item waits behind its user's first");
        w.ready(t0, |i| i != "other-late", &mut out);
        assert_eq!(offsets(&out), [1, 2]);
        assert!(!w.holds("u"));
        assert!(w.holds("v"));
        assert_eq!(w.len(), 1);
    }

    #[test]
    fn the_grace_runs_out_per_interaction_and_the_next_in_line_waits_its_own() {
        let t0 = Instant::now();
        let grace = Duration::from_millis(100);
        let mut w = Waiting::new(grace, 10);
        w.push(held("u", "never", 1, t0));
        let t1 = t0 + Duration::from_millis(60);
        w.push(held("u", "later", 2, t1));
        let mut out = Vec::new();
        w.ready(t0 + grace - Duration::from_millis(1), |_| false, &mut out);
        assert!(out.is_empty());
        w.ready(t0 + grace, |_| false, &mut out);
        assert_eq!(offsets(&out), [1]);
        assert_eq!(out[0].waited(t0 + grace), grace);
        assert_eq!(w.wake(), Some(t1 + grace), "the next one's own grace");
        w.ready(t1 + grace, |_| false, &mut out);
        assert_eq!(offsets(&out), [1, 2]);
        assert_eq!((w.len(), w.wake()), (0, None));
    }

    #[test]
    fn interactions_of_a_revoked_partition_go_and_the_rest_keep_their_order() {
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_millis(300);
        let mut w = Waiting::new(Duration::from_secs(2), 3);
        w.push(held("u", "late", 1, t0));
        w.push(held("u", "late", 2, t1));
        w.push(held("u", "late", 3, t1));
        w.push(held("v", "late", 4, t0));
        w.retain(|h| h.trigger.offset != 1 && h.trigger.offset != 4);
        assert_eq!(w.len(), 2);
        assert!(!w.holds("v"));
        assert!(w.has_room(), "the room counts what is left");
        assert_eq!(
            w.wake(),
            Some(t1 + Duration::from_secs(2)),
            "the new first in line's grace"
        );
        let mut out = Vec::new();
        w.ready(t1, |_| true, &mut out);
        assert_eq!(offsets(&out), [2, 3]);
    }

    #[test]
    fn room_is_bounded_and_a_release_keeps_the_users_order() {
        let t0 = Instant::now();
        let mut w = Waiting::new(Duration::from_secs(2), 2);
        assert!(w.has_room());
        w.push(held("u", "a", 1, t0));
        w.push(held("u", "b", 2, t0));
        assert!(!w.has_room());
        let mut out = Vec::new();
        w.release("u", &mut out);
        assert_eq!(offsets(&out), [1, 2]);
        assert!(w.has_room());
        assert!(
            !Waiting::new(Duration::ZERO, 2).has_room(),
            "no grace: no room"
        );
    }
}
