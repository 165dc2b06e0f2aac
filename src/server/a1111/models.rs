//! A1111's model, sampler and option routes: listings of the models folder and model switching.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use serde_json::{Value, json};

use super::{GenerationOutcome, submit_and_wait};
use super::{error, parse_body};
use crate::pipeline::hires::Upscaler;
use crate::schedulers::{SamplerChoice, SigmaSchedule};
use crate::server::jobs::{JobSpec, schedule_label};
use crate::server::models_dir::Kind;
use crate::server::{Shared, json_response, queue_full};

pub(super) async fn get_options(State(state): State<Shared>) -> Response {
    let current = state.engine.current();
    json_response(
        StatusCode::OK,
        json!({
            "sd_model_checkpoint": current.title(),
            "sd_checkpoint_hash": current.sha256,
            "sd_vae": "Automatic",
            "CLIP_stop_at_last_layers": 1,
            "samples_format": "png",
            "live_previews_enable": true,
            "show_progress_every_n_steps": 1,
            "show_progress_type": "Approx cheap",
        }),
    )
}

pub(super) async fn set_options(State(state): State<Shared>, body: Bytes) -> Response {
    let value = match parse_body(&body) {
        Ok(v) => v,
        Err(response) => return response,
    };
    if !value.is_object() {
        return error(StatusCode::UNPROCESSABLE_ENTITY, "the options must be a JSON object");
    }
    let Some(title) = value.get("sd_model_checkpoint").filter(|v| !v.is_null()) else {
        return json_response(StatusCode::OK, json!(null));
    };
    let Some(title) = title.as_str() else {
        return error(StatusCode::UNPROCESSABLE_ENTITY, "field `sd_model_checkpoint`: expected a string");
    };
    if let Err(message) = state.engine.find_checkpoint(title) {
        return error(StatusCode::BAD_REQUEST, &message);
    }
    let id = state.engine.new_id();
    let spec = JobSpec::LoadModel { title: title.to_string() };
    match submit_and_wait(&state, &id, spec).await {
        GenerationOutcome::Done { .. } => json_response(StatusCode::OK, json!(null)),
        GenerationOutcome::Full => queue_full(false),
        GenerationOutcome::Interrupted => error(StatusCode::CONFLICT, "the model switch was interrupted"),
        GenerationOutcome::Failed((status, message)) => error(status, &message),
    }
}

pub(super) async fn sd_models(State(state): State<Shared>) -> Response {
    let list: Vec<Value> = state
        .engine
        .checkpoints()
        .iter()
        .map(|c| {
            json!({
                "title": c.title(),
                "model_name": c.entry.stem.replace('/', "_"),
                "hash": c.sha256.as_ref().map(|h| h[..10].to_string()),
                "sha256": c.sha256,
                "filename": c.entry.path.display().to_string(),
                "config": null,
            })
        })
        .collect();
    json_response(StatusCode::OK, Value::Array(list))
}

pub(super) async fn refresh() -> Response {
    // Listings are read from the folder on every request: nothing is cached to refresh.
    json_response(StatusCode::OK, json!(null))
}

pub(super) async fn samplers() -> Response {
    let list: Vec<Value> =
        SamplerChoice::a1111_names().map(|name| json!({"name": name, "aliases": [], "options": {}})).collect();
    json_response(StatusCode::OK, Value::Array(list))
}

pub(super) async fn schedulers() -> Response {
    let mut list = vec![
        json!({"name": "automatic", "label": "Automatic", "aliases": null, "default_rho": -1, "need_inner_model": false}),
    ];
    for schedule in SigmaSchedule::ALL_NAMED.into_iter().take(7) {
        list.push(json!({"name": schedule.name(), "label": schedule_label(schedule), "aliases": null,
                         "default_rho": -1, "need_inner_model": false}));
    }
    json_response(StatusCode::OK, Value::Array(list))
}

pub(super) async fn upscalers() -> Response {
    let list: Vec<Value> = Upscaler::NAMES
        .iter()
        .map(|(name, _)| json!({"name": name, "model_name": null, "model_path": null, "model_url": null, "scale": 2}))
        .collect();
    json_response(StatusCode::OK, Value::Array(list))
}

pub(super) async fn latent_upscale_modes() -> Response {
    let list: Vec<Value> =
        Upscaler::NAMES.iter().filter(|(_, u)| u.is_latent()).map(|(name, _)| json!({"name": name})).collect();
    json_response(StatusCode::OK, Value::Array(list))
}

pub(super) async fn sd_vae(State(state): State<Shared>) -> Response {
    let list: Vec<Value> = state
        .options
        .engine
        .runner
        .models_dir
        .list(Kind::Vae)
        .iter()
        .map(|e| json!({"model_name": e.name, "filename": e.path.display().to_string()}))
        .collect();
    json_response(StatusCode::OK, Value::Array(list))
}

pub(super) async fn loras(State(state): State<Shared>) -> Response {
    let list: Vec<Value> = state
        .options
        .engine
        .runner
        .models_dir
        .list(Kind::Lora)
        .iter()
        .map(|e| json!({"name": e.short_stem(), "alias": e.short_stem(), "path": e.path.display().to_string(), "metadata": {}}))
        .collect();
    json_response(StatusCode::OK, Value::Array(list))
}

pub(super) async fn embeddings(State(state): State<Shared>) -> Response {
    let mut loaded = serde_json::Map::new();
    for e in state.options.engine.runner.models_dir.list(Kind::Embedding) {
        loaded.insert(
            e.short_stem().to_string(),
            json!({"step": null, "sd_checkpoint": null, "sd_checkpoint_name": null, "shape": null, "vectors": null}),
        );
    }
    json_response(StatusCode::OK, json!({"loaded": loaded, "skipped": {}}))
}
