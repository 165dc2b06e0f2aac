//! Training images with captions, in the layouts trainers use:
//! - diffusers' `metadata.jsonl` beside the images (`{"file_name": "a.png", "text": "..."}` per line);
//! - kohya's concept folders `N_name/` (each image seen N times per epoch), captions from a `.txt`
//!   beside each image or else the folder's name after the count;
//! - a plain folder of images, each with its caption in a `.txt` of the same stem.
//!
//! Images are prepared as diffusers' training scripts do (torchvision `Resize(resolution,
//! BILINEAR)`, `CenterCrop`, optional `RandomHorizontalFlip`, `ToTensor`, `Normalize([0.5], [0.5])`):
//! the shorter side scaled to the resolution with Pillow's bilinear filter, the center cropped, the
//! values mapped to [-1, 1]. SVG images are drawn over white straight at the scaled size.
//!
//! The control kinds (ControlNet, T2I-Adapter) pair each image with a condition image: the file of
//! the same name (or the same stem with any image extension) at the same place in a second folder,
//! prepared the same way but kept in [0, 1] (diffusers' `conditioning_image_transforms`).

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use crate::io::image::{load_rgb, rgb_to_tensor};
use crate::io::sorted_entries;
use crate::io::svg::{render_svg, svg_size};
use crate::models::image_processor::{Filter, pil_resize};
use crate::{Error, Result};

/// Image file extensions a dataset folder is searched for.
const IMAGE_EXTENSIONS: [&str; 6] = ["png", "jpg", "jpeg", "webp", "bmp", "svg"];

/// Most times one kohya concept folder may repeat its images (a typo such as `1000000_x` would
/// otherwise make an epoch of millions).
const MAX_REPEATS: usize = 10_000;

/// One training example.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// The image file.
    pub image: PathBuf,
    /// Its caption.
    pub caption: String,
    /// Its condition image, for the control kinds (see [`Dataset::with_conditions`]).
    pub condition: Option<PathBuf>,
}

/// The examples of one epoch, in a fixed order (repeated ones appear that many times).
#[derive(Debug, Clone)]
pub struct Dataset {
    root: PathBuf,
    examples: Vec<Example>,
}

impl Dataset {
    /// Reads the folder `dir` (see the module docs for the layouts).
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::invalid(format!("the training data {} is not a folder", dir.display())));
        }
        let metadata = dir.join("metadata.jsonl");
        let examples = if metadata.is_file() {
            read_metadata(dir, &metadata)?
        } else {
            let concepts = concept_folders(dir)?;
            if concepts.is_empty() { captioned_images(dir, None)? } else { concepts }
        };
        if examples.is_empty() {
            return Err(Error::invalid(format!(
                "no training images in {} (looked for {} files with a .txt caption, metadata.jsonl, or N_name \
                 folders)",
                dir.display(),
                IMAGE_EXTENSIONS.join("/")
            )));
        }
        Ok(Self { root: dir.to_path_buf(), examples })
    }

    /// The images directly in the folder `dir`, each captioned `caption` (DreamBooth's instance and
    /// class images).
    pub fn with_caption(dir: &Path, caption: &str) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::invalid(format!("the images {} are not a folder", dir.display())));
        }
        let examples: Vec<Example> = Self::image_files(dir)?
            .into_iter()
            .map(|image| Example { image, caption: caption.to_string(), condition: None })
            .collect();
        if examples.is_empty() {
            return Err(Error::invalid(format!(
                "no images in {} ({} files)",
                dir.display(),
                IMAGE_EXTENSIONS.join("/")
            )));
        }
        Ok(Self { root: dir.to_path_buf(), examples })
    }

    /// The image files directly in `dir`, sorted by name.
    pub fn image_files(dir: &Path) -> Result<Vec<PathBuf>> {
        Ok(sorted_entries(dir)?
            .into_iter()
            .filter(|p| {
                let extension = p.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
                p.is_file() && extension.is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.as_str()))
            })
            .collect())
    }

    /// The first `count` examples.
    pub fn truncated(mut self, count: usize) -> Self {
        self.examples.truncate(count);
        self
    }

    /// This dataset with each example's condition image from the folder `dir`: at the image's
    /// place relative to the data folder, of the same name or the same stem with any image
    /// extension. Every example must have one.
    pub fn with_conditions(mut self, dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::invalid(format!("the condition images {} are not a folder", dir.display())));
        }
        for example in &mut self.examples {
            let relative = example.image.strip_prefix(&self.root).unwrap_or(&example.image);
            let same_name = dir.join(relative);
            let found = std::iter::once(same_name.clone())
                .chain(IMAGE_EXTENSIONS.iter().map(|e| same_name.with_extension(e)))
                .find(|p| p.is_file());
            example.condition = Some(found.ok_or_else(|| {
                Error::invalid(format!(
                    "{} has no condition image: expected {} (or the same stem as {})",
                    example.image.display(),
                    same_name.display(),
                    IMAGE_EXTENSIONS.join("/")
                ))
            })?);
        }
        Ok(self)
    }

    /// The examples of one epoch.
    pub fn examples(&self) -> &[Example] {
        &self.examples
    }

    /// Example `index`'s image size (width, height) in pixels as stored (an SVG's rounded).
    pub fn size(&self, index: usize) -> Result<(usize, usize)> {
        let path = &self.examples[index].image;
        if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("svg")) {
            let (w, h) = svg_size(path)?;
            return Ok((w.round().max(1.0) as usize, h.round().max(1.0) as usize));
        }
        let (w, h) = image::image_dimensions(path)
            .map_err(|e| Error::Format { path: path.clone(), message: format!("not a readable image: {e}") })?;
        Ok((w as usize, h as usize))
    }

    /// Example `index` as a [3, H, W] tensor in [-1, 1] at `size` (width, height), mirrored with
    /// `flip`.
    pub fn image(&self, index: usize, size: (usize, usize), flip: bool, device: &Device) -> Result<Tensor> {
        let image = fitted_image(&self.examples[index].image, size, flip)?;
        Ok(((rgb_to_tensor(&image, device)?.squeeze(0)? * 2.0)? - 1.0)?)
    }

    /// Example `index`'s image as stored, for an image encoder with its own preprocessing (an SVG
    /// drawn over white with its shorter side `svg_side` pixels).
    pub fn original(&self, index: usize, svg_side: usize) -> Result<image::RgbImage> {
        let path = &self.examples[index].image;
        if !path.extension().is_some_and(|e| e.eq_ignore_ascii_case("svg")) {
            return load_rgb(path);
        }
        let (w, h) = svg_size(path)?;
        let scale = svg_side as f32 / w.min(h).max(f32::MIN_POSITIVE);
        render_svg(path, (w * scale).round().max(1.0) as u32, (h * scale).round().max(1.0) as u32)
    }

    /// Example `index`'s condition image as a [3, H, W] tensor in [0, 1] at `size`, mirrored with
    /// `flip` (as its image is); an error if the dataset has no condition images.
    pub fn condition(&self, index: usize, size: (usize, usize), flip: bool, device: &Device) -> Result<Tensor> {
        let example = &self.examples[index];
        let path = example.condition.as_ref().ok_or_else(|| {
            Error::invalid(format!("{} has no condition image (give the folder of them)", example.image.display()))
        })?;
        Ok(rgb_to_tensor(&fitted_image(path, size, flip)?, device)?.squeeze(0)?)
    }
}

/// The image at `path` scaled to cover `(width, height)` and center-cropped to it, mirrored with
/// `flip`: for a square, torchvision's `Resize(side)`, `CenterCrop` and `RandomHorizontalFlip` as the
/// scripts use them; for an aspect-ratio bucket, kohya's scaling to the bucket's limiting side.
fn fitted_image(path: &Path, (width, height): (usize, usize), flip: bool) -> Result<image::RgbImage> {
    let svg = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("svg"));
    let img = if svg { None } else { Some(load_rgb(path)?) };
    let (w, h) = match &img {
        Some(img) => (img.width() as usize, img.height() as usize),
        None => svg_size(path).map(|(w, h)| (w.round().max(1.0) as usize, h.round().max(1.0) as usize))?,
    };
    // The side that limits the cover is matched, the other truncated (torchvision's Resize(int)).
    let (rw, rh) = if w * height > h * width { (height * w / h, height) } else { (width, width * h / w) };
    if rw == 0 || rh == 0 || rw < width || rh < height {
        return Err(Error::invalid(format!(
            "{}: a {w}x{h} image cannot be scaled to {width}x{height}",
            path.display()
        )));
    }
    let resized = match &img {
        Some(img) => pil_resize(img, rw, rh, Filter::Bilinear),
        None => render_svg(path, rw as u32, rh as u32)?,
    };
    // CenterCrop: torchvision rounds the offsets to the nearest integer.
    let (left, top) = (((rw - width) as f64 / 2.0).round() as u32, ((rh - height) as f64 / 2.0).round() as u32);
    let cropped = image::imageops::crop_imm(&resized, left, top, width as u32, height as u32).to_image();
    Ok(if flip { image::imageops::flip_horizontal(&cropped) } else { cropped })
}

/// diffusers' `metadata.jsonl`: one JSON object a line with `file_name` and `text`.
fn read_metadata(dir: &Path, path: &Path) -> Result<Vec<Example>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut examples = Vec::new();
    for (line_no, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let bad = |what: &str| Error::Format { path: path.into(), message: format!("line {}: {what}", line_no + 1) };
        let entry: serde_json::Value = serde_json::from_str(line).map_err(|e| bad(&format!("not JSON: {e}")))?;
        let file = entry["file_name"].as_str().ok_or_else(|| bad("no `file_name` string"))?;
        let caption = entry["text"].as_str().ok_or_else(|| bad("no `text` string"))?;
        let image = dir.join(file);
        if !image.is_file() {
            return Err(bad(&format!("`file_name` {file} is not a file in {}", dir.display())));
        }
        examples.push(Example { image, caption: caption.to_string(), condition: None });
    }
    Ok(examples)
}

/// kohya's `N_name` folders, each image repeated N times, sorted by folder name.
fn concept_folders(dir: &Path) -> Result<Vec<Example>> {
    let mut examples = Vec::new();
    for entry in sorted_entries(dir)? {
        let name = entry.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
        let Some((count, concept)) = name.split_once('_') else { continue };
        let Ok(repeats) = count.parse::<usize>() else { continue };
        if !entry.is_dir() {
            continue;
        }
        if !(1..=MAX_REPEATS).contains(&repeats) {
            return Err(Error::invalid(format!(
                "{}: a concept folder repeats its images 1 to {MAX_REPEATS} times, not {repeats}",
                entry.display()
            )));
        }
        let images = captioned_images(&entry, Some(concept))?;
        for _ in 0..repeats {
            examples.extend(images.iter().cloned());
        }
    }
    Ok(examples)
}

/// The images directly in `dir`, captioned by the `.txt` of the same stem, else by `fallback`.
fn captioned_images(dir: &Path, fallback: Option<&str>) -> Result<Vec<Example>> {
    let mut examples = Vec::new();
    for image in Dataset::image_files(dir)? {
        let caption_file = image.with_extension("txt");
        let caption = if caption_file.is_file() {
            std::fs::read_to_string(&caption_file).map_err(|e| Error::io(&caption_file, e))?.trim().to_string()
        } else if let Some(fallback) = fallback {
            fallback.to_string()
        } else {
            return Err(Error::invalid(format!(
                "{} has no caption: put it in {} (or list the images in metadata.jsonl)",
                image.display(),
                caption_file.display()
            )));
        };
        examples.push(Example { image, caption, condition: None });
    }
    Ok(examples)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(path: &Path, (w, h): (u32, u32)) {
        image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 40) as u8, (y * 40) as u8, 128])).save(path).unwrap();
    }

    /// The three layouts, the epoch's repeats, and the prepared image's size and range.
    #[test]
    fn reads_the_three_layouts() {
        let dir = tempfile::tempdir().unwrap();
        png(&dir.path().join("a.png"), (6, 4));
        std::fs::write(dir.path().join("a.txt"), "a red square\n").unwrap();
        let data = Dataset::open(dir.path()).unwrap();
        assert_eq!(
            data.examples(),
            [Example { image: dir.path().join("a.png"), caption: "a red square".into(), condition: None }]
        );
        let image = data.image(0, (4, 4), true, &Device::Cpu).unwrap();
        assert_eq!(image.dims(), [3, 4, 4]);
        let values = image.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(values.iter().all(|v| (-1.0..=1.0).contains(v)));

        std::fs::write(dir.path().join("metadata.jsonl"), "{\"file_name\": \"a.png\", \"text\": \"listed\"}\n")
            .unwrap();
        assert_eq!(Dataset::open(dir.path()).unwrap().examples()[0].caption, "listed");

        let vector = tempfile::tempdir().unwrap();
        std::fs::write(
            vector.path().join("dot.svg"),
            r##"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 2 2"><rect width="1" height="2" fill="#000"/></svg>"##,
        )
        .unwrap();
        std::fs::write(vector.path().join("dot.txt"), "half black").unwrap();
        let data = Dataset::open(vector.path()).unwrap();
        let image = data.image(0, (4, 4), false, &Device::Cpu).unwrap();
        let row = image.get(0).unwrap().get(0).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(row, [-1.0, -1.0, 1.0, 1.0], "black left half drawn over white at 4x4");

        let kohya = tempfile::tempdir().unwrap();
        std::fs::create_dir(kohya.path().join("3_sks dog")).unwrap();
        png(&kohya.path().join("3_sks dog").join("x.png"), (4, 4));
        let data = Dataset::open(kohya.path()).unwrap();
        assert_eq!(data.examples().len(), 3);
        assert!(data.examples().iter().all(|e| e.caption == "sks dog"));
    }

    #[test]
    fn bad_folders_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let err = Dataset::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("no training images"), "{err}");
        png(&dir.path().join("b.png"), (4, 4));
        let err = Dataset::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("b.png has no caption"), "{err}");
        std::fs::write(dir.path().join("metadata.jsonl"), "{\"file_name\": \"missing.png\", \"text\": \"x\"}\n")
            .unwrap();
        let err = Dataset::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("line 1") && err.contains("missing.png"), "{err}");
        std::fs::write(dir.path().join("metadata.jsonl"), "not json\n").unwrap();
        assert!(Dataset::open(dir.path()).unwrap_err().to_string().contains("not JSON"));
    }
}
