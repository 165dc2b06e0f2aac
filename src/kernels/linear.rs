//! Linear layer `y = x Wᵀ + b` for CPU f32 inputs: one product over all rows of x with the bias added
//! as each output tile is written (no separate broadcast add), on [`super::sgemm`], or on [`super::bf16_gemm`] for bf16 weights
//! where the CPU has bf16 dot products. Where gradients flow (f32 weights) its backward pass runs on
//! the same products: `dX = dY W`, `dW = dYᵀ X` (read transposed in place), `db` the column sums of
//! `dY`, each only for an operand that needs it (a frozen layer's weight gets none). Other devices
//! and dtypes use candle's `Linear`.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Module, Result, Shape, Tensor, bail};

use super::amx;
use super::bf16_gemm::{self, Lhs, Operand, Rhs};
use super::matmul::matmul;
use super::sgemm::{self, MatRef};
use super::{LayerWeight, Start, kernel_weight};

/// x [.., in] · weight [out, in]ᵀ + bias [out] → [.., out]. The weight may be in another dtype than x
/// (half-precision weights of f32 layers on the CPU).
pub fn linear(xs: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let tracked = super::tracks_gradients(&[xs, weight]) || bias.is_some_and(Tensor::track_op);
    if !xs.device().is_cpu() || xs.dtype() != DType::F32 || (tracked && weight.dtype() != DType::F32) {
        let cast = |t: &Tensor| t.to_dtype(xs.dtype());
        return candle_nn::Linear::new(cast(weight)?, bias.map(cast).transpose()?).forward(xs);
    }
    let (out, inp) = weight.dims2()?;
    if xs.dims().last() != Some(&inp) {
        bail!(
            "linear: input {:?} does not end in the weight's input size {inp} (weight {:?})",
            xs.dims(),
            weight.dims()
        );
    }
    if let Some(bias) = bias
        && bias.dims() != [out]
    {
        bail!("linear: bias {:?} does not match weight {:?} (expected [{out}])", bias.dims(), weight.dims());
    }
    if tracked {
        let (xs, weight) = (xs.contiguous()?, weight.contiguous()?);
        return match bias {
            Some(bias) => xs.apply_op3(&weight, &bias.to_dtype(DType::F32)?.contiguous()?, LinearOp),
            None => xs.apply_op2(&weight, LinearOp),
        };
    }
    let (xs, weight) = (xs.contiguous()?, kernel_weight(weight)?);
    match bias {
        Some(bias) => xs.apply_op3_no_bwd(&weight, &bias.to_dtype(DType::F32)?.contiguous()?, &LinearOp),
        None => xs.apply_op2_no_bwd(&weight, &LinearOp),
    }
}

/// The gradients of x and the weight (f32) for the output's gradient `grad`, each `None` where that
/// operand takes no part in the gradient computation.
fn backward(xs: &Tensor, weight: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
    let (out, inp) = weight.dims2()?;
    let grad = grad.detach().contiguous()?.reshape(((), out))?;
    let grad_xs = match xs.track_op() {
        true => Some(matmul(&grad, false, &weight.detach(), false, 1.0)?.reshape(xs.dims())?),
        false => None,
    };
    let grad_weight = match weight.track_op() {
        true => Some(matmul(&grad, true, &xs.detach().reshape(((), inp))?, false, 1.0)?),
        false => None,
    };
    Ok((grad_xs, grad_weight))
}

/// The candle custom op behind [`linear`]: CustomOp2 (x, weight) or CustomOp3 (x, weight, bias).
struct LinearOp;

impl CustomOp2 for LinearOp {
    fn name(&self) -> &'static str {
        "diffctl-linear"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        forward(s1, l1, s2, l2, None)
    }

    fn bwd(
        &self,
        xs: &Tensor,
        weight: &Tensor,
        _ys: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        backward(xs, weight, grad)
    }
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "diffctl-linear-bias"
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
        forward(s1, l1, s2, l2, Some((s3, l3)))
    }

    fn bwd(
        &self,
        xs: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        _ys: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (grad_xs, grad_weight) = backward(xs, weight, grad)?;
        // The column sums of dY as one product with a row of ones.
        let grad_bias = match bias.track_op() {
            true => {
                let grad = grad.detach().contiguous()?.reshape(((), bias.elem_count()))?;
                let ones = Tensor::ones((1, grad.dim(0)?), DType::F32, grad.device())?;
                Some(matmul(&ones, false, &grad, false, 1.0)?.reshape(bias.elem_count())?)
            }
            false => None,
        };
        Ok((grad_xs, grad_weight, grad_bias))
    }
}

fn forward(
    xs: &CpuStorage,
    x_layout: &Layout,
    ws: &CpuStorage,
    w_layout: &Layout,
    bias: Option<(&CpuStorage, &Layout)>,
) -> Result<(CpuStorage, Shape)> {
    let x = super::contiguous_f32("linear", xs, x_layout)?;
    let weight = super::layer_weight("linear", ws, w_layout)?;
    let bias = bias.map(|(s, l)| super::contiguous_f32("linear", s, l)).transpose()?;
    let (out, inp) = w_layout.shape().dims2()?;
    let rows = x.len() / inp;
    // Written in full by the product.
    let mut ys = super::output_buffer(rows * out);
    let start = bias.map_or(Start::Zero, |b| Start::ColumnBias(b.as_ptr()));
    let (dims, x_rows) = ((rows, out, inp), MatRef::rows(x.as_ptr(), inp));
    // SAFETY: x is [rows, inp] and weight [out, inp], both row-major; ys [rows, out] is our own; the
    // bias holds `out` columns (checked by `linear`).
    unsafe {
        match weight {
            LayerWeight::F32(w) => {
                let w = MatRef::transposed(w.as_ptr(), inp);
                sgemm::matmul(dims, ys.as_mut_ptr(), out, start, x_rows, w, 1.0, true)
            }
            // AMX tiles where the CPU has them, for products large enough to pay for the packing.
            LayerWeight::Bf16(w) if rows * out * inp >= amx::MIN_MACS && amx::available() => {
                let w = Operand::bf16_transposed(w.as_ptr(), inp);
                amx::matmul(dims, ys.as_mut_ptr(), out, start, x_rows.into(), w, 1.0, true)
            }
            LayerWeight::Bf16(w) => {
                let w = Operand::bf16_transposed(w.as_ptr(), inp);
                bf16_gemm::matmul(
                    dims,
                    ys.as_mut_ptr(),
                    out,
                    start,
                    Lhs::Strided(x_rows.into()),
                    Rhs::Strided(w),
                    1.0,
                    true,
                )
            }
        }
    };
    let mut dims = x_layout.dims().to_vec();
    *dims.last_mut().expect("linear input has a last dimension (checked)") = out;
    Ok((CpuStorage::F32(ys), Shape::from(dims)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_candle_linear_with_and_without_bias() {
        let dev = Device::Cpu;
        let xs = Tensor::randn(0f32, 1.0, (2, 37, 70), &dev).unwrap();
        let weight = Tensor::randn(0f32, 1.0, (45, 70), &dev).unwrap();
        let bias = Tensor::randn(0f32, 1.0, 45, &dev).unwrap();
        for bias in [None, Some(&bias)] {
            let ours = linear(&xs, &weight, bias).unwrap();
            let plain = candle_nn::Linear::new(weight.clone(), bias.cloned()).forward(&xs).unwrap();
            assert_eq!(ours.dims(), [2, 37, 45]);
            let diff = (ours - plain).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff < 1e-4, "max difference {diff}");
        }
    }

    #[test]
    fn transposed_input_and_half_precision() {
        let dev = Device::Cpu;
        let xs = Tensor::randn(0f32, 1.0, (70, 9), &dev).unwrap().t().unwrap();
        let weight = Tensor::randn(0f32, 1.0, (5, 70), &dev).unwrap();
        let ours = linear(&xs, &weight, None).unwrap();
        let plain = xs.matmul(&weight.t().unwrap()).unwrap();
        let diff = (ours - plain).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-4, "max difference {diff}");
        let half = linear(&xs.to_dtype(DType::BF16).unwrap(), &weight.to_dtype(DType::BF16).unwrap(), None).unwrap();
        assert_eq!(half.dtype(), DType::BF16);
    }

    /// bf16 weights with f32 inputs: bf16 dot products where the CPU has them (the inputs rounded to
    /// bf16 as well), else the weight widened. Either way within bf16 rounding of the f32 product.
    #[test]
    fn bf16_weights_with_f32_inputs() {
        let dev = Device::Cpu;
        // A small product (the AVX512-BF16 path) and one large enough for AMX tiles where present.
        for (rows, inp, out) in [(50, 96, 64), (300, 320, 640)] {
            let xs = Tensor::randn(0f32, 1.0, (2, rows, inp), &dev).unwrap();
            let weight = Tensor::randn(0f32, 0.1, (out, inp), &dev).unwrap().to_dtype(DType::BF16).unwrap();
            let bias = Tensor::randn(0f32, 1.0, out, &dev).unwrap();
            let ours = linear(&xs, &weight, Some(&bias)).unwrap();
            assert_eq!(ours.dtype(), DType::F32);
            let plain = candle_nn::Linear::new(weight.to_dtype(DType::F32).unwrap(), Some(bias)).forward(&xs).unwrap();
            let diff = (ours - &plain).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            let top = plain.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff / top < 1e-2, "[{rows}, {inp}] → {out}: relative difference {}", diff / top);
        }
    }

    /// Gradients of x, weight and bias through our backward pass against candle's differentiable
    /// `Linear`; a frozen weight (not a variable) gets no gradient.
    #[test]
    fn gradients_match_candle() {
        use candle_core::Var;
        let dev = Device::Cpu;
        let xs = Var::randn(0f32, 1.0, (2, 37, 70), &dev).unwrap();
        let weight = Var::randn(0f32, 1.0, (45, 70), &dev).unwrap();
        let bias = Var::randn(0f32, 1.0, 45, &dev).unwrap();
        let probe = Tensor::randn(0f32, 1.0, (2, 37, 45), &dev).unwrap();
        for with_bias in [false, true] {
            let bias = with_bias.then_some(bias.as_tensor());
            let ours = (linear(&xs, &weight, bias).unwrap() * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let plain = candle_nn::Linear::new(weight.as_tensor().clone(), bias.cloned()).forward(&xs).unwrap();
            let plain = (plain * &probe).unwrap().sum_all().unwrap().backward().unwrap();
            let mut vars = vec![xs.as_tensor(), weight.as_tensor()];
            vars.extend(bias);
            for var in vars {
                let (a, b) = (ours.get(var).unwrap(), plain.get(var).unwrap());
                let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                assert!(diff < 1e-3, "{:?}: max difference {diff}", var.dims());
            }
        }
        let frozen = Tensor::randn(0f32, 1.0, (45, 70), &dev).unwrap();
        let grads = linear(&xs, &frozen, None).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(grads.get(&frozen).is_none() && grads.get(&xs).is_some());
    }

    #[test]
    fn mismatched_shapes_are_errors() {
        let dev = Device::Cpu;
        let xs = Tensor::zeros((3, 8), DType::F32, &dev).unwrap();
        let weight = Tensor::zeros((4, 7), DType::F32, &dev).unwrap();
        let err = linear(&xs, &weight, None).unwrap_err().to_string();
        assert!(err.contains("[3, 8]") && err.contains("7"), "{err}");
        let weight = Tensor::zeros((4, 8), DType::F32, &dev).unwrap();
        let bias = Tensor::zeros(5, DType::F32, &dev).unwrap();
        assert!(linear(&xs, &weight, Some(&bias)).unwrap_err().to_string().contains("bias"));
    }
}
