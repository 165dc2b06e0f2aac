//! diffusers' `Transformer2DModel` as used in SD UNets: GroupNorm, projection in, transformer
//! blocks (self-attention, cross-attention, GEGLU feed-forward), projection out, residual.

use candle_core::{DType, Module, Tensor};

use super::controls::{AttentionStreams, ExtraAttention, UNetControls};
use super::hooks::AttentionLayerView;
use super::input::LayerPass;
use crate::Result;
use crate::io::weights::Weights;
use crate::kernels::group_norm::GroupNorm;
use crate::kernels::transpose::transpose_last_two;
use crate::models::attention::{merge_heads, scaled_dot_product, split_heads};
use crate::models::nn::{LayerNorm, Linear, Projection, group_norm, layer_norm, linear};

/// Multi-head attention (`Attention` in diffusers) addressed by a layer id for injections.
#[derive(Debug)]
pub struct Attention {
    id: String,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    scale: f64,
    upcast: bool,
    /// The dtype of the layer weights (bf16 layers attend with bf16 products where the CPU has them).
    layer_dtype: DType,
}

impl Attention {
    /// Loads `to_q`, `to_k`, `to_v`, `to_out.0` under `w`; `context_dim` is the key/value input width.
    pub fn load(w: &Weights, id: String, dim: usize, context_dim: usize, heads: usize, upcast: bool) -> Result<Self> {
        Ok(Self {
            id,
            to_q: linear(&w.pp("to_q"), dim, dim, false)?,
            to_k: linear(&w.pp("to_k"), context_dim, dim, false)?,
            to_v: linear(&w.pp("to_v"), context_dim, dim, false)?,
            to_out: linear(&w.pp("to_out.0"), dim, dim, true)?,
            heads,
            scale: ((dim / heads) as f64).powf(-0.5),
            upcast,
            layer_dtype: w.layer_dtype(),
        })
    }

    /// The layer id (diffusers module path), e.g. `mid_block.attentions.0.transformer_blocks.0.attn2`.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Attends from xs [B, L, C] to `context` [B, S, D] (or to xs itself when `None`), with the
    /// tokens the call's hooks join to the keys/values and the extra key/value streams the controls
    /// register for this layer; the hooks may then replace the output.
    pub(crate) fn forward(&self, xs: &Tensor, context: Option<&Tensor>, pass: &mut LayerPass) -> Result<Tensor> {
        let joined = pass.hooks.before_attention(&self.id, xs)?;
        let out = self.attend(xs, context, joined.as_ref(), pass.controls)?;
        if pass.hooks.is_empty() {
            return Ok(out);
        }
        let view = AttentionView { layer: self, input: xs, context, controls: pass.controls };
        pass.hooks.after_attention(&self.id, out, &view)
    }

    /// The attention output for xs [B, L, C]: keys and values from `context` (or xs) with `joined`
    /// tokens [B, S', C] appended, plus the controls' extra streams for this layer.
    fn attend(
        &self,
        xs: &Tensor,
        context: Option<&Tensor>,
        joined: Option<&Tensor>,
        controls: &UNetControls,
    ) -> Result<Tensor> {
        let own = context.unwrap_or(xs);
        let kv_input = match joined {
            Some(tokens) => Tensor::cat(&[own, tokens], 1)?,
            None => own.clone(),
        };
        let q = split_heads(&self.to_q.forward(xs)?, self.heads)?;
        let k = split_heads(&self.to_k.forward(&kv_input)?, self.heads)?;
        let v = split_heads(&self.to_v.forward(&kv_input)?, self.heads)?;
        let mut out = merge_heads(&scaled_dot_product(&q, &k, &v, self.scale, None, self.upcast, self.layer_dtype)?)?;
        for extra in controls.streams_for(&self.id) {
            let k = split_heads(&extra.key, self.heads)?;
            let v = split_heads(&extra.value, self.heads)?;
            let mut stream =
                merge_heads(&scaled_dot_product(&q, &k, &v, self.scale, None, self.upcast, self.layer_dtype)?)?;
            if let Some(mask) = &extra.mask {
                stream = stream.broadcast_mul(mask)?;
            }
            out = (out + (stream * extra.scale)?)?;
        }
        Ok(self.to_out.forward(&out)?)
    }
}

/// An attention layer during one call, as its hooks see it.
struct AttentionView<'a> {
    layer: &'a Attention,
    input: &'a Tensor,
    context: Option<&'a Tensor>,
    controls: &'a UNetControls,
}

impl AttentionLayerView for AttentionView<'_> {
    fn input(&self) -> &Tensor {
        self.input
    }

    fn plain(&self, rows: std::ops::Range<usize>) -> Result<Tensor> {
        let part = |t: &Tensor| t.narrow(0, rows.start, rows.len());
        let context = self.context.map(part).transpose()?;
        // Extra streams are per batch row too: narrow them with the rows.
        let narrowed = self
            .controls
            .streams_for(&self.layer.id)
            .map(|s| {
                Ok(ExtraAttention {
                    key: part(&s.key)?,
                    value: part(&s.value)?,
                    scale: s.scale,
                    mask: s.mask.as_ref().map(part).transpose()?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let mut controls = UNetControls::default();
        if !narrowed.is_empty() {
            let streams: AttentionStreams = [(self.layer.id.clone(), narrowed)].into_iter().collect();
            controls.extra_attention.push(std::sync::Arc::new(streams));
        }
        self.layer.attend(&part(self.input)?, context.as_ref(), None, &controls)
    }
}

/// GEGLU feed-forward: `Linear(dim, 2·inner)` split into value and gate, `value · gelu(gate)`,
/// then `Linear(inner, dim_out)`.
#[derive(Debug)]
pub(crate) struct FeedForward {
    proj_in: Linear,
    proj_out: Linear,
}

impl FeedForward {
    fn load(w: &Weights, dim: usize) -> Result<Self> {
        Self::load_sized(w, dim, dim * 4, dim)
    }

    /// Loads `net.0.proj` (`dim` → 2·`inner`) and `net.2` (`inner` → `dim_out`) under `w`.
    pub(crate) fn load_sized(w: &Weights, dim: usize, inner: usize, dim_out: usize) -> Result<Self> {
        Ok(Self {
            proj_in: linear(&w.pp("net.0.proj"), dim, inner * 2, true)?,
            proj_out: linear(&w.pp("net.2"), inner, dim_out, true)?,
        })
    }

    /// [.., dim] → [.., dim_out].
    pub(crate) fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let h = self.proj_in.forward(xs)?;
        Ok(self.proj_out.forward(&crate::kernels::geglu::geglu(&h)?)?)
    }
}

/// Self-attention, cross-attention and feed-forward, each pre-normed with a residual.
#[derive(Debug)]
struct TransformerBlock {
    /// The diffusers module path, e.g. `down_blocks.0.attentions.0.transformer_blocks.0`.
    id: String,
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
    only_cross_attention: bool,
}

/// Shapes of one [`Transformer2D`].
#[derive(Debug, Clone, Copy)]
pub struct TransformerSpec {
    /// Channels in and out (= heads · head size).
    pub channels: usize,
    /// Attention heads.
    pub heads: usize,
    /// Transformer blocks.
    pub layers: usize,
    /// Width of the cross-attention context.
    pub context_dim: usize,
    /// GroupNorm groups of the input norm.
    pub groups: usize,
    /// Linear instead of 1x1 conv projections.
    pub use_linear_projection: bool,
    /// attn1 attends to the context too.
    pub only_cross_attention: bool,
    /// Attention scores in f32.
    pub upcast_attention: bool,
}

/// The spatial transformer of UNet attention blocks.
#[derive(Debug)]
pub struct Transformer2D {
    /// The diffusers module path, e.g. `down_blocks.0.attentions.0`.
    id: String,
    norm: GroupNorm,
    proj_in: Projection,
    blocks: Vec<TransformerBlock>,
    proj_out: Projection,
}

impl Transformer2D {
    /// Loads a transformer stored under `w`, whose diffusers module path is `id`.
    pub fn load(w: &Weights, id: &str, s: TransformerSpec) -> Result<Self> {
        let c = s.channels;
        let blocks = (0..s.layers)
            .map(|i| {
                let bw = w.pp(format!("transformer_blocks.{i}"));
                let bid = format!("{id}.transformer_blocks.{i}");
                let attn1_context = if s.only_cross_attention { s.context_dim } else { c };
                Ok(TransformerBlock {
                    id: bid.clone(),
                    norm1: layer_norm(&bw.pp("norm1"), c, 1e-5)?,
                    attn1: Attention::load(
                        &bw.pp("attn1"),
                        format!("{bid}.attn1"),
                        c,
                        attn1_context,
                        s.heads,
                        s.upcast_attention,
                    )?,
                    norm2: layer_norm(&bw.pp("norm2"), c, 1e-5)?,
                    attn2: Attention::load(
                        &bw.pp("attn2"),
                        format!("{bid}.attn2"),
                        c,
                        s.context_dim,
                        s.heads,
                        s.upcast_attention,
                    )?,
                    norm3: layer_norm(&bw.pp("norm3"), c, 1e-5)?,
                    ff: FeedForward::load(&bw.pp("ff"), c)?,
                    only_cross_attention: s.only_cross_attention,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            id: id.to_string(),
            norm: group_norm(&w.pp("norm"), s.groups, c, 1e-6)?,
            proj_in: Projection::load(&w.pp("proj_in"), c, c, s.use_linear_projection)?,
            blocks,
            proj_out: Projection::load(&w.pp("proj_out"), c, c, s.use_linear_projection)?,
        })
    }

    /// The ids of its hook points: itself, each transformer block and its two attention layers.
    pub(crate) fn hook_points(&self) -> impl Iterator<Item = String> + '_ {
        std::iter::once(self.id.clone())
            .chain(self.blocks.iter().flat_map(|b| [b.id.clone(), b.attn1.id.clone(), b.attn2.id.clone()]))
    }

    /// xs [B, C, H, W] → [B, C, H, W], attending to the pass's context.
    pub(crate) fn forward(&self, xs: &Tensor, pass: &mut LayerPass) -> Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let normed = self.norm.forward(xs)?;
        let to_tokens = |t: &Tensor| -> Result<Tensor> { Ok(transpose_last_two(&t.reshape((b, c, h * w))?)?) };
        let mut tokens = match &self.proj_in {
            Projection::Conv(_) => to_tokens(&self.proj_in.forward(&normed)?)?,
            Projection::Linear(_) => self.proj_in.forward(&to_tokens(&normed)?)?,
        };
        let context = pass.context;
        for block in &self.blocks {
            let attn1_context = if block.only_cross_attention { Some(context) } else { None };
            tokens = (&tokens + block.attn1.forward(&block.norm1.forward(&tokens)?, attn1_context, pass)?)?;
            tokens = (&tokens + block.attn2.forward(&block.norm2.forward(&tokens)?, Some(context), pass)?)?;
            tokens = (&tokens + block.ff.forward(&block.norm3.forward(&tokens)?)?)?;
            tokens = pass.output(&block.id, tokens)?;
        }
        let to_image = |t: &Tensor| -> Result<Tensor> { Ok(transpose_last_two(t)?.reshape((b, c, h, w))?) };
        let out = match &self.proj_out {
            Projection::Conv(_) => self.proj_out.forward(&to_image(&tokens)?)?,
            Projection::Linear(_) => to_image(&self.proj_out.forward(&tokens)?)?,
        };
        pass.output(&self.id, (out + xs)?)
    }
}
