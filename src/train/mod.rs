//! Training: the pieces `diffctl train` is built from, each as small as the step it takes.
//!
//! Models train through their ordinary forward pass. The 3x3 convolution and GroupNorm kernels (see
//! [`crate::kernels`]) carry their own backward passes; the other CPU kernels have none, so wherever
//! their input tracks gradients (a trainable variable, or a value computed from one) candle's
//! differentiable ops run instead. The frozen part of a model that no gradient reaches keeps the fast
//! kernels.
//!
//! - [`lora`]: trainable low-rank adapters attached to a model's layers, exported in kohya's layout.
//! - [`objective`]: the denoising objective of diffusers' training scripts (noising, ε or v target,
//!   min-SNR-γ weighting, mean squared error).
//! - [`optimizer`]: the optimiser interface, AdamW as PyTorch computes it, and gradient-norm
//!   clipping; [`adafactor`]: Adafactor as transformers computes it.
//! - [`schedule`]: learning-rate schedules with warm-up.
//! - [`ema`]: the exponential moving average of the weights a run may export.
//! - [`buckets`]: aspect-ratio buckets (kohya's), batches of one bucket each.
//! - [`dataset`]: captioned training images (diffusers' metadata.jsonl, kohya's concept folders,
//!   `.txt` captions).
//! - [`run`]: a training run from a dataset to its exported result (LoRA, textual inversion, full
//!   fine-tuning), and the step loop every kind shares.
//! - [`controlnet`]: ControlNet training, to a diffusers ControlNet folder.
//! - [`t2i_adapter`]: T2I-Adapter training, to a diffusers T2IAdapter folder.
//! - [`ip_adapter`]: IP-Adapter training, to an h94-layout file.
//! - [`dreambooth`]: DreamBooth (full or LoRA) with prior preservation on class images the model
//!   generates.
//! - [`init`]: PyTorch's default initialisation for networks created from nothing.

pub mod adafactor;
pub mod buckets;
pub mod controlnet;
pub mod dataset;
pub mod dreambooth;
pub mod ema;
pub mod init;
pub mod ip_adapter;
pub mod lora;
pub mod objective;
pub mod optimizer;
pub mod run;
pub mod schedule;
pub mod t2i_adapter;
