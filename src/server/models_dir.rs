//! The models folder laid out as A1111's `models/`: `Stable-diffusion/`, `Lora/` (and
//! `LyCORIS/`), `ControlNet/`, `VAE/`, `embeddings/` (A1111 keeps it beside `models/`; both places
//! are read) and `clip_vision/`, each holding weight files or diffusers folders. Requests name
//! entries; a name resolves only to a listed entry, never to a path of the client's.

use std::path::{Path, PathBuf};

/// Weight-file extensions that count as models.
const WEIGHT_EXTENSIONS: [&str; 6] = ["safetensors", "ckpt", "pt", "bin", "pth", "gguf"];

/// One listed model: a weight file or a diffusers folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Its path below the kind's folder with `/` separators (`sub/model.safetensors`, `folder`).
    pub name: String,
    /// `name` without the file extension.
    pub stem: String,
    /// Where it is.
    pub path: PathBuf,
}

impl Entry {
    fn new(root: &Path, path: PathBuf) -> Self {
        let relative = path.strip_prefix(root).unwrap_or(&path);
        let name = relative.components().map(|c| c.as_os_str().to_string_lossy()).collect::<Vec<_>>().join("/");
        let stem = if path.is_file() {
            name.rsplit_once('.').map(|(stem, _)| stem.to_string()).unwrap_or_else(|| name.clone())
        } else {
            name.clone()
        };
        Self { name, stem, path }
    }

    /// An entry for a model given by path (the server's `--model`, outside any models folder).
    pub fn outside(path: &Path) -> Self {
        let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let stem = if path.is_file() {
            path.file_stem().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
        } else {
            file_name.clone()
        };
        Self { name: file_name, stem, path: path.to_path_buf() }
    }

    /// The last part of the stem (`model` for `sub/model.safetensors`).
    pub fn short_stem(&self) -> &str {
        self.stem.rsplit('/').next().unwrap_or(&self.stem)
    }

    /// Whether `query` names this entry: its name or stem exactly, or the short stem, without
    /// regard to case.
    pub fn is_named(&self, query: &str) -> bool {
        let q = query.trim();
        [self.name.as_str(), self.stem.as_str(), self.short_stem()].iter().any(|n| n.eq_ignore_ascii_case(q))
    }
}

/// The kinds of models a models folder holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Checkpoints.
    Checkpoint,
    /// LoRA and LyCORIS files.
    Lora,
    /// ControlNets, T2I-Adapters and IP-Adapters.
    ControlNet,
    /// VAEs.
    Vae,
    /// Textual-inversion embeddings.
    Embedding,
    /// CLIP image encoders (for IP-Adapters).
    ClipVision,
}

impl Kind {
    /// The sub-folders of the models folder (and of its parent, for embeddings) holding this kind.
    fn folders(self) -> &'static [&'static str] {
        match self {
            Kind::Checkpoint => &["Stable-diffusion"],
            Kind::Lora => &["Lora", "LyCORIS"],
            Kind::ControlNet => &["ControlNet"],
            Kind::Vae => &["VAE"],
            Kind::Embedding => &["embeddings", "../embeddings"],
            Kind::ClipVision => &["clip_vision"],
        }
    }
}

/// A models folder (or none: only the startup model is listed).
#[derive(Debug, Clone, Default)]
pub struct ModelsDir {
    root: Option<PathBuf>,
}

impl ModelsDir {
    /// The folder `root`, if given.
    pub fn new(root: Option<PathBuf>) -> Self {
        Self { root }
    }

    /// Every entry of `kind`, sorted by name.
    pub fn list(&self, kind: Kind) -> Vec<Entry> {
        let Some(root) = &self.root else { return Vec::new() };
        let mut entries = Vec::new();
        for folder in kind.folders() {
            let dir = root.join(folder);
            if dir.is_dir() {
                collect(&dir, &dir, 0, &mut entries);
            }
        }
        entries.sort_by_key(|e| e.name.to_lowercase());
        entries
    }

    /// The entry of `kind` that `query` names: exactly, else by stem, else the only one whose name
    /// contains it (sd-webui-controlnet's model matching; a trailing ` [hash]` is ignored). The
    /// error lists the choices.
    pub fn find(&self, kind: Kind, query: &str) -> Result<Entry, String> {
        let query = strip_hash(query);
        let entries = self.list(kind);
        if let Some(entry) = entries.iter().find(|e| e.is_named(query)) {
            return Ok(entry.clone());
        }
        let lower = query.to_lowercase();
        let containing: Vec<&Entry> =
            entries.iter().filter(|e| !lower.is_empty() && e.name.to_lowercase().contains(&lower)).collect();
        if let [only] = containing.as_slice() {
            return Ok((*only).clone());
        }
        let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
        Err(format!(
            "no {kind:?} model is named `{query}`; available: {}",
            if names.is_empty() { "none".to_string() } else { names.join(", ") }
        ))
    }
}

/// `name [hash]` without the hash.
pub fn strip_hash(title: &str) -> &str {
    let t = title.trim();
    match t.rfind(" [") {
        Some(i) if t.ends_with(']') => &t[..i],
        _ => t,
    }
}

/// Collects weight files and model folders below `dir` (a folder with `config.json` or
/// `model_index.json` is one model; others are searched, 4 levels deep at most).
fn collect(root: &Path, dir: &Path, depth: usize, out: &mut Vec<Entry>) {
    let Ok(read) = std::fs::read_dir(dir) else { return };
    for item in read.flatten() {
        let path = item.path();
        let hidden = item.file_name().to_string_lossy().starts_with('.');
        if hidden {
            continue;
        }
        if path.is_dir() {
            if path.join("config.json").is_file() || path.join("model_index.json").is_file() {
                out.push(Entry::new(root, path));
            } else if depth < 4 {
                collect(root, &path, depth + 1, out);
            }
        } else if path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| WEIGHT_EXTENSIONS.contains(&e.to_lowercase().as_str()))
        {
            out.push(Entry::new(root, path));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_resolve_only_to_listed_entries() {
        let dir = tempfile::tempdir().unwrap();
        let lora = dir.path().join("Lora");
        std::fs::create_dir_all(lora.join("sub")).unwrap();
        std::fs::write(lora.join("sub/style.safetensors"), b"x").unwrap();
        std::fs::write(lora.join("notes.txt"), b"x").unwrap();
        let models = ModelsDir::new(Some(dir.path().to_path_buf()));
        let listed = models.list(Kind::Lora);
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].name, "sub/style.safetensors");
        assert_eq!(models.find(Kind::Lora, "style").unwrap().stem, "sub/style");
        assert_eq!(models.find(Kind::Lora, "sub/style [abc]").unwrap().name, "sub/style.safetensors");
        let err = models.find(Kind::Lora, "../../etc/passwd").unwrap_err();
        assert!(err.contains("sub/style.safetensors"), "{err}");
        assert!(models.find(Kind::Lora, "notes").is_err());
    }
}
