//! How well a model draws the emoji it was trained on: for `--names` training captions spread over
//! the data set, generate `--samples` images each (one batch, one seed), rank every training
//! image by pixel distance to each sample, and report how often the prompted emoji is the nearest
//! (top-1) or among the five nearest (top-5). Writes a contact sheet: per row the training image,
//! then its samples.
//!
//! ```sh
//! cargo run --release --example emoji_accuracy -- --model assets/emoji-model \
//!     --data target/emoji-dataset --sheet docs/emoji-samples.png
//! ```

use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::Parser;
use diffctl::noise::SeededNoise;
use diffctl::pipeline::{LoadOptions, StableDiffusion};
use diffctl::request::Request;
use diffctl::train::dataset::Dataset;

/// Arguments.
#[derive(Parser)]
struct Args {
    /// The model folder.
    #[arg(long)]
    model: PathBuf,
    /// The training data (tools/emoji/build_dataset.py's folder).
    #[arg(long)]
    data: PathBuf,
    /// Training captions to prompt.
    #[arg(long, default_value_t = 100)]
    names: usize,
    /// Images per caption.
    #[arg(long, default_value_t = 4)]
    samples: usize,
    /// Denoising steps.
    #[arg(long, default_value_t = 30)]
    steps: usize,
    /// Guidance scale.
    #[arg(long, default_value_t = 4.0)]
    guidance: f64,
    /// Seed of the first caption's batch (the n-th caption uses seed + n).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Where to write the contact sheet (PNG).
    #[arg(long)]
    sheet: Option<PathBuf>,
    /// Rows of the contact sheet.
    #[arg(long, default_value_t = 16)]
    sheet_rows: usize,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let data = Dataset::open(&args.data)?;
    let mut model = StableDiffusion::load(&args.model, &LoadOptions::default())
        .with_context(|| format!("loading {}", args.model.display()))?;
    let size = model.unet.config().sample_size.unwrap_or(32) * model.vae_scale_factor();
    let examples = data.examples();
    // The training images as the model saw them, in [0, 1], one row each: [N, 3·size·size].
    let references = (0..examples.len())
        .map(|i| Ok(((data.image(i, (size, size), false, &Device::Cpu)? + 1.0)? / 2.0)?.flatten_all()?))
        .collect::<Result<Vec<_>>>()?;
    let references = Tensor::stack(&references, 0)?;
    let names = args.names.min(examples.len());
    let (mut top1, mut top5, mut total) = (0usize, 0usize, 0usize);
    let mut rows = Vec::new();
    for n in 0..names {
        let index = n * examples.len() / names;
        let request = Request {
            prompt: examples[index].caption.clone(),
            steps: args.steps,
            guidance: args.guidance,
            batch: args.samples,
            seed: args.seed + n as u64,
            ..Default::default()
        };
        let options = LoadOptions::default();
        let mut prepared = request.prepare(&mut model, &options)?;
        let mut noise = SeededNoise::new(request.seed);
        let images = model.generate(&prepared.generate, &mut prepared.controls, &mut noise, &mut |_| {})?.images;
        let flat = images.flatten_from(1)?.to_dtype(DType::F32)?;
        // Squared distances [samples, N] = |a|² − 2 a·b + |b|².
        let distances = flat
            .sqr()?
            .sum_keepdim(1)?
            .broadcast_add(&references.sqr()?.sum_keepdim(1)?.t()?)?
            .sub(&(flat.matmul(&references.t()?)? * 2.0)?)?
            .to_vec2::<f32>()?;
        for row in &distances {
            let own = row[index];
            let closer = row.iter().filter(|&&d| d < own).count();
            top1 += usize::from(closer == 0);
            top5 += usize::from(closer < 5);
            total += 1;
        }
        if rows.len() < args.sheet_rows {
            rows.push((index, images));
        }
        eprint!("\r{}/{names} captions", n + 1);
    }
    eprintln!();
    println!(
        "{names} captions x {} samples: top-1 {:.1} %, top-5 {:.1} % (nearest of {} training images by pixel \
         distance; {} steps, guidance {})",
        args.samples,
        100.0 * top1 as f64 / total as f64,
        100.0 * top5 as f64 / total as f64,
        examples.len(),
        args.steps,
        args.guidance
    );
    if let Some(path) = &args.sheet {
        let cells: Vec<Vec<Tensor>> = rows
            .iter()
            .map(|(index, images)| {
                let reference = references.get(*index)?.reshape((3, size, size))?;
                let mut cells = vec![reference];
                cells.extend((0..args.samples).map(|s| images.get(s)).collect::<candle_core::Result<Vec<_>>>()?);
                Ok(cells)
            })
            .collect::<Result<_>>()?;
        contact_sheet(&cells, size, 3)?.save(path).with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// A grid of [3, size, size] images in [0, 1], each scaled up `zoom` times (nearest) with a
/// white gap, as an RGB image.
fn contact_sheet(rows: &[Vec<Tensor>], size: usize, zoom: usize) -> Result<image::RgbImage> {
    let (gap, cell) = (2 * zoom, size * zoom);
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let (w, h) = (columns * (cell + gap) + gap, rows.len() * (cell + gap) + gap);
    let mut sheet = image::RgbImage::from_pixel(w as u32, h as u32, image::Rgb([255, 255, 255]));
    for (r, row) in rows.iter().enumerate() {
        for (c, img) in row.iter().enumerate() {
            let values = (img.clamp(0f32, 1f32)? * 255.0)?.round()?.to_dtype(DType::U8)?.to_vec3::<u8>()?;
            for y in 0..cell {
                for x in 0..cell {
                    let px = image::Rgb([0, 1, 2].map(|ch| values[ch][y / zoom][x / zoom]));
                    sheet.put_pixel((gap + c * (cell + gap) + x) as u32, (gap + r * (cell + gap) + y) as u32, px);
                }
            }
        }
    }
    Ok(sheet)
}
