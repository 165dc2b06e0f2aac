//! Timing helper shared by the kernel benchmarks.

use std::time::Instant;

use diffctl::allocator::LargeBlockCache;

/// Runs `f` once to warm up, then `runs` times, and returns the median wall time in milliseconds.
/// Freed large buffers are kept for the next run, as the UNet and VAE keep them between their layers
/// ([`LargeBlockCache`]), so that the kernel's zeroing of fresh pages is not timed.
pub fn median_ms(runs: usize, mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<f64> {
    let _keep = LargeBlockCache::keep_up_to(2 << 30);
    f()?;
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = Instant::now();
        f()?;
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// Prints the indented line of a variant of the kernel (bf16 weights or products): its time, its
/// GFLOP/s for `flop` operations and its ratio to the f32 kernel's `f32_ms`.
pub fn report_variant(what: &str, ms: f64, flop: f64, f32_ms: f64) {
    println!("{:<60} {what} {ms:>9.1} ms, {:>9.1} GFLOP/s, bf16/f32 {:.2}", "", flop / ms / 1e6, ms / f32_ms);
}

/// Prints one line: the kernel, the plain op and their ratio.
pub fn report(what: &str, ours_ms: f64, plain_ms: f64) {
    println!("{what:<60} ours {ours_ms:>9.1} ms   candle {plain_ms:>9.1} ms   ours/candle {:.2}", ours_ms / plain_ms);
}
