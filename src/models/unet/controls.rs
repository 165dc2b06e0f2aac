//! The data control mechanisms contribute to one UNet call: residuals and extra cross-attention
//! streams. (Code that reads or rewrites a layer's tensors is a hook instead: [`super::hooks`].)
//!
//! Layers are addressed by their diffusers module path, e.g.
//! `down_blocks.0.attentions.1.transformer_blocks.0.attn2`, so weight files map onto them by name.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::Tensor;

use crate::Result;

/// An extra key/value stream for one attention layer (decoupled cross-attention, IP-Adapter):
/// the layer adds `scale · mask · attention(q, key, value)` to its own attention output.
#[derive(Debug, Clone)]
pub struct ExtraAttention {
    /// Keys [B, S, inner_dim] (already projected by the mechanism's own weights).
    pub key: Tensor,
    /// Values [B, S, inner_dim].
    pub value: Tensor,
    /// Weight of this stream.
    pub scale: f64,
    /// Optional weight per query position, [B, L, 1] for the layer's L = H·W tokens.
    pub mask: Option<Tensor>,
}

/// Everything control mechanisms contribute to one UNet call. Empty by default; contributions of
/// several mechanisms combine with [`UNetControls::merge`].
#[derive(Debug, Clone, Default)]
pub struct UNetControls {
    /// Added to every skip connection the down path produces (ControlNet), in order:
    /// `conv_in`'s output, then each resnet/attention output and each downsampler output.
    pub down_residuals: Option<Vec<Tensor>>,
    /// Added to the mid block's output (ControlNet).
    pub mid_residual: Option<Tensor>,
    /// Added inside the down path (T2I-Adapter), consumed in order as diffusers'
    /// `down_intrablock_additional_residuals`: after the last layer of each attention block, after
    /// each plain block, and after the mid block when the shape matches.
    pub down_intrablock_residuals: Vec<Tensor>,
    /// Extra key/value streams for attention layers (cross-attention `attn2`): one map by layer id
    /// per mechanism, shared so that a mechanism makes its map once per generation.
    pub extra_attention: Vec<Arc<AttentionStreams>>,
}

/// Extra key/value streams by attention layer id.
pub type AttentionStreams = HashMap<String, Vec<ExtraAttention>>;

fn sum_lists(a: Vec<Tensor>, b: Vec<Tensor>) -> Result<Vec<Tensor>> {
    if a.len() != b.len() {
        return Err(crate::Error::invalid(format!(
            "control residual counts differ ({} vs {}): the controls were built for different UNets",
            a.len(),
            b.len()
        )));
    }
    a.iter().zip(&b).map(|(x, y)| Ok((x + y)?)).collect()
}

impl UNetControls {
    /// The extra streams for attention layer `id`, from every mechanism.
    pub fn streams_for<'a>(&'a self, id: &'a str) -> impl Iterator<Item = &'a ExtraAttention> + 'a {
        self.extra_attention.iter().filter_map(move |map| map.get(id)).flatten()
    }

    /// Adds `other`'s contributions: residuals are summed, attention streams appended.
    pub fn merge(&mut self, other: UNetControls) -> Result<()> {
        self.down_residuals = match (self.down_residuals.take(), other.down_residuals) {
            (Some(a), Some(b)) => Some(sum_lists(a, b)?),
            (a, b) => a.or(b),
        };
        self.mid_residual = match (self.mid_residual.take(), other.mid_residual) {
            (Some(a), Some(b)) => Some((a + b)?),
            (a, b) => a.or(b),
        };
        self.down_intrablock_residuals =
            match (std::mem::take(&mut self.down_intrablock_residuals), other.down_intrablock_residuals) {
                (a, b) if a.is_empty() => b,
                (a, b) if b.is_empty() => a,
                (a, b) => sum_lists(a, b)?,
            };
        self.extra_attention.extend(other.extra_attention);
        Ok(())
    }
}
