//! Writing a model in the other layout: a single-file checkpoint as a diffusers folder, or a
//! diffusers folder as a single-file (LDM layout) safetensors checkpoint. Weights keep their stored
//! dtype; outputs appear only once complete.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde_json::{Value, json};

use super::ldm::{CLIP_PREFIX, KeyMap, SGM_EMBEDDERS_PREFIX};
use super::model_files::{Family, ModelFiles};
use super::output::{rename_dir_noreplace, split_output_path, write_file, write_safetensors};
use super::weights::TensorStore;
use crate::{Error, Result};

/// Writes `model` as a diffusers folder at `out`, which must not exist (not even as a symlink):
/// model_index.json and the scheduler, tokenizer, text_encoder, unet and vae sub-folders
/// (safetensors weights). Everything is written into a private temporary folder created exclusively
/// beside `out` and renamed into place once complete (never over anything that appeared meanwhile);
/// on failure it is removed.
pub fn write_diffusers_folder(model: &ModelFiles, out: &Path) -> Result<()> {
    // `out/` names the same folder as `out`.
    let out: &Path = &out.components().collect::<std::path::PathBuf>();
    match std::fs::symlink_metadata(out) {
        Ok(meta) if meta.file_type().is_symlink() => {
            return Err(Error::invalid(format!(
                "{}: is a symbolic link; outputs are never written through or over a symbolic link",
                out.display()
            )));
        }
        Ok(_) => {
            return Err(Error::invalid(format!("{}: already exists; choose a new output folder", out.display())));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(out, e)),
    }
    let (parent, name) = split_output_path(out)?;
    let prefix = format!(".{}.", name.to_string_lossy().chars().take(80).collect::<String>());
    // Created 0700: nothing can be planted inside while it is written.
    let tmp = tempfile::Builder::new().prefix(&prefix).suffix(".tmp").tempdir_in(&parent).map_err(|e| {
        Error::invalid(format!("{}: cannot create a temporary folder in {}: {e}", out.display(), parent.display()))
    })?;
    write_folder_contents(model, tmp.path())?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = 0o777 & !super::output::umask();
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(mode))
            .map_err(|e| Error::io(tmp.path(), e))?;
    }
    rename_dir_noreplace(tmp.path(), out).map_err(|e| {
        Error::invalid(format!("{}: could not move the finished folder into place: {e}", out.display()))
    })?;
    // Renamed: nothing is left at the temporary path to remove.
    let _ = tmp.keep();
    Ok(())
}

fn write_folder_contents(model: &ModelFiles, dir: &Path) -> Result<()> {
    let scheduler_class = model
        .scheduler_class
        .clone()
        .or_else(|| model.scheduler_json["_class_name"].as_str().map(str::to_string))
        .unwrap_or_else(|| "PNDMScheduler".into());
    let mut scheduler = model.scheduler_json.clone();
    scheduler["_class_name"] = json!(scheduler_class);
    let mut index = json!({
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
    if model.is_refiner() {
        index = json!({
            "_class_name": "StableDiffusionXLImg2ImgPipeline",
            "feature_extractor": [null, null],
            "force_zeros_for_empty_prompt": model.force_zeros_for_empty_prompt,
            "image_encoder": [null, null],
            "requires_aesthetics_score": model.requires_aesthetics_score,
            "scheduler": ["diffusers", scheduler_class],
            "text_encoder": [null, null],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer": [null, null],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"]
        });
    } else if model.text_2.is_some() {
        index = json!({
            "_class_name": "StableDiffusionXLPipeline",
            "feature_extractor": [null, null],
            "force_zeros_for_empty_prompt": model.force_zeros_for_empty_prompt,
            "image_encoder": [null, null],
            "scheduler": ["diffusers", scheduler_class],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"]
        });
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    write_json(&dir.join("model_index.json"), &index)?;
    write_json(&dir.join("scheduler").join("scheduler_config.json"), &scheduler)?;
    // The refiner's one encoder and tokenizer are its `_2` components.
    let (tokenizer_dir, text_dir) =
        if model.is_refiner() { ("tokenizer_2", "text_encoder_2") } else { ("tokenizer", "text_encoder") };
    model.tokenizer_files.write_to(&dir.join(tokenizer_dir))?;
    let mut components = vec![
        (text_dir, "model.safetensors", &model.text_encoder.json, &model.text_encoder.weights),
        ("unet", "diffusion_pytorch_model.safetensors", &model.unet.json, &model.unet.weights),
        ("vae", "diffusion_pytorch_model.safetensors", &model.vae.json, &model.vae.weights),
    ];
    if let Some(text) = &model.text_2 {
        text.tokenizer_files.write_to(&dir.join("tokenizer_2"))?;
        components.push(("text_encoder_2", "model.safetensors", &text.encoder.json, &text.encoder.weights));
    }
    for (name, file, config, store) in components {
        write_json(&dir.join(name).join("config.json"), config)?;
        let tensors = store
            .keys()
            .into_iter()
            .filter(|k| is_weight(k))
            .map(|k| Ok((k.to_string(), load_stored(store, k)?)))
            .collect::<Result<Vec<_>>>()?;
        write_safetensors_file(&dir.join(name).join(file), tensors)?;
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
        Family::Sdxl if model.is_refiner() => KeyMap::open_clip_at(
            &format!("{SGM_EMBEDDERS_PREFIX}0.model."),
            model.text_encoder.config.num_hidden_layers,
            true,
        ),
        Family::Sdxl => KeyMap::clip(&format!("{SGM_EMBEDDERS_PREFIX}0.transformer.text_model")),
    };
    let mut tensors = unet.to_checkpoint(&model.unet.weights, str::to_string)?;
    tensors.extend(vae.to_checkpoint(&model.vae.weights, str::to_string)?);
    // transformers 5 saves CLIP keys without the `text_model.` prefix the layouts are named by.
    // The projection sits beside text_model.
    let text_name = |k: &str| {
        if k.starts_with("text_model.") || k.starts_with("text_projection") {
            k.to_string()
        } else {
            format!("text_model.{k}")
        }
    };
    tensors.extend(text.to_checkpoint(&model.text_encoder.weights, text_name)?);
    if let Some(text_2) = &model.text_2 {
        let layers = text_2.encoder.config.num_hidden_layers;
        let map = KeyMap::open_clip_at(&format!("{SGM_EMBEDDERS_PREFIX}1.model."), layers, true);
        tensors.extend(map.to_checkpoint(&text_2.encoder.weights, text_name)?);
    }
    tensors.retain(|(k, _)| is_weight(k));
    write_file(out, |file| {
        write_safetensors(file, tensors, Some(pt_metadata()))
            .map_err(|e| Error::Format { path: out.into(), message: format!("could not write safetensors: {e}") })
    })
}

/// Whether `key` is a weight (not CLIP's `position_ids` buffer, which loaders rebuild).
fn is_weight(key: &str) -> bool {
    !key.ends_with("position_ids")
}

fn load_stored(store: &TensorStore, key: &str) -> Result<Tensor> {
    Ok(store.load(key, store.dtype(key).unwrap_or(DType::F32), &Device::Cpu)?.contiguous()?)
}

/// Writes a file inside the private output folder being built (created new, never opened through
/// something already there).
fn create_new(path: &Path) -> Result<std::fs::File> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    std::fs::File::create_new(path).map_err(|e| Error::io(path, e))
}

fn write_json(path: &Path, value: &Value) -> Result<()> {
    use std::io::Write;
    create_new(path)?.write_all(format!("{value:#}\n").as_bytes()).map_err(|e| Error::io(path, e))
}

/// The `format: pt` metadata transformers and diffusers expect.
fn pt_metadata() -> HashMap<String, String> {
    HashMap::from([("format".to_string(), "pt".to_string())])
}

/// Safetensors with the `format: pt` metadata, as a new file in the folder being built.
fn write_safetensors_file(path: &Path, tensors: Vec<(String, Tensor)>) -> Result<()> {
    write_safetensors(&mut create_new(path)?, tensors, Some(pt_metadata()))
        .map_err(|e| Error::Format { path: path.into(), message: format!("could not write safetensors: {e}") })
}
