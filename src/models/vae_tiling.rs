//! Tiled VAE decoding as diffusers' `AutoencoderKL.tiled_decode`: latents are cut into overlapping
//! square tiles, each decoded on its own, and neighbouring tiles are cross-faded over a quarter of a
//! tile so the seams do not show. Memory is that of one tile whatever the image size; the output
//! differs from an untiled decode (each tile has its own GroupNorm statistics) but matches diffusers'
//! tiled output.

use candle_core::Tensor;

use crate::{Error, Result};

/// The fraction of a tile shared with each neighbour (diffusers' `tile_overlap_factor`).
const OVERLAP: f64 = 0.25;

/// Tile geometry, in latents and in pixels.
#[derive(Debug, Clone, Copy)]
pub struct Tiling {
    /// Tile side in latents.
    tile_latents: usize,
    /// Distance between tile origins in latents.
    stride_latents: usize,
    /// Rows/columns cross-faded with the previous tile, in pixels.
    blend_pixels: usize,
    /// Rows/columns kept from each tile, in pixels.
    keep_pixels: usize,
}

impl Tiling {
    /// Tiles of `tile_pixels` image pixels for a VAE that upsamples latents by `scale_factor`.
    pub fn new(tile_pixels: usize, scale_factor: usize) -> Result<Self> {
        let tile_latents = tile_pixels / scale_factor;
        let stride_latents = (tile_latents as f64 * (1.0 - OVERLAP)) as usize;
        if stride_latents == 0 {
            return Err(Error::invalid(format!(
                "VAE tile size {tile_pixels} px is too small for a VAE scale factor of {scale_factor}"
            )));
        }
        let blend_pixels = (tile_pixels as f64 * OVERLAP) as usize;
        Ok(Self { tile_latents, stride_latents, blend_pixels, keep_pixels: tile_pixels - blend_pixels })
    }

    /// Decodes latents [B, C, h, w] with `decode` applied per tile, when they exceed one tile.
    pub fn decode(&self, latents: &Tensor, decode: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
        let (_, _, h, w) = latents.dims4()?;
        if h <= self.tile_latents && w <= self.tile_latents {
            return decode(latents);
        }
        let tile = |start: usize, len: usize| (start, self.tile_latents.min(len - start));
        let mut rows: Vec<Vec<Tensor>> = Vec::new();
        for (y, th) in (0..h).step_by(self.stride_latents).map(|y| tile(y, h)) {
            let row = (0..w)
                .step_by(self.stride_latents)
                .map(|x| tile(x, w))
                .map(|(x, tw)| decode(&latents.narrow(2, y, th)?.narrow(3, x, tw)?))
                .collect::<Result<Vec<_>>>()?;
            rows.push(row);
        }
        // Blend in place, in order, as diffusers does: the tile above and the tile to the left have
        // already been blended with their own neighbours when they are used.
        let mut out_rows = Vec::with_capacity(rows.len());
        for i in 0..rows.len() {
            let mut kept = Vec::with_capacity(rows[i].len());
            for j in 0..rows[i].len() {
                let mut t = rows[i][j].clone();
                if i > 0 {
                    t = self.blend(&rows[i - 1][j], &t, 2)?;
                }
                if j > 0 {
                    t = self.blend(&rows[i][j - 1], &t, 3)?;
                }
                rows[i][j] = t.clone();
                let (th, tw) = (t.dim(2)?, t.dim(3)?);
                kept.push(t.narrow(2, 0, self.keep_pixels.min(th))?.narrow(3, 0, self.keep_pixels.min(tw))?);
            }
            out_rows.push(Tensor::cat(&kept, 3)?);
        }
        Ok(Tensor::cat(&out_rows, 2)?)
    }

    /// Cross-fades the first rows (`dim` 2) or columns (`dim` 3) of `b` with the last ones of `a`:
    /// `b[k] = a[n − e + k]·(1 − k/e) + b[k]·k/e` for k < e = min(blend, a's and b's extent).
    fn blend(&self, a: &Tensor, b: &Tensor, dim: usize) -> Result<Tensor> {
        let (na, nb) = (a.dim(dim)?, b.dim(dim)?);
        let e = self.blend_pixels.min(na).min(nb);
        if e == 0 {
            return Ok(b.clone());
        }
        let ramp: Vec<f32> = (0..e).map(|k| (k as f64 / e as f64) as f32).collect();
        let mut shape = vec![1; 4];
        shape[dim] = e;
        let to_b = Tensor::from_vec(ramp, shape, b.device())?.to_dtype(b.dtype())?;
        let to_a = (1.0 - &to_b)?;
        let head = (a.narrow(dim, na - e, e)?.broadcast_mul(&to_a)? + b.narrow(dim, 0, e)?.broadcast_mul(&to_b)?)?;
        let tail = b.narrow(dim, e, nb - e)?;
        Ok(Tensor::cat(&[head, tail], dim)?)
    }
}
