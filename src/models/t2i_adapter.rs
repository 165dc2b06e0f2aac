//! `T2IAdapter` (full, light, and SDXL's full_adapter_xl): a small conv net turning a condition
//! image into one feature map per UNet down block, added inside the down path.

use std::path::Path;

use candle_core::{Module, Tensor};
use serde::Deserialize;

use super::nn::{Conv2d, conv2d};
use crate::io::weights::Weights;
use crate::{Error, Result};

/// The adapter variants diffusers defines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdapterType {
    /// Conv stem and residual blocks at full width.
    FullAdapter,
    /// Bottlenecked blocks (a quarter of the width inside).
    LightAdapter,
    /// SDXL's: as the full adapter, but only the third stage halves the size (the first two match
    /// SDXL's first two down blocks, of which only the first downsamples inside the UNet).
    FullAdapterXl,
}

/// A T2I-Adapter `config.json`.
#[derive(Debug, Clone, Deserialize)]
pub struct T2IAdapterConfig {
    /// Channels of the condition image.
    #[serde(default = "d3")]
    pub in_channels: usize,
    /// Output channels of each feature (one per UNet down block).
    pub channels: Vec<usize>,
    /// Residual blocks per stage.
    #[serde(default = "d2")]
    pub num_res_blocks: usize,
    /// Pixel-unshuffle factor of the input (the VAE's factor).
    #[serde(default = "d8")]
    pub downscale_factor: usize,
    /// Which variant.
    #[serde(default = "dfull")]
    pub adapter_type: AdapterType,
}

fn d2() -> usize {
    2
}
fn d3() -> usize {
    3
}
fn d8() -> usize {
    8
}
fn dfull() -> AdapterType {
    AdapterType::FullAdapter
}

impl T2IAdapterConfig {
    /// Reads and validates a `config.json`.
    pub fn load(path: &Path) -> Result<Self> {
        let value: serde_json::Value = crate::io::read_json(path)?;
        let c: Self = serde_json::from_value(value).map_err(|e| Error::config(path, format!("invalid config: {e}")))?;
        if c.channels.is_empty() || c.downscale_factor == 0 {
            return Err(Error::config(path, "channels must be non-empty and downscale_factor positive"));
        }
        Ok(c)
    }
}

impl T2IAdapterConfig {
    /// The channel count of each feature map the adapter produces.
    pub fn feature_channels(&self) -> Vec<usize> {
        let mut channels = self.channels.clone();
        if self.adapter_type == AdapterType::LightAdapter {
            channels.push(channels[channels.len() - 1]);
        }
        channels
    }

    /// The model family the adapter is made for: "SDXL" (`full_adapter_xl`) or "SD1.x/2.x".
    pub fn family_name(&self) -> &'static str {
        if self.adapter_type == AdapterType::FullAdapterXl { "SDXL" } else { "SD1.x/2.x" }
    }

    /// Checks that the features fit `unet`'s down blocks, one each, channel for channel.
    pub fn check_fits(&self, unet: &crate::models::unet::UNetConfig, name: &str) -> Result<()> {
        let blocks: Vec<usize> = unet.blocks.iter().map(|b| b.channels).collect();
        let features = self.feature_channels();
        if features.len() < blocks.len() || features[..blocks.len()] != blocks[..] {
            return Err(Error::invalid(format!(
                "{name}: an {} T2I-Adapter's features have {features:?} channels, the {} model's down blocks {blocks:?}",
                self.family_name(),
                unet.family_name()
            )));
        }
        Ok(())
    }
}

/// Conv → ReLU → conv with a residual; the full adapter's second conv is 1x1, the light one's 3x3.
#[derive(Debug)]
struct ResBlock {
    block1: Conv2d,
    block2: Conv2d,
}

impl ResBlock {
    fn load(w: &Weights, channels: usize, second_kernel: usize) -> Result<Self> {
        Ok(Self {
            block1: conv2d(&w.pp("block1"), channels, channels, 3, 1, 1)?,
            block2: conv2d(&w.pp("block2"), channels, channels, second_kernel, 1, second_kernel / 2)?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        Ok((self.block2.forward(&self.block1.forward(xs)?.relu()?)? + xs)?)
    }
}

/// One stage: optional 2x average pooling, optional 1x1 in-conv, residual blocks, optional out-conv.
#[derive(Debug)]
struct Stage {
    down: bool,
    in_conv: Option<Conv2d>,
    resnets: Vec<ResBlock>,
    out_conv: Option<Conv2d>,
}

impl Stage {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut xs = if self.down { avg_pool2x2_ceil(xs)? } else { xs.clone() };
        if let Some(c) = &self.in_conv {
            xs = c.forward(&xs)?;
        }
        for r in &self.resnets {
            xs = r.forward(&xs)?;
        }
        if let Some(c) = &self.out_conv {
            xs = c.forward(&xs)?;
        }
        Ok(xs)
    }
}

/// `AvgPool2d(2, stride 2, ceil_mode=True)`: windows hanging over an odd edge average what they cover.
fn avg_pool2x2_ceil(xs: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = xs.dims4()?;
    if h % 2 == 0 && w % 2 == 0 {
        return Ok(xs.avg_pool2d(2)?);
    }
    let padded = xs.pad_with_zeros(2, 0, h % 2)?.pad_with_zeros(3, 0, w % 2)?;
    let ones = Tensor::ones((1, 1, h, w), xs.dtype(), xs.device())?.pad_with_zeros(2, 0, h % 2)?.pad_with_zeros(
        3,
        0,
        w % 2,
    )?;
    Ok(padded.avg_pool2d(2)?.broadcast_div(&ones.avg_pool2d(2)?)?)
}

/// A loaded T2I-Adapter.
#[derive(Debug)]
pub struct T2IAdapter {
    config: T2IAdapterConfig,
    conv_in: Option<Conv2d>,
    stages: Vec<Stage>,
}

impl T2IAdapter {
    /// Loads an adapter with diffusers key names (`adapter.conv_in`, `adapter.body.{i}...`) from `w`.
    pub fn load(w: &Weights, config: &T2IAdapterConfig) -> Result<Self> {
        let c = config;
        let w = w.pp("adapter");
        let ch = &c.channels;
        let unshuffled = c.in_channels * c.downscale_factor * c.downscale_factor;
        let (conv_in, stages) = match c.adapter_type {
            AdapterType::FullAdapter | AdapterType::FullAdapterXl => {
                let xl = c.adapter_type == AdapterType::FullAdapterXl;
                let conv_in = conv2d(&w.pp("conv_in"), unshuffled, ch[0], 3, 1, 1)?;
                let stages = (0..ch.len())
                    .map(|i| {
                        let sw = w.pp(format!("body.{i}"));
                        // The XL adapter changes width at stages 1 and 2 only.
                        let changes = if xl { i == 1 || i == 2 } else { i > 0 };
                        let (cin, cout) = (if changes { ch[i - 1] } else { ch[i] }, ch[i]);
                        let down = if xl { i == 2 } else { i > 0 };
                        let in_conv =
                            (cin != cout).then(|| conv2d(&sw.pp("in_conv"), cin, cout, 1, 1, 0)).transpose()?;
                        let resnets = (0..c.num_res_blocks)
                            .map(|j| ResBlock::load(&sw.pp(format!("resnets.{j}")), cout, 1))
                            .collect::<Result<_>>()?;
                        Ok(Stage { down, in_conv, resnets, out_conv: None })
                    })
                    .collect::<Result<_>>()?;
                (Some(conv_in), stages)
            }
            AdapterType::LightAdapter => {
                // Stage i maps channels[i-1] → channels[i] (the first from the unshuffled image);
                // a last stage keeps the width and halves the size once more.
                let mut io: Vec<(usize, usize)> = vec![(unshuffled, ch[0])];
                io.extend((0..ch.len() - 1).map(|i| (ch[i], ch[i + 1])));
                io.push((ch[ch.len() - 1], ch[ch.len() - 1]));
                let stages = io
                    .iter()
                    .enumerate()
                    .map(|(i, &(cin, cout))| {
                        let sw = w.pp(format!("body.{i}"));
                        let mid = cout / 4;
                        let resnets = (0..c.num_res_blocks)
                            .map(|j| ResBlock::load(&sw.pp(format!("resnets.{j}")), mid, 3))
                            .collect::<Result<_>>()?;
                        Ok(Stage {
                            down: i > 0,
                            in_conv: Some(conv2d(&sw.pp("in_conv"), cin, mid, 1, 1, 0)?),
                            resnets,
                            out_conv: Some(conv2d(&sw.pp("out_conv"), mid, cout, 1, 1, 0)?),
                        })
                    })
                    .collect::<Result<_>>()?;
                (None, stages)
            }
        };
        Ok(Self { config: config.clone(), conv_in, stages })
    }

    /// The model's configuration.
    pub fn config(&self) -> &T2IAdapterConfig {
        &self.config
    }

    /// One feature map per stage for `image` [B, 3, H, W] in [0, 1].
    pub fn forward(&self, image: &Tensor) -> Result<Vec<Tensor>> {
        let mut xs = candle_nn::ops::pixel_unshuffle(image, self.config.downscale_factor)?;
        if let Some(c) = &self.conv_in {
            xs = c.forward(&xs)?;
        }
        let mut features = Vec::with_capacity(self.stages.len());
        for stage in &self.stages {
            xs = stage.forward(&xs)?;
            features.push(xs.clone());
        }
        Ok(features)
    }
}
