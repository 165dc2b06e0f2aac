//! Condition-image preprocessors: turn a photo (or keypoints) into the control image a ControlNet
//! or adapter expects, reproducing the reference tools pixel for pixel where they are exact
//! (OpenCV's Canny, Sobel, RGB→gray and drawing; Pillow's Lanczos resize as diffusers uses it).
//!
//! Every preprocessor maps an 8-bit RGB image to an 8-bit RGB image; [`PreprocessKind`] names one
//! with its parameters (`canny:100:200`) and [`apply`] runs it.

pub mod blur;
pub mod canny;
pub mod draw;
pub mod gray;
pub mod keypoints;
pub mod resize;
pub mod sobel;

use std::path::PathBuf;
use std::str::FromStr;

use image::{GrayImage, RgbImage};

use crate::{Error, Result};

/// The kinds as users spell them, for help texts and error messages.
pub const KINDS: &str = "canny[:LOW:HIGH], canny-rgb[:LOW:HIGH], sobel[:THRESHOLD], grayscale, invert, \
                         scribble[:THRESHOLD], keypoints[:FILE.json], resize:WxH, crop:WxH";

/// Default Canny thresholds (those of the ControlNet canny annotator).
pub const CANNY_DEFAULT: (u16, u16) = (100, 200);
/// Default scribble threshold on the luma (ControlNet's scribble apps threshold at 127).
pub const SCRIBBLE_DEFAULT: u8 = 127;

/// One preprocessor and its parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PreprocessKind {
    /// Canny edges of the luma, thresholds on |dx| + |dy| (`canny`, `canny:LOW:HIGH`).
    Canny { low: u16, high: u16 },
    /// Canny edges of the colour image, as `cv2.Canny` on RGB in the ControlNet annotator
    /// (`canny-rgb`, `canny-rgb:LOW:HIGH`).
    CannyRgb { low: u16, high: u16 },
    /// AnyDoor's Sobel high-frequency map (`sobel`, `sobel:THRESHOLD`).
    Sobel { threshold: u8 },
    /// The luma on all three channels (`grayscale`).
    Grayscale,
    /// `255 - luma`, lineart-like (`invert`).
    Invert,
    /// White where luma > threshold (`scribble`, `scribble:THRESHOLD`).
    Scribble { threshold: u8 },
    /// InstantID's face keypoint map from a JSON file (`keypoints:FILE.json`); without a file the
    /// command line reads the JSON as the input.
    Keypoints { json: Option<PathBuf> },
    /// Lanczos resize to exactly width x height (`resize:WxH`).
    Resize { width: u32, height: u32 },
    /// Lanczos resize covering width x height, center-cropped (`crop:WxH`).
    Crop { width: u32, height: u32 },
}

impl PreprocessKind {
    /// A Canny kind (colour when `rgb`), checking `low <= high <= canny::MAX_THRESHOLD`.
    pub fn canny(rgb: bool, low: u16, high: u16) -> Result<Self> {
        if low > high || high > canny::MAX_THRESHOLD {
            return Err(Error::invalid(format!(
                "canny thresholds {low}:{high}: need LOW <= HIGH <= {} (the largest |dx| + |dy|)",
                canny::MAX_THRESHOLD
            )));
        }
        Ok(if rgb { Self::CannyRgb { low, high } } else { Self::Canny { low, high } })
    }
}

fn number<T: FromStr>(spec: &str, what: &str, text: &str, range: &str) -> Result<T> {
    text.parse()
        .map_err(|_| Error::invalid(format!("preprocessor `{spec}`: {what} `{text}` is not a whole number in {range}")))
}

fn size(spec: &str, text: &str) -> Result<(u32, u32)> {
    let parsed = text.split_once('x').and_then(|(w, h)| Some((w.parse::<u32>().ok()?, h.parse::<u32>().ok()?)));
    match parsed {
        Some((w, h)) if w > 0 && h > 0 => Ok((w, h)),
        _ => Err(Error::invalid(format!("preprocessor `{spec}`: expected a size WxH like 512x512, found `{text}`"))),
    }
}

impl FromStr for PreprocessKind {
    type Err = Error;

    /// Parses `name` or `name:param[:param]`; errors list the valid kinds.
    fn from_str(spec: &str) -> Result<Self> {
        let (name, rest) = spec.split_once(':').map_or((spec, None), |(n, r)| (n, Some(r)));
        let params: Vec<&str> = rest.map(|r| r.split(':').collect()).unwrap_or_default();
        let wrong = |usage: &str| Error::invalid(format!("preprocessor `{spec}`: expected {usage}"));
        match (name, params.as_slice()) {
            ("canny" | "canny-rgb", []) => Self::canny(name == "canny-rgb", CANNY_DEFAULT.0, CANNY_DEFAULT.1),
            ("canny" | "canny-rgb", [low, high]) => {
                let range = format!("0..={}", canny::MAX_THRESHOLD);
                let (low, high) = (number(spec, "LOW", low, &range)?, number(spec, "HIGH", high, &range)?);
                Self::canny(name == "canny-rgb", low, high)
            }
            ("canny" | "canny-rgb", _) => Err(wrong(&format!("{name} or {name}:LOW:HIGH"))),
            ("sobel", []) => Ok(Self::Sobel { threshold: sobel::DEFAULT_THRESHOLD }),
            ("sobel", [t]) => Ok(Self::Sobel { threshold: number(spec, "THRESHOLD", t, "0..=255")? }),
            ("scribble", []) => Ok(Self::Scribble { threshold: SCRIBBLE_DEFAULT }),
            ("scribble", [t]) => Ok(Self::Scribble { threshold: number(spec, "THRESHOLD", t, "0..=255")? }),
            ("sobel" | "scribble", _) => Err(wrong(&format!("{name} or {name}:THRESHOLD"))),
            ("grayscale", []) => Ok(Self::Grayscale),
            ("invert", []) => Ok(Self::Invert),
            ("grayscale" | "invert", _) => Err(wrong(&format!("`{name}` without parameters"))),
            ("keypoints", _) => match rest {
                None => Ok(Self::Keypoints { json: None }),
                Some("") => Err(wrong("keypoints:FILE.json")),
                Some(path) => Ok(Self::Keypoints { json: Some(PathBuf::from(path)) }),
            },
            ("resize" | "crop", [wh]) => {
                let (width, height) = size(spec, wh)?;
                Ok(if name == "resize" { Self::Resize { width, height } } else { Self::Crop { width, height } })
            }
            ("resize" | "crop", _) => Err(wrong(&format!("{name}:WxH"))),
            _ => Err(Error::invalid(format!("unknown preprocessor `{spec}`; valid kinds: {KINDS}"))),
        }
    }
}

/// Runs the preprocessor `kind` on `img` ([H, W] RGB in, RGB out; the output has the input's size
/// except for `resize`/`crop`). `keypoints` reads its JSON here and draws at the image's size.
pub fn apply(kind: &PreprocessKind, img: &RgbImage) -> Result<RgbImage> {
    Ok(match kind {
        PreprocessKind::Canny { low, high } => canny::canny(img, *low, *high),
        PreprocessKind::CannyRgb { low, high } => canny::canny_rgb(img, *low, *high),
        PreprocessKind::Sobel { threshold } => sobel::high_frequency(img, *threshold),
        PreprocessKind::Grayscale => gray::grayscale(img),
        PreprocessKind::Invert => gray::invert(img),
        PreprocessKind::Scribble { threshold } => gray::scribble(img, *threshold),
        PreprocessKind::Keypoints { json: None } => {
            return Err(Error::invalid("preprocessor `keypoints` needs its JSON file here: keypoints:FILE.json"));
        }
        PreprocessKind::Keypoints { json: Some(path) } => {
            let kps = keypoints::load(path)?;
            let (w, h) = img.dimensions();
            if let Some(size) = kps.size.filter(|&s| s != (w, h)) {
                return Err(Error::config(
                    path,
                    format!("`width`/`height` are {}x{} but the image is {w}x{h}", size.0, size.1),
                ));
            }
            keypoints::draw(w, h, &kps.points)
        }
        PreprocessKind::Resize { width, height } => resize::fit(img, *width, *height, resize::ResizeMode::Stretch)?,
        PreprocessKind::Crop { width, height } => resize::fit(img, *width, *height, resize::ResizeMode::Crop)?,
    })
}

/// A single-channel image replicated on R, G and B.
fn gray_to_rgb(gray: &GrayImage) -> RgbImage {
    RgbImage::from_fn(gray.width(), gray.height(), |x, y| {
        let v = gray.get_pixel(x, y).0[0];
        image::Rgb([v, v, v])
    })
}
