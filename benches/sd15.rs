//! SD1.5-size (and, with `--family sdxl`, SDXL-size) benchmark: diffctl against the CPU peers (PyTorch,
//! OpenVINO, ONNX Runtime) on the same weights, same thread count, in one invocation and one table.
//!
//! ```sh
//! cargo bench --bench sd15 -- [--family sd15|sdxl] [--model DIR] [--runs N] [--full] [--train] [--peers PYTHON] [--only unet-b2,vae]
//! ```
//!
//! Without `--model` it makes (once) random weights of the real SD1.5 (or SDXL base) sizes in the
//! diffusers layout under `target/bench-sd15/`. Every measurement runs in its own child process (this executable with
//! `--child KIND`), so each peak RSS is that measurement's alone and the whole generation's is its own.
//! See README.md, *Performance*.

mod sd15 {
    pub mod measure;
    pub mod model;
    pub mod peers;
    pub mod report;
    pub mod train;
}

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device};
use clap::Parser;
use diffctl::io::model_files::{ModelFiles, SourceOptions};
use sd15::measure::{self, DEEP_CACHE_INTERVAL, FULL_STEPS, Job, Kind, Outcome, RESULT_TAG, Shapes, VAE_TILE};
use sd15::peers::{self, Item, Peer, PeerOptions, PeerResults};
use sd15::report::{self, Row, Stat, Unit};

/// Command-line options (after `cargo bench --bench sd15 --`).
#[derive(Debug, Parser)]
#[command(name = "sd15", about = "SD1.5-size benchmark: diffctl vs PyTorch, OpenVINO and ONNX Runtime on the CPU")]
struct Args {
    /// Which model's sizes to make random weights of (without --model) and which peer script to use.
    #[arg(long, value_enum, default_value = "sd15")]
    family: BenchFamily,
    /// A diffusers folder of the family's size; default: random weights made once under target/bench-sd15/.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Timed runs per measurement (ours and the peers').
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Untimed warm-up runs before them.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Threads for everyone (candle's CPU backend, torch, OpenVINO, ONNX Runtime).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Also time a whole 20-step generation at the native size with guidance (no warm-up; --full-runs times).
    #[arg(long)]
    full: bool,
    /// Also time training steps: LoRA rank 16 and ControlNet, batch 1 at the native size (PyTorch f32 as
    /// the peer).
    #[arg(long)]
    train: bool,
    /// Timed whole generations with --full.
    #[arg(long, default_value_t = 1)]
    full_runs: usize,
    /// A Python with torch and diffusers (and openvino, onnx, onnxruntime) to time the peers with;
    /// default: $DIFFCTL_BENCH_PYTHON; without one the peers are skipped.
    #[arg(long)]
    peers: Option<PathBuf>,
    /// Also time PyTorch autocast bf16 on a CPU without native bf16 (skipped there by default: emulated,
    /// about 100x slower).
    #[arg(long)]
    bf16_peers: bool,
    /// The peers' timing script; default: ../shared/bench/perf_peers.py (SD1.5), benches/sd15/sdxl_peers.py
    /// (SDXL).
    #[arg(long)]
    peers_script: Option<PathBuf>,
    /// Only these measurements (comma-separated); default: all but `full` (which --full adds),
    /// `full-deep-cache` and the training steps (which --train adds) (SDXL: unet-b2, vae, vae-tiled).
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Kind>,
    /// Our compute dtype: f32, f16 or bf16; several, comma-separated (`f32,bf16`), measure ours in
    /// each against the same peers, one group of rows per dtype.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Our device: cpu, cuda or metal (the latter two need --features cuda / metal; peers are CPU-only
    /// and are skipped elsewhere).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Seed of the random weights and inputs.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Internal: run one measurement in this process and print its result line.
    #[arg(long, hide = true, value_enum)]
    child: Option<Kind>,
    /// Internal: the ControlNet folder of a child.
    #[arg(long, hide = true)]
    controlnet: Option<PathBuf>,
    /// Internal: the IP-Adapter file of a child.
    #[arg(long, hide = true)]
    ip_adapter: Option<PathBuf>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// The model sizes the benchmark can make random weights of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum BenchFamily {
    /// Stable Diffusion 1.5: 512x512, UNet 860 M parameters.
    Sd15,
    /// Stable Diffusion XL base 1.0: 1024x1024, UNet 2.57 B parameters, two text encoders.
    Sdxl,
}

impl BenchFamily {
    /// The report's title.
    fn title(self) -> &'static str {
        match self {
            BenchFamily::Sd15 => "SD1.5-size",
            BenchFamily::Sdxl => "SDXL-size",
        }
    }

    /// The measurements run when --only is not given (before --full adds the whole generation).
    fn default_kinds(self) -> Vec<Kind> {
        match self {
            BenchFamily::Sd15 => Kind::ALL
                .into_iter()
                .filter(|k| !k.is_generation() && !k.is_training() && *k != Kind::VaeTiled)
                .collect(),
            BenchFamily::Sdxl => vec![Kind::UnetB2, Kind::Vae, Kind::VaeTiled],
        }
    }
}

fn device(name: &str) -> Result<Device> {
    Ok(match name {
        "cpu" => Device::Cpu,
        "cuda" => Device::new_cuda(0)?,
        "metal" => Device::new_metal(0)?,
        other => bail!("unknown device `{other}` (cpu, cuda, metal)"),
    })
}

fn dtype(name: &str) -> Result<DType> {
    Ok(match name {
        "f32" => DType::F32,
        "f16" => DType::F16,
        "bf16" => DType::BF16,
        other => bail!("unknown dtype `{other}` (f32, f16, bf16)"),
    })
}

/// `target/bench-sd15`, beside this executable's `target/<profile>/deps/`.
fn cache_dir() -> PathBuf {
    let exe = std::env::current_exe().ok();
    let target = exe
        .as_deref()
        .and_then(Path::parent)
        .filter(|deps| deps.ends_with("deps"))
        .and_then(Path::parent)
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    target.join("bench-sd15")
}

/// The weight files the measurements read.
struct Inputs {
    model: PathBuf,
    controlnet: Option<PathBuf>,
    ip_adapter: Option<PathBuf>,
}

/// Warm-up and timed runs of `kind`: the whole generation runs --full-runs times without warm-up.
fn schedule(args: &Args, kind: Kind) -> (usize, usize) {
    if kind.is_generation() { (0, args.full_runs) } else { (args.warmup, args.runs) }
}

/// Runs one measurement in a child process with the thread count set for candle and rayon.
fn run_child(args: &Args, dtype: &str, inputs: &Inputs, kind: Kind) -> Result<Outcome> {
    let (warmup, runs) = schedule(args, kind);
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new(exe);
    cmd.args(["--child", kind.name(), "--model"])
        .arg(&inputs.model)
        .args(["--runs", &runs.to_string(), "--warmup", &warmup.to_string()])
        .args(["--dtype", dtype, "--device", &args.device, "--seed", &args.seed.to_string()]);
    if let Some(p) = &inputs.controlnet {
        cmd.arg("--controlnet").arg(p);
    }
    if let Some(p) = &inputs.ip_adapter {
        cmd.arg("--ip-adapter").arg(p);
    }
    // candle's CPU backend sizes its thread pools (and gemm's parallelism) from RAYON_NUM_THREADS,
    // falling back to the number of physical cores; CANDLE_NUM_THREADS sizes its quantized-kernel pool.
    let threads = args.threads.to_string();
    let mut child = cmd
        .env("RAYON_NUM_THREADS", &threads)
        .env("CANDLE_NUM_THREADS", &threads)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let mut result = None;
    for line in BufReader::new(child.stdout.take().context("no stdout")?).lines() {
        let line = line?;
        match line.strip_prefix(RESULT_TAG) {
            Some(json) => result = Some(serde_json::from_str::<Outcome>(json)?),
            None => println!("{line}"),
        }
    }
    let status = child.wait()?;
    match result {
        Some(r) if status.success() => Ok(r),
        _ => bail!("{} failed ({status})", kind.name()),
    }
}

fn child_main(args: &Args, kind: Kind) -> Result<()> {
    let job = Job {
        kind,
        model: args.model.clone().context("--child needs --model")?,
        controlnet: args.controlnet.clone(),
        ip_adapter: args.ip_adapter.clone(),
        warmup: args.warmup,
        runs: args.runs,
        dtype: dtype(&args.dtype)?,
        device: device(&args.device)?,
        seed: args.seed,
    };
    let outcome = measure::run(&job)?;
    println!("{RESULT_TAG}{}", serde_json::to_string(&outcome)?);
    Ok(())
}

/// The rows of the table from our outcomes and the peers'; `label` (our dtype when several were
/// measured) ends each row's description.
fn rows(ours: &[(Kind, Outcome)], peers: &PeerResults, shapes: &Shapes, label: &str) -> Vec<Row> {
    let get = |k: Kind| ours.iter().find(|(kind, _)| *kind == k).map(|(_, o)| o);
    let stat = |k: Kind| get(k).and_then(|o| Stat::of(&o.runs));
    let rss = |k: Kind| get(k).map(|o| o.peak_rss_gb);
    let peer = |item: Item| -> Vec<(Peer, Stat)> {
        Peer::ALL
            .iter()
            .filter_map(|p| peers.timings.get(&(*p, item)).map(|t| (*p, Stat { min: t.min, median: t.median })))
            .collect()
    };
    let timed = |what: &str, k: Kind, peers: Vec<(Peer, Stat)>| Row {
        what: what.into(),
        unit: Unit::Seconds,
        ours: stat(k),
        ours_rss: rss(k),
        ours_cpu_share: get(k).map(|o| (o.cpu_share, o.machine_busy)),
        peers,
    };
    let mut rows = vec![
        timed(&format!("UNet step, batch 2 (CFG), {}", shapes.step_description()), Kind::UnetB2, peer(Item::UnetB2)),
        timed("UNet step, batch 1", Kind::UnetB1, Vec::new()),
        timed(&format!("VAE decode {0}x{0}", shapes.image), Kind::Vae, peer(Item::Vae)),
        timed(&format!("VAE decode {0}x{0}, tiles of {VAE_TILE} px", shapes.image), Kind::VaeTiled, Vec::new()),
        timed("text encoding, 1 prompt (77 tokens)", Kind::Text, Vec::new()),
    ];
    for (k, name, item) in [
        (Kind::Controlnet, "1 ControlNet", Some(Item::ControlnetAdded)),
        (Kind::IpAdapter, "1 IP-Adapter (base)", None),
    ] {
        let added: Vec<f64> =
            get(k).map_or_else(Vec::new, |o| o.runs.iter().zip(&o.baseline).map(|(w, p)| w - p).collect());
        rows.push(timed(&format!("UNet step, batch 2, with {name}"), k, Vec::new()));
        rows.push(Row {
            what: format!("↳ added per step by {name}"),
            ours: Stat::of(&added),
            ..timed("", k, item.map_or_else(Vec::new, peer))
        });
    }
    // 20 steps + decode from the parts' medians, for everyone with both parts.
    let sum = |unet: Stat, vae: Stat| Stat {
        min: FULL_STEPS as f64 * unet.min + vae.min,
        median: FULL_STEPS as f64 * unet.median + vae.median,
    };
    let ours_sum = stat(Kind::UnetB2).zip(stat(Kind::Vae)).map(|(u, v)| sum(u, v));
    let peers_sum: Vec<(Peer, Stat)> = peer(Item::UnetB2)
        .into_iter()
        .filter_map(|(p, u)| {
            peers.timings.get(&(p, Item::Vae)).map(|v| (p, sum(u, Stat { min: v.min, median: v.median })))
        })
        .collect();
    rows.push(Row {
        what: format!("{FULL_STEPS} × UNet step b2 + VAE decode (sum of the parts)"),
        unit: Unit::Seconds,
        ours: ours_sum,
        ours_rss: None,
        ours_cpu_share: None,
        peers: peers_sum.clone(),
    });
    rows.push(timed(
        &format!("whole generation, {0}x{0}, {FULL_STEPS} steps, CFG (load excluded)", shapes.image),
        Kind::Full,
        peer(Item::Full),
    ));
    // Peers without a whole-generation timing: ours against their sum of the parts, which leaves out
    // their text encoding, scheduler and the 21st PNDM call, so it favours them.
    if stat(Kind::Full).is_some() && !peers_sum.is_empty() {
        rows.push(Row {
            what: format!("↳ ours whole against the peers' {FULL_STEPS} × step + decode (favours them)"),
            ..timed("", Kind::Full, peers_sum)
        });
    }
    if let Some(step) = get(Kind::Full).and_then(|o| o.parts.get("step (mean)")) {
        rows.push(Row {
            what: "↳ its mean UNet call (SD1.5's PNDM: 21 calls for 20 steps)".into(),
            ours: Some(Stat::one(*step)),
            ..timed("", Kind::Full, Vec::new())
        });
    }
    rows.push(timed(
        &format!("whole generation with DeepCache (interval {DEEP_CACHE_INTERVAL}, branch 0; approximate)"),
        Kind::FullDeepCache,
        Vec::new(),
    ));
    let training = [
        (Kind::TrainLora, Item::TrainLora, format!("LoRA rank {}", sd15::train::LORA_RANK)),
        (Kind::TrainControlnet, Item::TrainControlnet, "ControlNet".to_string()),
    ];
    for (k, item, what) in &training {
        rows.push(timed(&format!("training step, {what}, {0}x{0}, batch 1, AdamW", shapes.image), *k, peer(*item)));
    }
    let peer_rss = |item: Item| {
        Peer::ALL
            .iter()
            .filter_map(|p| peers.timings.get(&(*p, item)).map(|t| (*p, Stat::one(t.peak_rss_gb))))
            .filter(|(_, s)| s.median.is_finite())
            .collect()
    };
    let rss_rows = [(Kind::UnetB2, Item::UnetB2, "the UNet b2".to_string())]
        .into_iter()
        .chain(training.into_iter().map(|(k, item, what)| (k, item, format!("the {what} training"))));
    for (k, item, what) in rss_rows {
        rows.push(Row {
            what: format!("peak RSS of {what} process"),
            unit: Unit::Gb,
            ours: rss(k).map(Stat::one),
            ours_rss: None,
            ours_cpu_share: None,
            peers: peer_rss(item),
        });
    }
    rows.retain(|r| r.ours.is_some() || !r.peers.is_empty());
    rows.iter_mut().for_each(|r| r.what.push_str(label));
    for r in rows.iter_mut().filter(|r| r.what.starts_with('↳')) {
        (r.ours_rss, r.ours_cpu_share) = (None, None);
    }
    rows
}

// Measured as the CLI runs: with diffctl's allocator (src/allocator.rs).
#[global_allocator]
static ALLOCATOR: diffctl::allocator::TensorAllocator = diffctl::allocator::TensorAllocator;

fn main() -> Result<()> {
    diffctl::allocator::configure();
    let args = Args::parse();
    if let Some(kind) = args.child {
        return child_main(&args, kind);
    }
    device(&args.device)?;
    let dtypes: Vec<&str> = args.dtype.split(',').map(str::trim).collect();
    for d in &dtypes {
        dtype(d)?;
    }
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let chosen = if args.only.is_empty() { args.family.default_kinds() } else { args.only.clone() };
    let kinds: Vec<Kind> = Kind::ALL
        .into_iter()
        .filter(|k| chosen.contains(k) || (*k == Kind::Full && args.full) || (k.is_training() && args.train))
        .collect();
    let cache = cache_dir();
    let model = match &args.model {
        Some(m) => m.clone(),
        None if args.family == BenchFamily::Sdxl => sd15::model::sdxl_folder(&cache, args.seed)?,
        None => sd15::model::sd15_folder(&cache, args.seed)?,
    };
    let shapes = Shapes::of(&ModelFiles::open(&model, &SourceOptions::default())?);
    let inputs = Inputs {
        controlnet: match kinds.contains(&Kind::Controlnet) {
            true => Some(sd15::model::controlnet_for(&model, &cache, args.seed)?),
            false => None,
        },
        ip_adapter: match kinds.contains(&Kind::IpAdapter) {
            true => Some(sd15::model::ip_adapter_for(&model, &cache, args.seed)?),
            false => None,
        },
        model,
    };

    let mut ours: Vec<(&str, Vec<(Kind, Outcome)>)> = dtypes.iter().map(|d| (*d, Vec::new())).collect();
    let mut failed = Vec::new();
    for (dtype, ours) in &mut ours {
        for &kind in &kinds {
            let (warmup, runs) = schedule(&args, kind);
            eprintln!(
                "diffctl {} ({dtype}): {} warm-up + {} timed, {} threads",
                kind.name(),
                warmup,
                runs,
                args.threads
            );
            match run_child(&args, dtype, &inputs, kind) {
                Ok(o) => {
                    if o.threads != args.threads {
                        eprintln!("  warning: candle used {} threads, not {}", o.threads, args.threads);
                    }
                    let parts: Vec<String> = o.parts.iter().map(|(k, v)| format!("{k} {v:.2} s")).collect();
                    eprintln!(
                        "  {}; peak RSS {:.2} GB; CPU: ours {:.0} % of {} threads, machine {:.0} % busy; {}",
                        o.check,
                        o.peak_rss_gb,
                        100.0 * o.cpu_share,
                        o.threads,
                        100.0 * o.machine_busy,
                        parts.join(", ")
                    );
                    ours.push((kind, o));
                }
                Err(e) => {
                    eprintln!("  {e:#}");
                    failed.push(format!("{} ({dtype}): {e:#}", kind.name()));
                }
            }
        }
    }

    let python = args.peers.clone().or_else(|| std::env::var_os("DIFFCTL_BENCH_PYTHON").map(PathBuf::from));
    let items: Vec<Item> = [
        (Kind::UnetB2, Item::UnetB2),
        (Kind::Vae, Item::Vae),
        (Kind::Controlnet, Item::ControlnetAdded),
        (Kind::Full, Item::Full),
        (Kind::TrainLora, Item::TrainLora),
        (Kind::TrainControlnet, Item::TrainControlnet),
    ]
    .into_iter()
    .filter(|(k, _)| kinds.contains(k))
    .map(|(_, i)| i)
    .collect();
    let mut peer_results = PeerResults::default();
    let skipped_all = |why: &str| Peer::ALL.iter().map(|p| (*p, why.to_string())).collect::<Vec<_>>();
    match &python {
        _ if items.is_empty() => {
            peer_results.skipped = skipped_all("none of unet-b2, vae, controlnet, full, train-* selected")
        }
        _ if args.device != "cpu" => peer_results.skipped = skipped_all("the peers are CPU-only"),
        None => peer_results.skipped = skipped_all("no Python (--peers PYTHON or DIFFCTL_BENCH_PYTHON)"),
        Some(python) => {
            let default_script = match args.family {
                BenchFamily::Sd15 => concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/bench/perf_peers.py"),
                BenchFamily::Sdxl => concat!(env!("CARGO_MANIFEST_DIR"), "/benches/sd15/sdxl_peers.py"),
            };
            let opts = PeerOptions {
                python,
                script: args.peers_script.as_deref().unwrap_or(Path::new(default_script)),
                sdxl: args.family == BenchFamily::Sdxl,
                extra_script: Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/benches/sd15/torch_extra.py")),
                model: &inputs.model,
                controlnet: inputs.controlnet.as_deref(),
                cache: &cache,
                threads: args.threads,
                warmup: args.warmup,
                runs: args.runs,
                full_runs: args.full_runs,
                items: &items,
                bf16_peers: args.bf16_peers,
            };
            eprintln!("peers with {}", python.display());
            peer_results = peers::run(&opts)
                .unwrap_or_else(|e| PeerResults { skipped: skipped_all(&format!("{e:#}")), ..Default::default() });
        }
    }

    let columns: Vec<Peer> =
        Peer::ALL.into_iter().filter(|p| peer_results.timings.keys().any(|(q, _)| q == p)).collect();
    let v = |name: &str| peer_results.versions.get(name).map_or("-".to_string(), Clone::clone);
    let cpu = report::cpu_description();
    let mut text = format!(
        "{title} benchmark, {date}; CPU: {cpu}{os_cpu}; {mem}; {threads} threads for everyone; {warmup} warm-up + {runs} \
         timed runs, min / median\n\
         diffctl {ours} (candle {candle}, {rustc}), {dtype} on {device}; weights: {model}\n",
        title = args.family.title(),
        date = report::today(),
        os_cpu = match &peer_results.cpu_name {
            Some(n) if !cpu.starts_with(n.as_str()) => format!(" (OpenVINO: {n})"),
            _ => String::new(),
        },
        mem = report::memory_description().unwrap_or_default(),
        threads = args.threads,
        warmup = args.warmup,
        runs = args.runs,
        ours = env!("CARGO_PKG_VERSION"),
        candle = report::locked_version("candle-core"),
        rustc = report::rustc_version(),
        dtype = args.dtype,
        device = args.device,
        model = inputs.model.display(),
    );
    if !peer_results.versions.is_empty() {
        text.push_str(&format!(
            "peers: torch {}, diffusers {}, OpenVINO {} (default precision here: {}), ONNX Runtime {}\n",
            v("torch"),
            v("diffusers"),
            v("openvino"),
            peer_results.openvino_default_precision.as_deref().unwrap_or("?"),
            v("onnxruntime"),
        ));
    }
    text.push('\n');
    let all_rows: Vec<Row> = ours
        .iter()
        .flat_map(|(dtype, ours)| {
            let label = if dtypes.len() > 1 { format!(" — ours {dtype}") } else { String::new() };
            rows(ours, &peer_results, &shapes, &label)
        })
        .collect();
    text.push_str(&report::table(&all_rows, &columns));
    match peer_results.skipped.as_slice() {
        [] => {}
        all @ [(_, why), ..] if all.len() == Peer::ALL.len() && all.iter().all(|(_, w)| w == why) => {
            text.push_str(&format!("\npeers skipped: {why}"));
        }
        some => some.iter().for_each(|(peer, why)| text.push_str(&format!("\nskipped {}: {why}", peer.title()))),
    }
    for f in &failed {
        text.push_str(&format!("\nfailed (ours) {f}"));
    }
    println!("\n{text}");
    std::fs::create_dir_all(&cache)?;
    let saved = cache.join("last-report.md");
    std::fs::write(&saved, format!("{text}\n"))?;
    eprintln!("\n(also written to {})", saved.display());
    if !failed.is_empty() {
        bail!("{} measurement(s) failed", failed.len());
    }
    Ok(())
}
