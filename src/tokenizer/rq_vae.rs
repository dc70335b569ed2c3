//! TIGER's RQ-VAE: an MLP autoencoder whose latent is residual-quantised.
//!
//! The encoder maps a content vector to a small latent (32 values); three
//! codebooks of 256 quantise it residually; the decoder rebuilds the input from
//! the sum of the chosen codewords. The loss is TIGER's:
//!
//! ```text
//! ‖x − dec(ẑ)‖²  +  Σ_levels ‖sg[r_l] − e_l‖² + β ‖r_l − sg[e_l]‖²      (β = 0.25)
//! ```
//!
//! with the straight-through estimator carrying the decoder's gradient past the
//! non-differentiable code choice. Two measures keep codebooks alive: they are
//! initialised by k-means on the initial latents (TIGER), and a code that no
//! item chose during an epoch is restarted on a random residual of that epoch.
//!
//! All tensor code goes through candle's `Device`, so the same training runs on
//! a GPU build. Weights are initialised from a seeded host generator, not
//! candle's, so a run is reproducible on every device.

use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::kmeans::{kmeans, KMeansConfig};
use super::quantize::{Codebook, Dense, Mlp};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RqVaeConfig {
    pub hidden: Vec<usize>,
    pub latent: usize,
    pub levels: usize,
    pub codebook_size: usize,
    pub beta: f64,
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub seed: u64,
}

impl Default for RqVaeConfig {
    /// TIGER's shape: encoder 512-256-128 to a 32-value latent, 3 × 256 codes.
    fn default() -> Self {
        RqVaeConfig {
            hidden: vec![512, 256, 128],
            latent: 32,
            levels: 3,
            codebook_size: 256,
            beta: 0.25,
            epochs: 150,
            batch_size: 1024,
            lr: 1e-3,
            weight_decay: 1e-4,
            seed: 42,
        }
    }
}

/// A trained RQ-VAE, exported to host arrays.
pub struct TrainedRqVae {
    pub encoder: Mlp,
    pub decoder: Mlp,
    pub codebooks: Vec<Codebook>,
    /// Decoder MSE on the training data, per coordinate.
    pub reconstruction_mse: f64,
    /// Codes restarted over the whole run.
    pub restarts: usize,
}

/// Per-epoch figures for the progress display.
pub struct EpochStats {
    pub epoch: usize,
    pub loss: f64,
    pub recon: f64,
    pub used: Vec<usize>,
}

struct Layer {
    w: Var,
    b: Var,
}

struct Net {
    encoder: Vec<Layer>,
    decoder: Vec<Layer>,
    codebooks: Vec<Var>,
}

fn layer(
    inputs: usize,
    outputs: usize,
    rng: &mut ChaCha8Rng,
    device: &Device,
) -> candle_core::Result<Layer> {
    let bound = 1.0 / (inputs as f32).sqrt();
    let w: Vec<f32> = (0..inputs * outputs)
        .map(|_| rng.random_range(-bound..bound))
        .collect();
    let b: Vec<f32> = (0..outputs)
        .map(|_| rng.random_range(-bound..bound))
        .collect();
    Ok(Layer {
        w: Var::from_tensor(&Tensor::from_vec(w, (outputs, inputs), device)?)?,
        b: Var::from_tensor(&Tensor::from_vec(b, outputs, device)?)?,
    })
}

fn mlp(sizes: &[usize], rng: &mut ChaCha8Rng, device: &Device) -> candle_core::Result<Vec<Layer>> {
    sizes
        .windows(2)
        .map(|w| layer(w[0], w[1], rng, device))
        .collect()
}

fn forward(layers: &[Layer], x: &Tensor) -> candle_core::Result<Tensor> {
    let mut h = x.clone();
    for (i, l) in layers.iter().enumerate() {
        h = h
            .matmul(&l.w.as_tensor().t()?)?
            .broadcast_add(l.b.as_tensor())?;
        if i + 1 < layers.len() {
            h = h.relu()?;
        }
    }
    Ok(h)
}

/// Squared distances `[batch, k]` from rows of `r` to the codewords `c`.
fn distances(r: &Tensor, c: &Tensor) -> candle_core::Result<Tensor> {
    let rn = r.sqr()?.sum_keepdim(1)?;
    let cn = c.sqr()?.sum(1)?.unsqueeze(0)?;
    r.matmul(&c.t()?)?
        .affine(-2.0, 0.0)?
        .broadcast_add(&rn)?
        .broadcast_add(&cn)
}

impl Net {
    fn vars(&self) -> Vec<Var> {
        let layers = self.encoder.iter().chain(&self.decoder);
        let mut vars: Vec<Var> = layers.flat_map(|l| [l.w.clone(), l.b.clone()]).collect();
        vars.extend(self.codebooks.iter().cloned());
        vars
    }

    /// One forward pass: `(loss, reconstruction loss, codes per level,
    /// residual entering each level)`.
    #[allow(clippy::type_complexity)]
    fn step(
        &self,
        x: &Tensor,
        beta: f64,
    ) -> candle_core::Result<(Tensor, Tensor, Vec<Vec<u32>>, Vec<Tensor>)> {
        let z = forward(&self.encoder, x)?;
        let mut residual = z.clone();
        let mut quantised = z.zeros_like()?;
        let mut codebook_loss = Tensor::zeros((), DType::F32, x.device())?;
        let mut codes = Vec::with_capacity(self.codebooks.len());
        let mut residuals = Vec::with_capacity(self.codebooks.len());
        for book in &self.codebooks {
            let c = book.as_tensor();
            let idx = distances(&residual.detach(), &c.detach())?.argmin(D::Minus1)?;
            let e = c.index_select(&idx, 0)?;
            let codebook_term = (e.clone() - residual.detach())?.sqr()?.mean_all()?;
            let commitment = (residual.clone() - e.detach())?.sqr()?.mean_all()?;
            codebook_loss = (codebook_loss + codebook_term + (commitment * beta)?)?;
            residuals.push(residual.detach());
            quantised = (quantised + &e)?;
            residual = (residual - e.detach())?;
            codes.push(idx.to_vec1::<u32>()?);
        }
        let straight_through = (&z + (quantised - &z)?.detach())?;
        let recon = (forward(&self.decoder, &straight_through)? - x)?
            .sqr()?
            .mean_all()?;
        let loss = (&recon + codebook_loss)?;
        Ok((loss, recon, codes, residuals))
    }
}

/// Trains on the (normalised) rows of `data`. `on_epoch` sees each epoch's
/// figures (for a progress bar).
pub fn train(
    data: &[f32],
    dim: usize,
    cfg: &RqVaeConfig,
    device: &Device,
    mut on_epoch: impl FnMut(&EpochStats),
) -> candle_core::Result<TrainedRqVae> {
    let n = data.len() / dim;
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let mut enc_sizes = vec![dim];
    enc_sizes.extend(&cfg.hidden);
    enc_sizes.push(cfg.latent);
    let dec_sizes: Vec<usize> = enc_sizes.iter().rev().copied().collect();
    let encoder = mlp(&enc_sizes, &mut rng, device)?;
    let decoder = mlp(&dec_sizes, &mut rng, device)?;
    let x_all = Tensor::from_slice(data, (n, dim), device)?;

    // TIGER initialises the codebooks by k-means on the first latents.
    let z0 = forward(&encoder, &x_all)?.flatten_all()?.to_vec1::<f32>()?;
    let mut residual = z0;
    let mut codebooks = Vec::with_capacity(cfg.levels);
    for level in 0..cfg.levels {
        let km = kmeans(
            &residual,
            cfg.latent,
            &KMeansConfig {
                k: cfg.codebook_size,
                max_iters: 20,
                tol: 1e-4,
                seed: cfg.seed.wrapping_add(100 + level as u64),
            },
            device,
        )?;
        for (row, &a) in residual.chunks_mut(cfg.latent).zip(&km.assignment) {
            let c = &km.centroids[a as usize * cfg.latent..(a as usize + 1) * cfg.latent];
            row.iter_mut().zip(c).for_each(|(r, c)| *r -= c);
        }
        codebooks.push(Var::from_tensor(&Tensor::from_vec(
            km.centroids,
            (cfg.codebook_size, cfg.latent),
            device,
        )?)?);
    }
    let net = Net {
        encoder,
        decoder,
        codebooks,
    };
    let mut opt = AdamW::new(
        net.vars(),
        ParamsAdamW {
            lr: cfg.lr,
            weight_decay: cfg.weight_decay,
            ..Default::default()
        },
    )?;
    let mut order: Vec<u32> = (0..n as u32).collect();
    let mut restarts = 0;
    for epoch in 0..cfg.epochs {
        order.shuffle(&mut rng);
        let mut usage = vec![vec![0usize; cfg.codebook_size]; cfg.levels];
        let (mut loss_sum, mut recon_sum, mut batches) = (0.0, 0.0, 0usize);
        let mut last_residuals = Vec::new();
        for batch in order.chunks(cfg.batch_size) {
            let idx = Tensor::from_slice(batch, batch.len(), device)?;
            let x = x_all.index_select(&idx, 0)?;
            let (loss, recon, codes, residuals) = net.step(&x, cfg.beta)?;
            opt.backward_step(&loss)?;
            loss_sum += f64::from(loss.to_scalar::<f32>()?);
            recon_sum += f64::from(recon.to_scalar::<f32>()?);
            batches += 1;
            for (u, c) in usage.iter_mut().zip(&codes) {
                c.iter().for_each(|&i| u[i as usize] += 1);
            }
            last_residuals = residuals;
        }
        if epoch + 1 < cfg.epochs {
            restarts += restart_dead_codes(&net.codebooks, &usage, &last_residuals, &mut rng)?;
        }
        on_epoch(&EpochStats {
            epoch,
            loss: loss_sum / batches as f64,
            recon: recon_sum / batches as f64,
            used: usage
                .iter()
                .map(|u| u.iter().filter(|&&c| c > 0).count())
                .collect(),
        });
    }

    let (_, recon, _, _) = net.step(&x_all, cfg.beta)?;
    let export = |layers: &[Layer]| -> candle_core::Result<Mlp> {
        let layers = layers
            .iter()
            .map(|l| {
                let (outputs, inputs) = l.w.as_tensor().dims2()?;
                Ok(Dense {
                    inputs,
                    outputs,
                    weight: l.w.as_tensor().flatten_all()?.to_vec1()?,
                    bias: l.b.as_tensor().to_vec1()?,
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Mlp { layers })
    };
    Ok(TrainedRqVae {
        encoder: export(&net.encoder)?,
        decoder: export(&net.decoder)?,
        codebooks: net
            .codebooks
            .iter()
            .map(|c| {
                Ok(Codebook::new(
                    cfg.codebook_size,
                    cfg.latent,
                    c.as_tensor().flatten_all()?.to_vec1()?,
                ))
            })
            .collect::<candle_core::Result<Vec<_>>>()?,
        reconstruction_mse: f64::from(recon.to_scalar::<f32>()?),
        restarts,
    })
}

/// Moves every code no item chose this epoch onto a random residual of the
/// last batch at its level, where it will be chosen again.
fn restart_dead_codes(
    books: &[Var],
    usage: &[Vec<usize>],
    residuals: &[Tensor],
    rng: &mut ChaCha8Rng,
) -> candle_core::Result<usize> {
    let mut restarted = 0;
    for ((book, used), res) in books.iter().zip(usage).zip(residuals) {
        let dead: Vec<usize> = used
            .iter()
            .enumerate()
            .filter(|(_, &c)| c == 0)
            .map(|(i, _)| i)
            .collect();
        if dead.is_empty() {
            continue;
        }
        let (rows, latent) = res.dims2()?;
        let res = res.flatten_all()?.to_vec1::<f32>()?;
        let mut words = book.as_tensor().flatten_all()?.to_vec1::<f32>()?;
        for &d in &dead {
            let r = rng.random_range(0..rows);
            words[d * latent..(d + 1) * latent].copy_from_slice(&res[r * latent..(r + 1) * latent]);
        }
        book.set(&Tensor::from_vec(
            words,
            (used.len(), latent),
            book.device(),
        )?)?;
        restarted += dead.len();
    }
    Ok(restarted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learns_to_reconstruct_clustered_data() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let dim = 16;
        let centres: Vec<Vec<f32>> = (0..8)
            .map(|_| (0..dim).map(|_| rng.random_range(-2.0..2.0)).collect())
            .collect();
        let data: Vec<f32> = (0..512)
            .flat_map(|i| {
                centres[i % 8]
                    .iter()
                    .map(|c| c + 0.05 * rng.random_range(-1.0f32..1.0))
                    .collect::<Vec<_>>()
            })
            .collect();
        let cfg = RqVaeConfig {
            hidden: vec![32],
            latent: 4,
            levels: 2,
            codebook_size: 8,
            epochs: 60,
            batch_size: 128,
            lr: 3e-3,
            ..Default::default()
        };
        let mut first = None;
        let mut last = 0.0;
        let trained = train(&data, dim, &cfg, &Device::Cpu, |s| {
            first.get_or_insert(s.recon);
            last = s.recon;
        })
        .unwrap();
        assert!(
            last < 0.5 * first.unwrap(),
            "reconstruction {first:?} -> {last}"
        );
        assert_eq!(trained.encoder.output_dim(), 4);
        assert_eq!(trained.codebooks.len(), 2);
        // Items from one cluster get one first-level code, different clusters mostly differ.
        let code = |i: usize| {
            let z = trained.encoder.forward(&data[i * dim..(i + 1) * dim]);
            trained.codebooks[0].nearest(&z)
        };
        let agree = (0..64).filter(|&i| code(i) == code(i + 8)).count();
        assert!(agree >= 56, "same-cluster agreement {agree}/64");
    }
}
