//! Inpainting only the masked area (A1111's "inpaint only masked", diffusers' `padding_mask_crop`):
//! the region around the mask, padded and widened to the output's aspect, is cut from the image and
//! the mask and generated at the output size; the result is pasted back into the original through
//! the mask. Pixel arithmetic follows diffusers 0.42 on Pillow 13 byte for byte.

use image::{GrayImage, RgbImage};

use crate::models::image_processor::{Filter, pil_resize};
use crate::preprocess::resize::{ResizeMode, fit};
use crate::{Error, Result};

/// A crop box in pixels: left, top, right and bottom (exclusive).
pub type CropBox = (usize, usize, usize, usize);

/// diffusers' `get_crop_region`: the bounding box of the mask's non-zero pixels, padded by `pad`
/// and clipped, then widened (or heightened) around its centre to the aspect of `width` x `height`
/// as far as the image allows.
pub fn crop_region(mask: &GrayImage, width: usize, height: usize, pad: usize) -> Result<CropBox> {
    let (w, h) = (mask.width() as usize, mask.height() as usize);
    let set: Vec<(usize, usize)> =
        mask.enumerate_pixels().filter(|(_, _, p)| p.0[0] != 0).map(|(x, y, _)| (x as usize, y as usize)).collect();
    if set.is_empty() {
        return Err(Error::invalid("the inpainting mask repaints nothing: there is no area to inpaint"));
    }
    let (left, right) = (set.iter().map(|p| p.0).min().unwrap_or(0), set.iter().map(|p| p.0).max().unwrap_or(0) + 1);
    let (top, bottom) = (set.iter().map(|p| p.1).min().unwrap_or(0), set.iter().map(|p| p.1).max().unwrap_or(0) + 1);
    let (x1, y1) = (left.saturating_sub(pad) as i64, top.saturating_sub(pad) as i64);
    let (x2, y2) = ((right + pad).min(w) as i64, (bottom + pad).min(h) as i64);
    let ratio = width as f64 / height as f64;
    let (x1, y1, x2, y2) = if (x2 - x1) as f64 / (y2 - y1) as f64 > ratio {
        let d = ((x2 - x1) as f64 / ratio - (y2 - y1) as f64) as i64;
        let (y1, y2) = widen(y1, y2, d, h as i64);
        (x1, y1, x2, y2)
    } else {
        let d = ((y2 - y1) as f64 * ratio - (x2 - x1) as f64) as i64;
        let (x1, x2) = widen(x1, x2, d, w as i64);
        (x1, y1, x2, y2)
    };
    Ok((x1 as usize, y1 as usize, x2 as usize, y2 as usize))
}

/// The span `lo..hi` grown by `d` around its centre, shifted back inside `0..limit` and clipped
/// (one axis of `get_crop_region`'s aspect widening).
fn widen(mut lo: i64, mut hi: i64, d: i64, limit: i64) -> (i64, i64) {
    lo -= d / 2;
    hi += d - d / 2;
    if hi >= limit {
        let k = hi - limit;
        hi -= k;
        lo -= k;
    }
    if lo < 0 {
        hi -= lo;
        lo = 0;
    }
    (lo, hi.min(limit))
}

/// `img` cropped to `region`.
pub fn crop(img: &RgbImage, (x1, y1, x2, y2): CropBox) -> RgbImage {
    image::imageops::crop_imm(img, x1 as u32, y1 as u32, (x2 - x1) as u32, (y2 - y1) as u32).to_image()
}

/// diffusers' `_resize_and_fill`: `img` scaled to fit inside `width` x `height` (Lanczos),
/// centred on black, and the bands left over filled from its edge rows (or columns) as Pillow's
/// bicubic resize of a zero-height box makes them.
pub fn resize_and_fill(img: &RgbImage, width: usize, height: usize) -> RgbImage {
    let (iw, ih) = (img.width() as usize, img.height() as usize);
    let (ratio, src_ratio) = (width as f64 / height as f64, iw as f64 / ih as f64);
    let src_w = if ratio < src_ratio { width } else { iw * height / ih };
    let src_h = if ratio >= src_ratio { height } else { ih * width / iw };
    let resized = pil_resize(img, src_w, src_h, Filter::Lanczos);
    let mut out = RgbImage::new(width as u32, height as u32);
    let (ox, oy) = ((width / 2) as i64 - (src_w / 2) as i64, (height / 2) as i64 - (src_h / 2) as i64);
    image::imageops::overlay(&mut out, &resized, ox, oy);
    if ratio < src_ratio && src_h >= 2 {
        fill_bands(&mut out, &resized, height / 2 - src_h / 2, true);
    } else if ratio > src_ratio && src_w >= 2 {
        fill_bands(&mut out, &resized, width / 2 - src_w / 2, false);
    }
    out
}

/// The `fill` bands above and below `resized` (placed `fill` pixels in), or with `vertical` false
/// left and right of it, each band a copy of the edge row (column) as Pillow's bicubic resize of a
/// zero-height box makes it: 1.125 × the edge pixel − 0.125 × its neighbour, in 22-bit fixed point.
fn fill_bands(out: &mut RgbImage, resized: &RgbImage, fill: usize, vertical: bool) {
    let (near, far) = (4_718_592i64, -524_288i64);
    let edge =
        |a: u8, b: u8| -> u8 { (((1i64 << 21) + near * i64::from(a) + far * i64::from(b)) >> 22).clamp(0, 255) as u8 };
    // Coordinates as (across the bands, along them).
    let (len, across, out_len) = if vertical {
        (resized.height(), resized.width().min(out.width()), out.height())
    } else {
        (resized.width(), resized.height().min(out.height()), out.width())
    };
    let at = |a: u32, i: u32| if vertical { resized.get_pixel(a, i).0 } else { resized.get_pixel(i, a).0 };
    let fill = fill as u32;
    for a in 0..across {
        let blend = |p: [u8; 3], q: [u8; 3]| image::Rgb(std::array::from_fn(|c| edge(p[c], q[c])));
        let start = blend(at(a, 0), at(a, 1));
        let end = blend(at(a, len - 1), at(a, len - 2));
        for i in 0..fill {
            let after = fill + len + i;
            for (i, pixel) in [(i, start), (after, end)] {
                if i < out_len {
                    let (x, y) = if vertical { (a, i) } else { (i, a) };
                    out.put_pixel(x, y, pixel);
                }
            }
        }
    }
}

/// diffusers' `apply_overlay`: the generated crop `generated`, fitted back to `region` of the
/// original `image`, shows through where `mask` (the original-size mask, blurred if it was) is
/// white, and the original where it is black; Pillow's premultiplied RGBa round trip and
/// `alpha_composite` rounding included.
pub fn paste_back(image: &RgbImage, mask: &GrayImage, generated: &RgbImage, region: CropBox) -> Result<RgbImage> {
    let (x1, y1, x2, y2) = region;
    // diffusers' `_resize_and_crop`: cover the region, centred.
    let fitted = fit(generated, (x2 - x1) as u32, (y2 - y1) as u32, ResizeMode::Crop)?;
    let div255 = |v: u32| ((v + 128) + ((v + 128) >> 8)) >> 8;
    Ok(RgbImage::from_fn(image.width(), image.height(), |x, y| {
        let (xu, yu) = (x as usize, y as usize);
        let base = if (x1..x2).contains(&xu) && (y1..y2).contains(&yu) {
            fitted.get_pixel((xu - x1) as u32, (yu - y1) as u32).0
        } else {
            [0, 0, 0]
        };
        let inv = 255 - u32::from(mask.get_pixel(x, y).0[0]);
        if inv == 0 {
            return image::Rgb(base);
        }
        let original = image.get_pixel(x, y).0;
        image::Rgb(std::array::from_fn(|c| {
            let premultiplied = div255(u32::from(original[c]) * inv);
            let restored = if inv == 255 { premultiplied } else { (255 * premultiplied / inv).min(255) };
            let t = restored * inv * 128 + u32::from(base[c]) * (255 - inv) * 128 + (128 << 7);
            ((((t >> 8) + t) >> 8) >> 7) as u8
        }))
    }))
}
