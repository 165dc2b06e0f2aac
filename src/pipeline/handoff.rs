//! Base + refiner hand-off ("ensemble of experts"): the base model runs the noisy part of the
//! schedule and the refiner continues from its latents, split at a fraction of the training
//! timesteps as diffusers' `denoising_end` / `denoising_start` do.

use candle_core::Tensor;

use crate::{Error, Result};

/// Where a refiner continues: the base's latents and the fraction of the schedule already done.
#[derive(Debug, Clone)]
pub struct ContinueFrom {
    /// The base's final latents [B, C, h, w] (f32, unscaled as the sampler left them).
    pub latents: Tensor,
    /// The hand-off point in (0, 1) (diffusers' `denoising_start`).
    pub denoising_start: f64,
}

/// Checks a hand-off fraction is strictly between 0 and 1.
pub fn check_fraction(what: &str, fraction: f64) -> Result<()> {
    if !(fraction > 0.0 && fraction < 1.0) {
        return Err(Error::invalid(format!("{what} {fraction} must be strictly between 0 and 1")));
    }
    Ok(())
}

/// The timestep where the hand-off happens: `round(T − fraction·T)` (ties to even, as Python's
/// `round`) for `train_steps` = T.
fn cutoff(fraction: f64, train_steps: usize) -> f64 {
    let t = train_steps as f64;
    (t - fraction * t).round_ties_even()
}

/// The end (exclusive) of the base's steps: those whose timestep is at or above the cutoff.
pub fn base_end(timesteps: &[f64], fraction: f64, train_steps: usize) -> usize {
    let cutoff = cutoff(fraction, train_steps);
    timesteps.iter().filter(|&&t| t >= cutoff).count()
}

/// The first of the refiner's steps: the last n timesteps, those below the cutoff (one more for a
/// second-order scheduler when n is even, so that it starts on a whole step).
pub fn refiner_start(timesteps: &[f64], fraction: f64, train_steps: usize, order: usize) -> usize {
    let cutoff = cutoff(fraction, train_steps);
    let mut n = timesteps.iter().filter(|&&t| t < cutoff).count();
    if order == 2 && n % 2 == 0 {
        n += 1;
    }
    timesteps.len().saturating_sub(n)
}
