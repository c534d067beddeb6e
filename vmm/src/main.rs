//! `migrate-vmm`: one guest per process. `run` boots the built-in workload
//! in fresh memory; `restore` takes guest RAM from an inherited memfd and
//! the rest from a state file or a Restore control request. Either way the
//! process serves its control socket, prints `READY <socket>` once it is
//! usable, and exits 0 after a Shutdown request.

use std::fs::{File, OpenOptions};
use std::io::{IsTerminal, Write};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use guestmem::{GuestMemory, MemoryLayout};
use nix::sys::signal::{SigSet, Signal};
use tracing::info;
use tracing_subscriber::EnvFilter;
use vmm::control::serve;
use vmm::handler::VmmHandler;
use vmm::machine::Machine;
use vmm::state::VmState;
use vmm::workload::{DirtyMode, DirtyRate, WorkloadParams};

#[derive(Parser, Debug)]
#[command(name = "migrate-vmm", about = "Per-guest VMM process of migrated")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Boot the built-in workload guest in fresh memory.
    Run(RunArgs),
    /// Resume a saved guest from an inherited memfd; stays paused until Resume.
    Restore(RestoreArgs),
    /// Write the workload as a Multiboot image for `qemu-system-x86_64
    /// -kernel` (command line: see the `vmm::multiboot` docs).
    MultibootImage(MultibootImageArgs),
}

#[derive(Args, Debug)]
struct MultibootImageArgs {
    /// File to write (replaced if it exists).
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args, Debug)]
struct Common {
    /// Guest name, reported by Status.
    #[arg(long)]
    name: String,
    /// Path of the unix control socket to create.
    #[arg(long)]
    control_socket: PathBuf,
    /// File the guest's COM1 output is written to.
    #[arg(long)]
    serial_log: PathBuf,
}

#[derive(Args, Debug)]
struct RunArgs {
    #[command(flatten)]
    common: Common,
    /// Guest RAM size: bytes, or with a K/M/G/T (or KiB/MiB/GiB/TiB) suffix.
    #[arg(long, value_parser = parse_size)]
    memory: u64,
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// Working set the workload dirties, same syntax as --memory.
    #[arg(long, value_parser = parse_size)]
    wss: u64,
    /// MiB per second the workload dirties: 0 (idle), a number, or "max".
    #[arg(long, default_value = "0")]
    dirty_rate: DirtyRate,
    /// sparse (one word per page) or full (every byte of a page).
    #[arg(long, default_value = "sparse")]
    mode: DirtyMode,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Create the guest but keep its vCPUs stopped until a Resume request.
    #[arg(long)]
    paused: bool,
    /// Print a one-line counter display every second on stdout.
    #[arg(long)]
    watch: bool,
}

#[derive(Args, Debug)]
#[group(id = "source", required = true, multiple = false, args = ["state", "wait_state"])]
struct RestoreArgs {
    #[command(flatten)]
    common: Common,
    /// Inherited file descriptor of the guest's memfd (CLOEXEC cleared).
    #[arg(long)]
    memfd_fd: RawFd,
    /// State file written from a SaveState reply.
    #[arg(long)]
    state: Option<PathBuf>,
    /// Wait for the state in a Restore control request.
    #[arg(long)]
    wait_state: bool,
    /// Print a one-line counter display every second on stdout.
    #[arg(long)]
    watch: bool,
}

/// Parses `4096`, `512M`, `1G`, `1GiB`, `2mb` ...: binary multiples, case
/// insensitive.
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(split);
    if num.is_empty() {
        return Err(format!("{s:?} is not a size (e.g. 4096, 512M, 1GiB)"));
    }
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?}: number too large"))?;
    let shift = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(format!("{s:?}: unknown size suffix {suffix:?}")),
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{s:?}: size too large"))
}

/// The handler SIGTERM/SIGINT shut down, once there is one.
static HANDLER: OnceLock<Arc<VmmHandler>> = OnceLock::new();

/// Turns SIGTERM, SIGINT and SIGHUP into an orderly shutdown (vCPUs
/// stopped, socket removed). The signals are blocked here, before any other
/// thread exists, so that every thread inherits the mask and only the
/// waiter below receives them.
fn handle_termination_signals() -> Result<()> {
    let mut set = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP] {
        set.add(s);
    }
    set.thread_block()
        .context("cannot block termination signals")?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            let Ok(sig) = set.wait() else { continue };
            match HANDLER.get() {
                Some(h) => {
                    info!(signal = %sig, "shutting down on signal");
                    h.request_shutdown();
                }
                // Nothing bound or started yet: nothing to clean up.
                None => std::process::exit(1),
            }
        })
        .context("cannot start the signal thread")?;
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = handle_termination_signals() {
        eprintln!("migrate-vmm: error: {e:#}");
        return ExitCode::FAILURE;
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let r = match cli.command {
        Command::Run(a) => run(a),
        Command::Restore(a) => restore(a),
        Command::MultibootImage(a) => write_multiboot_image(&a.out),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("migrate-vmm: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(a: RunArgs) -> Result<()> {
    let layout =
        MemoryLayout::for_size(a.memory).with_context(|| format!("bad --memory {}", a.memory))?;
    let mem = GuestMemory::create(&a.common.name, layout).context("cannot create guest memory")?;
    let log = open_serial_log(&a.common.serial_log, true)?;
    let params = WorkloadParams {
        wss_bytes: a.wss,
        dirty_rate: a.dirty_rate,
        mode: a.mode,
        seed: a.seed,
    };
    let machine = Machine::boot_workload(Arc::new(mem), a.vcpus, &params, log, a.paused)
        .context("cannot boot the workload guest")?;
    let handler = VmmHandler::with_machine(a.common.name.clone(), Arc::new(machine));
    serve_until_shutdown(&a.common, handler, a.watch)
}

fn restore(a: RestoreArgs) -> Result<()> {
    let memfd = inherited_fd(a.memfd_fd)?;
    let log = open_serial_log(&a.common.serial_log, false)?;
    let handler = match &a.state {
        Some(path) => {
            let state = VmState::read_from(path).context("cannot read the state file")?;
            let mem = GuestMemory::from_fd(memfd, state.layout.clone())
                .context("the memfd does not match the saved memory layout")?;
            let machine =
                Machine::restore(Arc::new(mem), &state, log).context("cannot restore the guest")?;
            VmmHandler::with_machine(a.common.name.clone(), Arc::new(machine))
        }
        None => VmmHandler::waiting_for_state(a.common.name.clone(), memfd, log),
    };
    serve_until_shutdown(&a.common, handler, a.watch)
}

/// Writes the image to a temporary file beside `out` and renames it, so a
/// reader never sees half an image.
fn write_multiboot_image(out: &Path) -> Result<()> {
    let dir = match out.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("cannot create a temporary file in {}", dir.display()))?;
    tmp.write_all(&vmm::multiboot::image())
        .context("cannot write the image")?;
    // Readable by whoever runs QEMU (tempfile creates 0600).
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(0o644))
        .context("cannot set the image's permissions")?;
    tmp.persist(out)
        .with_context(|| format!("cannot write {}", out.display()))?;
    Ok(())
}

/// Takes ownership of an fd inherited from the parent.
fn inherited_fd(fd: RawFd) -> Result<OwnedFd> {
    if fd < 3 {
        bail!("--memfd-fd {fd} is a standard stream, not a memfd");
    }
    // SAFETY: F_GETFD only inspects the descriptor table entry.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("--memfd-fd {fd} is not an open file descriptor"));
    }
    // SAFETY: `fd` is open (checked above), was inherited from the parent
    // for this purpose, and nothing else in this process refers to it (it is
    // >= 3 and this runs before anything else opens files), so we may own it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn open_serial_log(path: &Path, truncate: bool) -> Result<File> {
    let mut o = OpenOptions::new();
    o.create(true);
    if truncate {
        o.write(true).truncate(true);
    } else {
        o.append(true);
    }
    o.open(path)
        .with_context(|| format!("cannot open serial log {}", path.display()))
}

/// Binds the control socket, refusing to steal one a live VMM serves.
fn bind_control_socket(path: &Path) -> Result<UnixListener> {
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            bail!("control socket {} is in use", path.display());
        }
        std::fs::remove_file(path)
            .with_context(|| format!("cannot remove stale socket {}", path.display()))?;
    }
    UnixListener::bind(path)
        .with_context(|| format!("cannot bind control socket {}", path.display()))
}

fn serve_until_shutdown(c: &Common, handler: VmmHandler, watch: bool) -> Result<()> {
    let listener = bind_control_socket(&c.control_socket)?;
    let handler = Arc::new(handler);
    let _ = HANDLER.set(handler.clone());
    serve(listener, handler.clone());
    let mut out = std::io::stdout().lock();
    writeln!(out, "READY {}", c.control_socket.display())
        .and_then(|()| out.flush())
        .context("cannot write to stdout")?;
    drop(out);
    info!(socket = %c.control_socket.display(), "ready");
    if watch {
        let h = handler.clone();
        std::thread::Builder::new()
            .name("watch".into())
            .spawn(move || watch_loop(&h))
            .context("cannot start the watch display")?;
    }
    handler.wait_for_shutdown();
    if let Some(m) = handler.machine() {
        m.shutdown();
    }
    let _ = std::fs::remove_file(&c.control_socket);
    info!("shut down");
    Ok(())
}

/// Once a second, one line: run state, passes and pages written summed over
/// vCPUs, their rate over the last second, corrupt pages, throttle.
fn watch_loop(h: &VmmHandler) {
    let mut last_pages = 0u64;
    loop {
        let s = h.status();
        let passes: u64 = s.counters.iter().map(|c| c.passes).sum();
        let pages: u64 = s.counters.iter().map(|c| c.pages_written).sum();
        let corrupt: u64 = s.counters.iter().map(|c| c.corrupt).sum();
        let rate_mib = pages.saturating_sub(last_pages) * 4096 / (1 << 20);
        last_pages = pages;
        let line = format!(
            "{:>6}s {:?} passes={} pages_written={} ({} MiB/s) corrupt={} throttle={}% dirty_log={}",
            s.uptime_ms / 1000,
            s.run_state,
            passes,
            pages,
            rate_mib,
            corrupt,
            s.throttle_pct,
            if s.dirty_logging { "on" } else { "off" },
        );
        let mut out = std::io::stdout().lock();
        if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
            return;
        }
        drop(out);
        // A display refresh, not a synchronisation wait.
        std::thread::sleep(Duration::from_secs(1));
    }
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("2mb"), Ok(2 << 20));
        assert_eq!(parse_size("3k"), Ok(3 << 10));
        assert!(parse_size("").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("1X").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999999999999999").is_err());
        assert!(parse_size("16777216T").is_err());
    }
}
