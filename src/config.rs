//! `vstor serve` settings: built-in defaults, overridden by a TOML file (`--config`), overridden
//! by command-line flags. `docs/vstor.example.toml` documents every setting and is checked by a
//! test to parse to exactly these defaults.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use crate::size::parse_size;
use vstor_volumedriver::DtlMode;

pub const DEFAULT_API: &str = "127.0.0.1:7800";
pub const DEFAULT_NBD: &str = "127.0.0.1:10809";

/// Settings as written in the TOML file; sizes are strings with K/M/G/T suffixes.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileConfig {
    pub data_dir: PathBuf,
    /// Backend: a directory, or `s3://BUCKET[/PREFIX]`; empty means `<data_dir>/backend`.
    pub backend: Option<PathBuf>,
    pub api: String,
    pub nbd: String,
    /// Directory of vhost-user-blk sockets; empty means `<data_dir>/vhost`.
    pub vhost_dir: Option<PathBuf>,
    /// DTL server (`host:port`) new volumes mirror their writes to; empty means none.
    pub dtl: String,
    pub write_buffer_limit: String,
    pub shutdown_upload_timeout_secs: u64,
    pub default_volume: DefaultVolume,
    pub volume_defaults: VolumeDefaults,
    pub nbd_server: NbdSettings,
    pub vhost: VhostSettings,
    pub scrub: ScrubSettings,
}

/// Background scrubbing: reclaim backend space once a volume's garbage passes a threshold.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScrubSettings {
    pub auto: bool,
    /// Overwritten or trimmed data (`garbage_bytes`) above which a volume is scrubbed.
    pub garbage_threshold: String,
    /// Bytes per second a background scrub copies at most; "0" means unlimited.
    pub rate: String,
    pub check_interval_secs: u64,
}

impl Default for ScrubSettings {
    fn default() -> Self {
        Self {
            auto: true,
            garbage_threshold: "1G".into(),
            rate: "64M".into(),
            check_interval_secs: 30,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VhostSettings {
    pub num_queues: u16,
    pub queue_size: u16,
}

impl Default for VhostSettings {
    fn default() -> Self {
        Self {
            num_queues: 4,
            queue_size: 256,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DefaultVolume {
    pub create: bool,
    pub name: String,
    pub size: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VolumeDefaults {
    pub sco_size: String,
    pub write_buffer: String,
    /// DTL mode of new volumes when a DTL is configured: sync or async.
    pub dtl_mode: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NbdSettings {
    pub max_payload: String,
    pub max_inflight_per_connection: usize,
}

impl Default for FileConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./vstor-data"),
            backend: None,
            api: DEFAULT_API.into(),
            nbd: DEFAULT_NBD.into(),
            vhost_dir: None,
            dtl: String::new(),
            write_buffer_limit: "8G".into(),
            shutdown_upload_timeout_secs: 120,
            default_volume: DefaultVolume::default(),
            volume_defaults: VolumeDefaults::default(),
            nbd_server: NbdSettings::default(),
            vhost: VhostSettings::default(),
            scrub: ScrubSettings::default(),
        }
    }
}

impl Default for DefaultVolume {
    fn default() -> Self {
        Self {
            create: true,
            name: "vol0".into(),
            size: "10G".into(),
        }
    }
}

impl Default for VolumeDefaults {
    fn default() -> Self {
        Self {
            sco_size: "64M".into(),
            write_buffer: "1G".into(),
            dtl_mode: "sync".into(),
        }
    }
}

impl Default for NbdSettings {
    fn default() -> Self {
        Self {
            max_payload: "32M".into(),
            max_inflight_per_connection: 64,
        }
    }
}

/// Where the node keeps its backend objects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendSpec {
    /// A local (or shared) directory.
    Dir(PathBuf),
    /// An S3 bucket and key prefix; endpoint and credentials come from the `AWS_*` environment.
    S3(vstor_backend::S3Location),
}

impl BackendSpec {
    /// A value starting with `s3://` selects S3, anything else is a directory.
    pub fn parse(value: &std::path::Path) -> Result<Self> {
        match value.to_str() {
            Some(text) if text.starts_with("s3://") => Ok(Self::S3(
                vstor_backend::S3Location::parse(text)
                    .map_err(|e| anyhow::anyhow!("setting backend: {e}"))?,
            )),
            _ => Ok(Self::Dir(value.to_path_buf())),
        }
    }
}

impl std::fmt::Display for BackendSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Dir(dir) => write!(f, "{}", dir.display()),
            Self::S3(location) => write!(f, "{location}"),
        }
    }
}

/// Resolved, validated settings.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub data_dir: PathBuf,
    pub backend: BackendSpec,
    pub api: SocketAddr,
    pub nbd: SocketAddr,
    pub vhost_dir: PathBuf,
    pub vhost_queues: u16,
    pub vhost_queue_size: u16,
    pub write_buffer_limit: u64,
    pub shutdown_upload_timeout_secs: u64,
    pub default_volume: Option<(String, u64)>,
    pub sco_size: u64,
    pub write_buffer: u64,
    pub nbd_max_payload: u32,
    pub nbd_max_inflight: usize,
    /// DTL of new volumes: `None` means mode `none`.
    pub dtl: Option<(DtlMode, String)>,
    /// Background scrubbing; `None` when `scrub.auto` is false.
    pub auto_scrub: Option<AutoScrub>,
}

/// Resolved `[scrub]` settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AutoScrub {
    pub garbage_threshold: u64,
    /// Bytes per second; `None` is unlimited.
    pub rate: Option<u64>,
    pub check_interval: std::time::Duration,
}

/// Flags of `vstor serve` that override the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub data_dir: Option<PathBuf>,
    pub backend: Option<PathBuf>,
    pub api: Option<String>,
    pub nbd: Option<String>,
    pub vhost_dir: Option<PathBuf>,
    pub dtl: Option<String>,
    pub write_buffer_limit: Option<String>,
    pub no_default_volume: bool,
}

fn parse_addr(what: &str, value: &str) -> Result<SocketAddr> {
    value
        .parse()
        .with_context(|| format!("{what} address {value:?} is not IP:PORT"))
}

fn size_setting(what: &str, value: &str) -> Result<u64> {
    parse_size(value).with_context(|| format!("setting {what}"))
}

impl FileConfig {
    pub fn load(path: &std::path::Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("invalid config file {}", path.display()))
    }

    pub fn resolve(mut self, overrides: Overrides) -> Result<ServeConfig> {
        if let Some(dir) = overrides.data_dir {
            self.data_dir = dir;
        }
        if let Some(dir) = overrides.backend {
            self.backend = Some(dir);
        }
        if let Some(api) = overrides.api {
            self.api = api;
        }
        if let Some(nbd) = overrides.nbd {
            self.nbd = nbd;
        }
        if let Some(dir) = overrides.vhost_dir {
            self.vhost_dir = Some(dir);
        }
        if let Some(dtl) = overrides.dtl {
            self.dtl = dtl;
        }
        if let Some(limit) = overrides.write_buffer_limit {
            self.write_buffer_limit = limit;
        }
        if overrides.no_default_volume {
            self.default_volume.create = false;
        }
        let max_payload = size_setting("nbd_server.max_payload", &self.nbd_server.max_payload)?;
        if !(4096..=u32::MAX as u64).contains(&max_payload) {
            bail!("nbd_server.max_payload must be between 4K and 4G");
        }
        if !(1..=8).contains(&self.vhost.num_queues) {
            bail!("vhost.num_queues must be between 1 and 8");
        }
        if !self.vhost.queue_size.is_power_of_two() || self.vhost.queue_size > 1024 {
            bail!("vhost.queue_size must be a power of two up to 1024");
        }
        if self.nbd_server.max_inflight_per_connection == 0 {
            bail!("nbd_server.max_inflight_per_connection must be at least 1");
        }
        let dtl_mode: DtlMode = self
            .volume_defaults
            .dtl_mode
            .parse()
            .map_err(|e| anyhow::anyhow!("setting volume_defaults.dtl_mode: {e}"))?;
        if dtl_mode == DtlMode::None {
            bail!("volume_defaults.dtl_mode must be sync or async (leave `dtl` empty for no DTL)");
        }
        let dtl = match self.dtl.trim() {
            "" => None,
            addr => {
                if !addr.contains(':') {
                    bail!("DTL address {addr:?} is not HOST:PORT");
                }
                Some((dtl_mode, addr.to_string()))
            }
        };
        let auto_scrub = if self.scrub.auto {
            if self.scrub.check_interval_secs == 0 {
                bail!("scrub.check_interval_secs must be at least 1");
            }
            let rate = size_setting("scrub.rate", &self.scrub.rate)?;
            Some(AutoScrub {
                garbage_threshold: size_setting(
                    "scrub.garbage_threshold",
                    &self.scrub.garbage_threshold,
                )?,
                rate: (rate > 0).then_some(rate),
                check_interval: std::time::Duration::from_secs(self.scrub.check_interval_secs),
            })
        } else {
            None
        };
        let default_volume = if self.default_volume.create {
            Some((
                self.default_volume.name.clone(),
                size_setting("default_volume.size", &self.default_volume.size)?,
            ))
        } else {
            None
        };
        Ok(ServeConfig {
            backend: BackendSpec::parse(
                &self
                    .backend
                    .clone()
                    .unwrap_or_else(|| self.data_dir.join("backend")),
            )?,
            api: parse_addr("API", &self.api)?,
            nbd: parse_addr("NBD", &self.nbd)?,
            vhost_dir: self
                .vhost_dir
                .clone()
                .unwrap_or_else(|| self.data_dir.join("vhost")),
            vhost_queues: self.vhost.num_queues,
            vhost_queue_size: self.vhost.queue_size,
            write_buffer_limit: size_setting("write_buffer_limit", &self.write_buffer_limit)?,
            shutdown_upload_timeout_secs: self.shutdown_upload_timeout_secs,
            default_volume,
            sco_size: size_setting("volume_defaults.sco_size", &self.volume_defaults.sco_size)?,
            write_buffer: size_setting(
                "volume_defaults.write_buffer",
                &self.volume_defaults.write_buffer,
            )?,
            nbd_max_payload: max_payload as u32,
            nbd_max_inflight: self.nbd_server.max_inflight_per_connection,
            dtl,
            auto_scrub,
            data_dir: self.data_dir,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_documents_the_defaults() {
        let text = include_str!("../docs/vstor.example.toml");
        let parsed: FileConfig = toml::from_str(text).expect("example parses");
        assert_eq!(parsed, FileConfig::default());
    }

    #[test]
    fn unknown_settings_and_bad_values_are_rejected() {
        assert!(toml::from_str::<FileConfig>("dat_dir = \"x\"").is_err());
        let bad = FileConfig {
            api: "localhost".into(),
            ..FileConfig::default()
        };
        let err = bad.resolve(Overrides::default()).unwrap_err();
        assert!(
            format!("{err:#}").contains("API address \"localhost\""),
            "{err:#}"
        );
        let bad = FileConfig {
            write_buffer_limit: "lots".into(),
            ..FileConfig::default()
        };
        let err = bad.resolve(Overrides::default()).unwrap_err();
        assert!(format!("{err:#}").contains("write_buffer_limit"), "{err:#}");
        let bad = FileConfig {
            scrub: ScrubSettings {
                rate: "fast".into(),
                ..ScrubSettings::default()
            },
            ..FileConfig::default()
        };
        let err = bad.resolve(Overrides::default()).unwrap_err();
        assert!(format!("{err:#}").contains("scrub.rate"), "{err:#}");
    }

    #[test]
    fn scrub_settings_resolve() {
        let config = FileConfig::default().resolve(Overrides::default()).unwrap();
        assert_eq!(
            config.auto_scrub,
            Some(AutoScrub {
                garbage_threshold: 1 << 30,
                rate: Some(64 << 20),
                check_interval: std::time::Duration::from_secs(30),
            })
        );
        let text = "[scrub]\nauto = false\n";
        let off: FileConfig = toml::from_str(text).unwrap();
        assert!(off
            .resolve(Overrides::default())
            .unwrap()
            .auto_scrub
            .is_none());
        let unlimited: FileConfig = toml::from_str("[scrub]\nrate = \"0\"\n").unwrap();
        let resolved = unlimited.resolve(Overrides::default()).unwrap();
        assert_eq!(resolved.auto_scrub.unwrap().rate, None);
    }

    #[test]
    fn flags_override_the_file() {
        let config = FileConfig::default()
            .resolve(Overrides {
                data_dir: Some("/tmp/d".into()),
                nbd: Some("127.0.0.1:0".into()),
                no_default_volume: true,
                ..Overrides::default()
            })
            .unwrap();
        assert_eq!(
            config.backend,
            BackendSpec::Dir(PathBuf::from("/tmp/d/backend"))
        );
        assert_eq!(config.nbd.port(), 0);
        assert!(config.default_volume.is_none());
    }

    #[test]
    fn backend_values_starting_with_s3_select_s3() {
        let resolve = |backend: &str| {
            FileConfig::default().resolve(Overrides {
                backend: Some(backend.into()),
                ..Overrides::default()
            })
        };
        let config = resolve("s3://vstor-bucket/cluster1").unwrap();
        assert_eq!(config.backend.to_string(), "s3://vstor-bucket/cluster1");
        assert!(matches!(config.backend, BackendSpec::S3(ref l) if l.prefix == "cluster1"));
        let file: FileConfig = toml::from_str("backend = \"s3://other\"\n").unwrap();
        let config = file.resolve(Overrides::default()).unwrap();
        assert!(matches!(config.backend, BackendSpec::S3(ref l) if l.bucket == "other"));
        assert_eq!(
            resolve("/srv/backend").unwrap().backend,
            BackendSpec::Dir("/srv/backend".into())
        );
        let err = resolve("s3://Bad_Bucket").unwrap_err().to_string();
        assert!(err.contains("s3://Bad_Bucket"), "{err}");
    }
}
