//! Adafactor as kohya's scripts and OneTrainer use it for memory (transformers'
//! `Adafactor(lr, relative_step=False, scale_parameter=False, warmup_init=False)`): no first moment;
//! the second moment of a matrix (or of any tensor of rank ≥ 2, over its last two dimensions) kept
//! as row and column means only, so the state is a fraction of AdamW's; the update clipped to RMS
//! 1; decoupled weight decay. The arithmetic follows transformers' `Adafactor.step`.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{D, Tensor, Var};

use super::optimizer::{Optimizer, gradient, restored};
use crate::Result;

/// ε₁, added to the squared gradient.
const EPS: f64 = 1e-30;
/// The exponent of the second-moment decay: β₂ at step t is 1 − t^DECAY_RATE.
const DECAY_RATE: f64 = -0.8;
/// The update's RMS is clipped to this.
const CLIP_THRESHOLD: f64 = 1.0;

/// One parameter's factored (row and column) or full second moment.
#[derive(Debug)]
struct Slot {
    name: String,
    var: Var,
    /// Factored: (row means [.., R], column means [.., C]); else the full moment.
    moments: Vec<Tensor>,
    factored: bool,
}

/// Adafactor over named variables.
#[derive(Debug)]
pub struct Adafactor {
    slots: Vec<Slot>,
    steps: usize,
    lr: f64,
    weight_decay: f64,
}

impl Adafactor {
    /// An optimiser for `params` (name, variable) at learning rate `lr` with decoupled
    /// `weight_decay`; moments zero.
    pub fn new(params: Vec<(String, Var)>, lr: f64, weight_decay: f64) -> Result<Self> {
        let slots = params
            .into_iter()
            .map(|(name, var)| {
                let dims = var.dims().to_vec();
                let factored = dims.len() >= 2;
                let zeros = |shape: Vec<usize>| Tensor::zeros(shape, candle_core::DType::F32, var.device());
                let moments = if factored {
                    let n = dims.len();
                    let col: Vec<usize> = dims[..n - 2].iter().chain(&dims[n - 1..]).copied().collect();
                    vec![zeros(dims[..n - 1].to_vec())?, zeros(col)?]
                } else {
                    vec![zeros(dims)?]
                };
                Ok(Slot { name, var, moments, factored })
            })
            .collect::<Result<_>>()?;
        Ok(Self { slots, steps: 0, lr, weight_decay })
    }

    /// The state names of a slot's moments, transformers' names.
    fn moment_names(slot: &Slot) -> Vec<String> {
        let suffixes: &[&str] = if slot.factored { &["exp_avg_sq_row", "exp_avg_sq_col"] } else { &["exp_avg_sq"] };
        suffixes.iter().map(|s| format!("{}.{s}", slot.name)).collect()
    }
}

/// Root mean square of a tensor's elements.
fn rms(t: &Tensor) -> Result<f64> {
    Ok((t.sqr()?.sum_all()?.to_scalar::<f32>()? as f64 / t.elem_count() as f64).sqrt())
}

impl Optimizer for Adafactor {
    fn steps(&self) -> usize {
        self.steps
    }

    fn set_lr(&mut self, lr: f64) {
        self.lr = lr;
    }

    fn checkpoint_prefix(&self) -> &'static str {
        "adafactor."
    }

    fn state(&self) -> Vec<(String, Tensor)> {
        self.slots.iter().flat_map(|s| Self::moment_names(s).into_iter().zip(s.moments.iter().cloned())).collect()
    }

    fn restore(&mut self, state: &HashMap<String, Tensor>, steps: usize) -> Result<()> {
        for slot in &mut self.slots {
            for (name, moment) in Self::moment_names(slot).into_iter().zip(slot.moments.iter_mut()) {
                *moment = restored(state, &name, moment)?;
            }
        }
        self.steps = steps;
        Ok(())
    }

    fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.steps += 1;
        let beta2 = 1.0 - (self.steps as f64).powf(DECAY_RATE);
        for slot in &mut self.slots {
            let g = gradient(grads, &slot.name, &slot.var)?;
            let squared = (g.sqr()? + EPS)?;
            let update = if slot.factored {
                let row = ((&slot.moments[0] * beta2)? + (squared.mean(D::Minus1)? * (1.0 - beta2))?)?;
                let col = ((&slot.moments[1] * beta2)? + (squared.mean(D::Minus2)? * (1.0 - beta2))?)?;
                // transformers' _approx_sq_grad: rsqrt(row / mean(row)) ⊗ rsqrt(col).
                let r = row.broadcast_div(&row.mean_keepdim(D::Minus1)?)?.sqrt()?.recip()?.unsqueeze(D::Minus1)?;
                let c = col.sqrt()?.recip()?.unsqueeze(D::Minus2)?;
                let update = r.broadcast_mul(&c)?.mul(&g)?;
                slot.moments = vec![row, col];
                update
            } else {
                let full = ((&slot.moments[0] * beta2)? + (squared * (1.0 - beta2))?)?;
                let update = full.sqrt()?.recip()?.mul(&g)?;
                slot.moments = vec![full];
                update
            };
            let clip = (rms(&update)? / CLIP_THRESHOLD).max(1.0);
            let update = ((update / clip)? * self.lr)?;
            let weight = slot.var.as_tensor().detach();
            let decayed =
                if self.weight_decay != 0.0 { (&weight * (1.0 - self.weight_decay * self.lr))? } else { weight };
            slot.var.set(&(decayed - update)?)?;
        }
        Ok(())
    }
}
