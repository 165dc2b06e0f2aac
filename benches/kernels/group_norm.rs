//! GroupNorm(32) + SiLU: the fused kernel against candle's composite GroupNorm followed by SiLU.

use candle_core::{DType, Device, Module, Tensor};
use diffctl::kernels::group_norm::GroupNorm;

use super::timing::{median_ms, report};

/// Runs this benchmark.
pub fn run() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    for shape in [[2, 320, 64, 64], [2, 640, 32, 32], [2, 1280, 16, 16], [1, 512, 64, 64], [1, 128, 512, 512]] {
        let channels = shape[1];
        let xs = Tensor::randn(0f32, 1.0, &shape[..], &dev)?;
        let (weight, bias) = (Tensor::ones(channels, DType::F32, &dev)?, Tensor::zeros(channels, DType::F32, &dev)?);
        let ours = GroupNorm::new(weight.clone(), bias.clone(), 32, 1e-5)?;
        let plain = candle_nn::GroupNorm::new(weight, bias, channels, 32, 1e-5)?;
        let ours_ms = median_ms(5, || {
            ours.forward_silu(&xs)?;
            Ok(())
        })?;
        let plain_ms = median_ms(5, || {
            candle_nn::ops::silu(&plain.forward(&xs)?)?;
            Ok(())
        })?;
        report(&format!("group norm + silu {shape:?}"), ours_ms, plain_ms);
    }
    Ok(())
}
