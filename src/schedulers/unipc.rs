//! UniPC multistep sampling (Zhao et al. 2023), as diffusers' `UniPCMultistepScheduler`.
//!
//! Every step first corrects the incoming sample with the UniC corrector (the new model output
//! against the previous step's prediction, skipped on the first step and for the steps in
//! `disable_corrector`), then predicts the next sample with the UniP predictor of order up to
//! `solver_order` (warm-up and, with `lower_order_final`, cool-down at lower orders). Both work in
//! lambda = log(alpha/sigma) on x0 predictions (`predict_x0`, default) or noise predictions, with
//! the `bh1` or `bh2` (default) B(h). Timesteps and sigmas as DPM-Solver's multistep schedule;
//! the coefficient systems are solved in float32 like diffusers' `torch.linalg.solve`.

use candle_core::Tensor;

use super::betas::{LINEAR_DEFAULTS, Train, check_range};
use super::dpm_solver::{alpha_sigma_lambda, converted, multistep_timesteps};
use super::euler::floor_zero_snr;
use super::sigmas::{Conversion, interp, sigma_table};
use super::{NoiseSource, Prediction, Scheduler, SchedulerConfig, div, lin2, mul};
use crate::Result;

pub(crate) struct UniPc {
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    prediction: Prediction,
    predict_x0: bool,
    bh2: bool,
    order: usize,
    lower_order_final: bool,
    disable_corrector: Vec<usize>,
    // state
    model_outputs: Vec<Option<Tensor>>,
    last_sample: Option<Tensor>,
    this_order: usize,
    lower_order_nums: usize,
}

/// Solves the small system `a x = b` in float32 by Gaussian elimination with partial pivoting.
fn solve(mut a: Vec<Vec<f32>>, mut b: Vec<f32>) -> Vec<f32> {
    let n = b.len();
    for col in 0..n {
        let pivot = (col..n).max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs())).expect("n >= 1");
        a.swap(col, pivot);
        b.swap(col, pivot);
        let (top, rest) = a.split_at_mut(col + 1);
        let pivot_row = &top[col];
        for (offset, row) in rest.iter_mut().enumerate() {
            let f = row[col] / pivot_row[col];
            for (x, p) in row[col..].iter_mut().zip(&pivot_row[col..]) {
                *x -= f * p;
            }
            b[col + 1 + offset] -= f * b[col];
        }
    }
    let mut x = vec![0.0f32; n];
    for row in (0..n).rev() {
        let s: f32 = (row + 1..n).map(|k| a[row][k] * x[k]).sum();
        x[row] = (b[row] - s) / a[row][row];
    }
    x
}

impl UniPc {
    pub fn new(cfg: &SchedulerConfig, n: usize) -> Result<Self> {
        const CLASS: &str = "UniPCMultistepScheduler";
        cfg.reject_thresholding(CLASS)?;
        let prediction = cfg.prediction(CLASS, &[Prediction::Epsilon, Prediction::Velocity, Prediction::Sample])?;
        if cfg.use_flow_sigmas == Some(true) {
            return Err(cfg.bad_value("use_flow_sigmas", true, "flow sigmas are not supported"));
        }
        let bh2 = match cfg.solver_type.as_deref().unwrap_or("bh2") {
            "bh1" => false,
            "bh2" | "midpoint" | "heun" | "logrho" => true,
            other => return Err(cfg.bad_value("solver_type", format!("`{other}`"), "valid: bh1, bh2")),
        };
        let order = cfg.solver_order.unwrap_or(2);
        if !(1..=3).contains(&order) {
            return Err(cfg.bad_value("solver_order", order, "valid: 1, 2, 3"));
        }
        let final_zero = match cfg.final_sigmas_type.as_deref().unwrap_or("zero") {
            "zero" => true,
            "sigma_min" => false,
            other => {
                return Err(cfg.bad_value("final_sigmas_type", format!("`{other}`"), "valid: zero, sigma_min"));
            }
        };
        let mut train = Train::new(cfg, &LINEAR_DEFAULTS, true)?;
        floor_zero_snr(&mut train);
        let t_train = train.num_train_timesteps;
        let table = sigma_table(&train.alphas_cumprod);
        let mut ints = multistep_timesteps(cfg, t_train, t_train, n)?;
        let mut sigmas: Vec<f64>;
        let last = match Conversion::from_config(cfg)? {
            Some(conv) => {
                (sigmas, ints) = converted(conv, &table, (cfg.sigma_min, cfg.sigma_max), n, |t| match conv {
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
        sigmas.push(if final_zero { 0.0 } else { last });
        Ok(UniPc {
            timesteps: ints.iter().map(|&t| t as f64).collect(),
            sigmas: sigmas.into_iter().map(|s| s as f32).collect(),
            prediction,
            predict_x0: cfg.predict_x0.unwrap_or(true),
            bh2,
            order,
            lower_order_final: cfg.lower_order_final.unwrap_or(true),
            disable_corrector: cfg.disable_corrector.clone().unwrap_or_default(),
            model_outputs: vec![None; order],
            last_sample: None,
            this_order: 0,
            lower_order_nums: 0,
        })
    }

    /// diffusers' `convert_model_output`: x0 (`predict_x0`) or eps.
    fn convert(&self, model_output: &Tensor, sample: &Tensor, i: usize) -> Result<Tensor> {
        let (alpha_t, sigma_t, _) = alpha_sigma_lambda(self.sigmas[i]);
        Ok(if self.predict_x0 {
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

    /// The stored converted output `back` steps ago (0 = the newest).
    fn output(&self, back: usize) -> &Tensor {
        self.model_outputs[self.model_outputs.len() - 1 - back].as_ref().expect("history")
    }

    /// The shared terms of the predictor and the corrector from sigma index `s0` to `t`, with
    /// `hist` = (sigma index, steps back) of each older output.
    fn terms(&self, t: usize, s0: usize, hist: &[(usize, usize)], order: usize) -> Result<Terms> {
        let (_, _, lambda_t) = alpha_sigma_lambda(self.sigmas[t]);
        let (_, _, lambda_s0) = alpha_sigma_lambda(self.sigmas[s0]);
        let h = lambda_t - lambda_s0;
        let m0 = self.output(0);
        let mut rks = Vec::new();
        let mut d1s = Vec::new();
        for &(si, back) in hist.iter().take(order - 1) {
            let (_, _, lambda_si) = alpha_sigma_lambda(self.sigmas[si]);
            let rk = (lambda_si - lambda_s0) / h;
            d1s.push(div(&(self.output(back) - m0)?, rk)?);
            rks.push(rk);
        }
        rks.push(1.0);
        let hh = if self.predict_x0 { -h } else { h };
        let h_phi_1 = hh.exp_m1();
        let mut h_phi_k = h_phi_1 / hh - 1.0;
        let mut factorial = 1u64;
        let b_h = if self.bh2 { hh.exp_m1() } else { hh };
        let mut r = Vec::new();
        let mut b = Vec::new();
        for i in 1..=order {
            r.push(rks.iter().map(|&rk| rk.powi(i as i32 - 1)).collect::<Vec<f32>>());
            b.push(h_phi_k * factorial as f32 / b_h);
            factorial *= i as u64 + 1;
            h_phi_k = h_phi_k / hh - (1.0 / factorial as f64) as f32;
        }
        Ok(Terms { d1s, h_phi_1, b_h, r, b })
    }

    /// The base update `x_t_` from `x` at sigma index `s0` to `t` with the newest output `m0`.
    fn base(&self, t: usize, s0: usize, x: &Tensor, m0: &Tensor, h_phi_1: f32) -> Result<Tensor> {
        let (alpha_t, sigma_t, _) = alpha_sigma_lambda(self.sigmas[t]);
        let (alpha_s0, sigma_s0, _) = alpha_sigma_lambda(self.sigmas[s0]);
        Ok(if self.predict_x0 {
            (mul(x, sigma_t / sigma_s0)? - mul(m0, alpha_t * h_phi_1)?)?
        } else {
            (mul(x, alpha_t / alpha_s0)? - mul(m0, sigma_t * h_phi_1)?)?
        })
    }

    /// The scale of the correction terms: alpha_t·B(h) (x0) or sigma_t·B(h) (eps).
    fn res_scale(&self, t: usize, b_h: f32) -> f32 {
        let (alpha_t, sigma_t, _) = alpha_sigma_lambda(self.sigmas[t]);
        if self.predict_x0 { alpha_t * b_h } else { sigma_t * b_h }
    }

    /// diffusers' `multistep_uni_p_bh_update` at step `i`.
    fn predictor(&self, i: usize, x: &Tensor, order: usize) -> Result<Tensor> {
        let hist: Vec<(usize, usize)> = (1..order).map(|k| (i - k, k)).collect();
        let Terms { d1s, h_phi_1, b_h, r, b } = self.terms(i + 1, i, &hist, order)?;
        let x_t = self.base(i + 1, i, x, self.output(0), h_phi_1)?;
        if d1s.is_empty() {
            return Ok(x_t);
        }
        let rhos = if order == 2 {
            vec![0.5f32]
        } else {
            let m = order - 1;
            solve(r[..m].iter().map(|row| row[..m].to_vec()).collect(), b[..m].to_vec())
        };
        let pred_res = weighted(&rhos, &d1s)?;
        Ok((x_t - mul(&pred_res, self.res_scale(i + 1, b_h))?)?)
    }

    /// diffusers' `multistep_uni_c_bh_update` at step `i` (before the new output is stored).
    fn corrector(&self, i: usize, model_t: &Tensor, last: &Tensor, order: usize) -> Result<Tensor> {
        let hist: Vec<(usize, usize)> = (1..order).map(|k| (i - (k + 1), k)).collect();
        let Terms { d1s, h_phi_1, b_h, r, b } = self.terms(i, i - 1, &hist, order)?;
        let m0 = self.output(0);
        let x_t = self.base(i, i - 1, last, m0, h_phi_1)?;
        let rhos = if order == 1 { vec![0.5f32] } else { solve(r, b) };
        let d1_t = (model_t - m0)?;
        let last_term = mul(&d1_t, rhos[order - 1])?;
        let res = if d1s.is_empty() { last_term } else { (weighted(&rhos[..order - 1], &d1s)? + last_term)? };
        Ok((x_t - mul(&res, self.res_scale(i, b_h))?)?)
    }
}

/// What the predictor and the corrector share.
struct Terms {
    /// (m_i − m0) / r_i for the older outputs.
    d1s: Vec<Tensor>,
    /// h·phi_1(h) = expm1(hh).
    h_phi_1: f32,
    /// B(h): hh (bh1) or expm1(hh) (bh2).
    b_h: f32,
    /// The system R rho = b: rows R[k] = r^k (the r of the older outputs, then 1).
    r: Vec<Vec<f32>>,
    b: Vec<f32>,
}

/// `einsum("k,bkc...->bc...", rhos, D1s)`: sum_k rhos[k] · D1s[k].
fn weighted(rhos: &[f32], d1s: &[Tensor]) -> Result<Tensor> {
    let mut acc = mul(&d1s[0], rhos[0])?;
    for (rho, d) in rhos.iter().zip(d1s).skip(1) {
        acc = (acc + mul(d, *rho)?)?;
    }
    Ok(acc)
}

impl Scheduler for UniPc {
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
        let converted = self.convert(model_output, sample, i)?;
        let sample = match &self.last_sample {
            Some(last) if i > 0 && !self.disable_corrector.contains(&(i - 1)) => {
                self.corrector(i, &converted, last, self.this_order)?
            }
            _ => sample.clone(),
        };
        self.model_outputs.rotate_left(1);
        *self.model_outputs.last_mut().expect("order >= 1") = Some(converted);
        let this_order = if self.lower_order_final { self.order.min(self.timesteps.len() - i) } else { self.order };
        self.this_order = this_order.min(self.lower_order_nums + 1);
        let prev = self.predictor(i, &sample, self.this_order)?;
        self.last_sample = Some(sample);
        if self.lower_order_nums < self.order {
            self.lower_order_nums += 1;
        }
        Ok(prev)
    }
}
