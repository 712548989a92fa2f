//! The edge's [`Resolver`]: volume record → owner key (the owner is alive) → the owner node's
//! record → its edge listener (`vstor serve --edge-listen`). The tag is the volume record's
//! owner tag, the one the owner holds the volume under. A `VOLUME@SNAPSHOT` export is served by
//! the volume's owner.

use std::sync::Arc;

use vstor_edge::remote::{Endpoint, ResolveFuture, Resolver};

use crate::registry::Registry;

pub struct RegistryResolver(pub Arc<dyn Registry>);

/// Where `volume` is served, or why it cannot be (a sentence naming the volume and node).
pub async fn resolve(registry: &dyn Registry, export: &str) -> Result<Endpoint, String> {
    let volume = crate::export::snapshot_export_name(export).map_or(export, |(v, _)| v);
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
    Ok(Endpoint {
        node: node.name,
        addr,
        tag: record.owner_tag,
    })
}

impl Resolver for RegistryResolver {
    fn resolve(&self, volume: &str) -> ResolveFuture {
        let registry = self.0.clone();
        let volume = volume.to_string();
        Box::pin(async move { resolve(registry.as_ref(), &volume).await })
    }
}
