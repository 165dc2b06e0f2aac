//! Shared set-up of the server tests: a models folder of the tiny fixtures, an in-process server,
//! an authenticated HTTP client and the CLI to compare with.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use diffctl::limits::Limits;
use diffctl::pipeline::LoadOptions;
use diffctl::server::models_dir::ModelsDir;
use diffctl::server::{EngineSettings, RunningServer, ServeOptions};
use serde_json::Value;

pub const USER: &str = "user";
pub const PASS: &str = "pass";

pub fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn link(target: &str, at: &Path) {
    std::fs::create_dir_all(at.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink(repo(target), at).unwrap();
}

/// An A1111 models folder of the fixtures.
pub fn models_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    link("tests/fixtures/models/sd1-tiny", &d.join("Stable-diffusion/sd1-tiny"));
    link("tests/fixtures/checkpoints/sd1-tiny.safetensors", &d.join("Stable-diffusion/sd1-tiny-file.safetensors"));
    link("tests/fixtures/lora/kohya.safetensors", &d.join("Lora/kohya.safetensors"));
    link("tests/fixtures/lora/tiny-style.pt", &d.join("embeddings/tiny-style.pt"));
    link("tests/fixtures/lora/learned_embeds.safetensors", &d.join("embeddings/learned_embeds.safetensors"));
    link("tests/fixtures/controlnets/cn-a", &d.join("ControlNet/cn-a"));
    link("tests/fixtures/t2i-adapters/light", &d.join("ControlNet/t2i-light"));
    link("tests/fixtures/ip_adapter/ip-adapter_tiny.safetensors", &d.join("ControlNet/ip-adapter_tiny.safetensors"));
    link("tests/fixtures/ip_adapter/image_encoder", &d.join("clip_vision/image_encoder"));
    dir
}

/// A running server with its folders.
pub struct TestServer {
    pub server: Option<RunningServer>,
    pub base: String,
    pub models: tempfile::TempDir,
    pub state: PathBuf,
    _state_dir: Option<tempfile::TempDir>,
    pub client: reqwest::blocking::Client,
}

/// Options for the tiny model with the fixtures' models folder.
pub fn options(models: &Path, state: &Path) -> ServeOptions {
    ServeOptions {
        engine: EngineSettings {
            runner: diffctl::server::runner::RunnerSettings {
                model: models.join("Stable-diffusion/sd1-tiny"),
                models_dir: ModelsDir::new(Some(models.to_path_buf())),
                load: LoadOptions {
                    files: diffctl::io::model_files::SourceOptions {
                        model_config: Some(repo("tests/fixtures/models/sd1-tiny")),
                        ..Default::default()
                    },
                    ..Default::default()
                },
                limits: Limits { max_pixels: 512 * 512, max_batch: 4, max_memory: None },
            },
            state_dir: state.to_path_buf(),
            max_queue: 64,
            queue: None,
        },
        address: SocketAddr::from(([127, 0, 0, 1], 0)),
        api_auth: Some((USER.into(), PASS.into())),
        max_body: 8 << 20,
        max_steps: 400,
    }
}

pub fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder().timeout(Duration::from_secs(300)).build().unwrap()
}

impl TestServer {
    pub fn start(edit: impl FnOnce(&mut ServeOptions)) -> Self {
        let models = models_dir();
        let state_dir = tempfile::tempdir().unwrap();
        let mut opts = options(models.path(), state_dir.path());
        edit(&mut opts);
        let server = diffctl::server::start(opts, false).unwrap();
        let base = format!("http://{}", server.address);
        Self {
            server: Some(server),
            base,
            models,
            state: state_dir.path().to_path_buf(),
            _state_dir: Some(state_dir),
            client: client(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn get(&self, path: &str) -> (u16, Value) {
        let r = self.client.get(self.url(path)).basic_auth(USER, Some(PASS)).send().unwrap();
        let status = r.status().as_u16();
        (status, r.json().unwrap_or(Value::Null))
    }

    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let r = self.client.post(self.url(path)).basic_auth(USER, Some(PASS)).json(body).send().unwrap();
        let status = r.status().as_u16();
        (status, r.json().unwrap_or(Value::Null))
    }
}

pub fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

pub fn png_bytes(image: &image::RgbImage) -> Vec<u8> {
    let mut out = Vec::new();
    image::DynamicImage::ImageRgb8(image.clone())
        .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    out
}

/// The image of a base64 PNG.
pub fn decode(b64_png: &str) -> image::RgbImage {
    let bytes = base64::engine::general_purpose::STANDARD.decode(b64_png).unwrap();
    image::load_from_memory(&bytes).unwrap().to_rgb8()
}

/// A fixture image resized to `size`² and written to `dir/name`.
pub fn fixture_image(name: &str, size: u32, dir: &Path) -> (PathBuf, image::RgbImage) {
    let image = image::open(repo(&format!("tests/fixtures/images/{name}"))).unwrap().to_rgb8();
    let image = image::imageops::resize(&image, size, size, image::imageops::FilterType::Triangle);
    let path = dir.join(format!("{size}-{name}"));
    image.save(&path).unwrap();
    (path, image)
}

/// Runs `diffctl generate` with `args` and returns its image.
pub fn cli_image(args: &[&str]) -> image::RgbImage {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.png");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_diffctl"))
        .arg("generate")
        .args(args)
        .arg("--output")
        .arg(&out)
        .output()
        .unwrap();
    assert!(output.status.success(), "diffctl generate failed: {}", String::from_utf8_lossy(&output.stderr));
    image::open(&out).unwrap().to_rgb8()
}

/// `repo(rel)` as a string that lives for the test (for argument lists).
pub fn repo_str(rel: &str) -> &'static str {
    Box::leak(repo(rel).display().to_string().into_boxed_str())
}

/// A free loopback port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Waits until something listens on loopback `port`, at most `seconds`; `what` names it.
pub fn wait_for_port(port: u16, seconds: u64, what: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(seconds);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(std::time::Instant::now() < deadline, "{what} did not start listening");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A child process killed (SIGKILL) and reaped when dropped.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
