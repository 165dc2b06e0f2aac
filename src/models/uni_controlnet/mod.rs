//! Uni-ControlNet (Zhao et al. 2023): a local adapter that turns several condition maps, stacked
//! along the channels, into ControlNet-style residuals, and a global adapter that turns an image
//! embedding into extra text-context tokens. Either may be absent (the `local` and `global`
//! training modes); the public uni.ckpt has both.

pub mod global_adapter;
pub mod local_adapter;

pub use global_adapter::{GlobalAdapter, GlobalAdapterConfig};
pub use local_adapter::{CONDITION_SCALE, LocalAdapter, LocalAdapterConfig};

/// A loaded Uni-ControlNet.
#[derive(Debug)]
pub struct UniControlNet {
    /// Condition maps → residuals.
    pub local: Option<LocalAdapter>,
    /// Image embedding → context tokens.
    pub global: Option<GlobalAdapter>,
}
