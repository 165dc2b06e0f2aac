//! Textual-inversion embeddings from the files users have: A1111/SD-WebUI `.pt` (`string_to_param`
//! → `*`) and `.safetensors` (`emb_params`), and diffusers' `learned_embeds.safetensors` / `.bin`
//! (`{token: vectors}`), single- or multi-vector.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::io::weights::TensorStore;
use crate::pipeline::StableDiffusion;
use crate::{Error, Result};

/// An embedding read from a file.
#[derive(Debug, Clone)]
pub struct Embedding {
    /// The file it was read from.
    pub path: PathBuf,
    /// The vectors [N, D]: one per token it stands for (SDXL files: the first encoder's, `clip_l`).
    pub vectors: Tensor,
    /// SDXL files: the second encoder's vectors (`clip_g`).
    pub vectors_2: Option<Tensor>,
    /// The token the file suggests: the one a diffusers file stores, else the file stem (as A1111
    /// names embeddings).
    pub token: String,
}

impl Embedding {
    /// Reads an embedding file onto `device`.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let store = TensorStore::open(path)?;
        let err = |message: String| Error::Format { path: path.into(), message };
        let keys = store.keys();
        let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let matrix = |key: &str| -> Result<Tensor> {
            let vectors = store.load(key, DType::F32, device)?;
            match vectors.dims() {
                [d] => Ok(vectors.reshape((1, *d))?),
                [_, _] => Ok(vectors),
                dims => Err(err(format!("`{key}` has shape {dims:?}, expected [vectors, width]"))),
            }
        };
        if keys.contains(&"clip_l") || keys.contains(&"clip_g") {
            let (Some(_), Some(_)) = (keys.iter().find(|k| **k == "clip_l"), keys.iter().find(|k| **k == "clip_g"))
            else {
                return Err(err("an SDXL embedding needs both `clip_l` and `clip_g` vectors".into()));
            };
            let (vectors, vectors_2) = (matrix("clip_l")?, matrix("clip_g")?);
            return Ok(Self { path: path.to_path_buf(), vectors, vectors_2: Some(vectors_2), token: stem });
        }
        let (key, token) = if keys.contains(&"string_to_param.*") {
            ("string_to_param.*", stem)
        } else if keys.contains(&"emb_params") {
            ("emb_params", stem)
        } else if let [only] = keys.as_slice() {
            (*only, only.to_string())
        } else {
            return Err(err(format!(
                "not a textual-inversion embedding: expected `string_to_param` (A1111 .pt), `emb_params` (A1111 \
                 .safetensors) or a single token tensor (diffusers), found {} tensors ({})",
                keys.len(),
                keys.iter().take(5).copied().collect::<Vec<_>>().join(", ")
            )));
        };
        Ok(Self { path: path.to_path_buf(), vectors: matrix(key)?, vectors_2: None, token })
    }
}

impl StableDiffusion {
    /// Loads the embedding at `path` as the placeholder `token` (default: the name the file
    /// suggests, see [`Embedding::token`]) and returns the token used.
    pub fn load_textual_inversion(&mut self, path: &Path, token: Option<&str>) -> Result<String> {
        let embedding = Embedding::load(path, self.device())?;
        let token = token.map_or(embedding.token, str::to_string);
        self.add_token_vectors(&token, &embedding.vectors, embedding.vectors_2.as_ref()).map_err(|e| match e {
            Error::InvalidArgument(message) => Error::Format { path: path.into(), message },
            other => other,
        })?;
        Ok(token)
    }
}
