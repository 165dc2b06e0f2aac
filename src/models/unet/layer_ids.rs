//! The UNet's cross-attention layers by id, in the order weight files count them.

use super::config::UNetConfig;

/// One cross-attention (`attn2`) layer of the UNet.
#[derive(Debug, Clone, PartialEq)]
pub struct CrossAttentionLayer {
    /// The diffusers module path, e.g. `down_blocks.0.attentions.1.transformer_blocks.0.attn2`.
    pub id: String,
    /// Width of the layer's queries, keys and values (the block's channels).
    pub channels: usize,
    /// Width of the context its keys and values are projected from.
    pub context_dim: usize,
    /// How many times the latents are halved where the layer runs (0 at full latent size).
    pub downsamplings: usize,
    /// Whether the block's self-attention attends to the context too (`only_cross_attention`).
    pub only_cross_attention: bool,
}

impl UNetConfig {
    /// The cross-attention layers in diffusers' `unet.attn_processors` order: down blocks, then up
    /// blocks, then the mid block (not the order the forward pass visits them).
    pub fn cross_attention_layers(&self) -> Vec<CrossAttentionLayer> {
        let n = self.blocks.len();
        let mut out = Vec::new();
        let mut push = |block_id: String, block: &super::config::BlockConfig, attentions: usize, level: usize| {
            for j in 0..attentions {
                for t in 0..block.transformer_layers {
                    out.push(CrossAttentionLayer {
                        id: format!("{block_id}.attentions.{j}.transformer_blocks.{t}.attn2"),
                        channels: block.channels,
                        context_dim: block.cross_attention_dim,
                        downsamplings: level,
                        only_cross_attention: block.only_cross_attention,
                    });
                }
            }
        };
        for (i, block) in self.blocks.iter().enumerate().filter(|(_, b)| b.has_attention) {
            push(format!("down_blocks.{i}"), block, block.layers, i);
        }
        for i in (0..self.up_has_attention.len()).filter(|&i| self.up_has_attention[i]) {
            let block = &self.blocks[n - 1 - i];
            push(format!("up_blocks.{i}"), block, block.layers + 1, n - 1 - i);
        }
        if self.has_mid_block {
            push("mid_block".to_string(), &self.blocks[n - 1], 1, n - 1);
        }
        out
    }

    /// The `(height, width)` of the feature maps after `downsamplings` halvings of latents `(h, w)`
    /// (a strided 3x3 convolution: rounded up with `downsample_padding` 1, down with 0).
    pub fn feature_size(&self, (h, w): (usize, usize), downsamplings: usize) -> (usize, usize) {
        let half = |x: usize| if self.downsample_padding == 0 { x / 2 } else { x.div_ceil(2) };
        (0..downsamplings).fold((h, w), |(h, w), _| (half(h), half(w)))
    }
}
