//! IP-Adapter image projections (the `image_proj.*` half of an h94 file): embeddings of an image
//! (or a face) in, image tokens for the UNet's cross-attention out.
//!
//! The variant is recognised from the keys as diffusers does: `proj.weight` → base
//! (`ImageProjection`), `proj.3.weight` → Full-face (`IPAdapterFullImageProjection`), `norm.weight` →
//! FaceID (`IPAdapterFaceIDImageProjection`), `latents` → Plus (`IPAdapterPlusImageProjection`).

use candle_core::{D, DType, Module, Tensor};

use crate::io::weights::Weights;
use crate::models::attention::{merge_heads, scaled_dot_product, split_heads};
use crate::models::nn::{LayerNorm, Linear, layer_norm, linear};
use crate::{Error, Result};

/// `nn.LayerNorm`'s default epsilon, used by every projection.
const EPS: f64 = 1e-5;
/// Head size of the Plus resampler's attention (fixed in the h94 code and in diffusers).
const RESAMPLER_HEAD_DIM: usize = 64;

/// What a projection reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProjectionInput {
    /// CLIP `image_embeds` [N, projection_dim] (base).
    ImageEmbeds,
    /// CLIP penultimate hidden states [N, tokens, hidden] (Plus, Full-face).
    HiddenStates,
    /// A face-recognition embedding [N, dim] (FaceID).
    FaceEmbedding,
}

impl std::fmt::Display for ProjectionInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ProjectionInput::ImageEmbeds => "CLIP image embeddings",
            ProjectionInput::HiddenStates => "CLIP penultimate hidden states",
            ProjectionInput::FaceEmbedding => "a face embedding",
        })
    }
}

/// The shape of [`ImageProjection::forward`]'s output for one input.
fn tokens(xs: &Tensor, n: usize, count: usize, dim: usize) -> Result<Tensor> {
    Ok(xs.reshape((n, count, dim))?)
}

/// Linear → GELU (erf) → Linear, stored as `proj.0` and `proj.2` (diffusers' `FeedForward`).
struct Mlp {
    fc1: Linear,
    fc2: Linear,
}

impl Mlp {
    fn load(w: &Weights, input: usize, hidden: usize, output: usize) -> Result<Self> {
        Ok(Self {
            fc1: linear(&w.pp("proj.0"), input, hidden, true)?,
            fc2: linear(&w.pp("proj.2"), hidden, output, true)?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        Ok(self.fc2.forward(&self.fc1.forward(xs)?.gelu_erf()?)?)
    }
}

/// One resampler layer: perceiver attention of the latents over [image tokens; latents], then a
/// LayerNorm + MLP, each with a residual.
struct ResamplerLayer {
    norm_x: LayerNorm,
    norm_latents: LayerNorm,
    to_q: Linear,
    to_kv: Linear,
    to_out: Linear,
    heads: usize,
    ff_norm: LayerNorm,
    ff_in: Linear,
    ff_out: Linear,
    /// The dtype of the layer weights (see [`scaled_dot_product`]).
    layer_dtype: DType,
}

impl ResamplerLayer {
    /// Loads `layers.{i}.0.{norm1,norm2,to_q,to_kv,to_out}` and `layers.{i}.1.{0,1,3}` under `w`.
    fn load(w: &Weights, dim: usize, inner: usize, ff_dim: usize) -> Result<Self> {
        let (a, f) = (w.pp("0"), w.pp("1"));
        Ok(Self {
            norm_x: layer_norm(&a.pp("norm1"), dim, EPS)?,
            norm_latents: layer_norm(&a.pp("norm2"), dim, EPS)?,
            to_q: linear(&a.pp("to_q"), dim, inner, false)?,
            to_kv: linear(&a.pp("to_kv"), dim, 2 * inner, false)?,
            to_out: linear(&a.pp("to_out"), inner, dim, false)?,
            heads: inner / RESAMPLER_HEAD_DIM,
            ff_norm: layer_norm(&f.pp("0"), dim, EPS)?,
            ff_in: linear(&f.pp("1"), dim, ff_dim, false)?,
            ff_out: linear(&f.pp("3"), ff_dim, dim, false)?,
            layer_dtype: w.layer_dtype(),
        })
    }

    /// x [N, S, dim], latents [N, Q, dim] → latents [N, Q, dim].
    fn forward(&self, x: &Tensor, latents: &Tensor) -> Result<Tensor> {
        let x_normed = self.norm_x.forward(x)?;
        let l_normed = self.norm_latents.forward(latents)?;
        let q = self.to_q.forward(&l_normed)?;
        let kv = self.to_kv.forward(&Tensor::cat(&[&x_normed, &l_normed], 1)?)?;
        let inner = q.dim(D::Minus1)?;
        let (k, v) = (kv.narrow(D::Minus1, 0, inner)?, kv.narrow(D::Minus1, inner, inner)?);
        let scale = (RESAMPLER_HEAD_DIM as f64).powf(-0.5);
        let (q, k, v) = (split_heads(&q, self.heads)?, split_heads(&k, self.heads)?, split_heads(&v, self.heads)?);
        let attn = merge_heads(&scaled_dot_product(&q, &k, &v, scale, None, false, self.layer_dtype)?)?;
        let latents = (self.to_out.forward(&attn)? + latents)?;
        let ff = self.ff_out.forward(&self.ff_in.forward(&self.ff_norm.forward(&latents)?)?.gelu_erf()?)?;
        Ok((ff + latents)?)
    }
}

/// The Plus resampler: learned latent queries attend to the projected hidden states.
struct Resampler {
    latents: Tensor,
    proj_in: Linear,
    layers: Vec<ResamplerLayer>,
    proj_out: Linear,
    norm_out: LayerNorm,
}

/// A loaded image projection.
enum Kind {
    Base { proj: Linear, norm: LayerNorm, tokens: usize },
    Plus(Resampler),
    Full { mlp: Mlp, norm: LayerNorm },
    FaceId { mlp: Mlp, norm: LayerNorm, tokens: usize },
}

/// An IP-Adapter image projection.
pub struct ImageProjection {
    kind: Kind,
    input_dim: usize,
    output_dim: usize,
}

/// The stored shape of `name` under `w`, or a missing-tensor error naming the full key.
fn shape(w: &Weights, name: &str) -> Result<Vec<usize>> {
    w.shape_of(name).ok_or_else(|| Error::invalid(format!("missing tensor `{}`", w.key(name))))
}

/// `shape` as `[rows, cols]`.
fn matrix(w: &Weights, name: &str) -> Result<(usize, usize)> {
    match shape(w, name)?.as_slice() {
        &[r, c] => Ok((r, c)),
        other => Err(Error::invalid(format!("tensor `{}` has shape {other:?}, expected 2 dimensions", w.key(name)))),
    }
}

/// `n` as a multiple of `of`, or an error about `what`.
fn divide(n: usize, of: usize, what: &str) -> Result<usize> {
    if of == 0 || !n.is_multiple_of(of) {
        return Err(Error::invalid(format!("{what}: {n} is not a multiple of {of}")));
    }
    Ok(n / of)
}

impl ImageProjection {
    /// Loads the projection stored under `w` (the `image_proj` keys), recognising its variant.
    pub fn load(w: &Weights) -> Result<Self> {
        if w.contains("proj.weight") {
            let (rows, input_dim) = matrix(w, "proj.weight")?;
            let output_dim = shape(w, "norm.weight")?[0];
            let tokens = divide(rows, output_dim, &format!("rows of `{}` per token", w.key("proj.weight")))?;
            let proj = linear(&w.pp("proj"), input_dim, rows, true)?;
            let norm = layer_norm(&w.pp("norm"), output_dim, EPS)?;
            return Ok(Self { kind: Kind::Base { proj, norm, tokens }, input_dim, output_dim });
        }
        if w.contains("proj.3.weight") {
            let (hidden, input_dim) = matrix(w, "proj.0.weight")?;
            let (output_dim, _) = matrix(w, "proj.2.weight")?;
            let mlp = Mlp::load(w, input_dim, hidden, output_dim)?;
            let norm = layer_norm(&w.pp("proj.3"), output_dim, EPS)?;
            return Ok(Self { kind: Kind::Full { mlp, norm }, input_dim, output_dim });
        }
        if w.contains("perceiver_resampler.proj_in.weight") {
            return Err(Error::invalid(
                "IP-Adapter FaceID Plus (image_proj.perceiver_resampler.*) is not supported; FaceID, base, Plus \
                 and Full-face adapters are",
            ));
        }
        if w.contains("norm.weight") {
            let (hidden, input_dim) = matrix(w, "proj.0.weight")?;
            let (rows, _) = matrix(w, "proj.2.weight")?;
            let output_dim = shape(w, "norm.weight")?[0];
            let tokens = divide(rows, output_dim, &format!("rows of `{}` per token", w.key("proj.2.weight")))?;
            let mlp = Mlp::load(w, input_dim, hidden, rows)?;
            let norm = layer_norm(&w.pp("norm"), output_dim, EPS)?;
            return Ok(Self { kind: Kind::FaceId { mlp, norm, tokens }, input_dim, output_dim });
        }
        if !w.contains("latents") {
            return Err(Error::invalid(format!(
                "no image projection found: expected `{}` (base), `{}` (Plus), `{}` (Full-face) or `{}` (FaceID)",
                w.key("proj.weight"),
                w.key("latents"),
                w.key("proj.3.weight"),
                w.key("norm.weight")
            )));
        }
        let (queries, dim) = match shape(w, "latents")?.as_slice() {
            &[1, q, d] => (q, d),
            other => {
                return Err(Error::invalid(format!(
                    "tensor `{}` has shape {other:?}, expected [1, queries, dim]",
                    w.key("latents")
                )));
            }
        };
        let (_, input_dim) = matrix(w, "proj_in.weight")?;
        let (output_dim, _) = matrix(w, "proj_out.weight")?;
        let mut layers = Vec::new();
        while w.contains(&format!("layers.{}.0.to_q.weight", layers.len())) {
            let lw = w.pp(format!("layers.{}", layers.len()));
            let (inner, _) = matrix(&lw, "0.to_q.weight")?;
            divide(inner, RESAMPLER_HEAD_DIM, &format!("rows of `{}` per head", lw.key("0.to_q.weight")))?;
            let (ff_dim, _) = matrix(&lw, "1.1.weight")?;
            layers.push(ResamplerLayer::load(&lw, dim, inner, ff_dim)?);
        }
        if layers.is_empty() {
            return Err(Error::invalid(format!("missing tensor `{}`", w.key("layers.0.0.to_q.weight"))));
        }
        let resampler = Resampler {
            latents: w.get((1, queries, dim), "latents")?,
            proj_in: linear(&w.pp("proj_in"), input_dim, dim, true)?,
            layers,
            proj_out: linear(&w.pp("proj_out"), dim, output_dim, true)?,
            norm_out: layer_norm(&w.pp("norm_out"), output_dim, EPS)?,
        };
        Ok(Self { kind: Kind::Plus(resampler), input_dim, output_dim })
    }

    /// The variant's name, for messages.
    pub fn variant(&self) -> &'static str {
        match self.kind {
            Kind::Base { .. } => "base",
            Kind::Plus(_) => "Plus",
            Kind::Full { .. } => "Full-face",
            Kind::FaceId { .. } => "FaceID",
        }
    }

    /// What the projection reads.
    pub fn input(&self) -> ProjectionInput {
        match self.kind {
            Kind::Base { .. } => ProjectionInput::ImageEmbeds,
            Kind::Plus(_) | Kind::Full { .. } => ProjectionInput::HiddenStates,
            Kind::FaceId { .. } => ProjectionInput::FaceEmbedding,
        }
    }

    /// Width of the input features (the last dimension of what [`Self::forward`] takes).
    pub fn input_dim(&self) -> usize {
        self.input_dim
    }

    /// Width of the image tokens (must equal the UNet's `cross_attention_dim`).
    pub fn output_dim(&self) -> usize {
        self.output_dim
    }

    /// Image tokens [N, T, output_dim] of `xs`: [N, input_dim] for base and FaceID,
    /// [N, S, input_dim] for Plus and Full-face.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let rank = if self.input() == ProjectionInput::HiddenStates { 3 } else { 2 };
        if xs.rank() != rank || xs.dim(D::Minus1)? != self.input_dim {
            return Err(Error::invalid(format!(
                "the {} image projection takes {} of width {} ({rank} dimensions), got shape {:?}",
                self.variant(),
                self.input(),
                self.input_dim,
                xs.dims()
            )));
        }
        let n = xs.dim(0)?;
        Ok(match &self.kind {
            Kind::Base { proj, norm, tokens: t } => {
                norm.forward(&tokens(&proj.forward(xs)?, n, *t, self.output_dim)?)?
            }
            Kind::Full { mlp, norm } => norm.forward(&mlp.forward(xs)?)?,
            Kind::FaceId { mlp, norm, tokens: t } => {
                norm.forward(&tokens(&mlp.forward(xs)?, n, *t, self.output_dim)?)?
            }
            Kind::Plus(r) => {
                let x = r.proj_in.forward(xs)?;
                let mut latents = r.latents.repeat((n, 1, 1))?;
                for layer in &r.layers {
                    latents = layer.forward(&x, &latents)?;
                }
                r.norm_out.forward(&r.proj_out.forward(&latents)?)?
            }
        })
    }
}
