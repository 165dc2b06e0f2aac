//! Token-level control: placeholder tokens added to the tokenizer whose input embeddings are
//! vectors supplied by a mechanism — read from a file (textual inversion) or computed at run time
//! (image-derived pseudo-words: ELITE, PhotoVerse).
//!
//! The tokenizer gives each placeholder new ids after its vocabulary; [`TokenVectors`] holds their
//! rows, and the text encoder's [`token_embeddings_with`] substitutes them for those ids.
//!
//! [`token_embeddings_with`]: crate::models::clip_text::ClipTextEncoder::token_embeddings_with

pub mod textual_inversion;

use candle_core::{DType, Device, Tensor};

use crate::models::clip_text::ClipTextEncoder;
use crate::pipeline::StableDiffusion;
use crate::tokenizer::ClipTokenizer;
use crate::{Error, Result};

/// The vectors of the placeholder tokens added to a model: row i is the input embedding of token
/// id `vocab_size + i` (ids the text encoder's own table does not have).
#[derive(Debug, Clone, Default)]
pub struct TokenVectors {
    /// [N, D] f32, or `None` before the first placeholder.
    rows: Option<Tensor>,
    /// Each placeholder's name with its first row and number of rows.
    tokens: Vec<(String, usize, usize)>,
}

impl TokenVectors {
    /// The rows [N, D] for the text encoder's `token_embeddings_with`.
    pub fn table(&self) -> Option<&Tensor> {
        self.rows.as_ref()
    }

    /// Each placeholder's name and number of vectors, in the order they were added.
    pub fn tokens(&self) -> impl Iterator<Item = (&str, usize)> {
        self.tokens.iter().map(|(name, _, n)| (name.as_str(), *n))
    }

    fn len(&self) -> usize {
        self.tokens.iter().map(|(_, _, n)| n).sum()
    }
}

impl TokenVectors {
    /// Adds the placeholder `token` with `vectors` [N, D] to `tokenizer` and this table of
    /// `encoder`'s added rows.
    fn add(
        &mut self,
        tokenizer: &mut ClipTokenizer,
        encoder: &ClipTextEncoder,
        token: &str,
        vectors: Tensor,
    ) -> Result<()> {
        let rows = self.len();
        let first_id = encoder.config().vocab_size + rows;
        if tokenizer.vocab_size() != first_id {
            return Err(Error::invalid(format!(
                "cannot add `{token}`: the tokenizer has {} tokens but the text encoder {} (and {rows} added)",
                tokenizer.vocab_size(),
                encoder.config().vocab_size
            )));
        }
        let n = vectors.dim(0)?;
        tokenizer.add_placeholder(token, n)?;
        let table = match self.rows.take() {
            Some(table) => Tensor::cat(&[table, vectors], 0)?,
            None => vectors,
        };
        self.rows = Some(table);
        self.tokens.push((token.to_string(), rows, n));
        Ok(())
    }

    /// Replaces the vectors [N, D] of the placeholder `token`.
    fn set(&mut self, token: &str, vectors: &Tensor) -> Result<()> {
        let &(_, first, n) = self
            .tokens
            .iter()
            .find(|(name, _, _)| name == token)
            .ok_or_else(|| Error::invalid(format!("no placeholder token `{token}` has been added")))?;
        if vectors.dim(0)? != n {
            return Err(Error::invalid(format!("`{token}` stands for {n} vectors, {} given", vectors.dim(0)?)));
        }
        if let Some(table) = &self.rows {
            let d = vectors.dim(1)?;
            self.rows = Some(table.slice_assign(&[first..first + n, 0..d], vectors)?);
        }
        Ok(())
    }
}

/// `vectors` as [N, D] f32 on `device`, D checked against `encoder`'s width.
fn check_token_vectors(encoder: &ClipTextEncoder, token: &str, vectors: &Tensor, device: &Device) -> Result<Tensor> {
    let width = encoder.config().hidden_size;
    let vectors = match vectors.dims() {
        [d] => vectors.reshape((1, *d))?,
        [_, _] => vectors.clone(),
        dims => {
            return Err(Error::invalid(format!("vectors for `{token}` have shape {dims:?}, expected [N, {width}]")));
        }
    };
    let (n, d) = vectors.dims2()?;
    if n == 0 || d != width {
        return Err(Error::invalid(format!(
            "vectors for `{token}` have shape [{n}, {d}] but the text encoder's embeddings are {width} wide \
             (an embedding made for another model: SD1.x uses 768, SD2.x 1024, SDXL 768 and 1280)"
        )));
    }
    Ok(vectors.to_dtype(DType::F32)?.to_device(device)?)
}

impl StableDiffusion {
    /// Adds the placeholder `token` whose input embeddings are `vectors` [N, D] (or [D]): N
    /// tokens `token`, `token_1`, …, and a mention of `token` in a prompt (positive or negative)
    /// stands for all N. An SDXL model needs the second encoder's vectors too (`vectors_2`, the
    /// same N). Fails when a width is not its encoder's or the name is already a token or word of
    /// the vocabulary.
    pub fn add_token_vectors(&mut self, token: &str, vectors: &Tensor, vectors_2: Option<&Tensor>) -> Result<()> {
        let device = self.device().clone();
        let vectors = check_token_vectors(&self.text_encoder, token, vectors, &device)?;
        let second = match (&self.text_2, vectors_2) {
            (Some(text), Some(v)) => Some(check_token_vectors(&text.encoder, token, v, &device)?),
            (Some(_), None) => {
                return Err(Error::invalid(format!(
                    "`{token}` has vectors for one text encoder; an SDXL model needs them for both (`clip_l` and \
                     `clip_g`)"
                )));
            }
            (None, Some(_)) => {
                return Err(Error::invalid(format!(
                    "`{token}` is for SDXL (vectors for two text encoders); the loaded model has one"
                )));
            }
            (None, None) => None,
        };
        if let Some(second) = &second
            && second.dim(0)? != vectors.dim(0)?
        {
            return Err(Error::invalid(format!(
                "`{token}` has {} vectors for the first text encoder and {} for the second",
                vectors.dim(0)?,
                second.dim(0)?
            )));
        }
        self.token_vectors.add(&mut self.tokenizer, &self.text_encoder, token, vectors)?;
        if let (Some(text), Some(second)) = (&mut self.text_2, second) {
            text.token_vectors.add(&mut text.tokenizer, &text.encoder, token, second)?;
        }
        Ok(())
    }

    /// Replaces the vectors of the placeholder `token` (added before, with the same number of
    /// vectors) for the first text encoder: the run-time path for vectors computed per generation.
    pub fn set_token_vectors(&mut self, token: &str, vectors: &Tensor) -> Result<()> {
        let vectors = check_token_vectors(&self.text_encoder, token, vectors, &self.device().clone())?;
        self.token_vectors.set(token, &vectors)
    }
}
