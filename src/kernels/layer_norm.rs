//! LayerNorm over the last dimension with affine weights, as a differentiable CPU f32 kernel: the
//! forward pass one sweep per row; the backward pass recomputes each row's mean and inverse standard
//! deviation and gives, with `x̂` the normalised row and `g = dY ∘ w`,
//! `dX = rstd · (g − mean(g) − x̂ · mean(g ∘ x̂))`, `dW = Σ_rows dY ∘ x̂`, `dB = Σ_rows dY`.
//! (candle's fused `layer_norm` has no backward pass, and the same normalisation from its
//! differentiable ops makes eight full-size temporaries and their gradients.)

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor, bail};
use rayon::prelude::*;

use super::math::simd_dispatch;

/// Rows per task.
const TASK_ROWS: usize = 64;

/// `(x − mean) / √(var + eps) · weight + bias` over the last dimension of f32 `xs` on the CPU, with
/// a backward pass for x, weight and bias.
pub fn layer_norm(xs: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let dim = xs.dims().last().copied().unwrap_or(0);
    if weight.dims() != [dim] || bias.dims() != [dim] {
        bail!(
            "layer norm: weight {:?} and bias {:?} do not match the input {:?}",
            weight.dims(),
            bias.dims(),
            xs.dims()
        )
    }
    xs.contiguous()?.apply_op3(&weight.contiguous()?, &bias.contiguous()?, LayerNormOp { eps: eps as f32 })
}

/// The candle op behind [`layer_norm`].
#[derive(Debug, Clone, Copy)]
struct LayerNormOp {
    eps: f32,
}

/// A row's mean and inverse standard deviation.
#[inline(always)]
fn moments(row: &[f32], eps: f32) -> (f32, f32) {
    let n = row.len() as f32;
    let mean = row.iter().sum::<f32>() / n;
    let variance = row.iter().map(|&x| (x - mean) * (x - mean)).sum::<f32>() / n;
    (mean, 1.0 / (variance + eps).sqrt())
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "diffctl-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = super::contiguous_f32("layer norm", s1, l1)?;
        let (weight, bias) =
            (super::contiguous_f32("layer norm", s2, l2)?, super::contiguous_f32("layer norm", s3, l3)?);
        let dim = weight.len();
        let mut out = super::output_buffer(x.len());
        out.par_chunks_mut(TASK_ROWS * dim)
            .zip(x.par_chunks(TASK_ROWS * dim))
            .for_each(|(out, x)| normalise_rows(out, x, weight, bias, self.eps));
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        xs: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.detach().contiguous()?;
        let dim = weight.elem_count();
        let (x_guard, x_layout) = xs.storage_and_layout();
        let (w_guard, w_layout) = weight.storage_and_layout();
        let (g_guard, g_layout) = grad.storage_and_layout();
        let (Storage::Cpu(x), Storage::Cpu(w), Storage::Cpu(g)) = (&*x_guard, &*w_guard, &*g_guard) else {
            bail!("layer norm backward: CPU tensors only")
        };
        let x = super::contiguous_f32("layer norm backward", x, x_layout)?;
        let w = super::contiguous_f32("layer norm backward", w, w_layout)?;
        let g = super::contiguous_f32("layer norm backward", g, g_layout)?;
        let mut grad_x = super::output_buffer(x.len());
        // Per task: its rows' dX, and its partial sums of dW and dB.
        let partials: Vec<Vec<f32>> = grad_x
            .par_chunks_mut(TASK_ROWS * dim)
            .zip(x.par_chunks(TASK_ROWS * dim).zip(g.par_chunks(TASK_ROWS * dim)))
            .map(|(dx, (x, g))| {
                let mut sums = vec![0f32; 2 * dim];
                backward_rows(dx, &mut sums, x, g, w, self.eps);
                sums
            })
            .collect();
        let mut sums = vec![0f32; 2 * dim];
        for partial in &partials {
            sums.iter_mut().zip(partial).for_each(|(s, p)| *s += p);
        }
        drop((x_guard, w_guard, g_guard));
        let device = xs.device();
        let grad_x = xs.track_op().then(|| Tensor::from_vec(grad_x, xs.shape(), device)).transpose()?;
        let (dw, db) = sums.split_at(dim);
        let grad_w = weight.track_op().then(|| Tensor::from_slice(dw, dim, device)).transpose()?;
        let grad_b = bias.track_op().then(|| Tensor::from_slice(db, dim, device)).transpose()?;
        Ok((grad_x, grad_w, grad_b))
    }
}

simd_dispatch! {
    /// `out` [rows, D] = each row of `x` normalised, times `weight`, plus `bias`.
    fn normalise_rows(out: &mut [f32], x: &[f32], weight: &[f32], bias: &[f32], eps: f32) {
        let dim = weight.len();
        for (out, x) in out.chunks_exact_mut(dim).zip(x.chunks_exact(dim)) {
            let (mean, rstd) = moments(x, eps);
            for (((o, &x), &w), &b) in out.iter_mut().zip(x).zip(weight).zip(bias) {
                *o = (x - mean) * rstd * w + b;
            }
        }
    }
}

simd_dispatch! {
    /// `dx` [rows, D] for rows `x` and output gradients `g`; `sums` [2, D] += (Σ dY ∘ x̂, Σ dY).
    fn backward_rows(dx: &mut [f32], sums: &mut [f32], x: &[f32], g: &[f32], weight: &[f32], eps: f32) {
        let dim = weight.len();
        let (sum_w, sum_b) = sums.split_at_mut(dim);
        for ((dx, x), g) in dx.chunks_exact_mut(dim).zip(x.chunks_exact(dim)).zip(g.chunks_exact(dim)) {
            let (mean, rstd) = moments(x, eps);
            let (mut mean_g, mut mean_gx) = (0f32, 0f32);
            for (((&x, &dy), &w), (sw, sb)) in x.iter().zip(g).zip(weight).zip(sum_w.iter_mut().zip(sum_b.iter_mut())) {
                let x_hat = (x - mean) * rstd;
                *sw += dy * x_hat;
                *sb += dy;
                mean_g += dy * w;
                mean_gx += dy * w * x_hat;
            }
            let (mean_g, mean_gx) = (mean_g / dim as f32, mean_gx / dim as f32);
            for (((d, &x), &dy), &w) in dx.iter_mut().zip(x).zip(g).zip(weight) {
                let x_hat = (x - mean) * rstd;
                *d = rstd * (dy * w - mean_g - x_hat * mean_gx);
            }
        }
    }
}

/// Whether [`layer_norm`] runs these inputs (CPU, f32 throughout).
pub fn supports(xs: &Tensor, weight: &Tensor, bias: &Tensor) -> bool {
    xs.device().is_cpu() && [xs, weight, bias].iter().all(|t| t.dtype() == DType::F32)
}

#[cfg(test)]
mod tests {
    use candle_core::{D, Device, Var};

    use super::*;

    /// Output and gradients of x, weight and bias against the normalisation from candle's
    /// differentiable ops; a frozen weight gets no gradient.
    #[test]
    fn matches_candle_with_gradients() {
        let dev = Device::Cpu;
        let x =
            Var::from_tensor(&((Tensor::randn(0f32, 1.0, (3, 70, 40), &dev).unwrap() * 2.0).unwrap() + 0.5).unwrap())
                .unwrap();
        let weight = Var::randn(1f32, 0.3, 40, &dev).unwrap();
        let bias = Var::randn(0f32, 0.3, 40, &dev).unwrap();
        let probe = Tensor::randn(0f32, 1.0, (3, 70, 40), &dev).unwrap();
        let ours = layer_norm(&x, &weight, &bias, 1e-5).unwrap();
        let centred = x.broadcast_sub(&x.mean_keepdim(D::Minus1).unwrap()).unwrap();
        let variance = centred.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        let plain = centred.broadcast_div(&(variance + 1e-5).unwrap().sqrt().unwrap()).unwrap();
        let plain = plain.broadcast_mul(&weight).unwrap().broadcast_add(&bias).unwrap();
        let max_diff =
            |a: &Tensor, b: &Tensor| (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(max_diff(&ours, &plain) < 1e-5);
        let grads = |y: &Tensor| (y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let (g_ours, g_plain) = (grads(&ours), grads(&plain));
        for (name, var) in [("x", x.as_tensor()), ("weight", weight.as_tensor()), ("bias", bias.as_tensor())] {
            let diff = max_diff(g_ours.get(var).unwrap(), g_plain.get(var).unwrap());
            assert!(diff < 1e-4, "{name}: max difference {diff}");
        }
        let frozen = Tensor::ones(40, DType::F32, &dev).unwrap();
        let grads = layer_norm(&x, &frozen, &bias, 1e-5).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(grads.get(&frozen).is_none() && grads.get(&x).is_some());
        let err = layer_norm(&x, &Tensor::ones(39, DType::F32, &dev).unwrap(), &bias, 1e-5).unwrap_err().to_string();
        assert!(err.contains("[39]") && err.contains("[3, 70, 40]"), "{err}");
    }
}
