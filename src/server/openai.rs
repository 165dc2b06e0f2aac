//! OpenAI's images API: `POST /v1/images/generations`, `POST /v1/images/edits` (multipart) and
//! `GET /v1/models`, with errors in OpenAI's shape. Prompts are literal (diffusers' reading).

use std::path::Path;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Multipart, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use axum::routing::{get, post};
use serde_json::{Value, json};

use super::a1111::{GenerationOutcome, submit_and_wait};
use super::fields::Fields;
use super::images::{decode_bytes, encode_base64, store};
use super::jobs::{GenerationSpec, InitSpec, JobSpec};
use super::{AppState, Shared, json_response, queue_full};

/// The routes.
pub fn routes() -> Router<Shared> {
    Router::new()
        .route("/v1/images/generations", post(generations))
        .route("/v1/images/edits", post(edits))
        .route("/v1/models", get(models))
}

/// An error in OpenAI's shape.
pub fn error(status: StatusCode, code: &str, message: &str) -> Response {
    let kind = match status.as_u16() {
        401 => "authentication_error",
        404 => "not_found_error",
        429 | 503 => "server_busy",
        400..=499 => "invalid_request_error",
        _ => "server_error",
    };
    json_response(status, json!({"error": {"message": message, "type": kind, "param": null, "code": code}}))
}

fn invalid(message: impl Into<String>) -> Response {
    error(StatusCode::BAD_REQUEST, "invalid_request", &message.into())
}

async fn models(State(state): State<Shared>) -> Response {
    let data: Vec<Value> = state
        .engine
        .checkpoints()
        .iter()
        .map(|c| json!({"id": c.entry.stem, "object": "model", "created": 0, "owned_by": "diffctl"}))
        .collect();
    json_response(StatusCode::OK, json!({"object": "list", "data": data}))
}

/// The settings both routes share.
struct ImageRequest {
    prompt: String,
    n: usize,
    size: Option<(usize, usize)>,
    url: bool,
    seed: Option<u64>,
    steps: Option<usize>,
    negative_prompt: String,
    strength: Option<f64>,
    model: Option<String>,
}

fn parse_size(text: &str) -> Result<Option<(usize, usize)>, String> {
    if text.eq_ignore_ascii_case("auto") {
        return Ok(None);
    }
    let (w, h) = text.split_once(['x', 'X']).ok_or_else(|| format!("`size` {text} is not WIDTHxHEIGHT"))?;
    let parse = |s: &str| s.trim().parse::<usize>().ok().filter(|v| *v > 0 && v % 8 == 0);
    match (parse(w), parse(h)) {
        (Some(w), Some(h)) => Ok(Some((w, h))),
        _ => Err(format!("`size` {text}: width and height must be positive multiples of 8")),
    }
}

fn parse_settings(f: &Fields, state: &AppState) -> Result<ImageRequest, String> {
    let prompt = f.str("prompt")?.ok_or("`prompt` is required")?.to_string();
    let n = f.usize("n", state.options.engine.runner.limits.max_batch)?.unwrap_or(1);
    if n == 0 {
        return Err("`n` must be at least 1".into());
    }
    let size = match f.str("size")? {
        Some(s) => parse_size(s)?,
        None => None,
    };
    let url = match f.str("response_format")? {
        None | Some("b64_json") => false,
        Some("url") => true,
        Some(other) => return Err(format!("`response_format` {other}: expected b64_json or url")),
    };
    for name in ["quality", "style", "user", "background", "output_format", "moderation"] {
        f.str(name)?;
    }
    let seed = f.int("seed", 0, i64::from(u32::MAX))?.map(|s| s as u64);
    let steps = f.usize("steps", state.options.max_steps)?;
    if steps == Some(0) {
        return Err("`steps` must be at least 1".into());
    }
    let negative_prompt = f.str("negative_prompt")?.unwrap_or("").to_string();
    let strength = f.ranged("strength", 0.0, 1.0)?.filter(|s| *s > 0.0);
    let model = f.str("model")?.map(str::to_string);
    Ok(ImageRequest { prompt, n, size, url, seed, steps, negative_prompt, strength, model })
}

impl ImageRequest {
    fn spec(&self, state: &AppState, init: Option<InitSpec>, size: (usize, usize)) -> Result<GenerationSpec, String> {
        state.options.engine.runner.limits.check_size(self.n, size.0, size.1).map_err(|e| e.to_string())?;
        // A model name that is one of ours switches to it; OpenAI's names (dall-e-3, ...) are ignored.
        let checkpoint = self.model.as_deref().and_then(|m| state.engine.find_checkpoint(m).ok()).map(|c| c.title());
        Ok(GenerationSpec {
            prompt: self.prompt.clone(),
            written_prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            prompt_syntax: "diffusers".into(),
            sampler_name: "Euler".into(),
            schedule: None,
            steps: self.steps.unwrap_or(20),
            cfg_scale: 7.0,
            width: size.0,
            height: size.1,
            batch_size: self.n,
            n_iter: 1,
            seed: self.seed.unwrap_or_else(|| u64::from(rand::random::<u32>())),
            clip_skip: 0,
            init,
            loras: Vec::new(),
            embeddings: Vec::new(),
            units: Vec::new(),
            checkpoint,
            restore_checkpoint: false,
            hires: None,
        })
    }
}

async fn generations(State(state): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let value: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return invalid(format!("the body is not valid JSON: {e}")),
    };
    let settings = match Fields::of(&value, "the request body").and_then(|f| parse_settings(&f, &state)) {
        Ok(s) => s,
        Err(message) => return invalid(message),
    };
    let size = settings.size.unwrap_or_else(|| (state.engine.default_size(), state.engine.default_size()));
    let spec = match settings.spec(&state, None, size) {
        Ok(spec) => spec,
        Err(message) => return invalid(message),
    };
    if !state.engine.has_room() {
        return queue_full(true);
    }
    let id = state.engine.new_id();
    if let Err(e) = state.engine.job_dir(&id) {
        return error(StatusCode::INTERNAL_SERVER_ERROR, "server_error", &format!("creating the job folder: {e}"));
    }
    respond(&state, &headers, &id, spec, settings.url).await
}

async fn edits(State(state): State<Shared>, headers: HeaderMap, mut multipart: Multipart) -> Response {
    let mut fields = serde_json::Map::new();
    let mut image: Option<Vec<u8>> = None;
    let mut mask: Option<Vec<u8>> = None;
    loop {
        let field = match multipart.next_field().await {
            Ok(Some(field)) => field,
            Ok(None) => break,
            Err(e) => return invalid(format!("the multipart body is malformed: {e}")),
        };
        let name = field.name().unwrap_or("").to_string();
        let bytes = match field.bytes().await {
            Ok(b) => b,
            Err(e) => return invalid(format!("reading the `{name}` part: {e}")),
        };
        match name.as_str() {
            "image" | "image[]" => {
                if image.is_none() {
                    image = Some(bytes.to_vec());
                }
            }
            "mask" => mask = Some(bytes.to_vec()),
            _ => {
                let text = String::from_utf8_lossy(&bytes).into_owned();
                fields.insert(name, Value::String(text));
            }
        }
    }
    let Some(image) = image else { return invalid("`image` is required") };
    let value = Value::Object(fields);
    let settings = match Fields::of(&value, "the form").and_then(|f| parse_settings(&f, &state)) {
        Ok(s) => s,
        Err(message) => return invalid(message),
    };
    if !state.engine.has_room() {
        return queue_full(true);
    }
    let id = state.engine.new_id();
    let dir = match state.engine.job_dir(&id) {
        Ok(dir) => dir,
        Err(e) => {
            return error(StatusCode::INTERNAL_SERVER_ERROR, "server_error", &format!("creating the job folder: {e}"));
        }
    };
    let prepared = {
        let (state, dir) = (state.clone(), dir.clone());
        tokio::task::spawn_blocking(move || {
            let max_pixels = state.options.engine.runner.limits.max_pixels;
            let (init, size) =
                edit_inputs(&image, mask.as_deref(), &dir, settings.size, settings.strength, max_pixels)?;
            let spec = settings.spec(&state, Some(init), size)?;
            Ok::<_, String>((spec, settings.url))
        })
        .await
    };
    let (spec, url) = match prepared {
        Ok(Ok(p)) => p,
        Ok(Err(message)) => {
            let _ = std::fs::remove_dir_all(&dir);
            return invalid(message);
        }
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, "server_error", &e.to_string()),
    };
    respond(&state, &headers, &id, spec, url).await
}

/// Stores an edit's image and mask (transparent = edit, from the mask or else the image's own
/// alpha; no transparency: img2img) and returns the init spec and output size (given, or the
/// image's rounded down to multiples of 8).
fn edit_inputs(
    image: &[u8],
    mask: Option<&[u8]>,
    dir: &Path,
    size: Option<(usize, usize)>,
    strength: Option<f64>,
    max_pixels: u64,
) -> Result<(InitSpec, (usize, usize)), String> {
    let image = decode_bytes(image, "image", max_pixels)?;
    let size = size.unwrap_or(((image.width() as usize / 8 * 8).max(8), (image.height() as usize / 8 * 8).max(8)));
    let alpha_source = match mask {
        Some(bytes) => decode_bytes(bytes, "mask", max_pixels)?,
        None => image.clone(),
    };
    let rgba = alpha_source.to_rgba8();
    let transparent = rgba.pixels().any(|p| p[3] < 128);
    let fitted = super::a1111::fit_image(&image.to_rgb8(), size.0, size.1, 0)?;
    store(&image::DynamicImage::ImageRgb8(fitted), dir, "init.png")?;
    let mut init = InitSpec::new(strength.unwrap_or(0.75));
    if transparent {
        let mask = image::GrayImage::from_fn(rgba.width(), rgba.height(), |x, y| {
            image::Luma([if rgba.get_pixel(x, y)[3] < 128 { 255 } else { 0 }])
        });
        let mask = super::a1111::fit_image(&image::DynamicImage::ImageLuma8(mask).to_rgb8(), size.0, size.1, 0)?;
        store(&image::DynamicImage::ImageRgb8(mask), dir, "mask.png")?;
        init.mask = Some("mask.png".into());
        init.strength = strength.unwrap_or(1.0);
    }
    Ok((init, size))
}

async fn respond(state: &AppState, headers: &HeaderMap, id: &str, spec: GenerationSpec, url: bool) -> Response {
    let prompt = spec.prompt.clone();
    match submit_and_wait(state, id, JobSpec::Generate(Box::new(spec))).await {
        GenerationOutcome::Done { images, finished } => {
            let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("127.0.0.1");
            let data: Vec<Value> = images
                .iter()
                .zip(&finished.images)
                .map(|(bytes, name)| {
                    if url {
                        json!({"url": format!("http://{host}/diffctl/v1/files/{id}/{name}"), "revised_prompt": prompt})
                    } else {
                        json!({"b64_json": encode_base64(bytes), "revised_prompt": prompt})
                    }
                })
                .collect();
            let created =
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
            json_response(StatusCode::OK, json!({"created": created, "data": data}))
        }
        GenerationOutcome::Full => queue_full(true),
        GenerationOutcome::Interrupted => error(StatusCode::CONFLICT, "interrupted", "the job was interrupted"),
        GenerationOutcome::Failed((status, message)) => error(status, "generation_failed", &message),
    }
}
