//! `migrated`'s TOML configuration. Every key has a default, so an empty
//! file (or none, with `--config` unset and the default path missing) is a
//! working single-host setup. Unknown keys and bad values are refused at
//! start, naming the key (`migration.downtime_limit: ...`), because a typo
//! silently falling back to a default is worse than not starting.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::model::{check_name, AutoConvergeStep, MigrationConfiguration, MigrationOverrides};
use crate::quantity::{HumanDuration, Quantity};

pub const DEFAULT_CONFIG_PATH: &str = "/etc/migrated/config.toml";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/migrated";
pub const DEFAULT_API_SOCKET: &str = "/run/migrated/api.sock";
pub const DEFAULT_LISTEN: &str = "0.0.0.0:7878";
/// Largest config file read; a config is a few hundred bytes.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Why the config cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum LoadConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is larger than {max} bytes")]
    TooLarge { path: PathBuf, max: u64 },
    #[error("config file {path} is not valid TOML")]
    Syntax {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    /// A key is unknown or its value does not parse or is out of range.
    #[error("config file {path}: {key}: {message}")]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
}

/// The whole config file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// This host's name among its peers. Default: the kernel host name.
    pub host_name: String,
    /// VM specs, migration records and VMM sockets/logs live here.
    pub state_dir: PathBuf,
    /// The local API's unix socket (what `migratectl` talks to).
    pub api_socket: PathBuf,
    /// Permission bits of the API socket: "0600" (root only) or "0660"
    /// (plus the socket's group).
    pub api_socket_mode: String,
    /// QUIC listen address for peers; may be on a dedicated migration network.
    pub listen: SocketAddr,
    /// The VMM binary. A bare name is looked up next to `migrated`, then in PATH.
    pub vmm_binary: PathBuf,
    pub tls: TlsConfig,
    /// Peer hosts: name -> "host:port" of their QUIC listener.
    pub peers: BTreeMap<String, String>,
    pub migration: MigrationDefaults,
}

/// Certificates for mutual TLS between peers (all PEM).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// The cluster CA that signs every host's certificate.
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Defaults applied to every migration (KubeVirt's `migrations` config).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MigrationDefaults {
    /// Raise a vCPU throttle step by step when passes stop converging.
    pub allow_auto_converge: bool,
    /// "adaptive" (from the measured dirty rate and bandwidth) or "fixed"
    /// (QEMU's 20% then +10%).
    pub auto_converge_step: AutoConvergeStep,
    /// Switch to post-copy when pre-copy does not converge.
    pub allow_post_copy: bool,
    /// Seconds per GiB of guest RAM before a migration is cancelled.
    pub completion_timeout_per_gib: u64,
    /// Seconds without progress before a migration is cancelled.
    pub progress_timeout: u64,
    /// Bandwidth cap per migration, wire bytes per second; "0" (the
    /// default) = unlimited.
    pub bandwidth_per_migration: Quantity,
    /// Longest acceptable pause of the guest at switchover.
    pub downtime_limit: HumanDuration,
    /// Interval between keepalives on a peer connection.
    pub keepalive_interval: HumanDuration,
    /// Missed keepalives before the peer is declared dead.
    pub keepalive_count: u32,
    /// Migrations running at once in the whole cluster.
    pub parallel_migrations_per_cluster: u32,
    /// Outbound migrations running at once from one host.
    pub parallel_outbound_migrations_per_node: u32,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            host_name: kernel_host_name(),
            state_dir: DEFAULT_STATE_DIR.into(),
            api_socket: DEFAULT_API_SOCKET.into(),
            api_socket_mode: "0600".into(),
            listen: DEFAULT_LISTEN.parse().expect("constant address parses"),
            vmm_binary: "migrate-vmm".into(),
            tls: TlsConfig::default(),
            peers: BTreeMap::new(),
            migration: MigrationDefaults::default(),
        }
    }
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            ca: "/etc/migrated/tls/ca.pem".into(),
            cert: "/etc/migrated/tls/host.pem".into(),
            key: "/etc/migrated/tls/host.key".into(),
        }
    }
}

impl Default for MigrationDefaults {
    fn default() -> Self {
        Self {
            allow_auto_converge: false,
            auto_converge_step: AutoConvergeStep::Adaptive,
            allow_post_copy: false,
            completion_timeout_per_gib: 800,
            progress_timeout: 150,
            bandwidth_per_migration: Quantity(0),
            downtime_limit: HumanDuration::from_millis(300),
            keepalive_interval: HumanDuration::from_secs(5),
            keepalive_count: 5,
            parallel_migrations_per_cluster: 5,
            parallel_outbound_migrations_per_node: 2,
        }
    }
}

impl MigrationDefaults {
    /// What one migration runs with: these defaults, overridden by the
    /// request's options.
    pub fn resolve(&self, o: &MigrationOverrides) -> MigrationConfiguration {
        MigrationConfiguration {
            allow_auto_converge: o.allow_auto_converge.unwrap_or(self.allow_auto_converge),
            auto_converge_step: o.auto_converge_step.unwrap_or(self.auto_converge_step),
            allow_post_copy: o.post_copy_now || o.allow_post_copy.unwrap_or(self.allow_post_copy),
            completion_timeout_per_gib: o
                .completion_timeout_per_gib
                .unwrap_or(self.completion_timeout_per_gib),
            progress_timeout: o.progress_timeout.unwrap_or(self.progress_timeout),
            bandwidth_per_migration: o
                .bandwidth_per_migration
                .unwrap_or(self.bandwidth_per_migration),
            downtime_limit: o.downtime_limit.unwrap_or(self.downtime_limit),
            keepalive_interval: self.keepalive_interval,
            keepalive_count: self.keepalive_count,
            post_copy_now: o.post_copy_now,
        }
    }
}

/// The kernel's host name, or "localhost" if it cannot be read.
fn kernel_host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_ascii_lowercase())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// A config key with a bad value (before the file path is known).
struct Bad {
    key: String,
    message: String,
}

fn bad(key: impl Into<String>, message: impl Into<String>) -> Bad {
    Bad {
        key: key.into(),
        message: message.into(),
    }
}

impl Config {
    /// Reads and checks `path`.
    pub fn load(path: &Path) -> Result<Self, LoadConfigError> {
        use std::io::Read;
        let read_err = |source| LoadConfigError::Read {
            path: path.to_owned(),
            source,
        };
        let file = std::fs::File::open(path).map_err(read_err)?;
        let mut text = String::new();
        file.take(MAX_CONFIG_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(read_err)?;
        if text.len() as u64 > MAX_CONFIG_BYTES {
            return Err(LoadConfigError::TooLarge {
                path: path.to_owned(),
                max: MAX_CONFIG_BYTES,
            });
        }
        Self::parse(&text, path)
    }

    /// Parses and checks config text; `path` is only used in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, LoadConfigError> {
        let table: toml::Table = text.parse().map_err(|source| LoadConfigError::Syntax {
            path: path.to_owned(),
            source,
        })?;
        let invalid = |b: Bad| LoadConfigError::Invalid {
            path: path.to_owned(),
            key: b.key,
            message: b.message,
        };
        // Deserializing from the parsed value (rather than the text) lets
        // serde_path_to_error report the dotted key of a bad value.
        let config: Config =
            serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
                let key = e.path().to_string();
                let message = e.into_inner().to_string();
                let key = if key == "." || key.is_empty() {
                    "(top level)".to_string()
                } else {
                    key
                };
                invalid(bad(key, message))
            })?;
        config.check().map_err(invalid)?;
        Ok(config)
    }

    /// Range and consistency checks serde cannot express.
    fn check(&self) -> Result<(), Bad> {
        check_name("host name", &self.host_name).map_err(|e| bad("host_name", e.to_string()))?;
        for (key, p) in [
            ("state_dir", &self.state_dir),
            ("api_socket", &self.api_socket),
        ] {
            if !p.is_absolute() {
                return Err(bad(key, format!("{} is not an absolute path", p.display())));
            }
        }
        // sun_path is 108 bytes including the terminating NUL.
        if self.api_socket.as_os_str().len() > 107 {
            return Err(bad("api_socket", "path is longer than 107 bytes"));
        }
        self.socket_mode()?;
        if self.vmm_binary.as_os_str().is_empty() {
            return Err(bad("vmm_binary", "must not be empty"));
        }
        for (name, addr) in &self.peers {
            let key = format!("peers.{name}");
            check_name("peer name", name).map_err(|e| bad(&key, e.to_string()))?;
            check_peer_address(addr).map_err(|m| bad(&key, m))?;
        }
        let m = &self.migration;
        let positive = [
            ("completion_timeout_per_gib", m.completion_timeout_per_gib),
            ("progress_timeout", m.progress_timeout),
            ("keepalive_count", m.keepalive_count.into()),
            (
                "parallel_migrations_per_cluster",
                m.parallel_migrations_per_cluster.into(),
            ),
            (
                "parallel_outbound_migrations_per_node",
                m.parallel_outbound_migrations_per_node.into(),
            ),
            ("downtime_limit", m.downtime_limit.get().as_millis() as u64),
            (
                "keepalive_interval",
                m.keepalive_interval.get().as_millis() as u64,
            ),
        ];
        for (key, v) in positive {
            if v == 0 {
                return Err(bad(format!("migration.{key}"), "must be greater than 0"));
            }
        }
        Ok(())
    }

    /// The API socket's permission bits.
    pub fn socket_mode(&self) -> Result<u32, BadSocketMode> {
        match self.api_socket_mode.as_str() {
            "0600" | "600" => Ok(0o600),
            "0660" | "660" => Ok(0o660),
            other => Err(BadSocketMode(other.into())),
        }
    }

    /// The default config as TOML, every key preceded by its documentation.
    pub fn default_toml() -> String {
        let text = toml::to_string(&Config::default()).expect("the default config serializes");
        let mut out = String::from(
            "# migrated configuration. Every key is optional; the values below are the defaults.\n\n",
        );
        for line in text.lines() {
            let key = line.split(" = ").next().unwrap_or("");
            if let Some((_, doc)) = KEY_DOCS.iter().find(|(k, _)| *k == key) {
                out.push_str("# ");
                out.push_str(doc);
                out.push('\n');
            }
            if line.starts_with('[') {
                out.push('\n');
            }
            out.push_str(line);
            out.push('\n');
        }
        out
    }
}

impl From<BadSocketMode> for Bad {
    fn from(e: BadSocketMode) -> Self {
        bad("api_socket_mode", e.to_string())
    }
}

/// An `api_socket_mode` other than the two allowed ones.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not allowed: use \"0600\" or \"0660\"")]
pub struct BadSocketMode(pub String);

/// Checks "host:port" (IPv6 hosts in brackets) without resolving the host.
fn check_peer_address(addr: &str) -> Result<(), String> {
    let Some((host, port)) = addr.rsplit_once(':') else {
        return Err(format!("{addr:?} is not host:port"));
    };
    if host.is_empty() || host.trim() != host {
        return Err(format!("{addr:?} has no host"));
    }
    match port.parse::<u16>() {
        Ok(p) if p != 0 => Ok(()),
        _ => Err(format!("{addr:?} has no valid port (1-65535)")),
    }
}

/// Documentation printed above each key by `--print-default-config`.
const KEY_DOCS: &[(&str, &str)] = &[
    (
        "host_name",
        "This host's name among its peers (default: the kernel host name).",
    ),
    (
        "state_dir",
        "VM specs, migration records, VMM sockets and logs.",
    ),
    (
        "api_socket",
        "Unix socket of the local API that migratectl uses.",
    ),
    (
        "api_socket_mode",
        "Permissions of the API socket: \"0600\" or \"0660\".",
    ),
    (
        "listen",
        "QUIC address peers connect to (may be a dedicated migration network).",
    ),
    (
        "vmm_binary",
        "The VMM program; a bare name is looked up next to migrated, then in PATH.",
    ),
    (
        "ca",
        "Cluster CA certificate (PEM) that signs every host certificate.",
    ),
    ("cert", "This host's certificate (PEM)."),
    ("key", "This host's private key (PEM)."),
    (
        "allow_auto_converge",
        "Throttle vCPUs step by step when pre-copy passes stop converging.",
    ),
    (
        "auto_converge_step",
        "How auto-converge raises the throttle: \"adaptive\" (to the level the measured dirty rate and bandwidth call for) or \"fixed\" (QEMU: 20%, then +10%).",
    ),
    (
        "allow_post_copy",
        "Switch to post-copy when pre-copy does not converge.",
    ),
    (
        "completion_timeout_per_gib",
        "Seconds per GiB of guest RAM before a migration is cancelled.",
    ),
    (
        "progress_timeout",
        "Seconds without progress before a migration is cancelled.",
    ),
    (
        "bandwidth_per_migration",
        "Bandwidth cap per migration in bytes/s on the wire (after compression), e.g. \"64Mi\"; the default \"0\" means unlimited.",
    ),
    (
        "downtime_limit",
        "Longest acceptable guest pause at switchover (e.g. \"300ms\").",
    ),
    (
        "keepalive_interval",
        "Keepalive interval on peer connections.",
    ),
    (
        "keepalive_count",
        "Missed keepalives before a peer is declared dead.",
    ),
    (
        "parallel_migrations_per_cluster",
        "Migrations running at once in the cluster.",
    ),
    (
        "parallel_outbound_migrations_per_node",
        "Outbound migrations running at once from this host.",
    ),
];

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, LoadConfigError> {
        Config::parse(text, Path::new("test.toml"))
    }

    fn invalid_key(text: &str) -> (String, String) {
        match parse(text) {
            Err(LoadConfigError::Invalid { key, message, .. }) => (key, message),
            other => panic!("expected an invalid-key error, got {other:?}"),
        }
    }

    #[test]
    fn empty_file_gives_documented_defaults() {
        let c = parse("").unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.state_dir, Path::new("/var/lib/migrated"));
        assert_eq!(c.api_socket, Path::new("/run/migrated/api.sock"));
        assert_eq!(c.socket_mode().unwrap(), 0o600);
        let m = &c.migration;
        assert_eq!(m.completion_timeout_per_gib, 800);
        assert_eq!(m.progress_timeout, 150);
        assert_eq!(m.bandwidth_per_migration, Quantity(0));
        assert_eq!(m.downtime_limit.get().as_millis(), 300);
        assert_eq!(m.keepalive_interval.get().as_secs(), 5);
        assert_eq!(m.keepalive_count, 5);
        assert_eq!(m.parallel_migrations_per_cluster, 5);
        assert_eq!(m.parallel_outbound_migrations_per_node, 2);
        assert!(!m.allow_auto_converge && !m.allow_post_copy);
    }

    #[test]
    fn full_file_parses() {
        let c = parse(
            r#"
            host_name = "node-a"
            state_dir = "/srv/migrated"
            api_socket = "/tmp/m.sock"
            api_socket_mode = "0660"
            listen = "10.1.0.5:9000"
            [peers]
            node-b = "10.1.0.6:9000"
            node-c = "[fd00::7]:9000"
            [migration]
            bandwidth_per_migration = "1Gi"
            downtime_limit = "2s"
            allow_post_copy = true
            "#,
        )
        .unwrap();
        assert_eq!(c.host_name, "node-a");
        assert_eq!(c.socket_mode().unwrap(), 0o660);
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.peers.len(), 2);
        assert_eq!(c.migration.bandwidth_per_migration, Quantity(1 << 30));
        assert_eq!(c.migration.downtime_limit.get().as_secs(), 2);
        assert!(c.migration.allow_post_copy);
        // Untouched keys keep their defaults.
        assert_eq!(c.migration.progress_timeout, 150);
    }

    #[test]
    fn unknown_keys_are_named() {
        let (key, msg) = invalid_key("host_nmae = \"x\"");
        assert_eq!(key, "host_nmae");
        assert!(msg.contains("unknown field"), "{msg}");
        let (key, msg) = invalid_key("[migration]\ndowntime = \"1s\"");
        assert_eq!(key, "migration.downtime");
        assert!(
            msg.contains("downtime_limit"),
            "the message lists valid keys: {msg}"
        );
        let (key, _) = invalid_key("[tls]\nca_file = \"/x\"");
        assert_eq!(key, "tls.ca_file");
        let (key, _) = invalid_key("[typo]\nx = 1");
        assert_eq!(key, "typo");
    }

    #[test]
    fn bad_values_are_named() {
        let cases = [
            (
                "[migration]\ndowntime_limit = \"300xs\"",
                "migration.downtime_limit",
            ),
            (
                "[migration]\nbandwidth_per_migration = \"fast\"",
                "migration.bandwidth_per_migration",
            ),
            (
                "[migration]\nkeepalive_count = -1",
                "migration.keepalive_count",
            ),
            (
                "[migration]\nkeepalive_count = 0",
                "migration.keepalive_count",
            ),
            (
                "[migration]\ndowntime_limit = \"0ms\"",
                "migration.downtime_limit",
            ),
            ("listen = \"nowhere\"", "listen"),
            ("state_dir = \"relative/dir\"", "state_dir"),
            ("api_socket_mode = \"0666\"", "api_socket_mode"),
            ("host_name = \"Bad_Name\"", "host_name"),
            ("[peers]\nnode-b = \"10.0.0.1\"", "peers.node-b"),
            ("[peers]\nnode-b = \"10.0.0.1:0\"", "peers.node-b"),
            ("state_dir = 5", "state_dir"),
        ];
        for (text, want) in cases {
            let (key, msg) = invalid_key(text);
            assert_eq!(key, want, "{text}: {msg}");
            assert!(!msg.is_empty());
        }
        let err = parse("[migration]\ndowntime_limit = \"300xs\"").unwrap_err();
        let shown = err.to_string();
        assert!(
            shown.contains("migration.downtime_limit") && shown.contains("300xs"),
            "{shown}"
        );
    }

    #[test]
    fn syntax_errors_are_their_own_kind() {
        assert!(matches!(
            parse("host_name = "),
            Err(LoadConfigError::Syntax { .. })
        ));
    }

    #[test]
    fn printed_default_parses_back_to_the_default() {
        let text = Config::default_toml();
        assert!(text.contains("# Longest acceptable guest pause"), "{text}");
        assert!(text.contains("downtime_limit = \"300ms\""), "{text}");
        assert_eq!(parse(&text).unwrap(), Config::default());
    }

    #[test]
    fn load_reports_missing_and_oversized_files() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.toml");
        assert!(matches!(
            Config::load(&missing),
            Err(LoadConfigError::Read { .. })
        ));
        let big = dir.path().join("big.toml");
        std::fs::write(&big, "#".repeat((MAX_CONFIG_BYTES + 10) as usize)).unwrap();
        assert!(matches!(
            Config::load(&big),
            Err(LoadConfigError::TooLarge { .. })
        ));
        let ok = dir.path().join("ok.toml");
        std::fs::write(&ok, "host_name = \"h1\"\n").unwrap();
        assert_eq!(Config::load(&ok).unwrap().host_name, "h1");
    }
}
