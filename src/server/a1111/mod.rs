//! AUTOMATIC1111's `/sdapi/v1` routes (and Forge's, which are the same), as its clients call them.

mod generation;
mod models;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::{get, post};
use serde_json::{Value, json};

use super::{Shared, json_response};

pub use generation::{GenerationOutcome, extract_lora_tags, fit_image, submit_and_wait};

/// The routes.
pub fn routes() -> Router<Shared> {
    Router::new()
        .route("/sdapi/v1/txt2img", post(generation::txt2img))
        .route("/sdapi/v1/img2img", post(generation::img2img))
        .route("/sdapi/v1/png-info", post(png_info))
        .route("/sdapi/v1/progress", get(progress))
        .route("/sdapi/v1/interrupt", post(interrupt))
        .route("/sdapi/v1/skip", post(interrupt))
        .route("/sdapi/v1/options", get(models::get_options).post(models::set_options))
        .route("/sdapi/v1/sd-models", get(models::sd_models))
        .route("/sdapi/v1/refresh-checkpoints", post(models::refresh))
        .route("/sdapi/v1/refresh-loras", post(models::refresh))
        .route("/sdapi/v1/refresh-vae", post(models::refresh))
        .route("/sdapi/v1/samplers", get(models::samplers))
        .route("/sdapi/v1/schedulers", get(models::schedulers))
        .route("/sdapi/v1/upscalers", get(models::upscalers))
        .route("/sdapi/v1/latent-upscale-modes", get(models::latent_upscale_modes))
        .route("/sdapi/v1/sd-vae", get(models::sd_vae))
        .route("/sdapi/v1/loras", get(models::loras))
        .route("/sdapi/v1/embeddings", get(models::embeddings))
        .route("/sdapi/v1/cmd-flags", get(|| async { axum::Json(json!({})) }))
        .route("/sdapi/v1/memory", get(|| async { axum::Json(json!({})) }))
        .route("/sdapi/v1/face-restorers", get(|| async { axum::Json(json!([])) }))
        .route("/sdapi/v1/prompt-styles", get(|| async { axum::Json(json!([])) }))
        .route("/sdapi/v1/hypernetworks", get(|| async { axum::Json(json!([])) }))
        .route("/sdapi/v1/realesrgan-models", get(|| async { axum::Json(json!([])) }))
        .route("/sdapi/v1/scripts", get(|| async { axum::Json(json!({"txt2img": [], "img2img": []})) }))
        .route("/diffctl/v1/jobs/{id}", get(super::job_status))
        .route("/diffctl/v1/files/{job}/{name}", get(super::job_file))
}

/// An error in A1111's shape (`detail` is what clients show).
pub fn error(status: StatusCode, message: &str) -> Response {
    let kind = status.canonical_reason().unwrap_or("error");
    json_response(status, json!({"error": kind, "detail": message, "body": "", "errors": message}))
}

/// Parses a JSON body, or the 422 A1111 (FastAPI) answers for one it cannot read.
pub fn parse_body(body: &Bytes) -> Result<Value, Response> {
    serde_json::from_slice(body)
        .map_err(|e| error(StatusCode::UNPROCESSABLE_ENTITY, &format!("the body is not valid JSON: {e}")))
}

#[derive(serde::Deserialize)]
struct ProgressQuery {
    skip_current_image: Option<String>,
}

async fn progress(State(state): State<Shared>, Query(query): Query<ProgressQuery>) -> Response {
    let skip = query.skip_current_image.is_some_and(|s| s.eq_ignore_ascii_case("true") || s == "1");
    let engine = state.engine.clone();
    match tokio::task::spawn_blocking(move || engine.progress_json(skip)).await {
        Ok(value) => json_response(StatusCode::OK, value),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

async fn interrupt(State(state): State<Shared>) -> Response {
    state.engine.interrupt();
    json_response(StatusCode::OK, json!({}))
}

async fn png_info(body: Bytes) -> Response {
    let value = match parse_body(&body) {
        Ok(v) => v,
        Err(response) => return response,
    };
    let Some(text) = value.get("image").and_then(Value::as_str) else {
        return error(StatusCode::UNPROCESSABLE_ENTITY, "field `image`: expected a base64 PNG");
    };
    let bytes = match super::images::decode_base64_bytes(text, "field `image`") {
        Ok(b) => b,
        Err(message) => return error(StatusCode::BAD_REQUEST, &message),
    };
    let info = match super::png::parameters(&bytes) {
        Ok(info) => info.unwrap_or_default(),
        Err(e) => return error(StatusCode::BAD_REQUEST, &format!("field `image`: {e}")),
    };
    let items = if info.is_empty() { json!({}) } else { json!({"parameters": info}) };
    json_response(StatusCode::OK, json!({"info": info, "items": items, "parameters": parse_infotext(&info)}))
}

/// The `key: value` fields of an infotext's last line, with the prompts.
fn parse_infotext(text: &str) -> Value {
    let mut lines: Vec<&str> = text.lines().collect();
    let mut out = serde_json::Map::new();
    let Some(last) = lines.pop() else { return Value::Object(out) };
    for field in split_fields(last) {
        if let Some((key, value)) = field.split_once(": ") {
            out.insert(key.trim().to_string(), Value::String(value.trim().trim_matches('"').to_string()));
        }
    }
    let mut prompt = Vec::new();
    let mut negative = Vec::new();
    for line in lines {
        match line.strip_prefix("Negative prompt: ") {
            Some(rest) => negative.push(rest),
            None if !negative.is_empty() => negative.push(line),
            None => prompt.push(line),
        }
    }
    out.insert("Prompt".into(), Value::String(prompt.join("\n")));
    out.insert("Negative prompt".into(), Value::String(negative.join("\n")));
    Value::Object(out)
}

/// Splits `a: 1, b: "x, y", c: 2` at the commas outside quotes.
fn split_fields(line: &str) -> Vec<&str> {
    let mut fields = Vec::new();
    let (mut start, mut quoted) = (0, false);
    for (i, c) in line.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => {
                fields.push(&line[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    fields.push(&line[start..]);
    fields
}
