//! Prompt encoding: one text encoder for SD1.x/2.x; for SDXL (a UNet with added conditioning) the
//! penultimate hidden states of its encoders (two, or the refiner's one) concatenated, the last
//! one's pooled projection, and the micro-conditioning time ids, as diffusers'
//! `StableDiffusionXL(Img2Img)Pipeline.encode_prompt` and `_get_add_time_ids` compute them.

use candle_core::{DType, Tensor};

use super::{GenerateRequest, SecondTextEncoder, StableDiffusion};
use crate::prompt::{self, PromptSyntax, PromptWord, a1111};
use crate::{Error, Result};

/// SDXL's size and crop conditioning (pixels, as `(height, width)` and `(top, left)`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MicroConditioning {
    /// The size the image is said to have been before cropping (default: the output size).
    pub original_size: Option<(usize, usize)>,
    /// The top-left corner of the crop (default: (0, 0)).
    pub crop_top_left: (usize, usize),
    /// The size the image is said to be generated at (default: the output size).
    pub target_size: Option<(usize, usize)>,
    /// The negative prompt's own conditioning (default: the same as the prompt's).
    pub negative: Option<SizeConditioning>,
    /// The refiner's aesthetic score (default 6).
    pub aesthetic_score: Option<f64>,
    /// The refiner's aesthetic score for the negative prompt (default 2.5).
    pub negative_aesthetic_score: Option<f64>,
}

/// One set of SDXL size and crop conditioning, all given.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SizeConditioning {
    /// The size before cropping, (height, width).
    pub original_size: (usize, usize),
    /// The crop corner, (top, left).
    pub crop_top_left: (usize, usize),
    /// The target size, (height, width).
    pub target_size: (usize, usize),
}

impl MicroConditioning {
    /// The time ids [1, N] of the prompt and of the negative prompt for an image of `size`
    /// (height, width): original size, crop corner and target size (N = 6), or with `aesthetic`
    /// the aesthetic score instead of the target size (N = 5, the refiner, whose negative crop
    /// corner is its own, (0, 0) unless given).
    fn time_ids(
        &self,
        size: (usize, usize),
        aesthetic: bool,
        device: &candle_core::Device,
    ) -> Result<(Tensor, Tensor)> {
        let row = |values: Vec<f32>| -> Result<Tensor> {
            let n = values.len();
            Ok(Tensor::from_vec(values, (1, n), device)?)
        };
        let pixels = |(a, b): (usize, usize)| [a as f32, b as f32];
        let positive = SizeConditioning {
            original_size: self.original_size.unwrap_or(size),
            crop_top_left: self.crop_top_left,
            target_size: self.target_size.unwrap_or(size),
        };
        if aesthetic {
            let negative = self.negative.unwrap_or(SizeConditioning { crop_top_left: (0, 0), ..positive });
            let with_score = |c: SizeConditioning, score: f64| -> Result<Tensor> {
                row([&pixels(c.original_size)[..], &pixels(c.crop_top_left), &[score as f32]].concat())
            };
            return Ok((
                with_score(positive, self.aesthetic_score.unwrap_or(6.0))?,
                with_score(negative, self.negative_aesthetic_score.unwrap_or(2.5))?,
            ));
        }
        let sizes = |c: SizeConditioning| -> Result<Tensor> {
            row([pixels(c.original_size), pixels(c.crop_top_left), pixels(c.target_size)].concat())
        };
        Ok((sizes(positive)?, sizes(self.negative.unwrap_or(positive))?))
    }
}

/// The text side of a generation's conditioning, batched (negative rows first when guided).
pub(super) struct EncodedPrompts {
    /// The context [B or 2B, L, D].
    pub context: Tensor,
    /// SDXL: the pooled embeddings [B or 2B, P].
    pub pooled: Option<Tensor>,
    /// SDXL: the time ids [B or 2B, N].
    pub time_ids: Option<Tensor>,
    /// The prompt's words and their context rows.
    pub prompt_words: Vec<PromptWord>,
    /// The negative prompt's words and their context rows.
    pub negative_words: Vec<PromptWord>,
}

impl StableDiffusion {
    /// Text embeddings [1, L, D] of `prompt` read with [`Self::prompt_syntax`]: tokenized literally
    /// and truncated as diffusers does (L = 77), or A1111-style (L = 77 · chunks). Placeholder
    /// tokens take their vectors from [`Self::token_vectors`]. For SDXL, both encoders'
    /// penultimate hidden states, concatenated.
    pub fn encode_prompt(&self, prompt: &str, clip_skip: usize) -> Result<Tensor> {
        Ok(self.encode_prompt_words(prompt, None, clip_skip)?.0)
    }

    /// [`Self::encode_prompt`] and, for SDXL, the pooled embeddings [1, P].
    pub fn encode_prompt_and_pooled(&self, prompt: &str, clip_skip: usize) -> Result<(Tensor, Option<Tensor>)> {
        let (context, pooled, _) = self.encode_prompt_words(prompt, None, clip_skip)?;
        Ok((context, pooled))
    }

    /// [`Self::encode_prompt`] with the pooled embeddings [1, P] (SDXL; `prompt_2` is the second
    /// encoder's prompt, default `prompt`) and the prompt's words with the rows they became (none
    /// located with the A1111 syntax, whose weighting and chunking move rows).
    fn encode_prompt_words(
        &self,
        prompt: &str,
        prompt_2: Option<&str>,
        clip_skip: usize,
    ) -> Result<(Tensor, Option<Tensor>, Vec<PromptWord>)> {
        let added = self.token_vectors.table();
        if self.prompt_syntax == PromptSyntax::A1111 {
            return self.encode_a1111(prompt, prompt_2, clip_skip).map(|(z, pooled)| (z, pooled, Vec::new()));
        }
        let (ids, words) = self.tokenizer.encode_padded_words(prompt)?;
        let ids = Tensor::from_vec(ids, (1, self.tokenizer.max_length()), self.device())?;
        let embeddings = self.text_encoder.token_embeddings_with(&ids, added)?;
        if self.unet.config().add_embedding.is_none() {
            return Ok((self.text_encoder.encode_embeddings(&embeddings, clip_skip)?, None, words));
        }
        // SDXL reads hidden_states[-(clip_skip + 2)] of its encoders, without the final norm, and
        // the pooled output of the last.
        let first = self.text_encoder.encode_hidden_and_pooled(&embeddings, &ids, clip_skip + 1)?;
        let Some(SecondTextEncoder { tokenizer, encoder, token_vectors }) = &self.text_2 else {
            return Ok((first.hidden, Some(first.pooled), words));
        };
        let ids_2 = tokenizer.encode_padded(prompt_2.unwrap_or(prompt))?;
        let ids_2 = Tensor::from_vec(ids_2, (1, tokenizer.max_length()), self.device())?;
        let embeddings_2 = encoder.token_embeddings_with(&ids_2, token_vectors.table())?;
        let second = encoder.encode_hidden_and_pooled(&embeddings_2, &ids_2, clip_skip + 1)?;
        let context = Tensor::cat(&[&first.hidden, &second.hidden.to_dtype(first.hidden.dtype())?], 2)?;
        Ok((context, Some(second.pooled), words))
    }

    /// [`Self::encode_prompt_words`] with the A1111 syntax. SDXL as A1111 conditions it: each
    /// encoder reads the prompt in the same chunks (padded with its own tokenizer's pad token),
    /// weights its own hidden states, and the two are joined along features; the pooled embeddings
    /// are the last encoder's of the first chunk.
    fn encode_a1111(&self, prompt: &str, prompt_2: Option<&str>, clip_skip: usize) -> Result<(Tensor, Option<Tensor>)> {
        let added = self.token_vectors.table();
        let device = self.device();
        if self.unet.config().add_embedding.is_none() {
            return Ok((a1111::encode(&self.tokenizer, &self.text_encoder, added, prompt, clip_skip, device)?, None));
        }
        let depth = clip_skip + 1;
        let (first, pooled) =
            a1111::encode_hidden_and_pooled(&self.tokenizer, &self.text_encoder, added, prompt, depth, device)?;
        let Some(SecondTextEncoder { tokenizer, encoder, token_vectors }) = &self.text_2 else {
            return Ok((first, Some(pooled)));
        };
        let (second, pooled) = a1111::encode_hidden_and_pooled(
            tokenizer,
            encoder,
            token_vectors.table(),
            prompt_2.unwrap_or(prompt),
            depth,
            device,
        )?;
        let (rows, rows_2) = (first.dim(1)?, second.dim(1)?);
        if rows != rows_2 {
            let chunks = |rows: usize| rows / self.tokenizer.max_length();
            return Err(Error::invalid(format!(
                "with the A1111 prompt syntax the prompt and the second prompt must make as many 75-token chunks \
                 (the first makes {}, the second {})",
                chunks(rows),
                chunks(rows_2)
            )));
        }
        Ok((Tensor::cat(&[&first, &second.to_dtype(first.dtype())?], 2)?, Some(pooled)))
    }

    /// The batched text conditioning of `req` for `batch` images of `size` (height, width)
    /// pixels, with the negative prompt's rows first when `guided`.
    pub(super) fn encode_prompts(
        &self,
        req: &GenerateRequest,
        guided: bool,
        batch: usize,
        size: (usize, usize),
    ) -> Result<EncodedPrompts> {
        let (positive, pooled, prompt_words) =
            self.encode_prompt_words(&req.prompt, req.prompt_2.as_deref(), req.clip_skip)?;
        let rows = |t: Tensor| -> Result<Tensor> {
            let mut repeat = vec![batch];
            repeat.resize(t.rank(), 1);
            Ok(t.repeat(repeat)?)
        };
        let time_ids = match &pooled {
            Some(_) => Some(req.micro_conditioning.time_ids(size, self.requires_aesthetics_score, self.device())?),
            None => None,
        };
        if !guided {
            return Ok(EncodedPrompts {
                context: rows(positive)?,
                pooled: pooled.map(rows).transpose()?,
                time_ids: time_ids.map(|(ids, _)| rows(ids)).transpose()?,
                prompt_words,
                negative_words: Vec::new(),
            });
        }
        // SDXL: no negative prompt means zero embeddings, not the empty prompt's: in diffusers when
        // the model says so and none is given, in A1111 whenever it is empty.
        let zero_negative = match self.prompt_syntax {
            PromptSyntax::Diffusers => self.force_zeros_for_empty_prompt && req.negative_prompt.is_none(),
            PromptSyntax::A1111 => pooled.is_some() && req.negative_prompt.as_deref().unwrap_or("").is_empty(),
        };
        let (negative, negative_pooled, negative_words) = if zero_negative {
            (positive.zeros_like()?, pooled.as_ref().map(Tensor::zeros_like).transpose()?, Vec::new())
        } else {
            // diffusers applies clip_skip to the prompt only; the negative prompt always uses the
            // last layer (SDXL: the penultimate). A1111 applies it to both.
            let negative_skip = if self.prompt_syntax == PromptSyntax::A1111 { req.clip_skip } else { 0 };
            let negative_prompt = req.negative_prompt.as_deref().unwrap_or("");
            let negative_prompt_2 = req.negative_prompt_2.as_deref().unwrap_or(negative_prompt);
            self.encode_prompt_words(negative_prompt, Some(negative_prompt_2), negative_skip)?
        };
        let (positive, negative) = if positive.dim(1)? == negative.dim(1)? {
            (positive, negative)
        } else {
            prompt::pad_to_same_length(positive, negative, &self.encode_prompt("", req.clip_skip)?)?
        };
        let guided_rows = |negative: Tensor, positive: Tensor| -> Result<Tensor> {
            Ok(Tensor::cat(&[rows(negative)?, rows(positive)?], 0)?)
        };
        let pooled = match (negative_pooled, pooled) {
            (Some(negative), Some(positive)) => Some(guided_rows(negative, positive)?),
            _ => None,
        };
        Ok(EncodedPrompts {
            context: guided_rows(negative, positive)?,
            pooled,
            time_ids: time_ids.map(|(positive, negative)| guided_rows(negative, positive)).transpose()?,
            prompt_words,
            negative_words,
        })
    }
}

/// `t` in `dtype` when given.
pub(super) fn to_dtype(t: Option<Tensor>, dtype: DType) -> Result<Option<Tensor>> {
    Ok(t.map(|t| t.to_dtype(dtype)).transpose()?)
}
