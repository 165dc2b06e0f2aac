//! The server under hostile input and load: 1000 malformed or hostile requests each get a 4xx
//! with a message and the server keeps serving; 8 concurrent clients all get their images; a
//! `kill -9` mid-job loses nothing: the restarted server finishes the running and queued jobs.

mod server_common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rand::{RngExt, SeedableRng};
use serde_json::{Value, json};
use server_common::*;

/// One hostile request: method, path, body and content type.
struct Hostile {
    path: &'static str,
    body: Vec<u8>,
    what: String,
}

fn hostile_requests(count: usize) -> Vec<Hostile> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let png = b64(&png_bytes(&image::RgbImage::new(8, 8)));
    let gif = b64(b"GIF89a\x01\x00\x01\x00\x00\x00\x00;");
    let truncated = b64(&png_bytes(&image::RgbImage::new(64, 64))[..60]);
    let json_cases: Vec<(&'static str, Value)> = vec![
        ("/sdapi/v1/txt2img", json!({"steps": "abc"})),
        ("/sdapi/v1/txt2img", json!({"prompt": 5})),
        ("/sdapi/v1/txt2img", json!({"width": [64]})),
        ("/sdapi/v1/txt2img", json!({"seed": "x"})),
        ("/sdapi/v1/txt2img", json!({"batch_size": -1})),
        ("/sdapi/v1/txt2img", json!({"width": 100000, "height": 64})),
        ("/sdapi/v1/txt2img", json!({"width": 4096, "height": 4096})),
        ("/sdapi/v1/txt2img", json!({"width": 63, "height": 64})),
        ("/sdapi/v1/txt2img", json!({"steps": 1e9})),
        ("/sdapi/v1/txt2img", json!({"steps": 100000})),
        ("/sdapi/v1/txt2img", json!({"n_iter": 1000000})),
        ("/sdapi/v1/txt2img", json!({"batch_size": 1000})),
        ("/sdapi/v1/txt2img", json!({"cfg_scale": "NaN"})),
        ("/sdapi/v1/txt2img", json!({"cfg_scale": 1e308})),
        ("/sdapi/v1/txt2img", json!({"sampler_name": "Nope"})),
        ("/sdapi/v1/txt2img", json!({"scheduler": "bogus"})),
        ("/sdapi/v1/txt2img", json!({"override_settings": {"sd_model_checkpoint": "../../../../etc/passwd"}})),
        ("/sdapi/v1/txt2img", json!({"override_settings": "x"})),
        ("/sdapi/v1/txt2img", json!({"prompt": "<lora:../../../etc/passwd:1>"})),
        ("/sdapi/v1/txt2img", json!({"prompt": "<lora:/etc/passwd:1>"})),
        (
            "/sdapi/v1/txt2img",
            json!({"alwayson_scripts": {"controlnet": {"args": [{"model": "../../etc/passwd", "image": png}]}}}),
        ),
        (
            "/sdapi/v1/txt2img",
            json!({"alwayson_scripts": {"controlnet": {"args": [{"model": "cn-a", "image": "!!!"}]}}}),
        ),
        ("/sdapi/v1/txt2img", json!({"alwayson_scripts": {"controlnet": {"args": [{"model": "cn-a", "image": gif}]}}})),
        (
            "/sdapi/v1/txt2img",
            json!({"alwayson_scripts": {"controlnet": {"args": [{"model": "cn-a", "module": "rm -rf", "image": png}]}}}),
        ),
        ("/sdapi/v1/txt2img", json!({"alwayson_scripts": {"controlnet": {"args": "x"}}})),
        ("/sdapi/v1/txt2img", json!({"alwayson_scripts": {"controlnet": {"args": [{"model": "cn-a"}]}}})),
        ("/sdapi/v1/img2img", json!({"prompt": "x"})),
        ("/sdapi/v1/img2img", json!({"init_images": []})),
        ("/sdapi/v1/img2img", json!({"init_images": ["not base64 at all!"]})),
        ("/sdapi/v1/img2img", json!({"init_images": [gif]})),
        ("/sdapi/v1/img2img", json!({"init_images": [truncated]})),
        ("/sdapi/v1/img2img", json!({"init_images": [png], "denoising_strength": 5})),
        ("/sdapi/v1/img2img", json!({"init_images": [png], "mask": "@@@"})),
        ("/sdapi/v1/img2img", json!({"init_images": [png], "resize_mode": "sideways"})),
        ("/sdapi/v1/img2img", json!({"init_images": [5]})),
        ("/sdapi/v1/options", json!({"sd_model_checkpoint": "../../etc/passwd"})),
        ("/sdapi/v1/options", json!({"sd_model_checkpoint": 5})),
        ("/sdapi/v1/options", json!([1, 2])),
        ("/sdapi/v1/png-info", json!({"image": "%%%"})),
        ("/sdapi/v1/png-info", json!({"image": gif})),
        ("/sdapi/v1/png-info", json!({})),
        ("/controlnet/detect", json!({"controlnet_module": "canny", "controlnet_input_images": ["!!"]})),
        ("/controlnet/detect", json!({"controlnet_module": "evil", "controlnet_input_images": [png]})),
        ("/v1/images/generations", json!({"prompt": "x", "size": "0x0"})),
        ("/v1/images/generations", json!({"prompt": "x", "size": "99999x99999"})),
        ("/v1/images/generations", json!({"prompt": "x", "n": 1000})),
        ("/v1/images/generations", json!({"prompt": "x", "response_format": "xml"})),
        ("/v1/images/generations", json!({"size": "64x64"})),
        ("/v1/images/generations", json!({"prompt": ["x"]})),
    ];
    let raw_cases: Vec<(&'static str, Vec<u8>)> = vec![
        ("/sdapi/v1/txt2img", b"{not json".to_vec()),
        ("/sdapi/v1/txt2img", b"null".to_vec()),
        ("/sdapi/v1/txt2img", b"[]".to_vec()),
        ("/sdapi/v1/txt2img", b"\"prompt\"".to_vec()),
        ("/sdapi/v1/img2img", b"{\"init_images\": [".to_vec()),
        ("/v1/images/generations", b"{\"prompt\": \"x\"".to_vec()),
        ("/v1/images/edits", b"--boundary\r\ngarbage".to_vec()),
        ("/sdapi/v1/options", b"\xff\xfe\x00".to_vec()),
    ];
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let pick = i % (json_cases.len() + raw_cases.len() + 2);
        let request = if pick < json_cases.len() {
            let (path, body) = &json_cases[pick];
            Hostile { path, body: body.to_string().into_bytes(), what: body.to_string().chars().take(120).collect() }
        } else if pick < json_cases.len() + raw_cases.len() {
            let (path, body) = &raw_cases[pick - json_cases.len()];
            Hostile { path, body: body.clone(), what: String::from_utf8_lossy(body).into_owned() }
        } else if pick == json_cases.len() + raw_cases.len() {
            let len = rng.random_range(1..4096);
            let body: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            Hostile { path: "/sdapi/v1/txt2img", body, what: format!("{len} random bytes") }
        } else if i % 200 == 0 {
            // Over the body limit (8 MiB in these tests).
            let body = format!("{{\"prompt\": \"{}\"}}", "a".repeat(9 << 20)).into_bytes();
            Hostile { path: "/sdapi/v1/txt2img", body, what: "a 9 MiB body".into() }
        } else {
            let len = rng.random_range(1..256);
            let body: Vec<u8> = (0..len).map(|_| rng.random_range(32u8..127)).collect();
            Hostile { path: "/v1/images/generations", body, what: format!("{len} random characters") }
        };
        out.push(request);
    }
    out
}

#[test]
fn a_thousand_hostile_requests_each_get_a_4xx_and_the_server_keeps_serving() {
    let s = TestServer::start(|_| {});
    let requests = hostile_requests(1000);
    let started = Instant::now();
    let mut failures = Vec::new();
    for (i, request) in requests.iter().enumerate() {
        let response = s
            .client
            .post(s.url(request.path))
            .basic_auth(USER, Some(PASS))
            .header("content-type", "application/json")
            .body(request.body.clone())
            .send();
        let response = match response {
            Ok(r) => r,
            Err(e) => {
                failures.push(format!("#{i} {} {}: no answer ({e})", request.path, request.what));
                continue;
            }
        };
        let status = response.status().as_u16();
        let body: Value = response.json().unwrap_or(Value::Null);
        let message = body["detail"].as_str().or(body["error"]["message"].as_str()).unwrap_or("");
        if !(400..500).contains(&status) || message.is_empty() {
            failures.push(format!("#{i} {} {}: {status} {body}", request.path, request.what));
        }
    }
    let elapsed = started.elapsed();
    assert!(
        failures.is_empty(),
        "{} of 1000 hostile requests were not refused with a 4xx and a message:\n{}",
        failures.len(),
        failures.join("\n")
    );
    eprintln!("1000 hostile requests refused in {:.2} s", elapsed.as_secs_f64());
    // Still serving.
    let (status, body) =
        s.post("/sdapi/v1/txt2img", &json!({"prompt": "still here", "steps": 2, "width": 32, "height": 32}));
    assert_eq!(status, 200, "{body}");
    // Nothing was queued by the refused requests.
    let (_, p) = s.get("/sdapi/v1/progress");
    assert_eq!(p["state"]["job_count"], 0);
}

#[test]
fn eight_concurrent_clients_all_get_their_images() {
    let s = TestServer::start(|_| {});
    let threads: Vec<_> = (0..8)
        .map(|i| {
            let url = s.url(if i % 2 == 0 { "/sdapi/v1/txt2img" } else { "/v1/images/generations" });
            std::thread::spawn(move || {
                let body = if i % 2 == 0 {
                    json!({"prompt": format!("client {i}"), "steps": 2, "width": 32, "height": 32, "seed": i})
                } else {
                    json!({"prompt": format!("client {i}"), "steps": 2, "size": "32x32", "seed": i})
                };
                let r = client().post(url).basic_auth(USER, Some(PASS)).json(&body).send().unwrap();
                let status = r.status().as_u16();
                (status, r.json::<Value>().unwrap())
            })
        })
        .collect();
    for (i, thread) in threads.into_iter().enumerate() {
        let (status, body) = thread.join().unwrap();
        assert_eq!(status, 200, "client {i}: {body}");
        let image = body["images"][0].as_str().or(body["data"][0]["b64_json"].as_str()).unwrap();
        assert_eq!(decode(image).dimensions(), (32, 32));
    }
}

fn serve(models: &std::path::Path, state: &std::path::Path, port: u16) -> KillOnDrop {
    let child = Command::new(env!("CARGO_BIN_EXE_diffctl"))
        .args(["serve", "--model"])
        .arg(models.join("Stable-diffusion/sd1-tiny"))
        .arg("--models-dir")
        .arg(models)
        .arg("--state-dir")
        .arg(state)
        .args(["--port", &port.to_string(), "--api-auth", "user:pass", "--max-steps", "400"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_port(port, 60, "diffctl serve");
    KillOnDrop(child)
}

#[test]
fn kill_9_mid_job_loses_nothing() {
    let models = models_dir();
    let state = tempfile::tempdir().unwrap();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut server = serve(models.path(), state.path(), port);
    let post = |body: Value| {
        let url = format!("{base}/sdapi/v1/txt2img");
        std::thread::spawn(move || {
            let _ = client().post(url).basic_auth(USER, Some(PASS)).json(&body).send();
        })
    };
    let long = json!({"prompt": "running when killed", "steps": 200, "width": 64, "height": 64, "seed": 21, "sampler_name": "Euler"});
    let queued = json!({"prompt": "queued when killed", "steps": 3, "width": 32, "height": 32, "seed": 22, "sampler_name": "Euler"});
    let _first = post(long);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let p: Value = client()
            .get(format!("{base}/sdapi/v1/progress"))
            .basic_auth(USER, Some(PASS))
            .send()
            .unwrap()
            .json()
            .unwrap();
        if p["progress"].as_f64().unwrap_or(0.0) > 0.0 {
            break;
        }
        assert!(Instant::now() < deadline, "the job never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    let _second = post(queued);
    std::thread::sleep(Duration::from_millis(300));
    server.0.kill().unwrap(); // SIGKILL
    server.0.wait().unwrap();

    let unfinished = diffctl::server::store::JobStore::open(state.path()).unwrap().unfinished().unwrap();
    assert_eq!(unfinished.len(), 2, "both accepted jobs are stored");
    let _restarted = serve(models.path(), state.path(), port);
    for job in &unfinished {
        let deadline = Instant::now() + Duration::from_secs(120);
        let status = loop {
            let status: Value = client()
                .get(format!("{base}/diffctl/v1/jobs/{}", job.id))
                .basic_auth(USER, Some(PASS))
                .send()
                .unwrap()
                .json()
                .unwrap();
            if status["state"] == "done" {
                break status;
            }
            assert!(Instant::now() < deadline, "job {} was not finished after the restart: {status}", job.id);
            std::thread::sleep(Duration::from_millis(100));
        };
        assert_eq!(status["images"].as_array().unwrap().len(), 1);
    }
    // The job that was running finishes with the CLI's pixels.
    let running =
        unfinished.iter().find(|j| j.state == diffctl::server::jobs::JobState::Running).expect("a running job");
    let status: Value = client()
        .get(format!("{base}/diffctl/v1/jobs/{}", running.id))
        .basic_auth(USER, Some(PASS))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let cli = cli_image(&[
        "--model",
        repo_str("tests/fixtures/models/sd1-tiny"),
        "--prompt",
        "running when killed",
        "--negative-prompt",
        "",
        "--steps",
        "200",
        "--guidance",
        "7",
        "--width",
        "64",
        "--height",
        "64",
        "--seed",
        "21",
        "--scheduler",
        "Euler",
        "--prompt-syntax",
        "a1111",
    ]);
    assert_eq!(decode(status["images"][0].as_str().unwrap()), cli);
}
