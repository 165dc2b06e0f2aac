//! Micro-benchmarks of the CPU kernels in `diffctl::kernels` against the plain candle ops they
//! replace, on the shapes of an SD1.5 step at 512x512 (batch 2) and of the VAE decoder.
//!
//! ```sh
//! cargo bench --bench kernels -- [attention|conv|group_norm|linear ...]
//! ```
//!
//! Thread count: `RAYON_NUM_THREADS` (default: the physical cores), as candle.

mod kernels {
    pub mod attention;
    pub mod conv;
    pub mod group_norm;
    pub mod linear;
    pub mod timing;
}

/// The engine's allocator, so that buffers come and go as in a generation.
#[global_allocator]
static ALLOCATOR: diffctl::allocator::TensorAllocator = diffctl::allocator::TensorAllocator;

fn main() -> anyhow::Result<()> {
    diffctl::allocator::configure();
    let only: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let wants = |name: &str| only.is_empty() || only.iter().any(|o| o == name);
    println!("{} threads", candle_core::utils::get_num_threads());
    if wants("attention") {
        kernels::attention::run()?;
    }
    if wants("conv") {
        kernels::conv::run()?;
    }
    if wants("group_norm") {
        kernels::group_norm::run()?;
    }
    if wants("linear") {
        kernels::linear::run()?;
    }
    Ok(())
}
