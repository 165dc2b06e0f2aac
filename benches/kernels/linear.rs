//! `diffctl::kernels::linear::linear` against candle's `Linear` on the linear layers of an SD1.5 UNet
//! step (batch 2, 64x64 latents); with bf16 weights too where the CPU has bf16 dot products.

use candle_core::{DType, Device, Module, Tensor};
use diffctl::kernels::bf16_gemm;
use diffctl::kernels::linear::linear;

use super::timing::{median_ms, report, report_variant};

/// (what, rows, in, out).
const CASES: &[(&str, usize, usize, usize)] = &[
    ("attn q/k/v/out 64x64", 8192, 320, 320),
    ("ff geglu proj 64x64", 8192, 320, 2560),
    ("ff out 64x64", 8192, 1280, 320),
    ("attn q/k/v/out 32x32", 2048, 640, 640),
    ("attn q/k/v/out 16x16", 512, 1280, 1280),
    ("attn2 k/v from context", 154, 768, 1280),
];

/// Runs this benchmark: one line per case with GFLOP/s.
pub fn run() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    for &(what, rows, inp, out) in CASES {
        let xs = Tensor::randn(0f32, 1.0, (rows, inp), &dev)?;
        let weight = Tensor::randn(0f32, 1.0 / (inp as f32).sqrt(), (out, inp), &dev)?;
        let bias = Tensor::randn(0f32, 1.0, out, &dev)?;
        let flop = 2.0 * (rows * inp * out) as f64;
        let ours = median_ms(7, || {
            linear(&xs, &weight, Some(&bias))?;
            Ok(())
        })?;
        let plain_layer = candle_nn::Linear::new(weight.clone(), Some(bias.clone()));
        let plain = median_ms(7, || {
            plain_layer.forward(&xs)?;
            Ok(())
        })?;
        report(&format!("linear {what} {rows}x{inp}→{out}"), ours, plain);
        println!("{:<60} {:>9.1} GFLOP/s", "", flop / ours / 1e6);
        if bf16_gemm::available() {
            let weight = weight.to_dtype(DType::BF16)?;
            let bf16 = median_ms(7, || {
                linear(&xs, &weight, Some(&bias))?;
                Ok(())
            })?;
            let label = if diffctl::kernels::amx::available() { "bf16 weights (AMX)" } else { "bf16 weights" };
            report_variant(label, bf16, flop, ours);
            if diffctl::kernels::amx::available() {
                // The two bf16 products alone on the same operands: AVX512-BF16 against AMX tiles.
                let x = xs.flatten_all()?.to_vec1::<f32>()?;
                let w: Vec<u16> = weight.flatten_all()?.to_vec1::<half::bf16>()?.iter().map(|v| v.to_bits()).collect();
                let mut y = vec![0f32; rows * out];
                let dims = (rows, out, inp);
                let lhs = bf16_gemm::Operand::from(diffctl::kernels::sgemm::MatRef::rows(x.as_ptr(), inp));
                let rhs = bf16_gemm::Operand::bf16_transposed(w.as_ptr(), inp);
                let zero = diffctl::kernels::Start::Zero;
                // SAFETY: x [rows, inp], w [out, inp] read as [inp, out], y [rows, out].
                let avx512 = median_ms(7, || {
                    unsafe {
                        bf16_gemm::matmul(
                            dims,
                            y.as_mut_ptr(),
                            out,
                            zero,
                            bf16_gemm::Lhs::Strided(lhs),
                            bf16_gemm::Rhs::Strided(rhs),
                            1.0,
                            true,
                        )
                    };
                    Ok(())
                })?;
                // SAFETY: as above; AMX checked.
                let tiles = median_ms(7, || {
                    unsafe { diffctl::kernels::amx::matmul(dims, y.as_mut_ptr(), out, zero, lhs, rhs, 1.0, true) };
                    Ok(())
                })?;
                report_variant("  product only, AVX512-BF16", avx512, flop, ours);
                report_variant("  product only, AMX", tiles, flop, ours);
            }
        }
    }
    Ok(())
}
