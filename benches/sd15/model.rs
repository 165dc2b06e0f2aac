//! Random-weight models of the real SD1.5 sizes in the diffusers layout: the pipeline folder (UNet,
//! VAE, CLIP-L text encoder, bundled tokenizer, PNDM scheduler), a ControlNet made from its UNet's
//! config and a base IP-Adapter. Every tensor name and shape comes from the models' own loading code
//! (a [`TensorStore::recorder`] store); the values are seeded like torch's default initialisation.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device};
use diffctl::io::model_files::{Family, ModelFiles, SourceOptions, TokenizerFiles};
use diffctl::io::single_file::{standard_scheduler, standard_text, standard_text_2, standard_unet, standard_vae};
use diffctl::io::weights::{TensorStore, Weights};
use diffctl::models::clip_text::{ClipTextConfig, ClipTextEncoder};
use diffctl::models::controlnet::{ControlNet, ControlNetConfig};
use diffctl::models::unet::{UNet, UNetConfig};
use diffctl::models::vae::{Vae, VaeConfig};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, Uniform};
use safetensors::{Dtype, View};
use serde_json::{Value, json};

/// The base IP-Adapter's image tokens per image and the CLIP-H image-embedding width it reads.
const IP_TOKENS: usize = 4;
const IP_IMAGE_EMBED_DIM: usize = 1024;

/// Names and shapes of one weight file, sorted by name.
type Parameters = BTreeMap<String, Vec<usize>>;

/// Loads a model from a recorder store and returns what it asked for.
fn record(load: impl FnOnce(&Weights) -> diffctl::Result<()>) -> Result<Parameters> {
    let store = Arc::new(TensorStore::recorder());
    load(&Weights::new(store.clone(), DType::F32, &Device::Cpu))?;
    let mut out = Parameters::new();
    for (name, shape) in store.recorded() {
        if let Some(seen) = out.insert(name.clone(), shape.clone())
            && seen != shape
        {
            bail!("`{name}` was loaded with two shapes, {seen:?} and {shape:?}");
        }
    }
    Ok(out)
}

/// FNV-1a: a stable 64-bit hash (seeds per tensor, cache keys).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// How a tensor's values are drawn, as torch initialises the layer it belongs to.
#[derive(Debug, Clone, Copy)]
enum Init {
    /// U(-bound, bound): Linear/Conv weights and biases (kaiming-uniform with a = √5 gives
    /// bound = 1/√fan_in for both), embedding tables (std ≈ 0.02, CLIP's own init).
    Uniform(f32),
    /// A constant: normalisation scales (1) and shifts (0).
    Constant(f32),
}

/// One tensor written lazily: its values are drawn only when the writer asks for its bytes, from an
/// RNG seeded by the run's seed and the tensor's name (independent of the write order).
struct RandomTensor {
    shape: Vec<usize>,
    init: Init,
    seed: u64,
}

impl View for RandomTensor {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        let n: usize = self.shape.iter().product();
        let mut bytes = Vec::with_capacity(4 * n);
        match self.init {
            Init::Constant(v) => (0..n).for_each(|_| bytes.extend_from_slice(&v.to_le_bytes())),
            Init::Uniform(bound) => {
                let mut rng = StdRng::seed_from_u64(self.seed);
                let dist = Uniform::new_inclusive(-bound, bound).expect("a finite, positive bound");
                (0..n).for_each(|_| bytes.extend_from_slice(&dist.sample(&mut rng).to_le_bytes()));
            }
        }
        Cow::Owned(bytes)
    }

    fn data_len(&self) -> usize {
        4 * self.shape.iter().product::<usize>()
    }
}

/// The torch-default initialisation of every tensor in `params`: matrices and kernels
/// U(±1/√fan_in); a vector is the bias of the matrix beside it (same bound) or else a norm's scale
/// (1) or shift (0).
fn inits(params: &Parameters) -> Result<Vec<(String, Vec<usize>, Init)>> {
    let fan_in = |shape: &[usize]| shape[1..].iter().product::<usize>() as f32;
    params
        .iter()
        .map(|(name, shape)| {
            let init = match shape.len() {
                0 => bail!("`{name}` is a scalar"),
                1 => {
                    let (module, leaf) = name.rsplit_once('.').unwrap_or(("", name));
                    match params.get(&format!("{module}.weight")) {
                        Some(w) if w.len() >= 2 => Init::Uniform(fan_in(w).sqrt().recip()),
                        _ if leaf == "weight" => Init::Constant(1.0),
                        _ => Init::Constant(0.0),
                    }
                }
                _ => Init::Uniform(fan_in(shape).sqrt().recip()),
            };
            Ok((name.clone(), shape.clone(), init))
        })
        .collect()
}

/// Writes `params` with random values as one f32 safetensors file (atomically, one tensor in memory
/// at a time); returns the parameter count.
fn write_random(path: &Path, params: &Parameters, seed: u64) -> Result<usize> {
    let tensors: Vec<(String, RandomTensor)> = inits(params)?
        .into_iter()
        .map(|(name, shape, init)| {
            let seed = seed ^ fnv1a(name.as_bytes());
            (name, RandomTensor { shape, init, seed })
        })
        .collect();
    let count = tensors.iter().map(|(_, t)| t.shape.iter().product::<usize>()).sum();
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(tensors, Some(metadata), path)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(count)
}

fn write_json(path: &Path, value: &Value) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, format!("{value:#}\n")).with_context(|| format!("writing {}", path.display()))
}

/// Builds a folder at `out` through `make` in a temporary sibling, renamed into place once complete,
/// so an interrupted run never leaves a half-written cache entry.
fn build_dir(out: &Path, make: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let parent = out.parent().context("cache path has no parent")?;
    std::fs::create_dir_all(parent)?;
    let name = out.file_name().context("cache path has no name")?.to_string_lossy();
    let tmp = parent.join(format!(".{name}.{}.tmp", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let result = make(&tmp).and_then(|()| Ok(std::fs::rename(&tmp, out)?));
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

/// The SD1.5-size pipeline folder `cache/sd15-random`, made on first use (about 4.3 GB; the same
/// configs as `../shared/bench/perf_sd15.py make`, so the peers load it too).
pub fn sd15_folder(cache: &Path, seed: u64) -> Result<PathBuf> {
    let out = cache.join(format!("sd15-random-seed{seed}"));
    if out.join("model_index.json").is_file() {
        return Ok(out);
    }
    eprintln!("making random SD1.5-size weights in {} (once; about 4.3 GB)", out.display());
    build_dir(&out, |dir| {
        let index = json!({
            "_class_name": "StableDiffusionPipeline",
            "feature_extractor": [null, null],
            "image_encoder": [null, null],
            "requires_safety_checker": false,
            "safety_checker": [null, null],
            "scheduler": ["diffusers", "PNDMScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"]
        });
        write_json(&dir.join("scheduler/scheduler_config.json"), &standard_scheduler(Family::Sd1))?;
        TokenizerFiles::Bundled("<|endoftext|>").write_to(&dir.join("tokenizer"))?;
        let unet_config = dir.join("unet/config.json");
        write_json(&unet_config, &standard_unet(Family::Sd1))?;
        let config = UNetConfig::load(&unet_config)?;
        let params = record(|w| UNet::load(w, &config).map(drop))?;
        report("unet", write_random(&dir.join("unet/diffusion_pytorch_model.safetensors"), &params, seed)?);
        let vae_config = dir.join("vae/config.json");
        write_json(&vae_config, &standard_vae(Family::Sd1))?;
        let config = VaeConfig::load(&vae_config)?;
        let params = record(|w| Vae::load(w, &config).map(drop))?;
        report("vae", write_random(&dir.join("vae/diffusion_pytorch_model.safetensors"), &params, seed)?);
        let text_config = dir.join("text_encoder/config.json");
        write_json(&text_config, &standard_text(Family::Sd1))?;
        let config = ClipTextConfig::load(&text_config)?;
        let params = record(|w| ClipTextEncoder::load(w, &config).map(drop))?;
        report("text_encoder", write_random(&dir.join("text_encoder/model.safetensors"), &params, seed)?);
        write_json(&dir.join("model_index.json"), &index)
    })?;
    Ok(out)
}

/// The SDXL-size pipeline folder `cache/sdxl-random`, made on first use (about 14 GB: stable-diffusion-xl-base-1.0's
/// configs, UNet 2.57 B parameters, CLIP-L and OpenCLIP bigG text encoders, its VAE; the bundled tokenizer twice,
/// the second padding with `!`), laid out as `StableDiffusionXLPipeline` saves it so the peers load it too.
pub fn sdxl_folder(cache: &Path, seed: u64) -> Result<PathBuf> {
    let out = cache.join(format!("sdxl-random-seed{seed}"));
    if out.join("model_index.json").is_file() {
        return Ok(out);
    }
    eprintln!("making random SDXL-size weights in {} (once; about 14 GB)", out.display());
    build_dir(&out, |dir| {
        let index = json!({
            "_class_name": "StableDiffusionXLPipeline",
            "feature_extractor": [null, null],
            "force_zeros_for_empty_prompt": true,
            "image_encoder": [null, null],
            "scheduler": ["diffusers", "EulerDiscreteScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"]
        });
        write_json(&dir.join("scheduler/scheduler_config.json"), &standard_scheduler(Family::Sdxl))?;
        TokenizerFiles::Bundled("<|endoftext|>").write_to(&dir.join("tokenizer"))?;
        TokenizerFiles::Bundled("!").write_to(&dir.join("tokenizer_2"))?;
        write_component(
            &dir.join("unet"),
            "diffusion_pytorch_model",
            &standard_unet(Family::Sdxl),
            seed,
            |w, path| UNet::load(w, &UNetConfig::load(path)?).map(drop),
        )?;
        write_component(&dir.join("vae"), "diffusion_pytorch_model", &standard_vae(Family::Sdxl), seed, |w, path| {
            Vae::load(w, &VaeConfig::load(path)?).map(drop)
        })?;
        write_component(&dir.join("text_encoder"), "model", &standard_text(Family::Sdxl), seed, |w, path| {
            ClipTextEncoder::load(w, &ClipTextConfig::load(path)?).map(drop)
        })?;
        // The recorder holds no `text_projection`, so the encoder does not ask for it: ask here.
        write_component(&dir.join("text_encoder_2"), "model", &standard_text_2(), seed, |w, path| {
            let config = ClipTextConfig::load(path)?;
            w.get((config.hidden_size, config.hidden_size), "text_projection.weight")?;
            ClipTextEncoder::load(w, &config).map(drop)
        })?;
        write_json(&dir.join("model_index.json"), &index)
    })?;
    Ok(out)
}

/// Writes `config` as `dir/config.json` and random weights for what `load` (given that path) asks
/// for as `dir/<stem>.safetensors`.
fn write_component(
    dir: &Path,
    stem: &str,
    config: &Value,
    seed: u64,
    load: impl FnOnce(&Weights, &Path) -> diffctl::Result<()>,
) -> Result<()> {
    let config_path = dir.join("config.json");
    write_json(&config_path, config)?;
    let params = record(|w| load(w, &config_path))?;
    let name = dir.file_name().map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    report(&name, write_random(&dir.join(format!("{stem}.safetensors")), &params, seed)?);
    Ok(())
}

fn report(what: &str, params: usize) {
    eprintln!("  {what}: {:.1} M parameters", params as f64 / 1e6);
}

/// A ControlNet for `model`'s UNet as `ControlNetModel.from_unet` configures it (default condition
/// embedding 16/32/96/256), random weights, cached under `cache` by the UNet config's hash.
pub fn controlnet_for(model: &Path, cache: &Path, seed: u64) -> Result<PathBuf> {
    let unet_json = std::fs::read(model.join("unet/config.json")).context("reading the UNet's config.json")?;
    let out = cache.join(format!("controlnet-{:016x}-seed{seed}", fnv1a(&unet_json)));
    if out.join("config.json").is_file() {
        return Ok(out);
    }
    eprintln!("making a random ControlNet for {} in {}", model.display(), out.display());
    let unet: Value = serde_json::from_slice(&unet_json)?;
    let config = ControlNetConfig::json_from_unet(&unet, 3, &[16, 32, 96, 256]);
    build_dir(&out, |dir| {
        write_json(&dir.join("config.json"), &config)?;
        let config = ControlNetConfig::load(&dir.join("config.json"))?;
        let params = record(|w| ControlNet::load(w, &config).map(drop))?;
        report("controlnet", write_random(&dir.join("diffusion_pytorch_model.safetensors"), &params, seed)?);
        Ok(())
    })?;
    Ok(out)
}

/// A base IP-Adapter (h94 layout) for `model`'s UNet: `image_proj` (Linear 1024 → 4 tokens × the
/// context width, LayerNorm) and `ip_adapter.{2i+1}.to_k_ip/to_v_ip` for the UNet's i-th
/// cross-attention layer, random weights, cached under `cache` by the UNet config's hash.
pub fn ip_adapter_for(model: &Path, cache: &Path, seed: u64) -> Result<PathBuf> {
    let files = ModelFiles::open(model, &SourceOptions::default())?;
    let unet_json = std::fs::read(&files.unet.config_path)?;
    let out = cache.join(format!("ip-adapter-{:016x}-seed{seed}.safetensors", fnv1a(&unet_json)));
    if out.is_file() {
        return Ok(out);
    }
    let layers = files.unet.config.cross_attention_layers();
    let context = layers.first().context("the UNet has no cross-attention layers")?.context_dim;
    let mut params = Parameters::from([
        ("image_proj.proj.weight".to_string(), vec![IP_TOKENS * context, IP_IMAGE_EMBED_DIM]),
        ("image_proj.proj.bias".to_string(), vec![IP_TOKENS * context]),
        ("image_proj.norm.weight".to_string(), vec![context]),
        ("image_proj.norm.bias".to_string(), vec![context]),
    ]);
    for (i, layer) in layers.iter().enumerate() {
        for proj in ["to_k_ip", "to_v_ip"] {
            params.insert(format!("ip_adapter.{}.{proj}.weight", 2 * i + 1), vec![layer.channels, layer.context_dim]);
        }
    }
    std::fs::create_dir_all(cache)?;
    eprintln!("making a random base IP-Adapter ({} cross-attention layers) in {}", layers.len(), out.display());
    report("ip-adapter", write_random(&out, &params, seed)?);
    Ok(out)
}
