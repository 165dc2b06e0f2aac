//! Layer constructors over [`Weights`]: each checks the stored shapes against the config.
//!
//! [`Linear`] and [`Conv2d`] are also the weight-level injection point. Each is backed by a
//! [`LayerHandle`] holding its weights and the [`WeightDelta`]s attached to it (LoRA, LoHa, LoKr),
//! either fused into the weight or added at run time (`y = layer(x) + Σ scale · Δ(x)`). Layers
//! built from a view that carries a [`LayerRegistry`] record their module path there, so a
//! mechanism finds them by name on a loaded model.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use candle_core::{D, DType, Module, Tensor};

use crate::io::weights::Weights;
use crate::kernels::group_norm::GroupNorm;
use crate::{Error, Result};

/// What a layer computes, with the sizes that fix its weight's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerKind {
    /// `y = x Wᵀ + b` with W [out_dim, in_dim].
    Linear {
        /// Input features.
        in_dim: usize,
        /// Output features.
        out_dim: usize,
    },
    /// A square-kernel 2-D convolution with W [out_channels, in_channels, kernel, kernel].
    Conv2d {
        /// Input channels.
        in_channels: usize,
        /// Output channels.
        out_channels: usize,
        /// Kernel size.
        kernel: usize,
        /// Stride.
        stride: usize,
        /// Zero padding on every side.
        padding: usize,
    },
}

impl LayerKind {
    /// The shape of the layer's weight: [out, in] or [out, in, k, k].
    pub fn weight_shape(&self) -> Vec<usize> {
        match *self {
            LayerKind::Linear { in_dim, out_dim } => vec![out_dim, in_dim],
            LayerKind::Conv2d { in_channels, out_channels, kernel, .. } => {
                vec![out_channels, in_channels, kernel, kernel]
            }
        }
    }

    /// The layer's convolution of x [B, in, H, W] with `weight` (its stride and padding; a Linear
    /// kind convolves as 1x1).
    fn conv(&self, xs: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let (stride, padding) = match *self {
            LayerKind::Conv2d { stride, padding, .. } => (stride, padding),
            LayerKind::Linear { .. } => (1, 0),
        };
        crate::kernels::conv::conv2d(xs, weight, bias, stride, padding)
    }
}

impl fmt::Display for LayerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            LayerKind::Linear { in_dim, out_dim } => write!(f, "Linear({in_dim} → {out_dim})"),
            LayerKind::Conv2d { in_channels, out_channels, kernel, .. } => {
                write!(f, "Conv2d({in_channels} → {out_channels}, {kernel}x{kernel})")
            }
        }
    }
}

/// A change ΔW to one layer's weight, in the form that is cheapest to apply at run time.
#[derive(Debug, Clone)]
pub enum WeightDelta {
    /// ΔW = scale · up @ down. Linear: down [r, in], up [out, r]. Conv2d: down [r, in, k, k] (a
    /// convolution with the layer's stride and padding), up [out, r, 1, 1].
    LowRank {
        /// The first factor.
        down: Tensor,
        /// The second factor.
        up: Tensor,
        /// The factor's own scale (LoRA's alpha / rank).
        scale: f64,
    },
    /// ΔW itself, in the layer weight's shape.
    Dense(Tensor),
    /// ΔW rebuilt from LyCORIS factors at every application, so that gradients reach the factors
    /// (LoHa and LoKr training; loaded files are rebuilt once, into [`WeightDelta::Dense`]).
    Factored(LycorisFactors),
}

/// The factors of a LoHa or LoKr delta (see [`crate::control::weights::lycoris`]).
#[derive(Debug, Clone)]
pub enum LycorisFactors {
    /// LoHa: ΔW = scale · (w1a @ w1b) ⊙ (w2a @ w2b); a [out, r], b [r, in·k·k].
    Hadamard {
        /// w1a and w1b.
        w1: [Tensor; 2],
        /// w2a and w2b.
        w2: [Tensor; 2],
        /// alpha / rank.
        scale: f64,
    },
    /// LoKr: ΔW = scale · kron(w1, w2), w1 [a, b], w2 [out/a, in/b(, k, k)] whole or as
    /// w2a [out/a, r] @ w2b [r, in/b·k·k].
    Kronecker {
        /// w1.
        w1: Tensor,
        /// w2, or w2a and w2b.
        w2: Vec<Tensor>,
        /// alpha / rank.
        scale: f64,
    },
}

impl LycorisFactors {
    /// ΔW [out, in] or [out, in, k, k] for a layer whose weight has `shape`.
    fn weight(&self, shape: &[usize]) -> Result<Tensor> {
        use crate::control::weights::lycoris;
        Ok(match self {
            LycorisFactors::Hadamard { w1: [w1a, w1b], w2: [w2a, w2b], scale } => {
                let w1 = lycoris::loha_factor(w1a, w1b, None, shape)?;
                let w2 = lycoris::loha_factor(w2a, w2b, None, shape)?;
                (lycoris::loha(&w1, &w2)? * *scale)?
            }
            LycorisFactors::Kronecker { w1, w2, scale } => {
                let w2 = match w2.as_slice() {
                    [whole] => whole.clone(),
                    [a, b] => a.matmul(&b.reshape((b.dim(0)?, ()))?)?,
                    other => {
                        return Err(Error::invalid(format!("LoKr's w2 is one or two factors, not {}", other.len())));
                    }
                };
                (lycoris::lokr(w1, &w2, shape)? * *scale)?
            }
        })
    }

    fn map(&self, f: impl Fn(&Tensor) -> candle_core::Result<Tensor>) -> Result<Self> {
        Ok(match self {
            LycorisFactors::Hadamard { w1: [a1, b1], w2: [a2, b2], scale } => {
                LycorisFactors::Hadamard { w1: [f(a1)?, f(b1)?], w2: [f(a2)?, f(b2)?], scale: *scale }
            }
            LycorisFactors::Kronecker { w1, w2, scale } => LycorisFactors::Kronecker {
                w1: f(w1)?,
                w2: w2.iter().map(&f).collect::<candle_core::Result<_>>()?,
                scale: *scale,
            },
        })
    }
}

impl WeightDelta {
    /// Checks that the delta fits a layer of `kind`.
    pub fn check(&self, kind: &LayerKind) -> Result<()> {
        let weight = kind.weight_shape();
        let fits = match self {
            WeightDelta::Dense(delta) => delta.dims() == weight.as_slice(),
            WeightDelta::Factored(factors) => return factors.weight(&weight).map(|_| ()),
            WeightDelta::LowRank { down, up, .. } => {
                let rank = down.dims().first().copied().unwrap_or(0);
                let (down_shape, up_shape) = match weight.as_slice() {
                    [out, inp] => (vec![rank, *inp], vec![*out, rank]),
                    [out, inp, kh, kw] => (vec![rank, *inp, *kh, *kw], vec![*out, rank, 1, 1]),
                    _ => unreachable!("weights are 2-D or 4-D"),
                };
                rank > 0 && down.dims() == down_shape.as_slice() && up.dims() == up_shape.as_slice()
            }
        };
        if fits {
            return Ok(());
        }
        let shapes = match self {
            WeightDelta::Dense(delta) => format!("ΔW {:?}", delta.dims()),
            WeightDelta::LowRank { down, up, .. } => format!("down {:?} and up {:?}", down.dims(), up.dims()),
            WeightDelta::Factored(_) => "LyCORIS factors".to_string(),
        };
        Err(Error::invalid(format!("a weight delta with {shapes} does not fit {kind} (weight {weight:?})")))
    }

    /// ΔW [out, in] or [out, in, k, k] for a layer of `kind`, in f32.
    pub fn weight(&self, kind: &LayerKind) -> Result<Tensor> {
        Ok(match self {
            WeightDelta::Dense(delta) => delta.to_dtype(DType::F32)?,
            WeightDelta::LowRank { down, up, scale } => {
                let rank = down.dim(0)?;
                let down = down.to_dtype(DType::F32)?.reshape((rank, ()))?;
                let up = up.to_dtype(DType::F32)?.reshape(((), rank))?;
                (up.matmul(&down)? * *scale)?.reshape(kind.weight_shape())?
            }
            WeightDelta::Factored(factors) => factors.weight(&kind.weight_shape())?,
        })
    }

    /// ΔW applied to `xs` (no bias): [.., in] → [.., out] or [B, in, H, W] → [B, out, H', W'].
    fn forward(&self, kind: &LayerKind, xs: &Tensor) -> candle_core::Result<Tensor> {
        match (self, kind) {
            (WeightDelta::Dense(delta), LayerKind::Linear { .. }) => crate::kernels::linear::linear(xs, delta, None),
            (WeightDelta::Dense(delta), LayerKind::Conv2d { .. }) => kind.conv(xs, delta, None),
            (WeightDelta::LowRank { down, up, scale }, LayerKind::Linear { .. }) => {
                let h = crate::kernels::linear::linear(xs, down, None)?;
                crate::kernels::linear::linear(&h, up, None)? * *scale
            }
            (WeightDelta::LowRank { down, up, scale }, LayerKind::Conv2d { .. }) => {
                let h = kind.conv(xs, down, None)?;
                crate::kernels::conv::conv2d(&h, up, None, 1, 0)? * *scale
            }
            (WeightDelta::Factored(factors), _) => {
                let delta = factors.weight(&kind.weight_shape()).map_err(candle_core::Error::wrap)?;
                match kind {
                    LayerKind::Linear { .. } => crate::kernels::linear::linear(xs, &delta, None),
                    LayerKind::Conv2d { .. } => kind.conv(xs, &delta, None),
                }
            }
        }
    }

    fn to_dtype(&self, dtype: DType) -> Result<Self> {
        Ok(match self {
            WeightDelta::Dense(delta) => WeightDelta::Dense(delta.to_dtype(dtype)?),
            WeightDelta::LowRank { down, up, scale } => {
                WeightDelta::LowRank { down: down.to_dtype(dtype)?, up: up.to_dtype(dtype)?, scale: *scale }
            }
            WeightDelta::Factored(factors) => WeightDelta::Factored(factors.map(|t| t.to_dtype(dtype))?),
        })
    }
}

/// A delta attached to a layer under a name, with the multiplier it is applied with.
#[derive(Debug)]
struct Attached {
    name: String,
    delta: WeightDelta,
    scale: f64,
    fused: bool,
}

#[derive(Debug)]
struct LayerState {
    /// The weight in use: the loaded one plus every fused delta, kept in the layer dtype (see
    /// [`crate::io::weights::precision`]).
    weight: Tensor,
    /// The dtype inputs, the bias and unfused deltas are in.
    compute: DType,
    bias: Option<Tensor>,
    attached: Vec<Attached>,
}

/// One layer's weights and attached deltas, shared by the layer and the [`LayerRegistry`]: changes
/// made through any handle apply to the model that holds the layer.
#[derive(Debug, Clone)]
pub struct LayerHandle {
    kind: LayerKind,
    state: Arc<RwLock<LayerState>>,
}

impl LayerHandle {
    fn new(kind: LayerKind, weight: Tensor, bias: Option<Tensor>, compute: DType) -> Self {
        let state = LayerState { weight, compute, bias, attached: Vec::new() };
        Self { kind, state: Arc::new(RwLock::new(state)) }
    }

    /// What the layer computes.
    pub fn kind(&self) -> LayerKind {
        self.kind
    }

    /// The weight in use (the loaded weight plus the fused deltas), [out, in] or [out, in, k, k].
    pub fn weight(&self) -> Tensor {
        self.state.read().unwrap_or_else(PoisonError::into_inner).weight.clone()
    }

    /// The names of the attached deltas, in attachment order.
    pub fn attached(&self) -> Vec<String> {
        self.state.read().unwrap_or_else(PoisonError::into_inner).attached.iter().map(|a| a.name.clone()).collect()
    }

    /// Attaches `delta` under `name`, applied as `scale` · ΔW: added to the weight now when
    /// `fused`, else added to the layer's output at every call.
    pub fn attach(&self, name: &str, delta: WeightDelta, scale: f64, fused: bool) -> Result<()> {
        delta.check(&self.kind)?;
        let mut state = self.state.write().unwrap_or_else(PoisonError::into_inner);
        if state.attached.iter().any(|a| a.name == name) {
            return Err(Error::invalid(format!("a weight delta named `{name}` is already attached to this layer")));
        }
        let delta = delta.to_dtype(state.compute)?;
        if fused {
            add_to_weight(&mut state, &delta, &self.kind, scale)?;
        }
        state.attached.push(Attached { name: name.to_string(), delta, scale, fused });
        Ok(())
    }

    /// Changes the multiplier of the delta `name`.
    pub fn set_scale(&self, name: &str, scale: f64) -> Result<()> {
        self.update(name, |state, i, kind| {
            let attached = &state.attached[i];
            if attached.fused {
                let (delta, change) = (attached.delta.clone(), scale - attached.scale);
                add_to_weight(state, &delta, kind, change)?;
            }
            state.attached[i].scale = scale;
            Ok(())
        })
    }

    /// Fuses the delta `name` into the weight, or takes it back out to apply it at run time.
    pub fn set_fused(&self, name: &str, fused: bool) -> Result<()> {
        self.update(name, |state, i, kind| {
            let attached = &state.attached[i];
            if attached.fused != fused {
                let (delta, scale) = (attached.delta.clone(), attached.scale);
                add_to_weight(state, &delta, kind, if fused { scale } else { -scale })?;
                state.attached[i].fused = fused;
            }
            Ok(())
        })
    }

    /// Removes the delta `name` (subtracting it from the weight if it was fused).
    pub fn detach(&self, name: &str) -> Result<()> {
        self.update(name, |state, i, kind| {
            let attached = state.attached.remove(i);
            if attached.fused {
                add_to_weight(state, &attached.delta, kind, -attached.scale)?;
            }
            Ok(())
        })
    }

    fn update(&self, name: &str, f: impl FnOnce(&mut LayerState, usize, &LayerKind) -> Result<()>) -> Result<()> {
        let mut state = self.state.write().unwrap_or_else(PoisonError::into_inner);
        let i = state
            .attached
            .iter()
            .position(|a| a.name == name)
            .ok_or_else(|| Error::invalid(format!("no weight delta named `{name}` is attached to this layer")))?;
        f(&mut state, i, &self.kind)
    }

    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let state = self.state.read().unwrap_or_else(PoisonError::into_inner);
        // f32 inputs take half-precision weights as they are: the kernels widen them, or multiply bf16
        // natively where the CPU can.
        let weight = match (state.weight.dtype(), xs.dtype()) {
            (w, x) if w == x => state.weight.clone(),
            (_, DType::F32) if xs.device().is_cpu() => state.weight.clone(),
            (_, x) => state.weight.to_dtype(x)?,
        };
        let bias = state.bias.clone();
        let mut ys = match self.kind {
            LayerKind::Linear { .. } => crate::kernels::linear::linear(xs, &weight, bias.as_ref())?,
            LayerKind::Conv2d { .. } => self.kind.conv(xs, &weight, bias.as_ref())?,
        };
        for attached in state.attached.iter().filter(|a| !a.fused && a.scale != 0.0) {
            ys = (ys + (attached.delta.forward(&self.kind, xs)? * attached.scale)?)?;
        }
        Ok(ys)
    }
}

/// `weight += factor · ΔW`, computed in f32 and stored in the weight's dtype.
fn add_to_weight(state: &mut LayerState, delta: &WeightDelta, kind: &LayerKind, factor: f64) -> Result<()> {
    let dtype = state.weight.dtype();
    let sum = (state.weight.to_dtype(DType::F32)? + (delta.weight(kind)? * factor)?)?;
    state.weight = sum.to_dtype(dtype)?;
    Ok(())
}

/// The layers of a loaded model by module path (`unet.down_blocks.0.attentions.0.proj_in`,
/// `text_encoder.text_model.encoder.layers.0.self_attn.q_proj`): every [`Linear`] and [`Conv2d`]
/// built from a [`Weights`] view that carries the registry records itself under the registry's
/// scope followed by the view's key prefix. Clones (and scoped views) share one map.
#[derive(Debug, Clone, Default)]
pub struct LayerRegistry {
    scope: String,
    layers: Arc<Mutex<BTreeMap<String, LayerHandle>>>,
    /// Module paths in the original single-file layout (`unet.input_blocks.4.1.proj_in`) → the
    /// layer's path, where the layouts differ (kohya names SDXL's UNet modules that way).
    original_names: Arc<Mutex<BTreeMap<String, String>>>,
}

impl LayerRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// A view of the same registry in which layers register under `name.` (after this view's scope).
    pub fn scoped(&self, name: &str) -> Self {
        Self {
            scope: format!("{}{name}.", self.scope),
            layers: self.layers.clone(),
            original_names: self.original_names.clone(),
        }
    }

    /// The layer at the full module path `path` (scopes included).
    pub fn get(&self, path: &str) -> Option<LayerHandle> {
        self.layers.lock().unwrap_or_else(PoisonError::into_inner).get(path).cloned()
    }

    /// Every registered module path, sorted.
    pub fn paths(&self) -> Vec<String> {
        self.layers.lock().unwrap_or_else(PoisonError::into_inner).keys().cloned().collect()
    }

    /// Records that the layer at `path` is `original` in the original single-file layout.
    pub fn add_original_name(&self, original: &str, path: &str) {
        self.original_names.lock().unwrap_or_else(PoisonError::into_inner).insert(original.into(), path.into());
    }

    /// Every (original-layout path, layer path) pair recorded, sorted.
    pub fn original_names(&self) -> Vec<(String, String)> {
        let names = self.original_names.lock().unwrap_or_else(PoisonError::into_inner);
        names.iter().map(|(a, b)| (a.clone(), b.clone())).collect()
    }

    fn register(&self, path: &str, handle: &LayerHandle) {
        self.layers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(format!("{}{path}", self.scope), handle.clone());
    }
}

/// Builds a layer's handle and records it in the view's registry, if any.
fn build_layer(w: &Weights, kind: LayerKind, weight: Tensor, bias: Option<Tensor>) -> LayerHandle {
    let handle = LayerHandle::new(kind, weight, bias, w.dtype());
    if let Some(registry) = w.layer_registry() {
        registry.register(w.prefix(), &handle);
    }
    handle
}

/// A linear layer `y = x Wᵀ + b`; weight-level mechanisms (LoRA) attach to its [`LayerHandle`].
#[derive(Debug, Clone)]
pub struct Linear {
    layer: LayerHandle,
}

impl Linear {
    /// The layer's weights and attached deltas.
    pub fn handle(&self) -> &LayerHandle {
        &self.layer
    }
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        self.layer.forward(xs)
    }
}

/// A 2-D convolution with bias; weight-level mechanisms (LoRA) attach to its [`LayerHandle`].
#[derive(Debug, Clone)]
pub struct Conv2d {
    layer: LayerHandle,
}

impl Conv2d {
    /// The layer's weights and attached deltas.
    pub fn handle(&self) -> &LayerHandle {
        &self.layer
    }
}

impl Module for Conv2d {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        self.layer.forward(xs)
    }
}

/// `nn.Linear(in_dim, out_dim, bias)` stored as `weight` [out, in] and `bias` [out].
pub fn linear(w: &Weights, in_dim: usize, out_dim: usize, bias: bool) -> Result<Linear> {
    let weight = w.get_layer_weight((out_dim, in_dim), "weight")?;
    let bias = if bias { Some(w.get(out_dim, "bias")?) } else { None };
    Ok(Linear { layer: build_layer(w, LayerKind::Linear { in_dim, out_dim }, weight, bias) })
}

/// `nn.Conv2d(in_c, out_c, kernel, stride, padding)` with bias.
pub fn conv2d(w: &Weights, in_c: usize, out_c: usize, kernel: usize, stride: usize, padding: usize) -> Result<Conv2d> {
    let weight = w.get_layer_weight((out_c, in_c, kernel, kernel), "weight")?;
    let bias = w.get(out_c, "bias")?;
    let kind = LayerKind::Conv2d { in_channels: in_c, out_channels: out_c, kernel, stride, padding };
    Ok(Conv2d { layer: build_layer(w, kind, weight, Some(bias)) })
}

/// `nn.GroupNorm(groups, channels, eps)` with affine weights.
pub fn group_norm(w: &Weights, groups: usize, channels: usize, eps: f64) -> Result<GroupNorm> {
    if groups == 0 || !channels.is_multiple_of(groups) {
        return Err(crate::Error::invalid(format!(
            "{}: GroupNorm with {groups} groups cannot split {channels} channels",
            w.key("")
        )));
    }
    Ok(GroupNorm::new(w.get(channels, "weight")?, w.get(channels, "bias")?, groups, eps)?)
}

/// `nn.LayerNorm(dim, eps)` with affine weights.
pub fn layer_norm(w: &Weights, dim: usize, eps: f64) -> Result<LayerNorm> {
    Ok(LayerNorm::new(w.get(dim, "weight")?, w.get(dim, "bias")?, eps))
}

/// `nn.LayerNorm` over the last dimension with affine weights: candle's fused kernel, or, where
/// gradients flow (it has no backward pass), [`crate::kernels::layer_norm`] on the CPU and the same
/// normalisation from differentiable ops elsewhere.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    fused: candle_nn::LayerNorm,
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    /// A LayerNorm with these weights [D] and epsilon.
    pub fn new(weight: Tensor, bias: Tensor, eps: f64) -> Self {
        Self { fused: candle_nn::LayerNorm::new(weight.clone(), bias.clone(), eps), weight, bias, eps }
    }
}

impl Module for LayerNorm {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        if !crate::kernels::tracks_gradients(&[xs, &self.weight, &self.bias]) {
            return self.fused.forward(xs);
        }
        if crate::kernels::layer_norm::supports(xs, &self.weight, &self.bias) {
            return crate::kernels::layer_norm::layer_norm(xs, &self.weight, &self.bias, self.eps);
        }
        let dtype = xs.dtype();
        let xs = xs.to_dtype(DType::F32)?;
        let centred = xs.broadcast_sub(&xs.mean_keepdim(D::Minus1)?)?;
        let variance = centred.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centred.broadcast_div(&(variance + self.eps)?.sqrt()?)?.to_dtype(dtype)?;
        normed.broadcast_mul(&self.weight)?.broadcast_add(&self.bias)
    }
}

/// A 1x1 projection that is a `Conv2d` in some checkpoints and a `Linear` in others
/// (diffusers' `use_linear_projection`), applied to [B, C, H, W] or [B, L, C] inputs.
#[derive(Debug, Clone)]
pub enum Projection {
    /// Applied to [B, C, H, W].
    Conv(Conv2d),
    /// Applied to [B, L, C].
    Linear(Linear),
}

impl Projection {
    /// Loads the projection in the layout chosen by `use_linear`.
    pub fn load(w: &Weights, in_dim: usize, out_dim: usize, use_linear: bool) -> Result<Self> {
        Ok(if use_linear {
            Projection::Linear(linear(w, in_dim, out_dim, true)?)
        } else {
            Projection::Conv(conv2d(w, in_dim, out_dim, 1, 1, 0)?)
        })
    }

    /// Applies the projection.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Projection::Conv(c) => c.forward(xs)?,
            Projection::Linear(l) => l.forward(xs)?,
        })
    }
}

/// Whether every element of `t` is finite (no NaN, no infinity).
pub fn all_finite(t: &Tensor) -> Result<bool> {
    let t = t.to_dtype(candle_core::DType::F32)?.flatten_all()?;
    // NaN fails every comparison, infinities fail the bound.
    let finite = t.abs()?.le(f32::MAX as f64)?.to_dtype(candle_core::DType::F32)?.min(0)?.to_scalar::<f32>()?;
    Ok(t.elem_count() == 0 || finite == 1.0)
}
