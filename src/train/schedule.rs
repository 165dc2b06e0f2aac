//! Learning-rate schedules as diffusers' `get_scheduler` builds them (a LambdaLR evaluated at the
//! number of optimiser steps taken before the current one, so a warm-up starts at 0).

use std::f64::consts::PI;

use crate::{Error, Result};

/// The shape of the learning rate over a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LrSchedule {
    /// The base rate throughout (after the warm-up, if any).
    #[default]
    Constant,
    /// Falls linearly to 0 at the last step after the warm-up.
    Linear,
    /// Half a cosine from the base rate to 0 after the warm-up.
    Cosine,
}

impl LrSchedule {
    /// The schedule called `name` (`constant`, `constant_with_warmup`, `linear`, `cosine`, as in
    /// diffusers' `--lr_scheduler`; a warm-up is set separately).
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "constant" | "constant_with_warmup" => Ok(Self::Constant),
            "linear" => Ok(Self::Linear),
            "cosine" => Ok(Self::Cosine),
            other => Err(Error::invalid(format!(
                "unknown learning-rate schedule `{other}` (valid: constant, constant_with_warmup, linear, cosine)"
            ))),
        }
    }

    /// The factor on the base rate for the step after `done` steps, of `total`, `warmup` of them
    /// warming up linearly from 0.
    pub fn factor(self, done: usize, total: usize, warmup: usize) -> f64 {
        if done < warmup {
            return done as f64 / warmup.max(1) as f64;
        }
        let progress = (done - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
        match self {
            Self::Constant => 1.0,
            Self::Linear => ((total - done.min(total)) as f64 / total.saturating_sub(warmup).max(1) as f64).max(0.0),
            Self::Cosine => (0.5 * (1.0 + (PI * progress).cos())).max(0.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// diffusers' lambdas: warm-up done/warmup, then constant 1, linear (total − done)/(total −
    /// warmup), cosine 0.5·(1 + cos(π·progress)).
    #[test]
    fn factors_follow_diffusers() {
        assert_eq!(LrSchedule::Constant.factor(0, 100, 10), 0.0);
        assert_eq!(LrSchedule::Constant.factor(5, 100, 10), 0.5);
        assert_eq!(LrSchedule::Constant.factor(50, 100, 10), 1.0);
        assert_eq!(LrSchedule::Linear.factor(10, 100, 10), 1.0);
        assert!((LrSchedule::Linear.factor(55, 100, 10) - 0.5).abs() < 1e-12);
        assert!((LrSchedule::Cosine.factor(55, 100, 10) - 0.5).abs() < 1e-12);
        assert!(LrSchedule::Cosine.factor(100, 100, 10).abs() < 1e-12);
        assert_eq!(LrSchedule::Cosine.factor(0, 100, 0), 1.0);
        assert_eq!(LrSchedule::from_name("constant_with_warmup").unwrap(), LrSchedule::Constant);
        assert!(LrSchedule::from_name("polynomial").unwrap_err().to_string().contains("valid: constant"));
    }
}
