//! Fresh items: recommended by their content until the model has learnt them.
//!
//! A model trained on interactions gives an item it never saw as a target
//! almost no probability: its SID is decodable, but the beam prunes it
//! (measured on Toys: 0 of 1,117 cold targets in any top 10). The item's
//! content is all there is to go on, and content is a real signal: a
//! nearest neighbour of the user's last item by content is a strong
//! baseline on Amazon sets. So the search's distribution becomes a mixture
//! over two kinds of items, the way [`super::transitions`] mixes counts:
//!
//! ```text
//! P(item | history) = (1 − w) · P_model(item | history) + w · P_content(item | q)
//! P_content(f | q) = softmax over fresh items f of cos(q, c_f) / τ  [+ a(q → c_f)]
//! q = Σ_k 2^−k · c_(k-th last item), k < 5, normalised
//! ```
//!
//! The query `q` sums the last few items' content at halving weights
//! ([`FreshItems::with_query_items`]; the callers read five), and a fitted
//! affinity `a` ([`super::affinity`]) may add to the cosine. `w` is the
//! prior that the next item is a fresh one (the callers' defaults, .1 by
//! cosine and .025 with an affinity, were chosen on the cold splits). The
//! softmax hands all of `w` to the fresh items however few
//! they are, so a single new item would take it in every list; `w` is
//! therefore a large fresh set's weight, and `n` fresh items get
//! `w · n / (n + half)` ([`FreshItems::with_half_weight_at`]), or
//! [`FreshItems::with_known_sample`] normalises over the whole catalogue.
//! `τ` is fitted on training transitions by
//! [`fit_temperature`]: how sharply a next item follows its predecessor's
//! content. The model's top items and the best fresh items by content are
//! merged: both lists are each part's best, so their union holds the
//! mixture's top `k`; a fresh item the beam pruned is scored by its content
//! part alone, its (pruned, small) model share left out. How many fresh
//! items a list may hold ([`FreshItems::with_slots`]) and how high they may
//! go ([`FreshItems::with_after`]) are policy on top of the mixture.
//!
//! Cost per request: the query's few content rows summed, one dot product
//! per fresh item (and with an affinity one projection of the query and a
//! rank-wide dot product per fresh item); nothing runs on the model.

use std::sync::Arc;

use super::affinity::Affinity;
use super::prefix_scores::dot;
use crate::sid::Sid;

/// The mechanism's defaults, shared by `eval`, `bench generate` and the
/// service (`feed.fresh_*`): the weight and the one slot were chosen on the
/// Toys cold split, the two positions kept for known items on Sports'
/// standard split (docs/2026-12-cold-start.md).
pub const DEFAULT_WEIGHT: f32 = 0.1;
/// The weight when a fitted affinity ([`super::affinity`]) scores fresh
/// items beside the cosine: its content distribution is sharper, so the
/// same weight puts a fresh item in more lists (at .1, 8% of Sports' top-10
/// slots against 3.6% by cosine). Chosen on the Toys and Sports cold
/// splits with the five-item query: Toys' warm targets keep within 2% up to
/// .015, Sports' cold ones reach half of its warm Recall@10 from .03; at
/// .025 each misses that one check by a hit or two: Toys' warm Recall@10
/// is 2.1% down (1,523 hits against 1,556 off, where 2% allows 1,525),
/// Sports' cold one 48 hits where half of warm is 48.7
/// (docs/2026-12-cold-start.md).
pub const DEFAULT_AFFINITY_WEIGHT: f32 = 0.025;
/// See [`DEFAULT_WEIGHT`].
pub const DEFAULT_SLOTS: usize = 1;
/// See [`DEFAULT_WEIGHT`].
pub const DEFAULT_AFTER: usize = 2;
/// How many of a history's last items the content query reads
/// ([`FreshItems::with_query_items`]). With the affinity, five found more
/// cold targets than the last item alone at the same or lower cost to warm
/// ones on the Toys and Sports cold splits (Toys at .02: cold Recall@10
/// .0479 → .0532, warm unchanged; Sports at .03: cold .0251 → .0241 with
/// warm −1.7% instead of −2.1%) and on LIGER's protocol (Toys .1004 →
/// .1290); a user's recent items say more about the next new one than the
/// last alone (docs/2026-12-cold-start.md).
pub const DEFAULT_QUERY_ITEMS: usize = 5;
/// How many fresh items get half of the weight
/// ([`FreshItems::with_half_weight_at`]): chosen on the standard splits,
/// where Yelp's 14 never-trained items took 8.7% of the top-10 slots at the
/// full weight and cost 5% of its Recall@10 (1.1% at 20), while Sports' 73
/// stay above LIGER's cold numbers (not at 50); a cold split's hundreds
/// keep about 96% of the weight.
pub const DEFAULT_HALF_AT: usize = 20;

/// Holds fresh items to a share of the slots of the lists they can enter,
/// by moving the mixture's weight after every such list (a stochastic
/// approximation in `ln w`). A weight is a prior whose effect depends on
/// the catalogue: at .025 Toys' fresh items took 4.6% of top-10 slots and
/// Sports' 2.8%, and in the service the share moves as the fresh set grows.
/// The warm targets lost follow the share instead (about half of it on both
/// catalogues, docs/2026-12-cold-start.md), so a share is the knob that
/// means the same everywhere: TIGER's ε as a rate rather than a per-list
/// cap. The target is scaled like a weight for a small fresh set
/// ([`FreshItems::weight`]), so the first items to arrive are not pushed
/// into every feed.
#[derive(Clone, Copy, Debug)]
pub struct ShareTarget {
    share: f32,
    ln_weight: Option<f32>,
}

impl ShareTarget {
    /// Step in `ln w` per list, scaled by how far its share is from the
    /// target's (relative): from .025 a share a quarter too high halves the
    /// weight in about 300 lists, and the weight then wanders a few
    /// percent around where it holds the share.
    const RATE: f32 = 0.01;
    /// The weight stays within these: a share no content match can reach
    /// does not push the model out of the lists.
    const MIN_WEIGHT: f32 = 1e-4;
    const MAX_WEIGHT: f32 = 0.5;

    /// `share` of the slots, in (0, 1).
    pub fn new(share: f32) -> ShareTarget {
        ShareTarget {
            share,
            ln_weight: None,
        }
    }

    pub fn share(&self) -> f32 {
        self.share
    }

    /// The weight to search with; `start` until the first list is seen.
    pub fn weight(&self, start: f32) -> f32 {
        self.ln_weight.map_or(start, f32::exp)
    }

    /// After a list of `slots` positions that held `fresh` fresh items,
    /// searched at `weight`, with `target` the share for this fresh set.
    pub fn observe(&mut self, weight: f32, fresh: usize, slots: usize, target: f32) {
        if slots == 0 || target <= 0.0 {
            return;
        }
        let seen = fresh as f32 / slots as f32;
        let ln_w = weight.max(Self::MIN_WEIGHT).ln() + Self::RATE * (target - seen) / target;
        self.ln_weight = Some(ln_w.clamp(Self::MIN_WEIGHT.ln(), Self::MAX_WEIGHT.ln()));
    }
}

/// Unit content vectors by item number (a snapshot's ord); a row of zeros
/// stands for an item without content.
#[derive(Clone, Debug)]
pub struct ContentTable {
    dim: usize,
    rows: Vec<f32>,
    /// Per row: it is not all zeros (found once, not on every lookup).
    present: Vec<bool>,
}

impl ContentTable {
    /// `rows` is `[n × dim]`; each row is scaled to unit length.
    pub fn new(dim: usize, mut rows: Vec<f32>) -> ContentTable {
        for row in rows.chunks_exact_mut(dim.max(1)) {
            let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
            if norm > 0.0 {
                row.iter_mut().for_each(|x| *x /= norm);
            }
        }
        let present = rows
            .chunks_exact(dim.max(1))
            .map(|r| r.iter().any(|&x| x != 0.0))
            .collect();
        ContentTable { dim, rows, present }
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn len(&self) -> usize {
        self.rows.len() / self.dim.max(1)
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// All rows, `[len × dim]`.
    pub fn as_slice(&self) -> &[f32] {
        &self.rows
    }

    /// Item `ord`'s unit vector, or `None` past the table or for an item
    /// without content.
    pub fn row(&self, ord: u32) -> Option<&[f32]> {
        let i = ord as usize;
        if !self.present.get(i).copied().unwrap_or(false) {
            return None;
        }
        self.rows.get(i * self.dim..(i + 1) * self.dim)
    }
}

/// A segment's unit vectors, by row. Catalogue words are a few
/// dozen weighted buckets of 1,024, and a request scores every fresh item:
/// kept dense, 10,000 of them cost a request 10 M multiply-adds (bench
/// generate: 121 → 79 recommendations/s), so rows that are mostly zeros
/// keep their non-zeros only; dense content (a SID's reconstruction,
/// sentence vectors) stays a table.
#[derive(Clone, Debug)]
enum Rows {
    Dense(ContentTable),
    /// Row `i` is `entries[starts[i]..starts[i + 1]]`, `(dimension,
    /// value)`; an empty row stands for an item without content.
    Sparse {
        dim: usize,
        starts: Vec<usize>,
        entries: Vec<(u32, f32)>,
    },
}

/// Rows [`Rows::new`] reads before it may take a segment for dense.
const DECIDE_AFTER: usize = 64;

impl Rows {
    /// `n` rows, each a unit vector that `row(i, out)` writes to the empty
    /// `out` (false for an item without content). Sparse where at most a
    /// quarter of the values are non-zero: a sparse entry is twice a dense
    /// one's bytes, and its dot product gathers.
    ///
    /// Rows go to the sparse entries until the first [`DECIDE_AFTER`] of
    /// them are denser than that, and straight to the dense table after: a
    /// dense segment (the SIDs' reconstructions, up to 10,000 × 384) built
    /// through the entries took twice its size again, and growing them
    /// copied that on the way.
    fn new(dim: usize, n: usize, mut row: impl FnMut(usize, &mut Vec<f32>) -> bool) -> Rows {
        let (mut starts, mut entries) = (vec![0], Vec::new());
        let mut r = Vec::with_capacity(dim);
        let mut i = 0;
        while i < n {
            r.clear();
            if row(i, &mut r) {
                entries.extend(
                    (0u32..)
                        .zip(&r)
                        .filter(|(_, &x)| x != 0.0)
                        .map(|(j, &x)| (j, x)),
                );
            }
            starts.push(entries.len());
            i += 1;
            if i >= DECIDE_AFTER && entries.len() * 4 > i * dim {
                break;
            }
        }
        if i == n && entries.len() * 4 <= n * dim {
            return Rows::Sparse {
                dim,
                starts,
                entries,
            };
        }
        let mut dense = vec![0.0; n * dim];
        let mut rows = dense.chunks_exact_mut(dim.max(1));
        for (k, out) in rows.by_ref().take(i).enumerate() {
            for &(j, x) in &entries[starts[k]..starts[k + 1]] {
                out[j as usize] = x;
            }
        }
        drop(entries);
        for (k, out) in (i..n).zip(rows) {
            r.clear();
            if row(k, &mut r) {
                out[..r.len()].copy_from_slice(&r);
            }
        }
        Rows::Dense(ContentTable::new(dim, dense))
    }

    fn len(&self) -> usize {
        match self {
            Rows::Dense(table) => table.len(),
            Rows::Sparse { starts, .. } => starts.len() - 1,
        }
    }

    /// The rows' keys by `affinity`.
    fn keys(&self, affinity: &Affinity) -> Keys {
        let mut keys = Keys::new(affinity.rank());
        let (mut row, mut k) = (Vec::new(), Vec::new());
        for i in 0..self.len() {
            let found = self.dense(i, &mut row);
            keys.push(affinity, found.then_some(&row[..]), &mut k);
        }
        keys
    }

    fn dim(&self) -> usize {
        match self {
            Rows::Dense(table) => table.dim(),
            Rows::Sparse { dim, .. } => *dim,
        }
    }

    /// Row `i`'s dot product with `q`; `None` for an item without content.
    fn dot(&self, i: usize, q: &[f32]) -> Option<f32> {
        match self {
            Rows::Dense(table) => table.row(i as u32).map(|r| dot(q, r)),
            Rows::Sparse {
                starts, entries, ..
            } => {
                let row = &entries[starts[i]..starts[i + 1]];
                (!row.is_empty()).then(|| row.iter().map(|&(j, x)| q[j as usize] * x).sum())
            }
        }
    }

    /// Row `i` written densely to `out`; false for an item without content.
    fn dense(&self, i: usize, out: &mut Vec<f32>) -> bool {
        out.clear();
        match self {
            Rows::Dense(table) => table.row(i as u32).is_some_and(|r| {
                out.extend_from_slice(r);
                true
            }),
            Rows::Sparse {
                dim,
                starts,
                entries,
            } => {
                out.resize(*dim, 0.0);
                let row = &entries[starts[i]..starts[i + 1]];
                row.iter().for_each(|&(j, x)| out[j as usize] = x);
                !row.is_empty()
            }
        }
    }
}

/// An item's content vector, found by its SID or its ord and written to
/// the buffer; false when there is none. The service's content: the
/// tokenizer's reconstruction of the SID's content codes (nothing stored,
/// the same on every instance), or the weighted words of the item's
/// catalogue event (the space an affinity was fitted in).
pub type ItemContent = Arc<dyn Fn(Sid, u32, &mut Vec<f32>) -> bool + Send + Sync>;

/// Looks `content` up for an item into `out`, scaled to unit length;
/// false when there is none, or none `dim` wide.
fn unit_content(content: &ItemContent, dim: usize, sid: Sid, ord: u32, out: &mut Vec<f32>) -> bool {
    if !(content(sid, ord, out) && out.len() == dim) {
        return false;
    }
    let norm = out.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm == 0.0 {
        return false;
    }
    out.iter_mut().for_each(|x| *x /= norm);
    true
}

/// Fresh items' content rows built together, side by side and immutable:
/// fresh sets share them, and a request reads each one front to back.
/// Offline a fresh set is one segment. The service publishes a new fresh
/// set with every index publish, a few dozen a second during a catalogue
/// flood, and building all its rows each time (10,000 SID reconstructions
/// 8 ms, as many items' catalogue words with the affinity 31 ms: `cargo
/// bench --bench fresh_set`) was most of the catalogue consumer's work and
/// allocation then; so it writes a segment of the items that arrived or
/// changed since the last publish and merges segments the way a
/// log-structured store does ([`crate::service::view::FreshRows`]). Rows
/// allocated one by one instead scattered what a request reads: 4.5% of
/// recommendations/s at 10,000 fresh items.
#[derive(Clone)]
pub struct Segment {
    rows: Rows,
    /// The rows' keys, where an affinity scores them.
    keys: Option<Keys>,
}

impl Segment {
    /// `n` rows, each a unit vector that `row(i, out)` writes to the empty
    /// `out` (false for an item without content), keyed by `affinity`.
    fn new(
        dim: usize,
        n: usize,
        affinity: Option<&Affinity>,
        row: impl FnMut(usize, &mut Vec<f32>) -> bool,
    ) -> Segment {
        let rows = Rows::new(dim, n, row);
        Segment {
            keys: affinity.map(|a| rows.keys(a)),
            rows,
        }
    }

    /// The rows of `items` (`(sid, ord)`), their content looked up in
    /// `content` (`dim` wide), keyed by `affinity` where there is one.
    pub fn looked_up(
        content: &ItemContent,
        dim: usize,
        items: &[(Sid, u32)],
        affinity: Option<&Affinity>,
    ) -> Segment {
        Segment::new(dim, items.len(), affinity, |i, out| {
            let (sid, ord) = items[i];
            unit_content(content, dim, sid, ord, out)
        })
    }

    /// The rows `picked` (`(segment, row)`) of `segments`, side by side in
    /// that order: values and keys copied, no content looked up or
    /// projected again.
    pub fn merged(segments: &[Arc<Segment>], picked: &[(usize, u32)]) -> Segment {
        let dim = segments.first().map_or(0, |s| s.rows.dim());
        let rows = Rows::new(dim, picked.len(), |i, out| {
            let (s, r) = picked[i];
            segments[s].rows.dense(r as usize, out)
        });
        let rank = segments
            .iter()
            .find_map(|s| s.keys.as_ref().map(|k| k.rank));
        let keys = rank.map(|rank| {
            let mut keys = Keys::new(rank);
            for &(s, r) in picked {
                keys.copy(segments[s].keys.as_ref(), r as usize);
            }
            keys
        });
        Segment { rows, keys }
    }

    /// How many rows it holds.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The same rows keyed by `affinity` instead.
    fn keyed(&self, affinity: &Affinity) -> Segment {
        Segment {
            rows: self.rows.clone(),
            keys: Some(self.rows.keys(affinity)),
        }
    }

    /// Row `i`'s content logit for the unit query `q` at `1 / τ` = `inv`,
    /// plus the affinity's for its projection of the query (`projected`);
    /// `None` for an item without content.
    fn logit(&self, i: usize, q: &[f32], inv: f32, projected: Option<&[f32]>) -> Option<f32> {
        let cos = self.rows.dot(i, q)?;
        let learnt = match (&self.keys, projected) {
            (Some(k), Some(p)) => k.logit(p, i),
            _ => 0.0,
        };
        Some(cos * inv + learnt)
    }
}

/// Where a query reads the content of the items a history ends with.
#[derive(Clone)]
enum Queries {
    /// A table by item number, covering every item (offline).
    Table(ContentTable),
    /// Looked up per item ([`ItemContent`]).
    Items(ItemContent),
}

/// The items the model has not learnt, with their content, and how their
/// content is scored.
#[derive(Clone)]
pub struct FreshItems {
    queries: Queries,
    dim: usize,
    /// Fresh items sorted by SID, their ords beside them.
    sids: Vec<Sid>,
    ords: Vec<u32>,
    segments: Vec<Arc<Segment>>,
    /// Each fresh item's row (`(segment, row)`) and position, segment by
    /// segment and row by row: the order a request reads them in.
    rows: Vec<(u32, u32, u32)>,
    temperature: f32,
    query_items: usize,
    /// A sample of known items' rows and how many known items each stands
    /// for, when the softmax runs over the whole catalogue.
    known: Option<Segment>,
    known_scale: f32,
    slots: usize,
    after: usize,
    half_at: usize,
    /// Projects the query; the rows were keyed by it.
    affinity: Option<Arc<Affinity>>,
}

/// Rows' affinity keys and biases.
#[derive(Clone)]
struct Keys {
    rank: usize,
    /// `[rows × rank]`.
    keys: Vec<f32>,
    bias: Vec<f32>,
}

impl Keys {
    fn new(rank: usize) -> Keys {
        Keys {
            rank,
            keys: Vec::new(),
            bias: Vec::new(),
        }
    }

    /// Appends a row's key and bias (`k` is scratch space); `None` stands
    /// for an item without content: zeros.
    fn push(&mut self, affinity: &Affinity, row: Option<&[f32]>, k: &mut Vec<f32>) {
        match row {
            Some(r) => {
                self.bias.push(affinity.key_of(r, k));
                self.keys.extend_from_slice(k);
            }
            None => self.zeros(),
        }
    }

    /// Appends row `i` of `from` (zeros where it has no keys).
    fn copy(&mut self, from: Option<&Keys>, i: usize) {
        match from.filter(|f| f.rank == self.rank) {
            Some(f) => {
                self.keys
                    .extend_from_slice(&f.keys[i * f.rank..(i + 1) * f.rank]);
                self.bias.push(f.bias[i]);
            }
            None => self.zeros(),
        }
    }

    fn zeros(&mut self) {
        self.bias.push(0.0);
        self.keys.resize(self.keys.len() + self.rank, 0.0);
    }

    /// Row `i`'s affinity logit for the projected query `q`.
    fn logit(&self, q: &[f32], i: usize) -> f32 {
        dot(q, &self.keys[i * self.rank..(i + 1) * self.rank]) + self.bias[i]
    }
}

/// Sorts by SID, one item per SID.
fn sort_by_sid<T>(fresh: &mut Vec<(Sid, u32, T)>) {
    fresh.sort_unstable_by(|a, b| a.0.codes().cmp(b.0.codes()));
    fresh.dedup_by_key(|f| f.0);
}

impl FreshItems {
    /// `fresh` are `(sid, ord)` of the items the model never saw as a
    /// target; `content` must cover their ords and those of the items
    /// histories end with.
    pub fn new(content: ContentTable, fresh: Vec<(Sid, u32)>, temperature: f32) -> FreshItems {
        let mut fresh: Vec<(Sid, u32, ())> = fresh.into_iter().map(|(s, o)| (s, o, ())).collect();
        sort_by_sid(&mut fresh);
        // One segment, its rows in SID order.
        let fresh: Vec<(Sid, u32, (usize, u32))> = (0..)
            .zip(fresh)
            .map(|(r, (s, o, ()))| (s, o, (0, r)))
            .collect();
        let segment = Segment::new(content.dim(), fresh.len(), None, |i, out| {
            content.row(fresh[i].1).is_some_and(|r| {
                out.extend_from_slice(r);
                true
            })
        });
        let dim = content.dim();
        let queries = Queries::Table(content);
        FreshItems::with_rows(
            queries,
            dim,
            vec![Arc::new(segment)],
            fresh,
            temperature,
            None,
        )
    }

    /// As [`FreshItems::new`], the query's content looked up per item and
    /// the fresh items' rows (`(segment, row)` of `segments`) built by the
    /// caller from the same content ([`Segment::looked_up`]), keyed by
    /// `affinity` where there is one: a caller that publishes fresh sets
    /// often keeps the rows of the items still in them.
    pub fn by_item(
        content: ItemContent,
        dim: usize,
        segments: Vec<Arc<Segment>>,
        mut fresh: Vec<(Sid, u32, (usize, u32))>,
        temperature: f32,
        affinity: Option<Arc<Affinity>>,
    ) -> FreshItems {
        sort_by_sid(&mut fresh);
        let queries = Queries::Items(content);
        FreshItems::with_rows(queries, dim, segments, fresh, temperature, affinity)
    }

    /// `fresh` sorted by SID, one per SID.
    fn with_rows(
        queries: Queries,
        dim: usize,
        segments: Vec<Arc<Segment>>,
        fresh: Vec<(Sid, u32, (usize, u32))>,
        temperature: f32,
        affinity: Option<Arc<Affinity>>,
    ) -> FreshItems {
        let mut rows: Vec<(u32, u32, u32)> = (0u32..)
            .zip(&fresh)
            .map(|(p, &(_, _, (s, r)))| (s as u32, r, p))
            .collect();
        rows.sort_unstable();
        FreshItems {
            queries,
            dim,
            sids: fresh.iter().map(|f| f.0).collect(),
            ords: fresh.iter().map(|f| f.1).collect(),
            segments,
            rows,
            temperature: temperature.max(1e-4),
            query_items: 1,
            known: None,
            known_scale: 0.0,
            slots: usize::MAX,
            after: 0,
            half_at: 0,
            affinity,
        }
    }

    /// Adds a learnt affinity's logit ([`super::affinity`]) to the cosine's
    /// in the content softmax. It must have been fitted on this content
    /// space: the caller checks [`Affinity::content`]; a width that does not
    /// match the content is refused here, and the items are left as they
    /// were.
    pub fn set_affinity(&mut self, affinity: Arc<Affinity>) -> Result<(), String> {
        if affinity.dim() != self.dim {
            return Err(format!(
                "the affinity reads {}-wide content, the fresh items' is {}-wide",
                affinity.dim(),
                self.dim
            ));
        }
        for segment in &mut self.segments {
            *segment = Arc::new(segment.keyed(&affinity));
        }
        self.known = self.known.as_ref().map(|k| k.keyed(&affinity));
        self.affinity = Some(affinity);
        Ok(())
    }

    /// Normalises the content softmax over the whole catalogue instead of
    /// the fresh items alone, with the known items' part estimated from
    /// `sample` (ords), which stands for `known` items. A fresh item then
    /// gets the share content gives it against every item: much when it is
    /// the best content match there is, little when known items match
    /// better (the model ranks those), where a softmax over fresh items
    /// alone hands out the whole weight whatever the match. Needs a content
    /// table ([`FreshItems::new`]); looked up per item
    /// ([`FreshItems::by_item`]) the sample is ignored.
    pub fn with_known_sample(mut self, sample: Vec<u32>, known: usize) -> FreshItems {
        self.known_scale = known as f32 / sample.len().max(1) as f32;
        if let Queries::Table(table) = &self.queries {
            let affinity = self.affinity.as_deref();
            let segment = Segment::new(self.dim, sample.len(), affinity, |i, out| {
                table.row(sample[i]).is_some_and(|r| {
                    out.extend_from_slice(r);
                    true
                })
            });
            self.known = Some(segment);
        }
        self
    }

    pub fn len(&self) -> usize {
        self.sids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sids.is_empty()
    }

    pub(super) fn position(&self, sid: Sid) -> Option<usize> {
        self.sids
            .binary_search_by(|s| s.codes().cmp(sid.codes()))
            .ok()
    }

    /// At most how many fresh items one list may hold.
    pub fn slots(&self) -> usize {
        self.slots
    }

    /// Caps the fresh items in one list (TIGER's ε), whatever their
    /// scores: the ones past the cap give their slots back to the next
    /// known items. Default: no cap.
    pub fn with_slots(mut self, slots: usize) -> FreshItems {
        self.slots = slots;
        self
    }

    /// How many of a list's first positions are the model's alone.
    pub fn after(&self) -> usize {
        self.after
    }

    /// Keeps a list's first `n` positions for known items: a capped fresh
    /// item whose score would put it higher goes to position `n + 1` (at
    /// most the list's last), and the known items it passed move up. Where
    /// a fresh item lands matters more than whether it enters: a content
    /// guess at the top pushes every hit below it down a rank, which costs
    /// NDCG on the lists it misses, while Recall@10 sees only the tenth
    /// item it displaces. Default 0: wherever its score puts it.
    pub fn with_after(mut self, n: usize) -> FreshItems {
        self.after = n;
        self
    }

    /// Lets the weight grow with the fresh set: `n` items get `w · n / (n +
    /// half)` of a search's weight `w`. The content softmax runs over the
    /// fresh items alone, so without this one new item gets all of `w` in
    /// every list it is not blocked from, whatever its match, and enters
    /// nearly every feed: the prior that a user's next item is a fresh one
    /// should grow with how many there are. Default 0: the weight as given.
    pub fn with_half_weight_at(mut self, half: usize) -> FreshItems {
        self.half_at = half;
        self
    }

    /// The share of a search's weight these items get
    /// ([`FreshItems::with_half_weight_at`]).
    pub fn weight(&self, weight: f32) -> f32 {
        let n = self.len() as f32;
        weight * n / (n + self.half_at as f32).max(1.0)
    }

    /// How many of the history's last items the content query reads.
    pub fn query_items(&self) -> usize {
        self.query_items
    }

    /// Reads the `items` last items of a history into the content query
    /// (each older item at half the weight of the next); default 1, the
    /// last item alone.
    pub fn with_query_items(mut self, items: usize) -> FreshItems {
        self.query_items = items.max(1);
        self
    }

    /// Scores every fresh item for a history whose last items are `recent`
    /// (`(sid, ord)`, oldest first) into `log_p` (`ln P_content`, `-inf`
    /// where `blocked` says so or the item has no content) and returns
    /// false when there is nothing to score (no content in `recent`, or
    /// every fresh item blocked). `query` and `part` are scratch space.
    pub fn score(
        &self,
        recent: &[(Sid, u32)],
        blocked: impl Fn(usize, Sid) -> bool,
        query: &mut Vec<f32>,
        part: &mut Vec<f32>,
        log_p: &mut Vec<f32>,
    ) -> bool {
        log_p.clear();
        query.clear();
        query.resize(self.dim, 0.0);
        let mut weight = 1.0;
        for &(sid, ord) in recent.iter().rev().take(self.query_items) {
            let row = match &self.queries {
                Queries::Table(table) => table.row(ord),
                Queries::Items(content) => {
                    unit_content(content, self.dim, sid, ord, part).then_some(&part[..])
                }
            };
            if let Some(row) = row {
                query
                    .iter_mut()
                    .zip(row)
                    .for_each(|(q, r)| *q += weight * r);
            }
            weight *= 0.5;
        }
        let norm = query.iter().map(|x| x * x).sum::<f32>().sqrt();
        if norm == 0.0 {
            return false;
        }
        query.iter_mut().for_each(|q| *q /= norm);
        let query = &query[..];
        // The affinity's query projection goes where the history's rows
        // were read: `part` is free again.
        let projected = self.affinity.as_ref().map(|a| {
            a.query_of(query, part);
            &part[..]
        });
        let inv = 1.0 / self.temperature;
        let mut max = f32::NEG_INFINITY;
        log_p.resize(self.len(), f32::NEG_INFINITY);
        for &(s, r, p) in &self.rows {
            let p = p as usize;
            if blocked(p, self.sids[p]) {
                continue;
            }
            let segment = &self.segments[s as usize];
            if let Some(l) = segment.logit(r as usize, query, inv, projected) {
                log_p[p] = l;
                max = max.max(l);
            }
        }
        if max == f32::NEG_INFINITY {
            return false;
        }
        let known: f32 = self.known.as_ref().map_or(0.0, |k| {
            (0..k.len())
                .filter_map(|j| k.logit(j, query, inv, projected))
                .map(|s| (s - max).exp())
                .sum()
        });
        let z = log_p.iter().map(|&s| (s - max).exp()).sum::<f32>() + self.known_scale * known;
        let lse = max + z.ln();
        log_p.iter_mut().for_each(|s| *s -= lse);
        true
    }
    /// The `i`-th fresh item (in SID order).
    pub fn item(&self, i: usize) -> (Sid, u32) {
        (self.sids[i], self.ords[i])
    }
}

/// The temperature of `P_content` that best explains `pairs` (previous
/// item, next item) with the next item chosen among `candidates` by its
/// content's cosine to the previous one's, from a grid; returns it with the
/// mean negative log-likelihood of every grid point.
pub fn fit_temperature(
    content: &ContentTable,
    pairs: &[(u32, u32)],
    candidates: &[u32],
) -> (f32, Vec<(f32, f64)>) {
    const GRID: [f32; 8] = [0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.2, 0.5];
    let rows: Vec<&[f32]> = candidates.iter().filter_map(|&c| content.row(c)).collect();
    let mut nll = [0.0f64; GRID.len()];
    let mut used = 0usize;
    let mut cos = Vec::with_capacity(rows.len());
    for &(prev, next) in pairs {
        let (Some(q), Some(t)) = (content.row(prev), content.row(next)) else {
            continue;
        };
        cos.clear();
        cos.extend(rows.iter().map(|r| dot(q, r)));
        let target = dot(q, t);
        for (g, &tau) in GRID.iter().enumerate() {
            let max = cos.iter().fold(f32::NEG_INFINITY, |m, &c| m.max(c)) / tau;
            let lse = max + cos.iter().map(|&c| (c / tau - max).exp()).sum::<f32>().ln();
            nll[g] += (lse - target / tau) as f64;
        }
        used += 1;
    }
    let curve: Vec<(f32, f64)> = GRID
        .iter()
        .zip(nll)
        .map(|(&t, n)| (t, n / used.max(1) as f64))
        .collect();
    let best = curve
        .iter()
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map_or(0.1, |c| c.0);
    (best, curve)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sid(c: &[u16]) -> Sid {
        Sid::new(c).unwrap()
    }

    #[test]
    fn content_probabilities_follow_cosine_and_sum_to_one() {
        // Items 0..4: 0 and 2 point the same way, 1 is orthogonal, 3 is empty.
        let content = ContentTable::new(2, vec![1.0, 0.0, 0.0, 2.0, 3.0, 0.1, 0.0, 0.0]);
        let fresh = FreshItems::new(
            content,
            vec![(sid(&[0, 1]), 1), (sid(&[0, 2]), 2), (sid(&[0, 3]), 3)],
            0.1,
        );
        let (mut q, mut part, mut log_p) = (Vec::new(), Vec::new(), Vec::new());
        let at = |ords: &[u32]| {
            ords.iter()
                .map(|&o| (sid(&[9, o as u16]), o))
                .collect::<Vec<_>>()
        };
        assert!(fresh.score(&at(&[0]), |_, _| false, &mut q, &mut part, &mut log_p));
        let p: Vec<f32> = log_p.iter().map(|l| l.exp()).collect();
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        // Item 2 (same direction as 0) beats item 1; item 3 has no content.
        assert!(p[1] > 0.99 && p[0] < 0.01 && p[2] == 0.0, "{p:?}");
        // Blocking item 2 hands its mass to item 1.
        assert!(fresh.score(
            &at(&[0]),
            |_, s| s == sid(&[0, 2]),
            &mut q,
            &mut part,
            &mut log_p
        ));
        assert!((log_p[0].exp() - 1.0).abs() < 1e-5);
        // A last item without content scores nothing.
        assert!(!fresh.score(&at(&[3]), |_, _| false, &mut q, &mut part, &mut log_p));
        // With two query items the older one counts half: item 1 (content
        // of item 1) before item 0 still leaves item 2 ahead, but item 1
        // gets a real share.
        let two = fresh.clone().with_query_items(2);
        assert!(two.score(&at(&[1, 0]), |_, _| false, &mut q, &mut part, &mut log_p));
        assert!(log_p[1] > log_p[0] && log_p[0] > -10.0, "{log_p:?}");
        // The last item alone ignores it.
        assert!(fresh.score(&at(&[1, 0]), |_, _| false, &mut q, &mut part, &mut log_p));
        assert!(log_p[0] < -9.0, "{log_p:?}");
    }

    /// Lists whose fresh item enters above a threshold weight spread over
    /// two decades (and a third that it never enters): the controller
    /// finds the weight that gives each target share, whatever it starts
    /// from, and a target beyond reach stops at the weight's bound.
    #[test]
    fn a_share_target_finds_the_weight_that_holds_it() {
        let threshold = |i: usize| match i % 3 {
            2 => f32::INFINITY,
            _ => 10f32.powf(-3.0 + 2.0 * ((i * 7919) % 1000) as f32 / 1000.0),
        };
        let run = |share: f32, start: f32| {
            let mut control = ShareTarget::new(share);
            let mut held = 0usize;
            for i in 0..40_000 {
                let w = control.weight(start);
                let fresh = usize::from(w > threshold(i));
                if i >= 20_000 {
                    held += fresh;
                }
                control.observe(w, fresh, 10, share);
            }
            (held as f32 / 20_000.0 / 10.0, control.weight(start))
        };
        for (share, start) in [(0.02, 0.1), (0.05, 0.001), (0.05, 0.3)] {
            let (seen, w) = run(share, start);
            assert!(
                (seen - share).abs() < 0.1 * share,
                "{share} from {start}: {seen}"
            );
            // At w a fraction (2/3)·(log₁₀ w + 3)/2 of the lists take one
            // fresh item of ten slots: the share s needs log₁₀ w = 30·s − 3.
            let want = 10f32.powf(-3.0 + 2.0 * 1.5 * 10.0 * share);
            assert!(
                (w.ln() - want.ln()).abs() < 0.35,
                "{share}: weight {w}, want {want}"
            );
        }
        let (seen, w) = run(0.09, 0.025);
        assert!(seen < 0.07, "{seen}");
        assert!((w - ShareTarget::MAX_WEIGHT).abs() < 0.01, "{w}");
    }

    /// Word-like rows (a few non-zeros) are kept sparse, dense ones as a
    /// table, and both answer every row's dot product and copy alike.
    #[test]
    fn sparse_and_dense_rows_score_alike() {
        let dim = 16;
        let mut words = vec![vec![0.0f32; dim]; 5];
        for (i, r) in words.iter_mut().enumerate() {
            r[i] = 0.6;
            r[(3 * i + 5) % dim] = 0.8;
        }
        words[2].fill(0.0);
        let dense: Vec<Vec<f32>> = (0..5)
            .map(|i| (0..dim).map(|j| ((i * dim + j) as f32).sin()).collect())
            .collect();
        let q: Vec<f32> = (0..dim).map(|j| (j as f32 * 0.7).cos()).collect();
        // Past the rows that decide, rows go to the table straight: one
        // without content among them stays without.
        let mut many: Vec<Vec<f32>> = (0..DECIDE_AFTER + 40)
            .map(|i| (0..dim).map(|j| ((i * dim + j) as f32).cos()).collect())
            .collect();
        many[DECIDE_AFTER + 7].fill(0.0);
        for (rows, sparse) in [(words, true), (dense, false), (many, false)] {
            let kept = Rows::new(dim, rows.len(), |i, out| {
                out.extend_from_slice(&rows[i]);
                rows[i].iter().any(|&x| x != 0.0)
            });
            assert_eq!(matches!(kept, Rows::Sparse { .. }), sparse);
            assert_eq!(kept.dim(), dim);
            let table = ContentTable::new(dim, rows.concat());
            let mut out = Vec::new();
            for i in 0..rows.len() {
                let want = table.row(i as u32);
                assert_eq!(kept.dense(i, &mut out), want.is_some(), "row {i}");
                match (kept.dot(i, &q), want) {
                    (Some(d), Some(r)) => {
                        assert!((d - dot(&q, r)).abs() < 1e-5, "row {i}: {d}");
                        assert!(out.iter().zip(r).all(|(a, b)| (a - b).abs() < 1e-6));
                    }
                    (None, None) => {}
                    (d, r) => panic!("row {i}: {d:?} against {r:?}"),
                }
            }
        }
    }

    /// A merged segment's rows are its sources' rows, values and keys,
    /// whichever of them were sparse or dense.
    #[test]
    fn merged_rows_score_as_their_sources() {
        let dim = 16;
        let words = |i: usize, out: &mut Vec<f32>| {
            out.resize(dim, 0.0);
            out[i] = 0.6;
            out[(3 * i + 5) % dim] = 0.8;
            i != 2
        };
        let dense = |i: usize, out: &mut Vec<f32>| {
            out.extend((0..dim).map(|j| ((i * dim + j) as f32).sin() / 2.0));
            true
        };
        let wave = |n: usize, f: f32| (0..n).map(|j| (j as f32 * f).sin() / 4.0).collect();
        let affinity = Affinity::new(
            "t",
            dim,
            wave(dim * 3, 0.3),
            wave(dim * 3, 1.1),
            wave(dim, 2.3),
        )
        .unwrap();
        let segments = [
            Arc::new(Segment::new(dim, 4, Some(&affinity), words)),
            Arc::new(Segment::new(dim, 3, Some(&affinity), dense)),
        ];
        assert!(matches!(segments[0].rows, Rows::Sparse { .. }));
        assert!(matches!(segments[1].rows, Rows::Dense(_)));
        let picked = [(1, 2), (0, 2), (0, 3), (1, 0)];
        let merged = Segment::merged(&segments, &picked);
        assert_eq!(merged.len(), 4);
        let q: Vec<f32> = (0..dim).map(|j| (j as f32 * 0.7).cos() / 2.9).collect();
        let mut projected = Vec::new();
        affinity.query_of(&q, &mut projected);
        for (i, &(s, r)) in picked.iter().enumerate() {
            let want = segments[s].logit(r as usize, &q, 5.0, Some(&projected));
            let got = merged.logit(i, &q, 5.0, Some(&projected));
            match (got, want) {
                (Some(g), Some(w)) => assert!((g - w).abs() < 1e-5, "row {i}: {g} against {w}"),
                (g, w) => assert_eq!(g, w, "row {i}"),
            }
        }
        assert_eq!(merged.logit(1, &q, 5.0, Some(&projected)), None);
    }

    #[test]
    fn content_looked_up_per_item_scores_as_the_table_does() {
        // The same four items as above, their content found from the SID's
        // first code instead of a table by ord.
        let vectors = [[1.0, 0.0], [0.0, 2.0], [3.0, 0.1], [0.0, 0.0]];
        let content: ItemContent = Arc::new(move |s: Sid, _, out: &mut Vec<f32>| {
            let v = vectors[usize::from(s.codes()[0])];
            out.clear();
            out.extend_from_slice(&v);
            v != [0.0, 0.0]
        });
        let fresh_sids = vec![(sid(&[1, 0]), 1), (sid(&[2, 0]), 2), (sid(&[3, 0]), 3)];
        let segment = Segment::looked_up(&content, 2, &fresh_sids, None);
        let rows = (0..).zip(&fresh_sids).map(|(r, &(s, o))| (s, o, (0, r)));
        let by_sid = FreshItems::by_item(
            content,
            2,
            vec![Arc::new(segment)],
            rows.collect(),
            0.1,
            None,
        );
        let table = ContentTable::new(2, vectors.concat());
        let by_ord = FreshItems::new(table, fresh_sids, 0.1);
        let (mut q, mut part, mut a, mut b) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for recent in [vec![(sid(&[0, 5]), 0)], vec![(sid(&[1, 5]), 1)]] {
            assert!(by_sid.score(&recent, |_, _| false, &mut q, &mut part, &mut a));
            assert!(by_ord.score(&recent, |_, _| false, &mut q, &mut part, &mut b));
            assert_eq!(a.len(), 3);
            for (x, y) in a.iter().zip(&b) {
                assert!(x == y || (x - y).abs() < 1e-5, "{a:?} vs {b:?}");
            }
        }
        // An item without content (code 3) is never a query.
        assert!(!by_sid.score(
            &[(sid(&[3, 5]), 3)],
            |_, _| false,
            &mut q,
            &mut part,
            &mut a
        ));
    }

    #[test]
    fn temperature_fit_prefers_sharp_when_next_items_are_nearest() {
        // Ten items on a circle; every pair goes to the nearest neighbour.
        let rows: Vec<f32> = (0..10)
            .flat_map(|i| {
                let a = i as f32 * std::f32::consts::TAU / 10.0;
                [a.cos(), a.sin()]
            })
            .collect();
        let content = ContentTable::new(2, rows);
        let candidates: Vec<u32> = (0..10).collect();
        let near: Vec<(u32, u32)> = (0..10).map(|i| (i, i)).collect();
        let (sharp, _) = fit_temperature(&content, &near, &candidates);
        let far: Vec<(u32, u32)> = (0..10).map(|i| (i, (i + 3) % 10)).collect();
        let (flat, curve) = fit_temperature(&content, &far, &candidates);
        assert!(sharp < flat, "{sharp} vs {flat}: {curve:?}");
        assert_eq!(sharp, 0.01);
    }
}
