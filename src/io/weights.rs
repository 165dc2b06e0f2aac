//! Named tensors from weight files, with errors that name the file, the key and both shapes.
//!
//! Models never open files: they receive a [`Weights`] view (a store plus a key prefix) and ask it
//! for tensors by their diffusers names.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};

use crate::{Error, Result};

/// The tensors of one model component, memory-mapped from one or more safetensors files.
pub struct TensorStore {
    /// What errors call this store: the file, or the directory of a sharded component.
    label: PathBuf,
    files: MmapedSafetensors,
    /// Each tensor's name, mapped to its shape.
    shapes: HashMap<String, Vec<usize>>,
}

impl TensorStore {
    /// Memory-maps safetensors `paths` (shards of one component); `label` names it in errors.
    pub fn open_safetensors(label: impl Into<PathBuf>, paths: &[PathBuf]) -> Result<Self> {
        let label = label.into();
        for path in paths {
            check_safetensors_header(path)?;
        }
        // SAFETY: the files are mapped read-only; like every mmap-based loader we rely on them not
        // being truncated while in use.
        let files = unsafe { MmapedSafetensors::multi(paths) }.map_err(|e| Error::Format {
            path: label.clone(),
            message: format!("not a readable safetensors file: {e}"),
        })?;
        let shapes = files.tensors().into_iter().map(|(name, view)| (name, view.shape().to_vec())).collect();
        Ok(Self { label, files, shapes })
    }

    /// The path this store is named by in errors.
    pub fn label(&self) -> &Path {
        &self.label
    }

    /// Whether the store holds a tensor called `key`.
    pub fn contains(&self, key: &str) -> bool {
        self.shapes.contains_key(key)
    }

    /// All tensor names, sorted.
    pub fn keys(&self) -> Vec<&str> {
        let mut keys: Vec<&str> = self.shapes.keys().map(String::as_str).collect();
        keys.sort_unstable();
        keys
    }

    /// The stored shape of `key`.
    pub fn shape(&self, key: &str) -> Option<&[usize]> {
        self.shapes.get(key).map(Vec::as_slice)
    }

    /// Loads `key` onto `device` as `dtype`.
    pub fn load(&self, key: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        if !self.contains(key) {
            return Err(Error::MissingTensor { path: self.label.clone(), key: key.to_string() });
        }
        let tensor = self.files.load(key, device).map_err(|e| Error::Format {
            path: self.label.clone(),
            message: format!("tensor `{key}` could not be read: {e}"),
        })?;
        Ok(tensor.to_dtype(dtype)?)
    }
}

/// Rejects files whose safetensors header is truncated or malformed with a message a user can act on.
fn check_safetensors_header(path: &Path) -> Result<()> {
    use std::io::Read;
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_dir() {
        return Err(Error::Format {
            path: path.into(),
            message: "is a directory, expected a .safetensors file".into(),
        });
    }
    let len = meta.len();
    let format_err = |message: String| Error::Format { path: path.into(), message };
    if len < 8 {
        return Err(format_err(format!("file is {len} bytes, too short for a safetensors header")));
    }
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut n = [0u8; 8];
    file.read_exact(&mut n).map_err(|e| Error::io(path, e))?;
    let header_len = u64::from_le_bytes(n);
    if header_len > len - 8 {
        return Err(format_err(format!(
            "safetensors header claims {header_len} bytes but the file has only {} after the length field \
             (truncated or not a safetensors file)",
            len - 8
        )));
    }
    Ok(())
}

/// A view into a [`TensorStore`] under a key prefix, loading tensors as one dtype on one device.
#[derive(Clone)]
pub struct Weights {
    store: Arc<TensorStore>,
    prefix: String,
    dtype: DType,
    device: Device,
}

impl Weights {
    /// A view of the whole `store`.
    pub fn new(store: Arc<TensorStore>, dtype: DType, device: &Device) -> Self {
        Self { store, prefix: String::new(), dtype, device: device.clone() }
    }

    /// The view under `name` (appended to the prefix with a dot).
    pub fn pp(&self, name: impl std::fmt::Display) -> Self {
        let prefix = if self.prefix.is_empty() { name.to_string() } else { format!("{}.{name}", self.prefix) };
        Self { prefix, ..self.clone() }
    }

    /// The full key of `name` under this view.
    pub fn key(&self, name: &str) -> String {
        if self.prefix.is_empty() { name.to_string() } else { format!("{}.{name}", self.prefix) }
    }

    /// The compute dtype tensors are converted to.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device tensors are loaded onto.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Whether the tensor `name` exists under this view.
    pub fn contains(&self, name: &str) -> bool {
        self.store.contains(&self.key(name))
    }

    /// The stored shape of `name`, if present.
    pub fn shape_of(&self, name: &str) -> Option<Vec<usize>> {
        self.store.shape(&self.key(name)).map(<[usize]>::to_vec)
    }

    /// Loads `name`, checking that its shape is `shape`.
    pub fn get(&self, shape: impl Into<Shape>, name: &str) -> Result<Tensor> {
        let key = self.key(name);
        let expected = shape.into().dims().to_vec();
        match self.store.shape(&key) {
            None => Err(Error::MissingTensor { path: self.store.label().into(), key }),
            Some(found) if found != expected.as_slice() => {
                Err(Error::ShapeMismatch { path: self.store.label().into(), key, expected, found: found.to_vec() })
            }
            Some(_) => self.store.load(&key, self.dtype, &self.device),
        }
    }
}
