//! The optimiser interface of a training run, AdamW with PyTorch's arithmetic (`torch.optim.AdamW`,
//! single-tensor path: decoupled weight decay, bias-corrected moments, ε added to the corrected
//! root) and PyTorch's `clip_grad_norm_`, on named candle variables. Every trainable parameter must
//! receive a gradient: a step that finds one without is an error naming it, since it means a
//! layer's gradient was lost on the way.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use crate::{Error, Result};

/// AdamW's hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// Learning rate.
    pub lr: f64,
    /// β₁ (first-moment decay).
    pub beta1: f64,
    /// β₂ (second-moment decay).
    pub beta2: f64,
    /// ε, added to the bias-corrected root of the second moment.
    pub eps: f64,
    /// Decoupled weight decay (the weight shrinks by lr · weight_decay per step).
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// diffusers' training scripts' defaults: lr 1e-4, β (0.9, 0.999), ε 1e-8, weight decay 1e-2.
    fn default() -> Self {
        Self { lr: 1e-4, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 1e-2 }
    }
}

/// Which optimiser a run uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OptimizerKind {
    /// AdamW (two moments per weight).
    #[default]
    AdamW,
    /// Adafactor (factored second moment, no first: a fraction of AdamW's memory).
    Adafactor,
}

/// What a run needs of an optimiser ([`AdamW`], [`super::adafactor::Adafactor`]).
pub trait Optimizer {
    /// Steps taken so far.
    fn steps(&self) -> usize;
    /// Sets the learning rate of the next steps (schedules).
    fn set_lr(&mut self, lr: f64);
    /// The prefix of its state's names in a checkpoint.
    fn checkpoint_prefix(&self) -> &'static str;
    /// Its state as named tensors, for a checkpoint; [`Self::steps`] goes with them.
    fn state(&self) -> Vec<(String, Tensor)>;
    /// Restores state written by [`Self::state`] after `steps` steps.
    fn restore(&mut self, state: &HashMap<String, Tensor>, steps: usize) -> Result<()>;
    /// One step with the gradients in `grads`.
    fn step(&mut self, grads: &GradStore) -> Result<()>;
}

/// The total gradient norm of `params` in `grads`, and with `max_norm` every gradient scaled by
/// min(1, max_norm / (norm + 1e-6)) (PyTorch's `clip_grad_norm_`).
pub fn clip_grad_norm(params: &[(String, Var)], grads: &mut GradStore, max_norm: Option<f64>) -> Result<f64> {
    let mut squares = 0f64;
    for (name, var) in params {
        let norm = gradient(grads, name, var)?.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()? as f64;
        squares += norm * norm;
    }
    let total = squares.sqrt();
    if let Some(max_norm) = max_norm {
        let coefficient = (max_norm / (total + 1e-6)).min(1.0);
        for (name, var) in params {
            let clipped = (gradient(grads, name, var)? * coefficient)?;
            grads.insert(var.as_tensor(), clipped);
        }
    }
    Ok(total)
}

/// One trainable parameter and its moments.
#[derive(Debug)]
struct Slot {
    name: String,
    var: Var,
    first: Tensor,
    second: Tensor,
}

/// AdamW over named variables.
#[derive(Debug)]
pub struct AdamW {
    slots: Vec<Slot>,
    steps: usize,
    /// The hyper-parameters; the learning rate may change between steps (schedules).
    pub config: AdamWConfig,
}

impl AdamW {
    /// An optimiser for `params` (name, variable), moments zero.
    pub fn new(params: Vec<(String, Var)>, config: AdamWConfig) -> Result<Self> {
        let slots = params
            .into_iter()
            .map(|(name, var)| {
                let zeros = var.as_tensor().zeros_like()?;
                Ok(Slot { name, var, first: zeros.clone(), second: zeros })
            })
            .collect::<Result<_>>()?;
        Ok(Self { slots, steps: 0, config })
    }
}

impl Optimizer for AdamW {
    fn steps(&self) -> usize {
        self.steps
    }

    fn set_lr(&mut self, lr: f64) {
        self.config.lr = lr;
    }

    fn checkpoint_prefix(&self) -> &'static str {
        "adam."
    }

    /// The moments as `<name>.exp_avg` and `<name>.exp_avg_sq` (PyTorch's names).
    fn state(&self) -> Vec<(String, Tensor)> {
        self.slots
            .iter()
            .flat_map(|s| {
                [(format!("{}.exp_avg", s.name), s.first.clone()), (format!("{}.exp_avg_sq", s.name), s.second.clone())]
            })
            .collect()
    }

    /// Every parameter's two moments must be there, each of its parameter's shape.
    fn restore(&mut self, state: &HashMap<String, Tensor>, steps: usize) -> Result<()> {
        for slot in &mut self.slots {
            for (suffix, moment) in [("exp_avg", &mut slot.first), ("exp_avg_sq", &mut slot.second)] {
                let name = format!("{}.{suffix}", slot.name);
                *moment = restored(state, &name, moment)?;
            }
        }
        self.steps = steps;
        Ok(())
    }

    fn step(&mut self, grads: &GradStore) -> Result<()> {
        let AdamWConfig { lr, beta1, beta2, eps, weight_decay } = self.config;
        self.steps += 1;
        let t = self.steps as i32;
        let (correction1, correction2) = (1.0 - beta1.powi(t), 1.0 - beta2.powi(t));
        let step_size = lr / correction1;
        for slot in &mut self.slots {
            let g = gradient(grads, &slot.name, &slot.var)?;
            let decayed = (slot.var.as_tensor().detach() * (1.0 - lr * weight_decay))?;
            slot.first = (&slot.first + ((&g - &slot.first)? * (1.0 - beta1))?)?;
            slot.second = ((&slot.second * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
            let denominator = ((slot.second.sqrt()? / correction2.sqrt())? + eps)?;
            let update = ((&slot.first / denominator)? * step_size)?;
            slot.var.set(&(decayed - update)?)?;
        }
        Ok(())
    }
}

/// The checkpoint tensor `name` of `state`, checked to have the shape of `like` and converted to its
/// dtype and device: what a restored moment or average replaces `like` with.
pub(super) fn restored(state: &HashMap<String, Tensor>, name: &str, like: &Tensor) -> Result<Tensor> {
    let saved = state.get(name).ok_or_else(|| Error::invalid(format!("the checkpoint has no `{name}`")))?;
    if saved.dims() != like.dims() {
        return Err(Error::invalid(format!(
            "the checkpoint's `{name}` is {:?}, expected {:?}",
            saved.dims(),
            like.dims()
        )));
    }
    Ok(saved.to_dtype(like.dtype())?.to_device(like.device())?)
}

/// The gradient of the parameter `name` (`var`), or an error naming it if it received none.
pub(super) fn gradient(grads: &GradStore, name: &str, var: &Var) -> Result<Tensor> {
    // Detached: a gradient computed from tracked tensors would otherwise hold its step's whole
    // graph, and through the moments every earlier step's.
    grads.get(var.as_tensor()).map(Tensor::detach).ok_or_else(|| {
        Error::invalid(format!("no gradient reached the trainable parameter `{name}`: its layer dropped it"))
    })
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    /// One step from known values against PyTorch's AdamW formula written out, and a parameter the
    /// loss does not reach is an error naming it.
    #[test]
    fn steps_as_pytorch_and_names_a_parameter_without_gradient() {
        let dev = Device::Cpu;
        let w = Var::new(&[0.5f32, -1.0, 2.0], &dev).unwrap();
        let unused = Var::new(&[1f32], &dev).unwrap();
        let config = AdamWConfig { lr: 0.1, weight_decay: 0.01, ..Default::default() };
        let loss = (w.as_tensor() * w.as_tensor()).unwrap().sum_all().unwrap();
        let mut grads = loss.backward().unwrap();
        let params = vec![("w".to_string(), w.clone())];
        let mut adam = AdamW::new(params.clone(), config).unwrap();
        let norm = clip_grad_norm(&params, &mut grads, Some(1.0)).unwrap();
        let expected_norm = (1f64 + 4.0 + 16.0).sqrt();
        assert!((norm - expected_norm).abs() < 1e-5, "{norm}");
        adam.step(&grads).unwrap();
        // Clipped gradient g = 2w / (norm + 1e-6); first step: w·(1 − lr·wd) − lr · g / (|g| + ε).
        let got = w.as_tensor().to_vec1::<f32>().unwrap();
        for (&w0, got) in [0.5f64, -1.0, 2.0].iter().zip(got) {
            let g = 2.0 * w0 / (expected_norm + 1e-6);
            let expected = w0 * (1.0 - 0.1 * 0.01) - 0.1 * g / (g.abs() + 1e-8);
            assert!((got as f64 - expected).abs() < 1e-6, "{got} vs {expected}");
        }
        let mut adam = AdamW::new(vec![("w".into(), w), ("lost".into(), unused)], config).unwrap();
        let err = adam.step(&grads).unwrap_err().to_string();
        assert!(err.contains("no gradient reached the trainable parameter `lost`"), "{err}");
    }
}
