//! `diffctl::kernels::conv::conv2d` against candle's `conv2d` (+ bias) on the convolutions of an
//! SD1.5 UNet step (batch 2, 64x64 latents) and of the VAE decoder at 512x512; with bf16 weights too
//! where the CPU has bf16 dot products.

use candle_core::{DType, Device, Tensor};
use diffctl::kernels::bf16_gemm;
use diffctl::kernels::conv::{conv2d, cpu_path};

use super::timing::{median_ms, report, report_variant};

/// (what, B, Cin, H, W, Cout, kernel, stride, padding).
type Case = (&'static str, usize, usize, usize, usize, usize, usize, usize, usize);

const CASES: &[Case] = &[
    ("unet 3x3", 2, 320, 64, 64, 320, 3, 1, 1),
    ("unet 3x3", 2, 640, 32, 32, 640, 3, 1, 1),
    ("unet 3x3", 2, 1280, 16, 16, 1280, 3, 1, 1),
    ("unet 3x3", 2, 1280, 8, 8, 1280, 3, 1, 1),
    ("unet downsample", 2, 320, 64, 64, 320, 3, 2, 1),
    ("unet proj_in 1x1", 2, 320, 64, 64, 320, 1, 1, 0),
    ("unet conv_in", 2, 4, 64, 64, 320, 3, 1, 1),
    ("vae 3x3", 1, 512, 64, 64, 512, 3, 1, 1),
    ("vae 3x3", 1, 512, 128, 128, 512, 3, 1, 1),
    ("vae 3x3", 1, 256, 256, 256, 256, 3, 1, 1),
    ("vae 3x3", 1, 128, 512, 512, 128, 3, 1, 1),
];

/// Runs this benchmark: one line per case with the path taken and the direct-convolution GFLOP/s.
pub fn run() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    for &(what, b, cin, h, w, cout, k, stride, padding) in CASES {
        let x = Tensor::randn(0f32, 1.0, (b, cin, h, w), &dev)?;
        let weight = Tensor::randn(0f32, 1.0 / ((cin * k * k) as f32).sqrt(), (cout, cin, k, k), &dev)?;
        let bias = Tensor::randn(0f32, 1.0, cout, &dev)?;
        let (ho, wo) = ((h + 2 * padding - k) / stride + 1, (w + 2 * padding - k) / stride + 1);
        // Larger problems get fewer runs so the whole benchmark stays within a few minutes.
        let flop = 2.0 * (b * cout * ho * wo * cin * k * k) as f64;
        let runs = if flop > 3e10 { 5 } else { 9 };
        let ours = median_ms(runs, || {
            conv2d(&x, &weight, Some(&bias), stride, padding)?;
            Ok(())
        })?;
        let bias4 = bias.reshape((1, cout, 1, 1))?;
        let plain = median_ms(runs, || {
            x.conv2d(&weight, padding, stride, 1, 1)?.broadcast_add(&bias4)?;
            Ok(())
        })?;
        let path = cpu_path(b, cin, h, w, k, stride, padding, false);
        let label = format!("conv {what} {b}x{cin}x{h}x{w}→{cout} k{k} s{stride} [{path:?}]");
        report(&label, ours, plain);
        println!("{:<60} {:>9.1} GFLOP/s (direct-conv equivalent)", "", flop / ours / 1e6);
        if bf16_gemm::available() {
            let weight = weight.to_dtype(DType::BF16)?;
            let bf16 = median_ms(runs, || {
                conv2d(&x, &weight, Some(&bias), stride, padding)?;
                Ok(())
            })?;
            let path = cpu_path(b, cin, h, w, k, stride, padding, true);
            report_variant(&format!("bf16 weights [{path:?}]"), bf16, flop, ours);
        }
    }
    Ok(())
}
