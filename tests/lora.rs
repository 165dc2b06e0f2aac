//! LoRA, LoHa and LoKr (kohya, diffusers/PEFT and LyCORIS files) against their definitions computed
//! with torch on the same model (tools/fixtures/make_lora_fixtures.py, which also checks diffusers'
//! load_lora_weights against the definition for the UNet half); fused and unfused modes; switching
//! on a loaded model; bad files.

mod common;
mod lora_common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::{max_abs_diff, repo_path};
use diffctl::control::weights::{Lora, LoraMode};
use lora_common::{assert_cli_error, case, check, generate, load_model, prepare, run_cli};

const LORA_CASES: [&str; 5] = ["lora-kohya", "lora-peft", "lora-loha", "lora-lokr", "lora-multi"];

#[test]
fn fused_and_unfused_match_the_definition() {
    let mut report = Vec::new();
    for name in LORA_CASES {
        let case = case(name);
        let mut model = load_model();
        let base = generate(&model, &case);
        let effect = max_abs_diff(&base.latents, &common::load_fixture(&case.file)["latents"]);
        assert!(effect > 0.5, "{name}: the LoRAs move the latents by only {effect}");
        prepare(&mut model, &case, LoraMode::Fused);
        let fused = generate(&model, &case);
        let (fused_latents, fused_image) = check(&case, "fused", &fused);

        // The same LoRAs taken out of the weights and applied at run time.
        for (file, _) in &case.loras {
            model.set_lora_mode(file, LoraMode::Unfused).unwrap();
        }
        let unfused = generate(&model, &case);
        let (unfused_latents, unfused_image) = check(&case, "unfused", &unfused);
        let modes = max_abs_diff(&fused.latents, &unfused.latents);
        assert!(modes < 1e-3, "{name}: fused and unfused latents differ by {modes}");
        report.push(format!(
            "{name:12} effect {effect:.2} | fused: latents {fused_latents:.2e} image {fused_image:.2e} | unfused: latents \
             {unfused_latents:.2e} image {unfused_image:.2e} | fused vs unfused {modes:.2e}"
        ));
    }
    eprintln!("{}", report.join("\n"));
}

#[test]
fn loras_switch_on_a_loaded_model() {
    let case = case("lora-multi");
    let mut model = load_model();
    let base = generate(&model, &case);
    prepare(&mut model, &case, LoraMode::Unfused);
    assert_eq!(model.lora_names().len(), 4);
    check(&case, "unfused from the start", &generate(&model, &case));

    // Multiplier 0 on every LoRA is the base model; detaching restores it too, in either mode.
    for (file, _) in &case.loras {
        model.set_lora_scale(file, 0.0).unwrap();
    }
    let zero = max_abs_diff(&generate(&model, &case).latents, &base.latents);
    assert!(zero < 1e-5, "scale 0 differs from the base model by {zero}");
    for (file, scale) in &case.loras {
        model.set_lora_scale(file, *scale).unwrap();
        model.set_lora_mode(file, LoraMode::Fused).unwrap();
    }
    check(&case, "rescaled and fused", &generate(&model, &case));
    for (file, _) in &case.loras {
        model.detach_lora(file).unwrap();
    }
    assert!(model.lora_names().is_empty());
    let restored = max_abs_diff(&generate(&model, &case).latents, &base.latents);
    assert!(restored < 1e-3, "detaching left the model off by {restored}");
    assert!(model.detach_lora("tests/fixtures/lora/kohya.safetensors").is_err());
}

#[test]
fn cli_applies_several_loras_with_their_scales() {
    let case = case("lora-multi");
    let dir = tempfile::tempdir().unwrap();
    let specs: Vec<String> = case.loras.iter().map(|(f, s)| format!("{}:{s}", repo_path(f).display())).collect();
    let mut extra = Vec::new();
    for spec in &specs {
        extra.extend(["--lora", spec.as_str()]);
    }
    for mode in ["fused", "unfused"] {
        let mut args = extra.clone();
        args.extend(["--lora-mode", mode, "--strict-lora"]);
        let (out, latents) = run_cli(&case, dir.path(), &args);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let got = candle_core::safetensors::load(&latents, &Device::Cpu).unwrap();
        let fixture = common::load_fixture(&case.file);
        common::assert_close(&format!("cli {mode} latents"), &got["latents"], &fixture["latents"], 2e-3);
    }
}

/// Writes `tensors` as a safetensors file.
fn write(path: &Path, tensors: Vec<(&str, Tensor)>) {
    let map: HashMap<String, Tensor> = tensors.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    candle_core::safetensors::save(&map, path).unwrap();
}

fn randn(shape: &[usize]) -> Tensor {
    Tensor::randn(0f32, 0.1, shape, &Device::Cpu).unwrap()
}

const TO_Q: &str = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";

#[test]
fn unmatched_keys_warn_by_default_and_fail_when_strict() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("partly.safetensors");
    write(
        &file,
        vec![
            (&format!("{TO_Q}.lora_down.weight"), randn(&[2, 8])),
            (&format!("{TO_Q}.lora_up.weight"), randn(&[8, 2])),
            ("lora_unet_no_such_block_to_q.lora_down.weight", randn(&[2, 8])),
            ("lora_unet_no_such_block_to_q.lora_up.weight", randn(&[8, 2])),
            ("something_else", randn(&[3])),
        ],
    );
    let model = load_model();
    let lora = Lora::load(&file, &model.layers, &Device::Cpu).unwrap();
    assert_eq!(lora.deltas.len(), 1);
    assert_eq!(lora.unmatched.len(), 3, "{:?}", lora.unmatched);

    let case = case("lora-kohya");
    let spec = format!("{}:0.5", file.display());
    let (out, _) = run_cli(&case, dir.path(), &["--lora", &spec]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let warnings: Vec<&str> = stderr.lines().filter(|l| l.starts_with("warning")).collect();
    assert_eq!(warnings.len(), 1, "{stderr}");
    assert!(warnings[0].contains("3 keys") && warnings[0].contains("--strict-lora"), "{stderr}");

    let strict = tempfile::tempdir().unwrap();
    let (out, _) = run_cli(&case, strict.path(), &["--lora", &spec, "--strict-lora"]);
    assert_cli_error(&out, strict.path(), "3 keys");
}

/// The error `Lora::load` gives for a file with `tensors`.
fn load_error(tensors: Vec<(&str, Tensor)>) -> String {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.safetensors");
    write(&file, tensors);
    let model = load_model();
    let err = Lora::load(&file, &model.layers, &Device::Cpu).expect_err("the file should be refused");
    let message = err.to_string();
    assert!(message.contains("bad.safetensors"), "the error names the file: {message}");
    message
}

#[test]
fn sdxl_loras_are_refused_by_name() {
    let te1 = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj";
    let te2 = "lora_te2_text_model_encoder_layers_0_self_attn_q_proj";
    let message = load_error(vec![
        (&format!("{te1}.lora_down.weight"), randn(&[4, 32])),
        (&format!("{te1}.lora_up.weight"), randn(&[32, 4])),
        (&format!("{te2}.lora_down.weight"), randn(&[4, 48])),
        (&format!("{te2}.lora_up.weight"), randn(&[48, 4])),
        ("lora_unet_input_blocks_4_1_proj_in.lora_down.weight", randn(&[4, 16])),
        ("lora_unet_input_blocks_4_1_proj_in.lora_up.weight", randn(&[16, 4])),
    ]);
    assert!(message.contains("this LoRA is for SDXL"), "{message}");

    // The CLI says so in one line and writes nothing.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("sdxl.safetensors");
    write(
        &file,
        vec![
            (&format!("{te2}.lora_down.weight"), randn(&[4, 48])),
            (&format!("{te2}.lora_up.weight"), randn(&[48, 4])),
        ],
    );
    let (out, _) = run_cli(&case("lora-kohya"), dir.path(), &["--lora", file.to_str().unwrap()]);
    assert_cli_error(&out, dir.path(), "for SDXL");
}

#[test]
fn rank_mismatch_is_refused() {
    let message = load_error(vec![
        (&format!("{TO_Q}.lora_down.weight"), randn(&[4, 8])),
        (&format!("{TO_Q}.lora_up.weight"), randn(&[8, 3])),
    ]);
    assert!(message.contains("rank mismatch") && message.contains("[4, 8]") && message.contains("[8, 3]"), "{message}");
}

#[test]
fn a_lora_for_another_base_model_is_refused() {
    // SD2's cross-attention reads a 1024-wide context; this model's is 32 wide.
    let to_k = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k";
    let message = load_error(vec![
        (&format!("{to_k}.lora_down.weight"), randn(&[4, 1024])),
        (&format!("{to_k}.lora_up.weight"), randn(&[8, 4])),
    ]);
    assert!(message.contains("different base model") && message.contains("[4, 1024]"), "{message}");
}

#[test]
fn dora_and_partial_entries_are_refused() {
    let message = load_error(vec![
        (&format!("{TO_Q}.lora_down.weight"), randn(&[2, 8])),
        (&format!("{TO_Q}.lora_up.weight"), randn(&[8, 2])),
        (&format!("{TO_Q}.dora_scale"), randn(&[8, 1])),
    ]);
    assert!(message.contains("DoRA"), "{message}");
    let message = load_error(vec![(&format!("{TO_Q}.lora_down.weight"), randn(&[2, 8]))]);
    assert!(message.contains("no `up`"), "{message}");
}

#[test]
fn peft_text_encoder_keys_without_text_model_resolve_alike() {
    // transformers 5 saves CLIPTextModel without its `text_model.` level; files trained on it name
    // the text-encoder layers that way.
    let dir = tempfile::tempdir().unwrap();
    let peft = repo_path("tests/fixtures/lora/peft.safetensors");
    let tensors = candle_core::safetensors::load(&peft, &Device::Cpu).unwrap();
    let flat: HashMap<String, Tensor> =
        tensors.into_iter().map(|(k, v)| (k.replace("text_encoder.text_model.", "text_encoder."), v)).collect();
    assert!(flat.keys().any(|k| k.starts_with("text_encoder.encoder.")));
    let file = dir.path().join("flat.safetensors");
    candle_core::safetensors::save(&flat, &file).unwrap();

    let model = load_model();
    let original = Lora::load(&peft, &model.layers, &Device::Cpu).unwrap();
    let renamed = Lora::load(&file, &model.layers, &Device::Cpu).unwrap();
    assert!(renamed.unmatched.is_empty(), "{:?}", renamed.unmatched);
    let paths = |l: &Lora| l.deltas.iter().map(|(p, _)| p.clone()).collect::<Vec<_>>();
    assert_eq!(paths(&original).len(), paths(&renamed).len());
    // Without the header the alphas default to the rank, so only the targets are compared.
    assert!(paths(&renamed).iter().all(|p| paths(&original).contains(p)));
}

#[test]
fn kohya_names_map_through_the_models_own_layer_paths() {
    let model = load_model();
    let lora = Lora::load(&repo_path("tests/fixtures/lora/kohya.safetensors"), &model.layers, &Device::Cpu).unwrap();
    let paths: Vec<&str> = lora.deltas.iter().map(|(p, _)| p.as_str()).collect();
    for expected in [
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0",
        "unet.down_blocks.0.attentions.0.proj_in",
        "unet.down_blocks.1.resnets.0.conv1",
        "unet.down_blocks.0.downsamplers.0.conv",
        "unet.up_blocks.1.resnets.0.conv_shortcut",
        "text_encoder.text_model.encoder.layers.2.mlp.fc2",
    ] {
        assert!(paths.contains(&expected), "{expected} not targeted");
    }
    // The conv LoRA on a 3x3 convolution keeps its 3x3 down factor.
    let (_, delta) = lora.deltas.iter().find(|(p, _)| p == "unet.down_blocks.1.resnets.0.conv1").unwrap();
    match delta {
        diffctl::models::nn::WeightDelta::LowRank { down, up, .. } => {
            assert_eq!(down.dims()[2..], [3, 3]);
            assert_eq!(up.dims()[2..], [1, 1]);
            assert_eq!(down.dtype(), DType::F32);
        }
        other => panic!("expected a low-rank delta, got {other:?}"),
    }
}

#[test]
fn pytorch_checkpoints_read_like_safetensors() {
    let model = load_model();
    let load = |f: &str| Lora::load(&repo_path(f), &model.layers, &Device::Cpu).unwrap();
    let (pt, st) = (load("tests/fixtures/lora/lokr.pt"), load("tests/fixtures/lora/lokr.safetensors"));
    assert_eq!(pt.deltas.len(), st.deltas.len());
    for ((p1, d1), (p2, d2)) in pt.deltas.iter().zip(&st.deltas) {
        assert_eq!(p1, p2);
        let kind = model.layers.get(p1).unwrap().kind();
        assert_eq!(max_abs_diff(&d1.weight(&kind).unwrap(), &d2.weight(&kind).unwrap()), 0.0, "{p1}");
    }
}

/// A request's LoRAs act for its generation only: a model kept for the next request (a server's)
/// is left as it was.
#[test]
fn a_request_lora_is_detached_when_its_generation_ends() {
    use diffctl::pipeline::LoadOptions;
    use diffctl::request::{LoraSpec, Request};

    let options = LoadOptions::default();
    let mut model =
        diffctl::pipeline::StableDiffusion::load(&repo_path("tests/fixtures/models/sd1-tiny"), &options).unwrap();
    let base = Request { prompt: "a cat".into(), steps: 2, seed: 1, ..Request::default() };
    let with_lora = Request {
        loras: vec![LoraSpec { path: repo_path("tests/fixtures/lora/kohya.safetensors"), scale: 1.0 }],
        ..base.clone()
    };
    let mut run = |request: &Request| {
        let mut prepared = request.prepare(&mut model, &options).unwrap();
        let mut noise = diffctl::noise::SeededNoise::new(request.seed);
        let out = model.generate(&prepared.generate, &mut prepared.controls, &mut noise, &mut |_| {}).unwrap();
        assert!(model.lora_names().is_empty(), "left attached: {:?}", model.lora_names());
        out.latents
    };
    let plain = run(&base);
    let lora = run(&with_lora);
    assert!(max_abs_diff(&lora, &plain) > 1e-3, "the LoRA acted");
    // Fused (the default), detaching subtracts the delta again: the weights come back up to f32
    // rounding. Unfused, the weights are never touched: exactly as they were.
    assert!(max_abs_diff(&run(&base), &plain) < 1e-3, "the model is as it was, up to rounding");
    let unfused = Request { lora_mode: LoraMode::Unfused, ..with_lora.clone() };
    let plain = run(&base);
    assert!(max_abs_diff(&run(&unfused), &lora) < 1e-3, "unfused acts as fused");
    assert_eq!(max_abs_diff(&run(&base), &plain), 0.0, "unfused leaves the weights untouched");
}
