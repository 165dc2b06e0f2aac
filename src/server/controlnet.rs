//! sd-webui-controlnet's API: units in `alwayson_scripts.controlnet.args` (ControlNets,
//! T2I-Adapters and IP-Adapters from the models folder's `ControlNet/`) and its `/controlnet/*`
//! routes. A unit's image is preprocessed here and stored; the job gets its model path.

use std::path::Path;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::{get, post};
use serde_json::{Map, Value, json};

use super::a1111::{error, parse_body};
use super::fields::Fields;
use super::images::{decode_base64, store};
use super::jobs::{ControlUnit, UnitKind};
use super::models_dir::Kind;
use super::{AppState, Shared, json_response};
use crate::control::residual::controlnet::ControlMode;
use crate::preprocess::{PreprocessKind, apply};

/// The preprocessors ("modules") units may name.
pub const MODULES: [&str; 7] =
    ["none", "canny", "invert", "scribble", "grayscale", "ip-adapter_clip_sd15", "ip-adapter_clip_sdxl"];

/// sd-webui-controlnet's `resize_mode` names (and their older spellings).
const RESIZE_MODES: [&str; 3] = ["Just Resize", "Crop and Resize", "Resize and Fill"];
const OLD_RESIZE_MODES: [&str; 3] = ["Just Resize", "Scale to Fit (Inner Fit)", "Envelope (Outer Fit)"];
/// `control_mode` names.
const CONTROL_MODES: [&str; 3] = ["Balanced", "My prompt is more important", "ControlNet is more important"];

/// The routes.
pub fn routes() -> Router<Shared> {
    Router::new()
        .route("/controlnet/version", get(|| async { axum::Json(json!({"version": 2})) }))
        .route("/controlnet/model_list", get(model_list))
        .route("/controlnet/module_list", get(module_list))
        .route("/controlnet/control_types", get(control_types))
        .route("/controlnet/settings", get(|| async { axum::Json(json!({"control_net_unit_count": 3})) }))
        .route("/controlnet/detect", post(detect))
}

async fn model_list(State(state): State<Shared>) -> Response {
    let names: Vec<String> =
        state.options.engine.runner.models_dir.list(Kind::ControlNet).iter().map(|e| e.stem.clone()).collect();
    json_response(StatusCode::OK, json!({"model_list": names}))
}

async fn module_list() -> Response {
    let detail: Map<String, Value> = MODULES.iter().map(|m| (m.to_string(), json!({"sliders": []}))).collect();
    json_response(StatusCode::OK, json!({"module_list": MODULES, "module_detail": detail}))
}

async fn control_types(State(state): State<Shared>) -> Response {
    let models: Vec<String> =
        state.options.engine.runner.models_dir.list(Kind::ControlNet).iter().map(|e| e.stem.clone()).collect();
    let all = json!({"module_list": MODULES, "model_list": models, "default_option": "none", "default_model": "None"});
    json_response(StatusCode::OK, json!({"control_types": {"All": all}}))
}

/// `POST /controlnet/detect`: runs a preprocessor on images.
async fn detect(State(state): State<Shared>, body: Bytes) -> Response {
    let value = match parse_body(&body) {
        Ok(v) => v,
        Err(response) => return response,
    };
    let max_pixels = state.options.engine.runner.limits.max_pixels;
    let result = tokio::task::spawn_blocking(move || -> Result<Value, String> {
        let f = Fields::of(&value, "the request body")?;
        let module = f.str("controlnet_module")?.unwrap_or("none").to_string();
        let images = f.array("controlnet_input_images")?.ok_or("field `controlnet_input_images` is missing")?;
        let res = f.usize("controlnet_processor_res", 4096)?.unwrap_or(512);
        let (a, b) = (f.f64("controlnet_threshold_a")?, f.f64("controlnet_threshold_b")?);
        let mut out = Vec::new();
        for (i, image) in images.iter().enumerate() {
            let text = image.as_str().ok_or(format!("controlnet_input_images[{i}]: expected a base64 image"))?;
            let image = decode_base64(text, &format!("controlnet_input_images[{i}]"), max_pixels)?.to_rgb8();
            let processed = preprocess(&module, &image, res, a, b)?;
            let bytes = super::png::encode(&processed, None).map_err(|e| e.to_string())?;
            out.push(super::images::encode_base64(&bytes));
        }
        Ok(json!({"images": out, "info": "Success"}))
    })
    .await;
    match result {
        Ok(Ok(v)) => json_response(StatusCode::OK, v),
        Ok(Err(message)) => error(StatusCode::BAD_REQUEST, &message),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

/// Runs preprocessor `module` at processor resolution `res` (the short side), with its
/// thresholds.
fn preprocess(
    module: &str,
    image: &image::RgbImage,
    res: usize,
    a: Option<f64>,
    b: Option<f64>,
) -> Result<image::RgbImage, String> {
    let module = module.to_lowercase();
    let at_res = || {
        let (w, h) = image.dimensions();
        let scale = res as f64 / f64::from(w.min(h).max(1));
        let (nw, nh) = (((f64::from(w) * scale).round() as u32).max(1), ((f64::from(h) * scale).round() as u32).max(1));
        image::imageops::resize(image, nw, nh, image::imageops::FilterType::Lanczos3)
    };
    let kind = match module.as_str() {
        "none" | "" => return Ok(image.clone()),
        m if m.starts_with("ip-adapter") => return Ok(image.clone()),
        "canny" => {
            let low = a.unwrap_or(100.0).clamp(0.0, 1020.0) as u16;
            let high = b.unwrap_or(200.0).clamp(0.0, 1020.0) as u16;
            PreprocessKind::canny(true, low.min(high), high).map_err(|e| e.to_string())?
        }
        "invert" | "invert (from white bg & black line)" => PreprocessKind::Invert,
        "scribble" | "threshold" => PreprocessKind::Scribble { threshold: a.unwrap_or(127.0).clamp(0.0, 255.0) as u8 },
        "grayscale" => PreprocessKind::Grayscale,
        other => return Err(format!("unknown ControlNet module `{other}`; available: {}", MODULES.join(", "))),
    };
    apply(&kind, &at_res()).map_err(|e| e.to_string())
}

/// The units of `alwayson_scripts.controlnet` (`{"args": [unit, ...]}`), images stored in `dir`.
pub fn parse_script(
    state: &AppState,
    script: &Value,
    dir: &Path,
    width: usize,
    height: usize,
) -> Result<Vec<ControlUnit>, String> {
    let f = Fields::of(script, "alwayson_scripts.controlnet")?;
    let Some(args) = f.array("args")? else { return Ok(Vec::new()) };
    let mut units = Vec::new();
    for (i, unit) in args.iter().enumerate() {
        let what = format!("controlnet unit {i}");
        let Value::Object(map) = unit else {
            return Err(format!("{what}: expected an object"));
        };
        let u = Fields::nested(map, &format!("alwayson_scripts.controlnet.args[{i}]"));
        if u.bool("enabled")? == Some(false) {
            continue;
        }
        let model = u.str("model")?.unwrap_or("None");
        if model.eq_ignore_ascii_case("none") || model.is_empty() {
            continue;
        }
        let engine = &state.options.engine;
        let entry = engine.runner.models_dir.find(Kind::ControlNet, model).map_err(|e| format!("{what}: {e}"))?;
        let module = u.str("module")?.unwrap_or("none");
        let weight = u.ranged("weight", -10.0, 10.0)?.unwrap_or(1.0);
        let guidance_start = u.ranged("guidance_start", 0.0, 1.0)?.unwrap_or(0.0);
        let guidance_end = u.ranged("guidance_end", 0.0, 1.0)?.unwrap_or(1.0);
        if guidance_start > guidance_end {
            return Err(format!("{what}: guidance_start {guidance_start} is after guidance_end {guidance_end}"));
        }
        // The legacy `guessmode` flag is "ControlNet is more important".
        let legacy_guess = if u.bool("guessmode")?.unwrap_or(false) { Some(2) } else { None };
        let mode = match u.choice("control_mode", &CONTROL_MODES)?.or(legacy_guess).unwrap_or(0) {
            0 => ControlMode::Balanced,
            1 => ControlMode::PromptMoreImportant,
            _ => ControlMode::ControlNetMoreImportant,
        };
        let resize_mode = match u.choice("resize_mode", &RESIZE_MODES) {
            Ok(mode) => mode,
            Err(_) => u.choice("resize_mode", &OLD_RESIZE_MODES)?,
        }
        .unwrap_or(1);
        let image_text = match u.get("image").or_else(|| u.get("input_image")) {
            Some(Value::String(s)) => s.as_str(),
            Some(Value::Object(o)) => {
                o.get("image").and_then(Value::as_str).ok_or(format!("{what}: `image.image` is missing"))?
            }
            Some(_) => return Err(format!("{what}: `image` must be a base64 string or {{image, mask}}")),
            None => return Err(format!("{what}: no `image` (the API needs one per unit)")),
        };
        let image = decode_base64(image_text, &format!("{what} image"), engine.runner.limits.max_pixels)?.to_rgb8();
        let kind = unit_kind(&entry.path, module, state).map_err(|e| format!("{what}: {e}"))?;
        let image = if matches!(kind, UnitKind::IpAdapter { .. }) {
            image
        } else {
            let pixel_perfect = u.bool("pixel_perfect")?.unwrap_or(false);
            let res = if pixel_perfect { width.min(height) } else { u.usize("processor_res", 4096)?.unwrap_or(512) };
            let res = if res == 0 || res > 4096 { 512 } else { res };
            let processed = preprocess(module, &image, res, u.f64("threshold_a")?, u.f64("threshold_b")?)
                .map_err(|e| format!("{what}: {e}"))?;
            // The ControlNet pipeline stretches its condition image to the output size: the unit's
            // resize mode is applied here.
            super::a1111::fit_image(&processed, width, height, resize_mode).map_err(|e| format!("{what}: {e}"))?
        };
        let name = format!("control-{i}.png");
        store(&image::DynamicImage::ImageRgb8(image), dir, &name)?;
        if mode != ControlMode::Balanced && kind != UnitKind::ControlNet {
            return Err(format!("{what}: control_mode applies to ControlNets; {} is not one", entry.name));
        }
        units.push(ControlUnit {
            kind,
            model: entry.path,
            image: name,
            weight,
            guidance_start,
            guidance_end,
            mode: mode_name(mode).into(),
        });
    }
    Ok(units)
}

/// The library's name of a control mode.
fn mode_name(mode: ControlMode) -> &'static str {
    ControlMode::NAMES.iter().find(|(_, m)| *m == mode).map_or("balanced", |(n, _)| n)
}

/// The mechanism of a control model file, with the image encoder an IP-Adapter needs.
fn unit_kind(path: &Path, module: &str, state: &AppState) -> Result<UnitKind, String> {
    let identity = crate::io::identify::identify(path).map_err(|e| e.to_string())?;
    if identity.kind.starts_with("IP-Adapter") {
        let encoders = state.options.engine.runner.models_dir.list(Kind::ClipVision);
        let hint = module.to_lowercase();
        let chosen = match encoders.as_slice() {
            [] => {
                return Err(format!(
                    "{} is an IP-Adapter, but the models folder has no clip_vision/ image encoder",
                    path.display()
                ));
            }
            [only] => only.clone(),
            many => many
                .iter()
                .find(|e| hint.rsplit('_').next().is_some_and(|tail| e.name.to_lowercase().contains(tail)))
                .unwrap_or(&many[0])
                .clone(),
        };
        return Ok(UnitKind::IpAdapter { image_encoder: chosen.path });
    }
    if identity.kind.starts_with("T2I-Adapter") {
        return Ok(UnitKind::T2IAdapter);
    }
    if identity.kind.starts_with("ControlNet") {
        return Ok(UnitKind::ControlNet);
    }
    Err(format!("{} is a {}, not a ControlNet, T2I-Adapter or IP-Adapter", path.display(), identity.kind))
}
