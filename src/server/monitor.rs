//! The running job's watcher inside the sampling loop: a [`Control`] that contributes nothing,
//! keeps the latest latents for previews and stops the generation when the job is cancelled.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::Tensor;

use crate::control::{Control, StepContext};
use crate::models::unet::UNetControls;
use crate::{Error, Result};

/// The message a cancelled generation fails with.
pub const INTERRUPTED: &str = "the job was interrupted";

/// Watches one generation: see the module doc.
pub struct JobMonitor {
    cancel: Arc<AtomicBool>,
    latents: Arc<Mutex<Option<Tensor>>>,
}

impl JobMonitor {
    /// A monitor stopping at the next step once `cancel` is set and keeping each step's UNet input
    /// (conditional half with guidance) in `latents`.
    pub fn new(cancel: Arc<AtomicBool>, latents: Arc<Mutex<Option<Tensor>>>) -> Self {
        Self { cancel, latents }
    }
}

impl Control for JobMonitor {
    fn name(&self) -> &str {
        "job monitor"
    }

    fn contribute(&mut self, step: &mut StepContext) -> Result<UNetControls> {
        if self.cancel.load(Ordering::Relaxed) {
            return Err(Error::invalid(INTERRUPTED));
        }
        let latents = if step.guided {
            let n = step.latents.dim(0)?;
            step.latents.narrow(0, n / 2, n / 2)?
        } else {
            step.latents.clone()
        };
        *self.latents.lock().unwrap_or_else(|p| p.into_inner()) = Some(latents);
        Ok(UNetControls::default())
    }
}
