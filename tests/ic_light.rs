//! IC-Light (offsets merged into a widened UNet, foreground/background latents concatenated at every
//! call) against a restatement of the official demo's math on diffusers (tools/fixtures/make_iclight_fixtures.py).

mod common;

use common::{assert_close, load_fixture, repo_path};
use diffctl::pipeline::{LoadOptions, StableDiffusion};
use diffctl::request::{IcLightSpec, Request};
use diffctl::schedulers::SchedulerKind;

const MODEL: &str = "tests/fixtures/models/sd1-tiny";

#[derive(serde::Deserialize)]
struct Case {
    name: String,
    scheduler: String,
    steps: usize,
    guidance: f64,
    prompt: String,
    negative_prompt: Option<String>,
    batch: usize,
    width: usize,
    height: usize,
    file: String,
    offsets: String,
    images: Vec<String>,
}

#[derive(serde::Deserialize)]
struct Cases {
    cases: Vec<Case>,
}

fn request(case: &Case) -> Request {
    Request {
        prompt: case.prompt.clone(),
        negative_prompt: case.negative_prompt.clone(),
        steps: case.steps,
        guidance: case.guidance,
        scheduler: Some(case.scheduler.parse::<SchedulerKind>().unwrap()),
        width: Some(case.width),
        height: Some(case.height),
        batch: case.batch,
        ic_light: Some(IcLightSpec {
            path: repo_path(&case.offsets),
            foreground: repo_path(&case.images[0]),
            background: case.images.get(1).map(|p| repo_path(p)),
        }),
        ..Request::default()
    }
}

#[test]
fn ic_light_matches_the_official_math() {
    let cases = diffctl::io::read_json::<Cases>(&repo_path("tests/fixtures/iclight/cases.json")).unwrap().cases;
    let mut report = Vec::new();
    // The demo's own sampler (DPM++ 2M SDE Karras on a linear beta schedule) is left to the
    // sampler tests; these cases test the conditioning.
    for case in cases.iter().filter(|c| c.scheduler != "demo") {
        let mut model = StableDiffusion::load(&repo_path(MODEL), &LoadOptions::default()).unwrap();
        let fixture = load_fixture(&case.file);
        let mut prepared = request(case).prepare(&mut model, &LoadOptions::default()).unwrap();
        assert_eq!(model.unet.config().in_channels, 4 + 4 * case.images.len(), "{}", case.name);
        let concat = prepared.generate.concat_latents.clone().unwrap();
        let concat_err =
            assert_close(&format!("{} condition latents", case.name), &concat, &fixture["concat_latents"], 2e-5);
        prepared.generate.init_latents = Some(fixture["init_latents"].clone());
        let r = common::replay_case(&case.name, &model, &mut prepared, &fixture);
        report.push(format!(
            "{:12} condition {concat_err:.2e}  latents {:.2e}  image {:.2e}",
            case.name, r.latent_err, r.image_err
        ));
    }
    eprintln!("{}", report.join("\n"));
}

#[test]
fn ic_light_bad_inputs_are_refused() {
    let mut model = StableDiffusion::load(&repo_path(MODEL), &LoadOptions::default()).unwrap();
    let spec = |path: &str, background: Option<&str>| IcLightSpec {
        path: repo_path(path),
        foreground: repo_path("tests/fixtures/iclight/foreground.png"),
        background: background.map(repo_path),
    };
    let request = |ic: IcLightSpec| Request { prompt: "x".into(), steps: 2, ic_light: Some(ic), ..Request::default() };
    // fbc needs a background.
    let err =
        request(spec("tests/fixtures/iclight/fbc.safetensors", None)).prepare(&mut model, &LoadOptions::default());
    let err = err.err().unwrap().to_string();
    assert!(err.contains("takes 2 condition image(s)"), "{err}");
    // A file that is not IC-Light (a LoRA).
    let err = request(spec("tests/fixtures/lora/kohya.safetensors", None)).prepare(&mut model, &LoadOptions::default());
    let err = err.err().unwrap().to_string();
    assert!(err.contains("not an IC-Light file"), "{err}");
    // The SDXL model's UNet has other tensors.
    let mut xl = StableDiffusion::load(&repo_path("tests/fixtures/models/sdxl-tiny"), &LoadOptions::default()).unwrap();
    let err = request(spec("tests/fixtures/iclight/fc.safetensors", None)).prepare(&mut xl, &LoadOptions::default());
    let err = err.err().unwrap().to_string();
    assert!(err.contains("fc.safetensors") && err.contains("offset"), "{err}");
}

/// The CLI flags reach the request: an fbc relight writes its image.
#[test]
fn cli_relights_with_foreground_and_background() {
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("out.png");
    let path = |p: &str| repo_path(p).to_str().unwrap().to_string();
    let out = common::diffctl(&[
        "generate",
        "--model",
        &path(MODEL),
        "--prompt",
        "a cat, sunlight",
        "--steps",
        "2",
        "--width",
        "32",
        "--height",
        "32",
        "--ic-light",
        &path("tests/fixtures/iclight/fbc.safetensors"),
        "--ic-foreground",
        &path("tests/fixtures/iclight/foreground.png"),
        "--ic-background",
        &path("tests/fixtures/iclight/background.png"),
        "--output",
        png.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(image::image_dimensions(&png).unwrap(), (32, 32));
}
