//! Helpers both migration benches include (`mod common;`): the binary
//! check, available memory, waiting for a guest to run, the raw-quinn
//! baseline and byte formatting.
//!
//! A directory module rather than `benches/common.rs`, because cargo would
//! auto-discover the latter as a bench target of its own.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use e2e::Cluster;
use migrated_api::model::VmPhase;
use transport::endpoint::{Endpoint, EndpointConfig, MigrationId};
use transport::identity::{ClusterCa, HostName, Validity};

pub const GIB: u64 = 1 << 30;
pub const MIB: u64 = 1 << 20;
const BINARIES: [&str; 3] = ["migrated", "migrate-vmm", "migratectl"];

/// The binaries `Binaries::locate` will look for, checked up front so a
/// missing build fails with what to run instead of a panic.
pub fn check_binaries() -> Result<(), String> {
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
pub fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Waits up to 60 s for `vm` on `node` to reach Running; panics with the
/// daemon's log otherwise.
pub fn wait_running(c: &Cluster, node: &str, vm: &str) {
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
pub fn raw_quinn(size: u64) -> Result<Duration, String> {
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

pub fn human(bytes: u64) -> String {
    if bytes >= GIB {
        format!("{:.2} GiB", bytes as f64 / GIB as f64)
    } else {
        format!("{:.1} MiB", bytes as f64 / MIB as f64)
    }
}
