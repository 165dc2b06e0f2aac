//! `txt2img` and `img2img`: an A1111 request becomes a stored [`GenerationSpec`] (its images in
//! the job's folder); the answer carries the images, the request echoed with defaults filled and
//! the `info` JSON that clients such as LibreChat read.

use std::path::Path;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use serde_json::{Map, Value, json};

use super::{error, parse_body};
use crate::pipeline::hires::Upscaler;
use crate::preprocess::resize::{ResizeMode, fit};
use crate::schedulers::{SamplerChoice, SigmaSchedule};
use crate::server::fields::Fields;
use crate::server::images::encode_base64;
use crate::server::images::{decode_base64, store};
use crate::server::jobs::{Finished, GenerationSpec, HiresSpec, InitSpec, JobSpec, JobState};
use crate::server::models_dir::Kind;
use crate::server::worker::{Engine, SubmitError};
use crate::server::{AppState, Shared, json_response, queue_full};

/// A client-facing failure: status and message.
pub type Refusal = (StatusCode, String);

fn bad(message: String) -> Refusal {
    (StatusCode::BAD_REQUEST, message)
}

/// How a submitted generation ended.
pub enum GenerationOutcome {
    /// Its images (PNG bytes) and record.
    Done { images: Vec<Vec<u8>>, finished: Finished },
    /// The queue was full.
    Full,
    /// It was interrupted.
    Interrupted,
    /// It failed (status and message) or was cancelled.
    Failed(Refusal),
}

/// Cancels its job when dropped armed: a synchronous client that disconnects cancels its job.
struct CancelOnDrop {
    engine: Arc<Engine>,
    id: String,
    armed: bool,
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if self.armed {
            self.engine.cancel(&self.id);
        }
    }
}

/// Stores and queues job `id` and waits for it; the job is cancelled if the caller goes away.
pub async fn submit_and_wait(state: &AppState, id: &str, spec: JobSpec) -> GenerationOutcome {
    let engine = state.engine.clone();
    let submitted = {
        let engine = engine.clone();
        let id = id.to_string();
        tokio::task::spawn_blocking(move || engine.submit(&id, &spec)).await
    };
    match submitted {
        Ok(Ok(())) => {}
        Ok(Err(SubmitError::Full)) => return GenerationOutcome::Full,
        Ok(Err(SubmitError::Store(e))) => {
            return GenerationOutcome::Failed((StatusCode::INTERNAL_SERVER_ERROR, e.to_string()));
        }
        Err(e) => return GenerationOutcome::Failed((StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
    }
    let mut guard = CancelOnDrop { engine: engine.clone(), id: id.to_string(), armed: true };
    let job = engine.wait(id).await;
    guard.armed = false;
    let job = match job {
        Ok(job) => job,
        Err(e) => return GenerationOutcome::Failed((StatusCode::SERVICE_UNAVAILABLE, e.to_string())),
    };
    let finished = job.finished.unwrap_or_default();
    match job.state {
        JobState::Done => {
            let dir = crate::server::jobs::job_dir(&state.options.engine.state_dir, id);
            let mut images = Vec::new();
            for name in &finished.images {
                match tokio::fs::read(dir.join(name)).await {
                    Ok(bytes) => images.push(bytes),
                    Err(e) => {
                        return GenerationOutcome::Failed((
                            StatusCode::INTERNAL_SERVER_ERROR,
                            format!("reading {name}: {e}"),
                        ));
                    }
                }
            }
            GenerationOutcome::Done { images, finished }
        }
        JobState::Cancelled => GenerationOutcome::Interrupted,
        _ => {
            let status =
                if finished.client_error { StatusCode::BAD_REQUEST } else { StatusCode::INTERNAL_SERVER_ERROR };
            GenerationOutcome::Failed((status, finished.error.unwrap_or_else(|| "the job failed".into())))
        }
    }
}

pub(super) async fn txt2img(State(state): State<Shared>, body: Bytes) -> Response {
    generate(state, body, false).await
}

pub(super) async fn img2img(State(state): State<Shared>, body: Bytes) -> Response {
    generate(state, body, true).await
}

async fn generate(state: Shared, body: Bytes, img2img: bool) -> Response {
    let value = match parse_body(&body) {
        Ok(v) => v,
        Err(response) => return response,
    };
    if !state.engine.has_room() {
        return queue_full(false);
    }
    let id = state.engine.new_id();
    let dir = match state.engine.job_dir(&id) {
        Ok(dir) => dir,
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, &format!("creating the job folder: {e}")),
    };
    let parsed = {
        let (state, dir) = (state.clone(), dir.clone());
        tokio::task::spawn_blocking(move || parse_request(&state, &value, &dir, img2img)).await
    };
    let (spec, parameters) = match parsed {
        Ok(Ok(parsed)) => parsed,
        Ok(Err((status, message))) => {
            let _ = std::fs::remove_dir_all(&dir);
            return error(status, &message);
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&dir);
            return error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string());
        }
    };
    match submit_and_wait(&state, &id, JobSpec::Generate(Box::new(spec.clone()))).await {
        GenerationOutcome::Done { images, finished } => {
            let info = info_json(&spec, &finished, &state.engine.current().entry.stem);
            let images: Vec<String> = images.iter().map(|b| encode_base64(b)).collect();
            json_response(StatusCode::OK, json!({"images": images, "parameters": parameters, "info": info.to_string()}))
        }
        GenerationOutcome::Full => queue_full(false),
        // A1111 answers an interrupted generation with what it finished: here, no image.
        GenerationOutcome::Interrupted => {
            let mut info = info_json(&spec, &Finished::default(), &state.engine.current().entry.stem);
            info["interrupted"] = json!(true);
            json_response(StatusCode::OK, json!({"images": [], "parameters": parameters, "info": info.to_string()}))
        }
        GenerationOutcome::Failed((status, message)) => error(status, &message),
    }
}

/// A1111's `info` object.
fn info_json(spec: &GenerationSpec, finished: &Finished, model: &str) -> Value {
    let seed = finished.seeds.first().copied().unwrap_or(spec.seed);
    let count = finished.seeds.len();
    json!({
        "prompt": spec.written_prompt,
        "all_prompts": vec![&spec.written_prompt; count],
        "negative_prompt": spec.negative_prompt,
        "all_negative_prompts": vec![&spec.negative_prompt; count],
        "seed": seed,
        "all_seeds": finished.seeds,
        "subseed": -1,
        "all_subseeds": vec![-1; count],
        "subseed_strength": 0,
        "width": spec.width,
        "height": spec.height,
        "sampler_name": spec.sampler_name,
        "cfg_scale": spec.cfg_scale,
        "steps": spec.steps,
        "batch_size": spec.batch_size,
        "restore_faces": false,
        "face_restoration_model": null,
        "sd_model_name": model,
        "sd_model_hash": null,
        "sd_vae_name": null,
        "sd_vae_hash": null,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": spec.init.as_ref().map(|i| i.strength),
        "extra_generation_params": {},
        "index_of_first_image": 0,
        "infotexts": finished.infotexts,
        "styles": [],
        "job_timestamp": "",
        "clip_skip": spec.clip_skip + 1,
        "is_using_inpainting_conditioning": false,
        "version": format!("diffctl {}", env!("CARGO_PKG_VERSION")),
    })
}

/// Hires fix's settings: the upscaler (default "Latent"), the size (`hr_resize_x`/`_y`, else
/// `hr_scale` × the first pass's, in multiples of 8), second-pass steps and denoising strength.
fn parse_hires(
    f: &Fields,
    width: usize,
    height: usize,
    steps: usize,
    max_steps: usize,
    limits: &crate::limits::Limits,
) -> Result<HiresSpec, Refusal> {
    let upscaler = f.str("hr_upscaler").map_err(unprocessable)?.unwrap_or("Latent").to_string();
    Upscaler::parse(&upscaler).map_err(|e| bad(e.to_string()))?;
    let scale = f.ranged("hr_scale", 1.0, 8.0).map_err(bad)?.unwrap_or(2.0);
    let (rx, ry) = (
        f.usize("hr_resize_x", 1 << 16).map_err(bad)?.unwrap_or(0),
        f.usize("hr_resize_y", 1 << 16).map_err(bad)?.unwrap_or(0),
    );
    let (w, h) = match (rx, ry) {
        (0, 0) => ((width as f64 * scale) as usize, (height as f64 * scale) as usize),
        (0, y) => (y * width / height, y),
        (x, 0) => (x, x * height / width),
        (x, y) => (x, y),
    };
    let (w, h) = (w / 8 * 8, h / 8 * 8);
    if w < width || h < height {
        return Err(bad(format!(
            "hires fix: the hires size {w}x{h} is smaller than the first pass's {width}x{height}"
        )));
    }
    limits.check_size(1, w, h).map_err(|e| bad(format!("hires fix: {e}")))?;
    let second = f.usize("hr_second_pass_steps", max_steps).map_err(bad)?.filter(|&s| s > 0).unwrap_or(steps);
    let strength = f.f64("denoising_strength").map_err(bad)?.unwrap_or(0.7);
    if !(strength > 0.0 && strength <= 1.0) {
        return Err(bad(format!("field `denoising_strength`: {strength} is not in (0, 1]")));
    }
    Ok(HiresSpec { upscaler, width: w, height: h, steps: second, strength })
}

/// A1111's `resize_mode` names.
pub const RESIZE_MODES: [&str; 4] =
    ["Just resize", "Crop and resize", "Resize and fill", "Just resize (latent upscale)"];

/// Reads an A1111 generation request into a spec, writing its images into `dir`; also returns the
/// request echoed with the defaults filled in.
fn parse_request(
    state: &AppState,
    value: &Value,
    dir: &Path,
    img2img: bool,
) -> Result<(GenerationSpec, Value), Refusal> {
    let f = Fields::of(value, "the request body").map_err(unprocessable)?;
    let engine = &state.engine;
    let settings = engine.settings();
    let limits = settings.runner.limits;
    let written_prompt = f.str("prompt").map_err(unprocessable)?.unwrap_or("").to_string();
    let negative_prompt = f.str("negative_prompt").map_err(unprocessable)?.unwrap_or("").to_string();
    let seed = match f.int("seed", -1, i64::from(u32::MAX)).map_err(bad)? {
        None | Some(-1) => u64::from(rand::random::<u32>()),
        Some(s) if s < 0 => return Err(bad(format!("field `seed`: {s} is not -1 or a seed"))),
        Some(s) => s as u64,
    };
    let sampler_name = f
        .str("sampler_name")
        .map_err(unprocessable)?
        .or(f.str("sampler_index").map_err(unprocessable)?)
        .unwrap_or("Euler");
    if let Err(e) = SamplerChoice::parse(sampler_name) {
        // A1111 answers an unknown sampler with 404.
        return Err((StatusCode::NOT_FOUND, e.to_string()));
    }
    let schedule = match f.str("scheduler").map_err(unprocessable)? {
        None => None,
        Some(s) if s.eq_ignore_ascii_case("automatic") || s.is_empty() => None,
        Some(s) if s.eq_ignore_ascii_case("uniform") => Some(SigmaSchedule::Normal.name().to_string()),
        Some(s) => Some(s.parse::<SigmaSchedule>().map_err(|e| bad(e.to_string()))?.name().to_string()),
    };
    let max_steps = state.options.max_steps;
    let steps = f.usize("steps", max_steps).map_err(bad)?.unwrap_or(50);
    if steps == 0 {
        return Err(bad("field `steps`: must be at least 1".into()));
    }
    let cfg_scale = f.ranged("cfg_scale", 0.0, 100.0).map_err(bad)?.unwrap_or(7.0);
    let default_size = engine.default_size();
    let width = f.usize("width", 1 << 16).map_err(bad)?.unwrap_or(default_size);
    let height = f.usize("height", 1 << 16).map_err(bad)?.unwrap_or(default_size);
    for (name, v) in [("width", width), ("height", height)] {
        if v == 0 || v % 8 != 0 {
            return Err(bad(format!("field `{name}`: {v} is not a positive multiple of 8")));
        }
    }
    let batch_size = f.usize("batch_size", limits.max_batch).map_err(bad)?.unwrap_or(1).max(1);
    let n_iter = f.usize("n_iter", 100).map_err(bad)?.unwrap_or(1).max(1);
    limits.check_size(batch_size, width, height).map_err(|e| bad(e.to_string()))?;
    for name in ["restore_faces", "tiling", "do_not_save_samples", "do_not_save_grid", "send_images", "save_images"] {
        f.bool(name).map_err(unprocessable)?;
    }
    let hires = if !img2img && f.bool("enable_hr").map_err(unprocessable)? == Some(true) {
        Some(parse_hires(&f, width, height, steps, max_steps, &limits)?)
    } else {
        None
    };

    let mut checkpoint = None;
    let mut clip_skip = 0;
    let restore_checkpoint = f.bool("override_settings_restore_afterwards").map_err(unprocessable)?.unwrap_or(true);
    if let Some(overrides) = f.object("override_settings").map_err(unprocessable)? {
        let o = Fields::nested(overrides, "override_settings");
        if let Some(title) = o.str("sd_model_checkpoint").map_err(unprocessable)? {
            checkpoint = Some(engine.find_checkpoint(title).map_err(bad)?.title());
        }
        if let Some(n) = o.usize("CLIP_stop_at_last_layers", 12).map_err(bad)? {
            clip_skip = n.saturating_sub(1);
        }
        if let Some(vae) = o.str("sd_vae").map_err(unprocessable)?
            && !["automatic", "none", ""].contains(&vae.to_lowercase().as_str())
        {
            return Err(bad(format!(
                "override_settings.sd_vae `{vae}`: a VAE per request is not supported; start the server with --vae"
            )));
        }
    }

    let (prompt, lora_tags) = extract_lora_tags(&written_prompt);
    let mut loras = Vec::new();
    for (name, weight) in lora_tags {
        let entry =
            settings.runner.models_dir.find(Kind::Lora, &name).map_err(|e| bad(format!("<lora:{name}>: {e}")))?;
        loras.push((entry.path, weight));
    }
    let embeddings = settings
        .runner
        .models_dir
        .list(Kind::Embedding)
        .into_iter()
        .filter(|e| mentions(&prompt, e.short_stem()) || mentions(&negative_prompt, e.short_stem()))
        .map(|e| e.path)
        .collect();

    let init = if img2img { Some(parse_init(&f, dir, width, height, limits.max_pixels)?) } else { None };

    let mut units = Vec::new();
    if let Some(scripts) = f.object("alwayson_scripts").map_err(unprocessable)?
        && let Some((_, controlnet)) = scripts.iter().find(|(k, _)| k.eq_ignore_ascii_case("controlnet"))
    {
        units = crate::server::controlnet::parse_script(state, controlnet, dir, width, height).map_err(bad)?;
    }

    let spec = GenerationSpec {
        prompt,
        written_prompt,
        negative_prompt,
        prompt_syntax: "a1111".into(),
        sampler_name: sampler_name.to_string(),
        schedule,
        steps,
        cfg_scale,
        width,
        height,
        batch_size,
        n_iter,
        seed,
        clip_skip,
        init,
        loras,
        embeddings,
        units,
        checkpoint,
        restore_checkpoint,
        hires,
    };
    let mut echo: Map<String, Value> = value.as_object().cloned().unwrap_or_default();
    for (key, v) in [
        ("prompt", json!(spec.written_prompt)),
        ("negative_prompt", json!(spec.negative_prompt)),
        ("seed", json!(spec.seed)),
        ("sampler_name", json!(spec.sampler_name)),
        ("scheduler", json!(spec.schedule.clone().unwrap_or_else(|| "automatic".into()))),
        ("steps", json!(spec.steps)),
        ("cfg_scale", json!(spec.cfg_scale)),
        ("width", json!(spec.width)),
        ("height", json!(spec.height)),
        ("batch_size", json!(spec.batch_size)),
        ("n_iter", json!(spec.n_iter)),
    ] {
        echo.insert(key.into(), v);
    }
    if let Some(init) = &spec.init {
        echo.insert("denoising_strength".into(), json!(init.strength));
        echo.insert("init_images".into(), Value::Null);
        echo.insert("mask".into(), Value::Null);
    }
    Ok((spec, Value::Object(echo)))
}

fn unprocessable(message: String) -> Refusal {
    (StatusCode::UNPROCESSABLE_ENTITY, message)
}

/// The init image and mask of an img2img request, fitted to the output size and stored.
fn parse_init(f: &Fields, dir: &Path, width: usize, height: usize, max_pixels: u64) -> Result<InitSpec, Refusal> {
    let images = f.array("init_images").map_err(unprocessable)?;
    let first =
        images.and_then(|a| a.first()).ok_or_else(|| bad("img2img needs `init_images` with one image".into()))?;
    let first = first.as_str().ok_or_else(|| unprocessable("field `init_images`: expected base64 strings".into()))?;
    let mode = f.choice("resize_mode", &RESIZE_MODES).map_err(bad)?.unwrap_or(0);
    let image = decode_base64(first, "init_images[0]", max_pixels).map_err(bad)?;
    let image = fit_image(&image.to_rgb8(), width, height, mode).map_err(bad)?;
    store(&image::DynamicImage::ImageRgb8(image), dir, "init.png")
        .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e))?;
    let strength = f.f64("denoising_strength").map_err(bad)?.unwrap_or(0.75);
    if !(strength > 0.0 && strength <= 1.0) {
        return Err(bad(format!("field `denoising_strength`: {strength} is not in (0, 1]")));
    }
    let mut init = InitSpec::new(strength);
    if let Some(mask) = f.str("mask").map_err(unprocessable)? {
        let mask = decode_base64(mask, "mask", max_pixels).map_err(bad)?.to_rgb8();
        let mut mask = fit_image(&mask, width, height, mode).map_err(bad)?;
        let invert = match f.get("inpainting_mask_invert") {
            Some(Value::String(s)) => s.eq_ignore_ascii_case("Inpaint not masked") || s == "1",
            _ => f.int("inpainting_mask_invert", 0, 1).map_err(bad)?.unwrap_or(0) == 1,
        };
        if invert {
            image::imageops::invert(&mut mask);
        }
        store(&image::DynamicImage::ImageRgb8(mask), dir, "mask.png")
            .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e))?;
        init.mask = Some("mask.png".into());
        let blur = f.ranged("mask_blur", 0.0, 64.0).map_err(bad)?.unwrap_or(4.0);
        init.mask_blur = (blur > 0.0).then_some(blur);
        f.int("inpainting_fill", 0, 3).map_err(bad)?;
        let only_masked = match f.get("inpaint_full_res") {
            Some(Value::String(s)) => {
                s.eq_ignore_ascii_case("Only masked") || s == "1" || s.eq_ignore_ascii_case("true")
            }
            _ => f.bool("inpaint_full_res").map_err(bad)?.unwrap_or(false),
        };
        if only_masked {
            init.only_masked_padding = Some(f.usize("inpaint_full_res_padding", 4096).map_err(bad)?.unwrap_or(32));
        }
    }
    Ok(init)
}

/// Fits an image to the output size by A1111's resize modes (PIL Lanczos, as A1111): 0 stretch and
/// 1 crop to cover are the library's [`fit`] (diffusers' `default` and `_resize_and_crop`, which
/// A1111's are); 2 fits inside and fills the margins with the image stretched to the whole size (an
/// approximation of A1111's stretched edge rows).
pub fn fit_image(image: &image::RgbImage, width: usize, height: usize, mode: usize) -> Result<image::RgbImage, String> {
    let (w, h) = (width as u32, height as u32);
    let fitted = match mode {
        1 => fit(image, w, h, ResizeMode::Crop),
        2 => {
            let (iw, ih) = (f64::from(image.width().max(1)), f64::from(image.height().max(1)));
            let scale = (f64::from(w) / iw).min(f64::from(h) / ih);
            let (sw, sh) = (((iw * scale).round() as u32).clamp(1, w), ((ih * scale).round() as u32).clamp(1, h));
            fit(image, w, h, ResizeMode::Stretch).and_then(|mut canvas| {
                let inner = fit(image, sw, sh, ResizeMode::Stretch)?;
                image::imageops::replace(&mut canvas, &inner, i64::from((w - sw) / 2), i64::from((h - sh) / 2));
                Ok(canvas)
            })
        }
        _ => fit(image, w, h, ResizeMode::Stretch),
    };
    fitted.map_err(|e| e.to_string())
}

/// Removes `<lora:NAME:WEIGHT>` (and `<lyco:…>`) tags from a prompt, returning the prompt and the
/// tags (weight 1 when left out).
pub fn extract_lora_tags(prompt: &str) -> (String, Vec<(String, f64)>) {
    let mut out = String::new();
    let mut tags = Vec::new();
    let mut rest = prompt;
    while let Some(start) = rest.find('<') {
        let Some(len) = rest[start..].find('>') else { break };
        let inner = &rest[start + 1..start + len];
        let mut parts = inner.split(':');
        let kind = parts.next().unwrap_or("");
        if kind.eq_ignore_ascii_case("lora") || kind.eq_ignore_ascii_case("lyco") {
            let name = parts.next().unwrap_or("").trim().to_string();
            let weight = parts.next().and_then(|w| w.trim().parse::<f64>().ok()).unwrap_or(1.0);
            out.push_str(&rest[..start]);
            tags.push((name, weight));
        } else {
            out.push_str(&rest[..start + len + 1]);
        }
        rest = &rest[start + len + 1..];
    }
    out.push_str(rest);
    (out, tags)
}

/// Whether `word` occurs in `text` as a whole word.
fn mentions(text: &str, word: &str) -> bool {
    !word.is_empty()
        && text.match_indices(word).any(|(i, _)| {
            let before = text[..i].chars().next_back();
            let after = text[i + word.len()..].chars().next();
            let boundary = |c: Option<char>| c.is_none_or(|c| !c.is_alphanumeric() && c != '_' && c != '-');
            boundary(before) && boundary(after)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lora_tags_are_taken_out_of_the_prompt() {
        let (prompt, tags) = extract_lora_tags("a cat <lora:style:0.8>, <lyco:x> in <b>");
        assert_eq!(prompt, "a cat ,  in <b>");
        assert_eq!(tags, vec![("style".to_string(), 0.8), ("x".to_string(), 1.0)]);
        assert!(mentions("photo of bad-hands, x", "bad-hands"));
        assert!(!mentions("photo of bad-handsome", "bad-hands"));
    }
}
