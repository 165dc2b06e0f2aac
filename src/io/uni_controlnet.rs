//! Uni-ControlNet files in the layout of the public `uni.ckpt` (`.ckpt` pickle or `.safetensors`):
//! `local_adapter.*` (a UNet input half in LDM names, FDN resblocks at the `inject_layers`, zero
//! convolutions, the condition feature extractor) and `global_adapter.*`, beside the whole LDM
//! model, which is ignored here. The structure comes from the tensor shapes; what shapes cannot
//! tell (attention heads) comes from the base model's UNet, which the adapter copies.

use std::path::Path;
use std::sync::Arc;

use super::ldm::{KeyMap, UNI_LOCAL_PREFIX};
use super::single_file::need;
use super::weights::TensorStore;
use crate::models::unet::UNetConfig;
use crate::models::uni_controlnet::local_adapter::{FDN_GROUPS, PRE_EXTRACTOR_CHANNELS};
use crate::models::uni_controlnet::{GlobalAdapterConfig, LocalAdapterConfig};
use crate::{Error, Result};

/// Key prefix of the global adapter.
pub const UNI_GLOBAL_PREFIX: &str = "global_adapter.";

/// A Uni-ControlNet file opened for a base UNet.
pub struct UniControlNetFile {
    /// The local adapter's structure and its tensors under diffusers-style names (see
    /// [`crate::models::uni_controlnet::LocalAdapter::load`]), if the file has one.
    pub local: Option<(LocalAdapterConfig, Arc<TensorStore>)>,
    /// The global adapter's widths, if the file has one.
    pub global: Option<GlobalAdapterConfig>,
    /// The whole file (the global adapter under `global_adapter.`).
    pub store: Arc<TensorStore>,
}

/// One level of the local adapter's down path as the shapes show it.
struct Level {
    channels: usize,
    layers: usize,
    /// (transformer depth, context width, linear projections) of its attention layers.
    attention: Option<(usize, usize, bool)>,
    /// (layer, feature channels) of each FDN resblock.
    fdn: Vec<(usize, usize)>,
}

/// Opens a Uni-ControlNet file whose adapters must fit `base` (the model's UNet).
pub fn open(path: &Path, base: &UNetConfig) -> Result<UniControlNetFile> {
    let store = TensorStore::open(path)?;
    let has = |prefix: &str| store.keys().iter().any(|k| k.starts_with(prefix));
    let (has_local, has_global) = (has(UNI_LOCAL_PREFIX), has(UNI_GLOBAL_PREFIX));
    if !has_local && !has_global {
        return Err(Error::Format {
            path: path.into(),
            message: format!(
                "not a Uni-ControlNet: no `{UNI_LOCAL_PREFIX}*` or `{UNI_GLOBAL_PREFIX}*` tensors (the file looks \
                 like: {})",
                super::identify::kind_of(&store)
            ),
        });
    }
    let local = if has_local {
        let config = local_config(&store, base)?;
        let view = Arc::new(KeyMap::uni_local_adapter(&config.unet)).view(&store)?;
        Some((config, Arc::new(view)))
    } else {
        None
    };
    let global = has_global.then(|| global_config(&store)).transpose()?;
    Ok(UniControlNetFile { local, global, store: Arc::new(store) })
}

/// The stored shape of `local_adapter.{key}`.
fn local_shape<'a>(s: &'a TensorStore, key: &str) -> Option<&'a [usize]> {
    s.shape(&format!("{UNI_LOCAL_PREFIX}{key}"))
}

/// A format error about the local adapter's structure.
fn layout_error(s: &TensorStore, message: String) -> Error {
    Error::Format { path: s.label().into(), message: format!("Uni-ControlNet local adapter: {message}") }
}

/// The local adapter's structure from the shapes, checked against `base`.
fn local_config(s: &TensorStore, base: &UNetConfig) -> Result<LocalAdapterConfig> {
    let key = |k: &str| format!("{UNI_LOCAL_PREFIX}{k}");
    let conv_in = need(s, &key("input_blocks.0.0.weight"), 4)?;
    let time = need(s, &key("time_embed.0.weight"), 2)?;
    let attention_at = |module: &str| -> Option<(usize, usize, bool)> {
        let proj = local_shape(s, &format!("{module}.proj_in.weight"))?;
        let depth = (0..)
            .take_while(|d| s.contains(&key(&format!("{module}.transformer_blocks.{d}.attn1.to_q.weight"))))
            .count();
        let context = local_shape(s, &format!("{module}.transformer_blocks.0.attn2.to_k.weight"))?[1];
        Some((depth, context, proj.len() == 2))
    };
    let new_level = || Level { channels: 0, layers: 0, attention: None, fdn: Vec::new() };
    let mut levels = vec![new_level()];
    for k in 1.. {
        if let Some(conv1) = local_shape(s, &format!("input_blocks.{k}.0.in_layers.2.weight")) {
            let level = levels.last_mut().expect("levels is never empty");
            if let Some(gamma) = local_shape(s, &format!("input_blocks.{k}.0.norm_in.conv_gamma.weight")) {
                level.fdn.push((level.layers, gamma[1]));
            }
            level.channels = conv1[0];
            level.layers += 1;
            level.attention = level.attention.or(attention_at(&format!("input_blocks.{k}.1")));
        } else if s.contains(&key(&format!("input_blocks.{k}.0.op.weight"))) {
            levels.push(new_level());
        } else {
            break;
        }
    }

    let mine: Vec<(usize, usize)> = levels.iter().map(|l| (l.channels, l.layers)).collect();
    let theirs: Vec<(usize, usize)> = base.blocks.iter().map(|b| (b.channels, b.layers)).collect();
    if mine != theirs || conv_in[1] != base.in_channels {
        return Err(layout_error(
            s,
            format!(
                "block layout (channels, layers) {mine:?} with {} input channels does not fit the model's UNet \
                 {theirs:?} with {} (an adapter for another base model?)",
                conv_in[1], base.in_channels
            ),
        ));
    }
    let context = levels.iter().find_map(|l| l.attention).or(attention_at("middle_block.1"));
    let Some((_, context_dim, linear)) = context else {
        return Err(layout_error(s, "no attention layers (`input_blocks.*.1.proj_in`, `middle_block.1`)".into()));
    };
    let base_context = base.blocks[0].cross_attention_dim;
    if context_dim != base_context {
        return Err(layout_error(
            s,
            format!("cross-attention width {context_dim} does not match the model's {base_context}"),
        ));
    }

    // The feature extractor: the fixed stack, then one stride-2 extractor per feature map.
    let pre = need(s, &key("feature_extractor.pre_extractor.0.weight"), 4)?;
    if pre[0] != PRE_EXTRACTOR_CHANNELS[0] {
        return Err(layout_error(
            s,
            format!(
                "`feature_extractor.pre_extractor.0` has {} output channels, expected {}",
                pre[0], PRE_EXTRACTOR_CHANNELS[0]
            ),
        ));
    }
    let local_channels = pre[1];
    let inject_channels: Vec<usize> = (0..)
        .map_while(|i| local_shape(s, &format!("feature_extractor.extractors.{i}.0.weight")).map(|w| w[0]))
        .collect();
    // Feature map i (1/2^i of the latent size) feeds the FDN resblock of level i.
    let fdn: Vec<(usize, usize, usize)> =
        levels.iter().enumerate().flat_map(|(i, l)| l.fdn.iter().map(move |&(j, f)| (i, j, f))).collect();
    let mut inject_layers = Vec::with_capacity(fdn.len());
    for (n, &(level, layer, channels)) in fdn.iter().enumerate() {
        if level != n || n >= inject_channels.len() || channels != inject_channels[n] {
            return Err(layout_error(
                s,
                format!(
                    "FDN resblocks at (level, layer, feature channels) {:?} do not match the feature extractor's {} \
                     maps of {inject_channels:?} channels (map i feeds one resblock of level i)",
                    fdn,
                    inject_channels.len()
                ),
            ));
        }
        inject_layers.push(layer);
    }
    if inject_layers.is_empty() {
        return Err(layout_error(s, "no FDN resblocks (`input_blocks.*.0.norm_in.conv_gamma`)".into()));
    }
    if let Some(l) = levels.iter().find(|l| !l.channels.is_multiple_of(FDN_GROUPS)) {
        return Err(layout_error(
            s,
            format!("{} channels cannot be normalised in {FDN_GROUPS} groups (LDM's GroupNorm)", l.channels),
        ));
    }

    let mut unet = base.clone();
    for (block, level) in unet.blocks.iter_mut().zip(&levels) {
        block.has_attention = level.attention.is_some();
        if let Some((depth, _, _)) = level.attention {
            block.transformer_layers = depth;
        }
    }
    // LDM's resblocks and transformers: GroupNorm(32, eps 1e-5 / 1e-6), cos-first timestep embedding.
    unet.norm_num_groups = FDN_GROUPS;
    unet.norm_eps = 1e-5;
    unet.flip_sin_to_cos = true;
    unet.freq_shift = 0.0;
    unet.use_linear_projection = linear;
    unet.time_embed_dim = time[0];
    unet.conv_in_kernel = conv_in[2];
    unet.has_mid_block = true;
    unet.up_has_attention = Vec::new();
    Ok(LocalAdapterConfig { unet, local_channels, inject_channels, inject_layers })
}

/// The global adapter's widths from the shapes.
fn global_config(s: &TensorStore) -> Result<GlobalAdapterConfig> {
    let key = |k: &str| format!("{UNI_GLOBAL_PREFIX}{k}");
    let in_dim = need(s, &key("norm1.weight"), 1)?[0];
    let hidden_dim = need(s, &key("norm2.weight"), 1)?[0];
    let inner1 = need(s, &key("ff1.net.2.weight"), 2)?[1];
    let out = need(s, &key("ff2.net.2.weight"), 2)?;
    let (out_dim, inner2) = (out[0], out[1]);
    if in_dim == 0 || !out_dim.is_multiple_of(in_dim) {
        return Err(Error::Format {
            path: s.label().into(),
            message: format!(
                "Uni-ControlNet global adapter: output width {out_dim} (`{}`) is not a whole number of \
                 {in_dim}-wide tokens",
                key("ff2.net.2.weight")
            ),
        });
    }
    Ok(GlobalAdapterConfig { in_dim, hidden_dim, inner1, inner2, tokens: out_dim / in_dim })
}
