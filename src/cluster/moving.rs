//! `vstor volume move NAME --to NODE`: hand a volume from its owner to another live node.
//!
//! On the owner: check the target (known, alive, not the owner already), disconnect the
//! volume's clients, [`VolumeManager::release`] it (flush, everything on the backend, stop
//! serving), then ask the target's API to take it over (`POST /v1/volumes/{name}/takeover`
//! with the owner tag the release left in the registry). The target runs the same adoption as
//! a failover ([`Failover::adopt`]: `take_ownership` with that expected tag, then
//! `adopt_with_tag`). If the target fails, the owner takes the volume back the same way, so a
//! failed move leaves the volume served where it was.
//!
//! [`VolumeManager::release`]: vstor_volumedriver::VolumeManager::release

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use crate::api_types::{ErrorBody, TakeoverRequest, VolumeView};

use super::failover::{live_view, Failover, FailoverRecord};
use crate::registry::{NodeStatus, VolumeRecord};

/// A move that could not be done: HTTP status and message.
#[derive(Debug)]
pub struct MoveError {
    pub status: u16,
    pub message: String,
}

fn refused(status: u16, message: impl Into<String>) -> MoveError {
    MoveError {
        status,
        message: message.into(),
    }
}

async fn record(failover: &Failover, name: &str) -> Result<VolumeRecord, MoveError> {
    failover
        .registry
        .volume(name)
        .await
        .map_err(|e| refused(503, e.to_string()))?
        .ok_or_else(|| refused(404, format!("volume {name} is not in the cluster registry")))
}

/// Check that `to` can take volume `name` from this node.
pub async fn check_target(
    failover: &Failover,
    name: &str,
    to: &str,
) -> Result<(VolumeRecord, NodeStatus), MoveError> {
    let record = record(failover, name).await?;
    let me = &failover.node.name;
    if record.owner != *me {
        return Err(refused(
            409,
            format!("volume {name} is owned by {}, not {me}", record.owner),
        ));
    }
    if to == me {
        return Err(refused(
            409,
            format!("volume {name}: node {to} is already its owner"),
        ));
    }
    let nodes = failover
        .registry
        .nodes()
        .await
        .map_err(|e| refused(503, e.to_string()))?;
    let Some(target) = nodes.into_iter().find(|n| n.record.name == to) else {
        return Err(refused(404, format!("no node {to} in the cluster")));
    };
    if !target.alive {
        return Err(refused(
            409,
            format!("node {to} is dead (no live lease); volume {name} stays on {me}"),
        ));
    }
    Ok((record, target))
}

/// POST `body` to `addr` `path`; the status and the JSON answer.
async fn post(
    addr: &str,
    path: &str,
    body: TakeoverRequest,
    timeout: Duration,
) -> Result<(u16, Value), String> {
    let url = super::forward::node_url(addr, path);
    let target = addr.to_string();
    tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(timeout))
            .tls_config(crate::api_auth::outgoing().tls_config())
            .build()
            .into();
        // Marked as forwarded: the target must handle it itself, not send it to the owner.
        let mut response = super::forward::authorized(agent.post(&url))
            .header("x-vstor-forwarded", "1")
            .send_json(body)
            .map_err(|e| format!("cannot reach node API {target}: {e}"))?;
        let status = response.status().as_u16();
        let value = response
            .body_mut()
            .read_json::<Value>()
            .map_err(|e| format!("node API {target} sent a reply that is not JSON: {e}"))?;
        Ok((status, value))
    })
    .await
    .map_err(|e| e.to_string())?
}

/// Move volume `name`, owned here, to node `to`. `disconnect` runs before the release (NBD
/// clients and the vhost-user export of the volume go). Returns the target's answer (the
/// volume as the target serves it, with its `nbd_uri`).
pub async fn move_volume(
    failover: &Arc<Failover>,
    name: &str,
    to: &str,
    release_timeout: Duration,
) -> Result<VolumeView, MoveError> {
    let (record, target) = check_target(failover, name, to).await?;
    // Released here, not yet taken by the target: the registry names this node as the owner of
    // a volume nothing here serves, which the failover pass must not adopt back.
    let _held = failover.log.hold(name);
    tracing::info!(volume = %name, to, "moving volume: releasing it");
    (failover.on_dropped)(name);
    let manager = failover.manager.clone();
    let volume = name.to_string();
    let released =
        tokio::task::spawn_blocking(move || manager.release(&volume, release_timeout)).await;
    match released {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            (failover.on_served)(name);
            return Err(refused(
                409,
                format!("move of {name} to {to} not done: {e}"),
            ));
        }
        Err(e) => return Err(refused(500, e.to_string())),
    }
    let body = TakeoverRequest {
        from: failover.node.name.clone(),
        expected_tag: record.owner_tag,
    };
    let path = format!("/v1/volumes/{name}/takeover");
    let answer = post(
        &target.record.api_addr,
        &path,
        body,
        Duration::from_secs(120),
    )
    .await;
    let failure = match answer {
        Ok((status, value)) if (200..300).contains(&status) => {
            tracing::info!(volume = %name, to, "volume moved");
            return serde_json::from_value(value).map_err(|e| {
                refused(
                    502,
                    format!(
                        "node {to} took volume {name} over but answered an unexpected body: {e}"
                    ),
                )
            });
        }
        Ok((status, value)) => format!(
            "node {to} refused the takeover ({status}): {}",
            serde_json::from_value::<ErrorBody>(value)
                .map_or_else(|_| "no reason given".into(), |e| e.error)
        ),
        Err(e) => e,
    };
    // Take it back: the registry still has the tag the release left (unless the target took
    // it after all, in which case this fails and the target serves it).
    tracing::error!(volume = %name, to, error = %failure, "move failed; taking the volume back");
    let nodes = failover.registry.nodes().await.unwrap_or_default();
    let back = failover
        .adopt(
            &record,
            &nodes,
            &live_view(&nodes),
            Duration::ZERO,
            "move-back",
        )
        .await;
    let where_now = if back.is_ok() {
        format!("it stays on {}", failover.node.name)
    } else {
        "check `vstor volume info` for where it is served".to_string()
    };
    Err(refused(
        502,
        format!("move of {name} to {to} failed: {failure}; {where_now}"),
    ))
}

/// On the target of a move: take volume `name` over from `from`, whose release left owner tag
/// `expected_tag` in the registry.
pub async fn take_over(
    failover: &Arc<Failover>,
    name: &str,
    from: &str,
    expected_tag: u64,
) -> Result<FailoverRecord, MoveError> {
    let record = record(failover, name).await?;
    if record.owner != from || record.owner_tag != expected_tag {
        return Err(refused(
            409,
            format!(
                "volume {name}: the registry names {} with tag {}, not {from} with tag {expected_tag}",
                record.owner, record.owner_tag
            ),
        ));
    }
    let nodes = failover
        .registry
        .nodes()
        .await
        .map_err(|e| refused(503, e.to_string()))?;
    failover
        .adopt(&record, &nodes, &live_view(&nodes), Duration::ZERO, "move")
        .await
        .map_err(|e| {
            refused(
                409,
                format!(
                    "volume {name}: {} could not take it over: {e}",
                    failover.node.name
                ),
            )
        })
}
