//! The edge daemon's HTTP API (axum, like the node's):
//!
//! | method | path                               | body / answer |
//! |--------|------------------------------------|---------------|
//! | GET    | /v1/health                         | `{edge}` |
//! | GET    | /v1/attachments                    | attached volumes (see `report::attachment`) |
//! | POST   | /v1/attachments                    | `{volume}` → the attached volume |
//! | DELETE | /v1/attachments/{volume}[?force=true] | detach |
//! | GET    | /metrics                           | Prometheus text |
//!
//! Errors are `{"error": "..."}` with 404 (unknown volume / not attached), 409 (attached
//! elsewhere, in use, refused by the owner) or 503 (owner or registry unreachable).

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::{Json, Router};

use super::host::{EdgeHost, HostError};
use super::report;
use crate::api_types::{AttachRequest, Attachment, Detached, EdgeHealth, ForceQuery};

impl IntoResponse for HostError {
    fn into_response(self) -> Response {
        let status = match &self {
            HostError::NotFound(_) => StatusCode::NOT_FOUND,
            HostError::Conflict(_) => StatusCode::CONFLICT,
            HostError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        let error = crate::api_types::ErrorBody {
            error: self.message().to_string(),
        };
        (status, Json(error)).into_response()
    }
}

async fn health(State(host): State<Arc<EdgeHost>>) -> Json<EdgeHealth> {
    Json(EdgeHealth {
        edge: host.name.clone(),
        nbd_addr: host.nbd_addr.to_string(),
    })
}

async fn list(State(host): State<Arc<EdgeHost>>) -> Json<Vec<Attachment>> {
    Json(host.list())
}

async fn attach(
    State(host): State<Arc<EdgeHost>>,
    Json(request): Json<AttachRequest>,
) -> Result<Json<Attachment>, HostError> {
    host.attach(&request.volume).await.map(Json)
}

async fn detach(
    State(host): State<Arc<EdgeHost>>,
    Path(volume): Path<String>,
    Query(query): Query<ForceQuery>,
) -> Result<Json<Detached>, HostError> {
    host.detach(&volume, query.force).await.map(Json)
}

async fn metrics(State(host): State<Arc<EdgeHost>>) -> Response {
    let stats: Vec<_> = host.exports.all().iter().map(|t| t.stats()).collect();
    let mut text = report::metrics(&host.name, &stats);
    text.push_str(&report::credential_metrics(
        &host.name,
        &host.credential_reloads,
    ));
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

pub fn router(host: Arc<EdgeHost>) -> Router {
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/attachments", get(list).post(attach))
        .route("/v1/attachments/{volume}", delete(detach))
        .route("/metrics", get(metrics))
        .fallback(crate::api::no_route)
        .method_not_allowed_fallback(crate::api::wrong_method)
        .layer(axum::middleware::from_fn(crate::api::json_errors))
        .with_state(host)
}
