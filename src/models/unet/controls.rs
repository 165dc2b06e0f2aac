//! The UNet's injection points: what control mechanisms may contribute to one UNet call.
//!
//! Layers are addressed by their diffusers module path, e.g.
//! `down_blocks.0.attentions.1.transformer_blocks.0.attn2`, so weight files map onto them by name.

use std::collections::HashMap;

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
    /// Extra key/value streams for attention layers, by layer id (cross-attention `attn2`).
    pub extra_attention: HashMap<String, Vec<ExtraAttention>>,
    /// Extra tokens [B, S, C] joined to the keys/values of self-attention (`attn1`) layers, by id.
    pub extra_self_attention_tokens: HashMap<String, Tensor>,
}

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
    /// Whether nothing is contributed.
    pub fn is_empty(&self) -> bool {
        self.down_residuals.is_none()
            && self.mid_residual.is_none()
            && self.down_intrablock_residuals.is_empty()
            && self.extra_attention.is_empty()
            && self.extra_self_attention_tokens.is_empty()
    }

    /// Adds `other`'s contributions: residuals are summed, attention streams appended, extra
    /// self-attention tokens concatenated.
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
        for (layer, streams) in other.extra_attention {
            self.extra_attention.entry(layer).or_default().extend(streams);
        }
        for (layer, tokens) in other.extra_self_attention_tokens {
            let joined = match self.extra_self_attention_tokens.remove(&layer) {
                Some(existing) => Tensor::cat(&[existing, tokens], 1)?,
                None => tokens,
            };
            self.extra_self_attention_tokens.insert(layer, joined);
        }
        Ok(())
    }
}
