//! Resource limits checked before anything large is allocated: image size, batch, and the memory a
//! generation's activations will take, estimated from the shapes. The CLI, the library request and
//! the server enforce the same [`Limits`].

use crate::{Error, Result};

/// The largest generation a request may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Pixels per image (width × height).
    pub max_pixels: u64,
    /// Images per generation.
    pub max_batch: usize,
    /// Bytes the generation's activations may take; `None`: the memory the system has available
    /// when the generation starts (`MemAvailable`), unlimited where that cannot be read.
    pub max_memory: Option<u64>,
}

/// 4096 x 4096: eight times the pixels of an SDXL image.
pub const DEFAULT_MAX_PIXELS: u64 = 4096 * 4096;
/// Images per generation by default.
pub const DEFAULT_MAX_BATCH: usize = 64;

impl Default for Limits {
    fn default() -> Self {
        Self { max_pixels: DEFAULT_MAX_PIXELS, max_batch: DEFAULT_MAX_BATCH, max_memory: None }
    }
}

/// The shapes a generation's memory is estimated from.
#[derive(Debug, Clone, Copy)]
pub struct GenerationShape {
    /// Images per generation.
    pub batch: usize,
    /// Image width and height in pixels.
    pub width: usize,
    /// Image height in pixels.
    pub height: usize,
    /// Pixels per latent along each side (the VAE factor).
    pub vae_factor: usize,
    /// The UNet's first block's channels.
    pub unet_channels: usize,
    /// The VAE decoder's widest full-resolution channels (its first block's).
    pub vae_channels: usize,
    /// The side of a decoding tile in pixels when the VAE decodes in tiles.
    pub vae_tile: Option<usize>,
    /// Whether guidance doubles the UNet batch.
    pub guided: bool,
}

/// Live activation buffers of a UNet call per element of its widest feature map: the transformer's
/// feed-forward (8 channels per channel), its input and output, the attention output and the
/// resnet buffers, with the allocator's kept blocks (measured: about 300 MB for SD1.5 at 512x512
/// with guidance).
const UNET_BUFFERS: u64 = 32;
/// Live buffers of a VAE decode per element of its full-resolution layer (measured: about 1.6 GB
/// for SD1.5 at 512x512: input, convolution output, GroupNorm output and the Winograd scratch).
const VAE_BUFFERS: u64 = 12;

impl GenerationShape {
    /// The estimated bytes of the largest stage's activations (f32), `None` on overflow.
    pub fn estimated_bytes(&self) -> Option<u64> {
        let f = self.vae_factor.max(1) as u64;
        let (w, h) = (self.width as u64, self.height as u64);
        let rows = (self.batch as u64).checked_mul(if self.guided { 2 } else { 1 })?;
        let latent_pixels = (w / f).checked_mul(h / f)?;
        let unet =
            rows.checked_mul(latent_pixels)?.checked_mul(self.unet_channels as u64)?.checked_mul(4 * UNET_BUFFERS)?;
        let decoded_pixels = match self.vae_tile {
            Some(tile) => (tile as u64).checked_mul(tile as u64)?.min(w.checked_mul(h)?),
            None => w.checked_mul(h)?,
        };
        let per_image = decoded_pixels.checked_mul(self.vae_channels as u64)?.checked_mul(4 * VAE_BUFFERS)?;
        let vae = if self.vae_tile.is_some() { per_image } else { per_image.checked_mul(self.batch as u64)? };
        Some(unet.max(vae))
    }
}

impl Limits {
    /// Checks image count and size.
    pub fn check_size(&self, batch: usize, width: usize, height: usize) -> Result<()> {
        if batch > self.max_batch {
            return Err(Error::invalid(format!(
                "a batch of {batch} images is over the limit of {} (raise it with --max-batch)",
                self.max_batch
            )));
        }
        let pixels = (width as u64).checked_mul(height as u64);
        if pixels.is_none_or(|p| p > self.max_pixels) {
            return Err(Error::invalid(format!(
                "{width}x{height} pixels is over the limit of {} pixels per image (raise it with --max-pixels)",
                self.max_pixels
            )));
        }
        Ok(())
    }

    /// Checks the estimated memory of a generation of `shape` against the limit.
    pub fn check_memory(&self, shape: &GenerationShape) -> Result<()> {
        let Some(limit) = self.max_memory.or_else(available_memory) else { return Ok(()) };
        let needed = shape.estimated_bytes();
        if needed.is_none_or(|n| n > limit) {
            let gb = |b: u64| b as f64 / 1e9;
            return Err(Error::invalid(format!(
                "a batch of {} at {}x{} needs about {} of memory for its activations, over the limit of {:.1} GB \
                 ({}; --vae-tiling lowers the decoder's share, a smaller batch or size the rest)",
                shape.batch,
                shape.width,
                shape.height,
                needed.map_or("more than 18 EB".to_string(), |n| format!("{:.1} GB", gb(n))),
                gb(limit),
                if self.max_memory.is_some() {
                    "--max-memory"
                } else {
                    "the memory available now; --max-memory sets it"
                }
            )));
        }
        Ok(())
    }
}

/// `MemAvailable` of /proc/meminfo in bytes, where there is one.
fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sd15(batch: usize, side: usize, tile: Option<usize>) -> GenerationShape {
        GenerationShape {
            batch,
            width: side,
            height: side,
            vae_factor: 8,
            unet_channels: 320,
            vae_channels: 128,
            vae_tile: tile,
            guided: true,
        }
    }

    #[test]
    fn estimates_follow_the_measured_sd15_peaks_and_refuse_bombs() {
        let gb = |b: u64| b as f64 / 1e9;
        let one = gb(sd15(1, 512, None).estimated_bytes().unwrap());
        assert!((1.0..2.5).contains(&one), "{one}");
        // At 2048x2048 the untiled decoder dominates; tiles leave the UNet's share.
        let untiled = sd15(1, 2048, None).estimated_bytes().unwrap();
        let tiled = sd15(1, 2048, Some(512)).estimated_bytes().unwrap();
        assert!(tiled * 4 < untiled, "{tiled} vs {untiled}");
        let limits = Limits { max_memory: Some(8_000_000_000), ..Limits::default() };
        assert!(limits.check_memory(&sd15(1, 512, None)).is_ok());
        let err = limits.check_memory(&sd15(64, 4096, None)).unwrap_err().to_string();
        assert!(err.contains("over the limit of 8.0 GB"), "{err}");
        assert!(sd15(usize::MAX, usize::MAX, None).estimated_bytes().is_none());
        assert!(limits.check_memory(&sd15(usize::MAX, usize::MAX, None)).is_err());
    }

    #[test]
    fn size_limits_name_the_flag() {
        let limits = Limits::default();
        assert!(limits.check_size(1, 1024, 1024).is_ok());
        let err = limits.check_size(1, 20000, 20000).unwrap_err().to_string();
        assert!(err.contains("--max-pixels"), "{err}");
        let err = limits.check_size(1_000_000, 8, 8).unwrap_err().to_string();
        assert!(err.contains("--max-batch"), "{err}");
        assert!(limits.check_size(1, usize::MAX - 7, usize::MAX - 7).is_err());
    }
}
