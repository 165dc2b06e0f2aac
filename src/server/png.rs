//! PNGs as A1111 writes them: the infotext in a `parameters` text chunk, read back by `png-info`.

use crate::{Error, Result};

/// `image` as PNG bytes, with the `parameters` text chunk when given.
pub fn encode(image: &image::RgbImage, parameters: Option<&str>) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    let mut encoder = png::Encoder::new(&mut bytes, image.width(), image.height());
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    if let Some(text) = parameters {
        encoder
            .add_itxt_chunk("parameters".into(), text.into())
            .map_err(|e| Error::invalid(format!("writing the PNG's parameters: {e}")))?;
    }
    let mut writer = encoder.write_header().map_err(|e| Error::invalid(format!("writing a PNG: {e}")))?;
    writer.write_image_data(image.as_raw()).map_err(|e| Error::invalid(format!("writing a PNG: {e}")))?;
    writer.finish().map_err(|e| Error::invalid(format!("writing a PNG: {e}")))?;
    Ok(bytes)
}

/// The `parameters` text of PNG `bytes` (tEXt, zTXt or iTXt), if it has one.
pub fn parameters(bytes: &[u8]) -> Result<Option<String>> {
    let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    let reader = decoder.read_info().map_err(|e| Error::invalid(format!("not a readable PNG: {e}")))?;
    let info = reader.info();
    if let Some(chunk) = info.uncompressed_latin1_text.iter().find(|c| c.keyword == "parameters") {
        return Ok(Some(chunk.text.clone()));
    }
    if let Some(chunk) = info.compressed_latin1_text.iter().find(|c| c.keyword == "parameters") {
        return Ok(chunk.get_text().ok());
    }
    if let Some(chunk) = info.utf8_text.iter().find(|c| c.keyword == "parameters") {
        return Ok(chunk.get_text().ok());
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    #[test]
    fn parameters_round_trip() {
        let image = image::RgbImage::from_pixel(3, 2, image::Rgb([1, 2, 3]));
        let bytes = super::encode(&image, Some("a cat\nSteps: 4, Sampler: Euler, Seed: 1 — ü")).unwrap();
        assert_eq!(super::parameters(&bytes).unwrap().unwrap(), "a cat\nSteps: 4, Sampler: Euler, Seed: 1 — ü");
        let decoded = image::load_from_memory(&bytes).unwrap().to_rgb8();
        assert_eq!(decoded, image);
        assert!(super::parameters(b"not a png").is_err());
    }
}
