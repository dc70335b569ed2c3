//! AdamW with state that can be saved, and the learning-rate schedule.
//!
//! candle-nn's `AdamW` keeps its moments private, so a resumed run would
//! restart them from zero and drift from an uninterrupted one. This one
//! exposes them for checkpoints.

use std::collections::HashMap;
use std::path::Path;

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};

use crate::model::{ModelError, Params};

#[derive(Clone, Debug)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

struct Slot {
    name: String,
    var: Var,
    m: Tensor,
    v: Tensor,
    /// Gains, biases and position tables are not decayed: shrinking them
    /// towards zero is not regularisation.
    decay: bool,
}

pub struct AdamW {
    cfg: AdamWConfig,
    slots: Vec<Slot>,
    step: u64,
}

impl AdamW {
    pub fn new(params: &Params, cfg: AdamWConfig) -> candle_core::Result<AdamW> {
        let slots = params
            .vars()
            .map(|(name, var)| {
                Ok(Slot {
                    name: name.to_string(),
                    var: var.clone(),
                    m: var.zeros_like()?,
                    v: var.zeros_like()?,
                    decay: var.rank() == 2 && name.contains(".w"),
                })
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(AdamW {
            cfg,
            slots,
            step: 0,
        })
    }

    pub fn steps(&self) -> u64 {
        self.step
    }

    pub fn step(&mut self, grads: &GradStore, lr: f64) -> candle_core::Result<()> {
        self.step += 1;
        let c = &self.cfg;
        let bc1 = 1.0 - c.beta1.powi(self.step as i32);
        let bc2 = 1.0 - c.beta2.powi(self.step as i32);
        for s in &mut self.slots {
            let Some(g) = grads.get(s.var.as_tensor()) else {
                continue;
            };
            // Detached, or the moments would hold every step's graph alive.
            let g = g.detach();
            let g = &g;
            s.m = ((&s.m * c.beta1)? + (g * (1.0 - c.beta1))?)?;
            s.v = ((&s.v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let update = ((&s.m / bc1)? / ((&s.v / bc2)?.sqrt()? + c.eps)?)?;
            let theta = s.var.as_tensor().detach();
            let theta = &theta;
            let next = if s.decay {
                ((theta * (1.0 - lr * c.weight_decay))? - (update * lr)?)?
            } else {
                (theta - (update * lr)?)?
            };
            s.var.set(&next)?;
        }
        Ok(())
    }

    /// Moments to a safetensors file, the step count beside them in the
    /// caller's state.
    pub fn save(&self, path: &Path) -> Result<(), ModelError> {
        let mut map = HashMap::new();
        for s in &self.slots {
            map.insert(format!("m.{}", s.name), s.m.clone());
            map.insert(format!("v.{}", s.name), s.v.clone());
        }
        candle_core::safetensors::save(&map, path).map_err(|e| ModelError::Parse {
            path: path.to_path_buf(),
            why: e.to_string(),
        })
    }

    pub fn load(&mut self, path: &Path, step: u64, device: &Device) -> Result<(), ModelError> {
        let mut map =
            candle_core::safetensors::load(path, device).map_err(|e| ModelError::Parse {
                path: path.to_path_buf(),
                why: e.to_string(),
            })?;
        for s in &mut self.slots {
            for (key, slot) in [("m", &mut s.m), ("v", &mut s.v)] {
                let name = format!("{key}.{}", s.name);
                let t = map.remove(&name).ok_or_else(|| ModelError::Weights {
                    path: path.to_path_buf(),
                    name: name.clone(),
                    why: "missing".into(),
                })?;
                if t.dims() != s.var.dims() {
                    return Err(ModelError::Weights {
                        path: path.to_path_buf(),
                        name,
                        why: format!("shape {:?}, the model has {:?}", t.dims(), s.var.dims()),
                    });
                }
                *slot = t;
            }
        }
        self.step = step;
        Ok(())
    }
}

/// Linear warm-up to `peak`, then cosine decay to `floor × peak` at `total`.
#[derive(Clone, Debug)]
pub struct Schedule {
    pub peak: f64,
    pub warmup: u64,
    pub total: u64,
    pub floor: f64,
}

impl Schedule {
    pub fn at(&self, step: u64) -> f64 {
        if step < self.warmup {
            return self.peak * (step + 1) as f64 / self.warmup as f64;
        }
        let span = self.total.saturating_sub(self.warmup).max(1) as f64;
        let t = ((step - self.warmup) as f64 / span).min(1.0);
        let cos = 0.5 * (1.0 + (std::f64::consts::PI * t).cos());
        self.peak * (self.floor + (1.0 - self.floor) * cos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays_to_the_floor() {
        let s = Schedule {
            peak: 1e-3,
            warmup: 100,
            total: 1100,
            floor: 0.1,
        };
        assert!(s.at(0) < s.at(50) && s.at(50) < s.at(99));
        assert!((s.at(100) - 1e-3).abs() < 1e-12);
        assert!(s.at(600) < s.at(100) && s.at(600) > s.at(1100));
        assert!((s.at(1100) - 1e-4).abs() < 1e-12);
        assert!((s.at(5000) - 1e-4).abs() < 1e-12);
    }
}
