//! The diffusers model-folder layout: `model_index.json` plus one sub-folder per component, each with
//! its `config.json` (or `scheduler_config.json`) and weights.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::weights::TensorStore;
use crate::{Error, Result};

/// File stems diffusers and transformers save safetensors weights under.
const WEIGHT_STEMS: [&str; 2] = ["diffusion_pytorch_model", "model"];
/// File stems they save PyTorch pickle weights under.
const PICKLE_STEMS: [&str; 2] = ["diffusion_pytorch_model", "pytorch_model"];

/// A diffusers pipeline folder on disk.
#[derive(Debug, Clone)]
pub struct DiffusersFolder {
    root: PathBuf,
    /// `model_index.json`: component name -> [library, class] (null for absent components).
    index: BTreeMap<String, serde_json::Value>,
}

impl DiffusersFolder {
    /// Opens `root`, which must hold a `model_index.json`.
    pub fn open(root: &Path) -> Result<Self> {
        if !root.exists() {
            return Err(Error::invalid(format!("{}: model folder does not exist", root.display())));
        }
        if !root.is_dir() {
            return Err(Error::invalid(format!(
                "{}: expected a diffusers model folder (with model_index.json), found a file",
                root.display()
            )));
        }
        let index_path = root.join("model_index.json");
        if !index_path.is_file() {
            return Err(Error::invalid(format!(
                "{}: not a diffusers model folder: model_index.json is missing",
                root.display()
            )));
        }
        let index = super::read_json(&index_path)?;
        Ok(Self { root: root.to_path_buf(), index })
    }

    /// The folder's path.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The class name `model_index.json` gives for `component` (e.g. "PNDMScheduler").
    pub fn class_name(&self, component: &str) -> Option<&str> {
        self.index.get(component)?.as_array()?.get(1)?.as_str()
    }

    /// Whether `model_index.json` lists `component` as absent (`[null, null]`), as diffusers
    /// writes a pipeline built without it.
    pub fn lists_as_absent(&self, component: &str) -> bool {
        self.index.get(component).and_then(serde_json::Value::as_array).is_some_and(|a| a.iter().all(|v| v.is_null()))
    }

    /// A boolean setting of `model_index.json` (false when absent or not a boolean).
    pub fn flag(&self, name: &str) -> bool {
        self.index.get(name).and_then(serde_json::Value::as_bool).unwrap_or(false)
    }

    /// Every file of the folder: those at its root and those in its component folders (one level
    /// down), hidden ones aside, as (path relative to the root, full path), sorted.
    pub fn files(&self) -> Result<Vec<(PathBuf, PathBuf)>> {
        let mut files = Vec::new();
        let hidden = |p: &PathBuf| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.'));
        for entry in super::sorted_entries(&self.root)?.into_iter().filter(|e| !hidden(e)) {
            if entry.is_dir() {
                files.extend(super::sorted_entries(&entry)?.into_iter().filter(|f| f.is_file() && !hidden(f)));
            } else if entry.is_file() {
                files.push(entry);
            }
        }
        Ok(files
            .into_iter()
            .map(|f| (f.strip_prefix(&self.root).map(Path::to_path_buf).unwrap_or_else(|_| f.clone()), f))
            .collect())
    }

    /// The sub-folder of `component`, which must exist.
    pub fn component_dir(&self, component: &str) -> Result<PathBuf> {
        let dir = self.root.join(component);
        if !dir.is_dir() {
            return Err(Error::invalid(format!(
                "{}: the model has no `{component}` component (folder {} is missing)",
                self.root.display(),
                dir.display()
            )));
        }
        Ok(dir)
    }

    /// The path of `file` (a config) inside `component`, which must exist.
    pub fn component_file(&self, component: &str, file: &str) -> Result<PathBuf> {
        let path = self.component_dir(component)?.join(file);
        if !path.is_file() {
            return Err(Error::invalid(format!("{}: missing file", path.display())));
        }
        Ok(path)
    }

    /// Memory-maps the weights of `component` (see [`open_weights_in`]).
    pub fn open_weights(&self, component: &str) -> Result<Arc<TensorStore>> {
        open_weights_in(&self.component_dir(component)?)
    }
}

/// Memory-maps the weights saved in the model folder `dir` (a pipeline component or a standalone
/// model such as a ControlNet): the full-precision safetensors file, its shards, or the `fp16`
/// variant when that is all the folder has; else the PyTorch `.bin` file (or its `fp16` variant),
/// read without running its pickle code.
pub fn open_weights_in(dir: &Path) -> Result<Arc<TensorStore>> {
    for variant in ["", ".fp16"] {
        for stem in WEIGHT_STEMS {
            let single = dir.join(format!("{stem}{variant}.safetensors"));
            if single.is_file() {
                return Ok(Arc::new(TensorStore::open_safetensors(&single, std::slice::from_ref(&single))?));
            }
            let index = dir.join(format!("{stem}.safetensors.index{variant}.json"));
            if index.is_file() {
                let shards = shard_paths(&index)?;
                return Ok(Arc::new(TensorStore::open_safetensors(dir, &shards)?));
            }
        }
    }
    for variant in ["", ".fp16"] {
        for stem in PICKLE_STEMS {
            let single = dir.join(format!("{stem}{variant}.bin"));
            if single.is_file() {
                return Ok(Arc::new(TensorStore::open_pickle(&single)?));
            }
        }
    }
    Err(Error::invalid(format!(
        "{}: no weights found (expected diffusion_pytorch_model.safetensors or model.safetensors, their \
         .fp16 variants or shards, or PyTorch diffusion_pytorch_model.bin / pytorch_model.bin)",
        dir.display()
    )))
}

/// The shard files listed in a `*.safetensors.index.json` `weight_map`.
fn shard_paths(index: &Path) -> Result<Vec<PathBuf>> {
    #[derive(serde::Deserialize)]
    struct ShardIndex {
        weight_map: BTreeMap<String, String>,
    }
    let parsed: ShardIndex = super::read_json(index)?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut files: Vec<PathBuf> = parsed.weight_map.into_values().map(|f| dir.join(f)).collect();
    files.sort();
    files.dedup();
    for f in &files {
        if !f.is_file() {
            return Err(Error::invalid(format!("{}: lists shard {} which is missing", index.display(), f.display())));
        }
    }
    Ok(files)
}
