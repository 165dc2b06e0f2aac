//! Images in requests: raw base64 or data URLs (PNG, JPEG, WebP-less), decoded and checked
//! within the size limits before anything is stored, then written as PNG into the job's folder.

use std::path::Path;

use base64::Engine as _;

use crate::io::image::{MAX_IMAGE_ALLOC, MAX_IMAGE_SIDE};

/// Standard base64 of `bytes` (how every image leaves the server).
pub fn encode_base64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The bytes of base64 text: raw (padding optional, whitespace ignored) or a `data:...;base64,`
/// URL; `what` names it in errors.
pub fn decode_base64_bytes(text: &str, what: &str) -> Result<Vec<u8>, String> {
    let payload = match text.trim().strip_prefix("data:") {
        Some(rest) => {
            rest.split_once(',').map(|(_, data)| data).ok_or_else(|| format!("{what}: a data URL without data"))?
        }
        None => text.trim(),
    };
    let cleaned: String = payload.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(cleaned.trim_end_matches('='))
        .map_err(|e| format!("{what}: not valid base64 ({e})"))
}

/// Decodes a base64 image (optionally a `data:image/...;base64,` URL); `what` names it in errors.
pub fn decode_base64(text: &str, what: &str, max_pixels: u64) -> Result<image::DynamicImage, String> {
    decode_bytes(&decode_base64_bytes(text, what)?, what, max_pixels)
}

/// Decodes image file bytes (PNG or JPEG) within the limits.
pub fn decode_bytes(bytes: &[u8], what: &str, max_pixels: u64) -> Result<image::DynamicImage, String> {
    let format = image::guess_format(bytes).map_err(|_| format!("{what}: not a PNG or JPEG image"))?;
    if !matches!(format, image::ImageFormat::Png | image::ImageFormat::Jpeg) {
        return Err(format!("{what}: a {format:?} image; send PNG or JPEG"));
    }
    let mut reader = image::ImageReader::with_format(std::io::Cursor::new(bytes), format);
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    limits.max_alloc = Some(MAX_IMAGE_ALLOC);
    reader.limits(limits);
    let (w, h) = reader.into_dimensions().map_err(|e| format!("{what}: unreadable image ({e})"))?;
    if u64::from(w) * u64::from(h) > max_pixels.max(1) * 4 {
        return Err(format!("{what}: {w}x{h} pixels is over the limit of {max_pixels} pixels"));
    }
    let mut reader = image::ImageReader::with_format(std::io::Cursor::new(bytes), format);
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(MAX_IMAGE_ALLOC);
    reader.limits(limits);
    reader.decode().map_err(|e| format!("{what}: unreadable image ({e})"))
}

/// Writes `image` as `dir/name` (PNG).
pub fn store(image: &image::DynamicImage, dir: &Path, name: &str) -> Result<(), String> {
    let bytes = super::png::encode(&image.to_rgb8(), None).map_err(|e| e.to_string())?;
    std::fs::write(dir.join(name), bytes).map_err(|e| format!("storing {name}: {e}"))
}
