//! `UNet2DConditionModel`'s `config.json`, resolved into per-block values and validated once.

use std::path::Path;

use serde::Deserialize;

use crate::{Error, Result};

/// A config value that is either one value for every block or a list with one per block.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PerBlock<T> {
    /// The same value for every block.
    One(T),
    /// One value per down block.
    Each(Vec<T>),
}

impl<T: Clone> PerBlock<T> {
    fn resolve(&self, blocks: usize, field: &str, path: &Path) -> Result<Vec<T>> {
        match self {
            PerBlock::One(v) => Ok(vec![v.clone(); blocks]),
            PerBlock::Each(v) if v.len() == blocks => Ok(v.clone()),
            PerBlock::Each(v) => Err(Error::config(
                path,
                format!("`{field}` has {} entries but the model has {blocks} down blocks", v.len()),
            )),
        }
    }
}

/// The raw fields of a diffusers UNet `config.json` that change the math.
#[derive(Debug, Clone, Deserialize)]
struct RawConfig {
    #[serde(default)]
    sample_size: Option<usize>,
    #[serde(default = "d4")]
    in_channels: usize,
    #[serde(default = "d4")]
    out_channels: usize,
    #[serde(default)]
    center_input_sample: bool,
    #[serde(default = "dtrue")]
    flip_sin_to_cos: bool,
    #[serde(default)]
    freq_shift: f64,
    down_block_types: Vec<String>,
    #[serde(default)]
    up_block_types: Vec<String>,
    #[serde(default = "dmid")]
    mid_block_type: Option<String>,
    #[serde(default = "dfalse_pb")]
    only_cross_attention: PerBlock<bool>,
    block_out_channels: Vec<usize>,
    #[serde(default = "d2_pb")]
    layers_per_block: PerBlock<usize>,
    #[serde(default = "d1")]
    downsample_padding: usize,
    #[serde(default = "d1f")]
    mid_block_scale_factor: f64,
    #[serde(default = "dsilu")]
    act_fn: String,
    #[serde(default = "d32")]
    norm_num_groups: Option<usize>,
    #[serde(default = "deps")]
    norm_eps: f64,
    #[serde(default = "d1280_pb")]
    cross_attention_dim: PerBlock<usize>,
    #[serde(default = "d1_pb")]
    transformer_layers_per_block: PerBlock<usize>,
    #[serde(default)]
    reverse_transformer_layers_per_block: Option<serde_json::Value>,
    #[serde(default = "d8_pb")]
    attention_head_dim: PerBlock<usize>,
    #[serde(default)]
    num_attention_heads: Option<PerBlock<usize>>,
    #[serde(default)]
    dual_cross_attention: bool,
    #[serde(default)]
    use_linear_projection: bool,
    #[serde(default)]
    upcast_attention: bool,
    #[serde(default)]
    class_embed_type: Option<String>,
    #[serde(default)]
    addition_embed_type: Option<String>,
    #[serde(default)]
    addition_time_embed_dim: Option<usize>,
    #[serde(default)]
    projection_class_embeddings_input_dim: Option<usize>,
    #[serde(default)]
    num_class_embeds: Option<usize>,
    #[serde(default)]
    encoder_hid_dim: Option<usize>,
    #[serde(default = "dpositional")]
    time_embedding_type: String,
    #[serde(default)]
    time_embedding_dim: Option<usize>,
    #[serde(default)]
    time_embedding_act_fn: Option<String>,
    #[serde(default)]
    timestep_post_act: Option<String>,
    #[serde(default)]
    time_cond_proj_dim: Option<usize>,
    #[serde(default = "d3")]
    conv_in_kernel: usize,
    #[serde(default = "d3")]
    conv_out_kernel: usize,
    #[serde(default = "ddefault")]
    resnet_time_scale_shift: String,
    #[serde(default)]
    resnet_skip_time_act: bool,
    #[serde(default = "d1f")]
    resnet_out_scale_factor: f64,
    #[serde(default = "ddefault")]
    attention_type: String,
    #[serde(default)]
    cross_attention_norm: Option<String>,
    #[serde(default)]
    mid_block_only_cross_attention: Option<bool>,
}

fn d1() -> usize {
    1
}
fn d3() -> usize {
    3
}
fn d4() -> usize {
    4
}
fn d1f() -> f64 {
    1.0
}
fn d32() -> Option<usize> {
    Some(32)
}
fn deps() -> f64 {
    1e-5
}
fn dtrue() -> bool {
    true
}
fn dmid() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}
fn dsilu() -> String {
    "silu".into()
}
fn dpositional() -> String {
    "positional".into()
}
fn ddefault() -> String {
    "default".into()
}
fn dfalse_pb() -> PerBlock<bool> {
    PerBlock::One(false)
}
fn d1_pb() -> PerBlock<usize> {
    PerBlock::One(1)
}
fn d2_pb() -> PerBlock<usize> {
    PerBlock::One(2)
}
fn d8_pb() -> PerBlock<usize> {
    PerBlock::One(8)
}
fn d1280_pb() -> PerBlock<usize> {
    PerBlock::One(1280)
}

/// Settings of one down block (the matching up block mirrors it).
#[derive(Debug, Clone)]
pub struct BlockConfig {
    /// Output channels of the block.
    pub channels: usize,
    /// Whether the block has transformer (attention) layers.
    pub has_attention: bool,
    /// Resnet layers (the up block has one more).
    pub layers: usize,
    /// Attention heads (head size = channels / heads).
    pub heads: usize,
    /// Transformer blocks per attention layer.
    pub transformer_layers: usize,
    /// Width of the cross-attention context.
    pub cross_attention_dim: usize,
    /// Whether attn1 also attends to the context.
    pub only_cross_attention: bool,
}

/// A validated UNet configuration with every per-block list resolved.
#[derive(Debug, Clone)]
pub struct UNetConfig {
    /// The latent size the model was trained at (sets the default image size).
    pub sample_size: Option<usize>,
    /// Latent channels in.
    pub in_channels: usize,
    /// Channels out (noise or v prediction).
    pub out_channels: usize,
    /// `2 · sample − 1` on the input.
    pub center_input_sample: bool,
    /// Sinusoidal embedding order: cos first when true.
    pub flip_sin_to_cos: bool,
    /// Frequency shift of the sinusoidal timestep embedding.
    pub freq_shift: f64,
    /// Down blocks in order (up blocks mirror them; `up_has_attention` holds their own types).
    pub blocks: Vec<BlockConfig>,
    /// Whether each up block (in up order) has attention; empty for a ControlNet.
    pub up_has_attention: Vec<bool>,
    /// Whether there is a cross-attention mid block.
    pub has_mid_block: bool,
    /// Padding of the down-sampling convolutions.
    pub downsample_padding: usize,
    /// Output scale of the mid block's resnets.
    pub mid_block_scale_factor: f64,
    /// Output scale of the other resnets.
    pub resnet_out_scale_factor: f64,
    /// GroupNorm groups.
    pub norm_num_groups: usize,
    /// GroupNorm epsilon of resnets and the output norm.
    pub norm_eps: f64,
    /// Linear (true) or 1x1 conv (false) projections around transformers.
    pub use_linear_projection: bool,
    /// Attention scores in f32 for half-precision compute.
    pub upcast_attention: bool,
    /// Width of the time embedding.
    pub time_embed_dim: usize,
    /// Kernel of `conv_in`.
    pub conv_in_kernel: usize,
    /// Kernel of `conv_out`.
    pub conv_out_kernel: usize,
    /// SDXL's added conditioning (`addition_embed_type: text_time`), when the UNet has one.
    pub add_embedding: Option<AddEmbeddingConfig>,
}

/// The `text_time` added conditioning: pooled text embeddings and sinusoidal embeddings of the
/// micro-conditioning time ids, concatenated and projected into the time embedding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddEmbeddingConfig {
    /// Width of each time id's sinusoidal embedding (`addition_time_embed_dim`).
    pub time_id_dim: usize,
    /// Width of the concatenated input (`projection_class_embeddings_input_dim`): the pooled
    /// embedding's width plus `time_id_dim` per time id.
    pub input_dim: usize,
}

/// The largest width or count a config may declare: real UNets stay below a few thousand, and a
/// bound keeps the arithmetic on them (time embedding ×4, feed-forward ×8, weight sizes) from
/// overflowing on a hostile config.
const MAX_CONFIG_SIZE: usize = 1 << 20;

/// Checks every size `values` of `field` is at most [`MAX_CONFIG_SIZE`].
fn check_sizes(path: &Path, field: &str, values: &[usize]) -> Result<()> {
    match values.iter().find(|&&v| v > MAX_CONFIG_SIZE) {
        Some(v) => {
            Err(Error::config(path, format!("`{field}` = {v} is not a plausible size (at most {MAX_CONFIG_SIZE})")))
        }
        None => Ok(()),
    }
}

fn unsupported(path: &Path, field: &str, value: impl std::fmt::Debug) -> Error {
    Error::config(path, format!("unsupported UNet setting `{field}` = {value:?}"))
}

impl UNetConfig {
    /// The model family the structure shows, for messages: "SDXL" (added conditioning) or
    /// "SD1.x/2.x".
    pub fn family_name(&self) -> &'static str {
        if self.add_embedding.is_some() { "SDXL" } else { "SD1.x/2.x" }
    }

    /// Reads and validates a UNet `config.json`.
    pub fn load(path: &Path) -> Result<Self> {
        let raw: RawConfig = crate::io::read_json(path)?;
        Self::from_raw(raw, path)
    }

    /// Parses a config from JSON text (`path` names it in errors).
    pub fn from_json(json: &str, path: &Path) -> Result<Self> {
        let raw: RawConfig =
            serde_json::from_str(json).map_err(|e| Error::config(path, format!("invalid JSON config: {e}")))?;
        Self::from_raw(raw, path)
    }

    fn from_raw(r: RawConfig, path: &Path) -> Result<Self> {
        let n = r.block_out_channels.len();
        // ControlNet configs describe only the input half and have no up blocks.
        let up_ok = r.up_block_types.is_empty() || r.up_block_types.len() == n;
        if n == 0 || r.down_block_types.len() != n || !up_ok {
            return Err(Error::config(
                path,
                format!(
                    "block_out_channels ({n}), down_block_types ({}) and up_block_types ({}) must have the same length",
                    r.down_block_types.len(),
                    r.up_block_types.len()
                ),
            ));
        }
        // Settings that would change the math in ways this model does not implement.
        if r.class_embed_type.is_some() {
            return Err(unsupported(path, "class_embed_type", &r.class_embed_type));
        }
        if r.num_class_embeds.is_some() {
            return Err(unsupported(path, "num_class_embeds", r.num_class_embeds));
        }
        let add_embedding = match r.addition_embed_type.as_deref() {
            None => None,
            Some("text_time") => {
                let field = |name: &str, v: Option<usize>| {
                    v.filter(|&v| v > 0).ok_or_else(|| {
                        Error::config(path, format!("addition_embed_type `text_time` needs a positive `{name}`"))
                    })
                };
                Some(AddEmbeddingConfig {
                    time_id_dim: field("addition_time_embed_dim", r.addition_time_embed_dim)?,
                    input_dim: field("projection_class_embeddings_input_dim", r.projection_class_embeddings_input_dim)?,
                })
            }
            Some(_) => return Err(unsupported(path, "addition_embed_type", &r.addition_embed_type)),
        };
        if r.encoder_hid_dim.is_some() {
            return Err(unsupported(path, "encoder_hid_dim", r.encoder_hid_dim));
        }
        if r.time_embedding_type != "positional" {
            return Err(unsupported(path, "time_embedding_type", &r.time_embedding_type));
        }
        if r.time_embedding_act_fn.is_some() {
            return Err(unsupported(path, "time_embedding_act_fn", &r.time_embedding_act_fn));
        }
        if r.timestep_post_act.is_some() {
            return Err(unsupported(path, "timestep_post_act", &r.timestep_post_act));
        }
        if r.time_cond_proj_dim.is_some() {
            return Err(unsupported(path, "time_cond_proj_dim", r.time_cond_proj_dim));
        }
        if r.act_fn != "silu" {
            return Err(unsupported(path, "act_fn", &r.act_fn));
        }
        if r.resnet_time_scale_shift != "default" {
            return Err(unsupported(path, "resnet_time_scale_shift", &r.resnet_time_scale_shift));
        }
        if r.resnet_skip_time_act {
            return Err(unsupported(path, "resnet_skip_time_act", true));
        }
        if r.attention_type != "default" {
            return Err(unsupported(path, "attention_type", &r.attention_type));
        }
        if r.cross_attention_norm.is_some() {
            return Err(unsupported(path, "cross_attention_norm", &r.cross_attention_norm));
        }
        if r.dual_cross_attention {
            return Err(unsupported(path, "dual_cross_attention", true));
        }
        if r.reverse_transformer_layers_per_block.is_some() {
            return Err(unsupported(
                path,
                "reverse_transformer_layers_per_block",
                &r.reverse_transformer_layers_per_block,
            ));
        }
        if r.conv_in_kernel.is_multiple_of(2) {
            return Err(unsupported(path, "conv_in_kernel", r.conv_in_kernel));
        }
        if r.conv_out_kernel.is_multiple_of(2) {
            return Err(unsupported(path, "conv_out_kernel", r.conv_out_kernel));
        }
        let groups = r.norm_num_groups.ok_or_else(|| unsupported(path, "norm_num_groups", "null"))?;
        let mid_has_attention = match r.mid_block_type.as_deref() {
            Some("UNetMidBlock2DCrossAttn") => true,
            None => false,
            Some(other) => return Err(unsupported(path, "mid_block_type", other)),
        };
        if let Some(only) = r.mid_block_only_cross_attention
            && only
        {
            return Err(unsupported(path, "mid_block_only_cross_attention", only));
        }

        // In SD1.x/2.x configs `attention_head_dim` holds the number of heads (diffusers keeps
        // that historical meaning when `num_attention_heads` is absent).
        let heads =
            r.num_attention_heads.as_ref().unwrap_or(&r.attention_head_dim).resolve(n, "num_attention_heads", path)?;
        let layers = r.layers_per_block.resolve(n, "layers_per_block", path)?;
        let transformer_layers = r.transformer_layers_per_block.resolve(n, "transformer_layers_per_block", path)?;
        let cross_dims = r.cross_attention_dim.resolve(n, "cross_attention_dim", path)?;
        let only_cross = r.only_cross_attention.resolve(n, "only_cross_attention", path)?;

        check_sizes(path, "block_out_channels", &r.block_out_channels)?;
        check_sizes(path, "attention heads", &heads)?;
        check_sizes(path, "layers_per_block", &layers)?;
        check_sizes(path, "transformer_layers_per_block", &transformer_layers)?;
        check_sizes(path, "cross_attention_dim", &cross_dims)?;
        check_sizes(path, "in_channels", &[r.in_channels])?;
        check_sizes(path, "out_channels", &[r.out_channels])?;
        check_sizes(path, "time_embedding_dim", &r.time_embedding_dim.into_iter().collect::<Vec<_>>())?;
        check_sizes(path, "addition_time_embed_dim", &r.addition_time_embed_dim.into_iter().collect::<Vec<_>>())?;
        let add_input = r.projection_class_embeddings_input_dim.into_iter().collect::<Vec<_>>();
        check_sizes(path, "projection_class_embeddings_input_dim", &add_input)?;
        let mut blocks = Vec::with_capacity(n);
        for (i, kind) in r.down_block_types.iter().enumerate() {
            let has_attention = match kind.as_str() {
                "CrossAttnDownBlock2D" => true,
                "DownBlock2D" => false,
                other => return Err(unsupported(path, &format!("down_block_types[{i}]"), other)),
            };
            let channels = r.block_out_channels[i];
            if !channels.is_multiple_of(groups) {
                return Err(Error::config(
                    path,
                    format!("block_out_channels[{i}] = {channels} is not divisible by norm_num_groups = {groups}"),
                ));
            }
            if has_attention && (heads[i] == 0 || !channels.is_multiple_of(heads[i])) {
                return Err(Error::config(
                    path,
                    format!("block {i}: {channels} channels cannot be split into {} attention heads", heads[i]),
                ));
            }
            blocks.push(BlockConfig {
                channels,
                has_attention,
                layers: layers[i],
                heads: heads[i],
                transformer_layers: transformer_layers[i],
                cross_attention_dim: cross_dims[i],
                only_cross_attention: only_cross[i],
            });
        }
        let up_has_attention = r
            .up_block_types
            .iter()
            .enumerate()
            .map(|(i, kind)| match kind.as_str() {
                "CrossAttnUpBlock2D" => Ok(true),
                "UpBlock2D" => Ok(false),
                other => Err(unsupported(path, &format!("up_block_types[{i}]"), other)),
            })
            .collect::<Result<Vec<_>>>()?;
        if mid_has_attention {
            let last = &blocks[n - 1];
            if last.heads == 0 || last.channels % last.heads != 0 {
                return Err(Error::config(path, "mid block channels cannot be split into the last block's heads"));
            }
        }
        Ok(Self {
            sample_size: r.sample_size,
            in_channels: r.in_channels,
            out_channels: r.out_channels,
            center_input_sample: r.center_input_sample,
            flip_sin_to_cos: r.flip_sin_to_cos,
            freq_shift: r.freq_shift,
            blocks,
            up_has_attention,
            has_mid_block: mid_has_attention,
            downsample_padding: r.downsample_padding,
            mid_block_scale_factor: r.mid_block_scale_factor,
            resnet_out_scale_factor: r.resnet_out_scale_factor,
            norm_num_groups: groups,
            norm_eps: r.norm_eps,
            use_linear_projection: r.use_linear_projection,
            upcast_attention: r.upcast_attention,
            time_embed_dim: r.time_embedding_dim.unwrap_or(r.block_out_channels[0] * 4),
            conv_in_kernel: r.conv_in_kernel,
            conv_out_kernel: r.conv_out_kernel,
            add_embedding,
        })
    }

    /// How many times the UNet halves the latent size.
    pub fn downsamplings(&self) -> usize {
        self.blocks.len() - 1
    }
}
