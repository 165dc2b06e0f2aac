//! Scheduler parity with diffusers 0.42.1: replays the rollouts recorded by
//! `tools/fixtures/make_scheduler_fixtures.py` (tests/fixtures/schedulers/) through our schedulers,
//! feeding back the noise diffusers drew, and checks timesteps, `init_noise_sigma`, every
//! `scale_model_input` output and every step output. Also the error paths of the config/kind API.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use diffctl::schedulers::{NoiseSource, SamplerChoice, SchedulerConfig, SchedulerKind, SigmaSchedule, build};

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/schedulers")
}

/// Hands back the noise tensor recorded for the current step, once.
struct Replay {
    next: Option<Tensor>,
    taken: usize,
}

impl NoiseSource for Replay {
    fn sample(&mut self, shape: &[usize], _device: &Device) -> diffctl::Result<Tensor> {
        let t = self
            .next
            .take()
            .ok_or_else(|| diffctl::Error::invalid("scheduler drew noise where diffusers drew none"))?;
        assert_eq!(t.dims(), shape, "noise shape");
        self.taken += 1;
        Ok(t)
    }
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    max_abs(&(a - b).unwrap())
}

#[test]
fn parity_with_diffusers() {
    let dir = fixture_dir();
    let cases: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    let mut common = candle_core::safetensors::load(dir.join("common.safetensors"), &Device::Cpu).unwrap();
    common.extend(candle_core::safetensors::load(dir.join("common_extra.safetensors"), &Device::Cpu).unwrap());
    let x0 = &common["x0"];
    // worst relative error (max|diff| / max(1, max|expected|)) per kind
    let mut worst: HashMap<String, (f32, String)> = HashMap::new();
    let mut failures = Vec::new();
    let mut worst_timestep = 0f64;
    // SCHED_DEBUG=<substring of case names> prints every comparison of the matching cases
    let debug = std::env::var("SCHED_DEBUG").ok();
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        // `dpmpp-2m-karras` is dpmpp-2m with the Karras schedule
        let (kind, alias_schedule) = SamplerChoice::parse(case["kind"].as_str().unwrap()).unwrap();
        let schedule = match case.get("schedule") {
            Some(s) => Some(s.as_str().unwrap().parse::<SigmaSchedule>().unwrap()),
            None => alias_schedule,
        };
        let config = SchedulerConfig::from_value(&case["config"], None).unwrap();
        let steps = case["steps"].as_u64().unwrap() as usize;
        let tensors = candle_core::safetensors::load(dir.join(case["file"].as_str().unwrap()), &Device::Cpu).unwrap();
        let mut sched = build(kind, schedule, &config, steps).unwrap_or_else(|e| panic!("{name}: build failed: {e}"));

        let want_ts: Vec<f64> = case["timesteps"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        let got_ts = sched.timesteps().to_vec();
        if got_ts.len() != want_ts.len()
            // relative 1e-6, or 1e-4 absolute: a midpoint sigma at the bottom of the table maps to a
            // timestep of 0 or 6e-5 depending on its last bit
            || got_ts.iter().zip(&want_ts).any(|(g, w)| (g - w).abs() > (1e-6 * w.abs()).max(1e-4))
        {
            failures.push(format!("{name}: timesteps {got_ts:?} != {want_ts:?}"));
            continue;
        }
        for (g, w) in got_ts.iter().zip(&want_ts) {
            worst_timestep = worst_timestep.max((g - w).abs());
        }
        let want_sigma = case["init_noise_sigma"].as_f64().unwrap();
        let got_sigma = sched.init_noise_sigma();
        if (got_sigma - want_sigma).abs() > 1e-6 * want_sigma.abs() {
            failures.push(format!("{name}: init_noise_sigma {got_sigma} != {want_sigma}"));
            continue;
        }

        let mut sample = x0.affine(got_sigma as f32 as f64, 0.0).unwrap();
        let mut case_worst = 0f32;
        let mut check = |what: String, got: &Tensor, want: &Tensor, failures: &mut Vec<String>| {
            let scale = max_abs(want).max(1.0);
            let rel = max_diff(got, want) / scale;
            if rel.is_nan() || rel > 1e-4 {
                failures.push(format!("{name}: {what}: max|diff| / scale = {rel:e}"));
            }
            if debug.as_deref().is_some_and(|d| name.contains(d)) {
                eprintln!("{name} {what}: max|diff| / scale = {rel:e} (scale {scale})");
            }
            case_worst = case_worst.max(rel);
        };
        for i in 0..got_ts.len() {
            let scaled = sched.scale_model_input(&sample, i).unwrap();
            match tensors.get(&format!("scaled_{i}")) {
                Some(want) => check(format!("scaled_{i}"), &scaled, want, &mut failures),
                None => assert_eq!(max_diff(&scaled, &sample), 0.0, "{name}: scale_model_input_{i}"),
            }
            let model_output = (scaled.affine(0.3, 0.0).unwrap() + &common[&format!("eps_{i}")]).unwrap();
            let recorded = tensors.get(&format!("noise_{i}")).cloned();
            let expect_noise = recorded.is_some();
            let mut noise = Replay { next: recorded, taken: 0 };
            sample =
                sched.step(&model_output, i, &sample, &mut noise).unwrap_or_else(|e| panic!("{name}: step {i}: {e}"));
            assert_eq!(noise.taken == 1, expect_noise, "{name}: step {i} noise draws");
            check(format!("out_{i}"), &sample, &tensors[&format!("out_{i}")], &mut failures);
        }
        let label = match schedule {
            Some(s) => format!("{kind} + {s}"),
            None => kind.to_string(),
        };
        let entry = worst.entry(label).or_insert((0.0, String::new()));
        if case_worst >= entry.0 {
            *entry = (case_worst, name.to_string());
        }
    }
    eprintln!("worst timestep difference: {worst_timestep:e}");
    let mut kinds: Vec<_> = worst.into_iter().collect();
    kinds.sort_by(|a, b| a.0.cmp(&b.0));
    for (kind, (rel, case)) in &kinds {
        eprintln!("{kind:32} worst max|diff|/max(1,max|expected|) = {rel:.3e} ({case})");
    }
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
    assert!(cases.len() >= 200, "expected the full fixture set");
}

#[test]
fn unknown_scheduler_name_lists_valid_names() {
    let err = "heunx".parse::<SchedulerKind>().unwrap_err().to_string();
    assert!(err.contains("heunx") && err.contains("DPM++ 2M") && err.contains("karras"), "{err}");
    for kind in SchedulerKind::ALL {
        assert!(err.contains(kind.name()), "{err}");
        assert_eq!(kind.name().parse::<SchedulerKind>().unwrap(), kind);
    }
    // a suffixed name is a sampler and a schedule, not a kind alone
    assert!("DPM++ 2M Karras".parse::<SchedulerKind>().is_err());
    let err = "wobbly".parse::<SigmaSchedule>().unwrap_err().to_string();
    assert!(err.contains("sgm_uniform") && err.contains("align-your-steps"), "{err}");
}

#[test]
fn a1111_names_and_suffixes_parse() {
    use SchedulerKind as K;
    use SigmaSchedule as S;
    for (text, want) in [
        ("Euler a", (K::EulerAncestral, None)),
        ("euler", (K::Euler, None)),
        ("LMS", (K::Lms, None)),
        ("Heun", (K::Heun, None)),
        ("DPM2", (K::Dpm2, None)),
        ("DPM2 a", (K::Dpm2Ancestral, None)),
        ("DPM++ 2S a", (K::DpmPp2sAncestral, None)),
        ("DPM++ 2M", (K::DpmPp2m, None)),
        ("DPM++ 2M SDE", (K::DpmPp2mSde, None)),
        ("DPM++ 3M SDE", (K::DpmPp3mSde, None)),
        ("DPM++ SDE", (K::DpmPpSde, None)),
        ("DPM++ SDE Karras", (K::DpmPpSde, Some(S::Karras))),
        ("dpmpp-sde-karras", (K::DpmPpSde, Some(S::Karras))),
        ("DDIM", (K::Ddim, None)),
        ("PLMS", (K::Pndm, None)),
        ("UniPC", (K::UniPc, None)),
        ("LCM", (K::Lcm, None)),
        ("DEIS", (K::Deis, None)),
        ("DPM++ 2M Karras", (K::DpmPp2m, Some(S::Karras))),
        ("DPM++ 2M SDE Exponential", (K::DpmPp2mSde, Some(S::Exponential))),
        ("Euler a Karras", (K::EulerAncestral, Some(S::Karras))),
        ("DPM++ 2M SGM Uniform", (K::DpmPp2m, Some(S::SgmUniform))),
        ("dpmpp-2m-karras", (K::DpmPp2m, Some(S::Karras))),
        ("heun-beta", (K::Heun, Some(S::Beta))),
        ("Euler Align Your Steps", (K::Euler, Some(S::AlignYourSteps(None)))),
    ] {
        assert_eq!(SamplerChoice::parse(text).unwrap(), want, "{text}");
    }
    for schedule in SigmaSchedule::ALL_NAMED {
        assert_eq!(schedule.name().parse::<SigmaSchedule>().unwrap(), schedule);
    }
}

#[test]
fn schedules_that_do_not_apply_name_the_sampler() {
    let cfg = SchedulerConfig::default();
    for (kind, schedule) in [
        (SchedulerKind::EulerAncestral, SigmaSchedule::Karras),
        (SchedulerKind::Ddim, SigmaSchedule::Exponential),
        (SchedulerKind::Lcm, SigmaSchedule::SgmUniform),
        (SchedulerKind::Lms, SigmaSchedule::Simple),
        (SchedulerKind::UniPc, SigmaSchedule::AlignYourSteps(None)),
    ] {
        let err = build(kind, Some(schedule), &cfg, 10).err().expect("error").to_string();
        assert!(err.contains(kind.name()) && err.contains(schedule.name()), "{err}");
    }
    let err = build(SchedulerKind::Euler, Some(SigmaSchedule::AlignYourSteps(None)), &cfg, 12).err().unwrap();
    assert!(err.to_string().contains("10 steps"), "{err}");
    // the bare align-your-steps takes the model's family
    assert_eq!(
        SigmaSchedule::AlignYourSteps(None).for_model(true),
        SigmaSchedule::AlignYourSteps(Some(diffctl::schedulers::AysModel::Sdxl))
    );
}

#[test]
fn second_order_samplers_report_their_order() {
    let cfg = SchedulerConfig::default();
    for kind in SchedulerKind::ALL {
        let sched = build(kind, None, &cfg, 10).unwrap();
        let two = matches!(
            kind,
            SchedulerKind::Heun
                | SchedulerKind::Dpm2
                | SchedulerKind::Dpm2Ancestral
                | SchedulerKind::DpmPp2sAncestral
                | SchedulerKind::DpmPpSde
        );
        assert_eq!(sched.order(), if two { 2 } else { 1 }, "{kind}");
        // one entry per model call: 2n - 1 for the two-call samplers (PNDM's warm-up adds its own)
        if kind != SchedulerKind::Pndm {
            assert_eq!(sched.timesteps().len(), if two { 19 } else { 10 }, "{kind}");
        }
    }
}

#[test]
fn class_names_map_to_kinds() {
    assert_eq!(SchedulerKind::from_class_name("PNDMScheduler").unwrap(), SchedulerKind::Pndm);
    assert_eq!(SchedulerKind::from_class_name("DPMSolverMultistepScheduler").unwrap(), SchedulerKind::DpmPp2m);
    for kind in SchedulerKind::ALL {
        if kind != SchedulerKind::DpmPp2sAncestral
            && kind != SchedulerKind::DpmPp2mSde
            && kind != SchedulerKind::DpmPp3mSde
        {
            assert_eq!(SchedulerKind::from_class_name(kind.class_name()).unwrap(), kind);
        }
    }
    let cfg =
        SchedulerConfig::from_json_str(r#"{"_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": true}"#)
            .unwrap();
    assert_eq!(cfg.kind().unwrap(), SchedulerKind::DpmPp2m);
    assert_eq!(SchedulerKind::from_class_name("DPMSolverSDEScheduler").unwrap(), SchedulerKind::DpmPpSde);
    let err = SchedulerKind::from_class_name("CosineDPMSolverMultistepScheduler").unwrap_err().to_string();
    assert!(err.contains("CosineDPMSolverMultistepScheduler") && err.contains("UniPCMultistepScheduler"), "{err}");
    let cfg = SchedulerConfig::from_json_str(r#"{"_class_name": "FlowMatchEulerDiscreteScheduler"}"#).unwrap();
    let err = cfg.kind().unwrap_err().to_string();
    assert!(err.contains("FlowMatchEulerDiscreteScheduler"), "{err}");
}

#[test]
fn unknown_beta_schedule_is_an_error() {
    let cfg = SchedulerConfig::from_json_str(r#"{"beta_schedule": "sigmoid"}"#).unwrap();
    for kind in SchedulerKind::ALL {
        let err = build(kind, None, &cfg, 10).err().expect("error").to_string();
        assert!(err.contains("beta_schedule") && err.contains("sigmoid"), "{kind}: {err}");
    }
}

#[test]
fn zero_or_too_many_steps_is_an_error() {
    let cfg = SchedulerConfig::default();
    for kind in SchedulerKind::ALL {
        let err = build(kind, None, &cfg, 0).err().expect("error").to_string();
        assert!(err.contains("at least 1"), "{kind}: {err}");
        assert!(build(kind, None, &cfg, 1001).is_err(), "{kind}");
    }
    // LCM: at most original_inference_steps
    let err = build(SchedulerKind::Lcm, None, &cfg, 51).err().expect("error").to_string();
    assert!(err.contains("original_inference_steps"), "{err}");
    // PNDM's Runge-Kutta warm-up needs 4 steps
    let err = build(SchedulerKind::Pndm, None, &cfg, 3).err().expect("error").to_string();
    assert!(err.contains("skip_prk_steps"), "{err}");
}

#[test]
fn unsupported_values_are_errors() {
    for (json, kind, needle) in [
        (r#"{"thresholding": true}"#, SchedulerKind::DpmPp2m, "thresholding"),
        (r#"{"prediction_type": "sample"}"#, SchedulerKind::EulerAncestral, "prediction_type"),
        (r#"{"prediction_type": "flow_prediction"}"#, SchedulerKind::DpmPp2m, "flow_prediction"),
        (r#"{"timestep_spacing": "uniform"}"#, SchedulerKind::Euler, "timestep_spacing"),
        (r#"{"algorithm_type": "dpmsolver"}"#, SchedulerKind::DpmPp2m, "sigma_min"),
        (r#"{"solver_order": 4}"#, SchedulerKind::DpmPp2m, "solver_order"),
        (r#"{"variance_type": "learned_range"}"#, SchedulerKind::Ddpm, "variance_type"),
        (r#"{"use_exponential_sigmas": true, "use_karras_sigmas": true}"#, SchedulerKind::Euler, "only one of"),
        (r#"{"use_lu_lambdas": true}"#, SchedulerKind::DpmPp2m, "use_lu_lambdas"),
        (r#"{"solver_type": "bh3"}"#, SchedulerKind::UniPc, "solver_type"),
        (r#"{"prediction_type": "sample"}"#, SchedulerKind::Dpm2, "prediction_type"),
        (r#"{"original_inference_steps": 5}"#, SchedulerKind::Tcd, "original_inference_steps"),
        (r#"{"steps_offset": 5000}"#, SchedulerKind::Ddim, "steps_offset"),
        (r#"{"trained_betas": [0.1, 0.2]}"#, SchedulerKind::Ddim, "trained_betas"),
    ] {
        let cfg = SchedulerConfig::from_json_str(json).unwrap();
        let err = build(kind, None, &cfg, 10).err().unwrap_or_else(|| panic!("{json} accepted")).to_string();
        assert!(err.contains(needle), "{json}: {err}");
    }
    // fields a class does not have are ignored, as in diffusers
    let cfg = SchedulerConfig::from_json_str(r#"{"thresholding": true, "clip_sample": true}"#).unwrap();
    assert!(build(SchedulerKind::Euler, None, &cfg, 10).is_ok());
}

#[test]
fn config_errors_name_file_and_field() {
    let dir = std::env::temp_dir().join(format!("diffctl-sched-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("scheduler_config.json");
    std::fs::write(&path, r#"{"_class_name": "DDIMScheduler", "beta_start": "small"}"#).unwrap();
    let err = SchedulerConfig::load(&path).unwrap_err().to_string();
    assert!(err.contains("scheduler_config.json") && err.contains("beta_start"), "{err}");
    std::fs::write(&path, r#"{"_class_name": "DDIMScheduler", "beta_schedule": "cubic"}"#).unwrap();
    let cfg = SchedulerConfig::load(&path).unwrap();
    let err = build(SchedulerKind::Ddim, None, &cfg, 10).err().unwrap().to_string();
    assert!(err.contains("scheduler_config.json") && err.contains("cubic"), "{err}");
    std::fs::write(&path, "{ not json").unwrap();
    assert!(SchedulerConfig::load(&path).unwrap_err().to_string().contains("JSON"));
    let err = SchedulerConfig::load(dir.join("missing.json")).unwrap_err().to_string();
    assert!(err.contains("missing.json"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}
