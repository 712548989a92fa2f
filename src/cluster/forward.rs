//! HTTP between nodes: forwarding a management request to the node that owns the volume, and
//! the short questions of the self-fencing monitor. `ureq` (already the CLI's client) runs on
//! the blocking pool; every call has a timeout. Every call carries this node's API token (the
//! nodes of a cluster share one token file) and, when this node serves HTTPS, goes over HTTPS.

use std::time::Duration;

use serde_json::Value;

use crate::api_types::{Health, RegistryReachable};
use crate::registry::NodeRecord;

/// Header marking a request one node forwarded to another: it is never forwarded again.
pub const FORWARDED: &str = "x-vstor-forwarded";
/// How long a forwarded management request may take (as long as the CLI waits): moves, scrubs
/// and deletes wait for uploads.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a forwarded read-only request (GET) may take: the owner answers those from memory,
/// so a slow answer means a partitioned or stopped owner, and the caller falls back to the
/// registry instead of hanging.
const FORWARD_GET_TIMEOUT: Duration = Duration::from_secs(5);
/// Connecting to another node's API: a node cut off by a partition never answers the SYN.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

fn agent(timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(timeout))
        .timeout_connect(Some(CONNECT_TIMEOUT.min(timeout)))
        .tls_config(crate::api_auth::outgoing().tls_config())
        .build()
        .into()
}

/// `http(s)://{addr}{path}`: the scheme this node's own API uses.
pub fn node_url(addr: &str, path: &str) -> String {
    format!("{}://{addr}{path}", crate::api_auth::outgoing().scheme())
}

/// `request` with this node's API token, if it has one.
pub fn authorized<B>(request: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
    match crate::api_auth::outgoing().authorization() {
        Some(value) => request.header("authorization", value),
        None => request,
    }
}

/// GET `http://{addr}{path}` as JSON; `None` on no answer or one that is not a `T`.
async fn get_json<T: serde::de::DeserializeOwned + Send + 'static>(
    addr: &str,
    path: &str,
    timeout: Duration,
) -> Option<T> {
    let url = node_url(addr, path);
    tokio::task::spawn_blocking(move || {
        let mut response = authorized(agent(timeout).get(&url)).call().ok()?;
        response.body_mut().read_json::<T>().ok()
    })
    .await
    .ok()
    .flatten()
}

/// Whether the API at `addr` answers as node `name`.
pub async fn is_node(addr: &str, name: &str) -> bool {
    get_json::<Health>(addr, "/v1/health", Duration::from_secs(1))
        .await
        .is_some_and(|v| v.node == name)
}

/// Ask every peer, concurrently, whether it reaches the registry: `Some(reaches)` per peer
/// that answered within `timeout`, `None` for the others.
pub async fn probe_registry(peers: &[NodeRecord], timeout: Duration) -> Vec<Option<bool>> {
    let asks = peers.iter().map(|peer| {
        let addr = peer.api_addr.clone();
        async move {
            get_json::<RegistryReachable>(&addr, "/v1/cluster/registry", timeout)
                .await
                .map(|v| v.reachable)
        }
    });
    futures::future::join_all(asks).await
}

/// The owner's answer to a forwarded request: status and JSON body.
pub struct Forwarded {
    pub status: u16,
    pub body: Value,
}

/// Send `method path` with `body` (JSON, or none) to the API at `addr`, marked as forwarded.
pub async fn forward(
    addr: &str,
    method: &str,
    path_and_query: &str,
    body: Option<Vec<u8>>,
) -> Result<Forwarded, String> {
    let url = node_url(addr, path_and_query);
    let method = method.to_string();
    let target = addr.to_string();
    let timeout = if method.eq_ignore_ascii_case("GET") {
        FORWARD_GET_TIMEOUT
    } else {
        FORWARD_TIMEOUT
    };
    tokio::task::spawn_blocking(move || {
        let agent = agent(timeout);
        let mut request = ureq::http::Request::builder()
            .method(method.as_str())
            .uri(&url)
            .header(FORWARDED, "1")
            .header("content-type", "application/json");
        if let Some(value) = crate::api_auth::outgoing().authorization() {
            request = request.header("authorization", value);
        }
        let request = request
            .body(body.unwrap_or_default())
            .map_err(|e| e.to_string())?;
        let mut response = agent
            .run(request)
            .map_err(|e| format!("cannot reach node API {target}: {e}"))?;
        let status = response.status().as_u16();
        let body = response
            .body_mut()
            .read_json::<Value>()
            .map_err(|e| format!("node API {target} sent a reply that is not JSON: {e}"))?;
        Ok(Forwarded { status, body })
    })
    .await
    .map_err(|e| e.to_string())?
}
