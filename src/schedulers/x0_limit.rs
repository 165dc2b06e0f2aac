//! What DDIM and DDPM do to their x₀ estimate before stepping (diffusers' `clip_sample` and
//! `thresholding`): clamp it to ±`clip_sample_range`, or dynamic thresholding (Saharia et al.
//! 2022, `_threshold_sample`): per sample, s = the `dynamic_thresholding_ratio` quantile of |x₀|
//! (linear interpolation, as `torch.quantile`) clamped to [1, `sample_max_value`], then x₀ clamped
//! to ±s and divided by s. Thresholding wins where both are set, as in diffusers.

use candle_core::Tensor;

use super::SchedulerConfig;
use crate::Result;

/// How an x₀ estimate is limited.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum X0Limit {
    /// Clamped to ±range.
    Clip(f32),
    /// Dynamic thresholding at this quantile, with s at most `max`.
    Threshold {
        /// `dynamic_thresholding_ratio` (diffusers' default 0.995).
        ratio: f32,
        /// `sample_max_value` (default 1).
        max: f32,
    },
}

impl X0Limit {
    /// The limit `cfg` asks for, `clip_sample` defaulting to `clip_by_default` (the class's own
    /// default).
    pub(crate) fn from_config(cfg: &SchedulerConfig, clip_by_default: bool) -> Option<Self> {
        if cfg.thresholding == Some(true) {
            return Some(Self::Threshold {
                ratio: cfg.dynamic_thresholding_ratio.unwrap_or(0.995) as f32,
                max: cfg.sample_max_value.unwrap_or(1.0) as f32,
            });
        }
        cfg.clip_sample.unwrap_or(clip_by_default).then(|| Self::Clip(cfg.clip_sample_range.unwrap_or(1.0) as f32))
    }

    /// `x0` [B, ...] limited.
    pub(crate) fn apply(&self, x0: &Tensor) -> Result<Tensor> {
        match *self {
            Self::Clip(range) => Ok(x0.clamp(-range, range)?),
            Self::Threshold { ratio, max } => {
                let batch = x0.dim(0)?;
                let flat = x0.flatten_from(1)?.to_dtype(candle_core::DType::F32)?;
                let mut thresholds = Vec::with_capacity(batch);
                for row in flat.to_vec2::<f32>()? {
                    let mut sorted: Vec<f32> = row.iter().map(|v| v.abs()).collect();
                    sorted.sort_by(f32::total_cmp);
                    thresholds.push(quantile(&sorted, ratio).clamp(1.0, max.max(1.0)));
                }
                let s = Tensor::from_vec(thresholds, (batch, 1), x0.device())?;
                let limited = flat.broadcast_minimum(&s)?.broadcast_maximum(&s.neg()?)?.broadcast_div(&s)?;
                Ok(limited.reshape(x0.dims())?.to_dtype(x0.dtype())?)
            }
        }
    }
}

/// The `q` quantile of ascending `sorted` values, interpolated linearly between neighbours (as
/// `torch.quantile`'s default).
fn quantile(sorted: &[f32], q: f32) -> f32 {
    let Some(last) = sorted.len().checked_sub(1) else { return 0.0 };
    let position = q.clamp(0.0, 1.0) * last as f32;
    let (lo, hi) = (position.floor() as usize, position.ceil() as usize);
    sorted[lo] + (sorted[hi.min(last)] - sorted[lo]) * (position - lo as f32)
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    /// A sample inside ±1 is unchanged; one whose 0.5-quantile of |x| is 3 is clamped to ±3 and
    /// divided by 3, or by the cap when that is lower.
    #[test]
    fn thresholds_each_sample_as_diffusers() {
        let x = Tensor::new(&[[0.5f32, -0.25, 0.1, 0.9], [1.0, -3.0, 5.0, -8.0]], &Device::Cpu).unwrap();
        let out = X0Limit::Threshold { ratio: 0.5, max: 10.0 }.apply(&x).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(out[0], [0.5, -0.25, 0.1, 0.9]);
        // |x| sorted: 1, 3, 5, 8: the 0.5 quantile sits halfway between 3 and 5.
        let s = 4.0;
        assert_eq!(out[1], [1.0 / s, -3.0 / s, 4.0 / s, -4.0 / s]);
        let capped = X0Limit::Threshold { ratio: 0.5, max: 2.0 }.apply(&x).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(capped[1], [0.5, -1.0, 1.0, -1.0]);
    }
}
