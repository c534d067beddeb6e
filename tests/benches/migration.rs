//! Live-migration benchmark: two real `migrated` daemons on loopback, real
//! KVM guests, printed as a table.
//!
//! Rows (all without `verify`, which would add full-memory digests):
//! an idle 1 GiB guest, an idle 4 GiB guest, a 1 GiB guest dirtying 64 MiB
//! at 50 MiB/s (sparse and full mode), and a 4 GiB guest dirtying 256 MiB
//! at 50 MiB/s. Each row reports total time (the record's start → end
//! timestamps; wall clock around the migration if they are missing),
//! downtime (`actualDowntimeMs`), bytes on the wire (`bytesSent`) and as a
//! % of guest memory, pre-copy passes, and effective throughput (guest
//! memory / total time). A raw-quinn baseline (1 GiB on one plain stream
//! between two transport endpoints in this process) is measured in the
//! same run. `wall s` is the bench's own clock around create + polling
//! (100 ms poll interval), an upper bound; `zero pg` counts pages sent as
//! zero markers rather than data.
//!
//! The 4 GiB rows become 2 GiB when the box has less than 12 GiB
//! available (source and destination each hold a copy of the guest).
//!
//! Run `cargo build --release --workspace` first: the daemons, VMM and
//! `migratectl` are found next to this bench's executable
//! (`target/release/`), and `cargo bench` does not build them. Then:
//! `cargo bench -p e2e --bench migration` (add `-- --quick` for the 1 GiB
//! rows only).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use common::{available_memory, check_binaries, human, raw_quinn, wait_running, GIB, MIB};
use e2e::Cluster;
use migrated_api::model::{MigrationPhase, MigrationRecord};
use vmm::kvm_check::kvm_available_or_skip;

mod common;

const A: &str = "node-a";
const B: &str = "node-b";
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(600);

/// One guest to migrate.
struct Case {
    label: String,
    memory: u64,
    wss: u64,
    dirty_rate: u32,
    mode: &'static str,
}

impl Case {
    fn new(memory: u64, wss: u64, dirty_rate: u32, mode: &'static str) -> Self {
        let label = if dirty_rate == 0 {
            format!("idle {}", human(memory))
        } else {
            format!(
                "{} dirty {} @{dirty_rate}MiB/s {mode}",
                human(memory),
                human(wss)
            )
        };
        Self {
            label,
            memory,
            wss,
            dirty_rate,
            mode,
        }
    }
}

struct Row {
    label: String,
    memory: u64,
    total: Duration,
    downtime_ms: Option<u64>,
    bytes_sent: u64,
    passes: u32,
    zero_pages: u64,
    wall: Duration,
    succeeded: bool,
    note: String,
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    if let Err(missing) = check_binaries() {
        eprintln!(
            "{missing} is missing: run `cargo build --release --workspace` first \
             (same CARGO_TARGET_DIR as this bench)"
        );
        return ExitCode::FAILURE;
    }

    let big = if available_memory().is_some_and(|m| m < 12 * GIB) {
        2 * GIB
    } else {
        4 * GIB
    };
    let mut cases = vec![
        Case::new(GIB, 0, 0, "sparse"),
        Case::new(GIB, 64 * MIB, 50, "sparse"),
        Case::new(GIB, 64 * MIB, 50, "full"),
    ];
    if !quick {
        cases.insert(1, Case::new(big, 0, 0, "sparse"));
        cases.push(Case::new(big, 256 * MIB, 50, "sparse"));
    }

    let raw_size = GIB;
    let raw = raw_quinn(raw_size);

    let mut rows = Vec::new();
    if kvm_available_or_skip() {
        let cluster = Cluster::loopback(|_| {});
        for (i, case) in cases.iter().enumerate() {
            eprintln!("migrating: {}", case.label);
            rows.push(run_case(&cluster, &format!("bench-{i}"), case));
        }
    }

    println!(
        "live migration over loopback between two migrated daemons, no verify{}",
        if quick { " (--quick)" } else { "" }
    );
    println!(
        "{:<42} {:>8} {:>7} {:>10} {:>11} {:>7} {:>6} {:>9} {:>9}  note",
        "row", "total s", "wall s", "downtime", "wire", "% mem", "passes", "zero pg", "GiB/s"
    );
    for r in &rows {
        let secs = r.total.as_secs_f64();
        println!(
            "{:<42} {:>8.3} {:>7.2} {:>10} {:>11} {:>6.1}% {:>6} {:>9} {:>9.3}  {}",
            r.label,
            secs,
            r.wall.as_secs_f64(),
            r.downtime_ms
                .map_or_else(|| "-".to_string(), |d| format!("{d} ms")),
            human(r.bytes_sent),
            100.0 * r.bytes_sent as f64 / r.memory as f64,
            r.passes,
            r.zero_pages,
            if secs > 0.0 {
                r.memory as f64 / GIB as f64 / secs
            } else {
                0.0
            },
            r.note
        );
    }
    match raw {
        Ok(wall) => {
            let secs = wall.as_secs_f64();
            println!(
                "{:<42} {:>8.3} {:>7.2} {:>10} {:>11} {:>7} {:>6} {:>9} {:>9.3}  baseline, 1 plain stream",
                "raw quinn (in-process)",
                secs,
                secs,
                "-",
                human(raw_size),
                "-",
                "-",
                "-",
                raw_size as f64 / GIB as f64 / secs
            );
        }
        Err(e) => println!("raw quinn baseline failed: {e}"),
    }
    if rows.iter().any(|r| !r.succeeded) {
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

fn run_case(c: &Cluster, name: &str, case: &Case) -> Row {
    let memory = format!("{}Mi", case.memory / MIB);
    let wss = format!("{}Mi", case.wss.max(MIB) / MIB);
    let rate = case.dirty_rate.to_string();
    c.create_vm(
        A,
        &[
            name,
            "--memory",
            &memory,
            "--wss",
            &wss,
            "--dirty-rate",
            &rate,
            "--mode",
            case.mode,
        ],
    );
    wait_running(c, A, name);
    if case.dirty_rate > 0 {
        // Let the workload get going so the migration sees a dirty set.
        c.assert_guest_alive(A, name, Duration::from_secs(2));
    } else {
        std::thread::sleep(Duration::from_millis(500));
    }
    let wall = Instant::now();
    let m = c.start_migration(A, B, name, false, Default::default());
    let m = c.wait_migration(A, &m.name, MIGRATION_TIMEOUT, |m| m.phase.is_final());
    let wall = wall.elapsed();
    let row = row(case, &m, wall);
    if m.phase != MigrationPhase::Succeeded {
        eprintln!(
            "{name}: {m:?}\n{}\n{}",
            c.node(A).log_tail(20),
            c.node(B).log_tail(20)
        );
    }
    // Free the memory before the next guest.
    for node in [B, A] {
        let _ = c.block_on(c.client(node).delete_vm(name));
    }
    row
}

fn row(case: &Case, m: &MigrationRecord, wall: Duration) -> Row {
    let total = match (m.start_timestamp, m.end_timestamp) {
        (Some(s), Some(e)) => s.until(e),
        _ => wall,
    };
    Row {
        label: case.label.clone(),
        memory: case.memory,
        total,
        downtime_ms: m.actual_downtime_ms,
        bytes_sent: m.bytes_sent,
        passes: m.passes,
        zero_pages: m.zero_pages,
        wall,
        succeeded: m.phase == MigrationPhase::Succeeded,
        note: format!("{} {:?}", m.phase, m.mode),
    }
}
