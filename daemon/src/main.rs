//! `migrated`: loads the config, re-attaches to the guests it supervises
//! and serves the local API until SIGINT or SIGTERM. Guests keep running
//! when the daemon stops.

#![forbid(unsafe_code)]

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Parser;
use migrated::config::{Config, DEFAULT_CONFIG_PATH};
use migrated::migration::peers::Peers;
use migrated::migration::LiveMigrationEngine;
use migrated::service::Service;
use migrated::store::Store;
use migrated::supervisor::VmmSupervisor;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{info, warn};
use tracing_subscriber::EnvFilter;
use transport::endpoint::{Endpoint, EndpointConfig, Keepalive};
use transport::identity::HostIdentity;

#[derive(Parser, Debug)]
#[command(
    name = "migrated",
    version,
    about = "Live-migration daemon: one per host"
)]
struct Cli {
    /// Config file. Without it, /etc/migrated/config.toml is used if it
    /// exists, else the built-in defaults.
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Print the default config, with every key documented, and exit.
    #[arg(long)]
    print_default_config: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.print_default_config {
        print!("{}", Config::default_toml());
        return ExitCode::SUCCESS;
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("migrated: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn load_config(path: Option<PathBuf>) -> Result<Config> {
    let default = PathBuf::from(DEFAULT_CONFIG_PATH);
    let path = match path {
        Some(p) => p,
        None if default.exists() => default,
        None => {
            info!("no {DEFAULT_CONFIG_PATH}; using the built-in defaults");
            return Ok(Config::default());
        }
    };
    let config = Config::load(&path).context("refusing to start with this config")?;
    info!(config = %path.display(), "config loaded");
    Ok(config)
}

fn run(cli: Cli) -> Result<()> {
    let config = load_config(cli.config)?;
    let mode = config
        .socket_mode()
        .context("api_socket_mode was checked at load")?;
    let store = Store::open(&config.state_dir).context("cannot open the state directory")?;
    let backend = Arc::new(VmmSupervisor::new(&config.vmm_binary));
    info!(vmm = %backend.binary().display(), "vmm binary");
    let rt = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    rt.block_on(async move {
        let host = config.host_name.clone();
        let peers = config.peers.clone();
        let endpoint = bind_endpoint(&config)?;
        let engine = Arc::new(LiveMigrationEngine::new(
            tokio::runtime::Handle::current(),
            host.clone(),
            endpoint
                .clone()
                .map(|ep| Arc::new(Peers::new(ep, peers.clone()))),
            config.migration.clone(),
        ));
        let supervisor = (*backend).clone();
        // Re-attaching probes every VMM (blocking calls).
        let (svc, recovery) =
            tokio::task::spawn_blocking(move || Service::open(host, peers, store, backend, engine))
                .await
                .context("re-attach task failed")?
                .context("cannot load the state directory")?;
        let svc = Arc::new(svc);
        if let Some(ep) = endpoint {
            tokio::spawn(migrated::migration::incoming::accept_loop(
                ep,
                svc.clone(),
                supervisor,
            ));
        }
        info!(
            running = recovery.running.len(),
            stopped = recovery.stopped.len(),
            failed = recovery.failed.len(),
            interrupted_migrations = recovery.interrupted_migrations.len(),
            skipped_files = recovery.skipped_files,
            "state loaded"
        );
        for name in &recovery.failed {
            warn!(vm = %name, "vm expected running but its vmm is not reachable");
        }
        let listener = migrated::api::bind_socket(&config.api_socket, mode)
            .context("cannot set up the API socket")?;
        let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
        let mut int = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
        let shutdown = async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            info!("shutting down; guests keep running");
        };
        info!(
            host = %config.host_name,
            socket = %config.api_socket.display(),
            listen = %config.listen,
            "migrated ready"
        );
        let served = migrated::api::serve(listener, svc, shutdown).await;
        let _ = std::fs::remove_file(&config.api_socket);
        served.context("the API server failed")
    })
}

/// The QUIC endpoint for peers, or `None` (with a warning) when this host
/// has no TLS identity yet: the daemon then serves its API and guests, and
/// every migration fails with `tls_unavailable`. Identity files that exist
/// but do not load stop the daemon.
fn bind_endpoint(config: &Config) -> Result<Option<Endpoint>> {
    let tls = &config.tls;
    if !tls.ca.exists() && !tls.cert.exists() && !tls.key.exists() {
        warn!(
            ca = %tls.ca.display(),
            "no TLS identity ([tls] files missing): migrations to and from this host are disabled"
        );
        return Ok(None);
    }
    let identity = HostIdentity::load_pem(&tls.ca, &tls.cert, &tls.key)
        .context("cannot load the TLS identity from [tls]")?;
    if identity.host().as_str() != config.host_name {
        warn!(
            cert = %identity.host(),
            host_name = %config.host_name,
            "the host certificate names another host than host_name; peers dial by certificate name"
        );
    }
    let mut ep_config = EndpointConfig::listening_on(config.listen);
    ep_config.keepalive = Keepalive {
        interval: config.migration.keepalive_interval.get(),
        count: config.migration.keepalive_count,
    };
    let endpoint = Endpoint::bind(&ep_config, &identity)
        .with_context(|| format!("cannot listen for peers on {}", config.listen))?;
    info!(listen = %config.listen, host = %identity.host(), "peer endpoint ready");
    Ok(Some(endpoint))
}
