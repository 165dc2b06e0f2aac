//! Training-step measurements (`--train`): `diffctl train lora` (rank 16 on the UNet's attention
//! projections) and `train controlnet` (a new ControlNet copied from the UNet) through the library,
//! batch 1 at the model's native size, as diffusers' `train_text_to_image_lora.py` and
//! `train_controlnet.py` step: VAE encoding and text encoding without gradients, the forward and
//! backward pass, gradient clipping at 1, AdamW. One image (and one condition image) of seeded
//! noise, made in a temporary folder.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Result;
use diffctl::pipeline::{LoadOptions, StableDiffusion};
use diffctl::train::controlnet::{ControlNetStart, train_controlnet};
use diffctl::train::dataset::Dataset;
use diffctl::train::run::{LoraOptions, StepReport, TrainingOptions, train_lora};

use super::measure::{Job, Kind, Outcome, PROMPT, Share, Usage};

/// The LoRA rank of [`Kind::TrainLora`] (diffusers' script defaults to 4; 16 is common).
pub const LORA_RANK: usize = 16;

/// A folder removed when dropped.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes `dir/image.png` (and `dir/conditions/image.png`) of seeded noise, `size` square, and the
/// caption `dir/image.txt`.
fn make_data(dir: &Path, size: usize, seed: u64) -> Result<()> {
    std::fs::create_dir_all(dir.join("conditions"))?;
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut noise = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 56) as u8
    };
    for path in [dir.join("image.png"), dir.join("conditions/image.png")] {
        let pixels: Vec<u8> = (0..size * size * 3).map(|_| noise()).collect();
        image::RgbImage::from_raw(size as u32, size as u32, pixels).expect("size matches").save(path)?;
    }
    std::fs::write(dir.join("image.txt"), PROMPT)?;
    Ok(())
}

/// Runs `job.warmup + job.runs` training steps of `job.kind` and fills `out` with the timed ones.
pub fn run(job: &Job, image_size: usize, out: &mut Outcome) -> Result<()> {
    let t0 = Instant::now();
    let dir = TempDir(std::env::temp_dir().join(format!("diffctl-bench-train-{}", std::process::id())));
    make_data(&dir.0, image_size, job.seed)?;
    let model = StableDiffusion::load(
        &job.model,
        &LoadOptions { dtype: job.dtype, device: job.device.clone(), ..Default::default() },
    )?;
    out.parts.insert("load".into(), t0.elapsed().as_secs_f64());
    let options = TrainingOptions {
        resolution: image_size,
        batch_size: 1,
        steps: job.warmup + job.runs,
        seed: job.seed,
        ..Default::default()
    };
    // The state at the start of every step and at the end.
    let mut marks = vec![Usage::now()];
    let mut last_loss = f32::NAN;
    let mut on_step = |report: &StepReport| {
        marks.push(Usage::now());
        let seconds = marks[marks.len() - 1].wall_since(&marks[marks.len() - 2]);
        let what = match report.step <= job.warmup {
            true => format!("warm-up {}", report.step - 1),
            false => format!("run {}", report.step - 1 - job.warmup),
        };
        eprintln!("  train step {what}: {seconds:.2} s, loss {:.4}", report.loss);
        last_loss = report.loss;
    };
    let output = dir.0.join("output");
    match job.kind {
        Kind::TrainLora => {
            let data = Dataset::open(&dir.0)?;
            let lora = LoraOptions { rank: LORA_RANK, alpha: LORA_RANK as f64, ..Default::default() };
            train_lora(&model, &data, &options, &lora, &output.with_extension("safetensors"), &mut on_step)?;
        }
        Kind::TrainControlnet => {
            let data = Dataset::open(&dir.0)?.with_conditions(&dir.0.join("conditions"))?;
            let start = ControlNetStart::FromUnet { conditioning_channels: 3 };
            train_controlnet(&model, &data, &options, &start, &output, &mut on_step)?;
        }
        other => anyhow::bail!("{} is not a training measurement", other.name()),
    }
    let mut share = Share::default();
    for step in marks[job.warmup..].windows(2) {
        out.runs.push(step[1].wall_since(&step[0]));
        share.add(&step[0], &step[1]);
    }
    (out.cpu_share, out.machine_busy) = share.of(out.threads);
    out.check = format!(
        "loss of the last step {last_loss:.4}, {}",
        if last_loss.is_finite() { "finite" } else { "NOT FINITE" }
    );
    Ok(())
}
