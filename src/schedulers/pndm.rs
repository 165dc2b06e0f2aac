//! PNDM (Liu et al. 2022), as diffusers' `PNDMScheduler`: linear multistep (PLMS) on the
//! eps-predictions, warmed up either by a repeated first step (`skip_prk_steps`, Stable Diffusion's
//! setting: the schedule visits the second timestep twice, so it has one more entry than the number
//! of steps) or by three pseudo Runge-Kutta steps (12 model calls; the class default).
//!
//! Steps must be taken in order (the scheduler counts them, like diffusers).

use candle_core::Tensor;

use super::betas::{LINEAR_DEFAULTS, Spacing, Train, check_range, integer_timesteps};
use super::{NoiseSource, Prediction, Scheduler, SchedulerConfig, div, lin2, mul};
use crate::Result;

pub(crate) struct Pndm {
    train: Train,
    timesteps: Vec<f64>,
    ints: Vec<i64>,
    num_prk: usize,
    step_ratio: i64,
    final_alpha_cumprod: f32,
    prediction: Prediction,
    // state
    counter: usize,
    ets: Vec<Tensor>,
    cur_sample: Option<Tensor>,
    cur_model_output: Option<Tensor>,
}

impl Pndm {
    pub fn new(cfg: &SchedulerConfig, n: usize) -> Result<Self> {
        const CLASS: &str = "PNDMScheduler";
        let prediction = cfg.prediction(CLASS, &[Prediction::Epsilon, Prediction::Velocity])?;
        // PNDMScheduler has no rescale_betas_zero_snr / clip_sample / thresholding: ignored.
        let train = Train::new(cfg, &LINEAR_DEFAULTS, false)?;
        let t = train.num_train_timesteps;
        let spacing = Spacing::from_config(cfg, Spacing::Leading)?;
        let mut asc = integer_timesteps(cfg, spacing, t, n, cfg.steps_offset.unwrap_or(0))?;
        asc.reverse();
        let step_ratio = (t / n) as i64;
        let (prk, plms): (Vec<i64>, Vec<i64>) = if cfg.skip_prk_steps.unwrap_or(false) {
            // _timesteps[:-1] ++ _timesteps[-2:-1] ++ _timesteps[-1:], reversed
            let mut plms: Vec<i64> = asc[..n - 1].to_vec();
            if n >= 2 {
                plms.push(asc[n - 2]);
            }
            plms.push(asc[n - 1]);
            plms.reverse();
            (Vec::new(), plms)
        } else {
            if n < 4 {
                return Err(cfg.error(format!(
                    "PNDM's Runge-Kutta warm-up needs at least 4 steps (got {n}); use more steps \
                     or set `skip_prk_steps` = true"
                )));
            }
            let half = step_ratio / 2;
            let mut base = Vec::with_capacity(8);
            for &v in &asc[n - 4..] {
                base.push(v);
                base.push(v + half);
            }
            base.pop(); // [:-1]
            let doubled: Vec<i64> = base.iter().flat_map(|&v| [v, v]).collect();
            let mut prk = doubled[1..doubled.len() - 1].to_vec();
            prk.reverse();
            let mut plms = asc[..n - 3].to_vec();
            plms.reverse();
            (prk, plms)
        };
        let ints: Vec<i64> = prk.iter().chain(plms.iter()).copied().collect();
        check_range(cfg, &ints, t)?;
        let final_alpha_cumprod = if cfg.set_alpha_to_one.unwrap_or(false) { 1.0 } else { train.alphas_cumprod[0] };
        Ok(Pndm {
            timesteps: ints.iter().map(|&v| v as f64).collect(),
            num_prk: prk.len(),
            train,
            ints,
            step_ratio,
            final_alpha_cumprod,
            prediction,
            counter: 0,
            ets: Vec::new(),
            cur_sample: None,
            cur_model_output: None,
        })
    }

    fn alpha(&self, t: i64) -> f32 {
        if t >= 0 { self.train.alphas_cumprod[t as usize] } else { self.final_alpha_cumprod }
    }

    /// Formula (9) of the PNDM paper: x_prev from x_t and an eps-estimate.
    fn prev_sample(&self, sample: &Tensor, t: i64, prev: i64, eps: &Tensor) -> Result<Tensor> {
        let a_t = self.alpha(t);
        let a_prev = self.alpha(prev);
        let b_t = 1.0 - a_t;
        let b_prev = 1.0 - a_prev;
        let eps = match self.prediction {
            Prediction::Velocity => lin2(a_t.sqrt(), eps, b_t.sqrt(), sample)?,
            _ => eps.clone(),
        };
        let sample_coeff = (a_prev / a_t).sqrt();
        let denom = a_t * b_prev.sqrt() + (a_t * b_t * a_prev).sqrt();
        Ok((mul(sample, sample_coeff)? - div(&mul(&eps, a_prev - a_t)?, denom)?)?)
    }

    fn step_prk(&mut self, model_output: &Tensor, timestep: i64, sample: &Tensor) -> Result<Tensor> {
        let diff = if self.counter % 2 == 1 { 0 } else { self.step_ratio / 2 };
        let prev = timestep - diff;
        let t = self.ints[self.counter / 4 * 4];
        let mut eps = model_output.clone();
        match self.counter % 4 {
            0 => {
                self.cur_model_output = Some(self.accumulate(model_output, 1.0 / 6.0)?);
                self.ets.push(model_output.clone());
                self.cur_sample = Some(sample.clone());
            }
            1 | 2 => self.cur_model_output = Some(self.accumulate(model_output, 1.0 / 3.0)?),
            _ => {
                eps = self.accumulate(model_output, 1.0 / 6.0)?;
                self.cur_model_output = None;
            }
        }
        let cur = self.cur_sample.clone().unwrap_or_else(|| sample.clone());
        let out = self.prev_sample(&cur, t, prev, &eps)?;
        self.counter += 1;
        Ok(out)
    }

    /// `cur_model_output + c * x` (with `cur_model_output` starting at 0).
    fn accumulate(&self, x: &Tensor, c: f64) -> Result<Tensor> {
        let term = mul(x, c as f32)?;
        Ok(match &self.cur_model_output {
            Some(acc) => (acc + term)?,
            None => term,
        })
    }

    fn step_plms(&mut self, model_output: &Tensor, timestep: i64, sample: &Tensor) -> Result<Tensor> {
        let mut t = timestep;
        let mut prev = timestep - self.step_ratio;
        if self.counter != 1 {
            let keep = self.ets.len().saturating_sub(3);
            self.ets.drain(..keep);
            self.ets.push(model_output.clone());
        } else {
            prev = timestep;
            t = timestep + self.step_ratio;
        }
        let e = &self.ets;
        let k = e.len();
        let mut sample = sample.clone();
        let eps = if k == 1 && self.counter == 0 {
            self.cur_sample = Some(sample.clone());
            model_output.clone()
        } else if k == 1 && self.counter == 1 {
            sample = self.cur_sample.take().unwrap_or(sample);
            div(&(model_output + &e[0])?, 2.0)?
        } else if k == 2 {
            div(&(mul(&e[1], 3.0)? - &e[0])?, 2.0)?
        } else if k == 3 {
            let s = ((mul(&e[2], 23.0)? - mul(&e[1], 16.0)?)? + mul(&e[0], 5.0)?)?;
            div(&s, 12.0)?
        } else {
            let s =
                (((mul(&e[k - 1], 55.0)? - mul(&e[k - 2], 59.0)?)? + mul(&e[k - 3], 37.0)?)? - mul(&e[k - 4], 9.0)?)?;
            mul(&s, (1.0f64 / 24.0) as f32)?
        };
        let out = self.prev_sample(&sample, t, prev, &eps)?;
        self.counter += 1;
        Ok(out)
    }
}

impl Scheduler for Pndm {
    fn add_noise(&self, original: &Tensor, noise: &Tensor, step_index: usize) -> Result<Tensor> {
        super::add_noise_at(&self.train, self.ints[step_index], original, noise)
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        _noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let timestep = self.ints[step_index];
        if self.counter < self.num_prk {
            self.step_prk(model_output, timestep, sample)
        } else {
            self.step_plms(model_output, timestep, sample)
        }
    }
}
