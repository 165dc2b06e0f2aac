//! Products of two f32 matrices on [`super::sgemm`], either operand read transposed in place: the
//! gradients of the linear layers and of attention (`dYᵀ X`, `dY W`) without copying a transpose.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor, bail};

use super::Start;
use super::sgemm::{self, MatRef};

/// `scale · op(a) · op(b)` for contiguous f32 matrices `a` and `b` (rank 2) on the CPU, where `op`
/// transposes an operand whose flag is set: `a` [m, k] (or [k, m] transposed), `b` [k, n] (or
/// [n, k] transposed) → [m, n]. No gradient flows through it.
pub fn matmul(a: &Tensor, a_transposed: bool, b: &Tensor, b_transposed: bool, scale: f32) -> Result<Tensor> {
    a.contiguous()?.apply_op2_no_bwd(&b.contiguous()?, &Product { a_transposed, b_transposed, scale })
}

/// The candle op behind [`matmul`].
struct Product {
    a_transposed: bool,
    b_transposed: bool,
    scale: f32,
}

impl CustomOp2 for Product {
    fn name(&self) -> &'static str {
        "diffctl-matmul"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (a, b) = (super::contiguous_f32("matmul", s1, l1)?, super::contiguous_f32("matmul", s2, l2)?);
        let ((ar, ac), (br, bc)) = (l1.shape().dims2()?, l2.shape().dims2()?);
        let (m, k) = if self.a_transposed { (ac, ar) } else { (ar, ac) };
        let (kb, n) = if self.b_transposed { (bc, br) } else { (br, bc) };
        if k != kb {
            bail!(
                "matmul: {:?}{} and {:?}{} do not chain",
                l1.dims(),
                if self.a_transposed { "ᵀ" } else { "" },
                l2.dims(),
                if self.b_transposed { "ᵀ" } else { "" }
            )
        }
        let operand = |data: &[f32], cols: usize, transposed: bool| {
            if transposed { MatRef::transposed(data.as_ptr(), cols) } else { MatRef::rows(data.as_ptr(), cols) }
        };
        // Written in full by the product.
        let mut out = super::output_buffer(m * n);
        // SAFETY: a and b are contiguous [ar, ac] and [br, bc] read through their own strides; the
        // output [m, n] is our own.
        unsafe {
            sgemm::matmul(
                (m, n, k),
                out.as_mut_ptr(),
                n,
                Start::Zero,
                operand(a, ac, self.a_transposed),
                operand(b, bc, self.b_transposed),
                self.scale,
                true,
            )
        };
        Ok((CpuStorage::F32(out), Shape::from((m, n))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_candle_for_every_transposition() {
        let dev = Device::Cpu;
        let a = Tensor::randn(0f32, 1.0, (37, 53), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, (53, 29), &dev).unwrap();
        let expected = (a.matmul(&b).unwrap() * 0.5).unwrap();
        let (at, bt) = (a.t().unwrap().contiguous().unwrap(), b.t().unwrap().contiguous().unwrap());
        for (x, xt, y, yt) in
            [(&a, false, &b, false), (&at, true, &b, false), (&a, false, &bt, true), (&at, true, &bt, true)]
        {
            let ours = matmul(x, xt, y, yt, 0.5).unwrap();
            let diff = (ours - &expected).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(diff < 1e-4, "transposed {xt} {yt}: max difference {diff}");
        }
        let err = matmul(&a, true, &b, false, 1.0).unwrap_err().to_string();
        assert!(err.contains("[37, 53]ᵀ") && err.contains("[53, 29]"), "{err}");
    }
}
