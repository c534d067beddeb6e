//! Send-window autotuning: how many bytes quinn may buffer for sending,
//! sized to the path instead of fixed.
//!
//! quinn's send window bounds the bytes written to a connection's streams
//! and not yet acknowledged. A fixed large window (64 MiB) lets the sender
//! run far ahead of the wire on a fast, short path: page frames then wait
//! in quinn's buffers long enough to leave the CPU cache, and quinn reads
//! them back from memory when it builds packets. Measured on loopback
//! (`transport_bench`, interleaved runs, medians), a 4 MiB window moved
//! pages 9% (1 stream) and 14% (4 streams) faster than 64 MiB. A long fat
//! path needs the large window to keep the pipe full.
//!
//! So the window follows the path: every tick it is set to
//! [`BDP_FACTOR`] x the bandwidth-delay product measured over that tick
//! (bytes sent / tick x smoothed RTT), between a floor and the configured
//! ceiling. While the window is what limits the sender, the measured
//! product is at most the window and the next window up to `BDP_FACTOR`
//! times larger, so a window too small for the path grows within a few
//! ticks; one larger than the path needs shrinks to fit it.

use std::time::Duration;

/// Window = this x the measured bandwidth-delay product.
pub const BDP_FACTOR: u64 = 4;

/// How often the window is re-sized.
pub const TICK: Duration = Duration::from_millis(20);

/// The sans-IO part: from (time, bytes sent so far, RTT) samples to a
/// window size.
#[derive(Debug, Clone)]
pub struct SendWindowTuner {
    floor: u64,
    ceiling: u64,
    window: u64,
    last: Option<(Duration, u64)>,
}

impl SendWindowTuner {
    /// A tuner that starts at `ceiling` and keeps the window in
    /// `floor..=ceiling` (a floor above the ceiling is taken as the
    /// ceiling: a fixed window).
    pub fn new(floor: u64, ceiling: u64) -> Self {
        let floor = floor.min(ceiling);
        Self {
            floor,
            ceiling,
            window: ceiling,
            last: None,
        }
    }

    /// The window now.
    pub fn window(&self) -> u64 {
        self.window
    }

    /// Takes a sample: `now` (any monotonic clock), `sent` (total bytes the
    /// connection has sent, never decreasing), `rtt` (smoothed). Returns the
    /// new window when it changed by more than an eighth (small changes
    /// are not worth a lock on the connection).
    pub fn sample(&mut self, now: Duration, sent: u64, rtt: Duration) -> Option<u64> {
        let (then, before) = self.last.replace((now, sent))?;
        let elapsed = now.saturating_sub(then);
        if elapsed.is_zero() {
            return None;
        }
        let bytes = sent.saturating_sub(before);
        // bytes/s x rtt, in u128 so a long RTT cannot overflow.
        let bdp = u128::from(bytes) * rtt.as_nanos() / elapsed.as_nanos();
        let want = (bdp.saturating_mul(u128::from(BDP_FACTOR)))
            .min(u128::from(self.ceiling))
            .max(u128::from(self.floor)) as u64;
        let change = want.abs_diff(self.window);
        if change.saturating_mul(8) <= self.window {
            return None;
        }
        self.window = want;
        Some(want)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A path of `rate` bytes/s and `rtt`, whose sender is limited by the
    /// window (at most window / rtt per second) or by the path.
    fn run(tuner: &mut SendWindowTuner, rate: u64, rtt: Duration, ticks: u64) -> u64 {
        let mut sent = 0;
        let mut t = Duration::ZERO;
        tuner.sample(t, sent, rtt);
        for _ in 0..ticks {
            let limited = (tuner.window() as u128 * 1_000_000_000 / rtt.as_nanos()) as u64;
            let per_s = rate.min(limited);
            t += TICK;
            sent += per_s * TICK.as_millis() as u64 / 1000;
            tuner.sample(t, sent, rtt);
        }
        tuner.window()
    }

    #[test]
    fn a_short_fast_path_gets_the_floor() {
        // Loopback: 2.5 GiB/s, 80 us RTT: BDP 200 KiB.
        let mut t = SendWindowTuner::new(4 * MIB, 64 * MIB);
        assert_eq!(
            run(&mut t, 2560 * MIB, Duration::from_micros(80), 10),
            4 * MIB
        );
    }

    #[test]
    fn a_long_fat_path_grows_from_the_floor_to_four_bdp() {
        // 10 Gbit/s, 20 ms: BDP 25 MB; the window must reach 4 x that, capped.
        let mut t = SendWindowTuner::new(4 * MIB, 256 * MIB);
        t.window = 4 * MIB;
        let w = run(&mut t, 1_250_000_000, ms(20), 20);
        let bdp = 1_250_000_000u64 / 50;
        assert!(w >= 3 * bdp && w <= 4 * bdp + 1, "window {w}, bdp {bdp}");
        // Capped by the ceiling.
        let mut t = SendWindowTuner::new(4 * MIB, 64 * MIB);
        t.window = 4 * MIB;
        assert_eq!(run(&mut t, 1_250_000_000, ms(20), 20), 64 * MIB);
    }

    #[test]
    fn an_idle_connection_goes_to_the_floor_and_back_up_when_busy() {
        let mut t = SendWindowTuner::new(2 * MIB, 64 * MIB);
        assert_eq!(t.sample(ms(0), 0, ms(10)), None);
        assert_eq!(t.sample(ms(20), 0, ms(10)), Some(2 * MIB));
        // 1 GB/s x 10 ms = 10 MB in flight: 4 x that after a busy tick,
        // though the window held the sender back (2 MiB / 10 ms).
        let w = run(&mut t, 1_000_000_000, ms(10), 3);
        assert!(w > 8 * MIB, "{w}");
    }

    #[test]
    fn small_changes_are_not_reported() {
        let mut t = SendWindowTuner::new(MIB, 64 * MIB);
        t.window = 40 * MIB;
        t.sample(ms(0), 0, ms(10));
        // BDP 10.5 MB -> want 42 MB: within an eighth of 40 MiB.
        assert_eq!(t.sample(ms(1000), 1_050_000_000, ms(10)), None);
        assert_eq!(t.window(), 40 * MIB);
    }

    #[test]
    fn a_floor_above_the_ceiling_is_a_fixed_window() {
        let mut t = SendWindowTuner::new(128 * MIB, 64 * MIB);
        t.sample(ms(0), 0, ms(1));
        assert_eq!(t.sample(ms(20), 0, ms(1)), None);
        assert_eq!(t.window(), 64 * MIB);
    }
}
