//! DEIS multistep sampling (Zhang & Chen 2023, log-rho variant), as diffusers'
//! `DEISMultistepScheduler`.
//!
//! The model output is converted to a noise prediction (through x0); each step integrates the
//! exponential integrator with a Lagrange polynomial in log(rho), rho = sigma_t / alpha_t, over the
//! last `solver_order` (1 to 3) outputs, with the same warm-up and `lower_order_final` rules as
//! DPM-Solver. Timesteps as DPM-Solver's multistep schedule; the final sigma is the smallest
//! training sigma (diffusers' DEIS has no `final_sigmas_type`), or the last converted sigma.

use candle_core::Tensor;

use super::betas::{LINEAR_DEFAULTS, Train, check_range};
use super::dpm_solver::{alpha_sigma_lambda, converted, multistep_timesteps};
use super::sigmas::{Conversion, interp, sigma_table};
use super::{NoiseSource, Prediction, Scheduler, SchedulerConfig, div, lin2, mul};
use crate::Result;

pub(crate) struct Deis {
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    prediction: Prediction,
    order: usize,
    lower_order_final: bool,
    model_outputs: Vec<Option<Tensor>>,
    lower_order_nums: usize,
}

impl Deis {
    pub fn new(cfg: &SchedulerConfig, n: usize) -> Result<Self> {
        const CLASS: &str = "DEISMultistepScheduler";
        cfg.reject_thresholding(CLASS)?;
        let prediction = cfg.prediction(CLASS, &[Prediction::Epsilon, Prediction::Velocity, Prediction::Sample])?;
        if cfg.use_flow_sigmas == Some(true) {
            return Err(cfg.bad_value("use_flow_sigmas", true, "flow sigmas are not supported"));
        }
        let order = cfg.solver_order.unwrap_or(2);
        if !(1..=3).contains(&order) {
            return Err(cfg.bad_value("solver_order", order, "valid: 1, 2, 3"));
        }
        let train = Train::new(cfg, &LINEAR_DEFAULTS, false)?;
        let t_train = train.num_train_timesteps;
        let table = sigma_table(&train.alphas_cumprod);
        let mut ints = multistep_timesteps(cfg, t_train, t_train, n)?;
        let mut sigmas: Vec<f64>;
        let last = match Conversion::from_config(cfg)? {
            Some(conv) => {
                (sigmas, ints) = converted(conv, &table, (None, None), n, |t| match conv {
                    Conversion::Karras => t.round_ties_even() as i64,
                    _ => t as i64,
                });
                *sigmas.last().expect("n >= 1")
            }
            None => {
                sigmas = ints.iter().map(|&t| interp(t as f64, &table)).collect();
                table[0] as f64
            }
        };
        check_range(cfg, &ints, t_train)?;
        sigmas.push(last);
        Ok(Deis {
            timesteps: ints.iter().map(|&t| t as f64).collect(),
            sigmas: sigmas.into_iter().map(|s| s as f32).collect(),
            prediction,
            order,
            lower_order_final: cfg.lower_order_final.unwrap_or(true),
            model_outputs: vec![None; order],
            lower_order_nums: 0,
        })
    }

    /// diffusers' `convert_model_output`: x0 from the model output, then eps = (x − alpha x0) / sigma.
    fn convert(&self, model_output: &Tensor, sample: &Tensor, i: usize) -> Result<Tensor> {
        let (alpha_t, sigma_t, _) = alpha_sigma_lambda(self.sigmas[i]);
        let x0 = match self.prediction {
            Prediction::Epsilon => div(&(sample - mul(model_output, sigma_t)?)?, alpha_t)?,
            Prediction::Sample => model_output.clone(),
            Prediction::Velocity => (mul(sample, alpha_t)? - mul(model_output, sigma_t)?)?,
        };
        div(&(sample - mul(&x0, alpha_t)?)?, sigma_t)
    }

    fn output(&self, back: usize) -> &Tensor {
        self.model_outputs[self.model_outputs.len() - 1 - back].as_ref().expect("history")
    }

    /// rho = sigma_t / alpha_t at sigma index `i`, and alpha_t.
    fn rho(&self, i: usize) -> (f32, f32) {
        let (alpha, sigma, _) = alpha_sigma_lambda(self.sigmas[i]);
        (sigma / alpha, alpha)
    }

    fn first_order(&self, i: usize, m: &Tensor, sample: &Tensor) -> Result<Tensor> {
        let (alpha_t, sigma_t, lambda_t) = alpha_sigma_lambda(self.sigmas[i + 1]);
        let (alpha_s, _, lambda_s) = alpha_sigma_lambda(self.sigmas[i]);
        let h = lambda_t - lambda_s;
        Ok((mul(sample, alpha_t / alpha_s)? - mul(m, sigma_t * (h.exp() - 1.0))?)?)
    }

    fn second_order(&self, i: usize, sample: &Tensor) -> Result<Tensor> {
        let (rho_t, alpha_t) = self.rho(i + 1);
        let (rho_s0, alpha_s0) = self.rho(i);
        let (rho_s1, _) = self.rho(i - 1);
        let ind = |t: f32, b: f32, c: f32| t * (-c.ln() + t.ln() - 1.0) / (b.ln() - c.ln());
        let coef1 = ind(rho_t, rho_s0, rho_s1) - ind(rho_s0, rho_s0, rho_s1);
        let coef2 = ind(rho_t, rho_s1, rho_s0) - ind(rho_s0, rho_s1, rho_s0);
        let x = (div(sample, alpha_s0)? + mul(self.output(0), coef1)?)?;
        let x = (x + mul(self.output(1), coef2)?)?;
        mul(&x, alpha_t)
    }

    fn third_order(&self, i: usize, sample: &Tensor) -> Result<Tensor> {
        let (rho_t, alpha_t) = self.rho(i + 1);
        let (rho_s0, alpha_s0) = self.rho(i);
        let (rho_s1, _) = self.rho(i - 1);
        let (rho_s2, _) = self.rho(i - 2);
        let ind = |t: f32, b: f32, c: f32, d: f32| {
            let (lt, lb, lc, ld) = (t.ln(), b.ln(), c.ln(), d.ln());
            let numerator = t * (lc * (ld - lt + 1.0) - ld * lt + ld + lt * lt - 2.0 * lt + 2.0);
            numerator / ((lb - lc) * (lb - ld))
        };
        let coef1 = ind(rho_t, rho_s0, rho_s1, rho_s2) - ind(rho_s0, rho_s0, rho_s1, rho_s2);
        let coef2 = ind(rho_t, rho_s1, rho_s2, rho_s0) - ind(rho_s0, rho_s1, rho_s2, rho_s0);
        let coef3 = ind(rho_t, rho_s2, rho_s0, rho_s1) - ind(rho_s0, rho_s2, rho_s0, rho_s1);
        let x = (div(sample, alpha_s0)? + mul(self.output(0), coef1)?)?;
        let x = (x + mul(self.output(1), coef2)?)?;
        let x = (x + mul(self.output(2), coef3)?)?;
        mul(&x, alpha_t)
    }
}

impl Scheduler for Deis {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        let (alpha, sigma, _) = alpha_sigma_lambda(self.sigmas[step_index]);
        lin2(alpha, original, sigma, noise)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        _noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let i = step_index;
        let len = self.timesteps.len();
        let lower_order_final = i == len - 1 && self.lower_order_final && len < 15;
        let lower_order_second = i + 2 == len && self.lower_order_final && len < 15;
        let m = self.convert(model_output, sample, i)?;
        self.model_outputs.rotate_left(1);
        *self.model_outputs.last_mut().expect("order >= 1") = Some(m.clone());
        let prev = if self.order == 1 || self.lower_order_nums < 1 || lower_order_final {
            self.first_order(i, &m, sample)?
        } else if self.order == 2 || self.lower_order_nums < 2 || lower_order_second {
            self.second_order(i, sample)?
        } else {
            self.third_order(i, sample)?
        };
        if self.lower_order_nums < self.order {
            self.lower_order_nums += 1;
        }
        Ok(prev)
    }
}
