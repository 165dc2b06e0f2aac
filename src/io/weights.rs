//! Named tensors from weight files, with errors that name the file, the key and both shapes.
//!
//! Models never open files: they receive a [`Weights`] view (a store plus a key prefix) and ask it
//! for tensors by their diffusers names. A [`TensorStore`] reads safetensors or PyTorch checkpoints,
//! or is a renamed view of another store (a single-file checkpoint's UNet under diffusers names,
//! fused q/k/v split, 1x1 convolutions read as Linear weights).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use candle_core::{DType, Device, Shape, Tensor};

use super::mapped_safetensors::MappedSafetensors;
use super::pickle::PickleTensors;
use crate::models::nn::LayerRegistry;
use crate::{Error, Result};

/// Where a store's tensors are read from.
enum Source {
    /// Memory-mapped safetensors files (one component, possibly sharded).
    Safetensors(MappedSafetensors),
    /// A PyTorch zip checkpoint, read without running its pickle code.
    Pickle(PickleTensors),
    /// No file: the (name, shape) of every tensor asked for, in order (see [`TensorStore::recorder`]).
    Recorder(Mutex<Vec<(String, Vec<usize>)>>),
    /// No tensors at all (the weights of a component a model does without).
    Empty,
    /// Tensors held in memory (a model initialised for training, before it has a file).
    Memory(HashMap<String, Tensor>),
    /// Another store's tensors plus offsets of the same names (see [`TensorStore::with_offsets`]).
    Sum {
        /// The base tensors.
        base: Arc<TensorStore>,
        /// The offsets added to them.
        offsets: Arc<TensorStore>,
    },
}

/// How an entry of a renamed view is derived from the tensor stored in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transform {
    /// Part `index` of `count` equal parts along dim 0 (one of the fused q/k/v projections).
    Chunk {
        /// Which part, from 0.
        index: usize,
        /// How many parts the stored tensor holds.
        count: usize,
    },
    /// A 1x1 convolution weight [O, I, 1, 1] (or [O, I, 1]) read as a Linear weight [O, I].
    SqueezeToLinear,
    /// A matrix stored as [I, O] read as a Linear weight [O, I] (OpenCLIP's `text_projection`).
    Transpose,
}

impl Transform {
    /// The shape after the transform, or why it does not apply to `shape`.
    fn shape(self, shape: &[usize]) -> std::result::Result<Vec<usize>, String> {
        match self {
            Transform::Chunk { index, count } => match shape.split_first() {
                Some((&rows, rest)) if count > 0 && index < count && rows % count == 0 => {
                    Ok([&[rows / count][..], rest].concat())
                }
                _ => Err(format!("cannot be split into {count} equal parts along its first dimension")),
            },
            Transform::SqueezeToLinear => match shape {
                [o, i] | [o, i, 1] | [o, i, 1, 1] => Ok(vec![*o, *i]),
                _ => Err("is not a 1x1 convolution weight".into()),
            },
            Transform::Transpose => match shape {
                [i, o] => Ok(vec![*o, *i]),
                _ => Err("is not a matrix".into()),
            },
        }
    }

    fn apply(self, t: Tensor) -> Result<Tensor> {
        Ok(match self {
            Transform::Chunk { index, count } => {
                let rows = t.dim(0)? / count;
                t.narrow(0, index * rows, rows)?
            }
            Transform::SqueezeToLinear => {
                let dims = t.dims();
                let (o, i) = (dims[0], dims[1]);
                t.reshape((o, i))?
            }
            Transform::Transpose => t.t()?.contiguous()?,
        })
    }
}

/// One tensor of a store: read as `source` from the file, then transformed in order.
struct Entry {
    source: String,
    transforms: Vec<Transform>,
    shape: Vec<usize>,
    dtype: DType,
}

/// Names the file key a view would read a name from, for errors about absent names.
pub type SourceName = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// One renamed entry requested from [`TensorStore::view`].
#[derive(Debug, Clone)]
pub struct Rename {
    /// The name the view gives the tensor.
    pub name: String,
    /// The name it is read from in the underlying store.
    pub from: String,
    /// How it is derived from that tensor, if not as stored.
    pub transform: Option<Transform>,
}

/// The tensors of one model component: a weight file (safetensors, possibly sharded, or a PyTorch
/// checkpoint), or a renamed / transformed view of one (a single-file checkpoint's UNet under
/// diffusers names, say).
pub struct TensorStore {
    /// What errors call this store: the file, or the directory of a sharded component.
    label: PathBuf,
    source: Arc<Source>,
    /// Each name, with where and how it is read.
    entries: HashMap<String, Entry>,
    /// For views: the file key an absent name would be read from.
    source_name: Option<SourceName>,
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
        let files = unsafe { MappedSafetensors::open(paths) }.map_err(|(path, e)| Error::Format {
            path: if paths.len() == 1 { label.clone() } else { path },
            message: format!("not a readable safetensors file: {e}"),
        })?;
        let entries = files
            .tensors()
            .map(|(name, loc)| {
                let entry = Entry {
                    source: name.to_string(),
                    transforms: Vec::new(),
                    shape: loc.shape.clone(),
                    dtype: loc.dtype,
                };
                (name.to_string(), entry)
            })
            .collect();
        Ok(Self { label, source: Arc::new(Source::Safetensors(files)), entries, source_name: None })
    }

    /// Reads the tensor index of a PyTorch zip checkpoint (`.bin`, `.ckpt`, `.pt`), refusing any
    /// that would run code (see [`crate::io::pickle`]).
    pub fn open_pickle(path: &Path) -> Result<Self> {
        let file = PickleTensors::open(path)?;
        let entries = file
            .tensors()
            .map(|(name, shape, dtype)| {
                let entry = Entry { source: name.to_string(), transforms: Vec::new(), shape: shape.to_vec(), dtype };
                (name.to_string(), entry)
            })
            .collect();
        Ok(Self { label: path.into(), source: Arc::new(Source::Pickle(file)), entries, source_name: None })
    }

    /// Opens one weight file of either format, told apart by its content: safetensors or a PyTorch
    /// zip checkpoint.
    pub fn open(path: &Path) -> Result<Self> {
        let format_err = |message: String| Error::Format { path: path.into(), message };
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        if meta.is_dir() {
            return Err(format_err("is a directory, expected a weight file (.safetensors, .ckpt, .bin, .pt)".into()));
        }
        if meta.len() == 0 {
            return Err(format_err("file is empty".into()));
        }
        let mut magic = [0u8; 4];
        let n = std::io::Read::read(&mut std::fs::File::open(path).map_err(|e| Error::io(path, e))?, &mut magic)
            .map_err(|e| Error::io(path, e))?;
        match &magic[..n] {
            [b'P', b'K', 3, 4] => Self::open_pickle(path),
            // torch.save's pre-1.6 format opens with a protocol-2 pickle of its magic number.
            [0x80, 0x02, 0x8a, 0x0a] => Err(format_err(
                "a legacy (pre-1.6, non-zip) PyTorch file; re-save it with a current torch.save or as safetensors"
                    .into(),
            )),
            _ => Self::open_safetensors(path, &[path.to_path_buf()]),
        }
    }

    /// A store without tensors, named `label` in errors.
    pub fn empty(label: impl Into<PathBuf>) -> Self {
        Self { label: label.into(), source: Arc::new(Source::Empty), entries: HashMap::new(), source_name: None }
    }

    /// A store of the in-memory `tensors` by name, named `label` in errors (the initial weights of a
    /// network that training creates, say a ControlNet copied from a UNet).
    pub fn from_tensors(label: impl Into<PathBuf>, tensors: HashMap<String, Tensor>) -> Self {
        let entries = tensors
            .iter()
            .map(|(name, t)| {
                let entry =
                    Entry { source: name.clone(), transforms: Vec::new(), shape: t.dims().to_vec(), dtype: t.dtype() };
                (name.clone(), entry)
            })
            .collect();
        Self { label: label.into(), source: Arc::new(Source::Memory(tensors)), entries, source_name: None }
    }

    /// A store without a file that answers every [`Weights::get`] with zeros of the asked shape
    /// (broadcast, no memory) and records the name and shape: loading a model of some config from it
    /// lists exactly the parameters that config has, from the model's own loading code (used to write
    /// random-weight models of real sizes for benchmarks). Read the list with [`Self::recorded`].
    pub fn recorder() -> Self {
        let source = Arc::new(Source::Recorder(Mutex::new(Vec::new())));
        Self { label: "<recorder>".into(), source, entries: HashMap::new(), source_name: None }
    }

    /// What a [`Self::recorder`] store was asked for: (full name, shape) in loading order; empty for
    /// stores read from files.
    pub fn recorded(&self) -> Vec<(String, Vec<usize>)> {
        match self.source.as_ref() {
            Source::Recorder(log) => log.lock().unwrap_or_else(PoisonError::into_inner).clone(),
            _ => Vec::new(),
        }
    }

    /// `base` with `offsets` added, tensor by tensor, when read (IC-Light's weight files are such
    /// offsets to a UNet). An offset may be wider than its base tensor along dimension 1 (a
    /// widened input convolution): the base is then padded with zeros there. Every offset must
    /// name a tensor of `base`; names without an offset read as the base's.
    pub fn with_offsets(base: Arc<TensorStore>, offsets: Arc<TensorStore>) -> Result<Self> {
        let format_err = |message: String| Error::Format { path: offsets.label.clone(), message };
        for (name, offset) in &offsets.entries {
            let Some(entry) = base.entries.get(name) else {
                return Err(format_err(format!("offset `{name}` has no tensor of that name in the model")));
            };
            let (a, b) = (&entry.shape, &offset.shape);
            let widened = a.len() == b.len()
                && a.len() >= 2
                && b[1] >= a[1]
                && a.iter().zip(b).enumerate().all(|(i, (x, y))| i == 1 || x == y);
            if a != b && !widened {
                return Err(format_err(format!("offset `{name}` has shape {b:?}, the model's tensor {a:?}")));
            }
        }
        let entries = base
            .entries
            .iter()
            .map(|(name, entry)| {
                let shape = offsets.entries.get(name).map_or_else(|| entry.shape.clone(), |o| o.shape.clone());
                let entry = Entry { source: name.clone(), transforms: Vec::new(), shape, dtype: entry.dtype };
                (name.clone(), entry)
            })
            .collect();
        let label = offsets.label.clone();
        Ok(Self { label, source: Arc::new(Source::Sum { base, offsets }), entries, source_name: None })
    }

    /// A view of this store under new names: each [`Rename`] reads `from` (a name of this store),
    /// optionally transformed. `source_name` names the file key an absent name would come from, so
    /// that a model asking for it gets an error naming what the file lacks.
    pub fn view(&self, renames: Vec<Rename>, source_name: Option<SourceName>) -> Result<Self> {
        let mut entries = HashMap::with_capacity(renames.len());
        for r in renames {
            let base = self.entries.get(&r.from).ok_or_else(|| self.missing(&r.from))?;
            let mut transforms = base.transforms.clone();
            let mut shape = base.shape.clone();
            if let Some(t) = r.transform {
                shape = t.shape(&shape).map_err(|why| Error::Format {
                    path: self.label.clone(),
                    message: format!("tensor `{}` {:?} {why}", base.source, base.shape),
                })?;
                transforms.push(t);
            }
            entries.insert(r.name, Entry { source: base.source.clone(), transforms, shape, dtype: base.dtype });
        }
        Ok(Self { label: self.label.clone(), source: self.source.clone(), entries, source_name })
    }

    /// The path this store is named by in errors.
    pub fn label(&self) -> &Path {
        &self.label
    }

    /// The file format the tensors are read from.
    pub fn format(&self) -> &'static str {
        match self.source.as_ref() {
            Source::Safetensors(_) => "safetensors",
            Source::Pickle(_) => "PyTorch zip pickle (torch.save)",
            Source::Recorder(_) => "none (shape recorder)",
            Source::Empty => "none",
            Source::Memory(_) => "in memory",
            Source::Sum { base, .. } => base.format(),
        }
    }

    /// Whether the store holds a tensor called `key`.
    pub fn contains(&self, key: &str) -> bool {
        self.entries.contains_key(key)
    }

    /// All tensor names, sorted.
    pub fn keys(&self) -> Vec<&str> {
        let mut keys: Vec<&str> = self.entries.keys().map(String::as_str).collect();
        keys.sort_unstable();
        keys
    }

    /// The stored shape of `key` (after the view's transform).
    pub fn shape(&self, key: &str) -> Option<&[usize]> {
        self.entries.get(key).map(|e| e.shape.as_slice())
    }

    /// The dtype `key` is stored in.
    pub fn dtype(&self, key: &str) -> Option<DType> {
        self.entries.get(key).map(|e| e.dtype)
    }

    /// Loads `key` onto `device` as `dtype`.
    pub fn load(&self, key: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        let entry = self.entries.get(key).ok_or_else(|| self.missing(key))?;
        let read = match self.source.as_ref() {
            Source::Safetensors(files) => files.load(&entry.source, device).map_err(|e| Error::Format {
                path: self.label.clone(),
                message: format!("tensor `{}` could not be read: {e}", entry.source),
            }),
            Source::Pickle(file) => file.load(&entry.source, device),
            Source::Memory(tensors) => {
                Ok(tensors.get(&entry.source).ok_or_else(|| self.missing(key))?.to_device(device)?)
            }
            Source::Recorder(_) | Source::Empty => Err(self.missing(key)),
            Source::Sum { base, offsets } => {
                let mut tensor = base.load(&entry.source, DType::F32, device)?;
                if offsets.contains(&entry.source) {
                    if tensor.rank() >= 2 && entry.shape[1] > tensor.dim(1)? {
                        let extra = entry.shape[1] - tensor.dim(1)?;
                        tensor = tensor.pad_with_zeros(1, 0, extra)?;
                    }
                    tensor = (tensor + offsets.load(&entry.source, DType::F32, device)?)?;
                }
                Ok(tensor)
            }
        };
        let mut tensor = read?;
        for t in &entry.transforms {
            tensor = t.apply(tensor)?;
        }
        Ok(tensor.to_dtype(dtype)?)
    }

    /// The error for a name this store lacks, naming the file key it would be read from.
    pub fn missing(&self, key: &str) -> Error {
        let key = self.source_name.as_ref().and_then(|f| f(key)).unwrap_or_else(|| key.to_string());
        Error::MissingTensor { path: self.label.clone(), key }
    }

    /// The error for `key` having shape `found` where `expected` is needed, naming the file key.
    pub fn shape_mismatch(&self, key: &str, expected: Vec<usize>, found: Vec<usize>) -> Error {
        let key = match self.entries.get(key) {
            Some(e) if e.transforms.is_empty() => e.source.clone(),
            Some(e) => format!("{}` read as `{key}", e.source),
            None => key.to_string(),
        };
        Error::ShapeMismatch { path: self.label.clone(), key, expected, found }
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
    if header_len > 100_000_000 {
        return Err(format_err(format!(
            "safetensors header claims {header_len} bytes (corrupt or not a safetensors file)"
        )));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header).map_err(|e| Error::io(path, e))?;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header).map_err(|e| {
        format_err(format!("safetensors header is not valid JSON ({e}): corrupt or not a safetensors file"))
    })?;
    let data_len = len - 8 - header_len;
    for (name, info) in header.iter().filter(|(name, _)| *name != "__metadata__") {
        let end = info["data_offsets"][1].as_u64().unwrap_or(0);
        if end > data_len {
            return Err(format_err(format!(
                "tensor `{name}` ends at byte {end} of the data section, which has only {data_len} bytes \
                 (truncated file)"
            )));
        }
    }
    Ok(())
}

/// A view into a [`TensorStore`] under a key prefix, loading tensors as one dtype on one device.
#[derive(Clone)]
pub struct Weights {
    store: Arc<TensorStore>,
    prefix: String,
    dtype: DType,
    layer_dtype: DType,
    device: Device,
    /// Where the layers built from this view record themselves (see [`LayerRegistry`]).
    layers: Option<LayerRegistry>,
    /// Where tensors loaded as trainable variables are recorded (see [`Self::trainable`]).
    trainable: Option<TrainableParameters>,
}

/// The variables a model's weights were loaded as by [`Weights::trainable`], by full key, in load
/// order. Clones share one list.
#[derive(Debug, Clone, Default)]
pub struct TrainableParameters(Arc<Mutex<Vec<(String, candle_core::Var)>>>);

impl TrainableParameters {
    /// An empty list.
    pub fn new() -> Self {
        Self::default()
    }

    /// The variables recorded so far, by full key.
    pub fn parameters(&self) -> Vec<(String, candle_core::Var)> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

impl Weights {
    /// A view of the whole `store` for a model run in `dtype` on `device` (see [`precision`]).
    pub fn new(store: Arc<TensorStore>, dtype: DType, device: &Device) -> Self {
        let (dtype, layer_dtype) = precision(dtype, device);
        Self { store, prefix: String::new(), dtype, layer_dtype, device: device.clone(), layers: None, trainable: None }
    }

    /// This view (and every view under it) with its layers recorded in `registry`.
    pub fn with_layer_registry(&self, registry: &LayerRegistry) -> Self {
        Self { layers: Some(registry.clone()), ..self.clone() }
    }

    /// This view (and every view under it) loading each tensor as a trainable variable recorded in
    /// `params` under its full key: a model built from it trains all of its weights (full
    /// fine-tuning, a ControlNet or adapter trained from scratch or from a checkpoint).
    pub fn trainable(&self, params: &TrainableParameters) -> Self {
        Self { trainable: Some(params.clone()), ..self.clone() }
    }

    /// The registry layers built from this view record themselves in, if any.
    pub fn layer_registry(&self) -> Option<&LayerRegistry> {
        self.layers.as_ref()
    }

    /// The key prefix of this view: the module path of what is built from it.
    pub fn prefix(&self) -> &str {
        &self.prefix
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

    /// The dtype Linear and Conv2d weights are kept in (see [`precision`]).
    pub fn layer_dtype(&self) -> DType {
        self.layer_dtype
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

    /// Loads `name` in the compute dtype, checking that its shape is `shape`.
    pub fn get(&self, shape: impl Into<Shape>, name: &str) -> Result<Tensor> {
        self.get_as(shape, name, self.dtype)
    }

    /// Loads the weight `name` of a Linear or Conv2d layer in [`Self::layer_dtype`], checking its shape.
    pub fn get_layer_weight(&self, shape: impl Into<Shape>, name: &str) -> Result<Tensor> {
        self.get_as(shape, name, self.layer_dtype)
    }

    fn get_as(&self, shape: impl Into<Shape>, name: &str, dtype: DType) -> Result<Tensor> {
        let key = self.key(name);
        let expected = shape.into().dims().to_vec();
        if let Source::Recorder(log) = self.store.source.as_ref() {
            log.lock().unwrap_or_else(PoisonError::into_inner).push((key, expected.clone()));
            return Ok(Tensor::zeros((), dtype, &self.device)?.broadcast_as(expected)?);
        }
        match self.store.shape(&key) {
            None => Err(self.store.missing(&key)),
            Some(found) if found != expected.as_slice() => {
                Err(self.store.shape_mismatch(&key, expected, found.to_vec()))
            }
            Some(_) => {
                let tensor = self.store.load(&key, dtype, &self.device)?;
                match &self.trainable {
                    Some(params) => {
                        let var = candle_core::Var::from_tensor(&tensor)?;
                        params.0.lock().unwrap_or_else(PoisonError::into_inner).push((key, var.clone()));
                        Ok(var.as_tensor().clone())
                    }
                    None => Ok(tensor),
                }
            }
        }
    }
}

/// How a model asked to run in `dtype` on `device` is held: the dtype of activations and small
/// parameters, and the dtype of Linear and Conv2d weights. On the CPU, f16 and bf16 keep the layer
/// weights in half precision (half the memory) and activations in f32: bf16 layers multiply with the
/// CPU's bf16 dot products where it has them (AVX512-BF16, [`crate::kernels::bf16_gemm`]), and
/// otherwise the weights are widened to f32 per call, which without native half-precision dot
/// products is faster than half-precision compute, and more accurate. Elsewhere both are `dtype`.
pub fn precision(dtype: DType, device: &Device) -> (DType, DType) {
    match dtype {
        DType::F16 | DType::BF16 if device.is_cpu() => (DType::F32, dtype),
        _ => (dtype, dtype),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::io::model_files::{ModelFiles, SourceOptions};
    use crate::models::clip_text::ClipTextEncoder;
    use crate::models::unet::UNet;
    use crate::models::vae::Vae;

    /// The recorder lists exactly the tensors (names and shapes) of the tiny model's files, CLIP's
    /// `position_ids` buffer aside, its text encoder's keys under the public `text_model.` prefix.
    #[test]
    fn recorder_lists_the_parameters_a_model_loads() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/sd1-tiny");
        let files = ModelFiles::open(&root, &SourceOptions::default()).unwrap();
        let record = |load: &dyn Fn(&Weights) -> Result<()>| {
            let store = Arc::new(TensorStore::recorder());
            load(&Weights::new(store.clone(), DType::F32, &Device::Cpu)).unwrap();
            store.recorded().into_iter().collect::<BTreeMap<_, _>>()
        };
        let stored = |store: &TensorStore| -> BTreeMap<String, Vec<usize>> {
            let named = |k: &str| if k.starts_with("text_model.") { k.to_string() } else { format!("text_model.{k}") };
            let is_text = store.keys().iter().any(|k| k.contains("token_embedding"));
            store
                .keys()
                .into_iter()
                .filter(|k| !k.ends_with("position_ids"))
                .map(|k| (if is_text { named(k) } else { k.to_string() }, store.shape(k).unwrap().to_vec()))
                .collect()
        };
        let unet = record(&|w| UNet::load(w, &files.unet.config).map(drop));
        assert_eq!(unet, stored(&files.unet.weights));
        let vae = record(&|w| Vae::load(w, &files.vae.config).map(drop));
        assert_eq!(vae, stored(&files.vae.weights));
        let text = record(&|w| ClipTextEncoder::load(w, &files.text_encoder.config).map(drop));
        assert_eq!(text, stored(&files.text_encoder.weights));
    }
}
