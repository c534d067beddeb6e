//! The Multiboot image of the workload guest under real QEMU and KVM: it
//! boots, reports progress on COM1, survives QEMU's own live migration with
//! its counters and memory intact, maps RAM above 4 GiB, and refuses a bad
//! command line with a clear COM1 line.
//!
//! Gated on KVM (`MIGRATED_REQUIRE_KVM=1`) and on `qemu-system-x86_64`
//! (`MIGRATED_REQUIRE_QEMU=1`). The guest's serial log is the only view of
//! it; the tests poll that file (an external process's output) with a
//! deadline. Heavy for a 2-core host: run with `-- --test-threads=1`.

mod common;

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vmm::multiboot::{self, BootLine, GuestArgs, Progress, SerialLine, Sleep, Wss};
use vmm::workload::{DirtyMode, DirtyRate};

/// Bound on QEMU + SeaBIOS + the boot program reaching the BOOT line. The
/// firmware's 16-bit code is emulated on nested KVM, and the host is shared.
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
/// Bound on any other wait for guest output.
const LINE_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound on a whole QEMU migration.
const MIGRATE_TIMEOUT: Duration = Duration::from_secs(300);

/// Both gates: the QEMU binary, or None (after "skipped: ...") to skip.
fn qemu() -> Option<PathBuf> {
    if !vmm::kvm_check::kvm_available_or_skip() {
        return None;
    }
    vmm::qemu_check::qemu_available_or_skip()
}

fn host_args(wss: Wss, rate: DirtyRate, mode: DirtyMode) -> GuestArgs {
    GuestArgs {
        dirty_rate: rate,
        mode,
        seed: 7,
        tsc_khz: Some(multiboot::host_tsc_khz().expect("host TSC rate")),
        ..GuestArgs::new(wss)
    }
}

fn write_image(dir: &Path) -> PathBuf {
    let path = dir.join("guest.img");
    std::fs::write(&path, multiboot::image()).expect("write image");
    path
}

/// How to start QEMU beyond the guest itself.
struct How {
    /// `-bios ...`, or empty for QEMU's default (SeaBIOS).
    firmware: Vec<String>,
    /// `-incoming defer`: wait for a migration instead of booting.
    incoming: bool,
}

/// A running `qemu-system-x86_64`, killed on drop.
struct Qemu {
    child: Child,
    name: String,
    log: PathBuf,
    stderr: PathBuf,
    qmp: PathBuf,
    started: Instant,
}

impl Qemu {
    /// `-incoming defer` when `incoming`: the guest waits for a migration.
    /// Boots the image, with qboot when installed (fast), else SeaBIOS.
    fn start(bin: &Path, dir: &Path, name: &str, image: &Path, mem: &str, append: &str) -> Qemu {
        let how = How {
            firmware: multiboot::fast_firmware_args(),
            incoming: false,
        };
        Self::spawn(bin, dir, name, image, mem, append, how)
    }

    /// Waits for a migration (`-incoming defer`).
    fn incoming(bin: &Path, dir: &Path, name: &str, image: &Path, mem: &str, append: &str) -> Qemu {
        let how = How {
            firmware: multiboot::fast_firmware_args(),
            incoming: true,
        };
        Self::spawn(bin, dir, name, image, mem, append, how)
    }

    fn spawn(
        bin: &Path,
        dir: &Path,
        name: &str,
        image: &Path,
        mem: &str,
        append: &str,
        how: How,
    ) -> Qemu {
        let log = dir.join(format!("{name}.serial.log"));
        let stderr = dir.join(format!("{name}.stderr"));
        let qmp = dir.join(format!("{name}.qmp"));
        let mut cmd = Command::new(bin);
        cmd.args(["-accel", "kvm", "-machine", "q35", "-cpu", "host"])
            .args(&how.firmware)
            .args(["-m", mem, "-nodefaults", "-display", "none", "-no-reboot"])
            .arg("-serial")
            .arg(format!("file:{}", log.display()))
            .arg("-kernel")
            .arg(image)
            .args(["-append", append])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()));
        if how.incoming {
            cmd.args(["-incoming", "defer"]);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&stderr).expect("stderr file"));
        let child = cmd.spawn().expect("spawn qemu");
        Qemu {
            child,
            name: name.into(),
            log,
            stderr,
            qmp,
            started: Instant::now(),
        }
    }

    /// Complete COM1 lines so far.
    fn lines(&self) -> Vec<SerialLine> {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let complete = text.rfind('\n').map_or("", |i| &text[..i]);
        complete.lines().map(multiboot::parse_line).collect()
    }

    /// Polls the serial log until `done` returns Some, failing after
    /// `timeout`, if QEMU exits, or on a CORRUPT/EXCEPTION line.
    fn wait<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&[SerialLine]) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            let lines = self.lines();
            if let Some(bad) = lines
                .iter()
                .find(|l| matches!(l, SerialLine::Corrupt { .. } | SerialLine::Exception(_)))
            {
                panic!("{}: {bad:?} while waiting for {what}", self.name);
            }
            if let Some(t) = done(&lines) {
                return t;
            }
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                panic!(
                    "{}: qemu exited ({st}) while waiting for {what}; serial: {lines:?}; stderr: {}",
                    self.name,
                    std::fs::read_to_string(&self.stderr).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{}: no {what} within {timeout:?}; serial: {lines:?}",
                self.name
            );
            // Polling another process's output file.
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn wait_boot(&mut self) -> BootLine {
        self.wait("BOOT line", BOOT_TIMEOUT, |ls| {
            ls.iter().find_map(|l| match l {
                SerialLine::Boot(b) => Some(b.clone()),
                _ => None,
            })
        })
    }

    /// Waits for `n` PROGRESS lines after the first `skip` ones.
    fn wait_progress(&mut self, skip: usize, n: usize) -> Vec<Progress> {
        self.wait(&format!("{n} PROGRESS lines"), LINE_TIMEOUT, |ls| {
            let p = progress(ls);
            (p.len() >= skip + n).then(|| p[skip..].to_vec())
        })
    }

    fn qmp(&self) -> Qmp {
        Qmp::connect(&self.qmp, LINE_TIMEOUT)
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn progress(lines: &[SerialLine]) -> Vec<Progress> {
    lines
        .iter()
        .filter_map(|l| match l {
            SerialLine::Progress(p) => Some(p.clone()),
            _ => None,
        })
        .collect()
}

/// Counters only go up, and passes do advance over the lines.
fn assert_advancing(p: &[Progress]) {
    for w in p.windows(2) {
        assert!(
            w[1].passes >= w[0].passes && w[1].pages >= w[0].pages && w[1].tsc > w[0].tsc,
            "counters went back: {w:?}"
        );
    }
    assert!(p.iter().all(|x| x.corrupt == 0 && x.vcpu == 0), "{p:?}");
    let (first, last) = (&p[0], &p[p.len() - 1]);
    assert!(last.passes > first.passes, "no pass completed: {p:?}");
}

/// A minimal QMP client: one JSON object per line over the unix socket.
struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    fn connect(path: &Path, timeout: Duration) -> Qmp {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) => {
                    assert!(Instant::now() < deadline, "no QMP socket {path:?}: {e}");
                    // QEMU creates the socket while it starts up.
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        };
        stream.set_read_timeout(Some(timeout)).expect("timeout");
        let writer = stream.try_clone().expect("clone");
        let mut q = Qmp {
            reader: BufReader::new(stream),
            writer,
        };
        let greeting = q.read();
        assert!(greeting.get("QMP").is_some(), "{greeting}");
        q.execute("qmp_capabilities", json!({}))
            .expect("qmp_capabilities");
        q
    }

    fn read(&mut self) -> Value {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).expect("read QMP");
        assert!(n > 0, "QMP connection closed");
        serde_json::from_str(&line).expect("QMP json")
    }

    /// The `return` value, or the `error` object. Events are skipped.
    fn execute(&mut self, cmd: &str, args: Value) -> Result<Value, Value> {
        let msg = json!({ "execute": cmd, "arguments": args });
        writeln!(self.writer, "{msg}").expect("write QMP");
        loop {
            let v = self.read();
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(e.clone());
            }
        }
    }

    /// Polls `query-migrate` until the migration completes; its final
    /// stats. Fails on `failed`/`cancelled` or after the timeout.
    fn wait_migrated(&mut self) -> Value {
        let deadline = Instant::now() + MIGRATE_TIMEOUT;
        loop {
            let info = self
                .execute("query-migrate", json!({}))
                .expect("query-migrate");
            match info["status"].as_str() {
                Some("completed") => return info,
                Some("failed" | "cancelled") => panic!("migration ended: {info}"),
                _ => {}
            }
            assert!(Instant::now() < deadline, "migration not done: {info}");
            // Polling QEMU's migration status.
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Runs `src`'s guest into a new QEMU through QEMU's own migration over a
/// unix socket; returns the target and the source's final stats.
fn migrate(
    bin: &Path,
    dir: &Path,
    src: &Qemu,
    image: &Path,
    mem: &str,
    append: &str,
) -> (Qemu, Value) {
    let dst = Qemu::incoming(bin, dir, "dst", image, mem, append);
    let uri = format!("unix:{}", dir.join("migration.sock").display());
    let mut dq = dst.qmp();
    dq.execute("migrate-incoming", json!({ "uri": uri }))
        .expect("migrate-incoming");
    let mut sq = src.qmp();
    sq.execute("migrate", json!({ "uri": uri }))
        .expect("migrate");
    let info = sq.wait_migrated();
    let status = dq.execute("query-status", json!({})).expect("query-status");
    assert_eq!(status["status"], "running", "{status}");
    (dst, info)
}

#[test]
fn boots_and_reports_progress() {
    let Some(bin) = qemu() else { return };
    let dir = common::scratch();
    let image = write_image(dir.path());
    // Spinning here; the migration test covers the default (hlt).
    let args = GuestArgs {
        sleep: Sleep::Spin,
        ..host_args(
            Wss::Bytes(16 << 20),
            DirtyRate::MibPerSec(50),
            DirtyMode::Full,
        )
    };
    // QEMU's default firmware (SeaBIOS), not the faster qboot the other
    // tests use when they can.
    let how = How {
        firmware: Vec::new(),
        incoming: false,
    };
    let mut q = Qemu::spawn(
        &bin,
        dir.path(),
        "guest",
        &image,
        "256",
        &args.cmdline(),
        how,
    );
    let boot = q.wait_boot();
    eprintln!("SeaBIOS: start to BOOT line {:?}", q.started.elapsed());
    assert_eq!(boot.wss, 16 << 20);
    assert_eq!(boot.mode, DirtyMode::Full);
    assert_eq!(boot.dirty_rate, DirtyRate::MibPerSec(50));
    assert_eq!(boot.seed, 7);
    assert_eq!(Some(boot.tsc_khz), args.tsc_khz.map(u64::from));
    assert_eq!(boot.tsc_from, "cmdline");
    assert_eq!(boot.sleep, Sleep::Spin);
    assert!(boot.wss_gpa >= multiboot::layout::LOAD_GPA, "{boot:?}");
    let p = q.wait_progress(0, 4);
    assert_advancing(&p);
    assert!(q.lines().contains(&SerialLine::Started));
}

#[test]
fn qemu_migration_continues_the_counters() {
    let Some(bin) = qemu() else { return };
    let dir = common::scratch();
    let image = write_image(dir.path());
    let args = host_args(
        Wss::Bytes(32 << 20),
        DirtyRate::MibPerSec(50),
        DirtyMode::Full,
    );
    let append = args.cmdline();
    let mut src = Qemu::start(&bin, dir.path(), "src", &image, "256", &append);
    // -cpu host has x2APIC and the TSC-deadline timer: paced waits halt.
    assert_eq!(src.wait_boot().sleep, Sleep::Hlt);
    // Past the first pass, so the target checks pages the source wrote.
    src.wait("a completed pass", LINE_TIMEOUT, |ls| {
        progress(ls).iter().any(|p| p.passes >= 2).then_some(())
    });
    let (mut dst, info) = migrate(&bin, dir.path(), &src, &image, "256", &append);
    eprintln!(
        "qemu migration: total {} ms, downtime {} ms, {} bytes",
        info["total-time"], info["downtime"], info["ram"]["transferred"]
    );
    // The source is paused for good now: its last line is final.
    let last_src = progress(&src.lines()).pop().expect("source progress");
    let p = dst.wait_progress(0, 3);
    assert!(
        p[0].passes >= last_src.passes && p[0].pages > last_src.pages,
        "target did not continue the source's counters: {last_src:?} then {p:?}"
    );
    assert_advancing(&p);
    // The guest kept checking its pages through the switch: a page the
    // migration lost or garbled would have printed CORRUPT (checked by
    // `wait`), and a pass over the whole set has completed since.
    assert!(p.last().unwrap().passes >= last_src.passes + 2, "{p:?}");
    assert!(
        !dst.lines().iter().any(|l| matches!(l, SerialLine::Boot(_))),
        "the target booted instead of resuming"
    );
}

#[test]
fn four_gib_idle_guest_maps_memory_above_4g() {
    let Some(bin) = qemu() else { return };
    let dir = common::scratch();
    let image = write_image(dir.path());
    // No tsc_khz: the guest reads the TSC rate from KVM's clock page.
    let args = GuestArgs::new(Wss::Bytes(64 << 20));
    let mut q = Qemu::start(&bin, dir.path(), "big", &image, "4G", &args.cmdline());
    let boot = q.wait_boot();
    let host = u64::from(multiboot::host_tsc_khz().expect("host TSC rate"));
    assert_eq!(boot.tsc_from, "kvmclock");
    // Rounding of KVM's fixed-point factor only.
    assert!(
        boot.tsc_khz.abs_diff(host) <= host / 10_000,
        "{boot:?}, host {host} kHz"
    );
    // q35 keeps 2 GiB below 4 GiB and puts the other 2 GiB above; that is
    // the largest free piece, so the working set lives there.
    assert!(boot.wss_gpa >= 4 << 30, "{boot:?}");
    assert!(boot.mapped_top >= 6 << 30, "{boot:?}");
    assert!(boot.ram > (4 << 30) - (16 << 20), "{boot:?}");
    // Idle: one fill (the first line comes from its start), then
    // read-only check passes.
    let p = q.wait_progress(1, 3);
    assert_advancing(&p);
    assert!(p.iter().all(|x| x.pages == 16384), "{p:?}");
}

#[test]
fn bad_command_line_is_reported_on_com1() {
    let Some(bin) = qemu() else { return };
    let dir = common::scratch();
    let image = write_image(dir.path());
    let cases = [
        ("wss=12Q", "\"wss=12Q\": expected a size"),
        (
            "wss=16M mode=dense",
            "\"mode=dense\": expected sparse or full",
        ),
        ("wss=16M colour=blue", "\"colour=blue\": unknown key"),
        (
            "wss=4097",
            "\"wss=4097\": the working set must be a whole number",
        ),
        ("dirty_rate=5", "wss= is required"),
        ("wss=1G", "wss=1073741824 does not fit"),
    ];
    for (i, (append, want)) in cases.iter().enumerate() {
        let mut q = Qemu::start(&bin, dir.path(), &format!("bad{i}"), &image, "256", append);
        let err = q.wait("an ERROR line", BOOT_TIMEOUT, |ls| {
            ls.iter().find_map(|l| match l {
                SerialLine::Error(e) => Some(e.clone()),
                _ => None,
            })
        });
        assert!(err.contains(want), "{append:?}: {err:?}");
        let lines = q.lines();
        assert!(
            !lines
                .iter()
                .any(|l| matches!(l, SerialLine::Boot(_) | SerialLine::Started)),
            "{append:?} started anyway: {lines:?}"
        );
        if !want.contains("does not fit") {
            let usage = q.wait("the USAGE line", LINE_TIMEOUT, |ls| {
                ls.iter().find_map(|l| match l {
                    SerialLine::Other(o) if o.starts_with("USAGE ") => Some(o.clone()),
                    _ => None,
                })
            });
            assert!(usage.contains("wss=SIZE|max [dirty_rate="), "{usage}");
        }
    }
}

#[test]
fn an_exception_is_reported_on_com1_and_halts() {
    let Some(bin) = qemu() else { return };
    let dir = common::scratch();
    let image = write_image(dir.path());
    let append = "wss=16M selftest=exception";
    let mut q = Qemu::start(&bin, dir.path(), "fault", &image, "256", append);
    let deadline = Instant::now() + BOOT_TIMEOUT;
    let exc = loop {
        let lines = q.lines();
        if let Some(e) = lines.iter().find_map(|l| match l {
            SerialLine::Exception(e) => Some(e.clone()),
            _ => None,
        }) {
            break e;
        }
        assert!(
            q.child.try_wait().expect("try_wait").is_none(),
            "qemu exited: {lines:?}"
        );
        assert!(Instant::now() < deadline, "no EXCEPTION line: {lines:?}");
        // Polling another process's output file.
        std::thread::sleep(Duration::from_millis(50));
    };
    // #GP from ring 3 (user CS 0x33), caught by the IDT rather than a
    // triple fault (which would end QEMU: -no-reboot).
    assert!(exc.starts_with("vector=13 "), "{exc}");
    assert!(exc.contains(" cs=0x0000000000000033 "), "{exc}");
    let lines = q.lines();
    assert!(
        !lines.iter().any(|l| matches!(l, SerialLine::Boot(_))),
        "{lines:?}"
    );
    // Halted, not reset: QEMU is still there.
    let status = q
        .qmp()
        .execute("query-status", json!({}))
        .expect("query-status");
    assert_eq!(status["running"], true, "{status}");
    assert!(q.child.try_wait().expect("try_wait").is_none());
}

#[test]
fn cli_writes_the_image() {
    let dir = common::scratch();
    let out = dir.path().join("sub.img");
    let st = Command::new(common::VMM_BIN)
        .args(["multiboot-image", "--out"])
        .arg(&out)
        .status()
        .expect("run migrate-vmm");
    assert!(st.success());
    assert_eq!(std::fs::read(&out).expect("image"), multiboot::image());
    // A path in a missing directory is an error, not a panic.
    let st = Command::new(common::VMM_BIN)
        .args(["multiboot-image", "--out"])
        .arg(dir.path().join("no/such/dir/x.img"))
        .stderr(Stdio::null())
        .status()
        .expect("run migrate-vmm");
    assert_eq!(st.code(), Some(1));
}

/// CPU seconds (user + system) process `pid` has used so far.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th of the whole line.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime");
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks as f64 / hz
}

/// Guest pages written per second from two PROGRESS lines.
fn pages_per_sec(a: &Progress, b: &Progress, tsc_khz: u64) -> f64 {
    (b.pages - a.pages) as f64 / ((b.tsc - a.tsc) as f64 / (tsc_khz as f64 * 1000.0))
}

/// Numbers for the report, not a pass/fail test:
/// `cargo test -p vmm --test qemu_guest measure -- --ignored --nocapture`
#[test]
#[ignore]
fn measure() {
    let Some(bin) = qemu() else { return };
    let dir = common::scratch();
    let image = write_image(dir.path());

    // Start to BOOT line, per firmware.
    for (fw, firmware) in [
        ("SeaBIOS", Vec::new()),
        ("qboot", multiboot::fast_firmware_args()),
    ] {
        let args = host_args(Wss::Bytes(16 << 20), DirtyRate::Idle, DirtyMode::Sparse);
        let how = How {
            firmware,
            incoming: false,
        };
        let mut q = Qemu::spawn(&bin, dir.path(), fw, &image, "256", &args.cmdline(), how);
        q.wait_boot();
        eprintln!("{fw}: QEMU start to BOOT line {:?}", q.started.elapsed());
    }

    // Host CPU the QEMU process uses (all its threads) for an idle and a
    // paced guest, halting or spinning while it waits.
    for sleep in [Sleep::Hlt, Sleep::Spin] {
        for rate in [DirtyRate::Idle, DirtyRate::MibPerSec(50)] {
            let args = GuestArgs {
                sleep,
                ..host_args(Wss::Bytes(32 << 20), rate, DirtyMode::Full)
            };
            let name = format!("cpu-{sleep:?}-{rate}");
            let mut q = Qemu::start(&bin, dir.path(), &name, &image, "256", &args.cmdline());
            q.wait_progress(1, 1);
            let (c0, t0) = (cpu_secs(q.child.id()), Instant::now());
            // A measurement window, not a synchronisation.
            std::thread::sleep(Duration::from_secs(4));
            let used = cpu_secs(q.child.id()) - c0;
            eprintln!(
                "sleep={sleep:?} dirty_rate={rate}: QEMU uses {:.0}% of a host CPU",
                100.0 * used / t0.elapsed().as_secs_f64()
            );
        }
    }

    // Dirty rate at max: QEMU vs our VMM, same working set.
    for mode in [DirtyMode::Sparse, DirtyMode::Full] {
        let args = host_args(Wss::Bytes(32 << 20), DirtyRate::Max, mode);
        let name = format!("max-{mode}");
        let mut q = Qemu::start(&bin, dir.path(), &name, &image, "256", &args.cmdline());
        let boot = q.wait_boot();
        // Skip the first lines: the first pass faults every page in.
        let p = q.wait_progress(2, 4);
        eprintln!(
            "{mode:?} max under QEMU: {:.0} pages/s",
            pages_per_sec(&p[0], &p[3], boot.tsc_khz)
        );
        drop(q);

        let o = common::RunOpts {
            memory: "256M",
            wss: "32M",
            dirty_rate: "max",
            mode: if mode == DirtyMode::Full {
                "full"
            } else {
                "sparse"
            },
            ..Default::default()
        };
        let v = common::Vmm::run(dir.path(), &format!("ours-{mode}"), &o);
        common::wait_for(&v, "two passes", LINE_TIMEOUT, |s| {
            common::all_passes_at_least(s, 2)
        });
        let (s0, t0) = (v.status(), Instant::now());
        // A measurement window, not a synchronisation.
        std::thread::sleep(Duration::from_secs(3));
        let (s1, t1) = (v.status(), Instant::now());
        let w = s1.counters[0].pages_written - s0.counters[0].pages_written;
        eprintln!(
            "{mode:?} max under migrate-vmm: {:.0} pages/s",
            w as f64 / (t1 - t0).as_secs_f64()
        );
        v.shutdown();
    }

    // QEMU migrating 1 GiB with 256 MiB dirtied at 50 MiB/s, at QEMU's
    // default bandwidth limit and unlimited.
    for unlimited in [false, true] {
        let d = tempfile::tempdir_in(dir.path()).expect("dir");
        let args = host_args(
            Wss::Bytes(256 << 20),
            DirtyRate::MibPerSec(50),
            DirtyMode::Full,
        );
        let append = args.cmdline();
        let mut src = Qemu::start(&bin, d.path(), "src", &image, "1G", &append);
        src.wait_boot();
        src.wait("a completed pass", Duration::from_secs(120), |ls| {
            progress(ls).iter().any(|p| p.passes >= 1).then_some(())
        });
        if unlimited {
            src.qmp()
                .execute(
                    "migrate-set-parameters",
                    json!({ "max-bandwidth": 1u64 << 40 }),
                )
                .expect("max-bandwidth");
        }
        let (mut dst, info) = migrate(&bin, d.path(), &src, &image, "1G", &append);
        dst.wait_progress(0, 2);
        eprintln!(
            "1 GiB guest, 256 MiB at 50 MiB/s, bandwidth {}: total {} ms, downtime {} ms, setup {} ms, transferred {} bytes, {} dirty syncs, {} MB/s",
            if unlimited { "unlimited" } else { "default" },
            info["total-time"],
            info["downtime"],
            info["setup-time"],
            info["ram"]["transferred"],
            info["ram"]["dirty-sync-count"],
            info["ram"]["mbps"],
        );
    }
}
