//! Trainable LoRA adapters: for each targeted layer a pair of variables `down` [r, in] and `up`
//! [out, r] (convolutions: [r, in, k, k] and [out, r, 1, 1]) attached to the layer unfused, so that
//! the layer computes `W x + (alpha / r) · up(down(x))` with the gradient flowing into both factors.
//! They export in kohya's layout (`lora_unet_…​.lora_down.weight`, `.lora_up.weight`, `.alpha`),
//! which A1111, ComfyUI and diffusers' `load_lora_weights` load.

use candle_core::{DType, Tensor, Var};

use crate::models::nn::{LayerKind, LayerRegistry, WeightDelta};
use crate::{Error, Result};

/// The name the adapters are attached under on every layer.
const ATTACHED_NAME: &str = "diffctl-train-lora";

/// One layer's adapter.
#[derive(Debug)]
pub struct LoraModule {
    /// The layer's module path in the registry (`unet.down_blocks.0.attentions.0.….attn1.to_q`).
    pub path: String,
    /// The first factor, [r, in] or [r, in, k, k].
    pub down: Var,
    /// The second factor, [out, r] or [out, r, 1, 1].
    pub up: Var,
}

/// The adapters of one training run, all of one rank and alpha.
#[derive(Debug)]
pub struct LoraAdapters {
    modules: Vec<LoraModule>,
    alpha: f64,
}

/// Whether the module `path` is one of `targets` in PEFT's sense: the whole path, or its last
/// dot-separated components (`to_q`, `to_out.0`).
pub fn is_target(path: &str, targets: &[String]) -> bool {
    targets.iter().any(|t| path == t || path.ends_with(&format!(".{t}")))
}

impl LoraAdapters {
    /// Attaches adapters of `rank` and `alpha` to every layer of `registry` whose path starts with
    /// `scope` and is one of `targets`, in path order, their initial factors from `init(path,
    /// down shape, up shape)` (f32). Errors if no layer matches.
    pub fn attach(
        registry: &LayerRegistry,
        scope: &str,
        targets: &[String],
        (rank, alpha): (usize, f64),
        mut init: impl FnMut(&str, &[usize], &[usize]) -> Result<(Tensor, Tensor)>,
    ) -> Result<Self> {
        if rank == 0 {
            return Err(Error::invalid("the LoRA rank must be at least 1"));
        }
        let mut modules = Vec::new();
        for path in registry.paths() {
            if !(path.starts_with(scope) && is_target(&path, targets)) {
                continue;
            }
            let handle = registry.get(&path).ok_or_else(|| Error::invalid(format!("no layer at `{path}`")))?;
            let (down_shape, up_shape) = match handle.kind() {
                LayerKind::Linear { in_dim, out_dim } => (vec![rank, in_dim], vec![out_dim, rank]),
                LayerKind::Conv2d { in_channels, out_channels, kernel, .. } => {
                    (vec![rank, in_channels, kernel, kernel], vec![out_channels, rank, 1, 1])
                }
            };
            let (down, up) = init(&path, &down_shape, &up_shape)?;
            let (down, up) =
                (Var::from_tensor(&down.to_dtype(DType::F32)?)?, Var::from_tensor(&up.to_dtype(DType::F32)?)?);
            let delta = WeightDelta::LowRank {
                down: down.as_tensor().clone(),
                up: up.as_tensor().clone(),
                scale: alpha / rank as f64,
            };
            handle.attach(ATTACHED_NAME, delta, 1.0, false)?;
            modules.push(LoraModule { path, down, up });
        }
        if modules.is_empty() {
            return Err(Error::invalid(format!(
                "no layer under `{scope}` matches the LoRA target modules {targets:?}"
            )));
        }
        Ok(Self { modules, alpha })
    }

    /// Takes the adapters off their layers.
    pub fn detach(&self, registry: &LayerRegistry) {
        for m in &self.modules {
            if let Some(handle) = registry.get(&m.path) {
                // Attached by `attach` under this name: detaching cannot miss it.
                let _ = handle.detach(ATTACHED_NAME);
            }
        }
    }

    /// The adapters, in path order.
    pub fn modules(&self) -> &[LoraModule] {
        &self.modules
    }

    /// Every trainable variable with its PEFT name (`<path>.lora_A.weight`, `<path>.lora_B.weight`).
    pub fn parameters(&self) -> Vec<(String, Var)> {
        self.modules
            .iter()
            .flat_map(|m| {
                [
                    (format!("{}.lora_A.weight", m.path), m.down.clone()),
                    (format!("{}.lora_B.weight", m.path), m.up.clone()),
                ]
            })
            .collect()
    }

    /// The adapters as a kohya LoRA file's tensors: `lora_unet_<path>` (the UNet's, `unet.` dropped)
    /// or `lora_te_<path>` (the text encoder's, `text_encoder.` dropped), dots as underscores, then
    /// `.lora_down.weight`, `.lora_up.weight` and `.alpha` (a scalar).
    pub fn kohya_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::with_capacity(3 * self.modules.len());
        for m in &self.modules {
            let (prefix, rest) = if let Some(rest) = m.path.strip_prefix("unet.") {
                ("lora_unet_", rest)
            } else if let Some(rest) = m.path.strip_prefix("text_encoder.") {
                ("lora_te_", rest)
            } else {
                return Err(Error::invalid(format!(
                    "kohya LoRA files name UNet and text-encoder layers only, not `{}`",
                    m.path
                )));
            };
            let name = format!("{prefix}{}", rest.replace('.', "_"));
            let alpha = Tensor::new(self.alpha as f32, m.down.device())?;
            out.push((format!("{name}.lora_down.weight"), m.down.as_tensor().detach()));
            out.push((format!("{name}.lora_up.weight"), m.up.as_tensor().detach()));
            out.push((format!("{name}.alpha"), alpha));
        }
        Ok(out)
    }
}
