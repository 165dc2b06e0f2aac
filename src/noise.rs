//! Seeded standard-normal noise for initial latents and stochastic schedulers.

use candle_core::{Device, Tensor};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, StandardNormal};

use crate::Result;
use crate::schedulers::NoiseSource;

/// Standard-normal noise from a seeded RNG: the same seed gives the same images.
pub struct SeededNoise {
    rng: StdRng,
}

impl SeededNoise {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self { rng: StdRng::seed_from_u64(seed) }
    }
}

impl NoiseSource for SeededNoise {
    fn sample(&mut self, shape: &[usize], device: &Device) -> Result<Tensor> {
        let n = shape.iter().product();
        let data: Vec<f32> = (0..n).map(|_| StandardNormal.sample(&mut self.rng)).collect();
        Ok(Tensor::from_vec(data, shape, device)?)
    }
}
