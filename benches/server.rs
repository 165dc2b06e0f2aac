//! The server's overhead per job: the same txt2img through the HTTP API (`diffctl serve`, model
//! resident), through the library on a resident model, and through the CLI (a process per job,
//! loading the model each time).
//!
//! ```sh
//! cargo bench --bench server -- [--model PATH] [--size PX] [--steps N] [--runs N]
//! ```

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use diffctl::limits::Limits;
use diffctl::noise::SeededNoise;
use diffctl::pipeline::{LoadOptions, StableDiffusion};
use diffctl::request::Request;
use diffctl::schedulers::SchedulerKind;
use diffctl::server::models_dir::ModelsDir;
use diffctl::server::{EngineSettings, ServeOptions};

/// The engine's allocator, as the binary uses.
#[global_allocator]
static ALLOCATOR: diffctl::allocator::TensorAllocator = diffctl::allocator::TensorAllocator;

struct Args {
    model: PathBuf,
    size: usize,
    steps: usize,
    runs: usize,
}

fn args() -> anyhow::Result<Args> {
    let mut out = Args {
        model: Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/sd1-tiny"),
        size: 64,
        steps: 20,
        runs: 10,
    };
    let argv: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let mut it = argv.iter();
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| anyhow::anyhow!("{flag} needs a value"))?;
        match flag.as_str() {
            "--model" => out.model = PathBuf::from(value),
            "--size" => out.size = value.parse()?,
            "--steps" => out.steps = value.parse()?,
            "--runs" => out.runs = value.parse()?,
            other => anyhow::bail!("unknown option {other}"),
        }
    }
    Ok(out)
}

fn mean_ms(times: &[Duration]) -> f64 {
    times.iter().map(Duration::as_secs_f64).sum::<f64>() / times.len() as f64 * 1e3
}

fn main() -> anyhow::Result<()> {
    diffctl::allocator::configure();
    let args = args()?;
    let prompt = "a lighthouse at dusk";
    let seed = 3;

    // The library on a resident model: prepare, generate, PNG with its infotext.
    let options = LoadOptions::default();
    let mut model = StableDiffusion::load(&args.model, &options)?;
    let mut library = Vec::new();
    for _ in 0..=args.runs {
        let start = Instant::now();
        let request = Request {
            prompt: prompt.into(),
            negative_prompt: Some(String::new()),
            steps: args.steps,
            guidance: 7.0,
            scheduler: Some(SchedulerKind::Euler),
            width: Some(args.size),
            height: Some(args.size),
            seed,
            ..Request::default()
        };
        let mut prepared = request.prepare(&mut model, &options)?;
        let generated =
            model.generate(&prepared.generate, &mut prepared.controls, &mut SeededNoise::new(seed), &mut |_| {})?;
        let image = diffctl::io::image::to_rgb8(&generated.images)?.remove(0);
        std::hint::black_box(diffctl::server::png::encode(&image, Some(prompt))?);
        library.push(start.elapsed());
    }
    library.remove(0);
    drop(model);

    // The HTTP API on a resident model.
    let state = tempfile::tempdir()?;
    let server = diffctl::server::start(
        ServeOptions {
            engine: EngineSettings {
                runner: diffctl::server::runner::RunnerSettings {
                    model: args.model.clone(),
                    models_dir: ModelsDir::new(None),
                    load: LoadOptions::default(),
                    limits: Limits::default(),
                },
                state_dir: state.path().to_path_buf(),
                max_queue: 64,
                queue: None,
            },
            address: ([127, 0, 0, 1], 0).into(),
            api_auth: None,
            max_body: 64 << 20,
            max_steps: 10_000,
        },
        false,
    )?;
    let client = reqwest::blocking::Client::builder().timeout(Duration::from_secs(3600)).build()?;
    let url = format!("http://{}/sdapi/v1/txt2img", server.address);
    let body = serde_json::json!({"prompt": prompt, "steps": args.steps, "cfg_scale": 7, "width": args.size,
        "height": args.size, "seed": seed, "sampler_name": "Euler"});
    let mut api = Vec::new();
    for _ in 0..=args.runs {
        let start = Instant::now();
        let response: serde_json::Value = client.post(&url).json(&body).send()?.error_for_status()?.json()?;
        anyhow::ensure!(response["images"].as_array().is_some_and(|a| a.len() == 1), "no image: {response}");
        api.push(start.elapsed());
    }
    api.remove(0);
    server.shutdown();

    // The CLI: a process per job.
    let exe = std::env::current_exe()?;
    let cli_bin = exe.parent().and_then(Path::parent).map(|d| d.join("diffctl")).filter(|p| p.is_file());
    let mut cli = Vec::new();
    if let Some(bin) = &cli_bin {
        let out = tempfile::tempdir()?;
        for _ in 0..args.runs.min(5) {
            let start = Instant::now();
            let status = std::process::Command::new(bin)
                .args(["generate", "--model"])
                .arg(&args.model)
                .args([
                    "--prompt",
                    prompt,
                    "--negative-prompt",
                    "",
                    "--steps",
                    &args.steps.to_string(),
                    "--guidance",
                    "7",
                    "--scheduler",
                    "Euler",
                    "--width",
                    &args.size.to_string(),
                    "--height",
                    &args.size.to_string(),
                    "--seed",
                    &seed.to_string(),
                    "--output",
                ])
                .arg(out.path().join("out.png"))
                .stderr(std::process::Stdio::null())
                .status()?;
            anyhow::ensure!(status.success(), "diffctl generate failed");
            cli.push(start.elapsed());
        }
    }

    let (lib, http) = (mean_ms(&library), mean_ms(&api));
    println!(
        "model {} at {}x{}, {} steps, {} runs each",
        args.model.display(),
        args.size,
        args.size,
        args.steps,
        args.runs
    );
    println!("{:<34} {:>10}", "path", "ms / job");
    println!("{:<34} {:>10.1}", "library, resident model", lib);
    println!("{:<34} {:>10.1}", "HTTP API (txt2img), resident", http);
    println!("server overhead per job: {:.1} ms ({:+.1} %)", http - lib, (http / lib - 1.0) * 100.0);
    if cli.is_empty() {
        println!("CLI: build target/release/diffctl (cargo build --release) to time it");
    } else {
        let c = mean_ms(&cli);
        println!("{:<34} {:>10.1}", "CLI (process, loads the model)", c);
        println!("CLI / API time per job: {:.2}", c / http);
    }
    Ok(())
}
