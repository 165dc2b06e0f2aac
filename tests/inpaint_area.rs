//! Inpainting only the masked area (A1111's "inpaint only masked") against diffusers'
//! `padding_mask_crop`: the crop region, the generation on the crop, and the image pasted back into
//! the original through the (blurred) mask, byte for byte.

mod common;

use std::collections::HashMap;

use common::{ReplayNoise, assert_close, load_fixture, repo_path};
use diffctl::pipeline::{LoadOptions, StableDiffusion};
use diffctl::request::{InitImageSpec, Request};
use diffctl::schedulers::SchedulerKind;

#[derive(serde::Deserialize)]
struct Case {
    name: String,
    model: String,
    scheduler: String,
    steps: usize,
    strength: f64,
    guidance: f64,
    prompt: String,
    negative_prompt: Option<String>,
    width: usize,
    height: usize,
    init_image: String,
    mask: String,
    file: String,
    padding_mask_crop: usize,
    mask_blur: Option<f64>,
}

#[derive(serde::Deserialize)]
struct Cases {
    cases: Vec<Case>,
}

#[test]
fn only_masked_inpainting_matches_diffusers_padding_mask_crop() {
    let cases = diffctl::io::read_json::<Cases>(&repo_path("tests/fixtures/inpaint-area/cases.json")).unwrap().cases;
    let mut models: HashMap<String, StableDiffusion> = HashMap::new();
    let mut report = Vec::new();
    for case in &cases {
        let model = models
            .entry(case.model.clone())
            .or_insert_with(|| StableDiffusion::load(&repo_path(&case.model), &LoadOptions::default()).unwrap());
        let fixture = load_fixture(&case.file);
        let request = Request {
            prompt: case.prompt.clone(),
            negative_prompt: case.negative_prompt.clone(),
            steps: case.steps,
            guidance: case.guidance,
            scheduler: Some(case.scheduler.parse::<SchedulerKind>().unwrap()),
            width: Some(case.width),
            height: Some(case.height),
            init_image: Some(InitImageSpec {
                image: repo_path(&case.init_image),
                mask: Some(repo_path(&case.mask)),
                mask_blur: case.mask_blur,
                only_masked_padding: Some(case.padding_mask_crop),
                keep_unmasked: false,
                strength: Some(case.strength),
            }),
            ..Request::default()
        };
        let mut prepared = request.prepare(model, &LoadOptions::default()).unwrap();
        let diffctl::pipeline::InitSource::Pixels(crop) = &prepared.generate.init_image.as_ref().unwrap().source else {
            panic!("an image was given")
        };
        let input_err = assert_close(
            &format!("{} cropped image", case.name),
            &((crop * 2.0).unwrap() - 1.0).unwrap(),
            &fixture["init_image"],
            1e-6,
        );
        prepared.generate.init_latents = Some(fixture["init_noise"].clone());
        let out = model
            .generate(&prepared.generate, &mut prepared.controls, &mut ReplayNoise::from_fixture(&fixture), &mut |_| {})
            .unwrap_or_else(|e| panic!("{}: {e}", case.name));
        let err = assert_close(&format!("{} latents", case.name), &out.latents, &fixture["latents"], 2e-3);
        let pasted = prepared.postprocess(out).unwrap();
        let image = diffctl::io::image::to_rgb8(&pasted.images).unwrap().remove(0);
        let expected: Vec<u8> = fixture["image"].flatten_all().unwrap().to_vec1::<u8>().unwrap();
        let differing = image.as_raw().iter().zip(&expected).filter(|(a, b)| a != b).count();
        let worst = image.as_raw().iter().zip(&expected).map(|(a, b)| a.abs_diff(*b)).max().unwrap_or(0);
        assert_eq!((image.width(), image.height()), (40, 28), "{}", case.name);
        assert!(worst <= 2, "{}: pasted image differs by up to {worst} levels", case.name);
        report.push(format!(
            "{:16} crop {input_err:.1e}  latents {err:.2e}  pasted image: {differing} of {} bytes differ, by ≤ {worst}",
            case.name,
            expected.len()
        ));
    }
    eprintln!("{}", report.join("\n"));
}

/// `--inpaint-area masked` through the CLI: the output keeps the original image's size; an empty
/// mask is refused.
#[test]
fn cli_inpaints_only_the_masked_area() {
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("out.png");
    let path = |p: &str| repo_path(p).to_str().unwrap().to_string();
    let args = |mask: &str| {
        vec![
            "generate".to_string(),
            "--model".into(),
            path("tests/fixtures/models/sd1-tiny-inpaint"),
            "--prompt".into(),
            "a cat".into(),
            "--steps".into(),
            "2".into(),
            "--width".into(),
            "32".into(),
            "--height".into(),
            "32".into(),
            "--init-image".into(),
            path("tests/fixtures/inpaint-area/init-40x28.png"),
            "--mask".into(),
            mask.to_string(),
            "--mask-blur".into(),
            "2".into(),
            "--inpaint-area".into(),
            "masked".into(),
            "--inpaint-padding".into(),
            "6".into(),
            "--output".into(),
            png.to_str().unwrap().to_string(),
        ]
    };
    let run = |mask: &str| {
        let a = args(mask);
        common::diffctl(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let out = run(&path("tests/fixtures/inpaint-area/mask-40x28.png"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(image::image_dimensions(&png).unwrap(), (40, 28));
    let black = dir.path().join("black.png");
    image::RgbImage::new(40, 28).save(&black).unwrap();
    let out = run(black.to_str().unwrap());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("repaints nothing"), "{stderr}");
}
