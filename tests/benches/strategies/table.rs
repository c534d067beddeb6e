//! The strategies bench's output: the table, the raw-quinn baseline, the
//! QEMU reference bar from issue 5 and our targets checked against the
//! rows of this run.

use std::time::Duration;

use migrated_api::model::MigrationMode;
use migrated_api::quantity::HumanDuration;

use super::common::{human, GIB};
use super::{Args, Row, CAPPED, PROGRESS_TIMEOUT_S, VCPUS};

/// Notes longer than this are cut in the table.
const NOTE_WIDTH: usize = 100;

pub(super) fn print_table(args: &Args, rows: &[Row], downtime_limit: Option<HumanDuration>) {
    println!(
        "migration strategies over loopback between two migrated daemons: {VCPUS} vCPUs, \
         wss = memory - 1 MiB (at most 3 GiB - 1 MiB), dirty rate max, no verify{}",
        if args.quick { " (--quick)" } else { "" }
    );
    println!(
        "progress timeout {PROGRESS_TIMEOUT_S} s; downtime limit {}",
        downtime_limit.map_or_else(|| "daemon default".into(), |d| d.to_string())
    );
    println!(
        "{:<44} {:<22} {:>8} {:>8} {:>9} {:>10} {:>6} {:>8} {:>8} {:>7} {:>11} {:>8}  note",
        "row",
        "result",
        "total s",
        "switch s",
        "downtime",
        "wire",
        "passes",
        "throttle",
        "mode",
        "faults",
        "p50/p99 µs",
        "delta pg"
    );
    for r in rows {
        let throttle = if r.throttle.1 == 0 {
            "-".to_string()
        } else {
            format!("{}%/{}", r.throttle.0, r.throttle.1)
        };
        let latency = match (r.p50_us, r.p99_us) {
            (None, None) => "-".to_string(),
            (a, b) => format!("{}/{}", opt(a, ""), opt(b, "")),
        };
        println!(
            "{:<44} {:<22} {:>8} {:>8} {:>9} {:>10} {:>6} {:>8} {:>8} {:>7} {:>11} {:>8}  {}",
            r.label,
            r.result,
            secs(r.total),
            secs(r.switch),
            opt(r.downtime_ms, " ms"),
            if r.broken && r.bytes_sent == 0 {
                "-".into()
            } else {
                human(r.bytes_sent)
            },
            r.passes,
            throttle,
            r.mode.map_or("-", |m| match m {
                MigrationMode::PreCopy => "pre",
                MigrationMode::PostCopy => "post",
            }),
            r.faults,
            latency,
            r.delta_pages,
            short(&r.note, NOTE_WIDTH)
        );
    }
}

pub(super) fn print_baseline(raw: Result<Duration, String>, size: u64) {
    match raw {
        Ok(wall) => {
            let secs = wall.as_secs_f64();
            println!(
                "baseline, measured in this run: raw quinn (in-process, 1 plain stream) moved {} in {secs:.3} s = {:.3} GiB/s",
                human(size),
                size as f64 / GIB as f64 / secs
            );
        }
        Err(e) => println!("baseline: raw quinn failed: {e}"),
    }
}

pub(super) fn print_reference() {
    println!(
        "reference, QEMU 7.2 on this machine (from issue 5, NOT measured in this run), \
         1 GiB guest at max dirty rate:\n\
         \x20 unlimited bandwidth: pre-copy converges in ~1.2-1.7 s with 230-340 ms downtime; \
         auto-converge ~1.6 s / 160 ms; post-copy ~1.4 s / ~5 ms\n\
         \x20 at 128 MiB/s: pre-copy never converges; post-copy takes ~9-10 s"
    );
}

/// Our targets, each with what this run measured against it.
pub(super) fn print_targets(rows: &[Row]) {
    let ok = |met: bool| if met { "met" } else { "MISSED" };
    let worst = |pick: &dyn Fn(&Row) -> Option<u64>| {
        rows.iter()
            .filter_map(|r| pick(r).map(|v| (v, r.label.as_str())))
            .max_by_key(|(v, _)| *v)
    };
    println!("targets (measured: succeeded rows of this run):");
    let pre = worst(&|r| {
        (r.succeeded && r.mode == Some(MigrationMode::PreCopy))
            .then_some(r.downtime_ms)
            .flatten()
    });
    match pre {
        Some((ms, label)) => println!(
            "  downtime < 50 ms in every pre-copy mode: worst {ms} ms ({label}): {}",
            ok(ms < 50)
        ),
        None => println!("  downtime < 50 ms in every pre-copy mode: no succeeded pre-copy row"),
    }
    let post = worst(&|r| {
        (r.succeeded && r.mode == Some(MigrationMode::PostCopy))
            .then_some(r.downtime_ms)
            .flatten()
    });
    match post {
        Some((ms, label)) => println!(
            "  post-copy switchover < 5 ms: worst {ms} ms ({label}): {}",
            ok(ms < 5)
        ),
        None => println!("  post-copy switchover < 5 ms: no succeeded post-copy row"),
    }
    match worst(&|r| r.succeeded.then_some(r.p99_us).flatten()) {
        Some((us, label)) => println!(
            "  remote fault p99 < 150 µs: worst {us} µs ({label}): {}",
            ok(us < 150)
        ),
        None => println!("  remote fault p99 < 150 µs: no row with fault latencies"),
    }
    let capped: Vec<&Row> = rows.iter().filter(|r| r.bandwidth == CAPPED).collect();
    let fast: Vec<&Row> = capped
        .iter()
        .copied()
        .filter(|r| r.succeeded && r.total.is_some_and(|t| t < Duration::from_secs(20)))
        .collect();
    let best = fast
        .iter()
        .min_by_key(|r| r.total)
        .map(|r| format!(", fastest {} s ({})", secs(r.total), r.label))
        .unwrap_or_default();
    println!(
        "  convergence at 128 MiB/s in < 20 s: {} of {} capped rows{best}",
        fast.len(),
        capped.len()
    );
}

/// `s` cut to `max` characters; the full text went to stderr.
fn short(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

pub(super) fn secs(d: Option<Duration>) -> String {
    d.map_or_else(|| "-".into(), |d| format!("{:.2}", d.as_secs_f64()))
}

pub(super) fn opt(v: Option<u64>, unit: &str) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v}{unit}"))
}
