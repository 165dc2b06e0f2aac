//! Single-file checkpoints (SD1.x/2.x in the LDM layout, SDXL in the SGM layout; `.safetensors` or
//! PyTorch `.ckpt`) opened as a model: the family the keys show, the diffusers configs of the parts,
//! and each part as a renamed view of the file.
//!
//! Tensor shapes fix the structure: block channels, layers per block, where attention sits and how
//! deep it is, the context width, linear or 1x1-conv projections, VAE channels and latent width, text
//! widths and layers. What they cannot fix (head counts, norm groups, time-embedding flavour,
//! scheduler) comes from the built-in configs of stable-diffusion-v1-5 (SD1.x),
//! stable-diffusion-2-1 (SD2.x) and stable-diffusion-xl-base-1.0 (SDXL) when the structure is the
//! standard one, or else from the
//! `--model-config` folder, as diffusers' `from_single_file(config=...)` does.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{Map, Value, json};

use super::ldm::{CLIP_PREFIX, KeyMap, OPEN_CLIP_PREFIX, SGM_EMBEDDERS_PREFIX, UNET_PREFIX, VAE_PREFIX};
use super::model_files::{Component, Family, ModelFiles, SecondText, SourceOptions, TokenizerFiles};
use super::weights::TensorStore;
use crate::models::clip_text::ClipTextConfig;
use crate::models::unet::UNetConfig;
use crate::models::vae::VaeConfig;
use crate::schedulers::SchedulerConfig;
use crate::{Error, Result};

/// How the text encoder is stored.
#[derive(Debug, Clone, PartialEq)]
pub enum TextLayout {
    /// OpenAI CLIP in transformers' layout under this key prefix (SD1.x).
    Clip {
        /// `cond_stage_model.transformer.text_model` (or without `.text_model` in old files).
        root: String,
    },
    /// OpenCLIP with this many resblocks (SD2.x; the text encoder uses all but the last).
    OpenClip {
        /// Resblocks in the file.
        resblocks: usize,
    },
    /// OpenCLIP bigG with its projection, every resblock used, as the only text encoder (the SDXL
    /// refiner, `conditioner.embedders.0.model.*`).
    BigG {
        /// The key prefix (ending in `.`).
        prefix: String,
    },
}

/// What the keys and shapes of a single-file checkpoint say.
#[derive(Debug, Clone)]
pub struct Analysis {
    /// SD1.x or SD2.x, from the text encoder's layout.
    pub family: Family,
    /// The text encoder's layout.
    pub text_layout: TextLayout,
    /// Config fields the shapes fix, per component, in diffusers' config names; `null` list
    /// entries are left to the config (e.g. transformer depth of blocks without attention).
    pub unet: Map<String, Value>,
    /// The VAE's shape-derived config fields.
    pub vae: Map<String, Value>,
    /// The text encoder's shape-derived config fields.
    pub text: Map<String, Value>,
    /// SDXL's second (OpenCLIP bigG) text encoder: its key prefix and shape-derived config fields.
    pub text_2: Option<(String, Map<String, Value>)>,
    /// How each component departs from the family's standard config (empty: standard), as
    /// (component, differences).
    pub differences: Vec<(&'static str, Vec<String>)>,
}

impl Analysis {
    /// Whether every component has the family's standard structure.
    pub fn is_standard(&self) -> bool {
        self.differences.iter().all(|(_, d)| d.is_empty())
    }

    fn differences_of(&self, component: &str) -> &[String] {
        self.differences.iter().find(|(c, _)| *c == component).map(|(_, d)| d.as_slice()).unwrap_or(&[])
    }
}

/// Reads the family and structure of the whole-checkpoint `store`; fails for anything that is not
/// an SD1.x/2.x checkpoint with UNet, VAE and text encoder.
pub fn analyze(store: &TensorStore) -> Result<Analysis> {
    let has = |prefix: &str| store.keys().iter().any(|k| k.starts_with(prefix));
    let unknown = |message: String| Err(Error::Format { path: store.label().into(), message });
    let sdxl = has(SGM_EMBEDDERS_PREFIX);
    if !has(UNET_PREFIX) {
        let looks_like = super::identify::kind_of(store);
        return unknown(format!(
            "no `{UNET_PREFIX}*` keys: not a Stable Diffusion checkpoint (it looks like: {looks_like})"
        ));
    }
    let text_prefix = if sdxl { SGM_EMBEDDERS_PREFIX } else { "cond_stage_model." };
    for (prefix, part) in [(VAE_PREFIX, "VAE"), (text_prefix, "text encoder")] {
        if !has(prefix) {
            return Err(Error::Format {
                path: store.label().into(),
                message: format!(
                    "has a UNet but no {part} (`{prefix}*` keys); only full SD1.x/2.x checkpoints load as a model"
                ),
            });
        }
    }
    // SDXL's bigG uses every resblock, and projects the pooled output (stored [hidden, projection]).
    let big_g = |prefix: &str| -> Result<Map<String, Value>> {
        let (layout, mut text) = infer_text(store, &[], Some(prefix))?;
        if let TextLayout::OpenClip { resblocks } = layout {
            text.insert("num_hidden_layers".into(), json!(resblocks));
        }
        let projection = need(store, &format!("{prefix}text_projection"), 2)?;
        text.insert("projection_dim".into(), json!(projection[1]));
        Ok(text)
    };
    let (text_layout, text, text_2) = if sdxl && !has(&format!("{SGM_EMBEDDERS_PREFIX}0.transformer.")) {
        // The refiner: bigG alone.
        let prefix = format!("{SGM_EMBEDDERS_PREFIX}0.model.");
        if !has(&prefix) {
            return unknown(format!(
                "an SDXL checkpoint with neither `{SGM_EMBEDDERS_PREFIX}0.transformer.*` (CLIP ViT-L) nor \
                 `{prefix}*` (OpenCLIP bigG): unknown text encoders"
            ));
        }
        let text = big_g(&prefix)?;
        (TextLayout::BigG { prefix }, text, None)
    } else if sdxl {
        let (layout, text) = infer_text(store, &[format!("{SGM_EMBEDDERS_PREFIX}0.transformer.text_model")], None)?;
        let prefix = format!("{SGM_EMBEDDERS_PREFIX}1.model.");
        if !has(&prefix) {
            return unknown(format!("an SDXL checkpoint without `{prefix}*` (the OpenCLIP bigG text encoder)"));
        }
        let text_2 = big_g(&prefix)?;
        (layout, text, Some((prefix, text_2)))
    } else {
        let roots = [format!("{CLIP_PREFIX}text_model"), CLIP_PREFIX.trim_end_matches('.').to_string()];
        let (layout, text) = infer_text(store, &roots, Some(OPEN_CLIP_PREFIX))?;
        (layout, text, None)
    };
    let family = match text_layout {
        _ if sdxl => Family::Sdxl,
        TextLayout::Clip { .. } => Family::Sd1,
        TextLayout::OpenClip { .. } | TextLayout::BigG { .. } => Family::Sd2,
    };
    let refiner = matches!(text_layout, TextLayout::BigG { .. });
    let unet = infer_unet(store)?;
    let vae = infer_vae(store)?;
    let blocks = unet["block_out_channels"].as_array().map_or(0, Vec::len);
    let vae_blocks = vae["block_out_channels"].as_array().map_or(0, Vec::len);
    let differences_from = |standard: Value, inferred: &Map<String, Value>, blocks: usize| -> Vec<String> {
        let conflicts = merge(&standard, inferred, blocks).1;
        conflicts.into_iter().map(|(key, standard, found)| format!("{key} {found} (standard {standard})")).collect()
    };
    let standard = if refiner { standard_text_2() } else { standard_text(family) };
    let mut text_diffs = differences_from(standard, &text, 1);
    if let TextLayout::OpenClip { resblocks } = text_layout
        && !(23..=24).contains(&resblocks)
    {
        text_diffs.push(format!("{resblocks} OpenCLIP resblocks (standard: 24, of which 23 are used)"));
    }
    let mut differences = vec![
        (
            "unet",
            differences_from(if refiner { standard_refiner_unet() } else { standard_unet(family) }, &unet, blocks),
        ),
        ("vae", differences_from(standard_vae(family), &vae, vae_blocks)),
        (if refiner { "text_encoder_2" } else { "text_encoder" }, text_diffs),
    ];
    if let Some((_, text_2)) = &text_2 {
        differences.push(("text_encoder_2", differences_from(standard_text_2(), text_2, 1)));
    }
    Ok(Analysis { family, text_layout, unet, vae, text, text_2, differences })
}

/// Opens the checkpoint at `path` as a model (see the module docs for where each config comes from).
pub fn open(path: &Path, options: &SourceOptions) -> Result<ModelFiles> {
    let store = TensorStore::open(path)?;
    let analysis = analyze(&store)?;
    let family = analysis.family;
    let config_dir = options.model_config.as_deref();
    if let Some(dir) = config_dir
        && !dir.is_dir()
    {
        return Err(Error::invalid(format!("--model-config {}: not a folder", dir.display())));
    }
    // The config of `component`: from --model-config when it has one, else the standard one.
    let base = |component: &str, file: &str, standard: Value| -> Result<(Value, PathBuf)> {
        if let Some(dir) = config_dir {
            let p = dir.join(component).join(file);
            if p.is_file() {
                return Ok((super::read_json(&p)?, p));
            }
        }
        let differences = analysis.differences_of(component);
        if differences.is_empty() {
            return Ok((standard, path.to_path_buf()));
        }
        let wanted = match config_dir {
            Some(dir) => format!("{} is missing", dir.join(component).join(file).display()),
            None => format!("pass --model-config DIR with the model's diffusers configs (DIR/{component}/{file})"),
        };
        Err(Error::config(
            path,
            format!(
                "a non-standard {family} checkpoint ({component}: {}); its attention heads, norm groups and \
                 the like cannot be read from the weights: {wanted}",
                differences.iter().take(2).cloned().collect::<Vec<_>>().join(", ")
            ),
        ))
    };
    let fitted = |component: &str, standard: Value, inferred: &Map<String, Value>, blocks: usize| {
        let (json, config_path) = base(component, "config.json", standard)?;
        let (json, conflicts) = merge(&json, inferred, blocks);
        if !conflicts.is_empty() {
            let conflicts: Vec<String> = conflicts
                .into_iter()
                .take(3)
                .map(|(key, config, found)| format!("`{key}` is {config} in the config, {found} in the weights"))
                .collect();
            return Err(Error::config(
                &config_path,
                format!("does not match the weights of {}: {}", path.display(), conflicts.join(", ")),
            ));
        }
        Ok((json, config_path))
    };
    let blocks = |m: &Map<String, Value>| m["block_out_channels"].as_array().map_or(0, Vec::len);

    let refiner = matches!(analysis.text_layout, TextLayout::BigG { .. });
    let standard = if refiner { standard_refiner_unet() } else { standard_unet(family) };
    let (unet_json, unet_path) = fitted("unet", standard, &analysis.unet, blocks(&analysis.unet))?;
    let unet_config = UNetConfig::from_json(&unet_json.to_string(), &unet_path)?;
    let (vae_json, vae_path) = fitted("vae", standard_vae(family), &analysis.vae, blocks(&analysis.vae))?;
    let vae_config: VaeConfig = parse(&vae_json, &vae_path)?;
    // The refiner's one encoder is bigG, `text_encoder_2` in its diffusers folder.
    let (text_json, text_path) = if refiner {
        fitted("text_encoder_2", standard_text_2(), &analysis.text, 1)?
    } else {
        fitted("text_encoder", standard_text(family), &analysis.text, 1)?
    };
    let text_config: ClipTextConfig = parse(&text_json, &text_path)?;
    if text_config.num_attention_heads == 0 || !text_config.hidden_size.is_multiple_of(text_config.num_attention_heads)
    {
        return Err(Error::config(
            &text_path,
            format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                text_config.hidden_size, text_config.num_attention_heads
            ),
        ));
    }
    let text_map = match &analysis.text_layout {
        TextLayout::Clip { root } => KeyMap::clip(root),
        TextLayout::OpenClip { .. } => KeyMap::open_clip(text_config.num_hidden_layers),
        TextLayout::BigG { prefix } => KeyMap::open_clip_at(prefix, text_config.num_hidden_layers, true),
    };
    let text_2 = match &analysis.text_2 {
        Some((prefix, inferred)) => {
            let (json, config_path) = fitted("text_encoder_2", standard_text_2(), inferred, 1)?;
            let config: ClipTextConfig = parse(&json, &config_path)?;
            crate::models::clip::check_heads(&config_path, config.hidden_size, config.num_attention_heads)?;
            let map = KeyMap::open_clip_at(prefix, config.num_hidden_layers, true);
            Some((map, config, json, config_path))
        }
        None => None,
    };

    let (scheduler_json, scheduler_path) = base("scheduler", "scheduler_config.json", standard_scheduler(family))?;
    let scheduler_config = SchedulerConfig::from_value(&scheduler_json, Some(&scheduler_path))?;
    let index = config_dir.map(|d| d.join("model_index.json")).filter(|p| p.is_file());
    let index: Option<Value> = index.map(|p| super::read_json(&p)).transpose()?;
    let scheduler_class = index
        .as_ref()
        .and_then(|i| i["scheduler"][1].as_str())
        .or_else(|| scheduler_json["_class_name"].as_str())
        .map(str::to_string);

    // SD2's tokenizer (and SDXL's second) pads with `!` where SD1's pads with the end token.
    let folder_tokenizer = |name: &str, pad: &'static str| match config_dir.map(|d| d.join(name)).filter(|d| d.is_dir())
    {
        Some(dir) => TokenizerFiles::Dir(dir),
        None => TokenizerFiles::Bundled(pad),
    };
    let tokenizer_files = match &options.tokenizer {
        Some(dir) => TokenizerFiles::Dir(dir.clone()),
        None if refiner => folder_tokenizer("tokenizer_2", "!"),
        None => folder_tokenizer("tokenizer", if family == Family::Sd2 { "!" } else { "<|endoftext|>" }),
    };
    let view = |map: KeyMap| -> Result<Arc<TensorStore>> { Ok(Arc::new(Arc::new(map).view(&store)?)) };
    let text_2 = match text_2 {
        Some((map, config, json, config_path)) => {
            let tokenizer_files = folder_tokenizer("tokenizer_2", "!");
            Some(SecondText {
                tokenizer: tokenizer_files.load()?,
                tokenizer_files,
                encoder: Component { weights: view(map)?, config, json, config_path },
            })
        }
        None => None,
    };
    let force_zeros_for_empty_prompt = index
        .as_ref()
        .and_then(|i| i["force_zeros_for_empty_prompt"].as_bool())
        .unwrap_or(family == Family::Sdxl && !refiner);
    let requires_aesthetics_score =
        index.as_ref().and_then(|i| i["requires_aesthetics_score"].as_bool()).unwrap_or(refiner);
    Ok(ModelFiles {
        tokenizer: tokenizer_files.load()?,
        tokenizer_files,
        text_encoder: Component {
            weights: view(text_map)?,
            config: text_config,
            json: text_json,
            config_path: text_path,
        },
        text_2,
        force_zeros_for_empty_prompt,
        requires_aesthetics_score,
        unet: Component {
            weights: view(KeyMap::unet(&unet_config))?,
            config: unet_config,
            json: unet_json,
            config_path: unet_path,
        },
        vae: Component {
            weights: view(KeyMap::vae(&vae_config))?,
            config: vae_config,
            json: vae_json,
            config_path: vae_path,
        },
        scheduler_config,
        scheduler_json,
        scheduler_class,
    })
}

fn parse<T: serde::de::DeserializeOwned>(json: &Value, path: &Path) -> Result<T> {
    serde_json::from_value(json.clone()).map_err(|e| Error::config(path, format!("invalid config: {e}")))
}

/// The shape of `key`, which must exist with `rank` dimensions.
pub(crate) fn need<'a>(s: &'a TensorStore, key: &str, rank: usize) -> Result<&'a [usize]> {
    match s.shape(key) {
        Some(shape) if shape.len() == rank => Ok(shape),
        Some(shape) => Err(Error::Format {
            path: s.label().into(),
            message: format!("tensor `{key}` has shape {shape:?}, expected {rank} dimensions"),
        }),
        None => Err(s.missing(key)),
    }
}

/// One UNet resolution level as the shapes show it.
#[derive(Default)]
struct Level {
    channels: usize,
    layers: usize,
    /// (transformer depth, context width, linear projections) of its attention layers.
    attention: Option<(usize, usize, bool)>,
}

fn infer_unet(s: &TensorStore) -> Result<Map<String, Value>> {
    let key = |k: &str| format!("{UNET_PREFIX}{k}");
    let conv_in = need(s, &key("input_blocks.0.0.weight"), 4)?;
    let conv_out = need(s, &key("out.2.weight"), 4)?;
    let time = need(s, &key("time_embed.0.weight"), 2)?;
    let attention_at = |module: &str| -> Option<(usize, usize, bool)> {
        let proj = s.shape(&key(&format!("{module}.proj_in.weight")))?;
        let depth = (0..)
            .take_while(|d| s.contains(&key(&format!("{module}.transformer_blocks.{d}.attn1.to_q.weight"))))
            .count();
        let context = s.shape(&key(&format!("{module}.transformer_blocks.0.attn2.to_k.weight")))?[1];
        Some((depth, context, proj.len() == 2))
    };
    let mut levels = vec![Level::default()];
    for k in 1.. {
        if let Some(conv1) = s.shape(&key(&format!("input_blocks.{k}.0.in_layers.2.weight"))) {
            let level = levels.last_mut().expect("levels is never empty");
            level.channels = conv1[0];
            level.layers += 1;
            level.attention = level.attention.or(attention_at(&format!("input_blocks.{k}.1")));
        } else if s.contains(&key(&format!("input_blocks.{k}.0.op.weight"))) {
            levels.push(Level::default());
        } else {
            break;
        }
    }
    if let Some(i) = levels.iter().position(|l| l.layers == 0) {
        return Err(Error::Format {
            path: s.label().into(),
            message: format!("UNet level {i} has no resnets (`{UNET_PREFIX}input_blocks.*.0.in_layers.*`)"),
        });
    }
    let n = levels.len();
    let mut up_types = Vec::with_capacity(n);
    let mut k = 0;
    for i in 0..n {
        let attention = attention_at(&format!("output_blocks.{k}.1")).is_some();
        up_types.push(if attention { "CrossAttnUpBlock2D" } else { "UpBlock2D" });
        k += levels[n - 1 - i].layers + 1;
    }
    let mid = attention_at("middle_block.1");
    let mid_type = match (&mid, s.contains(&key("middle_block.0.in_layers.0.weight"))) {
        (Some(_), _) => json!("UNetMidBlock2DCrossAttn"),
        (None, true) => json!("UNetMidBlock2D"),
        (None, false) => Value::Null,
    };
    let first_attention = levels.iter().find_map(|l| l.attention).or(mid);
    let mut m = Map::new();
    m.insert("in_channels".into(), json!(conv_in[1]));
    m.insert("out_channels".into(), json!(conv_out[0]));
    m.insert("conv_in_kernel".into(), json!(conv_in[2]));
    m.insert("conv_out_kernel".into(), json!(conv_out[2]));
    m.insert("block_out_channels".into(), json!(levels.iter().map(|l| l.channels).collect::<Vec<_>>()));
    m.insert("layers_per_block".into(), json!(levels.iter().map(|l| l.layers).collect::<Vec<_>>()));
    let down_types: Vec<_> =
        levels.iter().map(|l| if l.attention.is_some() { "CrossAttnDownBlock2D" } else { "DownBlock2D" }).collect();
    m.insert("down_block_types".into(), json!(down_types));
    m.insert("up_block_types".into(), json!(up_types));
    m.insert("mid_block_type".into(), mid_type);
    let depths: Vec<Value> = levels.iter().map(|l| l.attention.map_or(Value::Null, |a| json!(a.0))).collect();
    m.insert("transformer_layers_per_block".into(), Value::Array(depths));
    if let Some((_, context, linear)) = first_attention {
        m.insert("cross_attention_dim".into(), json!(context));
        m.insert("use_linear_projection".into(), json!(linear));
    }
    if time[0] != 4 * time[1] {
        m.insert("time_embedding_dim".into(), json!(time[0]));
    }
    if let Some(added) = s.shape(&key("label_emb.0.0.weight")) {
        // SDXL's added conditioning: pooled text embeddings and time-id embeddings.
        m.insert("addition_embed_type".into(), json!("text_time"));
        m.insert("projection_class_embeddings_input_dim".into(), json!(added.get(1).copied().unwrap_or(0)));
    }
    Ok(m)
}

pub(crate) fn infer_vae(s: &TensorStore) -> Result<Map<String, Value>> {
    let key = |k: &str| format!("{VAE_PREFIX}{k}");
    let conv_in = need(s, &key("encoder.conv_in.weight"), 4)?;
    let channels: Vec<usize> =
        (0..).map_while(|i| s.shape(&key(&format!("encoder.down.{i}.block.0.conv2.weight"))).map(|d| d[0])).collect();
    let layers = (0..).take_while(|j| s.contains(&key(&format!("encoder.down.0.block.{j}.conv1.weight")))).count();
    if channels.is_empty() {
        return Err(s.missing(&key("encoder.down.0.block.0.conv2.weight")));
    }
    let decoder_in = need(s, &key("decoder.conv_in.weight"), 4)?;
    let decoder_out = need(s, &key("decoder.conv_out.weight"), 4)?;
    let n = channels.len();
    let mut m = Map::new();
    m.insert("in_channels".into(), json!(conv_in[1]));
    m.insert("out_channels".into(), json!(decoder_out[0]));
    m.insert("latent_channels".into(), json!(decoder_in[1]));
    m.insert("block_out_channels".into(), json!(channels));
    m.insert("layers_per_block".into(), json!(layers));
    m.insert("down_block_types".into(), json!(vec!["DownEncoderBlock2D"; n]));
    m.insert("up_block_types".into(), json!(vec!["UpDecoderBlock2D"; n]));
    m.insert("use_quant_conv".into(), json!(s.contains(&key("quant_conv.weight"))));
    m.insert("use_post_quant_conv".into(), json!(s.contains(&key("post_quant_conv.weight"))));
    m.insert("mid_block_add_attention".into(), json!(s.contains(&key("encoder.mid.attn_1.q.weight"))));
    Ok(m)
}

/// The text encoder's layout and shape-derived config: transformers' CLIP under the first of
/// `clip_roots` that holds one, else OpenCLIP under `open_clip` (a prefix ending in `.`).
fn infer_text(
    s: &TensorStore,
    clip_roots: &[String],
    open_clip: Option<&str>,
) -> Result<(TextLayout, Map<String, Value>)> {
    let mut m = Map::new();
    for root in clip_roots {
        let Some(token) = s.shape(&format!("{root}.embeddings.token_embedding.weight")) else { continue };
        let layers = (0..).take_while(|i| s.contains(&format!("{root}.encoder.layers.{i}.mlp.fc1.weight"))).count();
        let position = need(s, &format!("{root}.embeddings.position_embedding.weight"), 2)?;
        let fc1 = need(s, &format!("{root}.encoder.layers.0.mlp.fc1.weight"), 2)?;
        m.insert("vocab_size".into(), json!(token[0]));
        m.insert("hidden_size".into(), json!(token[1]));
        m.insert("max_position_embeddings".into(), json!(position[0]));
        m.insert("intermediate_size".into(), json!(fc1[0]));
        m.insert("num_hidden_layers".into(), json!(layers));
        return Ok((TextLayout::Clip { root: root.clone() }, m));
    }
    let expected = match (clip_roots.first(), open_clip) {
        (Some(root), Some(p)) => format!("`{root}.*` CLIP or `{p}*` OpenCLIP"),
        (Some(root), None) => format!("`{root}.*` CLIP"),
        (None, Some(p)) => format!("`{p}*` OpenCLIP"),
        (None, None) => "a text encoder".into(),
    };
    let unknown = || Error::Format {
        path: s.label().into(),
        message: format!("text encoder in an unknown layout (expected {expected})"),
    };
    let p = open_clip.ok_or_else(unknown)?;
    let token = need(s, &format!("{p}token_embedding.weight"), 2).map_err(|_| unknown())?;
    let position = need(s, &format!("{p}positional_embedding"), 2)?;
    let fc = need(s, &format!("{p}transformer.resblocks.0.mlp.c_fc.weight"), 2)?;
    let resblocks = (0..).take_while(|i| s.contains(&format!("{p}transformer.resblocks.{i}.mlp.c_fc.weight"))).count();
    m.insert("vocab_size".into(), json!(token[0]));
    m.insert("hidden_size".into(), json!(token[1]));
    m.insert("max_position_embeddings".into(), json!(position[0]));
    m.insert("intermediate_size".into(), json!(fc[0]));
    Ok((TextLayout::OpenClip { resblocks }, m))
}

/// A field where a config and the weights disagree: (name, config value, value the weights show).
type Conflict = (String, Value, Value);

/// `base` with the `inferred` fields set, and the fields where `base` disagrees with them. Per-block
/// values compare element-wise over `blocks` (a single value stands for every block); `null`
/// entries of `inferred` take the base's value (or 1).
pub(crate) fn merge(base: &Value, inferred: &Map<String, Value>, blocks: usize) -> (Value, Vec<Conflict>) {
    let mut out = base.as_object().cloned().unwrap_or_default();
    let mut conflicts = Vec::new();
    for (key, want) in inferred {
        let have = out.get(key).cloned().unwrap_or(Value::Null);
        let (fits, merged) = match want {
            Value::Array(items) if PER_BLOCK.contains(&key.as_str()) => merge_per_block(items, &have, blocks),
            want => (have.is_null() || same(want, &have), want.clone()),
        };
        if !fits {
            conflicts.push((key.clone(), have, want.clone()));
        }
        out.insert(key.clone(), merged);
    }
    (Value::Object(out), conflicts)
}

/// Config fields that hold one value per block, or one value for all.
const PER_BLOCK: [&str; 2] = ["layers_per_block", "transformer_layers_per_block"];

/// A per-block field: whether the config's value `have` fits `items`, and the merged value (a single
/// value when every block has the same).
fn merge_per_block(items: &[Value], have: &Value, blocks: usize) -> (bool, Value) {
    let have_items = match have {
        Value::Array(h) if h.len() == items.len() => h.clone(),
        Value::Array(_) => return (false, Value::Array(items.to_vec())),
        scalar => vec![scalar.clone(); items.len().max(blocks)],
    };
    let merged: Vec<Value> = items
        .iter()
        .zip(&have_items)
        .map(|(w, h)| match (w, h) {
            (Value::Null, Value::Null) => json!(1),
            (Value::Null, h) => h.clone(),
            (w, _) => w.clone(),
        })
        .collect();
    let fits = items.iter().zip(&have_items).all(|(w, h)| w.is_null() || h.is_null() || same(w, h));
    let merged = match merged.split_first() {
        Some((first, rest)) if rest.iter().all(|v| v == first) => first.clone(),
        _ => Value::Array(merged),
    };
    (fits, merged)
}

/// Equality with numbers compared by value (`1` == `1.0`).
fn same(a: &Value, b: &Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

/// The UNet config of stable-diffusion-v1-5 (SD1.x), stable-diffusion-2-1 (SD2.x) or
/// stable-diffusion-xl-base-1.0 (SDXL).
pub fn standard_unet(family: Family) -> Value {
    if family == Family::Sdxl {
        return json!({
            "_class_name": "UNet2DConditionModel",
            "act_fn": "silu",
            "addition_embed_type": "text_time",
            "addition_embed_type_num_heads": 64,
            "addition_time_embed_dim": 256,
            "attention_head_dim": [5, 10, 20],
            "block_out_channels": [320, 640, 1280],
            "center_input_sample": false,
            "conv_in_kernel": 3,
            "conv_out_kernel": 3,
            "cross_attention_dim": 2048,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "downsample_padding": 1,
            "flip_sin_to_cos": true,
            "freq_shift": 0,
            "in_channels": 4,
            "layers_per_block": 2,
            "mid_block_scale_factor": 1,
            "mid_block_type": "UNetMidBlock2DCrossAttn",
            "norm_eps": 1e-5,
            "norm_num_groups": 32,
            "out_channels": 4,
            "projection_class_embeddings_input_dim": 2816,
            "sample_size": 128,
            "transformer_layers_per_block": [1, 2, 10],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "upcast_attention": false,
            "use_linear_projection": true
        });
    }
    let sd2 = family == Family::Sd2;
    json!({
        "_class_name": "UNet2DConditionModel",
        "act_fn": "silu",
        "attention_head_dim": if sd2 { json!([5, 10, 20, 20]) } else { json!(8) },
        "block_out_channels": [320, 640, 1280, 1280],
        "center_input_sample": false,
        "conv_in_kernel": 3,
        "conv_out_kernel": 3,
        "cross_attention_dim": if sd2 { 1024 } else { 768 },
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "downsample_padding": 1,
        "flip_sin_to_cos": true,
        "freq_shift": 0,
        "in_channels": 4,
        "layers_per_block": 2,
        "mid_block_scale_factor": 1,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "norm_eps": 1e-5,
        "norm_num_groups": 32,
        "out_channels": 4,
        "sample_size": if sd2 { 96 } else { 64 },
        "transformer_layers_per_block": 1,
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "upcast_attention": sd2,
        "use_linear_projection": sd2
    })
}

/// The VAE config of SD1.x and SD2.x, or SDXL's (another scaling factor, decoded in f32 when the
/// weights are f16).
pub fn standard_vae(family: Family) -> Value {
    let sdxl = family == Family::Sdxl;
    json!({
        "_class_name": "AutoencoderKL",
        "act_fn": "silu",
        "block_out_channels": [128, 256, 512, 512],
        "down_block_types": vec!["DownEncoderBlock2D"; 4],
        "in_channels": 3,
        "latent_channels": 4,
        "layers_per_block": 2,
        "mid_block_add_attention": true,
        "norm_num_groups": 32,
        "out_channels": 3,
        "force_upcast": sdxl,
        "sample_size": match family { Family::Sd1 => 512, Family::Sd2 => 768, Family::Sdxl => 1024 },
        "scaling_factor": if sdxl { 0.13025 } else { 0.18215 },
        "up_block_types": vec!["UpDecoderBlock2D"; 4],
        "use_post_quant_conv": true,
        "use_quant_conv": true
    })
}

/// The text encoder config: CLIP ViT-L/14 (SD1.x, SDXL's first) or OpenCLIP ViT-H/14 without its
/// last layer (SD2.x).
pub fn standard_text(family: Family) -> Value {
    let sd2 = family == Family::Sd2;
    json!({
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
        "hidden_act": if sd2 { "gelu" } else { "quick_gelu" },
        "hidden_size": if sd2 { 1024 } else { 768 },
        "intermediate_size": if sd2 { 4096 } else { 3072 },
        "layer_norm_eps": 1e-5,
        "max_position_embeddings": 77,
        "num_attention_heads": if sd2 { 16 } else { 12 },
        "num_hidden_layers": if sd2 { 23 } else { 12 },
        "projection_dim": if sd2 { 512 } else { 768 },
        "vocab_size": 49408
    })
}

/// The UNet config of stable-diffusion-xl-refiner-1.0: SDXL base's with the refiner's blocks,
/// context width (bigG alone) and added-conditioning width (aesthetic score instead of the target
/// size).
pub fn standard_refiner_unet() -> Value {
    let mut config = standard_unet(Family::Sdxl);
    for (key, value) in [
        ("attention_head_dim", json!([6, 12, 24, 24])),
        ("block_out_channels", json!([384, 768, 1536, 1536])),
        ("cross_attention_dim", json!(1280)),
        ("down_block_types", json!(["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"])),
        ("projection_class_embeddings_input_dim", json!(2560)),
        ("transformer_layers_per_block", json!(4)),
        ("up_block_types", json!(["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"])),
    ] {
        config[key] = value;
    }
    config
}

/// SDXL's second text encoder config: OpenCLIP ViT-bigG/14 with its projection.
pub fn standard_text_2() -> Value {
    json!({
        "architectures": ["CLIPTextModelWithProjection"],
        "model_type": "clip_text_model",
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
        "hidden_act": "gelu",
        "hidden_size": 1280,
        "intermediate_size": 5120,
        "layer_norm_eps": 1e-5,
        "max_position_embeddings": 77,
        "num_attention_heads": 20,
        "num_hidden_layers": 32,
        "projection_dim": 1280,
        "vocab_size": 49408
    })
}

/// The scheduler config: SD1.5's PNDM, SD2.1's DDIM with v-prediction (768-v models; pass
/// `--prediction-type epsilon` for the 512 base models), or SDXL base's Euler.
pub fn standard_scheduler(family: Family) -> Value {
    if family == Family::Sdxl {
        return json!({
            "_class_name": "EulerDiscreteScheduler",
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "beta_start": 0.00085,
            "clip_sample": false,
            "interpolation_type": "linear",
            "num_train_timesteps": 1000,
            "prediction_type": "epsilon",
            "sample_max_value": 1.0,
            "set_alpha_to_one": false,
            "skip_prk_steps": true,
            "steps_offset": 1,
            "timestep_spacing": "leading",
            "trained_betas": null,
            "use_karras_sigmas": false
        });
    }
    let mut config = json!({
        "_class_name": if family == Family::Sd2 { "DDIMScheduler" } else { "PNDMScheduler" },
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "clip_sample": false,
        "num_train_timesteps": 1000,
        "set_alpha_to_one": false,
        "skip_prk_steps": true,
        "steps_offset": 1,
        "trained_betas": null
    });
    if family == Family::Sd2 {
        config["prediction_type"] = json!("v_prediction");
    }
    config
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_compares_per_block_values_and_fills_unknowns() {
        let base = json!({"transformer_layers_per_block": [2, 1], "cross_attention_dim": 48, "heads": 4});
        let mut inferred = Map::new();
        inferred.insert("transformer_layers_per_block".into(), json!([2, null]));
        inferred.insert("cross_attention_dim".into(), json!(48));
        let (merged, conflicts) = merge(&base, &inferred, 2);
        assert!(conflicts.is_empty(), "{conflicts:?}");
        assert_eq!(merged["transformer_layers_per_block"], json!([2, 1]));
        assert_eq!(merged["heads"], json!(4));
        inferred.insert("cross_attention_dim".into(), json!(32));
        let (_, conflicts) = merge(&base, &inferred, 2);
        assert_eq!(conflicts, vec![("cross_attention_dim".to_string(), json!(48), json!(32))]);
        let (merged, conflicts) =
            merge(&json!({"layers_per_block": 2}), &Map::from_iter([("layers_per_block".into(), json!([2, 2]))]), 2);
        assert!(conflicts.is_empty());
        assert_eq!(merged["layers_per_block"], json!(2));
    }
}
