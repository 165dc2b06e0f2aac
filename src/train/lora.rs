//! Trainable low-rank adapters: for each targeted layer a few factor variables attached to the
//! layer unfused, so that the layer computes `W x + ΔW x` with the gradient flowing into every
//! factor. LoRA: ΔW = (alpha / r) · up @ down, applied as two small products; LoHa and LoKr (the
//! LyCORIS forms, as PEFT's `LoHaConfig` / `LoKrConfig` make them): ΔW rebuilt from its factors on
//! every application. They export in kohya's layout (`lora_unet_…​.lora_down.weight`,
//! `.lora_up.weight`, `.alpha`; LyCORIS' `.hada_w1_a`…, `.lokr_w1`…), which A1111, ComfyUI and
//! diffctl load (and diffusers' `load_lora_weights`, LoRA).

use candle_core::{DType, Tensor, Var};

use crate::models::nn::{LayerKind, LayerRegistry, LycorisFactors, WeightDelta};
use crate::{Error, Result};

/// The name the adapters are attached under on every layer.
const ATTACHED_NAME: &str = "diffctl-train-lora";

/// Which adapter a run trains on each layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Algorithm {
    /// LoRA: down [r, in(, k, k)] and up [out, r(, 1, 1)].
    #[default]
    Lora,
    /// LoHa: the Hadamard product of two rank-r products.
    Loha,
    /// LoKr: the Kronecker product of a small matrix and a rank-r product (or a whole matrix where
    /// the rank would not be smaller, as PEFT decides).
    Lokr,
}

impl Algorithm {
    /// The name on the command line and in checkpoints (`lora`, `loha`, `lokr`).
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Lora => "lora",
            Algorithm::Loha => "loha",
            Algorithm::Lokr => "lokr",
        }
    }

    /// The name in messages (`LoRA`, `LoHa`, `LoKr`).
    pub fn title(self) -> &'static str {
        match self {
            Algorithm::Lora => "LoRA",
            Algorithm::Loha => "LoHa",
            Algorithm::Lokr => "LoKr",
        }
    }
}

/// One factor of an adapter on a layer, before it has values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FactorShape {
    /// The PEFT parameter name after the module path.
    pub peft: &'static str,
    /// The kohya/LyCORIS tensor name after the module name.
    pub kohya: &'static str,
    /// Its shape.
    pub shape: Vec<usize>,
}

/// One factor variable of a layer's adapter.
#[derive(Debug)]
pub struct Factor {
    /// The PEFT parameter name after the module path (`lora_A.weight`, `hada_w1_a`, `lokr_w2_b`).
    pub peft: &'static str,
    /// The kohya/LyCORIS tensor name after the module name (`lora_down.weight`, `hada_w1_a`).
    pub kohya: &'static str,
    /// The values.
    pub var: Var,
}

/// One layer's adapter.
#[derive(Debug)]
pub struct LoraModule {
    /// The layer's module path in the registry (`unet.down_blocks.0.attentions.0.….attn1.to_q`).
    pub path: String,
    /// Its factors, in the order of [`factor_shapes`].
    pub factors: Vec<Factor>,
}

/// The adapters of one training run, all of one algorithm, rank and alpha.
#[derive(Debug)]
pub struct LoraAdapters {
    modules: Vec<LoraModule>,
    algorithm: Algorithm,
    rank: usize,
    alpha: f64,
}

/// The factors of an adapter on a layer of `kind`: (PEFT name, kohya name, shape), as PEFT shapes
/// them for `rank`.
pub fn factor_shapes(algorithm: Algorithm, kind: &LayerKind, rank: usize) -> Vec<FactorShape> {
    let (out, inp, kernel) = match *kind {
        LayerKind::Linear { in_dim, out_dim } => (out_dim, in_dim, 1),
        LayerKind::Conv2d { in_channels, out_channels, kernel, .. } => (out_channels, in_channels, kernel),
    };
    let taps = kernel * kernel;
    let factor = |peft, kohya, shape| FactorShape { peft, kohya, shape };
    match algorithm {
        Algorithm::Lora => {
            let (down, up) = match kind {
                LayerKind::Linear { .. } => (vec![rank, inp], vec![out, rank]),
                LayerKind::Conv2d { .. } => (vec![rank, inp, kernel, kernel], vec![out, rank, 1, 1]),
            };
            vec![factor("lora_A.weight", "lora_down.weight", down), factor("lora_B.weight", "lora_up.weight", up)]
        }
        Algorithm::Loha => vec![
            factor("hada_w1_a", "hada_w1_a", vec![out, rank]),
            factor("hada_w1_b", "hada_w1_b", vec![rank, inp * taps]),
            factor("hada_w2_a", "hada_w2_a", vec![out, rank]),
            factor("hada_w2_b", "hada_w2_b", vec![rank, inp * taps]),
        ],
        Algorithm::Lokr => {
            let ((out_l, out_k), (in_m, in_n)) = (factorization(out), factorization(inp));
            let mut shapes = vec![factor("lokr_w1", "lokr_w1", vec![out_l, in_m])];
            if 2 * rank >= out_k.max(in_n) {
                let whole = if kernel > 1 { vec![out_k, in_n, kernel, kernel] } else { vec![out_k, in_n] };
                shapes.push(factor("lokr_w2", "lokr_w2", whole));
            } else {
                shapes.push(factor("lokr_w2_a", "lokr_w2_a", vec![out_k, rank]));
                shapes.push(factor("lokr_w2_b", "lokr_w2_b", vec![rank, in_n * taps]));
            }
            shapes
        }
    }
}

/// `dimension` as m · n with m ≤ n, m the largest divisor up to √dimension (PEFT's and LyCORIS'
/// `factorization(dimension, -1)`).
pub fn factorization(dimension: usize) -> (usize, usize) {
    let (mut m, mut n) = (1, dimension);
    while m < n {
        let mut next = m + 1;
        while !dimension.is_multiple_of(next) {
            next += 1;
        }
        (m, n) = (next, dimension / next);
    }
    if m > n { (n, m) } else { (m, n) }
}

/// Whether the module `path` is one of `targets` in PEFT's sense: the whole path, or its last
/// dot-separated components (`to_q`, `to_out.0`).
pub fn is_target(path: &str, targets: &[String]) -> bool {
    targets.iter().any(|t| path == t || path.ends_with(&format!(".{t}")))
}

impl LoraAdapters {
    /// Attaches `algorithm` adapters of `rank` and `alpha` to every layer of `registry` whose path
    /// starts with `scope` and is one of `targets`, in path order, their initial factors from
    /// `init(path, factors)` with the factors as [`factor_shapes`] lists them (f32). Errors if no
    /// layer matches.
    pub fn attach(
        registry: &LayerRegistry,
        scope: &str,
        targets: &[String],
        (algorithm, rank, alpha): (Algorithm, usize, f64),
        mut init: impl FnMut(&str, &[FactorShape]) -> Result<Vec<Tensor>>,
    ) -> Result<Self> {
        if rank == 0 {
            return Err(Error::invalid("the adapter rank must be at least 1"));
        }
        let mut modules = Vec::new();
        for path in registry.paths() {
            if !(path.starts_with(scope) && is_target(&path, targets)) {
                continue;
            }
            let handle = registry.get(&path).ok_or_else(|| Error::invalid(format!("no layer at `{path}`")))?;
            let shapes = factor_shapes(algorithm, &handle.kind(), rank);
            let values = init(&path, &shapes)?;
            if values.len() != shapes.len() {
                return Err(Error::invalid(format!(
                    "{path}: {} initial factors for {} shapes",
                    values.len(),
                    shapes.len()
                )));
            }
            let factors = shapes
                .iter()
                .zip(values)
                .map(|(shape, value)| {
                    let var = Var::from_tensor(&value.to_dtype(DType::F32)?)?;
                    Ok(Factor { peft: shape.peft, kohya: shape.kohya, var })
                })
                .collect::<Result<Vec<_>>>()?;
            let t = |i: usize| factors[i].var.as_tensor().clone();
            let scale = alpha / rank as f64;
            let delta = match algorithm {
                Algorithm::Lora => WeightDelta::LowRank { down: t(0), up: t(1), scale },
                Algorithm::Loha => {
                    WeightDelta::Factored(LycorisFactors::Hadamard { w1: [t(0), t(1)], w2: [t(2), t(3)], scale })
                }
                Algorithm::Lokr => WeightDelta::Factored(LycorisFactors::Kronecker {
                    w1: t(0),
                    w2: (1..factors.len()).map(t).collect(),
                    scale,
                }),
            };
            handle.attach(ATTACHED_NAME, delta, 1.0, false)?;
            modules.push(LoraModule { path, factors });
        }
        if modules.is_empty() {
            return Err(Error::invalid(format!(
                "no layer under `{scope}` matches the adapter target modules {targets:?}"
            )));
        }
        Ok(Self { modules, algorithm, rank, alpha })
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

    /// Every trainable variable with its PEFT name (`<path>.lora_A.weight`, `<path>.hada_w1_a`, …).
    pub fn parameters(&self) -> Vec<(String, Var)> {
        self.modules
            .iter()
            .flat_map(|m| m.factors.iter().map(|f| (format!("{}.{}", m.path, f.peft), f.var.clone())))
            .collect()
    }

    /// The adapters as a kohya file's tensors: `lora_unet_<path>` (the UNet's, `unet.` dropped) or
    /// `lora_te_<path>` (the text encoder's, `text_encoder.` dropped), dots as underscores, then each
    /// factor's kohya name and `.alpha` (a scalar). A LoKr whose w2 is whole has no rank for loaders to
    /// divide alpha by (they scale it by 1): its alpha / rank is folded into `lokr_w1` and no `.alpha`
    /// written.
    pub fn kohya_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::with_capacity(5 * self.modules.len());
        for m in &self.modules {
            let (prefix, rest) = if let Some(rest) = m.path.strip_prefix("unet.") {
                ("lora_unet_", rest)
            } else if let Some(rest) = m.path.strip_prefix("text_encoder.") {
                ("lora_te_", rest)
            } else {
                return Err(Error::invalid(format!(
                    "kohya files name UNet and text-encoder layers only, not `{}`",
                    m.path
                )));
            };
            let name = format!("{prefix}{}", rest.replace('.', "_"));
            let whole_w2 = self.algorithm == Algorithm::Lokr && m.factors.iter().any(|f| f.kohya == "lokr_w2");
            for f in &m.factors {
                let value = f.var.as_tensor().detach();
                let value =
                    if whole_w2 && f.kohya == "lokr_w1" { (value * (self.alpha / self.rank as f64))? } else { value };
                out.push((format!("{name}.{}", f.kohya), value));
            }
            if !whole_w2 {
                out.push((format!("{name}.alpha"), Tensor::new(self.alpha as f32, m.factors[0].var.device())?));
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// PEFT's documented factorizations, and LoKr's choice between a whole w2 and two factors.
    #[test]
    fn factorizations_and_lokr_shapes_follow_peft() {
        assert_eq!(factorization(256), (16, 16));
        assert_eq!(factorization(128), (8, 16));
        assert_eq!(factorization(127), (1, 127));
        assert_eq!(factorization(320), (16, 20));
        let linear = LayerKind::Linear { in_dim: 320, out_dim: 320 };
        let names = |rank| {
            factor_shapes(Algorithm::Lokr, &linear, rank).into_iter().map(|f| (f.peft, f.shape)).collect::<Vec<_>>()
        };
        // 320 = 16 · 20: rank 8 is below half of 20, rank 10 is not.
        assert_eq!(names(8), [("lokr_w1", vec![16, 16]), ("lokr_w2_a", vec![20, 8]), ("lokr_w2_b", vec![8, 20])]);
        assert_eq!(names(10), [("lokr_w1", vec![16, 16]), ("lokr_w2", vec![20, 20])]);
    }
}
