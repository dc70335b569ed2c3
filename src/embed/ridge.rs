//! A linear map from content vectors to collaborative ones, by ridge
//! regression.
//!
//! Collaborative item vectors (a factorisation of who interacted with what)
//! separate items better than their content where content is thin (Amazon
//! Toys and Sports carry only attribute ids), but an item nobody has touched
//! has none. The map fitted on the items that have both gives such an item
//! the collaborative vector its content predicts, so it lands among the
//! items people treat alike instead of in one heap of zero vectors.

use nalgebra::{DMatrix, DVector};
use serde::{Deserialize, Serialize};

/// `y ≈ W x + b`, fitted on centred data.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LinearMap {
    inputs: usize,
    outputs: usize,
    /// Row-major `[outputs × inputs]`.
    weight: Vec<f32>,
    bias: Vec<f32>,
    /// The mean target of the fit.
    centre: Vec<f32>,
    /// The root mean square distance of a fitted target from `centre`.
    spread: f32,
}

impl LinearMap {
    /// Fits on the rows `rows` of `x` (`[n × inputs]`) and `y`
    /// (`[n × outputs]`) with penalty `lambda` times the mean diagonal of the
    /// centred Gram matrix, so that `lambda` does not depend on the scale of
    /// the inputs. `None` when `rows` is empty or the system is singular.
    pub fn fit(
        x: &[f32],
        inputs: usize,
        y: &[f32],
        outputs: usize,
        rows: &[usize],
        lambda: f64,
    ) -> Option<LinearMap> {
        if rows.is_empty() || inputs == 0 || outputs == 0 {
            return None;
        }
        let n = rows.len() as f64;
        let mut mx = vec![0.0f64; inputs];
        let mut my = vec![0.0f64; outputs];
        for &r in rows {
            for (m, &v) in mx.iter_mut().zip(&x[r * inputs..(r + 1) * inputs]) {
                *m += v as f64 / n;
            }
            for (m, &v) in my.iter_mut().zip(&y[r * outputs..(r + 1) * outputs]) {
                *m += v as f64 / n;
            }
        }
        let mut gram = DMatrix::<f64>::zeros(inputs, inputs);
        let mut cross = DMatrix::<f64>::zeros(inputs, outputs);
        let mut xc = DVector::<f64>::zeros(inputs);
        let mut yc = DVector::<f64>::zeros(outputs);
        for &r in rows {
            for (i, v) in x[r * inputs..(r + 1) * inputs].iter().enumerate() {
                xc[i] = *v as f64 - mx[i];
            }
            for (j, v) in y[r * outputs..(r + 1) * outputs].iter().enumerate() {
                yc[j] = *v as f64 - my[j];
            }
            gram.ger(1.0, &xc, &xc, 1.0);
            cross.ger(1.0, &xc, &yc, 1.0);
        }
        let spread = (0..rows.len())
            .map(|k| {
                let r = rows[k];
                y[r * outputs..(r + 1) * outputs]
                    .iter()
                    .zip(&my)
                    .map(|(&v, m)| (v as f64 - m).powi(2))
                    .sum::<f64>()
            })
            .sum::<f64>()
            / n;
        let ridge = lambda * gram.trace() / inputs as f64;
        for i in 0..inputs {
            gram[(i, i)] += ridge.max(1e-9);
        }
        let solved = gram.cholesky()?.solve(&cross);
        let mut weight = vec![0.0f32; outputs * inputs];
        let mut bias = vec![0.0f32; outputs];
        for j in 0..outputs {
            let mut b = my[j];
            for i in 0..inputs {
                weight[j * inputs + i] = solved[(i, j)] as f32;
                b -= solved[(i, j)] * mx[i];
            }
            bias[j] = b as f32;
        }
        Some(LinearMap {
            inputs,
            outputs,
            weight,
            bias,
            centre: my.iter().map(|&m| m as f32).collect(),
            spread: spread.sqrt() as f32,
        })
    }

    /// A map from stored parts; `None` unless `weight` is `[outputs ×
    /// inputs]` and `bias` and `centre` have `outputs` values.
    pub fn from_parts(
        inputs: usize,
        outputs: usize,
        weight: Vec<f32>,
        bias: Vec<f32>,
        centre: Vec<f32>,
        spread: f32,
    ) -> Option<LinearMap> {
        let fits = inputs > 0
            && weight.len() == inputs * outputs
            && bias.len() == outputs
            && centre.len() == outputs
            && spread.is_finite();
        fits.then_some(LinearMap {
            inputs,
            outputs,
            weight,
            bias,
            centre,
            spread,
        })
    }

    pub fn inputs(&self) -> usize {
        self.inputs
    }

    pub fn outputs(&self) -> usize {
        self.outputs
    }

    /// Row-major `[outputs × inputs]`.
    pub fn weight(&self) -> &[f32] {
        &self.weight
    }

    pub fn bias(&self) -> &[f32] {
        &self.bias
    }

    pub fn centre(&self) -> &[f32] {
        &self.centre
    }

    pub fn spread(&self) -> f32 {
        self.spread
    }

    /// The unit vector a prediction stands for (collaborative vectors are
    /// directions), its departure from the targets' mean first stretched to
    /// a real target's typical distance. Least squares shrinks a prediction
    /// toward the mean as far as its input says little; normalising a
    /// shrunk vector as it is would put every weakly predicted item on the
    /// mean's own direction, into the same few codes (on Yelp its first code
    /// agreed with the real one's less often than chance).
    pub fn direction(&self, x: &[f32]) -> Vec<f32> {
        let mut out = vec![0.0; self.outputs];
        self.apply(x, &mut out);
        let away = out
            .iter()
            .zip(&self.centre)
            .map(|(v, c)| (v - c) * (v - c))
            .sum::<f32>()
            .sqrt();
        if away > 0.0 {
            let stretch = self.spread / away;
            out.iter_mut()
                .zip(&self.centre)
                .for_each(|(v, c)| *v = c + (*v - c) * stretch);
        }
        let norm = out.iter().map(|v| v * v).sum::<f32>().sqrt();
        if norm > 0.0 {
            out.iter_mut().for_each(|v| *v /= norm);
        }
        out
    }

    /// `W x + b` into `out`.
    pub fn apply(&self, x: &[f32], out: &mut [f32]) {
        debug_assert_eq!((x.len(), out.len()), (self.inputs, self.outputs));
        for ((o, w), b) in out
            .iter_mut()
            .zip(self.weight.chunks_exact(self.inputs))
            .zip(&self.bias)
        {
            *o = b + w.iter().zip(x).map(|(w, x)| w * x).sum::<f32>();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovers_a_linear_map_and_generalises_to_unseen_rows() {
        // y = A x + c for a fixed A, c; fit on 90 rows, check the other 10.
        let (inputs, outputs, n) = (5, 3, 100);
        let a = [
            [1.0, -2.0, 0.0, 0.5, 0.0],
            [0.0, 1.0, 1.0, 0.0, -1.0],
            [3.0, 0.0, 0.0, 0.0, 2.0],
        ];
        let c = [0.5, -1.0, 2.0];
        let mut x = Vec::new();
        let mut y = Vec::new();
        for r in 0..n {
            let row: Vec<f32> = (0..inputs)
                .map(|i| ((r * 7 + i * 13) % 17) as f32 / 8.0 - 1.0)
                .collect();
            for j in 0..outputs {
                y.push(c[j] + (0..inputs).map(|i| a[j][i] * row[i]).sum::<f32>());
            }
            x.extend(row);
        }
        let fit_rows: Vec<usize> = (0..90).collect();
        let map = LinearMap::fit(&x, inputs, &y, outputs, &fit_rows, 1e-8).unwrap();
        let mut out = [0.0; 3];
        for r in 90..n {
            map.apply(&x[r * inputs..(r + 1) * inputs], &mut out);
            for j in 0..outputs {
                assert!((out[j] - y[r * outputs + j]).abs() < 1e-3, "{out:?}");
            }
        }
        assert!(LinearMap::fit(&x, inputs, &y, outputs, &[], 1.0).is_none());
    }
}
