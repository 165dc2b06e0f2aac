//! Training parity with diffusers' training scripts on sd1-tiny (tools/fixtures/make_train_fixtures.py,
//! tests/fixtures/train/): a UNet LoRA step's loss, every LoRA parameter's gradient, the clipped
//! gradient norm, and the weights after three AdamW steps, for ε prediction and for v prediction
//! with min-SNR-γ and offset noise; the adapters' kohya export against the fixture's; textual
//! inversion's embedding row; DreamBooth LoRA (UNet and text encoder) with prior preservation; full
//! UNet fine-tuning; ControlNet, T2I-Adapter and IP-Adapter training; `diffctl train lora` end to
//! end, resumed, and refusing bad input.

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use common::{assert_close, load_fixture, repo_path};
use diffctl::control::cross_attention::ip_adapter::IpAdapterWeights;
use diffctl::io::weights::{TensorStore, TrainableParameters, Weights};
use diffctl::models::clip_text::{ClipTextConfig, ClipTextEncoder};
use diffctl::models::controlnet::{ControlNet, ControlNetConfig, ResidualScale};
use diffctl::models::nn::LayerRegistry;
use diffctl::models::t2i_adapter::{T2IAdapter, T2IAdapterConfig};
use diffctl::models::unet::{Conditioning, UNet, UNetConfig, UNetControls, UNetInput};
use diffctl::models::vae::{Vae, VaeConfig};
use diffctl::schedulers::SchedulerConfig;
use diffctl::tokenizer::ClipTokenizer;
use diffctl::train::adafactor::Adafactor;
use diffctl::train::lora::{Algorithm, FactorShape, LoraAdapters};
use diffctl::train::objective::DenoisingObjective;
use diffctl::train::optimizer::{AdamW, AdamWConfig, Optimizer, clip_grad_norm};
use diffctl::train::run::write_model_folder;
use serde_json::Value;

const MODEL: &str = "tests/fixtures/models/sd1-tiny";

fn weights(component: &str, file: &str) -> Weights {
    let path = repo_path(&format!("{MODEL}/{component}/{file}"));
    let store = TensorStore::open_safetensors(&path, std::slice::from_ref(&path)).unwrap();
    Weights::new(Arc::new(store), DType::F32, &Device::Cpu)
}

/// The case's entry in cases.json and its tensors.
fn case(name: &str) -> (Value, HashMap<String, Tensor>) {
    let cases: Value =
        serde_json::from_str(&std::fs::read_to_string(repo_path("tests/fixtures/train/cases.json")).unwrap()).unwrap();
    let case = cases["cases"].as_array().unwrap().iter().find(|c| c["name"] == name).unwrap().clone();
    let tensors = load_fixture(&format!("tests/fixtures/train/{}", case["file"].as_str().unwrap()));
    (case, tensors)
}

/// Asserts max |actual − expected| ≤ rel · max |expected| (a relative bound for one tensor).
fn assert_relative(what: &str, actual: &Tensor, expected: &Tensor, rel: f32) {
    assert_eq!(actual.dims(), expected.dims(), "{what}: shapes");
    let scale = expected.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    let err =
        (actual - expected).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    assert!(err <= rel * scale, "{what}: max|diff| {err:.3e} exceeds {rel:e} · max|expected| {scale:.3e}");
}

/// The weights after the AdamW steps against PyTorch's, element by element, within 1e-4 of the
/// tensor's largest weight plus what the gradient tolerance implies for that element. The gradients
/// are checked to 1e-4 of their tensor's largest (they agree to about 1e-5: f32 sums in another
/// order); Adam divides each element by its own running size, so an element's update carries its
/// gradient's relative error, 1e-4 · max|g| / |gᵢ| (times 10 for gradients that partly cancel over
/// the steps), of `reach` (lr per step), capped at twice the reach for gradients near 0 and ε.
fn assert_adam_weights(what: &str, (ours, theirs): (&[f32], &[f32]), grad: &[f32], reach: f32) {
    let max = |v: &[f32]| v.iter().fold(0f32, |m, x| m.max(x.abs()));
    let (weight_scale, grad_scale) = (max(theirs), max(grad));
    for i in 0..ours.len() {
        let conditioning = (10.0 * 1e-4 * grad_scale / grad[i].abs()).min(2.0);
        let bound = 1e-4 * weight_scale + reach * conditioning;
        let err = (ours[i] - theirs[i]).abs();
        assert!(
            err <= bound,
            "{what} [{i}]: weight {} vs {} (bound {bound:e}, gradient {})",
            ours[i],
            theirs[i],
            grad[i]
        );
    }
}

/// With `DIFFCTL_TRAIN_EXPORTS=DIR`, writes `tensors` to `DIR/<file>`: the trained results in the
/// layouts diffctl exports, for `make_train_fixtures.py --check-export DIR` to load in diffusers.
fn export_for_diffusers(file: &str, tensors: Vec<(String, Tensor)>) {
    let Some(dir) = std::env::var_os("DIFFCTL_TRAIN_EXPORTS") else { return };
    let path = std::path::Path::new(&dir).join(file);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let tensors: HashMap<String, Tensor> = tensors.into_iter().collect();
    candle_core::safetensors::save(&tensors, &path).unwrap();
}

fn scalar(t: &Tensor) -> f32 {
    t.to_dtype(DType::F32).unwrap().to_scalar::<f32>().unwrap()
}

/// One parity case: its entry and tensors, the shared training images, the frozen VAE and the
/// objective; what every case does at each step, in one place.
struct Parity {
    name: String,
    case: Value,
    fx: HashMap<String, Tensor>,
    common: HashMap<String, Tensor>,
    objective: DenoisingObjective,
    vae: Vae,
    scaling: f64,
}

/// A step's inputs from the fixture: the VAE latents drawn with its noise, the diffusion noise, the
/// timesteps (as indices and as the UNet's tensor).
struct StepInputs {
    latents: Tensor,
    noise: Tensor,
    timesteps: Vec<usize>,
    t: Tensor,
}

impl Parity {
    /// The case `name`, with the model's scheduler config (its prediction type as the case says)
    /// for the objective.
    fn new(name: &str) -> Self {
        let (case, fx) = case(name);
        let mut scheduler =
            SchedulerConfig::load(repo_path(&format!("{MODEL}/scheduler/scheduler_config.json"))).unwrap();
        scheduler.prediction_type = case["prediction_type"].as_str().map(str::to_string);
        let objective = DenoisingObjective::new(&scheduler, case["snr_gamma"].as_f64()).unwrap();
        let vae_cfg = VaeConfig::load(&repo_path(&format!("{MODEL}/vae/config.json"))).unwrap();
        let vae = Vae::load(&weights("vae", "diffusion_pytorch_model.safetensors"), &vae_cfg).unwrap();
        let common = load_fixture("tests/fixtures/train/common.safetensors");
        Self { name: name.into(), case, fx, common, objective, vae, scaling: vae_cfg.scaling_factor }
    }

    /// The fixture tensor `key` of step `step`.
    fn get(&self, step: usize, key: &str) -> &Tensor {
        &self.fx[&format!("step{step}.{key}")]
    }

    fn steps(&self) -> usize {
        self.case["steps"].as_u64().unwrap() as usize
    }

    /// Step `step`'s inputs, the latents checked against the fixture's at step 0.
    fn inputs(&self, step: usize) -> StepInputs {
        let dist = self.vae.encode(&self.common["pixel_values"]).unwrap();
        let latents = (dist.sample(self.get(step, "vae_sample_noise")).unwrap() * self.scaling).unwrap();
        if step == 0 {
            assert_close("latents", &latents, self.get(step, "latents"), 2e-5);
        }
        let timesteps: Vec<usize> =
            self.get(step, "timesteps").to_vec1::<i64>().unwrap().iter().map(|&t| t as usize).collect();
        let t = Tensor::new(timesteps.iter().map(|&t| t as f32).collect::<Vec<_>>(), &Device::Cpu).unwrap();
        StepInputs { latents, noise: self.get(step, "noise").clone(), timesteps, t }
    }

    /// The DDPM-noised latents of `inputs`.
    fn noisy(&self, inputs: &StepInputs) -> Tensor {
        self.objective.add_noise(&inputs.latents, &inputs.noise, &inputs.timesteps).unwrap()
    }

    /// `unet`'s prediction for `noisy` at the inputs' timesteps with `context` and `controls`.
    fn predict(
        &self,
        unet: &UNet,
        inputs: &StepInputs,
        noisy: &Tensor,
        context: &Tensor,
        controls: &UNetControls,
    ) -> Tensor {
        let conditioning = Conditioning::text(context.clone());
        unet.forward(UNetInput::new(noisy, &inputs.t, &conditioning).with_controls(controls)).unwrap()
    }

    /// The denoising loss of `unet` on step `step` with `context`: DDPM noising, the case's target
    /// and weighting.
    fn denoising_loss(&self, unet: &UNet, step: usize, context: &Tensor) -> Tensor {
        let inputs = self.inputs(step);
        let prediction = self.predict(unet, &inputs, &self.noisy(&inputs), context, &UNetControls::default());
        self.loss(&inputs, &prediction)
    }

    /// The case's loss of `prediction` against the inputs' target.
    fn loss(&self, inputs: &StepInputs, prediction: &Tensor) -> Tensor {
        let target = self.objective.target(&inputs.latents, &inputs.noise, &inputs.timesteps).unwrap();
        self.objective.loss(prediction, &target, &inputs.timesteps).unwrap()
    }

    /// Asserts our `value` of the scalar `key` of step `step` within 1e-4 of PyTorch's.
    fn assert_scalar(&self, step: usize, key: &str, value: &Tensor) {
        let (ours, theirs) = (scalar(value), scalar(self.get(step, key)));
        assert!((ours - theirs).abs() <= 1e-4 * theirs.abs(), "{} step {step}: {key} {ours} vs {theirs}", self.name);
    }

    /// The case's AdamW over `params`.
    fn optimizer(&self, params: &[(String, Var)]) -> AdamW {
        AdamW::new(params.to_vec(), self.adamw()).unwrap()
    }

    fn adamw(&self) -> AdamWConfig {
        let opt = &self.case["optimizer"];
        AdamWConfig {
            lr: opt["lr"].as_f64().unwrap(),
            beta1: opt["betas"][0].as_f64().unwrap(),
            beta2: opt["betas"][1].as_f64().unwrap(),
            eps: opt["eps"].as_f64().unwrap(),
            weight_decay: opt["weight_decay"].as_f64().unwrap(),
        }
    }

    /// The tensors the fixture lists as getting only rounding noise (a true gradient of 0).
    fn noise_only(&self) -> Vec<&str> {
        let report = &self.case["gradient_report"]["noise_gradient_tensors"];
        report.as_array().map_or_else(Vec::new, |t| t.iter().map(|t| t.as_str().unwrap()).collect())
    }

    /// Backpropagates `loss` of step `step`: the loss against PyTorch's; at step 0 every parameter's
    /// gradient (rounding-noise tensors at noise level); the clipped norm where the case clips; then
    /// the AdamW step.
    fn backward_and_step(&self, step: usize, loss: &Tensor, params: &[(String, Var)], optimizer: &mut AdamW) {
        self.assert_scalar(step, "loss", loss);
        let mut grads = loss.backward().unwrap();
        if step == 0 {
            let max_grad = self.case["gradient_report"]["max_abs_grad"].as_f64().unwrap() as f32;
            for (name, var) in params {
                let ours =
                    grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{}: no gradient for {name}", self.name));
                if self.noise_only().contains(&name.as_str()) {
                    let size = ours.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
                    assert!(size <= 1e-5 * max_grad, "{name}: gradient {size:e}, expected rounding noise");
                } else {
                    assert_relative(
                        &format!("{} grad {name}", self.name),
                        ours,
                        &self.fx[&format!("grad.{name}")],
                        1e-4,
                    );
                }
            }
        }
        if let Some(max_norm) = self.case["max_grad_norm"].as_f64() {
            let norm = clip_grad_norm(params, &mut grads, Some(max_norm)).unwrap() as f32;
            let expected = scalar(self.get(step, "grad_norm"));
            assert!(
                (norm - expected).abs() <= 1e-4 * expected,
                "{} step {step}: grad norm {norm} vs {expected}",
                self.name
            );
        }
        optimizer.step(&grads).unwrap();
    }

    /// The values of `params` before training, for [`Self::assert_trained`].
    fn snapshot(params: &[(String, Var)]) -> Vec<Vec<f32>> {
        params.iter().map(|(_, var)| var.as_tensor().flatten_all().unwrap().to_vec1().unwrap()).collect()
    }

    /// The weights after the steps against PyTorch's ([`assert_adam_weights`]); the rounding-noise
    /// tensors only moved no further than Adam can move them.
    fn assert_trained(&self, params: &[(String, Var)], initial: &[Vec<f32>]) {
        let values = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let reach = self.steps() as f32 * self.adamw().lr as f32;
        for ((name, var), initial) in params.iter().zip(initial) {
            let ours = values(var.as_tensor());
            if self.noise_only().contains(&name.as_str()) {
                for (o, i) in ours.iter().zip(initial) {
                    assert!((o - i).abs() <= reach * 1.01 + 1e-3 * i.abs(), "{name}: moved {}", o - i);
                }
                continue;
            }
            let (after, grad) = (values(&self.fx[&format!("after.{name}")]), values(&self.fx[&format!("grad.{name}")]));
            assert_adam_weights(&format!("{} {name}", self.name), (&ours, &after), &grad, reach);
        }
    }
}

/// sd1-tiny's UNet configuration.
fn unet_config() -> UNetConfig {
    UNetConfig::load(&repo_path(&format!("{MODEL}/unet/config.json"))).unwrap()
}

/// sd1-tiny's UNet from the view `w` of its weights (see [`unet_weights`]).
fn unet(w: &Weights) -> UNet {
    UNet::load(w, &unet_config()).unwrap()
}

fn unet_weights() -> Weights {
    weights("unet", "diffusion_pytorch_model.safetensors")
}

/// sd1-tiny's text encoder from the view `w` of its weights (see [`text_weights`]).
fn text_encoder(w: &Weights) -> ClipTextEncoder {
    let text_cfg = ClipTextConfig::load(&repo_path(&format!("{MODEL}/text_encoder/config.json"))).unwrap();
    ClipTextEncoder::load(w, &text_cfg).unwrap()
}

fn text_weights() -> Weights {
    weights("text_encoder", "model.safetensors")
}

/// The text context of the case's stored `input_ids` (of step `step` where they change per step).
fn context(text: &ClipTextEncoder, ids: &Tensor) -> Tensor {
    text.encode(&ids.to_dtype(DType::U32).unwrap(), 0).unwrap()
}

/// A model folder file from `tensors` in `dir`, opened as a weights view (trainable into `params`).
fn weights_of(dir: &std::path::Path, tensors: &HashMap<String, Tensor>, params: &TrainableParameters) -> Weights {
    let file = dir.join("diffusion_pytorch_model.safetensors");
    candle_core::safetensors::save(tensors, &file).unwrap();
    let store = TensorStore::open_safetensors(&file, std::slice::from_ref(&file)).unwrap();
    Weights::new(Arc::new(store), DType::F32, &Device::Cpu).trainable(params)
}

/// The case tensors `init.<name>` as `name`.
fn initial_tensors(fx: &HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    fx.iter().filter_map(|(k, t)| k.strip_prefix("init.").map(|k| (k.to_string(), t.clone()))).collect()
}

/// The initial factors `init.<path>.<PEFT name>` of the case, for [`LoraAdapters::attach`].
fn fixture_factors(p: &Parity) -> impl FnMut(&str, &[FactorShape]) -> diffctl::Result<Vec<Tensor>> + '_ {
    |path, factors| Ok(factors.iter().map(|f| p.fx[&format!("init.{path}.{}", f.peft)].clone()).collect())
}

/// Runs a UNet LoRA (LoHa, LoKr) case: every step's loss and gradient norm, step 0's gradients, the final
/// weights, the kohya names.
fn lora_case(name: &str) {
    let p = Parity::new(name);
    let registry = LayerRegistry::new();
    let unet = unet(&unet_weights().with_layer_registry(&registry.scoped("unet")));
    let text = text_encoder(&text_weights());
    let lora = &p.case["lora"];
    let targets: Vec<String> =
        lora["target_modules"].as_array().unwrap().iter().map(|t| t.as_str().unwrap().into()).collect();
    let (rank, alpha) = (lora["rank"].as_u64().unwrap() as usize, lora["alpha"].as_f64().unwrap());
    let algorithm = match lora["algorithm"].as_str() {
        Some("loha") => Algorithm::Loha,
        Some("lokr") => Algorithm::Lokr,
        _ => Algorithm::Lora,
    };
    let adapters =
        LoraAdapters::attach(&registry, "unet.", &targets, (algorithm, rank, alpha), fixture_factors(&p)).unwrap();
    let params = adapters.parameters();
    assert_eq!(params.len() as u64, p.case["trainable"].as_u64().unwrap(), "trainable tensors");
    let initial = Parity::snapshot(&params);
    let context = context(&text, &p.fx["input_ids"]);
    if let Some(expected) = p.fx.get("encoder_hidden_states") {
        assert_close("text context", &context, expected, 2e-5);
    }
    let mut optimizer = p.optimizer(&params);
    for step in 0..p.steps() {
        let loss = p.denoising_loss(&unet, step, &context);
        p.backward_and_step(step, &loss, &params, &mut optimizer);
    }
    p.assert_trained(&params, &initial);
    // The kohya file: the names the fixture stores (lora-unet-eps only), each holding our adapter's
    // factor (the trained values are compared above) or the alpha.
    let kohya: HashMap<String, Tensor> = adapters.kohya_tensors().unwrap().into_iter().collect();
    let stored: Vec<&String> = p.fx.keys().filter(|k| k.starts_with("after.lora_unet_")).collect();
    if !stored.is_empty() {
        let mut names: Vec<&str> = stored.iter().map(|k| k.strip_prefix("after.").unwrap()).collect();
        let mut ours: Vec<&str> = kohya.keys().map(String::as_str).collect();
        names.sort();
        ours.sort();
        assert_eq!(names, ours, "kohya names");
        for m in adapters.modules() {
            let name = format!("lora_unet_{}", m.path.strip_prefix("unet.").unwrap().replace('.', "_"));
            // A LoKr with a whole w2 carries its scale in lokr_w1 (loaders scale it by 1).
            let whole_w2 = m.factors.iter().any(|f| f.kohya == "lokr_w2");
            for f in &m.factors {
                let expected = match whole_w2 && f.kohya == "lokr_w1" {
                    true => (f.var.as_tensor() * (alpha / rank as f64)).unwrap(),
                    false => f.var.as_tensor().clone(),
                };
                assert_eq!(common::max_abs_diff(&kohya[&format!("{name}.{}", f.kohya)], &expected), 0.0);
            }
            if !whole_w2 {
                assert_eq!(scalar(&kohya[&format!("{name}.alpha")]), scalar(&p.fx[&format!("after.{name}.alpha")]));
            }
        }
    }
    export_for_diffusers(&format!("{name}.safetensors"), adapters.kohya_tensors().unwrap());
}

#[test]
fn unet_lora_epsilon_matches_diffusers_training() {
    lora_case("lora-unet-eps");
}

#[test]
fn unet_lora_velocity_min_snr_matches_diffusers_training() {
    lora_case("lora-unet-v-minsnr");
}

/// LoHa on the UNet's attention projections as PEFT's `LoHaConfig` trains it in the LoRA script's
/// step; exported in LyCORIS' kohya names.
#[test]
fn unet_loha_matches_peft_training() {
    lora_case("loha-unet-eps");
}

/// LoKr (w1 whole, w2 as a rank-2 product) as PEFT's `LoKrConfig` trains it.
#[test]
fn unet_lokr_matches_peft_training() {
    lora_case("lokr-unet-eps");
}

/// Textual inversion as diffusers' textual_inversion.py: one new token's embedding row trains (its
/// vector enters the text encoder at the token injection point), through the frozen text encoder and
/// UNet; the loss and the row's gradient of step 0, every step's loss, the row after three AdamW steps.
#[test]
fn textual_inversion_matches_diffusers_training() {
    let p = Parity::new("textual-inversion");
    let unet = unet(&unet_weights());
    let text = text_encoder(&text_weights());
    let mut tokenizer = ClipTokenizer::from_dir(&repo_path(&format!("{MODEL}/tokenizer"))).unwrap();
    let placeholder = p.case["placeholder_token"].as_str().unwrap();
    let ids = tokenizer.add_placeholder(placeholder, 1).unwrap();
    assert_eq!(ids, [p.case["placeholder_token_ids"][0].as_u64().unwrap() as u32]);
    let captions: Vec<&str> = p.case["captions"].as_array().unwrap().iter().map(|c| c.as_str().unwrap()).collect();
    let input_ids: Vec<u32> = captions.iter().flat_map(|c| tokenizer.encode_padded(c).unwrap()).collect();
    let input_ids = Tensor::from_vec(input_ids, (captions.len(), 77), &Device::Cpu).unwrap();
    let stored_ids = p.fx["input_ids"].to_dtype(DType::F32).unwrap();
    assert_eq!(common::max_abs_diff(&input_ids.to_dtype(DType::F32).unwrap(), &stored_ids), 0.0);

    let vector = Var::from_tensor(&p.fx["init.embedding"]).unwrap();
    let params = vec![("embedding".to_string(), vector.clone())];
    let initial = Parity::snapshot(&params);
    let mut optimizer = p.optimizer(&params);
    for step in 0..p.steps() {
        let embeddings = text.token_embeddings_with(&input_ids, Some(vector.as_tensor())).unwrap();
        let context = text.encode_embeddings(&embeddings, 0).unwrap();
        if step == 0 {
            assert_close("context", &context, p.get(step, "encoder_hidden_states"), 2e-5);
        }
        let loss = p.denoising_loss(&unet, step, &context);
        p.backward_and_step(step, &loss, &params, &mut optimizer);
    }
    p.assert_trained(&params, &initial);
    let learned = vec![(placeholder.to_string(), vector.as_tensor().detach())];
    export_for_diffusers("textual-inversion/learned_embeds.safetensors", learned);
}

/// Full fine-tuning as diffusers' train_text_to_image.py: every UNet weight a trainable variable
/// (`Weights::trainable`), every one of the 494 tensors gets its gradient, clipping binds, two AdamW
/// steps. Tensors whose true gradient is 0 (a per-channel shift normalised away by a GroupNorm of one
/// channel per group: the fixture lists them) get rounding noise in both implementations: they are
/// checked to stay at noise level, and after the steps only to have moved no further than Adam can.
#[test]
fn full_unet_fine_tuning_matches_diffusers_training() {
    let p = Parity::new("full-unet");
    let trainable = TrainableParameters::new();
    let unet = unet(&unet_weights().trainable(&trainable));
    let text = text_encoder(&text_weights());
    let params = trainable.parameters();
    assert_eq!(params.len() as u64, p.case["trainable"].as_u64().unwrap(), "trainable tensors");
    let initial = Parity::snapshot(&params);
    let context = context(&text, &p.fx["input_ids"]);
    let mut optimizer = p.optimizer(&params);
    for step in 0..p.steps() {
        let loss = p.denoising_loss(&unet, step, &context);
        p.backward_and_step(step, &loss, &params, &mut optimizer);
    }
    p.assert_trained(&params, &initial);
}

/// ControlNet training as diffusers' train_controlnet.py: every ControlNet weight trainable (its
/// encoder copied from the UNet, the condition embedding and the zero convolutions as the fixture
/// stores them, randomised so that they carry gradient), the UNet frozen; every gradient, binding
/// clipping, the weights after two AdamW steps.
#[test]
fn controlnet_training_matches_diffusers_training() {
    let p = Parity::new("controlnet");
    // The ControlNet folder from_unet would write: the UNet's weights plus the stored new ones.
    let folder = tempfile::tempdir().unwrap();
    let mut tensors = load_fixture(&format!("{MODEL}/unet/diffusion_pytorch_model.safetensors"));
    tensors.extend(initial_tensors(&p.fx));
    let config_path = folder.path().join("config.json");
    std::fs::write(&config_path, p.case["controlnet_config"].to_string()).unwrap();
    let config = ControlNetConfig::load(&config_path).unwrap();
    let trainable = TrainableParameters::new();
    let controlnet = ControlNet::load(&weights_of(folder.path(), &tensors, &trainable), &config).unwrap();
    let unet = unet(&unet_weights());
    let text = text_encoder(&text_weights());
    let params = trainable.parameters();
    assert_eq!(params.len(), p.fx.keys().filter(|k| k.starts_with("grad.")).count(), "trainable tensors");
    let initial = Parity::snapshot(&params);
    let context = context(&text, &p.fx["input_ids"]);
    let mut optimizer = p.optimizer(&params);
    for step in 0..p.steps() {
        let inputs = p.inputs(step);
        let noisy = p.noisy(&inputs);
        let (conditioning, cond) = (Conditioning::text(context.clone()), &p.common["conditioning_pixel_values"]);
        let residuals =
            controlnet.forward(&noisy, &inputs.t, &conditioning, cond, ResidualScale::Uniform(1.0)).unwrap();
        let controls = UNetControls {
            down_residuals: Some(residuals.down),
            mid_residual: Some(residuals.mid),
            ..Default::default()
        };
        let loss = p.loss(&inputs, &p.predict(&unet, &inputs, &noisy, &context, &controls));
        p.backward_and_step(step, &loss, &params, &mut optimizer);
    }
    p.assert_trained(&params, &initial);
    if let Some(dir) = std::env::var_os("DIFFCTL_TRAIN_EXPORTS") {
        let tensors = params.iter().map(|(k, v)| (k.clone(), v.as_tensor().detach())).collect();
        let folder = std::path::Path::new(&dir).join("controlnet");
        write_model_folder(&folder, &p.case["controlnet_config"], tensors, HashMap::new()).unwrap();
    }
}

/// DreamBooth LoRA with prior preservation as diffusers' train_dreambooth_lora.py: LoRA on the UNet
/// and on the text encoder's q/k/v/out projections, one batch of an instance and a class image, the
/// loss each half's mean squared error summed; every step's loss (and its instance part), every
/// gradient, the weights after three AdamW steps, the kohya names of both halves.
#[test]
fn dreambooth_lora_with_prior_preservation_matches_diffusers_training() {
    let p = Parity::new("dreambooth-lora-prior");
    let registry = LayerRegistry::new();
    let unet = unet(&unet_weights().with_layer_registry(&registry.scoped("unet")));
    let text = text_encoder(&text_weights().with_layer_registry(&registry.scoped("text_encoder")));
    let lora = &p.case["lora"];
    let names = |key: &str| -> Vec<String> {
        lora[key].as_array().unwrap().iter().map(|t| t.as_str().unwrap().into()).collect()
    };
    let (rank, alpha) = (lora["rank"].as_u64().unwrap() as usize, lora["alpha"].as_f64().unwrap());
    let shape = (Algorithm::Lora, rank, alpha);
    let unet_lora =
        LoraAdapters::attach(&registry, "unet.", &names("unet_target_modules"), shape, fixture_factors(&p)).unwrap();
    let text_lora = LoraAdapters::attach(
        &registry,
        "text_encoder.",
        &names("text_encoder_target_modules"),
        shape,
        fixture_factors(&p),
    )
    .unwrap();
    let params: Vec<_> = unet_lora.parameters().into_iter().chain(text_lora.parameters()).collect();
    assert_eq!(params.len() as u64, p.case["trainable"].as_u64().unwrap(), "trainable tensors");
    let initial = Parity::snapshot(&params);
    let mut optimizer = p.optimizer(&params);
    let prior_weight = p.case["prior_loss_weight"].as_f64().unwrap();
    for step in 0..p.steps() {
        // The text encoder trains too: it runs inside the step.
        let context = context(&text, &p.fx["input_ids"]);
        let inputs = p.inputs(step);
        let prediction = p.predict(&unet, &inputs, &p.noisy(&inputs), &context, &UNetControls::default());
        let target = p.objective.target(&inputs.latents, &inputs.noise, &inputs.timesteps).unwrap();
        let loss = p.objective.prior_preservation_loss(&prediction, &target, &inputs.timesteps, prior_weight).unwrap();
        let (first, first_target) = (prediction.narrow(0, 0, 1).unwrap(), target.narrow(0, 0, 1).unwrap());
        let instance = p.objective.loss(&first, &first_target, &inputs.timesteps[..1]).unwrap();
        p.assert_scalar(step, "instance_loss", &instance);
        p.backward_and_step(step, &loss, &params, &mut optimizer);
    }
    p.assert_trained(&params, &initial);
    let kohya: Vec<String> = text_lora.kohya_tensors().unwrap().into_iter().map(|(name, _)| name).collect();
    assert!(
        kohya.contains(&"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight".to_string()),
        "{kohya:?}"
    );
    let both = unet_lora.kohya_tensors().unwrap().into_iter().chain(text_lora.kohya_tensors().unwrap()).collect();
    export_for_diffusers("dreambooth-lora-prior.safetensors", both);
}

/// IP-Adapter training as tencent-ailab/IP-Adapter's tutorial_train.py (restated in the fixture
/// script): the image projection and every layer's `to_k_ip`/`to_v_ip` trainable from an h94-layout
/// file, each sample's image tokens its own key/value stream, UNet and text encoder frozen, with the
/// script's drops (an image embedding zeroed, a caption emptied); every step's loss, every gradient,
/// the weights after three AdamW steps.
#[test]
fn ip_adapter_training_matches_the_reference_training() {
    let p = Parity::new("ip-adapter");
    let folder = tempfile::tempdir().unwrap();
    let file = folder.path().join("ip-adapter.safetensors");
    candle_core::safetensors::save(&initial_tensors(&p.fx), &file).unwrap();
    let trainable = TrainableParameters::new();
    let store = TensorStore::open(&file).unwrap();
    let adapter = IpAdapterWeights::load_trainable(&file, store, &unet_config(), &Device::Cpu, &trainable).unwrap();
    let params = trainable.parameters();
    assert_eq!(params.len(), p.case["trainable"].as_array().unwrap().len(), "trainable tensors");
    let initial = Parity::snapshot(&params);
    let unet = unet(&unet_weights());
    let text = text_encoder(&text_weights());
    let mut optimizer = p.optimizer(&params);
    for step in 0..p.steps() {
        let context = context(&text, p.get(step, "input_ids"));
        let tokens = adapter.projection().forward(p.get(step, "image_embeds")).unwrap();
        if step == 0 {
            assert_close("image tokens", &tokens, p.get(step, "ip_tokens"), 2e-5);
        }
        let streams = adapter.sample_streams(&tokens, p.case["ip_scale"].as_f64().unwrap()).unwrap();
        let controls = UNetControls { extra_attention: vec![Arc::new(streams)], ..Default::default() };
        let inputs = p.inputs(step);
        let loss = p.loss(&inputs, &p.predict(&unet, &inputs, &p.noisy(&inputs), &context, &controls));
        p.backward_and_step(step, &loss, &params, &mut optimizer);
    }
    p.assert_trained(&params, &initial);
    let trained = params.iter().map(|(k, v)| (k.clone(), v.as_tensor().detach())).collect();
    export_for_diffusers("ip-adapter.safetensors", trained);
}

/// T2I-Adapter training as diffusers' train_t2i_adapter_sdxl.py adapted to SD1 (the fixture
/// script's restatement): every adapter weight trainable, Euler noise levels at the script's cubic
/// timesteps, the σ⁻²-weighted loss on the denoised latents, the features as the UNet's intrablock
/// residuals; every gradient (exact zeros where the adapter's ReLUs are dead), binding clipping, the
/// weights after two AdamW steps.
#[test]
fn t2i_adapter_training_matches_diffusers_training() {
    let p = Parity::new("t2i-adapter");
    let folder = tempfile::tempdir().unwrap();
    let config_path = folder.path().join("config.json");
    std::fs::write(&config_path, p.case["adapter_config"].to_string()).unwrap();
    let config = T2IAdapterConfig::load(&config_path).unwrap();
    let trainable = TrainableParameters::new();
    let adapter = T2IAdapter::load(&weights_of(folder.path(), &initial_tensors(&p.fx), &trainable), &config).unwrap();
    let params = trainable.parameters();
    assert_eq!(params.len(), p.case["trainable"].as_array().unwrap().len(), "trainable tensors");
    let initial = Parity::snapshot(&params);
    let unet = unet(&unet_weights());
    let text = text_encoder(&text_weights());
    let context = context(&text, &p.fx["input_ids"]);
    let mut optimizer = p.optimizer(&params);
    for step in 0..p.steps() {
        let inputs = p.inputs(step);
        let sigmas = Tensor::new(p.objective.sigmas(&inputs.timesteps).unwrap(), &Device::Cpu).unwrap();
        assert_close("sigmas", &sigmas, p.get(step, "sigmas"), 1e-6);
        let (noisy, input) = p.objective.euler_noisy(&inputs.latents, &inputs.noise, &inputs.timesteps).unwrap();
        let features = adapter.forward(&p.common["conditioning_pixel_values"]).unwrap();
        let controls = UNetControls { down_intrablock_residuals: features, ..Default::default() };
        let prediction = p.predict(&unet, &inputs, &input, &context, &controls);
        let loss = p.objective.euler_denoised_loss(&prediction, &noisy, &inputs.latents, &inputs.timesteps).unwrap();
        p.backward_and_step(step, &loss, &params, &mut optimizer);
    }
    p.assert_trained(&params, &initial);
    if let Some(dir) = std::env::var_os("DIFFCTL_TRAIN_EXPORTS") {
        let tensors = params.iter().map(|(k, v)| (k.clone(), v.as_tensor().detach())).collect();
        let folder = std::path::Path::new(&dir).join("t2i-adapter");
        write_model_folder(&folder, &p.case["adapter_config"], tensors, HashMap::new()).unwrap();
    }
}

/// Adafactor as kohya configures transformers' (tools/fixtures/make_adafactor_fixture.py): three
/// steps on a matrix and a 4-D weight (factored second moments) and a bias (full), the last with
/// gradients large enough for the RMS clipping to act, land on transformers' weights.
#[test]
fn adafactor_matches_transformers() {
    let fx = load_fixture("tests/fixtures/train/adafactor.safetensors");
    let params: Vec<(String, Var)> = ["matrix", "conv", "bias"]
        .iter()
        .map(|n| (n.to_string(), Var::from_tensor(&fx[&format!("init.{n}")]).unwrap()))
        .collect();
    let mut adafactor = Adafactor::new(params.clone(), 1e-2, 0.01).unwrap();
    for step in 0..3 {
        // A loss whose gradient is the stored one.
        let loss = params
            .iter()
            .map(|(n, v)| (v.as_tensor() * &fx[&format!("step{step}.grad.{n}")]).unwrap().sum_all().unwrap())
            .reduce(|a, b| (a + b).unwrap())
            .unwrap();
        adafactor.step(&loss.backward().unwrap()).unwrap();
        for (n, v) in &params {
            assert_relative(&format!("step {step} {n}"), v.as_tensor(), &fx[&format!("step{step}.after.{n}")], 1e-5);
        }
    }
}

/// A folder of the fixture's two training images with .txt captions.
fn caption_folder() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (image, caption) in [("train-a", "a photo of a cat wearing a red hat"), ("train-b", "a red ball on the grass")]
    {
        std::fs::copy(
            repo_path(&format!("tests/fixtures/train/images/{image}.png")),
            dir.path().join(format!("{image}.png")),
        )
        .unwrap();
        std::fs::write(dir.path().join(format!("{image}.txt")), caption).unwrap();
    }
    dir
}

/// `diffctl train lora` end to end: a kohya file that `generate --lora` loads and that changes the
/// image, a loss log with one finite row per step.
#[test]
fn cli_trains_a_lora_that_generate_loads() {
    let data = caption_folder();
    let out = tempfile::tempdir().unwrap();
    let (lora, log) = (out.path().join("trained.safetensors"), out.path().join("loss.csv"));
    let model = repo_path(MODEL);
    let run = common::diffctl(&[
        "train",
        "lora",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.path().to_str().unwrap(),
        "--output",
        lora.to_str().unwrap(),
        "--resolution",
        "32",
        "--steps",
        "3",
        "--lr",
        "1e-2",
        "--log",
        log.to_str().unwrap(),
        "--random-flip",
        "--snr-gamma",
        "5",
    ]);
    assert!(run.status.success(), "train failed: {}", String::from_utf8_lossy(&run.stderr));
    let rows: Vec<String> = std::fs::read_to_string(&log).unwrap().lines().skip(1).map(String::from).collect();
    assert_eq!(rows.len(), 3, "{rows:?}");
    for row in &rows {
        let loss: f32 = row.split(',').nth(1).unwrap().parse().unwrap();
        assert!(loss.is_finite() && loss > 0.0, "{row}");
    }
    let tensors = load_fixture_abs(&lora);
    assert_eq!(tensors.len(), 3 * 88, "down, up and alpha for each of the 88 attention projections");
    assert!(
        tensors.contains_key("lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0.lora_up.weight")
    );
    let generate = |extra: &[&str]| {
        let (png, latents) = (
            out.path().join(format!("image{}.png", extra.len())),
            out.path().join(format!("latents{}.safetensors", extra.len())),
        );
        let mut args = vec![
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "a cat",
            "--steps",
            "2",
            "--width",
            "32",
            "--height",
            "32",
            "--seed",
            "1",
            "--output",
            png.to_str().unwrap(),
            "--output-latents",
            latents.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let run = common::diffctl(&args);
        assert!(run.status.success(), "generate failed: {}", String::from_utf8_lossy(&run.stderr));
        load_fixture_abs(&latents)["latents"].clone()
    };
    let plain = generate(&[]);
    let adapted = generate(&["--lora", lora.to_str().unwrap()]);
    assert!(common::max_abs_diff(&plain, &adapted) > 1e-6, "the trained LoRA changes nothing");
}

/// `diffctl train lora --algorithm loha|lokr` end to end: a LyCORIS file in kohya's layout (with
/// the LyCORIS metadata) that `generate --lora` loads and that changes the image.
#[test]
fn cli_trains_loha_and_lokr_that_generate_loads() {
    let data = caption_folder();
    let out = tempfile::tempdir().unwrap();
    let model = repo_path(MODEL);
    let generate = |extra: &[&str], tag: &str| {
        let (png, latents) =
            (out.path().join(format!("image-{tag}.png")), out.path().join(format!("latents-{tag}.safetensors")));
        let mut args = vec!["generate", "--model", model.to_str().unwrap(), "--prompt", "a cat", "--steps", "2"];
        args.extend(["--width", "32", "--height", "32", "--seed", "1", "--output", png.to_str().unwrap()]);
        args.extend(["--output-latents", latents.to_str().unwrap()]);
        args.extend_from_slice(extra);
        let run = common::diffctl(&args);
        assert!(run.status.success(), "generate failed: {}", String::from_utf8_lossy(&run.stderr));
        load_fixture_abs(&latents)["latents"].clone()
    };
    let plain = generate(&[], "plain");
    for (algorithm, key) in [
        ("loha", "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0.hada_w2_b"),
        ("lokr", "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0.lokr_w1"),
    ] {
        let file = out.path().join(format!("{algorithm}.safetensors"));
        let run = common::diffctl(&[
            "train",
            "lora",
            "--algorithm",
            algorithm,
            "--model",
            model.to_str().unwrap(),
            "--data",
            data.path().to_str().unwrap(),
            "--output",
            file.to_str().unwrap(),
            "--resolution",
            "32",
            "--steps",
            "2",
            "--lr",
            "1e-2",
        ]);
        assert!(run.status.success(), "train {algorithm} failed: {}", String::from_utf8_lossy(&run.stderr));
        let tensors = load_fixture_abs(&file);
        assert!(tensors.contains_key(key), "{algorithm}: no {key}");
        // The zero-initialised factor has trained.
        assert!(
            tensors[key].abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() > 0.0,
            "{algorithm}: {key} is zero"
        );
        let bytes = std::fs::read(&file).unwrap();
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let meta = meta.metadata().clone().unwrap_or_default();
        assert_eq!(meta.get("ss_network_module").map(String::as_str), Some("lycoris.kohya"), "{algorithm}");
        assert_eq!(
            meta.get("ss_network_args").map(String::as_str),
            Some(format!("{{\"algo\": \"{algorithm}\"}}").as_str())
        );
        let adapted = generate(&["--lora", file.to_str().unwrap()], algorithm);
        assert!(common::max_abs_diff(&plain, &adapted) > 1e-6, "the trained {algorithm} changes nothing");
    }
}

/// Bad training input is a clear error naming what is wrong.
#[test]
fn cli_train_rejects_bad_input() {
    let data = caption_folder();
    let model = repo_path(MODEL);
    let out = tempfile::tempdir().unwrap();
    let output = out.path().join("x.safetensors");
    let train = |data: &std::path::Path, extra: &[&str]| {
        let mut args = vec![
            "train",
            "lora",
            "--model",
            model.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--output",
            output.to_str().unwrap(),
            "--steps",
            "1",
        ];
        args.extend_from_slice(extra);
        let run = common::diffctl(&args);
        assert!(!run.status.success());
        String::from_utf8_lossy(&run.stderr).to_string()
    };
    let err = train(data.path(), &["--resolution", "40"]);
    assert!(err.contains("resolution 40 must be a multiple of 16"), "{err}");
    let err = train(data.path(), &["--resolution", "32", "--optimizer", "sgd"]);
    assert!(err.contains("unknown optimizer `sgd`"), "{err}");
    let err = train(data.path(), &["--resolution", "32", "--lr-scheduler", "exotic"]);
    assert!(err.contains("unknown learning-rate schedule `exotic`"), "{err}");
    std::fs::remove_file(data.path().join("train-b.txt")).unwrap();
    let err = train(data.path(), &["--resolution", "32"]);
    assert!(err.contains("train-b.png has no caption"), "{err}");
    let err = train(&data.path().join("missing"), &["--resolution", "32"]);
    assert!(err.contains("is not a folder"), "{err}");
    assert!(!output.exists(), "no output is written on errors");
}

/// A folder of the fixture's two condition images, named as the training images they go with.
fn condition_folder() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for name in ["a", "b"] {
        std::fs::copy(
            repo_path(&format!("tests/fixtures/train/images/control-{name}.png")),
            dir.path().join(format!("train-{name}.png")),
        )
        .unwrap();
    }
    dir
}

/// Runs `diffctl train KIND` on sd1-tiny with the caption folder `data`, two steps of batch 2 at
/// 32x32, writing `output`, plus `extra` flags.
fn train_cli(kind: &str, data: &std::path::Path, output: &std::path::Path, extra: &[&str]) -> std::process::Output {
    let model = repo_path(MODEL);
    let mut args = vec![
        "train",
        kind,
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
        "--resolution",
        "32",
        "--batch-size",
        "2",
        "--steps",
        "2",
        "--lr",
        "1e-2",
    ];
    args.extend_from_slice(extra);
    common::diffctl(&args)
}

/// The final latents of `diffctl generate` ("a red ball", 2 steps, 32x32, seed 1) with `extra` flags
/// (on sd1-tiny unless they name a `--model`), written in `dir`.
fn generate_latents(dir: &std::path::Path, extra: &[&str]) -> Tensor {
    let (png, latents) = (dir.join("image.png"), dir.join("latents.safetensors"));
    let model = repo_path(MODEL);
    let mut args = vec!["generate", "--prompt", "a red ball", "--steps", "2", "--width", "32", "--height", "32"];
    args.extend(["--seed", "1", "--output", png.to_str().unwrap(), "--output-latents", latents.to_str().unwrap()]);
    if !extra.contains(&"--model") {
        args.extend(["--model", model.to_str().unwrap()]);
    }
    args.extend_from_slice(extra);
    let run = common::diffctl(&args);
    assert!(run.status.success(), "generate failed: {}", String::from_utf8_lossy(&run.stderr));
    load_fixture_abs(&latents)["latents"].clone()
}

/// `diffctl train controlnet` end to end: a new ControlNet copied from the UNet, trained on the
/// fixture's images and condition images, written as a diffusers folder that `generate
/// --controlnet` loads and that changes the image; its zero convolutions moved from zero; a
/// training image without a condition image is a clear error.
#[test]
fn cli_trains_a_controlnet_that_generate_loads() {
    let (data, conditions) = (caption_folder(), condition_folder());
    let out = tempfile::tempdir().unwrap();
    let controlnet = out.path().join("controlnet");
    let flags = ["--conditioning", conditions.path().to_str().unwrap()];
    let run = train_cli("controlnet", data.path(), &controlnet, &flags);
    assert!(run.status.success(), "train failed: {}", String::from_utf8_lossy(&run.stderr));
    let config = ControlNetConfig::load(&controlnet.join("config.json")).unwrap();
    assert_eq!(config.conditioning_embedding_out_channels, [16, 32], "diffusers' first channels, for a factor of 2");
    let tensors = load_fixture_abs(&controlnet.join("diffusion_pytorch_model.safetensors"));
    let moved = tensors["controlnet_mid_block.weight"].abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(moved > 1e-4, "the mid block's zero convolution did not train: max |w| {moved}");
    let unet = load_fixture(&format!("{MODEL}/unet/diffusion_pytorch_model.safetensors"));
    assert_eq!(tensors["conv_in.weight"].dims(), unet["conv_in.weight"].dims(), "conv_in copied from the UNet");

    let plain = generate_latents(out.path(), &[]);
    let control = conditions.path().join("train-a.png");
    let controlled = generate_latents(
        out.path(),
        &["--controlnet", controlnet.to_str().unwrap(), "--control-image", control.to_str().unwrap()],
    );
    assert!(common::max_abs_diff(&plain, &controlled) > 1e-6, "the trained ControlNet changes nothing");

    std::fs::remove_file(conditions.path().join("train-b.png")).unwrap();
    std::fs::remove_dir_all(&controlnet).unwrap();
    let run = train_cli("controlnet", data.path(), &controlnet, &flags);
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success() && err.contains("train-b.png has no condition image"), "{err}");
    assert!(!controlnet.exists(), "no output is written on errors");
}

/// `diffctl train t2i-adapter` end to end: a new full adapter of the UNet's widths, trained with
/// the script's objective, written as a diffusers folder that `generate --t2i-adapter` loads and
/// that changes the image; a v-prediction model is refused (the objective is the ε one).
#[test]
fn cli_trains_a_t2i_adapter_that_generate_loads() {
    let (data, conditions) = (caption_folder(), condition_folder());
    let out = tempfile::tempdir().unwrap();
    let adapter = out.path().join("adapter");
    let flags = ["--conditioning", conditions.path().to_str().unwrap()];
    let run = train_cli("t2i-adapter", data.path(), &adapter, &flags);
    assert!(run.status.success(), "train failed: {}", String::from_utf8_lossy(&run.stderr));
    let config = T2IAdapterConfig::load(&adapter.join("config.json")).unwrap();
    assert_eq!((config.channels.as_slice(), config.downscale_factor, config.num_res_blocks), (&[8, 16, 16][..], 2, 2));
    let plain = generate_latents(out.path(), &[]);
    let control = conditions.path().join("train-a.png");
    let adapted = generate_latents(
        out.path(),
        &["--t2i-adapter", adapter.to_str().unwrap(), "--adapter-image", control.to_str().unwrap()],
    );
    assert!(common::max_abs_diff(&plain, &adapted) > 1e-6, "the trained adapter changes nothing");

    let refused = out.path().join("refused");
    let run =
        train_cli("t2i-adapter", data.path(), &refused, &[&flags[..], &["--prediction-type", "v_prediction"]].concat());
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success() && err.contains("needs an epsilon-prediction model"), "{err}");
}

/// `diffctl train ip-adapter` end to end: a new adapter (the tutorial's projection, to_k_ip/to_v_ip
/// copied from the UNet) trained with each image as its own prompt, written in the h94 layout that
/// `generate --ip-adapter` loads and that changes the image.
#[test]
fn cli_trains_an_ip_adapter_that_generate_loads() {
    let data = caption_folder();
    let out = tempfile::tempdir().unwrap();
    let adapter = out.path().join("ip-adapter.safetensors");
    let encoder = repo_path("tests/fixtures/ip_adapter/image_encoder");
    let run = train_cli("ip-adapter", data.path(), &adapter, &["--image-encoder", encoder.to_str().unwrap()]);
    assert!(run.status.success(), "train failed: {}", String::from_utf8_lossy(&run.stderr));
    let tensors = load_fixture_abs(&adapter);
    assert_eq!(tensors["image_proj.proj.weight"].dims(), [4 * 32, 32], "4 tokens of the context width");
    let unet = load_fixture(&format!("{MODEL}/unet/diffusion_pytorch_model.safetensors"));
    let first = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight";
    let moved = common::max_abs_diff(&tensors["ip_adapter.1.to_k_ip.weight"], &unet[first]);
    assert!(moved > 0.0 && moved < 0.1, "to_k_ip starts as to_k and trains: moved {moved}");
    let image = data.path().join("train-a.png");
    let plain = generate_latents(out.path(), &[]);
    let prompted = generate_latents(
        out.path(),
        &[
            "--ip-adapter",
            adapter.to_str().unwrap(),
            "--image-encoder",
            encoder.to_str().unwrap(),
            "--ip-image",
            image.to_str().unwrap(),
        ],
    );
    assert!(common::max_abs_diff(&plain, &prompted) > 1e-6, "the trained IP-Adapter changes nothing");
}

/// `diffctl train dreambooth` end to end: LoRA on the UNet and the text encoder with prior
/// preservation, the missing class images generated by the model into the class folder (and
/// reused by the next run), a kohya file with both halves that `generate --lora` loads; and full
/// fine-tuning to a diffusers folder that `generate --model` loads.
#[test]
fn cli_trains_dreambooth_with_prior_preservation() {
    let instance = tempfile::tempdir().unwrap();
    for name in ["train-a", "train-b"] {
        std::fs::copy(
            repo_path(&format!("tests/fixtures/train/images/{name}.png")),
            instance.path().join(format!("{name}.png")),
        )
        .unwrap();
    }
    let out = tempfile::tempdir().unwrap();
    let (lora, class) = (out.path().join("sks.safetensors"), out.path().join("class"));
    let prior = [
        "--instance-prompt",
        "a photo of sks cat",
        "--class-prompt",
        "a photo of a cat",
        "--class-data",
        class.to_str().unwrap(),
        "--num-class-images",
        "3",
        "--class-steps",
        "2",
    ];
    let flags = [&prior[..], &["--lora", "--train-text-encoder"]].concat();
    let run = train_cli("dreambooth", instance.path(), &lora, &flags);
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "train failed: {err}");
    assert!(err.contains("generated class image 3/3"), "{err}");
    let generated: Vec<_> = std::fs::read_dir(&class).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(generated.len(), 3, "{generated:?}");
    let tensors = load_fixture_abs(&lora);
    assert!(tensors.keys().any(|k| k.starts_with("lora_te_text_model_encoder_layers_0_self_attn_q_proj")));
    assert!(tensors.keys().any(|k| k.starts_with("lora_unet_")));
    let plain = generate_latents(out.path(), &[]);
    let adapted = generate_latents(out.path(), &["--lora", lora.to_str().unwrap()]);
    assert!(common::max_abs_diff(&plain, &adapted) > 1e-6, "the DreamBooth LoRA changes nothing");

    let folder = out.path().join("full");
    let run = train_cli("dreambooth", instance.path(), &folder, &prior);
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success() && !err.contains("generated class image"), "class images reused: {err}");
    let tuned = generate_latents(out.path(), &["--model", folder.to_str().unwrap()]);
    assert!(common::max_abs_diff(&plain, &tuned) > 1e-6, "the DreamBooth model generates as the base model");
}

fn load_fixture_abs(path: &std::path::Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

/// A run stopped at a checkpoint and resumed ends with exactly the weights of one that never
/// stopped, plain, with gradient accumulation and an EMA, with Adafactor and with aspect-ratio
/// buckets; sample images appear every N steps; a
/// checkpoint of another run is refused.
#[test]
fn cli_resumes_a_checkpoint_exactly() {
    let data = caption_folder();
    let wide = image::RgbImage::from_fn(96, 32, |x, y| image::Rgb([(x * 2) as u8, (y * 7) as u8, 90]));
    wide.save(data.path().join("wide.png")).unwrap();
    std::fs::write(data.path().join("wide.txt"), "a wide red ball").unwrap();
    let out = tempfile::tempdir().unwrap();
    let model = repo_path(MODEL);
    let train = |output: &str, extra: &[&str]| {
        let output = out.path().join(output);
        let mut args = vec![
            "train",
            "lora",
            "--model",
            model.to_str().unwrap(),
            "--data",
            data.path().to_str().unwrap(),
            "--output",
            output.to_str().unwrap(),
            "--resolution",
            "32",
            "--lr",
            "1e-2",
            "--random-flip",
        ];
        args.extend_from_slice(extra);
        let run = common::diffctl(&args);
        (run.status.success(), String::from_utf8_lossy(&run.stderr).to_string(), output)
    };
    // Plain, with gradient accumulation and an EMA (whose shadows the checkpoint carries), and with
    // Adafactor (whose factored moments it carries), and with aspect-ratio buckets (a wide image among
    // the square ones: batches of one bucket, the order resumed batch by batch).
    let variants = [
        ("plain", &[][..]),
        ("ema", &["--gradient-accumulation", "2", "--ema-decay", "0.9"][..]),
        ("adafactor", &["--optimizer", "adafactor"][..]),
        ("buckets", &["--aspect-buckets", "--batch-size", "2"][..]),
    ];
    for (name, flags) in variants {
        let run = |output: &str, extra: &[&str]| train(&format!("{name}-{output}"), &[flags, extra].concat());
        let samples = ["--sample-every", "2", "--sample-prompt", "a cat", "--sample-steps", "2"];
        let (ok, err, straight) =
            run("straight.safetensors", &[&["--steps", "4", "--seed", "7"][..], &samples].concat());
        assert!(ok, "{err}");
        for step in [2, 4] {
            let sample = out.path().join(format!("{name}-straight-samples/step-00000{step}-0.png"));
            assert!(sample.is_file(), "no sample image {}", sample.display());
        }
        let (ok, err, stopped) = run("resumed.safetensors", &["--steps", "2", "--seed", "7"]);
        assert!(ok, "{err}");
        let state = out.path().join(format!("{name}-resumed.state.safetensors"));
        assert!(state.is_file(), "no checkpoint beside {}", stopped.display());
        let (ok, err, resumed) =
            run("resumed.safetensors", &["--steps", "4", "--seed", "7", "--resume", state.to_str().unwrap()]);
        assert!(ok, "{err}");
        let (a, b) = (load_fixture_abs(&straight), load_fixture_abs(&resumed));
        assert_eq!(a.len(), b.len());
        for (tensor, t) in &a {
            assert_eq!(common::max_abs_diff(t, &b[tensor]), 0.0, "{name}: {tensor} differs after resuming");
        }
    }
    let state = out.path().join("plain-resumed.state.safetensors");
    let (ok, err, _) = train(
        "other.safetensors",
        &["--steps", "4", "--seed", "7", "--ema-decay", "0.9", "--resume", state.to_str().unwrap()],
    );
    assert!(!ok && err.contains("no `ema_decay` in its metadata"), "{err}");
    let ema_state = out.path().join("ema-resumed.state.safetensors");
    let (ok, err, _) =
        train("other.safetensors", &["--steps", "4", "--seed", "7", "--resume", ema_state.to_str().unwrap()]);
    assert!(!ok && err.contains("it was trained with ema_decay 0.9, which this run does not set"), "{err}");
    let (ok, err, _) =
        train("other.safetensors", &["--steps", "4", "--seed", "8", "--resume", state.to_str().unwrap()]);
    assert!(!ok && err.contains("it was trained with seed 7, this run has 8"), "{err}");
    let (ok, err, _) =
        train("other.safetensors", &["--steps", "2", "--seed", "7", "--resume", state.to_str().unwrap()]);
    assert!(!ok && err.contains("already trained 4 steps"), "{err}");
}

/// `diffctl train textual-inversion` end to end: an embedding that `generate --embedding` loads
/// and that moved from its initializer; a multi-token initializer and captions that never use the
/// token are clear errors.
#[test]
fn cli_trains_a_textual_inversion_that_generate_loads() {
    let data = tempfile::tempdir().unwrap();
    for (image, caption) in [("train-a", "a photo of <sks-hat>"), ("train-b", "a rendering of <sks-hat>")] {
        std::fs::copy(
            repo_path(&format!("tests/fixtures/train/images/{image}.png")),
            data.path().join(format!("{image}.png")),
        )
        .unwrap();
        std::fs::write(data.path().join(format!("{image}.txt")), caption).unwrap();
    }
    let out = tempfile::tempdir().unwrap();
    let model = repo_path(MODEL);
    let embedding = out.path().join("sks-hat.safetensors");
    let train = |extra: &[&str]| {
        let mut args = vec![
            "train",
            "textual-inversion",
            "--model",
            model.to_str().unwrap(),
            "--data",
            data.path().to_str().unwrap(),
            "--output",
            embedding.to_str().unwrap(),
            "--resolution",
            "32",
            "--steps",
            "3",
            "--lr",
            "5e-3",
        ];
        args.extend_from_slice(extra);
        let run = common::diffctl(&args);
        (run.status.success(), String::from_utf8_lossy(&run.stderr).to_string())
    };
    // `ball` is one token of the tiny vocabulary (the fixture's initializer).
    let (ok, err) = train(&["--token", "<sks-hat>", "--initializer", "ball"]);
    assert!(ok, "{err}");
    let tensors = load_fixture_abs(&embedding);
    let vectors = &tensors["<sks-hat>"];
    assert_eq!(vectors.dims(), [1, 32]);
    let text_cfg = ClipTextConfig::load(&repo_path(&format!("{MODEL}/text_encoder/config.json"))).unwrap();
    let text = ClipTextEncoder::load(&weights("text_encoder", "model.safetensors"), &text_cfg).unwrap();
    let tokenizer = ClipTokenizer::from_dir(&repo_path(&format!("{MODEL}/tokenizer"))).unwrap();
    let ball = tokenizer.encode_words("ball").unwrap();
    let initial = text.token_embeddings(&Tensor::new(&[[ball[0]]], &Device::Cpu).unwrap()).unwrap().squeeze(0).unwrap();
    assert!(common::max_abs_diff(vectors, &initial) > 1e-4, "the vector did not move from `ball`'s");
    let latents = out.path().join("latents.safetensors");
    let png = out.path().join("image.png");
    let run = common::diffctl(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "a photo of <sks-hat>",
        "--steps",
        "2",
        "--width",
        "32",
        "--height",
        "32",
        "--seed",
        "1",
        "--embedding",
        embedding.to_str().unwrap(),
        "--output",
        png.to_str().unwrap(),
        "--output-latents",
        latents.to_str().unwrap(),
    ]);
    assert!(run.status.success(), "generate failed: {}", String::from_utf8_lossy(&run.stderr));

    let (ok, err) = train(&["--token", "<sks-hat>", "--initializer", "red ball"]);
    assert!(!ok && err.contains("the initializer `red ball` must be a single token"), "{err}");
    let (ok, err) = train(&["--token", "<other>", "--initializer", "ball"]);
    assert!(!ok && err.contains("no caption mentions the placeholder `<other>`"), "{err}");
}
