//! img2img and inpainting parity with diffusers' StableDiffusionImg2ImgPipeline and
//! StableDiffusionInpaintPipeline (9-channel inpainting UNet and plain-UNet blending) on the tiny
//! fixture models; the fixtures pin the VAE posterior to its mean. Bad inputs get clear errors.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use common::{load_fixture, max_abs_diff, repo_path};
use diffctl::pipeline::{LoadOptions, StableDiffusion};
use diffctl::request::{InitImageSpec, Request};
use diffctl::schedulers::SchedulerKind;

/// One recorded diffusers run (tests/fixtures/img2img/cases.json).
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
    batch: usize,
    width: usize,
    height: usize,
    resize: bool,
    init_image: String,
    mask: Option<String>,
    file: String,
    timesteps: Vec<f64>,
}

#[derive(serde::Deserialize)]
struct Cases {
    cases: Vec<Case>,
}

fn cases() -> Vec<Case> {
    diffctl::io::read_json::<Cases>(&repo_path("tests/fixtures/img2img/cases.json")).unwrap().cases
}

/// The library request a user makes for `case` (the output size given only where diffusers was
/// given one).
fn request(case: &Case) -> Request {
    Request {
        prompt: case.prompt.clone(),
        negative_prompt: case.negative_prompt.clone(),
        steps: case.steps,
        guidance: case.guidance,
        scheduler: Some(case.scheduler.parse::<SchedulerKind>().unwrap()),
        width: case.resize.then_some(case.width),
        height: case.resize.then_some(case.height),
        batch: case.batch,
        init_image: Some(InitImageSpec {
            image: repo_path(&case.init_image),
            mask: case.mask.as_deref().map(repo_path),
            mask_blur: None,
            only_masked_padding: None,
            keep_unmasked: false,
            strength: Some(case.strength),
        }),
        ..Request::default()
    }
}

#[test]
fn img2img_and_inpainting_match_diffusers() {
    let mut models: HashMap<String, StableDiffusion> = HashMap::new();
    let mut report = Vec::new();
    for case in cases() {
        let model = models
            .entry(case.model.clone())
            .or_insert_with(|| StableDiffusion::load(&repo_path(&case.model), &LoadOptions::default()).unwrap());
        let fixture = load_fixture(&case.file);
        let mut prepared = request(&case).prepare(model, &LoadOptions::default()).unwrap();
        assert_eq!((prepared.generate.width, prepared.generate.height), (case.width, case.height), "{}", case.name);
        prepared.generate.init_latents = Some(fixture["init_noise"].clone());
        let r = common::replay_case(&case.name, model, &mut prepared, &fixture);
        assert_eq!(r.steps, Some(case.timesteps.len()), "{}: steps run", case.name);
        report.push(format!("{:18} latents {:.2e}  image {:.2e}", case.name, r.latent_err, r.image_err));
    }
    eprintln!("{}", report.join("\n"));
}

fn tiny(model: &str) -> PathBuf {
    repo_path(&format!("tests/fixtures/models/{model}"))
}

fn prepare_error(model: &str, request: Request) -> String {
    let mut model = StableDiffusion::load(&tiny(model), &LoadOptions::default()).unwrap();
    let prepared = request.prepare(&mut model, &LoadOptions::default());
    let err = match prepared {
        Err(e) => return e.to_string(),
        Ok(mut p) => {
            model.generate(&p.generate, &mut p.controls, &mut diffctl::noise::SeededNoise::new(0), &mut |_| {})
        }
    };
    err.err().expect("the request should fail").to_string()
}

fn with_init(spec: InitImageSpec) -> Request {
    Request { prompt: "x".into(), steps: 4, init_image: Some(spec), ..Request::default() }
}

fn init_spec() -> InitImageSpec {
    InitImageSpec {
        image: repo_path("tests/fixtures/img2img/init.png"),
        mask: Some(repo_path("tests/fixtures/img2img/mask.png")),
        mask_blur: None,
        only_masked_padding: None,
        keep_unmasked: false,
        strength: None,
    }
}

#[test]
fn bad_init_inputs_get_clear_errors() {
    for strength in [0.0, -0.5, 1.5, f64::NAN] {
        let err = with_init(InitImageSpec { strength: Some(strength), ..init_spec() }).validate().unwrap_err();
        assert!(err.to_string().contains("strength") && err.to_string().contains("(0, 1]"), "{err}");
    }
    let dir = tempfile::tempdir().unwrap();
    let not_png = dir.path().join("mask.png");
    std::fs::write(&not_png, b"not an image").unwrap();
    let err = prepare_error("sd1-tiny", with_init(InitImageSpec { mask: Some(not_png.clone()), ..init_spec() }));
    assert!(err.contains("mask") && err.contains(&not_png.display().to_string()), "{err}");
    let missing = dir.path().join("missing.png");
    let err = prepare_error("sd1-tiny", with_init(InitImageSpec { image: missing.clone(), ..init_spec() }));
    assert!(err.contains("init image") && err.contains(&missing.display().to_string()), "{err}");
    // Too few steps for the strength: nothing would run.
    let err = prepare_error(
        "sd1-tiny",
        Request { steps: 2, ..with_init(InitImageSpec { strength: Some(0.3), mask: None, ..init_spec() }) },
    );
    assert!(err.contains("no step"), "{err}");
    // An inpainting model needs a mask.
    let err = prepare_error("sd1-tiny-inpaint", with_init(InitImageSpec { mask: None, ..init_spec() }));
    assert!(err.contains("9 input channels") && err.contains("mask"), "{err}");
    let err = prepare_error("sd1-tiny-inpaint", Request { prompt: "x".into(), steps: 2, ..Request::default() });
    assert!(err.contains("9 input channels"), "{err}");
}

/// A mask of another size than the image is resized to the output size, as diffusers does; a
/// mask that repaints nothing leaves a plain model's inpainting at the original image's latents.
#[test]
fn empty_mask_keeps_the_image_on_a_plain_model() {
    let dir = tempfile::tempdir().unwrap();
    let black = dir.path().join("black.png");
    image::RgbImage::new(7, 5).save(&black).unwrap();
    let mut model = StableDiffusion::load(&tiny("sd1-tiny"), &LoadOptions::default()).unwrap();
    let spec = InitImageSpec { mask: Some(black), strength: Some(0.5), ..init_spec() };
    let request =
        Request { width: Some(32), height: Some(32), scheduler: Some(SchedulerKind::Euler), ..with_init(spec) };
    let mut prepared = request.prepare(&mut model, &LoadOptions::default()).unwrap();
    let out = model
        .generate(&prepared.generate, &mut prepared.controls, &mut diffctl::noise::SeededNoise::new(3), &mut |_| {})
        .unwrap();
    let diffctl::pipeline::InitSource::Pixels(image) = &prepared.generate.init_image.as_ref().unwrap().source else {
        panic!("an image was given")
    };
    let image = image.clone();
    let original = model.vae.encode_mean_latents(&((image * 2.0).unwrap() - 1.0).unwrap()).unwrap();
    assert!(max_abs_diff(&out.latents, &original) < 1e-6);
}

/// The CLI flags reach the same request: inpainting with a ControlNet on the inpainting model
/// writes an image of the init image's size; --strength and --mask need --init-image.
#[test]
fn cli_inpaints_with_a_controlnet() {
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("out.png");
    let path = |rel: &str| repo_path(rel).to_str().unwrap().to_string();
    let out = common::diffctl(&[
        "generate",
        "--model",
        &path("tests/fixtures/models/sd1-tiny-inpaint"),
        "--prompt",
        "a cat",
        "--steps",
        "3",
        "--seed",
        "1",
        "--init-image",
        &path("tests/fixtures/img2img/init.png"),
        "--mask",
        &path("tests/fixtures/img2img/mask.png"),
        "--strength",
        "0.9",
        "--controlnet",
        &path("tests/fixtures/controlnets/cn-a"),
        "--control-image",
        &path("tests/fixtures/images/control_a.png"),
        "--output",
        png.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // 40x28 rounded down to whole latent pixels of the tiny VAE (factor 2).
    assert_eq!(image::image_dimensions(&png).unwrap(), (40, 28));
    let model = repo_path("tests/fixtures/models/sd1-tiny");
    for flags in [["--strength", "0.5"], ["--mask", &path("tests/fixtures/img2img/mask.png")]] {
        let mut args = vec!["generate", "--model", model.to_str().unwrap(), "--prompt", "x"];
        args.extend(flags);
        let out = common::diffctl(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains("--init-image"), "{stderr}");
    }
    common::expect_error(
        &["--init-image", &path("tests/fixtures/img2img/init.png"), "--strength", "1.5"],
        &model,
        "strength 1.5 is outside (0, 1]",
    );
}

/// `--mask-blur` blurs the mask at its own size before it is resized and binarised (diffusers'
/// `mask_processor.blur`): the binarised mask changes, and the CLI takes the flag.
#[test]
fn mask_blur_reshapes_the_mask() {
    let image = diffctl::io::image::load_rgb(&repo_path("tests/fixtures/img2img/init.png")).unwrap();
    let mask = diffctl::io::image::load_rgb(&repo_path("tests/fixtures/inpaint-area/mask-40x28.png")).unwrap();
    let device = candle_core::Device::Cpu;
    let make = |blur: Option<f64>| {
        diffctl::pipeline::InitImage::new(&image, Some(&mask), blur, (32, 32), 1.0, &device).unwrap().mask.unwrap()
    };
    let (plain, blurred) = (make(None), make(Some(3.0)));
    assert!(max_abs_diff(&plain, &blurred) == 1.0, "a blur of 3 px must move the binarised edge");
    assert_eq!(max_abs_diff(&make(Some(0.0)), &plain), 0.0);
    let model = repo_path("tests/fixtures/models/sd1-tiny");
    let path = |rel: &str| repo_path(rel).to_str().unwrap().to_string();
    common::expect_error(
        &[
            "--init-image",
            &path("tests/fixtures/img2img/init.png"),
            "--mask",
            &path("tests/fixtures/img2img/mask.png"),
            "--mask-blur",
            "nan",
        ],
        &model,
        "mask blur NaN",
    );
}

/// img2img from an image's latents (a safetensors init, as hires fix's latent upscale uses, and as
/// diffusers takes a 4-channel `image`) is img2img from the image: the same final latents.
#[test]
fn img2img_from_latents_equals_img2img_from_the_image() {
    let dir = tempfile::tempdir().unwrap();
    let mut model = StableDiffusion::load(&tiny("sd1-tiny"), &LoadOptions::default()).unwrap();
    let spec = InitImageSpec { mask: None, strength: Some(0.6), ..init_spec() };
    let request = Request {
        width: Some(32),
        height: Some(32),
        steps: 4,
        scheduler: Some(SchedulerKind::Euler),
        ..with_init(spec.clone())
    };
    let mut prepared = request.prepare(&mut model, &LoadOptions::default()).unwrap();
    let from_image = model
        .generate(&prepared.generate, &mut prepared.controls, &mut diffctl::noise::SeededNoise::new(5), &mut |_| {})
        .unwrap();
    let diffctl::pipeline::InitSource::Pixels(image) = &prepared.generate.init_image.as_ref().unwrap().source else {
        panic!("an image was given")
    };
    let latents = model.vae.encode_mean_latents(&((image * 2.0).unwrap() - 1.0).unwrap()).unwrap();
    let path = dir.path().join("init.safetensors");
    diffctl::io::latents::save_latents(&path, &latents).unwrap();
    let request = Request { init_image: Some(InitImageSpec { image: path, ..spec }), ..request };
    let mut prepared = request.prepare(&mut model, &LoadOptions::default()).unwrap();
    let from_latents = model
        .generate(&prepared.generate, &mut prepared.controls, &mut diffctl::noise::SeededNoise::new(5), &mut |_| {})
        .unwrap();
    assert_eq!(max_abs_diff(&from_image.latents, &from_latents.latents), 0.0);
    // Latents cannot be inpainted.
    let masked = Request {
        init_image: Some(InitImageSpec {
            mask: Some(repo_path("tests/fixtures/img2img/mask.png")),
            ..request.init_image.clone().unwrap()
        }),
        ..request
    };
    let err = masked.prepare(&mut model, &LoadOptions::default()).err().unwrap().to_string();
    assert!(err.contains("not init latents"), "{err}");
}
