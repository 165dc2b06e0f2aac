//! Token-level control: placeholder tokens added to the tokenizer whose input embeddings are
//! vectors supplied by a mechanism — read from a file (textual inversion) or computed at run time
//! (image-derived pseudo-words: ELITE, PhotoVerse).
//!
//! The tokenizer gives each placeholder new ids after its vocabulary; [`TokenVectors`] holds their
//! rows, and the text encoder's [`token_embeddings_with`] substitutes them for those ids.
//!
//! [`token_embeddings_with`]: crate::models::clip_text::ClipTextEncoder::token_embeddings_with

pub mod textual_inversion;

use candle_core::{DType, Tensor};

use crate::pipeline::StableDiffusion;
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

impl StableDiffusion {
    /// Adds the placeholder `token` whose input embeddings are `vectors` [N, D] (or [D]): N
    /// tokens `token`, `token_1`, …, and a mention of `token` in a prompt (positive or negative)
    /// stands for all N. Fails when the width D is not the text encoder's or the name is
    /// already a token or word of the vocabulary.
    pub fn add_token_vectors(&mut self, token: &str, vectors: &Tensor) -> Result<()> {
        if self.text_2.is_some() {
            return Err(Error::invalid(format!(
                "cannot add `{token}`: placeholder tokens (textual inversion) are not supported for SDXL models yet"
            )));
        }
        let vectors = self.check_token_vectors(token, vectors)?;
        let rows = self.token_vectors.len();
        let first_id = self.text_encoder.config().vocab_size + rows;
        if self.tokenizer.vocab_size() != first_id {
            return Err(Error::invalid(format!(
                "cannot add `{token}`: the tokenizer has {} tokens but the text encoder {} (and {rows} added)",
                self.tokenizer.vocab_size(),
                self.text_encoder.config().vocab_size
            )));
        }
        let n = vectors.dim(0)?;
        self.tokenizer.add_placeholder(token, n)?;
        let table = match self.token_vectors.rows.take() {
            Some(table) => Tensor::cat(&[table, vectors], 0)?,
            None => vectors,
        };
        self.token_vectors.rows = Some(table);
        self.token_vectors.tokens.push((token.to_string(), rows, n));
        Ok(())
    }

    /// Replaces the vectors of the placeholder `token` (added before, with the same number of
    /// vectors): the run-time path for vectors computed per generation.
    pub fn set_token_vectors(&mut self, token: &str, vectors: &Tensor) -> Result<()> {
        let vectors = self.check_token_vectors(token, vectors)?;
        let &(_, first, n) = self
            .token_vectors
            .tokens
            .iter()
            .find(|(name, _, _)| name == token)
            .ok_or_else(|| Error::invalid(format!("no placeholder token `{token}` has been added")))?;
        if vectors.dim(0)? != n {
            return Err(Error::invalid(format!("`{token}` stands for {n} vectors, {} given", vectors.dim(0)?)));
        }
        if let Some(table) = &self.token_vectors.rows {
            let d = vectors.dim(1)?;
            self.token_vectors.rows = Some(table.slice_assign(&[first..first + n, 0..d], &vectors)?);
        }
        Ok(())
    }

    /// `vectors` as [N, D] f32 on the model's device, D checked against the text encoder.
    fn check_token_vectors(&self, token: &str, vectors: &Tensor) -> Result<Tensor> {
        let width = self.text_encoder.config().hidden_size;
        let vectors = match vectors.dims() {
            [d] => vectors.reshape((1, *d))?,
            [_, _] => vectors.clone(),
            dims => {
                return Err(Error::invalid(format!(
                    "vectors for `{token}` have shape {dims:?}, expected [N, {width}]"
                )));
            }
        };
        let (n, d) = vectors.dims2()?;
        if n == 0 || d != width {
            return Err(Error::invalid(format!(
                "vectors for `{token}` have shape [{n}, {d}] but the text encoder's embeddings are {width} wide \
                 (an embedding made for another model: SD1.x uses 768, SD2.x 1024)"
            )));
        }
        Ok(vectors.to_dtype(DType::F32)?.to_device(self.device())?)
    }
}
