//! Reading and writing the files users have: configs, weights, images and latents.

pub mod diffusers_folder;
pub mod image;
pub mod latents;
pub mod weights;

use std::path::Path;

use serde::de::DeserializeOwned;

use crate::{Error, Result};

/// Reads and parses a JSON file, naming the file (and line/column) in errors.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::config(path, format!("invalid JSON config: {e}")))
}

/// Writes a file atomically: the bytes go to a temporary file beside `path`, renamed over it only
/// once complete, so a failure never leaves a partial output behind.
pub fn write_atomic(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        return Err(Error::invalid(format!("{}: output directory {} does not exist", path.display(), dir.display())));
    }
    let name = path.file_name().ok_or_else(|| Error::invalid(format!("{}: not a file path", path.display())))?;
    let tmp = dir.join(format!(".{}.{}.tmp", name.to_string_lossy(), std::process::id()));
    let result = write(&tmp).and_then(|()| std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e)));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
