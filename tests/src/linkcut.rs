//! Cutting the link between the two namespaces of a [`NetnsPair`], to test
//! what the daemons do when their peer goes silent (keepalive abort).
//!
//! The default cut drops every packet that arrives on the veth in *both*
//! namespaces (an nftables input chain with policy drop): packets still
//! leave, as on a real network where a switch died, so senders see no
//! local error and only the peer's silence tells them. The alternative
//! takes both veth ends down, which senders notice at once (no route).
//!
//! A [`LinkCut`] borrows the pair, so it is undone before the namespaces
//! go, and its `Drop` restores the link even when a test fails halfway.

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsFd;
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sched::CloneFlags;

use crate::netns::{NetnsPair, ADDR_A, ADDR_B};

/// Our nftables table; nothing else in a test namespace has rules.
const TABLE: &str = "migrated_e2e_cut";

/// How the link is cut.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum CutMethod {
    /// nftables drops everything arriving on the veth, both sides.
    Nftables,
    /// `ip link set DEV down` on both veth ends.
    LinkDown,
}

/// A cut or restore that did not happen.
#[derive(Debug, thiserror::Error)]
pub enum LinkCutError {
    #[error("cannot run {tool}")]
    Spawn {
        tool: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("no veth device in netns {netns}")]
    NoVeth { netns: String },
    #[error("cannot enter netns {netns}")]
    Enter {
        netns: String,
        #[source]
        source: std::io::Error,
    },
    #[error("udp probe in netns {netns}")]
    Probe {
        netns: String,
        #[source]
        source: std::io::Error,
    },
}

/// Runs `program args...`, returning stdout; stderr becomes the error.
fn run(program: &'static str, args: &[&str]) -> Result<String, LinkCutError> {
    let o = Command::new(program)
        .args(args)
        .output()
        .map_err(|source| LinkCutError::Spawn {
            tool: program,
            source,
        })?;
    if o.status.success() {
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    } else {
        Err(LinkCutError::Command {
            command: format!("{program} {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&o.stderr).trim().to_owned(),
        })
    }
}

/// Whether `nft` can be run at all (CI installs Debian's `nftables`).
pub fn nft_available() -> Result<(), LinkCutError> {
    run("nft", &["--version"]).map(drop)
}

/// Cuts and restores the link of one [`NetnsPair`]; restores on drop.
pub struct LinkCut<'a> {
    pair: &'a NetnsPair,
    method: CutMethod,
    cut: bool,
}

impl<'a> LinkCut<'a> {
    /// Checks that the method's tool is there; the link stays up.
    pub fn new(pair: &'a NetnsPair, method: CutMethod) -> Result<Self, LinkCutError> {
        if method == CutMethod::Nftables {
            nft_available()?;
        }
        Ok(Self {
            pair,
            method,
            cut: false,
        })
    }

    pub fn is_cut(&self) -> bool {
        self.cut
    }

    /// Stops all traffic between the two namespaces, both directions.
    pub fn cut(&mut self) -> Result<(), LinkCutError> {
        if self.cut {
            return Ok(());
        }
        // Marked first: a half-done cut (one side only) is still undone.
        self.cut = true;
        match self.method {
            CutMethod::Nftables => {
                // One transaction per side; loopback stays open so nothing
                // inside a namespace is affected.
                let rules = format!(
                    "add table inet {TABLE}; \
                     add chain inet {TABLE} input {{ type filter hook input priority -300; policy drop; }}; \
                     add rule inet {TABLE} input iif \"lo\" accept"
                );
                for ns in self.namespaces() {
                    run("ip", &["netns", "exec", ns, "nft", &rules])?;
                }
            }
            CutMethod::LinkDown => {
                for ns in self.namespaces() {
                    let dev = veth_in(ns)?;
                    run("ip", &["-n", ns, "link", "set", &dev, "down"])?;
                }
            }
        }
        Ok(())
    }

    /// Lets traffic through again. Tries both sides even if one fails.
    pub fn restore(&mut self) -> Result<(), LinkCutError> {
        if !self.cut {
            return Ok(());
        }
        let mut first_error = None;
        for ns in self.namespaces() {
            let r = match self.method {
                CutMethod::Nftables => {
                    // Absent when the cut failed before this side: fine.
                    let listed = run("ip", &["netns", "exec", ns, "nft", "list", "tables"]);
                    match listed {
                        Ok(t) if !t.contains(TABLE) => Ok(()),
                        _ => run(
                            "ip",
                            &["netns", "exec", ns, "nft", "delete", "table", "inet", TABLE],
                        )
                        .map(drop),
                    }
                }
                CutMethod::LinkDown => veth_in(ns)
                    .and_then(|dev| run("ip", &["-n", ns, "link", "set", &dev, "up"]).map(drop)),
            };
            if let Err(e) = r {
                first_error.get_or_insert(e);
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => {
                self.cut = false;
                Ok(())
            }
        }
    }

    /// Whether a UDP datagram from A gets to B now (tries for `timeout`).
    /// Tests use it to prove a cut or restore took effect.
    pub fn probe(&self, timeout: Duration) -> Result<bool, LinkCutError> {
        udp_reaches(self.pair, timeout)
    }

    fn namespaces(&self) -> [&'a str; 2] {
        [&self.pair.a, &self.pair.b]
    }
}

impl Drop for LinkCut<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.restore() {
            eprintln!(
                "e2e: cannot restore the link between {} and {}: {e}",
                self.pair.a, self.pair.b
            );
        }
    }
}

/// The veth end inside `ns` (`ip -o link` prints `N: name@ifM: ...`).
fn veth_in(ns: &str) -> Result<String, LinkCutError> {
    let out = run("ip", &["-n", ns, "-o", "link", "show", "type", "veth"])?;
    out.lines()
        .filter_map(|l| l.split(':').nth(1))
        .map(|n| n.trim().split('@').next().unwrap_or("").to_owned())
        .find(|n| !n.is_empty())
        .ok_or_else(|| LinkCutError::NoVeth { netns: ns.into() })
}

/// Binds a UDP socket inside netns `ns`. A socket keeps the namespace it
/// was made in, so only a short-lived thread enters it.
fn udp_socket_in(ns: &str, addr: SocketAddr) -> Result<UdpSocket, LinkCutError> {
    let enter = |source| LinkCutError::Enter {
        netns: ns.into(),
        source,
    };
    std::thread::scope(|s| {
        s.spawn(|| {
            let f = std::fs::File::open(format!("/run/netns/{ns}")).map_err(enter)?;
            nix::sched::setns(f.as_fd(), CloneFlags::CLONE_NEWNET)
                .map_err(|e| enter(std::io::Error::from(e)))?;
            UdpSocket::bind(addr).map_err(|source| LinkCutError::Probe {
                netns: ns.into(),
                source,
            })
        })
        .join()
        .expect("probe thread does not panic")
    })
}

/// Sends datagrams from A to B for up to `timeout`; true once one arrives.
pub fn udp_reaches(pair: &NetnsPair, timeout: Duration) -> Result<bool, LinkCutError> {
    let probe_err = |ns: &str| {
        let netns = ns.to_owned();
        move |source| LinkCutError::Probe { netns, source }
    };
    let rx = udp_socket_in(&pair.b, (ADDR_B, 0).into())?;
    let tx = udp_socket_in(&pair.a, (ADDR_A, 0).into())?;
    let to = rx.local_addr().map_err(probe_err(&pair.b))?;
    rx.set_read_timeout(Some(Duration::from_millis(100)))
        .map_err(probe_err(&pair.b))?;
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 16];
    loop {
        // A send may fail while the link is down (no route): that is a
        // datagram that did not arrive, not a probe failure.
        let _ = tx.send_to(b"migrated-probe", to);
        match rx.recv_from(&mut buf) {
            Ok((n, _)) if &buf[..n] == b"migrated-probe" => return Ok(true),
            Ok(_) => {}
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => return Err(probe_err(&pair.b)(e)),
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
    }
}
