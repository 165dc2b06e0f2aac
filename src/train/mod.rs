//! Training: the pieces `diffctl train` is built from, each as small as the step it takes.
//!
//! Models train through their ordinary forward pass. The CPU kernels (see [`crate::kernels`]) have
//! no backward pass of their own, so wherever an input tracks gradients (a trainable variable, or a
//! value computed from one) they run candle's differentiable ops instead; the frozen part of a model
//! that no gradient reaches keeps the fast kernels.
//!
//! - [`lora`]: trainable low-rank adapters attached to a model's layers, exported in kohya's layout.
//! - [`objective`]: the denoising objective of diffusers' training scripts (noising, ε or v target,
//!   min-SNR-γ weighting, mean squared error).
//! - [`optimizer`]: AdamW as PyTorch computes it, and gradient-norm clipping.
//! - [`schedule`]: learning-rate schedules with warm-up.
//! - [`dataset`]: captioned training images (diffusers' metadata.jsonl, kohya's concept folders,
//!   `.txt` captions).
//! - [`run`]: a LoRA training run from a dataset to a kohya file.

pub mod dataset;
pub mod lora;
pub mod objective;
pub mod optimizer;
pub mod run;
pub mod schedule;
