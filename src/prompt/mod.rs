//! How prompt text becomes the text encoder's input.
//!
//! [`PromptSyntax::Diffusers`] (the default) takes the text literally and truncates it at 77
//! tokens, as diffusers does. [`PromptSyntax::A1111`] reads the AUTOMATIC1111 web UI's syntax:
//! emphasis weights and prompts of any length in chunks of 75 tokens (see [`a1111`]).

pub mod a1111;

use candle_core::Tensor;

use crate::{Error, Result};

/// A word of a prompt and the rows of the text encoder's output its tokens became (within the
/// prompt's 77, the start token being row 0): how a mechanism finds "man" in "a photo of a man img".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptWord {
    /// The word as written in the prompt.
    pub text: String,
    /// Its rows (several when the word is several tokens or a multi-vector placeholder).
    pub rows: std::ops::Range<usize>,
}

/// How prompts are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PromptSyntax {
    /// Literal text truncated at 77 tokens (diffusers).
    #[default]
    Diffusers,
    /// `(word:1.3)`, `(word)`, `[word]`, `\(` escapes, `BREAK` and long prompts in 75-token chunks
    /// (AUTOMATIC1111).
    A1111,
}

impl std::str::FromStr for PromptSyntax {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "diffusers" => Ok(PromptSyntax::Diffusers),
            "a1111" => Ok(PromptSyntax::A1111),
            other => Err(Error::invalid(format!("unknown prompt syntax `{other}` (expected diffusers or a1111)"))),
        }
    }
}

/// Pads the shorter of two prompt encodings [1, L, D] with copies of `empty` (the encoding of an
/// empty prompt, [1, l, D]) until both have the same length, as A1111 pads the conditional and
/// unconditional contexts of different chunk counts.
pub fn pad_to_same_length(a: Tensor, b: Tensor, empty: &Tensor) -> Result<(Tensor, Tensor)> {
    let (la, lb, step) = (a.dim(1)?, b.dim(1)?, empty.dim(1)?);
    let pad = |t: Tensor, missing: usize| -> Result<Tensor> {
        if missing == 0 {
            return Ok(t);
        }
        if step == 0 || !missing.is_multiple_of(step) {
            return Err(Error::invalid(format!("cannot pad a context of {} tokens by {missing}", t.dim(1)?)));
        }
        Ok(Tensor::cat(&[t, empty.repeat((1, missing / step, 1))?], 1)?)
    };
    Ok((pad(a, lb.saturating_sub(la))?, pad(b, la.saturating_sub(lb))?))
}
