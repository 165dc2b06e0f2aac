//! The self-attention (double UNet) family: a reference pass through a UNet whose layer tensors are
//! captured by hooks, then joined into the main pass's self-attention or used to renormalise its
//! features.

pub mod reference;

pub use reference::{ReferenceMode, ReferenceOnly, ReferenceSettings};
