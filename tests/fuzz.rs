//! Fuzz targets for every parser of untrusted bytes, run by a mutational fuzzer on stable Rust.
//!
//! Each target starts from seed inputs (real fixtures of its format and the committed corpus in
//! `tests/fixtures/fuzz/<target>/`), replays every committed regression first, then mutates seeds
//! (bit flips, boundary integers, insertions, deletions, duplicated and spliced ranges, digits
//! replaced by huge numbers) for a time budget and feeds each input to the parser. A panic, an input
//! that takes longer than [`SLOW_INPUT`], or a process death fails the run; the input is kept in
//! `target/fuzz/<target>/` (the last input of a run that died is `last-input`). A random tenth of
//! the new inputs join the in-memory corpus, so mutations compound.
//!
//! `cargo test --test fuzz` runs every target for `DIFFCTL_FUZZ_SECONDS` seconds (default 6, about
//! a minute in all); `DIFFCTL_FUZZ_SECONDS=600 DIFFCTL_FUZZ_TARGET=pickle,npy cargo test --release
//! --test fuzz` runs the named targets longer. `DIFFCTL_FUZZ_SEED` fixes the mutation seed.

mod common;

use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use common::repo_path;
use diffctl::control::cross_attention::IpAdapterWeights;
use diffctl::control::weights::Lora;
use diffctl::pipeline::{LoadOptions, StableDiffusion};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

/// An input slower than this fails the run as a hang.
const SLOW_INPUT: Duration = Duration::from_secs(5);
/// Inputs are cut to this many bytes.
const MAX_INPUT: usize = 1 << 20;

/// A parser under test: reads `bytes` (from the file `path` where it takes files) and returns
/// whatever it returns; only panics, hangs and deaths count.
type Target = fn(&Fixture, &Path, &[u8]);

/// What targets share: the tiny model (for key maps) and its tokenizer.
struct Fixture {
    model: StableDiffusion,
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).unwrap();
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A weight file of any format `TensorStore` reads, every tensor loaded.
fn weight_file(_: &Fixture, path: &Path, bytes: &[u8]) {
    write(path, bytes);
    if let Ok(store) = diffctl::io::weights::TensorStore::open(path) {
        for key in store.keys() {
            let _ = store.load(key, DType::F32, &Device::Cpu);
        }
    }
}

fn pickle(_: &Fixture, _: &Path, bytes: &[u8]) {
    // As a bare data.pkl and as a whole torch.save archive, every tensor loaded.
    let _ = diffctl::io::pickle::fuzz_parse(bytes);
}

fn lora(f: &Fixture, path: &Path, bytes: &[u8]) {
    write(path, bytes);
    let _ = Lora::load(path, &f.model.layers, &Device::Cpu);
}

fn ip_adapter(f: &Fixture, path: &Path, bytes: &[u8]) {
    write(path, bytes);
    let _ = IpAdapterWeights::load(path, f.model.unet.config(), DType::F32, &Device::Cpu);
}

fn embedding(_: &Fixture, path: &Path, bytes: &[u8]) {
    write(path, bytes);
    let _ = diffctl::control::tokens::textual_inversion::Embedding::load(path, &Device::Cpu);
}

fn latents(_: &Fixture, path: &Path, bytes: &[u8]) {
    write(path, bytes);
    let _ = diffctl::io::latents::load_latents(path, &Device::Cpu);
}

fn npy(_: &Fixture, path: &Path, bytes: &[u8]) {
    write(path, bytes);
    let _ = diffctl::control::cross_attention::ip_adapter::read_embedding_file(path, &Device::Cpu);
}

fn image(_: &Fixture, path: &Path, bytes: &[u8]) {
    write(path, bytes);
    if let Ok(img) = diffctl::io::image::load_rgb(path) {
        let _ = diffctl::preprocess::apply(&diffctl::preprocess::PreprocessKind::canny(false, 100, 200).unwrap(), &img);
    }
}

fn configs(_: &Fixture, path: &Path, bytes: &[u8]) {
    write(path, bytes);
    let _ = diffctl::models::unet::UNetConfig::load(path);
    let _ = diffctl::models::vae::VaeConfig::load(path);
    let _ = diffctl::models::clip_text::ClipTextConfig::load(path);
    let _ = diffctl::models::controlnet::ControlNetConfig::load(path);
    if let Ok(config) = diffctl::schedulers::SchedulerConfig::from_json_str(&text(bytes)) {
        for kind in diffctl::schedulers::SchedulerKind::ALL {
            let _ = diffctl::schedulers::build(kind, None, &config, 4);
            let _ = diffctl::schedulers::build(kind, Some(diffctl::schedulers::SigmaSchedule::Karras), &config, 4);
        }
    }
}

fn prompt(f: &Fixture, _: &Path, bytes: &[u8]) {
    let prompt = text(bytes);
    let _ = diffctl::prompt::a1111::parse(&prompt);
    let _ = diffctl::prompt::a1111::chunks(&f.model.tokenizer, &prompt);
    let _ = f.model.tokenizer.encode_padded_words(&prompt);
    let _ = prompt.parse::<diffctl::control::cross_attention::IpScale>();
    let _ = prompt.parse::<diffctl::preprocess::PreprocessKind>();
}

fn keypoints(_: &Fixture, path: &Path, bytes: &[u8]) {
    write(path, bytes);
    if let Ok(kps) = diffctl::preprocess::keypoints::load(path) {
        let (w, h) = kps.size.unwrap_or((64, 64));
        // Canvases as large as the JSON asks are the CLI's to refuse; draw at most 256x256 here.
        let _ = diffctl::preprocess::keypoints::draw(w.min(256), h.min(256), &kps.points);
    }
}

/// Every target, its file extension and its seed files.
fn targets() -> Vec<(&'static str, &'static str, Target, Vec<&'static str>)> {
    vec![
        (
            "safetensors",
            "safetensors",
            weight_file as Target,
            vec![
                "tests/fixtures/lora/bad-hands.safetensors",
                "tests/fixtures/lora/lokr.safetensors",
                "tests/fixtures/lora/learned_embeds.safetensors",
            ],
        ),
        ("pickle", "pt", pickle, vec!["tests/fixtures/lora/tiny-style.pt", "tests/fixtures/lora/lokr.pt"]),
        ("torch_file", "pt", weight_file, vec!["tests/fixtures/lora/tiny-style.pt"]),
        (
            "lora",
            "safetensors",
            lora,
            vec!["tests/fixtures/lora/lokr.safetensors", "tests/fixtures/lora/loha.safetensors"],
        ),
        ("ip_adapter", "safetensors", ip_adapter, vec!["tests/fixtures/ip_adapter/ip-adapter_tiny.safetensors"]),
        (
            "embedding",
            "pt",
            embedding,
            vec!["tests/fixtures/lora/tiny-style.pt", "tests/fixtures/lora/bad-hands.safetensors"],
        ),
        ("latents", "safetensors", latents, vec![]),
        ("npy", "npy", npy, vec!["tests/fixtures/ip_adapter/face_embedding.npy"]),
        (
            "image",
            "png",
            image,
            vec!["tests/fixtures/images/control_a.png", "tests/fixtures/images/control_c_48x40.png"],
        ),
        (
            "configs",
            "json",
            configs,
            vec![
                "tests/fixtures/models/sd1-tiny/unet/config.json",
                "tests/fixtures/models/sd1-tiny/vae/config.json",
                "tests/fixtures/models/sd1-tiny/text_encoder/config.json",
                "tests/fixtures/models/sd1-tiny/scheduler/scheduler_config.json",
                "tests/fixtures/controlnets/cn-a/config.json",
            ],
        ),
        ("prompt", "txt", prompt, vec![]),
        ("keypoints", "json", keypoints, vec![]),
    ]
}

/// Seeds written in code where no fixture has the format alone.
fn inline_seeds(target: &str) -> Vec<Vec<u8>> {
    let strings: &[&str] = match target {
        "prompt" => &[
            "a (photo:1.3) of [a cat] BREAK ((masterpiece)), \\(escaped\\) <lora:x:0.5>",
            "{\"down\": {\"block_2\": [0.0, 1.0]}, \"up\": {\"block_0\": [0.0, 1.0, 0.0]}}",
            "canny:100:200",
            "0.5",
        ],
        "keypoints" => {
            &["{\"width\": 64, \"height\": 48, \"kps\": [[10, 12], [30, 12], [20, 22], [12, 34], [28, 34]]}"]
        }
        _ => &[],
    };
    let mut seeds: Vec<Vec<u8>> = strings.iter().map(|s| s.as_bytes().to_vec()).collect();
    if target == "latents" {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.safetensors");
        let t = candle_core::Tensor::ones((1, 4, 2, 3), DType::F32, &Device::Cpu).unwrap();
        candle_core::safetensors::save(&std::collections::HashMap::from([("latents", t)]), &path).unwrap();
        seeds.push(std::fs::read(&path).unwrap());
    }
    seeds
}

/// Interesting integers written over 1, 2, 4 or 8 bytes.
const BOUNDARIES: [u64; 10] = [0, 1, 0x7f, 0x80, 0xff, 0x7fff_ffff, 0xffff_ffff, 1 << 62, (1 << 60) + 1, u64::MAX];
/// Numbers written over ASCII digits.
const HUGE_NUMBERS: [&str; 7] = ["0", "-1", "1e308", "NaN", "18446744073709551616", "4611686018427387904", "99999999"];

fn mutate(rng: &mut StdRng, input: &mut Vec<u8>, corpus: &[Vec<u8>]) {
    let len = input.len();
    match rng.random_range(0..8u8) {
        0 if len > 0 => {
            let i = rng.random_range(0..len);
            input[i] ^= 1 << rng.random_range(0..8u32);
        }
        1 if len > 0 => {
            let width = [1usize, 2, 4, 8][rng.random_range(0..4usize)].min(len);
            let at = rng.random_range(0..=len - width);
            let value = BOUNDARIES[rng.random_range(0..BOUNDARIES.len())].to_le_bytes();
            input[at..at + width].copy_from_slice(&value[..width]);
        }
        2 => {
            let at = rng.random_range(0..=len);
            let count = rng.random_range(1..=16usize);
            let bytes: Vec<u8> = (0..count).map(|_| rng.random()).collect();
            input.splice(at..at, bytes);
        }
        3 if len > 1 => {
            let at = rng.random_range(0..len);
            let end = (at + rng.random_range(1..=64usize)).min(len);
            input.drain(at..end);
        }
        4 if len > 1 => {
            let at = rng.random_range(0..len);
            let end = (at + rng.random_range(1..=256usize)).min(len);
            let copy = input[at..end].to_vec();
            let to = rng.random_range(0..=input.len());
            input.splice(to..to, copy);
        }
        5 if !corpus.is_empty() => {
            let other = &corpus[rng.random_range(0..corpus.len())];
            if !other.is_empty() {
                let from = rng.random_range(0..other.len());
                let end = (from + rng.random_range(1..=512usize)).min(other.len());
                let at = rng.random_range(0..=len);
                input.splice(at..at, other[from..end].iter().copied());
            }
        }
        6 => {
            // A run of ASCII digits replaced by a huge or strange number.
            let digits: Vec<usize> = (0..len).filter(|&i| input[i].is_ascii_digit()).collect();
            if let Some(&start) =
                digits.get(rng.random_range(0..digits.len().max(1)).min(digits.len().saturating_sub(1)))
            {
                let end = (start..len).find(|&i| !input[i].is_ascii_digit()).unwrap_or(len);
                let number = HUGE_NUMBERS[rng.random_range(0..HUGE_NUMBERS.len())];
                input.splice(start..end, number.bytes());
            }
        }
        _ if len > 0 => input.truncate(rng.random_range(0..len)),
        _ => input.push(rng.random()),
    }
    input.truncate(MAX_INPUT);
}

fn hash(bytes: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

/// Runs `target` on `input`, failing on a panic or a hang, the input kept in `crashes`.
fn run_one(name: &str, target: Target, fixture: &Fixture, path: &Path, input: &[u8], crashes: &Path) {
    std::fs::write(crashes.join("last-input"), input).unwrap();
    let start = Instant::now();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| target(fixture, path, input)));
    let elapsed = start.elapsed();
    if outcome.is_err() || elapsed > SLOW_INPUT {
        let kept = crashes.join(format!("{:016x}", hash(input)));
        std::fs::write(&kept, input).unwrap();
        let what = match &outcome {
            Err(payload) => {
                let message = payload
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| payload.downcast_ref::<&str>().copied())
                    .unwrap_or("a non-string payload");
                format!("panicked ({message})")
            }
            Ok(()) => "hung".to_string(),
        };
        panic!("fuzz target {name} {what} after {elapsed:?} on the input kept in {}", kept.display());
    }
}

#[test]
fn parsers_survive_mutated_inputs() {
    let seconds: u64 = std::env::var("DIFFCTL_FUZZ_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(6);
    let only: Option<Vec<String>> =
        std::env::var("DIFFCTL_FUZZ_TARGET").ok().map(|list| list.split(',').map(str::to_string).collect());
    let seed: u64 = std::env::var("DIFFCTL_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    eprintln!("fuzz seed {seed} (DIFFCTL_FUZZ_SEED), {seconds} s per target");
    let fixture = Fixture {
        model: StableDiffusion::load(&repo_path("tests/fixtures/models/sd1-tiny"), &LoadOptions::default()).unwrap(),
    };
    let previous_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let mut report = Vec::new();
    for (name, ext, target, seed_files) in targets() {
        if only.as_ref().is_some_and(|list| !list.iter().any(|o| o == name)) {
            continue;
        }
        let work = tempfile::tempdir().unwrap();
        let path = work.path().join(format!("input.{ext}"));
        let crashes = repo_path(&format!("target/fuzz/{name}"));
        std::fs::create_dir_all(&crashes).unwrap();
        let committed = repo_path(&format!("tests/fixtures/fuzz/{name}"));
        let mut corpus: Vec<Vec<u8>> = seed_files.iter().map(|f| std::fs::read(repo_path(f)).unwrap()).collect();
        corpus.extend(inline_seeds(name));
        let mut committed_files: Vec<PathBuf> = std::fs::read_dir(&committed)
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.is_file()).collect())
            .unwrap_or_default();
        committed_files.sort();
        // Regressions and committed seeds first, unmutated.
        for file in &committed_files {
            let bytes = std::fs::read(file).unwrap();
            run_one(name, target, &fixture, &path, &bytes, &crashes);
            corpus.push(bytes);
        }
        assert!(!corpus.is_empty(), "fuzz target {name} has no seed");
        let mut seen: HashSet<u64> = corpus.iter().map(|c| hash(c)).collect();
        let mut rng = StdRng::seed_from_u64(seed ^ hash(name.as_bytes()));
        let deadline = Instant::now() + Duration::from_secs(seconds);
        let mut runs = 0u64;
        while Instant::now() < deadline {
            let mut input = corpus[rng.random_range(0..corpus.len())].clone();
            for _ in 0..rng.random_range(1..=4u32) {
                mutate(&mut rng, &mut input, &corpus);
            }
            run_one(name, target, &fixture, &path, &input, &crashes);
            runs += 1;
            // Keep some variety: a random tenth of new inputs join the corpus (bounded).
            if corpus.len() < 256 && seen.insert(hash(&input)) && rng.random_range(0..10u8) == 0 {
                corpus.push(input);
            }
        }
        let _ = std::fs::remove_file(crashes.join("last-input"));
        report.push(format!("{name:12} {runs:8} inputs"));
    }
    std::panic::set_hook(previous_hook);
    eprintln!("{}", report.join("\n"));
}
