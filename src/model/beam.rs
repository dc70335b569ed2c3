//! Batched beam search over the live SIDs of an index snapshot.
//!
//! One search serves many requests at once. Each request's history goes
//! through the history transformer once; its context vector is then the first
//! input of every one of its beams. From there every step is one batch over
//! all beams of all requests: the SID decoder's step with a key/value cache
//! reordered by parent beam, the log-softmax, an additive mask built from the
//! index's decoding tables ([`Snapshot::fill_mask`]) plus the request's
//! filters, and a top-`beams` selection per request. Because every token is
//! chosen under the index's mask, every finished beam spells a live item: the
//! invalid-ID rate is zero by construction, not by filtering afterwards.
//!
//! With [`Generator::with_transitions`] the search runs over the mixture of
//! the model and the successor counts of each history's last item
//! ([`super::transitions`]). Beams then carry the model's own log-probability
//! beside the mixture's, and the range of successors under their prefix; only
//! the few codes that lead to a successor get a host-side correction, so the
//! tensor work is unchanged.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::sync::Arc;

use candle_core::{Device, Tensor};

use super::config::ModelError;
use super::device_tables::{top_k, DeviceTables, MAX_TOP_K};
use super::fresh::{FreshItems, ShareTarget};
use super::siblings::SiblingBuffer;
use super::transformer::{window_mask, window_positions, ItemTokens, Memory, Model};
use super::transitions::{Learnt, Transitions};
use crate::index::{Cursor, Snapshot};
use crate::sid::{Code, Sid, MAX_LEVELS};

/// Per-request restrictions, applied through the decoding mask so that beams
/// are never spent on items that would be thrown away.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    allow: Option<Vec<Sid>>,
    deny: Vec<Sid>,
}

impl Filter {
    /// Only these items may be recommended.
    pub fn allow(mut self, sids: impl IntoIterator<Item = Sid>) -> Filter {
        let mut v: Vec<Sid> = sids.into_iter().collect();
        v.sort_unstable_by(|a, b| a.codes().cmp(b.codes()));
        self.allow = Some(v);
        self
    }

    /// These items may not be recommended.
    pub fn deny(mut self, sids: impl IntoIterator<Item = Sid>) -> Filter {
        self.deny = sids.into_iter().collect();
        self.deny.sort_unstable_by(|a, b| a.codes().cmp(b.codes()));
        self
    }

    /// Whether `sid` may be recommended.
    fn permits(&self, sid: Sid) -> bool {
        let find = |v: &[Sid]| v.binary_search_by(|s| s.codes().cmp(sid.codes())).is_ok();
        self.allow.as_deref().is_none_or(find) && !find(&self.deny)
    }
}

/// The SIDs in a sorted list that start with `prefix`.
fn with_prefix<'a>(sorted: &'a [Sid], prefix: &[Code]) -> &'a [Sid] {
    let n = prefix.len();
    let lo = sorted.partition_point(|s| &s.codes()[..n] < prefix);
    let hi = lo + sorted[lo..].partition_point(|s| &s.codes()[..n] == prefix);
    &sorted[lo..hi]
}

/// One user's request.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    /// The user's items, oldest first; only the last `max_history` are read.
    pub history: &'a [Sid],
    pub filter: Option<&'a Filter>,
}

impl<'a> Request<'a> {
    /// A request without a filter.
    pub fn new(history: &'a [Sid]) -> Request<'a> {
        Request {
            history,
            filter: None,
        }
    }
}

#[derive(Clone, Debug)]
pub struct SearchOptions {
    pub beams: usize,
    /// Items returned per request (at most `beams`).
    pub top_k: usize,
    /// Leave out the items of the request's history.
    pub exclude_history: bool,
}

impl Default for SearchOptions {
    fn default() -> Self {
        SearchOptions {
            beams: 20,
            top_k: 10,
            exclude_history: false,
        }
    }
}

/// One recommended item.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Generated {
    pub sid: Sid,
    /// The item's number in the snapshot ([`Snapshot::get`]).
    pub ord: u32,
    /// Log-probability of the whole SID under the model, or under its
    /// mixture with the successor counts when the generator has them.
    pub log_prob: f32,
}

/// A candidate continuation, ordered so that a max-heap of `Reverse`s keeps
/// the best `beams` seen so far.
#[derive(Clone, Copy, PartialEq)]
struct Candidate {
    score: f32,
    /// Flat index into the request's `[beams × vocab]` score block.
    at: u32,
}

impl Eq for Candidate {}

impl Ord for Candidate {
    fn cmp(&self, other: &Self) -> Ordering {
        // Lower score is "greater" so the heap's top is the worst kept; ties
        // go to the lower index, which makes the search deterministic.
        other
            .score
            .total_cmp(&self.score)
            .then(self.at.cmp(&other.at))
    }
}

impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Beam state, request-major: beam `b` of request `r` is row `r * width + b`.
#[derive(Default)]
struct Beams {
    cursors: Vec<Cursor>,
    codes: Vec<[Code; MAX_LEVELS]>,
    /// Log-probability of the prefix under the distribution searched.
    scores: Vec<f32>,
    /// The same under the model alone (equal to `scores` without counts).
    model: Vec<f32>,
    /// The run of the request's successors under the prefix, in `succ`.
    spans: Vec<(u32, u32)>,
    /// The row each beam extends in the previous level's state.
    parents: Vec<u32>,
    /// The code each beam chose last, and the prefix row it completes.
    chosen: Vec<u32>,
    nodes: Vec<u32>,
    /// The prefix's node in the device tables (searches on the device).
    dnodes: Vec<u32>,
}

impl Beams {
    fn clear(&mut self) {
        self.cursors.clear();
        self.codes.clear();
        self.scores.clear();
        self.model.clear();
        self.spans.clear();
        self.parents.clear();
        self.chosen.clear();
        self.nodes.clear();
        self.dnodes.clear();
    }
}

/// How one request mixes in its last item's successors: with `w` the weight
/// and `n` the live successors' total count, a code whose subtree holds
/// successor count `g` scores `ln(P_model + g · w / ((1 − w) n))`, which is
/// the mixture's log-probability less `ln(1 − w)` (the same for every
/// candidate of the request, so ranking is unchanged); `shift` adds it back.
#[derive(Clone, Copy)]
struct Mix {
    /// `ln(w / ((1 − w) n))`.
    bonus: f32,
    /// `ln(1 − w)`.
    shift: f32,
}

/// A candidate whose score got its successors' share: where it sits in the
/// level's score block, the model's own score there, the mixture's, and
/// the successors under it.
#[derive(Clone, Copy)]
struct Fix {
    at: u32,
    model: f32,
    score: f32,
    span: (u32, u32),
}

/// The shape of one search step.
#[derive(Clone, Copy)]
struct Step {
    level: usize,
    vocab: usize,
    /// Beams per request going in.
    width: usize,
    /// Beams per request coming out.
    beams: usize,
}

/// Offers `c` to a heap that keeps the best `k` finite candidates.
fn offer(heap: &mut BinaryHeap<Candidate>, c: Candidate, k: usize) {
    if c.score == f32::NEG_INFINITY {
        return;
    }
    if heap.len() < k {
        heap.push(c);
    } else if let Some(mut worst) = heap.peek_mut() {
        if c < *worst {
            *worst = c;
        }
    }
}

/// Beam search with host buffers reused across levels and calls: the only
/// allocations per step are the tensors handed to candle.
pub struct Generator<'m> {
    model: &'m Model,
    transitions: Option<(&'m Transitions, f32)>,
    learnt: Option<Arc<dyn Learnt>>,
    /// One request's successors, trained and learnt, before they are
    /// merged, and the buffer they are merged through.
    merged: Vec<(Sid, f32)>,
    merge_scratch: Vec<(Sid, f32)>,
    fresh: Option<(Arc<FreshItems>, f32)>,
    /// Moves the fresh items' weight to hold their share of the slots;
    /// kept across calls and fresh sets.
    fresh_share: Option<ShareTarget>,
    /// Per fresh item: live in this call's snapshot; and its content score.
    fresh_live: Vec<bool>,
    /// Per fresh item: what the learnt counts multiply its content by.
    fresh_boost: Vec<f32>,
    /// The snapshot, fresh items and learnt counts `fresh_live` and
    /// `fresh_boost` were found for: they change at publishes, not per
    /// call, and a lookup per fresh item per call is not free.
    fresh_for: Option<FreshKey>,
    /// Per fresh item, for one request: not live, or in its history.
    fresh_blocked: Vec<bool>,
    fresh_log_p: Vec<f32>,
    fresh_order: Vec<u32>,
    fresh_recent: Vec<(Sid, u32)>,
    fresh_query: Vec<f32>,
    fresh_part: Vec<f32>,
    /// Live successors of every request's last item, request after request,
    /// with running count totals (`cum[j]` = counts before `succ[j]`).
    succ: Vec<Sid>,
    cum: Vec<f32>,
    /// Each request's run of `succ`.
    request_succ: Vec<(u32, u32)>,
    mixes: Vec<Option<Mix>>,
    /// This level's corrected candidates, request-major, `fix_offsets[r]..`.
    fixes: Vec<Fix>,
    fix_offsets: Vec<usize>,
    /// Where this level's corrected candidates sit, for a device search to
    /// read their scores.
    fix_at: Vec<u32>,
    mask: Vec<f32>,
    /// Per code of one beam: whether its allow filter lets it through.
    allowed: Vec<bool>,
    /// Score positions this step's filters rule out.
    blocked: Vec<u32>,
    heap: BinaryHeap<Candidate>,
    /// Every request's best candidates of the level, best first, request
    /// `r`'s at `kept_offsets[r]..kept_offsets[r + 1]`.
    kept: Vec<Candidate>,
    kept_offsets: Vec<usize>,
    /// Whether masks and candidates are made on the model's device
    /// ([`super::device_tables`]), and the snapshot tables they need.
    on_device: bool,
    tables: Option<DeviceTables>,
    beams: Beams,
    next: Beams,
    /// Live children of every beam's prefix, in CSR form, and the buffers
    /// they become tensors from, for sibling-scored levels.
    children: Vec<Code>,
    offsets: Vec<u32>,
    siblings: SiblingBuffer,
}

/// The snapshot (by publish), fresh items and learnt counts a generator's
/// per-fresh-item tables were found for.
struct FreshKey {
    seq: u64,
    fresh: Arc<FreshItems>,
    learnt: Option<Arc<dyn Learnt>>,
}

impl FreshKey {
    fn matches(&self, seq: u64, fresh: &Arc<FreshItems>, learnt: &Option<Arc<dyn Learnt>>) -> bool {
        self.seq == seq
            && Arc::ptr_eq(&self.fresh, fresh)
            && match (&self.learnt, learnt) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            }
    }
}

/// Turns one request's trained and learnt successors (`merged`, any
/// order) into the live ones sorted by SID, each once, with the popular
/// items' share merged in (through `scratch`).
fn merge_learnt(
    merged: &mut Vec<(Sid, f32)>,
    scratch: &mut Vec<(Sid, f32)>,
    learnt: &dyn Learnt,
    snapshot: &Snapshot,
) {
    let by_sid = |a: &(Sid, f32), b: &(Sid, f32)| a.0.codes().cmp(b.0.codes());
    merged.retain(|&(sid, n)| n > 0.0 && snapshot.get(sid).is_some());
    merged.sort_unstable_by(by_sid);
    merged.dedup_by(|later, kept| {
        let same = later.0 == kept.0;
        if same {
            kept.1 += later.1;
        }
        same
    });
    let known: f32 = merged.iter().map(|&(_, n)| n).sum();
    let (share, popular) = (learnt.popularity_share(), learnt.popular());
    let weight: f32 = popular.iter().map(|&(_, n)| n).sum();
    if share <= 0.0 || weight <= 0.0 {
        return;
    }
    // Popular items get `share` of the counts' mass beside known
    // successors, and all of it where there are none.
    let scale = if known > 0.0 {
        share / (1.0 - share) * known / weight
    } else {
        1.0 / weight
    };
    scratch.clear();
    let (mut i, mut j) = (0, 0);
    while i < merged.len() || j < popular.len() {
        let order = match (merged.get(i), popular.get(j)) {
            (Some(a), Some(b)) => by_sid(a, b),
            (Some(_), None) => Ordering::Less,
            _ => Ordering::Greater,
        };
        match order {
            Ordering::Less => {
                scratch.push(merged[i]);
                i += 1;
            }
            Ordering::Greater => {
                scratch.push((popular[j].0, popular[j].1 * scale));
                j += 1;
            }
            Ordering::Equal => {
                scratch.push((merged[i].0, merged[i].1 + popular[j].1 * scale));
                i += 1;
                j += 1;
            }
        }
    }
    std::mem::swap(merged, scratch);
}

/// Multiplies each fresh item's probability by its boost and rescales them
/// to the mass they had: the stream moves mass among fresh items, it adds
/// none to them.
fn boost(log_p: &mut [f32], by: &[f32]) {
    let mass: f32 = log_p.iter().map(|l| l.exp()).sum();
    let boosted: f32 = log_p.iter().zip(by).map(|(l, b)| l.exp() * b).sum();
    if !(mass > 0.0 && boosted > 0.0) {
        return;
    }
    let shift = (mass / boosted).ln();
    for (l, b) in log_p.iter_mut().zip(by) {
        *l += b.ln() + shift;
    }
}

/// `ln(e^a + e^b)` without overflow.
fn log_add_exp(a: f32, b: f32) -> f32 {
    let (hi, lo) = if a > b { (a, b) } else { (b, a) };
    hi + (lo - hi).exp().ln_1p()
}

/// Calls `f(request, position, successors' run, mix)` for every candidate
/// of the step whose code leads to successors of its request's last item,
/// request after request and in position order.
fn each_fix(
    mixes: &[Option<Mix>],
    spans: &[(u32, u32)],
    succ: &[Sid],
    step: Step,
    mut f: impl FnMut(usize, usize, (u32, u32), Mix),
) {
    for (r, mix) in mixes.iter().enumerate() {
        let Some(mix) = *mix else { continue };
        let rows = r * step.width..(r + 1) * step.width;
        for (i, &(mut j, hi)) in rows.clone().zip(&spans[rows]) {
            while j < hi {
                let code = succ[j as usize].codes()[step.level];
                let start = j;
                while j < hi && succ[j as usize].codes()[step.level] == code {
                    j += 1;
                }
                f(r, i * step.vocab + usize::from(code), (start, j), mix);
            }
        }
    }
}

impl<'m> Generator<'m> {
    pub fn new(model: &'m Model) -> Generator<'m> {
        Generator {
            model,
            transitions: None,
            learnt: None,
            merged: Vec::new(),
            merge_scratch: Vec::new(),
            fresh: None,
            fresh_share: None,
            fresh_live: Vec::new(),
            fresh_blocked: Vec::new(),
            fresh_boost: Vec::new(),
            fresh_for: None,
            fresh_log_p: Vec::new(),
            fresh_order: Vec::new(),
            fresh_recent: Vec::new(),
            fresh_query: Vec::new(),
            fresh_part: Vec::new(),
            succ: Vec::new(),
            cum: Vec::new(),
            request_succ: Vec::new(),
            mixes: Vec::new(),
            fixes: Vec::new(),
            fix_offsets: Vec::new(),
            fix_at: Vec::new(),
            mask: Vec::new(),
            allowed: Vec::new(),
            blocked: Vec::new(),
            heap: BinaryHeap::new(),
            kept: Vec::new(),
            kept_offsets: Vec::new(),
            on_device: !model.device().is_cpu(),
            tables: None,
            beams: Beams::default(),
            next: Beams::default(),
            children: Vec::new(),
            offsets: Vec::new(),
            siblings: SiblingBuffer::default(),
        }
    }

    /// Builds each step's mask and picks its candidates on the model's
    /// device (`true`, the default off the CPU) or on the host (`false`,
    /// the default on the CPU, where the scores already are). Both give
    /// the same lists; the device way is there to keep a GPU's scores on
    /// the GPU, and can be measured on the CPU.
    pub fn with_device_decoding(mut self, on: bool) -> Generator<'m> {
        self.on_device = on;
        self
    }

    /// Searches the mixture of the model (weight `1 − weight`) and the
    /// successor counts of each history's last item (weight `weight`);
    /// a weight of 0 leaves the model alone. Weights are meant to lie in
    /// `[0, 1)` ([`super::ModelConfig::validate`] checks the config's); one
    /// of 1 or more is read as 0.999, so the model still ranks the items
    /// no count reaches.
    pub fn with_transitions(mut self, transitions: &'m Transitions, weight: f32) -> Generator<'m> {
        self.transitions = (weight > 0.0).then_some((transitions, weight.min(0.999)));
        self
    }

    /// Adds successor counts learnt after training to the trained ones
    /// (the service's, which change between calls); they count only where
    /// the generator mixes in counts ([`Generator::with_transitions`]).
    pub fn set_learnt(&mut self, learnt: Option<Arc<dyn Learnt>>) {
        self.learnt = learnt;
    }

    /// Searches the mixture of this generator's distribution (weight
    /// `1 − weight`) and the content of items the model never learnt
    /// ([`super::fresh`]; a small set of them gets a share of the weight,
    /// [`FreshItems::weight`]); a weight of 0 leaves them to the model.
    pub fn with_fresh(mut self, fresh: Arc<FreshItems>, weight: f32) -> Generator<'m> {
        self.set_fresh(Some(fresh), weight);
        self
    }

    /// [`Generator::with_fresh`] for a generator kept across calls whose
    /// fresh items change between them (the service's, as the catalogue
    /// does); `None` leaves everything to the model.
    pub fn set_fresh(&mut self, fresh: Option<Arc<FreshItems>>, weight: f32) {
        self.fresh = fresh.and_then(|f| {
            let w = f.weight(weight);
            (w > 0.0).then(|| (f, w.min(0.999)))
        });
    }

    /// Holds fresh items to `share` of the slots of the lists they can
    /// enter ([`ShareTarget`]): the weight given with them is where the
    /// search starts, and it moves after every list. `None`: the weight as
    /// given.
    pub fn with_fresh_share(mut self, share: Option<f32>) -> Generator<'m> {
        self.fresh_share = share.map(ShareTarget::new);
        self
    }

    /// The weight the fresh items are searched at now: the one given, or
    /// where their share target has moved it.
    pub fn fresh_weight(&self) -> Option<f32> {
        let (_, w) = self.fresh.as_ref()?;
        Some(self.fresh_share.map_or(*w, |s| s.weight(*w)))
    }

    /// The top `opts.top_k` live items for each request, best first.
    pub fn generate(
        &mut self,
        snapshot: &Snapshot,
        requests: &[Request<'_>],
        opts: &SearchOptions,
    ) -> Result<Vec<Vec<Generated>>, ModelError> {
        let cfg = self.model.config();
        let levels = cfg.levels();
        if snapshot.vocab() != cfg.vocab.as_slice() {
            return Err(ModelError::Config {
                field: "vocab",
                why: format!(
                    "the model spells {:?} but the index holds {:?}",
                    cfg.vocab,
                    snapshot.vocab()
                ),
            });
        }
        if requests.is_empty() {
            return Ok(Vec::new());
        }
        let beams = opts.beams.max(1);
        let device = self.model.device().clone();
        let s = requests.len();

        let (contexts, memory) = self.contexts(requests, &device)?;

        self.beams.clear();
        self.beams.cursors.resize(s, snapshot.root());
        self.beams.codes.resize(s, [0; MAX_LEVELS]);
        self.beams.scores.resize(s, 0.0);
        self.beams.model.resize(s, 0.0);
        self.beams.dnodes.resize(s, 0);
        self.successors(snapshot, requests);
        let mut width = 1;
        let mut cache = self.model.decoder_cache(s)?;
        let mut input = self.model.decoder_start(&contexts)?;
        let mut prefixes: Option<Tensor> = None;

        for level in 0..levels {
            let vocab = cfg.vocab[level];
            let siblings = if cfg.sibling_scored(level) {
                self.children.clear();
                self.offsets.clear();
                self.offsets.push(0);
                for (&cursor, score) in self.beams.cursors.iter().zip(&self.beams.scores) {
                    // A dead beam's cursor stayed a level behind: it has no
                    // children here.
                    if score.is_finite() {
                        snapshot.allowed(cursor, |c| self.children.push(c));
                    }
                    self.offsets.push(self.children.len() as u32);
                }
                Some(self.siblings.build(
                    cfg,
                    level,
                    &self.beams.codes,
                    &self.children,
                    &self.offsets,
                    &device,
                )?)
            } else {
                None
            };
            let logp = self.model.decoder_step(
                &input,
                level,
                &mut cache,
                &memory,
                prefixes.as_ref(),
                siblings.as_ref(),
            )?;
            let step = Step {
                level,
                vocab,
                width,
                beams,
            };
            let prior = Tensor::from_slice(&self.beams.model, (s * width, 1), &device)?;
            let raw = logp.broadcast_add(&prior)?;
            if self.on_device {
                self.candidates_on_device(&raw, snapshot, requests, opts, step)?;
            } else {
                self.candidates_on_host(&raw, snapshot, requests, opts, step)?;
            }

            self.next.clear();
            let block = width * vocab;
            for r in 0..s {
                let shift = self.mixes[r].map_or(0.0, |m| m.shift);
                let kept = &self.kept[self.kept_offsets[r]..self.kept_offsets[r + 1]];
                let fixes = &self.fixes[self.fix_offsets[r]..self.fix_offsets[r + 1]];
                for b in 0..beams {
                    let (row, code, score, model, span) = match kept.get(b) {
                        Some(c) => {
                            let at = (r * block) as u32 + c.at;
                            let (model, span) = match fixes.binary_search_by_key(&at, |f| f.at) {
                                Ok(f) => (fixes[f].model, fixes[f].span),
                                Err(_) => (c.score, (0, 0)),
                            };
                            (
                                r * width + c.at as usize / vocab,
                                (c.at as usize % vocab) as Code,
                                c.score + shift,
                                model,
                                span,
                            )
                        }
                        // Fewer live continuations than beams: a dead beam
                        // that can never be chosen again.
                        None => (r * width, 0, f32::NEG_INFINITY, f32::NEG_INFINITY, (0, 0)),
                    };
                    let from = self.beams.cursors[row];
                    let changed = || ModelError::Request {
                        request: r,
                        why: "the index changed under the search".into(),
                    };
                    let (cursor, dnode) = if !score.is_finite() {
                        (from, 0)
                    } else {
                        let cursor = snapshot.step(from, code).ok_or_else(changed)?;
                        let dnode = match (&self.tables, self.on_device) {
                            (Some(t), true) => t
                                .child(level, self.beams.dnodes[row], code)
                                .ok_or_else(changed)?,
                            _ => 0,
                        };
                        (cursor, dnode)
                    };
                    let mut c = self.beams.codes[row];
                    c[level] = code;
                    let next = &mut self.next;
                    next.cursors.push(cursor);
                    next.codes.push(c);
                    next.scores.push(score);
                    next.model.push(model);
                    next.spans.push(span);
                    next.parents.push(row as u32);
                    next.chosen.push(u32::from(code));
                    next.nodes.push(cfg.node_id(&c, level));
                    next.dnodes.push(dnode);
                }
            }
            std::mem::swap(&mut self.beams, &mut self.next);
            width = beams;
            if level + 1 < levels {
                let n = s * beams;
                let parents = Tensor::from_slice(&self.beams.parents, n, &device)?;
                cache.reorder(&parents)?;
                let chosen = Tensor::from_slice(&self.beams.chosen, n, &device)?;
                let nodes = Tensor::from_slice(&self.beams.nodes, n, &device)?;
                input = self.model.decoder_input(level + 1, &chosen, &nodes)?;
                // The chosen prefixes are the next level's parents.
                prefixes = cfg.prefix_scored(level + 1).then_some(nodes);
            }
        }
        let (codes, scores) = (&self.beams.codes, &self.beams.scores);

        // With fresh items the whole beam is kept: a capped fresh item's
        // slot goes to the next known one.
        let keep = if self.fresh.is_some() {
            beams.max(opts.top_k)
        } else {
            opts.top_k
        };
        let mut out = Vec::with_capacity(s);
        for r in 0..s {
            let mut items = Vec::with_capacity(keep);
            for b in 0..beams {
                let i = r * beams + b;
                if items.len() == keep || !scores[i].is_finite() {
                    break;
                }
                let sid = Sid::new(&codes[i][..levels]).expect("levels checked by the config");
                let ord = snapshot.get(sid).ok_or_else(|| ModelError::Request {
                    request: r,
                    why: format!("beam ended on {sid}, which is not live"),
                })?;
                items.push(Generated {
                    sid,
                    ord,
                    log_prob: scores[i],
                });
            }
            out.push(items);
        }
        if let Some((fresh, weight)) = self.fresh.clone() {
            let current = self
                .fresh_for
                .as_ref()
                .is_some_and(|k| k.matches(snapshot.seq(), &fresh, &self.learnt));
            if !current {
                self.fresh_live.clear();
                self.fresh_live
                    .extend((0..fresh.len()).map(|i| snapshot.get(fresh.item(i).0).is_some()));
                self.fresh_boost.clear();
                if let Some(learnt) = &self.learnt {
                    self.fresh_boost
                        .extend((0..fresh.len()).map(|i| learnt.fresh_boost(fresh.item(i).0)));
                }
                self.fresh_for = Some(FreshKey {
                    seq: snapshot.seq(),
                    fresh: fresh.clone(),
                    learnt: self.learnt.clone(),
                });
            }
            for (r, (req, items)) in requests.iter().zip(&mut out).enumerate() {
                let w = self.fresh_share.map_or(weight, |s| s.weight(weight));
                let scored = self.merge_fresh(&fresh, w, snapshot, (r, req), opts, items);
                items.truncate(opts.top_k);
                if let (true, Some(share)) = (scored, &mut self.fresh_share) {
                    let held = items
                        .iter()
                        .filter(|g| fresh.position(g.sid).is_some())
                        .count();
                    share.observe(w, held, opts.top_k, fresh.weight(share.share()));
                }
            }
        }
        Ok(out)
    }

    /// Mixes one request's list with its best fresh items by content. Both
    /// lists are their part's top `top_k`, so the merge is the mixture's.
    /// The slot cap is for fresh items known by their content alone: one
    /// the request's counts lead to (learnt from the stream, since training
    /// never saw it) has earned its place and is not capped. False when no
    /// fresh item could enter the list (nothing to score).
    fn merge_fresh(
        &mut self,
        fresh: &FreshItems,
        weight: f32,
        snapshot: &Snapshot,
        (r, req): (usize, &Request<'_>),
        opts: &SearchOptions,
        items: &mut Vec<Generated>,
    ) -> bool {
        let start = req.history.len().saturating_sub(fresh.query_items());
        self.fresh_recent.clear();
        self.fresh_recent.extend(
            req.history[start..]
                .iter()
                .filter_map(|&s| snapshot.get(s).map(|o| (s, o))),
        );
        // The history's few fresh items found by SID, not every fresh item
        // looked for in the history.
        self.fresh_blocked.clear();
        self.fresh_blocked
            .extend(self.fresh_live.iter().map(|live| !live));
        if opts.exclude_history {
            for &sid in req.history {
                if let Some(i) = fresh.position(sid) {
                    self.fresh_blocked[i] = true;
                }
            }
        }
        let blocked = &self.fresh_blocked;
        let blocked =
            |i: usize, sid: Sid| blocked[i] || req.filter.is_some_and(|f| !f.permits(sid));
        if !fresh.score(
            &self.fresh_recent,
            blocked,
            &mut self.fresh_query,
            &mut self.fresh_part,
            &mut self.fresh_log_p,
        ) {
            return false;
        }
        if !self.fresh_boost.is_empty() {
            boost(&mut self.fresh_log_p, &self.fresh_boost);
        }
        let (model_w, fresh_w) = ((1.0 - weight).ln(), weight.ln());
        let log_p = &self.fresh_log_p;
        for g in items.iter_mut() {
            g.log_prob += model_w;
            if let Some(i) = fresh.position(g.sid) {
                g.log_prob = log_add_exp(g.log_prob, fresh_w + log_p[i]);
            }
        }
        self.fresh_order.clear();
        self.fresh_order
            .extend((0..log_p.len() as u32).filter(|&i| log_p[i as usize].is_finite()));
        // Under a cap of n slots only the n best by content can be kept: a
        // fresh item outside the beam scores by content alone, below them.
        let k = opts.top_k.min(fresh.slots()).min(self.fresh_order.len());
        if k == 0 {
            return false;
        }
        let by_score = |a: &u32, b: &u32| log_p[*b as usize].total_cmp(&log_p[*a as usize]);
        self.fresh_order.select_nth_unstable_by(k - 1, by_score);
        for &i in &self.fresh_order[..k] {
            let (sid, ord) = fresh.item(i as usize);
            if !items.iter().any(|g| g.sid == sid) {
                items.push(Generated {
                    sid,
                    ord,
                    log_prob: fresh_w + log_p[i as usize],
                });
            }
        }
        items.sort_by(|a, b| b.log_prob.total_cmp(&a.log_prob));
        let (lo, hi) = self.request_succ.get(r).copied().unwrap_or_default();
        let counted = &self.succ[lo as usize..hi as usize];
        let capped = |g: &Generated| {
            fresh.position(g.sid).is_some()
                && counted
                    .binary_search_by(|s| s.codes().cmp(g.sid.codes()))
                    .is_err()
        };
        let mut taken = 0;
        items.retain(|g| {
            let capped = capped(g);
            taken += usize::from(capped);
            !capped || taken <= fresh.slots()
        });
        // The first `after` positions go to known items: the next known
        // item moves up past the capped ones there, the order within each
        // kind kept, and their scores drop to its own so the list stays
        // sorted. A fresh item that made the list stays in it: the last
        // position is always open to it.
        let after = fresh.after().min(opts.top_k.saturating_sub(1));
        for j in 0..after.min(items.len()) {
            if !capped(&items[j]) {
                continue;
            }
            let Some(k) = (j + 1..items.len()).find(|&k| !capped(&items[k])) else {
                break;
            };
            items[j..=k].rotate_right(1);
            let above = items[j].log_prob;
            for g in &mut items[j + 1..=k] {
                g.log_prob = g.log_prob.min(above);
            }
        }
        true
    }

    /// Lists the live successors of every request's last item and gives each
    /// request's root beam their run.
    fn successors(&mut self, snapshot: &Snapshot, requests: &[Request<'_>]) {
        self.succ.clear();
        self.cum.clear();
        self.cum.push(0.0);
        self.mixes.clear();
        self.beams.spans.clear();
        self.request_succ.clear();
        let Some((transitions, weight)) = self.transitions else {
            self.mixes.resize(requests.len(), None);
            self.beams.spans.resize(requests.len(), (0, 0));
            return;
        };
        for req in requests {
            let lo = self.succ.len();
            let last = req.history.last().copied();
            let (to, counts) = last.map_or((&[][..], &[][..]), |s| transitions.successors(s));
            let mut total = 0.0;
            match (&self.learnt, last) {
                (Some(learnt), Some(last)) => {
                    self.merged.clear();
                    self.merged
                        .extend(to.iter().zip(counts).map(|(&s, &n)| (s, n as f32)));
                    learnt.successors(last, &mut self.merged);
                    merge_learnt(
                        &mut self.merged,
                        &mut self.merge_scratch,
                        learnt.as_ref(),
                        snapshot,
                    );
                    for &(sid, n) in &self.merged {
                        total += n;
                        self.succ.push(sid);
                        self.cum.push(total + self.cum[lo]);
                    }
                }
                _ => {
                    for (&sid, &n) in to.iter().zip(counts) {
                        if snapshot.get(sid).is_some() {
                            total += n as f32;
                            self.succ.push(sid);
                            self.cum.push(total + self.cum[lo]);
                        }
                    }
                }
            }
            let hi = self.succ.len();
            self.beams.spans.push((lo as u32, hi as u32));
            self.request_succ.push((lo as u32, hi as u32));
            self.mixes.push((total > 0.0).then(|| Mix {
                bonus: (weight / ((1.0 - weight) * total)).ln(),
                shift: (1.0 - weight).ln(),
            }));
        }
    }

    /// Each request's best `step.beams` candidates from the step's scores
    /// (`raw`: the model's and the prefix's, `[rows, vocab]`), masked and
    /// ranked on the host.
    fn candidates_on_host(
        &mut self,
        raw: &Tensor,
        snapshot: &Snapshot,
        requests: &[Request<'_>],
        opts: &SearchOptions,
        step: Step,
    ) -> Result<(), ModelError> {
        let rows = requests.len() * step.width;
        self.mask.resize(rows * step.vocab, 0.0);
        snapshot.fill_mask(&self.beams.cursors, step.vocab, &mut self.mask);
        self.filter(requests, opts, step);
        for &at in &self.blocked {
            self.mask[at as usize] = f32::NEG_INFINITY;
        }
        let mask = Tensor::from_slice(&self.mask, (rows, step.vocab), raw.device())?;
        let mut total = raw.add(&mask)?.flatten_all()?.to_vec1::<f32>()?;
        self.mix(step, |at| total[at]);
        self.rank_on_host(&mut total, step);
        Ok(())
    }

    /// Each request's best `step.beams` of `total` (`[rows × vocab]`, the
    /// corrections in `fixes` not yet applied) into `kept`.
    fn rank_on_host(&mut self, total: &mut [f32], step: Step) {
        for f in &self.fixes {
            total[f.at as usize] = f.score;
        }
        self.kept.clear();
        self.kept_offsets.clear();
        self.kept_offsets.push(0);
        let block = step.width * step.vocab;
        for scores in total.chunks_exact(block) {
            self.heap.clear();
            for (at, &score) in scores.iter().enumerate() {
                let c = Candidate {
                    score,
                    at: at as u32,
                };
                offer(&mut self.heap, c, step.beams);
            }
            self.keep_heap();
        }
    }

    /// [`Generator::candidates_on_host`] with the mask built and the
    /// candidates ranked on `raw`'s device: what comes back is each
    /// request's best `beams` codes and their scores, and the model's
    /// scores where the successor counts correct them.
    fn candidates_on_device(
        &mut self,
        raw: &Tensor,
        snapshot: &Snapshot,
        requests: &[Request<'_>],
        opts: &SearchOptions,
        step: Step,
    ) -> Result<(), ModelError> {
        let device = raw.device();
        if !self.tables.as_ref().is_some_and(|t| t.matches(snapshot)) {
            self.tables = Some(DeviceTables::build(snapshot, device)?);
        }
        let tables = self.tables.as_ref().expect("built above");
        let (s, vocab) = (requests.len(), step.vocab);
        let (rows, block) = (s * step.width, step.width * vocab);
        let nodes = Tensor::from_slice(&self.beams.dnodes, rows, device)?;
        let mut total = raw.add(&tables.mask(step.level, &nodes)?)?.flatten_all()?;
        self.filter(requests, opts, step);
        if !self.blocked.is_empty() {
            let n = self.blocked.len();
            let at = Tensor::from_slice(&self.blocked, n, device)?;
            total = total.index_add(&at, &Tensor::full(f32::NEG_INFINITY, n, device)?, 0)?;
        }

        self.fix_at.clear();
        let fix_at = &mut self.fix_at;
        each_fix(
            &self.mixes,
            &self.beams.spans,
            &self.succ,
            step,
            |_, at, _, _| fix_at.push(at as u32),
        );
        let values = if self.fix_at.is_empty() {
            Vec::new()
        } else {
            let at = Tensor::from_slice(&self.fix_at, self.fix_at.len(), device)?;
            total.index_select(&at, 0)?.to_vec1::<f32>()?
        };
        let mut next = values.iter();
        self.mix(step, |_| *next.next().expect("one score per position"));

        // A request's best `beams` of the mixture are among its best
        // `beams` before it and its corrected candidates: the mixture only
        // lifts the corrected ones, so anything below the first `beams`
        // stays below them.
        let want = step.beams.min(block);
        if want > MAX_TOP_K {
            // Beams this wide (an exhaustive search) are ranked on the host.
            let mut total = total.to_vec1::<f32>()?;
            self.rank_on_host(&mut total, step);
            return Ok(());
        }
        // Each beam's best `per_beam` codes, then each request's best
        // `want` of those.
        let per_beam = want.min(vocab);
        let (scores, codes) = top_k(&total.reshape((rows, vocab))?, per_beam)?;
        let (scores, picked) = top_k(&scores.reshape((s, step.width * per_beam))?, want)?;
        let codes = codes
            .reshape((s, step.width * per_beam))?
            .gather(&picked, 1)?
            .flatten_all()?
            .to_vec1::<u32>()?;
        let scores = scores.flatten_all()?.to_vec1::<f32>()?;
        let picked = picked.flatten_all()?.to_vec1::<u32>()?;

        self.kept.clear();
        self.kept_offsets.clear();
        self.kept_offsets.push(0);
        for r in 0..s {
            self.heap.clear();
            let fixes = &self.fixes[self.fix_offsets[r]..self.fix_offsets[r + 1]];
            for j in r * want..(r + 1) * want {
                let at = (picked[j] as usize / per_beam * vocab + codes[j] as usize) as u32;
                let flat = (r * block) as u32 + at;
                if fixes.binary_search_by_key(&flat, |f| f.at).is_err() {
                    let c = Candidate {
                        score: scores[j],
                        at,
                    };
                    offer(&mut self.heap, c, step.beams);
                }
            }
            for f in fixes {
                let c = Candidate {
                    score: f.score,
                    at: f.at - (r * block) as u32,
                };
                offer(&mut self.heap, c, step.beams);
            }
            self.keep_heap();
        }
        Ok(())
    }

    /// Lists in `blocked` every score position (beam row × vocab + code)
    /// that a request's filter or, when asked, its history rules out at
    /// this step.
    fn filter(&mut self, requests: &[Request<'_>], opts: &SearchOptions, step: Step) {
        self.blocked.clear();
        let (level, vocab) = (step.level, step.vocab);
        let last = level + 1 == self.model.config().levels();
        for (r, req) in requests.iter().enumerate() {
            let filter = req.filter;
            let history = opts.exclude_history && last;
            if filter.is_none() && !history {
                continue;
            }
            let rows = r * step.width..(r + 1) * step.width;
            for (i, beam) in rows.clone().zip(&self.beams.codes[rows]) {
                let prefix = &beam[..level];
                let row = (i * vocab) as u32;
                if let Some(f) = filter {
                    if let Some(allow) = &f.allow {
                        self.allowed.clear();
                        self.allowed.resize(vocab, false);
                        for sid in with_prefix(allow, prefix) {
                            self.allowed[usize::from(sid.codes()[level])] = true;
                        }
                        let denied = (0..vocab as u32).filter(|&c| !self.allowed[c as usize]);
                        self.blocked.extend(denied.map(|c| row + c));
                    }
                    if last {
                        let denied = with_prefix(&f.deny, prefix).iter();
                        self.blocked
                            .extend(denied.map(|sid| row + u32::from(sid.last())));
                    }
                }
                if history {
                    let seen = req.history.iter().filter(|sid| sid.prefix() == prefix);
                    self.blocked
                        .extend(seen.map(|sid| row + u32::from(sid.last())));
                }
            }
        }
    }

    /// Appends the heap's candidates to `kept`, best first, as the next
    /// request's.
    fn keep_heap(&mut self) {
        let start = self.kept.len();
        self.kept.extend(self.heap.drain());
        self.kept[start..].sort_unstable();
        self.kept_offsets.push(self.kept.len());
    }

    /// Gives every live candidate that leads to successors its share of the
    /// mixture, recording the model's own score (`value` of its position,
    /// asked in [`each_fix`]'s order) and the successors' run.
    fn mix(&mut self, step: Step, mut value: impl FnMut(usize) -> f32) {
        self.fixes.clear();
        self.fix_offsets.clear();
        self.fix_offsets.push(0);
        let (fixes, offsets, cum) = (&mut self.fixes, &mut self.fix_offsets, &self.cum);
        each_fix(
            &self.mixes,
            &self.beams.spans,
            &self.succ,
            step,
            |r, at, (start, end), mix| {
                while offsets.len() <= r {
                    offsets.push(fixes.len());
                }
                let model = value(at);
                if model == f32::NEG_INFINITY {
                    return;
                }
                let share = cum[end as usize] - cum[start as usize];
                fixes.push(Fix {
                    at: at as u32,
                    model,
                    score: log_add_exp(model, share.ln() + mix.bonus),
                    span: (start, end),
                });
            },
        );
        while self.fix_offsets.len() <= self.mixes.len() {
            self.fix_offsets.push(self.fixes.len());
        }
    }

    /// The history transformer over all requests at once.
    fn contexts(
        &self,
        requests: &[Request<'_>],
        device: &Device,
    ) -> Result<(Tensor, Memory), ModelError> {
        let cfg = self.model.config();
        let levels = cfg.levels();
        let len = requests
            .iter()
            .map(|r| r.history.len().min(cfg.max_history))
            .max()
            .unwrap_or(0);
        let mut per_level = vec![Vec::with_capacity(requests.len() * len); levels];
        let mut node_level = vec![Vec::with_capacity(requests.len() * len); levels];
        let mut pads = Vec::with_capacity(requests.len());
        for (r, req) in requests.iter().enumerate() {
            if req.history.is_empty() {
                return Err(ModelError::Request {
                    request: r,
                    why: "empty history: the model needs at least one item".into(),
                });
            }
            let recent = &req.history[req.history.len().saturating_sub(cfg.max_history)..];
            let pad = len - recent.len();
            pads.push(pad);
            for (l, (codes, nodes)) in per_level.iter_mut().zip(&mut node_level).enumerate() {
                codes.extend(std::iter::repeat_n(0u32, pad));
                nodes.extend(std::iter::repeat_n(0u32, pad));
                for sid in recent {
                    let c = sid.codes();
                    if c.len() != levels || usize::from(c[l]) >= cfg.vocab[l] {
                        return Err(ModelError::Request {
                            request: r,
                            why: format!(
                                "history item {sid} does not fit the model's vocabulary {:?}",
                                cfg.vocab
                            ),
                        });
                    }
                    codes.push(u32::from(c[l]));
                    nodes.push(cfg.node_id(c, l));
                }
            }
        }
        let tensors = |v: Vec<Vec<u32>>| {
            v.into_iter()
                .map(|c| Tensor::from_vec(c, requests.len() * len, device))
                .collect::<candle_core::Result<Vec<_>>>()
        };
        let items = ItemTokens {
            codes: tensors(per_level)?,
            nodes: tensors(node_level)?,
            positions: Tensor::from_vec(
                window_positions(&pads, len),
                requests.len() * len,
                device,
            )?,
        };
        let mask = window_mask(&pads, len, device)?;
        Ok(self
            .model
            .contexts(&items, &mask, &pads, (requests.len(), len))?)
    }
}
