//! The web dashboard, `GET /` on the API port: one static page (HTML, CSS and JS compiled into
//! the binary, no build step and no external assets) that drives the same JSON API as the CLI:
//! volumes with live IOPS and latency graphs (from `/v1/volumes/{name}/stats`, as `vstor top`
//! computes them), snapshots, the clone tree, the volume's MDSes, nodes; and actions: create a
//! volume, snapshot, clone, delete (with confirmation).

use axum::http::header;
use axum::response::IntoResponse;

const PAGE: &str = include_str!("index.html");

/// `GET /`.
pub async fn page() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        PAGE,
    )
}
