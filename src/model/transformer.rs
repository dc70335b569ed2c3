//! The network's tensor code: explicit shapes, no framework layers.
//!
//! Training and serving share every weight and every formula; they differ in
//! two places only. Training uses candle's differentiable layer norm and
//! softmax (the fused ones have no backward pass), and draws dropout masks
//! from a seeded host RNG, because candle's CPU RNG cannot be seeded and the
//! run must be reproducible.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var, D};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::config::{ModelConfig, ModelError};
use super::prefix_scores::{self, prefix_scores};
use super::siblings::Siblings;

const LN_EPS: f32 = 1e-5;
/// Added to attention scores a query must not see. Finite, so that a row
/// with nothing to see (left padding) stays a number instead of NaN.
const MASKED: f32 = -1e9;

enum Init {
    Normal(f32),
    Zeros,
    Ones,
}

/// The list of weights a config implies: names, shapes and initialisation.
fn layout(cfg: &ModelConfig) -> Vec<(String, Vec<usize>, Init)> {
    let d = cfg.d_model;
    let inner = cfg.inner();
    let std = 0.02;
    // GPT-2's scaling: residual branches add up over depth.
    let resid = std / ((2 * (cfg.layers + cfg.decoder_layers)) as f32).sqrt();
    let mut w = Vec::new();
    for (l, &v) in cfg.vocab.iter().enumerate() {
        w.push((format!("emb.{l}"), vec![v, d], Init::Normal(std)));
        w.push((format!("out_bias.{l}"), vec![v], Init::Zeros));
        w.push((
            format!("node.{l}"),
            vec![cfg.node_rows(l), d],
            Init::Normal(std),
        ));
    }
    w.push(("pos".into(), vec![cfg.max_history, d], Init::Normal(std)));
    w.push(("dec_pos".into(), vec![cfg.levels(), d], Init::Normal(std)));
    for i in 0..cfg.decoder_layers {
        let p = format!("dec_blocks.{i}");
        w.push((format!("{p}.lnc.g"), vec![d], Init::Ones));
        w.push((format!("{p}.lnc.b"), vec![d], Init::Zeros));
        w.push((format!("{p}.xq.w"), vec![d, inner], Init::Normal(std)));
        w.push((format!("{p}.xq.b"), vec![inner], Init::Zeros));
        w.push((format!("{p}.xkv.w"), vec![d, 2 * inner], Init::Normal(std)));
        w.push((format!("{p}.xkv.b"), vec![2 * inner], Init::Zeros));
        w.push((format!("{p}.xo.w"), vec![inner, d], Init::Normal(resid)));
        w.push((format!("{p}.xo.b"), vec![d], Init::Zeros));
    }
    let blocks = (0..cfg.layers)
        .map(|i| format!("blocks.{i}"))
        .chain((0..cfg.decoder_layers).map(|i| format!("dec_blocks.{i}")));
    for p in blocks {
        w.push((format!("{p}.ln1.g"), vec![d], Init::Ones));
        w.push((format!("{p}.ln1.b"), vec![d], Init::Zeros));
        w.push((format!("{p}.qkv.w"), vec![d, 3 * inner], Init::Normal(std)));
        w.push((format!("{p}.qkv.b"), vec![3 * inner], Init::Zeros));
        w.push((format!("{p}.out.w"), vec![inner, d], Init::Normal(resid)));
        w.push((format!("{p}.out.b"), vec![d], Init::Zeros));
        w.push((format!("{p}.ln2.g"), vec![d], Init::Ones));
        w.push((format!("{p}.ln2.b"), vec![d], Init::Zeros));
        w.push((format!("{p}.ff1.w"), vec![d, cfg.d_ff], Init::Normal(std)));
        w.push((format!("{p}.ff1.b"), vec![cfg.d_ff], Init::Zeros));
        w.push((format!("{p}.ff2.w"), vec![cfg.d_ff, d], Init::Normal(resid)));
        w.push((format!("{p}.ff2.b"), vec![d], Init::Zeros));
    }
    for p in ["ln_f", "dec_ln"] {
        w.push((format!("{p}.g"), vec![d], Init::Ones));
        w.push((format!("{p}.b"), vec![d], Init::Zeros));
    }
    w
}

/// Weights a config implies, counted without allocating them.
pub fn param_count(cfg: &ModelConfig) -> usize {
    layout(cfg)
        .iter()
        .map(|(_, shape, _)| shape.iter().product::<usize>())
        .sum()
}

/// Standard normal draws by Box–Muller, so initialisation depends on the seed
/// alone and not on a distribution crate's algorithm.
fn normal(rng: &mut ChaCha8Rng, n: usize, std: f32) -> Vec<f32> {
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        let u1: f32 = rng.random_range(f32::MIN_POSITIVE..1.0);
        let u2: f32 = rng.random();
        let r = (-2.0 * u1.ln()).sqrt() * std;
        let t = std::f32::consts::TAU * u2;
        out.push(r * t.cos());
        out.push(r * t.sin());
    }
    out.truncate(n);
    out
}

/// The trainable weights, by name, in a fixed order.
pub struct Params {
    vars: BTreeMap<String, Var>,
}

impl Params {
    /// Fresh weights, drawn on the host from `seed`.
    pub fn init(cfg: &ModelConfig, seed: u64, device: &Device) -> Result<Params, ModelError> {
        cfg.validate()?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut vars = BTreeMap::new();
        for (name, shape, init) in layout(cfg) {
            let n = shape.iter().product();
            let data = match init {
                Init::Normal(std) => normal(&mut rng, n, std),
                Init::Zeros => vec![0.0; n],
                Init::Ones => vec![1.0; n],
            };
            let t = Tensor::from_vec(data, shape, device)?;
            vars.insert(name, Var::from_tensor(&t)?);
        }
        Ok(Params { vars })
    }

    /// Weights from a safetensors file, checked name by name and shape by
    /// shape against `cfg`.
    pub fn load(cfg: &ModelConfig, path: &Path, device: &Device) -> Result<Params, ModelError> {
        cfg.validate()?;
        let mut tensors =
            candle_core::safetensors::load(path, device).map_err(|e| ModelError::Parse {
                path: path.to_path_buf(),
                why: e.to_string(),
            })?;
        let mut vars = BTreeMap::new();
        for (name, shape, _) in layout(cfg) {
            let err = |why: String| ModelError::Weights {
                path: path.to_path_buf(),
                name: name.clone(),
                why,
            };
            let t = tensors.remove(&name).ok_or_else(|| err("missing".into()))?;
            if t.dims() != shape.as_slice() {
                return Err(err(format!(
                    "shape {:?}, config says {:?}",
                    t.dims(),
                    shape
                )));
            }
            if t.dtype() != DType::F32 {
                return Err(err(format!("dtype {:?}, expected f32", t.dtype())));
            }
            vars.insert(name, Var::from_tensor(&t)?);
        }
        if let Some(name) = tensors.keys().next() {
            return Err(ModelError::Weights {
                path: path.to_path_buf(),
                name: name.clone(),
                why: "not part of this config (wrong config.json?)".into(),
            });
        }
        Ok(Params { vars })
    }

    pub fn save(&self, path: &Path) -> Result<(), ModelError> {
        let map: std::collections::HashMap<String, Tensor> = self
            .vars
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect();
        candle_core::safetensors::save(&map, path).map_err(|e| ModelError::Parse {
            path: path.to_path_buf(),
            why: e.to_string(),
        })
    }

    pub fn vars(&self) -> impl Iterator<Item = (&str, &Var)> {
        self.vars.iter().map(|(k, v)| (k.as_str(), v))
    }

    pub fn count(&self) -> usize {
        self.vars.values().map(|v| v.elem_count()).sum()
    }

    fn get(&self, name: &str) -> Tensor {
        self.vars[name].as_tensor().clone()
    }

    /// The network over these weights. In training the model's tensors are
    /// the variables themselves, so gradients reach them.
    pub fn model(&self, cfg: &ModelConfig) -> Result<Model, ModelError> {
        let norm = |p: &str| Norm {
            g: self.get(&format!("{p}.g")),
            b: self.get(&format!("{p}.b")),
        };
        let linear = |p: &str| Linear {
            w: self.get(&format!("{p}.w")),
            b: self.get(&format!("{p}.b")),
        };
        let block = |p: String, cross: bool| Block {
            ln1: norm(&format!("{p}.ln1")),
            qkv: linear(&format!("{p}.qkv")),
            out: linear(&format!("{p}.out")),
            cross: cross.then(|| Cross {
                ln: norm(&format!("{p}.lnc")),
                q: linear(&format!("{p}.xq")),
                kv: linear(&format!("{p}.xkv")),
                out: linear(&format!("{p}.xo")),
            }),
            ln2: norm(&format!("{p}.ln2")),
            ff1: linear(&format!("{p}.ff1")),
            ff2: linear(&format!("{p}.ff2")),
        };
        let emb: Vec<Tensor> = (0..cfg.levels())
            .map(|l| self.get(&format!("emb.{l}")))
            .collect();
        let node0 = self.get("node.0");
        let emb_t = emb
            .iter()
            .enumerate()
            .map(|(l, e)| output_rows(cfg, l, e, &node0)?.t()?.contiguous())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let dec_pos = self.get("dec_pos");
        let dec_pos_rows = (0..cfg.levels())
            .map(|l| dec_pos.narrow(0, l, 1))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Model {
            cfg: cfg.clone(),
            node: (0..cfg.levels())
                .map(|l| self.get(&format!("node.{l}")))
                .collect(),
            emb,
            emb_t,
            out_bias: (0..cfg.levels())
                .map(|l| self.get(&format!("out_bias.{l}")))
                .collect(),
            pos: self.get("pos"),
            dec_pos,
            dec_pos_rows,
            blocks: (0..cfg.layers)
                .map(|i| block(format!("blocks.{i}"), false))
                .collect(),
            ln_f: norm("ln_f"),
            dec_blocks: (0..cfg.decoder_layers)
                .map(|i| block(format!("dec_blocks.{i}"), true))
                .collect(),
            dec_ln: norm("dec_ln"),
        })
    }
}

struct Linear {
    /// `[in, out]`, so a forward pass is one matmul without a transpose.
    w: Tensor,
    b: Tensor,
}

impl Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.matmul(&self.w)?.broadcast_add(&self.b)
    }
}

struct Norm {
    g: Tensor,
    b: Tensor,
}

impl Norm {
    fn forward(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        if train {
            candle_nn::ops::layer_norm_slow(x, &self.g, &self.b, LN_EPS)
        } else {
            candle_nn::ops::layer_norm(x, &self.g, &self.b, LN_EPS)
        }
    }
}

struct Block {
    ln1: Norm,
    qkv: Linear,
    out: Linear,
    /// The SID decoder's attention to the history transformer's outputs.
    cross: Option<Cross>,
    ln2: Norm,
    ff1: Linear,
    ff2: Linear,
}

struct Cross {
    ln: Norm,
    q: Linear,
    kv: Linear,
    out: Linear,
}

/// The history as the SID decoder's cross-attention reads it, computed once
/// per request and shared by all its beams: per decoder block, keys and
/// values `[requests, heads, len, head_dim]`, and an additive mask
/// `[requests, 1, queries or 1, len]` hiding left padding (and, in
/// training, the positions after each query's own).
pub(crate) struct Memory {
    keys: Vec<Tensor>,
    values: Vec<Tensor>,
    mask: Tensor,
}

/// Where a forward pass gets its dropout masks; `None` at serving time.
pub struct Dropout {
    p: f32,
    rng: ChaCha8Rng,
    scratch: Vec<f32>,
}

impl Dropout {
    pub fn new(p: f32, seed: u64) -> Dropout {
        Dropout {
            p,
            rng: ChaCha8Rng::seed_from_u64(seed),
            scratch: Vec::new(),
        }
    }

    /// Inverted dropout with a host-drawn mask: 16 bits of randomness per
    /// element, four elements per draw, which keeps mask generation a small
    /// fraction of a training step.
    fn apply(&mut self, x: &Tensor) -> candle_core::Result<Tensor> {
        if self.p == 0.0 {
            return Ok(x.clone());
        }
        let n = x.elem_count();
        let threshold = (self.p * 65536.0) as u32;
        let keep = 1.0 / (1.0 - threshold as f32 / 65536.0);
        self.scratch.clear();
        while self.scratch.len() < n {
            let r: u64 = self.rng.random();
            for k in 0..4 {
                let bits = ((r >> (16 * k)) & 0xffff) as u32;
                self.scratch.push(if bits < threshold { 0.0 } else { keep });
            }
        }
        self.scratch.truncate(n);
        let mask = Tensor::from_slice(&self.scratch, x.shape(), x.device())?;
        x * mask
    }
}

/// A training batch: `batch` windows of `len` items, left-padded.
pub struct TrainBatch {
    /// The items of every position, `[batch * len]` per level (0 at padding).
    pub items: ItemTokens,
    /// Additive attention mask, `[batch, 1, len, len]`: causal and padding.
    pub mask: Tensor,
    pub batch: usize,
    pub len: usize,
    /// Flat positions (`b * len + t`) that have a next item to predict.
    pub positions: Tensor,
    /// Per level, the next item's code at each of `positions`.
    pub targets: Vec<Tensor>,
    /// The next item of every position (zeros where there is none), which
    /// the SID decoder reads as its inputs after the first.
    pub next: ItemTokens,
    /// `[batch, 1, len * levels, len]`: the decoder tokens of position `t`
    /// see the history up to `t`.
    pub cross_mask: Tensor,
    /// Per level, for prefix-scored levels after the first
    /// ([`ModelConfig::prefix_scored`]): each target's prefix row at the
    /// level before, `[positions]`.
    pub parents: Vec<Option<Tensor>>,
    /// Per level, for sibling-scored levels ([`ModelConfig::sibling_scored`]):
    /// the children of each target's parent.
    pub siblings: Vec<Option<Siblings>>,
}

/// Items as the model reads them: per level, the code and the row of the
/// prefix ending at that level ([`ModelConfig::node_id`]).
pub struct ItemTokens {
    pub codes: Vec<Tensor>,
    pub nodes: Vec<Tensor>,
    /// Each item's place in its window, counted from the window's oldest
    /// item. Counting from the start, not from the newest item, gives a
    /// prediction inside a training window the same positions as serving
    /// the same history alone, so training and serving compute the same
    /// function.
    pub positions: Tensor,
}

/// [`ItemTokens::positions`] for left-padded windows (0 at padding).
pub(crate) fn window_positions(pads: &[usize], len: usize) -> Vec<u32> {
    let mut out = Vec::with_capacity(pads.len() * len);
    for &pad in pads {
        out.extend(std::iter::repeat_n(0, pad));
        out.extend(0..(len - pad) as u32);
    }
    out
}

/// The network. Cheap to build from [`Params`]; holds no mutable state.
pub struct Model {
    cfg: ModelConfig,
    /// Per level, the prefix ("trie node") embeddings.
    node: Vec<Tensor>,
    emb: Vec<Tensor>,
    /// The output layer at serving time, transposed once: `emb`, with the
    /// prefix rows added at level 0 when that level is prefix-scored (its
    /// prefixes are its codes).
    emb_t: Vec<Tensor>,
    out_bias: Vec<Tensor>,
    pos: Tensor,
    dec_pos: Tensor,
    dec_pos_rows: Vec<Tensor>,
    blocks: Vec<Block>,
    ln_f: Norm,
    dec_blocks: Vec<Block>,
    dec_ln: Norm,
}

impl Model {
    /// Loads `config.json` and `model.safetensors` from `dir`.
    pub fn load(dir: &Path, device: &Device) -> Result<(ModelConfig, Model), ModelError> {
        let cfg = ModelConfig::load(dir)?;
        let params = Params::load(&cfg, &dir.join(super::WEIGHTS_FILE), device)?;
        let model = params.model(&cfg)?;
        Ok((cfg, model))
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        self.pos.device()
    }

    /// Self-attention of `y` (`[batch, len, d]`, normed), returning
    /// `[batch * len, d]`. With a cache, `len` is 1 and the step is at
    /// `level`: its key and value are written there and it attends to the
    /// levels up to its own, causal by construction.
    fn self_attend(
        &self,
        block: &Block,
        y: &Tensor,
        mask: Option<&Tensor>,
        cache: Option<CacheLayer<'_>>,
        train: bool,
    ) -> candle_core::Result<Tensor> {
        let (b, t, d) = y.dims3()?;
        let (h, hd) = (self.cfg.heads, self.cfg.head_dim);
        let qkv = block
            .qkv
            .forward(&y.reshape((b * t, d))?)?
            .reshape((b, t, 3, h, hd))?;
        let part = |i: usize| {
            qkv.narrow(2, i, 1)?
                .squeeze(2)?
                .transpose(1, 2)?
                .contiguous()
        };
        let (q, mut k, mut v) = (part(0)?, part(1)?, part(2)?);
        if let Some(CacheLayer {
            keys,
            values,
            level,
        }) = cache
        {
            keys.slice_set(&k, 2, level)?;
            values.slice_set(&v, 2, level)?;
            k = keys.narrow(2, 0, level + 1)?;
            v = values.narrow(2, 0, level + 1)?;
        }
        let o = attention(&q, &k, &v, mask, train)?
            .transpose(1, 2)?
            .reshape((b * t, h * hd))?;
        block.out.forward(&o)
    }

    /// Cross-attention of `x` (`[groups * queries, d]`) to the history in
    /// `memory` (one group per request), returning `[groups * queries, d]`.
    fn cross_attend(
        &self,
        cross: &Cross,
        x: &Tensor,
        memory: MemoryLayer<'_>,
        train: bool,
    ) -> candle_core::Result<Tensor> {
        let (h, hd) = (self.cfg.heads, self.cfg.head_dim);
        let groups = memory.keys.dim(0)?;
        let queries = x.dim(0)? / groups;
        let q = cross
            .q
            .forward(&cross.ln.forward(x, train)?)?
            .reshape((groups, queries, h, hd))?
            .transpose(1, 2)?
            .contiguous()?;
        let o = attention(&q, memory.keys, memory.values, Some(memory.mask), train)?
            .transpose(1, 2)?
            .reshape((groups * queries, h * hd))?;
        cross.out.forward(&o)
    }

    /// One pre-norm block over `x` (`[batch * len, d]`): self-attention
    /// (through `cache` when decoding step by step), cross-attention to
    /// `memory` in the SID decoder's blocks, and the feed-forward layer,
    /// each with dropout when training.
    #[allow(clippy::too_many_arguments)]
    fn block(
        &self,
        block: &Block,
        x: Tensor,
        (b, t): (usize, usize),
        mask: Option<&Tensor>,
        cache: Option<CacheLayer<'_>>,
        memory: Option<MemoryLayer<'_>>,
        mut dropout: Option<&mut Dropout>,
    ) -> candle_core::Result<Tensor> {
        let train = dropout.is_some();
        let mut drop = |y: Tensor| match dropout.as_deref_mut() {
            Some(d) => d.apply(&y),
            None => Ok(y),
        };
        let y = block
            .ln1
            .forward(&x, train)?
            .reshape((b, t, self.cfg.d_model))?;
        let mut x = (&x + drop(self.self_attend(block, &y, mask, cache, train)?)?)?;
        if let (Some(cross), Some(memory)) = (&block.cross, memory) {
            x = (&x + drop(self.cross_attend(cross, &x, memory, train)?)?)?;
        }
        let y = block.ln2.forward(&x, train)?;
        let f = block.ff2.forward(&block.ff1.forward(&y)?.relu()?)?;
        x + drop(f)?
    }

    /// The SID decoder over `z` (`[batch * len, d]`, `len` levels per
    /// sequence), reading the history in `memory`; with a cache, one step
    /// at `level` (`len` 1). Returns the normed outputs.
    fn decode(
        &self,
        mut z: Tensor,
        shape: (usize, usize),
        mask: Option<&Tensor>,
        memory: &Memory,
        mut cache: Option<(&mut DecoderCache, usize)>,
        mut dropout: Option<&mut Dropout>,
    ) -> candle_core::Result<Tensor> {
        let train = dropout.is_some();
        for (i, block) in self.dec_blocks.iter().enumerate() {
            let layer = cache.as_mut().map(|(c, level)| CacheLayer {
                keys: &mut c.keys[i],
                values: &mut c.values[i],
                level: *level,
            });
            let memory = MemoryLayer {
                keys: &memory.keys[i],
                values: &memory.values[i],
                mask: &memory.mask,
            };
            z = self.block(
                block,
                z,
                shape,
                mask,
                layer,
                Some(memory),
                dropout.as_deref_mut(),
            )?;
        }
        self.dec_ln.forward(&z, train)
    }

    /// The history as every decoder block's cross-attention reads it, from
    /// the history transformer's outputs `h` (`[batch * len, d]`).
    fn memory(
        &self,
        h: &Tensor,
        (b, t): (usize, usize),
        mask: Tensor,
    ) -> candle_core::Result<Memory> {
        let (heads, hd) = (self.cfg.heads, self.cfg.head_dim);
        let mut keys = Vec::with_capacity(self.dec_blocks.len());
        let mut values = Vec::with_capacity(self.dec_blocks.len());
        for block in &self.dec_blocks {
            let cross = block.cross.as_ref().expect("decoder blocks cross-attend");
            let kv = cross.kv.forward(h)?.reshape((b, t, 2, heads, hd))?;
            let part = |i: usize| {
                kv.narrow(2, i, 1)?
                    .squeeze(2)?
                    .transpose(1, 2)?
                    .contiguous()
            };
            keys.push(part(0)?);
            values.push(part(1)?);
        }
        Ok(Memory { keys, values, mask })
    }

    /// Level `level`'s logits for decoder outputs `z` (`[rows, d]`): the
    /// codes' output rows, the prefix rows of the children of each row's
    /// `parents` at prefix-scored levels after the first, and the live
    /// children in `siblings` at sibling-scored levels.
    fn logits(
        &self,
        level: usize,
        z: &Tensor,
        parents: Option<&Tensor>,
        siblings: Option<&Siblings>,
        train: bool,
    ) -> candle_core::Result<Tensor> {
        // Training reads the variables as they are now; serving the
        // transposed copy made when the model was built.
        let out = if train {
            z.matmul(&output_rows(&self.cfg, level, &self.emb[level], &self.node[0])?.t()?)?
        } else {
            z.matmul(&self.emb_t[level])?
        };
        let mut logits = out.broadcast_add(&self.out_bias[level])?;
        if let Some(parents) = parents {
            let (table, vocab) = (&self.node[level], self.cfg.vocab[level]);
            let scores = if train {
                prefix_scores::gathered(z, table, parents, vocab)?
            } else {
                prefix_scores(z, table, parents, vocab)?
            };
            logits = (logits + scores)?;
        }
        if let Some(siblings) = siblings {
            logits = self.add_sibling_logits(level, logits, z, siblings)?;
        }
        Ok(logits)
    }

    /// One level's share of an item's input vector: its code's embedding
    /// plus its prefix's.
    fn embed_level(
        &self,
        level: usize,
        codes: &Tensor,
        nodes: &Tensor,
    ) -> candle_core::Result<Tensor> {
        self.emb[level].index_select(codes, 0)? + self.node[level].index_select(nodes, 0)?
    }

    /// Item input vectors: the sum over levels.
    fn embed_items(&self, items: &ItemTokens) -> candle_core::Result<Tensor> {
        let mut x = self.embed_level(0, &items.codes[0], &items.nodes[0])?;
        for l in 1..self.cfg.levels() {
            x = (x + self.embed_level(l, &items.codes[l], &items.nodes[l])?)?;
        }
        Ok(x)
    }

    /// The history transformer over left-padded windows, `[batch * len, d]`.
    fn history(
        &self,
        items: &ItemTokens,
        mask: &Tensor,
        (b, t): (usize, usize),
        mut dropout: Option<&mut Dropout>,
    ) -> candle_core::Result<Tensor> {
        let d = self.cfg.d_model;
        let train = dropout.is_some();
        let mut x = (self.embed_items(items)? + self.pos.index_select(&items.positions, 0)?)?;
        debug_assert_eq!(x.dims(), &[b * t, d]);
        if let Some(dr) = dropout.as_deref_mut() {
            x = dr.apply(&x)?;
        }
        for block in &self.blocks {
            x = self.block(
                block,
                x,
                (b, t),
                Some(mask),
                None,
                None,
                dropout.as_deref_mut(),
            )?;
        }
        self.ln_f.forward(&x, train)
    }

    /// Level `level`'s `logits` (`[rows, vocab]`) with each row of `z`
    /// (`[rows, d]`) scored against the prefix rows of the children its row
    /// of `siblings` lists, added at those children's codes.
    fn add_sibling_logits(
        &self,
        level: usize,
        logits: Tensor,
        z: &Tensor,
        siblings: &Siblings,
    ) -> candle_core::Result<Tensor> {
        let (rows, vocab) = logits.dims2()?;
        let (width, d) = (siblings.nodes.dim(1)?, z.dim(1)?);
        let children = self.node[level]
            .index_select(&siblings.nodes.flatten_all()?, 0)?
            .reshape((rows, width, d))?;
        let scores = z
            .unsqueeze(1)?
            .matmul(&children.transpose(1, 2)?)?
            .squeeze(1)?
            .mul(&siblings.weight)?
            .flatten_all()?;
        logits
            .flatten_all()?
            .index_add(&siblings.slots, &scores, 0)?
            .reshape((rows, vocab))
    }

    /// Mean training loss over a batch: the negative log-likelihood of each
    /// next item's SID, summed over levels (nats per item).
    ///
    /// The SID decoder runs at every position of every window, so its
    /// cross-attention is one batched product per window; positions without
    /// a next item (padding) are dropped before the loss.
    pub fn train_loss(
        &self,
        batch: &TrainBatch,
        dropout: &mut Dropout,
    ) -> candle_core::Result<Tensor> {
        let (b, t, d, levels) = (batch.batch, batch.len, self.cfg.d_model, self.cfg.levels());
        let h = self.history(&batch.items, &batch.mask, (b, t), Some(dropout))?;
        let mut inputs = vec![h.clone()];
        for l in 0..levels - 1 {
            inputs.push(self.embed_level(l, &batch.next.codes[l], &batch.next.nodes[l])?);
        }
        let z = Tensor::stack(&inputs, 1)?.broadcast_add(&self.dec_pos)?;
        let z = dropout.apply(&z.reshape((b * t * levels, d))?)?;
        let memory = self.memory(&h, (b, t), batch.cross_mask.clone())?;
        let causal = causal_mask(levels, self.device())?;
        let z = self
            .decode(
                z,
                (b * t, levels),
                Some(&causal),
                &memory,
                None,
                Some(dropout),
            )?
            .reshape((b * t, levels, d))?
            .index_select(&batch.positions, 0)?;
        let mut loss: Option<Tensor> = None;
        for l in 0..levels {
            let zl = z.narrow(1, l, 1)?.squeeze(1)?;
            let logits = self.logits(
                l,
                &zl,
                batch.parents[l].as_ref(),
                batch.siblings[l].as_ref(),
                true,
            )?;
            let ce = candle_nn::loss::cross_entropy(&logits, &batch.targets[l])?;
            loss = Some(match loss {
                None => ce,
                Some(acc) => (acc + ce)?,
            });
        }
        Ok(loss.expect("at least one level"))
    }

    /// Context vectors for serving: the history transformer's output after
    /// each request's most recent item, `[requests, d]`; and the whole
    /// history as the decoder's cross-attention reads it.
    pub(crate) fn contexts(
        &self,
        items: &ItemTokens,
        mask: &Tensor,
        pads: &[usize],
        shape: (usize, usize),
    ) -> candle_core::Result<(Tensor, Memory)> {
        let (b, t) = shape;
        let h = self.history(items, mask, shape, None)?;
        let last = h
            .reshape((b, t, self.cfg.d_model))?
            .narrow(1, t - 1, 1)?
            .squeeze(1)?;
        let data: Vec<f32> = pads
            .iter()
            .flat_map(|&p| (0..t).map(move |j| if j >= p { 0.0 } else { MASKED }))
            .collect();
        let mask = Tensor::from_vec(data, (b, 1, 1, t), self.device())?;
        Ok((last, self.memory(&h, shape, mask)?))
    }

    /// The SID decoder's first input: the context.
    pub(crate) fn decoder_start(&self, context: &Tensor) -> candle_core::Result<Tensor> {
        context.broadcast_add(&self.dec_pos_rows[0])
    }

    /// The SID decoder's input at `level` (≥ 1): the code chosen at the
    /// previous level and the prefix it completes.
    pub(crate) fn decoder_input(
        &self,
        level: usize,
        codes: &Tensor,
        nodes: &Tensor,
    ) -> candle_core::Result<Tensor> {
        self.embed_level(level - 1, codes, nodes)?
            .broadcast_add(&self.dec_pos_rows[level])
    }

    /// One SID-decoder step for `x` (`[rows, d]`) at `level`, reading and
    /// extending `cache`; returns log-probabilities over the level's codes.
    /// `parents`, for prefix-scored levels after the first, are the rows'
    /// prefix rows at the level before ([`prefix_scores`]);
    /// `siblings`, for sibling-scored levels, the rows' live children.
    pub(crate) fn decoder_step(
        &self,
        x: &Tensor,
        level: usize,
        cache: &mut DecoderCache,
        memory: &Memory,
        parents: Option<&Tensor>,
        siblings: Option<&Siblings>,
    ) -> candle_core::Result<Tensor> {
        let rows = x.dim(0)?;
        let z = self.decode(
            x.clone(),
            (rows, 1),
            None,
            memory,
            Some((cache, level)),
            None,
        )?;
        let logits = self.logits(level, &z, parents, siblings, false)?;
        candle_nn::ops::log_softmax(&logits, D::Minus1)
    }

    /// A key/value cache for the SID decoder: `rows` sequences of up to one
    /// position per level, allocated once per search.
    pub(crate) fn decoder_cache(&self, rows: usize) -> candle_core::Result<DecoderCache> {
        let shape = (rows, self.cfg.heads, self.cfg.levels(), self.cfg.head_dim);
        let zeros = || Tensor::zeros(shape, DType::F32, self.device());
        Ok(DecoderCache {
            keys: (0..self.cfg.decoder_layers)
                .map(|_| zeros())
                .collect::<Result<_, _>>()?,
            values: (0..self.cfg.decoder_layers)
                .map(|_| zeros())
                .collect::<Result<_, _>>()?,
        })
    }
}

/// Level `level`'s output rows: its code embeddings `emb`, plus the prefix
/// rows `node0` at level 0 when that level is prefix-scored (its prefixes
/// are its codes).
fn output_rows(
    cfg: &ModelConfig,
    level: usize,
    emb: &Tensor,
    node0: &Tensor,
) -> candle_core::Result<Tensor> {
    if level == 0 && cfg.prefix_scored(0) {
        emb + node0
    } else {
        Ok(emb.clone())
    }
}

/// Scaled dot-product attention of `q` (`[b, heads, queries, head_dim]`) to
/// `k` and `v` (`[b, heads, keys, head_dim]`) under an additive `mask`.
fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    train: bool,
) -> candle_core::Result<Tensor> {
    let scale = 1.0 / (q.dim(D::Minus1)? as f64).sqrt();
    let mut scores = (q.matmul(&k.t()?)? * scale)?;
    if let Some(mask) = mask {
        scores = scores.broadcast_add(mask)?;
    }
    // Training needs the differentiable softmax; serving the fused one.
    let p = if train {
        candle_nn::ops::softmax(&scores, D::Minus1)?
    } else {
        candle_nn::ops::softmax_last_dim(&scores)?
    };
    p.matmul(v)
}

/// One decoder block's view of a [`Memory`].
#[derive(Clone, Copy)]
struct MemoryLayer<'a> {
    keys: &'a Tensor,
    values: &'a Tensor,
    mask: &'a Tensor,
}

/// One decoder block's share of a [`DecoderCache`] and the step's level.
struct CacheLayer<'a> {
    keys: &'a mut Tensor,
    values: &'a mut Tensor,
    level: usize,
}

/// The SID decoder's keys and values, `[rows, heads, levels, head_dim]` per
/// block. Beam search reorders the rows after every step so that row `i`
/// always belongs to beam `i`.
pub(crate) struct DecoderCache {
    keys: Vec<Tensor>,
    values: Vec<Tensor>,
}

impl DecoderCache {
    /// Row `i` of the new cache is row `parents[i]` of the old one.
    pub(crate) fn reorder(&mut self, parents: &Tensor) -> candle_core::Result<()> {
        for t in self.keys.iter_mut().chain(self.values.iter_mut()) {
            *t = t.index_select(parents, 0)?;
        }
        Ok(())
    }
}

/// `[1, 1, n, n]` additive causal mask.
pub(crate) fn causal_mask(n: usize, device: &Device) -> candle_core::Result<Tensor> {
    let data: Vec<f32> = (0..n * n)
        .map(|i| if i % n <= i / n { 0.0 } else { MASKED })
        .collect();
    Tensor::from_vec(data, (1, 1, n, n), device)
}

/// `[batch, 1, len, len]` additive mask for left-padded windows: causal, and
/// no query sees padding (a padding query sees only itself).
pub(crate) fn window_mask(
    pads: &[usize],
    len: usize,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let mut data = Vec::with_capacity(pads.len() * len * len);
    for &pad in pads {
        for i in 0..len {
            for j in 0..len {
                let visible = j <= i && (j >= pad || j == i);
                data.push(if visible { 0.0 } else { MASKED });
            }
        }
    }
    Tensor::from_vec(data, (pads.len(), 1, len, len), device)
}
