//! IP-Adapter (h94 layout): image tokens from an image projection, projected by each cross-attention
//! layer's own `to_k_ip` / `to_v_ip` into an extra key/value stream that the layer adds as
//! `scale · mask · attention(q, k_ip, v_ip)` (diffusers' `IPAdapterAttnProcessor2_0`).
//!
//! File layout: `image_proj.*` and `ip_adapter.{k}.to_k_ip.weight` / `.to_v_ip.weight` with
//! k = 1, 3, 5, … counted over diffusers' `unet.attn_processors` (down blocks, up blocks, then the mid
//! block; attn1 and attn2 interleaved, only attn2 has weights): the i-th layer of
//! [`UNetConfig::cross_attention_layers`] has k = 2i + 1. FaceID files also carry a LoRA for every
//! attention layer, `ip_adapter.{k}.to_{q,k,v,out}_lora.{down,up}.weight` with k = 0, 1, 2, … over the
//! same order (attn1 included), which diffusers' `load_ip_adapter` applies with weight 1
//! ([`IpAdapterWeights::lora`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Module, Tensor};

use super::image_projection::{ImageProjection, ProjectionInput};
use super::mask::RegionMask;
use super::scale::IpScale;
use crate::control::weights::{Lora, LoraAttachment, LoraMode};
use crate::control::{Control, GenerationSetup, StepContext};
use crate::io::weights::{TensorStore, TrainableParameters, Weights};
use crate::models::clip_vision::ClipVisionEncoder;
use crate::models::image_processor::ClipImageProcessor;
use crate::models::nn::{Linear, WeightDelta, linear};
use crate::models::unet::{AttentionStreams, CrossAttentionLayer, ExtraAttention, UNetConfig, UNetControls};
use crate::{Error, Result};

/// Reads an embedding tensor (f32) from a `.npy` file or a safetensors file holding exactly one tensor.
///
/// The file must be a regular file of at most [`crate::io::input::MAX_EMBEDDING_BYTES`]; every size
/// in it is checked against the bytes present, and the tensor must have values, all finite.
pub fn read_embedding_file(path: &Path, device: &Device) -> Result<Tensor> {
    use crate::io::input::{MAX_EMBEDDING_BYTES, read_limited};
    use crate::models::nn::all_finite;
    let format = |message: String| Error::Format { path: path.into(), message };
    if !path.exists() {
        return Err(Error::invalid(format!("{}: no such file", path.display())));
    }
    let bytes = read_limited(path, MAX_EMBEDDING_BYTES)?;
    let is_npy = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("npy"));
    let tensor = if is_npy {
        crate::io::npy::parse_npy(&bytes, &Device::Cpu).map_err(|e| format(format!("not a readable .npy file: {e}")))?
    } else {
        crate::io::mapped_safetensors::check_header(&bytes)
            .map_err(|e| format(format!("not a readable safetensors file: {e}")))?;
        let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
            .map_err(|e| format(format!("not a readable safetensors file: {e}")))?;
        if tensors.len() != 1 {
            let mut names: Vec<&String> = tensors.keys().collect();
            names.sort();
            return Err(format(format!("expected exactly one tensor, found {}: {names:?}", tensors.len())));
        }
        tensors.into_values().next().expect("one tensor")
    };
    if tensor.elem_count() == 0 {
        return Err(format(format!("the embedding has shape {:?}, with no values", tensor.dims())));
    }
    let tensor = tensor.to_dtype(DType::F32)?;
    if !all_finite(&tensor)? {
        return Err(format("the embedding holds non-finite values (NaN or infinity)".into()));
    }
    Ok(tensor.to_device(device)?)
}

/// An IP-Adapter file's weights, mapped onto one UNet's cross-attention layers.
pub struct IpAdapterWeights {
    path: PathBuf,
    projection: ImageProjection,
    /// Each cross-attention layer with its `to_k_ip` and `to_v_ip`, in the UNet's layer order.
    layers: Vec<(CrossAttentionLayer, Linear, Linear)>,
    /// The dtype activations run in (f32 for half-precision weights on the CPU, see
    /// [`crate::io::weights::precision`]).
    dtype: DType,
    /// The attention LoRA the file carries (FaceID), by UNet layer path.
    lora: Vec<(String, WeightDelta)>,
}

impl IpAdapterWeights {
    /// Loads `path` for a UNet with configuration `unet`, checking the token width against the UNet's
    /// `cross_attention_dim` and the layer count against its cross-attention layers.
    pub fn load(path: &Path, unet: &UNetConfig, dtype: DType, device: &Device) -> Result<Self> {
        Self::load_store(path, TensorStore::open(path)?, unet, |store| Weights::new(store, dtype, device))
    }

    /// [`Self::load`] from the h94-layout tensors `store` (a file, or new weights in memory; `path`
    /// names it) in f32 with every tensor a trainable variable recorded in `params` (training the
    /// image projection and `to_k_ip`/`to_v_ip`).
    pub fn load_trainable(
        path: &Path,
        store: TensorStore,
        unet: &UNetConfig,
        device: &Device,
        params: &TrainableParameters,
    ) -> Result<Self> {
        Self::load_store(path, store, unet, |store| Weights::new(store, DType::F32, device).trainable(params))
    }

    fn load_store(
        path: &Path,
        store: TensorStore,
        unet: &UNetConfig,
        view: impl FnOnce(Arc<TensorStore>) -> Weights,
    ) -> Result<Self> {
        let in_file = |e: Error| match e {
            Error::InvalidArgument(message) => Error::Format { path: path.into(), message },
            other => other,
        };
        let keys: Vec<String> = store.keys().into_iter().map(str::to_string).collect();
        if !keys.iter().any(|k| k.starts_with("image_proj.")) || !keys.iter().any(|k| k.starts_with("ip_adapter.")) {
            return Err(Error::Format {
                path: path.into(),
                message: "not an IP-Adapter file: it needs `image_proj.*` and `ip_adapter.*` tensors".into(),
            });
        }
        let w = view(Arc::new(store));
        let projection = ImageProjection::load(&w.pp("image_proj")).map_err(in_file)?;

        let unet_layers = unet.cross_attention_layers();
        let dim = projection.output_dim();
        if let Some(layer) = unet_layers.iter().find(|l| l.context_dim != dim) {
            return Err(Error::Format {
                path: path.into(),
                message: format!(
                    "the adapter's image tokens are {dim} wide but the {} model's cross_attention_dim is {} (the \
                     adapter was made for another base model; SD1.x uses 768, SD2.x 1024, SDXL 2048)",
                    unet.family_name(),
                    layer.context_dim
                ),
            });
        }
        let mut indices: Vec<usize> = keys
            .iter()
            .filter_map(|k| k.strip_prefix("ip_adapter.")?.strip_suffix(".to_k_ip.weight")?.parse().ok())
            .collect();
        indices.sort_unstable();
        let expected: Vec<usize> = (0..unet_layers.len()).map(|i| 2 * i + 1).collect();
        if indices != expected {
            return Err(Error::Format {
                path: path.into(),
                message: format!(
                    "the adapter has to_k_ip weights for {} cross-attention layers (ip_adapter.{{{}}}), the UNet \
                     has {} (expected ip_adapter.1, 3, …, {}): the adapter was made for another base model",
                    indices.len(),
                    summarize(&indices),
                    unet_layers.len(),
                    2 * unet_layers.len().max(1) - 1
                ),
            });
        }
        let lora = attention_lora(&w, &keys, &unet_layers).map_err(in_file)?;
        let layers = unet_layers
            .into_iter()
            .enumerate()
            .map(|(i, layer)| {
                let lw = w.pp(format!("ip_adapter.{}", 2 * i + 1));
                let k = linear(&lw.pp("to_k_ip"), dim, layer.channels, false)?;
                let v = linear(&lw.pp("to_v_ip"), dim, layer.channels, false)?;
                Ok((layer, k, v))
            })
            .collect::<Result<_>>()?;
        Ok(Self { path: path.to_path_buf(), projection, layers, dtype: w.dtype(), lora })
    }

    /// Each sample's own image tokens [B, T, D] (from [`Self::projection`]) as one key/value stream
    /// per cross-attention layer at `scale`: the streams of a training batch, where every sample has
    /// its own image.
    pub fn sample_streams(&self, tokens: &Tensor, scale: f64) -> Result<AttentionStreams> {
        self.layers
            .iter()
            .map(|(layer, k, v)| {
                let stream = ExtraAttention { key: k.forward(tokens)?, value: v.forward(tokens)?, scale, mask: None };
                Ok((layer.id.clone(), vec![stream]))
            })
            .collect()
    }

    /// The file the weights came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The image projection.
    pub fn projection(&self) -> &ImageProjection {
        &self.projection
    }

    /// The LoRA for the UNet's attention layers the file carries (FaceID files do), to attach to the
    /// model with multiplier 1 as diffusers does (`StableDiffusion::attach_lora`).
    pub fn lora(&self) -> Option<Lora> {
        (!self.lora.is_empty()).then(|| Lora {
            path: self.path.clone(),
            deltas: self.lora.clone(),
            unmatched: Vec::new(),
        })
    }
}

/// The projections a FaceID LoRA entry targets: (file name, layer name under the attention module).
const LORA_TARGETS: [(&str, &str); 4] = [("to_q", "to_q"), ("to_k", "to_k"), ("to_v", "to_v"), ("to_out", "to_out.0")];

/// The `ip_adapter.{k}.{to_q,to_k,to_v,to_out}_lora.{down,up}.weight` entries of `keys`, resolved to
/// UNet layer paths (`unet.<attention id>.to_q`, …) with k counted over attn1 and attn2 of every
/// transformer block in `layers`' order.
fn attention_lora(w: &Weights, keys: &[String], layers: &[CrossAttentionLayer]) -> Result<Vec<(String, WeightDelta)>> {
    let attentions: Vec<String> = layers
        .iter()
        .flat_map(|l| [format!("{}attn1", l.id.strip_suffix("attn2").unwrap_or(&l.id)), l.id.clone()])
        .collect();
    let mut entries: Vec<(usize, &str)> = keys
        .iter()
        .filter_map(|k| {
            let (index, rest) = k.strip_prefix("ip_adapter.")?.split_once('.')?;
            let target = rest.strip_suffix("_lora.down.weight")?;
            Some((index.parse().ok()?, target))
        })
        .collect();
    entries.sort_unstable();
    let mut deltas = Vec::with_capacity(entries.len());
    for (k, target) in entries {
        let Some(module) = attentions.get(k) else {
            return Err(Error::invalid(format!(
                "LoRA entry `ip_adapter.{k}.{target}_lora` is past the UNet's {} attention layers",
                attentions.len()
            )));
        };
        let Some(&(_, layer)) = LORA_TARGETS.iter().find(|(name, _)| *name == target) else {
            return Err(Error::invalid(format!("unknown LoRA entry `ip_adapter.{k}.{target}_lora`")));
        };
        let lw = w.pp(format!("ip_adapter.{k}.{target}_lora"));
        let factor = |name: &str| -> Result<Tensor> {
            let shape =
                lw.shape_of(name).ok_or_else(|| Error::invalid(format!("missing tensor `{}`", lw.key(name))))?;
            lw.get(shape, name)
        };
        let delta = WeightDelta::LowRank { down: factor("down.weight")?, up: factor("up.weight")?, scale: 1.0 };
        deltas.push((format!("unet.{module}.{layer}"), delta));
    }
    Ok(deltas)
}

/// `1, 3, 5` → "1, 3, 5"; long lists are cut in the middle.
fn summarize(indices: &[usize]) -> String {
    let all: Vec<String> = indices.iter().map(usize::to_string).collect();
    if all.len() <= 8 {
        all.join(", ")
    } else {
        format!("{}, …, {}", all[..3].join(", "), all[all.len() - 2..].join(", "))
    }
}

/// What one adapter's image projection reads for its prompt images: the conditional embeddings and the
/// unconditional ones classifier-free guidance pairs them with, [N, ...] for N images.
#[derive(Debug, Clone)]
pub struct ImagePromptEmbeds {
    /// Embeddings of the prompt images.
    pub positive: Tensor,
    /// Embeddings for the unconditional half of the batch.
    pub negative: Tensor,
}

impl ImagePromptEmbeds {
    /// Encodes `images` as diffusers' `encode_image` does for a projection that reads `input`:
    /// `image_embeds` with zeros as the negative, or penultimate hidden states with those of an
    /// all-zero image as the negative.
    pub fn from_images(
        images: &[image::RgbImage],
        encoder: &ClipVisionEncoder,
        processor: &ClipImageProcessor,
        input: ProjectionInput,
    ) -> Result<Self> {
        if images.is_empty() {
            return Err(Error::invalid("an image prompt needs at least one image"));
        }
        let device = encoder.device().clone();
        let pixels = images.iter().map(|img| processor.preprocess(img, &device)).collect::<Result<Vec<_>>>()?;
        let pixels = Tensor::cat(&pixels, 0)?;
        match input {
            ProjectionInput::ImageEmbeds => {
                let positive = encoder.forward(&pixels)?.image_embeds;
                Ok(Self { negative: positive.zeros_like()?, positive })
            }
            ProjectionInput::HiddenStates => Ok(Self {
                positive: encoder.forward(&pixels)?.penultimate,
                negative: encoder.forward(&pixels.zeros_like()?)?.penultimate,
            }),
            ProjectionInput::FaceEmbedding => {
                Err(Error::invalid("a FaceID adapter takes a face embedding, not images for the CLIP image encoder"))
            }
        }
    }

    /// Face-recognition embeddings [N, D] (or [D]) for a FaceID adapter; the negative is zeros, as in
    /// diffusers' FaceID example.
    pub fn from_face_embeddings(embeddings: &Tensor) -> Result<Self> {
        let positive = match embeddings.rank() {
            1 => embeddings.unsqueeze(0)?,
            2 => embeddings.clone(),
            3 if embeddings.dim(1)? == 1 => embeddings.squeeze(1)?,
            _ => {
                return Err(Error::invalid(format!(
                    "a face embedding must be [dim] or [images, dim], got shape {:?}",
                    embeddings.dims()
                )));
            }
        };
        Ok(Self { negative: positive.zeros_like()?, positive })
    }

    /// One adapter's entry of diffusers' `ip_adapter_image_embeds`: [2, N, ...] holding the negative
    /// then the positive embeddings (`prepare_ip_adapter_image_embeds(..., do_classifier_free_guidance=True)`),
    /// or [1, N, ...] with the positive only, whose negative is then zeros.
    pub fn from_diffusers(embeds: &Tensor, input: ProjectionInput) -> Result<Self> {
        let rank = if input == ProjectionInput::HiddenStates { 4 } else { 3 };
        let embeds = if input != ProjectionInput::HiddenStates && embeds.rank() == 4 && embeds.dim(2)? == 1 {
            embeds.squeeze(2)?
        } else {
            embeds.clone()
        };
        let halves = embeds.dims().first().copied().unwrap_or(0);
        if embeds.rank() != rank || !(1..=2).contains(&halves) {
            return Err(Error::invalid(format!(
                "image embeddings for a projection that reads {input} must be [2 (negative, positive) or 1, \
                 images, {}], got shape {:?}",
                if rank == 4 { "tokens, width" } else { "width" },
                embeds.dims()
            )));
        }
        let positive = embeds.get(halves - 1)?;
        let negative = if halves == 2 { embeds.get(0)? } else { positive.zeros_like()? };
        Ok(Self { positive, negative })
    }

    /// Number of prompt images.
    pub fn images(&self) -> Result<usize> {
        Ok(self.positive.dim(0)?)
    }
}

/// The projected key/value streams of one layer, for the conditional and unconditional halves.
struct LayerStreams {
    id: String,
    downsamplings: usize,
    scale: f64,
    /// Per stream (one per image with masks, else one for all images): key and value [1, S, C].
    positive: Vec<(Tensor, Tensor)>,
    negative: Vec<(Tensor, Tensor)>,
}

/// An IP-Adapter applied to one set of prompt images: a [`Control`] adding its key/value streams to
/// every cross-attention layer with a non-zero scale.
pub struct IpAdapter {
    layers: Vec<LayerStreams>,
    masks: Option<Vec<RegionMask>>,
    /// The streams for the generation's batch, made by `prepare`.
    streams: Option<Arc<AttentionStreams>>,
    /// The attention LoRA of a FaceID adapter, attached while a generation runs.
    lora: Option<Lora>,
    /// The attached LoRA, detached when the generation finishes.
    attached: Option<LoraAttachment>,
}

impl IpAdapter {
    /// Projects `embeds` into image tokens and each layer's keys and values once. `scale` sets each
    /// layer's weight (layers at 0 are skipped); `masks` (one per image, at the generated image's
    /// size) restrict each image to a region, in which case every image gets its own stream, as in
    /// diffusers; without masks the images' tokens are concatenated into one stream.
    pub fn new(
        weights: &IpAdapterWeights,
        embeds: &ImagePromptEmbeds,
        scale: &IpScale,
        masks: Option<Vec<RegionMask>>,
    ) -> Result<Self> {
        let projection = &weights.projection;
        let images = embeds.images()?;
        if let Some(masks) = &masks
            && masks.len() != images
        {
            return Err(Error::invalid(format!(
                "{}: {} mask(s) for {images} image(s); give one mask per image",
                weights.path.display(),
                masks.len()
            )));
        }
        let tokens = |x: &Tensor| -> Result<Tensor> {
            projection.forward(&x.to_dtype(weights.dtype)?).map_err(|e| match e {
                Error::InvalidArgument(m) => Error::invalid(format!("{}: {m}", weights.path.display())),
                other => other,
            })
        };
        let (positive, negative) = (tokens(&embeds.positive)?, tokens(&embeds.negative)?);
        let scales = scale.per_layer(&weights.layers.iter().map(|(l, _, _)| l.clone()).collect::<Vec<_>>())?;
        let streams_of = |t: &Tensor, k: &Linear, v: &Linear| -> Result<Vec<(Tensor, Tensor)>> {
            let (n, count, dim) = t.dims3()?;
            let groups = if masks.is_some() {
                (0..n).map(|i| t.narrow(0, i, 1)).collect::<candle_core::Result<Vec<_>>>()?
            } else {
                vec![t.reshape((1, n * count, dim))?]
            };
            groups.iter().map(|g| Ok((k.forward(g)?, v.forward(g)?))).collect()
        };
        let layers = weights
            .layers
            .iter()
            .zip(scales)
            .filter(|(_, s)| *s != 0.0)
            .map(|((layer, k, v), scale)| {
                Ok(LayerStreams {
                    id: layer.id.clone(),
                    downsamplings: layer.downsamplings,
                    scale,
                    positive: streams_of(&positive, k, v)?,
                    negative: streams_of(&negative, k, v)?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self { layers, masks, streams: None, lora: weights.lora(), attached: None })
    }

    /// The streams for a batch of `n` samples laid out as the pipeline does, for latents `latent_size`.
    fn make_streams(
        &self,
        n: usize,
        guided: bool,
        latent_size: (usize, usize),
        unet: &UNetConfig,
    ) -> Result<AttentionStreams> {
        if guided && !n.is_multiple_of(2) {
            return Err(Error::invalid(format!("a guided batch must be even, got {n} samples")));
        }
        let per_half = if guided { n / 2 } else { n };
        let batch = |pos: &Tensor, neg: &Tensor| -> Result<Tensor> {
            let pos = pos.repeat((per_half, 1, 1))?;
            Ok(if guided { Tensor::cat(&[neg.repeat((per_half, 1, 1))?, pos], 0)? } else { pos })
        };
        let mut out = HashMap::new();
        for layer in &self.layers {
            let (h, w) = unet.feature_size(latent_size, layer.downsamplings);
            let streams = layer
                .positive
                .iter()
                .zip(&layer.negative)
                .enumerate()
                .map(|(i, ((pk, pv), (nk, nv)))| {
                    let key = batch(pk, nk)?;
                    let mask = match &self.masks {
                        Some(masks) => {
                            Some(masks[i].downsample(h * w, key.device())?.to_dtype(key.dtype())?.repeat((n, 1, 1))?)
                        }
                        None => None,
                    };
                    Ok(ExtraAttention { value: batch(pv, nv)?, key, scale: layer.scale, mask })
                })
                .collect::<Result<Vec<_>>>()?;
            out.insert(layer.id.clone(), streams);
        }
        Ok(out)
    }
}

impl Control for IpAdapter {
    fn name(&self) -> &str {
        "ip-adapter"
    }

    fn prepare(&mut self, setup: &mut GenerationSetup) -> Result<()> {
        let n = if setup.guided { 2 * setup.batch } else { setup.batch };
        let (h, w) = setup.latent_size;
        self.streams = Some(Arc::new(self.make_streams(n, setup.guided, (h, w), setup.unet.config())?));
        if let Some(lora) = &self.lora {
            // Fused with multiplier 1 while this generation runs, as diffusers loads FaceID's LoRA.
            let name = format!("ip-adapter:{}", lora.path.display());
            self.attached = Some(LoraAttachment::attach(setup.layers, &name, lora, 1.0, LoraMode::Fused)?);
        }
        Ok(())
    }

    fn contribute(&mut self, _step: &mut StepContext) -> Result<UNetControls> {
        let streams = self.streams.clone().ok_or_else(|| Error::invalid("ip-adapter: used before it was prepared"))?;
        Ok(UNetControls { extra_attention: vec![streams], ..Default::default() })
    }

    fn finish(&mut self) -> Result<()> {
        match self.attached.take() {
            Some(attachment) => attachment.detach(),
            None => Ok(()),
        }
    }
}
