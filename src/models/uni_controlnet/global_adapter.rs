//! Uni-ControlNet's global adapter: an image embedding (CLIP `image_embeds`) through LayerNorm and
//! a GEGLU feed-forward twice, split into tokens that are appended to the text context.

use candle_core::{Module, Tensor};

use crate::io::weights::Weights;
use crate::models::nn::{LayerNorm, layer_norm};
use crate::models::unet::transformer::FeedForward;
use crate::{Error, Result};

/// A global adapter's widths (uni.ckpt: 768 → 1536 → 3072 = 4 tokens of 768).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GlobalAdapterConfig {
    /// Width of the image embedding in and of each token out.
    pub in_dim: usize,
    /// Output width of the first feed-forward (`in_dim · channel_mult[0]`).
    pub hidden_dim: usize,
    /// Inner (gated) width of the first feed-forward.
    pub inner1: usize,
    /// Inner (gated) width of the second feed-forward.
    pub inner2: usize,
    /// Tokens out (`channel_mult[-1]`).
    pub tokens: usize,
}

/// A loaded global adapter.
#[derive(Debug)]
pub struct GlobalAdapter {
    config: GlobalAdapterConfig,
    norm1: LayerNorm,
    ff1: FeedForward,
    norm2: LayerNorm,
    ff2: FeedForward,
}

impl GlobalAdapter {
    /// Loads `norm1`, `ff1.net.{0.proj,2}`, `norm2`, `ff2.net.{0.proj,2}` under `w`.
    pub fn load(w: &Weights, config: GlobalAdapterConfig) -> Result<Self> {
        let c = config;
        Ok(Self {
            config,
            norm1: layer_norm(&w.pp("norm1"), c.in_dim, 1e-5)?,
            ff1: FeedForward::load_sized(&w.pp("ff1"), c.in_dim, c.inner1, c.hidden_dim)?,
            norm2: layer_norm(&w.pp("norm2"), c.hidden_dim, 1e-5)?,
            ff2: FeedForward::load_sized(&w.pp("ff2"), c.hidden_dim, c.inner2, c.in_dim * c.tokens)?,
        })
    }

    /// The adapter's widths.
    pub fn config(&self) -> GlobalAdapterConfig {
        self.config
    }

    /// Image embeddings [B, in_dim] → tokens [B, tokens, in_dim].
    pub fn forward(&self, embeds: &Tensor) -> Result<Tensor> {
        let (b, d) = embeds.dims2()?;
        if d != self.config.in_dim {
            return Err(Error::invalid(format!(
                "the global adapter takes image embeddings of width {}, got {d}",
                self.config.in_dim
            )));
        }
        let xs = self.ff1.forward(&self.norm1.forward(embeds)?)?;
        let xs = self.ff2.forward(&self.norm2.forward(&xs)?)?;
        Ok(xs.reshape((b, self.config.tokens, self.config.in_dim))?)
    }
}
