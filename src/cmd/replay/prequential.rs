//! The prequential figures, and two simple recommenders scored beside the
//! service on the same stream.
//!
//! A hit rate on a stream says little alone. The baselines see what the
//! replay streams, in the same order, and are scored at the same moments
//! with the same breakdown, so every figure of the service stands beside
//! what successor counts and content similarity alone would have shown:
//! - **successors**: what most often followed the user's last item, counted
//!   over training and the stream so far (so it learns from the stream,
//!   with no model), the most taken items filling the rest of the ten;
//! - **content**: the items whose content is nearest the user's last
//!   item's, among the items live at that moment (fresh ones once
//!   upserted).
//!
//! They are computed after the timed stream, from its events, which the
//! service's answers do not change, so they cost the benchmark nothing.

use std::collections::{HashMap, HashSet};

use candle_core::{Device, Tensor};
use serde::Serialize;

use genfeed::model::ContentTable;

/// One interaction: (timestamp, user, item).
pub type Event = (f64, String, String);

/// Hits of streamed interactions in the feed their user held before them.
#[derive(Clone, Copy, Default, Serialize)]
pub struct Hits {
    interactions: usize,
    hits: usize,
    hit_rate_10: f64,
    ndcg_10: f64,
}

impl Hits {
    fn add(&mut self, rank: Option<usize>) {
        self.interactions += 1;
        if let Some(r) = rank {
            self.hits += 1;
            self.ndcg_10 += 1.0 / (r as f64 + 2.0).log2();
        }
    }

    /// The hit rate so far, for live lines.
    pub fn rate(&self) -> f64 {
        self.hits as f64 / self.interactions.max(1) as f64
    }

    /// Turns the sums into rates.
    fn finish(mut self) -> Hits {
        let n = self.interactions.max(1) as f64;
        self.hit_rate_10 = self.hits as f64 / n;
        self.ndcg_10 /= n;
        self
    }
}

/// The prequential figures of one recommender.
#[derive(Clone, Default, Serialize)]
pub struct Prequential {
    pub all: Hits,
    /// Items with training interactions.
    pub known: Hits,
    /// Items first met after the cut.
    pub fresh: Hits,
    /// Items that became popular after training: taken more often in the
    /// stream so far than in all of training (fresh items among them, once
    /// taken).
    pub rising: Hits,
    /// Interactions whose user held no feed yet (scored as misses).
    pub no_feed: usize,
    /// Fresh items upserted so far, recommended (distinct), and hit
    /// (distinct).
    pub fresh_items_streamed: usize,
    pub fresh_items_recommended: usize,
    pub fresh_items_hit: usize,
    #[serde(skip)]
    hit_fresh: HashSet<String>,
    /// Times each item was taken in training, and in the stream so far.
    #[serde(skip)]
    trained: HashMap<String, usize>,
    #[serde(skip)]
    streamed: HashMap<String, usize>,
    /// Of the top-10 slots of the feeds read during the stream, the share
    /// fresh items held.
    pub fresh_slot_share: f64,
}

impl Prequential {
    pub fn new(train: &[Event]) -> Prequential {
        let mut trained: HashMap<String, usize> = HashMap::new();
        for e in train {
            *trained.entry(e.2.clone()).or_default() += 1;
        }
        Prequential {
            trained,
            ..Prequential::default()
        }
    }

    /// Scores `item` taken at `rank` of its user's feed (`None`: not in the
    /// top 10, or no feed at all when `no_feed`).
    pub fn add(&mut self, item: &str, fresh: bool, rank: Option<usize>, no_feed: bool) {
        self.no_feed += usize::from(no_feed);
        self.all.add(rank);
        let before = self.streamed.get(item).copied().unwrap_or(0);
        if before > 0 && before >= self.trained.get(item).copied().unwrap_or(0) {
            self.rising.add(rank);
        }
        *self.streamed.entry(item.to_string()).or_default() += 1;
        if fresh {
            self.fresh.add(rank);
            if rank.is_some() && self.hit_fresh.insert(item.to_string()) {
                self.fresh_items_hit += 1;
            }
        } else {
            self.known.add(rank);
        }
    }

    /// The figures in one line, for people.
    pub fn line(&self) -> String {
        let h = |h: &Hits| {
            format!(
                "{:.4} / {:.4} ({})",
                h.hit_rate_10, h.ndcg_10, h.interactions
            )
        };
        format!(
            "HitRate@10 / NDCG@10 all {} ({} without a feed yet), known items {}, fresh items {}, \
             items popular since training {}; fresh items: {} streamed, {} recommended, {} hit; \
             fresh share of feed slots {:.4}",
            h(&self.all),
            self.no_feed,
            h(&self.known),
            h(&self.fresh),
            h(&self.rising),
            self.fresh_items_streamed,
            self.fresh_items_recommended,
            self.fresh_items_hit,
            self.fresh_slot_share,
        )
    }

    /// Turns the sums into rates, with the fresh items the feeds held.
    pub fn finish(mut self, fresh_recommended: usize, fresh_slot_share: f64) -> Prequential {
        self.all = self.all.finish();
        self.known = self.known.finish();
        self.fresh = self.fresh.finish();
        self.rising = self.rising.finish();
        self.fresh_items_recommended = fresh_recommended;
        self.fresh_slot_share = fresh_slot_share;
        self
    }
}

/// The baselines' figures on the stream the service was scored on.
#[derive(Serialize)]
pub struct Baselines {
    pub successors: Prequential,
    /// Absent when the catalogue has no content to compare.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<Prequential>,
}

/// What the baselines are scored on.
pub struct Stream<'a> {
    /// Training interactions, in time order: counted, never scored.
    pub train: &'a [Event],
    /// The scored interactions, in the order they were streamed.
    pub stream: &'a [Event],
    /// Every item id, in the rows of `content`.
    pub catalogue: &'a [String],
    /// Items live before the stream (the training catalogue).
    pub live: &'a HashSet<String>,
    /// Items first met after the cut.
    pub fresh: &'a HashSet<String>,
    /// A fresh item is live from this many interactions before its first.
    pub ahead: usize,
    /// Leave out what the user already took, as the service does.
    pub exclude_seen: bool,
}

/// How many content neighbours are kept per item; a list exhausted by
/// items not live yet or already taken leaves the feed short, as a real
/// index with a fixed fan-out would.
const NEIGHBOURS: usize = 100;

/// Scores both baselines on `s`.
pub fn baselines(s: &Stream<'_>, content: Option<&ContentTable>) -> candle_core::Result<Baselines> {
    let row: HashMap<&str, u32> = s
        .catalogue
        .iter()
        .enumerate()
        .map(|(i, id)| (id.as_str(), i as u32))
        .collect();
    let neighbours = content.map(nearest).transpose()?;
    let n = s.catalogue.len();
    let mut live: Vec<bool> = s.catalogue.iter().map(|id| s.live.contains(id)).collect();
    let mut counts = Counts::new(n);
    for (_, user, item) in s.train {
        if let Some(&i) = row.get(item.as_str()) {
            counts.take(user, i);
        }
    }
    let mut succ = Prequential::new(s.train);
    let mut near = Prequential::new(s.train);
    let (mut succ_slots, mut near_slots) = (Slots::default(), Slots::default());
    let (mut feed, mut scratch) = (Vec::with_capacity(10), Vec::new());
    let mut cursor = 0;
    for (k, (_, user, item)) in s.stream.iter().enumerate() {
        while cursor < s.stream.len().min(k + s.ahead) {
            if let Some(&i) = row.get(s.stream[cursor].2.as_str()) {
                if !live[i as usize] {
                    live[i as usize] = true;
                    succ.fresh_items_streamed += 1;
                }
            }
            cursor += 1;
        }
        let fresh = s.fresh.contains(item);
        let target = row.get(item.as_str()).copied();
        let history = counts.history(user);
        let seen = |i: u32| s.exclude_seen && history.contains(&i);

        counts.successors(history.last().copied(), seen, &mut feed, &mut scratch);
        succ_slots.add(&feed, s);
        succ.add(item, fresh, rank(&feed, target), false);

        if let Some(lists) = &neighbours {
            feed.clear();
            if let Some(&last) = history.last() {
                let list = &lists[last as usize * NEIGHBOURS..][..NEIGHBOURS];
                feed.extend(
                    list.iter()
                        .copied()
                        .filter(|&i| i != last && live[i as usize] && !seen(i))
                        .take(10),
                );
            }
            near_slots.add(&feed, s);
            near.add(item, fresh, rank(&feed, target), false);
        }
        if let Some(i) = target {
            counts.take(user, i);
        }
    }
    near.fresh_items_streamed = succ.fresh_items_streamed;
    Ok(Baselines {
        successors: succ_slots.finish(succ),
        content: neighbours.map(|_| near_slots.finish(near)),
    })
}

fn rank(feed: &[u32], target: Option<u32>) -> Option<usize> {
    target.and_then(|t| feed.iter().position(|&i| i == t))
}

/// The fresh items a baseline's feeds held.
#[derive(Default)]
struct Slots {
    slots: usize,
    fresh: usize,
    recommended: HashSet<u32>,
}

impl Slots {
    fn add(&mut self, feed: &[u32], s: &Stream<'_>) {
        self.slots += feed.len();
        for &i in feed {
            if s.fresh.contains(&s.catalogue[i as usize]) {
                self.fresh += 1;
                self.recommended.insert(i);
            }
        }
    }

    fn finish(self, p: Prequential) -> Prequential {
        let share = self.fresh as f64 / self.slots.max(1) as f64;
        p.finish(self.recommended.len(), share)
    }
}

/// Successor counts, popularity and histories, by catalogue row.
struct Counts {
    successors: Vec<HashMap<u32, u32>>,
    taken: Vec<u32>,
    /// Items taken at least once, the candidates for the popular fill.
    taken_once: Vec<u32>,
    histories: HashMap<String, Vec<u32>>,
    empty: Vec<u32>,
}

impl Counts {
    fn new(n: usize) -> Counts {
        Counts {
            successors: vec![HashMap::new(); n],
            taken: vec![0; n],
            taken_once: Vec::new(),
            histories: HashMap::new(),
            empty: Vec::new(),
        }
    }

    fn take(&mut self, user: &str, item: u32) {
        let h = self.histories.entry(user.to_string()).or_default();
        if let Some(&last) = h.last() {
            *self.successors[last as usize].entry(item).or_default() += 1;
        }
        h.push(item);
        if self.taken[item as usize] == 0 {
            self.taken_once.push(item);
        }
        self.taken[item as usize] += 1;
    }

    fn history(&self, user: &str) -> &[u32] {
        self.histories.get(user).unwrap_or(&self.empty)
    }

    /// The ten most frequent successors of `last` that `seen` lets
    /// through, most frequent first (ties to the lower row), then the most
    /// taken items.
    fn successors(
        &self,
        last: Option<u32>,
        seen: impl Fn(u32) -> bool,
        feed: &mut Vec<u32>,
        scratch: &mut Vec<u32>,
    ) {
        feed.clear();
        if let Some(last) = last {
            scratch.clear();
            scratch.extend(
                self.successors[last as usize]
                    .keys()
                    .copied()
                    .filter(|&i| !seen(i)),
            );
            let counts = &self.successors[last as usize];
            scratch.sort_unstable_by(|a, b| counts[b].cmp(&counts[a]).then(a.cmp(b)));
            feed.extend(scratch.iter().take(10));
        }
        if feed.len() < 10 {
            scratch.clear();
            scratch.extend(
                self.taken_once
                    .iter()
                    .copied()
                    .filter(|&i| !seen(i) && !feed.contains(&i)),
            );
            let by = |a: &u32, b: &u32| {
                self.taken[*b as usize]
                    .cmp(&self.taken[*a as usize])
                    .then(a.cmp(b))
            };
            let k = (10 - feed.len()).min(scratch.len());
            if k > 0 {
                scratch.select_nth_unstable_by(k - 1, by);
                scratch[..k].sort_unstable_by(by);
                feed.extend_from_slice(&scratch[..k]);
            }
        }
    }
}

/// Each item's `NEIGHBOURS` nearest items by content cosine, nearest first
/// (ties to the lower row), flattened.
fn nearest(content: &ContentTable) -> candle_core::Result<Vec<u32>> {
    let (n, dim) = (content.len(), content.dim());
    let k = NEIGHBOURS.min(n);
    let table = Tensor::from_slice(content.as_slice(), (n, dim), &Device::Cpu)?;
    let mut out = vec![0u32; n * NEIGHBOURS];
    let mut order: Vec<u32> = Vec::with_capacity(n);
    for start in (0..n).step_by(256) {
        let rows = 256.min(n - start);
        let scores = table
            .narrow(0, start, rows)?
            .matmul(&table.t()?)?
            .to_vec2::<f32>()?;
        for (r, row) in scores.iter().enumerate() {
            order.clear();
            order.extend(0..n as u32);
            let by =
                |a: &u32, b: &u32| row[*b as usize].total_cmp(&row[*a as usize]).then(a.cmp(b));
            if k > 0 {
                order.select_nth_unstable_by(k - 1, by);
                order[..k].sort_unstable_by(by);
            }
            out[(start + r) * NEIGHBOURS..][..k].copy_from_slice(&order[..k]);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(t: f64, u: &str, i: &str) -> Event {
        (t, u.into(), i.into())
    }

    fn ids(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    /// a→b twice, a→c once in training: after a, the successors baseline
    /// puts b first; the content baseline finds the fresh twin of the last
    /// item only once it is live.
    #[test]
    fn baselines_rank_by_counts_and_live_content() {
        let catalogue = ids(&["a", "b", "c", "d", "f"]);
        // d and f share content; a, b, c are apart.
        let content = ContentTable::new(
            3,
            vec![
                1.0, 0.0, 0.0, // a
                0.0, 1.0, 0.0, // b
                0.0, 0.0, 1.0, // c
                0.7, 0.7, 0.1, // d
                0.7, 0.7, 0.0, // f
            ],
        );
        let train = vec![
            ev(1.0, "u1", "a"),
            ev(2.0, "u1", "b"),
            ev(1.0, "u2", "a"),
            ev(2.0, "u2", "b"),
            ev(1.0, "u3", "a"),
            ev(2.0, "u3", "c"),
            ev(1.0, "u5", "d"),
        ];
        let stream = vec![
            ev(3.0, "u4", "a"), // no history: popularity (a 3, b 2, ...): hit at 0
            ev(4.0, "u4", "b"), // after a: b first
            ev(5.0, "u5", "f"), // fresh, live 1 ahead: content neighbour of d
        ];
        let live: HashSet<String> = ids(&["a", "b", "c", "d"]).into_iter().collect();
        let fresh: HashSet<String> = ids(&["f"]).into_iter().collect();
        let s = Stream {
            train: &train,
            stream: &stream,
            catalogue: &catalogue,
            live: &live,
            fresh: &fresh,
            ahead: 1,
            exclude_seen: true,
        };
        let b = baselines(&s, Some(&content)).unwrap();
        let succ = &b.successors;
        assert_eq!((succ.all.interactions, succ.all.hits), (3, 2));
        assert_eq!(succ.known.ndcg_10, (1.0 + 1.0) / 2.0);
        assert_eq!((succ.fresh.hits, succ.fresh_items_streamed), (0, 1));
        let near = b.content.as_ref().unwrap();
        assert_eq!((near.fresh.interactions, near.fresh.hits), (1, 1));
        assert_eq!(near.fresh_items_hit, 1);
        assert_eq!(near.fresh_items_recommended, 1);

        // The same stream with f upserted only at its interaction's turn
        // (ahead 0): the content baseline cannot recommend it.
        let late = Stream { ahead: 0, ..s };
        let b = baselines(&late, Some(&content)).unwrap();
        assert_eq!(b.content.unwrap().fresh.hits, 0);
    }

    #[test]
    fn successors_exclude_what_the_user_took_and_fill_by_popularity() {
        let mut c = Counts::new(4);
        for (u, i) in [("x", 0), ("x", 1), ("y", 0), ("y", 2), ("z", 3), ("w", 3)] {
            c.take(u, i);
        }
        let (mut feed, mut scratch) = (Vec::new(), Vec::new());
        let h = c.history("x").to_vec();
        c.successors(Some(0), |i| h.contains(&i), &mut feed, &mut scratch);
        // 2 follows 0 (1 is x's own); then 3 (taken twice).
        assert_eq!(feed, vec![2, 3]);
    }
}
