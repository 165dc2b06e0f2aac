//! An exponential moving average of the trained weights (diffusers' `EMAModel` as
//! `train_text_to_image.py --use_ema` uses it): after every optimiser step each shadow moves
//! towards its weight, `shadow −= (1 − d)·(shadow − weight)`, with d = 0 at the first update (the
//! shadow starts as the weight) and then min(decay, n / (n + 9)) at update n, so that early
//! averages forget the random start quickly. The run exports the averaged weights.

use std::collections::HashMap;

use candle_core::{Tensor, Var};

use super::optimizer::restored;
use crate::{Error, Result};

/// The shadows of a run's trainable variables.
pub struct Ema {
    decay: f64,
    shadows: Vec<Tensor>,
    updates: usize,
}

impl Ema {
    /// Shadows of `params`, starting as their values, averaged with at most `decay` (e.g. 0.9999).
    pub fn new(params: &[(String, Var)], decay: f64) -> Result<Self> {
        if !(0.0..1.0).contains(&decay) {
            return Err(Error::invalid(format!("the EMA decay {decay} must be in [0, 1)")));
        }
        let shadows = params.iter().map(|(_, v)| v.as_tensor().detach().copy()).collect::<candle_core::Result<_>>()?;
        Ok(Self { decay, shadows, updates: 0 })
    }

    /// The decay of the next update.
    fn next_decay(&self) -> f64 {
        let n = self.updates + 1;
        if n == 1 { 0.0 } else { self.decay.min(n as f64 / (n as f64 + 9.0)) }
    }

    /// Moves every shadow towards its variable's value after an optimiser step.
    pub fn update(&mut self, params: &[(String, Var)]) -> Result<()> {
        let keep = self.next_decay();
        for (shadow, (_, var)) in self.shadows.iter_mut().zip(params) {
            let moved = (&*shadow - ((&*shadow - var.as_tensor().detach())? * (1.0 - keep))?)?;
            *shadow = moved;
        }
        self.updates += 1;
        Ok(())
    }

    /// Exchanges the variables' values with the shadows: once to put the averages in place (to
    /// export them), again to restore the trained values.
    pub fn swap(&mut self, params: &[(String, Var)]) -> Result<()> {
        for (shadow, (_, var)) in self.shadows.iter_mut().zip(params) {
            let trained = var.as_tensor().detach().copy()?;
            var.set(shadow)?;
            *shadow = trained;
        }
        Ok(())
    }

    /// The shadows by variable name, for a checkpoint.
    pub fn state(&self, params: &[(String, Var)]) -> Vec<(String, Tensor)> {
        params.iter().zip(&self.shadows).map(|((name, _), s)| (name.clone(), s.clone())).collect()
    }

    /// Restores the shadows from a checkpoint's `state` (by variable name) after `updates` updates.
    pub fn restore(&mut self, params: &[(String, Var)], state: &HashMap<String, Tensor>, updates: usize) -> Result<()> {
        for (shadow, (name, var)) in self.shadows.iter_mut().zip(params) {
            *shadow = restored(state, name, var.as_tensor())?;
        }
        self.updates = updates;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    /// diffusers' schedule: the first update copies, the second keeps 2/11 of the shadow, later ones
    /// at most `decay`; swapping twice restores the trained value.
    #[test]
    fn averages_as_diffusers_ema_model() {
        let var = Var::new(&[1f32], &Device::Cpu).unwrap();
        let params = vec![("w".to_string(), var.clone())];
        let mut ema = Ema::new(&params, 0.2).unwrap();
        let value = |t: &Tensor| t.to_vec1::<f32>().unwrap()[0];
        var.set(&Tensor::new(&[3f32], &Device::Cpu).unwrap()).unwrap();
        ema.update(&params).unwrap();
        assert_eq!(value(&ema.shadows[0]), 3.0, "decay 0 at the first update");
        var.set(&Tensor::new(&[14f32], &Device::Cpu).unwrap()).unwrap();
        ema.update(&params).unwrap();
        let expected = 3.0 - (1.0 - 2.0 / 11.0) * (3.0 - 14.0);
        assert!((value(&ema.shadows[0]) - expected).abs() < 1e-5, "decay 2/11 at the second");
        var.set(&Tensor::new(&[14f32], &Device::Cpu).unwrap()).unwrap();
        ema.update(&params).unwrap();
        let expected = expected - 0.8 * (expected - 14.0);
        assert!((value(&ema.shadows[0]) - expected).abs() < 1e-5, "capped at the decay");
        ema.swap(&params).unwrap();
        assert!((value(var.as_tensor()) - expected).abs() < 1e-5);
        ema.swap(&params).unwrap();
        assert_eq!(value(var.as_tensor()), 14.0);
        assert!(Ema::new(&params, 1.0).is_err());
    }
}
