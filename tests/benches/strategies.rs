//! Convergence-strategy benchmark (issue 5): two real `migrated` daemons on
//! loopback, guests that dirty all of their memory as fast as they can, and
//! every strategy at unlimited bandwidth and at 128 MiB/s, printed as one
//! table next to QEMU's numbers and our targets.
//!
//! Guests: 1 GiB and 4 GiB (2 GiB when the box has less than 12 GiB
//! available: source and destination each hold a copy), working set = all
//! of memory but the workload's system area (1 MiB; at most the low 3 GiB,
//! as the working set is contiguous), dirty rate `max`, modes `sparse` (one word per page) and
//! `full` (every byte), 2 vCPUs. Each row gets a fresh guest that has
//! written its whole working set at least once before the migration
//! starts, so no page is still an untouched hole.
//!
//! Strategies, set per migration (`MigrationRequest::options`): plain
//! pre-copy, auto-converge with the adaptive step, auto-converge with
//! QEMU's fixed step (20% then +10%), post-copy (`allowPostCopy`, which
//! switches when the completion timeout is reached, if pre-copy has not
//! converged by then), and post-copy now (`postCopyNow`: switch right
//! after pass 0, the row comparable to QEMU's post-copy numbers). Every
//! run has a completion timeout that bounds the bench (20 s per GiB, or
//! less for big guests so no row's timeout exceeds 45 s) and a progress
//! timeout so large that only the completion timeout ends a run. A
//! pre-copy row that fails with `timeout` is a result, "did not converge",
//! not a bench failure; so is any other failure code, shown in `result`.
//!
//! Columns: `total s` is the record's start → end timestamps (the bench's
//! own clock if they are missing); `switch s` is start → post-copy
//! switchover; `downtime` is `actualDowntimeMs` (for post-copy the pause at
//! the switchover); `wire` is `bytesSent`; `throttle` is the highest
//! auto-converge throttle and the number of throttle changes; `mode` is
//! the record's mode at the end; `faults` and `p50/p99` are the post-copy
//! remote faults and their round trip as the source's record has them;
//! `note` says whether the guest kept running uncorrupted on the target, or
//! why the run failed. A raw-quinn transfer in this process is the baseline.
//!
//! Run `cargo build --release --workspace` first (daemons, VMM and
//! `migratectl` are found next to this bench's executable), then
//! `cargo bench -p e2e --bench strategies [-- OPTIONS]`:
//! `--quick` (1 GiB only), `--only SUBSTRING` (rows whose label contains
//! it), `--memory 1Gi,4Gi`, `--timeout-per-gib N`, `--downtime-limit 300ms`
//! (default: the daemon's).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use common::{available_memory, check_binaries, human, raw_quinn, wait_running, GIB, MIB};
use e2e::Cluster;
use migrated_api::model::{
    AutoConvergeStep, DirtyMode, DirtyRate, FailureCode, MigrationMode, MigrationOverrides,
    MigrationPhase, MigrationRecord, MigrationRequest, VmSpec, WorkloadSpec,
};
use migrated_api::quantity::{HumanDuration, Quantity};
use table::{opt, print_baseline, print_reference, print_table, print_targets, secs};
use vmm::kvm_check::kvm_available_or_skip;

mod common;
// A crate root looks for modules beside itself, where cargo would take
// `table.rs` for a bench of its own.
#[path = "strategies/table.rs"]
mod table;

const A: &str = "node-a";
const B: &str = "node-b";
const VCPUS: u32 = 2;
/// End of the low RAM region (guestmem's PC layout).
const LOW_RAM_END: u64 = 3 * GIB;
/// The capped bandwidth, bytes per second (`bandwidthPerMigration: 128Mi`).
const CAPPED: u64 = 128 * MIB;
/// Completion timeout per GiB unless that makes a row's timeout exceed
/// [`ROW_TIMEOUT_CAP_S`].
const DEFAULT_TIMEOUT_PER_GIB: u64 = 20;
const ROW_TIMEOUT_CAP_S: u64 = 45;
/// Large enough that only the completion timeout ends a run.
const PROGRESS_TIMEOUT_S: u64 = 3600;
/// How long a fresh guest may take to write its working set once.
const POPULATE_TIMEOUT: Duration = Duration::from_secs(180);
/// How long the guest on the target gets to finish one more pass.
const TARGET_CHECK_TIMEOUT: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(100);

const USAGE: &str = "usage: strategies [--quick] [--only SUBSTRING] [--memory 1Gi,4Gi] \
                     [--timeout-per-gib N] [--downtime-limit 300ms]";

/// How a migration is allowed to converge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Strategy {
    PreCopy,
    AutoAdaptive,
    AutoFixed,
    PostCopy,
    PostCopyNow,
}

impl Strategy {
    const ALL: [Strategy; 5] = [
        Strategy::PreCopy,
        Strategy::AutoAdaptive,
        Strategy::AutoFixed,
        Strategy::PostCopy,
        Strategy::PostCopyNow,
    ];

    fn name(self) -> &'static str {
        match self {
            Strategy::PreCopy => "pre-copy",
            Strategy::AutoAdaptive => "auto-converge adaptive",
            Strategy::AutoFixed => "auto-converge fixed",
            Strategy::PostCopy => "post-copy",
            Strategy::PostCopyNow => "post-copy now",
        }
    }

    /// The per-migration options; every knob the strategy depends on is
    /// set explicitly so the daemon's defaults cannot change a row.
    fn options(
        self,
        bandwidth: u64,
        timeout_per_gib: u64,
        downtime_limit: Option<HumanDuration>,
    ) -> MigrationOverrides {
        let (auto, step, post) = match self {
            Strategy::PreCopy => (false, None, false),
            Strategy::AutoAdaptive => (true, Some(AutoConvergeStep::Adaptive), false),
            Strategy::AutoFixed => (true, Some(AutoConvergeStep::Fixed), false),
            Strategy::PostCopy | Strategy::PostCopyNow => (false, None, true),
        };
        MigrationOverrides {
            allow_auto_converge: Some(auto),
            auto_converge_step: step,
            allow_post_copy: Some(post),
            completion_timeout_per_gib: Some(timeout_per_gib),
            progress_timeout: Some(PROGRESS_TIMEOUT_S),
            bandwidth_per_migration: Some(Quantity(bandwidth)),
            downtime_limit,
            post_copy_now: self == Strategy::PostCopyNow,
        }
    }
}

/// One row: a guest and how to migrate it.
struct Case {
    label: String,
    memory: u64,
    mode: DirtyMode,
    strategy: Strategy,
    /// Bytes per second, 0 = unlimited.
    bandwidth: u64,
    timeout_per_gib: u64,
    /// `--downtime-limit`, else the daemon's default.
    downtime_limit: Option<HumanDuration>,
}

impl Case {
    /// The completion timeout the daemon derives (it rounds memory up to
    /// whole GiB).
    fn completion_timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_per_gib * self.memory.div_ceil(GIB).max(1))
    }

    /// How long to wait for a final phase: the completion timeout, then
    /// enough for a post-copy to push all of memory at half the capped
    /// rate, then some slack for setup.
    fn wait_limit(&self) -> Duration {
        self.completion_timeout() + Duration::from_secs(30 + self.memory / (CAPPED / 2))
    }
}

/// Command-line options.
struct Args {
    quick: bool,
    only: Option<String>,
    memory: Option<Vec<u64>>,
    timeout_per_gib: Option<u64>,
    downtime_limit: Option<HumanDuration>,
}

fn parse_args(raw: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut a = Args {
        quick: false,
        only: None,
        memory: None,
        timeout_per_gib: None,
        downtime_limit: None,
    };
    let mut raw = raw.peekable();
    while let Some(arg) = raw.next() {
        // Accept both `--flag value` and `--flag=value`.
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| raw.next())
                .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))
        };
        match flag.as_str() {
            "--quick" => a.quick = true,
            // `cargo bench` passes this to every harness-less bench.
            "--bench" => {}
            "--only" => a.only = Some(value()?),
            "--memory" => {
                let list = value()?;
                let sizes = list
                    .split(',')
                    .map(|s| s.parse::<Quantity>().map(Quantity::bytes))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| format!("--memory: {e}"))?;
                a.memory = Some(sizes);
            }
            "--timeout-per-gib" => {
                let n = value()?
                    .parse::<u64>()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or("--timeout-per-gib takes a positive number of seconds")?;
                a.timeout_per_gib = Some(n);
            }
            "--downtime-limit" => {
                let d = value()?
                    .parse::<HumanDuration>()
                    .map_err(|e| format!("--downtime-limit: {e}"))?;
                a.downtime_limit = Some(d);
            }
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    Ok(a)
}

/// What one row measured.
struct Row {
    label: String,
    bandwidth: u64,
    result: String,
    succeeded: bool,
    /// The bench failed, or a migrated guest is broken on the target (not a
    /// failed migration, which is a result): exit non-zero.
    broken: bool,
    total: Option<Duration>,
    switch: Option<Duration>,
    downtime_ms: Option<u64>,
    bytes_sent: u64,
    passes: u32,
    /// Highest throttle and number of throttle changes.
    throttle: (u8, usize),
    mode: Option<MigrationMode>,
    faults: u64,
    p50_us: Option<u64>,
    p99_us: Option<u64>,
    delta_pages: u64,
    note: String,
}

impl Row {
    fn bench_error(case: &Case, what: String) -> Self {
        Self {
            label: case.label.clone(),
            bandwidth: case.bandwidth,
            result: "bench error".into(),
            succeeded: false,
            broken: true,
            total: None,
            switch: None,
            downtime_ms: None,
            bytes_sent: 0,
            passes: 0,
            throttle: (0, 0),
            mode: None,
            faults: 0,
            p50_us: None,
            p99_us: None,
            delta_pages: 0,
            note: what,
        }
    }

    fn from_record(case: &Case, m: &MigrationRecord, run: &Run) -> Self {
        let total = match (m.start_timestamp, m.end_timestamp) {
            (Some(s), Some(e)) => s.until(e),
            _ => run.wall,
        };
        let switch = match (m.start_timestamp, m.post_copy_start_timestamp) {
            (Some(s), Some(p)) => Some(s.until(p)),
            _ => None,
        };
        let succeeded = m.phase == MigrationPhase::Succeeded && !run.stuck;
        let result = if run.stuck {
            format!("stuck in {}, cancelled", run.stuck_phase)
        } else if succeeded {
            "Succeeded".into()
        } else {
            match m.failure_code {
                Some(FailureCode::Timeout) if m.mode == MigrationMode::PreCopy => {
                    "timeout (no converge)".into()
                }
                Some(code) => code.to_string(),
                None => m.phase.to_string(),
            }
        };
        let note = if succeeded {
            run.target.clone()
        } else {
            m.failure_reason.clone().unwrap_or_default()
        };
        Self {
            label: case.label.clone(),
            bandwidth: case.bandwidth,
            result,
            succeeded,
            broken: succeeded && run.target_failed,
            total: Some(total),
            switch,
            downtime_ms: m.actual_downtime_ms,
            bytes_sent: m.bytes_sent,
            passes: m.passes,
            throttle: (
                m.throttle_steps
                    .iter()
                    .map(|s| s.percent)
                    .max()
                    .unwrap_or(0),
                m.throttle_steps.len(),
            ),
            mode: Some(m.mode),
            faults: m.remote_faults,
            p50_us: m.fault_latency_p50_us,
            p99_us: m.fault_latency_p99_us,
            delta_pages: m.delta_pages,
            note,
        }
    }
}

/// A migration that reached a final phase (or was cancelled).
struct Run {
    record: MigrationRecord,
    wall: Duration,
    /// No final phase within the case's wait limit; cancelled.
    stuck: bool,
    stuck_phase: String,
    /// The target guest's health after a success.
    target: String,
    target_failed: bool,
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(missing) = check_binaries() {
        eprintln!(
            "{missing} is missing: run `cargo build --release --workspace` first \
             (same CARGO_TARGET_DIR as this bench)"
        );
        return ExitCode::FAILURE;
    }
    let cases = cases(&args);
    if cases.is_empty() {
        eprintln!("no row matches --only {:?}", args.only.unwrap_or_default());
        return ExitCode::FAILURE;
    }

    let raw_size = GIB;
    eprintln!("baseline: raw quinn, {} on one stream", human(raw_size));
    let raw = raw_quinn(raw_size);

    let mut rows = Vec::new();
    let mut downtime_limit = None;
    if kvm_available_or_skip() {
        let cluster = Cluster::loopback(|_| {});
        let started = Instant::now();
        for (i, case) in cases.iter().enumerate() {
            eprintln!(
                "[{}/{}] {} (completion timeout {} s, +{:.0} s)",
                i + 1,
                cases.len(),
                case.label,
                case.completion_timeout().as_secs(),
                started.elapsed().as_secs_f64()
            );
            let row = match run_case(&cluster, &format!("strat-{i}"), case) {
                Ok(run) => {
                    if let Some(c) = &run.record.migration_configuration {
                        downtime_limit = Some(c.downtime_limit);
                    }
                    Row::from_record(case, &run.record, &run)
                }
                Err(e) => {
                    eprintln!("  bench error: {e}");
                    Row::bench_error(case, e)
                }
            };
            eprintln!(
                "  -> {} in {}, downtime {}",
                row.result,
                secs(row.total),
                opt(row.downtime_ms, " ms")
            );
            rows.push(row);
        }
    }

    print_table(&args, &rows, downtime_limit);
    print_baseline(raw, raw_size);
    print_reference();
    print_targets(&rows);
    if rows.iter().any(|r| r.broken) {
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

/// The rows to run, in order: by memory, then mode, bandwidth, strategy.
fn cases(args: &Args) -> Vec<Case> {
    let big = if available_memory().is_some_and(|m| m < 12 * GIB) {
        2 * GIB
    } else {
        4 * GIB
    };
    let memories = match (&args.memory, args.quick) {
        (Some(m), _) => m.clone(),
        (None, true) => vec![GIB],
        (None, false) => vec![GIB, big],
    };
    let mut out = Vec::new();
    for &memory in &memories {
        let gib = memory.div_ceil(GIB).max(1);
        let timeout_per_gib = args
            .timeout_per_gib
            .unwrap_or(DEFAULT_TIMEOUT_PER_GIB.min((ROW_TIMEOUT_CAP_S / gib).max(1)));
        for mode in [DirtyMode::Sparse, DirtyMode::Full] {
            for bandwidth in [0, CAPPED] {
                for strategy in Strategy::ALL {
                    let label = format!(
                        "{} {} {} {}",
                        size_label(memory),
                        mode.as_str(),
                        strategy.name(),
                        bandwidth_label(bandwidth)
                    );
                    if args.only.as_deref().is_some_and(|o| !label.contains(o)) {
                        continue;
                    }
                    out.push(Case {
                        label,
                        memory,
                        mode,
                        strategy,
                        bandwidth,
                        timeout_per_gib,
                        downtime_limit: args.downtime_limit,
                    });
                }
            }
        }
    }
    out
}

/// Creates a fresh guest, lets it fill its working set, migrates it and
/// checks it on the target; the guest is deleted on both hosts afterwards
/// whatever happened.
fn run_case(c: &Cluster, name: &str, case: &Case) -> Result<Run, String> {
    let run = migrate(c, name, case);
    let cleaned = cleanup(c, name);
    let run = run?;
    cleaned?;
    Ok(run)
}

fn migrate(c: &Cluster, name: &str, case: &Case) -> Result<Run, String> {
    let spec = VmSpec {
        name: name.into(),
        labels: Default::default(),
        memory: Quantity(case.memory),
        vcpus: VCPUS,
        workload: WorkloadSpec {
            wss: Quantity(workload_wss(case.memory)),
            dirty_rate: DirtyRate::Max,
            mode: case.mode,
            seed: 1,
        },
    };
    c.block_on(c.client(A).create_vm(&spec))
        .map_err(|e| format!("create vm {name}: {e}"))?;
    wait_running(c, A, name);
    wait_populated(c, name, workload_wss(case.memory))?;

    let req = MigrationRequest {
        vm: name.into(),
        target_host: B.into(),
        verify: false,
        options: case
            .strategy
            .options(case.bandwidth, case.timeout_per_gib, case.downtime_limit),
    };
    let client = c.client(A);
    let wall = Instant::now();
    let created = c
        .block_on(client.create_migration(&req))
        .map_err(|e| format!("create migration of {name}: {e}"))?;
    let deadline = wall + case.wait_limit();
    let mut stuck = false;
    let mut stuck_phase = String::new();
    let record = loop {
        let m = c
            .block_on(client.get_migration(&created.name))
            .map_err(|e| format!("get migration {}: {e}", created.name))?;
        if m.phase.is_final() {
            break m;
        }
        if Instant::now() >= deadline && !stuck {
            // Bound the row: cancel and give the abort its own deadline.
            stuck = true;
            stuck_phase = format!("{} {:?}", m.phase, m.mode);
            eprintln!(
                "  no final phase after {:?} ({stuck_phase}); cancelling",
                case.wait_limit()
            );
            let _ = c.block_on(client.cancel_migration(&created.name));
        } else if stuck && Instant::now() >= deadline + Duration::from_secs(30) {
            return Err(format!(
                "migration {} still {} 30 s after cancel",
                created.name, m.phase
            ));
        }
        // The record is the only view of the engine's progress.
        std::thread::sleep(POLL);
    };
    let wall = wall.elapsed();
    let (target, target_failed) = if record.phase == MigrationPhase::Succeeded && !stuck {
        check_target(c, name)
    } else {
        if record.phase != MigrationPhase::Succeeded {
            eprintln!(
                "  failed: {:?} {:?}",
                record.failure_code.map(FailureCode::as_str),
                record.failure_reason
            );
        }
        (String::new(), false)
    };
    Ok(Run {
        record,
        wall,
        stuck,
        stuck_phase,
        target,
        target_failed,
    })
}

/// The working set for `memory`: all of it but the workload's system area
/// (params, page tables, stacks, code: well under 1 MiB), and at most the
/// low 3 GiB, since the working set must be one contiguous piece and RAM
/// above 3 GiB sits at 4 GiB and up.
fn workload_wss(memory: u64) -> u64 {
    memory.min(LOW_RAM_END) - MIB
}

/// Waits until the guest has written every page of its working set at
/// least once (pages written summed over vCPUs reach the page count, and
/// every vCPU could have finished a pass), so pass 0 finds no holes.
fn wait_populated(c: &Cluster, name: &str, wss: u64) -> Result<(), String> {
    let pages = wss / 4096;
    let deadline = Instant::now() + POPULATE_TIMEOUT;
    loop {
        let v = c
            .block_on(c.client(A).get_vm(name))
            .map_err(|e| format!("get vm {name}: {e}"))?;
        if let Some(g) = &v.status.guest {
            if g.corrupt_pages != 0 {
                return Err(format!(
                    "guest {name} reports corruption before migrating: {g:?}"
                ));
            }
            if g.pages_written >= pages && g.passes >= u64::from(VCPUS) {
                return Ok(());
            }
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "guest {name} did not write its working set within {POPULATE_TIMEOUT:?}: {:?}",
                v.status.guest
            ));
        }
        // Counters come from the daemon's periodic probe of the VMM.
        std::thread::sleep(POLL);
    }
}

/// After a success: does the guest keep running on the target with intact
/// memory? It must complete another pass (its verification covers every
/// page it checks) with no corrupt page. Returns the note and whether that
/// failed.
fn check_target(c: &Cluster, name: &str) -> (String, bool) {
    let read = || {
        c.block_on(c.client(B).get_vm(name))
            .ok()
            .and_then(|v| v.status.guest)
    };
    let deadline = Instant::now() + TARGET_CHECK_TIMEOUT;
    let mut first = None;
    loop {
        if let Some(g) = read() {
            if g.corrupt_pages != 0 {
                return (
                    format!("CORRUPT: {} pages on target", g.corrupt_pages),
                    true,
                );
            }
            match first {
                None => first = Some(g.passes),
                Some(p) if g.passes > p => return ("target ok".into(), false),
                Some(_) => {}
            }
        }
        if Instant::now() >= deadline {
            return (
                format!("target made no pass in {TARGET_CHECK_TIMEOUT:?}"),
                true,
            );
        }
        // Counters come from the daemon's periodic probe of the VMM.
        std::thread::sleep(POLL);
    }
}

/// Deletes the guest on both hosts (the target first: after a success the
/// guest lives there) and checks that neither still lists it, so the next
/// row has the memory back.
fn cleanup(c: &Cluster, name: &str) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut left = Vec::new();
        for node in [B, A] {
            let client = c.client(node);
            let listed = c
                .block_on(client.list_vms())
                .map_err(|e| format!("list vms on {node}: {e}"))?
                .iter()
                .any(|v| v.spec.name == name);
            if listed {
                if let Err(e) = c.block_on(client.delete_vm(name)) {
                    left.push(format!("{node}: {e}"));
                }
            }
        }
        if left.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!("cannot delete {name}: {}", left.join("; ")));
        }
        // A VM still held by a finishing migration refuses deletion.
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn size_label(bytes: u64) -> String {
    if bytes.is_multiple_of(GIB) {
        format!("{}Gi", bytes / GIB)
    } else {
        format!("{}Mi", bytes / MIB)
    }
}

fn bandwidth_label(bytes_per_sec: u64) -> String {
    if bytes_per_sec == 0 {
        "unlimited".into()
    } else {
        size_label(bytes_per_sec)
    }
}
