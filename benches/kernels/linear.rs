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
        }
    }
    Ok(())
}
