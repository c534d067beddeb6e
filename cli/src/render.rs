//! Turning API objects into what people read: tables, the KubeVirt-like
//! `describe` block, YAML, and human sizes and rates.

use std::fmt::Write as _;
use std::time::SystemTime;

use migrated_api::model::{
    ConditionStatus, MigrationConfiguration, MigrationMode, MigrationRecord, ThrottleStep,
    Timestamp, Vm,
};
use serde_json::Value;

/// `1536` → `1.5 KiB`; exact small values stay in bytes.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

pub fn rate(bytes_per_sec: u64) -> String {
    format!("{}/s", bytes(bytes_per_sec))
}

/// The guest page size every count of pages in a record refers to.
const PAGE_SIZE: u64 = 4096;

/// `PreCopy` / `PostCopy`, as the record's JSON spells it.
pub fn mode(m: MigrationMode) -> &'static str {
    match m {
        MigrationMode::PreCopy => "PreCopy",
        MigrationMode::PostCopy => "PostCopy",
    }
}

/// `1234` ms → `1.2s`: the offset of a throttle step into the migration.
fn offset(ms: u64) -> String {
    format!("{}.{}s", ms / 1000, ms % 1000 / 100)
}

/// Age like kubectl: `45s`, `12m`, `3h`, `2d`.
pub fn age(t: Timestamp) -> String {
    let secs = SystemTime::now()
        .duration_since(t.0)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

/// Left-aligned columns separated by three spaces, like kubectl.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                l.push_str(cell);
            } else {
                let _ = write!(l, "{cell:<w$}   ");
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

pub fn vm_table(vms: &[Vm]) -> String {
    let rows: Vec<Vec<String>> = vms
        .iter()
        .map(|v| {
            let live = v
                .status
                .live_migratable()
                .map(|c| match c.status {
                    ConditionStatus::True => "True".to_string(),
                    ConditionStatus::False => format!("False ({})", c.reason),
                    ConditionStatus::Unknown => "Unknown".to_string(),
                })
                .unwrap_or_default();
            vec![
                v.spec.name.clone(),
                v.status.phase.to_string(),
                v.spec.memory.to_string(),
                v.spec.vcpus.to_string(),
                v.spec.workload.dirty_rate.to_string(),
                live,
                v.status
                    .guest
                    .as_ref()
                    .map(|g| g.passes.to_string())
                    .unwrap_or_else(|| "-".into()),
                v.status.node_name.clone(),
                v.status.created.map(age).unwrap_or_default(),
            ]
        })
        .collect();
    table(
        &[
            "NAME",
            "PHASE",
            "MEMORY",
            "VCPUS",
            "DIRTY-MIB/S",
            "LIVE-MIGRATABLE",
            "PASSES",
            "NODE",
            "AGE",
        ],
        &rows,
    )
}

pub fn migration_table(ms: &[MigrationRecord]) -> String {
    let rows: Vec<Vec<String>> = ms
        .iter()
        .map(|m| {
            vec![
                m.name.clone(),
                m.vm.clone(),
                m.phase.to_string(),
                mode(m.mode).to_string(),
                m.source_host.clone(),
                m.target_host.clone(),
                format!("{:.0}%", m.percent_sent()),
                age(m.creation_timestamp),
            ]
        })
        .collect();
    table(
        &[
            "NAME", "VM", "PHASE", "MODE", "SOURCE", "TARGET", "SENT", "AGE",
        ],
        &rows,
    )
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "<none>".into())
}

fn ms(v: Option<u64>) -> String {
    v.map(|v| format!("{v} ms"))
        .unwrap_or_else(|| "<none>".into())
}

fn us(v: Option<u64>) -> String {
    v.map(|v| format!("{v} us"))
        .unwrap_or_else(|| "<none>".into())
}

/// `describe migration`: the record as KubeVirt's `migrationState` block,
/// then the progress counters, post-copy numbers, throttle steps and the
/// settings it ran with.
pub fn describe_migration(m: &MigrationRecord) -> String {
    let mut o = String::new();
    let mut kv = |indent: usize, k: &str, v: String| {
        let _ = writeln!(
            o,
            "{:indent$}{:<w$} {v}",
            "",
            format!("{k}:"),
            w = 24 - indent
        );
    };
    kv(0, "Name", m.name.clone());
    kv(0, "UID", m.uid.to_string());
    kv(0, "VM", m.vm.clone());
    kv(0, "Phase", m.phase.to_string());
    kv(0, "Created", m.creation_timestamp.to_string());
    o.push_str("Migration State:\n");
    let mut kv = |k: &str, v: String| {
        let _ = writeln!(o, "  {:<22} {v}", format!("{k}:"));
    };
    kv("Start Timestamp", opt(m.start_timestamp));
    kv("End Timestamp", opt(m.end_timestamp));
    kv(
        "Completed",
        (m.phase == migrated_api::model::MigrationPhase::Succeeded).to_string(),
    );
    kv(
        "Failed",
        (m.phase == migrated_api::model::MigrationPhase::Failed).to_string(),
    );
    if let Some(code) = &m.failure_code {
        kv("Failure Code", code.to_string());
    }
    kv("Failure Reason", opt(m.failure_reason.as_ref()));
    kv("Abort Requested", m.abort_requested.to_string());
    kv(
        "Abort Status",
        opt(m.abort_status.map(|s| format!("{s:?}"))),
    );
    kv("Mode", mode(m.mode).into());
    if m.switch_requested {
        kv("Switch Requested", "true".into());
    }
    kv("Source Node", m.source_host.clone());
    kv("Target Node", m.target_host.clone());
    kv("Target Node Address", m.target_address.clone());
    o.push_str("Progress:\n");
    let mut kv = |k: &str, v: String| {
        let _ = writeln!(o, "  {:<22} {v}", format!("{k}:"));
    };
    kv("Passes", m.passes.to_string());
    kv("Memory Total", bytes(m.bytes_total));
    kv(
        "Memory Sent",
        format!("{} ({:.1}%)", bytes(m.bytes_sent), m.percent_sent()),
    );
    kv("Memory Remaining", bytes(m.bytes_remaining));
    kv("Zero Pages", m.zero_pages.to_string());
    kv("Delta Pages", m.delta_pages.to_string());
    kv("Dirty Rate", rate(m.dirty_rate));
    kv("Bandwidth", rate(m.bandwidth));
    kv("Throttle", format!("{}%", m.throttle_pct));
    kv("Expected Downtime", ms(m.expected_downtime_ms));
    kv("Actual Downtime", ms(m.actual_downtime_ms));
    if m.mode == MigrationMode::PostCopy || m.post_copy_start_timestamp.is_some() {
        o.push_str("Post-Copy:\n");
        let mut kv = |k: &str, v: String| {
            let _ = writeln!(o, "  {:<22} {v}", format!("{k}:"));
        };
        kv("Started", opt(m.post_copy_start_timestamp));
        // The guest's pause in post-copy is the switchover alone.
        kv("Switchover Downtime", ms(m.actual_downtime_ms));
        kv("Remote Faults", m.remote_faults.to_string());
        kv("Fault Latency p50", us(m.fault_latency_p50_us));
        kv("Fault Latency p99", us(m.fault_latency_p99_us));
        kv("Pushed Pages", m.post_copy_pages.to_string());
        kv("Reconnects", m.reconnects.to_string());
    }
    if !m.throttle_steps.is_empty() {
        o.push_str("Throttle Steps:\n");
        o.push_str(&indent(&throttle_table(&m.throttle_steps), 2));
    }
    if let Some(c) = &m.migration_configuration {
        o.push_str(&describe_configuration(c));
    }
    o
}

/// Auto-converge's throttle changes: when, how much, and the dirty rate
/// and bandwidth that made it step.
pub fn throttle_table(steps: &[ThrottleStep]) -> String {
    let rows: Vec<Vec<String>> = steps
        .iter()
        .map(|s| {
            vec![
                offset(s.at_ms),
                format!("{}%", s.percent),
                rate(s.dirty_rate),
                rate(s.bandwidth),
            ]
        })
        .collect();
    table(&["TIME", "PERCENT", "DIRTY-RATE", "BANDWIDTH"], &rows)
}

/// The `Configuration:` block: the settings the migration ran with.
fn describe_configuration(c: &MigrationConfiguration) -> String {
    let mut o = String::from("Configuration:\n");
    let mut kv = |k: &str, v: String| {
        let _ = writeln!(o, "  {:<22} {v}", format!("{k}:"));
    };
    kv("Allow Auto-Converge", c.allow_auto_converge.to_string());
    kv("Auto-Converge Step", c.auto_converge_step.to_string());
    kv("Allow Post-Copy", c.allow_post_copy.to_string());
    kv("Post-Copy Now", c.post_copy_now.to_string());
    kv(
        "Completion Timeout",
        format!("{}s per GiB", c.completion_timeout_per_gib),
    );
    kv("Progress Timeout", format!("{}s", c.progress_timeout));
    kv(
        "Bandwidth Limit",
        if c.bandwidth_per_migration.bytes() == 0 {
            "unlimited".into()
        } else {
            format!("{}/s", c.bandwidth_per_migration)
        },
    );
    kv("Downtime Limit", c.downtime_limit.to_string());
    kv(
        "Keepalive",
        format!("{} x {}", c.keepalive_interval, c.keepalive_count),
    );
    o
}

/// Every line of `text` shifted right by `n` spaces.
fn indent(text: &str, n: usize) -> String {
    text.lines().map(|l| format!("{:n$}{l}\n", "")).collect()
}

/// The progress bar's prefix and message for `--wait`: mode and throttle
/// while pre-copy runs; pages left and remote faults in post-copy.
pub fn progress(m: &MigrationRecord) -> (String, String) {
    let prefix = format!("{} {} pass {}", m.phase, mode(m.mode), m.passes);
    let msg = match m.mode {
        MigrationMode::PreCopy => format!(
            "remaining {}  {}  throttle {}% ({} steps)  expected downtime {}",
            bytes(m.bytes_remaining),
            rate(m.bandwidth),
            m.throttle_pct,
            m.throttle_steps.len(),
            m.expected_downtime_ms
                .map(|v| format!("{v} ms"))
                .unwrap_or_else(|| "-".into()),
        ),
        MigrationMode::PostCopy => format!(
            "pages left {}  remote faults {}  pushed {}  fault p99 {}{}",
            m.bytes_remaining.div_ceil(PAGE_SIZE),
            m.remote_faults,
            m.post_copy_pages,
            m.fault_latency_p99_us
                .map(|v| format!("{v} us"))
                .unwrap_or_else(|| "-".into()),
            if m.reconnects > 0 {
                format!("  reconnects {}", m.reconnects)
            } else {
                String::new()
            },
        ),
    };
    (prefix, msg)
}

/// The demo's closing line: how the migration went, in one sentence.
pub fn summary(m: &MigrationRecord) -> String {
    let mut s = format!(
        "{} mode, {} passes, {} downtime, {} sent, throttle {}% ({} steps)",
        mode(m.mode),
        m.passes,
        ms(m.actual_downtime_ms),
        bytes(m.bytes_sent),
        m.throttle_pct,
        m.throttle_steps.len(),
    );
    if m.delta_pages > 0 {
        let _ = write!(s, ", {} delta pages", m.delta_pages);
    }
    if m.mode == MigrationMode::PostCopy {
        let _ = write!(
            s,
            ", {} remote faults (fault p99 {}), {} pages pushed",
            m.remote_faults,
            us(m.fault_latency_p99_us),
            m.post_copy_pages
        );
        if m.reconnects > 0 {
            let _ = write!(s, ", {} reconnects", m.reconnects);
        }
    }
    s
}

/// `vm get` in detail (table output of a single VM).
pub fn describe_vm(v: &Vm) -> String {
    let mut o = vm_table(std::slice::from_ref(v));
    if let Some(reason) = &v.status.reason {
        let _ = writeln!(o, "\nReason: {reason}");
    }
    if let Some(m) = &v.status.active_migration {
        let _ = writeln!(o, "Migration: {m} (migratectl describe migration {m})");
    }
    o
}

/// Renders any JSON value as block YAML. Strings that could read as
/// something else (numbers, booleans, anything with special characters)
/// are double-quoted, which YAML reads exactly like JSON strings.
pub fn yaml(v: &Value) -> String {
    let mut out = String::new();
    if is_block(v) {
        yaml_block(v, 0, &mut out);
    } else {
        out.push_str(&scalar(v));
        out.push('\n');
    }
    out
}

fn is_block(v: &Value) -> bool {
    match v {
        Value::Object(m) => !m.is_empty(),
        Value::Array(a) => !a.is_empty(),
        _ => false,
    }
}

fn yaml_block(v: &Value, indent: usize, out: &mut String) {
    let pad = " ".repeat(indent);
    match v {
        Value::Object(m) => {
            for (k, val) in m {
                out.push_str(&pad);
                out.push_str(&plain_or_quoted(k));
                out.push(':');
                yaml_value(val, indent + 2, out);
            }
        }
        Value::Array(a) => {
            for item in a {
                out.push_str(&pad);
                out.push('-');
                if is_block(item) {
                    // The item's first line goes right after the dash.
                    let mut sub = String::new();
                    yaml_block(item, indent + 2, &mut sub);
                    out.push(' ');
                    out.push_str(&sub[indent + 2..]);
                } else {
                    out.push(' ');
                    out.push_str(&scalar(item));
                    out.push('\n');
                }
            }
        }
        _ => {}
    }
}

fn yaml_value(v: &Value, indent: usize, out: &mut String) {
    if is_block(v) {
        out.push('\n');
        yaml_block(v, indent, out);
    } else {
        out.push(' ');
        out.push_str(&scalar(v));
        out.push('\n');
    }
}

fn scalar(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => plain_or_quoted(s),
        Value::Array(_) => "[]".into(),
        Value::Object(_) => "{}".into(),
    }
}

/// `256Mi`, `8Gi`: digits then letters that YAML cannot read as a number
/// (no exponent, radix prefix or separators).
fn is_plain_amount(s: &str) -> bool {
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, suffix) = s.split_at(digits);
    !num.is_empty()
        && !suffix.is_empty()
        && !num.starts_with('0')
        && suffix.chars().all(|c| c.is_ascii_alphabetic())
        && !suffix.starts_with(['e', 'E'])
}

fn plain_or_quoted(s: &str) -> String {
    let reserved = [
        "true", "false", "yes", "no", "on", "off", "null", "y", "n", "~",
    ];
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._/-".contains(c))
        && !s.starts_with(['-', '.'])
        && (!s.starts_with(|c: char| c.is_ascii_digit()) || is_plain_amount(s))
        && !reserved.contains(&s.to_ascii_lowercase().as_str());
    if plain {
        s.into()
    } else {
        serde_json::to_string(s).unwrap_or_else(|_| format!("{s:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn human_sizes() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(1 << 30), "1.0 GiB");
        assert_eq!(rate(64 << 20), "64.0 MiB/s");
    }

    #[test]
    fn yaml_blocks_and_quoting() {
        // Keys in sorted order, so the test holds with or without
        // serde_json's preserve_order.
        let v = json!({
            "empty": {},
            "labels": {"app": "web", "tier": "1"},
            "list": [{"a": 1, "b": "true"}, "x y", []],
            "name": "web-1",
            "none": null,
        });
        let want = "\
empty: {}
labels:
  app: web
  tier: \"1\"
list:
  - a: 1
    b: \"true\"
  - \"x y\"
  - []
name: web-1
none: null
";
        assert_eq!(yaml(&v), want);
        for (s, want) in [
            ("256Mi", "256Mi"),
            ("1e3", "\"1e3\""),
            ("0x1f", "\"0x1f\""),
            ("12", "\"12\""),
            ("1-2", "\"1-2\""),
        ] {
            assert_eq!(plain_or_quoted(s), want);
        }
        assert_eq!(yaml(&json!("plain")), "plain\n");
    }

    fn record() -> MigrationRecord {
        let mut m = MigrationRecord::new_pending("web", "a", "b", "b:1");
        m.passes = 3;
        m.bytes_total = 1 << 30;
        m.bytes_sent = 768 << 20;
        m.bytes_remaining = 10 * PAGE_SIZE + 1;
        m.throttle_pct = 30;
        m.throttle_steps = vec![ThrottleStep {
            at_ms: 61_050,
            percent: 30,
            dirty_rate: 3 << 20,
            bandwidth: 1 << 20,
        }];
        m.actual_downtime_ms = Some(12);
        m
    }

    #[test]
    fn progress_follows_the_mode() {
        let mut m = record();
        let (prefix, msg) = progress(&m);
        assert_eq!(prefix, "Pending PreCopy pass 3");
        assert!(msg.contains("throttle 30% (1 steps)"), "{msg}");
        assert!(!msg.contains("remote faults"), "{msg}");
        m.mode = MigrationMode::PostCopy;
        m.remote_faults = 9;
        m.fault_latency_p99_us = Some(700);
        let (prefix, msg) = progress(&m);
        assert_eq!(prefix, "Pending PostCopy pass 3");
        // A partial page still has to come.
        assert!(msg.starts_with("pages left 11  remote faults 9"), "{msg}");
        assert!(msg.contains("fault p99 700 us"), "{msg}");
        assert!(!msg.contains("reconnects"), "{msg}");
        m.reconnects = 2;
        assert!(progress(&m).1.ends_with("reconnects 2"));
    }

    #[test]
    fn summary_names_mode_throttle_and_faults() {
        let mut m = record();
        assert_eq!(
            summary(&m),
            "PreCopy mode, 3 passes, 12 ms downtime, 768.0 MiB sent, throttle 30% (1 steps)"
        );
        m.mode = MigrationMode::PostCopy;
        m.remote_faults = 40;
        m.post_copy_pages = 1000;
        m.delta_pages = 5;
        let s = summary(&m);
        assert!(s.starts_with("PostCopy mode, 3 passes"), "{s}");
        assert!(
            s.ends_with(", 5 delta pages, 40 remote faults (fault p99 <none>), 1000 pages pushed"),
            "{s}"
        );
    }

    #[test]
    fn throttle_steps_table() {
        let t = throttle_table(&record().throttle_steps);
        assert_eq!(
            t,
            "TIME    PERCENT   DIRTY-RATE   BANDWIDTH\n61.0s   30%       3.0 MiB/s    1.0 MiB/s\n"
        );
        assert_eq!(offset(999), "0.9s");
    }

    #[test]
    fn tables_align() {
        let t = table(&["A", "LONGER"], &[vec!["xxxx".into(), "1".into()]]);
        assert_eq!(t, "A      LONGER\nxxxx   1\n");
    }
}
