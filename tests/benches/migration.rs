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

use std::net::{Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use e2e::{kvm_or_skip, Cluster};
use migrated::model::{MigrationPhase, MigrationRecord, MigrationRequest, VmPhase};
use transport::endpoint::{Endpoint, EndpointConfig, MigrationId};
use transport::identity::{ClusterCa, HostName, Validity};

const A: &str = "node-a";
const B: &str = "node-b";
const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(600);
const BINARIES: [&str; 3] = ["migrated", "migrate-vmm", "migratectl"];

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
    if kvm_or_skip("migration bench") {
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

/// The binaries `Binaries::locate` will look for, checked up front so a
/// missing build fails with what to run instead of a panic.
fn check_binaries() -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| format!("bench executable ({e})"))?;
    let deps = exe.parent().ok_or("bench executable directory")?;
    let dir = if deps.file_name().is_some_and(|n| n == "deps") {
        deps.parent().ok_or("target directory")?
    } else {
        deps
    };
    for b in BINARIES {
        let p = dir.join(b);
        if !p.is_file() {
            return Err(p.display().to_string());
        }
    }
    Ok(())
}

/// MemAvailable from /proc/meminfo.
fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
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
    let req = MigrationRequest {
        vm: name.into(),
        target_host: B.into(),
        verify: false,
    };
    let wall = Instant::now();
    let m = c
        .block_on(c.client(A).create_migration(&req))
        .unwrap_or_else(|e| {
            panic!(
                "create migration of {name}: {e}\n{}",
                c.node(A).log_tail(20)
            )
        });
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

fn wait_running(c: &Cluster, node: &str, vm: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = c
            .block_on(c.client(node).get_vm(vm))
            .unwrap_or_else(|e| panic!("get vm {vm}: {e}"));
        if v.status.phase == VmPhase::Running {
            return;
        }
        assert!(
            v.status.phase != VmPhase::Failed && Instant::now() < deadline,
            "vm {vm} not running: {:?} {:?}\n{}",
            v.status.phase,
            v.status.reason,
            c.node(node).log_tail(20)
        );
        // The VM status is the only readiness signal.
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Pushes `size` bytes over one plain quinn stream between two transport
/// endpoints on 127.0.0.1 and returns the wall time.
fn raw_quinn(size: u64) -> Result<Duration, String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    rt.block_on(raw_quinn_async(size))
}

async fn raw_quinn_async(size: u64) -> Result<Duration, String> {
    let ca = ClusterCa::generate("bench").map_err(|e| format!("ca: {e}"))?;
    let validity = Validity::for_duration(Duration::from_secs(3600));
    let config = EndpointConfig::listening_on(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)));
    let name = |n: &str| HostName::new(n).map_err(|e| format!("host name: {e}"));
    let identity = |n: &str| {
        ca.host_identity(&name(n)?, validity)
            .map_err(|e| format!("identity: {e}"))
    };
    let a = Endpoint::bind(&config, &identity("src")?).map_err(|e| format!("bind: {e}"))?;
    let b = Endpoint::bind(&config, &identity("dst")?).map_err(|e| format!("bind: {e}"))?;
    let server = b.clone();
    let accepted = tokio::spawn(async move { server.accept().await });
    let src = a
        .connect(b.local_addr().map_err(|e| e.to_string())?, &name("dst")?)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let dst = accepted
        .await
        .map_err(|e| e.to_string())?
        .ok_or("endpoint closed")?
        .map_err(|e| format!("accept: {e}"))?;
    let (s, d) = tokio::join!(
        src.open_migration(MigrationId(1), 1),
        dst.accept_migration()
    );
    let s = s.map_err(|e| format!("open streams: {e}"))?;
    let d = d.map_err(|e| format!("accept streams: {e}"))?;
    let mut tx = s.bulk.into_iter().next().ok_or("no bulk stream")?;
    let mut rx = d.bulk.into_iter().next().ok_or("no bulk stream")?;
    let chunk = vec![0x5Au8; MIB as usize];
    let start = Instant::now();
    let sender = tokio::spawn(async move {
        let mut left = size;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            tx.write_all(&chunk[..n]).await.map_err(|e| e.to_string())?;
            left -= n as u64;
        }
        tx.finish().map_err(|e| e.to_string())?;
        // Keep the stream until the peer has it all.
        let _ = tx.stopped().await;
        Ok::<(), String>(())
    });
    let mut got = 0u64;
    while let Some(c) = rx
        .read_chunk(usize::MAX, true)
        .await
        .map_err(|e| e.to_string())?
    {
        got += c.bytes.len() as u64;
    }
    sender.await.map_err(|e| e.to_string())??;
    let wall = start.elapsed();
    if got != size {
        return Err(format!("received {got} of {size} bytes"));
    }
    Ok(wall)
}

fn human(bytes: u64) -> String {
    if bytes >= GIB {
        format!("{:.2} GiB", bytes as f64 / GIB as f64)
    } else {
        format!("{:.1} MiB", bytes as f64 / MIB as f64)
    }
}
