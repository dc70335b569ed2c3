//! From a stream of "user U did something" to batches of users for the model.
//!
//! Two waits shape the batches, both bounded:
//!
//! - **Coalescing.** A user's first event opens a window of `coalesce`; the
//!   user's later events in it join the same feed. A burst of clicks makes
//!   one feed, not ten.
//! - **Micro-batching.** Users whose window closed are *ready*. A batch goes
//!   to the model when `batch_max` users are ready, or when the oldest ready
//!   user has waited `batch_wait` more, and only when the model is free to
//!   take it. While the model is busy, ready users pile up into the next
//!   batch: batches grow with load, which is when the model needs them large.
//!
//! At most `max_pending` users wait; beyond that the scheduler stops
//! reading, its input channel fills and the consumer waits: backpressure.
//! When the input closes (shutdown), every waiting user is sent at once.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::delivery::Trigger;
use super::histories::Position;
use super::metrics::Metrics;

/// One user's event, as the scheduler sees it.
pub struct Event {
    pub user: String,
    pub trigger: Trigger,
}

/// A user due for a feed and the events it answers.
pub struct Job {
    pub user: String,
    /// The interactions the feed answers, finished once it is delivered;
    /// none for a [`refresh`](Job::refresh).
    pub triggers: Vec<Trigger>,
    /// Where the last interaction the feed answers was read (for a
    /// refresh, the user's last one): the feed's `trigger`.
    pub last: Position,
    since: Instant,
}

impl Job {
    /// A feed for `user`, whose last interaction was read at `last`, that
    /// answers no new event ([`super::refresh`]).
    pub fn refresh(user: String, last: Position) -> Job {
        Job {
            user,
            triggers: Vec::new(),
            last,
            since: Instant::now(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Timing {
    pub coalesce: Duration,
    pub batch_max: usize,
    pub batch_wait: Duration,
    pub max_pending: usize,
}

#[derive(Default)]
struct Pending {
    /// Users in order of their window's opening.
    order: VecDeque<Job>,
    /// User → index into `order`, offset by `popped`.
    at: HashMap<String, u64>,
    popped: u64,
}

impl Pending {
    fn len(&self) -> usize {
        self.order.len()
    }

    fn add(&mut self, e: Event, now: Instant) {
        if let Some(&i) = self.at.get(&e.user) {
            let job = &mut self.order[(i - self.popped) as usize];
            job.last = e.trigger.position();
            job.triggers.push(e.trigger);
            return;
        }
        self.at
            .insert(e.user.clone(), self.popped + self.order.len() as u64);
        self.order.push_back(Job {
            user: e.user,
            last: e.trigger.position(),
            triggers: vec![e.trigger],
            since: now,
        });
    }

    /// Ready users (window closed), counted up to `batch_max`: no more are
    /// ever needed, and a long backlog is not walked on every event.
    fn ready(&self, now: Instant, t: &Timing) -> usize {
        self.order
            .iter()
            .take(t.batch_max)
            .take_while(|j| now >= j.since + t.coalesce)
            .count()
    }

    fn take(&mut self, n: usize) -> Vec<Job> {
        let jobs: Vec<Job> = self.order.drain(..n).collect();
        for j in &jobs {
            self.at.remove(&j.user);
        }
        self.popped += n as u64;
        jobs
    }

    /// When the next batch is due, if anyone waits: when `batch_max` users
    /// are ready or the oldest has waited `batch_wait` past its window.
    fn due(&self, now: Instant, t: &Timing) -> Option<Instant> {
        let oldest = self.order.front()?.since + t.coalesce;
        let ready = self.ready(now, t);
        if ready >= t.batch_max {
            return Some(now);
        }
        Some(oldest + t.batch_wait)
    }
}

/// Runs until `input` closes and every pending user is handed on.
pub async fn schedule(
    mut input: mpsc::Receiver<Event>,
    output: mpsc::Sender<Vec<Job>>,
    timing: Timing,
    metrics: Arc<Metrics>,
) {
    let mut pending = Pending::default();
    let mut open = true;
    loop {
        metrics.pending_users.set(pending.len() as i64);
        let now = Instant::now();
        let due = pending.due(now, &timing);
        let is_due = due.is_some_and(|d| d <= now);
        tokio::select! {
            biased;
            permit = output.reserve(), if is_due => {
                let Ok(permit) = permit else { return };
                let n = pending.ready(Instant::now(), &timing).clamp(1, timing.batch_max);
                permit.send(pending.take(n));
            }
            e = input.recv(), if open && pending.len() < timing.max_pending => match e {
                Some(e) => pending.add(e, Instant::now()),
                None => open = false,
            },
            _ = tokio::time::sleep_until(due.unwrap_or(now)), if due.is_some() && !is_due => {}
        }
        if !open {
            while pending.len() > 0 {
                let n = pending.len().min(timing.batch_max);
                if output.send(pending.take(n)).await.is_err() {
                    return;
                }
            }
            metrics.pending_users.set(0);
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(user: &str, offset: i64) -> Event {
        Event {
            user: user.into(),
            trigger: Trigger {
                partition: 0,
                offset,
                timestamp_ms: 0,
            },
        }
    }

    fn timing(batch_max: usize) -> Timing {
        Timing {
            coalesce: Duration::from_millis(20),
            batch_max,
            batch_wait: Duration::from_millis(10),
            max_pending: 100,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn events_of_a_user_in_the_window_make_one_job() {
        let (tx, rx) = mpsc::channel(16);
        let (out_tx, mut out) = mpsc::channel(1);
        let task = tokio::spawn(schedule(rx, out_tx, timing(8), Arc::default()));
        tx.send(ev("a", 1)).await.unwrap();
        tx.send(ev("b", 2)).await.unwrap();
        tx.send(ev("a", 3)).await.unwrap();
        let batch = out.recv().await.unwrap();
        let users: Vec<&str> = batch.iter().map(|j| j.user.as_str()).collect();
        assert_eq!(users, ["a", "b"]);
        let offsets: Vec<i64> = batch[0].triggers.iter().map(|t| t.offset).collect();
        assert_eq!(offsets, [1, 3]);
        // After the batch left, a's next event opens a new window.
        tx.send(ev("a", 4)).await.unwrap();
        let batch = out.recv().await.unwrap();
        assert_eq!(batch.len(), 1);
        assert_eq!(batch[0].triggers[0].offset, 4);
        drop(tx);
        assert!(out.recv().await.is_none());
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn batches_are_capped_and_shutdown_flushes_everyone() {
        let (tx, rx) = mpsc::channel(64);
        let (out_tx, mut out) = mpsc::channel(1);
        let task = tokio::spawn(schedule(rx, out_tx, timing(3), Arc::default()));
        for i in 0..7 {
            tx.send(ev(&format!("u{i}"), i)).await.unwrap();
        }
        drop(tx);
        let mut sizes = Vec::new();
        let mut seen = Vec::new();
        while let Some(b) = out.recv().await {
            sizes.push(b.len());
            seen.extend(b.into_iter().map(|j| j.triggers[0].offset));
        }
        assert!(sizes.iter().all(|&s| (1..=3).contains(&s)), "{sizes:?}");
        assert_eq!(seen, (0..7).collect::<Vec<_>>());
        task.await.unwrap();
    }
}
