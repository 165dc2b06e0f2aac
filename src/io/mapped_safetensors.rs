//! Memory-mapped safetensors files whose pages leave the process as soon as a tensor is copied out.
//!
//! candle tensors own their memory, so loading copies every tensor out of the mapping. With a plain
//! mapping the file pages read so far stay resident too, and the peak memory of loading a model is
//! twice its weights. Here each tensor's pages are released (`MADV_DONTNEED`; the kernel keeps them
//! in its page cache, outside the process) right after the copy.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use safetensors::SafeTensors;

/// Where one tensor lies: its file, dtype, shape and byte range in the mapping.
#[derive(Debug, Clone)]
pub struct TensorLocation {
    file: usize,
    /// The stored dtype.
    pub dtype: DType,
    /// The stored shape.
    pub shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// The tensors of one or more safetensors files (shards), mapped read-only.
pub struct MappedSafetensors {
    maps: Vec<Mmap>,
    tensors: HashMap<String, TensorLocation>,
}

impl MappedSafetensors {
    /// Maps `paths` and reads their headers; errors are strings for the caller to attach the path to.
    /// Only regular files are mapped; a header that names a tensor twice, or a tensor named by two
    /// shards, is refused (the safetensors crate keeps the last silently).
    ///
    /// # Safety
    /// The files must not be modified or truncated while the mapping is in use (as for every mmap
    /// based loader).
    pub unsafe fn open(paths: &[PathBuf]) -> Result<Self, (PathBuf, String)> {
        let mut maps = Vec::with_capacity(paths.len());
        let mut tensors: HashMap<String, TensorLocation> = HashMap::new();
        for (i, path) in paths.iter().enumerate() {
            let fail = |e: &dyn std::fmt::Display| (path.clone(), e.to_string());
            let (file, _) = super::input::open_regular_file(path).map_err(|e| fail(&e))?;
            // SAFETY: forwarded to the caller (see above).
            let map = unsafe { Mmap::map(&file) }.map_err(|e| fail(&e))?;
            check_header(&map).map_err(|e| fail(&e))?;
            let (header_len, metadata) = SafeTensors::read_metadata(&map).map_err(|e| fail(&e))?;
            let data_start = header_len.checked_add(8).ok_or_else(|| fail(&"header length overflows"))?;
            for (name, info) in metadata.tensors() {
                let dtype = DType::try_from(info.dtype).map_err(|e| fail(&format!("tensor `{name}`: {e}")))?;
                let (start, end) =
                    match (data_start.checked_add(info.data_offsets.0), data_start.checked_add(info.data_offsets.1)) {
                        (Some(start), Some(end)) if start <= end && end <= map.len() => (start, end),
                        _ => {
                            return Err(fail(&format!(
                                "tensor `{name}`: data offsets {:?} lie outside the file",
                                info.data_offsets
                            )));
                        }
                    };
                if let Some(other) = tensors.get(&name) {
                    return Err(fail(&format!(
                        "tensor `{name}` is also in {} (a tensor may be in one shard only)",
                        paths[other.file].display()
                    )));
                }
                let location = TensorLocation { file: i, dtype, shape: info.shape.clone(), start, end };
                tensors.insert(name, location);
            }
            maps.push(map);
        }
        Ok(Self { maps, tensors })
    }

    /// Every tensor with where it lies.
    pub fn tensors(&self) -> impl Iterator<Item = (&str, &TensorLocation)> {
        self.tensors.iter().map(|(name, loc)| (name.as_str(), loc))
    }

    /// Copies `name` onto `device` in its stored dtype and releases its pages from the process.
    pub fn load(&self, name: &str, device: &Device) -> candle_core::Result<Tensor> {
        let loc = self.tensors.get(name).ok_or_else(|| candle_core::Error::Msg(format!("no tensor `{name}`")))?;
        let map = &self.maps[loc.file];
        let tensor = Tensor::from_raw_buffer(&map[loc.start..loc.end], loc.dtype, &loc.shape, device)?;
        release(map, loc.start, loc.end);
        Ok(tensor)
    }
}

/// Checks a safetensors file's header before the safetensors crate reads it: the declared header
/// length against the bytes present (checked arithmetic) and that no key repeats (the crate's JSON
/// parsing keeps the last of repeated keys, so one tensor name could silently shadow another).
pub fn check_header(bytes: &[u8]) -> Result<(), String> {
    let Some(len_field) = bytes.get(..8) else {
        return Err(format!("file is {} bytes, too short for a safetensors header", bytes.len()));
    };
    let header_len = u64::from_le_bytes(len_field.try_into().expect("8 bytes"));
    let available = bytes.len() - 8;
    let header = usize::try_from(header_len)
        .ok()
        .and_then(|n| n.checked_add(8))
        .and_then(|end| bytes.get(8..end))
        .ok_or_else(|| {
            format!(
                "safetensors header claims {header_len} bytes but the file has only {available} after the length field"
            )
        })?;
    super::input::check_unique_keys(header).map_err(|e| format!("safetensors header: {e}"))
}

/// Drops the pages holding `start..end` from the process's resident set; they are read from the
/// file again if touched (a page shared with the next tensor, say). Failure only costs memory, so
/// it is ignored.
fn release(map: &Mmap, start: usize, end: usize) {
    #[cfg(unix)]
    // SAFETY: the mapping is a read-only file mapping: dropped pages are re-read from the file on
    // the next access, so no data changes under any reference into it.
    let _ = unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start) };
    #[cfg(not(unix))]
    let _ = (map, start, end);
}
