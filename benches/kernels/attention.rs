//! Fused attention ([`diffctl::kernels::attention`]) against plain candle (`q kᵀ`, scale,
//! `softmax_last_dim`, `· v`, the unfused path) on the SD1.5 UNet and VAE attention shapes; with bf16
//! products too where the CPU has them.

use candle_core::{Device, Tensor};
use diffctl::kernels::attention::scaled_dot_product;
use diffctl::kernels::bf16_gemm;

use super::timing::{median_ms, report, report_variant};

/// (what, q [B, H, Lq, D], Lk) for each benchmarked attention.
const CASES: [(&str, [usize; 4], usize); 5] = [
    ("self-attention 64x64 latents", [2, 8, 4096, 40], 4096),
    ("self-attention 32x32 latents", [2, 8, 1024, 80], 1024),
    ("self-attention 16x16 latents", [2, 8, 256, 160], 256),
    ("cross-attention 64x64 latents, 77 tokens", [2, 8, 4096, 40], 77),
    ("VAE mid-block attention", [1, 1, 4096, 512], 4096),
];

/// Runs this benchmark.
pub fn run() -> anyhow::Result<()> {
    for (what, [b, h, lq, d], lk) in CASES {
        let q = Tensor::randn(0f32, 1.0, (b, h, lq, d), &Device::Cpu)?;
        let k = Tensor::randn(0f32, 1.0, (b, h, lk, d), &Device::Cpu)?;
        let v = Tensor::randn(0f32, 1.0, (b, h, lk, d), &Device::Cpu)?;
        let scale = (d as f64).powf(-0.5);
        let runs = if lq * lk >= 1 << 24 { 3 } else { 10 };
        let ours = median_ms(runs, || {
            scaled_dot_product(&q, &k, &v, scale, false)?;
            Ok(())
        })?;
        let plain = median_ms(runs, || {
            let scores = (q.matmul(&k.t()?)? * scale)?;
            candle_nn::ops::softmax_last_dim(&scores)?.matmul(&v)?;
            Ok(())
        })?;
        report(&format!("{what} q [{b},{h},{lq},{d}] Lk {lk}"), ours, plain);
        let flop = 4.0 * (b * h * lq * lk * d) as f64;
        println!("{:<60} {:>9.1} GFLOP/s", "", flop / ours / 1e6);
        if bf16_gemm::available() {
            let bf16 = median_ms(runs, || {
                scaled_dot_product(&q, &k, &v, scale, true)?;
                Ok(())
            })?;
            report_variant("bf16 products", bf16, flop, ours);
        }
    }
    Ok(())
}
