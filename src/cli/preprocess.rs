//! `diffctl preprocess KIND IN OUT`: one condition image from a photo (or keypoints JSON).

use std::path::PathBuf;

use anyhow::bail;
use clap::Args;

use crate::io::image::{load_rgb, save_png};
use crate::io::output::check_output_path;
use crate::preprocess::{self, PreprocessKind, keypoints};

/// Arguments of `diffctl preprocess`.
#[derive(Debug, Args)]
pub struct PreprocessArgs {
    /// canny[:LOW:HIGH], canny-rgb[:LOW:HIGH], sobel[:THRESHOLD], grayscale, invert,
    /// scribble[:THRESHOLD], keypoints[:FILE.json], resize:WxH or crop:WxH.
    #[arg(value_name = "KIND")]
    kind: PreprocessKind,
    /// Input image (any format the image crate reads); for `keypoints` without a file, the JSON
    /// with `width`, `height` and `kps`.
    #[arg(value_name = "IN")]
    input: PathBuf,
    /// Output PNG: a new file or a regular file to replace, written all or nothing.
    #[arg(value_name = "OUT")]
    output: PathBuf,
    /// Canny low threshold on |dx| + |dy| (overrides the one in KIND).
    #[arg(long, value_name = "N")]
    low: Option<u16>,
    /// Canny high threshold on |dx| + |dy| (overrides the one in KIND).
    #[arg(long, value_name = "N")]
    high: Option<u16>,
    /// Threshold of `sobel` and `scribble`, 0..=255 (overrides the one in KIND).
    #[arg(long, value_name = "N")]
    threshold: Option<u8>,
}

impl PreprocessArgs {
    /// The kind with the threshold flags applied; flags that do not belong to it are an error.
    fn kind(&self) -> anyhow::Result<PreprocessKind> {
        let thresholds_given = self.low.is_some() || self.high.is_some();
        Ok(match self.kind.clone() {
            PreprocessKind::Canny { low, high } | PreprocessKind::CannyRgb { low, high }
                if self.threshold.is_none() =>
            {
                let rgb = matches!(self.kind, PreprocessKind::CannyRgb { .. });
                PreprocessKind::canny(rgb, self.low.unwrap_or(low), self.high.unwrap_or(high))?
            }
            PreprocessKind::Sobel { threshold } if !thresholds_given => {
                PreprocessKind::Sobel { threshold: self.threshold.unwrap_or(threshold) }
            }
            PreprocessKind::Scribble { threshold } if !thresholds_given => {
                PreprocessKind::Scribble { threshold: self.threshold.unwrap_or(threshold) }
            }
            kind if !thresholds_given && self.threshold.is_none() => kind,
            _ => bail!("--low/--high apply to canny and canny-rgb, --threshold to sobel and scribble"),
        })
    }
}

/// Runs `diffctl preprocess`; nothing is written unless the whole computation succeeds.
pub fn run(args: &PreprocessArgs) -> anyhow::Result<()> {
    let kind = args.kind()?;
    // A bad output path (a directory, symlink, FIFO or device) is refused before any work.
    check_output_path(&args.output)?;
    let image = match kind {
        PreprocessKind::Keypoints { json: None } => {
            let kps = keypoints::load(&args.input)?;
            let Some((w, h)) = kps.size else {
                bail!(
                    "{}: needs `width` and `height` (or pass an image: keypoints:FILE.json IN OUT)",
                    args.input.display()
                );
            };
            keypoints::draw(w, h, &kps.points)
        }
        kind => preprocess::apply(&kind, &load_rgb(&args.input)?)?,
    };
    save_png(&args.output, &image)?;
    Ok(())
}
