//! Migrations: the request, the settings a migration runs with, and its
//! record (KubeVirt's `VirtualMachineInstanceMigration` status), with its
//! uid and failure code.

use std::fmt;
use std::str::FromStr;
use std::time::SystemTime;

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

use super::Timestamp;
use crate::quantity::{HumanDuration, Quantity};

/// KubeVirt's migration phases, in order; Succeeded and Failed are final.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MigrationPhase {
    Pending,
    Scheduling,
    PreparingTarget,
    TargetReady,
    Running,
    Succeeded,
    Failed,
}

impl MigrationPhase {
    pub fn is_final(self) -> bool {
        matches!(self, MigrationPhase::Succeeded | MigrationPhase::Failed)
    }
}

impl fmt::Display for MigrationPhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum MigrationMode {
    #[default]
    PreCopy,
    PostCopy,
}

/// KubeVirt's `abortStatus`.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AbortStatus {
    Aborting,
    Succeeded,
    Failed,
}

/// Why a migration failed: the stable `failureCode` of its record, a
/// snake_case string in JSON. Distinct from the API's own error codes
/// ([`codes`](super::codes)), which say why a request was refused.
///
/// Codes the target sent when it refused or aborted keep the target's
/// name (`vm_exists`, `not_enough_memory` ...). A cancel is `aborted`
/// whichever side it came from (KubeVirt's word); records written before
/// that rename said `cancelled` for a target's cancel and still load.
#[derive(
    Copy,
    Clone,
    Debug,
    PartialEq,
    Eq,
    Hash,
    Serialize,
    Deserialize,
    strum::IntoStaticStr,
    strum::Display,
)]
#[cfg_attr(test, derive(strum::EnumIter))]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum FailureCode {
    /// The user cancelled it (or the target did).
    #[serde(alias = "cancelled")]
    Aborted,
    /// The completion timeout passed.
    Timeout,
    /// No progress within the progress timeout.
    ProgressTimeout,
    /// Keepalives stopped: the peer or the link is gone.
    PeerLost,
    /// The target could not be dialed or gave no streams.
    TargetUnreachable,
    /// The transfer failed for another reason than a lost peer.
    TransferFailed,
    /// The VM left this host while its migration was starting.
    VmNotFound,
    /// A call to the guest's VMM failed.
    VmmFailed,
    /// Verify mode: the memory digests of both sides differ.
    DigestMismatch,
    /// The daemon restarted while the migration was in flight.
    DaemonRestarted,
    /// The link broke during post-copy for longer than the reconnects
    /// lasted: both hosts keep their part of the guest and `migratectl
    /// migrate --resume` continues it.
    PostCopyInterrupted,
    /// This host has no TLS identity to reach peers with.
    TlsUnavailable,
    /// The daemon runs without a migration engine (tests).
    EngineUnavailable,
    /// The target already has a VM of that name.
    VmExists,
    /// The target lacks the memory for the guest.
    NotEnoughMemory,
    /// The target refused for another reason.
    Refused,
    BadFrame,
    BadCrc,
    OutOfRange,
    VersionMismatch,
    /// A frame arrived in a state where it is not allowed.
    Protocol,
    Unauthorized,
    /// The guest cannot run on the target (CPU model, devices).
    Incompatible,
    /// A bug or an unexpected local error.
    Internal,
    /// A code this build does not know (a newer peer's or daemon's).
    #[serde(other)]
    Unknown,
}

impl FailureCode {
    /// The JSON form.
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

/// A migration's uid: an RFC 4122 version 4 UUID. Its 128 bits are also
/// the migration's id on the wire, so it is parsed once, when a record is
/// read, and a record with a malformed uid does not load.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MigrationUid(u128);

impl MigrationUid {
    /// A fresh random uid.
    pub fn random() -> Self {
        let mut u = u128::from_be_bytes(random_bytes::<16>());
        // RFC 4122 version 4 (bits 76-79), variant 1 (bits 62-63).
        u = (u & !(0xf << 76)) | (0x4 << 76);
        u = (u & !(0x3 << 62)) | (0x2 << 62);
        Self(u)
    }

    /// The 128 bits, as the wire's migration id.
    pub fn as_u128(self) -> u128 {
        self.0
    }
}

impl From<u128> for MigrationUid {
    fn from(v: u128) -> Self {
        Self(v)
    }
}

impl fmt::Display for MigrationUid {
    /// `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`, lower-case.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let h = format!("{:032x}", self.0);
        write!(
            f,
            "{}-{}-{}-{}-{}",
            &h[0..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..32]
        )
    }
}

/// A uid that is not `8-4-4-4-12` hex digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{input:?} is not a migration uid (8-4-4-4-12 hex digits)")]
pub struct InvalidUidError {
    pub input: String,
}

impl FromStr for MigrationUid {
    type Err = InvalidUidError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || InvalidUidError { input: s.into() };
        let groups: Vec<&str> = s.split('-').collect();
        let lens: Vec<usize> = groups.iter().map(|g| g.len()).collect();
        if lens != [8, 4, 4, 4, 12] || !s.chars().all(|c| c == '-' || c.is_ascii_hexdigit()) {
            return Err(bad());
        }
        u128::from_str_radix(&groups.concat(), 16)
            .map(Self)
            .map_err(|_| bad())
    }
}

impl Serialize for MigrationUid {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MigrationUid {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(de::Error::custom)
    }
}

/// Body of `POST /v1/migrations`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MigrationRequest {
    pub vm: String,
    pub target_host: String,
    /// Compare full-memory digests of both sides at switchover (tests and
    /// `migratectl demo`); the result lands in `memoryDigestMatched`.
    #[serde(default)]
    pub verify: bool,
    /// Settings that differ from the daemon's `[migration]` defaults for
    /// this migration only.
    #[serde(default, skip_serializing_if = "MigrationOverrides::is_empty")]
    pub options: MigrationOverrides,
}

/// How auto-converge raises the vCPU throttle.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AutoConvergeStep {
    /// QEMU's rule: 20% first, then +10% per step.
    Fixed,
    /// Jump straight to the throttle at which the measured dirty rate
    /// falls to half the measured bandwidth (at least QEMU's step).
    #[default]
    Adaptive,
}

impl fmt::Display for AutoConvergeStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AutoConvergeStep::Fixed => "fixed",
            AutoConvergeStep::Adaptive => "adaptive",
        })
    }
}

/// Per-migration overrides of the daemon's `[migration]` defaults (what a
/// KubeVirt MigrationPolicy sets). `None` keeps the daemon's value.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MigrationOverrides {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_auto_converge: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_converge_step: Option<AutoConvergeStep>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_post_copy: Option<bool>,
    /// Seconds per GiB of guest memory.
    #[serde(
        default,
        rename = "completionTimeoutPerGiB",
        skip_serializing_if = "Option::is_none"
    )]
    pub completion_timeout_per_gib: Option<u64>,
    /// Seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress_timeout: Option<u64>,
    /// Wire bytes per second, 0 = unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth_per_migration: Option<Quantity>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_limit: Option<HumanDuration>,
    /// Switch to post-copy at once, after the first chunk of the first pass
    /// (implies `allowPostCopy`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub post_copy_now: bool,
}

impl MigrationOverrides {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// The settings a migration actually runs with (defaults plus overrides),
/// kept in its record like KubeVirt's `migrationConfiguration`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MigrationConfiguration {
    pub allow_auto_converge: bool,
    #[serde(default)]
    pub auto_converge_step: AutoConvergeStep,
    pub allow_post_copy: bool,
    #[serde(rename = "completionTimeoutPerGiB")]
    pub completion_timeout_per_gib: u64,
    pub progress_timeout: u64,
    pub bandwidth_per_migration: Quantity,
    pub downtime_limit: HumanDuration,
    pub keepalive_interval: HumanDuration,
    pub keepalive_count: u32,
    #[serde(default)]
    pub post_copy_now: bool,
}

/// One change of the auto-converge throttle.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ThrottleStep {
    /// Milliseconds since the migration started.
    pub at_ms: u64,
    /// Percent of vCPU time taken away (0 = removed).
    pub percent: u8,
    /// Dirty rate and bandwidth that led to it, bytes per second.
    #[serde(default)]
    pub dirty_rate: u64,
    #[serde(default)]
    pub bandwidth: u64,
}

/// One migration, persisted for its whole life and kept afterwards. Fields
/// a later version adds get `#[serde(default)]`, so old records still load.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MigrationRecord {
    pub uid: MigrationUid,
    /// `<vm>-<5 random chars>`.
    pub name: String,
    pub vm: String,
    pub source_host: String,
    pub target_host: String,
    /// The peer's QUIC address the migration uses.
    pub target_address: String,
    pub phase: MigrationPhase,
    pub mode: MigrationMode,
    pub creation_timestamp: Timestamp,
    #[serde(default)]
    pub start_timestamp: Option<Timestamp>,
    #[serde(default)]
    pub end_timestamp: Option<Timestamp>,
    /// Pre-copy passes completed (KubeVirt's iterations).
    #[serde(default)]
    pub passes: u32,
    /// Guest RAM to move.
    #[serde(default)]
    pub bytes_total: u64,
    #[serde(default)]
    pub bytes_sent: u64,
    /// Dirty bytes still to send after the last pass.
    #[serde(default)]
    pub bytes_remaining: u64,
    #[serde(default)]
    pub zero_pages: u64,
    /// Measured guest dirty rate, bytes per second.
    #[serde(default)]
    pub dirty_rate: u64,
    /// Guest memory moved per second over the last passes (zero pages and
    /// compression make it exceed the wire rate and the bandwidth cap).
    #[serde(default)]
    pub bandwidth: u64,
    /// Estimated stop-and-copy time after the last pass.
    #[serde(default)]
    pub expected_downtime_ms: Option<u64>,
    /// Source pause to destination resume.
    #[serde(default)]
    pub actual_downtime_ms: Option<u64>,
    /// vCPU throttle applied by auto-converge, percent.
    #[serde(default)]
    pub throttle_pct: u8,
    /// Stable code of the failure.
    #[serde(default)]
    pub failure_code: Option<FailureCode>,
    #[serde(default)]
    pub failure_reason: Option<String>,
    #[serde(default)]
    pub abort_requested: bool,
    #[serde(default)]
    pub abort_status: Option<AbortStatus>,
    /// The migration was asked to verify memory digests.
    #[serde(default)]
    pub verify: bool,
    /// Verify mode only: whether the destination's memory digest equalled
    /// the source's at switchover (both taken while the guest was paused).
    #[serde(default)]
    pub memory_digest_matched: Option<bool>,
    /// What this migration ran with.
    #[serde(default)]
    pub migration_configuration: Option<MigrationConfiguration>,
    /// Every throttle change auto-converge made, in order.
    #[serde(default)]
    pub throttle_steps: Vec<ThrottleStep>,
    /// Dirty-pass pages sent as XOR deltas against their previous version.
    #[serde(default)]
    pub delta_pages: u64,
    /// Pages sent with data by the passes after the first (dirty passes,
    /// stop-and-copy included) and the wire bytes they took: raw would be
    /// `dirtyPassPages` x 4096.
    #[serde(default)]
    pub dirty_pass_pages: u64,
    #[serde(default)]
    pub dirty_pass_wire_bytes: u64,
    /// Post-copy: when the guest started running on the target.
    #[serde(default)]
    pub post_copy_start_timestamp: Option<Timestamp>,
    /// Post-copy: pages the target faulted on and fetched on demand.
    #[serde(default)]
    pub remote_faults: u64,
    /// Post-copy: pages pushed in the background after the switchover.
    #[serde(default)]
    pub post_copy_pages: u64,
    /// Post-copy: fault round trip (request sent to page installed).
    #[serde(default)]
    pub fault_latency_p50_us: Option<u64>,
    #[serde(default)]
    pub fault_latency_p99_us: Option<u64>,
    /// Post-copy: reconnects after the link to the target broke.
    #[serde(default)]
    pub reconnects: u32,
    /// A switch to post-copy was asked for (`migratectl switch`).
    #[serde(default)]
    pub switch_requested: bool,
}

impl MigrationRecord {
    /// A fresh record in phase Pending.
    pub fn new_pending(
        vm: &str,
        source_host: &str,
        target_host: &str,
        target_address: &str,
    ) -> Self {
        const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
        let suffix: String = random_bytes::<5>()
            .iter()
            .map(|b| ALPHABET[usize::from(*b) % ALPHABET.len()] as char)
            .collect();
        Self {
            uid: MigrationUid::random(),
            name: format!("{vm}-{suffix}"),
            vm: vm.into(),
            source_host: source_host.into(),
            target_host: target_host.into(),
            target_address: target_address.into(),
            phase: MigrationPhase::Pending,
            mode: MigrationMode::PreCopy,
            creation_timestamp: Timestamp::now(),
            start_timestamp: None,
            end_timestamp: None,
            passes: 0,
            bytes_total: 0,
            bytes_sent: 0,
            bytes_remaining: 0,
            zero_pages: 0,
            dirty_rate: 0,
            bandwidth: 0,
            expected_downtime_ms: None,
            actual_downtime_ms: None,
            throttle_pct: 0,
            failure_code: None,
            failure_reason: None,
            abort_requested: false,
            abort_status: None,
            verify: false,
            memory_digest_matched: None,
            migration_configuration: None,
            throttle_steps: Vec::new(),
            delta_pages: 0,
            dirty_pass_pages: 0,
            dirty_pass_wire_bytes: 0,
            post_copy_start_timestamp: None,
            remote_faults: 0,
            post_copy_pages: 0,
            fault_latency_p50_us: None,
            fault_latency_p99_us: None,
            reconnects: 0,
            switch_requested: false,
        }
    }

    /// Moves to Failed with a stable code and a reason, stamping the end.
    pub fn fail(&mut self, code: FailureCode, reason: impl Into<String>) {
        self.phase = MigrationPhase::Failed;
        self.failure_code = Some(code);
        self.failure_reason = Some(reason.into());
        self.end_timestamp = Some(Timestamp::now());
    }

    /// Settles a user's cancel when nothing runs for the migration any
    /// more: a migration still in flight fails as `aborted` (the abort
    /// succeeded); one that already finished keeps its outcome and the
    /// abort failed.
    pub fn settle_abort(&mut self) {
        if self.phase.is_final() {
            self.abort_status = Some(AbortStatus::Failed);
        } else {
            self.abort_status = Some(AbortStatus::Succeeded);
            self.fail(FailureCode::Aborted, "migration was cancelled");
        }
    }

    /// Percent of guest memory sent so far (0 when the total is unknown).
    pub fn percent_sent(&self) -> f64 {
        if self.bytes_total == 0 {
            0.0
        } else {
            (self.bytes_sent as f64 * 100.0 / self.bytes_total as f64).min(100.0)
        }
    }
}

/// Randomness for names and uids, from the kernel.
fn random_bytes<const N: usize>() -> [u8; N] {
    use std::io::Read;
    let mut out = [0u8; N];
    let filled = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut out))
        .is_ok();
    if !filled {
        // Only uniqueness matters here, not secrecy: fall back to the clock
        // mixed with the pid.
        let mut x = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64
            ^ (u64::from(std::process::id()) << 32);
        for b in out.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migration_record_names_and_json() {
        let a = MigrationRecord::new_pending("web-1", "h1", "h2", "10.0.0.2:7878");
        let b = MigrationRecord::new_pending("web-1", "h1", "h2", "10.0.0.2:7878");
        assert_ne!(a.uid, b.uid);
        let suffix = a
            .name
            .strip_prefix("web-1-")
            .expect("name starts with vm name");
        assert_eq!(suffix.len(), 5);
        assert!(suffix
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()));
        let uid = a.uid.to_string();
        assert_eq!(uid.len(), 36);
        assert_eq!(&uid[14..15], "4");
        assert_eq!(uid.parse(), Ok(a.uid));
        let json = serde_json::to_value(&a).unwrap();
        assert_eq!(json["phase"], "Pending");
        assert_eq!(json["sourceHost"], "h1");
        assert_eq!(json["mode"], "PreCopy");
        assert!(json.get("abortRequested").is_some());
        let back: MigrationRecord = serde_json::from_value(json).unwrap();
        assert_eq!(back, a);
    }

    #[test]
    fn old_records_without_new_fields_load() {
        let json = r#"{"uid":"0d1b7a52-7c3e-4f0a-9d6e-2f4c8b1a3e5d","name":"v-abcde","vm":"v","sourceHost":"a","targetHost":"b",
            "targetAddress":"b:1","phase":"Running","mode":"PreCopy",
            "creationTimestamp":"2026-01-01T00:00:00.000Z"}"#;
        let r: MigrationRecord = serde_json::from_str(json).unwrap();
        assert_eq!(r.phase, MigrationPhase::Running);
        assert!(!r.abort_requested);
        assert_eq!(r.percent_sent(), 0.0);
    }

    #[test]
    fn uids_parse_once_and_strictly() {
        let u: MigrationUid = "0d1b7a52-7c3e-4f0a-9d6e-2f4c8b1a3e5d".parse().unwrap();
        assert_eq!(u.as_u128(), 0x0d1b7a527c3e4f0a9d6e2f4c8b1a3e5d);
        assert_eq!(u.to_string(), "0d1b7a52-7c3e-4f0a-9d6e-2f4c8b1a3e5d");
        for bad in [
            "",
            "u",
            "0d1b7a527c3e4f0a9d6e2f4c8b1a3e5d",
            "0d1b7a52-7c3e-4f0a-9d6e-2f4c8b1a3e5",
            "0d1b7a52-7c3e-4f0a-9d6e-2f4c8b1a3e5g",
            "+d1b7a52-7c3e-4f0a-9d6e-2f4c8b1a3e5d",
        ] {
            assert!(bad.parse::<MigrationUid>().is_err(), "{bad}");
        }
        let json = r#"{"uid":"nope","name":"v-abcde","vm":"v","sourceHost":"a","targetHost":"b",
            "targetAddress":"b:1","phase":"Running","mode":"PreCopy",
            "creationTimestamp":"2026-01-01T00:00:00.000Z"}"#;
        let err = serde_json::from_str::<MigrationRecord>(json).unwrap_err();
        assert!(err.to_string().contains("not a migration uid"), "{err}");
    }

    #[test]
    fn failure_codes_are_snake_case_strings() {
        use strum::IntoEnumIterator;
        let mut r = MigrationRecord::new_pending("v", "a", "b", "b:1");
        r.fail(FailureCode::PostCopyInterrupted, "link lost");
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["failureCode"], "post_copy_interrupted");
        for code in FailureCode::iter() {
            let text = serde_json::to_string(&code).unwrap();
            assert_eq!(text, format!("\"{}\"", code.as_str()));
            assert_eq!(code.to_string(), code.as_str());
            assert_eq!(serde_json::from_str::<FailureCode>(&text).unwrap(), code);
        }
        // Records from before the rename, and codes from a newer peer.
        let old: FailureCode = serde_json::from_str("\"cancelled\"").unwrap();
        assert_eq!(old, FailureCode::Aborted);
        let newer: FailureCode = serde_json::from_str("\"quota_exceeded\"").unwrap();
        assert_eq!(newer, FailureCode::Unknown);
    }
}
