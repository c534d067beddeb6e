//! Helpers shared by the post-copy and keepalive tests: a sink that counts
//! installs, endpoints with a short keepalive and a UDP proxy
//! that can blackhole all traffic between them.

#![allow(dead_code)]

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UdpSocket;
use transport::endpoint::{Endpoint, EndpointConfig, Keepalive, PeerConnection};
use transport::identity::{ClusterCa, HostName, Validity};
use transport::layout::{MemoryLayout, PageIndex, PAGE_SIZE};
use transport::session::PageSink;
use transport::testing::MemPages;

/// Destination memory that counts how often each page was written.
pub struct Recording {
    pub mem: MemPages,
    pub writes: Vec<u32>,
    /// Every write call with data: (first page, pages).
    pub calls: Vec<(u64, u64)>,
}

impl Recording {
    pub fn new(mem: MemPages) -> Self {
        let pages = mem.0.len() / PAGE_SIZE;
        Self {
            mem,
            writes: vec![0; pages],
            calls: Vec::new(),
        }
    }
}

impl PageSink for Recording {
    fn write_page(&mut self, index: PageIndex, data: &[u8; PAGE_SIZE]) -> std::io::Result<()> {
        self.writes[index.0 as usize] += 1;
        self.calls.push((index.0, 1));
        self.mem.write_page(index, data)
    }
    fn write_pages(&mut self, first: PageIndex, data: &[u8]) -> std::io::Result<()> {
        let pages = (data.len() / PAGE_SIZE) as u64;
        for i in first.0..first.0 + pages {
            self.writes[i as usize] += 1;
        }
        self.calls.push((first.0, pages));
        self.mem.write_pages(first, data)
    }
    fn write_zero(&mut self, start: PageIndex, count: u64) -> std::io::Result<()> {
        for i in start.0..start.0 + count {
            self.writes[i as usize] += 1;
        }
        self.mem.write_zero(start, count)
    }
}

pub fn layout(pages: u64) -> MemoryLayout {
    MemoryLayout::x86(pages * PAGE_SIZE as u64).unwrap()
}

pub fn host(name: &str) -> HostName {
    HostName::new(name).unwrap()
}

/// Forwards datagrams between one client and `server`, unless blackholed.
pub struct Proxy {
    pub addr: SocketAddr,
    blackhole: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(server: SocketAddr) -> Self {
        let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = socket.local_addr().unwrap();
        let blackhole = Arc::new(AtomicBool::new(false));
        let drop_all = blackhole.clone();
        let task = tokio::spawn(async move {
            let mut client: Option<SocketAddr> = None;
            let mut buf = vec![0u8; 65536];
            loop {
                let Ok((n, from)) = socket.recv_from(&mut buf).await else {
                    return;
                };
                if drop_all.load(Ordering::SeqCst) {
                    continue;
                }
                let to = if from == server {
                    match client {
                        Some(c) => c,
                        None => continue,
                    }
                } else {
                    client = Some(from);
                    server
                };
                // A full socket buffer is just loss, which QUIC handles.
                let _ = socket.send_to(&buf[..n], to).await;
            }
        });
        Self {
            addr,
            blackhole,
            task,
        }
    }

    pub fn set_blackhole(&self, on: bool) {
        self.blackhole.store(on, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Two endpoints (`src`, `dst`) with `keepalive`; when `proxied`, the
/// source dials the destination through a [`Proxy`].
pub struct Pair {
    pub src: Endpoint,
    pub dst: Endpoint,
    pub proxy: Option<Proxy>,
}

impl Pair {
    pub async fn new(keepalive: Option<Keepalive>, proxied: bool) -> Self {
        if std::env::var_os("RUST_LOG").is_some() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
                .with_test_writer()
                .try_init();
        }
        let ca = ClusterCa::generate("cluster").unwrap();
        let validity = Validity::for_duration(Duration::from_secs(3600));
        let mut config = EndpointConfig::listening_on(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)));
        if let Some(k) = keepalive {
            config.keepalive = k;
        }
        let src =
            Endpoint::bind(&config, &ca.host_identity(&host("src"), validity).unwrap()).unwrap();
        let dst =
            Endpoint::bind(&config, &ca.host_identity(&host("dst"), validity).unwrap()).unwrap();
        let proxy = if proxied {
            Some(Proxy::start(dst.local_addr().unwrap()).await)
        } else {
            None
        };
        Self { src, dst, proxy }
    }

    /// Dials a new connection; returns (source side, destination side).
    pub async fn connect(&self) -> (PeerConnection, PeerConnection) {
        let server = self.dst.clone();
        let accepted = tokio::spawn(async move { server.accept().await.unwrap().unwrap() });
        let to = match &self.proxy {
            Some(p) => p.addr,
            None => self.dst.local_addr().unwrap(),
        };
        let dialed = self.src.connect(to, &host("dst")).await.unwrap();
        (dialed, accepted.await.unwrap())
    }
}
