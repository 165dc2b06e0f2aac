//! Decoupled cross-attention: mechanisms that add key/value streams to the UNet's cross-attention
//! (`attn2`) layers through [`crate::models::unet::UNetControls::extra_attention`].

pub mod image_projection;
pub mod ip_adapter;
pub mod mask;
pub mod scale;

pub use image_projection::{ImageProjection, ProjectionInput};
pub use ip_adapter::{ImagePromptEmbeds, IpAdapter, IpAdapterWeights};
pub use mask::RegionMask;
pub use scale::IpScale;
