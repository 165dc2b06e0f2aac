//! Pillow's `ImageFilter.GaussianBlur` on 8-bit gray images, byte for byte: three box-blur passes
//! along rows, then three along columns, each with the extended box radius of Gwosdek et al. in
//! 8.24 fixed point (Pillow's `BoxBlur.c`). diffusers blurs inpainting masks with it
//! (`VaeImageProcessor.blur`).

use image::GrayImage;

/// The box radius Pillow uses for `sigma` over three passes: the whole radius and the 8.24
/// weights of the inner pixels and of the two partial edge pixels.
fn box_weights(sigma: f64) -> (usize, u32, u32) {
    let s = sigma as f32;
    let sigma2 = s * s / 3.0;
    let l_full = (12.0 * f64::from(sigma2) + 1.0).sqrt() as f32;
    let l = ((f64::from(l_full) - 1.0) / 2.0).floor() as f32;
    let mut a = (2.0 * l + 1.0) * (l * (l + 1.0) - 3.0 * sigma2);
    a /= 6.0 * (sigma2 - (l + 1.0) * (l + 1.0));
    let radius = l + a;
    let whole = radius as usize;
    let ww = (16_777_216.0f32 / (radius * 2.0 + 1.0)) as u32;
    let fw = ((1u32 << 24) - (2 * whole as u32 + 1) * ww) / 2;
    (whole, ww, fw)
}

/// One box pass over a line of `n` values (edges clamped), rounded to 8 bits.
fn box_line(line: &[u8], out: &mut [u8], (r, ww, fw): (usize, u32, u32)) {
    let n = line.len() as isize;
    let at = |i: isize| u32::from(line[i.clamp(0, n - 1) as usize]);
    let r = r as isize;
    for (x, o) in out.iter_mut().enumerate() {
        let x = x as isize;
        let inner: u32 = (x - r..=x + r).map(at).sum();
        let edges = at(x - r - 1) + at(x + r + 1);
        *o = ((ww * inner + fw * edges + (1 << 23)) >> 24) as u8;
    }
}

/// `img` blurred as Pillow's `GaussianBlur(sigma)` (sigma 0: unchanged).
pub fn gaussian_blur(img: &GrayImage, sigma: f64) -> GrayImage {
    if sigma <= 0.0 || !sigma.is_finite() {
        return img.clone();
    }
    let weights = box_weights(sigma);
    let (w, h) = (img.width() as usize, img.height() as usize);
    let mut data = img.as_raw().clone();
    let mut line_out = vec![0u8; w.max(h)];
    if weights.0 > 0 || weights.2 > 0 {
        for _ in 0..3 {
            for y in 0..h {
                let row = &mut data[y * w..(y + 1) * w];
                box_line(row, &mut line_out[..w], weights);
                row.copy_from_slice(&line_out[..w]);
            }
        }
        let mut column = vec![0u8; h];
        for _ in 0..3 {
            for x in 0..w {
                for (y, c) in column.iter_mut().enumerate() {
                    *c = data[y * w + x];
                }
                box_line(&column, &mut line_out[..h], weights);
                for (y, &v) in line_out[..h].iter().enumerate() {
                    data[y * w + x] = v;
                }
            }
        }
    }
    GrayImage::from_raw(w as u32, h as u32, data).expect("buffer sized from the dimensions")
}
