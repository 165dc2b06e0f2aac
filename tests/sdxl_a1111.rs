//! The A1111 prompt syntax on SDXL against a restatement of AUTOMATIC1111's SDXL conditioning
//! (tools/fixtures/make_sdxl_a1111_fixtures.py): both encoders read the same 75-token chunks, each
//! weights its own hidden states, the pooled embeddings come from the first chunk, an empty
//! negative prompt is zeros; then whole diffusers runs on those embeddings.

mod common;

use common::{ReplayNoise, assert_close, load_fixture, repo_path};
use diffctl::noise::SeededNoise;
use diffctl::pipeline::{LoadOptions, StableDiffusion};
use diffctl::prompt::PromptSyntax;
use diffctl::request::Request;

const MODEL: &str = "tests/fixtures/models/sdxl-tiny";
const CASES: &str = "tests/fixtures/sdxl-a1111/cases.json";

#[derive(serde::Deserialize)]
struct Encoding {
    name: String,
    prompt: String,
    context: String,
    pooled: String,
}

#[derive(serde::Deserialize)]
struct Case {
    name: String,
    file: String,
    prompt: String,
    negative_prompt: String,
    uncond: String,
    steps: usize,
    guidance: f64,
    width: usize,
    height: usize,
}

#[derive(serde::Deserialize)]
struct Cases {
    encodings: Vec<Encoding>,
    cases: Vec<Case>,
}

fn load_model() -> StableDiffusion {
    let mut model = StableDiffusion::load(&repo_path(MODEL), &LoadOptions::default()).unwrap();
    model.prompt_syntax = PromptSyntax::A1111;
    model
}

#[test]
fn a1111_prompts_on_sdxl_match_the_restatement() {
    let cases: Cases = diffctl::io::read_json(&repo_path(CASES)).unwrap();
    let expected = load_fixture("tests/fixtures/sdxl-a1111/encodings.safetensors");
    let model = load_model();
    let (mut worst_context, mut worst_pooled) = (0f32, 0f32);
    for e in &cases.encodings {
        let (context, pooled) = model.encode_prompt_and_pooled(&e.prompt, 0).unwrap();
        let largest = expected[&e.context].abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let tolerance = 1e-5 * (1.0 + largest);
        let err = common::max_abs_diff(&context, &expected[&e.context]);
        assert!(err <= tolerance, "{}: context max|diff| {err:.2e} > {tolerance:.2e}", e.name);
        worst_context = worst_context.max(err);
        let err = common::max_abs_diff(&pooled.unwrap(), &expected[&e.pooled]);
        assert!(err <= 1e-5, "{}: pooled max|diff| {err:.2e}", e.name);
        worst_pooled = worst_pooled.max(err);
    }
    eprintln!("{} encodings: context max|diff| {worst_context:.2e}, pooled {worst_pooled:.2e}", cases.encodings.len());
}

#[test]
fn a1111_sdxl_pipeline_matches_diffusers_on_the_restated_embeddings() {
    let cases: Cases = diffctl::io::read_json(&repo_path(CASES)).unwrap();
    let mut model = load_model();
    let mut report = Vec::new();
    // diffctl pads a shorter context with the empty prompt's encoding (A1111's "pad prompt/negative
    // prompt" option), the same as it does on SD1; A1111's default runs the rows separately.
    for case in cases.cases.iter().filter(|c| c.uncond != "separate") {
        let fixture = load_fixture(&case.file);
        let request = Request {
            prompt: case.prompt.clone(),
            negative_prompt: Some(case.negative_prompt.clone()),
            prompt_syntax: PromptSyntax::A1111,
            steps: case.steps,
            guidance: case.guidance,
            width: Some(case.width),
            height: Some(case.height),
            ..Request::default()
        };
        let mut prepared = request.prepare(&mut model, &LoadOptions::default()).unwrap();
        prepared.generate.init_latents = Some(fixture["init_latents"].clone());
        let out = model
            .generate(&prepared.generate, &mut prepared.controls, &mut ReplayNoise(Vec::new()), &mut |_| {})
            .unwrap();
        let err = assert_close(&case.name, &out.latents, &fixture["latents"], 2e-3);
        report.push(format!("{:28} latents {err:.2e}", case.name));
    }
    assert_eq!(report.len(), 3);
    eprintln!("{}", report.join("\n"));
}

/// The first and second prompts must make as many chunks; the CLI reads A1111 prompts on SDXL.
#[test]
fn a1111_sdxl_chunk_mismatch_is_refused_and_the_cli_accepts_the_syntax() {
    let model = load_model();
    let request = Request {
        prompt: "a cat BREAK on a chair".into(),
        prompt_2: Some("a cat".into()),
        prompt_syntax: PromptSyntax::A1111,
        steps: 1,
        ..Request::default()
    };
    let mut model = model;
    let err = match request.prepare(&mut model, &LoadOptions::default()) {
        Ok(mut prepared) => model
            .generate(&prepared.generate, &mut prepared.controls, &mut SeededNoise::new(0), &mut |_| {})
            .err()
            .unwrap()
            .to_string(),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("as many 75-token chunks") && err.contains("makes 2") && err.contains("second 1"), "{err}");

    let cases: Cases = diffctl::io::read_json(&repo_path(CASES)).unwrap();
    let case = cases.cases.iter().find(|c| c.uncond == "zero").unwrap();
    let fixture = load_fixture(&case.file);
    let dir = tempfile::tempdir().unwrap();
    let init = dir.path().join("init.safetensors");
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("latents", fixture["init_latents"].clone())]),
        &init,
    )
    .unwrap();
    let latents = dir.path().join("out.safetensors");
    let size = case.width.to_string();
    let out = common::diffctl(&[
        "generate",
        "--model",
        repo_path(MODEL).to_str().unwrap(),
        "--prompt-syntax",
        "a1111",
        "--prompt",
        &case.prompt,
        "--negative-prompt",
        &case.negative_prompt,
        "--steps",
        &case.steps.to_string(),
        "--guidance",
        &case.guidance.to_string(),
        "--width",
        &size,
        "--height",
        &size,
        "--init-latents",
        init.to_str().unwrap(),
        "--output",
        dir.path().join("out.png").to_str().unwrap(),
        "--output-latents",
        latents.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got = candle_core::safetensors::load(&latents, &candle_core::Device::Cpu).unwrap();
    assert_close(&format!("cli {}", case.name), &got["latents"], &fixture["latents"], 2e-3);
}
