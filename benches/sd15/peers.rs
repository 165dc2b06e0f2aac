//! The CPU peers (PyTorch eager and autocast bf16, OpenVINO f32 and its default precision, ONNX
//! Runtime f32) timed by `../shared/bench/perf_peers.py` on the same weight folder, same thread
//! count, and PyTorch f32's added time of a ControlNet, whole generation and training steps by
//! `torch_extra.py` beside this file; their converted models are cached, their `RESULT` lines parsed.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use super::measure::{FULL_STEPS, PROMPT};

/// One peer column of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Peer {
    /// PyTorch eager, f32.
    TorchF32,
    /// PyTorch eager under `torch.autocast("cpu", bfloat16)`.
    TorchBf16,
    /// OpenVINO with `INFERENCE_PRECISION_HINT` f32.
    OpenVinoF32,
    /// OpenVINO at the plugin's default precision (bf16 where the CPU has it, else f32).
    OpenVinoDefault,
    /// ONNX Runtime CPU execution provider, f32.
    OnnxRuntime,
}

impl Peer {
    /// Every peer, in table order.
    pub const ALL: [Peer; 5] =
        [Peer::OpenVinoF32, Peer::OpenVinoDefault, Peer::TorchF32, Peer::TorchBf16, Peer::OnnxRuntime];

    /// The column title.
    pub fn title(self) -> &'static str {
        match self {
            Peer::TorchF32 => "PyTorch f32",
            Peer::TorchBf16 => "PyTorch bf16",
            Peer::OpenVinoF32 => "OpenVINO f32",
            Peer::OpenVinoDefault => "OpenVINO default",
            Peer::OnnxRuntime => "ONNX Runtime f32",
        }
    }

    /// The Python modules the peer needs.
    fn modules(self) -> &'static [&'static str] {
        match self {
            Peer::TorchF32 | Peer::TorchBf16 => &["torch", "diffusers"],
            Peer::OpenVinoF32 | Peer::OpenVinoDefault => &["torch", "diffusers", "openvino"],
            Peer::OnnxRuntime => &["torch", "diffusers", "onnx", "onnxruntime"],
        }
    }

    /// The items the peer times.
    fn items(self) -> &'static [Item] {
        match self {
            Peer::TorchF32 => {
                &[Item::UnetB2, Item::Vae, Item::ControlnetAdded, Item::Full, Item::TrainLora, Item::TrainControlnet]
            }
            Peer::TorchBf16 | Peer::OpenVinoF32 | Peer::OpenVinoDefault => &[Item::UnetB2, Item::Vae],
            Peer::OnnxRuntime => &[Item::UnetB2],
        }
    }
}

/// What a peer measured: the UNet step (batch 2), the VAE decode, and (PyTorch f32 only) the
/// ControlNet's added time, the whole generation and the training steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Item {
    /// One UNet step at batch 2.
    UnetB2,
    /// VAE decode at the native size.
    Vae,
    /// A batch-2 UNet step with one ControlNet minus the plain step run right before it.
    ControlnetAdded,
    /// A whole generation at the native size, `FULL_STEPS` steps with guidance, load excluded.
    Full,
    /// A LoRA training step (PEFT rank 16, batch 1, native size).
    TrainLora,
    /// A ControlNet training step (batch 1, native size).
    TrainControlnet,
}

impl Item {
    /// The name in logs.
    fn name(self) -> &'static str {
        match self {
            Item::UnetB2 => "unet",
            Item::Vae => "vae",
            Item::ControlnetAdded => "controlnet",
            Item::Full => "generate",
            Item::TrainLora => "train-lora",
            Item::TrainControlnet => "train-controlnet",
        }
    }
}

/// One peer timing (a `RESULT` line).
#[derive(Debug, Clone, PartialEq)]
pub struct Timing {
    /// Fastest run, seconds.
    pub min: f64,
    /// Median run, seconds.
    pub median: f64,
    /// The peer process's peak RSS when the line was printed, GB.
    pub peak_rss_gb: f64,
}

/// Everything the peers produced in one invocation.
#[derive(Debug, Default)]
pub struct PeerResults {
    /// Timings by peer and item.
    pub timings: BTreeMap<(Peer, Item), Timing>,
    /// Peers not run or failed, with why.
    pub skipped: Vec<(Peer, String)>,
    /// Versions of the Python packages (name → version).
    pub versions: BTreeMap<String, String>,
    /// The precision OpenVINO's default chose on this CPU.
    pub openvino_default_precision: Option<String>,
    /// The CPU as OpenVINO names it.
    pub cpu_name: Option<String>,
}

/// How the peers are run.
pub struct PeerOptions<'a> {
    /// The Python with the peers installed.
    pub python: &'a Path,
    /// `perf_peers.py`, or for SDXL `sdxl_peers.py` beside this file (the same subcommands).
    pub script: &'a Path,
    /// SDXL-size weights: only PyTorch and OpenVINO time the step and the decode (ONNX Runtime's
    /// export and PyTorch's whole generation are left out there).
    pub sdxl: bool,
    /// `torch_extra.py` (PyTorch f32's [`Item::ControlnetAdded`], [`Item::Full`] and training steps).
    pub extra_script: &'a Path,
    /// The weight folder (diffusers layout).
    pub model: &'a Path,
    /// The ControlNet folder (diffusers layout), for [`Item::ControlnetAdded`].
    pub controlnet: Option<&'a Path>,
    /// Where converted models and logs go.
    pub cache: &'a Path,
    /// Threads for every peer.
    pub threads: usize,
    /// Untimed runs.
    pub warmup: usize,
    /// Timed runs.
    pub runs: usize,
    /// Timed whole generations (no warm-up).
    pub full_runs: usize,
    /// Which items to time.
    pub items: &'a [Item],
    /// Run PyTorch bf16 even on a CPU without native bf16.
    pub bf16_peers: bool,
}

/// Parses `RESULT name: min 1.23 s, median 1.30 s, runs …, peak rss 4.80 GB`.
pub fn parse_result(line: &str) -> Option<(String, Timing)> {
    let rest = line.strip_prefix("RESULT ")?;
    let (name, fields) = rest.split_once(": ")?;
    let number_after = |key: &str| -> Option<f64> {
        let at = fields.find(key)? + key.len();
        fields[at..].split_whitespace().next()?.trim_end_matches(',').parse().ok()
    };
    Some((
        name.to_string(),
        Timing {
            min: number_after("min ")?,
            median: number_after("median ")?,
            peak_rss_gb: number_after("peak rss ").unwrap_or(f64::NAN),
        },
    ))
}

/// Runs the Python `script` with `args`, streaming its output to stderr (prefixed) and to `log`
/// (appended); returns stdout's lines.
fn run_python(opts: &PeerOptions, label: &str, script: &Path, args: &[String], log: &Path) -> Result<Vec<String>> {
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
    writeln!(file, "$ {} {} {}", opts.python.display(), script.display(), args.join(" "))?;
    let threads = opts.threads.to_string();
    let mut child = Command::new(opts.python)
        .arg(script)
        .args(args)
        .env("OMP_NUM_THREADS", &threads)
        .env("MKL_NUM_THREADS", &threads)
        .env("PYTHONUNBUFFERED", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::from(file.try_clone()?))
        .spawn()
        .with_context(|| format!("starting {}", opts.python.display()))?;
    let mut lines = Vec::new();
    for line in BufReader::new(child.stdout.take().context("no stdout")?).lines() {
        let line = line?;
        eprintln!("  [{label}] {line}");
        writeln!(file, "{line}")?;
        lines.push(line);
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("{label} failed ({status}); see {}", log.display());
    }
    Ok(lines)
}

/// A cache folder for `model`'s converted copies, keyed by its path and UNet weights' size and time.
fn conversion_dir(opts: &PeerOptions) -> Result<PathBuf> {
    let model = opts.model.canonicalize()?;
    let unet = std::fs::read_dir(model.join("unet"))?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".safetensors"))
        .filter_map(|e| e.metadata().ok())
        .map(|m| format!("{}:{:?}", m.len(), m.modified().ok()))
        .collect::<Vec<_>>()
        .join(",");
    let key = super::model::fnv1a(format!("{}|{unet}", model.display()).as_bytes());
    Ok(opts.cache.join(format!("peers-{key:016x}")))
}

/// Converts once with `args` into `out`, which must then hold `made` (removed again on failure;
/// `out/.complete` marks success).
fn convert_once(opts: &PeerOptions, label: &str, out: &Path, made: &str, args: &[String], log: &Path) -> Result<()> {
    if out.join(".complete").is_file() && out.join(made).is_file() {
        eprintln!("  [{label}] cached in {}", out.display());
        return Ok(());
    }
    let _ = std::fs::remove_dir_all(out);
    std::fs::create_dir_all(out)?;
    match run_python(opts, label, opts.script, args, log) {
        Ok(_) if out.join(made).is_file() => Ok(std::fs::write(out.join(".complete"), "")?),
        Ok(_) => {
            let _ = std::fs::remove_dir_all(out);
            bail!("{label} wrote no {made}; see {}", log.display())
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(out);
            Err(e)
        }
    }
}

/// Which of `modules` the Python lacks, and the versions of those it has.
fn probe(python: &Path) -> Result<BTreeMap<String, Option<String>>> {
    let code = "import importlib, json\nout = {}\nfor m in ['torch', 'diffusers', 'transformers', 'openvino', \
                'onnx', 'onnxruntime']:\n    try:\n        mod = importlib.import_module(m)\n        v = getattr(mod, \
                '__version__', None)\n        if v is None and m == 'openvino':\n            v = mod.get_version()\n        \
                out[m] = str(v)\n    except Exception:\n        out[m] = None\nprint(json.dumps(out))";
    let output =
        Command::new(python).args(["-c", code]).output().with_context(|| format!("running {}", python.display()))?;
    if !output.status.success() {
        bail!("{} -c … failed: {}", python.display(), String::from_utf8_lossy(&output.stderr).trim());
    }
    let text = String::from_utf8_lossy(&output.stdout);
    Ok(serde_json::from_str(text.lines().last().unwrap_or("{}"))?)
}

/// "bf16", "f16" or "f32" for however OpenVINO prints an element type (`<Type: 'bfloat16'>`, `bf16`).
fn precision_name(printed: &str) -> &str {
    let p = printed.to_lowercase();
    if p.contains("bf16") || p.contains("bfloat16") {
        "bf16"
    } else if p.contains("f16") || p.contains("float16") {
        "f16"
    } else if p.contains("f32") || p.contains("float32") {
        "f32"
    } else {
        printed.trim()
    }
}

/// Runs every peer on `opts.model`; a peer that cannot run or fails is listed in `skipped`.
pub fn run(opts: &PeerOptions) -> Result<PeerResults> {
    let mut results = PeerResults::default();
    if !opts.script.is_file() {
        bail!("{} not found (pass --peers-script)", opts.script.display());
    }
    let modules = probe(opts.python)?;
    for (name, version) in &modules {
        if let Some(v) = version {
            results.versions.insert(name.clone(), v.clone());
        }
    }
    let dir = conversion_dir(opts)?;
    std::fs::create_dir_all(&dir)?;
    let log = dir.join("peers.log");
    eprintln!("peers: converted models and the log in {}", dir.display());
    let model = opts.model.display().to_string();
    let common = |extra: &[&str]| -> Vec<String> {
        let mut args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        for (flag, v) in
            [("--runs", opts.runs), ("--vae-runs", opts.runs), ("--warmup", opts.warmup), ("--threads", opts.threads)]
        {
            args.extend([flag.to_string(), v.to_string()]);
        }
        args
    };
    let vae = opts.items.contains(&Item::Vae);
    let unet = opts.items.contains(&Item::UnetB2);
    let ov_dir = dir.join("openvino");
    let onnx_dir = dir.join("onnx");
    let ov = ov_dir.display().to_string();
    let onnx = onnx_dir.display().to_string();
    for peer in Peer::ALL {
        if !peer.items().iter().any(|i| opts.items.contains(i)) {
            results.skipped.push((peer, "times none of the selected measurements".into()));
            continue;
        }
        if let Some(m) = peer.modules().iter().find(|m| modules.get(**m).is_none_or(Option::is_none)) {
            results.skipped.push((peer, format!("python module `{m}` missing")));
            continue;
        }
        if peer == Peer::OnnxRuntime && opts.sdxl {
            results.skipped.push((peer, "not run at SDXL size (sdxl_peers.py times PyTorch and OpenVINO)".into()));
            continue;
        }
        if peer == Peer::OpenVinoDefault && opts.sdxl && !super::report::has_native_bf16() {
            results.skipped.push((
                peer,
                "the same as OpenVINO f32 on a CPU without native bf16 (not run twice at SDXL size)".into(),
            ));
            continue;
        }
        if peer == Peer::TorchBf16 && !opts.bf16_peers && !super::report::has_native_bf16() {
            results.skipped.push((
                peer,
                "this CPU has no native bf16 (avx512_bf16 / amx_bf16), where autocast bf16 is emulated and about \
                 100x slower (a UNet step took 1008 s on a 2-core Zen 3); --bf16-peers runs it anyway"
                    .into(),
            ));
            continue;
        }
        let mut jobs: Vec<(Item, &Path, Vec<String>)> = Vec::new();
        match peer {
            Peer::TorchF32 | Peer::TorchBf16 => {
                let mode = if peer == Peer::TorchF32 { "eager" } else { "bf16" };
                let mut args = common(&["torch", &model, "--mode", mode]);
                if vae {
                    args.push("--vae".into());
                }
                if unet || vae {
                    // One process times the UNet, then (with --vae) the VAE.
                    jobs.push((Item::UnetB2, opts.script, args));
                }
                // torch_extra.py's warmed-up measurements: `extra`, then runs, warm-up and threads.
                let warmed = |extra: &[&str]| -> Vec<String> {
                    let mut args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
                    for (flag, v) in [("--runs", opts.runs), ("--warmup", opts.warmup), ("--threads", opts.threads)] {
                        args.extend([flag.to_string(), v.to_string()]);
                    }
                    args
                };
                if peer == Peer::TorchF32 && opts.items.contains(&Item::ControlnetAdded) {
                    let controlnet = opts.controlnet.context("timing a ControlNet needs its folder")?;
                    let args = warmed(&["controlnet", &model, &controlnet.display().to_string()]);
                    jobs.push((Item::ControlnetAdded, opts.extra_script, args));
                }
                for (item, kind) in [(Item::TrainLora, "lora"), (Item::TrainControlnet, "controlnet")] {
                    if peer == Peer::TorchF32 && opts.items.contains(&item) {
                        let rank = super::train::LORA_RANK.to_string();
                        let args = warmed(&["train", &model, "--kind", kind, "--rank", &rank]);
                        jobs.push((item, opts.extra_script, args));
                    }
                }
                if peer == Peer::TorchF32 && opts.items.contains(&Item::Full) && !opts.sdxl {
                    let args = [
                        "generate",
                        &model,
                        "--runs",
                        &opts.full_runs.to_string(),
                        "--threads",
                        &opts.threads.to_string(),
                        "--steps",
                        &FULL_STEPS.to_string(),
                        "--prompt",
                        PROMPT,
                    ];
                    jobs.push((Item::Full, opts.extra_script, args.map(String::from).to_vec()));
                }
            }
            Peer::OpenVinoF32 | Peer::OpenVinoDefault => {
                let convert = common(&["ov-convert", &model, &ov]);
                if let Err(e) = convert_once(opts, "openvino convert", &ov_dir, "unet.xml", &convert, &log) {
                    results.skipped.push((peer, format!("{e:#}")));
                    continue;
                }
                let precision = if peer == Peer::OpenVinoF32 { "f32" } else { "default" };
                for (item, what, wanted) in [(Item::UnetB2, "unet", unet), (Item::Vae, "vae", vae)] {
                    if wanted {
                        let args = common(&["ov-time", &ov, "--precision", precision, "--what", what]);
                        jobs.push((item, opts.script, args));
                    }
                }
            }
            Peer::OnnxRuntime => {
                let export = common(&["onnx-export", &model, &onnx]);
                if let Err(e) = convert_once(opts, "onnx export", &onnx_dir, "unet.onnx", &export, &log) {
                    results.skipped.push((peer, format!("{e:#}")));
                    continue;
                }
                jobs.push((Item::UnetB2, opts.script, common(&["ort-time", &onnx])));
            }
        }
        for (item, script, args) in jobs {
            let label = format!("{} {}", peer.title(), item.name());
            let lines = match run_python(opts, &label, script, &args, &log) {
                Ok(lines) => lines,
                Err(e) => {
                    results.skipped.push((peer, format!("{e:#}")));
                    continue;
                }
            };
            for line in &lines {
                if let Some((name, timing)) = parse_result(line) {
                    // The torch job times the VAE after the UNet; the ControlNet job's plain step and
                    // step with the ControlNet come before the difference this item is.
                    let item = match item {
                        Item::UnetB2 if name.contains("vae") || name.contains("decode") => Some(Item::Vae),
                        Item::ControlnetAdded if name != "controlnet added" => None,
                        item => Some(item),
                    };
                    if let Some(item) = item {
                        results.timings.insert((peer, item), timing);
                    }
                }
                if let Some(p) = line.trim().strip_prefix("INFERENCE_PRECISION_HINT = ")
                    && peer == Peer::OpenVinoDefault
                {
                    results.openvino_default_precision = Some(precision_name(p).to_string());
                }
                if let Some(rest) = line.trim().strip_prefix("CPU: ") {
                    let name = rest.split(" caps:").next().unwrap_or(rest).trim();
                    results.cpu_name = Some(name.to_string());
                }
            }
        }
    }
    Ok(results)
}
