//! Multistep DPM-Solver / DPM-Solver++ (Lu et al. 2022), as diffusers'
//! `DPMSolverMultistepScheduler`.
//!
//! The model output is converted to an x0 prediction (`dpmsolver++`, `sde-dpmsolver++`) or an eps
//! prediction (`dpmsolver`, `sde-dpmsolver`); each step then integrates in lambda = log(alpha/sigma)
//! using the last `solver_order` (1 to 3) converted outputs, with `midpoint` or `heun`
//! second-order terms. The first steps use lower orders; `lower_order_final` (and a `zero` final
//! sigma, or `euler_at_final`) makes the last step first order, and fewer than 15 steps also makes
//! the second-to-last at most second order. The SDE variants add fresh noise at every step.
//! Sigmas are the training sigmas at the integer timesteps (the spacing's or given ones), or a
//! Karras, exponential or beta schedule (timesteps mapped back and made integer). Scalars are
//! float32 like diffusers'.

use candle_core::Tensor;

use super::betas::{LINEAR_DEFAULTS, Spacing, Train, check_range, np_arange, np_linspace};
use super::euler::floor_zero_snr;
use super::sigmas::{Conversion, interp, log_table, sigma_table, sigma_to_t};
use super::{NoiseSource, Prediction, Scheduler, SchedulerConfig, div, lin2, mul};
use crate::Result;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Algorithm {
    DpmSolverPp,
    SdeDpmSolverPp,
    DpmSolver,
    SdeDpmSolver,
}

impl Algorithm {
    fn is_sde(self) -> bool {
        matches!(self, Algorithm::SdeDpmSolverPp | Algorithm::SdeDpmSolver)
    }
    fn predicts_x0(self) -> bool {
        matches!(self, Algorithm::DpmSolverPp | Algorithm::SdeDpmSolverPp)
    }
}

pub(crate) struct DpmSolver {
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    prediction: Prediction,
    algorithm: Algorithm,
    heun: bool,
    order: usize,
    lower_order_final: bool,
    euler_at_final: bool,
    final_zero: bool,
    // state
    model_outputs: Vec<Option<Tensor>>,
    lower_order_nums: usize,
}

/// The integer timesteps of the multistep solvers (DPM-Solver, UniPC, DEIS): `n + 1` points of the
/// spacing with the last dropped (`trailing`: `n` points), up to `last_timestep` (the training
/// count, or less when `lambda_min_clipped` cuts the end).
pub(crate) fn multistep_timesteps(
    cfg: &SchedulerConfig,
    t_train: usize,
    last_timestep: usize,
    n: usize,
) -> Result<Vec<i64>> {
    let spacing = Spacing::from_config(cfg, Spacing::Linspace)?;
    Ok(match spacing {
        Spacing::Linspace => {
            let mut v: Vec<i64> = np_linspace(0.0, last_timestep as f64 - 1.0, n + 1, true)
                .into_iter()
                .map(|x| x.round_ties_even() as i64)
                .collect();
            v.reverse();
            v.pop();
            v
        }
        Spacing::Leading => {
            let ratio = last_timestep / (n + 1);
            (1..=n).rev().map(|i| (i * ratio) as i64 + cfg.steps_offset.unwrap_or(0)).collect()
        }
        Spacing::Trailing => np_arange(last_timestep as f64, 0.0, -(t_train as f64 / n as f64))
            .into_iter()
            .map(|x| x.round_ties_even() as i64 - 1)
            .collect(),
    })
}

/// The multistep solvers' converted schedule: `n` sigmas between the bounds (the config's, else the
/// table's ends) and their timesteps mapped back by [`sigma_to_t`] and made integer by `to_int`.
pub(crate) fn converted(
    conv: Conversion,
    table: &[f32],
    bounds: (Option<f64>, Option<f64>),
    n: usize,
    to_int: impl Fn(f64) -> i64,
) -> (Vec<f64>, Vec<i64>) {
    let sigma_min = bounds.0.unwrap_or(table[0] as f64);
    let sigma_max = bounds.1.unwrap_or(*table.last().expect("non-empty") as f64);
    let sigmas = conv.apply(sigma_min, sigma_max, n);
    let logs = log_table(table);
    let ints = sigmas.iter().map(|&s| to_int(sigma_to_t(s, &logs))).collect();
    (sigmas, ints)
}

/// alpha_t = 1 / sqrt(sigma^2 + 1), sigma_t = sigma * alpha_t, lambda = log alpha_t - log sigma_t.
pub(crate) fn alpha_sigma_lambda(sigma: f32) -> (f32, f32, f32) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    let sig = sigma * alpha;
    (alpha, sig, alpha.ln() - sig.ln())
}

impl DpmSolver {
    /// `custom` timesteps replace the spacing (diffusers' `set_timesteps(timesteps=...)`).
    pub fn new(cfg: &SchedulerConfig, n: usize, custom: Option<&[f64]>) -> Result<Self> {
        const CLASS: &str = "DPMSolverMultistepScheduler";
        cfg.reject_thresholding(CLASS)?;
        let prediction = cfg.prediction(CLASS, &[Prediction::Epsilon, Prediction::Velocity, Prediction::Sample])?;
        for (field, value) in [("use_lu_lambdas", cfg.use_lu_lambdas), ("use_flow_sigmas", cfg.use_flow_sigmas)] {
            if value == Some(true) {
                return Err(cfg.bad_value(
                    field,
                    true,
                    "only use_karras_sigmas, use_exponential_sigmas and use_beta_sigmas are supported",
                ));
            }
        }
        let conversion = Conversion::from_config(cfg)?;
        if let Some(v @ ("learned" | "learned_range")) = cfg.variance_type.as_deref() {
            return Err(cfg.bad_value(
                "variance_type",
                format!("`{v}`"),
                "learned variances are not supported by DPMSolverMultistepScheduler here",
            ));
        }
        let algorithm = match cfg.algorithm_type.as_deref().unwrap_or("dpmsolver++") {
            "dpmsolver++" | "deis" => Algorithm::DpmSolverPp,
            "sde-dpmsolver++" => Algorithm::SdeDpmSolverPp,
            "dpmsolver" => Algorithm::DpmSolver,
            "sde-dpmsolver" => Algorithm::SdeDpmSolver,
            other => {
                return Err(cfg.bad_value(
                    "algorithm_type",
                    format!("`{other}`"),
                    "valid: dpmsolver++, sde-dpmsolver++, dpmsolver, sde-dpmsolver",
                ));
            }
        };
        let heun = match cfg.solver_type.as_deref().unwrap_or("midpoint") {
            "midpoint" | "logrho" | "bh1" | "bh2" => false,
            "heun" => true,
            other => {
                return Err(cfg.bad_value("solver_type", format!("`{other}`"), "valid: midpoint, heun"));
            }
        };
        let order = cfg.solver_order.unwrap_or(2);
        if !(1..=3).contains(&order) {
            return Err(cfg.bad_value("solver_order", order, "valid: 1, 2, 3"));
        }
        if order == 3 && algorithm == Algorithm::SdeDpmSolver {
            return Err(cfg.bad_value("solver_order", order, "sde-dpmsolver has no third-order update in diffusers"));
        }
        let final_zero = match cfg.final_sigmas_type.as_deref().unwrap_or("zero") {
            "zero" => true,
            "sigma_min" => false,
            other => {
                return Err(cfg.bad_value("final_sigmas_type", format!("`{other}`"), "valid: zero, sigma_min"));
            }
        };
        if final_zero && !algorithm.predicts_x0() {
            return Err(cfg.error(
                "`final_sigmas_type` = zero is not supported with `algorithm_type` dpmsolver / \
                 sde-dpmsolver; set it to sigma_min",
            ));
        }

        let mut train = Train::new(cfg, &LINEAR_DEFAULTS, true)?;
        floor_zero_snr(&mut train);
        let t_train = train.num_train_timesteps;
        let ac = &train.alphas_cumprod;
        // lambda_min_clipped: drop the timesteps whose lambda is below it
        let last_timestep = match cfg.lambda_min_clipped {
            Some(clip) if clip > f64::NEG_INFINITY => {
                let clip = clip as f32;
                let below = ac.iter().rev().filter(|&&a| a.sqrt().ln() - (1.0 - a).sqrt().ln() < clip).count();
                t_train - below
            }
            _ => t_train,
        };
        let mut ints = match custom {
            Some(ts) => ts.iter().map(|&t| t as i64).collect(),
            None => multistep_timesteps(cfg, t_train, last_timestep, n)?,
        };
        let table = sigma_table(ac);
        let mut sigmas: Vec<f64>;
        if let Some(conv) = conversion {
            (sigmas, ints) = converted(conv, &table, (cfg.sigma_min, cfg.sigma_max), n, |t| match conv {
                // Karras timesteps are rounded (truncated for the cosine schedule), the others truncated
                Conversion::Karras if !train.cosine => t.round_ties_even() as i64,
                _ => t as i64,
            });
        } else {
            sigmas = ints.iter().map(|&t| interp(t as f64, &table)).collect();
        }
        check_range(cfg, &ints, t_train)?;
        sigmas.push(if final_zero { 0.0 } else { table[0] as f64 });
        Ok(DpmSolver {
            timesteps: ints.iter().map(|&t| t as f64).collect(),
            sigmas: sigmas.into_iter().map(|s| s as f32).collect(),
            prediction,
            algorithm,
            heun,
            order,
            lower_order_final: cfg.lower_order_final.unwrap_or(true),
            euler_at_final: cfg.euler_at_final.unwrap_or(false),
            final_zero,
            model_outputs: vec![None; order],
            lower_order_nums: 0,
        })
    }

    /// diffusers' `convert_model_output`: x0 (++ variants) or eps (plain variants).
    fn convert(&self, model_output: &Tensor, sample: &Tensor, i: usize) -> Result<Tensor> {
        let (alpha_t, sigma_t, _) = alpha_sigma_lambda(self.sigmas[i]);
        Ok(if self.algorithm.predicts_x0() {
            match self.prediction {
                Prediction::Epsilon => div(&(sample - mul(model_output, sigma_t)?)?, alpha_t)?,
                Prediction::Sample => model_output.clone(),
                Prediction::Velocity => (mul(sample, alpha_t)? - mul(model_output, sigma_t)?)?,
            }
        } else {
            match self.prediction {
                Prediction::Epsilon => model_output.clone(),
                Prediction::Sample => div(&(sample - mul(model_output, alpha_t)?)?, sigma_t)?,
                Prediction::Velocity => lin2(alpha_t, model_output, sigma_t, sample)?,
            }
        })
    }

    fn first_order(&self, i: usize, m: &Tensor, sample: &Tensor, noise: Option<&Tensor>) -> Result<Tensor> {
        let (alpha_t, sigma_t, lambda_t) = alpha_sigma_lambda(self.sigmas[i + 1]);
        let (alpha_s, sigma_s, lambda_s) = alpha_sigma_lambda(self.sigmas[i]);
        let h = lambda_t - lambda_s;
        Ok(match self.algorithm {
            Algorithm::DpmSolverPp => (mul(sample, sigma_t / sigma_s)? - mul(m, alpha_t * ((-h).exp() - 1.0))?)?,
            Algorithm::DpmSolver => (mul(sample, alpha_t / alpha_s)? - mul(m, sigma_t * (h.exp() - 1.0))?)?,
            Algorithm::SdeDpmSolverPp => {
                let noise = noise.expect("sde noise");
                let x = lin2(sigma_t / sigma_s * (-h).exp(), sample, alpha_t * (1.0 - (-2.0 * h).exp()), m)?;
                (x + mul(noise, sigma_t * (1.0 - (-2.0 * h).exp()).sqrt())?)?
            }
            Algorithm::SdeDpmSolver => {
                let noise = noise.expect("sde noise");
                let x = (mul(sample, alpha_t / alpha_s)? - mul(m, 2.0 * (sigma_t * (h.exp() - 1.0)))?)?;
                (x + mul(noise, sigma_t * ((2.0 * h).exp() - 1.0).sqrt())?)?
            }
        })
    }

    fn second_order(&self, i: usize, sample: &Tensor, noise: Option<&Tensor>) -> Result<Tensor> {
        let k = self.model_outputs.len();
        let m0 = self.model_outputs[k - 1].as_ref().expect("history");
        let m1 = self.model_outputs[k - 2].as_ref().expect("history");
        let (alpha_t, sigma_t, lambda_t) = alpha_sigma_lambda(self.sigmas[i + 1]);
        let (alpha_s0, sigma_s0, lambda_s0) = alpha_sigma_lambda(self.sigmas[i]);
        let (_, _, lambda_s1) = alpha_sigma_lambda(self.sigmas[i - 1]);
        let h = lambda_t - lambda_s0;
        let h_0 = lambda_s0 - lambda_s1;
        let r0 = h_0 / h;
        let d0 = m0;
        let d1 = mul(&(m0 - m1)?, 1.0 / r0)?;
        let e = (-h).exp();
        let e2 = (-2.0 * h).exp();
        Ok(match (self.algorithm, self.heun) {
            (Algorithm::DpmSolverPp, false) => {
                let c = alpha_t * (e - 1.0);
                ((mul(sample, sigma_t / sigma_s0)? - mul(d0, c)?)? - mul(&d1, 0.5 * c)?)?
            }
            (Algorithm::DpmSolverPp, true) => {
                ((mul(sample, sigma_t / sigma_s0)? - mul(d0, alpha_t * (e - 1.0))?)?
                    + mul(&d1, alpha_t * ((e - 1.0) / h + 1.0))?)?
            }
            (Algorithm::DpmSolver, false) => {
                let c = sigma_t * (h.exp() - 1.0);
                ((mul(sample, alpha_t / alpha_s0)? - mul(d0, c)?)? - mul(&d1, 0.5 * c)?)?
            }
            (Algorithm::DpmSolver, true) => {
                ((mul(sample, alpha_t / alpha_s0)? - mul(d0, sigma_t * (h.exp() - 1.0))?)?
                    - mul(&d1, sigma_t * ((h.exp() - 1.0) / h - 1.0))?)?
            }
            (Algorithm::SdeDpmSolverPp, heun) => {
                let noise = noise.expect("sde noise");
                let c1 = if heun { alpha_t * ((1.0 - e2) / (-2.0 * h) + 1.0) } else { 0.5 * (alpha_t * (1.0 - e2)) };
                let x = ((mul(sample, sigma_t / sigma_s0 * e)? + mul(d0, alpha_t * (1.0 - e2))?)? + mul(&d1, c1)?)?;
                (x + mul(noise, sigma_t * (1.0 - e2).sqrt())?)?
            }
            (Algorithm::SdeDpmSolver, heun) => {
                let noise = noise.expect("sde noise");
                let c1 = if heun { 2.0 * (sigma_t * ((h.exp() - 1.0) / h - 1.0)) } else { sigma_t * (h.exp() - 1.0) };
                let x = ((mul(sample, alpha_t / alpha_s0)? - mul(d0, 2.0 * (sigma_t * (h.exp() - 1.0)))?)?
                    - mul(&d1, c1)?)?;
                (x + mul(noise, sigma_t * ((2.0 * h).exp() - 1.0).sqrt())?)?
            }
        })
    }

    fn third_order(&self, i: usize, sample: &Tensor, noise: Option<&Tensor>) -> Result<Tensor> {
        let k = self.model_outputs.len();
        let m0 = self.model_outputs[k - 1].as_ref().expect("history");
        let m1 = self.model_outputs[k - 2].as_ref().expect("history");
        let m2 = self.model_outputs[k - 3].as_ref().expect("history");
        let (alpha_t, sigma_t, lambda_t) = alpha_sigma_lambda(self.sigmas[i + 1]);
        let (alpha_s0, sigma_s0, lambda_s0) = alpha_sigma_lambda(self.sigmas[i]);
        let (_, _, lambda_s1) = alpha_sigma_lambda(self.sigmas[i - 1]);
        let (_, _, lambda_s2) = alpha_sigma_lambda(self.sigmas[i - 2]);
        let h = lambda_t - lambda_s0;
        let (h_0, h_1) = (lambda_s0 - lambda_s1, lambda_s1 - lambda_s2);
        let (r0, r1) = (h_0 / h, h_1 / h);
        let d0 = m0;
        let d1_0 = mul(&(m0 - m1)?, 1.0 / r0)?;
        let d1_1 = mul(&(m1 - m2)?, 1.0 / r1)?;
        let diff = (&d1_0 - &d1_1)?;
        let d1 = (&d1_0 + mul(&diff, r0 / (r0 + r1))?)?;
        let d2 = mul(&diff, 1.0 / (r0 + r1))?;
        let e = (-h).exp();
        Ok(match self.algorithm {
            Algorithm::DpmSolverPp => {
                (((mul(sample, sigma_t / sigma_s0)? - mul(d0, alpha_t * (e - 1.0))?)?
                    + mul(&d1, alpha_t * ((e - 1.0) / h + 1.0))?)?
                    - mul(&d2, alpha_t * ((e - 1.0 + h) / (h * h) - 0.5))?)?
            }
            Algorithm::DpmSolver => {
                let eh = h.exp();
                (((mul(sample, alpha_t / alpha_s0)? - mul(d0, sigma_t * (eh - 1.0))?)?
                    - mul(&d1, sigma_t * ((eh - 1.0) / h - 1.0))?)?
                    - mul(&d2, sigma_t * ((eh - 1.0 - h) / (h * h) - 0.5))?)?
            }
            Algorithm::SdeDpmSolverPp => {
                let noise = noise.expect("sde noise");
                let e2 = (-2.0 * h).exp();
                let two_h = 2.0 * h;
                let x = (((mul(sample, sigma_t / sigma_s0 * e)? + mul(d0, alpha_t * (1.0 - e2))?)?
                    + mul(&d1, alpha_t * ((1.0 - e2) / (-2.0 * h) + 1.0))?)?
                    + mul(&d2, alpha_t * ((1.0 - e2 - 2.0 * h) / (two_h * two_h) - 0.5))?)?;
                (x + mul(noise, sigma_t * (1.0 - e2).sqrt())?)?
            }
            Algorithm::SdeDpmSolver => unreachable!("rejected in new()"),
        })
    }
}

impl Scheduler for DpmSolver {
    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        let (alpha, sigma, _) = alpha_sigma_lambda(self.sigmas[step_index]);
        lin2(alpha, original, sigma, noise)
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let i = step_index;
        let len = self.timesteps.len();
        let lower_order_final =
            i == len - 1 && (self.euler_at_final || (self.lower_order_final && len < 15) || self.final_zero);
        let lower_order_second = i + 2 == len && self.lower_order_final && len < 15;
        let m = self.convert(model_output, sample, i)?;
        self.model_outputs.rotate_left(1);
        *self.model_outputs.last_mut().expect("order >= 1") = Some(m.clone());
        let z = if self.algorithm.is_sde() {
            Some(noise.sample(model_output.dims(), model_output.device())?)
        } else {
            None
        };
        let prev = if self.order == 1 || self.lower_order_nums < 1 || lower_order_final {
            self.first_order(i, &m, sample, z.as_ref())?
        } else if self.order == 2 || self.lower_order_nums < 2 || lower_order_second {
            self.second_order(i, sample, z.as_ref())?
        } else {
            self.third_order(i, sample, z.as_ref())?
        };
        if self.lower_order_nums < self.order {
            self.lower_order_nums += 1;
        }
        Ok(prev)
    }
}
