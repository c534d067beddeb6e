//! Two network namespaces joined by a veth pair, for migrations over a
//! real (virtual) link instead of loopback. Addresses come from
//! 198.18.0.0/15, the range reserved for benchmarking (RFC 2544), so they
//! never collide with a real network. Removed on drop, also when a test
//! fails; deleting a namespace also deletes its end of the veth.

use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// Side A's address.
pub const ADDR_A: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// Side B's address.
pub const ADDR_B: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);

static NEXT: AtomicU32 = AtomicU32::new(0);

/// `mgt-a-<pid>[-n]` and `mgt-b-<pid>[-n]`, linked.
pub struct NetnsPair {
    pub a: String,
    pub b: String,
}

/// Runs `ip args...`, returning its stderr on failure.
fn ip(args: &[&str]) -> Result<(), String> {
    let o = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    if o.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr).trim()
        ))
    }
}

impl NetnsPair {
    /// Creates the pair, or says why it cannot (not root, no `ip`).
    pub fn create() -> Result<Self, String> {
        let pid = std::process::id();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let suffix = if n == 0 {
            pid.to_string()
        } else {
            format!("{pid}-{n}")
        };
        let pair = Self {
            a: format!("mgt-a-{suffix}"),
            b: format!("mgt-b-{suffix}"),
        };
        // Interface names are limited to 15 bytes.
        let va = format!("mva{pid}x{n}");
        let vb = format!("mvb{pid}x{n}");
        ip(&["netns", "add", &pair.a])?;
        // From here on Drop removes whatever was made.
        ip(&["netns", "add", &pair.b])?;
        ip(&["link", "add", &va, "type", "veth", "peer", "name", &vb])?;
        for (ns, dev, addr) in [(&pair.a, &va, ADDR_A), (&pair.b, &vb, ADDR_B)] {
            if let Err(e) = ip(&["link", "set", dev, "netns", ns]) {
                let _ = ip(&["link", "del", dev]);
                return Err(e);
            }
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(pair)
    }
}

impl NetnsPair {
    /// [`NetnsPair::create`], or `None` after saying why the test skips;
    /// under `MIGRATED_REQUIRE_NETNS=1` a pair that cannot be made fails
    /// the test instead.
    pub fn create_or_skip(test: &str) -> Option<Self> {
        match Self::create() {
            Ok(ns) => Some(ns),
            Err(e) if std::env::var("MIGRATED_REQUIRE_NETNS").as_deref() == Ok("1") => {
                panic!("{test}: cannot create network namespaces: {e}")
            }
            Err(e) => {
                eprintln!("SKIPPED {test}: {e} (needs root and iproute2; set MIGRATED_REQUIRE_NETNS=1 to fail instead)");
                None
            }
        }
    }
}

impl Drop for NetnsPair {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            if let Err(e) = ip(&["netns", "del", ns]) {
                eprintln!("e2e: cannot remove netns {ns}: {e}");
            }
        }
    }
}
