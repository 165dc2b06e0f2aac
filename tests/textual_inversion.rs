//! Textual inversion against diffusers' load_textual_inversion (tools/fixtures/make_lora_fixtures.py):
//! an A1111 .pt (two vectors), an A1111 .safetensors (`emb_params`) and a diffusers
//! learned_embeds.safetensors, used in positive and negative prompts; run-time vectors; bad files.

mod common;
mod lora_common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use common::{max_abs_diff, repo_path};
use diffctl::control::tokens::textual_inversion::Embedding;
use diffctl::control::weights::LoraMode;
use lora_common::{assert_cli_error, case, check, generate, load_model, prepare, run_cli};

#[test]
fn embeddings_match_diffusers_in_positive_and_negative_prompts() {
    for name in ["ti-a1111", "ti-diffusers"] {
        let case = case(name);
        let mut model = load_model();
        prepare(&mut model, &case, LoraMode::Fused);
        let tokens: Vec<(String, usize)> = model.token_vectors.tokens().map(|(t, n)| (t.to_string(), n)).collect();
        assert_eq!(tokens, [("tiny-style".into(), 2), ("bad-hands".into(), 1), ("<cat-toy>".into(), 1)]);
        check(&case, "library", &generate(&model, &case));
    }
}

#[test]
fn multi_vector_tokens_expand_like_diffusers() {
    let mut model = load_model();
    model.load_textual_inversion(&repo_path("tests/fixtures/lora/tiny-style.pt"), None).unwrap();
    let first = model.text_encoder.config().vocab_size as u32;
    assert_eq!(model.tokenizer.encode_words("in tiny-style").unwrap()[1..], [first, first + 1]);
    assert_eq!(model.tokenizer.encode_words("TINY-STYLE_1").unwrap(), [first + 1]);
}

#[test]
fn cli_loads_embeddings_by_file_and_token() {
    let case = case("ti-a1111");
    let dir = tempfile::tempdir().unwrap();
    let files: Vec<String> = case.embeddings.iter().map(|(f, _)| repo_path(f).display().to_string()).collect();
    let mut extra = Vec::new();
    for file in &files {
        extra.extend(["--embedding", file.as_str()]);
    }
    let (out, latents) = run_cli(&case, dir.path(), &extra);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got = candle_core::safetensors::load(&latents, &Device::Cpu).unwrap();
    common::assert_close("cli latents", &got["latents"], &common::load_fixture(&case.file)["latents"], 2e-3);

    // The same A1111 embedding under a token given on the command line.
    let renamed = tempfile::tempdir().unwrap();
    let mut case = case.clone();
    case.prompt = case.prompt.replace("tiny-style", "<my-style>");
    case.negative_prompt = case.negative_prompt.replace("tiny-style", "<my-style>");
    let spec = format!("{}:<my-style>", files[0]);
    let (out, latents) =
        run_cli(&case, renamed.path(), &["--embedding", &spec, "--embedding", &files[1], "--embedding", &files[2]]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got = candle_core::safetensors::load(&latents, &Device::Cpu).unwrap();
    common::assert_close("cli renamed latents", &got["latents"], &common::load_fixture(&case.file)["latents"], 2e-3);
}

#[test]
fn run_time_vectors_replace_file_vectors() {
    let case = case("ti-diffusers");
    let mut model = load_model();
    prepare(&mut model, &case, LoraMode::Fused);
    let recorded = generate(&model, &case);
    let file = Embedding::load(&repo_path("tests/fixtures/lora/learned_embeds.safetensors"), &Device::Cpu).unwrap();
    // ELITE/PhotoVerse-style: vectors computed at run time take the placeholder's place.
    model.set_token_vectors("<cat-toy>", &(file.vectors.clone() * 3.0).unwrap()).unwrap();
    let changed = max_abs_diff(&generate(&model, &case).latents, &recorded.latents);
    assert!(changed > 1e-2, "new vectors changed nothing ({changed})");
    model.set_token_vectors("<cat-toy>", &file.vectors).unwrap();
    let back = max_abs_diff(&generate(&model, &case).latents, &recorded.latents);
    assert!(back < 1e-6, "restoring the vectors left a difference of {back}");
    assert!(
        model
            .set_token_vectors("<cat-toy>", &Tensor::zeros((2, 32), candle_core::DType::F32, &Device::Cpu).unwrap())
            .is_err()
    );
    assert!(model.set_token_vectors("<unknown>", &file.vectors).is_err());
}

fn write(path: &Path, tensors: Vec<(&str, Tensor)>) {
    let map: HashMap<String, Tensor> = tensors.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    candle_core::safetensors::save(&map, path).unwrap();
}

#[test]
fn bad_embeddings_are_refused_with_the_file_named() {
    let dir = tempfile::tempdir().unwrap();
    let mut model = load_model();
    let load = |model: &mut diffctl::pipeline::StableDiffusion,
                name: &str,
                tensors: Vec<(&str, Tensor)>,
                token: Option<&str>| {
        let file = dir.path().join(name);
        write(&file, tensors);
        let message = model.load_textual_inversion(&file, token).expect_err("should be refused").to_string();
        assert!(message.contains(name), "the error names the file: {message}");
        message
    };
    let zeros = |shape: &[usize]| Tensor::zeros(shape, candle_core::DType::F32, &Device::Cpu).unwrap();

    let message = load(&mut model, "sd2-style.safetensors", vec![("emb_params", zeros(&[2, 48]))], None);
    assert!(message.contains("[2, 48]") && message.contains("32 wide"), "{message}");
    let message = load(&mut model, "photo.safetensors", vec![("emb_params", zeros(&[1, 32]))], None);
    assert!(message.contains("`photo`") && message.contains("vocabulary"), "{message}");
    let message =
        load(&mut model, "x.safetensors", vec![("clip_l", zeros(&[1, 32])), ("clip_g", zeros(&[1, 48]))], None);
    assert!(message.contains("SDXL"), "{message}");
    let message = load(&mut model, "y.safetensors", vec![("a", zeros(&[32])), ("b", zeros(&[32]))], None);
    assert!(message.contains("not a textual-inversion embedding"), "{message}");
    let ok = dir.path().join("ok.safetensors");
    write(&ok, vec![("emb_params", zeros(&[1, 32]))]);
    model.load_textual_inversion(&ok, Some("<twice>")).unwrap();
    let message = load(&mut model, "again.safetensors", vec![("emb_params", zeros(&[1, 32]))], Some("<twice>"));
    assert!(message.contains("<twice>"), "{message}");
    assert!(model.token_vectors.tokens().all(|(t, _)| t == "<twice>"), "refused embeddings left tokens behind");

    // The CLI: one error line, no output.
    let (out, _) = run_cli(
        &case("ti-diffusers"),
        dir.path(),
        &["--embedding", dir.path().join("sd2-style.safetensors").to_str().unwrap()],
    );
    assert_cli_error(&out, dir.path(), "32 wide");
}
