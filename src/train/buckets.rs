//! Aspect-ratio buckets (kohya's `--enable_bucket`): instead of center-cropping every image to a
//! square, each goes to the bucket, among sizes of about the training resolution's area with sides
//! multiples of the model's step, whose aspect ratio is nearest its own, and is scaled to cover it
//! and center-cropped there; every batch comes from one bucket, so images keep their framing.

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

use super::dataset::Dataset;
use crate::Result;

/// The bucket sizes of one run and each example's bucket.
#[derive(Debug, Clone)]
pub struct Buckets {
    /// (width, height) of each bucket.
    sizes: Vec<(usize, usize)>,
    /// Each example's bucket index.
    of_example: Vec<usize>,
}

impl Buckets {
    /// kohya's `make_bucket_resolutions` for `resolution` (the square's side) with sides multiples of
    /// `step` between half and twice the resolution, and each example of `data` in the bucket whose
    /// aspect ratio is nearest its own.
    pub fn new(data: &Dataset, resolution: usize, step: usize) -> Result<Self> {
        let area = resolution * resolution;
        let (min, max) = ((resolution / 2).max(step), resolution * 2);
        let side = (resolution / step).max(1) * step;
        let mut sizes = vec![(side, side)];
        let mut width = min.div_ceil(step) * step;
        while width <= max {
            let height = max.min(area / width / step * step);
            if height >= min {
                sizes.extend([(width, height), (height, width)]);
            }
            width += step;
        }
        sizes.sort_unstable();
        sizes.dedup();
        let of_example = (0..data.examples().len())
            .map(|i| {
                let (w, h) = data.size(i)?;
                let ratio = w as f64 / h as f64;
                let error = |&(bw, bh): &(usize, usize)| (bw as f64 / bh as f64 - ratio).abs();
                Ok((0..sizes.len()).min_by(|&a, &b| error(&sizes[a]).total_cmp(&error(&sizes[b]))).unwrap_or(0))
            })
            .collect::<Result<_>>()?;
        Ok(Self { sizes, of_example })
    }

    /// Example `index`'s bucket size (width, height).
    pub fn size_of(&self, index: usize) -> (usize, usize) {
        self.sizes[self.of_example[index]]
    }
}

/// Batches epoch after epoch: each epoch shuffles the examples (seeded by (seed, epoch)), cuts every
/// bucket's into batches of at most `batch_size`, and shuffles the batches.
#[derive(Debug, Clone)]
pub struct BucketOrder {
    buckets: Buckets,
    batch_size: usize,
    seed: u64,
    epoch: u64,
    batches: Vec<Vec<usize>>,
}

impl BucketOrder {
    /// The order of `buckets`' examples in batches of `batch_size`, seeded by `seed`.
    pub fn new(buckets: Buckets, batch_size: usize, seed: u64) -> Self {
        let mut order = Self { buckets, batch_size: batch_size.max(1), seed, epoch: 0, batches: Vec::new() };
        order.fill();
        order
    }

    fn fill(&mut self) {
        let mut rng = StdRng::seed_from_u64(self.seed.wrapping_add(self.epoch.wrapping_mul(0xd1b5_4a32_d192_ed03)));
        let mut examples: Vec<usize> = (0..self.buckets.of_example.len()).collect();
        examples.shuffle(&mut rng);
        let mut by_bucket = vec![Vec::new(); self.buckets.sizes.len()];
        for i in examples {
            by_bucket[self.buckets.of_example[i]].push(i);
        }
        let mut batches: Vec<Vec<usize>> =
            by_bucket.iter().flat_map(|b| b.chunks(self.batch_size).map(<[usize]>::to_vec)).collect();
        batches.shuffle(&mut rng);
        batches.reverse();
        self.batches = batches;
    }

    /// The next batch's examples and their size (width, height).
    pub fn next_batch(&mut self) -> (Vec<usize>, (usize, usize)) {
        if self.batches.is_empty() {
            self.epoch += 1;
            self.fill();
        }
        let batch = self.batches.pop().unwrap_or_default();
        let size = batch.first().map_or((0, 0), |&i| self.buckets.size_of(i));
        (batch, size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// kohya's sizes for 512 (area at most 512², sides multiples of 64 in [256, 1024]), a wide image
    /// in a wide bucket, and batches that never mix buckets.
    #[test]
    fn buckets_as_kohya_and_batches_one_bucket_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        for (name, (w, h)) in [("wide", (300, 100)), ("square", (50, 50)), ("tall", (60, 120)), ("square2", (80, 80))] {
            image::RgbImage::new(w, h).save(dir.path().join(format!("{name}.png"))).unwrap();
        }
        let data = Dataset::with_caption(dir.path(), "x").unwrap();
        let buckets = Buckets::new(&data, 512, 64).unwrap();
        assert!(buckets.sizes.contains(&(512, 512)) && buckets.sizes.contains(&(1024, 256)));
        assert!(buckets.sizes.iter().all(|&(w, h)| w * h <= 512 * 512 && w % 64 == 0 && h % 64 == 0));
        let names: Vec<String> =
            data.examples().iter().map(|e| e.image.file_stem().unwrap().to_string_lossy().into_owned()).collect();
        let index = |n: &str| names.iter().position(|x| x == n).unwrap();
        assert_eq!(buckets.size_of(index("wide")), (832, 256), "3:1 is nearest 832x256 (3.25)");
        assert_eq!(buckets.size_of(index("tall")), (320, 704), "1:2 is nearest 320x704 (0.45)");
        assert_eq!(buckets.size_of(index("square")), (512, 512));
        let mut order = BucketOrder::new(buckets.clone(), 2, 0);
        for _ in 0..8 {
            let (batch, size) = order.next_batch();
            assert!(!batch.is_empty() && batch.iter().all(|&i| buckets.size_of(i) == size), "{batch:?}");
        }
    }
}
