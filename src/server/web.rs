//! The web UI: one self-contained page (`web/index.html`, plain HTML and JavaScript over the
//! A1111 routes and the event stream) served at `/`.

use axum::Router;
use axum::response::Html;
use axum::routing::get;

use super::Shared;

/// The page.
const INDEX: &str = include_str!("web/index.html");

/// The route.
pub fn routes() -> Router<Shared> {
    Router::new().route("/", get(|| async { Html(INDEX) }))
}
