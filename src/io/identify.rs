//! What a weight file or model folder is: its format, dtypes and size, the mechanism it belongs to
//! (a full SD checkpoint, UNet, VAE, text encoder, ControlNet, IP-Adapter, LoRA, textual-inversion
//! embedding) and, where the shapes show it, the SD family. Detection only, from key names and
//! shapes; nothing is loaded into a model.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::diffusers_folder::open_weights_in;
use super::ldm::UNET_PREFIX;
use super::model_files::{ModelFiles, SourceOptions};
use super::single_file::{TextLayout, analyze};
use super::weights::TensorStore;
use crate::{Error, Result};

/// What [`identify`] found.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The file or folder.
    pub path: PathBuf,
    /// The storage format.
    pub format: String,
    /// The mechanism the weights belong to, e.g. "LoRA (kohya)".
    pub kind: String,
    /// The SD family and variant, when the shapes show it.
    pub family: Option<String>,
    /// Further facts (layout, prediction type, what a non-standard model needs).
    pub notes: Vec<String>,
    /// Tensors per stored dtype.
    pub dtypes: BTreeMap<String, usize>,
    /// Number of tensors.
    pub tensors: usize,
    /// Number of parameters (elements of all tensors).
    pub parameters: u64,
}

/// Identifies the weight file or diffusers folder at `path`.
pub fn identify(path: &Path) -> Result<Identity> {
    if path.is_dir() {
        return identify_folder(path);
    }
    let store = TensorStore::open(path)?;
    let (kind, family, notes) = classify(&store);
    let mut id = Identity {
        path: path.into(),
        format: store.format().to_string(),
        kind,
        family,
        notes,
        dtypes: BTreeMap::new(),
        tensors: 0,
        parameters: 0,
    };
    id.count(&store);
    Ok(id)
}

impl Identity {
    fn count(&mut self, store: &TensorStore) {
        for key in store.keys() {
            if let (Some(shape), Some(dtype)) = (store.shape(key), store.dtype(key)) {
                *self.dtypes.entry(format!("{dtype:?}").to_lowercase()).or_default() += 1;
                self.tensors += 1;
                self.parameters += shape.iter().product::<usize>() as u64;
            }
        }
    }
}

fn identify_folder(dir: &Path) -> Result<Identity> {
    if dir.join("model_index.json").is_file() {
        let model = ModelFiles::open(dir, &SourceOptions::default())?;
        let mut id = Identity {
            path: dir.into(),
            format: "diffusers pipeline folder".into(),
            kind: if model.text_2.is_some() {
                "SDXL pipeline (UNet + VAE + two text encoders)".into()
            } else {
                "Stable Diffusion pipeline (UNet + VAE + text encoder)".into()
            },
            family: Some(model.family().to_string()),
            notes: vec![prediction_note(model.scheduler_config.prediction_type.as_deref())],
            dtypes: BTreeMap::new(),
            tensors: 0,
            parameters: 0,
        };
        for store in [&model.unet.weights, &model.vae.weights, &model.text_encoder.weights] {
            id.count(store);
        }
        if let Some(text) = &model.text_2 {
            id.count(&text.encoder.weights);
        }
        return Ok(id);
    }
    let config = dir.join("config.json");
    if !config.is_file() {
        return Err(Error::invalid(format!(
            "{}: a directory that is neither a diffusers pipeline folder (model_index.json) nor a model folder \
             (config.json); expected a weight file or one of those",
            dir.display()
        )));
    }
    let json: serde_json::Value = super::read_json(&config)?;
    let class = json["_class_name"].as_str().or_else(|| json["architectures"][0].as_str()).unwrap_or("unknown class");
    let store = open_weights_in(dir)?;
    let (kind, family, notes) = classify(&store);
    let mut id = Identity {
        path: dir.into(),
        format: format!("diffusers model folder ({class}, {})", store.format()),
        kind,
        family,
        notes,
        dtypes: BTreeMap::new(),
        tensors: 0,
        parameters: 0,
    };
    id.count(&store);
    Ok(id)
}

fn prediction_note(prediction: Option<&str>) -> String {
    format!("prediction type: {}", prediction.unwrap_or("epsilon"))
}

/// The family a cross-attention or text width points to.
fn family_of_width(width: usize) -> Option<String> {
    match width {
        768 => Some("SD1.x (768-wide text context)".into()),
        1024 => Some("SD2.x (1024-wide text context)".into()),
        2048 => Some("SDXL (2048-wide text context)".into()),
        w => Some(format!("unknown ({w}-wide text context)")),
    }
}

/// The mechanism the tensors of `store` belong to, e.g. "LoRA (kohya)", from their names.
pub fn kind_of(store: &TensorStore) -> String {
    classify(store).0
}

/// (mechanism, family, notes) from the key names and shapes of `store`.
fn classify(s: &TensorStore) -> (String, Option<String>, Vec<String>) {
    let keys = s.keys();
    let any = |f: &dyn Fn(&str) -> bool| keys.iter().any(|k| f(k));
    let first = |f: &dyn Fn(&str) -> bool| keys.iter().find(|k| f(k)).map(|k| k.to_string());
    let width_of = |key: Option<String>, dim: usize| key.and_then(|k| s.shape(&k).and_then(|d| d.get(dim).copied()));
    let attn2_width = |prefix: &str| {
        width_of(first(&|k: &str| k.starts_with(prefix) && k.ends_with("attn2.to_k.weight")), 1)
            .and_then(family_of_width)
    };

    if any(&|k| k.starts_with("lora_unet_") || k.starts_with("lora_te")) {
        let kind = if any(&|k| k.contains("hada_w1")) {
            "LoRA (LyCORIS LoHa)"
        } else if any(&|k| k.contains("lokr_w1")) {
            "LoRA (LyCORIS LoKr)"
        } else {
            "LoRA (kohya)"
        };
        let family = width_of(first(&|k: &str| k.contains("attn2_to_k") && k.ends_with("lora_down.weight")), 1);
        return (kind.into(), family.and_then(family_of_width), vec![]);
    }
    if any(&|k| k.contains(".lora_A.") || k.contains(".lora_B.") || k.contains("lora_down") || k.contains("lora.down"))
    {
        let family = width_of(
            first(&|k: &str| k.contains("attn2") && k.contains("to_k") && (k.contains("lora_A") || k.contains("down"))),
            1,
        );
        return ("LoRA (PEFT / diffusers)".into(), family.and_then(family_of_width), vec![]);
    }
    if any(&|k| k.starts_with("string_to_param.") || k == "emb_params") {
        let key = first(&|k: &str| k.starts_with("string_to_param.") || k == "emb_params");
        let shape = key.as_deref().and_then(|k| s.shape(k)).map(<[usize]>::to_vec).unwrap_or_default();
        let note = format!("{} vector(s) of width {}", shape.first().unwrap_or(&0), shape.last().unwrap_or(&0));
        return ("textual-inversion embedding".into(), shape.last().copied().and_then(family_of_width), vec![note]);
    }
    if any(&|k| k.starts_with("image_proj.") || k.starts_with("ip_adapter.")) {
        let plus = any(&|k| {
            k.starts_with("image_proj.latents") || k.contains(".perceiver") || k.starts_with("image_proj.layers")
        });
        let family = width_of(first(&|k: &str| k.starts_with("ip_adapter.") && k.ends_with("to_k_ip.weight")), 1);
        let kind = if plus { "IP-Adapter Plus (resampler)" } else { "IP-Adapter" };
        return (kind.into(), family.and_then(family_of_width), vec![]);
    }
    if any(&|k| k.starts_with("control_model.")) {
        return ("ControlNet (LDM layout, control_model.*)".into(), attn2_width("control_model."), vec![]);
    }
    if any(&|k| k.starts_with("controlnet_cond_embedding.")) {
        return ("ControlNet (diffusers layout)".into(), attn2_width(""), vec![]);
    }
    if any(&|k| k.starts_with("input_hint_block.")) {
        return ("ControlNet (LDM layout)".into(), attn2_width(""), vec![]);
    }
    if any(&|k| k.starts_with("local_adapter.") || k.starts_with("global_adapter.")) {
        let parts: Vec<&str> = [("local_adapter.", "local adapter"), ("global_adapter.", "global adapter")]
            .into_iter()
            .filter(|(prefix, _)| any(&|k| k.starts_with(prefix)))
            .map(|(_, part)| part)
            .collect();
        let mut notes = vec![parts.join(" + ")];
        if any(&|k| k.starts_with(UNET_PREFIX)) {
            notes.push("also holds a whole SD checkpoint".into());
        }
        return ("Uni-ControlNet".into(), attn2_width("local_adapter."), notes);
    }
    if any(&|k| k.starts_with(UNET_PREFIX)) {
        return classify_checkpoint(s);
    }
    if any(&|k| k.starts_with("adapter.body.") || k.starts_with("body.0.block1.") || k.starts_with("body.0.body.0.")) {
        let light = any(&|k| k.contains(".body.0.body.") || k.starts_with("body.0.body.") || k.contains("out_conv"));
        let layout = if any(&|k| k.starts_with("adapter.")) { "diffusers layout" } else { "TencentARC layout" };
        let kind = if light { "T2I-Adapter (light)" } else { "T2I-Adapter (full)" };
        return (kind.into(), None, vec![layout.into()]);
    }
    if any(&|k| k.starts_with("conditioner.embedders.")) {
        return ("SDXL checkpoint (not supported)".into(), Some("SDXL".into()), vec![]);
    }
    if any(&|k| k.starts_with("down_blocks.") && k.contains(".resnets.")) && any(&|k| k.starts_with("time_embedding."))
    {
        return ("UNet (diffusers layout)".into(), attn2_width(""), vec![]);
    }
    if any(&|k| k.starts_with("first_stage_model.") || k.starts_with("encoder.down.")) {
        return ("VAE (LDM layout)".into(), None, vec![]);
    }
    if any(&|k| k.starts_with("encoder.down_blocks.")) && any(&|k| k.starts_with("decoder.up_blocks.")) {
        return ("VAE (diffusers layout)".into(), None, vec![]);
    }
    let token = first(&|k: &str| {
        k.ends_with("embeddings.token_embedding.weight") || k.ends_with("model.token_embedding.weight")
    });
    if token.is_some() {
        return ("CLIP text encoder".into(), width_of(token, 1).and_then(family_of_width), vec![]);
    }
    let mut prefixes: Vec<&str> = keys.iter().map(|k| k.split('.').next().unwrap_or(k)).collect();
    prefixes.dedup();
    prefixes.truncate(8);
    ("unknown (no known key layout)".into(), None, vec![format!("top-level key prefixes: {}", prefixes.join(", "))])
}

/// A file with `model.diffusion_model.*` keys: a full SD checkpoint or a bare UNet.
fn classify_checkpoint(s: &TensorStore) -> (String, Option<String>, Vec<String>) {
    match analyze(s) {
        Ok(a) => {
            let layout = match &a.text_layout {
                _ if a.text_2.is_some() => {
                    "CLIP ViT-L and OpenCLIP bigG text encoders (conditioner.embedders.0/1.*, SGM layout)".to_string()
                }
                TextLayout::Clip { .. } => "CLIP text encoder (cond_stage_model.transformer.*)".to_string(),
                TextLayout::BigG { prefix } => {
                    format!("OpenCLIP bigG text encoder alone ({prefix}*, SGM layout): an SDXL refiner")
                }
                TextLayout::OpenClip { resblocks } => {
                    format!("OpenCLIP text encoder (cond_stage_model.model.*, {resblocks} resblocks)")
                }
            };
            let mut notes = vec![layout];
            let family = if a.is_standard() {
                notes.push(match a.family {
                    super::model_files::Family::Sd1 | super::model_files::Family::Sdxl => prediction_note(None),
                    super::model_files::Family::Sd2 => {
                        "prediction type: v_prediction assumed (768-v); pass --prediction-type epsilon for a 512 base \
                         model"
                            .into()
                    }
                });
                format!("{} (standard configuration, built in)", a.family)
            } else {
                for (component, diffs) in &a.differences {
                    if !diffs.is_empty() {
                        notes.push(format!("{component}: {}", diffs.join(", ")));
                    }
                }
                notes.push("needs --model-config DIR for head counts and the like".into());
                format!("{}-style, non-standard", a.family)
            };
            let kind = if a.text_2.is_some() {
                "full SDXL checkpoint (UNet + VAE + two text encoders, SGM layout)"
            } else {
                "full Stable Diffusion checkpoint (UNet + VAE + text encoder, LDM layout)"
            };
            (kind.into(), Some(family), notes)
        }
        Err(e) => {
            let family = s
                .keys()
                .into_iter()
                .find(|k| k.starts_with(UNET_PREFIX) && k.ends_with("attn2.to_k.weight"))
                .and_then(|k| s.shape(k).map(|d| d[1]))
                .and_then(family_of_width);
            ("UNet (LDM layout) or an incomplete checkpoint".into(), family, vec![format!("as a model: {e}")])
        }
    }
}
