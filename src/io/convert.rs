//! Writing a model in the other layout: a single-file checkpoint as a diffusers folder, or a
//! diffusers folder as a single-file (LDM layout) safetensors checkpoint. Weights keep their stored
//! dtype; outputs appear only once complete.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde_json::{Value, json};

use super::ldm::{CLIP_PREFIX, KeyMap};
use super::model_files::{Family, ModelFiles};
use super::weights::TensorStore;
use crate::{Error, Result};

/// Writes `model` as a diffusers folder at `out`, which must not exist: model_index.json and the
/// scheduler, tokenizer, text_encoder, unet and vae sub-folders (safetensors weights).
pub fn write_diffusers_folder(model: &ModelFiles, out: &Path) -> Result<()> {
    if out.exists() {
        return Err(Error::invalid(format!("{}: already exists; choose a new output folder", out.display())));
    }
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !parent.is_dir() {
        return Err(Error::invalid(format!("{}: output directory {} does not exist", out.display(), parent.display())));
    }
    let name = out.file_name().ok_or_else(|| Error::invalid(format!("{}: not a folder path", out.display())))?;
    let tmp = parent.join(format!(".{}.{}.tmp", name.to_string_lossy(), std::process::id()));
    let result =
        write_folder_contents(model, &tmp).and_then(|()| std::fs::rename(&tmp, out).map_err(|e| Error::io(out, e)));
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

fn write_folder_contents(model: &ModelFiles, dir: &Path) -> Result<()> {
    let scheduler_class = model
        .scheduler_class
        .clone()
        .or_else(|| model.scheduler_json["_class_name"].as_str().map(str::to_string))
        .unwrap_or_else(|| "PNDMScheduler".into());
    let mut scheduler = model.scheduler_json.clone();
    scheduler["_class_name"] = json!(scheduler_class);
    let index = json!({
        "_class_name": "StableDiffusionPipeline",
        "feature_extractor": [null, null],
        "image_encoder": [null, null],
        "requires_safety_checker": false,
        "safety_checker": [null, null],
        "scheduler": ["diffusers", scheduler_class],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"]
    });
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    write_json(&dir.join("model_index.json"), &index)?;
    write_json(&dir.join("scheduler").join("scheduler_config.json"), &scheduler)?;
    model.tokenizer_files.write_to(&dir.join("tokenizer"))?;
    let components = [
        ("text_encoder", "model.safetensors", &model.text_encoder.json, &model.text_encoder.weights),
        ("unet", "diffusion_pytorch_model.safetensors", &model.unet.json, &model.unet.weights),
        ("vae", "diffusion_pytorch_model.safetensors", &model.vae.json, &model.vae.weights),
    ];
    for (name, file, config, store) in components {
        write_json(&dir.join(name).join("config.json"), config)?;
        let tensors = store
            .keys()
            .into_iter()
            .filter(|k| is_weight(k))
            .map(|k| Ok((k.to_string(), load_stored(store, k)?)))
            .collect::<Result<Vec<_>>>()?;
        write_safetensors(&dir.join(name).join(file), tensors)?;
    }
    Ok(())
}

/// Writes `model` as one single-file checkpoint (LDM layout, safetensors) at `out`: the SD1.x
/// layout for a CLIP text encoder, SD2.x's OpenCLIP layout (fused q/k/v) for a GELU one.
pub fn write_checkpoint(model: &ModelFiles, out: &Path) -> Result<()> {
    if out.extension().is_none_or(|e| e != "safetensors") {
        return Err(Error::invalid(format!("{}: single-file output is written as .safetensors only", out.display())));
    }
    if out.is_dir() {
        return Err(Error::invalid(format!("{}: is a directory, expected a .safetensors file path", out.display())));
    }
    let unet = KeyMap::unet(&model.unet.config);
    let vae = KeyMap::vae(&model.vae.config);
    let text = match model.family() {
        Family::Sd1 => KeyMap::clip(&format!("{CLIP_PREFIX}text_model")),
        Family::Sd2 => KeyMap::open_clip(model.text_encoder.config.num_hidden_layers),
    };
    let mut tensors = unet.to_checkpoint(&model.unet.weights, str::to_string)?;
    tensors.extend(vae.to_checkpoint(&model.vae.weights, str::to_string)?);
    // transformers 5 saves CLIP keys without the `text_model.` prefix the layouts are named by.
    let text_name = |k: &str| if k.starts_with("text_model.") { k.to_string() } else { format!("text_model.{k}") };
    tensors.extend(text.to_checkpoint(&model.text_encoder.weights, text_name)?);
    tensors.retain(|(k, _)| is_weight(k));
    super::write_atomic(out, |tmp| write_safetensors(tmp, tensors))
}

/// Whether `key` is a weight (not CLIP's `position_ids` buffer, which loaders rebuild).
fn is_weight(key: &str) -> bool {
    !key.ends_with("position_ids")
}

fn load_stored(store: &TensorStore, key: &str) -> Result<Tensor> {
    Ok(store.load(key, store.dtype(key).unwrap_or(DType::F32), &Device::Cpu)?.contiguous()?)
}

fn write_json(path: &Path, value: &Value) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    std::fs::write(path, format!("{value:#}\n")).map_err(|e| Error::io(path, e))
}

/// Safetensors with the `format: pt` metadata transformers and diffusers expect.
fn write_safetensors(path: &Path, tensors: Vec<(String, Tensor)>) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let tensors = tensors.into_iter().map(|(k, t)| Ok((k, t.contiguous()?))).collect::<Result<Vec<_>>>()?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(tensors, Some(metadata), path)
        .map_err(|e| Error::Format { path: path.into(), message: format!("could not write safetensors: {e}") })
}
