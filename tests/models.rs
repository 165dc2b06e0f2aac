//! Unit-level parity with transformers/diffusers on the tiny fixture models: tokenizer ids, text
//! embeddings, one UNet forward with per-sample timesteps, VAE decode and encode.

mod common;

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use common::{assert_close, load_fixture, repo_path};
use diffctl::io::weights::{TensorStore, Weights};
use diffctl::models::clip_text::{ClipTextConfig, ClipTextEncoder};
use diffctl::models::unet::{Conditioning, DeepCache, UNet, UNetConfig, UNetControls, UNetInput};
use diffctl::models::vae::{Vae, VaeConfig};
use diffctl::tokenizer::ClipTokenizer;

const MODELS: [&str; 2] = ["sd1-tiny", "sd2-tiny"];

fn weights(model: &str, component: &str, file: &str) -> Weights {
    let path = repo_path(&format!("tests/fixtures/models/{model}/{component}/{file}"));
    let store = TensorStore::open_safetensors(&path, std::slice::from_ref(&path)).unwrap();
    Weights::new(Arc::new(store), DType::F32, &Device::Cpu)
}

fn config(model: &str, component: &str) -> std::path::PathBuf {
    repo_path(&format!("tests/fixtures/models/{model}/{component}/config.json"))
}

#[derive(serde::Deserialize)]
struct TokenizerCases {
    cases: Vec<TokenizerCase>,
}

#[derive(serde::Deserialize)]
struct TokenizerCase {
    text: String,
    ids: Vec<u32>,
    ids_77: Vec<u32>,
    ids_fast: Vec<u32>,
}

#[test]
fn tokenizer_matches_transformers_on_bundled_vocab_and_tokenizer_json() {
    let cases: TokenizerCases =
        serde_json::from_str(&std::fs::read_to_string(repo_path("tests/fixtures/tokenizer_cases.json")).unwrap())
            .unwrap();
    let from_pair = ClipTokenizer::from_dir(&repo_path("assets/clip-tokenizer")).unwrap();
    // tokenizer.json holds sd1-tiny's small vocabulary; its vocab.json + merges.txt must agree.
    let from_json = ClipTokenizer::from_dir(&repo_path("tests/fixtures/clip-tokenizer-fast")).unwrap();
    let tiny_pair = ClipTokenizer::from_dir(&repo_path("tests/fixtures/models/sd1-tiny/tokenizer")).unwrap();
    assert_eq!(from_pair.max_length(), 77);
    for case in &cases.cases {
        assert_eq!(from_pair.encode(&case.text).unwrap(), case.ids, "vocab+merges, text {:?}", case.text);
        assert_eq!(from_pair.encode_padded(&case.text).unwrap(), case.ids_77, "padded, text {:?}", case.text);
        assert_eq!(from_json.encode(&case.text).unwrap(), case.ids_fast, "tokenizer.json, text {:?}", case.text);
        assert_eq!(tiny_pair.encode(&case.text).unwrap(), case.ids_fast, "tiny vocab+merges, text {:?}", case.text);
    }
}

#[test]
fn text_encoder_matches_transformers() {
    for model in MODELS {
        let unit = load_fixture(&format!("tests/fixtures/units/{model}.safetensors"));
        let cfg = ClipTextConfig::load(&config(model, "text_encoder")).unwrap();
        let enc = ClipTextEncoder::load(&weights(model, "text_encoder", "model.safetensors"), &cfg).unwrap();
        let ids = unit["text.input_ids"].to_dtype(DType::U32).unwrap();
        assert_close(
            &format!("{model} text last_hidden_state"),
            &enc.encode(&ids, 0).unwrap(),
            &unit["text.last_hidden_state"],
            2e-5,
        );
        assert_close(
            &format!("{model} text clip_skip=1"),
            &enc.encode(&ids, 1).unwrap(),
            &unit["text.clip_skip1"],
            2e-5,
        );
    }
}

#[test]
fn unet_forward_matches_diffusers_with_per_sample_timesteps() {
    for model in MODELS {
        let unit = load_fixture(&format!("tests/fixtures/units/{model}.safetensors"));
        let cfg = UNetConfig::load(&config(model, "unet")).unwrap();
        let unet = UNet::load(&weights(model, "unet", "diffusion_pytorch_model.safetensors"), &cfg).unwrap();
        let out = call(
            &unet,
            &unit["unet.sample"],
            &unit["unet.timesteps"],
            &unit["unet.context"],
            &UNetControls::default(),
            None,
        )
        .unwrap();
        assert_close(&format!("{model} unet"), &out, &unit["unet.out"], 2e-5);
    }
}

#[test]
fn vae_matches_diffusers() {
    for model in MODELS {
        let unit = load_fixture(&format!("tests/fixtures/units/{model}.safetensors"));
        let cfg = VaeConfig::load(&config(model, "vae")).unwrap();
        let vae = Vae::load(&weights(model, "vae", "diffusion_pytorch_model.safetensors"), &cfg).unwrap();
        assert_close(
            &format!("{model} vae decode"),
            &vae.decode(&unit["vae.latents"]).unwrap(),
            &unit["vae.decoded"],
            2e-5,
        );
        assert_close(
            &format!("{model} vae encode"),
            &vae.encode(&unit["vae.image"]).unwrap().mean,
            &unit["vae.encoded_mean"],
            2e-5,
        );
        assert_close(
            &format!("{model} vae encode logvar"),
            vae.encode(&unit["vae.image"]).unwrap().logvar.as_ref().expect("an autoencoder has a spread"),
            &unit["vae.encoded_logvar"],
            2e-5,
        );
    }
}

/// diffusers' `enable_tiling()` decode: 4x2 tiles of 16 latents (sample_size 32, factor 2) with a
/// 4-latent trailing row; the tiled output is compared with diffusers' tiled output, and the
/// untiled one shows how far tiling moves the pixels.
#[test]
fn vae_tiling_matches_diffusers_tiled_decode() {
    let fixture = load_fixture("tests/fixtures/vae_tiling.safetensors");
    let cfg = VaeConfig::load(&config("sd1-tiny", "vae")).unwrap();
    assert_eq!(cfg.sample_size, 32);
    let mut vae = Vae::load(&weights("sd1-tiny", "vae", "diffusion_pytorch_model.safetensors"), &cfg).unwrap();
    let untiled = vae.decode_to_unit_range(&fixture["latents"]).unwrap();
    assert_close("untiled decode", &untiled, &fixture["untiled"], 1e-5);
    vae.enable_tiling(None).unwrap();
    let tiled = vae.decode_to_unit_range(&fixture["latents"]).unwrap();
    assert_close("tiled decode", &tiled, &fixture["tiled"], 1e-5);
    let moved = common::max_abs_diff(&tiled, &untiled);
    assert!(moved > 1e-3, "tiling should change the pixels at the seams (max |diff| {moved})");

    let err = vae.enable_tiling(Some(2)).unwrap_err().to_string();
    assert!(err.contains("tile size 2 px"), "{err}");
}

/// The same on the tiny SDXL VAE (its own sample size and scaling factor; tiles with a trailing
/// partial row and column), against diffusers' tiled decode.
#[test]
fn vae_tiling_on_sdxl_matches_diffusers_tiled_decode() {
    let fixture = load_fixture("tests/fixtures/vae_tiling_sdxl.safetensors");
    let cfg = VaeConfig::load(&config("sdxl-tiny", "vae")).unwrap();
    let mut vae = Vae::load(&weights("sdxl-tiny", "vae", "diffusion_pytorch_model.safetensors"), &cfg).unwrap();
    let untiled = vae.decode_to_unit_range(&fixture["latents"]).unwrap();
    assert_close("SDXL untiled decode", &untiled, &fixture["untiled"], 1e-5);
    vae.enable_tiling(None).unwrap();
    let tiled = vae.decode_to_unit_range(&fixture["latents"]).unwrap();
    assert_close("SDXL tiled decode", &tiled, &fixture["tiled"], 1e-5);
    assert!(common::max_abs_diff(&tiled, &untiled) > 1e-3, "tiling should change the pixels at the seams");
}

/// The shapes of the skip connections the down path makes for `sample` (what ControlNet residuals
/// must match): `conv_in`'s, each layer's, each downsampler's.
fn skip_shapes(cfg: &UNetConfig, sample: &Tensor) -> Vec<Vec<usize>> {
    let (b, _, h, w) = sample.dims4().unwrap();
    let mut size = (h, w);
    let mut shapes = vec![vec![b, cfg.blocks[0].channels, h, w]];
    for (i, block) in cfg.blocks.iter().enumerate() {
        for _ in 0..block.layers {
            shapes.push(vec![b, block.channels, size.0, size.1]);
        }
        if i + 1 < cfg.blocks.len() {
            size = (size.0.div_ceil(2), size.1.div_ceil(2));
            shapes.push(vec![b, block.channels, size.0, size.1]);
        }
    }
    shapes
}

/// DeepCache at every branch: a partial call on the inputs of the refresh before it reproduces the
/// whole UNet exactly (its shallow branch is recomputed, its deep feature is that call's), residual
/// controls included; a partial call on other inputs uses the kept feature; refreshes follow the
/// interval and the sample's shape; a branch past the deepest and interval 0 are clear errors.
#[test]
fn deep_cache_partial_calls_reuse_the_deep_feature() {
    for model in MODELS {
        let unit = load_fixture(&format!("tests/fixtures/units/{model}.safetensors"));
        let cfg = UNetConfig::load(&config(model, "unet")).unwrap();
        let unet = UNet::load(&weights(model, "unet", "diffusion_pytorch_model.safetensors"), &cfg).unwrap();
        let (sample, t, ctx) = (&unit["unet.sample"], &unit["unet.timesteps"], &unit["unet.context"]);
        let sample2 = sample.randn_like(0.0, 1.0).unwrap();
        let residuals = skip_shapes(&cfg, sample)
            .into_iter()
            .map(|shape| Tensor::randn(0f32, 0.3, shape, &Device::Cpu).unwrap())
            .collect::<Vec<_>>();
        let mid = residuals.last().unwrap().randn_like(0.0, 0.3).unwrap();
        let controls = UNetControls { down_residuals: Some(residuals), mid_residual: Some(mid), ..Default::default() };
        let exact = call(&unet, sample, t, ctx, &controls, None).unwrap();
        let exact2 = call(&unet, &sample2, t, ctx, &controls, None).unwrap();
        for branch in 0..unet.num_skips() {
            let what = format!("{model} DeepCache branch {branch}");
            let mut cache = DeepCache::new(2, branch).unwrap();
            let mut run = |sample: &Tensor| call(&unet, sample, t, ctx, &controls, Some(&mut cache)).unwrap();
            assert!(common::max_abs_diff(&run(sample), &exact) < 1e-6, "{what}: refresh");
            assert_close(&format!("{what}: partial on the same inputs"), &run(sample), &exact, 1e-5);
            assert!(common::max_abs_diff(&run(&sample2), &exact2) < 1e-6, "{what}: second refresh");
            // Partial on the first sample, around the feature kept for the second: neither output.
            let mixed = run(sample);
            assert!(common::max_abs_diff(&mixed, &exact) > 1e-4, "{what}: the kept feature is not used");
            assert!(common::max_abs_diff(&mixed, &exact2) > 1e-4, "{what}: the shallow branch is not run");
        }
        // A sample of another shape refreshes whatever the schedule says.
        let one = sample.narrow(0, 0, 1).unwrap();
        let one_controls = UNetControls::default();
        let mut cache = DeepCache::new(4, 0).unwrap();
        call(&unet, sample, t, ctx, &one_controls, Some(&mut cache)).unwrap();
        let (t1, c1) = (t.narrow(0, 0, 1).unwrap(), ctx.narrow(0, 0, 1).unwrap());
        let out = call(&unet, &one, &t1, &c1, &one_controls, Some(&mut cache)).unwrap();
        let expected = call(&unet, &one, &t1, &c1, &one_controls, None).unwrap();
        assert!(common::max_abs_diff(&out, &expected) < 1e-6, "{model}: a new shape refreshes");

        let deepest = unet.num_skips() - 1;
        let mut past = DeepCache::new(2, deepest + 1).unwrap();
        let err = call(&unet, sample, t, ctx, &one_controls, Some(&mut past)).unwrap_err().to_string();
        assert!(
            err.contains(&format!("branch {}", deepest + 1)) && err.contains(&format!("deepest, {deepest}")),
            "{err}"
        );
    }
    let err = DeepCache::new(0, 0).unwrap_err().to_string();
    assert!(err.contains("interval"), "{err}");
}

#[test]
fn unet_controls_change_the_output_only_where_injected() {
    let model = "sd1-tiny";
    let unit = load_fixture(&format!("tests/fixtures/units/{model}.safetensors"));
    let cfg = UNetConfig::load(&config(model, "unet")).unwrap();
    let unet = UNet::load(&weights(model, "unet", "diffusion_pytorch_model.safetensors"), &cfg).unwrap();
    let (sample, t, ctx) = (&unit["unet.sample"], &unit["unet.timesteps"], &unit["unet.context"]);
    let base = call(&unet, sample, t, ctx, &UNetControls::default(), None).unwrap();

    // Zero residuals and a zero-scaled extra attention stream leave the output unchanged.
    let b = sample.dim(0).unwrap();
    let mut skips: Vec<Tensor> = skip_shapes(&cfg, sample)
        .into_iter()
        .map(|shape| Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap())
        .collect();
    assert_eq!(skips.len(), unet.num_skips());
    let layer = "down_blocks.0.attentions.0.transformer_blocks.0.attn2".to_string();
    let inner = cfg.blocks[0].channels;
    let stream = diffctl::models::unet::ExtraAttention {
        key: Tensor::ones((b, 3, inner), DType::F32, &Device::Cpu).unwrap(),
        value: Tensor::ones((b, 3, inner), DType::F32, &Device::Cpu).unwrap(),
        scale: 0.0,
        mask: None,
    };
    let mut controls = UNetControls { down_residuals: Some(skips.clone()), ..Default::default() };
    controls.extra_attention.push(std::sync::Arc::new([(layer.clone(), vec![stream.clone()])].into_iter().collect()));
    let same = call(&unet, sample, t, ctx, &controls, None).unwrap();
    assert!(common::max_abs_diff(&same, &base) < 1e-6);

    // A non-zero stream at one layer changes the output.
    controls.extra_attention = vec![std::sync::Arc::new(
        [(layer, vec![diffctl::models::unet::ExtraAttention { scale: 1.0, ..stream }])].into_iter().collect(),
    )];
    let changed = call(&unet, sample, t, ctx, &controls, None).unwrap();
    assert!(common::max_abs_diff(&changed, &base) > 1e-3);

    // A wrong number of residuals is an error, not a panic.
    skips.pop();
    let bad = UNetControls { down_residuals: Some(skips), ..Default::default() };
    let err = call(&unet, sample, t, ctx, &bad, None).unwrap_err().to_string();
    assert!(err.contains("down residuals"), "{err}");
}

/// One UNet call on `sample` at `t` with the text context `ctx`, the `controls` and DeepCache `cache`.
fn call(
    unet: &UNet,
    sample: &Tensor,
    t: &Tensor,
    ctx: &Tensor,
    controls: &UNetControls,
    cache: Option<&mut DeepCache>,
) -> diffctl::Result<Tensor> {
    let conditioning = Conditioning::text(ctx.clone());
    unet.forward(UNetInput::new(sample, t, &conditioning).with_controls(controls).with_deep_cache(cache))
}

/// SDXL's added conditioning: a tiny UNet with `addition_embed_type: text_time`, a down block
/// without attention and two transformer layers in the other, against diffusers with pooled text
/// embeddings and time ids (tools/fixtures/make_sdxl_unet_fixtures.py).
#[test]
fn sdxl_add_embedding_matches_diffusers() {
    let unit = load_fixture("tests/fixtures/sdxl/unet-units.safetensors");
    let path = repo_path("tests/fixtures/sdxl/unet/diffusion_pytorch_model.safetensors");
    let store = TensorStore::open_safetensors(&path, std::slice::from_ref(&path)).unwrap();
    let cfg = UNetConfig::load(&repo_path("tests/fixtures/sdxl/unet/config.json")).unwrap();
    assert!(cfg.add_embedding.is_some());
    let unet = UNet::load(&Weights::new(Arc::new(store), DType::F32, &Device::Cpu), &cfg).unwrap();
    let call = |pooled: Option<&Tensor>, time_ids: Option<&Tensor>| {
        let conditioning = Conditioning {
            pooled: pooled.cloned(),
            time_ids: time_ids.cloned(),
            ..Conditioning::text(unit["context"].clone())
        };
        unet.forward(UNetInput::new(&unit["sample"], &unit["timesteps"], &conditioning))
    };
    let out = call(Some(&unit["text_embeds"]), Some(&unit["time_ids"])).unwrap();
    assert_close("sdxl unet", &out, &unit["out"], 2e-5);
    let flipped = unit["time_ids"].flip(&[0]).unwrap();
    let other = call(Some(&unit["text_embeds"]), Some(&flipped)).unwrap();
    assert_close("sdxl unet, other time ids", &other, &unit["out_other_time_ids"], 2e-5);

    let err = call(None, None).unwrap_err().to_string();
    assert!(err.contains("needs pooled text embeddings and time ids"), "{err}");
    let short = unit["time_ids"].narrow(1, 0, 5).unwrap();
    let err = call(Some(&unit["text_embeds"]), Some(&short)).unwrap_err().to_string();
    assert!(err.contains("projection_class_embeddings_input_dim"), "{err}");
    // An SD1 UNet refuses added conditioning it has no layer for.
    let sd1 = UNet::load(
        &weights("sd1-tiny", "unet", "diffusion_pytorch_model.safetensors"),
        &UNetConfig::load(&config("sd1-tiny", "unet")).unwrap(),
    )
    .unwrap();
    let sd1_unit = load_fixture("tests/fixtures/units/sd1-tiny.safetensors");
    let conditioning = Conditioning {
        pooled: Some(unit["text_embeds"].clone()),
        ..Conditioning::text(sd1_unit["unet.context"].clone())
    };
    let err = sd1
        .forward(UNetInput::new(&sd1_unit["unet.sample"], &sd1_unit["unet.timesteps"], &conditioning))
        .unwrap_err()
        .to_string();
    assert!(err.contains("no added conditioning"), "{err}");
}
