//! Feeds for users who did nothing new: a walk over the histories, at idle
//! time.
//!
//! A feed is made when its user interacts. A user who stops interacting
//! keeps the last feed on the recommendations topic (the one a downstream
//! that keeps the latest feed per user shows) however the catalogue moves
//! on: an item retired since stays in it, and items that arrived since never
//! reach it. So every `feed.refresh_ms` a *pass* walks the users of the
//! partitions this instance holds and makes each a new feed from the same
//! history, against the catalogue and the counts of now.
//!
//! A pass takes only what live feeds leave: the feed worker takes a small
//! batch of it ([`Refresh::next`]) only when no live batch waits, so a live
//! user waits at most one such batch. A pass that cannot finish within its
//! period (too many users for the spare time) runs on, and the next begins
//! when it ends.
//!
//! Where the pass stands is kept with the histories (durable with their
//! flush): a restart goes on after the last user it reached instead of
//! walking everyone again, and does not wait a whole period anew. A new
//! instance's first pass begins a period after its start, not at once: a
//! fleet deployed together does not refresh every user in its first minute.
//!
//! A refresh answers no event: its feed commits no offset, and when the
//! broker refuses it for good it is dropped with a warning, not made a dead
//! letter (there is no input to name). Its `trigger` is where the user's
//! last interaction was read, its `generated_at` says when it was made.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc::{self, error::TryRecvError};
use tokio::sync::watch;

use super::histories::{Histories, HistoryError, Position};
use super::kafka::now_ms;
use super::metrics::Metrics;
use super::scheduler::Job;

/// Users looked at in one step of a walk at most: a store that holds many
/// users of other partitions is walked a step at a time, between batches.
const SCAN: usize = 4096;

/// How often a walk looks again whether partitions are held, while none
/// is (a rebalance under way, or more instances than partitions).
const HELD_CHECK: Duration = Duration::from_secs(1);

/// The interactions partitions this instance holds now: the users a pass
/// refreshes. Set at each assignment, emptied at each revoke.
#[derive(Default)]
pub struct Assigned(Mutex<Vec<i32>>);

impl Assigned {
    pub fn set(&self, partitions: &[i32]) {
        let mut held = self.0.lock().unwrap_or_else(|e| e.into_inner());
        held.clear();
        held.extend_from_slice(partitions);
    }

    pub fn clear(&self) {
        self.set(&[]);
    }

    fn now(&self) -> Vec<i32> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Where the walk stands.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Walk {
    /// When the pass under way, or the last one, began (ms since the epoch).
    began_ms: i64,
    /// The last user the pass reached (empty: none yet); `None` once the
    /// pass is over.
    after: Option<Vec<u8>>,
}

impl Walk {
    /// `[began_ms: i64][0 | 1 and the last user]`.
    fn encode(&self) -> Vec<u8> {
        let mut out = self.began_ms.to_be_bytes().to_vec();
        match &self.after {
            None => out.push(0),
            Some(user) => {
                out.push(1);
                out.extend_from_slice(user);
            }
        }
        out
    }

    fn decode(bytes: &[u8]) -> Option<Walk> {
        let (began, rest) = bytes.split_first_chunk::<8>()?;
        let after = match rest.split_first()? {
            (0, []) => None,
            (1, user) => Some(user.to_vec()),
            _ => return None,
        };
        Some(Walk {
            began_ms: i64::from_be_bytes(*began),
            after,
        })
    }
}

/// The refresh passes of one instance (`feed.refresh_ms`).
pub struct Refresh {
    every_ms: i64,
    batch: usize,
    assigned: Arc<Assigned>,
    walk: Walk,
    found: Vec<(String, Position)>,
}

impl Refresh {
    /// Passes every `every` of at most `batch` users a step, going on where
    /// the last run of this state left off.
    pub fn open(
        histories: &Histories,
        every: Duration,
        batch: usize,
        assigned: Arc<Assigned>,
        now_ms: i64,
    ) -> Result<Refresh, HistoryError> {
        let every_ms = i64::try_from(every.as_millis()).unwrap_or(i64::MAX);
        let walk = match histories.refresh_walk()?.as_deref().map(Walk::decode) {
            Some(Some(walk)) => walk,
            Some(None) => {
                tracing::warn!("the refresh walk's record is not one; beginning anew");
                Walk {
                    began_ms: now_ms,
                    after: None,
                }
            }
            // As if a pass had just ended: the first begins a period on,
            // however often the instance restarts meanwhile.
            None => {
                let walk = Walk {
                    began_ms: now_ms,
                    after: None,
                };
                histories.set_refresh_walk(walk.encode())?;
                walk
            }
        };
        Ok(Refresh {
            every_ms,
            batch: batch.max(1),
            assigned,
            walk,
            found: Vec::new(),
        })
    }

    /// How long until the next step is due: zero while a pass is under
    /// way, a second while no partition is held.
    pub fn wait(&self, now_ms: i64) -> Duration {
        if self
            .assigned
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
        {
            return HELD_CHECK;
        }
        if self.walk.after.is_some() {
            return Duration::ZERO;
        }
        let due = self.walk.began_ms.saturating_add(self.every_ms);
        Duration::from_millis(due.saturating_sub(now_ms).max(0) as u64)
    }

    /// The next users to refresh, if a step is due ([`wait`](Self::wait)
    /// says zero): a batch, or none when this step of the walk found no
    /// user of a partition held here. Nothing while no partition is held: a
    /// pass does not end on a rebalance's empty moment.
    pub fn next(&mut self, histories: &Histories, now_ms: i64) -> Result<Vec<Job>, HistoryError> {
        let held = self.assigned.now();
        if held.is_empty() || !self.wait(now_ms).is_zero() {
            return Ok(Vec::new());
        }
        let after = match self.walk.after.take() {
            Some(after) => after,
            None => {
                self.walk.began_ms = now_ms;
                Vec::new()
            }
        };
        self.walk.after = histories.users(
            &after,
            self.batch,
            SCAN,
            |p| held.contains(&p),
            &mut self.found,
        )?;
        histories.set_refresh_walk(self.walk.encode())?;
        if self.walk.after.is_none() {
            tracing::info!(ms = now_ms - self.walk.began_ms, "a refresh pass is over");
        }
        Ok(self
            .found
            .drain(..)
            .map(|(user, last)| Job::refresh(user, last))
            .collect())
    }
}

/// The feed worker's next batch: a live one when one waits, else a refresh
/// step when one is due, else whichever comes first. `None` once `jobs`
/// closed. After `stop` turns true, or its sender is gone, only live
/// batches. Called on the worker's thread: it blocks.
pub fn next_batch(
    refresh: &mut Option<Refresh>,
    stop: &mut watch::Receiver<bool>,
    jobs: &mut mpsc::Receiver<Vec<Job>>,
    histories: &Histories,
    metrics: &Metrics,
    runtime: &tokio::runtime::Handle,
) -> Result<Option<Vec<Job>>, HistoryError> {
    loop {
        let Some(r) = refresh.as_mut().filter(|_| !*stop.borrow()) else {
            return Ok(jobs.blocking_recv());
        };
        match jobs.try_recv() {
            Ok(batch) => return Ok(Some(batch)),
            Err(TryRecvError::Disconnected) => return Ok(None),
            Err(TryRecvError::Empty) => {}
        }
        let wait = r.wait(now_ms());
        if wait.is_zero() {
            let batch = r.next(histories, now_ms())?;
            if !batch.is_empty() {
                metrics.feeds_refreshed.inc_by(batch.len() as u64);
                return Ok(Some(batch));
            }
            continue;
        }
        let live = runtime.block_on(async {
            tokio::select! {
                batch = jobs.recv() => Some(batch),
                _ = tokio::time::sleep(wait) => None,
                changed = stop.changed() => {
                    if changed.is_err() {
                        *refresh = None;
                    }
                    None
                }
            }
        });
        if let Some(batch) = live {
            return Ok(batch);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(partition: i32, offset: i64) -> Position {
        Position { partition, offset }
    }

    fn holding(partitions: &[i32]) -> Arc<Assigned> {
        let assigned = Arc::new(Assigned::default());
        assigned.set(partitions);
        assigned
    }

    fn users(jobs: &[Job]) -> Vec<&str> {
        jobs.iter().map(|j| j.user.as_str()).collect()
    }

    #[test]
    fn a_pass_walks_the_held_partitions_users_once_then_waits_a_period() {
        let dir = tempfile::tempdir().unwrap();
        let h = Histories::open(dir.path(), 8).unwrap();
        for (i, user) in ["a", "b", "c", "d", "e"].iter().enumerate() {
            let partition = if *user == "c" { 1 } else { 0 };
            h.append(user, at(partition, i as i64), i as u32).unwrap();
        }
        h.flush().unwrap();
        let assigned = holding(&[0]);
        let mut r = Refresh::open(&h, Duration::from_millis(1000), 2, assigned, 0).unwrap();
        // The first pass begins a period after the start.
        assert_eq!(r.wait(400), Duration::from_millis(600));
        assert!(r.next(&h, 999).unwrap().is_empty());
        let first = r.next(&h, 1000).unwrap();
        assert_eq!(users(&first), ["a", "b"]);
        assert_eq!(first[1].last, at(0, 1));
        assert!(first.iter().all(|j| j.triggers.is_empty()));
        assert_eq!(r.wait(1001), Duration::ZERO, "a pass under way");
        assert_eq!(
            users(&r.next(&h, 1001).unwrap()),
            ["d", "e"],
            "c is on partition 1"
        );
        // The walk reaches the end: the pass is over, the next one is due a
        // period after this one began.
        assert!(r.next(&h, 1002).unwrap().is_empty());
        assert_eq!(r.wait(1002), Duration::from_millis(998));
        assert_eq!(users(&r.next(&h, 2000).unwrap()), ["a", "b"]);
    }

    #[test]
    fn a_restart_goes_on_where_the_pass_stood() {
        let dir = tempfile::tempdir().unwrap();
        let assigned = holding(&[0]);
        {
            let h = Histories::open(dir.path(), 8).unwrap();
            for (i, user) in ["a", "b", "c"].iter().enumerate() {
                h.append(user, at(0, i as i64), i as u32).unwrap();
            }
            h.flush().unwrap();
            let mut r = Refresh::open(&h, Duration::from_secs(1), 1, assigned.clone(), 0).unwrap();
            assert_eq!(users(&r.next(&h, 1000).unwrap()), ["a"]);
            h.flush().unwrap();
        }
        let h = Histories::open(dir.path(), 8).unwrap();
        let mut r = Refresh::open(&h, Duration::from_secs(1), 1, assigned, 5000).unwrap();
        assert_eq!(r.wait(5000), Duration::ZERO);
        assert_eq!(users(&r.next(&h, 5000).unwrap()), ["b"]);
    }

    #[test]
    fn the_first_pass_is_due_a_period_after_the_first_start_not_the_last() {
        let dir = tempfile::tempdir().unwrap();
        let assigned = holding(&[0]);
        {
            let h = Histories::open(dir.path(), 8).unwrap();
            Refresh::open(&h, Duration::from_secs(1), 1, assigned.clone(), 0).unwrap();
            h.flush().unwrap();
        }
        let h = Histories::open(dir.path(), 8).unwrap();
        let r = Refresh::open(&h, Duration::from_secs(1), 1, assigned, 900).unwrap();
        assert_eq!(r.wait(900), Duration::from_millis(100));
    }

    #[test]
    fn nothing_is_walked_while_no_partition_is_held() {
        let dir = tempfile::tempdir().unwrap();
        let h = Histories::open(dir.path(), 8).unwrap();
        h.append("a", at(0, 0), 0).unwrap();
        h.flush().unwrap();
        let assigned = holding(&[]);
        let mut r = Refresh::open(&h, Duration::from_secs(1), 4, assigned.clone(), 0).unwrap();
        assert_eq!(r.wait(1000), HELD_CHECK);
        assert!(r.next(&h, 1000).unwrap().is_empty());
        assigned.set(&[0]);
        assert_eq!(users(&r.next(&h, 1000).unwrap()), ["a"]);
        assigned.clear();
        assert!(r.next(&h, 3000).unwrap().is_empty());
    }

    /// What the feed worker's loop needs, over a store holding `users` on
    /// partition 0, whose walk was opened a period ago: a pass is due.
    struct Worker {
        _dir: tempfile::TempDir,
        h: Histories,
        refresh: Option<Refresh>,
        rt: tokio::runtime::Runtime,
        metrics: Metrics,
    }

    impl Worker {
        fn due(users: &[&str]) -> Worker {
            let dir = tempfile::tempdir().unwrap();
            let h = Histories::open(dir.path(), 8).unwrap();
            for (i, user) in users.iter().enumerate() {
                h.append(user, at(0, i as i64), i as u32).unwrap();
            }
            h.flush().unwrap();
            let period = Duration::from_secs(60);
            let r = Refresh::open(&h, period, 8, holding(&[0]), now_ms() - 60_000).unwrap();
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_time()
                .build()
                .unwrap();
            Worker {
                _dir: dir,
                h,
                refresh: Some(r),
                rt,
                metrics: Metrics::default(),
            }
        }

        fn next(
            &mut self,
            stop: &mut watch::Receiver<bool>,
            jobs: &mut mpsc::Receiver<Vec<Job>>,
        ) -> Option<Vec<Job>> {
            let rt = self.rt.handle();
            next_batch(&mut self.refresh, stop, jobs, &self.h, &self.metrics, rt).unwrap()
        }
    }

    #[test]
    fn a_waiting_live_batch_goes_before_a_due_refresh_step() {
        let mut w = Worker::due(&["a", "b"]);
        let (_stop_tx, mut stop) = watch::channel(false);
        let (tx, mut jobs) = mpsc::channel(4);
        tx.try_send(vec![Job::refresh("live".into(), at(1, 9))])
            .unwrap();
        assert_eq!(users(&w.next(&mut stop, &mut jobs).unwrap()), ["live"]);
        assert_eq!(users(&w.next(&mut stop, &mut jobs).unwrap()), ["a", "b"]);
        // The pass is over and the next is a minute away: a live batch
        // sent meanwhile is taken, not waited past.
        let sender = std::thread::spawn(move || {
            tx.blocking_send(vec![Job::refresh("later".into(), at(1, 10))])
                .unwrap();
            tx
        });
        assert_eq!(users(&w.next(&mut stop, &mut jobs).unwrap()), ["later"]);
        drop(sender.join().unwrap());
        assert!(w.next(&mut stop, &mut jobs).is_none(), "the input closed");
        assert_eq!(w.metrics.feeds_refreshed.get(), 2);
    }

    #[test]
    fn after_stop_only_live_batches_are_taken() {
        let mut w = Worker::due(&["a"]);
        let (stop_tx, mut stop) = watch::channel(false);
        let (tx, mut jobs) = mpsc::channel(4);
        stop_tx.send(true).unwrap();
        // A pass is due, but stopping: the worker waits for live batches.
        let sender = std::thread::spawn(move || {
            tx.blocking_send(vec![Job::refresh("live".into(), at(1, 9))])
                .unwrap();
        });
        let got = w.next(&mut stop, &mut jobs);
        sender.join().unwrap();
        assert_eq!(users(&got.unwrap()), ["live"]);
        assert_eq!(
            w.metrics.feeds_refreshed.get(),
            0,
            "a due pass was not begun"
        );
    }

    #[test]
    fn walk_records_round_trip_and_junk_is_refused() {
        for walk in [
            Walk {
                began_ms: 7,
                after: None,
            },
            Walk {
                began_ms: -1,
                after: Some(Vec::new()),
            },
            Walk {
                began_ms: 1 << 40,
                after: Some(b"user".to_vec()),
            },
        ] {
            assert_eq!(Walk::decode(&walk.encode()), Some(walk));
        }
        assert_eq!(Walk::decode(b"short"), None);
        assert_eq!(Walk::decode(&[0; 9][..8]), None);
        assert_eq!(Walk::decode(&[[0; 8].as_slice(), &[2]].concat()), None);
        assert_eq!(Walk::decode(&[[0; 8].as_slice(), &[0, 1]].concat()), None);
    }
}
