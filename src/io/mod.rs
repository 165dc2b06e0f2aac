//! Reading and writing the files users have: configs, weights, images and latents.

pub mod convert;
pub mod default_model;
pub mod diffusers_folder;
pub mod identify;
pub mod image;
pub mod input;
pub mod latents;
pub mod ldm;
pub mod mapped_safetensors;
pub mod model_files;
pub mod npy;
pub mod original_controlnet;
pub mod original_t2i_adapter;
pub mod output;
pub mod pickle;
pub mod single_file;
pub mod svg;
pub mod uni_controlnet;
pub mod vae_file;
pub mod weights;

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

use crate::{Error, Result};

/// Reads and parses a JSON file (a regular file of at most [`input::MAX_JSON_BYTES`]), naming the
/// file (and line/column) in errors.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = read_text(path)?;
    parse_json(&text).map_err(|e| Error::config(path, format!("invalid JSON config: {e}")))
}

/// Reads a UTF-8 text file (configs, merges; a regular file of at most
/// [`input::MAX_JSON_BYTES`]), naming the file in errors.
pub fn read_text(path: &Path) -> Result<String> {
    let bytes = input::read_limited(path, input::MAX_JSON_BYTES)?;
    String::from_utf8(bytes).map_err(|e| Error::config(path, format!("not UTF-8 text: {e}")))
}

/// The entries of the folder `dir`, sorted by path, naming the folder in errors.
pub fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut entries = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .map(|e| e.map(|e| e.path()).map_err(|e| Error::io(dir, e)))
        .collect::<Result<Vec<_>>>()?;
    entries.sort();
    Ok(entries)
}

/// Parses JSON as Python's `json` module writes it: configs saved by diffusers may hold the bare
/// literals `Infinity`, `-Infinity` and `NaN` (e.g. `"lambda_min_clipped": -Infinity`), which are
/// read as the largest finite magnitudes and null.
pub fn parse_json<T: DeserializeOwned>(text: &str) -> serde_json::Result<T> {
    serde_json::from_str(&replace_non_finite_literals(text))
}

fn replace_non_finite_literals(text: &str) -> std::borrow::Cow<'_, str> {
    if !(text.contains("Infinity") || text.contains("NaN")) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let (mut in_string, mut escaped) = (false, false);
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_string {
            in_string = escaped || c != '"';
            escaped = !escaped && c == '\\';
        } else if c == '"' {
            in_string = true;
        } else {
            let replaced =
                [("-Infinity", "-1.7976931348623157e308"), ("Infinity", "1.7976931348623157e308"), ("NaN", "null")]
                    .into_iter()
                    .find(|(literal, _)| rest.starts_with(literal));
            if let Some((literal, value)) = replaced {
                out.push_str(value);
                rest = &rest[literal.len()..];
                continue;
            }
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::parse_json;

    #[test]
    fn python_non_finite_literals_parse_outside_strings_only() {
        let v: serde_json::Value =
            parse_json(r#"{"a": -Infinity, "b": Infinity, "c": NaN, "d": "NaN -Infinity \" Infinity"}"#).unwrap();
        assert_eq!(v["a"].as_f64(), Some(f64::MIN));
        assert_eq!(v["b"].as_f64(), Some(f64::MAX));
        assert!(v["c"].is_null());
        assert_eq!(v["d"], "NaN -Infinity \" Infinity");
    }
}
