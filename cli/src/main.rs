//! `migratectl`: the operator's client of the `migrated` API. It never
//! touches KVM; everything goes through the daemon's unix socket.
//!
//! Exit codes: 0 success, 1 any failure (refused, failed migration, daemon
//! unreachable), 2 bad command-line arguments (clap's own).

#![forbid(unsafe_code)]

mod cert;
mod demo;
mod render;
mod request;

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use migrated_api::client::{ApiCallError, ApiClient};
use migrated_api::config::{DEFAULT_API_SOCKET, DEFAULT_CONFIG_PATH};
use migrated_api::model::{
    DirtyMode, DirtyRate, MigrationPhase, MigrationRecord, MigrationRequest, Quantity, VmSpec,
    WorkloadSpec,
};
use serde::Serialize;

#[derive(Parser, Debug)]
#[command(
    name = "migratectl",
    version,
    about = "Drive migrated: VMs and live migrations"
)]
struct Cli {
    /// The daemon's API socket (its config's api_socket).
    #[arg(long, global = true, env = "MIGRATED_SOCKET", default_value = DEFAULT_API_SOCKET)]
    socket: PathBuf,
    /// Output format.
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
    Yaml,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create, list, inspect, stop, start and delete VMs.
    #[command(subcommand)]
    Vm(VmCommand),
    /// Live-migrate a VM to a peer host, or resume an interrupted
    /// post-copy migration.
    #[command(
        override_usage = "migratectl migrate [OPTIONS] <VM> --to <HOST>\n       \
                                migratectl migrate --resume <MIGRATION> [--wait]"
    )]
    Migrate(MigrateArgs),
    /// List objects.
    #[command(subcommand)]
    Get(GetCommand),
    /// Show one object in detail.
    #[command(subcommand)]
    Describe(DescribeCommand),
    /// Switch a running pre-copy migration to post-copy: the guest moves
    /// to the target now and the rest of its memory follows on demand.
    Switch {
        /// Migration name (see `migratectl get migrations`).
        migration: String,
        /// Follow the migration with a progress bar until it ends.
        #[arg(long)]
        wait: bool,
    },
    /// Cancel a pending or running pre-copy migration (a migration in
    /// post-copy cannot be cancelled: the guest already runs on the target).
    Cancel {
        /// Migration name (see `migratectl get migrations`).
        migration: String,
    },
    /// Show the daemon's host name and version.
    Health,
    /// Create the cluster CA and host certificates for mutual TLS.
    #[command(subcommand)]
    Cert(cert::CertCommand),
    /// Run two daemons on this machine and live-migrate a guest between
    /// them, end to end (needs /dev/kvm and the built binaries).
    Demo(demo::DemoArgs),
}

#[derive(Subcommand, Debug)]
enum VmCommand {
    /// Start a new VM running the built-in workload.
    Create(CreateArgs),
    List,
    Get {
        name: String,
    },
    /// Stop (if running) and delete a VM.
    Delete {
        name: String,
    },
    Stop {
        name: String,
    },
    Start {
        name: String,
    },
}

#[derive(Copy, Clone, Debug, ValueEnum)]
enum ModeArg {
    Sparse,
    Full,
}

impl From<ModeArg> for DirtyMode {
    fn from(m: ModeArg) -> Self {
        match m {
            ModeArg::Sparse => DirtyMode::Sparse,
            ModeArg::Full => DirtyMode::Full,
        }
    }
}

#[derive(Args, Debug)]
struct CreateArgs {
    /// VM name: lower-case letters, digits and '-'.
    name: String,
    /// Guest RAM, e.g. 512Mi, 1Gi.
    #[arg(long)]
    memory: Quantity,
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// Working set the workload dirties, e.g. 64Mi (at most --memory).
    #[arg(long, default_value = "8Mi")]
    wss: Quantity,
    /// MiB/s the workload dirties: 0 (idle), a number, or max.
    #[arg(long, default_value = "0")]
    dirty_rate: DirtyRate,
    /// How pages are written: sparse (one word) or full (every byte).
    #[arg(long, value_enum, default_value_t = ModeArg::Sparse)]
    mode: ModeArg,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// A label, key=value; repeatable.
    #[arg(long = "label", value_parser = parse_label)]
    labels: Vec<(String, String)>,
}

#[derive(Args, Debug)]
struct MigrateArgs {
    /// The VM to move.
    #[arg(required_unless_present = "resume")]
    vm: Option<String>,
    /// Target host, as named in the daemon's [peers].
    #[arg(long, value_name = "HOST", required_unless_present = "resume")]
    to: Option<String>,
    /// Continue MIGRATION, a post-copy migration that failed because the
    /// link to the target broke (failure code post_copy_interrupted).
    #[arg(
        long,
        value_name = "MIGRATION",
        conflicts_with_all = ["vm", "to", "verify", "allow_auto_converge", "allow_post_copy", "TuningArgs"]
    )]
    resume: Option<String>,
    /// Follow the migration with a progress bar until it ends.
    #[arg(long)]
    wait: bool,
    /// Compare full-memory digests of source and destination at switchover
    /// (memoryDigestMatched in the record).
    #[arg(long)]
    verify: bool,
    /// Throttle the guest's vCPUs when passes stop converging
    /// (--allow-auto-converge=false to forbid it).
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    allow_auto_converge: Option<bool>,
    /// Switch to post-copy when passes stop converging
    /// (--allow-post-copy=false to forbid it).
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    allow_post_copy: Option<bool>,
    #[command(flatten)]
    tuning: request::TuningArgs,
}

impl MigrateArgs {
    /// The body of a new migration; `None` for `--resume`.
    fn request(&self) -> Option<MigrationRequest> {
        let (Some(vm), Some(to)) = (&self.vm, &self.to) else {
            return None;
        };
        Some(request::migration_request(
            vm.clone(),
            to.clone(),
            self.verify,
            request::overrides(self.allow_auto_converge, self.allow_post_copy, &self.tuning),
        ))
    }
}

#[derive(Subcommand, Debug)]
enum GetCommand {
    /// Migration records, oldest first.
    Migrations,
    /// VMs (same as `vm list`).
    Vms,
}

#[derive(Subcommand, Debug)]
enum DescribeCommand {
    /// The migration's state and progress.
    Migration { name: String },
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.into(), v.into())),
        _ => Err(format!("{s:?} is not key=value")),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            report(&e);
            ExitCode::FAILURE
        }
    }
}

/// Prints an error and, where we know one, what to do about it.
fn report(e: &anyhow::Error) {
    let api = e.chain().find_map(|c| c.downcast_ref::<ApiCallError>());
    match api {
        Some(ApiCallError::Api { body, .. }) => {
            eprintln!("error: {}", body.message);
            if let Some(hint) = &body.hint {
                eprintln!("hint: {hint}");
            }
        }
        Some(ApiCallError::Connect { path, source }) => {
            eprintln!(
                "error: cannot connect to migrated at {}: {source}",
                path.display()
            );
            if source.kind() == std::io::ErrorKind::PermissionDenied {
                eprintln!("hint: run as root or as a member of the socket's group (api_socket_mode = \"0660\")");
            } else {
                eprintln!(
                    "hint: is migrated running? start it with `migrated --config {DEFAULT_CONFIG_PATH}`, \
                     or point --socket (or MIGRATED_SOCKET) at its api_socket"
                );
            }
        }
        _ => eprintln!("error: {e:#}"),
    }
}

fn print<T: Serialize>(output: Output, value: &T, table: impl FnOnce() -> String) -> Result<()> {
    let text = match output {
        Output::Table => table(),
        Output::Json => {
            let mut s = serde_json::to_string_pretty(value).context("cannot encode json")?;
            s.push('\n');
            s
        }
        Output::Yaml => render::yaml(&serde_json::to_value(value).context("cannot encode yaml")?),
    };
    print!("{text}");
    Ok(())
}

async fn run(cli: Cli) -> Result<()> {
    let c = ApiClient::new(&cli.socket);
    let out = cli.output;
    match cli.command {
        Command::Cert(cmd) => cert::run(cmd),
        Command::Demo(a) => demo::run(a, out).await,
        Command::Vm(VmCommand::Create(a)) => {
            let spec = VmSpec {
                name: a.name,
                labels: a.labels.into_iter().collect::<BTreeMap<_, _>>(),
                memory: a.memory,
                vcpus: a.vcpus,
                workload: WorkloadSpec {
                    wss: a.wss,
                    dirty_rate: a.dirty_rate,
                    mode: a.mode.into(),
                    seed: a.seed,
                },
            };
            let vm = c.create_vm(&spec).await?;
            print(out, &vm, || render::describe_vm(&vm))
        }
        Command::Vm(VmCommand::List) | Command::Get(GetCommand::Vms) => {
            let vms = c.list_vms().await?;
            print(out, &vms, || render::vm_table(&vms))
        }
        Command::Vm(VmCommand::Get { name }) => {
            let vm = c.get_vm(&name).await?;
            print(out, &vm, || render::describe_vm(&vm))
        }
        Command::Vm(VmCommand::Delete { name }) => {
            c.delete_vm(&name).await?;
            println!("vm {name} deleted");
            Ok(())
        }
        Command::Vm(VmCommand::Stop { name }) => {
            let vm = c.stop_vm(&name).await?;
            print(out, &vm, || render::describe_vm(&vm))
        }
        Command::Vm(VmCommand::Start { name }) => {
            let vm = c.start_vm(&name).await?;
            print(out, &vm, || render::describe_vm(&vm))
        }
        Command::Migrate(a) => migrate(&c, out, a).await,
        Command::Get(GetCommand::Migrations) => {
            let ms = c.list_migrations().await?;
            print(out, &ms, || render::migration_table(&ms))
        }
        Command::Describe(DescribeCommand::Migration { name }) => {
            let m = c.get_migration(&name).await?;
            print(out, &m, || render::describe_migration(&m))
        }
        Command::Switch { migration, wait } => switch(&c, out, &migration, wait).await,
        Command::Cancel { migration } => {
            let m = c.cancel_migration(&migration).await?;
            print(out, &m, || {
                format!("migration {} cancel requested; phase {}\n", m.name, m.phase)
            })
        }
        Command::Health => {
            let h = c.health().await?;
            print(out, &h, || {
                format!(
                    "host {} migrated {} ({} vms, {} active migrations)\n",
                    h.host_name, h.version, h.vms, h.active_migrations
                )
            })
        }
    }
}

async fn migrate(c: &ApiClient, out: Output, a: MigrateArgs) -> Result<()> {
    let mut m = match (&a.resume, a.request()) {
        (Some(name), _) => {
            let m = c.resume_migration(name).await?;
            if out == Output::Table {
                println!("migration {} resumed: phase {}", m.name, m.phase);
            }
            m
        }
        (None, Some(req)) => {
            let m = c.create_migration(&req).await?;
            if out == Output::Table {
                println!(
                    "migration {} created: {} -> {}",
                    m.name, m.source_host, m.target_host
                );
            }
            m
        }
        // clap requires VM and --to unless --resume is given.
        (None, None) => bail!("give a VM and --to, or --resume MIGRATION"),
    };
    if a.wait && !m.phase.is_final() {
        m = follow(c, &m.name).await?;
    }
    finish(out, &m)
}

/// `switch`: asks for post-copy, then reports like `migrate`.
async fn switch(c: &ApiClient, out: Output, name: &str, wait: bool) -> Result<()> {
    let mut m = c.switch_migration(name).await?;
    if out == Output::Table {
        println!(
            "migration {} switch to post-copy requested; phase {}, mode {}",
            m.name,
            m.phase,
            render::mode(m.mode)
        );
    }
    if wait && !m.phase.is_final() {
        m = follow(c, &m.name).await?;
    }
    finish(out, &m)
}

/// Prints a migration that may or may not have ended, and turns a failed
/// one into an error (exit 1).
fn finish(out: Output, m: &MigrationRecord) -> Result<()> {
    if out != Output::Table || m.phase.is_final() {
        print(out, m, || render::describe_migration(m))?;
    }
    match m.phase {
        MigrationPhase::Failed => bail!(
            "migration {} failed: {}",
            m.name,
            m.failure_reason.as_deref().unwrap_or("no reason recorded")
        ),
        MigrationPhase::Succeeded if m.memory_digest_matched == Some(false) => bail!(
            "migration {} moved the vm but the memory digests of source and destination differ",
            m.name
        ),
        MigrationPhase::Succeeded => Ok(()),
        _ => {
            if out == Output::Table {
                println!(
                    "phase {}; follow it with `migratectl describe migration {}` or use --wait",
                    m.phase, m.name
                );
            }
            Ok(())
        }
    }
}

/// Polls the record until it is final, drawing a progress bar on a terminal.
async fn follow(c: &ApiClient, name: &str) -> Result<MigrationRecord> {
    let bar = if std::io::stderr().is_terminal() {
        ProgressBar::new(0)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("{prefix:>26} [{bar:30}] {percent:>3}% {msg}")
            .context("bad progress template")?
            .progress_chars("=> "),
    );
    // Refresh rate of the display, not a synchronisation wait: the record
    // is the source of truth and is re-read on every tick.
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        let m = c
            .get_migration(name)
            .await
            .with_context(|| format!("lost track of migration {name}"))?;
        bar.set_length(m.bytes_total.max(1));
        bar.set_position(m.bytes_sent.min(m.bytes_total));
        let (prefix, msg) = render::progress(&m);
        bar.set_prefix(prefix);
        bar.set_message(msg);
        if m.phase.is_final() {
            bar.finish_and_clear();
            return Ok(m);
        }
    }
}
