//! The push channel: `GET /diffctl/v1/events` streams Server-Sent Events: `progress` (the same
//! object as A1111's `progress`, with the preview) at every step and queue change, and `job`
//! (`{id, state}`) when a job ends. The stream ends when the server stops.

use std::convert::Infallible;

use axum::Router;
use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::routing::get;
use futures_util::stream::Stream;
use serde_json::Value;

use super::Shared;

/// The route.
pub fn routes() -> Router<Shared> {
    Router::new().route("/diffctl/v1/events", get(events))
}

async fn events(State(state): State<Shared>) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Event>(16);
    let engine = state.engine.clone();
    tokio::spawn(async move {
        let mut receiver = engine.subscribe();
        let mut ended = engine.ended();
        let first = Event::default().event("progress").data(engine.progress_json(false).to_string());
        if tx.send(first).await.is_err() {
            return;
        }
        loop {
            let event = tokio::select! {
                message = receiver.recv() => match message {
                    Ok(text) => {
                        let Ok(value) = serde_json::from_str::<Value>(&text) else { continue };
                        let name = value["event"].as_str().unwrap_or("progress").to_string();
                        Event::default().event(name).data(value["data"].to_string())
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(_) => return,
                },
                changed = ended.changed() => {
                    if changed.is_err() || engine.is_stopping() {
                        return;
                    }
                    continue;
                }
            };
            if tx.send(event).await.is_err() {
                return;
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|event| (Ok(event), rx)) });
    Sse::new(stream).keep_alive(KeepAlive::default())
}
