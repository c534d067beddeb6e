//! Per-migration settings as command-line flags, and the API request they
//! become. Only the flags a user gives end up in `options`: an absent flag
//! is `None`, so the daemon's `[migration]` default (or a later policy)
//! applies rather than a value the CLI made up.

use clap::{Args, ValueEnum};
use migrated_api::model::{
    AutoConvergeStep, HumanDuration, MigrationOverrides, MigrationRequest, Quantity,
};

/// Tuning flags shared by `migrate` and `demo`.
#[derive(Args, Debug, Clone, Default, PartialEq, Eq)]
pub struct TuningArgs {
    /// How auto-converge raises the vCPU throttle: fixed (20%, then +10%
    /// per step) or adaptive (from the measured dirty rate and bandwidth).
    #[arg(long, value_enum, value_name = "STEP")]
    pub auto_converge_step: Option<StepArg>,
    /// Switch to post-copy at once, after the first chunk of the first pass (implies
    /// allowing post-copy).
    #[arg(long)]
    pub post_copy_now: bool,
    /// Seconds per GiB of guest RAM before the migration is cancelled.
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
    pub completion_timeout_per_gib: Option<u64>,
    /// Seconds without progress before the migration is cancelled.
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
    pub progress_timeout: Option<u64>,
    /// Wire bandwidth cap in bytes per second, e.g. 64Mi; 0 = unlimited.
    #[arg(long, value_name = "QUANTITY")]
    pub bandwidth: Option<Quantity>,
    /// Longest acceptable guest pause at switchover, e.g. 300ms.
    #[arg(long, value_name = "DURATION", value_parser = parse_downtime)]
    pub downtime_limit: Option<HumanDuration>,
}

/// `--auto-converge-step`.
#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum StepArg {
    Fixed,
    Adaptive,
}

impl From<StepArg> for AutoConvergeStep {
    fn from(s: StepArg) -> Self {
        match s {
            StepArg::Fixed => AutoConvergeStep::Fixed,
            StepArg::Adaptive => AutoConvergeStep::Adaptive,
        }
    }
}

/// `demo --strategy`: which way out the migration may take when pre-copy
/// passes stop converging.
#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum Strategy {
    /// Plain pre-copy: no throttle, no post-copy.
    Precopy,
    /// Throttle the guest's vCPUs until the passes converge.
    AutoConverge,
    /// Move the guest and fetch the rest of its memory on demand.
    PostCopy,
}

impl Strategy {
    /// `(allowAutoConverge, allowPostCopy)`. A strategy only switches its
    /// own mechanism on; with the daemon's defaults (both off) that is the
    /// whole strategy, and the record's `migrationConfiguration` shows what
    /// actually ran.
    pub fn allows(self) -> (Option<bool>, Option<bool>) {
        match self {
            Strategy::Precopy => (None, None),
            Strategy::AutoConverge => (Some(true), None),
            Strategy::PostCopy => (None, Some(true)),
        }
    }
}

/// A downtime limit of zero could never be met; the daemon refuses it too,
/// but clap can say so before anything is sent.
fn parse_downtime(s: &str) -> Result<HumanDuration, String> {
    let d: HumanDuration = s.parse().map_err(|e| format!("{e}"))?;
    if d.get().is_zero() {
        return Err("must be greater than 0".into());
    }
    Ok(d)
}

/// The overrides for one migration: the strategy switches plus the tuning
/// flags, each only where given.
pub fn overrides(
    allow_auto_converge: Option<bool>,
    allow_post_copy: Option<bool>,
    t: &TuningArgs,
) -> MigrationOverrides {
    MigrationOverrides {
        allow_auto_converge,
        auto_converge_step: t.auto_converge_step.map(Into::into),
        allow_post_copy,
        completion_timeout_per_gib: t.completion_timeout_per_gib,
        progress_timeout: t.progress_timeout,
        bandwidth_per_migration: t.bandwidth,
        downtime_limit: t.downtime_limit,
        post_copy_now: t.post_copy_now,
    }
}

/// `POST /v1/migrations` body for `vm` to `target_host`.
pub fn migration_request(
    vm: String,
    target_host: String,
    verify: bool,
    options: MigrationOverrides,
) -> MigrationRequest {
    MigrationRequest {
        vm,
        target_host,
        verify,
        options,
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;
    use serde_json::{json, Value};

    use super::*;
    use crate::{Cli, Command};

    /// The JSON body `migratectl ARGS` would POST, for a `migrate` command.
    fn body(args: &[&str]) -> Value {
        let cli = Cli::try_parse_from(std::iter::once("migratectl").chain(args.iter().copied()))
            .unwrap_or_else(|e| panic!("{args:?}: {e}"));
        let Command::Migrate(a) = cli.command else {
            panic!("{args:?} is not a migrate command");
        };
        let req = a.request().expect("a new migration, not a resume");
        serde_json::to_value(req).unwrap()
    }

    fn parse_error(args: &[&str]) -> String {
        match Cli::try_parse_from(std::iter::once("migratectl").chain(args.iter().copied())) {
            Ok(c) => panic!("{args:?} parsed: {c:?}"),
            Err(e) => {
                assert_eq!(e.exit_code(), 2, "{args:?}: {e}");
                e.to_string()
            }
        }
    }

    #[test]
    fn plain_migrate_sends_no_options() {
        assert_eq!(
            body(&["migrate", "web", "--to", "b"]),
            json!({"vm": "web", "targetHost": "b", "verify": false})
        );
    }

    #[test]
    fn every_flag_lands_in_options() {
        let v = body(&[
            "migrate",
            "web",
            "--to",
            "b",
            "--verify",
            "--allow-auto-converge",
            "--auto-converge-step",
            "fixed",
            "--allow-post-copy=false",
            "--post-copy-now",
            "--completion-timeout-per-gib",
            "60",
            "--progress-timeout",
            "20",
            "--bandwidth",
            "64Mi",
            "--downtime-limit",
            "300ms",
        ]);
        assert_eq!(
            v,
            json!({
                "vm": "web",
                "targetHost": "b",
                "verify": true,
                "options": {
                    "allowAutoConverge": true,
                    "autoConvergeStep": "fixed",
                    "allowPostCopy": false,
                    "completionTimeoutPerGiB": 60,
                    "progressTimeout": 20,
                    "bandwidthPerMigration": "64Mi",
                    "downtimeLimit": "300ms",
                    "postCopyNow": true,
                }
            })
        );
    }

    #[test]
    fn boolean_flags_take_an_optional_value() {
        let opts = |args: &[&str]| {
            let mut full = vec!["migrate", "web", "--to", "b"];
            full.extend_from_slice(args);
            body(&full)["options"].clone()
        };
        assert_eq!(opts(&["--allow-post-copy"]), json!({"allowPostCopy": true}));
        assert_eq!(
            opts(&["--allow-post-copy=true", "--allow-auto-converge=false"]),
            json!({"allowPostCopy": true, "allowAutoConverge": false})
        );
        // Unlimited bandwidth is a real value, not "unset".
        assert_eq!(
            opts(&["--bandwidth", "0"]),
            json!({"bandwidthPerMigration": "0"})
        );
        // Without `=`, the next word is the VM, not the flag's value.
        assert_eq!(
            body(&["migrate", "--allow-post-copy", "web", "--to", "b"])["vm"],
            "web"
        );
    }

    #[test]
    fn strategies_switch_on_only_their_mechanism() {
        let t = TuningArgs {
            bandwidth: Some(Quantity::mib(64)),
            ..TuningArgs::default()
        };
        let (ac, pc) = Strategy::PostCopy.allows();
        assert_eq!(
            serde_json::to_value(overrides(ac, pc, &t)).unwrap(),
            json!({"allowPostCopy": true, "bandwidthPerMigration": "64Mi"})
        );
        let (ac, pc) = Strategy::AutoConverge.allows();
        assert_eq!(
            serde_json::to_value(overrides(ac, pc, &TuningArgs::default())).unwrap(),
            json!({"allowAutoConverge": true})
        );
        let (ac, pc) = Strategy::Precopy.allows();
        assert!(overrides(ac, pc, &TuningArgs::default()).is_empty());
    }

    #[test]
    fn bad_values_are_refused_by_clap() {
        let base = ["migrate", "web", "--to", "b"];
        let with = |extra: &[&str]| {
            let mut v = base.to_vec();
            v.extend_from_slice(extra);
            parse_error(&v)
        };
        let e = with(&["--bandwidth", "fast"]);
        assert!(e.contains("fast") && e.contains("64Mi"), "{e}");
        let e = with(&["--downtime-limit", "3 parsecs"]);
        assert!(e.contains("not a duration"), "{e}");
        let e = with(&["--downtime-limit", "0ms"]);
        assert!(e.contains("greater than 0"), "{e}");
        let e = with(&["--progress-timeout", "0"]);
        assert!(e.contains("--progress-timeout"), "{e}");
        let e = with(&["--completion-timeout-per-gib=-5"]);
        assert!(e.contains("--completion-timeout-per-gib"), "{e}");
        let e = with(&["--auto-converge-step", "huge"]);
        assert!(e.contains("fixed") && e.contains("adaptive"), "{e}");
        let e = with(&["--allow-post-copy=maybe"]);
        assert!(e.contains("maybe"), "{e}");
    }

    #[test]
    fn resume_stands_alone() {
        let cli = Cli::try_parse_from(["migratectl", "migrate", "--resume", "web-abcde", "--wait"])
            .unwrap();
        let Command::Migrate(a) = cli.command else {
            panic!("not migrate");
        };
        assert_eq!(a.resume.as_deref(), Some("web-abcde"));
        assert!(a.request().is_none());
        for bad in [
            &["migrate", "--resume", "m", "--to", "b"][..],
            &["migrate", "web", "--resume", "m"],
            &["migrate", "--resume", "m", "--bandwidth", "1Mi"],
            &["migrate", "--resume", "m", "--allow-post-copy"],
            &["migrate", "--resume", "m", "--verify"],
        ] {
            let e = parse_error(bad);
            assert!(e.contains("cannot be used with"), "{bad:?}: {e}");
        }
        let e = parse_error(&["migrate", "--to", "b"]);
        assert!(e.contains("<VM>"), "{e}");
    }

    #[test]
    fn switch_and_demo_flags_parse() {
        let cli = Cli::try_parse_from(["migratectl", "switch", "web-abcde"]).unwrap();
        assert!(
            matches!(cli.command, Command::Switch { ref migration, .. } if migration == "web-abcde")
        );
        let e = parse_error(&["demo", "--strategy", "teleport"]);
        assert!(
            e.contains("auto-converge") && e.contains("post-copy"),
            "{e}"
        );
        let cli = Cli::try_parse_from([
            "migratectl",
            "demo",
            "--strategy",
            "post-copy",
            "--bandwidth",
            "64Mi",
            "--post-copy-now",
        ])
        .unwrap();
        let Command::Demo(d) = cli.command else {
            panic!("not demo");
        };
        assert_eq!(
            serde_json::to_value(d.overrides()).unwrap(),
            json!({"allowPostCopy": true, "bandwidthPerMigration": "64Mi", "postCopyNow": true})
        );
    }
}
