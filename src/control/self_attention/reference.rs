//! Reference-only control (training-free; A1111 sd-webui-controlnet's `reference_only`,
//! `reference_adain`, `reference_adain+attn`; diffusers' community `stable_diffusion_reference.py`).
//!
//! Each step the reference image's latents are noised to the step's timestep and run through the
//! same UNet with the same prompts (the *write* pass): hooks keep every selected transformer block's
//! `norm1` output (the input of its `attn1`) and the per-channel mean and variance of the selected
//! block outputs. The main pass (the *read* pass) then joins the kept tokens to each selected
//! `attn1`'s keys and values, and renormalises the selected outputs to the kept statistics (AdaIN).
//! On the unconditional CFG half, style fidelity `sf` blends: `sf · plain + (1 − sf) · referenced`.
//!
//! Block selection follows the diffusers community pipeline: transformer blocks sorted by width
//! (widest first, stable), block i of N joins tokens when `attention_weight > i/N`; AdaIN acts on the
//! mid block always, on down block w of n when `gn_weight ≥ 2·(1 − w/n)`, on up block w when
//! `gn_weight ≥ 2·w/n`, at the output of each of the block's layers (resnet, or resnet+transformer).

use std::collections::HashMap;

use candle_core::{DType, Tensor};

use crate::control::{Control, GenerationSetup, StepContext};
use crate::io::image::rgb_to_tensor;
use crate::models::unet::{AttentionLayerView, Hooks, UNetConfig, UNetControls, UNetHook, UNetInput};
use crate::preprocess::resize::{ResizeMode, fit};
use crate::{Error, Result};

/// The variance floor of AdaIN (diffusers' `eps`).
const ADAIN_EPS: f64 = 1e-6;

/// What the reference changes in the main pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReferenceMode {
    /// Join the reference's tokens to the self-attention (`reference_only`).
    #[default]
    Attention,
    /// Match the reference's feature statistics (`reference_adain`).
    AdaIn,
    /// Both (`reference_adain+attn`).
    Both,
}

impl ReferenceMode {
    fn attention(self) -> bool {
        matches!(self, Self::Attention | Self::Both)
    }

    fn adain(self) -> bool {
        matches!(self, Self::AdaIn | Self::Both)
    }
}

impl std::str::FromStr for ReferenceMode {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "attn" => Ok(Self::Attention),
            "adain" => Ok(Self::AdaIn),
            "attn+adain" | "adain+attn" => Ok(Self::Both),
            other => {
                Err(Error::invalid(format!("unknown reference mode `{other}` (expected attn, adain or attn+adain)")))
            }
        }
    }
}

/// How the reference acts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReferenceSettings {
    /// Attention, AdaIN or both.
    pub mode: ReferenceMode,
    /// Style fidelity in [0, 1]: how much of the unconditional half keeps its plain features.
    pub style_fidelity: f64,
    /// `attention_auto_machine_weight` in [0, 1]: the share of transformer blocks (widest first)
    /// that join the reference's tokens.
    pub attention_weight: f64,
    /// `gn_auto_machine_weight` in [0, 2]: how far from the mid block AdaIN reaches.
    pub gn_weight: f64,
    /// The reference acts on step i of n only when i/n ≥ `start` and (i + 1)/n ≤ `end` (diffusers'
    /// `reference_guidance_start` / `_end` of the SDXL pipeline; default 0 and 1, every step).
    pub start: f64,
    /// See [`Self::start`].
    pub end: f64,
}

impl Default for ReferenceSettings {
    fn default() -> Self {
        Self {
            mode: ReferenceMode::Attention,
            style_fidelity: 0.5,
            attention_weight: 1.0,
            gn_weight: 1.0,
            start: 0.0,
            end: 1.0,
        }
    }
}

impl ReferenceSettings {
    /// Checks every value is in its range.
    pub fn check(&self) -> Result<()> {
        let ranges = [
            ("style fidelity", self.style_fidelity, 1.0),
            ("reference attention weight", self.attention_weight, 1.0),
            ("reference GN weight", self.gn_weight, 2.0),
            ("reference start", self.start, 1.0),
            ("reference end", self.end, 1.0),
        ];
        for (name, v, max) in ranges {
            if !(0.0..=max).contains(&v) {
                return Err(Error::invalid(format!("{name} {v} is out of range (expected 0 to {max})")));
            }
        }
        if self.start >= self.end {
            return Err(Error::invalid(format!(
                "the reference start {} must be below its end {}",
                self.start, self.end
            )));
        }
        Ok(())
    }
}

/// The hook points a reference acts on in a given UNet.
#[derive(Debug, Clone, Default)]
struct Selection {
    /// `attn1` layers that join the reference's tokens.
    attention: Vec<String>,
    /// Module outputs renormalised by AdaIN.
    adain: Vec<String>,
}

impl Selection {
    fn new(config: &UNetConfig, settings: &ReferenceSettings) -> Self {
        let mut selection = Self::default();
        if settings.mode.attention() {
            // diffusers visits transformer blocks down, up, mid (its module order), then sorts them
            // by width, widest first, keeping that order among equals.
            let mut blocks = config.cross_attention_layers();
            blocks.sort_by_key(|l| std::cmp::Reverse(l.channels));
            let n = blocks.len() as f64;
            selection.attention = blocks
                .iter()
                .enumerate()
                .filter(|(i, l)| !l.only_cross_attention && settings.attention_weight > *i as f64 / n)
                .map(|(_, l)| format!("{}attn1", l.id.strip_suffix("attn2").unwrap_or(&l.id)))
                .collect();
        }
        if settings.mode.adain() {
            if config.has_mid_block {
                selection.adain.push("mid_block".into());
            }
            let n = config.blocks.len();
            let layer_outputs = |block: String, layers: usize, attention: bool| {
                let kind = if attention { "attentions" } else { "resnets" };
                (0..layers).map(move |j| format!("{block}.{kind}.{j}"))
            };
            for (w, block) in config.blocks.iter().enumerate() {
                if settings.gn_weight >= (1.0 - w as f64 / n as f64) * 2.0 {
                    selection.adain.extend(layer_outputs(
                        format!("down_blocks.{w}"),
                        block.layers,
                        block.has_attention,
                    ));
                }
            }
            for (w, &attention) in config.up_has_attention.iter().enumerate() {
                if settings.gn_weight >= w as f64 / n as f64 * 2.0 {
                    let layers = config.blocks[n - 1 - w].layers + 1;
                    selection.adain.extend(layer_outputs(format!("up_blocks.{w}"), layers, attention));
                }
            }
        }
        selection
    }

    fn ids(&self) -> Vec<String> {
        self.attention.iter().chain(&self.adain).cloned().collect()
    }
}

/// What the write pass kept for one step.
#[derive(Debug, Default)]
struct Bank {
    /// `attn1` inputs [N, L, C] by layer id.
    tokens: HashMap<String, Tensor>,
    /// Per-channel (mean, variance) [N, C, 1, 1] by module id.
    stats: HashMap<String, (Tensor, Tensor)>,
}

/// Per-channel mean and (biased) variance over H and W of xs [N, C, H, W], in f32.
fn channel_stats(xs: &Tensor) -> Result<(Tensor, Tensor)> {
    let (n, c, h, w) = xs.dims4()?;
    let flat = xs.to_dtype(DType::F32)?.reshape((n, c, h * w))?;
    let mean = flat.mean_keepdim(2)?;
    let var = flat.broadcast_sub(&mean)?.sqr()?.mean_keepdim(2)?;
    Ok((mean.reshape((n, c, 1, 1))?, var.reshape((n, c, 1, 1))?))
}

/// `sf · plain + (1 − sf) · referenced` on the unconditional half (the first `rows / 2` rows) when
/// guided, `referenced` elsewhere (diffusers' `uc_mask` blend).
fn blend_unconditional(plain: &Tensor, referenced: Tensor, guided: bool, style_fidelity: f64) -> Result<Tensor> {
    if !guided || style_fidelity <= 0.0 {
        return Ok(referenced);
    }
    let half = referenced.dim(0)? / 2;
    let uncond =
        ((plain.narrow(0, 0, half)? * style_fidelity)? + (referenced.narrow(0, 0, half)? * (1.0 - style_fidelity))?)?;
    Ok(Tensor::cat(&[uncond, referenced.narrow(0, half, referenced.dim(0)? - half)?], 0)?)
}

/// The write pass's hook: keeps `attn1` inputs and output statistics.
struct Writer<'a> {
    selection: &'a Selection,
    bank: &'a mut Bank,
}

impl UNetHook for Writer<'_> {
    fn layer_ids(&self) -> Vec<String> {
        self.selection.ids()
    }

    fn before_attention(&mut self, id: &str, hidden: &Tensor) -> Result<Option<Tensor>> {
        self.bank.tokens.insert(id.to_string(), hidden.clone());
        Ok(None)
    }

    fn at_output(&mut self, id: &str, output: Tensor) -> Result<Tensor> {
        self.bank.stats.insert(id.to_string(), channel_stats(&output)?);
        Ok(output)
    }
}

/// A reference image steering the generation through self-attention and/or AdaIN.
pub struct ReferenceOnly {
    image: image::RgbImage,
    settings: ReferenceSettings,
    selection: Selection,
    /// The reference's diffusion latents [B, C, h, w] (f32), sampled once per generation.
    latents: Option<Tensor>,
    guided: bool,
    bank: Bank,
}

impl ReferenceOnly {
    /// A reference-only control for `image` (resized to the generation's size when it differs).
    pub fn new(image: image::RgbImage, settings: ReferenceSettings) -> Result<Self> {
        settings.check()?;
        Ok(Self {
            image,
            settings,
            selection: Selection::default(),
            latents: None,
            guided: false,
            bank: Bank::default(),
        })
    }
}

impl Control for ReferenceOnly {
    fn name(&self) -> &str {
        "reference-only"
    }

    fn prepare(&mut self, setup: &mut GenerationSetup) -> Result<()> {
        self.selection = Selection::new(setup.unet.config(), &self.settings);
        // The write pass's hook names the same points as the read pass's, which the pipeline checks
        // against the UNet once this returns.
        let (height, width) = setup.image_size;
        let resized = fit(&self.image, width as u32, height as u32, ResizeMode::Stretch)?;
        let pixels = ((rgb_to_tensor(&resized, setup.device)? * 2.0)? - 1.0)?;
        let pixels = pixels.to_dtype(setup.dtype)?.repeat((setup.batch, 1, 1, 1))?;
        // diffusers samples the latent distribution with the pipeline's generator, after the
        // starting latents: the same draw order here.
        self.latents = Some(setup.vae.encode_to_latents(&pixels, setup.noise)?.to_dtype(DType::F32)?);
        self.guided = setup.guided;
        Ok(())
    }

    fn contribute(&mut self, step: &mut StepContext) -> Result<UNetControls> {
        let latents =
            self.latents.as_ref().ok_or_else(|| Error::invalid("reference-only: used before it was prepared"))?;
        self.guided = step.guided;
        self.bank = Bank::default();
        let (i, n) = (step.step_index as f64, step.num_steps as f64);
        if i / n < self.settings.start || (i + 1.0) / n > self.settings.end {
            // Outside its window the reference draws no noise and leaves the layers plain.
            return Ok(UNetControls::default());
        }
        // diffusers' SDXL reference pipeline duplicates the reference for guidance before noising
        // it (each half its own noise); the SD1 pipeline noises once and duplicates.
        let per_half = step.guided && step.conditioning.pooled.is_some();
        let rows = if per_half { Tensor::cat(&[latents, latents], 0)? } else { latents.clone() };
        let noise = step.noise.sample(rows.dims(), rows.device())?;
        let noisy = step.scheduler.add_noise(&rows, &noise, step.scheduler_step)?;
        let noisy = if step.guided && !per_half { Tensor::cat(&[&noisy, &noisy], 0)? } else { noisy };
        let input = step.scheduler.scale_model_input(&noisy, step.scheduler_step)?.to_dtype(step.latents.dtype())?;
        let mut writer = Writer { selection: &self.selection, bank: &mut self.bank };
        step.unet.forward(
            UNetInput::new(&input, step.timesteps, step.conditioning).with_hooks(Hooks::new(vec![&mut writer])),
        )?;
        Ok(UNetControls::default())
    }

    fn hook(&mut self) -> Option<&mut dyn UNetHook> {
        Some(self)
    }
}

/// The read pass: joins the kept tokens and renormalises to the kept statistics.
impl UNetHook for ReferenceOnly {
    fn layer_ids(&self) -> Vec<String> {
        self.selection.ids()
    }

    fn before_attention(&mut self, id: &str, _hidden: &Tensor) -> Result<Option<Tensor>> {
        Ok(self.bank.tokens.get(id).cloned())
    }

    fn after_attention(&mut self, id: &str, output: Tensor, layer: &dyn AttentionLayerView) -> Result<Tensor> {
        if !self.bank.tokens.contains_key(id) || !self.guided || self.settings.style_fidelity <= 0.0 {
            return Ok(output);
        }
        let half = output.dim(0)? / 2;
        let plain = layer.plain(0..half)?;
        blend_unconditional(&plain, output, self.guided, self.settings.style_fidelity)
    }

    fn at_output(&mut self, id: &str, output: Tensor) -> Result<Tensor> {
        let Some((ref_mean, ref_var)) = self.bank.stats.get(id) else { return Ok(output) };
        let dtype = output.dtype();
        let x = output.to_dtype(DType::F32)?;
        let (mean, var) = channel_stats(&x)?;
        let std = var.maximum(ADAIN_EPS)?.sqrt()?;
        let ref_std = ref_var.maximum(ADAIN_EPS)?.sqrt()?;
        let referenced =
            x.broadcast_sub(&mean)?.broadcast_div(&std)?.broadcast_mul(&ref_std)?.broadcast_add(ref_mean)?;
        blend_unconditional(&x, referenced, self.guided, self.settings.style_fidelity)?
            .to_dtype(dtype)
            .map_err(Into::into)
    }
}
