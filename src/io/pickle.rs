//! PyTorch checkpoints (`torch.save` zip archives: `.bin`, `.ckpt`, `.pt`, `.pth`), read without running
//! any code from them.
//!
//! The archive's `data.pkl` is read by our own pickle machine ([`vm`]), which builds plain values and
//! never calls anything. Every global the pickle names is checked against [`ALLOWED_GLOBALS`] (the
//! tensor rebuilders, storage types, tensor classes and OrderedDict a state dict uses) as soon as it
//! is named, wherever it stands: a file that names anything else (`posix.system`, `builtins.eval`…)
//! is refused by name, even when the name sits beside the weights or is left unused on the stack.
//! Nested dicts (IP-Adapter's `image_proj` / `ip_adapter`, embeddings' `string_to_param`) are
//! flattened to dotted names; a Lightning-style `state_dict` wrapper is unwrapped (the training
//! metadata beside it is parsed, so its globals are checked, but never interpreted).
//!
//! Hostile files are refused with one clear error, never a panic, an out-of-bounds read or an
//! unbounded allocation: every length in the pickle is checked against the bytes left, values are
//! shared (never copied) and built iteratively, nesting is limited to [`MAX_DEPTH`] levels, the
//! objects built to [`MAX_OBJECTS`] and the pickle itself to [`MAX_PICKLE_BYTES`]; every storage
//! size, tensor shape, stride and offset is checked with checked arithmetic against the bytes the
//! archive holds before anything is read. [`fuzz_parse`] is the fuzzing entry point.

mod vm;

use std::collections::HashMap;
use std::io::Cursor;
use std::ops::Range;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use zip::read::{ArchiveOffset, Config};

pub use vm::{ALLOWED_GLOBALS, MAX_DEPTH, MAX_OBJECTS, MAX_RANK};

use crate::{Error, Result};

/// The largest `data.pkl` read. The tensor data lies beside the pickle, so even a large training
/// checkpoint's pickle is a few megabytes.
pub const MAX_PICKLE_BYTES: usize = 64 << 20;

/// Where one tensor's elements lie in the archive, checked against it.
#[derive(Debug, Clone)]
struct Record {
    dtype: DType,
    shape: Vec<usize>,
    /// Element strides as stored.
    stride: Vec<usize>,
    /// Byte offset of the first element in the file.
    offset: usize,
    /// Elements of the tensor (the product of `shape`); `numel * dtype size` bytes from `offset`
    /// hold them when the strides are row- or column-major.
    numel: usize,
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
        load_record(&self.mmap, name, r, device, &|message| Error::Format { path: self.path.clone(), message })
    }
}

/// The fuzzing target for this module: reads `bytes` both as a bare `data.pkl` pickle stream (its
/// tensors listed as for a state dict) and as a whole `torch.save` zip archive (every tensor it
/// lists loaded onto the CPU), and returns the number of tensors each found, or its error. It never
/// panics, reads out of bounds, recurses with the input or allocates beyond the limits above (nor
/// more than the tensor bytes `bytes` holds), whatever `bytes` are; a crash it finds is a bug.
pub fn fuzz_parse(bytes: &[u8]) -> (Result<usize>, Result<usize>) {
    let err = |message: String| Error::Format { path: "<fuzz input>".into(), message };
    let pickle = parse_tensors(bytes, "data.pkl", &err).map(|(_, tensors)| tensors.len());
    let archive = read_records(bytes, &err).and_then(|records| {
        for (name, record) in &records {
            load_record(bytes, name, record, &Device::Cpu, &err)?;
        }
        Ok(records.len())
    });
    (pickle, archive)
}

/// Parses a `data.pkl` and lists its state dict's tensors, not yet checked against an archive.
fn parse_tensors(
    bytes: &[u8],
    pkl: &str,
    err: &dyn Fn(String) -> Error,
) -> Result<(vm::Pickle, Vec<(String, vm::TensorRef)>)> {
    let pkl = vm::shown(pkl);
    if bytes.len() > MAX_PICKLE_BYTES {
        return Err(err(format!(
            "{pkl} is {} bytes, more than the {MAX_PICKLE_BYTES} this reader accepts for a weights file's pickle \
             (the tensor data is stored beside it)",
            bytes.len()
        )));
    }
    let pickle = vm::parse(bytes).map_err(|e| err(format!("{pkl}: {e}")))?;
    // Walking the values: each dict entry once per reference, within a budget a state dict never
    // needs (shared references can make a small pickle's dicts exponentially large).
    let limits = vm::WalkLimits {
        entries: pickle.len().saturating_mul(2).saturating_add(1024),
        name_bytes: bytes.len().saturating_mul(16).saturating_add(1 << 20),
    };
    let tensors = pickle.tensors(&limits).map_err(|e| err(format!("{pkl}: {e}")))?;
    Ok((pickle, tensors))
}

/// A `torch.save` zip archive over `bytes`.
struct Archive<'a> {
    bytes: &'a [u8],
    zip: zip::ZipArchive<Cursor<&'a [u8]>>,
}

impl<'a> Archive<'a> {
    fn open(bytes: &'a [u8]) -> std::result::Result<Self, String> {
        // The archive starts at byte 0, as torch's reader (miniz) assumes. The zip crate's default,
        // `ArchiveOffset::Detect`, guesses the central directory's start as `EOCD - directory size`,
        // which ignores the ZIP64 end records torch always writes between the two (76 bytes); when
        // the first central entry is exactly 76 bytes long (46 + its name: `<folder>/data.pkl` with
        // a 21-character folder) a second entry starts there, the guess "succeeds" 76 bytes late
        // and the last entry is read from the ZIP64 record: "Invalid Central Directory header".
        let config = Config { archive_offset: ArchiveOffset::Known(0) };
        let zip = zip::ZipArchive::with_config(config, Cursor::new(bytes)).map_err(|e| e.to_string())?;
        Ok(Self { bytes, zip })
    }

    /// The name of the archive's `data.pkl`.
    fn pickle_name(&self) -> Option<String> {
        self.zip
            .file_names()
            .filter_map(|n| n.ok())
            .find(|n| *n == "data.pkl" || n.ends_with("/data.pkl"))
            .map(|n| n.into_owned())
    }

    /// The bytes of entry `name` in the archive (`None` if absent), which must be stored
    /// uncompressed as torch.save does, and lie within the file.
    fn entry(&mut self, name: &str) -> std::result::Result<Option<Range<usize>>, String> {
        let Some(index) = self.zip.index_for_name(name) else {
            return Ok(None);
        };
        let name = vm::shown(name);
        let file = self.zip.by_index_raw(index).map_err(|e| format!("`{name}`: {e}"))?;
        if file.encrypted() {
            return Err(format!("`{name}` is encrypted, which torch.save never does"));
        }
        if file.compression() != zip::CompressionMethod::Stored {
            return Err(format!("`{name}` is stored compressed, which torch.save never does"));
        }
        let size = file.compressed_size();
        if file.size() != size {
            return Err(format!("`{name}` is stored with {size} bytes but claims {} uncompressed", file.size()));
        }
        let start = file.data_start().ok_or_else(|| format!("`{name}`: its data start is unknown"))?;
        let range = start
            .checked_add(size)
            .filter(|&end| end <= self.bytes.len() as u64)
            .and_then(|end| Some(usize::try_from(start).ok()?..usize::try_from(end).ok()?));
        match range {
            Some(range) => Ok(Some(range)),
            None => Err(format!(
                "`{name}` claims {size} bytes from byte {start}, past the end of the file ({} bytes; truncated?)",
                self.bytes.len()
            )),
        }
    }
}

/// Parses the pickle of the archive in `bytes` and locates every tensor's elements in it.
fn read_records(bytes: &[u8], err: &dyn Fn(String) -> Error) -> Result<HashMap<String, Record>> {
    let zip_err = |e: String| err(format!("not a readable PyTorch zip checkpoint: {e}"));
    let mut archive = Archive::open(bytes).map_err(zip_err)?;
    let pkl = archive
        .pickle_name()
        .ok_or_else(|| err("PyTorch archive without a data.pkl (not a torch.save checkpoint)".into()))?;
    let prefix = pkl.strip_suffix("data.pkl").unwrap_or_default().to_string();
    if let Some(range) = archive.entry(&format!("{prefix}byteorder")).map_err(zip_err)? {
        let order = bytes.get(range).unwrap_or_default();
        if order != b"little" {
            return Err(err(format!(
                "the archive's tensors are stored in byte order {:?}; only little-endian files are read",
                String::from_utf8_lossy(order.get(..order.len().min(16)).unwrap_or_default())
            )));
        }
    }
    let pkl_range =
        archive.entry(&pkl).map_err(zip_err)?.ok_or_else(|| zip_err(format!("`{}` is missing", vm::shown(&pkl))))?;
    let (pickle, tensors) = parse_tensors(bytes.get(pkl_range).unwrap_or_default(), &pkl, err)?;

    let mut records = HashMap::new();
    // Storage key value -> the storage's bytes in the file.
    let mut storages: HashMap<u32, Range<usize>> = HashMap::new();
    for (name, t) in tensors {
        let key = pickle.storage_key(t.key);
        let path = format!("{prefix}data/{key}");
        let storage = match storages.get(&t.key) {
            Some(range) => range.clone(),
            None => {
                let shown = || (vm::shown(&name), vm::shown(&path));
                let range = archive.entry(&path).map_err(|e| err(format!("tensor `{}`: {e}", shown().0)))?.ok_or_else(
                    || {
                        let (name, path) = shown();
                        err(format!("tensor `{name}`: its storage `{path}` is missing from the archive"))
                    },
                )?;
                storages.insert(t.key, range.clone());
                range
            }
        };
        let record = check_tensor(&name, &path, &t, storage).map_err(err)?;
        records.insert(name, record);
    }
    Ok(records)
}

/// Checks that tensor `name` lies within its storage (bytes `storage` of the file), with checked
/// arithmetic on every size from the file.
fn check_tensor(
    name: &str,
    path: &str,
    t: &vm::TensorRef,
    storage: Range<usize>,
) -> std::result::Result<Record, String> {
    let (name, path) = (vm::shown(name), vm::shown(path));
    let Some(dtype) = t.dtype else {
        return Err(format!(
            "tensor `{name}` has storage type `{}`, which this reader does not support",
            t.storage_type
        ));
    };
    let size = dtype.size_in_bytes();
    let usize_of = |v: u64, what: &str| {
        usize::try_from(v).map_err(|_| format!("tensor `{name}`: its {what} {v} does not fit this machine"))
    };
    let storage_numel = usize_of(t.storage_numel, "storage element count")?;
    let storage_len = storage.len();
    let storage_bytes = storage_numel.checked_mul(size).ok_or_else(|| {
        format!("tensor `{name}`: its storage `{path}` declares {storage_numel} elements of {dtype:?}, which overflows")
    })?;
    if storage_bytes > storage_len {
        return Err(format!(
            "tensor `{name}`: its storage `{path}` declares {storage_numel} elements of {dtype:?} ({storage_bytes} \
             bytes) but holds {storage_len} bytes (truncated or corrupt file)"
        ));
    }
    let shape = t.shape.iter().map(|&d| usize_of(d, "dimension")).collect::<std::result::Result<Vec<_>, _>>()?;
    let stride = t.stride.iter().map(|&s| usize_of(s, "stride")).collect::<std::result::Result<Vec<_>, _>>()?;
    let numel = shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .filter(|n| n.checked_mul(size).is_some_and(|b| b <= isize::MAX as usize))
        .ok_or_else(|| format!("tensor `{name}` has shape {shape:?}, whose size overflows"))?;
    let mut offset = storage.start;
    if numel > 0 {
        // The last element read, offset + Σ (d - 1)·s, must lie in the storage.
        match last_element(t.offset, &t.shape, &t.stride) {
            Some(last) if last < t.storage_numel => {}
            _ => {
                return Err(format!(
                    "tensor `{name}` {shape:?} (strides {stride:?}) at element offset {} reads past the end of its \
                     storage `{path}`, which holds {storage_numel} elements (corrupt file)",
                    t.offset
                ));
            }
        }
        // offset < storage_numel, so offset·size < storage_bytes fits.
        let skip = usize_of(t.offset, "storage offset")?.checked_mul(size);
        offset = skip.and_then(|b| storage.start.checked_add(b)).ok_or("internal error: offset")?;
    }
    Ok(Record { dtype, shape, stride, offset, numel })
}

/// The element index `offset + Σ (d - 1)·s` of a non-empty tensor's last element; `None` on overflow.
fn last_element(offset: u64, shape: &[u64], stride: &[u64]) -> Option<u64> {
    let mut last = offset;
    for (&d, &s) in shape.iter().zip(stride) {
        last = last.checked_add(d.checked_sub(1)?.checked_mul(s)?)?;
    }
    Some(last)
}

/// Reads the elements of `r` from `bytes` (the archive) onto `device`.
fn load_record(bytes: &[u8], name: &str, r: &Record, device: &Device, err: &dyn Fn(String) -> Error) -> Result<Tensor> {
    let len = r.numel.checked_mul(r.dtype.size_in_bytes());
    let data = len.and_then(|len| bytes.get(r.offset..r.offset.checked_add(len)?));
    let Some(data) = data else {
        return Err(err(format!("tensor `{name}` lies past the end of the file (truncated?)")));
    };
    let rank = r.shape.len();
    if r.numel == 0 || is_contiguous(&r.shape, &r.stride) {
        return Ok(Tensor::from_raw_buffer(data, r.dtype, &r.shape, device)?);
    }
    let reversed: Vec<usize> = r.shape.iter().rev().copied().collect();
    let reversed_stride: Vec<usize> = r.stride.iter().rev().copied().collect();
    if is_contiguous(&reversed, &reversed_stride) {
        // Column-major storage: read transposed, then permute back.
        let t = Tensor::from_raw_buffer(data, r.dtype, &reversed, device)?;
        return Ok(t.permute((0..rank).rev().collect::<Vec<_>>())?.contiguous()?);
    }
    Err(err(format!(
        "tensor `{name}` has strides {:?} for shape {:?}, which this reader cannot follow",
        r.stride, r.shape
    )))
}

fn is_contiguous(shape: &[usize], stride: &[usize]) -> bool {
    let mut expected = 1usize;
    for (&d, &s) in shape.iter().zip(stride).rev() {
        if d > 1 && s != expected {
            return false;
        }
        expected = expected.saturating_mul(d);
    }
    true
}
