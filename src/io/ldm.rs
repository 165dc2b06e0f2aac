//! The original (CompVis / LDM) single-file layout of SD1.x/2.x checkpoints and its correspondence
//! with diffusers names.
//!
//! A [`KeyMap`] lists, for one component, which module prefix of the checkpoint holds which diffusers
//! module (built from the component's config: block and layer counts fix the `input_blocks.N`
//! numbering), and how parameter names differ inside a module (`in_layers.0` ↔ `norm1`, OpenCLIP's
//! fused `in_proj_weight` ↔ three `q/k/v_proj.weight`, the VAE's 1x1-conv attention ↔ Linear). The
//! same table renames both ways: a checkpoint read as diffusers components ([`KeyMap::view`]) and a
//! diffusers model written as a checkpoint ([`KeyMap::to_checkpoint`]). The rules follow diffusers'
//! `loaders/single_file_utils.py`.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use super::weights::{Rename, TensorStore, Transform};
use crate::models::controlnet::ControlNetConfig;
use crate::models::unet::UNetConfig;
use crate::models::vae::VaeConfig;
use crate::{Error, Result};

/// Key prefix of the UNet in a single-file checkpoint.
pub const UNET_PREFIX: &str = "model.diffusion_model.";
/// Key prefix of an original ControlNet 1.x file.
pub const CONTROLNET_PREFIX: &str = "control_model.";
/// Key prefix of a Uni-ControlNet's local adapter (uni.ckpt).
pub const UNI_LOCAL_PREFIX: &str = "local_adapter.";
/// Key prefix of the VAE.
pub const VAE_PREFIX: &str = "first_stage_model.";
/// Key prefix of the SD1.x CLIP text encoder (transformers' layout inside).
pub const CLIP_PREFIX: &str = "cond_stage_model.transformer.";
/// Key prefix of the SD2.x OpenCLIP text encoder.
pub const OPEN_CLIP_PREFIX: &str = "cond_stage_model.model.";
/// Key prefix of SDXL's text encoders (`0.transformer.text_model` CLIP ViT-L, `1.model` OpenCLIP
/// bigG; the refiner has only the bigG one, at `0.model`).
pub const SGM_EMBEDDERS_PREFIX: &str = "conditioner.embedders.";

/// Parameter names inside one module: (diffusers, checkpoint, how the diffusers tensor is read from
/// the checkpoint's). Names not listed are the same in both layouts.
type SubNames = &'static [(&'static str, &'static str, Option<Transform>)];

const SAME: SubNames = &[];
const UNET_RESNET: SubNames = &[
    ("norm1", "in_layers.0", None),
    ("conv1", "in_layers.2", None),
    ("time_emb_proj", "emb_layers.1", None),
    ("norm2", "out_layers.0", None),
    ("conv2", "out_layers.3", None),
    ("conv_shortcut", "skip_connection", None),
];
const VAE_RESNET: SubNames = &[("conv_shortcut", "nin_shortcut", None)];
const SQUEEZE: Option<Transform> = Some(Transform::SqueezeToLinear);
const VAE_ATTENTION: SubNames = &[
    ("group_norm", "norm", None),
    ("to_q.weight", "q.weight", SQUEEZE),
    ("to_q.bias", "q.bias", None),
    ("to_k.weight", "k.weight", SQUEEZE),
    ("to_k.bias", "k.bias", None),
    ("to_v.weight", "v.weight", SQUEEZE),
    ("to_v.bias", "v.bias", None),
    ("to_out.0.weight", "proj_out.weight", SQUEEZE),
    ("to_out.0.bias", "proj_out.bias", None),
];
/// A leaf matrix stored transposed under the module's own name (`text_projection` ↔
/// `text_projection.weight`).
const TRANSPOSED: SubNames = &[("weight", "", Some(Transform::Transpose))];
const fn qkv(index: usize) -> Option<Transform> {
    Some(Transform::Chunk { index, count: 3 })
}
const OPEN_CLIP_LAYER: SubNames = &[
    ("self_attn.q_proj.weight", "attn.in_proj_weight", qkv(0)),
    ("self_attn.k_proj.weight", "attn.in_proj_weight", qkv(1)),
    ("self_attn.v_proj.weight", "attn.in_proj_weight", qkv(2)),
    ("self_attn.q_proj.bias", "attn.in_proj_bias", qkv(0)),
    ("self_attn.k_proj.bias", "attn.in_proj_bias", qkv(1)),
    ("self_attn.v_proj.bias", "attn.in_proj_bias", qkv(2)),
    ("self_attn.out_proj", "attn.out_proj", None),
    ("layer_norm1", "ln_1", None),
    ("layer_norm2", "ln_2", None),
    ("mlp.fc1", "mlp.c_fc", None),
    ("mlp.fc2", "mlp.c_proj", None),
];

/// One module (or leaf tensor) and its names in both layouts.
struct Row {
    diffusers: String,
    checkpoint: String,
    sub: SubNames,
}

/// How one component's tensor names correspond between a single-file checkpoint and diffusers.
pub struct KeyMap {
    rows: Vec<Row>,
    by_checkpoint: HashMap<String, usize>,
    by_diffusers: HashMap<String, usize>,
}

impl KeyMap {
    fn new(rows: Vec<Row>) -> Self {
        let by_checkpoint = rows.iter().enumerate().map(|(i, r)| (r.checkpoint.clone(), i)).collect();
        let by_diffusers = rows.iter().enumerate().map(|(i, r)| (r.diffusers.clone(), i)).collect();
        Self { rows, by_checkpoint, by_diffusers }
    }

    /// The UNet (`model.diffusion_model.*`) of a model with `config`.
    pub fn unet(config: &UNetConfig) -> Self {
        let mut rows = input_half_rows(config, UNET_PREFIX);
        let mut row = |diffusers: String, checkpoint: String, sub: SubNames| {
            rows.push(Row { diffusers, checkpoint: format!("{UNET_PREFIX}{checkpoint}"), sub })
        };
        for (d, c) in [("conv_norm_out", "out.0"), ("conv_out", "out.2")] {
            row(d.into(), c.into(), SAME);
        }
        let n = config.blocks.len();
        let mut k = 0;
        for i in 0..n {
            let count = config.blocks[n - 1 - i].layers + 1;
            let attention = config.up_has_attention[i];
            for j in 0..count {
                row(format!("up_blocks.{i}.resnets.{j}"), format!("output_blocks.{k}.0"), UNET_RESNET);
                if attention {
                    row(format!("up_blocks.{i}.attentions.{j}"), format!("output_blocks.{k}.1"), SAME);
                }
                if j + 1 == count && i + 1 < n {
                    let slot = if attention { 2 } else { 1 };
                    row(format!("up_blocks.{i}.upsamplers.0.conv"), format!("output_blocks.{k}.{slot}.conv"), SAME);
                }
                k += 1;
            }
        }
        Self::new(rows)
    }

    /// A ControlNet in the original ControlNet 1.x layout (`control_model.*`): the UNet's input half
    /// plus the zero convolutions and the condition-embedding convolutions (`input_hint_block`, whose
    /// convolutions sit at every other index, SiLUs between them).
    pub fn controlnet(config: &ControlNetConfig) -> Self {
        let mut rows = residual_branch_rows(&config.unet, CONTROLNET_PREFIX);
        let mut row = |diffusers: String, checkpoint: String| {
            rows.push(Row { diffusers, checkpoint: format!("{CONTROLNET_PREFIX}{checkpoint}"), sub: SAME })
        };
        row("controlnet_cond_embedding.conv_in".into(), "input_hint_block.0".into());
        let blocks = 2 * (config.conditioning_embedding_out_channels.len() - 1);
        for j in 0..blocks {
            row(format!("controlnet_cond_embedding.blocks.{j}"), format!("input_hint_block.{}", 2 * (j + 1)));
        }
        row("controlnet_cond_embedding.conv_out".into(), format!("input_hint_block.{}", 2 * (blocks + 1)));
        Self::new(rows)
    }

    /// The local adapter of a Uni-ControlNet file (`local_adapter.*`), whose input half copies a UNet
    /// of `config`: as a ControlNet's, with the FDN resblocks' `norm_in`/`norm_out` and the condition
    /// `feature_extractor` under the same names in both layouts.
    pub fn uni_local_adapter(config: &UNetConfig) -> Self {
        let mut rows = residual_branch_rows(config, UNI_LOCAL_PREFIX);
        rows.push(Row {
            diffusers: "feature_extractor".into(),
            checkpoint: format!("{UNI_LOCAL_PREFIX}feature_extractor"),
            sub: SAME,
        });
        Self::new(rows)
    }

    /// The VAE (`first_stage_model.*`) of a model with `config`.
    pub fn vae(config: &VaeConfig) -> Self {
        let mut rows = Vec::new();
        let mut row = |diffusers: String, checkpoint: String, sub: SubNames| {
            rows.push(Row { diffusers, checkpoint: format!("{VAE_PREFIX}{checkpoint}"), sub })
        };
        row("quant_conv".into(), "quant_conv".into(), SAME);
        row("post_quant_conv".into(), "post_quant_conv".into(), SAME);
        for part in ["encoder", "decoder"] {
            row(format!("{part}.conv_in"), format!("{part}.conv_in"), SAME);
            row(format!("{part}.conv_out"), format!("{part}.conv_out"), SAME);
            row(format!("{part}.conv_norm_out"), format!("{part}.norm_out"), SAME);
            row(format!("{part}.mid_block.resnets.0"), format!("{part}.mid.block_1"), VAE_RESNET);
            row(format!("{part}.mid_block.resnets.1"), format!("{part}.mid.block_2"), VAE_RESNET);
            row(format!("{part}.mid_block.attentions.0"), format!("{part}.mid.attn_1"), VAE_ATTENTION);
        }
        let n = config.block_out_channels.len();
        for i in 0..n {
            for j in 0..config.layers_per_block {
                row(format!("encoder.down_blocks.{i}.resnets.{j}"), format!("encoder.down.{i}.block.{j}"), VAE_RESNET);
            }
            for j in 0..=config.layers_per_block {
                let level = n - 1 - i;
                row(format!("decoder.up_blocks.{i}.resnets.{j}"), format!("decoder.up.{level}.block.{j}"), VAE_RESNET);
            }
            if i + 1 < n {
                row(
                    format!("encoder.down_blocks.{i}.downsamplers.0.conv"),
                    format!("encoder.down.{i}.downsample.conv"),
                    SAME,
                );
                row(
                    format!("decoder.up_blocks.{i}.upsamplers.0.conv"),
                    format!("decoder.up.{}.upsample.conv", n - 1 - i),
                    SAME,
                );
            }
        }
        Self::new(rows)
    }

    /// The SD1.x CLIP text encoder: transformers' names under `root` (`cond_stage_model.transformer.text_model`,
    /// or `cond_stage_model.transformer` in checkpoints saved by old transformers versions).
    pub fn clip(root: &str) -> Self {
        Self::new(vec![Row { diffusers: "text_model".into(), checkpoint: root.into(), sub: SAME }])
    }

    /// The SD2.x OpenCLIP text encoder, of which the first `layers` resblocks are used (SD2 uses all
    /// but the last of its 24; the rest of the file's text tower is ignored, as in diffusers).
    pub fn open_clip(layers: usize) -> Self {
        Self::open_clip_at(OPEN_CLIP_PREFIX, layers, false)
    }

    /// An OpenCLIP text encoder under `prefix` (ending in `.`) with `layers` resblocks used, and
    /// with `projection` its `text_projection` (stored [hidden, projection]) as transformers'
    /// `text_projection.weight` (SDXL's bigG encoder).
    pub fn open_clip_at(prefix: &str, layers: usize, projection: bool) -> Self {
        let p = prefix;
        let mut rows: Vec<Row> = [
            ("text_model.embeddings.token_embedding", "token_embedding"),
            ("text_model.embeddings.position_embedding.weight", "positional_embedding"),
            ("text_model.final_layer_norm", "ln_final"),
        ]
        .into_iter()
        .map(|(d, c)| Row { diffusers: d.into(), checkpoint: format!("{p}{c}"), sub: SAME })
        .collect();
        rows.extend((0..layers).map(|i| Row {
            diffusers: format!("text_model.encoder.layers.{i}"),
            checkpoint: format!("{p}transformer.resblocks.{i}"),
            sub: OPEN_CLIP_LAYER,
        }));
        if projection {
            rows.push(Row {
                diffusers: "text_projection".into(),
                checkpoint: format!("{p}text_projection"),
                sub: TRANSPOSED,
            });
        }
        Self::new(rows)
    }

    /// The diffusers names read from checkpoint key `key`, each with its transform (empty when the
    /// key is not part of this component).
    pub fn to_diffusers(&self, key: &str) -> Vec<(String, Option<Transform>)> {
        let Some((row, rest)) = lookup(&self.by_checkpoint, key) else { return Vec::new() };
        let row = &self.rows[row];
        let renamed: Vec<_> = row
            .sub
            .iter()
            .filter_map(|&(d, c, t)| strip_module(rest, c).map(|tail| (join(&row.diffusers, &format!("{d}{tail}")), t)))
            .collect();
        if renamed.is_empty() { vec![(join(&row.diffusers, rest), None)] } else { renamed }
    }

    /// The checkpoint key diffusers name `name` is read from, with the transform that reads it.
    pub fn to_checkpoint_key(&self, name: &str) -> Option<(String, Option<Transform>)> {
        let (row, rest) = lookup(&self.by_diffusers, name)?;
        let row = &self.rows[row];
        let renamed = row
            .sub
            .iter()
            .find_map(|&(d, c, t)| strip_module(rest, d).map(|tail| (join(&row.checkpoint, &format!("{c}{tail}")), t)));
        Some(renamed.unwrap_or_else(|| (join(&row.checkpoint, rest), None)))
    }

    /// This component of a whole-checkpoint `store`, under diffusers names. A name the checkpoint
    /// lacks is reported under its checkpoint key.
    pub fn view(self: &Arc<Self>, store: &TensorStore) -> Result<TensorStore> {
        let renames = store
            .keys()
            .into_iter()
            .flat_map(|key| {
                self.to_diffusers(key).into_iter().map(|(name, transform)| Rename { name, from: key.into(), transform })
            })
            .collect();
        let map = self.clone();
        store.view(renames, Some(Arc::new(move |name: &str| map.to_checkpoint_key(name).map(|(key, _)| key))))
    }

    /// The tensors of a diffusers-layout `store` under checkpoint keys, in their stored dtypes: fused
    /// projections concatenated, Linear attention weights reshaped to 1x1 convolutions. `name_of`
    /// gives a store key's diffusers name.
    pub fn to_checkpoint(
        &self,
        store: &TensorStore,
        name_of: impl Fn(&str) -> String,
    ) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        let mut parts: HashMap<String, Vec<Option<Tensor>>> = HashMap::new();
        for key in store.keys() {
            let name = name_of(key);
            let (target, transform) = self.to_checkpoint_key(&name).ok_or_else(|| Error::Format {
                path: store.label().into(),
                message: format!("tensor `{key}` has no place in a single-file checkpoint"),
            })?;
            let tensor = store.load(key, store.dtype(key).unwrap_or(DType::F32), &Device::Cpu)?;
            match transform {
                None => out.push((target, tensor)),
                Some(Transform::SqueezeToLinear) => {
                    let (o, i) = tensor.dims2()?;
                    out.push((target, tensor.reshape((o, i, 1, 1))?));
                }
                Some(Transform::Chunk { index, count }) => {
                    parts.entry(target).or_insert_with(|| vec![None; count])[index] = Some(tensor);
                }
                Some(Transform::Transpose) => out.push((target, tensor.t()?.contiguous()?)),
            }
        }
        for (target, pieces) in parts {
            let pieces: Option<Vec<Tensor>> = pieces.into_iter().collect();
            let pieces = pieces.ok_or_else(|| Error::Format {
                path: store.label().into(),
                message: format!("`{target}` is fused from q, k and v projections, but one of them is missing"),
            })?;
            out.push((target, Tensor::cat(&pieces, 0)?));
        }
        Ok(out)
    }
}

/// The rows of a UNet's input half under `prefix`: time embedding, `conv_in`, the down blocks
/// (`input_blocks.N`, numbered through resnets, attentions and downsamplers) and the mid block.
fn input_half_rows(config: &UNetConfig, prefix: &str) -> Vec<Row> {
    let mut rows = Vec::new();
    let mut row = |diffusers: String, checkpoint: String, sub: SubNames| {
        rows.push(Row { diffusers, checkpoint: format!("{prefix}{checkpoint}"), sub })
    };
    for (d, c) in [
        ("time_embedding.linear_1", "time_embed.0"),
        ("time_embedding.linear_2", "time_embed.2"),
        ("conv_in", "input_blocks.0.0"),
        // SDXL's added conditioning (absent from other UNets' files, so never looked up there).
        ("add_embedding.linear_1", "label_emb.0.0"),
        ("add_embedding.linear_2", "label_emb.0.2"),
    ] {
        row(d.into(), c.into(), SAME);
    }
    let n = config.blocks.len();
    let mut k = 1;
    for (i, block) in config.blocks.iter().enumerate() {
        for j in 0..block.layers {
            row(format!("down_blocks.{i}.resnets.{j}"), format!("input_blocks.{k}.0"), UNET_RESNET);
            if block.has_attention {
                row(format!("down_blocks.{i}.attentions.{j}"), format!("input_blocks.{k}.1"), SAME);
            }
            k += 1;
        }
        if i + 1 < n {
            row(format!("down_blocks.{i}.downsamplers.0.conv"), format!("input_blocks.{k}.0.op"), SAME);
            k += 1;
        }
    }
    if config.has_mid_block {
        row("mid_block.resnets.0".into(), "middle_block.0".into(), UNET_RESNET);
        row("mid_block.attentions.0".into(), "middle_block.1".into(), SAME);
        row("mid_block.resnets.1".into(), "middle_block.2".into(), UNET_RESNET);
    }
    rows
}

/// The rows of a ControlNet-style branch under `prefix`: the UNet's input half, then its zero
/// convolutions `zero_convs.N.0` (one per skip) and `middle_block_out.0`.
fn residual_branch_rows(config: &UNetConfig, prefix: &str) -> Vec<Row> {
    let mut rows = input_half_rows(config, prefix);
    let mut row = |diffusers: String, checkpoint: String| {
        rows.push(Row { diffusers, checkpoint: format!("{prefix}{checkpoint}"), sub: SAME })
    };
    let skips = 1 + config.blocks.iter().map(|b| b.layers).sum::<usize>() + config.blocks.len() - 1;
    for i in 0..skips {
        row(format!("controlnet_down_blocks.{i}"), format!("zero_convs.{i}.0"));
    }
    row("controlnet_mid_block".into(), "middle_block_out.0".into());
    rows
}

/// The longest module prefix of `key` in `index` (or `key` itself), with the rest of the key.
fn lookup<'a>(index: &HashMap<String, usize>, key: &'a str) -> Option<(usize, &'a str)> {
    if let Some(&row) = index.get(key) {
        return Some((row, ""));
    }
    let mut end = key.len();
    while let Some(dot) = key[..end].rfind('.') {
        if let Some(&row) = index.get(&key[..dot]) {
            return Some((row, &key[dot + 1..]));
        }
        end = dot;
    }
    None
}

/// `rest` without its leading module `module` (whole dotted components), keeping the tail's dot.
fn strip_module<'a>(rest: &'a str, module: &str) -> Option<&'a str> {
    let tail = rest.strip_prefix(module)?;
    (tail.is_empty() || tail.starts_with('.')).then_some(tail)
}

fn join(prefix: &str, rest: &str) -> String {
    if rest.is_empty() { prefix.to_string() } else { format!("{prefix}.{rest}") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_both_ways() {
        let open_clip = KeyMap::open_clip(2);
        let fused = "cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight";
        let names: Vec<_> = open_clip.to_diffusers(fused).into_iter().map(|(n, _)| n).collect();
        assert_eq!(names.len(), 3);
        assert_eq!(names[1], "text_model.encoder.layers.1.self_attn.k_proj.weight");
        assert_eq!(
            open_clip.to_checkpoint_key(&names[1]),
            Some((fused.to_string(), Some(Transform::Chunk { index: 1, count: 3 })))
        );
        assert!(open_clip.to_diffusers("cond_stage_model.model.transformer.resblocks.2.ln_1.weight").is_empty());
        assert_eq!(
            open_clip.to_diffusers("cond_stage_model.model.positional_embedding"),
            vec![("text_model.embeddings.position_embedding.weight".to_string(), None)]
        );
        let clip = KeyMap::clip("cond_stage_model.transformer.text_model");
        assert_eq!(
            clip.to_checkpoint_key("text_model.encoder.layers.0.mlp.fc1.weight").map(|(k, _)| k).as_deref(),
            Some("cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight")
        );
    }
}
