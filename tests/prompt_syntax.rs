//! A1111 prompt syntax against the reference in tools/fixtures/make_lora_fixtures.py: parsing,
//! chunking on the sd1-tiny tokenizer, and whole pipeline runs with weighted, chunked prompts.

mod common;
mod lora_common;

use candle_core::Device;
use common::repo_path;
use diffctl::control::weights::LoraMode;
use diffctl::prompt::a1111::{self, Fragment};
use diffctl::tokenizer::ClipTokenizer;
use lora_common::{SD1, case, check, generate, load_model, prepare, run_cli};

#[derive(serde::Deserialize)]
struct Cases {
    parse: Vec<ParseCase>,
    chunks: Vec<ChunkCase>,
}

#[derive(serde::Deserialize)]
struct ParseCase {
    text: String,
    /// [text, weight], weight null for BREAK.
    fragments: Vec<(String, Option<f64>)>,
}

#[derive(serde::Deserialize)]
struct ChunkCase {
    text: String,
    ids: Vec<Vec<u32>>,
    weights: Vec<Vec<f32>>,
}

fn cases() -> Cases {
    diffctl::io::read_json(&repo_path("tests/fixtures/prompt_syntax.json")).unwrap()
}

#[test]
fn parsing_matches_the_reference() {
    for case in cases().parse {
        let expected: Vec<Fragment> = case
            .fragments
            .into_iter()
            .map(|(text, weight)| match weight {
                Some(w) => Fragment::Text(text, w),
                None => Fragment::Break,
            })
            .collect();
        // serde_json's default float parsing may be one ulp off the written value.
        let got = a1111::parse(&case.text);
        let same = |a: &Fragment, b: &Fragment| match (a, b) {
            (Fragment::Text(t, w), Fragment::Text(u, v)) => t == u && (w - v).abs() <= 1e-12 * v.abs(),
            (a, b) => a == b,
        };
        assert!(
            got.len() == expected.len() && got.iter().zip(&expected).all(|(a, b)| same(a, b)),
            "{:?}: {got:?} vs {expected:?}",
            case.text
        );
    }
}

#[test]
fn chunking_matches_the_reference() {
    let tokenizer = ClipTokenizer::from_dir(&repo_path(SD1).join("tokenizer")).unwrap();
    for case in cases().chunks {
        let chunks = a1111::chunks(&tokenizer, &case.text).unwrap();
        let ids: Vec<Vec<u32>> = chunks.iter().map(|c| c.ids.clone()).collect();
        let weights: Vec<Vec<f32>> = chunks.iter().map(|c| c.weights.clone()).collect();
        assert_eq!(ids, case.ids, "ids of {:?}", case.text);
        assert_eq!(weights, case.weights, "weights of {:?}", case.text);
    }
}

#[test]
fn weighted_long_prompts_match_the_reference_pipeline() {
    for name in ["a1111-long", "a1111-clipskip"] {
        let case = case(name);
        let mut model = load_model();
        prepare(&mut model, &case, LoraMode::Fused);
        check(&case, "library", &generate(&model, &case));
    }
}

#[test]
fn cli_reads_a1111_syntax_only_when_asked() {
    let case = case("a1111-long");
    let dir = tempfile::tempdir().unwrap();
    let (out, latents) = run_cli(&case, dir.path(), &["--prompt-syntax", "a1111"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got = candle_core::safetensors::load(&latents, &Device::Cpu).unwrap();
    let fixture = common::load_fixture(&case.file);
    common::assert_close("cli a1111 latents", &got["latents"], &fixture["latents"], 2e-3);

    // By default the same text is literal (and truncated): a different result.
    let (out, latents) = run_cli(&case, dir.path(), &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got = candle_core::safetensors::load(&latents, &Device::Cpu).unwrap();
    assert!(common::max_abs_diff(&got["latents"], &fixture["latents"]) > 1e-2);

    let (out, _) = run_cli(&case, dir.path(), &["--prompt-syntax", "comfy"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown prompt syntax"));
}

#[test]
fn placeholder_vectors_stay_in_one_chunk() {
    let mut model = load_model();
    let vectors = candle_core::Tensor::zeros((3, 32), candle_core::DType::F32, &Device::Cpu).unwrap();
    model.add_token_vectors("<three>", &vectors, None).unwrap();
    let first = model.text_encoder.config().vocab_size as u32;
    // 74 single-token words, then the 3-vector placeholder: it does not fit and moves whole.
    let text = format!("{} <three>", "a ".repeat(74));
    let chunks = a1111::chunks(&model.tokenizer, &text).unwrap();
    assert_eq!(chunks.len(), 2);
    assert_eq!(chunks[1].ids[1..4], [first, first + 1, first + 2]);
    assert!(!chunks[0].ids.contains(&first));
}
