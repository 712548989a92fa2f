//! Server side of the edge protocol (runs in `vstor serve --edge-listen ADDR`). SKELETON: the
//! public API is fixed; the implementation is being written.

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::RemoteExports;

/// Tunables of the edge server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EdgeServerConfig {
    /// Requests one connection may have in flight before the server stops reading its socket.
    pub max_inflight: usize,
}

impl Default for EdgeServerConfig {
    fn default() -> Self {
        Self { max_inflight: 256 }
    }
}

/// Serve the edge protocol on `listener` until `shutdown` is cancelled; then every connection is
/// closed (clients reconnect elsewhere or later).
pub async fn serve(
    listener: TcpListener,
    exports: Arc<dyn RemoteExports>,
    config: EdgeServerConfig,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let _ = (listener, exports, config, shutdown);
    unimplemented!("edge server")
}
