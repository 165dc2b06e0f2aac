//! The condition-image preprocessors against OpenCV / Pillow / diffusers outputs written by
//! tools/fixtures/make_preprocess_fixtures.py, and their bad-input paths (library and CLI).

mod common;

use std::path::Path;
use std::process::Command;

use common::repo_path;
use diffctl::io::image::load_rgb;
use diffctl::preprocess::{self, PreprocessKind, keypoints};
use image::RgbImage;

#[derive(serde::Deserialize)]
struct Case {
    image: Option<String>,
    kind: String,
    expected: String,
}

#[derive(serde::Deserialize)]
struct Cases {
    cases: Vec<Case>,
}

fn cases() -> Vec<Case> {
    let text = std::fs::read_to_string(repo_path("tests/fixtures/preprocess/cases.json")).unwrap();
    serde_json::from_str::<Cases>(&text).unwrap().cases
}

fn load(rel: &str) -> RgbImage {
    load_rgb(&repo_path(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// (pixels that differ, pixels) between two images of the same size.
fn differing(a: &RgbImage, b: &RgbImage) -> (usize, usize) {
    assert_eq!(a.dimensions(), b.dimensions(), "sizes differ");
    (a.pixels().zip(b.pixels()).filter(|(p, q)| p != q).count(), (a.width() * a.height()) as usize)
}

/// The kind of a case, with a keypoints file path made absolute.
fn kind_of(case: &Case) -> PreprocessKind {
    let spec = match case.kind.strip_prefix("keypoints:") {
        Some(path) => format!("keypoints:{}", repo_path(path).display()),
        None => case.kind.clone(),
    };
    spec.parse().unwrap()
}

#[test]
fn preprocessors_match_the_reference_tools() {
    let all = cases();
    assert!(all.len() >= 27, "cases.json lists {} cases", all.len());
    for case in &all {
        let kind = kind_of(case);
        let expected = load(&case.expected);
        let actual = match &case.image {
            Some(image) => preprocess::apply(&kind, &load(image)).unwrap(),
            // Keypoint maps are drawn at the size the JSON gives.
            None => {
                let PreprocessKind::Keypoints { json: Some(path) } = &kind else { panic!("{}", case.kind) };
                let kps = keypoints::load(path).unwrap();
                let (w, h) = kps.size.unwrap();
                keypoints::draw(w, h, &kps.points)
            }
        };
        // Every kind reproduces its reference exactly, Canny's tie rules and the drawing included.
        let (diff, total) = differing(&actual, &expected);
        assert_eq!(diff, 0, "{} on {:?}: {diff}/{total} pixels differ", case.kind, case.image);
    }
}

#[test]
fn invert_is_the_complement_of_grayscale() {
    for name in ["astronaut", "camera", "coffee"] {
        let img = load(&format!("tests/fixtures/images/{name}.png"));
        let mut expected = load(&format!("tests/fixtures/preprocess/{name}-grayscale.png"));
        expected.pixels_mut().for_each(|p| p.0 = p.0.map(|v| 255 - v));
        assert_eq!(preprocess::apply(&PreprocessKind::Invert, &img).unwrap(), expected, "{name}");
    }
}

fn parse_err(spec: &str) -> String {
    spec.parse::<PreprocessKind>().expect_err(spec).to_string()
}

#[test]
fn kinds_parse_with_defaults_and_parameters() {
    let parse = |s: &str| s.parse::<PreprocessKind>().unwrap();
    assert_eq!(parse("canny"), PreprocessKind::Canny { low: 100, high: 200 });
    assert_eq!(parse("canny:0:2040"), PreprocessKind::Canny { low: 0, high: 2040 });
    assert_eq!(parse("canny-rgb:50:50"), PreprocessKind::CannyRgb { low: 50, high: 50 });
    assert_eq!(parse("sobel"), PreprocessKind::Sobel { threshold: 50 });
    assert_eq!(parse("scribble:128"), PreprocessKind::Scribble { threshold: 128 });
    assert_eq!(parse("keypoints"), PreprocessKind::Keypoints { json: None });
    assert_eq!(parse("keypoints:C:/a b/k.json"), PreprocessKind::Keypoints { json: Some("C:/a b/k.json".into()) });
    assert_eq!(parse("crop:512x768"), PreprocessKind::Crop { width: 512, height: 768 });
}

#[test]
fn bad_kinds_say_what_is_expected() {
    let unknown = parse_err("edges");
    assert!(unknown.contains("unknown preprocessor `edges`") && unknown.contains("canny[:LOW:HIGH]"), "{unknown}");
    assert!(parse_err("canny:200:100").contains("LOW <= HIGH"));
    assert!(parse_err("canny:100:3000").contains("2040"));
    assert!(parse_err("canny:-1:20").contains("LOW `-1` is not a whole number"));
    assert!(parse_err("canny:100").contains("canny or canny:LOW:HIGH"));
    assert!(parse_err("scribble:300").contains("THRESHOLD `300`"));
    assert!(parse_err("sobel:1:2").contains("sobel or sobel:THRESHOLD"));
    assert!(parse_err("invert:1").contains("without parameters"));
    assert!(parse_err("resize:0x64").contains("WxH"));
    assert!(parse_err("crop").contains("crop:WxH"));
    assert!(parse_err("keypoints:").contains("keypoints:FILE.json"));
}

/// Writes `text` as a keypoints file and returns the error of loading it.
fn keypoints_err(dir: &Path, text: &str) -> String {
    let path = dir.join("kps.json");
    std::fs::write(&path, text).unwrap();
    let err = keypoints::load(&path).expect_err(text).to_string();
    assert!(err.contains("kps.json"), "error does not name the file: {err}");
    err
}

#[test]
fn malformed_keypoints_name_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let five = "[[1,2],[3,4],[5,6],[7,8],[9,10]]";
    assert!(keypoints_err(dir.path(), "{\"kps\": ").contains("invalid JSON"));
    assert!(keypoints_err(dir.path(), "[1, 2]").contains("JSON object"));
    assert!(keypoints_err(dir.path(), "{\"width\": 64, \"height\": 64}").contains("missing field `kps`"));
    assert!(keypoints_err(dir.path(), "{\"kps\": [[1,2],[3,4]]}").contains("`kps`: expected 5 [x, y] points, found 2"));
    assert!(keypoints_err(dir.path(), "{\"kps\": [[1,2],[3,4],[5],[7,8],[9,10]]}").contains("`kps[2]`"));
    assert!(keypoints_err(dir.path(), "{\"kps\": [[1,2],[3,4],[5,6],[7,\"a\"],[9,10]]}").contains("`kps[3][1]`"));
    assert!(keypoints_err(dir.path(), "{\"kps\": [[1,2],[3,4],[5,6],[7,8],[9,1e9]]}").contains("`kps[4][1]`"));
    assert!(
        keypoints_err(dir.path(), &format!("{{\"width\": 0, \"height\": 8, \"kps\": {five}}}")).contains("`width`")
    );
    assert!(
        keypoints_err(dir.path(), &format!("{{\"width\": 8, \"kps\": {five}}}")).contains("both `width` and `height`")
    );
    assert!(keypoints_err(dir.path(), &format!("{{\"kp\": {five}}}")).contains("unknown field `kp`"));
}

#[test]
fn keypoints_apply_checks_the_image_size() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kps.json");
    std::fs::write(&path, "{\"width\": 64, \"height\": 48, \"kps\": [[10,10],[30,10],[20,20],[12,30],[28,30]]}")
        .unwrap();
    let kind = PreprocessKind::Keypoints { json: Some(path) };
    let err = preprocess::apply(&kind, &RgbImage::new(32, 32)).unwrap_err().to_string();
    assert!(err.contains("64x48") && err.contains("32x32"), "{err}");
    assert_eq!(preprocess::apply(&kind, &RgbImage::new(64, 48)).unwrap().dimensions(), (64, 48));
    let err = preprocess::apply(&PreprocessKind::Keypoints { json: None }, &RgbImage::new(8, 8)).unwrap_err();
    assert!(err.to_string().contains("keypoints:FILE.json"), "{err}");
}

fn diffctl(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_diffctl")).args(args).output().expect("run diffctl")
}

/// Runs `diffctl preprocess ARGS` expecting failure: non-zero exit, one error line containing
/// `needle`, and no file (not even a temporary one) left in `dir` besides `keep`.
fn expect_cli_error(dir: &Path, args: &[&str], needle: &str, keep: &[&str]) {
    let out = diffctl(&[&["preprocess"], args].concat());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} succeeded");
    assert!(stderr.contains(needle), "{args:?}: stderr lacks {needle:?}: {stderr}");
    let mut left: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    left.sort();
    assert_eq!(left, keep, "{args:?} left files behind");
}

#[test]
fn cli_writes_what_the_library_computes() {
    let dir = tempfile::tempdir().unwrap();
    let input = repo_path("tests/fixtures/images/coffee.png");
    let out = dir.path().join("edges.png");
    let run = diffctl(&[
        "preprocess",
        "canny-rgb",
        input.to_str().unwrap(),
        out.to_str().unwrap(),
        "--low",
        "30",
        "--high",
        "90",
    ]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let expected = preprocess::apply(&"canny-rgb:30:90".parse().unwrap(), &load_rgb(&input).unwrap()).unwrap();
    assert_eq!(load_rgb(&out).unwrap(), expected);

    let json = repo_path("tests/fixtures/preprocess/kps-tilted.json");
    let out = dir.path().join("kps.png");
    let run = diffctl(&["preprocess", "keypoints", json.to_str().unwrap(), out.to_str().unwrap()]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    assert_eq!(load_rgb(&out).unwrap(), load("tests/fixtures/preprocess/kps-tilted.png"));
}

#[test]
fn cli_bad_input_fails_cleanly_without_output() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let photo = repo_path("tests/fixtures/images/camera.png");
    let photo = photo.to_str().unwrap();
    let out = d.join("out.png");
    let out = out.to_str().unwrap();
    expect_cli_error(d, &["edges", photo, out], "valid kinds: canny[:LOW:HIGH]", &[]);
    expect_cli_error(d, &["canny", "/no/such/photo.png", out], "/no/such/photo.png", &[]);
    std::fs::write(d.join("fake.png"), "not an image").unwrap();
    let fake = d.join("fake.png");
    expect_cli_error(d, &["grayscale", fake.to_str().unwrap(), out], "not a readable image", &["fake.png"]);
    std::fs::remove_file(&fake).unwrap();
    expect_cli_error(d, &["canny", photo, out, "--low", "300", "--high", "200"], "LOW <= HIGH", &[]);
    expect_cli_error(d, &["canny", photo, out, "--high", "5000"], "2040", &[]);
    expect_cli_error(d, &["canny", photo, out, "--threshold", "5"], "--threshold to sobel and scribble", &[]);
    expect_cli_error(d, &["scribble", photo, out, "--low", "5"], "--low/--high apply to canny", &[]);
    std::fs::write(d.join("bad.json"), "{\"width\": 64, \"height\": 64, \"kps\": [[1, 2]]}").unwrap();
    let bad = d.join("bad.json");
    expect_cli_error(d, &["keypoints", bad.to_str().unwrap(), out], "`kps`: expected 5", &["bad.json"]);
    let spec = format!("keypoints:{}", bad.display());
    expect_cli_error(d, &[&spec, photo, out], "`kps`: expected 5", &["bad.json"]);
    std::fs::write(&bad, "{\"kps\": [[10,10],[30,10],[20,20],[12,30],[28,30]]}").unwrap();
    expect_cli_error(d, &["keypoints", bad.to_str().unwrap(), out], "needs `width` and `height`", &["bad.json"]);
    let missing_dir = d.join("no-dir").join("out.png");
    expect_cli_error(d, &["invert", photo, missing_dir.to_str().unwrap()], "does not exist", &["bad.json"]);
}

/// Pillow's GaussianBlur (what diffusers' `VaeImageProcessor.blur` runs on masks), byte for byte on
/// six masks (1-pixel lines, a 3x2 image, radii wider than the image) at nine sigmas.
#[test]
fn gaussian_blur_matches_pillow() {
    use diffctl::preprocess::blur::gaussian_blur;
    let fixture = common::load_fixture("tests/fixtures/inpaint-area/blur.safetensors");
    let mut checked = 0;
    for (key, expected) in &fixture {
        let Some((mask, sigma)) = key.split_once("/sigma_") else { continue };
        let input = &fixture[&format!("{mask}/input")];
        let (h, w) = input.dims2().unwrap();
        let to_bytes = |t: &candle_core::Tensor| t.flatten_all().unwrap().to_vec1::<u8>().unwrap();
        let img = image::GrayImage::from_raw(w as u32, h as u32, to_bytes(input)).unwrap();
        let blurred = gaussian_blur(&img, sigma.parse().unwrap());
        assert_eq!(blurred.as_raw(), &to_bytes(expected), "{key}");
        checked += 1;
    }
    assert_eq!(checked, 54);
}
