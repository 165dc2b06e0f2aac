//! Textual-inversion flags of `diffctl generate`: `--embedding FILE[:TOKEN]` (repeatable).

use std::path::Path;

use clap::Args;

use crate::request::{EmbeddingSpec, Request};

/// `FILE` or `FILE:TOKEN` (a value that is an existing file is taken whole).
fn parse_embedding_spec(s: &str) -> Result<EmbeddingSpec, String> {
    match s.rsplit_once(':') {
        Some((path, token)) if !Path::new(s).exists() && !token.is_empty() => {
            Ok(EmbeddingSpec { path: path.into(), token: Some(token.to_string()) })
        }
        _ => Ok(EmbeddingSpec { path: s.into(), token: None }),
    }
}

/// Textual-inversion flags of `diffctl generate`.
#[derive(Debug, Args)]
pub struct EmbeddingArgs {
    /// A textual-inversion embedding (A1111 .pt / .safetensors, or diffusers learned_embeds) and the
    /// token that stands for it in prompts [default token: the one a diffusers file stores, else the
    /// file name]. Usable in the prompt and the negative prompt. Repeat for several.
    #[arg(long, value_name = "FILE[:TOKEN]", value_parser = parse_embedding_spec)]
    embedding: Vec<EmbeddingSpec>,
}

impl EmbeddingArgs {
    /// Adds every `--embedding` to `request`.
    pub fn add_to(&self, request: &mut Request) {
        request.embeddings.extend(self.embedding.iter().cloned());
    }
}
