//! `diffctl serve --queue redis://…` with `diffctl worker`s on a real `redis-server`: a worker
//! killed mid-job leaves its job to another, which finishes it with the CLI's pixels.

mod server_common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use server_common::*;

fn redis_server(port: u16) -> KillOnDrop {
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--save", "", "--appendonly", "no", "--bind", "127.0.0.1"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("redis-server could not start ({e}): install it (Debian: apt-get install redis-server)")
        });
    wait_for_port(port, 20, "redis-server");
    KillOnDrop(child)
}

fn worker(url: &str, models: &std::path::Path, work: &std::path::Path, log: &std::path::Path) -> KillOnDrop {
    let child = Command::new(env!("CARGO_BIN_EXE_diffctl"))
        .args(["worker", "--queue", url, "--model"])
        .arg(models.join("Stable-diffusion/sd1-tiny"))
        .arg("--models-dir")
        .arg(models)
        .arg("--model-config")
        .arg(repo("tests/fixtures/models/sd1-tiny"))
        .args(["--reclaim-after", "2", "--work-dir"])
        .arg(work)
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    KillOnDrop(child)
}

#[test]
fn a_killed_workers_job_is_finished_by_another() {
    let port = free_port();
    let _redis = redis_server(port);
    let url = format!("redis://127.0.0.1:{port}");
    let s = TestServer::start(|o| o.engine.queue = Some(url.clone()));
    let logs = tempfile::tempdir().unwrap();
    let log_a = logs.path().join("a.log");
    let log_b = logs.path().join("b.log");
    let mut a = Some(worker(&url, s.models.path(), &logs.path().join("wa"), &log_a));
    let mut b = Some(worker(&url, s.models.path(), &logs.path().join("wb"), &log_b));

    // A short job first: the workers are up and the results come back.
    let (status, body) =
        s.post("/sdapi/v1/txt2img", &json!({"prompt": "warm up", "steps": 1, "width": 32, "height": 32, "seed": 2}));
    assert_eq!(status, 200, "{body}");

    let target = s.url("/sdapi/v1/txt2img");
    let job = std::thread::spawn(move || {
        let r = client()
            .post(target)
            .basic_auth(USER, Some(PASS))
            .json(&json!({"prompt": "a long job", "steps": 150, "width": 64, "height": 64, "seed": 11, "sampler_name": "Euler"}))
            .send()
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json::<Value>().unwrap_or(Value::Null))
    });
    // Wait until the job is sampling on a worker, then kill that worker.
    let deadline = Instant::now() + Duration::from_secs(120);
    let id = loop {
        let (_, p) = s.get("/sdapi/v1/progress");
        if p["progress"].as_f64().unwrap_or(0.0) > 0.05 {
            break p["state"]["job"].as_str().unwrap().to_string();
        }
        assert!(Instant::now() < deadline, "the job never started on a worker: {p}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let running_on =
        |log: &std::path::Path| std::fs::read_to_string(log).unwrap_or_default().contains(&format!("running job {id}"));
    let (victim, survivor_log) = if running_on(&log_a) { (a.take(), &log_b) } else { (b.take(), &log_a) };
    let mut victim = victim.expect("no worker runs the job");
    victim.0.kill().unwrap(); // SIGKILL
    victim.0.wait().unwrap();

    let (status, body) = job.join().unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(running_on(survivor_log), "the surviving worker never took the job over");
    let image = decode(body["images"][0].as_str().unwrap());
    let cli = cli_image(&[
        "--model",
        repo_str("tests/fixtures/models/sd1-tiny"),
        "--prompt",
        "a long job",
        "--negative-prompt",
        "",
        "--steps",
        "150",
        "--guidance",
        "7",
        "--width",
        "64",
        "--height",
        "64",
        "--seed",
        "11",
        "--scheduler",
        "Euler",
        "--prompt-syntax",
        "a1111",
    ]);
    assert_eq!(image, cli, "the reclaimed job's pixels differ from the CLI's");
    let (_, stored) = s.get(&format!("/diffctl/v1/jobs/{id}"));
    assert_eq!(stored["state"], "done");
    let (_, p) = s.get("/sdapi/v1/progress");
    assert_eq!(p["state"]["job_count"], 0);
}
