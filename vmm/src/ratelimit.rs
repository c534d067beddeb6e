//! Rate limiting of guest-triggerable log lines (STYLE: a guest must not be
//! able to flood the VMM's log), shared by the vCPU exit handlers and the
//! serial console.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

/// Allows a guest-triggerable log line at most once per second.
#[derive(Debug)]
pub struct RateLimit {
    next_ms: AtomicU64,
}

impl RateLimit {
    pub const fn new() -> Self {
        RateLimit {
            next_ms: AtomicU64::new(0),
        }
    }

    /// Whether to log now.
    pub fn allow(&self) -> bool {
        static EPOCH: OnceLock<Instant> = OnceLock::new();
        let now = EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64;
        let next = self.next_ms.load(Ordering::Relaxed);
        now >= next
            && self
                .next_ms
                .compare_exchange(next, now + 1000, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}

impl Default for RateLimit {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_allows_once_per_second() {
        let r = RateLimit::new();
        assert!(r.allow());
        assert!(!r.allow());
        assert!(!r.allow());
    }
}
