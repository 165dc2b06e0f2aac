//! diffctl: controllable text-to-image diffusion.
//!
//! One UNet with named injection points ([`models::unet::UNetControls`]) and one sampling loop
//! ([`pipeline`]); each control mechanism ([`control`]) plugs into those points.

pub mod allocator;
pub mod cli;
pub mod control;
pub mod error;
pub mod io;
pub mod kernels;
pub mod limits;
pub mod models;
pub mod noise;
pub mod pipeline;
pub mod preprocess;
pub mod prompt;
pub mod request;
pub mod schedulers;
pub mod server;
pub mod tokenizer;
pub mod train;

pub use error::{Error, Result};
