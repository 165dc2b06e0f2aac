//! `diffctl serve`: AUTOMATIC1111's `/sdapi/v1` and OpenAI's images API over one [`Engine`].
//! Handlers only translate: each builds a stored [`jobs::JobSpec`] that becomes the library's
//! [`crate::request::Request`] when it runs, so no generation logic lives here.

pub mod a1111;
pub mod controlnet;
pub mod events;
pub mod fields;
pub mod images;
pub mod jobs;
pub mod models_dir;
pub mod monitor;
pub mod openai;
pub mod png;
pub mod preview;
pub mod redis_worker;
pub mod remote;
pub mod runner;
pub mod store;
pub mod web;
pub mod worker;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::json;

pub use worker::{Engine, EngineSettings};

/// Everything `diffctl serve` is started with.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The engine's settings.
    pub engine: EngineSettings,
    /// Where to listen (port 0: any free port).
    pub address: SocketAddr,
    /// `USER:PASS` required on every route.
    pub api_auth: Option<(String, String)>,
    /// Largest request body in bytes.
    pub max_body: usize,
    /// Largest step count a request may ask for.
    pub max_steps: usize,
}

/// What every handler shares.
pub struct AppState {
    /// The engine.
    pub engine: Arc<Engine>,
    /// The options.
    pub options: ServeOptions,
}

/// The shared state as handlers take it.
pub type Shared = Arc<AppState>;

/// A running server.
pub struct RunningServer {
    /// The address it listens on.
    pub address: SocketAddr,
    engine: Arc<Engine>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RunningServer {
    /// Stops listening, lets the running job finish and waits for the server to end.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.engine.stop();
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }

    /// Blocks until the server ends (Ctrl-C or SIGTERM for the CLI).
    pub fn wait(mut self) {
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Loads the model, resumes stored jobs and starts serving on a thread of its own. With
/// `stop_on_signal`, Ctrl-C or SIGTERM stop it.
pub fn start(options: ServeOptions, stop_on_signal: bool) -> anyhow::Result<RunningServer> {
    let engine = Engine::start(options.engine.clone())?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(options.address))
        .map_err(|e| anyhow::anyhow!("listening on {}: {e}", options.address))?;
    let address = listener.local_addr()?;
    let state = Arc::new(AppState { engine: engine.clone(), options });
    let app = router(state);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let stopper = engine.clone();
    let thread = std::thread::Builder::new().name("diffctl-http".into()).spawn(move || {
        runtime.block_on(async move {
            let stop = async move {
                if stop_on_signal {
                    tokio::select! {
                        _ = rx => {}
                        _ = termination() => {}
                    }
                } else {
                    let _ = rx.await;
                }
                stopper.stop();
            };
            if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(stop).await {
                eprintln!("diffctl serve: {e}");
            }
        });
        runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    })?;
    Ok(RunningServer { address, engine, shutdown: Some(tx), thread: Some(thread) })
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn termination() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(term) => term,
            Err(_) => return std::future::pending().await,
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

fn router(state: Shared) -> Router {
    let max_body = state.options.max_body;
    Router::new()
        .merge(a1111::routes())
        .merge(controlnet::routes())
        .merge(openai::routes())
        .merge(events::routes())
        .merge(web::routes())
        .fallback(|| async { a1111::error(StatusCode::NOT_FOUND, "no such route") })
        .layer(DefaultBodyLimit::max(max_body))
        .layer(axum::middleware::from_fn(json_errors))
        .layer(axum::middleware::from_fn_with_state(state.clone(), authenticate))
        .with_state(state)
}

/// Refuses a request without the `--api-auth` credentials (before its body is read): HTTP Basic
/// on every route, and on `/v1/*` also `Authorization: Bearer USER:PASS` (the OpenAI SDK's key).
async fn authenticate(State(state): State<Shared>, request: Request, next: Next) -> Response {
    let Some((user, pass)) = &state.options.api_auth else { return next.run(request).await };
    let expected = format!("{user}:{pass}");
    let openai = request.uri().path().starts_with("/v1/");
    // An OpenAI client fetches `url` results with its API key too.
    let bearer = openai || request.uri().path().starts_with("/diffctl/v1/files/");
    if credentials_match(request.headers(), &expected, bearer) {
        return next.run(request).await;
    }
    let mut response = if openai {
        openai::error(StatusCode::UNAUTHORIZED, "invalid_api_key", "missing or wrong credentials")
    } else {
        a1111::error(StatusCode::UNAUTHORIZED, "missing or wrong credentials")
    };
    response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Basic realm=\"diffctl\""));
    response
}

/// Gives the plain-text refusals of axum's extractors (a body over the limit, a form that is not
/// multipart) the API's JSON error shape, so every client error carries a readable message.
async fn json_errors(request: Request, next: Next) -> Response {
    let openai = request.uri().path().starts_with("/v1/");
    let response = next.run(request).await;
    let is_json = response.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| {
        v.starts_with("application/json")
            || v.starts_with("text/event-stream")
            || v.starts_with("text/html")
            || v.starts_with("image/")
    });
    if is_json || !response.status().is_client_error() {
        return response;
    }
    let status = response.status();
    let text = match axum::body::to_bytes(response.into_body(), 64 << 10).await {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(_) => String::new(),
    };
    let message =
        if text.trim().is_empty() { status.canonical_reason().unwrap_or("bad request").to_string() } else { text };
    if openai { openai::error(status, "invalid_request", &message) } else { a1111::error(status, &message) }
}

fn credentials_match(headers: &HeaderMap, expected: &str, bearer_allowed: bool) -> bool {
    let Some(value) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) else { return false };
    let (scheme, rest) = value.trim().split_once(' ').unwrap_or((value, ""));
    let given = if scheme.eq_ignore_ascii_case("basic") {
        use base64::Engine as _;
        match base64::engine::general_purpose::STANDARD.decode(rest.trim()) {
            Ok(bytes) => bytes,
            Err(_) => return false,
        }
    } else if scheme.eq_ignore_ascii_case("bearer") && bearer_allowed {
        rest.trim().as_bytes().to_vec()
    } else {
        return false;
    };
    constant_time_eq(&given, expected.as_bytes())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A response with a JSON body.
pub fn json_response(status: StatusCode, body: serde_json::Value) -> Response {
    (status, axum::Json(body)).into_response()
}

/// 503 with `Retry-After` for a full queue.
pub fn queue_full(openai: bool) -> Response {
    let message = "the job queue is full; retry later";
    let mut response = if openai {
        openai::error(StatusCode::SERVICE_UNAVAILABLE, "server_busy", message)
    } else {
        a1111::error(StatusCode::SERVICE_UNAVAILABLE, message)
    };
    response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
    response
}

/// A file of a finished job, for `url` responses (`/diffctl/v1/files/{job}/{name}`).
pub async fn job_file(
    State(state): State<Shared>,
    axum::extract::Path((job, name)): axum::extract::Path<(String, String)>,
) -> Response {
    let safe = |s: &str| {
        !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) && !s.starts_with('.')
    };
    if !safe(&job) || !safe(&name) || !name.ends_with(".png") {
        return a1111::error(StatusCode::NOT_FOUND, "no such file");
    }
    let path = jobs::job_dir(&state.options.engine.state_dir, &job).join(&name);
    match tokio::fs::read(&path).await {
        Ok(bytes) => ([(header::CONTENT_TYPE, "image/png")], Body::from(bytes)).into_response(),
        Err(_) => a1111::error(StatusCode::NOT_FOUND, "no such file (results are kept for an hour)"),
    }
}

/// Job status: `GET /diffctl/v1/jobs/{id}` (state, images as base64, error).
pub async fn job_status(State(state): State<Shared>, axum::extract::Path(id): axum::extract::Path<String>) -> Response {
    let engine = state.engine.clone();
    let found = tokio::task::spawn_blocking(move || engine.job(&id)).await;
    match found {
        Ok(Ok(Some(job))) => {
            let dir = jobs::job_dir(&state.options.engine.state_dir, &job.id);
            let finished = job.finished.unwrap_or_default();
            let images: Vec<String> = finished
                .images
                .iter()
                .filter_map(|name| std::fs::read(dir.join(name)).ok())
                .map(|b| images::encode_base64(&b))
                .collect();
            json_response(
                StatusCode::OK,
                json!({"id": job.id, "state": job.state, "images": images, "seeds": finished.seeds,
                       "infotexts": finished.infotexts, "error": finished.error}),
            )
        }
        Ok(Ok(None)) => a1111::error(StatusCode::NOT_FOUND, "no such job"),
        Ok(Err(e)) => a1111::error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
        Err(e) => a1111::error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

/// The paths of `state_dir` the engine uses, for the CLI's messages.
pub fn describe(options: &ServeOptions) -> String {
    let auth = if options.api_auth.is_some() { " (with --api-auth)" } else { "" };
    format!("http://{}{auth}, state in {}", options.address, options.engine.state_dir.display())
}
