//! Inpainting only the masked area (A1111's "inpaint only masked", diffusers' `padding_mask_crop`):
//! the region around the mask, padded and widened to the output's aspect, is cut from the image and
//! the mask and generated at the output size; the result is pasted back into the original through
//! the mask. Pixel arithmetic follows diffusers 0.42 on Pillow 13 byte for byte.

use image::{GrayImage, RgbImage};

use crate::models::image_processor::{Filter, pil_resize};
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
    let (mut x1, mut y1) = (left.saturating_sub(pad) as i64, top.saturating_sub(pad) as i64);
    let (mut x2, mut y2) = ((right + pad).min(w) as i64, (bottom + pad).min(h) as i64);
    let (w, h) = (w as i64, h as i64);
    let ratio = width as f64 / height as f64;
    if (x2 - x1) as f64 / (y2 - y1) as f64 > ratio {
        let d = ((x2 - x1) as f64 / ratio - (y2 - y1) as f64) as i64;
        y1 -= d / 2;
        y2 += d - d / 2;
        if y2 >= h {
            let k = y2 - h;
            y2 -= k;
            y1 -= k;
        }
        if y1 < 0 {
            y2 -= y1;
            y1 = 0;
        }
        y2 = y2.min(h);
    } else {
        let d = ((y2 - y1) as f64 * ratio - (x2 - x1) as f64) as i64;
        x1 -= d / 2;
        x2 += d - d / 2;
        if x2 >= w {
            let k = x2 - w;
            x2 -= k;
            x1 -= k;
        }
        if x1 < 0 {
            x2 -= x1;
            x1 = 0;
        }
        x2 = x2.min(w);
    }
    Ok((x1 as usize, y1 as usize, x2 as usize, y2 as usize))
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
    let resized = if (src_w, src_h) == (iw, ih) { img.clone() } else { pil_resize(img, src_w, src_h, Filter::Lanczos) };
    let mut out = RgbImage::new(width as u32, height as u32);
    let (ox, oy) = ((width / 2) as i64 - (src_w / 2) as i64, (height / 2) as i64 - (src_h / 2) as i64);
    image::imageops::overlay(&mut out, &resized, ox, oy);
    // Bicubic (a = -0.5) weights of the two edge pixels at a zero-width box: 1.125 and -0.125, in
    // Pillow's 22-bit fixed point.
    let (near, far) = (4_718_592i64, -524_288i64);
    let edge =
        |a: u8, b: u8| -> u8 { (((1i64 << 21) + near * i64::from(a) + far * i64::from(b)) >> 22).clamp(0, 255) as u8 };
    if ratio < src_ratio && src_h >= 2 {
        let fill = height / 2 - src_h / 2;
        for x in 0..width.min(src_w) {
            let (first, second) = (resized.get_pixel(x as u32, 0).0, resized.get_pixel(x as u32, 1).0);
            let (last, before) =
                (resized.get_pixel(x as u32, src_h as u32 - 1).0, resized.get_pixel(x as u32, src_h as u32 - 2).0);
            let top = image::Rgb(std::array::from_fn(|c| edge(first[c], second[c])));
            let bottom = image::Rgb(std::array::from_fn(|c| edge(last[c], before[c])));
            for y in 0..fill {
                out.put_pixel(x as u32, y as u32, top);
                if fill + src_h + y < height {
                    out.put_pixel(x as u32, (fill + src_h + y) as u32, bottom);
                }
            }
        }
    } else if ratio > src_ratio && src_w >= 2 {
        let fill = width / 2 - src_w / 2;
        for y in 0..height.min(src_h) {
            let (first, second) = (resized.get_pixel(0, y as u32).0, resized.get_pixel(1, y as u32).0);
            let (last, before) =
                (resized.get_pixel(src_w as u32 - 1, y as u32).0, resized.get_pixel(src_w as u32 - 2, y as u32).0);
            let left = image::Rgb(std::array::from_fn(|c| edge(first[c], second[c])));
            let right = image::Rgb(std::array::from_fn(|c| edge(last[c], before[c])));
            for x in 0..fill {
                out.put_pixel(x as u32, y as u32, left);
                if fill + src_w + x < width {
                    out.put_pixel((fill + src_w + x) as u32, y as u32, right);
                }
            }
        }
    }
    out
}

/// diffusers' `_resize_and_crop`: `img` scaled to cover `width` x `height` (Lanczos) and centred,
/// what overhangs cut off.
fn resize_and_crop(img: &RgbImage, width: usize, height: usize) -> RgbImage {
    let (iw, ih) = (img.width() as usize, img.height() as usize);
    let (ratio, src_ratio) = (width as f64 / height as f64, iw as f64 / ih as f64);
    let src_w = if ratio > src_ratio { width } else { iw * height / ih };
    let src_h = if ratio <= src_ratio { height } else { ih * width / iw };
    let resized = if (src_w, src_h) == (iw, ih) { img.clone() } else { pil_resize(img, src_w, src_h, Filter::Lanczos) };
    let mut out = RgbImage::new(width as u32, height as u32);
    let (ox, oy) = ((width / 2) as i64 - (src_w / 2) as i64, (height / 2) as i64 - (src_h / 2) as i64);
    image::imageops::overlay(&mut out, &resized, ox, oy);
    out
}

/// diffusers' `apply_overlay`: the generated crop `generated`, fitted back to `region` of the
/// original `image`, shows through where `mask` (the original-size mask, blurred if it was) is
/// white, and the original where it is black; Pillow's premultiplied RGBa round trip and
/// `alpha_composite` rounding included.
pub fn paste_back(image: &RgbImage, mask: &GrayImage, generated: &RgbImage, region: CropBox) -> RgbImage {
    let (x1, y1, x2, y2) = region;
    let fitted = resize_and_crop(generated, x2 - x1, y2 - y1);
    let div255 = |v: u32| ((v + 128) + ((v + 128) >> 8)) >> 8;
    RgbImage::from_fn(image.width(), image.height(), |x, y| {
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
    })
}
