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
        let emb_t = emb
            .iter()
            .enumerate()
            .map(|(l, e)| {
                if l == 0 && cfg.prefix_scored(0) {
                    (e + self.get("node.0"))?.t()?.contiguous()
                } else {
                    e.t()?.contiguous()
                }
            })
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
/// values `[requests, heads, len, head_dim]`, and a `[requests, 1, 1, len]`
/// mask hiding left padding.
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

    /// Self-attention over `x` (`[batch, len, d]`), returning `[batch * len, d]`.
    fn attend(
        &self,
        block: &Block,
        x: &Tensor,
        mask: &Tensor,
        train: bool,
    ) -> candle_core::Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let (h, hd) = (self.cfg.heads, self.cfg.head_dim);
        let qkv = block.qkv.forward(&x.reshape((b * t, d))?)?;
        let qkv = qkv.reshape((b, t, 3, h, hd))?;
        let part = |i: usize| {
            qkv.narrow(2, i, 1)?
                .squeeze(2)?
                .transpose(1, 2)?
                .contiguous()
        };
        let (q, k, v) = (part(0)?, part(1)?, part(2)?);
        let scores = (q.matmul(&k.t()?)? * (1.0 / (hd as f64).sqrt()))?;
        let scores = scores.broadcast_add(mask)?;
        let p = if train {
            candle_nn::ops::softmax(&scores, D::Minus1)?
        } else {
            candle_nn::ops::softmax_last_dim(&scores)?
        };
        let o = p.matmul(&v)?.transpose(1, 2)?.reshape((b * t, h * hd))?;
        block.out.forward(&o)
    }

    fn feed_forward(&self, block: &Block, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let y = block.ln2.forward(x, train)?;
        block.ff2.forward(&block.ff1.forward(&y)?.relu()?)
    }

    /// Keys and values of the history for one decoder block's
    /// cross-attention: `memory` is `[batch * len, d]`.
    fn memory_kv(
        &self,
        cross: &Cross,
        memory: &Tensor,
        (b, t): (usize, usize),
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let (h, hd) = (self.cfg.heads, self.cfg.head_dim);
        let kv = cross.kv.forward(memory)?.reshape((b, t, 2, h, hd))?;
        let part = |i: usize| {
            kv.narrow(2, i, 1)?
                .squeeze(2)?
                .transpose(1, 2)?
                .contiguous()
        };
        Ok((part(0)?, part(1)?))
    }

    /// Cross-attention of `x` (`[b * q, d]`, `q` queries per group) to keys
    /// and values `[b, heads, len, head_dim]`, returning `[b * q, d]`.
    #[allow(clippy::too_many_arguments)]
    fn cross_attend(
        &self,
        cross: &Cross,
        x: &Tensor,
        (b, q): (usize, usize),
        keys: &Tensor,
        values: &Tensor,
        mask: &Tensor,
        train: bool,
    ) -> candle_core::Result<Tensor> {
        let (h, hd) = (self.cfg.heads, self.cfg.head_dim);
        let y = cross.ln.forward(x, train)?;
        let qs = cross
            .q
            .forward(&y)?
            .reshape((b, q, h, hd))?
            .transpose(1, 2)?
            .contiguous()?;
        let scores = (qs.matmul(&keys.t()?)? * (1.0 / (hd as f64).sqrt()))?.broadcast_add(mask)?;
        let p = if train {
            candle_nn::ops::softmax(&scores, D::Minus1)?
        } else {
            candle_nn::ops::softmax_last_dim(&scores)?
        };
        let o = p
            .matmul(values)?
            .transpose(1, 2)?
            .reshape((b * q, h * hd))?;
        cross.out.forward(&o)
    }

    /// One pre-norm block over `x` (`[batch * len, d]`).
    fn block(
        &self,
        block: &Block,
        x: Tensor,
        shape: (usize, usize),
        mask: &Tensor,
        mut dropout: Option<&mut Dropout>,
    ) -> candle_core::Result<Tensor> {
        let train = dropout.is_some();
        let (b, t) = shape;
        let y = block
            .ln1
            .forward(&x, train)?
            .reshape((b, t, self.cfg.d_model))?;
        let mut a = self.attend(block, &y, mask, train)?;
        if let Some(d) = dropout.as_deref_mut() {
            a = d.apply(&a)?;
        }
        let x = (x + a)?;
        let mut f = self.feed_forward(block, &x, train)?;
        if let Some(d) = dropout {
            f = d.apply(&f)?;
        }
        x + f
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
            x = self.block(block, x, (b, t), mask, dropout.as_deref_mut())?;
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
        let mut z = dropout.apply(&z.reshape((b * t * levels, d))?)?;
        let causal = causal_mask(levels, self.device())?;
        for block in &self.dec_blocks {
            let y = block.ln1.forward(&z, true)?.reshape((b * t, levels, d))?;
            let a = dropout.apply(&self.attend(block, &y, &causal, true)?)?;
            z = (z + a)?;
            let cross = block.cross.as_ref().expect("decoder blocks cross-attend");
            let (k, v) = self.memory_kv(cross, &h, (b, t))?;
            let c =
                self.cross_attend(cross, &z, (b, t * levels), &k, &v, &batch.cross_mask, true)?;
            z = (z + dropout.apply(&c)?)?;
            let f = dropout.apply(&self.feed_forward(block, &z, true)?)?;
            z = (z + f)?;
        }
        let z = self
            .dec_ln
            .forward(&z, true)?
            .reshape((b * t, levels, d))?
            .index_select(&batch.positions, 0)?;
        let mut loss: Option<Tensor> = None;
        for l in 0..levels {
            let zl = z.narrow(1, l, 1)?.squeeze(1)?;
            let table = if l == 0 && self.cfg.prefix_scored(0) {
                (&self.emb[0] + &self.node[0])?
            } else {
                self.emb[l].clone()
            };
            let mut logits = zl.matmul(&table.t()?)?.broadcast_add(&self.out_bias[l])?;
            if let Some(parents) = &batch.parents[l] {
                let vocab = self.cfg.vocab[l];
                logits = (logits + prefix_scores::gathered(&zl, &self.node[l], parents, vocab)?)?;
            }
            if let Some(siblings) = &batch.siblings[l] {
                logits = self.add_sibling_logits(l, logits, &zl, siblings)?;
            }
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
        let mut keys = Vec::with_capacity(self.dec_blocks.len());
        let mut values = Vec::with_capacity(self.dec_blocks.len());
        for block in &self.dec_blocks {
            let cross = block.cross.as_ref().expect("decoder blocks cross-attend");
            let (k, v) = self.memory_kv(cross, &h, shape)?;
            keys.push(k);
            values.push(v);
        }
        let data: Vec<f32> = pads
            .iter()
            .flat_map(|&p| (0..t).map(move |j| if j >= p { 0.0 } else { MASKED }))
            .collect();
        let mask = Tensor::from_vec(data, (b, 1, 1, t), self.device())?;
        Ok((last, Memory { keys, values, mask }))
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
        let requests = memory.mask.dim(0)?;
        let rows = x.dim(0)?;
        let (h, hd) = (self.cfg.heads, self.cfg.head_dim);
        let inner = h * hd;
        let mut x = x.clone();
        for (i, block) in self.dec_blocks.iter().enumerate() {
            let y = block.ln1.forward(&x, false)?;
            let qkv = block.qkv.forward(&y)?;
            let q = qkv.narrow(1, 0, inner)?.reshape((rows, h, 1, hd))?;
            let k = qkv.narrow(1, inner, inner)?.reshape((rows, h, 1, hd))?;
            let v = qkv.narrow(1, 2 * inner, inner)?.reshape((rows, h, 1, hd))?;
            cache.keys[i].slice_set(&k.contiguous()?, 2, level)?;
            cache.values[i].slice_set(&v.contiguous()?, 2, level)?;
            let keys = cache.keys[i].narrow(2, 0, level + 1)?;
            let values = cache.values[i].narrow(2, 0, level + 1)?;
            let scores = (q.matmul(&keys.t()?)? * (1.0 / (hd as f64).sqrt()))?;
            let p = candle_nn::ops::softmax_last_dim(&scores)?;
            let o = p.matmul(&values)?.reshape((rows, inner))?;
            x = (x + block.out.forward(&o)?)?;
            // Rows are request-major, so each request's beams form one
            // group of queries against that request's keys.
            let cross = block.cross.as_ref().expect("decoder blocks cross-attend");
            let c = self.cross_attend(
                cross,
                &x,
                (requests, rows / requests),
                &memory.keys[i],
                &memory.values[i],
                &memory.mask,
                false,
            )?;
            x = (x + c)?;
            x = (&x + self.feed_forward(block, &x, false)?)?;
        }
        let z = self.dec_ln.forward(&x, false)?;
        let mut logits = z
            .matmul(&self.emb_t[level])?
            .broadcast_add(&self.out_bias[level])?;
        if let Some(parents) = parents {
            let vocab = self.cfg.vocab[level];
            logits = (logits + prefix_scores(&z, &self.node[level], parents, vocab)?)?;
        }
        if let Some(siblings) = siblings {
            logits = self.add_sibling_logits(level, logits, &z, siblings)?;
        }
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
