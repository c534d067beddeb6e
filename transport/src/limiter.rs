//! Bandwidth limit of one migration (`bandwidthPerMigration`): a token
//! bucket shared by all of the migration's streams.
//!
//! Tokens are bytes. They accrue continuously at the configured rate up to a
//! small burst (one refill period's worth, at least [`MIN_BURST`]), so an idle
//! migration cannot save up and then flood the link. A caller may take more
//! than is in the bucket as long as the bucket is not already in debt; later
//! callers then wait for the debt to be paid off. That way frames larger than
//! the burst never deadlock and the long-run rate is exact.
//!
//! Waiters queue on an async mutex (FIFO), and sleep at most one
//! [`REFILL_PERIOD`] at a time, so a [`RateLimiter::set_rate`] takes effect
//! within one period even for a caller that is already waiting. Time comes
//! from `tokio::time`, so tests run on a paused clock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;

/// Longest a waiter sleeps before looking at the rate again.
pub const REFILL_PERIOD: Duration = Duration::from_millis(10);

/// Smallest burst: one largest page batch frame, so a slow limit does not
/// put every frame into debt.
pub const MIN_BURST: u64 = (crate::codec::HEADER_LEN + crate::codec::MAX_BATCH_BODY) as u64;

/// A rate in bytes per second; zero means unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct BytesPerSecond(pub u64);

impl BytesPerSecond {
    /// No limit.
    pub const UNLIMITED: Self = Self(0);

    /// `n` MiB/s, the unit of `bandwidthPerMigration` ("64Mi").
    pub const fn mib(n: u64) -> Self {
        Self(n * 1024 * 1024)
    }

    /// True for the "no limit" value.
    pub const fn is_unlimited(self) -> bool {
        self.0 == 0
    }
}

/// Handle to one migration's token bucket; clones share the bucket.
#[derive(Debug, Clone)]
pub struct RateLimiter {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Read on every wake-up, so changes apply to callers already waiting.
    rate: AtomicU64,
    bucket: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    /// May go negative (debt) after a large acquire.
    tokens: f64,
    last_refill: Instant,
}

impl RateLimiter {
    /// A limiter at `rate`, starting with a full burst.
    pub fn new(rate: BytesPerSecond) -> Self {
        Self {
            inner: Arc::new(Inner {
                rate: AtomicU64::new(rate.0),
                bucket: Mutex::new(Bucket {
                    tokens: burst(rate.0),
                    last_refill: Instant::now(),
                }),
            }),
        }
    }

    /// A limiter that never waits.
    pub fn unlimited() -> Self {
        Self::new(BytesPerSecond::UNLIMITED)
    }

    /// The current rate.
    pub fn rate(&self) -> BytesPerSecond {
        BytesPerSecond(self.inner.rate.load(Ordering::Relaxed))
    }

    /// Changes the rate; applies within one [`REFILL_PERIOD`], including to
    /// callers already waiting.
    pub fn set_rate(&self, rate: BytesPerSecond) {
        self.inner.rate.store(rate.0, Ordering::Relaxed);
    }

    /// Waits until `bytes` may be sent, then charges them to the bucket.
    pub async fn acquire(&self, bytes: u64) {
        if self.rate().is_unlimited() {
            return;
        }
        // Held across the sleeps: waiters are served in arrival order and
        // only the head of the queue touches the clock.
        let mut bucket = self.inner.bucket.lock().await;
        loop {
            let rate = self.inner.rate.load(Ordering::Relaxed);
            let now = Instant::now();
            if rate == 0 {
                bucket.last_refill = now;
                return;
            }
            let elapsed = now.duration_since(bucket.last_refill).as_secs_f64();
            bucket.tokens = (bucket.tokens + elapsed * rate as f64).min(burst(rate));
            bucket.last_refill = now;
            if bucket.tokens >= 0.0 {
                bucket.tokens -= bytes as f64;
                return;
            }
            let until_solvent = Duration::from_secs_f64(-bucket.tokens / rate as f64);
            // Round up to whole milliseconds so a paused clock (which moves
            // in ms steps for timers) always ends the debt on wake-up.
            let nap = until_solvent
                .min(REFILL_PERIOD)
                .max(Duration::from_millis(1));
            tokio::time::sleep(nap).await;
        }
    }
}

/// Burst for `rate`: one refill period's worth, at least [`MIN_BURST`].
fn burst(rate: u64) -> f64 {
    let per_period = rate as f64 * REFILL_PERIOD.as_secs_f64();
    per_period.max(MIN_BURST as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    /// Bytes acquired by `tasks` concurrent callers in `chunk`s within
    /// `window` of (paused) time.
    async fn delivered(limiter: &RateLimiter, tasks: usize, chunk: u64, window: Duration) -> u64 {
        let start = Instant::now();
        let total = Arc::new(AtomicU64::new(0));
        let mut handles = Vec::new();
        for _ in 0..tasks {
            let limiter = limiter.clone();
            let total = total.clone();
            handles.push(tokio::spawn(async move {
                loop {
                    limiter.acquire(chunk).await;
                    if start.elapsed() >= window {
                        break;
                    }
                    total.fetch_add(chunk, Ordering::Relaxed);
                }
            }));
        }
        for h in handles {
            h.await.unwrap();
        }
        total.load(Ordering::Relaxed)
    }

    #[tokio::test(start_paused = true)]
    async fn sustained_rate_is_accurate() {
        let limiter = RateLimiter::new(BytesPerSecond::mib(64));
        let got = delivered(&limiter, 4, 256 * 1024, Duration::from_secs(10)).await;
        let want = 640 * MIB;
        let err = (got as f64 - want as f64).abs() / want as f64;
        assert!(err < 0.05, "delivered {got} bytes, wanted {want} (+-5%)");
    }

    #[tokio::test(start_paused = true)]
    async fn rate_change_applies_within_one_period() {
        let limiter = RateLimiter::new(BytesPerSecond(MIB));
        // Drain the burst and go into debt: the next waiter at 1 MiB/s
        // would sleep ~1 s.
        limiter.acquire(2 * MIB).await;
        let start = Instant::now();
        let waiter = {
            let limiter = limiter.clone();
            tokio::spawn(async move {
                limiter.acquire(4096).await;
                start.elapsed()
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        limiter.set_rate(BytesPerSecond::mib(1024));
        let waited = waiter.await.unwrap();
        assert!(
            waited <= Duration::from_millis(50) + REFILL_PERIOD,
            "waited {waited:?} after the rate went up"
        );
        assert!(
            waited >= Duration::from_millis(50),
            "released early: {waited:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn zero_is_unlimited() {
        let limiter = RateLimiter::unlimited();
        let start = Instant::now();
        for _ in 0..1000 {
            limiter.acquire(64 * MIB).await;
        }
        assert_eq!(start.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn switching_to_unlimited_releases_waiters() {
        let limiter = RateLimiter::new(BytesPerSecond(1024));
        limiter.acquire(MIB).await; // ~1000 s of debt at 1 KiB/s
        let start = Instant::now();
        let waiter = {
            let limiter = limiter.clone();
            tokio::spawn(async move { limiter.acquire(1).await })
        };
        tokio::time::sleep(Duration::from_millis(30)).await;
        limiter.set_rate(BytesPerSecond::UNLIMITED);
        waiter.await.unwrap();
        assert!(start.elapsed() <= Duration::from_millis(30) + REFILL_PERIOD);
    }

    #[tokio::test(start_paused = true)]
    async fn slow_rate_is_respected_with_large_requests() {
        // Requests far larger than the burst still average out to the rate.
        let limiter = RateLimiter::new(BytesPerSecond::mib(8));
        let got = delivered(&limiter, 2, 4 * MIB, Duration::from_secs(10)).await;
        let want = 80 * MIB;
        let err = (got as f64 - want as f64).abs() / want as f64;
        assert!(err < 0.1, "delivered {got} bytes, wanted {want}");
    }
}
