//! Reading input files that may be hostile: only regular files are opened (a FIFO, a device such as
//! `/dev/zero`, a socket or a directory is refused with an error saying what it is, and opening never
//! blocks), reads are bounded by a size limit stated in the error, and JSON objects (safetensors
//! headers) may not repeat a key.

use std::collections::HashSet;
use std::fmt;
use std::fs::{File, FileType, OpenOptions};
use std::io::Read;
use std::path::Path;

use serde::de::{Deserialize, Deserializer, Error as _, MapAccess, SeqAccess, Visitor};

use crate::{Error, Result};

/// JSON files (configs, tokenizer vocabularies, keypoints, shard indexes).
pub const MAX_JSON_BYTES: u64 = 64 << 20;
/// `--init-latents` files.
pub const MAX_LATENTS_BYTES: u64 = 256 << 20;
/// Embedding files (`--ip-face-embedding`, `--ip-image-embeds`).
pub const MAX_EMBEDDING_BYTES: u64 = 256 << 20;
/// Encoded image files (the decoded size has its own limits, see [`crate::io::image`]).
pub const MAX_IMAGE_FILE_BYTES: u64 = 256 << 20;

/// Why a file could not be opened as an input.
#[derive(Debug)]
pub enum OpenError {
    /// The open or stat failed.
    Io(std::io::Error),
    /// The path is not a regular file; what it is ("a FIFO (named pipe)", ...).
    NotRegular(&'static str),
}

impl fmt::Display for OpenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OpenError::Io(e) => e.fmt(f),
            OpenError::NotRegular(kind) => write!(f, "is {kind}, expected a regular file"),
        }
    }
}

/// What a file type is, for messages: "a directory", "a FIFO (named pipe)", ...
pub fn describe(file_type: &FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if file_type.is_fifo() {
            return "a FIFO (named pipe)";
        }
        if file_type.is_char_device() {
            return "a character device";
        }
        if file_type.is_block_device() {
            return "a block device";
        }
        if file_type.is_socket() {
            return "a socket";
        }
    }
    if file_type.is_dir() {
        "a directory"
    } else if file_type.is_symlink() {
        "a symbolic link"
    } else if file_type.is_file() {
        "a regular file"
    } else {
        "not a regular file"
    }
}

/// Opens `path` for reading if it is a regular file (after following symlinks) and returns it with
/// its size. Anything else is refused without blocking: the type is checked before opening, the file
/// is opened non-blocking (a FIFO swapped in meanwhile does not wait for a writer) and the opened
/// handle is checked again.
pub fn open_regular_file(path: &Path) -> std::result::Result<(File, u64), OpenError> {
    let meta = std::fs::metadata(path).map_err(OpenError::Io)?;
    if !meta.is_file() {
        return Err(OpenError::NotRegular(describe(&meta.file_type())));
    }
    let mut options = OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY);
    }
    let file = options.open(path).map_err(OpenError::Io)?;
    let meta = file.metadata().map_err(OpenError::Io)?;
    if !meta.is_file() {
        return Err(OpenError::NotRegular(describe(&meta.file_type())));
    }
    Ok((file, meta.len()))
}

/// [`open_regular_file`] with errors naming `path`.
pub fn open_regular(path: &Path) -> Result<(File, u64)> {
    open_regular_file(path).map_err(|e| match e {
        OpenError::Io(cause) => Error::io(path, cause),
        e @ OpenError::NotRegular(_) => Error::Format { path: path.into(), message: e.to_string() },
    })
}

/// A byte count for messages: "64 MiB", "1.5 GiB", "300 bytes".
pub fn format_bytes(n: u64) -> String {
    const UNITS: [(u64, &str); 3] = [(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
    for (size, unit) in UNITS {
        if n >= size {
            return if n.is_multiple_of(size) {
                format!("{} {unit}", n / size)
            } else {
                format!("{:.1} {unit}", n as f64 / size as f64)
            };
        }
    }
    format!("{n} bytes")
}

/// The error for an input over its size limit.
pub fn too_large(path: &Path, size: u64, max_bytes: u64) -> Error {
    Error::Format {
        path: path.into(),
        message: format!(
            "file is {} ({size} bytes), over the limit of {} for this kind of input",
            format_bytes(size),
            format_bytes(max_bytes)
        ),
    }
}

/// Reads the regular file `path` whole, refusing one over `max_bytes` (also one that grows past it
/// while being read).
pub fn read_limited(path: &Path, max_bytes: u64) -> Result<Vec<u8>> {
    let (file, len) = open_regular(path)?;
    if len > max_bytes {
        return Err(too_large(path, len, max_bytes));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(max_bytes.saturating_add(1)).read_to_end(&mut bytes).map_err(|e| Error::io(path, e))?;
    if bytes.len() as u64 > max_bytes {
        return Err(too_large(path, bytes.len() as u64, max_bytes));
    }
    Ok(bytes)
}

/// Checks that no JSON object in `json` (at any depth) repeats a key: serde_json, and the parsers
/// built on it, silently keep the last of repeated keys.
pub fn check_unique_keys(json: &[u8]) -> std::result::Result<(), String> {
    serde_json::from_slice::<UniqueKeys>(json).map(|_| ()).map_err(|e| e.to_string())
}

/// Any JSON value whose objects have unique keys.
struct UniqueKeys;

impl<'de> Deserialize<'de> for UniqueKeys {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        deserializer.deserialize_any(UniqueKeysVisitor)
    }
}

struct UniqueKeysVisitor;

impl<'de> Visitor<'de> for UniqueKeysVisitor {
    type Value = UniqueKeys;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> std::result::Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }

    fn visit_i64<E>(self, _: i64) -> std::result::Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }

    fn visit_u64<E>(self, _: u64) -> std::result::Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }

    fn visit_f64<E>(self, _: f64) -> std::result::Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }

    fn visit_str<E>(self, _: &str) -> std::result::Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }

    fn visit_unit<E>(self) -> std::result::Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }

    fn visit_none<E>(self) -> std::result::Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<UniqueKeys, A::Error> {
        while seq.next_element::<UniqueKeys>()?.is_some() {}
        Ok(UniqueKeys)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<UniqueKeys, A::Error> {
        let mut seen = HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if seen.contains(&key) {
                return Err(A::Error::custom(format!("duplicate key `{key}`")));
            }
            map.next_value::<UniqueKeys>()?;
            seen.insert(key);
        }
        Ok(UniqueKeys)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicate_keys_are_found_at_any_depth() {
        assert!(check_unique_keys(br#"{"a": 1, "b": {"c": [1, {"d": 2}]}}"#).is_ok());
        let err = check_unique_keys(br#"{"a": 1, "a": 2}"#).unwrap_err();
        assert!(err.contains("duplicate key `a`"), "{err}");
        let err = check_unique_keys(br#"{"x": {"b": [{"k": 1, "k": 1}]}}"#).unwrap_err();
        assert!(err.contains("duplicate key `k`"), "{err}");
        assert!(check_unique_keys(b"{not json").is_err());
    }

    #[test]
    fn only_regular_files_are_opened_and_sizes_are_limited() {
        let dir = tempfile::tempdir().unwrap();
        let err = open_regular(dir.path()).unwrap_err().to_string();
        assert!(err.contains("is a directory, expected a regular file"), "{err}");
        #[cfg(unix)]
        {
            let err = read_limited(Path::new("/dev/zero"), 10).unwrap_err().to_string();
            assert!(err.contains("/dev/zero: is a character device"), "{err}");
        }
        let file = dir.path().join("f");
        std::fs::write(&file, [7u8; 100]).unwrap();
        assert_eq!(read_limited(&file, 100).unwrap().len(), 100);
        let err = read_limited(&file, 99).unwrap_err().to_string();
        assert!(err.contains("over the limit of 99 bytes"), "{err}");
        assert_eq!(format_bytes(64 << 20), "64 MiB");
        assert_eq!(format_bytes(3 << 29), "1.5 GiB");
    }
}
