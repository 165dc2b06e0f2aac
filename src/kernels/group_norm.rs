//! GroupNorm over [B, C, *] with affine weights, optionally fused with the SiLU that follows it in
//! every resnet block: one pass for the statistics and one for normalise-scale-shift-activate,
//! instead of candle's seven element-wise ops with their temporaries.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};
use candle_nn::Module;
use rayon::prelude::*;

use super::math::{self, simd_dispatch};

/// `nn.GroupNorm(groups, channels, eps)` with affine `weight` and `bias` [C]; [`GroupNorm::forward_silu`]
/// applies SiLU to the output in the same pass.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
    /// candle's composite GroupNorm, used off the fast path (other devices and dtypes).
    plain: candle_nn::GroupNorm,
}

impl GroupNorm {
    /// A GroupNorm of `weight.dim(0)` channels in `groups` groups.
    pub fn new(weight: Tensor, bias: Tensor, groups: usize, eps: f64) -> candle_core::Result<Self> {
        let channels = weight.dim(0)?;
        let plain = candle_nn::GroupNorm::new(weight.clone(), bias.clone(), channels, groups, eps)?;
        Ok(Self { weight, bias, groups, eps, plain })
    }

    /// Normalises xs [B, C, *] per sample and group of C/groups channels, then scales and shifts per
    /// channel.
    pub fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        self.run(xs, false)
    }

    /// `silu(self.forward(xs))` in one pass.
    pub fn forward_silu(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        self.run(xs, true)
    }

    fn run(&self, xs: &Tensor, silu: bool) -> candle_core::Result<Tensor> {
        let fast = xs.device().is_cpu()
            && xs.dtype() == DType::F32
            && self.weight.dtype() == DType::F32
            && self.bias.dtype() == DType::F32
            && xs.rank() >= 3
            && !super::tracks_gradients(&[xs, &self.weight, &self.bias]);
        if !fast {
            let ys = self.plain.forward(xs)?;
            return if silu { candle_nn::ops::silu(&ys) } else { Ok(ys) };
        }
        let op = GroupNormOp { groups: self.groups, eps: self.eps, silu };
        xs.contiguous()?.apply_op3_no_bwd(&self.weight.contiguous()?, &self.bias.contiguous()?, &op)
    }
}

/// The CPU f32 kernel behind [`GroupNorm`].
struct GroupNormOp {
    groups: usize,
    eps: f64,
    silu: bool,
}

impl CustomOp3 for GroupNormOp {
    fn name(&self) -> &'static str {
        if self.silu { "group-norm-silu" } else { "group-norm" }
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xs_layout: &Layout,
        weight: &CpuStorage,
        weight_layout: &Layout,
        bias: &CpuStorage,
        bias_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = xs_layout.dims();
        let (batch, channels) = (dims[0], dims[1]);
        let spatial: usize = dims[2..].iter().product();
        if channels % self.groups != 0 || weight_layout.dims() != [channels] || bias_layout.dims() != [channels] {
            candle_core::bail!(
                "GroupNorm: {} groups, weight {:?} and bias {:?} do not fit input {dims:?}",
                self.groups,
                weight_layout.dims(),
                bias_layout.dims()
            );
        }
        let xs = super::contiguous_f32("GroupNorm", xs, xs_layout)?;
        let weight = super::contiguous_f32("GroupNorm", weight, weight_layout)?;
        let bias = super::contiguous_f32("GroupNorm", bias, bias_layout)?;
        let group_len = channels / self.groups * spatial;
        let mut out = super::output_buffer(xs.len());
        out.par_chunks_mut(group_len).zip(xs.par_chunks(group_len)).enumerate().for_each(|(i, (ys, xs))| {
            let first_channel = (i % self.groups) * (channels / self.groups);
            normalise_group(xs, ys, spatial, &weight[first_channel..], &bias[first_channel..], self.eps, self.silu)
        });
        debug_assert_eq!(out.len(), batch * channels * spatial);
        Ok((CpuStorage::F32(out), xs_layout.shape().clone()))
    }
}

simd_dispatch! {
    /// One group of `channels × spatial` values: statistics (per-channel f32 sums combined in f64), then
    /// `y = (x − μ)·a + β` per channel with `a = γ/σ`, and SiLU when asked.
    fn normalise_group(xs: &[f32], ys: &mut [f32], spatial: usize, gamma: &[f32], beta: &[f32], eps: f64, silu: bool) {
        let n = xs.len() as f64;
        let mean = xs.chunks(spatial).map(|c| math::sum(c) as f64).sum::<f64>() / n;
        let mean32 = mean as f32;
        let var = xs
            .chunks(spatial)
            .map(|c| {
                let d: f32 = sum_sq_dev(c, mean32);
                d as f64
            })
            .sum::<f64>()
            / n;
        let rstd = 1.0 / (var + eps).sqrt();
        for (c, (ys, xs)) in ys.chunks_mut(spatial).zip(xs.chunks(spatial)).enumerate() {
            let (a, b) = ((gamma[c] as f64 * rstd) as f32, beta[c]);
            if silu {
                for (y, &x) in ys.iter_mut().zip(xs) {
                    *y = math::silu((x - mean32) * a + b);
                }
            } else {
                for (y, &x) in ys.iter_mut().zip(xs) {
                    *y = (x - mean32) * a + b;
                }
            }
        }
    }
}

/// Σ(x − μ)² with 16 independent accumulators.
#[inline(always)]
fn sum_sq_dev(xs: &[f32], mean: f32) -> f32 {
    let mut acc = [0f32; 16];
    let chunks = xs.chunks_exact(16);
    let rest: f32 = chunks.remainder().iter().map(|&x| (x - mean) * (x - mean)).sum();
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += (x - mean) * (x - mean);
        }
    }
    acc.iter().sum::<f32>() + rest
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;

    fn check(shape: &[usize], groups: usize, silu: bool) -> candle_core::Result<f32> {
        let dev = Device::Cpu;
        let channels = shape[1];
        let xs = (Tensor::randn(0f32, 3.0, shape, &dev)? + 1.5)?;
        let weight = Tensor::randn(1f32, 0.5, channels, &dev)?;
        let bias = Tensor::randn(0f32, 0.5, channels, &dev)?;
        let norm = GroupNorm::new(weight.clone(), bias.clone(), groups, 1e-5)?;
        let ours = if silu { norm.forward_silu(&xs)? } else { norm.forward(&xs)? };
        let plain = candle_nn::GroupNorm::new(weight, bias, channels, groups, 1e-5)?.forward(&xs)?;
        let plain = if silu { candle_nn::ops::silu(&plain)? } else { plain };
        assert_eq!(ours.dims(), plain.dims());
        (ours - plain)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    }

    // Measured: ≤ 1.9e-6 for every case (random inputs each run; outputs up to about 5).
    #[test]
    fn matches_candle_group_norm() -> candle_core::Result<()> {
        for (shape, groups) in
            [(&[2, 32, 9, 7][..], 8), (&[1, 12, 33][..], 3), (&[3, 64, 16, 16][..], 32), (&[1, 4, 1, 1][..], 4)]
        {
            for silu in [false, true] {
                let diff = check(shape, groups, silu)?;
                eprintln!("shape {shape:?} groups {groups} silu {silu}: max |diff| {diff:e}");
                assert!(diff < 5e-6, "shape {shape:?} groups {groups} silu {silu}: max |diff| {diff:e}");
            }
        }
        Ok(())
    }

    #[test]
    fn falls_back_for_bf16_and_strided_input() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let xs = Tensor::randn(0f32, 1.0, (2, 8, 5, 6), &dev)?;
        let norm = GroupNorm::new(Tensor::ones(8, DType::F32, &dev)?, Tensor::zeros(8, DType::F32, &dev)?, 4, 1e-6)?;
        let want = norm.forward(&xs)?;
        let strided = xs.transpose(2, 3)?.contiguous()?.transpose(2, 3)?;
        let diff = (norm.forward(&strided)? - &want)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        assert!(diff < 1e-6, "strided input: {diff:e}");
        let norm = GroupNorm::new(Tensor::ones(8, DType::BF16, &dev)?, Tensor::zeros(8, DType::BF16, &dev)?, 4, 1e-6)?;
        let bf16 = norm.forward(&xs.to_dtype(DType::BF16)?)?.to_dtype(DType::F32)?;
        let diff = (bf16 - want)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        assert!(diff < 5e-2, "bf16: {diff:e}");
        Ok(())
    }
}
