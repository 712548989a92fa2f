//! The edge daemon's HTTP API (axum, like the node's):
//!
//! | method | path                               | body / answer |
//! |--------|------------------------------------|---------------|
//! | GET    | /v1/health                         | `{edge}` |
//! | GET    | /v1/attachments                    | attached volumes (see `report::volume_json`) |
//! | POST   | /v1/attachments                    | `{volume}` → the attached volume |
//! | DELETE | /v1/attachments/{volume}[?force=true] | detach |
//! | GET    | /metrics                           | Prometheus text |
//!
//! Errors are `{"error": "..."}` with 404 (unknown volume / not attached), 409 (attached
//! elsewhere, in use, refused by the owner) or 503 (owner or registry unreachable).

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use super::host::{EdgeHost, HostError};
use super::report;

impl IntoResponse for HostError {
    fn into_response(self) -> Response {
        let status = match &self {
            HostError::NotFound(_) => StatusCode::NOT_FOUND,
            HostError::Conflict(_) => StatusCode::CONFLICT,
            HostError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        (status, Json(json!({ "error": self.message() }))).into_response()
    }
}

#[derive(Deserialize)]
struct AttachRequest {
    volume: String,
}

#[derive(Deserialize)]
struct DetachQuery {
    #[serde(default)]
    force: bool,
}

async fn health(State(host): State<Arc<EdgeHost>>) -> Json<Value> {
    Json(json!({ "edge": host.name, "nbd_addr": host.nbd_addr.to_string() }))
}

async fn list(State(host): State<Arc<EdgeHost>>) -> Json<Value> {
    Json(Value::Array(host.list()))
}

async fn attach(
    State(host): State<Arc<EdgeHost>>,
    request: Result<Json<AttachRequest>, JsonRejection>,
) -> Response {
    match request {
        // A bad body gets a JSON error too, like every other answer.
        Err(rejection) => (
            StatusCode::BAD_REQUEST,
            Json(json!({ "error": format!("attach: {}", rejection.body_text()) })),
        )
            .into_response(),
        Ok(Json(request)) => match host.attach(&request.volume).await {
            Ok(value) => Json(value).into_response(),
            Err(e) => e.into_response(),
        },
    }
}

async fn detach(
    State(host): State<Arc<EdgeHost>>,
    Path(volume): Path<String>,
    Query(query): Query<DetachQuery>,
) -> Result<Json<Value>, HostError> {
    host.detach(&volume, query.force).await.map(Json)
}

async fn metrics(State(host): State<Arc<EdgeHost>>) -> Response {
    let stats: Vec<_> = host.exports.all().iter().map(|t| t.stats()).collect();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        report::metrics(&host.name, &stats),
    )
        .into_response()
}

pub fn router(host: Arc<EdgeHost>) -> Router {
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/attachments", get(list).post(attach))
        .route("/v1/attachments/{volume}", delete(detach))
        .route("/metrics", get(metrics))
        .with_state(host)
}
