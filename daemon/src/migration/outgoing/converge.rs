//! Auto-converge and the downtime estimate: after each iteration the
//! source decides whether to throttle the guest's vCPUs, and whether what
//! is left could be sent within the downtime limit.

use std::time::Duration;

use crate::model::{AutoConvergeStep, MigrationConfiguration};

/// QEMU's auto-converge trigger: an iteration dirtied more than this share
/// of what it sent ...
const THROTTLE_TRIGGER: f64 = 0.5;
/// ... this many times in a row.
const THROTTLE_TRIGGER_COUNT: u32 = 2;
/// QEMU's first throttle and its step (`cpu-throttle-initial`/`-increment`).
const THROTTLE_INITIAL: u8 = 20;
const THROTTLE_INCREMENT: u8 = 10;
/// The VMM's highest throttle.
const THROTTLE_MAX: u8 = 99;
/// Auto-converge: decides the throttle after each iteration.
pub(super) struct AutoConverge {
    enabled: bool,
    step: AutoConvergeStep,
    /// Iterations in a row that dirtied more than half of what they sent.
    high: u32,
    current: u8,
}

impl AutoConverge {
    pub(super) fn new(c: &MigrationConfiguration) -> Self {
        Self {
            enabled: c.allow_auto_converge,
            step: c.auto_converge_step,
            high: 0,
            current: 0,
        }
    }

    /// `sent`: guest bytes the last iteration sent; `dirtied`: bytes the
    /// guest dirtied meanwhile; `bandwidth`: bytes/s. Returns a new
    /// throttle when one is due.
    pub(super) fn next(&mut self, sent: u64, dirtied: u64, bandwidth: f64) -> Option<u8> {
        if !self.enabled || self.current >= THROTTLE_MAX {
            return None;
        }
        if (dirtied as f64) <= sent as f64 * THROTTLE_TRIGGER {
            self.high = 0;
            return None;
        }
        self.high += 1;
        if self.high < THROTTLE_TRIGGER_COUNT {
            return None;
        }
        self.high = 0;
        let fixed = if self.current == 0 {
            THROTTLE_INITIAL
        } else {
            self.current.saturating_add(THROTTLE_INCREMENT)
        };
        let next = match self.step {
            AutoConvergeStep::Fixed => fixed,
            AutoConvergeStep::Adaptive => {
                fixed.max(adaptive_throttle(self.current, sent, dirtied, bandwidth))
            }
        };
        self.current = next.min(THROTTLE_MAX);
        Some(self.current)
    }
}

/// The throttle at which the guest would dirty at most half of what the
/// link sends in the same time, from one iteration measured at throttle
/// `current`. An iteration that sent `sent` bytes took `sent / bandwidth`
/// seconds; the guest dirtied `dirtied` bytes in it while getting
/// `100 - current` percent of its CPU time.
fn adaptive_throttle(current: u8, sent: u64, dirtied: u64, bandwidth: f64) -> u8 {
    if sent == 0 || dirtied == 0 || bandwidth <= 0.0 {
        return 0;
    }
    let running = 1.0 - f64::from(current) / 100.0;
    // Dirty bytes per byte sent, unthrottled.
    let ratio = dirtied as f64 / sent as f64 / running.max(0.01);
    let allowed = THROTTLE_TRIGGER / ratio;
    let pct = ((1.0 - allowed) * 100.0).ceil();
    pct.clamp(0.0, f64::from(THROTTLE_MAX)) as u8
}

/// Time to send `bytes` at `bandwidth` bytes/s (unknown bandwidth: never
/// small enough to stop, unless there is nothing left).
pub fn expected_downtime(bytes: u64, bandwidth: f64) -> Duration {
    if bytes == 0 {
        return Duration::ZERO;
    }
    if bandwidth <= 0.0 {
        return Duration::MAX;
    }
    Duration::try_from_secs_f64(bytes as f64 / bandwidth).unwrap_or(Duration::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn downtime_estimate() {
        assert_eq!(expected_downtime(0, 0.0), Duration::ZERO);
        assert_eq!(expected_downtime(1, 0.0), Duration::MAX);
        assert_eq!(
            expected_downtime(100 << 20, (1u64 << 30) as f64),
            Duration::from_secs_f64(100.0 / 1024.0)
        );
    }

    fn config(step: AutoConvergeStep) -> MigrationConfiguration {
        let mut c = crate::config::MigrationDefaults::default().resolve(&Default::default());
        c.allow_auto_converge = true;
        c.auto_converge_step = step;
        c
    }

    #[test]
    fn auto_converge_follows_qemus_trigger_and_steps() {
        let mut a = AutoConverge::new(&config(AutoConvergeStep::Fixed));
        let bw = 100e6;
        // Dirtying at most half of what was sent never throttles.
        for _ in 0..5 {
            assert_eq!(a.next(100, 50, bw), None);
        }
        // Twice in a row above half: 20%, then +10% per two more.
        assert_eq!(a.next(100, 60, bw), None);
        assert_eq!(a.next(100, 60, bw), Some(20));
        assert_eq!(a.next(100, 60, bw), None);
        assert_eq!(a.next(100, 60, bw), Some(30));
        // A good iteration resets the count.
        assert_eq!(a.next(100, 10, bw), None);
        assert_eq!(a.next(100, 60, bw), None);
        assert_eq!(a.next(100, 60, bw), Some(40));
        for _ in 0..40 {
            a.next(100, 100, bw);
        }
        assert_eq!(a.current, THROTTLE_MAX);
        assert_eq!(a.next(100, 100, bw), None);
    }

    #[test]
    fn adaptive_jumps_to_the_needed_throttle() {
        // Unthrottled, the guest dirties 4x what is sent: it must run at
        // most 1/8 of the time to dirty half of it: 88% (ceil of 87.5).
        assert_eq!(adaptive_throttle(0, 100, 400, 1e6), 88);
        // The same guest measured at 50%: same answer.
        assert_eq!(adaptive_throttle(50, 100, 200, 1e6), 88);
        // Barely above the trigger: QEMU's step wins.
        let mut a = AutoConverge::new(&config(AutoConvergeStep::Adaptive));
        a.next(100, 51, 1e6);
        assert_eq!(a.next(100, 51, 1e6), Some(THROTTLE_INITIAL));
        let mut a = AutoConverge::new(&config(AutoConvergeStep::Adaptive));
        a.next(100, 400, 1e6);
        assert_eq!(a.next(100, 400, 1e6), Some(88));
        // Disabled: never.
        let mut c = config(AutoConvergeStep::Adaptive);
        c.allow_auto_converge = false;
        let mut a = AutoConverge::new(&c);
        assert_eq!(a.next(1, 1000, 1e6), None);
        assert_eq!(a.next(1, 1000, 1e6), None);
    }
}
