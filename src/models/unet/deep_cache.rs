//! DeepCache (Ma et al., "DeepCache: Accelerating Diffusion Models for Free", 2024): the UNet's deep
//! features change little between neighbouring denoising steps, so a refreshing call runs the whole
//! UNet and keeps the input of one up layer, and the calls between refreshes run only the shallow
//! branch around it: `conv_in`, the down path as far as the matching skip connection, and the up
//! layers from there on. An opt-in approximation: the output of a partial call differs from the
//! full UNet's.

use candle_core::Tensor;

use crate::{Error, Result};

/// The cached feature and the schedule of refreshes for one generation.
#[derive(Debug, Clone)]
pub struct DeepCache {
    interval: usize,
    branch: usize,
    calls: usize,
    /// The kept feature.
    feature: Option<Tensor>,
    /// The shape of the sample the last refreshing call ran on.
    sample_shape: Vec<usize>,
}

impl DeepCache {
    /// Refreshes on every `interval`-th UNet call (the first included) and reuses the feature in
    /// between; `branch` picks the shallow branch as DeepCache's `cache_branch_id` does: branch b
    /// recomputes the down path through skip connection b (0: `conv_in`'s output; SD1.x makes 12)
    /// and the up layers that take those skips.
    pub fn new(interval: usize, branch: usize) -> Result<Self> {
        if interval == 0 {
            return Err(Error::invalid("the DeepCache interval must be at least 1"));
        }
        Ok(Self { interval, branch, calls: 0, feature: None, sample_shape: Vec::new() })
    }

    /// The skip connection whose up layer takes the cached feature, for a UNet with `skips` of them.
    pub(super) fn resume_skip(&self, skips: usize) -> Result<usize> {
        let deepest = skips.saturating_sub(1);
        if self.branch > deepest {
            return Err(Error::invalid(format!(
                "DeepCache branch {} is past this UNet's deepest, {deepest} ({skips} skip connections)",
                self.branch
            )));
        }
        Ok(self.branch)
    }

    /// Counts a UNet call on `sample`: the cached feature when this call reuses it, `None` when it
    /// refreshes (its schedule says so, or nothing fits this sample's shape yet).
    pub(super) fn next_call(&mut self, sample: &Tensor) -> Option<Tensor> {
        let due = self.calls.is_multiple_of(self.interval);
        self.calls += 1;
        if !due && self.sample_shape == sample.dims() && self.feature.is_some() {
            return self.feature.clone();
        }
        self.feature = None;
        self.sample_shape = sample.dims().to_vec();
        None
    }

    /// Keeps `feature`, computed by the refreshing call [`Self::next_call`] last announced.
    pub(super) fn keep(&mut self, feature: Tensor) {
        self.feature = Some(feature);
    }
}
