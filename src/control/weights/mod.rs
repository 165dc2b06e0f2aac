//! Weight-level control: LoRA-family deltas attached to the model's [`Linear`] and [`Conv2d`]
//! layers, fused into the weights or applied at run time, switchable on a loaded model.
//!
//! [`Lora::load`] resolves a file against the model's [`LayerRegistry`]; [`StableDiffusion::attach_lora`]
//! and its siblings attach, rescale, fuse, unfuse and detach it by name.
//!
//! [`Linear`]: crate::models::nn::Linear
//! [`Conv2d`]: crate::models::nn::Conv2d
//! [`LayerRegistry`]: crate::models::nn::LayerRegistry

pub mod lora;
pub mod lycoris;

pub use lora::Lora;

use crate::control::{Control, GenerationSetup, StepContext};
use crate::models::nn::{LayerHandle, LayerRegistry};
use crate::models::unet::UNetControls;
use crate::pipeline::StableDiffusion;
use crate::{Error, Result};

/// How an attached LoRA is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LoraMode {
    /// Added into the weights once: no cost per step.
    #[default]
    Fused,
    /// Added to each target layer's output at every call (`y = layer(x) + scale · Δ(x)`), the base
    /// weights untouched.
    Unfused,
}

impl std::str::FromStr for LoraMode {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "fused" => Ok(LoraMode::Fused),
            "unfused" => Ok(LoraMode::Unfused),
            other => Err(Error::invalid(format!("unknown LoRA mode `{other}` (expected fused or unfused)"))),
        }
    }
}

/// Attaches `lora` under `name` to the layers of `registry` it names; on failure nothing stays
/// attached. Returns the layers it changed.
fn attach_to(
    registry: &LayerRegistry,
    name: &str,
    lora: &Lora,
    scale: f64,
    mode: LoraMode,
) -> Result<Vec<LayerHandle>> {
    let mut done: Vec<LayerHandle> = Vec::with_capacity(lora.deltas.len());
    for (path, delta) in &lora.deltas {
        let attached = match registry.get(path) {
            Some(layer) => layer.attach(name, delta.clone(), scale, mode == LoraMode::Fused).map(|()| layer),
            None => Err(Error::invalid(format!("{}: the model has no layer `{path}`", lora.path.display()))),
        };
        match attached {
            Ok(layer) => done.push(layer),
            Err(e) => {
                for layer in &done {
                    layer.detach(name)?;
                }
                return Err(e);
            }
        }
    }
    Ok(done)
}

/// A LoRA attached to a model for as long as this value lives: a control that needs a LoRA only
/// while it acts (FaceID's) owns one, and the LoRA is detached when it is dropped or
/// [`LoraAttachment::detach`]ed.
#[derive(Debug)]
#[must_use = "dropping the attachment detaches the LoRA"]
pub struct LoraAttachment {
    name: String,
    layers: Vec<LayerHandle>,
}

impl LoraAttachment {
    /// Attaches `lora` under `name` with multiplier `scale` to the layers of `registry`.
    pub fn attach(registry: &LayerRegistry, name: &str, lora: &Lora, scale: f64, mode: LoraMode) -> Result<Self> {
        let in_use =
            registry.paths().iter().filter_map(|p| registry.get(p)).any(|l| l.attached().iter().any(|n| n == name));
        if in_use {
            return Err(Error::invalid(format!("a LoRA named `{name}` is already attached")));
        }
        Ok(Self { name: name.to_string(), layers: attach_to(registry, name, lora, scale, mode)? })
    }

    /// Detaches the LoRA now, reporting any failure.
    pub fn detach(mut self) -> Result<()> {
        let layers = std::mem::take(&mut self.layers);
        layers.iter().try_for_each(|layer| layer.detach(&self.name))
    }
}

impl Drop for LoraAttachment {
    fn drop(&mut self) {
        for layer in &self.layers {
            // Nothing to report to from a drop; `detach` is the checked path.
            let _ = layer.detach(&self.name);
        }
    }
}

/// LoRAs applied for one generation: attached when it starts (before the prompts are encoded, so
/// their text-encoder parts act), detached when it ends, leaving the model as it was.
pub struct LoraControl {
    loras: Vec<(String, Lora, f64)>,
    mode: LoraMode,
    attached: Vec<LoraAttachment>,
}

impl LoraControl {
    /// `loras` as (name, file, multiplier), applied `mode`.
    pub fn new(loras: Vec<(String, Lora, f64)>, mode: LoraMode) -> Self {
        Self { loras, mode, attached: Vec::new() }
    }
}

impl Control for LoraControl {
    fn name(&self) -> &str {
        "lora"
    }

    fn prepare(&mut self, setup: &mut GenerationSetup) -> Result<()> {
        for (name, lora, scale) in &self.loras {
            self.attached.push(LoraAttachment::attach(setup.layers, name, lora, *scale, self.mode)?);
        }
        Ok(())
    }

    fn contribute(&mut self, _step: &mut StepContext) -> Result<UNetControls> {
        Ok(UNetControls::default())
    }

    fn finish(&mut self) -> Result<()> {
        self.attached.drain(..).try_for_each(LoraAttachment::detach)
    }
}

impl StableDiffusion {
    /// Attaches `lora` under `name` with multiplier `scale` (ΔW = scale · alpha/rank · up @ down).
    pub fn attach_lora(&mut self, name: &str, lora: &Lora, scale: f64, mode: LoraMode) -> Result<()> {
        if self.lora_names().iter().any(|n| n == name) {
            return Err(Error::invalid(format!("a LoRA named `{name}` is already attached")));
        }
        attach_to(&self.layers, name, lora, scale, mode).map(drop)
    }

    /// Changes the multiplier of the attached LoRA `name`.
    pub fn set_lora_scale(&mut self, name: &str, scale: f64) -> Result<()> {
        self.lora_layers(name)?.iter().try_for_each(|layer| layer.set_scale(name, scale))
    }

    /// Fuses the attached LoRA `name` into the weights, or takes it out to apply it at run time.
    pub fn set_lora_mode(&mut self, name: &str, mode: LoraMode) -> Result<()> {
        self.lora_layers(name)?.iter().try_for_each(|layer| layer.set_fused(name, mode == LoraMode::Fused))
    }

    /// Detaches the LoRA `name`, restoring the layers it changed.
    pub fn detach_lora(&mut self, name: &str) -> Result<()> {
        self.lora_layers(name)?.iter().try_for_each(|layer| layer.detach(name))
    }

    /// The names of the attached LoRAs, sorted.
    pub fn lora_names(&self) -> Vec<String> {
        let mut names: Vec<String> =
            self.layers.paths().iter().filter_map(|p| self.layers.get(p)).flat_map(|l| l.attached()).collect();
        names.sort();
        names.dedup();
        names
    }

    /// The layers the LoRA `name` is attached to (at least one).
    fn lora_layers(&self, name: &str) -> Result<Vec<LayerHandle>> {
        let layers: Vec<LayerHandle> = self
            .layers
            .paths()
            .iter()
            .filter_map(|p| self.layers.get(p))
            .filter(|l| l.attached().iter().any(|n| n == name))
            .collect();
        if layers.is_empty() {
            return Err(Error::invalid(format!("no LoRA named `{name}` is attached")));
        }
        Ok(layers)
    }
}
