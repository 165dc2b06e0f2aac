//! Mechanisms on SDXL: kohya LoRAs in the SGM naming, and (from tests/fixtures/sdxl/mechanisms)
//! ControlNet, T2I-Adapter, IP-Adapter, LoRA and textual inversion pipelines against diffusers.

mod common;

use std::collections::HashMap;

use candle_core::Device;
use common::repo_path;
use diffctl::control::weights::Lora;
use diffctl::pipeline::{LoadOptions, StableDiffusion};

const MODEL: &str = "tests/fixtures/models/sdxl-tiny";

/// A kohya SDXL LoRA names UNet modules by the original SGM layout (`lora_unet_input_blocks_4_1_…`)
/// and the encoders `lora_te1_…`/`lora_te2_…`: every module resolves to the layer diffusers maps it
/// to, and gives the same deltas as the same LoRA in diffusers/PEFT format.
#[test]
fn kohya_sdxl_names_resolve_as_diffusers_maps_them() {
    let model = StableDiffusion::load(&repo_path(MODEL), &LoadOptions::default()).unwrap();
    let kohya =
        Lora::load(&repo_path("tests/fixtures/lora/sdxl-kohya.safetensors"), &model.layers, &Device::Cpu).unwrap();
    assert!(kohya.unmatched.is_empty(), "unmatched: {:?}", kohya.unmatched);
    let expected: HashMap<String, String> =
        diffctl::io::read_json(&repo_path("tests/fixtures/lora/sdxl-kohya.keys.json")).unwrap();
    // The fixture names the first encoder `text_encoder.*` as transformers 5 does; our layer paths
    // keep the public `text_model.` level.
    let mut wanted: Vec<String> = expected
        .values()
        .map(|p| match p.strip_prefix("text_encoder.").filter(|r| !r.starts_with("text_model.")) {
            Some(rest) => format!("text_encoder.text_model.{rest}"),
            None => match p.strip_prefix("text_encoder_2.").filter(|r| !r.starts_with("text_model.")) {
                Some(rest) => format!("text_encoder_2.text_model.{rest}"),
                None => p.clone(),
            },
        })
        .collect();
    wanted.sort();
    let mut got: Vec<String> = kohya.deltas.iter().map(|(p, _)| p.clone()).collect();
    got.sort();
    assert_eq!(got, wanted);

    let peft =
        Lora::load(&repo_path("tests/fixtures/lora/sdxl-peft.safetensors"), &model.layers, &Device::Cpu).unwrap();
    assert!(peft.unmatched.is_empty(), "unmatched: {:?}", peft.unmatched);
    let peft: HashMap<_, _> = peft.deltas.into_iter().collect();
    for (path, delta) in &kohya.deltas {
        let kind = model.layers.get(path).unwrap().kind();
        let a = delta.weight(&kind).unwrap();
        let b = peft.get(path).unwrap_or_else(|| panic!("{path} missing from the PEFT file")).weight(&kind).unwrap();
        let err = common::max_abs_diff(&a, &b);
        assert!(err <= 1e-5 * (1.0 + common::std_all(&a)), "{path}: {err}");
    }
}
