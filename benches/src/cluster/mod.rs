//! `vstor-bench cluster`: how long a volume is unavailable when its node dies, and what a
//! `volume move` costs, on a real 3-node cluster (one `etcd`, three `vstor serve --registry`
//! processes on loopback sharing a local backend directory).
//!
//! - **Failover**, repeated `kills` times: a writer (queue depth 1, sync DTL) writes to the
//!   volume; its owner gets `kill -9`. *Detection* is the time until a survivor's
//!   `GET /v1/nodes` shows the owner dead (its etcd lease expired). *Adoption* is the time from
//!   there until a survivor's `GET /v1/volumes/NAME` names a new, live owner. The *I/O pause* is
//!   what the writer saw: the gap between its last acknowledgement on the old owner and its first
//!   on the new one, reconnection included. The killed node is restarted before the next round,
//!   so every round kills the current owner of a 3-node cluster.
//! - **Move**, repeated `moves` times: `POST /v1/volumes/NAME/move` to the next node under the
//!   same writer: the call's duration and the writer's pause.
//! - **Nothing lost**: afterwards every block is read back through the final owner; a block
//!   older than its last acknowledged write counts as lost. The report prints the count (it must
//!   be 0).
//!
//! No peer runs here (a Ceph or Vitastor cluster cannot be installed on this machine), so the
//! ratios are against the peers' documented defaults: Ceph marks an OSD down after
//! `osd_heartbeat_grace` = 20 s, and Vitastor pauses I/O for 5–10 s on an OSD failure.
//! Polls run every 10 ms, which bounds the resolution of detection and adoption.

mod load;
pub(crate) mod nodes;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::json;

use crate::common::process::InterruptGuard;
use crate::common::setup;
use crate::common::stats::percentile;
use load::Writer;
use nodes::{node_alive, Etcd, Node};

const VOLUME: &str = "failover";
const NODES: [&str; 3] = ["n1", "n2", "n3"];
const POLL: Duration = Duration::from_millis(10);
/// Longest wait for any one step (detection, adoption, a node's restart).
const STEP_TIMEOUT: Duration = Duration::from_secs(60);
/// Acknowledged writes each round waits for before the kill, so the DTL holds data to replay.
const WRITES_BEFORE_KILL: u64 = 200;
/// Peers' documented failure handling, for the ratio columns.
const CEPH_HEARTBEAT_GRACE_S: f64 = 20.0;
const VITASTOR_PAUSE_S: f64 = 5.0;

/// Settings of `vstor-bench cluster`.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    pub vstor_bin: PathBuf,
    /// Owner kills to measure.
    pub kills: u32,
    /// Moves to measure.
    pub moves: u32,
    pub json: bool,
    pub work_dir: Option<PathBuf>,
    /// Write through a `vstor edge` (its NBD export) instead of to the owner directly.
    pub edge: bool,
}

struct Kill {
    detection: Duration,
    adoption: Duration,
    pause: Duration,
}

struct Move {
    duration: Duration,
    pause: Duration,
}

/// Runs the benchmark and prints the report to stdout; progress goes to stderr.
pub fn run(options: &ClusterOptions) -> Result<()> {
    if options.kills == 0 && options.moves == 0 {
        bail!("nothing to measure: --kills and --moves are both 0");
    }
    let vstor_bin = setup::resolve_vstor_bin(&options.vstor_bin)?;
    let _signals = InterruptGuard::install()?;
    let work = setup::work_dir(options.work_dir.as_deref())?;
    progress(format_args!("work directory {}", work.path().display()));
    let etcd = Etcd::start(work.path())?;
    let backend = work.path().join("backend");
    let extra: &[&str] = if options.edge {
        &["--edge-listen", "127.0.0.1:0"]
    } else {
        &[]
    };
    let mut nodes = NODES
        .iter()
        .map(|name| {
            Node::start_with(
                &vstor_bin,
                work.path(),
                etcd.client_port,
                name,
                &backend,
                extra,
            )
        })
        .collect::<Result<Vec<_>>>()?;
    progress(format_args!(
        "3 nodes registered in etcd on port {}",
        etcd.client_port
    ));
    create_volume(&nodes[0].api)?;

    let edge = if options.edge {
        let edge = crate::edge::procs::Edge::start(
            &vstor_bin,
            work.path(),
            "edge",
            &format!("etcd://127.0.0.1:{}", etcd.client_port),
            None,
            &[],
        )?;
        edge.cli(&["attach", VOLUME])?;
        progress(format_args!(
            "writing through vstor edge at nbd://{}",
            edge.nbd
        ));
        Some(edge)
    } else {
        None
    };
    let writer = match &edge {
        Some(edge) => Writer::start_fixed(VOLUME, &edge.nbd),
        None => Writer::start(VOLUME, apis(&nodes)),
    };
    let mut kills = Vec::new();
    for round in 1..=options.kills {
        let kill =
            measure_kill(&mut nodes, &writer).with_context(|| format!("failover round {round}"))?;
        progress(format_args!(
            "kill {round}/{}: detected in {} ms, adopted {} ms later, I/O pause {} ms",
            options.kills,
            kill.detection.as_millis(),
            kill.adoption.as_millis(),
            kill.pause.as_millis()
        ));
        kills.push(kill);
    }
    let mut moves = Vec::new();
    for round in 1..=options.moves {
        let moved = measure_move(&nodes, &writer).with_context(|| format!("move {round}"))?;
        progress(format_args!(
            "move {round}/{}: {} ms, I/O pause {} ms",
            options.moves,
            moved.duration.as_millis(),
            moved.pause.as_millis()
        ));
        moves.push(moved);
    }
    let (acked, reconnects, expected) = writer.finish()?;
    if let Some(edge) = &edge {
        if reconnects != 1 {
            bail!("the writer on the edge had to connect {reconnects} times (an error reached it)");
        }
        progress(format_args!(
            "edge: {}",
            edge.entry(VOLUME)?.unwrap_or_default()
        ));
    }
    let (lost, corrupt) = load::verify(&apis(&nodes), VOLUME, &expected)?;
    progress(format_args!(
        "{acked} writes acknowledged, {reconnects} connections; read back: {lost} lost, {corrupt} corrupt"
    ));
    let report = Report {
        kills,
        moves,
        acked,
        lost,
        corrupt,
        edge: options.edge,
    };
    if options.json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.to_table());
    }
    if lost + corrupt > 0 {
        bail!("{lost} acknowledged writes lost and {corrupt} blocks corrupt");
    }
    Ok(())
}

fn apis(nodes: &[Node]) -> Vec<String> {
    nodes
        .iter()
        .filter(|n| n.is_running())
        .map(|n| n.api.clone())
        .collect()
}

fn create_volume(api: &str) -> Result<()> {
    nodes::post(
        api,
        "/v1/volumes",
        &json!({"name": VOLUME, "size": 1u64 << 30, "node": NODES[0], "dtl_mode": "sync"}),
        STEP_TIMEOUT,
    )
    .context("creating the volume")
}

/// Poll `what` every [`POLL`] until it gives `Some`, for at most [`STEP_TIMEOUT`].
fn poll<T>(what: &str, mut check: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        crate::common::process::check_interrupted()?;
        if let Some(value) = check()? {
            return Ok(value);
        }
        if Instant::now() > deadline {
            bail!("{what}: not within {} s", STEP_TIMEOUT.as_secs());
        }
        std::thread::sleep(POLL);
    }
}

fn measure_kill(nodes: &mut [Node], writer: &Writer) -> Result<Kill> {
    let before = writer.acked();
    poll("writes before the kill", || {
        Ok((writer.acked() >= before + WRITES_BEFORE_KILL).then_some(()))
    })?;
    let (owner, _) = poll("the volume's owner", || {
        Ok(load::locate(&apis(nodes), VOLUME))
    })?;
    // Kill only once the DTL is back in sync after the previous round (the restarted node may
    // hold it and catch up): with the DTL out of sync a failover may lose acknowledged writes,
    // and an edge then rightly fails the writes in flight instead of resending them.
    poll("the volume's DTL in sync", || {
        Ok(apis(nodes).iter().find_map(|api| {
            nodes::get(api, &format!("/v1/volumes/{VOLUME}"))
                .ok()
                .flatten()
                .filter(|info| {
                    info.get("dtl_in_sync").and_then(serde_json::Value::as_bool) == Some(true)
                })
                .map(drop)
        }))
    })?;
    let victim = nodes
        .iter()
        .position(|n| n.name == owner)
        .ok_or_else(|| anyhow!("owner {owner} is not one of the benchmark's nodes"))?;
    let survivor = nodes
        .iter()
        .find(|n| n.name != owner && n.is_running())
        .map(|n| n.api.clone())
        .ok_or_else(|| anyhow!("no surviving node"))?;
    let killed_at = Instant::now();
    nodes[victim].kill9()?;
    writer.set_apis(apis(nodes));
    let detected_at = poll("the survivors see the owner dead", || {
        Ok((node_alive(&survivor, &owner)? == Some(false)).then(Instant::now))
    })?;
    let adopted_at = poll("a new owner serves the volume", || {
        Ok(nodes::owner_of(&survivor, VOLUME)?
            .filter(|(new, _)| *new != owner)
            .map(|_| Instant::now()))
    })
    .map_err(|e| {
        anyhow!(
            "{e}\nlog of a survivor:\n{}",
            nodes[(victim + 1) % 3].log_tail()
        )
    })?;
    // After the adoption, not after the kill: `kill9` returns once the process is gone, and
    // until then the dying owner still acknowledges writes, so an acknowledgement after
    // `killed_at` can be the old owner's, and the pause would be measured before it began.
    poll("the writer's first write on the new owner", || {
        Ok(writer.last_ack().filter(|at| *at > adopted_at).map(drop))
    })?;
    let pause = writer.pause_around(killed_at, Instant::now());
    nodes[victim]
        .restart()
        .with_context(|| format!("restarting {owner}"))?;
    writer.set_apis(apis(nodes));
    let api = nodes[victim].api.clone();
    poll("the restarted node is alive", || {
        Ok((node_alive(&api, &owner)? == Some(true)).then_some(()))
    })?;
    Ok(Kill {
        detection: detected_at - killed_at,
        adoption: adopted_at.saturating_duration_since(detected_at),
        pause,
    })
}

fn measure_move(nodes: &[Node], writer: &Writer) -> Result<Move> {
    let (owner, _) = poll("the volume's owner", || {
        Ok(load::locate(&apis(nodes), VOLUME))
    })?;
    let index = nodes
        .iter()
        .position(|n| n.name == owner)
        .ok_or_else(|| anyhow!("owner {owner} is not one of the benchmark's nodes"))?;
    let target = &nodes[(index + 1) % nodes.len()];
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(180)))
        .http_status_as_error(false)
        .build()
        .into();
    let started = Instant::now();
    let mut response = agent
        .post(format!("http://{}/v1/volumes/{VOLUME}/move", target.api))
        .send_json(json!({"to": target.name}))
        .context("move request")?;
    let finished = Instant::now();
    if !response.status().is_success() {
        let body = response.body_mut().read_to_string().unwrap_or_default();
        bail!("move to {}: {}: {body}", target.name, response.status());
    }
    poll("the writer's first write after the move", || {
        Ok(writer.last_ack().filter(|at| *at > finished).map(drop))
    })?;
    Ok(Move {
        duration: finished - started,
        pause: writer.pause_around(started, Instant::now()),
    })
}

struct Report {
    kills: Vec<Kill>,
    moves: Vec<Move>,
    acked: u64,
    lost: u64,
    corrupt: u64,
    /// The writer went through a `vstor edge`.
    edge: bool,
}

fn millis(values: impl Iterator<Item = Duration>) -> Vec<f64> {
    values.map(|d| d.as_secs_f64() * 1000.0).collect()
}

impl Report {
    fn series(&self) -> Vec<(&'static str, Vec<f64>, Option<f64>)> {
        vec![
            (
                "failover: detection",
                millis(self.kills.iter().map(|k| k.detection)),
                Some(CEPH_HEARTBEAT_GRACE_S * 1000.0),
            ),
            (
                "failover: adoption",
                millis(self.kills.iter().map(|k| k.adoption)),
                None,
            ),
            (
                "failover: I/O pause",
                millis(self.kills.iter().map(|k| k.pause)),
                Some(VITASTOR_PAUSE_S * 1000.0),
            ),
            (
                "move: duration",
                millis(self.moves.iter().map(|m| m.duration)),
                None,
            ),
            (
                "move: I/O pause",
                millis(self.moves.iter().map(|m| m.pause)),
                None,
            ),
        ]
    }

    fn to_table(&self) -> String {
        let mut out = format!(
            "vstor cluster: 3 nodes on one etcd, {} owner kills (kill -9), {} moves; writer at QD1 with a sync DTL{}\n\n",
            self.kills.len(),
            self.moves.len(),
            if self.edge {
                ", through vstor edge (the pause is what a guest on the edge sees)"
            } else {
                ", reconnecting to the new owner itself"
            }
        );
        out.push_str(&format!(
            "{:<22} {:>4} {:>9} {:>9} {:>9}  {}\n",
            "measure", "n", "p50 ms", "p99 ms", "max ms", "vs peer default"
        ));
        for (name, values, peer) in self.series() {
            if values.is_empty() {
                continue;
            }
            let p50 = percentile(&values, 50.0);
            let p99 = percentile(&values, 99.0);
            let max = values.iter().copied().fold(0.0, f64::max);
            let versus = peer.map_or(String::new(), |peer| {
                format!("{:.2}x of {:.0} s", p50 / peer, peer / 1000.0)
            });
            out.push_str(&format!(
                "{name:<22} {:>4} {p50:>9.0} {p99:>9.0} {max:>9.0}  {versus}\n",
                values.len()
            ));
        }
        out.push_str(&format!(
            "\n{} writes acknowledged; read back through the final owner: {} lost, {} corrupt\n\
             peer defaults: Ceph osd_heartbeat_grace {CEPH_HEARTBEAT_GRACE_S} s (detection), \
             Vitastor I/O pause on failure {VITASTOR_PAUSE_S}-10 s\n",
            self.acked, self.lost, self.corrupt
        ));
        out
    }

    fn to_json(&self) -> String {
        let series: serde_json::Map<String, serde_json::Value> = self
            .series()
            .into_iter()
            .map(|(name, values, _)| {
                let stats = if values.is_empty() {
                    json!(null)
                } else {
                    json!({
                        "n": values.len(),
                        "p50_ms": percentile(&values, 50.0),
                        "p99_ms": percentile(&values, 99.0),
                        "samples_ms": values,
                    })
                };
                (name.to_string(), stats)
            })
            .collect();
        json!({
            "series": series,
            "acked_writes": self.acked,
            "through_edge": self.edge,
            "lost": self.lost,
            "corrupt": self.corrupt,
        })
        .to_string()
    }
}

fn progress(message: std::fmt::Arguments) {
    eprintln!("bench cluster: {message}");
}
