//! Reference-only flags of `diffctl generate`.

use std::path::PathBuf;

use clap::Args;

use crate::control::self_attention::{ReferenceMode, ReferenceSettings};
use crate::request::{ReferenceSpec, Request};

/// Reference-only flags of `diffctl generate`.
#[derive(Debug, Args)]
pub struct ReferenceArgs {
    /// A reference image whose style and content the generation follows, training-free (A1111's
    /// reference_only / reference_adain; resized to the output size).
    #[arg(long, value_name = "PNG")]
    reference_image: Option<PathBuf>,
    /// What the reference changes: attn (joined self-attention), adain (feature statistics) or
    /// attn+adain.
    #[arg(long, default_value = "attn", value_name = "MODE", requires = "reference_image")]
    reference_mode: String,
    /// Style fidelity in [0, 1]: 1 keeps the unconditional half plain (the reference dominates), 0
    /// references both halves (the prompt dominates).
    #[arg(long, default_value_t = 0.5, value_name = "F", requires = "reference_image")]
    style_fidelity: f64,
    /// Share of the transformer blocks (widest first) that join the reference, in [0, 1].
    #[arg(long, default_value_t = 1.0, value_name = "F", requires = "reference_image")]
    reference_attn_weight: f64,
    /// How far from the mid block AdaIN reaches, in [0, 2].
    #[arg(long, default_value_t = 1.0, value_name = "F", requires = "reference_image")]
    reference_gn_weight: f64,
    /// The fraction of the steps before the reference starts acting (diffusers' reference_guidance_start).
    #[arg(long, default_value_t = 0.0, value_name = "F", requires = "reference_image")]
    reference_start: f64,
    /// The fraction of the steps after which it stops (diffusers' reference_guidance_end).
    #[arg(long, default_value_t = 1.0, value_name = "F", requires = "reference_image")]
    reference_end: f64,
}

impl ReferenceArgs {
    /// Adds the reference to `request` when one is given.
    pub fn add_to(&self, request: &mut Request) -> anyhow::Result<()> {
        let mode: ReferenceMode = self.reference_mode.parse()?;
        request.reference = self.reference_image.as_ref().map(|image| ReferenceSpec {
            image: image.clone(),
            settings: ReferenceSettings {
                mode,
                style_fidelity: self.style_fidelity,
                attention_weight: self.reference_attn_weight,
                gn_weight: self.reference_gn_weight,
                start: self.reference_start,
                end: self.reference_end,
            },
        });
        Ok(())
    }
}
