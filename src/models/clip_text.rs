//! CLIP text encoder (transformers' `CLIPTextModel` and `CLIPTextModelWithProjection`), with the
//! token-embedding injection point exposed: callers may edit token embeddings before the
//! transformer runs (textual inversion and image-derived pseudo-words).

use std::path::Path;

use candle_core::{Module, Tensor};
use candle_nn::Embedding;
use serde::Deserialize;

use super::attention::causal_mask;
pub use super::clip::Activation;
use super::clip::{EncoderLayer, EncoderSpec, check_heads};
use super::nn::{LayerNorm, Linear, layer_norm, linear};
use crate::io::weights::Weights;
use crate::{Error, Result};

/// The fields of a transformers `CLIPTextConfig` that change the math.
#[derive(Debug, Clone, Deserialize)]
pub struct ClipTextConfig {
    /// Rows of the token-embedding table.
    pub vocab_size: usize,
    /// Width of every hidden state.
    pub hidden_size: usize,
    /// Width of the MLP's hidden layer.
    pub intermediate_size: usize,
    /// Number of transformer layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer.
    pub num_attention_heads: usize,
    /// Rows of the position-embedding table (the longest sequence).
    pub max_position_embeddings: usize,
    /// MLP activation.
    #[serde(default = "default_act")]
    pub hidden_act: Activation,
    /// LayerNorm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// The end-of-text token, whose position gives the pooled output; 2 (the value of configs
    /// written before transformers fixed it) means the highest id of each sequence instead.
    #[serde(default)]
    pub eos_token_id: Option<u32>,
}

fn default_act() -> Activation {
    Activation::QuickGelu
}
fn default_eps() -> f64 {
    1e-5
}

impl ClipTextConfig {
    /// Reads and validates a `config.json`.
    pub fn load(path: &Path) -> Result<Self> {
        let config: Self = crate::io::read_json(path)?;
        check_heads(path, config.hidden_size, config.num_attention_heads)?;
        Ok(config)
    }
}

/// The CLIP text transformer with a causal mask, and the pooled output's projection when the
/// weights have one (`CLIPTextModelWithProjection`).
pub struct ClipTextEncoder {
    token_embedding: Embedding,
    position_embedding: Tensor,
    layers: Vec<EncoderLayer>,
    final_norm: LayerNorm,
    text_projection: Option<Linear>,
    config: ClipTextConfig,
}

/// One encoder run as SDXL reads it.
pub struct HiddenAndPooled {
    /// The hidden state [B, L, D] of the chosen layer, without the final LayerNorm.
    pub hidden: Tensor,
    /// The final-normed last hidden state at each sequence's end token [B, D], projected when the
    /// encoder has a projection ([B, projection_dim]).
    pub pooled: Tensor,
}

impl ClipTextEncoder {
    /// Loads the weights of a `CLIPTextModel` (keys under `text_model.`), with a
    /// `CLIPTextModelWithProjection`'s `text_projection` when present.
    pub fn load(root: &Weights, config: &ClipTextConfig) -> Result<Self> {
        let text_projection = if root.contains("text_projection.weight") {
            let out = root.pp("text_projection").shape_of("weight").and_then(|s| s.first().copied()).unwrap_or(0);
            Some(linear(&root.pp("text_projection"), config.hidden_size, out, false)?)
        } else {
            None
        };
        let w = root;
        // transformers 5 saves the keys without the `text_model.` prefix the public checkpoints use;
        // the layers register under the public module paths either way (LoRA files name those).
        let w = match w.layer_registry() {
            _ if !w.contains("embeddings.token_embedding.weight") => w.pp("text_model"),
            Some(registry) => w.with_layer_registry(&registry.scoped("text_model")),
            None => w.clone(),
        };
        let c = config;
        let emb = w.pp("embeddings");
        let token_embedding =
            Embedding::new(emb.pp("token_embedding").get((c.vocab_size, c.hidden_size), "weight")?, c.hidden_size);
        let position_embedding =
            emb.pp("position_embedding").get((c.max_position_embeddings, c.hidden_size), "weight")?;
        let spec = EncoderSpec {
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            heads: c.num_attention_heads,
            act: c.hidden_act,
            eps: c.layer_norm_eps,
        };
        let layers = (0..c.num_hidden_layers)
            .map(|i| EncoderLayer::load(&w.pp(format!("encoder.layers.{i}")), &spec))
            .collect::<Result<_>>()?;
        let final_norm = layer_norm(&w.pp("final_layer_norm"), c.hidden_size, c.layer_norm_eps)?;
        Ok(Self { token_embedding, position_embedding, layers, final_norm, text_projection, config: config.clone() })
    }

    /// The model's configuration.
    pub fn config(&self) -> &ClipTextConfig {
        &self.config
    }

    /// Token embeddings [B, L, D] of `ids` [B, L] (u32).
    pub fn token_embeddings(&self, ids: &Tensor) -> Result<Tensor> {
        self.token_embeddings_with(ids, None)
    }

    /// Token embeddings [B, L, D] of `ids` [B, L] (u32), where ids from `vocab_size` on are rows of
    /// `added` [N, D] (id `vocab_size + i` is row i): the token-level injection point, fed by
    /// placeholder tokens with vectors from files (textual inversion) or computed at run time.
    pub fn token_embeddings_with(&self, ids: &Tensor, added: Option<&Tensor>) -> Result<Tensor> {
        let vocab = self.config.vocab_size;
        let rows = added.map(|t| t.dim(0)).transpose()?.unwrap_or(0);
        let flat: Vec<u32> = ids.flatten_all()?.to_dtype(candle_core::DType::U32)?.to_vec1()?;
        if let Some(&max) = flat.iter().max()
            && max as usize >= vocab + rows
        {
            return Err(Error::invalid(format!(
                "token id {max} is outside the text encoder's vocabulary of {vocab} tokens and {rows} added vectors"
            )));
        }
        let added = match added {
            Some(added) if flat.iter().any(|&id| id as usize >= vocab) => added,
            _ => return Ok(self.token_embedding.forward(ids)?),
        };
        let dim = self.config.hidden_size;
        if added.dims() != [rows, dim] {
            return Err(Error::invalid(format!(
                "added token vectors have shape {:?}, expected [{rows}, {dim}] (the text encoder's width)",
                added.dims()
            )));
        }
        let is_added: Vec<u8> = flat.iter().map(|&id| u8::from(id as usize >= vocab)).collect();
        let base_ids: Vec<u32> = flat.iter().map(|&id| if id as usize >= vocab { 0 } else { id }).collect();
        let added_ids: Vec<u32> = flat.iter().map(|&id| (id as usize).saturating_sub(vocab) as u32).collect();
        let device = ids.device();
        let base = self.token_embedding.forward(&Tensor::from_vec(base_ids, ids.shape(), device)?)?;
        let extra = Embedding::new(added.to_dtype(base.dtype())?, dim).forward(&Tensor::from_vec(
            added_ids,
            ids.shape(),
            device,
        )?)?;
        let mask = Tensor::from_vec(is_added, ids.shape(), device)?.unsqueeze(2)?.broadcast_as(base.shape())?;
        Ok(mask.where_cond(&extra, &base)?)
    }

    /// Encodes token embeddings [B, L, D] (from [`Self::token_embeddings`], possibly edited).
    /// With `clip_skip` = 0 this is the last hidden state; with `clip_skip` = n the output of the
    /// layer n before the last, passed through the final LayerNorm (diffusers' `clip_skip`).
    pub fn encode_embeddings(&self, embeddings: &Tensor, clip_skip: usize) -> Result<Tensor> {
        let len = self.check_length(embeddings)?;
        if clip_skip >= self.layers.len() {
            return Err(Error::invalid(format!(
                "clip skip {clip_skip} must be less than the text encoder's {} layers",
                self.layers.len()
            )));
        }
        let mut xs = embeddings.broadcast_add(&self.position_embedding.narrow(0, 0, len)?)?;
        let mask = causal_mask(len, xs.device())?;
        for layer in &self.layers[..self.layers.len() - clip_skip] {
            xs = layer.forward(&xs, Some(&mask))?;
        }
        Ok(self.final_norm.forward(&xs)?)
    }

    /// SDXL's reading of token embeddings [B, L, D] of `ids` [B, L]: the hidden state `depth`
    /// layers before the last (transformers' `hidden_states[-(depth + 1)]`, not normed) and the
    /// pooled output (see [`HiddenAndPooled`]).
    pub fn encode_hidden_and_pooled(&self, embeddings: &Tensor, ids: &Tensor, depth: usize) -> Result<HiddenAndPooled> {
        let len = self.check_length(embeddings)?;
        if depth > self.layers.len() {
            return Err(Error::invalid(format!(
                "hidden state {depth} layers before the last: the text encoder has {} layers",
                self.layers.len()
            )));
        }
        let mut xs = embeddings.broadcast_add(&self.position_embedding.narrow(0, 0, len)?)?;
        let mask = causal_mask(len, xs.device())?;
        let keep = self.layers.len() - depth;
        let mut hidden = if keep == 0 { Some(xs.clone()) } else { None };
        for (i, layer) in self.layers.iter().enumerate() {
            xs = layer.forward(&xs, Some(&mask))?;
            if i + 1 == keep {
                hidden = Some(xs.clone());
            }
        }
        let last = self.final_norm.forward(&xs)?;
        let ids: Vec<Vec<u32>> = ids.to_dtype(candle_core::DType::U32)?.to_vec2()?;
        let rows = ids
            .iter()
            .enumerate()
            .map(|(b, row)| Ok(last.get(b)?.get(self.end_position(row))?.unsqueeze(0)?))
            .collect::<Result<Vec<_>>>()?;
        let pooled = Tensor::cat(&rows, 0)?;
        let pooled = match &self.text_projection {
            Some(projection) => projection.forward(&pooled)?,
            None => pooled,
        };
        Ok(HiddenAndPooled { hidden: hidden.expect("keep <= layers"), pooled })
    }

    /// The position of a sequence's end token, as transformers finds it: the first `eos_token_id`,
    /// or the highest id when the config gives the legacy value 2 (or none).
    fn end_position(&self, ids: &[u32]) -> usize {
        match self.config.eos_token_id {
            Some(eos) if eos != 2 => ids.iter().position(|&id| id == eos).unwrap_or(0),
            _ => {
                let max = ids.iter().copied().max().unwrap_or(0);
                ids.iter().position(|&id| id == max).unwrap_or(0)
            }
        }
    }

    /// The sequence length of `embeddings` [B, L, D], checked against the position table.
    fn check_length(&self, embeddings: &Tensor) -> Result<usize> {
        let len = embeddings.dim(1)?;
        if len > self.config.max_position_embeddings {
            return Err(Error::invalid(format!(
                "{len} tokens exceed the text encoder's {} positions",
                self.config.max_position_embeddings
            )));
        }
        Ok(len)
    }

    /// Encodes token ids [B, L] to hidden states [B, L, D].
    pub fn encode(&self, ids: &Tensor, clip_skip: usize) -> Result<Tensor> {
        self.encode_embeddings(&self.token_embeddings(ids)?, clip_skip)
    }
}
