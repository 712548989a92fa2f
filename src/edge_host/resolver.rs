//! The edge's [`Resolver`]: volume record → owner key (the owner is alive) → the owner node's
//! record → its edge listener (`vstor serve --edge-listen`). The tag is the volume record's
//! owner tag, the one the owner holds the volume under. A `VOLUME@SNAPSHOT` export is served by
//! the volume's owner.

use std::sync::Arc;

use futures::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use vstor_edge::remote::{Endpoint, ResolveFuture, Resolver, WatchFuture};

use crate::export::export_volume;
use crate::registry::Registry;

pub struct RegistryResolver {
    pub registry: Arc<dyn Registry>,
    /// This host's id: an owner on the same host is dialled at its unix socket.
    pub local_host: Option<String>,
}

/// Where `volume` is served, or why it cannot be (a sentence naming the volume and node). An
/// owner whose `host_id` is `local_host` and that has an `edge_socket` is given with it.
pub async fn resolve(
    registry: &dyn Registry,
    export: &str,
    local_host: Option<&str>,
) -> Result<Endpoint, String> {
    let volume = export_volume(export);
    let record = registry
        .volume(volume)
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("volume {volume} is not in the cluster registry"))?;
    let owner = registry.owner(volume).await.map_err(|e| e.to_string())?;
    if owner.is_none() {
        return Err(format!(
            "the owner of volume {volume}, node {}, is not alive (waiting for failover)",
            record.owner
        ));
    }
    let node = registry
        .live_nodes()
        .await
        .map_err(|e| e.to_string())?
        .into_iter()
        .find(|n| n.name == record.owner)
        .ok_or_else(|| {
            format!(
                "the owner of volume {volume}, node {}, is not alive",
                record.owner
            )
        })?;
    let addr = node.edge_addr.clone().ok_or_else(|| {
        format!(
            "node {} owns volume {volume} but serves no edges (start it with --edge-listen ADDR)",
            node.name
        )
    })?;
    let same_host = local_host.is_some() && node.host_id.as_deref() == local_host;
    Ok(Endpoint {
        node: node.name,
        addr,
        tag: record.owner_tag,
        unix: node.edge_socket.filter(|_| same_host),
    })
}

impl Resolver for RegistryResolver {
    fn resolve(&self, volume: &str) -> ResolveFuture {
        let registry = self.registry.clone();
        let local_host = self.local_host.clone();
        let volume = volume.to_string();
        Box::pin(async move { resolve(registry.as_ref(), &volume, local_host.as_deref()).await })
    }

    /// The volume's record and owner key (`Registry::watch_volume`), which the adoption or move
    /// writes. A registry that cannot watch leaves the edge polling (`None`).
    fn watch(&self, export: &str) -> WatchFuture {
        let registry = self.registry.clone();
        let volume = export_volume(export).to_string();
        Box::pin(async move {
            match registry.watch_volume(&volume).await {
                Ok(changes) => Some(ReceiverStream::new(changes).map(|_| ()).boxed()),
                Err(e) => {
                    tracing::debug!(volume, error = %e, "cannot watch the volume; polling");
                    None
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::registry::local::LocalRegistry;
    use crate::registry::{NodeRecord, VolumeRecord, VolumeState};

    fn node(name: &str, edge_addr: Option<&str>) -> NodeRecord {
        NodeRecord {
            name: name.into(),
            domain: "a".into(),
            recovery_domain: None,
            api_addr: "127.0.0.1:1".into(),
            nbd_addr: "127.0.0.1:2".into(),
            dtl_addr: "127.0.0.1:3".into(),
            edge_addr: edge_addr.map(Into::into),
            edge_socket: Some(format!("/run/{name}.sock")),
            host_id: Some(format!("host-of-{name}")),
            started_at: 0,
            version: String::new(),
        }
    }

    fn volume(name: &str, owner: &str, tag: u64) -> VolumeRecord {
        VolumeRecord {
            name: name.into(),
            owner: owner.into(),
            owner_tag: tag,
            dtl_node: None,
            dtl_addr: None,
            dtl_mode: vstor_volumedriver::DtlMode::None,
            state: VolumeState::Serving,
            size: 1 << 20,
            created_at: 0,
        }
    }

    #[tokio::test]
    async fn resolves_owner_edge_address_and_tag_or_says_why_not() {
        let dir = tempfile::tempdir().unwrap();
        let registry = LocalRegistry::open(&dir.path().join("r")).unwrap();
        let ttl = Duration::from_secs(5);
        let n1 = registry
            .register_node(&node("n1", Some("127.0.0.1:9")), ttl)
            .await
            .unwrap();
        let n2 = registry
            .register_node(&node("n2", None), ttl)
            .await
            .unwrap();
        registry
            .create_volume(&volume("v", "n1", 4), n1.id)
            .await
            .unwrap();
        registry
            .create_volume(&volume("w", "n2", 1), n2.id)
            .await
            .unwrap();
        let want = Endpoint {
            node: "n1".into(),
            addr: "127.0.0.1:9".into(),
            tag: 4,
            unix: None,
        };
        assert_eq!(resolve(&registry, "v", None).await.unwrap(), want);
        assert_eq!(resolve(&registry, "v@snap", None).await.unwrap(), want);
        // The unix socket only for an edge on the owner's own host.
        let other_host = resolve(&registry, "v", Some("host-of-n2")).await.unwrap();
        assert_eq!(other_host, want);
        let same_host = resolve(&registry, "v", Some("host-of-n1")).await.unwrap();
        assert_eq!(same_host.unix.as_deref(), Some("/run/n1.sock"));
        assert_eq!((same_host.addr, same_host.tag), (want.addr.clone(), 4));
        let err = resolve(&registry, "nope", None).await.unwrap_err();
        assert_eq!(err, "volume nope is not in the cluster registry");
        let err = resolve(&registry, "w", None).await.unwrap_err();
        assert!(
            err.contains("node n2 owns volume w but serves no edges"),
            "{err}"
        );
        registry.revoke(n1.id).await.unwrap();
        let err = resolve(&registry, "v", None).await.unwrap_err();
        assert!(err.contains("node n1, is not alive"), "{err}");
    }
}
