//! `vmm-bench`: the VMM numbers a migration's downtime is built from,
//! printed as one table.
//!
//! * VmState save / encode / decode / restore for 1 and 4 vCPUs (in-process
//!   `Machine`, the same code the VMM runs);
//! * dirty-log fetch for 1 GiB and 8 GiB guests (while the guest dirties);
//! * zero-page scan next to memcpy over the same resident buffer;
//! * guest boot to first counter, in-process and as a `migrate-vmm` process
//!   driven through its control socket;
//! * post-copy fault service: a guest whose RAM is all punched out runs on
//!   pages a thread installs with UFFDIO_COPY (local copy, no network).
//!
//! Needs /dev/kvm. Each figure is the median of `--reps` runs.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use guestmem::{is_zero_page, GuestMemory, MemoryLayout, Pager, Userfaultfd, PAGE_SIZE};
use vmm::control::ControlClient;
use vmm::machine::Machine;
use vmm::state::VmState;
use vmm::workload::{DirtyMode, DirtyRate, WorkloadParams};

#[derive(Parser, Debug)]
#[command(name = "vmm-bench", about = "VMM micro-benchmarks (needs /dev/kvm)")]
struct Args {
    /// Repetitions per measurement (median reported).
    #[arg(long, default_value_t = 7)]
    reps: usize,
    /// Skip the 8 GiB dirty-log guest (hosts short of address space).
    #[arg(long)]
    skip_8g: bool,
    /// Buffer size for the zero-scan / memcpy comparison, MiB. Keep it well
    /// above the last-level cache (480 MiB on the test host) so both loops
    /// measure memory, not cache.
    #[arg(long, default_value_t = 2048)]
    scan_mib: usize,
    /// Run only the post-copy fault rows.
    #[arg(long)]
    postcopy_only: bool,
}

struct Row {
    what: String,
    value: String,
    note: String,
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

fn devnull() -> Result<File> {
    File::options()
        .write(true)
        .open("/dev/null")
        .context("open /dev/null")
}

fn boot(memory: u64, vcpus: u32, wss: u64, rate: DirtyRate) -> Result<Machine> {
    let layout = MemoryLayout::for_size(memory).context("layout")?;
    let mem = Arc::new(GuestMemory::create("vmm-bench", layout).context("guest memory")?);
    let params = WorkloadParams {
        wss_bytes: wss,
        dirty_rate: rate,
        mode: DirtyMode::Sparse,
        seed: 1,
    };
    Machine::boot_workload(mem, vcpus, &params, devnull()?, false).context("boot workload")
}

/// Polls the guest's counters (in guest RAM) until every vCPU has a pass.
fn wait_first_pass(m: &Machine, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !m.counters().iter().all(|c| c.passes >= 1) {
        if Instant::now() > deadline {
            bail!("guest made no pass within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

fn bench_state(rows: &mut Vec<Row>, vcpus: u32, reps: usize) -> Result<()> {
    let m = boot(256 << 20, vcpus, 16 << 20, DirtyRate::MibPerSec(200))?;
    wait_first_pass(&m, Duration::from_secs(60))?;
    m.pause().context("pause")?;
    let mut save = Vec::new();
    let mut state = None;
    for _ in 0..reps {
        let t = Instant::now();
        let s = m.save().context("save")?;
        save.push(t.elapsed());
        state = Some(s);
    }
    let state = state.context("no reps")?;
    let mut enc = Vec::new();
    let mut dec = Vec::new();
    let mut blob = Vec::new();
    for _ in 0..reps {
        let t = Instant::now();
        blob = state.to_bytes();
        enc.push(t.elapsed());
        let t = Instant::now();
        VmState::from_bytes(&blob).context("decode")?;
        dec.push(t.elapsed());
    }
    let mut restore = Vec::new();
    for _ in 0..reps {
        let decoded = VmState::from_bytes(&blob).context("decode")?;
        let t = Instant::now();
        // Same memory, new VM: exactly what `migrate-vmm restore` does
        // after reading the state. Dropped (threads joined) outside the
        // timed part.
        let r =
            Machine::restore(Arc::clone(m.memory()), &decoded, devnull()?).context("restore")?;
        restore.push(t.elapsed());
        drop(r);
    }
    let n = format!("{vcpus} vCPU");
    rows.push(Row {
        what: format!("VmState save ({n})"),
        value: ms(median(save)),
        note: "Machine::save, paused guest".into(),
    });
    rows.push(Row {
        what: format!("VmState encode / decode ({n})"),
        value: format!("{} / {}", ms(median(enc)), ms(median(dec))),
        note: format!("blob {} bytes, crc checked", blob.len()),
    });
    rows.push(Row {
        what: format!("VmState restore ({n})"),
        value: ms(median(restore)),
        note: "Machine::restore: new VM, slots, vCPUs, state".into(),
    });
    m.shutdown();
    Ok(())
}

fn bench_dirty_log(rows: &mut Vec<Row>, gib: u64, reps: usize) -> Result<()> {
    let m = boot(gib << 30, 1, 64 << 20, DirtyRate::MibPerSec(200))?;
    wait_first_pass(&m, Duration::from_secs(60))?;
    m.vm().start_dirty_log().context("start dirty log")?;
    let _ = m.vm().fetch_dirty_log().context("first fetch")?;
    let mut times = Vec::new();
    let mut dirty = Vec::new();
    for _ in 0..reps {
        // Give the guest something to dirty between fetches.
        std::thread::sleep(Duration::from_millis(50));
        let t = Instant::now();
        let b = m.vm().fetch_dirty_log().context("fetch")?;
        times.push(t.elapsed());
        dirty.push(b.count());
    }
    dirty.sort_unstable();
    rows.push(Row {
        what: format!("dirty-log fetch ({gib} GiB guest)"),
        value: ms(median(times)),
        note: format!(
            "guest running, ~{} dirty pages per 50 ms; manual-protect={}",
            dirty[dirty.len() / 2],
            m.vm().caps().manual_dirty_log_protect
        ),
    });
    m.shutdown();
    Ok(())
}

/// Zero pages in `buf` (whole pages), as pass 0 scans for them.
fn zero_pages(buf: &[u8]) -> usize {
    buf.chunks_exact(PAGE_SIZE)
        .filter(|p| is_zero_page((*p).try_into().expect("page")))
        .count()
}

fn bench_scan(rows: &mut Vec<Row>, mib: usize, reps: usize) {
    let len = mib << 20;
    // Resident, non-shared pages: write every page so that neither loop
    // reads the kernel's shared zero page.
    let mut src = vec![1u8; len];
    src.fill(0);
    let mut dst = vec![1u8; len];
    let gib = len as f64 / (1u64 << 30) as f64;
    let mut scan = Vec::new();
    let mut copy = Vec::new();
    for _ in 0..reps {
        // black_box: the optimiser must not use its knowledge that `src`
        // was just zero-filled.
        let buf = std::hint::black_box(&src[..]);
        let t = Instant::now();
        let zero = zero_pages(buf);
        scan.push(t.elapsed());
        assert_eq!(zero, len / PAGE_SIZE);
    }
    // All-zero pages may be merged by a host below us (KSM, zero-page
    // dedup) and then read from cache; pages that differ only in their
    // last bytes cannot be merged and still make the scan read every byte.
    for (i, page) in src.chunks_exact_mut(PAGE_SIZE).enumerate() {
        page[PAGE_SIZE - 8..].copy_from_slice(&(i as u64 + 1).to_le_bytes());
    }
    let mut scan_tail = Vec::new();
    for _ in 0..reps {
        let buf = std::hint::black_box(&src[..]);
        let t = Instant::now();
        let zero = zero_pages(buf);
        scan_tail.push(t.elapsed());
        assert_eq!(zero, 0);
        let t = Instant::now();
        dst.copy_from_slice(&src);
        copy.push(t.elapsed());
        std::hint::black_box(&dst);
    }
    let rate = |d: Duration| format!("{:.1} GiB/s", gib / d.as_secs_f64());
    rows.push(Row {
        what: "zero-page scan (zero pages)".into(),
        value: rate(median(scan)),
        note: format!("is_zero_page over {mib} MiB of all-zero pages"),
    });
    rows.push(Row {
        what: "zero-page scan (last word set)".into(),
        value: rate(median(scan_tail)),
        note: "same, each page non-zero only in its last 8 bytes (distinct pages)".into(),
    });
    rows.push(Row {
        what: "memcpy".into(),
        value: rate(median(copy)),
        note: format!("{mib} MiB copy_from_slice from the distinct pages"),
    });
}

fn bench_boot_in_process(rows: &mut Vec<Row>, reps: usize) -> Result<()> {
    let mut times = Vec::new();
    for _ in 0..reps {
        let t = Instant::now();
        let m = boot(256 << 20, 1, 4 << 20, DirtyRate::Max)?;
        let deadline = t + Duration::from_secs(60);
        while m.counters().first().is_none_or(|c| c.pages_written == 0) {
            if Instant::now() > deadline {
                bail!("no counter within 60 s");
            }
            std::thread::yield_now();
        }
        times.push(t.elapsed());
        m.shutdown();
    }
    rows.push(Row {
        what: "boot to first counter (in-process)".into(),
        value: ms(median(times)),
        note: "256 MiB, 1 vCPU: memfd, VM, load, vCPU start, first page written".into(),
    });
    Ok(())
}

fn bench_boot_process(rows: &mut Vec<Row>, reps: usize) -> Result<()> {
    let exe = std::env::current_exe().context("current exe")?;
    let vmm_bin: PathBuf = exe.with_file_name("migrate-vmm");
    if !vmm_bin.exists() {
        rows.push(Row {
            what: "boot to first counter (process)".into(),
            value: "n/a".into(),
            note: format!("{} not built", vmm_bin.display()),
        });
        return Ok(());
    }
    let dir = std::env::temp_dir().join(format!("vmm-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).context("scratch dir")?;
    let sock = dir.join("bench.sock");
    let mut ready = Vec::new();
    let mut first = Vec::new();
    for _ in 0..reps {
        let t = Instant::now();
        let mut child = Command::new(&vmm_bin)
            .args(["run", "--name", "bench", "--control-socket"])
            .arg(&sock)
            .arg("--serial-log")
            .arg(dir.join("serial.log"))
            .args(["--memory", "256M", "--vcpus", "1", "--wss", "4M"])
            .args(["--dirty-rate", "max", "--mode", "sparse", "--seed", "1"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("spawn migrate-vmm")?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("stdout")?)
            .read_line(&mut line)
            .context("read READY")?;
        if !line.starts_with("READY ") {
            let _ = child.kill();
            bail!("migrate-vmm printed {line:?} instead of READY");
        }
        ready.push(t.elapsed());
        let mut c = ControlClient::connect_with_timeout(&sock, Duration::from_secs(10))
            .context("connect")?;
        let deadline = t + Duration::from_secs(60);
        loop {
            let s = c.status().context("status")?;
            if s.counters.first().is_some_and(|c| c.pages_written > 0) {
                break;
            }
            if Instant::now() > deadline {
                bail!("no counter within 60 s");
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        first.push(t.elapsed());
        c.shutdown().context("shutdown")?;
        child.wait().context("wait")?;
    }
    let _ = std::fs::remove_dir_all(&dir);
    rows.push(Row {
        what: "spawn to READY (process)".into(),
        value: ms(median(ready)),
        note: "migrate-vmm run, 256 MiB, 1 vCPU".into(),
    });
    rows.push(Row {
        what: "spawn to first counter (process)".into(),
        value: ms(median(first)),
        note: "polled through the control socket".into(),
    });
    Ok(())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted
        .get(((sorted.len().saturating_sub(1)) as f64 * p).round() as usize)
        .copied()
        .unwrap_or_default()
}

/// A 256 MiB, 2 vCPU guest dirtying 64 MiB flat out is paused, every data
/// page punched out of its memfd and the mapping registered with a
/// userfaultfd; a thread serves the faults from a copy until each vCPU has
/// made one more pass. Latency is fault read to UFFDIO_COPY done.
fn bench_postcopy(rows: &mut Vec<Row>) -> Result<()> {
    use std::os::fd::AsFd;
    use std::sync::atomic::{AtomicBool, Ordering};
    let m = boot(256 << 20, 2, 64 << 20, DirtyRate::Max)?;
    wait_first_pass(&m, Duration::from_secs(60))?;
    m.pause().context("pause")?;
    let before: Vec<u64> = m.counters().iter().map(|c| c.passes).collect();
    let mem = m.memory();
    let copy = GuestMemory::create("vmm-bench-copy", mem.layout().clone()).context("copy")?;
    let mut buf = vec![0u8; PAGE_SIZE];
    let ranges = mem.data_ranges().context("data ranges")?;
    for r in &ranges {
        for i in r.clone() {
            let off = i * PAGE_SIZE as u64;
            mem.read_at(off, &mut buf).context("read")?;
            copy.write_at(off, &buf).context("write")?;
        }
        mem.punch_hole(r.start, r.end - r.start).context("punch")?;
    }
    let uffd = Userfaultfd::create().context("userfaultfd")?;
    let regions = uffd.register_memory(mem).context("register")?;
    let pager = Pager::new(uffd.into_fd(), mem.layout(), regions).context("pager")?;
    let stop = AtomicBool::new(false);
    let t0 = Instant::now();
    let lat = std::thread::scope(|s| -> Result<Vec<Duration>> {
        let server = s.spawn(|| -> Result<Vec<Duration>> {
            let mut lat = Vec::new();
            let mut pending = Vec::new();
            let mut page = vec![0u8; PAGE_SIZE];
            while !stop.load(Ordering::Acquire) {
                let mut fds = [nix::poll::PollFd::new(
                    pager.as_fd(),
                    nix::poll::PollFlags::POLLIN,
                )];
                let _ = nix::poll::poll(&mut fds, 20u16);
                pending.clear();
                pager.read_faults(&mut pending)?;
                let t = Instant::now();
                for &i in &pending {
                    copy.read_at(i * PAGE_SIZE as u64, &mut page)?;
                    pager.install(i, &page)?;
                    lat.push(t.elapsed());
                }
            }
            Ok(lat)
        });
        let r = m.resume().context("resume").and_then(|()| {
            let deadline = Instant::now() + Duration::from_secs(120);
            loop {
                let now = m.counters();
                if now.iter().zip(&before).all(|(c, b)| c.passes > *b) {
                    if now.iter().any(|c| c.corrupt > 0) {
                        bail!("guest saw corruption: {now:?}");
                    }
                    return Ok(());
                }
                if Instant::now() > deadline {
                    bail!("no pass on served pages within 120 s");
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        m.shutdown();
        stop.store(true, Ordering::Release);
        let lat = server.join().expect("fault server panicked")?;
        r.map(|()| lat)
    })?;
    let took = t0.elapsed();
    let mut sorted = lat;
    sorted.sort();
    let note = format!(
        "{} faults in {:.2} s ({:.0}/s), max {:?}; 256 MiB, 2 vCPUs, all RAM missing",
        sorted.len(),
        took.as_secs_f64(),
        sorted.len() as f64 / took.as_secs_f64(),
        sorted.last().copied().unwrap_or_default()
    );
    let us = |d: Duration| format!("{:.1} us", d.as_secs_f64() * 1e6);
    rows.push(Row {
        what: "postcopy fault: read to installed, p50".into(),
        value: us(percentile(&sorted, 0.5)),
        note: note.clone(),
    });
    rows.push(Row {
        what: "postcopy fault: read to installed, p99".into(),
        value: us(percentile(&sorted, 0.99)),
        note,
    });
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.reps == 0 {
        bail!("--reps must be at least 1");
    }
    let mut rows = Vec::new();
    if args.postcopy_only {
        bench_postcopy(&mut rows).context("post-copy benchmark")?;
        print_rows(&rows);
        return Ok(());
    }
    for vcpus in [1, 4] {
        bench_state(&mut rows, vcpus, args.reps)
            .with_context(|| format!("state benchmark, {vcpus} vCPUs"))?;
    }
    bench_dirty_log(&mut rows, 1, args.reps).context("dirty log, 1 GiB")?;
    if !args.skip_8g {
        bench_dirty_log(&mut rows, 8, args.reps).context("dirty log, 8 GiB")?;
    }
    bench_scan(&mut rows, args.scan_mib, args.reps);
    bench_boot_in_process(&mut rows, args.reps.min(5)).context("boot benchmark")?;
    bench_boot_process(&mut rows, args.reps.min(5)).context("process boot benchmark")?;
    bench_postcopy(&mut rows).context("post-copy benchmark")?;
    print_rows(&rows);
    Ok(())
}

fn print_rows(rows: &[Row]) {
    let w0 = rows.iter().map(|r| r.what.len()).max().unwrap_or(0);
    let w1 = rows.iter().map(|r| r.value.len()).max().unwrap_or(0);
    println!("| {:w0$} | {:>w1$} | notes", "measurement", "median");
    println!("|{}|{}|------", "-".repeat(w0 + 2), "-".repeat(w1 + 2));
    for r in rows {
        println!("| {:w0$} | {:>w1$} | {}", r.what, r.value, r.note);
    }
}
