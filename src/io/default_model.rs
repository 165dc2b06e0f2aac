//! The model built into the binary: a small pixel-space emoji model trained by `diffctl train full`
//! (see `assets/emoji-model/README.md`), used when no `--model` is given. Its files are embedded at
//! compile time and written once, on first use, to a folder named after their content under the
//! user's cache (`$XDG_CACHE_HOME/diffctl`, else `~/.cache/diffctl`, else the temporary folder),
//! so that it loads like any other diffusers folder.

use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// The embedded files: path inside the model folder, contents.
const FILES: &[(&str, &[u8])] = &[
    ("model_index.json", include_bytes!("../../assets/emoji-model/model_index.json")),
    ("scheduler/scheduler_config.json", include_bytes!("../../assets/emoji-model/scheduler/scheduler_config.json")),
    ("text_encoder/config.json", include_bytes!("../../assets/emoji-model/text_encoder/config.json")),
    ("text_encoder/model.safetensors", include_bytes!("../../assets/emoji-model/text_encoder/model.safetensors")),
    ("tokenizer/tokenizer.json", include_bytes!("../../assets/emoji-model/tokenizer/tokenizer.json")),
    ("tokenizer/tokenizer_config.json", include_bytes!("../../assets/emoji-model/tokenizer/tokenizer_config.json")),
    ("unet/config.json", include_bytes!("../../assets/emoji-model/unet/config.json")),
    (
        "unet/diffusion_pytorch_model.safetensors",
        include_bytes!("../../assets/emoji-model/unet/diffusion_pytorch_model.safetensors"),
    ),
];

/// The folder of the built-in model, written under the cache folder if it is not there yet.
pub fn default_model() -> Result<PathBuf> {
    default_model_in(&cache_root())
}

/// The built-in model's folder under `root`: `root/emoji-model-<content hash>`, written (into a
/// temporary sibling renamed into place, so a crash never leaves half a model) if absent.
pub fn default_model_in(root: &Path) -> Result<PathBuf> {
    let dir = root.join(format!("emoji-model-{:016x}", content_hash()));
    if FILES.iter().all(|(name, bytes)| std::fs::metadata(dir.join(name)).is_ok_and(|m| m.len() == bytes.len() as u64))
    {
        return Ok(dir);
    }
    std::fs::create_dir_all(root).map_err(|e| Error::io(root, e))?;
    let staging = tempfile::Builder::new().prefix(".emoji-model-").tempdir_in(root).map_err(|e| Error::io(root, e))?;
    for (name, bytes) in FILES {
        let path = staging.path().join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        std::fs::write(&path, bytes).map_err(|e| Error::io(&path, e))?;
    }
    // A damaged copy (a file of the wrong size) is replaced; another process may have written the
    // same folder meanwhile, and its copy is as good.
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    }
    let staged = staging.keep();
    if std::fs::rename(&staged, &dir).is_err() {
        std::fs::remove_dir_all(&staged).map_err(|e| Error::io(&staged, e))?;
        if !dir.join("model_index.json").is_file() {
            return Err(Error::invalid(format!("could not write the built-in model to {}", dir.display())));
        }
    }
    Ok(dir)
}

/// Where the built-in model is written.
fn cache_root() -> PathBuf {
    let from_env = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    from_env("XDG_CACHE_HOME")
        .or_else(|| from_env("HOME").map(|home| home.join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("diffctl")
}

/// FNV-1a over the embedded names and contents: a new model gets a new folder.
fn content_hash() -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    for (name, bytes) in FILES {
        for &b in name.as_bytes().iter().chain(*bytes) {
            hash = (hash ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Written once, complete, then found again without rewriting; a damaged copy is replaced.
    #[test]
    fn writes_the_model_once_and_repairs_it() {
        let root = tempfile::tempdir().unwrap();
        let dir = default_model_in(root.path()).unwrap();
        for (name, bytes) in FILES {
            assert_eq!(std::fs::read(dir.join(name)).unwrap(), *bytes, "{name}");
        }
        assert_eq!(default_model_in(root.path()).unwrap(), dir);
        std::fs::write(dir.join("unet/config.json"), "{}").unwrap();
        assert_eq!(default_model_in(root.path()).unwrap(), dir);
        let config = FILES.iter().find(|(name, _)| *name == "unet/config.json").unwrap().1;
        assert_eq!(std::fs::read(dir.join("unet/config.json")).unwrap(), config, "repaired");
        let leftovers: Vec<_> = std::fs::read_dir(root.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no staging folder left behind");
    }
}
