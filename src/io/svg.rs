//! SVG images rasterised with resvg (no text, no external resources): vector artwork such as
//! emoji becomes training images at exactly the resolution a run asks for.

use std::io::Read;
use std::path::Path;

use resvg::tiny_skia::{Color, Pixmap, Transform};

use super::image::MAX_IMAGE_SIDE;
use super::input::{MAX_JSON_BYTES, open_regular, too_large};
use crate::{Error, Result};

/// The largest SVG document read (vector artwork is small; the JSON limit is ample).
const MAX_SVG_BYTES: u64 = MAX_JSON_BYTES;

/// The document's own size, width by height, in user units.
pub fn svg_size(path: &Path) -> Result<(f32, f32)> {
    let size = parse(path)?.size();
    Ok((size.width(), size.height()))
}

/// The SVG file `path` drawn over white, stretched to `width` x `height` pixels, as 8-bit RGB.
pub fn render_svg(path: &Path, width: u32, height: u32) -> Result<image::RgbImage> {
    if width == 0 || height == 0 || width > MAX_IMAGE_SIDE || height > MAX_IMAGE_SIDE {
        return Err(Error::invalid(format!(
            "{}: cannot draw an SVG at {width}x{height} pixels (1 to {MAX_IMAGE_SIDE} a side)",
            path.display()
        )));
    }
    let tree = parse(path)?;
    let mut pixmap = Pixmap::new(width, height).ok_or_else(|| Error::invalid("SVG canvas too large"))?;
    pixmap.fill(Color::WHITE);
    let size = tree.size();
    let scale = Transform::from_scale(width as f32 / size.width(), height as f32 / size.height());
    resvg::render(&tree, scale, &mut pixmap.as_mut());
    // Drawn over opaque white, every pixel is opaque: the premultiplied colour is the colour.
    let rgb = pixmap.pixels().iter().flat_map(|p| [p.red(), p.green(), p.blue()]).collect();
    image::RgbImage::from_raw(width, height, rgb).ok_or_else(|| Error::invalid("SVG raster size mismatch"))
}

/// Reads and parses the document, naming the file in errors.
fn parse(path: &Path) -> Result<resvg::usvg::Tree> {
    let (file, len) = open_regular(path)?;
    if len > MAX_SVG_BYTES {
        return Err(too_large(path, len, MAX_SVG_BYTES));
    }
    let mut data = Vec::with_capacity(len as usize);
    file.take(MAX_SVG_BYTES).read_to_end(&mut data).map_err(|e| Error::io(path, e))?;
    resvg::usvg::Tree::from_data(&data, &resvg::usvg::Options::default())
        .map_err(|e| Error::Format { path: path.into(), message: format!("not a readable SVG: {e}") })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A red square on a transparent 4x4 canvas: drawn at 8x8 it fills the middle, white around.
    #[test]
    fn draws_over_white_at_the_asked_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.svg");
        std::fs::write(
            &path,
            r##"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 4 4"><rect x="1" y="1" width="2" height="2" fill="#ff0000"/></svg>"##,
        )
        .unwrap();
        assert_eq!(svg_size(&path).unwrap(), (4.0, 4.0));
        let img = render_svg(&path, 8, 8).unwrap();
        assert_eq!(img.dimensions(), (8, 8));
        assert_eq!(img.get_pixel(0, 0).0, [255, 255, 255]);
        assert_eq!(img.get_pixel(4, 4).0, [255, 0, 0]);

        std::fs::write(&path, "<svg").unwrap();
        let err = render_svg(&path, 8, 8).unwrap_err().to_string();
        assert!(err.contains("a.svg") && err.contains("not a readable SVG"), "{err}");
        assert!(render_svg(&path, 0, 8).unwrap_err().to_string().contains("0x8"));
    }
}
