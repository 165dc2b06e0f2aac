//! DreamBooth (diffusers' `train_dreambooth.py` and `train_dreambooth_lora.py`): a subject's images,
//! all captioned with one instance prompt ("a photo of sks dog"), fine-tune the model fully or
//! through LoRA; with prior preservation, every batch also carries as many class images
//! ("a photo of dog") whose loss keeps the class from drifting. Missing class images are generated
//! by the model itself before training, as the scripts do, and kept in the class folder for the
//! next run.

use std::path::{Path, PathBuf};

use super::dataset::Dataset;
use super::run::{
    FullOptions, FullTrainee, LoraOptions, LoraTrainee, PriorPreservation, StepReport, TrainingOptions, check,
    run_steps,
};
use crate::io::image::{save_png, to_rgb8};
use crate::noise::SeededNoise;
use crate::pipeline::{GenerateRequest, StableDiffusion};
use crate::{Error, Result};

/// What a DreamBooth run trains.
#[derive(Debug, Clone)]
pub enum DreamBoothMethod {
    /// LoRA adapters (written as a kohya file).
    Lora(LoraOptions),
    /// The whole UNet, maybe with the text encoder (written as a diffusers folder); the model
    /// must be a diffusers folder, named here.
    Full(FullOptions, PathBuf),
}

/// The class images of prior preservation.
#[derive(Debug, Clone)]
pub struct ClassImages {
    /// Their caption.
    pub prompt: String,
    /// Their folder; created, and filled up to `count` with images the model generates.
    pub dir: PathBuf,
    /// How many the run uses (diffusers' `num_class_images`).
    pub count: usize,
    /// The class half's loss weight (diffusers' `prior_loss_weight`).
    pub weight: f64,
    /// Sampling steps of each generated class image.
    pub steps: usize,
    /// Guidance scale of each generated class image.
    pub guidance: f64,
}

/// A DreamBooth run's class and method.
#[derive(Debug, Clone)]
pub struct DreamBoothOptions {
    /// Prior preservation, if wanted.
    pub class: Option<ClassImages>,
    /// What trains.
    pub method: DreamBoothMethod,
}

/// Trains `model` on the subject images `data` (each captioned with the instance prompt, see
/// [`Dataset::with_caption`]; and with
/// `dreambooth.class` on class images, generating missing ones first; `on_class_image` hears of
/// each generated one as (done, missing)) and writes the result to `output`; `on_step` hears of
/// every step.
pub fn train_dreambooth(
    model: &mut StableDiffusion,
    data: &Dataset,
    options: &TrainingOptions,
    dreambooth: &DreamBoothOptions,
    output: &Path,
    on_class_image: &mut dyn FnMut(usize, usize),
    on_step: &mut dyn FnMut(&StepReport),
) -> Result<()> {
    check(model, options)?;
    if let DreamBoothMethod::Lora(_) = dreambooth.method {
        crate::io::output::check_output_path(output)?;
    }
    let prior = match &dreambooth.class {
        Some(class) => Some(PriorPreservation {
            class_data: class_images(model, class, options, on_class_image)?,
            weight: class.weight,
        }),
        None => None,
    };
    match &dreambooth.method {
        DreamBoothMethod::Lora(lora) => {
            let trainee = LoraTrainee::attach(model, options.seed, lora)?;
            let result = run_steps(model, data, prior.as_ref(), options, output, &trainee, on_step);
            trainee.detach(model);
            result
        }
        DreamBoothMethod::Full(full, source) => {
            let trainee = FullTrainee::new(model, source, output, full)?;
            run_steps(model, data, prior.as_ref(), options, output, &trainee, on_step)
        }
    }
}

/// The first `class.count` class images of the class folder, after generating the missing ones
/// with `model` (square at the training resolution, seeded by the run's seed and the image's
/// number) and writing them there as `class-NNNNN.png`.
fn class_images(
    model: &StableDiffusion,
    class: &ClassImages,
    options: &TrainingOptions,
    on_class_image: &mut dyn FnMut(usize, usize),
) -> Result<Dataset> {
    if class.count == 0 {
        return Err(Error::invalid("prior preservation needs at least one class image"));
    }
    std::fs::create_dir_all(&class.dir).map_err(|e| Error::io(&class.dir, e))?;
    let existing = Dataset::image_files(&class.dir)?;
    let missing = class.count.saturating_sub(existing.len());
    for done in 0..missing {
        let number = existing.len() + done;
        let request = GenerateRequest {
            prompt: class.prompt.clone(),
            steps: class.steps,
            guidance: class.guidance,
            width: options.resolution,
            height: options.resolution,
            batch: 1,
            ..Default::default()
        };
        let mut noise = SeededNoise::new(options.seed.wrapping_add(number as u64));
        let generated = model.generate(&request, &mut [], &mut noise, &mut |_| {})?;
        let image = to_rgb8(&generated.images)?.into_iter().next().ok_or_else(|| Error::invalid("no class image"))?;
        let path = (number..).map(|n| class.dir.join(format!("class-{n:05}.png"))).find(|p| !p.exists());
        save_png(&path.ok_or_else(|| Error::invalid("no free class image name"))?, &image)?;
        on_class_image(done + 1, missing);
    }
    Ok(Dataset::with_caption(&class.dir, &class.prompt)?.truncated(class.count))
}
