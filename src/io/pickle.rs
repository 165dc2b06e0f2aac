//! PyTorch checkpoints (`torch.save` zip archives: `.bin`, `.ckpt`, `.pt`, `.pth`), read without running
//! any code from them.
//!
//! candle's pickle reader interprets the opcodes into a value tree and never calls anything. It does
//! accept any global a pickle names, though: before a tensor is taken from the tree, every global in
//! it is checked against the few a tensor state dict uses, so a file that would run code under
//! `torch.load` is refused by name. Nested dicts (IP-Adapter's `image_proj` / `ip_adapter`,
//! embeddings' `string_to_param`) are flattened to dotted names; a Lightning-style `state_dict`
//! wrapper is unwrapped (the training metadata beside it is never interpreted).

use std::collections::HashMap;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use candle_core::pickle::{Object, Stack};
use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;

use crate::{Error, Result};

/// The globals a tensor state dict may name: tensor rebuilders, storage types and OrderedDict.
const ALLOWED_GLOBALS: [(&str, &str); 17] = [
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._tensor", "_rebuild_from_type_v2"),
    ("torch", "Tensor"),
    ("torch.nn.parameter", "Parameter"),
    ("torch", "FloatStorage"),
    ("torch", "DoubleStorage"),
    ("torch", "HalfStorage"),
    ("torch", "BFloat16Storage"),
    ("torch", "ByteStorage"),
    ("torch", "CharStorage"),
    ("torch", "ShortStorage"),
    ("torch", "IntStorage"),
    ("torch", "LongStorage"),
    ("torch", "BoolStorage"),
    ("torch", "UntypedStorage"),
];

/// Where one tensor's elements lie in the memory-mapped archive.
#[derive(Debug, Clone)]
struct Record {
    dtype: DType,
    shape: Vec<usize>,
    /// Element strides as stored.
    stride: Vec<usize>,
    /// Byte offset of the first element in the file.
    offset: usize,
}

/// The tensors of a PyTorch zip checkpoint, memory-mapped.
pub struct PickleTensors {
    path: PathBuf,
    mmap: Mmap,
    records: HashMap<String, Record>,
}

impl PickleTensors {
    /// Reads the tensor index of `path`; no tensor data is read yet.
    pub fn open(path: &Path) -> Result<Self> {
        let err = |message: String| Error::Format { path: path.into(), message };
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: mapped read-only; like every mmap-based loader we rely on the file not being
        // truncated while in use.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let records = read_records(&mmap, &err)?;
        Ok(Self { path: path.to_path_buf(), mmap, records })
    }

    /// Every tensor name with its shape and stored dtype.
    pub fn tensors(&self) -> impl Iterator<Item = (&str, &[usize], DType)> {
        self.records.iter().map(|(k, r)| (k.as_str(), r.shape.as_slice(), r.dtype))
    }

    /// Reads `name` onto `device` in its stored dtype.
    pub fn load(&self, name: &str, device: &Device) -> Result<Tensor> {
        let r =
            self.records.get(name).ok_or_else(|| Error::MissingTensor { path: self.path.clone(), key: name.into() })?;
        let bytes = &self.mmap[r.offset..r.end()];
        let rank = r.shape.len();
        if is_contiguous(&r.shape, &r.stride) {
            return Ok(Tensor::from_raw_buffer(bytes, r.dtype, &r.shape, device)?);
        }
        let reversed: Vec<usize> = r.shape.iter().rev().copied().collect();
        let reversed_stride: Vec<usize> = r.stride.iter().rev().copied().collect();
        if is_contiguous(&reversed, &reversed_stride) {
            // Column-major storage: read transposed, then permute back.
            let t = Tensor::from_raw_buffer(bytes, r.dtype, &reversed, device)?;
            return Ok(t.permute((0..rank).rev().collect::<Vec<_>>())?.contiguous()?);
        }
        Err(Error::Format {
            path: self.path.clone(),
            message: format!(
                "tensor `{name}` has strides {:?} for shape {:?}, which this reader cannot follow",
                r.stride, r.shape
            ),
        })
    }
}

/// Parses the pickle of the archive in `bytes` and locates every tensor's elements in it.
fn read_records(bytes: &[u8], err: &dyn Fn(String) -> Error) -> Result<HashMap<String, Record>> {
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes))
        .map_err(|e| err(format!("not a readable PyTorch zip checkpoint: {e}")))?;
    let pkl = zip
        .file_names()
        .filter_map(|n| n.ok())
        .find(|n| n.ends_with("data.pkl"))
        .map(|n| n.into_owned())
        .ok_or_else(|| err("PyTorch archive without a data.pkl (not a torch.save checkpoint)".into()))?;
    let root = {
        let entry = zip.by_name(&pkl).map_err(|e| err(format!("{pkl}: {e}")))?;
        let mut stack = Stack::empty();
        stack
            .read_loop(&mut BufReader::new(entry))
            .and_then(|()| stack.finalize())
            .map_err(|e| err(format!("unsupported pickle content in {pkl}: {e}")))?
    };
    let tensors = state_dict(root);
    if let Some((module, name)) = first_disallowed_global(&tensors) {
        return Err(err(format!(
            "refusing to read: the pickle calls `{module}.{name}`, which a weights file never needs \
             (torch.load would run it); only tensors and dicts are accepted"
        )));
    }
    let dir = Path::new(pkl.strip_suffix(".pkl").unwrap_or(&pkl)).to_path_buf();
    let mut records = HashMap::new();
    let mut storages: HashMap<String, (usize, usize)> = HashMap::new();
    for (name, value) in flatten(tensors) {
        let info = match value.into_tensor_info(Object::Unicode(name.clone()), &dir) {
            Ok(Some(info)) => info,
            Ok(None) => continue,
            Err(e) => return Err(err(format!("tensor `{name}` cannot be read: {e}"))),
        };
        if !storages.contains_key(&info.path) {
            let entry = zip.by_name(&info.path).map_err(|e| err(format!("tensor `{name}`: {e}")))?;
            if entry.compression() != zip::CompressionMethod::Stored {
                return Err(err(format!("tensor `{name}` is stored compressed, which torch.save never does")));
            }
            let start = entry.data_start().unwrap_or(u64::MAX) as usize;
            storages.insert(info.path.clone(), (start, entry.size() as usize));
        }
        let (start, len) = storages[&info.path];
        let record = Record {
            dtype: info.dtype,
            shape: info.layout.dims().to_vec(),
            stride: info.layout.stride().to_vec(),
            offset: start.saturating_add(info.layout.start_offset()),
        };
        let end = record.end();
        if start.saturating_add(len) > bytes.len() || end > start + len {
            return Err(err(format!(
                "tensor `{name}` {:?} needs bytes {}..{} of its storage `{}`, which holds {len} (truncated or \
                 corrupt file)",
                record.shape,
                record.offset - start,
                end - start,
                info.path
            )));
        }
        records.insert(name, record);
    }
    Ok(records)
}

impl Record {
    /// One past the last byte the tensor reads.
    fn end(&self) -> usize {
        let last: usize = self.shape.iter().zip(&self.stride).map(|(&d, &s)| d.saturating_sub(1) * s).sum();
        let count = if self.shape.contains(&0) { 0 } else { last + 1 };
        self.offset.saturating_add(count * self.dtype.size_in_bytes())
    }
}

fn is_contiguous(shape: &[usize], stride: &[usize]) -> bool {
    let mut expected = 1;
    for (&d, &s) in shape.iter().zip(stride).rev() {
        if d > 1 && s != expected {
            return false;
        }
        expected *= d;
    }
    true
}

/// The object holding the tensors: the `state_dict` entry of a training checkpoint, or the root.
fn state_dict(root: Object) -> Object {
    match root {
        Object::Dict(entries) if entries.iter().any(|(k, v)| is_state_dict_entry(k, v)) => {
            entries.into_iter().find(|(k, v)| is_state_dict_entry(k, v)).map(|(_, v)| v).expect("checked above")
        }
        other => other,
    }
}

fn is_state_dict_entry(key: &Object, value: &Object) -> bool {
    *key == Object::Unicode("state_dict".into()) && matches!(value, Object::Dict(_))
}

/// The first global named anywhere in `obj` that a state dict never needs.
fn first_disallowed_global(obj: &Object) -> Option<(String, String)> {
    let mut todo = vec![obj];
    while let Some(o) = todo.pop() {
        match o {
            Object::Class { module_name, class_name }
                if !ALLOWED_GLOBALS.contains(&(module_name.as_str(), class_name.as_str())) =>
            {
                return Some((module_name.clone(), class_name.clone()));
            }
            Object::Tuple(items) | Object::List(items) => todo.extend(items),
            Object::Dict(entries) => todo.extend(entries.iter().flat_map(|(k, v)| [k, v])),
            Object::Reduce { callable, args } | Object::Build { callable, args } => {
                todo.push(callable);
                todo.push(args);
            }
            Object::PersistentLoad(inner) => todo.push(inner),
            _ => {}
        }
    }
    None
}

/// Dict entries with string (or integer) keys, nested dicts flattened to dotted names.
fn flatten(obj: Object) -> Vec<(String, Object)> {
    let mut out = Vec::new();
    let mut todo = vec![(String::new(), obj)];
    while let Some((prefix, o)) = todo.pop() {
        let Object::Dict(entries) = o else {
            if !prefix.is_empty() {
                out.push((prefix, o));
            }
            continue;
        };
        for (k, v) in entries {
            let key = match k {
                Object::Unicode(s) => s,
                Object::Int(i) => i.to_string(),
                Object::Long(i) => i.to_string(),
                _ => continue,
            };
            todo.push((if prefix.is_empty() { key } else { format!("{prefix}.{key}") }, v));
        }
    }
    out
}
