//! `diffctl serve` over HTTP: the A1111 and OpenAI APIs give the CLI's pixels for the same
//! settings, with the shapes their clients read; auth, queue limits, interrupt, events.

mod server_common;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use server_common::*;

const SD1: &str = "tests/fixtures/models/sd1-tiny";

fn model() -> String {
    repo(SD1).display().to_string()
}

#[test]
fn txt2img_matches_the_cli_and_reports_info() {
    let s = TestServer::start(|_| {});
    let (status, body) = s.post(
        "/sdapi/v1/txt2img",
        &json!({"prompt": "a red (cat:1.2)", "negative_prompt": "blurry", "steps": "3", "cfg_scale": 6.5,
                "width": 64, "height": 64, "seed": 42, "sampler_name": "DPM++ 2M Karras", "unknown_field": 1,
                "restore_faces": null, "styles": []}),
    );
    assert_eq!(status, 200, "{body}");
    let info: Value = serde_json::from_str(body["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["seed"], 42);
    assert_eq!(info["all_seeds"], json!([42]));
    assert_eq!(info["width"], 64);
    assert_eq!(info["sampler_name"], "DPM++ 2M Karras");
    let infotext = info["infotexts"][0].as_str().unwrap();
    assert!(infotext.starts_with("a red (cat:1.2)\nNegative prompt: blurry\nSteps: 3, Sampler: DPM++ 2M Karras, Schedule type: Karras, CFG scale: 6.5, Seed: 42, Size: 64x64"), "{infotext}");
    assert_eq!(body["parameters"]["steps"], 3);
    assert_eq!(body["parameters"]["seed"], 42);
    let image = decode(body["images"][0].as_str().unwrap());
    let cli = cli_image(&[
        "--model",
        &model(),
        "--prompt",
        "a red (cat:1.2)",
        "--negative-prompt",
        "blurry",
        "--steps",
        "3",
        "--guidance",
        "6.5",
        "--width",
        "64",
        "--height",
        "64",
        "--seed",
        "42",
        "--scheduler",
        "DPM++ 2M Karras",
        "--prompt-syntax",
        "a1111",
    ]);
    assert_eq!(image, cli, "the API's pixels differ from the CLI's");

    // The PNG carries the infotext, and png-info reads it back.
    let (status, read) = s.post("/sdapi/v1/png-info", &json!({"image": body["images"][0]}));
    assert_eq!(status, 200);
    assert_eq!(read["info"], infotext);
    assert_eq!(read["parameters"]["Seed"], "42");

    // seed -1 is random and reported; batches report consecutive seeds.
    let (status, body) = s.post(
        "/sdapi/v1/txt2img",
        &json!({"prompt": "x", "steps": 1, "width": 32, "height": 32, "seed": -1, "batch_size": 2, "n_iter": 2}),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["images"].as_array().unwrap().len(), 4);
    let info: Value = serde_json::from_str(body["info"].as_str().unwrap()).unwrap();
    let seed = info["seed"].as_u64().unwrap();
    assert_eq!(info["all_seeds"], json!([seed, seed + 1, seed + 2, seed + 3]));
}

#[test]
fn img2img_with_a_mask_matches_the_cli() {
    let s = TestServer::start(|_| {});
    let dir = tempfile::tempdir().unwrap();
    let (init_path, init) = fixture_image("astronaut.png", 64, dir.path());
    let mut mask = image::RgbImage::new(64, 64);
    for (x, _, p) in mask.enumerate_pixels_mut() {
        *p = if x >= 32 { image::Rgb([255, 255, 255]) } else { image::Rgb([0, 0, 0]) };
    }
    let mask_path = dir.path().join("mask.png");
    mask.save(&mask_path).unwrap();
    let (status, body) = s.post(
        "/sdapi/v1/img2img",
        &json!({"prompt": "a helmet", "init_images": [format!("data:image/png;base64,{}", b64(&png_bytes(&init)))],
                "mask": b64(&png_bytes(&mask)), "denoising_strength": 0.6, "mask_blur": 2, "inpainting_fill": 1,
                "steps": 4, "width": 64, "height": 64, "seed": 3, "sampler_name": "Euler a", "resize_mode": "Just resize"}),
    );
    assert_eq!(status, 200, "{body}");
    let image = decode(body["images"][0].as_str().unwrap());
    let cli = cli_image(&[
        "--model",
        &model(),
        "--prompt",
        "a helmet",
        "--negative-prompt",
        "",
        "--steps",
        "4",
        "--guidance",
        "7",
        "--seed",
        "3",
        "--scheduler",
        "Euler a",
        "--prompt-syntax",
        "a1111",
        "--init-image",
        init_path.to_str().unwrap(),
        "--mask",
        mask_path.to_str().unwrap(),
        "--strength",
        "0.6",
        "--mask-blur",
        "2",
        "--keep-unmasked",
    ]);
    assert_eq!(image, cli, "img2img pixels differ from the CLI's");
    // As A1111, the original is pasted back outside the mask.
    for (x, y, p) in image.enumerate_pixels() {
        if x < 24 {
            assert_eq!(p, init.get_pixel(x, y), "pixel ({x}, {y}) outside the mask changed");
        }
    }
    assert!(body["parameters"]["init_images"].is_null());
}

#[test]
fn control_units_and_lora_tags_match_the_cli() {
    let s = TestServer::start(|_| {});
    let dir = tempfile::tempdir().unwrap();
    let (control_path, control) = fixture_image("control_a.png", 32, dir.path());
    let common = [
        "--model",
        &model(),
        "--prompt",
        "a house",
        "--negative-prompt",
        "",
        "--steps",
        "3",
        "--guidance",
        "7",
        "--seed",
        "9",
        "--scheduler",
        "Euler",
        "--prompt-syntax",
        "a1111",
        "--width",
        "32",
        "--height",
        "32",
    ];
    let request = |units: Value, prompt: &str| {
        json!({"prompt": prompt, "steps": 3, "width": 32, "height": 32, "seed": 9,
               "alwayson_scripts": {"ControlNet": {"args": units}}})
    };
    let unit = |model: &str, module: &str| {
        json!({"enabled": true, "model": model, "module": module, "weight": 0.8, "image": b64(&png_bytes(&control)),
               "resize_mode": "Just Resize", "guidance_start": 0.0, "guidance_end": 1.0, "control_mode": "Balanced"})
    };
    // ControlNet, named by substring as sd-webui-controlnet matches.
    let (status, body) = s.post("/sdapi/v1/txt2img", &request(json!([unit("cn-a [abc123]", "none")]), "a house"));
    assert_eq!(status, 200, "{body}");
    let cli_args: Vec<&str> = common
        .iter()
        .copied()
        .chain([
            "--controlnet",
            repo_str("tests/fixtures/controlnets/cn-a"),
            "--control-image",
            control_path.to_str().unwrap(),
            "--control-scale",
            "0.8",
        ])
        .collect();
    assert_eq!(decode(body["images"][0].as_str().unwrap()), cli_image(&cli_args), "ControlNet unit");
    // sd-webui-controlnet's control modes are the CLI's --control-mode prompt / controlnet.
    for (mode, flag) in [("My prompt is more important", "prompt"), ("ControlNet is more important", "controlnet")] {
        let mut u = unit("cn-a", "none");
        u["control_mode"] = json!(mode);
        let (status, body) = s.post("/sdapi/v1/txt2img", &request(json!([u]), "a house"));
        assert_eq!(status, 200, "{body}");
        let cli_args: Vec<&str> = common
            .iter()
            .copied()
            .chain([
                "--controlnet",
                repo_str("tests/fixtures/controlnets/cn-a"),
                "--control-image",
                control_path.to_str().unwrap(),
                "--control-scale",
                "0.8",
                "--control-mode",
                flag,
            ])
            .collect();
        assert_eq!(decode(body["images"][0].as_str().unwrap()), cli_image(&cli_args), "control mode {mode}");
    }
    // T2I-Adapter.
    let (status, body) = s.post("/sdapi/v1/txt2img", &request(json!([unit("t2i-light", "none")]), "a house"));
    assert_eq!(status, 200, "{body}");
    let cli_args: Vec<&str> = common
        .iter()
        .copied()
        .chain([
            "--t2i-adapter",
            repo_str("tests/fixtures/t2i-adapters/light"),
            "--adapter-image",
            control_path.to_str().unwrap(),
            "--adapter-scale",
            "0.8",
        ])
        .collect();
    assert_eq!(decode(body["images"][0].as_str().unwrap()), cli_image(&cli_args), "T2I-Adapter unit");
    // IP-Adapter, its image encoder from clip_vision/.
    let (status, body) =
        s.post("/sdapi/v1/txt2img", &request(json!([unit("ip-adapter_tiny", "ip-adapter_clip_sd15")]), "a house"));
    assert_eq!(status, 200, "{body}");
    let cli_args: Vec<&str> = common
        .iter()
        .copied()
        .chain([
            "--ip-adapter",
            repo_str("tests/fixtures/ip_adapter/ip-adapter_tiny.safetensors"),
            "--image-encoder",
            repo_str("tests/fixtures/ip_adapter/image_encoder"),
            "--ip-image",
            control_path.to_str().unwrap(),
            "--ip-scale",
            "0.8",
        ])
        .collect();
    assert_eq!(decode(body["images"][0].as_str().unwrap()), cli_image(&cli_args), "IP-Adapter unit");
    // A LoRA tag is the CLI's --lora, and the infotext keeps the tag.
    let (status, body) = s.post("/sdapi/v1/txt2img", &request(json!([]), "a house<lora:kohya:0.7>"));
    assert_eq!(status, 200, "{body}");
    let lora = format!("{}:0.7", repo("tests/fixtures/lora/kohya.safetensors").display());
    let cli_args: Vec<&str> = common.iter().copied().chain(["--lora", &lora]).collect();
    assert_eq!(decode(body["images"][0].as_str().unwrap()), cli_image(&cli_args), "LoRA tag");
    let info: Value = serde_json::from_str(body["info"].as_str().unwrap()).unwrap();
    assert!(info["infotexts"][0].as_str().unwrap().starts_with("a house<lora:kohya:0.7>"));
    // Unknown names are 400s naming the choices.
    let (status, body) = s.post("/sdapi/v1/txt2img", &request(json!([unit("nope", "none")]), "a house"));
    assert_eq!(status, 400);
    assert!(body["detail"].as_str().unwrap().contains("cn-a"), "{body}");
    let (status, body) = s.post("/sdapi/v1/txt2img", &request(json!([]), "<lora:../../etc/passwd:1>"));
    assert_eq!(status, 400, "{body}");
    let (_, models) = s.get("/controlnet/model_list");
    assert!(models["model_list"].as_array().unwrap().iter().any(|m| m == "cn-a"), "{models}");
}

#[test]
fn models_are_listed_and_switched() {
    let s = TestServer::start(|_| {});
    let (status, models) = s.get("/sdapi/v1/sd-models");
    assert_eq!(status, 200);
    let models = models.as_array().unwrap().clone();
    assert_eq!(models.len(), 2, "{models:?}");
    // The single file gets `name [shorthash]` once hashed in the background.
    let deadline = Instant::now() + Duration::from_secs(30);
    let file_title = loop {
        let (_, models) = s.get("/sdapi/v1/sd-models");
        let file = models.as_array().unwrap().iter().find(|m| m["model_name"] == "sd1-tiny-file").unwrap().clone();
        if file["sha256"].is_string() {
            let hash = file["sha256"].as_str().unwrap();
            assert_eq!(file["title"], format!("sd1-tiny-file.safetensors [{}]", &hash[..10]));
            assert_eq!(file["hash"], &hash[..10]);
            break file["title"].as_str().unwrap().to_string();
        }
        assert!(Instant::now() < deadline, "the checkpoint was never hashed");
        std::thread::sleep(Duration::from_millis(100));
    };
    let (status, body) = s.post("/sdapi/v1/options", &json!({"sd_model_checkpoint": file_title}));
    assert_eq!(status, 200, "{body}");
    let (_, options) = s.get("/sdapi/v1/options");
    assert_eq!(options["sd_model_checkpoint"], file_title);
    let (status, body) =
        s.post("/sdapi/v1/txt2img", &json!({"prompt": "x", "steps": 2, "width": 32, "height": 32, "seed": 1}));
    assert_eq!(status, 200, "{body}");
    let (status, body) = s.post("/sdapi/v1/options", &json!({"sd_model_checkpoint": "nope"}));
    assert_eq!(status, 400);
    assert!(body["detail"].as_str().unwrap().contains("sd1-tiny-file.safetensors"), "{body}");
    // A per-request override runs on that model and restores the option afterwards, unless told not to.
    let (status, body) = s.post(
        "/sdapi/v1/txt2img",
        &json!({"prompt": "x", "steps": 2, "width": 32, "height": 32, "seed": 1, "override_settings": {"sd_model_checkpoint": "sd1-tiny"}}),
    );
    assert_eq!(status, 200, "{body}");
    assert!(body["info"].as_str().unwrap().contains("Model: sd1-tiny,"), "{body}");
    assert_eq!(s.get("/sdapi/v1/options").1["sd_model_checkpoint"], file_title);
    let (status, body) = s.post(
        "/sdapi/v1/txt2img",
        &json!({"prompt": "x", "steps": 2, "width": 32, "height": 32, "seed": 1, "override_settings": {"sd_model_checkpoint": "sd1-tiny"},
                "override_settings_restore_afterwards": false}),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(s.get("/sdapi/v1/options").1["sd_model_checkpoint"], "sd1-tiny");
    // Listings.
    let (_, samplers) = s.get("/sdapi/v1/samplers");
    assert!(samplers.as_array().unwrap().iter().any(|x| x["name"] == "Euler a"));
    let (_, loras) = s.get("/sdapi/v1/loras");
    assert_eq!(loras[0]["name"], "kohya");
    for route in ["schedulers", "upscalers", "latent-upscale-modes", "sd-vae", "embeddings"] {
        assert_eq!(s.get(&format!("/sdapi/v1/{route}")).0, 200, "{route}");
    }
    let (status, body) = s.post("/sdapi/v1/txt2img", &json!({"prompt": "x", "sampler_name": "Nope"}));
    assert_eq!(status, 404, "{body}");
}

#[test]
fn openai_images_api() {
    let s = TestServer::start(|_| {});
    let response = s
        .client
        .post(s.url("/v1/images/generations"))
        .bearer_auth(format!("{USER}:{PASS}"))
        .json(&json!({"prompt": "a lighthouse", "n": 2, "size": "32x32", "seed": 5, "steps": 2, "quality": "hd", "model": "dall-e-3"}))
        .send()
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let body: Value = response.json().unwrap();
    assert_eq!(body["data"].as_array().unwrap().len(), 2);
    let first = decode(body["data"][0]["b64_json"].as_str().unwrap());
    let (status, one) =
        s.post("/v1/images/generations", &json!({"prompt": "a lighthouse", "size": "32x32", "seed": 5, "steps": 2}));
    assert_eq!(status, 200, "{one}");
    let cli = cli_image(&[
        "--model",
        &model(),
        "--prompt",
        "a lighthouse",
        "--negative-prompt",
        "",
        "--steps",
        "2",
        "--guidance",
        "7",
        "--seed",
        "5",
        "--scheduler",
        "Euler",
        "--width",
        "32",
        "--height",
        "32",
    ]);
    assert_eq!(decode(one["data"][0]["b64_json"].as_str().unwrap()), cli);
    assert_eq!(first.dimensions(), (32, 32));
    // url responses are served (with credentials).
    let (status, body) = s
        .post("/v1/images/generations", &json!({"prompt": "x", "size": "32x32", "steps": 1, "response_format": "url"}));
    assert_eq!(status, 200, "{body}");
    let url = body["data"][0]["url"].as_str().unwrap();
    let png = s.client.get(url).basic_auth(USER, Some(PASS)).send().unwrap();
    assert_eq!(png.status().as_u16(), 200);
    assert!(image::load_from_memory(&png.bytes().unwrap()).is_ok());
    // Edits: multipart, the mask's transparency marks what to repaint.
    let dir = tempfile::tempdir().unwrap();
    let (_, init) = fixture_image("astronaut.png", 32, dir.path());
    let mut mask = image::RgbaImage::from_pixel(32, 32, image::Rgba([0, 0, 0, 255]));
    for y in 0..16 {
        for x in 0..32 {
            mask.put_pixel(x, y, image::Rgba([0, 0, 0, 0]));
        }
    }
    let mut mask_png = Vec::new();
    image::DynamicImage::ImageRgba8(mask)
        .write_to(&mut std::io::Cursor::new(&mut mask_png), image::ImageFormat::Png)
        .unwrap();
    let form = reqwest::blocking::multipart::Form::new()
        .part(
            "image[]",
            reqwest::blocking::multipart::Part::bytes(png_bytes(&init))
                .file_name("a.png")
                .mime_str("image/png")
                .unwrap(),
        )
        .part(
            "mask",
            reqwest::blocking::multipart::Part::bytes(mask_png).file_name("m.png").mime_str("image/png").unwrap(),
        )
        .text("prompt", "a sky")
        .text("size", "32x32")
        .text("steps", "2")
        .text("seed", "4");
    let response = s.client.post(s.url("/v1/images/edits")).bearer_auth("user:pass").multipart(form).send().unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let body: Value = response.json().unwrap();
    let edited = decode(body["data"][0]["b64_json"].as_str().unwrap());
    // The CLI's inpainting with the mask the transparency means (white: repaint).
    let mut white_top = image::RgbImage::new(32, 32);
    for y in 0..16 {
        for x in 0..32 {
            white_top.put_pixel(x, y, image::Rgb([255, 255, 255]));
        }
    }
    let mask_path = dir.path().join("white-top.png");
    white_top.save(&mask_path).unwrap();
    let init_path = dir.path().join("32-astronaut.png");
    let cli = cli_image(&[
        "--model",
        &model(),
        "--prompt",
        "a sky",
        "--negative-prompt",
        "",
        "--steps",
        "2",
        "--guidance",
        "7",
        "--seed",
        "4",
        "--scheduler",
        "Euler",
        "--init-image",
        init_path.to_str().unwrap(),
        "--mask",
        mask_path.to_str().unwrap(),
        "--keep-unmasked",
    ]);
    assert_eq!(edited, cli, "the edit differs from the CLI's inpainting");
    // Errors in OpenAI's shape.
    let (status, body) = s.post("/v1/images/generations", &json!({"prompt": "x", "size": "63x64"}));
    assert_eq!(status, 400);
    assert!(body["error"]["message"].as_str().unwrap().contains("63x64"), "{body}");
    let (status, body) = s.post("/v1/images/generations", &json!({"n": 1}));
    assert_eq!(status, 400);
    assert_eq!(body["error"]["type"], "invalid_request_error");
    let (status, body) = s.get("/v1/models");
    assert_eq!(status, 200);
    assert_eq!(body["object"], "list");
}

#[test]
fn every_route_needs_credentials() {
    let s = TestServer::start(|_| {});
    let routes = [
        ("GET", "/"),
        ("GET", "/sdapi/v1/sd-models"),
        ("POST", "/sdapi/v1/txt2img"),
        ("GET", "/sdapi/v1/progress"),
        ("POST", "/sdapi/v1/options"),
        ("GET", "/controlnet/model_list"),
        ("GET", "/diffctl/v1/events"),
        ("GET", "/diffctl/v1/jobs/x"),
        ("GET", "/v1/models"),
        ("POST", "/v1/images/generations"),
        ("GET", "/no/such/route"),
    ];
    for (method, path) in routes {
        let request = |r: reqwest::blocking::RequestBuilder| r.body("not json").send().unwrap().status().as_u16();
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        assert_eq!(request(s.client.request(m.clone(), s.url(path))), 401, "{method} {path} without credentials");
        assert_eq!(request(s.client.request(m.clone(), s.url(path)).basic_auth(USER, Some("wrong"))), 401, "{path}");
        let bearer = request(s.client.request(m.clone(), s.url(path)).bearer_auth("user:pass"));
        if path.starts_with("/v1/") {
            assert_ne!(bearer, 401, "{path} takes the Bearer key");
        } else {
            assert_eq!(bearer, 401, "{path} takes only Basic");
        }
    }
    let page = s.client.get(s.url("/")).basic_auth(USER, Some(PASS)).send().unwrap();
    assert_eq!(page.status().as_u16(), 200);
    assert!(page.text().unwrap().contains("<title>diffctl"));
}

/// Starts a long txt2img on a thread and waits until it is sampling.
fn start_long_job(s: &TestServer, steps: usize) -> std::thread::JoinHandle<(u16, Value)> {
    let url = s.url("/sdapi/v1/txt2img");
    let handle = std::thread::spawn(move || {
        let r = client()
            .post(url)
            .basic_auth(USER, Some(PASS))
            .json(&json!({"prompt": "long", "steps": steps, "width": 64, "height": 64, "seed": 1}))
            .send()
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().unwrap_or(Value::Null))
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, p) = s.get("/sdapi/v1/progress");
        if p["progress"].as_f64().unwrap_or(0.0) > 0.0 {
            break;
        }
        assert!(Instant::now() < deadline, "the job never started: {p}");
        std::thread::sleep(Duration::from_millis(20));
    }
    handle
}

#[test]
fn progress_previews_interrupt_and_a_full_queue() {
    let s = TestServer::start(|o| o.engine.max_queue = 1);
    let events = s.client.get(s.url("/diffctl/v1/events")).basic_auth(USER, Some(PASS)).send().unwrap();
    assert_eq!(events.status().as_u16(), 200);
    let job = start_long_job(&s, 300);
    let (_, p) = s.get("/sdapi/v1/progress");
    assert_eq!(p["state"]["job_count"], 1);
    assert!(p["current_image"].is_string(), "no preview: {p}");
    let preview = decode(p["current_image"].as_str().unwrap());
    assert_eq!(preview.dimensions(), (32, 32), "previews are at latent size");
    let (_, p) = s.get("/sdapi/v1/progress?skip_current_image=true");
    assert!(p["current_image"].is_null());
    // The queue holds one job: another is refused with Retry-After.
    let r = s
        .client
        .post(s.url("/sdapi/v1/txt2img"))
        .basic_auth(USER, Some(PASS))
        .json(&json!({"prompt": "x"}))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 503);
    assert!(r.headers().get("retry-after").is_some());
    // The event stream carries progress.
    let mut reader = std::io::BufReader::new(events);
    let mut line = String::new();
    let mut seen = false;
    for _ in 0..20 {
        line.clear();
        std::io::BufRead::read_line(&mut reader, &mut line).unwrap();
        if line.starts_with("event: progress") {
            seen = true;
            break;
        }
    }
    assert!(seen, "no progress event");
    assert_eq!(s.post("/sdapi/v1/interrupt", &json!({})).0, 200);
    // As A1111: an interrupted generation answers 200, with the images finished so far (none).
    let (status, body) = job.join().unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["images"], json!([]));
    let info: Value = serde_json::from_str(body["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["interrupted"], true);
    let (_, p) = s.get("/sdapi/v1/progress");
    assert_eq!(p["state"]["job_count"], 0);
}

#[test]
fn a_disconnected_client_cancels_its_job() {
    let s = TestServer::start(|_| {});
    let url = s.url("/sdapi/v1/txt2img");
    std::thread::spawn(move || {
        let quick = reqwest::blocking::Client::builder().timeout(Duration::from_millis(1500)).build().unwrap();
        let _ = quick
            .post(url)
            .basic_auth(USER, Some(PASS))
            .json(&json!({"prompt": "x", "steps": 400, "width": 64, "height": 64}))
            .send();
    });
    std::thread::sleep(Duration::from_millis(500));
    let (_, p) = s.get("/sdapi/v1/progress");
    let job = p["state"]["job"].as_str().unwrap().to_string();
    assert!(!job.is_empty(), "{p}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, status) = s.get(&format!("/diffctl/v1/jobs/{job}"));
        if status["state"] == "cancelled" {
            break;
        }
        assert!(Instant::now() < deadline, "the abandoned job kept running: {status}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn hires_fix_is_two_cli_passes() {
    let s = TestServer::start(|_| {});
    let dir = tempfile::tempdir().unwrap();
    let first_args = [
        "--model",
        repo_str(SD1),
        "--prompt",
        "a castle",
        "--negative-prompt",
        "",
        "--steps",
        "3",
        "--guidance",
        "7",
        "--seed",
        "8",
        "--scheduler",
        "Euler",
        "--prompt-syntax",
        "a1111",
        "--width",
        "32",
        "--height",
        "32",
    ];
    for upscaler in ["Latent", "Latent (nearest)", "Lanczos", "Nearest"] {
        let (status, body) = s.post(
            "/sdapi/v1/txt2img",
            &json!({"prompt": "a castle", "steps": 3, "width": 32, "height": 32, "seed": 8, "enable_hr": true,
                    "hr_upscaler": upscaler, "hr_scale": 2, "hr_second_pass_steps": 4, "denoising_strength": 0.6}),
        );
        assert_eq!(status, 200, "{upscaler}: {body}");
        let image = decode(body["images"][0].as_str().unwrap());
        assert_eq!(image.dimensions(), (64, 64));
        // The same two passes through the CLI: the first pass, enlarged, then img2img from it.
        let input = if upscaler.starts_with("Latent") {
            let latents_path = dir.path().join("first.safetensors");
            let mut args: Vec<&str> = first_args.to_vec();
            args.extend(["--output-latents", latents_path.to_str().unwrap()]);
            cli_image(&args);
            let latents = diffctl::io::latents::load_latents(&latents_path, &candle_core::Device::Cpu).unwrap();
            let kind = diffctl::pipeline::hires::Upscaler::parse(upscaler).unwrap();
            let enlarged = diffctl::pipeline::hires::upscale_latents(&latents, 32, 32, kind).unwrap();
            let path = dir.path().join("enlarged.safetensors");
            diffctl::io::latents::save_latents(&path, &enlarged).unwrap();
            path
        } else {
            let first = cli_image(&first_args);
            let kind = diffctl::pipeline::hires::Upscaler::parse(upscaler).unwrap();
            let path = dir.path().join("enlarged.png");
            diffctl::pipeline::hires::upscale_image(&first, 64, 64, kind).save(&path).unwrap();
            path
        };
        let cli = cli_image(&[
            "--model",
            repo_str(SD1),
            "--prompt",
            "a castle",
            "--negative-prompt",
            "",
            "--steps",
            "4",
            "--guidance",
            "7",
            "--seed",
            "8",
            "--scheduler",
            "Euler",
            "--prompt-syntax",
            "a1111",
            "--width",
            "64",
            "--height",
            "64",
            "--init-image",
            input.to_str().unwrap(),
            "--strength",
            "0.6",
        ]);
        assert_eq!(image, cli, "hires fix with {upscaler} differs from the two CLI passes");
        let info: Value = serde_json::from_str(body["info"].as_str().unwrap()).unwrap();
        assert!(info["infotexts"][0].as_str().unwrap().contains(&format!("Hires upscaler: {upscaler}")));
    }
    let (status, body) = s.post(
        "/sdapi/v1/txt2img",
        &json!({"prompt": "x", "width": 32, "height": 32, "enable_hr": true, "hr_upscaler": "ESRGAN_4x"}),
    );
    assert_eq!(status, 400);
    assert!(body["detail"].as_str().unwrap().contains("Lanczos"), "{body}");
}

#[test]
fn embeddings_are_used_by_their_file_name() {
    let s = TestServer::start(|_| {});
    let common = [
        "--model",
        repo_str(SD1),
        "--steps",
        "2",
        "--guidance",
        "7",
        "--seed",
        "6",
        "--scheduler",
        "Euler",
        "--prompt-syntax",
        "a1111",
        "--width",
        "32",
        "--height",
        "32",
    ];
    // An A1111 file and a diffusers learned_embeds: each file's name is its token, as in A1111.
    for (prompt, negative, embedding) in [
        ("a house in tiny-style", "", "tests/fixtures/lora/tiny-style.pt:tiny-style"),
        ("a house", "learned_embeds", "tests/fixtures/lora/learned_embeds.safetensors:learned_embeds"),
    ] {
        let (status, body) = s.post(
            "/sdapi/v1/txt2img",
            &json!({"prompt": prompt, "negative_prompt": negative, "steps": 2, "width": 32, "height": 32, "seed": 6}),
        );
        assert_eq!(status, 200, "{body}");
        let flag = Box::leak(format!("{}", repo(embedding).display()).into_boxed_str());
        let args: Vec<&str> = common
            .iter()
            .copied()
            .chain(["--prompt", prompt, "--negative-prompt", negative, "--embedding", flag])
            .collect();
        assert_eq!(decode(body["images"][0].as_str().unwrap()), cli_image(&args), "{embedding}");
    }
    // Loaded once, the embedding serves later jobs and hires fix's second pass too.
    let (status, body) = s.post(
        "/sdapi/v1/txt2img",
        &json!({"prompt": "a house in tiny-style", "steps": 2, "width": 32, "height": 32, "seed": 6, "enable_hr": true,
                "hr_upscaler": "Lanczos", "hr_scale": 2, "denoising_strength": 0.5}),
    );
    assert_eq!(status, 200, "{body}");
}
