//! The HTTP edge: routes, the body limit, and the mapping of [`TrackError`] to a status
//! and an OpenAI-style JSON error, so every failure looks the same to a client (a
//! ledger failure arrives here as `Unavailable`: 503, which the filter retries).

use std::future::Future;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::TcpListener;

use crate::error::{Rejected, TrackError};
use crate::event;
use crate::keys_api;
use crate::limits_sync;
use crate::metrics::Tracker;
use crate::ui;
use crate::usage_api;

/// The content type Prometheus asks for and gets OpenMetrics in (it reads `_total`
/// counters and `# EOF` from this format).
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The service's routes, with the body limit of `tracker.limits()`.
pub fn router(tracker: Arc<Tracker>) -> Router {
    let limit = tracker.limits().max_body_bytes;
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/track", post(track))
        .route("/v1/limits/sync", post(limits_sync::sync))
        .route("/v1/keys", post(keys_api::create).get(keys_api::list))
        .route("/v1/keys/resolve", post(keys_api::resolve))
        .route("/v1/keys/changes", get(keys_api::changes))
        .route("/v1/keys/{id}", delete(keys_api::revoke))
        .route("/v1/usage", get(usage_api::usage))
        .route("/v1/usage/recent", get(usage_api::recent))
        .route("/v1/usage/breakdown", get(usage_api::breakdown))
        .route("/ui", get(ui::page))
        .route("/ui/login", post(ui::login))
        .route("/ui/logout", post(ui::logout))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        .with_state(tracker)
}

/// Serves until `shutdown` resolves, then finishes the requests in flight.
pub async fn serve<F>(listener: TcpListener, tracker: Arc<Tracker>, shutdown: F) -> std::io::Result<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    axum::serve(listener, router(tracker)).with_graceful_shutdown(shutdown).await
}

impl IntoResponse for TrackError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = (status, Json(self.body())).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
        }
        response
    }
}

async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

async fn metrics(State(tracker): State<Arc<Tracker>>) -> Result<Response, TrackError> {
    let text = tracker.encode()?;
    Ok(([(header::CONTENT_TYPE, OPENMETRICS)], text).into_response())
}

/// The 200 answer of `/track`.
#[derive(Debug, Serialize)]
struct TrackAnswer {
    /// Events counted.
    accepted: u64,
    /// Events dropped as duplicates.
    duplicates: u64,
    /// The bad events, by index; they were not counted (always present, often empty).
    rejected: Vec<Rejected>,
}

/// Checks the sender (the bearer secret, when one is configured) and the body (each
/// event on its own), then records its good events (with a ledger: committed before the
/// 200) and reports the bad ones.
async fn track(State(tracker): State<Arc<Tracker>>, request: Request) -> Response {
    if let Some(refused) = ingest_refusal(&tracker, request.headers()) {
        tracker.reject_unauthorized();
        return refused.into_response();
    }
    let parsed = body_of(request).await.and_then(|body| event::parse_body(&body, tracker.limits().max_batch));
    let result = match parsed {
        Ok(parsed) => tracker.record(parsed.events).await.map(|done| (done, parsed.rejected)),
        Err(error) => Err(error),
    };
    match result {
        Ok((done, rejected)) => {
            // Counted only now: after a 503 the sender resends the batch, bad events and all.
            tracker.reject_events(&rejected);
            Json(TrackAnswer { accepted: done.accepted, duplicates: done.duplicates, rejected }).into_response()
        }
        Err(error) => {
            tracker.reject(&error);
            error.into_response()
        }
    }
}

/// The refusal of a request to a gateway endpoint (`/track`, `/v1/limits/sync`,
/// `/v1/keys/resolve`, `/v1/keys/changes`) without
/// the ingest secret, when one is configured (compared in constant time); `None`: let it in.
pub(crate) fn ingest_refusal(tracker: &Tracker, headers: &HeaderMap) -> Option<TrackError> {
    let expected = tracker.ingest_token_digest()?;
    (!usage_api::bearer_matches(headers, expected)).then(|| {
        TrackError::Unauthorized(
            "missing or wrong bearer token: send Authorization: Bearer <the tracker's TRACKER_INGEST_TOKEN>".into(),
        )
    })
}

/// The body of a request whose sender was checked, read only now: a client without the
/// secret is refused on its headers and never makes the tracker buffer a body (up to
/// the body limit per connection, as long as it cares to send it slowly).
pub(crate) async fn body_of(request: Request) -> Result<Bytes, TrackError> {
    read_body(Bytes::from_request(request, &()).await)
}

fn read_body(body: Result<Bytes, BytesRejection>) -> Result<Bytes, TrackError> {
    body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            TrackError::TooLarge("request body is over the size limit".into())
        } else {
            TrackError::BadJson(format!("could not read the request body: {}", rejection.body_text()))
        }
    })
}

/// Parses a whole JSON body of an endpoint that refuses bad bodies whole (the limits
/// sync, the keys API): a syntax error is `BadJson` ("body is not valid JSON: …"); a
/// JSON value of the wrong shape is `InvalidBody` naming the field (`leases[1].need: …`,
/// `body: missing field …` for the top level), without the byte position.
pub(crate) fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, TrackError> {
    event::from_json(body).map_err(|e| match e {
        event::JsonError::Data { path, message } => {
            let field = if path == "." { "body" } else { &path };
            TrackError::InvalidBody(format!("{field}: {message}"))
        }
        event::JsonError::Syntax(e) => TrackError::BadJson(format!("body is not valid JSON: {e}")),
    })
}

async fn not_found(method: Method, uri: Uri) -> TrackError {
    TrackError::NotFound(format!("no route for {method} {}", uri.path()))
}

async fn method_not_allowed(method: Method, uri: Uri) -> TrackError {
    TrackError::MethodNotAllowed(format!("{method} is not allowed on {}", uri.path()))
}
