//! IP-Adapters in a request: several adapters, each with its prompt images (through a CLIP image
//! encoder), a face embedding (FaceID) or precomputed projection inputs, its scale and masks.
//!
//! The inputs come as lists in the order of the adapters they belong to, as the command line gives
//! them: which adapter takes images and which a face embedding is known only once the adapter files
//! are read, so the lists are matched to the adapters here. Errors name the lists by their flags.

use std::path::PathBuf;

use crate::control::Control;
use crate::control::cross_attention::ip_adapter::read_embedding_file;
use crate::control::cross_attention::{
    ImagePromptEmbeds, IpAdapter, IpAdapterWeights, IpScale, ProjectionInput, RegionMask,
};
use crate::error::ResultExt;
use crate::io::image::load_rgb;
use crate::pipeline::LoadOptions;
use crate::{Error, Result};

use super::{BuildContext, ImageEncoders};

/// The IP-Adapters of a request and their inputs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct IpAdapterRequest {
    /// Adapter files in the h94 layout (`--ip-adapter`).
    pub adapters: Vec<PathBuf>,
    /// CLIP image-encoder folders: one for every adapter that takes images, or one per such
    /// adapter (`--image-encoder`).
    pub image_encoders: Vec<PathBuf>,
    /// The prompt images of each adapter that takes images, in order (`--ip-image`).
    pub images: Vec<Vec<PathBuf>>,
    /// The face embedding of each FaceID adapter, in order (`--ip-face-embedding`).
    pub face_embeddings: Vec<PathBuf>,
    /// Precomputed projection inputs, one per adapter, replacing images and face embeddings
    /// (`--ip-image-embeds`).
    pub image_embeds: Vec<PathBuf>,
    /// Scales: one for all adapters or one per adapter (`--ip-scale`; default 1).
    pub scales: Vec<IpScale>,
    /// Region masks per adapter (one per image, at the output size; `None` for an adapter without
    /// masks), or empty for no masks at all (`--ip-mask`).
    pub masks: Vec<Option<Vec<PathBuf>>>,
}

impl IpAdapterRequest {
    /// Checks that no input is given without an adapter and that per-adapter lists fit.
    pub(super) fn validate(&self) -> Result<()> {
        let count = self.adapters.len();
        if count == 0 {
            let given = [
                ("--ip-image", self.images.len()),
                ("--ip-face-embedding", self.face_embeddings.len()),
                ("--ip-image-embeds", self.image_embeds.len()),
                ("--ip-scale", self.scales.len()),
                ("--ip-mask", self.masks.len()),
                ("--image-encoder", self.image_encoders.len()),
            ];
            if let Some((flag, _)) = given.iter().find(|(_, n)| *n > 0) {
                return Err(Error::invalid(format!("{flag} was given without --ip-adapter")));
            }
        }
        if self.scales.len() > 1 && self.scales.len() != count {
            return Err(Error::invalid(format!(
                "--ip-scale was given {} times for {count} adapters (give it once, or once per adapter)",
                self.scales.len()
            )));
        }
        if !self.masks.is_empty() && self.masks.len() != count {
            return Err(Error::invalid(format!(
                "--ip-mask was given {} times for {count} adapters (once per --ip-adapter, `none` for an adapter \
                 without masks)",
                self.masks.len()
            )));
        }
        if !self.image_embeds.is_empty() {
            if self.image_embeds.len() != count {
                return Err(Error::invalid(format!(
                    "--ip-image-embeds was given {} times for {count} adapters (give one file per --ip-adapter)",
                    self.image_embeds.len()
                )));
            }
            if !self.images.is_empty() || !self.face_embeddings.is_empty() {
                return Err(Error::invalid(
                    "--ip-image-embeds replaces --ip-image and --ip-face-embedding: give one or the other",
                ));
            }
        }
        Ok(())
    }

    /// Builds one control per adapter for the generation `cx` describes. A FaceID adapter's
    /// attention LoRA is owned by its control: attached while a generation runs.
    pub(super) fn build(&self, cx: &mut BuildContext) -> Result<Vec<Box<dyn Control>>> {
        let (model, options, width, height) = (cx.model, cx.options, cx.width, cx.height);
        let encoders = &mut cx.encoders;
        let adapters = self
            .adapters
            .iter()
            .map(|p| IpAdapterWeights::load(p, model.unet.config(), options.dtype, &options.device))
            .collect::<Result<Vec<_>>>()?;
        let embeds = self.prompt_embeds(&adapters, options, encoders)?;
        let masks = self.load_masks(&adapters, &embeds, width, height)?;
        let scales = super::per_item("--ip-scale", &self.scales, adapters.len(), IpScale::default())?;
        adapters
            .iter()
            .zip(embeds)
            .zip(masks)
            .zip(scales)
            .map(|(((weights, embeds), masks), scale)| {
                Ok(Box::new(IpAdapter::new(weights, &embeds, &scale, masks)?) as Box<dyn Control>)
            })
            .collect()
    }

    /// Each adapter's projection inputs: the precomputed ones, or those of its images through its
    /// image encoder, or its face embedding.
    fn prompt_embeds(
        &self,
        adapters: &[IpAdapterWeights],
        options: &LoadOptions,
        encoders: &mut ImageEncoders,
    ) -> Result<Vec<ImagePromptEmbeds>> {
        let device = &options.device;
        if !self.image_embeds.is_empty() {
            return adapters
                .iter()
                .zip(&self.image_embeds)
                .map(|(a, path)| {
                    let t = read_embedding_file(path, device)?;
                    ImagePromptEmbeds::from_diffusers(&t, a.projection().input()).context(|| path.display().to_string())
                })
                .collect();
        }
        let takes_images = adapters.iter().filter(|a| a.projection().input() != ProjectionInput::FaceEmbedding).count();
        let faceid = adapters.len() - takes_images;
        if self.images.len() != takes_images {
            return Err(Error::invalid(format!(
                "--ip-image was given {} times for {takes_images} adapter(s) that take images (one per adapter, \
                 images of one adapter comma-separated)",
                self.images.len()
            )));
        }
        if self.face_embeddings.len() != faceid {
            return Err(Error::invalid(format!(
                "--ip-face-embedding was given {} times for {faceid} FaceID adapter(s)",
                self.face_embeddings.len()
            )));
        }
        let dirs: Vec<Option<PathBuf>> = match self.image_encoders.len() {
            0 => vec![None; takes_images],
            1 => vec![Some(self.image_encoders[0].clone()); takes_images],
            n if n == takes_images => self.image_encoders.iter().cloned().map(Some).collect(),
            n => {
                return Err(Error::invalid(format!(
                    "--image-encoder was given {n} times for {takes_images} adapters that take images (give it \
                     once, or once per adapter that takes images)"
                )));
            }
        };
        let (mut images, mut faces, mut dirs) = (self.images.iter(), self.face_embeddings.iter(), dirs.into_iter());
        let mut out = Vec::with_capacity(adapters.len());
        for a in adapters {
            let projection = a.projection();
            if projection.input() == ProjectionInput::FaceEmbedding {
                let path = faces.next().ok_or_else(|| Error::invalid("face embeddings exhausted"))?;
                let t = read_embedding_file(path, device)?;
                let embeds = ImagePromptEmbeds::from_face_embeddings(&t).context(|| path.display().to_string())?;
                let dim = embeds.positive.dim(1)?;
                if dim != projection.input_dim() {
                    return Err(Error::invalid(format!(
                        "{}: the face embedding is {dim} wide, the FaceID adapter {} expects {}",
                        path.display(),
                        a.path().display(),
                        projection.input_dim()
                    )));
                }
                out.push(embeds);
                continue;
            }
            let list = images.next().ok_or_else(|| Error::invalid("prompt images exhausted"))?;
            let Some(dir) = dirs.next().flatten() else {
                return Err(Error::invalid(format!(
                    "{}: a {} IP-Adapter needs --image-encoder DIR (the CLIP vision model it was trained with)",
                    a.path().display(),
                    projection.variant()
                )));
            };
            let encoder = encoders.get(&dir, options)?;
            let (width, what) = match projection.input() {
                ProjectionInput::ImageEmbeds => (encoder.model.config().projection_dim(), "projection_dim"),
                _ => (encoder.model.config().hidden_size, "hidden_size"),
            };
            if width != projection.input_dim() {
                return Err(Error::invalid(format!(
                    "{}: the {} adapter reads {} of width {}, but the image encoder {} gives {width} ({what}): use \
                     the image encoder the adapter was trained with",
                    a.path().display(),
                    projection.variant(),
                    projection.input(),
                    projection.input_dim(),
                    dir.display()
                )));
            }
            let pictures = list.iter().map(|p| load_rgb(p)).collect::<Result<Vec<_>>>()?;
            out.push(ImagePromptEmbeds::from_images(
                &pictures,
                &encoder.model,
                &encoder.processor,
                projection.input(),
            )?);
        }
        Ok(out)
    }

    /// Each adapter's masks, checked against its image count and the output size.
    fn load_masks(
        &self,
        adapters: &[IpAdapterWeights],
        embeds: &[ImagePromptEmbeds],
        width: usize,
        height: usize,
    ) -> Result<Vec<Option<Vec<RegionMask>>>> {
        if self.masks.is_empty() {
            return Ok(vec![None; adapters.len()]);
        }
        adapters
            .iter()
            .zip(embeds)
            .zip(&self.masks)
            .map(|((a, e), files)| {
                let Some(files) = files else { return Ok(None) };
                let images = e.images()?;
                if files.len() != images {
                    return Err(Error::invalid(format!(
                        "{}: {} mask(s) for {images} prompt image(s); give one mask per image",
                        a.path().display(),
                        files.len()
                    )));
                }
                let masks = files
                    .iter()
                    .map(|p| {
                        let mask = RegionMask::load(p)?;
                        if mask.size() != (height, width) {
                            return Err(Error::invalid(format!(
                                "{}: the mask is {}x{}, the image being generated is {width}x{height}; masks must \
                                 have the output size",
                                p.display(),
                                mask.size().1,
                                mask.size().0
                            )));
                        }
                        Ok(mask)
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ok(Some(masks))
            })
            .collect()
    }
}
